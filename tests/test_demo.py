"""A shortened `make demo`: the same steps on a few scenes and one epoch (the full run is `make demo`)."""

import json
import re
from pathlib import Path

import torch
from transformers import AutoModel

from training.demo import main


def test_short_demo_writes_everything_and_prints_the_result_line(tmp_path, capsys):
    output = tmp_path / "demo"
    overrides = ["epochs=1", "milestones=[1]", "refshapes.n_train=24", "refshapes.n_validation=4",
                 "refshapes.n_test=6", "max_eval_samples=8", "log_with=null"]
    assert main(["--output", str(output)] + sum((["--set", o] for o in overrides), [])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"RESULT test_mIoU=([0-9.]+) test_oIoU=([0-9.]+) baseline_mIoU=([0-9.]+)", lines[-1])
    assert match, lines[-1]
    report = json.loads((output / "demo_report.json").read_text())
    # trained from the letterbox cache of the training split, removed afterwards
    settings = json.loads((output / "run" / "training_config.json").read_text())
    assert settings["letterbox_cache"] == str((output / "train_cache").resolve()) and not (output / "train_cache").exists()
    assert float(match.group(1)) == round(report["test"]["mIoU"], 4) or abs(float(match.group(1)) - report["test"]["mIoU"]) < 1e-4
    for name in ("overlays.png", "training_curve.png", "eval/results.md", "eval/results.json", "model/model.safetensors",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "base/model.safetensors"):
        assert (output / name).exists(), name

    # the adapter-only folder over the saved base rebuilds exactly the saved full model
    full = AutoModel.from_pretrained(output / "model").eval()
    from_adapter = AutoModel.from_pretrained(output / "adapter").eval()
    size = full.config.input_size
    pixel_values = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([[49406, 736, 2760, 49407] + [0] * (full.config.word_len - 4)] * 2)
    with torch.no_grad():
        expected = full(pixel_values=pixel_values, input_ids=input_ids).logits
        actual = from_adapter(pixel_values=pixel_values, input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected)
    assert (output / "adapter" / "adapter_model.safetensors").stat().st_size < (output / "model" / "model.safetensors").stat().st_size


def test_the_demo_learns_the_same_weights_from_its_cache_and_channels_last(tmp_path, one_thread):
    """The demo trains from a uint8 letterbox cache of the training split (decoding, letterbox, mask warp and
    tokenisation once, not every epoch) with channels-last convolutions: over two epochs (new sentences drawn in the
    second), the weights equal, bit for bit, those of the same recipe reading the rows through the processor with
    contiguous convolutions."""
    from safetensors.torch import load_file

    from training.data import RefShapesConfig, build_refshapes
    from training.demo import build_train_cache
    from training.recipes import load_training_config
    from training.train import train

    overrides = ["epochs=2", "milestones=[1]", "eval_split=null", "log_with=null", "refshapes.n_train=12",
                 "refshapes.n_validation=2", "refshapes.n_test=2"]
    base = load_training_config("refshapes-demo", overrides + [f"output_dir={tmp_path / 'plain'}", "channels_last=false"])
    data = build_refshapes(RefShapesConfig(**base.refshapes))
    assert any(len(row["sentences"]) > 1 for row in data["train"])  # the sentence drawn per epoch matters
    cache = build_train_cache(base, data["train"], tmp_path / "cache")
    cached = load_training_config("refshapes-demo", overrides + [f"output_dir={tmp_path / 'cached'}",
                                                                 f"letterbox_cache={cache}"])
    assert cached.channels_last and not base.channels_last
    finals = []
    for cfg in (base, cached):
        train(cfg, datasets=data)
        finals.append(load_file(str(tmp_path / Path(cfg.output_dir).name / "final" / "model.safetensors")))
    assert len(data["train"]) // 8 >= 2  # at least two steps per epoch
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        torch.testing.assert_close(finals[1][key], finals[0][key], rtol=0, atol=0, msg=key)
    # transformers.Trainer reads the same recipe setting
    from training.hf_trainer import build_trainer, trainer_arguments

    trainer = build_trainer(cached, trainer_arguments(cached, use_cpu=True), datasets=data)
    convolutions = [p for p in trainer.model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
