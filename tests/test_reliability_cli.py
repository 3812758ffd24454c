"""User mistakes at the `detris` commands end in one line on stderr naming the value and what was expected, exit code
2, nothing written; images over the pixel limit are refused from their header, before any pixel is decoded."""

import struct
import zlib

import pytest

from hub_helpers import save_tiny_model
from training.cli import main as cli


def _one_line(capsys, prefix):
    """The error: the last line on stderr, the only one starting with `prefix` (progress bars may come before)."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert [line for line in lines if line.startswith(prefix)] == lines[-1:], captured.err
    assert "Traceback" not in captured.err, captured.err
    return lines[-1]


def _header_only_png(path, width, height):
    """A PNG whose header announces width x height, with no pixel data at all."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("argv, message", [
    (["info", "huge"], "detris info: 'huge' is neither a preset (base, large, large-mixed) nor a model folder"),
    (["info", "/no/such/folder"], "detris info: '/no/such/folder' is neither a preset"),
    (["provenance", "--base", "/no/such/folder"], "detris provenance: --base '/no/such/folder' is not a model folder "
                                                  "(no config.json)"),
    (["demo", "--set", "epochs=-1"], "detris demo: epochs must be >= 1, got -1"),
    (["demo", "--set", "colour=red"], "detris demo: unknown training setting(s) ['colour']"),
    (["reproduce", "--official-dir", "/no/such/folder", "--refer-root", "/r", "--images-root", "/i"],
     "detris reproduce: --official-dir '/no/such/folder' is not a folder"),
])
def test_mistakes_at_info_provenance_demo_and_reproduce_end_in_one_line(tmp_path, capsys, argv, message):
    output = tmp_path / "demo"
    argv = argv + (["--output", str(output)] if argv[0] in ("demo", "reproduce") else [])
    assert cli(argv) == 2
    assert _one_line(capsys, message.split(":")[0]).startswith(message)
    assert not output.exists()


def test_predict_refuses_a_9000x9000_png_from_its_header(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    huge = _header_only_png(tmp_path / "huge.png", 9000, 9000)  # decoding it would fail as truncated, not as too big
    output = tmp_path / "out"
    assert cli(["predict", "--model", str(model_dir), "--image", str(huge), "--text", "the dog", "--output", str(output)]) == 2
    line = _one_line(capsys, "detris predict: ")
    assert "huge.png': The image has 9000 x 9000 = 81000000 pixels" in line and "max_image_pixels=67108864" in line
    assert not any(output.glob("*.png"))
