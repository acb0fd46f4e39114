"""Test helpers: Hugging Face model directories (tiny random models, sharded as asked) and the
two tools' ``main`` functions, loaded from tools/ (a directory of scripts, not a package)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.hf_models import build_hf_model

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def tool_main(name: str):
    """``main(argv) -> exit status`` of ``tools/<name>.py``."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _model_order(name: str) -> tuple:
    """embed_tokens, then layer by layer, then the final norm and lm_head."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    if name.startswith("model.embed_tokens"):
        return (-1, name)
    return (int(match.group(1)), name) if match else (10**9, name)


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory, read with the safetensors library."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def write_hf_dir(config: dict, directory: Path, shards: int = 1, seed: int = 0,
                 extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``save_pretrained`` a random tiny model, then re-shard its on-disk tensors (model order) into
    ``shards`` files of about equal bytes with ``model.safetensors.index.json``. Returns the tensors."""
    build_hf_model(config, seed=seed).save_pretrained(directory)
    tensors = read_tensors(directory)
    tensors.update(extra or {})
    for file in directory.glob("model*.safetensors*"):
        file.unlink()
    names = sorted(tensors, key=_model_order)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    seen = 0
    for name in names:
        size = tensors[name].numel() * tensors[name].element_size()
        groups[min(shards - 1, int((seen + size / 2) * shards / total))].append(name)
        seen += size
    groups = [g for g in groups if g]
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for group, file in zip(groups, files):
        save_file({n: tensors[n].contiguous() for n in group}, directory / file, metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": {n: f for g, f in zip(groups, files) for n in g}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return tensors


def copy_dir(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest
