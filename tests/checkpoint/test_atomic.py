"""The checkpoint directory protocol: what a load picks, what it skips, what pruning deletes."""

import pytest

from luspo_megatron.checkpoint import atomic
from luspo_megatron.errors import CheckpointError


def make(root, *names, latest=None):
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "metadata.json").write_text("{}")
    if latest is not None:
        atomic.write_latest(root, latest)
    return root


def test_latest_names_the_checkpoint_to_load(tmp_path):
    make(tmp_path, "iter_0000003", "iter_0000006", latest=3)
    point = atomic.find_resume_point(tmp_path)
    assert (point.step, point.path.name, point.skipped, point.notes) == (3, "iter_0000003", (), ())


def test_incomplete_save_is_skipped_and_reported(tmp_path):
    # a save killed after writing every file but before the rename looks complete inside
    make(tmp_path, "iter_0000003", "iter_0000006.tmp", latest=3)
    point = atomic.find_resume_point(tmp_path)
    assert point.step == 3 and [p.name for p in point.skipped] == ["iter_0000006.tmp"]
    assert "skipping incomplete checkpoint iter_0000006.tmp" in point.report()


def test_explicit_step_that_only_has_an_incomplete_save_is_refused(tmp_path):
    make(tmp_path, "iter_0000003", "iter_0000006.tmp", latest=3)
    assert atomic.find_resume_point(tmp_path, step=3).path.name == "iter_0000003"
    with pytest.raises(CheckpointError, match=r"no complete checkpoint for step 6 .*only an incomplete \.tmp"):
        atomic.find_resume_point(tmp_path, step=6)


def test_missing_or_dangling_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    make(tmp_path, "iter_0000002", "iter_0000005")  # crash between the rename and `latest`
    point = atomic.find_resume_point(tmp_path)
    assert point.step == 5 and "no readable 'latest'" in point.report()
    atomic.write_latest(tmp_path, 9)  # names a checkpoint that was deleted
    point = atomic.find_resume_point(tmp_path)
    assert point.step == 5 and "names step 9" in point.report()


@pytest.mark.parametrize("content", [b"", b"three\n", b"\xff\xfe3", b"-3\n", b"3.0\n", b"\xd9\xa3\n", b"9" * 4096])
def test_garbage_latest_is_an_error_not_a_guess(tmp_path, content):
    make(tmp_path, "iter_0000003", "iter_0000006")
    (tmp_path / "latest").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"latest is damaged: expected a step number, got b.*--ckpt-step N$"):
        atomic.find_resume_point(tmp_path)
    assert atomic.find_resume_point(tmp_path, step=3).step == 3  # an explicit step does not need it


def test_empty_directory_has_nothing_to_resume(tmp_path):
    assert atomic.find_resume_point(tmp_path / "none") is None
    assert atomic.find_resume_point(make(tmp_path, "iter_0000001.tmp")) is None


def test_commit_replaces_an_existing_directory_atomically(tmp_path):
    make(tmp_path, "iter_0000004", "iter_0000004.tmp")
    (tmp_path / "iter_0000004.tmp" / "new").write_text("new")
    atomic.commit_dir(tmp_path / "iter_0000004.tmp", tmp_path / "iter_0000004")
    assert (tmp_path / "iter_0000004" / "new").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004"]


def test_prune_keeps_the_newest_and_removes_abandoned_saves(tmp_path):
    make(tmp_path, "iter_0000001", "iter_0000002", "iter_0000003", "iter_0000004", "iter_0000002.tmp",
         "iter_0000009.tmp", latest=4)
    removed = atomic.prune(tmp_path, keep_last=2, keep=4)
    assert sorted(p.name for p in removed) == ["iter_0000001", "iter_0000002", "iter_0000002.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "iter_0000004", "iter_0000009.tmp",
                                                          "latest"]


def test_latest_is_replaced_not_rewritten(tmp_path):
    atomic.write_latest(tmp_path, 3)
    inode = (tmp_path / "latest").stat().st_ino
    atomic.write_latest(tmp_path, 6)
    assert atomic.read_latest(tmp_path) == 6 and (tmp_path / "latest").stat().st_ino != inode
    assert not (tmp_path / "latest.tmp").exists()
