"""Config: YAML then flags, Megatron/slime flag names, validation with one-line errors, frozen."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from luspo_megatron.config import RunConfig, build_parser, config_to_yaml, load_config
from luspo_megatron.errors import ConfigError


def test_flags_override_yaml_and_short_aliases_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_iters: 7\nparallel:\n  tensor_model_parallel_size: 4\nalgorithm:\n  loss: gspo\n")
    cfg, _ = load_config(["--config", str(path), "--tp", "2", "--ep", "2", "--eps-clip-high", "5e-4"])
    assert cfg.train_iters == 7
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.expert_model_parallel_size == 2
    assert cfg.algorithm.loss == "gspo"
    assert (cfg.algorithm.loss_config().eps_clip, cfg.algorithm.loss_config().eps_clip_high) == (3e-4, 5e-4)
    long_form, _ = load_config(["--tensor-model-parallel-size", "2"])
    assert long_form.parallel.tensor_model_parallel_size == 2


def test_boolean_flags_and_disable_flags():
    cfg, _ = load_config(["--use-tis", "--disable-grpo-std-normalization", "--sequence-parallel"])
    assert cfg.algorithm.use_tis and not cfg.algorithm.std_normalize and cfg.parallel.sequence_parallel


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg, _ = load_config(["--tp", "2", "--loss", "grpo", "--loss-agg-mode", "seq-mean-token-sum-norm"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(cfg))
    again, _ = load_config(["--config", str(path)])
    assert again == cfg


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.algorithm.loss = "grpo"


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--eps-clip", "1.5"], "--eps-clip"),
        (["--rollout-top-p", "0"], "--rollout-top-p"),
        (["--tp", "0"], "--tensor-model-parallel-size"),
        (["--n-samples-per-prompt", "1"], "--n-samples-per-prompt"),
        (["--loss", "luspo", "--loss-agg-mode", "token-mean"], "--loss-agg-mode"),
        (["--global-batch-size", "7"], "--global-batch-size"),
        (["--lr", "abc"], "--lr"),
        (["--rollout-engine", "sglang"], "--sglang-url"),
        (["--rollout-engine", "inprocess", "--weight-sync", "distributed"], "--weight-sync"),
        (["--pp", "1", "--vpp", "2"], "--virtual-pipeline-model-parallel-size"),
    ],
)
def test_bad_values_give_one_line_errors_naming_the_flag(argv, flag):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    message = str(info.value)
    assert message.startswith(flag) and "\n" not in message


def test_unknown_yaml_key_names_the_key_and_the_allowed_ones(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("algorithm:\n  los: luspo\n")
    with pytest.raises(ConfigError, match=r"algorithm\.los: unknown key; expected one of \[.*'loss'"):
        load_config(["--config", str(path)])


def test_unknown_flag_exits_2_with_one_line():
    code = "from luspo_megatron.config import load_config; load_config(['--bogus-flag'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--bogus-flag" in proc.stderr


def test_help_lists_every_section_group():
    text = build_parser().format_help()
    for group in ("model", "parallel", "rollout", "algorithm", "optimizer", "data", "checkpoint", "logging"):
        assert f"\n{group}:" in text


def test_a_config_whose_longest_sequence_cannot_fit_a_micro_batch_is_refused_at_start():
    # 512 prompt + 64 response tokens fit 576 exactly; one token less of budget does not.
    fits, _ = load_config(["--max-prompt-len", "512", "--rollout-max-response-len", "64",
                           "--max-tokens-per-micro-batch", "576"])
    assert fits.optimizer.max_tokens_per_micro_batch == 576
    with pytest.raises(ConfigError) as err:
        load_config(["--max-prompt-len", "512", "--rollout-max-response-len", "64", "--max-tokens-per-micro-batch",
                     "575"])
    message = str(err.value)
    assert "\n" not in message and err.value.field == "max_tokens_per_micro_batch"
    for flag in ("--max-tokens-per-micro-batch", "--max-prompt-len", "--rollout-max-response-len", "576", "575"):
        assert flag in message
    tool = Path(__file__).resolve().parents[1] / "tools" / "train_luspo.py"
    out = subprocess.run([sys.executable, str(tool), "--rollout-max-response-len", "8000",
                          "--print-config"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--max-tokens-per-micro-batch" in out.stderr
