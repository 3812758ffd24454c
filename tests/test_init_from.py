"""`detris train --init-from`: training continues from converted official weights (a whole model folder, or a PEFT
adapter folder over its base), and an interrupted run resumes to exactly the weights of an uninterrupted one."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModel

import training.train as train_module
from official_standins import make_official_checkpoint, write_config
from training import checkpointing
from training.cli import main as cli
from training.train import build_model, load_datasets, train
from training_helpers import TINY_RECIPE, tiny_recipe
from modeling_detris.peft_detris import is_adapter_key

pytestmark = pytest.mark.usefixtures("one_thread")

NO_ARCHITECTURE = dict(vision_adapter_attention_dropout=0.1, decoder_dropout=0.1)  # only these may be set


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A stand-in official RefCOCO checkpoint, converted whole and split into base + adapter."""
    root = tmp_path_factory.mktemp("init-from")
    checkpoint = make_official_checkpoint(root / "official" / "base_refcoco.pth", seed=4)
    config = write_config(root / "tiny.json")
    assert cli(["convert", "--checkpoint", str(checkpoint), "--config", str(config), "--output", str(root / "whole")]) == 0
    assert cli(["convert", "--checkpoint", str(checkpoint), "--config", str(config), "--split-adapters",
                "--output", str(root / "release")]) == 0
    return root


@pytest.fixture(scope="module")
def tiny_data():
    return load_datasets(tiny_recipe("unused"))


def _recipe(output_dir, init_from, **overrides):
    settings = dict(init_from=str(init_from), model_config=dict(NO_ARCHITECTURE), epochs=2, milestones=[1],
                    checkpoint_every_steps=2, keep_checkpoints=50)
    settings.update(overrides)
    return tiny_recipe(output_dir, **settings)


@torch.no_grad()
def _logits(model, word_len):
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 56, 56, generator=generator)
    input_ids = torch.zeros(2, word_len, dtype=torch.long)
    input_ids[:, 0], input_ids[:, 1:4], input_ids[:, 4] = 49406, torch.tensor([320, 1929, 530]), 49407
    return model.eval()(pixel_values=pixel_values, input_ids=input_ids).logits


def test_init_from_starts_exactly_from_the_converted_weights(converted, tmp_path):
    reference = AutoModel.from_pretrained(str(converted / "whole"))
    expected = _logits(reference, 17)
    for source in (converted / "whole", converted / "release" / "refcoco"):
        model = build_model(_recipe(tmp_path, source))
        assert model.config.adapters_in_model and model.config.word_len == 17
        assert torch.equal(_logits(model, 17), expected), source
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in reference.named_parameters() if p.requires_grad}
        assert all(is_adapter_key(n) or n.startswith(("neck.", "decoder.", "projector.")) for n in trainable)


def test_init_from_errors_name_the_value(converted, tmp_path):
    with pytest.raises(ValueError, match=r"model_config may only set .*got \['word_len'\]"):
        build_model(_recipe(tmp_path, converted / "whole", model_config=dict(word_len=22)))
    with pytest.raises(ValueError, match="neither a DETRIS model folder"):
        build_model(_recipe(tmp_path, tmp_path))
    with pytest.raises(ValueError, match="is a whole model folder; model_name_or_path="):
        build_model(_recipe(tmp_path, converted / "whole", model_name_or_path=str(converted / "release" / "base")))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = json.loads((converted / "release" / "refcoco" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path=None)))
    with pytest.raises(ValueError, match="names no base model"):
        build_model(_recipe(tmp_path, adapter))


def test_fine_tuning_an_official_adapter_resumes_exactly(converted, tiny_data, tmp_path, monkeypatch):
    adapter = converted / "release" / "refcoco"
    # The uninterrupted run, through the CLI flag.
    recipe = tmp_path / "a.yaml"
    recipe.write_text(yaml.safe_dump(dict(TINY_RECIPE, output_dir=str(tmp_path / "a"), model_config=dict(NO_ARCHITECTURE),
                                          epochs=2, milestones=[1], checkpoint_every_steps=2, keep_checkpoints=50)))
    assert train_module.main(["--config", str(recipe), "--init-from", str(adapter)]) == 0
    assert json.loads((tmp_path / "a" / "training_config.json").read_text())["init_from"] == str(adapter)

    # The same run, stopped dead on its 6th training step (a checkpoint was written at step 4), then started again.
    original = train_module.build_model

    def killed_model(cfg):
        model = original(cfg)
        steps = {"n": 0}

        def die(module, args):
            if module.training:
                steps["n"] += 1
                if steps["n"] == 6:
                    raise KeyboardInterrupt("simulated kill")

        model.register_forward_pre_hook(die)
        return model

    cfg = _recipe(tmp_path / "b", adapter)
    monkeypatch.setattr(train_module, "build_model", killed_model)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, datasets=tiny_data)
    monkeypatch.setattr(train_module, "build_model", original)
    killed_at = checkpointing.latest_checkpoint(tmp_path / "b")
    assert json.loads((killed_at / "progress.json").read_text())["global_step"] == 4
    assert not (tmp_path / "b" / "final").exists()
    train(cfg, datasets=tiny_data)

    expected = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    actual = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    # Training moved the adapters and the head away from the official weights, and left the backbones alone.
    start = AutoModel.from_pretrained(str(converted / "whole")).state_dict()
    final = AutoModel.from_pretrained(str(tmp_path / "b" / "final")).state_dict()
    assert final.keys() == start.keys()
    moved = [k for k in final if is_adapter_key(k) and k.endswith("weight") and not torch.equal(final[k], start[k])]
    assert moved and any(k.startswith("projector.") and not torch.equal(final[k], start[k]) for k in final)
    frozen = [k for k in final if k.startswith(("vision_model.", "text_model.")) and not is_adapter_key(k)]
    assert frozen and all(torch.equal(final[k], start[k]) for k in frozen)
