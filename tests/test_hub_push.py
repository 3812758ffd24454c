"""`detris push`: everything up to the network call runs for real; only huggingface_hub.HfApi's network methods
are replaced, recording what would be sent."""

import hashlib
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from hub_helpers import save_tiny_model

import hub_card  # noqa: F401
from training.cli import main as cli


def _snapshot(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


class Recorder:
    def __init__(self, monkeypatch):
        self.calls = []
        recorder = self

        def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **kwargs):
            recorder.calls.append(("create_repo", dict(repo_id=repo_id, repo_type=repo_type, private=private, exist_ok=exist_ok)))
            return f"https://huggingface.co/{repo_id}"

        def create_branch(self, repo_id, *, branch, repo_type=None, exist_ok=False, **kwargs):
            recorder.calls.append(("create_branch", dict(repo_id=repo_id, branch=branch, exist_ok=exist_ok)))

        def upload_folder(self, *, repo_id, folder_path, repo_type=None, revision=None, commit_message=None, **kwargs):
            recorder.calls.append(("upload_folder", dict(repo_id=repo_id, revision=revision, commit_message=commit_message,
                                                         files=_snapshot(folder_path), extra=kwargs)))
            return f"https://huggingface.co/{repo_id}/commit/0123"

        def whoami(self, *args, **kwargs):
            recorder.whoami_calls += 1
            return {"name": "my-org-member"}

        self.whoami_calls = 0
        for name, function in (("create_repo", create_repo), ("create_branch", create_branch), ("upload_folder", upload_folder),
                               ("whoami", whoami)):
            monkeypatch.setattr(HfApi, name, function)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("push") / "model")


def test_push_uploads_exactly_the_export(model_dir, tmp_path, monkeypatch, capsys):
    recorder = Recorder(monkeypatch)
    assert cli(["push", "--model", str(model_dir), "--repo-id", "my-org/detris-tiny", "--private",
                "--revision", "v1", "--commit-message", "first"]) == 0
    assert capsys.readouterr().out.strip() == "https://huggingface.co/my-org/detris-tiny/commit/0123"
    names = [name for name, _ in recorder.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert recorder.calls[0][1] == dict(repo_id="my-org/detris-tiny", repo_type="model", private=True, exist_ok=True)
    assert recorder.calls[1][1] == dict(repo_id="my-org/detris-tiny", branch="v1", exist_ok=True)
    upload = recorder.calls[2][1]
    assert upload["revision"] == "v1" and upload["commit_message"] == "first" and upload["extra"] == {}
    # The uploaded files are, byte for byte, those of `detris export` with the same repo id.
    exported = tmp_path / "exported"
    assert cli(["export", "--model", str(model_dir), "--output", str(exported), "--repo-id", "my-org/detris-tiny"]) == 0
    assert upload["files"] == _snapshot(exported)
    assert {"model.safetensors", "modeling_detris.py", "README.md", "config.json"} <= set(upload["files"])
    assert 'model_id = "my-org/detris-tiny"' in (exported / "README.md").read_text()

    # An exported folder is uploaded as it is, to main, public by default.
    recorder.calls.clear()
    assert cli(["push", "--model", str(exported), "--repo-id", "my-org/detris-tiny"]) == 0
    assert [name for name, _ in recorder.calls] == ["create_repo", "upload_folder"]
    assert recorder.calls[0][1]["private"] is False and recorder.calls[1][1]["revision"] is None
    assert recorder.calls[1][1]["files"] == _snapshot(exported)


@pytest.mark.parametrize("repo_id, message", [("no-owner", "expected ORG/NAME"), ("a/b/c", "not a valid Hub repository id"),
                                              ("org/bad name", "not a valid Hub repository id")])
def test_push_refuses_bad_repo_ids_before_any_call(model_dir, monkeypatch, capsys, repo_id, message):
    recorder = Recorder(monkeypatch)
    assert cli(["push", "--model", str(model_dir), "--repo-id", repo_id]) == 2
    assert message in capsys.readouterr().err and recorder.calls == []


def test_push_refuses_a_missing_folder(tmp_path, monkeypatch, capsys):
    recorder = Recorder(monkeypatch)
    assert cli(["push", "--model", str(tmp_path / "nope"), "--repo-id", "org/x"]) == 2
    assert "is not a folder" in capsys.readouterr().err and recorder.calls == []


def test_push_checks_the_token_before_exporting(model_dir, tmp_path, monkeypatch, capsys):
    """No token, a refused token, an unreachable Hub: one line saying how to log in, before anything is exported."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in model_dir.iterdir())

    assert cli(["push", "--model", str(model_dir), "--repo-id", "my-org/detris-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "no Hugging Face token found" in err and "hf auth login" in err and "exported" not in err

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    assert cli(["push", "--model", str(model_dir), "--repo-id", "my-org/detris-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "cannot reach the Hub" in err and "hf auth login" in err and "exported" not in err
    assert sorted(p.name for p in model_dir.iterdir()) == before
