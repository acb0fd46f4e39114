"""Bad dataset rows (issue 19 §4): each kind is a one-line DataError naming the file and its
line/row, or with --skip-bad-rows is skipped and counted, in the dataset AND in the trainer's
task-vocabulary pre-pass (which reads the rows first, and used to crash on every kind below).

The oracle of a skipped row: the same file without the bad rows gives exactly the same prompts
(dataset) and the same texts (pre-pass), and both count the same number of bad rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from luspo_megatron.config import load_config
from luspo_megatron.data.dataset import PromptDataset, PromptFormat
from luspo_megatron.errors import DataError
from luspo_megatron.trainer.assets import _task_texts


def good_rows(n: int = 6) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "reward_model": {"ground_truth": str(2 * i)}, "solution": f"{i} + {i} = {2 * i}"} for i in range(n)]


def _line(row: dict) -> bytes:
    return json.dumps(row).encode()


GOOD_LABEL = '"reward_model": {"ground_truth": "7"}'
# kind -> the raw bytes of one bad JSONL line, and the words its error must contain
JSONL_KINDS = {
    "non-utf8-bytes": (b'{"prompt": "caf\xe9 au lait?", ' + GOOD_LABEL.encode() + b"}", "not valid UTF-8 (byte 0xe9"),
    "deep-nesting": (('{"prompt": "x", ' + GOOD_LABEL + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}").encode(),
                     "nested too deeply"),
    "huge-integer": (('{"prompt": "x", "reward_model": {"ground_truth": 1' + "0" * 5000 + "}}").encode(),
                     "Exceeds the limit (4300 digits)"),
    "prompt-list-of-strings": (b'{"prompt": ["What is", "2 + 2?"], ' + GOOD_LABEL.encode() + b"}",
                               "field 'prompt' (--input-key): expected a string or a non-empty list of "
                               "{role, content}"),
    "message-without-content": (b'{"prompt": [{"role": "user"}], ' + GOOD_LABEL.encode() + b"}",
                                "field 'prompt' (--input-key): expected a string or a non-empty list"),
    "lone-surrogate-escape": (b'{"prompt": "a \\ud800 b", ' + GOOD_LABEL.encode() + b"}",
                              "not valid UTF-8 text (a lone surrogate"),
    "nan-label": (b'{"prompt": "x", "reward_model": {"ground_truth": NaN}}',
                  "expected text or a finite number, got nan"),
}
BAD_AT = 3  # 0-based position of the bad line among the good ones (line 4 of the file)


def write_jsonl(path: Path, bad: bytes | None) -> Path:
    lines = [_line(r) for r in good_rows()]
    if bad is not None:
        lines.insert(BAD_AT, bad)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def write_corrupt_parquet(path: Path) -> Path:
    """12 good rows in 3 row groups of 4; the first page header of row group 1 is overwritten with
    garbage (no checksum is needed to notice: its thrift header no longer parses)."""
    pq.write_table(pa.Table.from_pylist(good_rows(12)), path, row_group_size=4)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    return path


def write_parquet_bad_text(path: Path) -> Path:
    """A flat Parquet file whose row 3 holds bytes that are not UTF-8 in a string column."""
    questions = pa.array([b"What is 1 + 1?", b"What is 2 + 2?", b"caf\xe9?", b"What is 4 + 4?"]).view(pa.string())
    pq.write_table(pa.table({"question": questions, "answer": ["2", "4", "6", "8"]}), path)
    return path


def _config(path: Path, skip: bool, *flags: str):
    argv = ["--prompt-data", str(path), "--sft-warmup-steps", "0", *flags] + (["--skip-bad-rows"] if skip else [])
    return load_config(argv)[0]


@pytest.mark.parametrize("kind", sorted(JSONL_KINDS))
def test_a_bad_jsonl_row_is_one_line_naming_file_and_line_in_the_dataset_and_the_pre_pass(kind, tokenizer, tmp_path):
    bad, words = JSONL_KINDS[kind]
    path = write_jsonl(tmp_path / "rows.jsonl", bad)
    for read in (lambda: PromptDataset.from_file(path, tokenizer), lambda: _task_texts(_config(path, False))):
        with pytest.raises(DataError) as err:
            read()
        message = str(err.value)
        assert message.startswith(f"{path}: line {BAD_AT + 1}: ") and "\n" not in message, message
        assert words in message and message.endswith("(or pass --skip-bad-rows)"), message
        assert len(message) < 400


@pytest.mark.parametrize("kind", sorted(JSONL_KINDS))
def test_with_skip_bad_rows_the_bad_jsonl_row_is_skipped_and_counted_alike_by_the_dataset_and_the_pre_pass(
        kind, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", JSONL_KINDS[kind][0])
    clean = write_jsonl(tmp_path / "clean.jsonl", None)
    ds = PromptDataset.from_file(path, tokenizer, PromptFormat(skip_bad_rows=True))
    reference = PromptDataset.from_file(clean, tokenizer)
    assert [r.prompt_ids for r in ds] == [r.prompt_ids for r in reference]
    assert [r.label for r in ds] == [r.label for r in reference]
    assert [r.row for r in ds] == [i if i < BAD_AT else i + 1 for i in range(len(reference))]  # source rows
    assert (ds.stats.rows, ds.stats.bad_rows, ds.stats.kept) == (7, 1, 6)
    assert ds.stats.bad_examples[0].startswith(f"line {BAD_AT + 1}: ")
    task, clean_task = _task_texts(_config(path, True)), _task_texts(_config(clean, False))
    assert (task.texts, task.chats) == (clean_task.texts, clean_task.chats)
    assert (task.stats.rows, task.stats.bad_rows) == (ds.stats.rows, ds.stats.bad_rows)


def test_a_corrupt_parquet_page_names_its_row_and_with_skip_bad_rows_loses_only_its_row_group(tokenizer, tmp_path):
    path = write_corrupt_parquet(tmp_path / "rows.parquet")
    for read in (lambda: PromptDataset.from_file(path, tokenizer), lambda: _task_texts(_config(path, False))):
        with pytest.raises(DataError, match=rf"^{path}: row 5: unreadable Parquet data in row group 1 \(.+\) "
                                            r"\(or pass --skip-bad-rows\)$"):
            read()
    ds = PromptDataset.from_file(path, tokenizer, PromptFormat(skip_bad_rows=True))
    survivors = good_rows(12)[:4] + good_rows(12)[8:]
    pq.write_table(pa.Table.from_pylist(survivors), tmp_path / "clean.parquet")
    reference = PromptDataset.from_file(tmp_path / "clean.parquet", tokenizer)
    assert [r.prompt_ids for r in ds] == [r.prompt_ids for r in reference]
    assert [r.row for r in ds] == [0, 1, 2, 3, 8, 9, 10, 11]
    assert (ds.stats.rows, ds.stats.bad_rows) == (12, 4)
    task = _task_texts(_config(path, True))
    clean_task = _task_texts(_config(tmp_path / "clean.parquet", False))
    assert (task.texts, task.chats) == (clean_task.texts, clean_task.chats)
    assert (task.stats.rows, task.stats.bad_rows) == (12, 4)


def test_a_parquet_string_that_is_not_utf8_is_a_bad_row_of_its_own(tokenizer, tmp_path):
    path = write_parquet_bad_text(tmp_path / "flat.parquet")
    flags = ("--input-key", "question", "--label-key", "answer")
    fmt = PromptFormat(input_key="question", label_key="answer")
    with pytest.raises(DataError, match=rf"^{path}: row 3: unreadable Parquet value \(UnicodeDecodeError"):
        PromptDataset.from_file(path, tokenizer, fmt)
    with pytest.raises(DataError, match=rf"^{path}: row 3: unreadable Parquet value"):
        _task_texts(_config(path, False, *flags))
    ds = PromptDataset.from_file(path, tokenizer, PromptFormat(input_key="question", label_key="answer",
                                                               skip_bad_rows=True))
    assert [r.label for r in ds] == ["2", "4", "8"] and ds.stats.bad_rows == 1
    assert _task_texts(_config(path, True, *flags)).stats.bad_rows == 1


def test_every_kind_at_once_is_counted_once_each(tokenizer, tmp_path):
    lines = [_line(r) for r in good_rows()] + [bad for bad, _ in JSONL_KINDS.values()]
    path = tmp_path / "all.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    ds = PromptDataset.from_file(path, tokenizer, PromptFormat(skip_bad_rows=True))
    task = _task_texts(_config(path, True))
    assert (ds.stats.rows, ds.stats.bad_rows, len(ds)) == (6 + len(JSONL_KINDS), len(JSONL_KINDS), 6)
    assert (task.stats.rows, task.stats.bad_rows) == (ds.stats.rows, ds.stats.bad_rows)
    assert f"{len(JSONL_KINDS)} bad rows skipped" in ds.report()
