"""The official-checkpoint converter: key coverage, safety, variants, word_len."""

import torch
import pytest

from conftest import GOLDEN
from configuration_detris import DetrisConfig
from modeling_detris import DetrisForReferringSegmentation
from modeling_detris.convert_original import (
    convert_checkpoint,
    convert_state_dict,
    load_official_state_dict,
    resolve_word_len,
)
from original_weights import make_state_dict, read_keys
from training.cli import main as cli


def _meta_model(variant):
    with torch.device("meta"):
        return DetrisForReferringSegmentation(DetrisConfig.from_preset(variant))


def _zeros(keys):
    return {name: torch.zeros(shape, dtype=torch.int64 if dtype == "int64" else torch.float32) for name, shape, dtype in keys}


@pytest.mark.parametrize("variant, keys_file", [("base", "keys_base.tsv"), ("large", "keys_large.tsv")])
def test_every_official_key_is_used_and_every_weight_filled(variant, keys_file):
    model = _meta_model(variant)
    expected = model.state_dict()
    converted = convert_state_dict(_zeros(read_keys(GOLDEN / keys_file)), model.config, expected)
    assert set(converted) == set(expected)


def test_large_checkpoint_converts_and_runs(tmp_path):
    state = make_state_dict(read_keys(GOLDEN / "keys_large.tsv"), seed=0)
    path = tmp_path / "large_refcoco.pth"
    torch.save(state, path)  # a raw state dict, no "module." prefix
    del state
    model = convert_checkpoint(path, "large", word_len=17)
    assert model.config.vision_config.num_hidden_layers == 24
    pixel_values = torch.randn(1, 3, 448, 448)
    input_ids = torch.tensor([[49406, 320, 1929, 49407] + [0] * 13])
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, input_ids=input_ids).logits
    assert logits.shape == (1, 1, 128, 128) and torch.isfinite(logits).all()


def test_unused_and_missing_keys_are_listed():
    model = _meta_model("base")
    keys = read_keys(GOLDEN / "keys_base.tsv")
    state = _zeros(keys)
    state["neck.extra.weight"] = torch.zeros(3)
    del state["proj.txt.bias"]
    with pytest.raises(ValueError) as error:
        convert_state_dict(state, model.config, model.state_dict())
    assert "neck.extra.weight" in str(error.value) and "projector.txt.bias" in str(error.value)


def test_wrong_variant_is_refused_and_nothing_is_written(official_base_checkpoint, tmp_path, capsys):
    output = tmp_path / "out"
    assert cli(["convert", "--checkpoint", str(official_base_checkpoint), "--variant", "large", "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("detris convert: error: ") and "shape mismatch" in err[-1]
    assert not output.exists()


def test_output_that_holds_data_or_the_checkpoint_is_refused(official_base_checkpoint, tmp_path, capsys):
    """Never replace user data: a non-empty --output needs --overwrite, and an --output that is or contains the input
    checkpoint is refused even with it. One line on stderr, exit code 2, nothing touched."""
    import shutil

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    inside = tmp_path / "inside"
    inside.mkdir()
    checkpoint = inside / "base_refcoco.pth"
    shutil.copy(official_base_checkpoint, checkpoint)
    cases = [
        (["--output", str(occupied)], "is not empty; pass --overwrite"),
        (["--output", str(inside), "--overwrite"], "is or contains the input checkpoint"),
        (["--output", str(checkpoint), "--overwrite"], "is or contains the input checkpoint"),
        (["--output", str(inside), "--split-adapters", "--overwrite"], "is or contains the input checkpoint"),
    ]
    for extra, message in cases:
        assert cli(["convert", "--checkpoint", str(checkpoint), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("detris convert: error: ") and message in err[0], err
    assert (occupied / "notes.txt").read_text() == "mine" and checkpoint.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inside", "occupied"]


def test_checkpoint_forms(tmp_path):
    tensors = {"a.weight": torch.ones(2)}
    for obj in ({"state_dict": {"module.a.weight": torch.ones(2)}, "epoch": 3}, {"module.a.weight": torch.ones(2)}, tensors):
        torch.save(obj, tmp_path / "c.pth")
        assert list(load_official_state_dict(tmp_path / "c.pth")) == ["a.weight"]
    torch.save({"state_dict": {}, "note": "x"}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a DETRIS checkpoint"):
        load_official_state_dict(tmp_path / "bad.pth")


def test_pickled_code_is_not_executed(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint of tensors"):
        load_official_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def test_a_file_that_is_no_checkpoint_ends_in_one_line(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    assert cli(["convert", "--checkpoint", str(tmp_path / "notes.pth"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # a progress line, then the error in one line
    assert err[-1].startswith("detris convert: error: ") and "notes.pth is not a readable PyTorch checkpoint of tensors" in err[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "path, word_len, dataset, expected",
    [
        ("base_refcocog_u.pth", None, None, 22),
        ("base_refcocog_g.pth", None, None, 17),
        ("base_refcoco+.pth", None, None, 17),
        ("lagre_refcoco.pth", None, None, 17),
        ("weights.pth", None, "refcocog-umd", 22),
        ("weights.pth", None, "refcocog_u", 22),
        ("base_refcocog_u.pth", 17, None, 17),
        ("weights.pth", None, None, 17),
    ],
)
def test_word_len_resolution(path, word_len, dataset, expected):
    value, origin = resolve_word_len(path, word_len, dataset)
    assert value == expected and str(expected) in origin
