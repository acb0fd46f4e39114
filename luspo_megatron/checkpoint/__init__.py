"""Checkpoints (docs/design.md §3 ``checkpoint/``): the two Hugging Face ⇄ Megatron conversions,
and training checkpoints that survive crashes and reshard on resume. The name map they use belongs
to the model (``models/hf_map.py``).

Trainer API (collective: every rank calls it)::

    from luspo_megatron.checkpoint import save_checkpoint, load_checkpoint, load_model_weights

    resumed = load_checkpoint(cfg.checkpoint.load, model, optimizer, scheduler)   # None: nothing to resume
    step = resumed.step if resumed else 0
    ...
    save_checkpoint(cfg.checkpoint.save, step, model, optimizer, scheduler, extra_state=data_state,
                    keep_last=cfg.checkpoint.keep_last, hf_config=hf_config)

Modules: ``schema`` (where megatron stores each
parameter), ``convert`` (the tools' work), ``training`` (save/load), ``atomic`` (the directory
protocol), ``integrity`` (checksums.json: sha256 of every file, recorded at save, verified at
load), ``resume`` (which checkpoint a load uses: fallback past damaged ones, model fit),
``dist_save`` (the streaming torch_dist writer), ``safetensors_io``.
"""

from luspo_megatron.checkpoint.atomic import ResumePoint, find_resume_point
from luspo_megatron.checkpoint.training import Resumed, load_checkpoint, load_model_weights, save_checkpoint

__all__ = [
    "ResumePoint",
    "Resumed",
    "find_resume_point",
    "load_checkpoint",
    "load_model_weights",
    "save_checkpoint",
]
