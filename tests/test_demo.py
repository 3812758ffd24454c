"""A shortened `make demo`: the same steps on a few scenes and one epoch (the full run is `make demo`)."""

import json
import re

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
