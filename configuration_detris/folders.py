"""Folders written whole or not at all: the one routine every writer of a model, data, checkpoint or Space folder uses.

A folder is written into a hidden staging folder beside its target and renamed into place at the end, after its files
are flushed, so a kill, a full disk or an error never leaves a target that looks complete. A staging folder is
`.<name>.<pid>.partial` for a folder one process writes, `.<name>.partial` for one all processes of a distributed run
write (they must find it by name). The next write of the same target removes the staging folders of runs whose process
is gone. The finished folder has the mode of a folder the user creates (0777 less the umask).

Standard library only, so that `training`, `hub_card` and the converter can share it without importing the model.
"""

import contextlib
import os
import re
import shutil
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def staging_path(target, pid: int | None = None) -> Path:
    """The staging folder of `target`: `.<name>.partial`, or `.<name>.<pid>.partial` for one process's own."""
    target = Path(target)
    middle = "" if pid is None else f".{pid}"
    return target.parent / f".{target.name}{middle}{PARTIAL_SUFFIX}"


def process_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(target) -> list[Path]:
    """Remove the staging folders of `target` that killed runs left: the shared one, and those of processes that are
    gone (`.<name>.<pid>.<anything>`); returns them."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    own = re.compile(re.escape(f".{target.name}.") + r"(\d+)\.[^.]+")
    removed = []
    for candidate in target.parent.iterdir():
        match = own.fullmatch(candidate.name)
        stale = candidate == staging_path(target) or (match is not None and not process_alive(int(match.group(1))))
        if stale and candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def overlap(output, source) -> str | None:
    """How folder `output` overlaps `source`: "is", "contains", "is inside", or None when they are apart."""
    output, source = Path(output).resolve(), Path(source).resolve()
    if output == source:
        return "is"
    if output in source.parents:
        return "contains"
    if source in output.parents:
        return "is inside"
    return None


def fsync_path(path: Path):
    """Flush one file or folder to disk (best effort on file systems without fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path):
    """Flush every file under `folder` and the folders themselves."""
    for path in sorted(Path(folder).rglob("*")) + [Path(folder)]:
        fsync_path(path)


def new_staging(target, shared: bool = False) -> Path:
    """Create a fresh staging folder for `target` (see the module docstring), after removing what killed runs left."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = staging_path(target, None if shared else os.getpid())
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(staging, target) -> None:
    """Flush `staging` and put it in place of `target` (a folder, file or link that is there is replaced)."""
    staging, target = Path(staging), Path(target)
    fsync_tree(staging)
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.{os.getpid()}.old"
        _remove(old)
        os.replace(target, old)
        os.replace(staging, target)
        _remove(old)
    else:
        os.replace(staging, target)
    fsync_path(target.parent)


@contextlib.contextmanager
def atomic_folder(target, overwrite: bool = False, shared: bool = False):
    """Yield a fresh staging folder; when the block ends without an error it replaces `target` (an existing `target`
    needs `overwrite`); on an error it is removed and `target` is left as it was."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; expected a new folder (pass --overwrite to replace it)")
    staging = new_staging(target, shared)
    try:
        yield staging
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
