"""The folders `detris export`, `detris space` and `detris push` read and write, and Hub repository ids.

An output folder is written whole or not at all (`configuration_detris.folders`: a hidden staging folder beside it,
renamed at the end; staging folders of killed runs are removed by the next run). An output that is, contains or lies
inside one of the inputs is refused, so `--overwrite` can never delete what is being exported.
"""

from pathlib import Path

from configuration_detris.folders import new_staging, overlap


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


def check_output_folder(output, inputs=(), overwrite: bool = False, flag: str = "--output",
                        what: str = "the model folder") -> None:
    """Refuse an output that is, contains or lies inside one of `inputs` (`what` names them in the message), and a
    non-empty output without `overwrite`."""
    output = Path(output)
    for source in inputs:
        relation = overlap(output, source)
        if relation == "is":
            raise OutputFolderError(f"{flag} {str(output)!r} is {what} itself; expected a new folder")
        if relation == "contains":
            raise OutputFolderError(
                f"{flag} {str(output)!r} contains {what} {str(source)!r}; expected a new folder outside it "
                "(--overwrite would delete it)"
            )
        if relation == "is inside":
            raise OutputFolderError(
                f"{flag} {str(output)!r} is inside {what} {str(source)!r}; expected a new folder outside it"
            )
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise OutputFolderError(f"{flag} {str(output)!r} exists and is not empty; pass --overwrite to replace it")


def staging_folder(output, inputs=(), overwrite: bool = False, flag: str = "--output",
                   what: str = "the model folder") -> Path:
    """`check_output_folder`, then a new staging folder for `output` (`configuration_detris.folders.new_staging`)."""
    check_output_folder(output, inputs, overwrite, flag, what)
    return new_staging(output)


__all__ = [
    "OutputFolderError",
    "check_output_folder",
    "check_repo_id",
    "is_adapter_folder",
    "is_space_folder",
    "looks_like_repo_id",
    "read_text_file",
    "staging_folder",
]
