"""One run per output folder: `OutputLock(folder)` is a lock file naming the process that holds a run folder; a second
run in the same folder is refused with the holder's pid and host, a lock left by a dead process is taken over.

Folders written whole or not at all are `configuration_detris.folders.atomic_folder`.
"""

import json
import os
import socket
import time
from pathlib import Path

from configuration_detris.folders import overlap, process_alive


class FolderInUseError(RuntimeError):
    """Another live run holds the output folder."""


def check_not_inside(output, inputs: dict):
    """Refuse an output folder that is, contains or lies inside one of `inputs` ({"--option": path}): replacing it
    would delete the input."""
    for option, value in inputs.items():
        if value is not None and overlap(output, value):
            raise ValueError(f"--output {str(output)!r} overlaps the input {option} {str(value)!r}; expected a "
                             "separate folder (replacing it would delete the input)")


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
                alive = holder is not None and process_alive(int(holder.get("pid", -1)))
                if holder is not None and (holder.get("host") != socket.gethostname() or alive):
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
