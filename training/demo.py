"""`make demo`: the main job, offline on a CPU, in minutes.

1. generates RefShapes (synthetic scenes whose expressions need the text: colour, kind, size, position, ordinals,
   relations; the test split holds colour/kind combinations never seen in training) and its text-blind baseline;
2. trains a small DETRIS with `accelerate` (the same model class and training loop as DETRIS-B/L; tiny randomly
   initialised frozen backbones because no pretrained weights can be downloaded here), reading the training split
   from a uint8 letterbox cache built first (every image decoded and letterboxed, every mask warped and every
   sentence tokenised once instead of once per epoch; the batches are bit-identical to the processor's);
3. evaluates it on the test split with the official protocol (every expression, post-processing to the original
   image, mIoU / oIoU / Pr@X);
4. saves the model in Hugging Face format (a full folder, and an adapter-only PEFT folder over the saved base),
   prediction overlays and a training-curve plot;
5. prints `RESULT test_mIoU=... test_oIoU=... baseline_mIoU=...`.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from training.evaluation import inference_mode


def plot_history(history: list[dict], path: Path, baseline: float):
    """Training curve (train loss is not per epoch here; the plot shows validation mIoU / oIoU per epoch)."""
    from PIL import Image, ImageDraw

    width, height, margin = 560, 320, 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((margin, 16, width - 16, height - margin), outline=(0, 0, 0))
    epochs = [h["epoch"] for h in history if "val/mIoU" in h]
    last = max(epochs) if epochs else 1

    def xy(epoch, value):
        x = margin + (width - 16 - margin) * (epoch / max(1, last))
        y = height - margin - (height - margin - 16) * value
        return x, y

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = xy(0, tick)
        draw.line((margin - 4, y, margin, y), fill=(0, 0, 0))
        draw.text((6, y - 6), f"{tick:.2f}", fill=(0, 0, 0))
    for key, colour in (("val/mIoU", (0, 110, 200)), ("val/oIoU", (230, 120, 20))):
        points = [xy(h["epoch"], h[key]) for h in history if key in h]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    _, y = xy(0, baseline)
    draw.line((margin, y, width - 16, y), fill=(150, 150, 150), width=1)
    draw.text((margin + 4, y - 12), f"text-blind baseline mIoU {baseline:.2f}", fill=(110, 110, 110))
    draw.text((margin, height - margin + 8), "epoch", fill=(0, 0, 0))
    draw.text((width - 220, 20), "validation mIoU", fill=(0, 110, 200))
    draw.text((width - 220, 34), "validation oIoU", fill=(230, 120, 20))
    image.save(path)


@inference_mode
def overlay_examples(model, processor, dataset, path: Path, images: int = 4):
    """Each test image with all its expressions predicted in one batch, each in its own colour with its ground truth
    dashed, and a legend (`draw_referring_overlay`), side by side."""
    from PIL import Image

    from processing_detris import draw_referring_overlay
    from training.data.collate import processor_image
    from training.data.masks import decode_rle

    by_image = {}
    for row in dataset:
        by_image.setdefault(row["image_id"], []).append(row)
        if len(by_image) > images:
            break
    tiles = []
    for rows in list(by_image.values())[:images]:
        texts = [row["sentences"][0] for row in rows]
        image = processor_image(rows[0]["image"])
        inputs = processor(images=image, text=texts, return_tensors="pt")
        logits = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"]).logits
        masks = processor.post_process_referring_segmentation(logits, inputs["original_sizes"])
        truths = [decode_rle(row["mask"]).astype(bool) for row in rows]
        tiles.append(draw_referring_overlay(image, masks, texts, ground_truth=truths, width=256))
    total = Image.new("RGB", (sum(t.width for t in tiles) + 8 * len(tiles), max(t.height for t in tiles)), "white")
    x = 0
    for tile in tiles:
        total.paste(tile, (x, 0))
        x += tile.width + 8
    total.save(path)


def build_train_cache(cfg, rows, folder: Path) -> Path:
    """The letterbox cache (`training.data.build_letterbox_cache`) of the training `rows` for the recipe `cfg`'s
    model, tokenised with its processor, in `folder`; training reads it through the recipe's `letterbox_cache`
    with the same batches, bit for bit, as the processor gives."""
    from configuration_detris import DetrisConfig
    from processing_detris import DetrisProcessor
    from training.data.cache import build_letterbox_cache

    processor = DetrisProcessor.from_model_config(DetrisConfig.from_preset(cfg.preset, **cfg.model_config))
    return Path(build_letterbox_cache(rows, str(folder), processor=processor, overwrite=True, progress=False))


def run_demo(output: Path, overrides: list[str]) -> dict:
    import modeling_detris  # noqa: F401
    import processing_detris  # noqa: F401
    from training.data import RefShapesConfig, build_refshapes, text_blind_baseline
    from training.evaluation import run_evaluation
    from training.recipes import load_training_config
    from training.train import train

    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    cfg = load_training_config("refshapes-demo", [f"output_dir={output / 'run'}", *overrides])
    print(f"[demo] generating RefShapes {cfg.refshapes} ...", file=sys.stderr)
    data = build_refshapes(RefShapesConfig(**cfg.refshapes), progress=True)
    baseline = text_blind_baseline(data["test"])
    baseline_miou = baseline[baseline["best"]]["mIoU"]
    print(f"[demo] text-blind baseline on test ({baseline['best']}): mIoU {baseline_miou:.3f}", file=sys.stderr)

    cache = None
    # (the cache is tokenised for the recipe's own architecture; a model loaded from a folder reads the rows instead)
    if not cfg.letterbox_cache and cfg.model_name_or_path is None and cfg.init_from is None:
        print("[demo] building the letterbox cache of the training split ...", file=sys.stderr)
        cache = build_train_cache(cfg, data[cfg.train_split], output / "train_cache")
        cfg.letterbox_cache = str(cache)
    try:
        summary = train(cfg, datasets=data)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)

    from transformers import AutoModel, AutoProcessor

    best_dir = output / "run" / ("best" if (output / "run" / "best").exists() else "final")
    model = AutoModel.from_pretrained(best_dir).eval()
    processor = AutoProcessor.from_pretrained(best_dir)
    results = run_evaluation(model, processor, data, ["test"], output / "eval", batch_size=32, eval_sentences="all")
    test = results["test"]

    model_dir = output / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    adapter_dir = save_adapter_folder(model, processor, output)
    overlay_examples(model, processor, data["test"], output / "overlays.png")
    plot_history(summary["history"], output / "training_curve.png", baseline_miou)
    report = {
        "test": test,
        "baseline": baseline,
        "history": summary["history"],
        "model_dir": str(model_dir),
        "adapter_dir": str(adapter_dir),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (output / "demo_report.json").write_text(json.dumps(report, indent=2))
    return report


def save_adapter_folder(model, processor, output: Path) -> Path:
    """The adapters + head alone as a PEFT adapter folder (`output/adapter`), over the adapter-free base saved in
    `output/base`: `AutoModel.from_pretrained(output/adapter)` rebuilds the trained model."""
    from modeling_detris.peft_detris import split_standalone_model

    peft_model = split_standalone_model(model, (output / "base").resolve())
    processor.save_pretrained(output / "base")
    peft_model.save_pretrained(output / "adapter")
    processor.save_pretrained(output / "adapter")
    return output / "adapter"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="detris demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo_output", help="folder for everything the demo writes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of training/recipes/refshapes-demo.yaml (e.g. epochs=2)")
    args = parser.parse_args(argv)
    from training.recipes import load_training_config

    try:  # a bad --set is a user mistake: one line, exit code 2, before anything is generated or written
        load_training_config("refshapes-demo", [f"output_dir={Path(args.output) / 'run'}", *args.set])
    except ValueError as error:
        print(f"detris demo: {error}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = run_demo(Path(args.output), args.set)
    test = report["test"]
    baseline = report["baseline"][report["baseline"]["best"]]["mIoU"]
    print(f"[demo] done in {report['seconds']} s; outputs in {args.output}/ (overlays.png, training_curve.png, eval/, model/)",
          file=sys.stderr)
    print(f"RESULT test_mIoU={test['mIoU']:.4f} test_oIoU={test['oIoU']:.4f} baseline_mIoU={baseline:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
