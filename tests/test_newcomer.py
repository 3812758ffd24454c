"""A newcomer's run of the README, scripted: in a fresh folder, with a tiny official-layout stand-in checkpoint, the
documented commands in order, each as its own `detris` process (`python -m training.cli`):

    convert -> info -> predict -> data -> train -> eval -> card -> export -> load the export without the package

Each step's exit code and the files it should write are checked; the last step loads the exported folder in an
interpreter that cannot import our packages and must give the trained model's logits exactly."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from official_standins import make_official_checkpoint, write_config

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")

LOAD_WITHOUT_PACKAGE = '''
import sys

site_packages, hub_dir, image_path, out_path, *texts = sys.argv[1:]
sys.path.append(site_packages)  # the installed libraries, without their .pth files (no editable install of ours)
for name in ("modeling_detris", "processing_detris", "configuration_detris", "hub_card", "training"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"our package {name} is importable; the check would prove nothing")
import torch
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained(hub_dir, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(hub_dir, trust_remote_code=True)
encoded = processor(images=image_path, text=texts, return_tensors="pt")
with torch.inference_mode():
    logits = model(pixel_values=encoded["pixel_values"], input_ids=encoded["input_ids"]).logits
torch.save({"logits": logits, "model_class": type(model).__module__}, out_path)
'''


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


def test_the_readme_commands_in_order_in_a_fresh_folder(tmp_path):
    work = tmp_path / "newcomer"
    work.mkdir()
    env = _env(HF_HOME=str(tmp_path / "hf_home"))

    def detris(*args, timeout=300):
        result = subprocess.run([sys.executable, "-m", "training.cli", *map(str, args)], cwd=work, env=env,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"detris {' '.join(map(str, args))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    # What a newcomer downloads: an official checkpoint (a tiny stand-in in the official layout) and a photo.
    checkpoint = make_official_checkpoint(work / "official" / "base_refcoco.pth", seed=5)
    config = write_config(work / "tiny.json")  # a non-preset architecture is converted with --config
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 64, 3), dtype=np.uint8)).save(work / "photo.png")

    # 1. convert
    result = detris("convert", "--checkpoint", checkpoint.relative_to(work), "--config", config.name,
                    "--output", "detris-tiny-refcoco")
    model_dir = work / "detris-tiny-refcoco"
    for name in ("config.json", "model.safetensors", "processor_config.json", "conversion.json"):
        assert (model_dir / name).is_file(), name
    assert "wrote detris-tiny-refcoco" in result.stderr and "Warning" not in result.stderr

    # 2. info
    result = detris("info", "detris-tiny-refcoco")
    assert "adapters" in result.stdout.lower() and any(ch.isdigit() for ch in result.stdout)

    # 3. predict
    detris("predict", "--model", "detris-tiny-refcoco", "--image", "photo.png", "--text", "the red circle",
           "--text", "the blue square", "--output", "predictions")
    written = sorted(p.name for p in (work / "predictions").iterdir())
    assert any(name.endswith(".png") for name in written) and len(written) >= 3, written

    # 4. data (RefShapes, small)
    detris("data", "refshapes", "--output", "data/refshapes", "--image-size", 64, "--n-train", 8,
           "--n-validation", 4, "--n-test", 4, "--seed", 3, "--no-progress")
    assert (work / "data" / "refshapes" / "dataset_dict.json").is_file()

    # 5. train: fine-tune the converted model on the new data (a tiny recipe, one short epoch)
    recipe = dict(dataset="data/refshapes", train_split="train", eval_split="validation", eval_sentences="all",
                  epochs=1, milestones=[1], total_batch_size=4, learning_rate=1e-3, log_with=None,
                  log_every_steps=1, output_dir="runs/tiny")
    (work / "my-data.yaml").write_text(yaml.safe_dump(recipe))
    detris("train", "--config", "my-data.yaml", "--init-from", "detris-tiny-refcoco")
    final = work / "runs" / "tiny" / "final"
    for name in ("config.json", "model.safetensors", "processor_config.json"):
        assert (final / name).is_file(), name
    assert (work / "runs" / "tiny" / "best" / "config.json").is_file()

    # 6. eval
    result = detris("eval", "--model", "runs/tiny/final", "--dataset", "data/refshapes", "--splits", "test",
                    "--grid", 2, "--output", "eval")
    results = json.loads((work / "eval" / "results.json").read_text())
    assert (work / "eval" / "results.md").is_file() and "mIoU" in result.stdout
    assert 0.0 <= results["test"]["mIoU"] <= 1.0, results
    assert any(p.suffix == ".png" for p in (work / "eval").iterdir())

    # 7. card (with the evaluation beside it, as the README shows)
    detris("card", "--model", "runs/tiny/final", "--eval-results", "eval/results.json", "--eval-dataset", "refshapes")
    card = (final / "README.md").read_text()
    assert card.startswith("---") and "mIoU" in card

    # 8. export
    detris("export", "--model", "runs/tiny/final", "--output", "hub/detris-tiny", "--repo-id", "my-org/detris-tiny",
           "--eval-results", "eval/results.json", "--eval-dataset", "refshapes")
    hub = work / "hub" / "detris-tiny"
    for name in ("config.json", "model.safetensors", "README.md", "modeling_detris.py", "processing_detris.py"):
        assert (hub / name).is_file(), name

    # 9. load the export where our packages cannot be imported: the trained model's logits, exactly
    texts = ["the red circle", "the blue square"]
    (tmp_path / "load.py").write_text(LOAD_WITHOUT_PACKAGE)
    isolated = _env(HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    isolated.pop("PYTHONPATH")
    run = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "load.py"), sysconfig.get_paths()["purelib"],
                          str(hub), str(work / "photo.png"), str(tmp_path / "out.pt"), *texts],
                         cwd=tmp_path, env=isolated, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["model_class"].startswith("transformers_modules.")

    from modeling_detris import DetrisForReferringSegmentation
    from processing_detris import DetrisProcessor

    model = DetrisForReferringSegmentation.from_pretrained(str(final)).eval()
    encoded = DetrisProcessor.from_pretrained(str(final))(images=str(work / "photo.png"), text=texts, return_tensors="pt")
    with torch.inference_mode():
        expected = model(pixel_values=encoded["pixel_values"], input_ids=encoded["input_ids"]).logits
    assert torch.equal(remote["logits"], expected), (remote["logits"] - expected).abs().max()
