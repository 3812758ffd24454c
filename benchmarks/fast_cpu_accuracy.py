"""Accuracy of the fast CPU paths on a trained model: test mIoU / oIoU of `optimize_for_cpu`'s bf16 and int8 modes
against fp32, with the official protocol (`training.evaluation.evaluate_model`: every expression, post-processing to
the original image), and the per-sentence mask IoU of each fast path against the fp32 masks.

    make demo                                               # writes demo_output/model
    python -m benchmarks.fast_cpu_accuracy --model demo_output/model [--modes bf16,int8] [--json out.json]

The default data is the demo's RefShapes test split, regenerated from the demo recipe (the same seed, so the same
images and expressions the demo reported on).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def refshapes_test_split(recipe: str = "refshapes-demo"):
    from training.data import RefShapesConfig, build_refshapes
    from training.recipes import load_training_config

    cfg = load_training_config(recipe, [])
    return build_refshapes(RefShapesConfig(**cfg.refshapes))["test"]


def evaluate_modes(model_dir: str, dataset, modes: list[str], batch_size: int = 32) -> dict:
    """{mode: {"mIoU", "oIoU", ..., "mask_iou_vs_fp32_mean", "mask_iou_vs_fp32_min"}} for "fp32" and each mode."""
    from transformers import AutoModel, AutoProcessor

    import modeling_detris  # noqa: F401  (registers the Auto classes)
    import processing_detris  # noqa: F401
    from modeling_detris.quantization_detris import cpu_fast_path, cpu_isa, optimize_for_cpu
    from training.evaluation import eval_loader, evaluate_model, sentence_view

    processor = AutoProcessor.from_pretrained(model_dir)
    sentences = sentence_view(dataset, "all")
    loader = eval_loader(sentences, processor, batch_size)
    results, masks = {}, {}
    for mode in ["fp32", *modes]:
        model = optimize_for_cpu(AutoModel.from_pretrained(model_dir).eval(), mode)
        metrics, per_sample = evaluate_model(model, loader, processor)
        results[mode] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        masks[mode] = _predicted_masks(model, loader, processor)
    for mode in modes:
        ious = [_agreement(a, b) for a, b in zip(masks[mode], masks["fp32"])]
        results[mode]["mask_iou_vs_fp32_mean"] = sum(ious) / len(ious)
        results[mode]["mask_iou_vs_fp32_min"] = min(ious)
        results[mode]["mIoU_drop_points"] = 100 * (results["fp32"]["mIoU"] - results[mode]["mIoU"])
    return {"model": str(model_dir), "sentences": len(sentences), "auto_mode": cpu_fast_path(), "cpu_isa": cpu_isa(),
            "results": results}


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two predicted masks; two empty masks agree fully."""
    union = float((a | b).sum())
    return 1.0 if union == 0 else float((a & b).sum()) / union


@torch.inference_mode()
def _predicted_masks(model, loader, processor) -> list[torch.Tensor]:
    threshold = getattr(model.config, "mask_threshold", 0.35)
    out = []
    for batch in loader:
        logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"]).logits
        out += processor.post_process_referring_segmentation(logits.float(), batch["original_sizes"], threshold=threshold)
    return out


def markdown(report: dict) -> str:
    lines = [f"Fast CPU paths on {report['model']} ({report['sentences']} sentences; auto picks {report['auto_mode']} "
             f"on this CPU):", "", "| mode | mIoU | oIoU | mIoU drop (points) | mask IoU vs fp32 (mean / min) |",
             "|---|---|---|---|---|"]
    for mode, r in report["results"].items():
        drop = f"{r['mIoU_drop_points']:+.2f}" if "mIoU_drop_points" in r else "-"
        agree = (f"{r['mask_iou_vs_fp32_mean']:.4f} / {r['mask_iou_vs_fp32_min']:.4f}"
                 if "mask_iou_vs_fp32_mean" in r else "-")
        lines.append(f"| {mode} | {r['mIoU']:.4f} | {r['oIoU']:.4f} | {drop} | {agree} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fast_cpu_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved DETRIS folder (model + processor), e.g. demo_output/model")
    parser.add_argument("--modes", default="bf16,int8", help="fast paths to compare with fp32 (bf16,int8)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"bf16", "int8"} or not modes:
        print(f"fast_cpu_accuracy: --modes takes bf16 and/or int8, got {args.modes!r}", file=sys.stderr)
        return 2
    if not (Path(args.model) / "config.json").is_file():
        print(f"fast_cpu_accuracy: {args.model} is not a saved model folder (no config.json)", file=sys.stderr)
        return 2
    report = evaluate_modes(args.model, refshapes_test_split(), modes, args.batch_size)
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
