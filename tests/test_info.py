"""`detris info` counts parameters from the module tree; they must equal the official
DETRIS figures below."""

import json

import pytest

from training.cli import main as cli

OFFICIAL = {
    "base": dict(adapters=2_715_696, frozen_backbone=150_011_649, trainable=25_518_129, total=175_529_778, percent="1.81"),
    "large": dict(adapters=3_110_448, frozen_backbone=367_800_833, trainable=26_306_097, total=394_106_930, percent="0.85"),
    "large-mixed": dict(adapters=33_331_360, frozen_backbone=367_800_833, trainable=56_527_009, total=424_327_842, percent="9.06"),
}


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_info_prints_official_figures(preset, capsys):
    assert cli(["info", preset]) == 0
    text = capsys.readouterr().out
    official = OFFICIAL[preset]
    assert f"adapters: {official['adapters']:,d} = {official['percent']} % of the frozen backbone ({official['frozen_backbone']:,d})" in text
    assert cli(["info", preset, "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    for key in ("adapters", "frozen_backbone", "trainable", "total"):
        assert counts[key] == official[key], key


def test_info_on_a_saved_model(converted_base_dir, capsys):
    assert cli(["info", str(converted_base_dir), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["adapters"] == OFFICIAL["base"]["adapters"] and counts["trainable"] == OFFICIAL["base"]["trainable"]
