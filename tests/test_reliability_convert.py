"""`detris convert` on untrusted or damaged checkpoint files: refused in one line naming the file (exit code 2),
nothing written, never a hint to unpickle with weights_only=False."""

import hashlib

import pytest
import torch

from modeling_detris.convert_original import load_official_state_dict, plan_checkpoints
from training.cli import main as cli


def _small_checkpoint(path):
    torch.save({"state_dict": {"module.decoder.weight": torch.arange(64, dtype=torch.float32)}}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_a_tensor_byte(path):
    data = bytearray(path.read_bytes())
    marker = torch.arange(64, dtype=torch.float32).numpy().tobytes()[8:16]  # raw bytes of the stored tensor
    where = data.find(marker)
    assert where > 0
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("detris convert: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


def test_sha256_refuses_a_checkpoint_with_flipped_tensor_bytes(tmp_path, capsys):
    checkpoint = tmp_path / "base_refcoco.pth"
    published = _small_checkpoint(checkpoint)
    _flip_a_tensor_byte(checkpoint)
    assert load_official_state_dict(checkpoint)["decoder.weight"][2] != 2.0  # torch itself loads the damaged file
    output = tmp_path / "out"
    assert cli(["convert", "--checkpoint", str(checkpoint), "--sha256", published, "--output", str(output)]) == 2
    line = _one_error_line(capsys)
    actual = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert f"base_refcoco.pth: SHA-256 is {actual}, expected {published}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base_refcoco.pth"]  # nothing written, not even staging


def test_sha256_is_checked_per_checkpoint_and_recorded(tmp_path, capsys):
    checkpoint = tmp_path / "base_refcoco.pth"
    digest = _small_checkpoint(checkpoint)
    (plan,) = plan_checkpoints([checkpoint], sha256s=[digest.upper()])
    assert plan["sha256"] == digest
    for bad, message in (("abc", "--sha256 'abc' is not a SHA-256 digest; expected 64 hexadecimal characters"),
                         (None, "--sha256 was given 2 time(s) for 1 --checkpoint(s)")):
        extra = ["--sha256", bad] if bad else ["--sha256", digest, "--sha256", digest]
        assert cli(["convert", "--checkpoint", str(checkpoint), *extra, "--output", str(tmp_path / "o")]) == 2
        assert message in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, reason", [
    (b"", "is empty (0 bytes)"),
    (bytes(range(256)) * 16, "is not a readable PyTorch checkpoint of tensors (UnpicklingError)"),
    (b"PK\x03\x04" + b"\x00" * 100, "is not a readable PyTorch checkpoint of tensors"),
])
def test_empty_or_random_files_end_in_one_line_naming_the_file(tmp_path, capsys, content, reason):
    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_bytes(content)
    assert cli(["convert", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert f"weights.pth {reason}" in line and "weights_only=False" not in line
    with pytest.raises(ValueError) as error:  # the Python API: no chained torch message suggesting weights_only=False
        load_official_state_dict(checkpoint)
    assert error.value.__cause__ is None and (error.value.__context__ is None or error.value.__suppress_context__)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_a_config_that_is_not_json_ends_in_one_line_naming_it(tmp_path, capsys, layout):
    checkpoint = tmp_path / "weights.pth"
    _small_checkpoint(checkpoint)
    config = tmp_path / "config.json" if layout == "file" else tmp_path / "model"
    target = config if layout == "file" else config / "config.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text("{not json")
    assert cli(["convert", "--checkpoint", str(checkpoint), "--config", str(config), "--output", str(tmp_path / "o")]) == 2
    assert f"--config {str(config)!r} is not a readable DETRIS config" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()
