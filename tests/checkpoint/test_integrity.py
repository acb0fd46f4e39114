"""checksums.json (integrity): hashing while writing, sealing, verifying (one process here; 2 gloo
ranks that must agree: test_training.py), and the `verified` mark that pruning honours. Pure
files, no model: the same checks on real training checkpoints are in test_corrupt_checkpoints.py."""

import hashlib
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch

from luspo_megatron.checkpoint import atomic, integrity


def sha256(path: Path) -> str:  # the oracle: hashlib over the whole file at once
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_checkpoint(directory: Path, step: int = 3, seed: int = 0) -> Path:
    """A checkpoint-shaped directory: two 'tensor files' written through HashingWriter (as
    dist_save does), three metadata files written plainly, then sealed."""
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    hashed = {}
    for rank in range(2):
        name = f"__{rank}_0.distcp"
        with open(directory / name, "wb") as raw:
            stream = integrity.HashingWriter(raw)
            for size in (1, 4096, 70_001):  # bytes, bytearray and memoryview, as torch's writers pass them
                chunk = torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8).numpy().tobytes()
                stream.write(chunk)
                stream.write(bytearray(chunk[:7]))
                stream.write(io.BytesIO(chunk).getbuffer())
            stream.flush()
            hashed[name] = stream.record()
    (directory / ".metadata").write_bytes(os.urandom(300))
    (directory / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (directory / "common.pt").write_bytes(os.urandom(500))
    integrity.seal(directory, hashed, step)
    return directory


def test_recorded_hashes_equal_an_independent_sha256_of_every_file(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "iter_0000003")
    body = json.loads((ckpt / integrity.CHECKSUMS).read_text())
    assert body["step"] == 3 and body["algorithm"] == "sha256"
    names = sorted(p.name for p in ckpt.iterdir() if p.name != integrity.CHECKSUMS)
    assert sorted(body["files"]) == names
    for name in names:
        assert body["files"][name] == {"size": (ckpt / name).stat().st_size, "sha256": sha256(ckpt / name)}
    assert integrity.verify(ckpt) == integrity.Verdict("verified")


def test_hashing_writer_tells_the_bytes_written_and_refuses_a_file_rewritten_behind_it(tmp_path):
    with open(tmp_path / "f", "wb") as raw:
        stream = integrity.HashingWriter(raw)
        stream.write(b"abc")
        assert stream.tell() == 3
        raw.write(b"more")  # bytes the hash never saw
        raw.flush()
        with pytest.raises(AssertionError, match="holds 7 bytes, 3 were written"):
            stream.record()


def flip(path: Path, offset: int, length: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + length] = bytes(b ^ 0xFF for b in data[offset:offset + length])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,needle", [
    (lambda d: flip(d / "__1_0.distcp", 1000), r"__1_0\.distcp: sha256 [0-9a-f]{16}…, checksums\.json records"),
    (lambda d: (d / "__0_0.distcp").write_bytes((d / "__0_0.distcp").read_bytes()[:-1]),
     r"__0_0\.distcp: 148210 bytes, checksums\.json records 148211 "),  # 3 + 8199 + 140009 written
    (lambda d: (d / "__1_0.distcp").unlink(), r"__1_0\.distcp: missing"),
    (lambda d: flip(d / "metadata.json", 0, 8), r"/metadata\.json: sha256 "),  # same size, other bytes
    (lambda d: (d / ".metadata").write_bytes(b"\x80garbage"), r"/\.metadata: 8 bytes"),
    (lambda d: flip(d / "common.pt", 100, 1), r"common\.pt: sha256 "),  # one byte
    (lambda d: (d / "checksums.json").write_text("{not json"), r"checksums\.json: unreadable \(JSONDecodeError"),
    (lambda d: (d / "checksums.json").write_text('{"files": []}'), r"checksums\.json: not a luspo-megatron"),
], ids=["bit-flip", "truncated", "deleted", "metadata.json", "torch-dcp-metadata", "common.pt",
        "checksums-not-json", "checksums-wrong-shape"])
def test_every_damage_fails_verification_naming_the_file(tmp_path, damage, needle):
    ckpt = fake_checkpoint(tmp_path / "iter_0000003")
    damage(ckpt)
    verdict = integrity.verify(ckpt)
    assert verdict.status == "failed" and re.search(needle, verdict.problem), verdict
    assert str(ckpt) in verdict.problem and "\n" not in verdict.problem


def test_a_checkpoint_without_checksums_is_unrecorded_and_extra_files_are_ignored(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "iter_0000003")
    (ckpt / "notes.txt").write_text("not part of the checkpoint")
    assert integrity.verify(ckpt).status == "verified"
    (ckpt / integrity.CHECKSUMS).unlink()
    assert integrity.verify(ckpt) == integrity.Verdict("unrecorded")


# -------------------------------------------------------------------- the `verified` mark, pruning
def test_the_verified_mark_survives_only_while_its_checkpoint_is_unchanged(tmp_path):
    dir_of = lambda s: tmp_path / atomic.iter_name(s)  # noqa: E731
    fake_checkpoint(dir_of(2), step=2)
    assert integrity.last_verified(tmp_path, dir_of) is None  # nothing verified yet
    integrity.record_verified(tmp_path, dir_of(2), 2)
    assert integrity.last_verified(tmp_path, dir_of) == 2
    import shutil

    shutil.rmtree(dir_of(2))
    fake_checkpoint(dir_of(2), step=2, seed=1)  # a later save of the same step: other content
    assert integrity.last_verified(tmp_path, dir_of) is None
    (tmp_path / integrity.VERIFIED).write_bytes(b"\xffgarbage")
    assert integrity.last_verified(tmp_path, dir_of) is None


def test_prune_keeps_the_last_verified_checkpoint_beyond_keep_last(tmp_path):
    for step in (1, 2, 3, 4, 5):
        fake_checkpoint(tmp_path / atomic.iter_name(step), step=step, seed=step)
    atomic.write_latest(tmp_path, 5)
    integrity.record_verified(tmp_path, tmp_path / atomic.iter_name(2), 2)
    protect = integrity.last_verified(tmp_path, lambda s: tmp_path / atomic.iter_name(s))
    removed = atomic.prune(tmp_path, keep_last=1, keep=5, protect=protect)
    assert sorted(p.name for p in removed) == ["iter_0000001", "iter_0000003", "iter_0000004"]
    assert atomic.complete_steps(tmp_path) == [2, 5]
    assert integrity.verify(tmp_path / "iter_0000002").status == "verified"
