"""tools/train_luspo.py as a command: --help, --print-config, one-line errors with exit status 2."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "train_luspo.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


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


# ------------------------------------------------------------------ issue 19 §4: trainer inputs
@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers: an unreachable server that hangs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_an_unreachable_sglang_url_gives_up_after_the_startup_timeout(silent_server, tmp_path):
    """start_fleet alone: the engine's start-up wait is --rollout-startup-timeout (3 s), not the
    SGLangEngine constructor's default of 600 s; a hanging and a refusing server alike."""
    from luspo_megatron.config import RolloutConfig
    from luspo_megatron.errors import RolloutError
    from luspo_megatron.rollout.fleet import start_fleet

    for url in (silent_server, closed_port_url()):
        config = RolloutConfig(engine="sglang", sglang_url=(url,), startup_timeout_s=3.0)
        start = time.monotonic()
        with pytest.raises(RolloutError, match=rf"^{url}/health_generate: not healthy within 3 s \(last: "):
            with start_fleet(config, hf_dir=tmp_path, log_dir=tmp_path):
                pass
        assert 3.0 <= time.monotonic() - start < 15.0  # not the constructor's 600 s


def test_an_unreachable_sglang_url_stops_the_cli_in_one_line_with_status_2(silent_server, tmp_path):
    start = time.monotonic()
    proc = run("--rollout-engine", "sglang", "--sglang-url", silent_server, "--rollout-startup-timeout", "3",
               "--sft-warmup-steps", "0", "--synthetic-num-prompts", "16", "--reward-num-workers", "1",
               "--no-progress", "--log-dir", str(tmp_path / "run"), timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [proc.stderr.splitlines()[-1]], proc.stderr[-2000:]
    assert errors[0].startswith(f"train_luspo.py: error: {silent_server}/health_generate: not healthy within 3 s")
    # Set-up (model, assets: ~12 s on an idle 2-core box) plus 3 s; it waited 600 s before. The
    # bound leaves room for a loaded machine; the wait itself is timed by the test above.
    assert elapsed < 300, elapsed


def test_a_bad_dataset_row_stops_the_cli_in_one_line_with_status_2(tmp_path):
    rows = [json.dumps({"prompt": f"What is {i} + {i}?", "reward_model": {"ground_truth": str(2 * i)}}).encode()
            for i in range(4)]
    rows.insert(2, b'{"prompt": "caf\xe9?", "reward_model": {"ground_truth": "1"}}')
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b"\n".join(rows) + b"\n")
    proc = run("--prompt-data", str(data), "--sft-warmup-steps", "0", "--no-progress",
               "--log-dir", str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    column = rows[2].index(b"\xe9") + 1
    assert proc.stderr.splitlines() == [f"train_luspo.py: error: {data}: line 3: not valid UTF-8 (byte 0xe9 at "
                                        f"column {column}) (or pass --skip-bad-rows)"]
