"""Prompt datasets: rows from JSONL or Parquet, prompts through the tokenizer's chat template.

Two schemas (docs/design.md §4 step 1):

* DAPO-Math-17k / verl: ``prompt`` is a list of chat messages ``[{"role", "content"}, ...]`` and the
  answer sits at ``reward_model.ground_truth`` (the defaults of ``--input-key`` / ``--label-key``).
* flat: ``--input-key question --label-key answer [--metadata-key extra]``; the prompt is a string,
  sent as one user message (or raw with ``--no-chat-template``).

A key may be a dotted path into nested objects (``reward_model.ground_truth``). Prompts longer than
``--max-prompt-len`` tokens are dropped and counted; a row that cannot be used raises
:class:`DataError` naming the file and line/row, unless ``--skip-bad-rows`` (then it is counted).
:meth:`PromptDataset.report` says what was kept.

    ds = PromptDataset.from_file("dapo.parquet", load_tokenizer(), max_prompt_len=1024)
    it = PromptIterator(ds, batch_size=32, seed=1234)
    batch = it.next_batch()          # list[PromptRecord]; it.state_dict() goes into checkpoints
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from luspo_megatron.errors import DataError

_MISSING = object()


@dataclass(frozen=True)
class PromptRecord:
    """One usable prompt. ``row`` is the 0-based row index in the source (stable across runs)."""

    row: int
    prompt_ids: list[int]
    label: Any
    metadata: Any = None
    prompt: Any = None  # the raw prompt (text or messages), for logs and samples


@dataclass
class DatasetStats:
    rows: int = 0
    kept: int = 0
    too_long: int = 0
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PromptFormat:
    """How rows become prompts (the ``--input-key`` … ``--enable-thinking`` flags)."""

    input_key: str = "prompt"
    label_key: str = "reward_model.ground_truth"
    metadata_key: str | None = None
    max_prompt_len: int = 512
    apply_chat_template: bool = True
    enable_thinking: bool = False
    skip_bad_rows: bool = False

    @classmethod
    def from_config(cls, data: Any) -> PromptFormat:
        """From a :class:`luspo_megatron.config.DataConfig`."""
        return cls(data.input_key, data.label_key, data.metadata_key, data.max_prompt_len,
                   data.apply_chat_template, data.enable_thinking, data.skip_bad_rows)


def lookup(row: Any, key: str) -> Any:
    """``row[key]``, or the dotted path ``a.b.c`` into nested dicts; ``_MISSING`` when absent."""
    if isinstance(row, dict) and key in row:
        return row[key]
    value = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def read_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, row) pairs: where is "line N" (JSONL, 1-based) or "row N" (Parquet, 1-based). A row
    that cannot be read comes back as a DataError instance in place of the row, so that callers
    can skip it (``--skip-bad-rows``) or name it:

    - JSONL: a line that is not UTF-8, not JSON, nested deeper than the parser goes, or holds an
      integer of more than 4300 digits (Python's int-from-text limit);
    - Parquet: every row of a row group that cannot be decoded (a corrupt page: the rest of its
      group cannot be read past it; pages written with checksums are verified), and a row whose
      text is not UTF-8. A file whose footer cannot be read is one error for the whole file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--prompt-data: no such file {str(path)!r}", field="prompt_data")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _jsonl_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise DataError(f"--prompt-data: expected a .jsonl or .parquet file, got {str(path)!r}", field="prompt_data")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:  # bytes: one bad line must not stop the decoding of the others
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield where, DataError(f"not valid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})")
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, DataError(f"not valid JSON ({err.msg})")
            except RecursionError:
                yield where, DataError("not usable JSON (nested too deeply)")
            except ValueError as err:  # int("1" * 5000): more than sys.get_int_max_str_digits() digits
                yield where, DataError(f"not usable JSON ({str(err).split(':')[0]})")


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
        groups = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(err)})", field="prompt_data") from None
    number = 0
    for group, size in enumerate(groups):
        done = 0
        try:
            for batch in parquet.iter_batches(batch_size=4096, row_groups=[group]):
                for row in _batch_rows(batch):
                    number, done = number + 1, done + 1
                    yield f"row {number}", row
        except Exception as err:  # ArrowException / OSError: a page that cannot be decoded
            bad = DataError(f"unreadable Parquet data in row group {group} ({_one_line(err)})")
            for _ in range(size - done):  # the rest of the group cannot be read past it
                number += 1
                yield f"row {number}", bad


def _batch_rows(batch: Any) -> list[Any]:
    """The rows of a record batch as dicts; a row that cannot be converted (text that is not UTF-8)
    becomes a DataError, the others convert as usual."""
    try:
        return batch.to_pylist()
    except Exception:  # one bad value fails the whole batch: convert row by row to find it
        rows: list[Any] = []
        for i in range(batch.num_rows):
            try:
                rows.append(batch.slice(i, 1).to_pylist()[0])
            except Exception as err:
                rows.append(DataError(f"unreadable Parquet value ({_one_line(err)})"))
        return rows


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def usable_rows(rows: Iterable[tuple[str, Any] | Any], fmt: PromptFormat, source: str,
                stats: DatasetStats) -> Iterator[tuple[int, Any, list[dict[str, str]], Any, Any]]:
    """(index, prompt, messages, label, metadata) of every usable row, in source order. A row that
    cannot be used raises a one-line DataError naming ``source`` and the line/row, or with
    ``fmt.skip_bad_rows`` is counted in ``stats`` (rows, bad_rows, bad_examples) and skipped.
    ``rows``: (where, row) pairs as :func:`read_rows` yields them, or plain dicts. The dataset and
    the trainer's task-vocabulary pre-pass both read rows through here, so they skip the same ones."""
    for index, item in enumerate(rows):
        where, row = item if isinstance(item, tuple) else (f"row {index + 1}", item)
        stats.rows += 1
        try:
            prompt, label, metadata = _fields(row, fmt)
            messages = _messages(prompt, fmt.input_key)
            _check_text(label, fmt.label_key)
            if isinstance(label, float) and not math.isfinite(label):  # JSON's NaN / Infinity
                raise DataError(f"field {fmt.label_key!r} (--label-key): expected text or a finite number, got {label}")
        except DataError as err:
            if not fmt.skip_bad_rows:
                raise DataError(f"{source}: {where}: {err} (or pass --skip-bad-rows)", field="prompt_data") from None
            stats.bad_rows += 1
            if len(stats.bad_examples) < 5:
                stats.bad_examples.append(f"{where}: {err}")
            continue
        yield index, prompt, messages, label, metadata


class PromptDataset(Sequence):
    """The usable prompts of one source, tokenized, in source order."""

    def __init__(self, records: list[PromptRecord], stats: DatasetStats, source: str, fmt: PromptFormat) -> None:
        if not records:
            raise DataError(f"{source}: no usable prompts ({_summary(stats, fmt)})", field="prompt_data")
        self.records, self.stats, self.source, self.format = records, stats, source, fmt

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]

    def report(self) -> str:
        """One line for the log: rows read, kept, filtered by length, bad rows skipped."""
        return f"{self.source}: {_summary(self.stats, self.format)}"

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: Any, fmt: PromptFormat | None = None) -> PromptDataset:
        return cls.from_rows(read_rows(path), tokenizer, fmt, source=str(path))

    @classmethod
    def from_rows(cls, rows: Iterator[tuple[str, Any]] | Sequence[dict], tokenizer: Any,
                  fmt: PromptFormat | None = None, source: str = "<rows>") -> PromptDataset:
        """``rows``: (where, row) pairs as :func:`read_rows` yields, or plain dicts."""
        fmt = fmt or PromptFormat()
        stats = DatasetStats()
        parsed = [(index, prompt, label, metadata, _render(messages, tokenizer, fmt))  # (…, rendered text)
                  for index, prompt, messages, label, metadata in usable_rows(rows, fmt, source, stats)]
        # One batched call to the Rust tokenizer: much faster than row by row on 10⁴-row datasets.
        ids = tokenizer([p[4] for p in parsed], add_special_tokens=False)["input_ids"] if parsed else []
        records = []
        for (index, prompt, label, metadata, _), prompt_ids in zip(parsed, ids):
            if len(prompt_ids) > fmt.max_prompt_len:
                stats.too_long += 1
                continue
            records.append(PromptRecord(index, list(prompt_ids), label, metadata, prompt))
        stats.kept = len(records)
        return cls(records, stats, source, fmt)


def _fields(row: Any, fmt: PromptFormat) -> tuple[Any, Any, Any]:
    if not isinstance(row, dict):
        if isinstance(row, DataError):
            raise row
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    prompt = lookup(row, fmt.input_key)
    if prompt is _MISSING:
        raise DataError(f"no field {fmt.input_key!r} (--input-key)")
    label = lookup(row, fmt.label_key)
    if label is _MISSING or label is None:
        raise DataError(f"no field {fmt.label_key!r} (--label-key)")
    metadata = None
    if fmt.metadata_key is not None:
        metadata = lookup(row, fmt.metadata_key)
        if metadata is _MISSING:
            raise DataError(f"no field {fmt.metadata_key!r} (--metadata-key)")
    return prompt, label, metadata


def _messages(prompt: Any, key: str) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        if isinstance(prompt, np.ndarray):  # Parquet list columns may arrive as arrays
            prompt = prompt.tolist()
        if not (isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt)):
            raise DataError(f"field {key!r} (--input-key): expected a string or a non-empty list of "
                            f"{{role, content}} messages, got {_short(prompt)}")
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    for message in messages:
        _check_text(message["content"], key)
        _check_text(message["role"], key)
    return messages


def _check_text(value: Any, key: str) -> None:
    """Text the tokenizer will see must encode as UTF-8: JSON's "\\ud800" escapes decode to lone
    surrogates, which the tokenizer refuses with a TypeError."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(f"field {key!r}: not valid UTF-8 text (a lone surrogate "
                            f"{value[err.start]!r} at character {err.start + 1})") from None


def _render(messages: list[dict[str, str]], tokenizer: Any, fmt: PromptFormat) -> str:
    """The prompt as text, ready to tokenize without added special tokens."""
    if not fmt.apply_chat_template:
        return "\n\n".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=fmt.enable_thinking,
    )


def _short(value: Any) -> str:
    try:
        text = json.dumps(value, default=str)
    except (ValueError, RecursionError):  # a huge integer, a structure nested too deeply
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _summary(stats: DatasetStats, fmt: PromptFormat) -> str:
    return (f"{stats.rows} rows, {stats.kept} prompts kept, {stats.too_long} longer than --max-prompt-len "
            f"{fmt.max_prompt_len} filtered, {stats.bad_rows} bad rows skipped")


class PromptIterator:
    """Batches of prompts forever, reshuffled every epoch; resumable from :meth:`state_dict`.

    Epoch e visits the records in the order ``permutation(seed, e)``, so the order depends only
    on (seed, epoch), never on how many batches were drawn or on restarts. A batch that runs past
    the end of an epoch continues with the next one.

    Carried prompts (DAPO dynamic sampling): :meth:`carry` puts dataset indices drawn with
    :meth:`next_indices` back at the front of the stream; the next draw returns them first, in the
    order given, then continues the data order. They are part of :meth:`state_dict`, so a resumed
    run draws the same stream, and no prompt is lost from the data order.
    """

    def __init__(self, dataset: Sequence[PromptRecord], batch_size: int, seed: int, shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected ≥ 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self.carried: list[int] = []  # dataset indices to draw before the data order continues
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def next_indices(self, n: int | None = None) -> list[int]:
        """The dataset indices of the next ``n`` prompts (default ``batch_size``): carried ones first."""
        n = self.batch_size if n is None else n
        if n < 0:
            raise ValueError(f"n: expected ≥ 0, got {n}")
        out, self.carried = self.carried[:n], self.carried[n:]
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(n - len(out), len(self._order) - self.position)
            out.extend(int(i) for i in self._order[self.position:self.position + take])
            self.position += take
        return out

    def next_batch(self, n: int | None = None) -> list[PromptRecord]:
        """The next ``n`` prompts (default ``batch_size``), carried ones first."""
        return [self.dataset[i] for i in self.next_indices(n)]

    def carry(self, indices: Sequence[int]) -> None:
        """Return drawn prompts (dataset indices) to the front of the stream, before any carried earlier."""
        for i in indices:
            if not 0 <= int(i) < len(self.dataset):
                raise ValueError(f"carry: index {i} outside 0 … {len(self.dataset) - 1}")
        self.carried = [int(i) for i in indices] + self.carried

    def __iter__(self) -> PromptIterator:
        return self

    def __next__(self) -> list[PromptRecord]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self.dataset),
                "carried": list(self.carried)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("epoch", "position", "seed", "size"):
            if key not in state:
                raise DataError(f"data iterator state: missing {key!r}")
        if state["seed"] != self.seed or state["size"] != len(self.dataset):
            raise DataError(
                f"data iterator state: saved for seed {state['seed']} and {state['size']} prompts, "
                f"but this run has seed {self.seed} and {len(self.dataset)} prompts"
            )
        if not 0 <= state["position"] <= state["size"]:
            raise DataError(f"data iterator state: position {state['position']} outside 0 … {state['size']}")
        carried = [int(i) for i in state.get("carried", [])]  # absent in checkpoints before carrying existed
        if any(not 0 <= i < state["size"] for i in carried):
            raise DataError(f"data iterator state: a carried prompt index outside 0 … {state['size'] - 1}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.carried = carried
        self._order = self._permutation(self.epoch)


def prompt_source(data: Any, seed: int) -> tuple[Iterable[Any], PromptFormat, str]:
    """(rows, format, source name) of a data section: the ``--prompt-data`` file's rows (lazily),
    else the synthetic arithmetic task of the embedded default."""
    fmt = PromptFormat.from_config(data)
    if data.prompt_data:
        return read_rows(data.prompt_data), fmt, str(data.prompt_data)
    from luspo_megatron.data.synthetic import make_dataset

    rows = make_dataset(data.synthetic_num_prompts, seed, [1.0] * data.synthetic_max_steps)
    return rows, PromptFormat(metadata_key="extra_info", **{
        k: getattr(fmt, k) for k in ("max_prompt_len", "apply_chat_template", "enable_thinking", "skip_bad_rows")
    }), "synthetic arithmetic"


def dataset_from_config(data: Any, tokenizer: Any, seed: int) -> PromptDataset:
    """``--prompt-data`` when given, else the synthetic arithmetic task of the embedded default."""
    rows, fmt, source = prompt_source(data, seed)
    return PromptDataset.from_rows(rows, tokenizer, fmt, source=source)
