"""Config fuzz (issue 19 §4): every bad flag or YAML value, and every bad path a config names, is one
line on stderr and exit status 2, before anything is started or written.

Each case calls ``tools/train_luspo.py``'s ``main`` in-process (the exit status is its return value;
an exception escaping it would fail the test with its traceback). The Trainer is replaced by a
module that fails the test if a case ever gets that far. Two cases run as real subprocesses at the
end, for the status the shell sees.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_luspo_cli", ROOT / "tools" / "train_luspo.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def _yaml(text: str | bytes):
    """A case whose argv is ``--config FILE`` with this content (written under tmp_path)."""
    return ("yaml", text)


def _paths(tmp: Path) -> dict[str, str]:
    """Files and directories the path cases point at."""
    (tmp / "a_file").write_text("x")
    (tmp / "empty_dir").mkdir()
    (tmp / "prompts.csv").write_text("prompt,answer\n")
    (tmp / "hf_list").mkdir()
    (tmp / "hf_list" / "config.json").write_text("[1, 2]")
    (tmp / "hf_latin1").mkdir()
    (tmp / "hf_latin1" / "config.json").write_bytes(b'{"model_type": "qw\xe9n"}')
    (tmp / "hf_garbage").mkdir()
    (tmp / "hf_garbage" / "config.json").write_text('{"model_type": ')
    names = {k: str(tmp / k) for k in ("a_file", "empty_dir", "hf_list", "hf_latin1", "hf_garbage")}
    return {**names, "prompts_csv": str(tmp / "prompts.csv")}


BIG = "9" * 5000
# (case id, argv or _yaml(...), text the one line must contain). argv entries may use {a_file} etc.
CASES = [
    # non-finite floats, from flags
    ("lr-inf", ["--lr", "inf"], "--lr: expected a finite number, got inf"),
    ("kl-coef-nan", ["--kl-loss-coef", "nan"], "--kl-loss-coef: expected a finite number, got nan"),
    ("entropy-coef-minus-inf", ["--entropy-coef=-inf"], "--entropy-coef: expected a finite number"),
    ("tis-clip-inf", ["--tis-clip", "inf"], "--tis-clip: expected a finite number"),
    ("adam-eps-nan", ["--adam-eps", "nan"], "--adam-eps: expected a finite number"),
    ("temperature-inf", ["--rollout-temperature", "inf"], "--rollout-temperature: expected a finite number"),
    ("eval-temperature-nan", ["--eval-temperature", "nan"], "--eval-temperature: expected a finite number"),
    ("sft-direct-fraction-nan", ["--sft-direct-fraction", "nan"], "--sft-direct-fraction: expected a finite"),
    ("moe-aux-coef-inf", ["--moe-aux-loss-coeff", "inf"], "--moe-aux-loss-coeff: expected a finite number"),
    # integer ranges
    ("seed-negative", ["--seed", "-1"], "--seed: expected an integer in [0, 2**32 - 1], got -1"),
    ("seed-2-32", ["--seed", str(2**32)], "--seed: expected an integer in [0, 2**32 - 1]"),
    ("seed-5000-digits", ["--seed", BIG], "--seed (seed): expected int, got '99999"),
    ("seed-plus-pipeline-offset", ["--pp", "2", "--seed", str(2**32 - 50)],
     "--seed: expected an integer in [0, 2**32 - 100·1)"),
    ("train-iters-past-int64", ["--train-iters", str(2**63)],
     "--train-iters: expected an integer in [-2**63, 2**63 - 1]"),
    ("top-k-past-2-30", ["--rollout-top-k", str(2**31)], "--rollout-top-k: expected -1 or in [1, 2**30]"),
    ("keep-last-zero", ["--keep-last", "0"], "--keep-last: expected a positive integer"),
    # durations, URLs, devices, names
    ("startup-timeout-zero", ["--rollout-startup-timeout", "0"],
     "--rollout-startup-timeout: expected a number of seconds"),
    ("request-timeout-centuries", ["--rollout-request-timeout", "1e12"],
     "--rollout-request-timeout: expected a number of seconds"),
    ("reward-timeout-negative", ["--reward-timeout", "-1"], "--reward-timeout: expected a number of seconds"),
    ("device-cuda-x", ["--rollout-device", "cuda:x"], "--rollout-device: expected cpu or cuda[:N]"),
    ("sglang-url-without-scheme", ["--rollout-engine", "sglang", "--sglang-url", "localhost:30000"],
     "--sglang-url: expected http(s)://"),
    ("sglang-url-bad-port", ["--rollout-engine", "sglang", "--sglang-url", "http://h:99999"],
     "--sglang-url: expected http(s)://"),
    ("router-ftp", ["--rollout-engine", "sglang", "--sglang-router", "ftp://router"],
     "--sglang-router: expected an http(s)://"),
    ("custom-reward-not-an-import-path", ["--custom-reward-path", "my rewards.py"],
     "--custom-reward-path: expected module:function"),
    ("empty-input-key", ["--input-key", " "], "--input-key: expected a non-empty column name"),
    ("bad-choice-flag", ["--loss", "ppo"], "argument --loss: invalid choice: 'ppo'"),
    ("negative-looking-value", ["--entropy-coef", "-inf"], "argument --entropy-coef: expected one argument"),
    # paths: directories that cannot be written, files that cannot be read
    ("log-dir-under-proc", ["--log-dir", "/proc/luspo_fuzz/run"],
     "--log-dir: '/proc/luspo_fuzz/run' (its nearest existing parent '/proc') is not writable"),
    ("log-dir-is-a-file", ["--log-dir", "{a_file}"], "is a file, not a directory"),
    ("save-under-a-file", ["--save", "{a_file}/ckpt"], "--save: '{a_file}/ckpt' cannot be created"),
    ("save-under-sysfs", ["--save", "/sys/luspo_fuzz"],
     "--save: '/sys/luspo_fuzz' (its nearest existing parent '/sys') is not writable"),
    ("log-dir-empty", ["--log-dir", ""], "--log-dir: expected a path"),
    ("prompt-data-missing", ["--prompt-data", "{empty_dir}/nope.jsonl"], "--prompt-data: no such file"),
    ("prompt-data-a-directory", ["--prompt-data", "{empty_dir}"], "--prompt-data: '{empty_dir}' is a directory"),
    ("prompt-data-csv", ["--prompt-data", "{prompts_csv}"], "--prompt-data: expected a .jsonl, .json, .parquet file"),
    ("eval-data-missing", ["--eval-data", "aime=/nonexistent/aime.parquet"], "--eval-data: aime: no such file"),
    ("tokenizer-path-without-files", ["--tokenizer-path", "{empty_dir}"],
     "--tokenizer-path: '{empty_dir}' has neither"),
    ("hf-checkpoint-without-config", ["--hf-checkpoint", "{empty_dir}"], "--hf-checkpoint: no such config.json"),
    ("hf-config-a-list", ["--hf-checkpoint", "{hf_list}"], "holds a list, expected a JSON object"),
    ("hf-config-not-utf8", ["--hf-checkpoint", "{hf_latin1}"], "config.json' is not UTF-8 text"),
    ("hf-config-not-json", ["--hf-checkpoint", "{hf_garbage}"], "config.json' is not valid JSON"),
    ("reward-module-missing", ["--custom-reward-path", "no_such_luspo_module:score"],
     "--custom-reward-path: cannot find module 'no_such_luspo_module'"),
    ("pretrained-missing", ["--pretrained-checkpoint", "{empty_dir}/nope"],
     "--pretrained-checkpoint: no such directory"),
    ("load-a-file", ["--load", "{a_file}"], "--load: '{a_file}' is not a directory"),
    ("config-a-directory", ["--config", "{empty_dir}"], "--config: no such file"),
    # YAML: encoding, shape, choices, types
    ("yaml-not-utf8", _yaml(b"train_iters: 3\nlogging:\n  log_dir: r\xe9sultats\n"),
     "--config: {config} is not UTF-8 text (byte 0xe9"),
    ("yaml-a-list", _yaml("- train_iters: 3\n"), "must hold a mapping, got list"),
    ("yaml-syntax", _yaml("rollout: [1,\n"), "is not valid YAML"),
    ("yaml-nested-too-deep", _yaml("seed: " + "[" * 5000 + "]" * 5000 + "\n"), "is nested too deeply"),
    ("yaml-5000-digit-int", _yaml(f"seed: {BIG}\n"), "holds a value that cannot be read"),
    ("yaml-engine-choice", _yaml("rollout:\n  engine: bogus\n"),
     "--rollout-engine: expected one of local, sglang, inprocess, got 'bogus'"),
    ("yaml-loss-choice", _yaml("algorithm:\n  loss: ppo\n"),
     "--loss: expected one of luspo, gspo, gspo_token, grpo, got 'ppo'"),
    ("yaml-dtype-choice", _yaml("model:\n  dtype: fp64\n"), "--model-dtype: expected one of fp32, bf16"),
    ("yaml-decay-choice", _yaml("optimizer:\n  lr_decay_style: linear\n"),
     "--lr-decay-style: expected one of constant, cosine"),
    ("yaml-reward-choice", _yaml("data:\n  reward: bogus\n"),
     "--reward: expected one of math, math+format, dapo, auto"),
    ("yaml-weight-sync-choice", _yaml("rollout:\n  weight_sync: nccl\n"),
     "--weight-sync: expected one of disk, distributed, tensor"),
    ("yaml-bool-as-word", _yaml("parallel:\n  sequence_parallel: maybe\n"),
     "--sequence-parallel (parallel.sequence_parallel): expected bool"),
    ("yaml-int-as-bool", _yaml("parallel:\n  tensor_model_parallel_size: true\n"),
     "--tensor-model-parallel-size (parallel.tensor_model_parallel_size): expected int, got True"),
    ("yaml-int-as-fraction", _yaml("train_iters: 1.5\n"), "--train-iters (train_iters): expected int, got 1.5"),
    ("yaml-str-as-list", _yaml("logging:\n  log_dir: [a, b]\n"), "--log-dir (logging.log_dir): expected str"),
    ("yaml-str-as-bool", _yaml("data:\n  input_key: yes\n"), "--input-key (data.input_key): expected str, got True"),
    ("yaml-url-list-of-maps", _yaml("rollout:\n  sglang_url: [{host: a}]\n"),
     "--sglang-url (rollout.sglang_url): expected a list of strings"),
    ("yaml-lr-nan", _yaml("optimizer:\n  lr: .nan\n"), "--lr: expected a finite number, got nan"),
    ("yaml-lr-overflow", _yaml("optimizer:\n  lr: 1.0e+400\n"), "--lr: expected a finite number, got inf"),
    ("yaml-float-from-huge-int", _yaml(f"optimizer:\n  lr: {'1' + '0' * 400}\n"),
     "--lr (optimizer.lr): expected float"),
    ("yaml-nul-in-path", _yaml('logging:\n  log_dir: "runs\\0x"\n'),
     "--log-dir: expected a string without NUL characters"),
    ("yaml-section-not-a-mapping", _yaml("rollout: 5\n"), "rollout: expected a mapping of RolloutConfig keys, got 5"),
    ("yaml-unknown-key", _yaml("trian_iters: 3\n"), "unknown key 'trian_iters'"),
    ("yaml-eval-data-without-name", _yaml("eval:\n  eval_data: [aime.parquet]\n"), "--eval-data: expected NAME=PATH"),
]


@pytest.fixture
def no_trainer(monkeypatch):
    """A case that passes validation must not start training: the Trainer module fails the test."""
    class Trainer:
        def __init__(self, config):
            raise AssertionError("a bad config reached the Trainer")

    fake = types.ModuleType("luspo_megatron.trainer")
    fake.Trainer, fake.TrainingDiverged = Trainer, RuntimeError
    monkeypatch.setitem(sys.modules, "luspo_megatron.trainer", fake)


def _argv(case, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    names = _paths(tmp_path)
    if isinstance(case, tuple) and case[0] == "yaml":
        config = tmp_path / "config.yaml"
        text = case[1]
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
        names["config"] = str(config)
        return ["--config", str(config)], names  # validation creates nothing, wherever log_dir points
    argv = [a.format(**names) if "{" in a else a for a in case]
    if "--log-dir" not in argv:  # keep the default log dir (relative to the cwd) out of the repository
        argv = ["--log-dir", str(tmp_path / "runs"), *argv]
    return argv, names


def test_there_are_at_least_forty_distinct_cases():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) >= 40


@pytest.mark.parametrize("case,needle", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_value_is_one_line_and_exit_status_2(case, needle, tmp_path, capsys, no_trainer):
    argv, names = _argv(case, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's own one-line errors (OneLineArgumentParser.error) exit
        status = exit_.code
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert status == 2, err
    assert out == "" and len(lines) == 1 and "Traceback" not in err, err
    assert needle.format(**names) in lines[0], lines[0]
    assert lines[0].startswith((Path(sys.argv[0]).name + ": error: ", "train_luspo.py: error: "))
    # Nothing was created or changed: the log directory of the run does not exist afterwards.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_good_paths_pass_and_create_nothing(tmp_path, capsys, no_trainer):
    """The same checks accept what is right (and still create nothing before the Trainer)."""
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "qwen3_moe"}')
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "1+1?", "reward_model": {"ground_truth": "2"}}\n')
    argv = ["--log-dir", str(tmp_path / "runs" / "a"), "--save", str(tmp_path / "ckpt"), "--prompt-data", str(data),
            "--eval-data", f"held={data}", "--tokenizer-path", str(tok), "--hf-checkpoint", str(hf),
            "--custom-reward-path", "tests.trainer.rewards:digit_fraction", "--load", str(tmp_path / "not_yet"),
            "--load-if-exists", "--seed", str(2**32 - 1)]
    with pytest.raises(AssertionError, match="reached the Trainer"):
        cli.main(argv)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ckpt").exists()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args,needle", [
    (["--lr", "inf"], "--lr: expected a finite number, got inf"),
    (["--seed", "-5"], "--seed: expected an integer in [0, 2**32 - 1], got -5"),
])
def test_the_shell_sees_one_line_and_status_2(args, needle, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_luspo.py"), "--log-dir", str(tmp_path / "r"),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"train_luspo.py: error: {needle}"]


def test_a_non_utf8_yaml_through_the_shell(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"seed: 1\n# caf\xe9\n")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_luspo.py"), "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    offset = config.read_bytes().index(b"\xe9")
    assert proc.stderr.splitlines() == [f"train_luspo.py: error: --config: {config} is not UTF-8 text "
                                        f"(byte 0xe9 at offset {offset})"]
