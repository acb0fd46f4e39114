"""Training checkpoints: model, optimizer, LR scheduler, RNG states of every rank, the caller's
data-iterator state and the step, saved through megatron ``dist_checkpointing`` and committed
atomically (``atomic``); loaded into any TP/PP/EP layout.

    save_checkpoint(save_dir, step, model_chunks, optimizer, scheduler, extra_state={"epoch": 0, "index": 96},
                    keep_last=3, hf_config=hf_config)
    resumed = load_checkpoint(load_dir, model_chunks, optimizer, scheduler)   # latest complete step
    resumed.step, resumed.extra_state                                          # None if nothing to load

Integrity (``integrity``, ``resume``): every file's sha256 is recorded in ``checksums.json`` at
save (committed with the files) and checked at load; without an asked step a damaged newest
checkpoint falls back to the newest one that verifies, and ``keep_last`` never prunes the last
checkpoint a load verified. docs/reliability.md §2 lists the promises and their tests.

Every rank calls both (they are collective). ``model_chunks``: this rank's model chunks, bare
``GPTModel`` or wrapped (DDP, Float16Module; the wrappers are looked through). ``optimizer``: what
``get_megatron_optimizer`` returned. ``scheduler``: anything with ``state_dict()`` /
``load_state_dict()`` (megatron's ``OptimizerParamScheduler``).

What is stored, and how it reshards:

- model: ``GPTModel.sharded_state_dict()`` per chunk: global tensors, loadable in any layout.
- optimizer: megatron's distributed optimizer in its ``fully_reshardable`` format (per-parameter
  ``param`` / ``exp_avg`` / ``exp_avg_sq`` in model space), or the regular optimizer's sharded
  state, both keyed by the model keys without the ChainedOptimizer prefix
  (``chained_optim_avoid_prefix``), so the tensors load in any TP/PP/DP layout.
  Megatron itself cannot load it across a change between EP = 1 and EP > 1: with EP > 1 the experts
  get an optimizer of their own, so the optimizer's structure (one or two chained optimizers, their
  param groups) differs from the saved one (reference §8). For that case we *bridge*: the moment
  tensors are loaded by key into the new structure, the param groups are the new optimizer's own
  (its hyper-parameters come from the same config) and Adam's step count is the saved one. A
  structure this cannot bridge (not the same optimizer kind) falls back to a fresh optimizer state
  with a warning; ``Resumed.optimizer_restored`` says which.
- LR scheduler, step, extra_state (JSON), the layout and the optional HF config: the common part
  (``common.pt``), from rank 0.
- RNG (python, numpy, torch, CUDA, megatron's model-parallel tracker): one object per rank. Restored
  only when the world size and layout are unchanged (rank r's generator state means nothing to a
  different rank); otherwise the current RNG is kept, with a warning.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from luspo_megatron.checkpoint import atomic, integrity, resume
from luspo_megatron.checkpoint.resume import FORMAT_VERSION
from luspo_megatron.errors import CheckpointError

logger = logging.getLogger(__name__)

# Megatron-LM's metadata for reshardable optimizer checkpoints (chained optimizers without prefix).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


@dataclass(frozen=True)
class Resumed:
    """What :func:`load_checkpoint` restored."""

    step: int
    extra_state: Any
    path: Path
    optimizer_restored: bool  # False: the optimizer starts fresh (see the warning)
    rng_restored: bool
    skipped: tuple[Path, ...]  # incomplete .tmp saves passed over
    verified: bool = False  # its files matched the checksums recorded at save
    passed_over: tuple[str, ...] = ()  # newer checkpoints skipped as damaged, one line each


# ------------------------------------------------------------------------------------------ helpers
def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers: the wrappers' sharded_state_dict adds a
    ``module.`` prefix their load_state_dict does not strip (reference §8 idiom 4)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _model_state(model_chunks) -> dict[str, Any]:
    chunks = [unwrap(c) for c in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _load_model_state(model_chunks, loaded: dict[str, Any]) -> None:
    chunks = [unwrap(c) for c in model_chunks]
    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, name in zip(chunks, names):
        chunk.load_state_dict(loaded[name], strict=True)


def layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "world": torch.distributed.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        "cp": ps.get_context_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_structure(optimizer) -> list[dict[str, Any]]:
    """What must match for megatron's own optimizer load: the chained optimizers, their kinds and
    their param groups as megatron identifies them (``param_group_identifier_keys``: lr / wd
    multipliers, expert-parallel or not). The same on every rank (no per-rank parameter counts)."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    out = []
    for sub in _sub_optimizers(optimizer):
        groups = sorted({tuple(str(g.get(k)) for k in param_group_identifier_keys) for g in sub.optimizer.param_groups})
        out.append({"kind": type(sub).__name__, "inner": type(sub.optimizer).__name__,
                    "groups": [list(g) for g in groups]})
    return out


def _agree(flag: bool) -> bool:
    """True on every rank iff ``flag`` is True on every rank (a decision all ranks must share)."""
    value = torch.tensor([int(flag)])
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(data: Any):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return ShardedObject("rng_state", data, (world,), (rank,), replica_id=0)


def _save_strategy():
    from luspo_megatron.checkpoint.dist_save import SyncTorchDistSaveStrategy

    return SyncTorchDistSaveStrategy()


def _check_cpu_compat(optimizer) -> None:
    """P9 (silent: wrong Adam steps after a load) and P10 must be in place when megatron's
    distributed optimizer runs on torch Adam (no Apex / Transformer Engine)."""
    from megatron.core.optimizer import distrib_optimizer

    from luspo_megatron.runtime import cpu_compat

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    if any(isinstance(s, distrib_optimizer.DistributedOptimizer) for s in _sub_optimizers(optimizer)):
        status = cpu_compat.status()
        missing = [f for f in ("P9", "P10") if status.get(f) != "applied"]
        if missing:
            raise RuntimeError(f"luspo_megatron.runtime.cpu_compat fixes {missing} are not applied: "
                               f"call cpu_compat.apply() before building the optimizer")


# --------------------------------------------------------------------------------------------- save
def save_checkpoint(
    save_dir: str | Path,
    step: int,
    model_chunks,
    optimizer=None,
    scheduler=None,
    extra_state: Any = None,
    *,
    keep_last: int | None = None,
    hf_config: dict[str, Any] | None = None,
) -> Path:
    """Save ``step`` to ``save_dir/iter_XXXXXXX`` (collective). Written to ``iter_XXXXXXX.tmp``,
    renamed only after every rank has finished, then ``latest`` is updated; with ``keep_last``
    older checkpoints are pruned. ``extra_state`` (the data iterator's position, ...) must be
    JSON-serialisable and is taken from rank 0. ``hf_config``: stored so that
    ``tools/convert_megatron_to_hf.py`` can export without ``--hf-config-from``."""
    from megatron.core import dist_checkpointing

    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step: expected a non-negative integer, got {step!r}")
    try:
        extra_json = json.dumps(extra_state)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"extra_state: expected a JSON-serialisable value ({err})") from None
    root = Path(save_dir)
    final = root / atomic.iter_name(step)
    tmp = atomic.tmp_path(final)
    rank = torch.distributed.get_rank()
    if rank == 0:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)  # an earlier save of this step that never finished
        tmp.mkdir(parents=True)
    torch.distributed.barrier()

    state = _model_state(model_chunks)
    common: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "extra_state": extra_json,
        "layout": layout(),
        "hf_config": hf_config,
        "optimizer_structure": None,
    }
    if optimizer is not None:
        model_sd = {k: v for k, v in state.items()}
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=OPTIMIZER_METADATA)
        common["optimizer_structure"] = optimizer_structure(optimizer)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["rng_state"] = _rng_object(_rng_state())
    state["luspo"] = common
    strategy = _save_strategy()
    dist_checkpointing.save(state, str(tmp), sharded_strategy=strategy)
    # every rank's tensor file is complete, fsync-ed and hashed as it was written: merge on rank 0
    hashed: list | None = [None] * torch.distributed.get_world_size() if rank == 0 else None
    torch.distributed.gather_object(strategy.hashed, hashed, dst=0)
    if rank == 0:
        integrity.seal(tmp, {name: rec for part in hashed for name, rec in part.items()}, step)
        atomic.commit_dir(tmp, final)  # checksums.json is committed with the files it describes
        atomic.write_latest(root, step)
        if keep_last is not None:
            protect = integrity.last_verified(root, lambda s: root / atomic.iter_name(s))
            for path in atomic.prune(root, keep_last, keep=step, protect=protect):
                logger.info("pruned %s", path)
            if protect is not None and protect not in atomic.complete_steps(root)[-keep_last:]:
                logger.info("kept %s beyond --keep-last: the last checkpoint a load verified",
                            atomic.iter_name(protect))
    torch.distributed.barrier()
    return final


# --------------------------------------------------------------------------------------------- load
def _walk(tree: Any, path: tuple = ()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _walk(v, path + (i,))
    else:
        yield path, tree


# Where the Adam step count lives: ``step`` in the distributed optimizer's param groups,
# ``common_step`` in megatron's regular optimizer state (one count shared by all parameters).
STEP_KEYS = ("step", "common_step")


def _saved_adam_step(saved_optimizer: Any) -> torch.Tensor | None:
    """The one Adam step count recorded anywhere in the saved optimizer's common part."""
    steps = {float(v) for path, v in _walk(saved_optimizer) if path and path[-1] in STEP_KEYS and v is not None}
    if len(steps) > 1:
        raise CheckpointError(f"optimizer: the checkpoint holds several Adam step counts {sorted(steps)}")
    return torch.tensor(steps.pop(), dtype=torch.float32) if steps else None


def _sharded_paths(tree: Any) -> dict[tuple, Any]:
    """Path -> ShardedTensor / factory / object leaf of a (sharded) state dict."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    return {path: leaf for path, leaf in _walk(tree) if isinstance(leaf, ShardedBase)}


def _bridged_optimizer_state(template: Any, loaded: dict[tuple, Any], step: torch.Tensor | None) -> Any:
    """``template`` (the current optimizer's sharded state dict: its structure and param groups)
    with each sharded leaf replaced by the tensor loaded for it and the saved Adam step count
    wherever the optimizer keeps one."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    def rebuild(node: Any, path: tuple) -> Any:
        if isinstance(node, dict):
            out = {k: rebuild(v, path + (k,)) for k, v in node.items()}
            if step is not None and "param_groups" in out and isinstance(out.get("state"), dict):
                out["state"]["common_step"] = step.clone()  # a regular optimizer's torch state dict
            return out
        if isinstance(node, list):
            return [rebuild(v, path + (i,)) for i, v in enumerate(node)]
        if path in loaded:
            return loaded[path]
        if isinstance(node, LocalNonpersistentObject):  # what dist_checkpointing.load would put there
            node = node.unwrap()
        if path and path[-1] in STEP_KEYS and step is not None:
            return step.clone().to(node.dtype) if torch.is_tensor(node) else type(node)(step.item())
        return node

    return rebuild(template, ())


def load_checkpoint(
    load_dir: str | Path,
    model_chunks,
    optimizer=None,
    scheduler=None,
    step: int | None = None,
    *,
    load_optimizer: bool = True,
    load_rng: bool = True,
    verify: bool = True,
    missing_ok: bool = False,
) -> Resumed | None:
    """Load the ``latest`` complete checkpoint of ``load_dir`` (or ``step``) into this layout
    (collective). Never loads an incomplete ``.tmp`` save: it is skipped, logged and listed in
    ``Resumed.skipped``. With ``verify`` its files are first checked against the checksums recorded
    at save; without ``step``, a damaged newest checkpoint falls back to the newest one that
    verifies (``resume``). Returns None when ``load_dir`` holds no checkpoint and no step was asked,
    or (``missing_ok``) does not exist; a missing ``load_dir`` is an error otherwise."""
    from megatron.core import dist_checkpointing

    root = Path(load_dir)
    rank0 = torch.distributed.get_rank() == 0
    if not root.is_dir():
        if root.exists():
            raise CheckpointError(f"--load: {str(root)!r} is not a directory")
        if not missing_ok or step is not None:
            raise CheckpointError(f"--load: {str(root)!r} does not exist "
                                  f"(pass --load-if-exists to start fresh when it is missing)")
        _warn(rank0, f"--load: {str(root)!r} does not exist: starting fresh (--load-if-exists)")
        return None
    point = atomic.find_resume_point(root, step)
    if point is None:
        _warn(rank0, f"--load: {str(root)!r} holds no complete checkpoint: starting fresh")
        return None
    for note in point.notes:
        _warn(rank0, note)
    chosen = resume.choose(root, point, step, verify)
    common, meta = chosen.common, chosen.common["luspo"]
    now, then = layout(), meta["layout"]

    request = _model_state(model_chunks)
    resume.check_fits(chosen, request)
    model_sd = dict(request)
    restore_optimizer = optimizer is not None and load_optimizer and meta["optimizer_structure"] is not None
    bridged: dict[tuple, str] | None = None  # path in the optimizer state -> flat request name
    if restore_optimizer:
        _check_cpu_compat(optimizer)
        saved, current = meta["optimizer_structure"], optimizer_structure(optimizer)
        saved_kinds = sorted({(s["kind"], s["inner"]) for s in saved})
        current_kinds = sorted({(s["kind"], s["inner"]) for s in current})
        if not _agree(saved_kinds == current_kinds):
            _warn(rank0, f"optimizer state not restored: saved by {saved_kinds}, this run uses {current_kinds}; "
                         f"starting from a fresh optimizer state")
            restore_optimizer = False
        else:
            for sub in _sub_optimizers(optimizer):
                if hasattr(sub, "_init_optimizer_states_with_dummy_values"):
                    sub._init_optimizer_states_with_dummy_values()  # idiom 5: lazily created Adam state
            opt_request = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)
            if _agree(saved == current):
                request["optimizer"] = opt_request
            else:
                # Another structure (EP 1 <-> EP > 1): load the tensors by key under flat names, so
                # that they do not meet the saved structure in common.pt.
                leaves = _sharded_paths(opt_request)
                bridged = {path: f"t{i}" for i, path in enumerate(leaves)}
                request["optimizer_tensors"] = {bridged[path]: leaf for path, leaf in leaves.items()}
    restore_rng = load_rng and now == then
    if load_rng and not restore_rng and rank0:
        logger.warning("RNG states not restored: saved with layout %s, loading with %s", then, now)
    if restore_rng:
        request["rng_state"] = _rng_object(None)

    with resume.readable(chosen):
        loaded = dist_checkpointing.load(request, str(chosen.path))
    _load_model_state(model_chunks, loaded)
    if restore_optimizer:
        with torch.no_grad():  # the fp32 main params are views of the model params (idiom 6)
            if bridged is None:
                optimizer.load_state_dict(loaded["optimizer"])
            else:
                tensors = {path: loaded["optimizer_tensors"][name] for path, name in bridged.items()}
                step_count = _saved_adam_step(common.get("optimizer"))
                optimizer.load_state_dict(_bridged_optimizer_state(opt_request, tensors, step_count))
                _warn(rank0, f"optimizer restructured for this layout (saved ep={then['ep']}, now ep={now['ep']}): "
                             f"Adam moments and main params loaded per parameter, param groups rebuilt, "
                             f"step count {None if step_count is None else int(step_count)}")
    elif optimizer is not None:
        optimizer.reload_model_params()  # main (fp32) params from the loaded weights
    if scheduler is not None and "scheduler" in common:
        scheduler.load_state_dict(common["scheduler"])
    if restore_rng:
        (state,) = loaded["rng_state"] if isinstance(loaded["rng_state"], list) else (loaded["rng_state"],)
        _set_rng_state(state)
    if rank0:
        logger.info("resumed step %d from %s%s", meta["step"], chosen.path,
                    " (files verified against checksums.json)" if chosen.verified else "")
    return Resumed(meta["step"], json.loads(meta["extra_state"]), chosen.path, restore_optimizer, restore_rng,
                   point.skipped, chosen.verified, chosen.passed_over)


def _warn(rank0: bool, message: str) -> None:
    if rank0:
        logger.warning(message)


def load_model_weights(checkpoint_dir: str | Path, model_chunks, *, verify: bool = True,
                       flag: str = "--pretrained-checkpoint") -> None:
    """Load only the weights of a dist checkpoint (a converted HF model, or the model part of a
    training checkpoint directory / save directory) into this layout (collective). Its files are
    checked against its checksums.json first, when it has one (training checkpoints); a damaged
    one, or one of another model, is a CheckpointError naming ``flag``."""
    from megatron.core import dist_checkpointing

    directory = Path(checkpoint_dir)
    step = None
    if not (directory / "metadata.json").is_file():
        point = atomic.find_resume_point(directory)
        if point is None:
            raise CheckpointError(f"{flag}: no dist checkpoint in {str(directory)!r}")
        directory, step = point.path, point.step
    verdict = integrity.verify(directory) if verify else None
    if verdict is not None and verdict.status == "failed":
        raise CheckpointError(f"{flag}: {resume.describe(step, directory)} is damaged: {verdict.problem}")
    chosen = resume.Chosen(step, directory, {}, verdict is not None and verdict.status == "verified")
    resume.check_fits(chosen, _model_state(model_chunks), flag=flag)
    for chunk in (unwrap(c) for c in model_chunks):
        request = chunk.sharded_state_dict()
        with resume.readable(chosen, flag=flag):
            loaded = dist_checkpointing.load(request, str(directory))
        # the result also holds the checkpoint's common part (a training checkpoint's step, ...)
        chunk.load_state_dict({k: loaded[k] for k in request}, strict=True)
