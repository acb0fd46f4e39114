"""Damaged training checkpoints through the commands a user runs (tools/train_luspo.py and
tools/convert_megatron_to_hf.py as subprocesses): refused in one line with exit status 2 and no
traceback, or (``--load`` without ``--ckpt-step``) passed over for the newest good checkpoint.

One short trainer run (module fixture, started with ``--load-if-exists`` on a directory that does
not exist yet) saves steps 1, 2, 3; every test damages its own copy. The failing runs stop in the
load, before any rollout, but each costs a trainer start-up (~8 s of CPU, mostly imports), so:
in ``make test`` one run passes over one checkpoint per corruption and then fails; each corruption
alone, a garbage ``latest``, another model and a checkpoint from before checksums are ``slow``
here (the last three are also checked in ``make test`` through the library: test_atomic.py,
test_training.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from luspo_megatron.checkpoint import atomic, integrity

ROOT = Path(__file__).resolve().parents[2]
FAST = [
    "--rollout-engine", "inprocess", "--weight-sync", "tensor", "--rollout-batch-size", "2",
    "--n-samples-per-prompt", "2", "--rollout-max-response-len", "4", "--sft-warmup-steps", "0",
    "--synthetic-num-prompts", "8", "--seed", "7", "--no-progress", "--lr", "1e-3",
    "--custom-reward-path", "tests.trainer.rewards:digit_fraction", "--reward-num-workers", "1",
]


def run_tool(tool: str, *args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def train(log_dir: Path, *flags: str | Path) -> subprocess.CompletedProcess:
    return run_tool("train_luspo", *FAST, "--log-dir", log_dir, *flags)


def refused(proc: subprocess.CompletedProcess, prefix: str = "train_luspo.py: error: ") -> str:
    """Exit status 2, no traceback, exactly one error line and it is the last line. Returns it."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if "error: " in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith(prefix), proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1, 2, 3 of a fresh run whose --load directory did not exist (--load-if-exists)."""
    work = tmp_path_factory.mktemp("saved")
    ckpt = work / "ckpt"
    proc = train(work, "--train-iters", "3", "--save", ckpt, "--save-interval", "1", "--load", ckpt,
                 "--load-if-exists")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"ckpt": ckpt, "log_dir": work, "stderr": proc.stderr}


def copy(saved, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved["ckpt"], tmp_path / "ckpt"))


# --------------------------------------------------------------------------------------- damage
def flip(path: Path, offset: int = 4096, length: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    offset = min(offset, len(data) - length)
    data[offset:offset + length] = bytes(b ^ 0xFF for b in data[offset:offset + length])
    path.write_bytes(bytes(data))


def garbage(path: Path) -> None:
    """The same number of bytes, none of them the file's own (only the hash can tell)."""
    size = path.stat().st_size
    path.write_bytes((b"\x00garbage{" * (size // 9 + 1))[:size])


TENSORS = "__0_0.distcp"
# name -> (damage of a checkpoint directory, the file the error names, what it says)
DAMAGE: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "bit-flip": (lambda d: flip(d / TENSORS, 2_000_000), TENSORS, "sha256"),
    "truncated": (lambda d: (d / TENSORS).write_bytes((d / TENSORS).read_bytes()[:100_000]), TENSORS, "bytes"),
    "deleted": (lambda d: (d / TENSORS).unlink(), TENSORS, "missing"),
    "garbage-metadata.json": (lambda d: garbage(d / "metadata.json"), "metadata.json", "sha256"),
    "garbage-dcp-.metadata": (lambda d: garbage(d / ".metadata"), ".metadata", "sha256"),
    "garbage-common.pt": (lambda d: garbage(d / "common.pt"), "common.pt", "sha256"),  # step, extra state
    "missing-checksums": (lambda d: (d / integrity.CHECKSUMS).unlink(), integrity.CHECKSUMS, "missing"),
}


# ---------------------------------------------------------------------------------------- tests
def test_a_missing_load_directory_with_load_if_exists_starts_fresh_and_says_so(saved):
    said = [line for line in saved["stderr"].splitlines() if "does not exist: starting fresh" in line]
    assert len(said) == 1 and str(saved["ckpt"]) in said[0]
    steps = [json.loads(line)["step"] for line in (saved["log_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_missing_load_directory_is_an_error_without_load_if_exists(tmp_path):
    line = refused(train(tmp_path, "--train-iters", "1", "--load", tmp_path / "nowhere"))
    assert "--load" in line and "nowhere" in line and "does not exist" in line and "--load-if-exists" in line


def test_checksums_equal_an_independent_sha256_of_every_file(saved):
    assert atomic.complete_steps(saved["ckpt"]) == [1, 2, 3]
    for step in (1, 2, 3):
        directory = saved["ckpt"] / atomic.iter_name(step)
        body = json.loads((directory / integrity.CHECKSUMS).read_text())
        files = sorted(p.name for p in directory.iterdir() if p.name != integrity.CHECKSUMS)
        assert body["step"] == step and sorted(body["files"]) == files
        assert {TENSORS, ".metadata", "metadata.json", "common.pt"} <= set(files)
        for name in files:
            data = (directory / name).read_bytes()
            assert body["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_bit_flip_with_ckpt_step_is_refused_naming_the_file_and_the_step(saved, tmp_path):
    ckpt = copy(saved, tmp_path)
    flip(ckpt / "iter_0000003" / TENSORS, 2_000_000)
    line = refused(train(tmp_path, "--train-iters", "4", "--load", ckpt, "--ckpt-step", "3"))
    assert "--ckpt-step 3: checkpoint step 3" in line and f"iter_0000003/{TENSORS}: sha256" in line


def model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of a dist checkpoint, read with torch DCP alone (not our loader)."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(checkpoint))
    stored = {k: m for k, m in reader.read_metadata().state_dict_metadata.items()
              if isinstance(m, dcp.TensorStorageMetadata) and not k.startswith("optimizer.")}
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in stored.items()}
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    return tensors


def test_load_falls_back_from_a_bit_flip_to_the_previous_checkpoint_with_its_exact_weights(saved, tmp_path):
    ckpt = copy(saved, tmp_path)
    flip(ckpt / "iter_0000003" / TENSORS, 2_000_000)
    out = tmp_path / "out"
    # train_iters = the step it falls back to: nothing trains; the final save holds the loaded weights
    proc = train(tmp_path, "--train-iters", "2", "--load", ckpt, "--save", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    warned = [line for line in proc.stderr.splitlines() if "is damaged, trying the next older" in line]
    assert len(warned) == 1 and "checkpoint step 3" in warned[0] and f"iter_0000003/{TENSORS}: sha256" in warned[0]
    assert "resumed step 2 from" in proc.stderr
    loaded, step2 = model_tensors(out / "iter_0000002"), model_tensors(saved["ckpt"] / "iter_0000002")
    step3 = model_tensors(saved["ckpt"] / "iter_0000003")
    assert sorted(loaded) == sorted(step2)
    assert all(torch.equal(loaded[k], step2[k]) for k in step2)
    assert any(not torch.equal(step3[k], step2[k]) for k in step2)  # the check can tell the two apart


def test_every_corruption_is_passed_over_with_a_warning_and_none_left_is_one_line_exit_2(saved, tmp_path):
    """One checkpoint per corruption (copies of step 3 as steps 1..7), the newest first."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    names = sorted(DAMAGE)
    for step, name in enumerate(names, start=1):
        directory = Path(shutil.copytree(saved["ckpt"] / "iter_0000003", ckpt / atomic.iter_name(step)))
        DAMAGE[name][0](directory)
    atomic.write_latest(ckpt, len(names))
    proc = train(tmp_path, "--train-iters", "9", "--load", ckpt)
    line = refused(proc)
    assert f"no checkpoint in {ckpt} can be loaded" in line and f"checkpoint step {len(names)}" in line
    warned = [w for w in proc.stderr.splitlines() if "is damaged, trying the next older" in w]
    assert len(warned) == len(names)
    for step, name in zip(range(len(names), 0, -1), reversed(names)):  # newest first
        _, file, says = DAMAGE[name]
        warning = warned[len(names) - step]
        assert f"checkpoint step {step} " in warning and f"{atomic.iter_name(step)}/{file}: " in warning, warning
        assert says in warning.split(f"/{file}: ", 1)[1], warning


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_each_corruption_alone_is_one_line_exit_2_naming_the_file(saved, tmp_path, name):
    ckpt = copy(saved, tmp_path)
    damage, file, says = DAMAGE[name]
    damage(ckpt / "iter_0000003")
    line = refused(train(tmp_path, "--train-iters", "4", "--load", ckpt, "--ckpt-step", "3"))
    assert "checkpoint step 3 " in line and f"iter_0000003/{file}: " in line and says in line


@pytest.mark.slow
def test_a_garbage_latest_pointer_is_one_line_exit_2(saved, tmp_path):
    ckpt = copy(saved, tmp_path)
    (ckpt / "latest").write_bytes(b"\xff\xfe3 or so\n")
    line = refused(train(tmp_path, "--train-iters", "4", "--load", ckpt))
    assert f"{ckpt / 'latest'} is damaged: expected a step number" in line and "--ckpt-step" in line


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_one_line_exit_2(saved, tmp_path):
    # a dense Qwen3 loading the Qwen3-MoE checkpoint: intact files, other tensors
    line = refused(train(tmp_path, "--train-iters", "4", "--load", saved["ckpt"], "--model-preset", "tiny_qwen3"))
    assert "checkpoint step 3" in line and "holds another model" in line
    assert "tensors of this model are not in it" in line and "mlp.experts" in line


@pytest.mark.slow
def test_a_checkpoint_from_before_checksums_loads_with_a_warning(saved, tmp_path):
    ckpt = copy(saved, tmp_path)
    for directory in ckpt.glob("iter_*"):  # what this version's predecessor wrote: format 1, no checksums
        (directory / integrity.CHECKSUMS).unlink()
        common = torch.load(directory / "common.pt", weights_only=False)
        common["luspo"]["format_version"] = 1
        torch.save(common, directory / "common.pt")
    proc = train(tmp_path, "--train-iters", "3", "--load", ckpt)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "checkpoint step 3" in proc.stderr and "loading it unverified" in proc.stderr
    assert "resumed step 3 from" in proc.stderr


def test_keep_last_keeps_the_checkpoint_that_verified_when_the_newer_ones_are_not(saved, tmp_path):
    ckpt = copy(saved, tmp_path)
    flip(ckpt / "iter_0000003" / TENSORS, 2_000_000)
    proc = train(tmp_path, "--train-iters", "4", "--load", ckpt, "--save", ckpt, "--save-interval", "1",
                 "--keep-last", "1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    # loaded step 2 (step 3 is damaged), saved 3 and 4: --keep-last 1 keeps 4 and, since no newer
    # checkpoint has been verified by a load yet, step 2
    assert atomic.complete_steps(ckpt) == [2, 4] and atomic.read_latest(ckpt) == 4
    assert integrity.verify(ckpt / "iter_0000002").status == "verified"
    assert integrity.last_verified(ckpt, lambda s: ckpt / atomic.iter_name(s)) == 2
    assert "kept iter_0000002 beyond --keep-last" in proc.stderr


def test_exporting_a_damaged_training_checkpoint_is_one_line_exit_2(saved, tmp_path):
    ckpt = copy(saved, tmp_path)
    flip(ckpt / "iter_0000003" / TENSORS, 2_000_000)
    line = refused(run_tool("convert_megatron_to_hf", "--load", ckpt, "--save", tmp_path / "hf", "--no-progress"),
                   prefix="error: ")
    assert f"iter_0000003/{TENSORS}: sha256" in line
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()
