"""`configuration_detris.folders`: the one routine that writes a folder whole or not at all (converter, training, data,
export, Space)."""

import os
import subprocess
import sys

import pytest

from configuration_detris.folders import atomic_folder, new_staging, overlap, publish, staging_path


def dead_pid() -> int:
    run = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(run.stdout)


def test_a_folder_appears_whole_with_the_users_mode(tmp_path):
    target = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        with atomic_folder(target) as staging:
            assert staging == staging_path(target, os.getpid()) and staging.name == f".out.{os.getpid()}.partial"
            (staging / "a.txt").write_text("a")
            assert not target.exists()
    finally:
        os.umask(previous)
    assert (target / "a.txt").read_text() == "a"
    assert target.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_error_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        with atomic_folder(target):
            pass
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_folder(target, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    with atomic_folder(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staging_folders_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "out"
    stale_private = tmp_path / f".out.{dead_pid()}.partial"
    stale_shared = staging_path(target)
    live = tmp_path / f".out.{os.getppid()}.partial"  # a live process's (our parent's) staging folder
    for folder in (stale_private, stale_shared, live):
        folder.mkdir()
        (folder / "half.bin").write_bytes(b"x")
    staging = new_staging(target)
    assert not stale_private.exists() and not stale_shared.exists() and live.is_dir() and staging.is_dir()
    # a staging folder shared by the processes of one run has the same name in every process
    assert new_staging(target, shared=True) == stale_shared


def test_publish_replaces_a_file_or_a_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    for kind in ("file", "link"):
        target = tmp_path / kind
        if kind == "file":
            target.write_text("x")
        else:
            target.symlink_to(elsewhere, target_is_directory=True)
        staging = new_staging(target)
        (staging / "new.txt").write_text("new")
        publish(staging, target)
        assert target.is_dir() and not target.is_symlink() and (target / "new.txt").is_file()
    assert (elsewhere / "keep.txt").read_text() == "keep"  # the link is replaced, not what it points to


def test_overlap(tmp_path):
    assert overlap(tmp_path / "a", tmp_path / "a") == "is"
    assert overlap(tmp_path, tmp_path / "a" / "b") == "contains"
    assert overlap(tmp_path / "a" / "b", tmp_path / "a") == "is inside"
    assert overlap(tmp_path / "a", tmp_path / "b") is None
