"""Prompt datasets: both schemas from JSONL and Parquet, chat template, filters, bad rows, resume."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from luspo_megatron.data.dataset import PromptDataset, PromptFormat, PromptIterator, dataset_from_config
from luspo_megatron.errors import DataError

QUESTIONS = [f"What is {i} + {i}?" for i in range(12)]


def dapo_rows():
    return [{"data_source": "math", "prompt": [{"role": "user", "content": q}], "ability": "MATH",
             "reward_model": {"style": "rule", "ground_truth": str(2 * i)}, "extra_info": {"index": i}}
            for i, q in enumerate(QUESTIONS)]


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_ids(tokenizer, messages, enable_thinking=False):
    # transformers 5: tokenize=True returns a BatchEncoding unless return_dict=False.
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                         enable_thinking=enable_thinking, return_dict=False)


def test_dapo_verl_schema_from_jsonl_goes_through_the_chat_template(tokenizer, tmp_path):
    ds = PromptDataset.from_file(write_jsonl(tmp_path / "dapo.jsonl", dapo_rows()), tokenizer)
    assert len(ds) == 12 and ds.stats.rows == 12
    for i, record in enumerate(ds):
        assert record.row == i and record.label == str(2 * i)
        assert record.prompt_ids == reference_ids(tokenizer, [{"role": "user", "content": QUESTIONS[i]}])
    assert tokenizer.decode(ds[0].prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_enable_thinking_leaves_the_think_block_to_the_model(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "dapo.jsonl", dapo_rows()[:2])
    ds = PromptDataset.from_file(path, tokenizer, PromptFormat(enable_thinking=True))
    assert ds[0].prompt_ids == reference_ids(tokenizer, dapo_rows()[0]["prompt"], enable_thinking=True)
    assert tokenizer.decode(ds[0].prompt_ids).endswith("<|im_start|>assistant\n")


def test_flat_schema_from_parquet_with_input_label_and_metadata_keys(tokenizer, tmp_path):
    table = pa.table({"question": QUESTIONS, "answer": [str(2 * i) for i in range(12)],
                      "meta": [{"level": i % 3} for i in range(12)]})
    pq.write_table(table, tmp_path / "flat.parquet")
    fmt = PromptFormat(input_key="question", label_key="answer", metadata_key="meta")
    ds = PromptDataset.from_file(tmp_path / "flat.parquet", tokenizer, fmt)
    assert [r.label for r in ds] == [str(2 * i) for i in range(12)]
    assert ds[4].metadata == {"level": 1}
    assert ds[4].prompt_ids == reference_ids(tokenizer, [{"role": "user", "content": QUESTIONS[4]}])
    raw = PromptDataset.from_file(tmp_path / "flat.parquet", tokenizer,
                                  PromptFormat(input_key="question", label_key="answer", apply_chat_template=False))
    assert raw[4].prompt_ids == tokenizer(QUESTIONS[4], add_special_tokens=False)["input_ids"]


def test_dapo_schema_from_parquet_nested_columns(tokenizer, tmp_path):
    pq.write_table(pa.Table.from_pylist(dapo_rows()), tmp_path / "dapo.parquet")
    ds = PromptDataset.from_file(tmp_path / "dapo.parquet", tokenizer)
    assert [r.label for r in ds] == [str(2 * i) for i in range(12)]


def test_a_malformed_row_raises_data_error_naming_file_and_line(tokenizer, tmp_path):
    rows = dapo_rows()
    path = write_jsonl(tmp_path / "bad.jsonl", rows[:3], raw_lines=['{"prompt": [{"role": "user"'])
    with pytest.raises(DataError, match=r"bad\.jsonl: line 4: not valid JSON") as err:
        PromptDataset.from_file(path, tokenizer)
    assert "\n" not in str(err.value)
    missing = write_jsonl(tmp_path / "missing.jsonl", rows[:2] + [{"prompt": "hi"}])
    expected = r"missing\.jsonl: line 3: no field 'reward_model.ground_truth' \(--label-key\)"
    with pytest.raises(DataError, match=expected):
        PromptDataset.from_file(missing, tokenizer)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{**rows[0], "prompt": 42}])
    with pytest.raises(DataError, match=r"line 1: field 'prompt' \(--input-key\): expected a string or"):
        PromptDataset.from_file(wrong, tokenizer)


def test_skip_bad_rows_counts_them_and_keeps_the_rest(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", dapo_rows()[:3] + [{"prompt": "no label"}], raw_lines=["{oops"])
    ds = PromptDataset.from_file(path, tokenizer, PromptFormat(skip_bad_rows=True))
    assert len(ds) == 3 and ds.stats.bad_rows == 2 and ds.stats.rows == 5
    assert "5 rows, 3 prompts kept, 0 longer than --max-prompt-len 512 filtered, 2 bad rows skipped" in ds.report()


def test_prompts_longer_than_max_prompt_len_are_filtered_counted_and_reported(tokenizer, tmp_path):
    rows = dapo_rows()[:4] + [{**dapo_rows()[0], "prompt": [{"role": "user", "content": "word " * 300}]}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    limit = max(len(r.prompt_ids) for r in PromptDataset.from_file(path, tokenizer, PromptFormat(max_prompt_len=4096))
                if r.row < 4)
    ds = PromptDataset.from_file(path, tokenizer, PromptFormat(max_prompt_len=limit))
    assert [r.row for r in ds] == [0, 1, 2, 3] and ds.stats.too_long == 1
    assert f"1 longer than --max-prompt-len {limit} filtered" in ds.report()
    with pytest.raises(DataError, match="no usable prompts"):
        PromptDataset.from_file(path, tokenizer, PromptFormat(max_prompt_len=3))


def test_iterator_resumes_exactly_and_reshuffles_every_epoch():
    data = list(range(10))
    it = PromptIterator(data, batch_size=4, seed=7)
    uninterrupted = [it.next_batch() for _ in range(8)]  # 32 items: 3.2 epochs
    epochs = [sum(uninterrupted, [])[i:i + 10] for i in (0, 10, 20)]
    assert all(sorted(e) == data for e in epochs)  # each epoch is a permutation
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    first = PromptIterator(data, batch_size=4, seed=7)
    head = [first.next_batch() for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = PromptIterator(data, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    assert head + [resumed.next_batch() for _ in range(5)] == uninterrupted
    assert state == {"epoch": 1, "position": 2, "seed": 7, "size": 10, "carried": []}
    assert PromptIterator(data, 4, seed=8).next_batch() != uninterrupted[0]


def test_carried_prompts_come_back_first_in_order_and_survive_a_checkpoint():
    data = list(range(10))
    plain = PromptIterator(data, batch_size=4, seed=7).next_indices(12)
    it = PromptIterator(data, batch_size=4, seed=7)
    first = it.next_indices(6)
    it.carry(first[4:])  # drawn, not used: back to the front
    it.carry(first[3:4])  # carried later, drawn first
    state = json.loads(json.dumps(it.state_dict()))
    assert state["carried"] == [first[3], first[4], first[5]]
    resumed = PromptIterator(data, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    for iterator in (it, resumed):
        assert iterator.next_indices(2) == [first[3], first[4]]
        assert iterator.next_indices(3) == [first[5], *plain[6:8]]  # then the data order goes on
        assert iterator.next_batch() == [data[i] for i in plain[8:12]]
    with pytest.raises(DataError, match="carried prompt index outside 0 … 9"):
        resumed.load_state_dict({**state, "carried": [10]})
    old = {k: v for k, v in state.items() if k != "carried"}  # a checkpoint from before carrying
    resumed.load_state_dict(old)
    assert resumed.carried == [] and resumed.next_indices(1) == [plain[6]]


def test_iterator_state_from_another_dataset_or_seed_is_refused():
    it = PromptIterator(list(range(10)), batch_size=4, seed=7)
    with pytest.raises(DataError, match="saved for seed 7 and 10 prompts, but this run has seed 7 and 11"):
        PromptIterator(list(range(11)), 4, seed=7).load_state_dict(it.state_dict())
    with pytest.raises(DataError, match="missing 'epoch'"):
        it.load_state_dict({"position": 0})


def test_embedded_default_uses_the_synthetic_task(tokenizer):
    from luspo_megatron.config import DataConfig

    ds = dataset_from_config(DataConfig(synthetic_num_prompts=20, synthetic_max_steps=3), tokenizer, seed=0)
    assert len(ds) == 20 and all(1 <= r.metadata["steps"] <= 3 for r in ds)
    assert "Start with" in tokenizer.decode(ds[0].prompt_ids)
