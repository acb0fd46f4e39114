"""The files a run starts from: the tokenizer directory and the initial Hugging Face model directory.

Part of the trainer layer (it wires ``data`` and ``models``). Rank 0 prepares them once under
``<log_dir>/assets`` and every rank reads them, so the Megatron policy, the rollout engines and the
checkpoints all start from the very same weights and tokenizer:

- ``--hf-checkpoint DIR``: DIR is the initial model; its tokenizer files when it has them, else
  ``--tokenizer-path``, else the Qwen3 tokenizer.
- a preset (the embedded default): the preset's Qwen3-MoE config, initialised by transformers with
  the run seed and saved as ``assets/hf_init``. With ``--model-vocab task`` (the default for
  presets) the vocabulary is the Qwen3 tokenizer restricted to the task's texts
  (:mod:`luspo_megatron.data.vocab_subset`): a hidden-64 model otherwise spends almost all of its
  compute in a 151,936-way output layer.

Everything here is deterministic in (config, seed), so a resumed run rebuilds identical assets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from luspo_megatron.config import RunConfig
from luspo_megatron.errors import ConfigError, DataError

logger = logging.getLogger("luspo_megatron.trainer")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")
# The output layer is padded to a multiple of this (any tp ≤ 128 divides it; Megatron's convention).
VOCAB_MULTIPLE = 128


@dataclass(frozen=True)
class SFTExample:
    """A prompt and its reference response, shaped like a rollout sample for the packer."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logp: list[float]


@dataclass(frozen=True)
class RunAssets:
    config: RunConfig
    hf_dir: Path
    tokenizer_dir: Path
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    fingerprint: str

    def tokenizer(self):
        from luspo_megatron.data.tokenizer import load_tokenizer

        return load_tokenizer(str(self.tokenizer_dir))

    def dataset(self, tokenizer):
        from luspo_megatron.data.dataset import dataset_from_config

        return dataset_from_config(self.config.data, tokenizer, self.config.seed)

    def sft_examples(self) -> list[SFTExample]:
        """Prompts with their reference responses, ending with the stop token. The response is the
        ``--sft-key`` column, or with probability ``--sft-direct-fraction`` (seeded per row) the
        ``direct_solution`` column: the bare answer, no worked steps."""
        import random

        from luspo_megatron.data.dataset import dataset_from_config

        data = sft_data(self.config)
        tokenizer = self.tokenizer()
        dataset = dataset_from_config(data, tokenizer, self.config.seed)
        rows = _raw_rows(dataclasses.replace(self.config, data=data))
        rng = random.Random(self.config.seed)
        eos = self.stop_token_ids[0]
        targets = []
        for record in dataset.records:
            row = rows[record.row]
            key = "direct_solution" if rng.random() < data.sft_direct_fraction else data.sft_key
            if key not in row:
                flag = "--sft-direct-fraction" if key == "direct_solution" else "--sft-key"
                raise DataError(f"{flag}: row {record.row + 1} has no {key!r} column for the SFT warm-up",
                                field="sft_key")
            target = str(row[key])
            if target != _utf8(target):  # a lone surrogate (a JSON escape): the tokenizer would raise TypeError
                raise DataError(f"--sft-key: row {record.row + 1}: column {key!r} is not valid UTF-8 text",
                                field="sft_key")
            targets.append(target)
        ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
        return [SFTExample(r.prompt_ids, list(x) + [eos], [0.0] * (len(x) + 1)) for r, x in zip(dataset.records, ids)]


def arch_for_validation(config: RunConfig):
    """The architecture to validate the parallel layout against, before anything is written."""
    from luspo_megatron.models.arch import PRESETS, arch_from_hf, load_hf_config

    if config.model.hf_checkpoint:
        return arch_from_hf(load_hf_config(config.model.hf_checkpoint))
    return arch_from_hf(PRESETS[config.model.preset](vocab_size=VOCAB_MULTIPLE))


def sft_data(config: RunConfig) -> Any:
    """The data section the SFT warm-up reads: ``--synthetic-sft-prompts`` rows of the built-in task
    when set (and no ``--prompt-data``), else the RL prompts."""
    data = config.data
    if data.prompt_data or not data.synthetic_sft_prompts:
        return data
    return dataclasses.replace(data, synthetic_num_prompts=data.synthetic_sft_prompts)


def _raw_rows(config: RunConfig) -> list[dict[str, Any]]:
    if config.data.prompt_data:
        from luspo_megatron.data.dataset import read_rows

        return [row for _, row in read_rows(config.data.prompt_data)]
    from luspo_megatron.data.synthetic import make_dataset

    return make_dataset(config.data.synthetic_num_prompts, config.seed, [1.0] * config.data.synthetic_max_steps)


@dataclass
class TaskTexts:
    """What the task vocabulary is built from, and the dataset's count of the rows read for it."""

    texts: list[str]
    chats: list[list[dict[str, str]]]
    stats: Any  # data.dataset.DatasetStats: rows, bad_rows (skipped with --skip-bad-rows), bad_examples
    source: str


def _task_texts(config: RunConfig) -> TaskTexts:
    """Every text of the task (prompts as chats, labels, reference solutions), for the task vocabulary.

    Rows are read as the dataset reads them (``data.dataset.usable_rows``): a row the dataset
    cannot use is a one-line DataError naming the file and its line/row, or with ``--skip-bad-rows``
    it is skipped and counted exactly as the dataset will skip and count it."""
    from luspo_megatron.data.dataset import DatasetStats, prompt_source, usable_rows

    texts, chats = [], []
    # The warm-up's pool needs the same vocabulary. Both synthetic draws come from one seeded
    # sequence, so the larger of the two contains the other.
    data = sft_data(config) if config.sft_warmup_steps else config.data
    if data.synthetic_num_prompts < config.data.synthetic_num_prompts:
        data = config.data
    rows, fmt, source = prompt_source(data, config.seed)
    rows = list(rows)
    stats = DatasetStats()
    for index, prompt, messages, label, _ in usable_rows(rows, fmt, source, stats):
        row = rows[index][1] if isinstance(rows[index], tuple) else rows[index]
        if isinstance(prompt, str):
            texts.append(prompt)
        else:
            chats.append(messages)
        for key in (config.data.sft_key, "direct_solution"):
            if isinstance(row, dict) and key in row:
                texts.append(_utf8(str(row[key])))
        texts.append(_utf8(f"\\boxed{{{label}}}"))
    if stats.bad_rows:
        logger.warning("task vocabulary: %s: %d of %d rows skipped (--skip-bad-rows), e.g. %s", source,
                       stats.bad_rows, stats.rows, stats.bad_examples[0])
    return TaskTexts(texts, chats, stats, source)


def _utf8(text: str) -> str:
    """``text`` as the tokenizer can take it: lone surrogates (from JSON escapes) become "?"; the
    restricted vocabulary keeps every byte, so no text it is later asked to encode is lost."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _fingerprint(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json",)):
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _write_initial_model(config: RunConfig, tokenizer, out: Path) -> None:
    """The preset's model with the task (or full) vocabulary, initialised under the run seed."""
    import torch
    from safetensors.torch import save_file

    from luspo_megatron.models.arch import PRESETS
    from luspo_megatron.models.initial import initial_hf_state_dict

    vocab = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    hf_config = PRESETS[config.model.preset](vocab_size=vocab)
    hf_config.update(eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                     pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None)
    if config.model.moe_aux_loss_coef is not None and "router_aux_loss_coef" in hf_config:
        hf_config["router_aux_loss_coef"] = config.model.moe_aux_loss_coef
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = initial_hf_state_dict(hf_config, config.seed)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": hf_config["eos_token_id"], "pad_token_id": hf_config["pad_token_id"]}))
    tokenizer.save_pretrained(str(tmp))
    del torch
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def prepare(config: RunConfig, root: str | Path) -> RunAssets:
    """Create (or reuse) ``root/tokenizer`` and ``root/hf_init``; return where everything is."""
    from luspo_megatron.data.tokenizer import load_tokenizer, qwen3_tokenizer_dir
    from luspo_megatron.data.vocab_subset import restrict_tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if config.model.hf_checkpoint:
        hf_dir = Path(config.model.hf_checkpoint)
        has_tokenizer = (hf_dir / "tokenizer.json").is_file() or (hf_dir / "tokenizer_config.json").is_file()
        tokenizer_dir = hf_dir if has_tokenizer else Path(config.data.tokenizer_path or qwen3_tokenizer_dir())
    else:
        if config.data.tokenizer_path:
            tokenizer_dir = Path(config.data.tokenizer_path)
        elif config.model.vocab == "task":
            tokenizer_dir = root / "tokenizer"
            if not (tokenizer_dir / "tokenizer.json").is_file():
                task = _task_texts(config)
                restrict_tokenizer(task.texts, tokenizer_dir, chats=task.chats)
        else:
            tokenizer_dir = qwen3_tokenizer_dir()
        hf_dir = root / "hf_init"
        if not (hf_dir / "model.safetensors").is_file():
            _write_initial_model(config, load_tokenizer(str(tokenizer_dir)), hf_dir)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    stops = tuple(i for i in stops if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)
    if not stops:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"--tokenizer-path: {tokenizer_dir} has no <|im_end|> and no eos token to stop on")
        stops = (tokenizer.eos_token_id,)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
    return RunAssets(config, hf_dir, tokenizer_dir, stops, pad, _fingerprint(hf_dir))
