"""The Qwen3 tokenizer restricted to the vocabulary of a task: a real, smaller HF tokenizer.

Why: a tiny CPU model with hidden size 64 spends almost all of its compute in the 151,936-way
output layer and softmax. For the embedded default (synthetic arithmetic) only a few hundred
Qwen3 tokens ever occur, so the model is built with a vocabulary of exactly those.

How: tokenize the task's texts with the full Qwen3 tokenizer, keep the tokens that occur, close the
set under BPE merges (every intermediate token needed to build a kept token by Qwen3's merge
sequence), add the 256 byte-level base symbols (so ANY text still encodes) and the special/added
tokens, and renumber in Qwen3's id order. Keeping exactly the merges between kept tokens, in
Qwen3's rank order, makes the restricted BPE segment every text of the task exactly as Qwen3
does (tested), up to the id renumbering. The result is an ordinary ``tokenizer.json`` directory
that transformers, our rollout server and TRL load with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable
from pathlib import Path

from luspo_megatron.data.tokenizer import qwen3_tokenizer_dir
from luspo_megatron.errors import DataError


def _merge_closure(used: set[str], merges: list[list[str]], alphabet: Iterable[str]) -> set[str]:
    parents = {a + b: (a, b) for a, b in merges}
    keep = set(alphabet)
    stack = list(used)
    while stack:
        token = stack.pop()
        if token in keep and token not in used:
            continue
        keep.add(token)
        for part in parents.get(token, ()):
            if part not in keep:
                stack.append(part)
    return keep


def restrict_tokenizer(texts: Iterable[str], out_dir: str | Path, source_dir: str | Path | None = None,
                       chats: Iterable[list[dict[str, str]]] = ()) -> Path:
    """Write a tokenizer directory holding the source tokenizer restricted to ``texts`` (plain
    strings) and ``chats`` (message lists, rendered with the chat template and a generation
    prompt). Returns ``out_dir``. Atomic: the directory appears complete or not at all."""
    from transformers import AutoTokenizer

    source_dir = Path(source_dir) if source_dir is not None else qwen3_tokenizer_dir()
    full = AutoTokenizer.from_pretrained(source_dir)
    spec = json.loads((source_dir / "tokenizer.json").read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise DataError(f"tokenizer: {source_dir} is not a BPE tokenizer (model.type={model.get('type')!r})")
    vocab: dict[str, int] = model["vocab"]
    id_to_token = {i: t for t, i in vocab.items()}
    used_ids: set[int] = set()
    for text in texts:
        used_ids.update(full(text, add_special_tokens=False)["input_ids"])
    for messages in chats:
        used_ids.update(full.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                 return_dict=False))
    used = {id_to_token[i] for i in used_ids if i in id_to_token}  # added tokens are kept separately
    alphabet = [t for t in vocab if len(t) == 1]  # the 256 byte-level symbols
    keep = _merge_closure(used, model["merges"], alphabet)

    restricted = copy.deepcopy(spec)
    new_vocab = {t: i for i, t in enumerate(sorted(keep, key=vocab.__getitem__))}
    restricted["model"]["vocab"] = new_vocab
    restricted["model"]["merges"] = [
        m for m in model["merges"] if m[0] in keep and m[1] in keep and m[0] + m[1] in keep
    ]
    for j, added in enumerate(restricted["added_tokens"]):
        added["id"] = len(new_vocab) + j
    config = json.loads((source_dir / "tokenizer_config.json").read_text())
    # Its ids are the source's; transformers rebuilds the added tokens from tokenizer.json.
    config.pop("added_tokens_decoder", None)

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "tokenizer.json").write_text(json.dumps(restricted, ensure_ascii=False))
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
