"""Data-only loading of the refer ``refs(unc|umd|google).p`` pickles.

The refer pickles are Python-2 era pickles of a list of dicts holding only
str / int / float / list / dict / tuple / None / bool.  Loading an arbitrary
pickle can run arbitrary code, so this module refuses any pickle that would
import a name or call anything:

1. a static scan of the opcode stream (``pickletools.genops``) rejects every
   opcode that imports (GLOBAL, STACK_GLOBAL, INST, EXT*) or calls / builds
   objects (REDUCE, OBJ, NEWOBJ, NEWOBJ_EX, BUILD) or resolves persistent ids;
2. the unpickler itself overrides ``find_class`` and ``persistent_load`` to
   raise, so nothing is imported even if the scan were bypassed.

Nothing in the file is executed before both checks pass.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import pickletools

__all__ = ["UnsafePickleError", "DataOnlyUnpickler", "scan_pickle_opcodes", "load_data_pickle"]

# Opcodes that import names, call callables, or build arbitrary objects.
FORBIDDEN_OPCODES = frozenset(
    {
        "GLOBAL",
        "STACK_GLOBAL",
        "INST",
        "OBJ",
        "REDUCE",
        "NEWOBJ",
        "NEWOBJ_EX",
        "BUILD",
        "EXT1",
        "EXT2",
        "EXT4",
        "PERSID",
        "BINPERSID",
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a pickle holds anything other than plain data."""


class DataOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild builtin containers and scalars."""

    def find_class(self, module, name):  # noqa: D401 - pickle API
        raise UnsafePickleError(
            f"refusing to import {module}.{name}: only plain data (list, dict, str, int, float) is allowed in refs pickles"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id {pid!r}: only plain data is allowed in refs pickles")


def scan_pickle_opcodes(data: bytes, source: str = "<bytes>") -> None:
    """Raise :class:`UnsafePickleError` if ``data`` contains an importing or calling opcode."""
    try:
        for opcode, arg, pos in pickletools.genops(io.BytesIO(data)):
            if opcode.name in FORBIDDEN_OPCODES:
                shown = f" {arg!r}" if arg is not None else ""
                raise UnsafePickleError(
                    f"{source}: unsafe pickle opcode {opcode.name}{shown} at byte {pos}; "
                    "expected a data-only pickle (lists, dicts, strings, numbers). The file was NOT loaded."
                )
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated / not a pickle at all
        raise UnsafePickleError(f"{source}: not a valid pickle stream ({exc}); expected a refer refs(*).p file") from exc


def load_data_pickle(path: str | os.PathLike, sha256: str | None = None):
    """Load a data-only pickle (e.g. ``refs(unc).p``) safely.

    Args:
        path: pickle file.
        sha256: optional expected SHA-256 hex digest; a mismatch raises ``ValueError``.

    Python-2 ``str`` objects are decoded as latin-1 (as ``refer.py`` effectively does).
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest.lower() != sha256.lower():
            raise ValueError(f"{path}: SHA-256 is {digest}, expected {sha256}")
    scan_pickle_opcodes(data, source=path)
    try:
        return DataOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from exc
