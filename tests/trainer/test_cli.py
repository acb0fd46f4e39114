"""tools/train_luspo.py as a command: --help, --print-config, one-line errors with exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "train_luspo.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_flag_group():
    proc = run("--help")
    assert proc.returncode == 0
    for group in ("model", "parallel", "rollout", "algorithm", "optimizer", "data", "checkpoint", "logging"):
        assert f"\n{group}:" in proc.stdout
    for flag in ("--tensor-model-parallel-size", "--tp", "--ep", "--loss", "--n-samples-per-prompt", "--load",
                 "--sglang-router", "--sft-warmup-steps", "--log-dir", "--train-iters", "--seed"):
        assert flag in proc.stdout


def test_print_config_resolves_the_embedded_default_and_the_overrides():
    proc = run("--print-config", "--tp", "2", "--loss", "gspo")
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    default = yaml.safe_load((ROOT / "examples" / "tiny_cpu.yaml").read_text())
    assert config["parallel"]["tensor_model_parallel_size"] == 2 and config["algorithm"]["loss"] == "gspo"
    assert config["train_iters"] == default["train_iters"]
    assert config["rollout"]["rollout_batch_size"] == default["rollout"]["rollout_batch_size"]


@pytest.mark.parametrize("args,needle", [
    (["--bogus"], "--bogus"),
    (["--tp", "abc"], "--tensor-model-parallel-size"),
    (["--eps-clip", "2"], "--eps-clip"),
    (["--config", "/nonexistent.yaml"], "--config"),
    (["--rollout-engine", "sglang"], "--sglang-url"),
    (["--tp", "3"], "--tensor-model-parallel-size"),  # world size 1 is not divisible by 3
])
def test_bad_flags_give_one_line_errors_and_exit_status_2(args, needle):
    proc = run(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.parametrize("config", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_resolves(config):
    proc = run("--config", str(config), "--print-config")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    written = yaml.safe_load(config.read_text())
    for section, values in written.items():  # every value written in the file survives resolution
        if isinstance(values, dict):
            for key, value in values.items():
                assert resolved[section][key] == (list(value) if isinstance(value, tuple) else value), (section, key)
        else:
            assert resolved[section] == values
