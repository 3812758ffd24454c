"""Evaluation with the official protocol: every expression is a sample, logits are post-processed back to the
original image (sigmoid, bicubic, inverse letterbox, > 0.35) on the model's device, and mIoU / oIoU / Pr@X are
computed from per-sample intersections and unions (`processing_detris.metrics`).

    detris eval --model DIR --dataset data/refcoco --splits val,testA,testB --output eval/
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from processing_detris import draw_referring_overlay
from processing_detris.metrics import PRECISION_NAMES, ReferringSegmentationMetric, intersection_and_union
from training.data import DetrisDataCollator, to_sentence_level
from training.data.collate import processor_image
from training.data.masks import decode_rle


def sentence_view(dataset, eval_sentences: str = "all", max_samples: int | None = None):
    """One row per evaluated expression: all of them (official test) or the first of each object (official
    validation during training)."""
    if "sentence" not in dataset.column_names:
        dataset = to_sentence_level(dataset)
        if eval_sentences == "first":
            dataset = dataset.filter(lambda index: index == 0, input_columns="sent_index")
    if max_samples is not None and len(dataset) > max_samples:
        dataset = dataset.select(range(max_samples))
    return dataset


def eval_loader(dataset, processor, batch_size: int, num_workers: int = 0) -> DataLoader:
    collator = DetrisDataCollator(processor, train=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator, num_workers=num_workers)


@torch.inference_mode()
def evaluate_model(model, loader, processor, accelerator=None, threshold: float | None = None, show_progress=False):
    """Returns (metrics dict, per-sample IoU tensor in dataset order). Works on one process or under
    `accelerate` (counts gathered with `gather_for_metrics`, so every sample counts exactly once)."""
    was_training = model.training
    model.eval()
    threshold = threshold if threshold is not None else getattr(model.config, "mask_threshold", 0.35)
    metric = ReferringSegmentationMetric()
    iterator = loader
    if show_progress:
        from tqdm.auto import tqdm

        disable = accelerator is not None and not accelerator.is_local_main_process
        iterator = tqdm(loader, desc="evaluating", leave=False, disable=disable)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    for batch in iterator:
        pixel_values = batch["pixel_values"].to(device, non_blocking=True)
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        logits = model(pixel_values=pixel_values, input_ids=input_ids).logits
        masks = processor.post_process_referring_segmentation(logits.float(), batch["original_sizes"], threshold=threshold)
        references = [gt.to(mask.device) for gt, mask in zip(batch["gt_masks"], masks)]
        intersections, unions = intersection_and_union(masks, references)
        if accelerator is not None:
            metric.gather_and_add(accelerator, intersections.to(device), unions.to(device))
        else:
            metric.add_counts(intersections, unions)
    if was_training:
        model.train()
    return metric.compute(), metric.per_sample_iou()


# ----- reports --------------------------------------------------------------------------------------------------
def markdown_table(results: dict[str, dict]) -> str:
    header = ["split", "samples", "mIoU", "oIoU", *PRECISION_NAMES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for split, m in results.items():
        cells = [split, str(int(m["num_samples"]))] + [f"{100 * m[k]:.2f}" for k in header[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nmIoU: mean over expressions of I/U; oIoU: sum of I over sum of U; Pr@X: share of " \
        "expressions with IoU > X %. Values in %.\n"


@torch.inference_mode()
def prediction_grid(model, processor, dataset, indices, ious, path, cell: int = 192, title: str = ""):
    """A PNG grid, 4 pictures per row, each `cell` pixels wide: the image with the prediction filled and outlined and
    the ground truth as a dashed outline, the expression and its IoU in full below (`draw_referring_overlay`)."""
    model.eval()
    device = next(model.parameters()).device
    rows = [dataset[int(i)] for i in indices]
    images = [processor_image(r["image"]) for r in rows]
    inputs = processor(images=images, text=[r["sentence"] for r in rows], return_tensors="pt")
    logits = model(pixel_values=inputs["pixel_values"].to(device), input_ids=inputs["input_ids"].to(device)).logits
    masks = processor.post_process_referring_segmentation(logits.float(), inputs["original_sizes"])
    tiles = [
        draw_referring_overlay(image, [mask], [f"{row['sentence']} (IoU {float(ious[int(index)]):.2f})"],
                               ground_truth=decode_rle(row["mask"]).astype(bool), width=cell)
        for image, row, mask, index in zip(images, rows, masks, indices)
    ]
    columns = min(4, len(tiles)) or 1
    row_heights = [max(t.height for t in tiles[k:k + columns]) for k in range(0, len(tiles), columns)]
    title_height = 20
    grid = Image.new("RGB", (columns * cell, title_height + sum(row_heights)), "white")
    ImageDraw.Draw(grid).text((4, 4), title, fill=(0, 0, 0))
    y = title_height
    for start, height in zip(range(0, len(tiles), columns), row_heights):
        for k, tile in enumerate(tiles[start:start + columns]):
            grid.paste(tile, (k * cell, y))
        y += height
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def load_eval_splits(dataset: str, splits: list[str], refshapes: dict | None = None):
    """The DatasetDict named by `dataset`: a `save_to_disk` folder, or `refshapes`."""
    if dataset == "refshapes":
        from training.data import RefShapesConfig, build_refshapes

        data = build_refshapes(RefShapesConfig(**(refshapes or {})))
    else:
        from datasets import load_from_disk

        data = load_from_disk(dataset)
    missing = [s for s in splits if s not in data]
    if missing:
        raise ValueError(f"splits {missing} are not in {dataset}; it has {list(data)}")
    return data


def run_evaluation(model, processor, data, splits, output_dir, batch_size=16, eval_sentences="all", grid_size=8,
                   max_samples=None, accelerator=None) -> dict:
    """Evaluate `splits` of `data`; write results.json, results.md and best/worst grids into `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for split in splits:
        view = sentence_view(data[split], eval_sentences, max_samples)
        loader = eval_loader(view, processor, batch_size)
        if accelerator is not None:
            loader = accelerator.prepare_data_loader(loader)
        metrics, ious = evaluate_model(model, loader, processor, accelerator=accelerator, show_progress=True)
        results[split] = metrics
        if (accelerator is None or accelerator.is_main_process) and grid_size > 0:
            order = torch.argsort(ious, descending=True).tolist()
            half = max(1, grid_size // 2)
            prediction_grid(model, processor, view, order[:half], ious, output_dir / f"{split}_best.png", title=f"{split}: best")
            prediction_grid(model, processor, view, order[-half:], ious, output_dir / f"{split}_worst.png", title=f"{split}: worst")
    if accelerator is None or accelerator.is_main_process:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        (output_dir / "results.md").write_text(markdown_table(results))
    return results


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detris eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved DETRIS folder (model + processor)")
    parser.add_argument("--dataset", required=True, help="a folder written by `detris data ...`, or 'refshapes'")
    parser.add_argument("--splits", default="val", help="comma-separated, e.g. val,testA,testB")
    parser.add_argument("--output", default=None, help="folder for results.json / results.md / grids (default: <model>/eval)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sentences", choices=["all", "first"], default="all", help="official test: all")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--grid", type=int, default=8,
                        help="N: <split>_best.png shows the N/2 best predictions, <split>_worst.png the N/2 worst "
                             "(0: no grids)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    return parser


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    from transformers import AutoModel, AutoProcessor

    import modeling_detris  # noqa: F401
    import processing_detris  # noqa: F401

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModel.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    data = load_eval_splits(args.dataset, splits)
    output = args.output or str(Path(args.model) / "eval")
    results = run_evaluation(model, processor, data, splits, output, args.batch_size, args.sentences, args.grid, args.max_samples)
    print(markdown_table(results))
    print(f"wrote {output}/results.json and results.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
