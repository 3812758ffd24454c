"""`--fast-cpu` on `detris predict` / `detris app` / `detris space`, and the generated Space running the fast CPU
path from its exported folder's own `quantization_detris.py` (our packages not importable there)."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hub_helpers import save_tiny_model, write_test_image
from space_helpers import clean_env, free_port, isolated_python

from hub_card import space_app
from hub_card.space import build_app, write_space
from modeling_detris.quantization_detris import cpu_fast_path
from training.cli import main as cli

MASK_IOU = 0.98  # the fast path's bar: masks agree with the fp32 masks at IoU >= 0.98
EXPRESSIONS = ["the red box", "the noise", "the corner"]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("fast_cpu")
    model = save_tiny_model(root / "model")
    image = write_test_image(root / "photo.png", width=83, height=61)
    return root, model, image


def _predict(tiny, output: Path, *flags) -> list:
    root, model, image = tiny
    argv = ["predict", "--model", str(model), "--image", str(image), "--output", str(output), *flags]
    for text in EXPRESSIONS:
        argv += ["--text", text]
    assert cli(argv) == 0
    records = json.loads((output / "predictions.json").read_text())
    return [np.asarray(Image.open(output / record["mask"])) > 127 for record in records]


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_predict_fast_cpu_masks_agree_with_fp32(tiny, tmp_path, mode):
    fp32 = _predict(tiny, tmp_path / "fp32")
    fast = _predict(tiny, tmp_path / mode, "--fast-cpu", mode)
    ious = [mask_iou(a, b) for a, b in zip(fast, fp32)]
    assert len(ious) == len(EXPRESSIONS) and min(ious) >= MASK_IOU, ious
    assert any(mask.any() for mask in fp32)  # a comparison of masks that are not all empty


def test_predict_fast_cpu_without_a_mode_is_auto(tiny, tmp_path, capsys):
    root, model, image = tiny
    argv = ["predict", "--model", str(model), "--image", str(image), "--output", str(tmp_path / "out"), "--text", "the box"]
    assert cli(argv + ["--fast-cpu"]) == 0
    assert f"fast CPU path: {cpu_fast_path()}\n" in capsys.readouterr().err
    assert cli(argv) == 0
    assert "fast CPU path" not in capsys.readouterr().err


def test_fast_cpu_refuses_an_unknown_mode(tiny, tmp_path, capsys):
    root, model, image = tiny
    assert cli(["predict", "--model", str(model), "--image", str(image), "--output", str(tmp_path / "p"),
                "--text", "the box", "--fast-cpu", "fp8"]) == 2
    assert capsys.readouterr().err.strip() == "detris predict: --fast-cpu 'fp8' is not one of ['auto', 'bf16', 'int8', 'fp32']"
    assert cli(["space", "--model", str(model), "--output", str(tmp_path / "s"), "--fast-cpu", "fp8"]) == 2
    assert "--fast-cpu 'fp8' is not one of" in capsys.readouterr().err
    assert cli(["app", "--model", str(model), "--fast-cpu", "fp8"]) == 2
    assert "--fast-cpu 'fp8' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() and not (tmp_path / "s").exists()


def test_app_fast_cpu_runs_the_fast_path(tiny, tmp_path):
    root, model, image = tiny
    pixels = np.asarray(Image.open(image).convert("RGB"))
    _, fp32 = build_app(str(model), log=lambda message: None)
    _, fast = build_app(str(model), log=lambda message: None, fast_cpu="bf16")
    assert fp32.cpu_mode == "fp32" and fast.cpu_mode == "bf16"
    assert next(fast.model.parameters()).dtype == torch.bfloat16 and fast.device_label == "cpu (bf16)"
    reference, _, _ = fp32.segment(pixels, EXPRESSIONS)
    masks, scores, _ = fast.segment(pixels, EXPRESSIONS)
    assert min(mask_iou(a, b) for a, b in zip(masks, reference)) >= MASK_IOU
    assert all(0.0 <= score <= 1.0 for score in scores)
    _, auto = build_app(str(model), log=lambda message: None, fast_cpu="auto")
    assert auto.cpu_mode == cpu_fast_path()


# The generated Space, run by a Python that cannot import our packages: its settings, its model folder's
# `optimize_for_cpu`, masks against fp32.
SPACE_SCRIPT = """
import json, os, sys
import numpy as np
from PIL import Image
import app

for name in ("configuration_detris", "modeling_detris", "processing_detris", "hub_card", "training"):
    assert name not in sys.modules, name
settings = app.load_settings()
fast = app.load_segmenter(settings)
off = app.load_segmenter({**settings, "fast_cpu": "fp32"})
pixels = np.asarray(Image.open(sys.argv[1]).convert("RGB"))
texts = ["the red box", "the noise", "the corner"]
masks_fast, _, _ = fast.segment(pixels, texts)
masks_off, _, _ = off.segment(pixels, texts)
os.environ["DETRIS_FAST_CPU"] = "fp32"
env_off = app.load_segmenter(app.load_settings())
ious = [float((a & b).sum() / max((a | b).sum(), 1)) if (a | b).any() else 1.0 for a, b in zip(masks_fast, masks_off)]
print(json.dumps({"fast": fast.cpu_mode, "off": off.cpu_mode, "env_off": env_off.cpu_mode, "dtype": str(next(fast.model.parameters()).dtype),
                  "optimizer": app.load_cpu_optimizer(app.resolve_model(settings["model"])).__module__,
                  "ious": ious}))
"""


def test_generated_space_uses_the_fast_path_on_cpu(tiny, tmp_path):
    root, model, image = tiny
    space = tmp_path / "space"
    write_space(str(model), space, scenes=0, photos=False, log=lambda message: None)
    assert json.loads((space / "space_config.json").read_text())["fast_cpu"] == "auto"
    assert (space / "model" / "quantization_detris.py").is_file()
    python = isolated_python(tmp_path / "venv")
    env = clean_env(tmp_path, free_port())
    result = subprocess.run([str(python), "-c", SPACE_SCRIPT, str(image)], cwd=space, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # on, unless turned off by the Space's setting (`detris space --fast-cpu fp32`) or its environment
    assert report["fast"] == cpu_fast_path() and report["off"] == "fp32" and report["env_off"] == "fp32"
    if report["fast"] == "bf16":
        assert report["dtype"] == "torch.bfloat16"
    assert report["optimizer"].startswith("transformers_modules.") and report["optimizer"].endswith("quantization_detris")
    assert min(report["ious"]) >= MASK_IOU, report["ious"]
