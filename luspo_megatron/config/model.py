"""The model section (which network trains) and the parallel section (how it is laid out)."""

from __future__ import annotations

from dataclasses import dataclass

from luspo_megatron.config.fields import check, opt, positive, validate_fields


# --------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelConfig:
    """Which network trains. Without ``hf_checkpoint`` a tiny Qwen3-MoE is built in code."""

    hf_checkpoint: str | None = opt(
        None, "--hf-checkpoint", help="Hugging Face model directory (config.json + safetensors) to start from."
    )
    preset: str = opt(
        "tiny_qwen3_moe", "--model-preset",
        help="Model built in code when no --hf-checkpoint is given (tiny test models).",
        choices=("tiny_qwen3_moe", "tiny_qwen3", "tiny_qwen25"),
    )
    dtype: str = opt("fp32", "--model-dtype", help="Parameter dtype.", choices=("fp32", "bf16"))
    vocab: str = opt(
        "task", "--model-vocab",
        help="Vocabulary of a preset model: task = the Qwen3 tokenizer restricted to the task's texts "
             "(fast on CPU); full = all 151,936 Qwen3 tokens.",
        choices=("task", "full"),
    )
    moe_aux_loss_coef: float | None = opt(
        None, "--moe-aux-loss-coeff", help="MoE load-balancing loss coefficient; None: the HF config's value."
    )
    use_transformer_engine: bool = opt(
        False, "--transformer-impl-te", help="Use Transformer Engine layer specs (GPU, needs the [gpu] extra).",
        action="store_true",
    )
    # Grouped experts, attention backend, activation recompute (models/megatron_config.py).
    moe_grouped_gemm: bool | None = opt(
        None, "--moe-grouped-gemm",
        help="All local experts of a MoE layer in one grouped GEMM (torch grouped_mm; models/experts.py) instead "
             "of one after another; same parameters and checkpoints. Unset: on with CUDA, off on a CPU; with "
             "Transformer Engine always TE's grouped GEMM. YAML false forces the sequential experts.",
        action="store_true",
    )
    attention_backend: str = opt(
        "auto", "--attention-backend",
        help="Core attention of the local spec (models/attention.py): auto (varlen on CUDA bf16 when it works, "
             "else causal; padded on CPU / fp32; the all-gather path with CP), padded (fp32, explicit mask), "
             "causal (input dtype, is_causal SDPA, no host sync), varlen (flash varlen on packed tokens; CUDA "
             "bf16), reference (dense O(T²), tests).",
        choices=("auto", "padded", "causal", "varlen", "reference"),
    )
    recompute_granularity: str | None = opt(
        None, "--recompute-granularity",
        help="Activation recompute: full (whole layers, needs --recompute-method and --recompute-num-layers) or "
             "selective (core attention of every layer). Unset: none.",
        choices=("full", "selective"),
    )
    recompute_method: str | None = opt(
        None, "--recompute-method",
        help="With --recompute-granularity full: uniform (chunks of N layers, all layers) or block (the first N "
             "layers of each pipeline stage).",
        choices=("uniform", "block"),
    )
    recompute_num_layers: int | None = opt(
        None, "--recompute-num-layers", help="N of --recompute-method (1 ≤ N ≤ layers per pipeline stage)."
    )
    # The KL reference model's weights between uses (parallel/policy.py::ReferenceOffload).
    ref_offload: bool | None = opt(
        None, "--ref-offload", action="store_true",
        help="Keep the reference model's weights in (pinned) host memory between its forward passes and copy "
             "them to the device for each one. Unset: on with CUDA, off on a CPU (where it saves nothing; the "
             "flag forces it, for tests). YAML false keeps the reference on the device.",
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.moe_aux_loss_coef is not None:
            check(self.moe_aux_loss_coef >= 0, ModelConfig, "moe_aux_loss_coef", "≥ 0", self.moe_aux_loss_coef)
        # The combinations megatron-core accepts (the layer-count bound needs the model:
        # models/megatron_config.recompute_options checks it).
        check(self.attention_backend in ("auto", "padded", "causal", "varlen", "reference"), ModelConfig,
               "attention_backend", "one of auto, padded, causal, varlen, reference", self.attention_backend)
        check(self.recompute_granularity in (None, "full", "selective"), ModelConfig, "recompute_granularity",
               "full or selective", self.recompute_granularity)
        check(self.recompute_method in (None, "uniform", "block"), ModelConfig, "recompute_method",
               "uniform or block", self.recompute_method)
        full = self.recompute_granularity == "full"
        if full:
            check(self.recompute_method is not None, ModelConfig, "recompute_method",
                   "uniform or block with --recompute-granularity full", self.recompute_method)
            check(self.recompute_num_layers is not None, ModelConfig, "recompute_num_layers",
                   "a positive integer with --recompute-granularity full", self.recompute_num_layers)
            positive(ModelConfig, self, "recompute_num_layers")
        else:
            rule = f"unset with --recompute-granularity {self.recompute_granularity}" if self.recompute_granularity \
                else "unset without --recompute-granularity full"
            check(self.recompute_method is None, ModelConfig, "recompute_method", rule, self.recompute_method)
            check(self.recompute_num_layers is None, ModelConfig, "recompute_num_layers", rule,
                   self.recompute_num_layers)


# ------------------------------------------------------------------------------------------ parallel
@dataclass(frozen=True)
class ParallelConfig:
    """Megatron-Core parallel layout. Data parallel is what is left: world / (tp·pp·cp)."""

    tensor_model_parallel_size: int = opt(1, "--tensor-model-parallel-size", "--tp", help="Tensor parallel size.")
    pipeline_model_parallel_size: int = opt(1, "--pipeline-model-parallel-size", "--pp", help="Pipeline stages.")
    virtual_pipeline_model_parallel_size: int | None = opt(
        None, "--virtual-pipeline-model-parallel-size", "--vpp", help="Model chunks per pipeline stage (interleaved)."
    )
    context_parallel_size: int = opt(1, "--context-parallel-size", "--cp", help="Context parallel size.")
    expert_model_parallel_size: int = opt(1, "--expert-model-parallel-size", "--ep", help="Expert parallel size.")
    expert_tensor_parallel_size: int | None = opt(
        None, "--expert-tensor-parallel-size", "--etp", help="Tensor parallel size inside experts; None: = tp."
    )
    sequence_parallel: bool = opt(
        False, "--sequence-parallel", help="Megatron sequence parallelism (forced on for MoE with tp > 1).",
        action="store_true",
    )
    use_distributed_optimizer: bool = opt(
        False, "--use-distributed-optimizer", help="Shard optimizer state over data parallel ranks.",
        action="store_true",
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        positive(
            ParallelConfig, self, "tensor_model_parallel_size", "pipeline_model_parallel_size",
            "context_parallel_size", "expert_model_parallel_size",
        )
        for name in ("virtual_pipeline_model_parallel_size", "expert_tensor_parallel_size"):
            if getattr(self, name) is not None:
                positive(ParallelConfig, self, name)
        if self.virtual_pipeline_model_parallel_size not in (None, 1):
            check(
                self.pipeline_model_parallel_size > 1, ParallelConfig, "virtual_pipeline_model_parallel_size",
                "--pp > 1 for interleaved pipelining", self.virtual_pipeline_model_parallel_size,
            )

    def megatron_sizes(self) -> dict[str, int | None]:
        """The layout sizes under the names both megatron's ``initialize_model_parallel`` and its
        ``TransformerConfig`` use."""
        names = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                 "context_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size")
        return {name: getattr(self, name) for name in names}

    @property
    def model_parallel_size(self) -> int:
        """tp·pp·cp: the ranks one model replica spans (world size must be a multiple)."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
