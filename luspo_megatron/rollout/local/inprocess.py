"""A rollout engine inside the trainer's own process (``--rollout-engine inprocess``).

The same :class:`~luspo_megatron.rollout.local.generation.TransformersGenerator` that our SGLang-API server
runs, called directly: no HTTP hop, no second process, and weight updates are in-memory copies of the
policy's HF-named tensors into the live model (``--weight-sync tensor``) instead of a safetensors
write and reload. verl calls this layout colocated ("hybrid engine"). It is meant for CPU runs and
single-GPU toy models, where the per-step fixed costs of a separate server dominate; large models
belong on SGLang servers (``--rollout-engine sglang``).

Samples are the ones our server would return for the same call: a seeded call gives row (i, j) the
seed ``protocol.sample_seed(seed, i, j)``, exactly as the SGLang client asks the server, so a run
can switch between the two engines without changing what it samples (tests/rollout/test_inprocess.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import torch

from luspo_megatron.errors import RolloutError
from luspo_megatron.rollout import protocol
from luspo_megatron.rollout.engine import Sample, SamplingParams
from luspo_megatron.rollout.local.generation import GenResult, GenRow, TransformersGenerator
from luspo_megatron.rollout.weight_sync import bucket_by_bytes, write_hf_checkpoint


class InProcessEngine:
    """:class:`~luspo_megatron.rollout.engine.RolloutEngine` without a server: rows are generated in
    batches of at most ``max_batch_rows`` (the server's ``--max-running-requests``)."""

    def __init__(self, hf_dir: str | Path, *, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                 max_batch_rows: int = 64, weight_version: str = "default",
                 return_routed_experts: bool = False, weight_sync: str = "tensor",
                 weights_dir: str | Path | None = None, bucket_bytes: int = 512 * 1024**2) -> None:
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows: expected ≥ 1, got {max_batch_rows}")
        if weight_sync not in ("tensor", "disk"):
            raise RolloutError(f"weight_sync: the in-process engine takes tensor or disk, got {weight_sync!r}")
        if weight_sync == "disk" and weights_dir is None:
            raise RolloutError("weight_sync disk: the in-process engine needs weights_dir")
        self.weight_sync, self.config_dir, self.bucket_bytes = weight_sync, Path(hf_dir), bucket_bytes
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.generator = TransformersGenerator(hf_dir, device=device, dtype=dtype)
        self.max_batch_rows = max_batch_rows
        self._version = str(weight_version)
        self._rng = random.Random(seed)  # seeds of unseeded calls, as the server draws them
        self.return_routed_experts = return_routed_experts  # routing replay (R3): per-token experts

    def __enter__(self) -> InProcessEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.generator = None  # type: ignore[assignment]  (frees the model)

    # --------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int) -> list[list[Sample]]:
        """``out[i][j]``: sample j of prompt i (see the module docstring for the seeds)."""
        if n < 1:
            raise RolloutError(f"n: expected ≥ 1 samples per prompt, got {n}")
        stop = frozenset(sampling.stop_token_ids) | self.generator.eos_ids
        rows, where = [], []
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise RolloutError(f"prompt {i}: expected at least one token")
            for j in range(n):
                seed = self._rng.getrandbits(62) if sampling.seed is None else protocol.sample_seed(sampling.seed, i, j)
                rows.append(GenRow(prompt_ids=list(prompt), max_new_tokens=sampling.max_new_tokens, seed=seed,
                                   temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                   stop_ids=stop, want_routing=self.return_routed_experts))
                where.append((i, j))
        results: list[GenResult] = []
        # Plain tensors in, plain tensors out: no __torch_function__ override has anything to do here. A
        # TorchFunctionMode the host keeps on its stack (the trainer's CPU placement shim on a machine
        # without CUDA, runtime/cpu_compat.py P3) would otherwise intercept every op of the decode loop:
        # measured 0.33 -> 0.55 s for 16 rows x 32 tokens. torch's own overrides machinery uses this guard.
        with torch._C.DisableTorchFunction():
            for start in range(0, len(rows), self.max_batch_rows):
                results.extend(self.generator.generate(rows[start:start + self.max_batch_rows]))
        out: list[list[Sample | None]] = [[None] * n for _ in prompts]
        for (i, j), row, result in zip(where, rows, results):
            if result.finish == protocol.FINISH_ABORT:  # only an abort_request aborts, and nothing sends one here
                raise RolloutError(f"prompt {i}: sample {j} was aborted")
            out[i][j] = Sample(
                prompt_ids=row.prompt_ids, response_ids=list(result.tokens), rollout_logp=list(result.logp),
                finish=result.finish, weight_version=self._version, routed_experts=result.routed_experts,
                meta={"prompt_tokens": len(row.prompt_ids), "completion_tokens": len(result.tokens)},
            )
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------ weights
    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> None:
        """``tensor``: copy the stream into the live model; ``disk``: write it as a HF directory
        (published by rename), then load that, as a server would."""
        if self.weight_sync == "tensor":
            self.update_weights_from_tensor([list(weights)], weight_version)
            return
        path = write_hf_checkpoint(bucket_by_bytes(weights, self.bucket_bytes), self.weights_dir, self.config_dir)
        self.update_weights_from_disk(path, weight_version)

    def update_weights_from_disk(self, source: str | Path, weight_version: str) -> None:
        """Load an HF model directory (``--weight-sync disk``), copied in place and all or nothing, as
        our server's ``/update_weights_from_disk``: a directory that is not a complete checkpoint of
        the served model is refused (``WeightUpdateRefused``, a RolloutError) and nothing changes."""
        if not Path(source, "config.json").is_file():
            raise RolloutError(f"update_weights: expected an HF model directory with config.json, got {str(source)!r}")
        self.generator.reload(source)
        self._version = str(weight_version)

    def update_weights_from_tensor(self, buckets: Iterable[list[tuple[str, torch.Tensor]]],
                                   weight_version: str) -> None:
        """Copy HF-named tensors into the live model (``--weight-sync tensor``). Every bucket is checked
        against the model before anything is copied, and together they must cover every parameter: a
        partial update would generate from a mix of two policies."""
        named = [item for bucket in buckets for item in bucket]
        try:
            self.generator.load_full_state(named)
        except (KeyError, ValueError) as err:
            raise RolloutError(f"update_weights_from_tensor: {err}") from None
        self._version = str(weight_version)

    def weight_version(self) -> str:
        return self._version

    # ------------------------------------------------------------------------------ control
    def health(self) -> bool:
        return self.generator is not None

    def wait_healthy(self, timeout_s: float = 0.0) -> None:
        """Ready once constructed: the model is loaded in this process."""
        if not self.health():
            raise RolloutError("the in-process engine is closed")

    def metrics(self) -> dict[str, float]:
        return {}

    def pause(self) -> None:
        """Nothing runs between calls: generation and weight updates share one thread."""

    def resume(self) -> None:
        """See :meth:`pause`."""

    def flush_cache(self) -> None:
        """No prefix cache outlives a generate call."""
