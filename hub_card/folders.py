"""The folders `detris export`, `detris space` and `detris push` read and write, and Hub repository ids.

An output folder is written under a hidden staging name beside it (`.NAME.<pid>.<random>`) and renamed at the end,
so a failed or killed run never leaves a folder that looks complete. A re-run removes the staging folders that
killed runs left (those whose process is gone). The finished folder is readable by others (mode 0755 less the
umask), like any folder a user creates; an output that is, or contains, one of the inputs is refused, so
`--overwrite` can never delete what is being exported.
"""

import os
import re
import shutil
import tempfile
from pathlib import Path


class OutputFolderError(ValueError):
    """The output folder cannot be written; the message names the bad value and what was expected."""


def is_adapter_folder(folder) -> bool:
    """An adapter-only folder (PEFT format): `adapter_config.json` without a model `config.json`."""
    folder = Path(folder)
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def is_space_folder(folder) -> bool:
    """A Space folder: `app.py` and a README whose YAML header names an `sdk`."""
    from huggingface_hub.repocard import metadata_load

    folder = Path(folder)
    if not (folder / "app.py").is_file() or not (folder / "README.md").is_file():
        return False
    return bool((metadata_load(folder / "README.md") or {}).get("sdk"))


def looks_like_repo_id(name: str) -> bool:
    """`ORG/NAME` that the Hub accepts as a repository id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_repo_id(repo_id: str, flag: str = "--repo-id") -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise OutputFolderError(f"{flag} {repo_id!r} is not a valid Hub repository id ({error}); expected ORG/NAME") from error
    if repo_id.count("/") != 1:
        raise OutputFolderError(f"{flag} {repo_id!r} must name the owner: expected ORG/NAME (e.g. my-org/detris-base-refcoco)")
    return repo_id


def read_text_file(path, flag: str) -> str | None:
    """The text of the file `path` (None when `path` is None); refused when it is not a file."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise OutputFolderError(f"{flag} {str(path)!r} does not exist; expected a markdown file")
    return Path(path).read_text(encoding="utf-8")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(output: Path) -> list[Path]:
    """Remove the staging folders of `output` that runs which no longer exist left behind; returns them."""
    pattern = re.compile(re.escape(f".{output.name}.") + r"(\d+)\.[^.]+")
    removed = []
    if not output.parent.is_dir():
        return removed
    for candidate in output.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match and candidate.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def staging_folder(output, inputs=(), overwrite: bool = False, flag: str = "--output",
                   what: str = "the model folder") -> Path:
    """A new staging folder for `output`, after refusing an output that is, contains or lies inside one of `inputs`
    (`what` names them in the message) and a non-empty output without `overwrite`, and removing what killed runs
    left."""
    output = Path(output)
    resolved = output.resolve()
    for source in inputs:
        source_resolved = Path(source).resolve()
        if resolved == source_resolved:
            raise OutputFolderError(f"{flag} {str(output)!r} is {what} itself; expected a new folder")
        if resolved in source_resolved.parents:
            raise OutputFolderError(
                f"{flag} {str(output)!r} contains {what} {str(source)!r}; expected a new folder outside it "
                "(--overwrite would delete it)"
            )
        if source_resolved in resolved.parents:
            raise OutputFolderError(
                f"{flag} {str(output)!r} is inside {what} {str(source)!r}; expected a new folder outside it"
            )
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise OutputFolderError(f"{flag} {str(output)!r} exists and is not empty; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.{os.getpid()}.", dir=output.parent))


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def publish(staging: Path, output: Path) -> None:
    """Make the staging folder readable like a folder the user creates, and put it in place of `output`."""
    os.chmod(staging, 0o777 & ~_umask())
    output = Path(output)
    if output.is_dir() and not output.is_symlink():
        shutil.rmtree(output)
    elif output.exists() or output.is_symlink():
        output.unlink()
    staging.rename(output)


__all__ = [
    "OutputFolderError",
    "check_repo_id",
    "is_adapter_folder",
    "is_space_folder",
    "looks_like_repo_id",
    "publish",
    "read_text_file",
    "remove_stale_staging",
    "staging_folder",
]
