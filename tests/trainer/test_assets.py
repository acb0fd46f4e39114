"""The SFT warm-up's examples (run_assets.sft_examples): the pool they come from and their targets."""

from __future__ import annotations

import pytest

from luspo_megatron.config import load_config
from luspo_megatron.data.synthetic import make_dataset
from luspo_megatron.trainer import assets as run_assets


def _assets(tmp_path, *flags: str):
    config, _ = load_config(["--synthetic-max-steps", "2", "--sft-warmup-steps", "5", "--seed", "3", *flags])
    return config, run_assets.prepare(config, tmp_path)


def test_a_larger_sft_pool_extends_the_rl_prompts_and_its_targets_are_the_worked_solutions(tmp_path):
    config, assets = _assets(tmp_path, "--synthetic-num-prompts", "16", "--synthetic-sft-prompts", "64")
    tokenizer = assets.tokenizer()
    rl = assets.dataset(tokenizer).records
    sft = assets.sft_examples()
    rows = make_dataset(64, 3, [1.0, 1.0])
    assert len(rl) == 16 and len(sft) == 64
    assert [e.prompt_ids for e in sft[:16]] == [r.prompt_ids for r in rl]  # the RL prompts are its first rows
    eos = assets.stop_token_ids[0]
    for example, row in zip(sft, rows):
        assert example.response_ids[-1] == eos
        assert tokenizer.decode(example.response_ids[:-1]) == row["solution"]


def test_the_direct_fraction_mixes_bare_answers_into_the_targets(tmp_path):
    _, assets = _assets(tmp_path, "--synthetic-num-prompts", "200", "--sft-direct-fraction", "0.5")
    tokenizer = assets.tokenizer()
    rows = make_dataset(200, 3, [1.0, 1.0])
    texts = [tokenizer.decode(e.response_ids[:-1]) for e in assets.sft_examples()]
    direct = [t == r["direct_solution"] for t, r in zip(texts, rows)]
    worked = [t == r["solution"] for t, r in zip(texts, rows)]
    assert all(d or w for d, w in zip(direct, worked))
    assert 0.35 < sum(direct) / len(direct) < 0.65  # Binomial(200, 0.5): 6 standard deviations wide


def test_a_negative_sft_pool_is_a_one_line_config_error():
    from luspo_megatron.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--synthetic-sft-prompts: expected ≥ 0 .*got -1$"):
        load_config(["--synthetic-sft-prompts", "-1"])
