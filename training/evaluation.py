"""Evaluation with the official protocol: every expression is a sample, logits are post-processed back to the
original image (sigmoid, bicubic, inverse letterbox, > 0.35) on the model's device, and mIoU / oIoU / Pr@X are
computed from per-sample intersections and unions (`processing_detris.metrics`).

    detris eval --model DIR --dataset data/refcoco --splits val,testA,testB --output eval/
"""

import argparse
import functools
import json
import sys
from pathlib import Path

# Heavy imports (torch, PIL, the processor) happen inside the functions, so `detris eval --help` is instant.


def inference_mode(function):
    """`torch.inference_mode()` as a decorator that imports torch only when the function runs."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return function(*args, **kwargs)

    return run


def sentence_view(dataset, eval_sentences: str = "all", max_samples: int | None = None):
    """One row per evaluated expression: all of them (official test) or the first of each object (official
    validation during training)."""
    from training.data.schema import to_sentence_level

    if "sentence" not in dataset.column_names:
        dataset = to_sentence_level(dataset)
        if eval_sentences == "first":
            dataset = dataset.filter(lambda index: index == 0, input_columns="sent_index")
    if max_samples is not None and len(dataset) > max_samples:
        dataset = dataset.select(range(max_samples))
    return dataset


def eval_loader(dataset, processor, batch_size: int, num_workers: int = 0):
    from torch.utils.data import DataLoader

    from training.data.collate import DetrisDataCollator

    collator = DetrisDataCollator(processor, train=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator, num_workers=num_workers)


@inference_mode
def evaluate_model(model, loader, processor, accelerator=None, threshold: float | None = None, show_progress=False):
    """Returns (metrics dict, per-sample IoU tensor in dataset order). Works on one process or under
    `accelerate` (counts gathered with `gather_for_metrics`, so every sample counts exactly once)."""
    from processing_detris.metrics import ReferringSegmentationMetric, intersection_and_union

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
    from processing_detris.metrics import PRECISION_NAMES

    header = ["split", "samples", "mIoU", "oIoU", *PRECISION_NAMES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for split, m in results.items():
        cells = [split, str(int(m["num_samples"]))] + [f"{100 * m[k]:.2f}" for k in header[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nmIoU: mean over expressions of I/U; oIoU: sum of I over sum of U; Pr@X: share of " \
        "expressions with IoU > X %. Values in %.\n"


@inference_mode
def prediction_grid(model, processor, dataset, indices, ious, path, cell: int = 192, title: str = ""):
    """A PNG grid, 4 pictures per row, each `cell` pixels wide: the image with the prediction filled and outlined and
    the ground truth as a dashed outline, the expression and its IoU in full below (`draw_referring_overlay`)."""
    from PIL import Image, ImageDraw

    from processing_detris import draw_referring_overlay
    from training.data.collate import processor_image
    from training.data.masks import decode_rle

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


EVALUATION_SPLIT_NAMES = ("val", "validation")  # a dataset's own evaluation split: refer files / RefShapes


class EvaluationSetupError(ValueError):
    """A user mistake in `detris eval` (missing dataset, split or model)."""


def default_eval_split(data) -> str:
    """The dataset's own evaluation split (`val` for the refer datasets, `validation` for RefShapes)."""
    for name in EVALUATION_SPLIT_NAMES:
        if name in data:
            return name
    raise EvaluationSetupError(f"the dataset has no evaluation split {list(EVALUATION_SPLIT_NAMES)}; it has "
                               f"{list(data)}: choose with --splits")


def load_eval_splits(dataset: str, splits: list[str] | None, refshapes: dict | None = None):
    """(the DatasetDict named by `dataset`: a `save_to_disk` folder, or `refshapes`; the splits to evaluate, by
    default the dataset's own evaluation split)."""
    if dataset == "refshapes":
        from training.data.refshapes import RefShapesConfig, build_refshapes

        data = build_refshapes(RefShapesConfig(**(refshapes or {})), progress=True)
    else:
        if not (Path(dataset) / "dataset_dict.json").is_file():
            raise EvaluationSetupError(f"--dataset {dataset!r} is not a dataset folder (no dataset_dict.json); expected a "
                                       "folder written by `detris data ...` (docs/data.md), or 'refshapes'")
        from datasets import load_from_disk

        data = load_from_disk(dataset)
    splits = splits or [default_eval_split(data)]
    missing = [s for s in splits if s not in data]
    if missing:
        raise EvaluationSetupError(f"splits {missing} are not in {dataset}; it has {list(data)}")
    return data, splits


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
            import torch

            order = torch.argsort(ious, descending=True).tolist()
            half = max(1, grid_size // 2)
            prediction_grid(model, processor, view, order[:half], ious, output_dir / f"{split}_best.png", title=f"{split}: best")
            prediction_grid(model, processor, view, order[-half:], ious, output_dir / f"{split}_worst.png", title=f"{split}: worst")
    if accelerator is None or accelerator.is_main_process:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        (output_dir / "results.md").write_text(markdown_table(results))
    return results


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detris eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate a saved DETRIS with the official protocol (every expression, masks at the original image "
                    "size): mIoU / oIoU / Pr@X tables (results.json in fractions, results.md in percent) and grids of "
                    "the best and worst predictions.")
    parser.add_argument("--model", required=True,
                        help="a saved DETRIS folder (model + processor), or a PEFT adapter folder with its processor")
    parser.add_argument("--dataset", required=True, help="a folder written by `detris data ...`, or 'refshapes'")
    parser.add_argument("--splits", default=None,
                        help="comma-separated, e.g. val,testA,testB (default: the dataset's evaluation split, val or validation)")
    parser.add_argument("--output", default=None, help="folder for results.json / results.md / grids (default: <model>/eval)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sentences", choices=["all", "first"], default="all",
                        help="all: every expression (official test); first: the first of each object (official validation)")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate at most this many expressions per split")
    parser.add_argument("--grid", type=int, default=8,
                        help="N: <split>_best.png shows the N/2 best predictions, <split>_worst.png the N/2 worst "
                             "(0: no grids)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    return parser


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    for name in ("batch_size", "grid", "max_samples"):
        value = getattr(args, name)
        if value is not None and value < (1 if name != "grid" else 0):
            print(f"detris eval: --{name.replace('_', '-')} must be >= {1 if name != 'grid' else 0}, got {value}", file=sys.stderr)
            return 2
    if not any((Path(args.model) / name).is_file() for name in ("config.json", "adapter_config.json")):
        print(f"detris eval: --model {args.model!r} is not a saved model folder (no config.json); expected a folder "
              "written by `detris train` (final/ or best/), `detris convert` or save_pretrained, or an adapter folder "
              "(adapter_config.json)", file=sys.stderr)
        return 2
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    try:
        data, splits = load_eval_splits(args.dataset, splits)
    except EvaluationSetupError as error:
        print(f"detris eval: {error}", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoProcessor

    import processing_detris  # noqa: F401
    from modeling_detris import DetrisForReferringSegmentation

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:  # an adapter folder is loaded over its base (a release's relative ../base found beside it)
        model = DetrisForReferringSegmentation.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    except OSError as error:
        print(f"detris eval: {error}", file=sys.stderr)
        return 2
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    output = args.output or str(Path(args.model) / "eval")
    results = run_evaluation(model, processor, data, splits, output, args.batch_size, args.sentences, args.grid, args.max_samples)
    print(markdown_table(results))
    print(f"wrote {output}/results.json and results.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
