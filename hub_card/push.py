"""`detris push --model DIR --repo-id ORG/NAME [--private] [--revision BRANCH] [--commit-message MSG]`.

DIR is exported first (`detris export`, into a temporary folder, with the card's snippets naming ORG/NAME) unless
it already is an export; then the folder is uploaded with `huggingface_hub.HfApi`: `create_repo` (exist_ok),
`create_branch` for a `--revision` other than main, and one `upload_folder` commit. The token is the usual Hub
login (`hf auth login` or the `HF_TOKEN` environment variable).

A Space folder (`detris space`: `app.py` and a README whose YAML header names an `sdk`) is uploaded as it is to a
Space repository (`repo_type="space"`, created with `space_sdk="gradio"`).
"""

import argparse
import sys
import tempfile
from pathlib import Path

from .card import _read_notes
from .export import export_model_folder, is_exported_folder


class PushError(ValueError):
    """Bad push arguments; the message names the bad value and what was expected."""


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(f"--repo-id {repo_id!r} is not a valid Hub repository id ({error}); expected ORG/NAME") from error
    if repo_id.count("/") != 1:
        raise PushError(f"--repo-id {repo_id!r} must name the owner: expected ORG/NAME (e.g. my-org/detris-base-refcoco)")
    return repo_id


def upload(folder, repo_id: str, private: bool = False, revision: str | None = None,
           commit_message: str | None = None, api=None, repo_type: str = "model") -> str:
    """Create the repository (if needed) and upload `folder` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    extra = {"space_sdk": "gradio"} if repo_type == "space" else {}
    repo_url = api.create_repo(repo_id=repo_id, repo_type=repo_type, private=private, exist_ok=True, **extra)
    if revision and revision != "main":
        api.create_branch(repo_id=repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type=repo_type,
        revision=revision,
        commit_message=commit_message or f"Upload DETRIS ({Path(folder).name}) with detris push",
    )
    return str(getattr(commit, "commit_url", None) or getattr(commit, "url", None) or commit or repo_url)


def push(model_dir, repo_id: str, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, eval_results=None, base_models=None, datasets=None,
         training_notes=None, api=None, log=print) -> str:
    check_repo_id(repo_id)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise PushError(f"--model {str(model_dir)!r} is not a folder; expected a DETRIS model, adapter or exported folder")
    from .space import is_space_folder

    if is_space_folder(model_dir):
        log(f"{model_dir} is a Space folder (detris space): uploading it as a Gradio Space")
        return upload(model_dir, repo_id, private, revision, commit_message, api, repo_type="space")
    if is_exported_folder(model_dir) and eval_results is None:
        log(f"{model_dir} is already an export: uploading it as is")
        return upload(model_dir, repo_id, private, revision, commit_message, api)
    with tempfile.TemporaryDirectory(prefix="detris-push-") as tmp:
        exported = Path(tmp) / repo_id.split("/")[-1]
        files = export_model_folder(model_dir, exported, eval_results, repo_id, base_models=base_models,
                                    datasets=datasets, training_notes=training_notes, log=log)
        log(f"exported {len(files)} files: {', '.join(files)}")
        return upload(exported, repo_id, private, revision, commit_message, api)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="detris push", description="export a DETRIS folder and upload it to the Hub")
    parser.add_argument("--model", required=True, help="DETRIS model folder, adapter folder, a `detris export` output or a `detris space` folder")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--eval-results", default=None, help="evaluation JSON for the card (see docs/hub.md)")
    parser.add_argument("--base-model", action="append", default=None)
    parser.add_argument("--dataset", action="append", default=None)
    parser.add_argument("--training-notes", default=None)
    args = parser.parse_args(argv)
    try:
        from .eval_results import load_eval_results

        evaluations = load_eval_results(args.eval_results) if args.eval_results else None
        url = push(args.model, args.repo_id, args.private, args.revision, args.commit_message, evaluations,
                   args.base_model, args.dataset, _read_notes(args.training_notes),
                   log=lambda message: print(message, file=sys.stderr))
    except ValueError as error:
        print(f"detris push: {error}", file=sys.stderr)
        return 2
    print(url)
    return 0


__all__ = ["PushError", "check_repo_id", "main", "push", "upload"]
