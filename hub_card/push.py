"""`detris push --model DIR --repo-id ORG/NAME [--private] [--revision BRANCH] [--commit-message MSG]`.

DIR is exported first (`detris export`, into a temporary folder, with the card's snippets naming ORG/NAME) unless
it already is an export; then the folder is uploaded with `huggingface_hub.HfApi`: `create_repo` (exist_ok),
`create_branch` for a `--revision` other than main, and one `upload_folder` commit. The token is the usual Hub
login (`hf auth login` or the `HF_TOKEN` environment variable); it is checked (`whoami`) before anything is exported,
so a missing token or an unreachable Hub ends in one line saying how to log in.

A Space folder (`detris space`: `app.py` and a README whose YAML header names an `sdk`) is uploaded as it is to a
Space repository (`repo_type="space"`, created with `space_sdk="gradio"`).
"""

import argparse
import sys
import tempfile
from pathlib import Path

from .export import export_model_folder, is_exported_folder
from .folders import check_repo_id, is_space_folder, read_text_file

LOGIN_HINT = "log in with `hf auth login` (or set the HF_TOKEN environment variable to a token with write access)"


class PushError(ValueError):
    """Bad push arguments, or no access to the Hub; the message names the bad value and what was expected."""


def check_access(api=None) -> str:
    """The Hub user the token belongs to; `PushError` (one line, saying how to log in) when there is no token, the
    Hub refuses it or cannot be reached."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    api = api or HfApi()
    try:
        info = api.whoami()
    except LocalTokenNotFoundError as error:
        raise PushError(f"no Hugging Face token found; {LOGIN_HINT}") from error
    except OfflineModeIsEnabled as error:
        raise PushError(f"the Hub is disabled here (HF_HUB_OFFLINE is set); unset it, then {LOGIN_HINT}") from error
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            raise PushError(f"the Hub refused the token (401 Unauthorized); {LOGIN_HINT}") from error
        raise PushError(f"the Hub answered {status} to the token check ({str(error).splitlines()[0]}); try again, "
                        f"or {LOGIN_HINT}") from error
    except OSError as error:  # no network, DNS, refused connection, timeouts (httpx errors are not OSError)
        raise PushError(f"cannot reach the Hub ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                        f"check the network, then {LOGIN_HINT}") from error
    except Exception as error:
        if type(error).__module__.split(".")[0].rstrip("0123456789") not in ("httpx", "httpcore", "requests", "urllib3"):
            raise
        raise PushError(f"cannot reach the Hub ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                        f"check the network, then {LOGIN_HINT}") from error
    return str((info or {}).get("name") or "")


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
    from huggingface_hub import HfApi

    api = api or HfApi()
    user = check_access(api)
    log(f"pushing to {repo_id} as {user or 'the logged-in user'}")
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
    parser.add_argument("--eval-results", default=None,
                        help="evaluation JSON for the card (see docs/hub.md), or the results.json of `detris eval`")
    parser.add_argument("--eval-dataset", default=None,
                        help="the dataset a `detris eval` results.json was measured on (e.g. refcoco)")
    parser.add_argument("--base-model", action="append", default=None)
    parser.add_argument("--dataset", action="append", default=None)
    parser.add_argument("--training-notes", default=None)
    args = parser.parse_args(argv)
    try:
        from .eval_results import load_eval_results

        evaluations = load_eval_results(args.eval_results, args.eval_dataset) if args.eval_results else None
        url = push(args.model, args.repo_id, args.private, args.revision, args.commit_message, evaluations,
                   args.base_model, args.dataset, read_text_file(args.training_notes, "--training-notes"),
                   log=lambda message: print(message, file=sys.stderr))
    except ValueError as error:
        print(f"detris push: {error}", file=sys.stderr)
        return 2
    print(url)
    return 0


__all__ = ["PushError", "check_access", "main", "push", "upload"]
