"""Folders written whole or not at all, and one run per output folder.

`atomic_folder(target)` hands out a staging folder beside `target` (`.<name>.partial`); when the block ends without an
error its files are flushed and it is renamed to `target` in one step, so a kill or a full disk never leaves a
`target` that looks complete. A staging folder left by a killed run is removed by the next write of the same target.

`OutputLock(folder)` is a lock file naming the process that holds a run folder; a second run in the same folder is
refused with the holder's pid and host, a lock left by a dead process is taken over.
"""

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


class FolderInUseError(RuntimeError):
    """Another live run holds the output folder."""


def staging_path(target) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}{PARTIAL_SUFFIX}"


def fsync_tree(folder: Path):
    """Flush every file under `folder` and the folders themselves (best effort on file systems without fsync)."""
    for path in sorted(Path(folder).rglob("*")) + [Path(folder)]:
        fsync_path(path)


def check_not_inside(output, inputs: dict):
    """Refuse an output folder that is, contains or lies inside one of `inputs` ({"--option": path}): replacing it
    would delete the input."""
    out = Path(output).resolve()
    for option, value in inputs.items():
        if value is None:
            continue
        source = Path(value).resolve()
        if out == source or out in source.parents or source in out.parents:
            raise ValueError(f"--output {str(output)!r} overlaps the input {option} {str(value)!r}; expected a "
                             "separate folder (replacing it would delete the input)")


@contextlib.contextmanager
def atomic_folder(target, overwrite: bool = False):
    """Yield a fresh staging folder; on success it replaces `target` (an existing `target` needs `overwrite`)."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; expected a new folder (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target)
    if staging.exists():
        shutil.rmtree(staging)  # left by a killed run
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
        if target.exists():
            old = target.parent / f".{target.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def fsync_path(path: Path):
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """`with OutputLock(folder):` holds `folder/.lock` (JSON: pid, host, since) for the duration of a run."""

    NAME = ".lock"

    def __init__(self, folder):
        self.path = Path(folder) / self.NAME
        self.held = False

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and (holder.get("host") != socket.gethostname() or _alive(int(holder.get("pid", -1)))):
                    raise FolderInUseError(
                        f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on {holder.get('host')} "
                        f"since {holder.get('since')}; lock file {self.path}); expected a free output_dir: wait for it, "
                        "or delete the lock file if that run is gone"
                    ) from None
                self.path.unlink(missing_ok=True)  # left by a dead process
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(record)
            self.held = True
            return self
        raise FolderInUseError(f"could not take the lock file {self.path}")

    def _holder(self):
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable or half-written: treated as stale

    def release(self):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
