"""The model section (which network trains) and the parallel section (how it is laid out)."""

from __future__ import annotations

from dataclasses import dataclass

from luspo_megatron.config.fields import check, opt, positive


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

    def __post_init__(self) -> None:
        if self.moe_aux_loss_coef is not None:
            check(self.moe_aux_loss_coef >= 0, ModelConfig, "moe_aux_loss_coef", "≥ 0", self.moe_aux_loss_coef)


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
