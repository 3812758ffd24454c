"""`detris reproduce`: the DETRIS paper's table, measured with this code from the official checkpoints.

    detris reproduce --official-dir DETRIS/ --refer-root refer/ --images-root coco/train2014 --output reproduction/

1. finds the official checkpoints under `--official-dir` (`base_refcoco.pth`, `base_refcocog_u.pth`, `lagre_*.pth`,
   `mix*.pth`, ...: variant and dataset are read from the file names, as the converter does);
2. prepares each dataset they need from the refer files (`detris data refer`): RefCOCO and RefCOCO+ (unc),
   G-Ref umd and google; the mixed DETRIS-L* is evaluated on RefCOCO, RefCOCO+ and G-Ref umd;
3. converts every checkpoint (`detris convert`, with its dataset's text length);
4. evaluates every split with the official protocol (`detris eval`: every expression, masks at the original image
   size, threshold 0.35);
5. writes `reproduction.md` and `reproduction.json`: for mIoU and for oIoU, our numbers beside the authors'
   (`configuration_detris.release`), the difference per cell and a pass mark when it is within ±0.3 points.

Every step keeps its output (`data/`, `models/`, `eval/`), so a run that stops resumes where it was; `--overwrite`
redoes everything. docs/reproduce.md has the recipe and what to expect.
"""

import argparse
import gc
import json
import math
import sys
from pathlib import Path

from configuration_detris.release import (
    EVALUATION_SPLITS,
    MIXED_DATASETS,
    REFER_SOURCE,
    REPORTED_COLUMNS,
    REPORTED_SPLITS,
    VARIANT_NAMES,
    dataset_from_checkpoint_name,
    reported_cells,
    reported_value,
    variant_from_checkpoint_name,
)

# dataset key -> (refer dataset, split_by, the splits the paper evaluates)
EVAL_SETS = {dataset: (*REFER_SOURCE[dataset], splits) for dataset, splits in EVALUATION_SPLITS.items()}
TOLERANCE = 0.3  # points of percent
METRICS = ("mIoU", "oIoU")
PASS, FAIL = "✓", "✗"


def slug(dataset: str) -> str:
    return dataset.replace("+", "-plus")


def find_checkpoints(official_dir, log=print) -> list[dict]:
    """The official checkpoints under `official_dir` (recursively), each with its variant, dataset and the datasets it
    is evaluated on. Files whose name tells neither are skipped with a message."""
    official_dir = Path(official_dir)
    if not official_dir.is_dir():
        raise ValueError(f"--official-dir {str(official_dir)!r} is not a folder; expected the folder of the official .pth files")
    found = []
    for path in sorted(official_dir.rglob("*.pth")):
        variant, dataset = variant_from_checkpoint_name(path), dataset_from_checkpoint_name(path)
        if variant == "large-mixed":
            dataset = "mixed"
        if variant is None or dataset is None:
            log(f"skipping {path}: its name tells no {'variant (base_*, large_* / lagre_*, mix*)' if variant is None else 'dataset'}")
            continue
        evaluated = MIXED_DATASETS if dataset == "mixed" else (dataset,)
        found.append({"path": path, "variant": variant, "dataset": dataset, "evaluated_on": evaluated,
                      "name": f"{variant}-{slug(dataset)}"})
    names = [c["name"] for c in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several checkpoints under {official_dir} are {duplicates}; expected one file per variant and dataset")
    if not found:
        raise ValueError(f"no official DETRIS checkpoint (*.pth named like base_refcoco.pth) under {official_dir}")
    return found


# ----- the steps --------------------------------------------------------------------------------------------------
def prepare_dataset(dataset: str, refer_root, images_root, output: Path, overwrite=False, progress=True, log=print):
    """The evaluation splits of `dataset` from the refer files, saved once under `output` (`save_to_disk`)."""
    from datasets import load_from_disk

    from training.data import build_refer_dataset
    from training.data.rows import save_atomic

    if output.is_dir() and not overwrite:
        return load_from_disk(str(output))
    refer_name, split_by, _ = EVAL_SETS[dataset]
    log(f"preparing {dataset} ({refer_name}, {split_by}) from {refer_root}")
    data = build_refer_dataset(str(refer_root), str(images_root), refer_name, split_by, progress=progress)
    save_atomic(data, str(output), overwrite=True)
    return load_from_disk(str(output))


def convert(checkpoint: dict, output: Path, config=None, overwrite=False, log=print) -> Path:
    """`detris convert` of one official checkpoint into `output` (kept when already converted from the same file)."""
    from modeling_detris.convert_original import CONVERSION_FILE, convert_whole
    from processing_detris.processing_detris import save_processor

    record = output / CONVERSION_FILE
    if record.is_file() and not overwrite:
        done = json.loads(record.read_text())
        if done.get("file") == checkpoint["path"].name and done.get("bytes") == checkpoint["path"].stat().st_size:
            return output
    dataset = None if checkpoint["dataset"] == "mixed" else checkpoint["dataset"]
    return convert_whole(checkpoint["path"], output, checkpoint["variant"], config, dataset=dataset,
                         save_extras=lambda folder, model_config: save_processor(str(folder), config=model_config), log=log,
                         overwrite=True)  # reached only to (re)convert this run's own folder


def evaluate(model_dir: Path, data, splits, output: Path, device: str, dtype: str, batch_size: int,
             max_samples=None, grid: int = 0, overwrite=False) -> dict:
    """`detris eval` of `splits` (every expression); results kept in `output/results.json`."""
    import torch
    from transformers import AutoModel, AutoProcessor

    import modeling_detris  # noqa: F401
    import processing_detris  # noqa: F401
    from training.evaluation import run_evaluation

    results_file = output / "results.json"
    if results_file.is_file() and not overwrite:
        results = json.loads(results_file.read_text())
        if all(split in results for split in splits):
            return results
    model = AutoModel.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    try:
        return run_evaluation(model, processor, data, list(splits), output, batch_size=batch_size,
                              eval_sentences="all", grid_size=grid, max_samples=max_samples)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----- the table --------------------------------------------------------------------------------------------------
def compare(measured: dict, tolerance: float = TOLERANCE) -> list[dict]:
    """One cell per (variant, dataset, split, metric) the authors report for the variants in `measured`
    (`{variant: {dataset: {split: metrics as fractions}}}`): paper, ours (percent), difference and pass mark.
    A cell we did not measure has `ours` None and no pass mark."""
    cells = []
    for variant in sorted(measured, key=list(VARIANT_NAMES).index):
        for metric in METRICS:
            for dataset, split in reported_cells(variant):
                paper = reported_value(variant, metric, dataset, split)
                result = measured[variant].get(dataset, {}).get(split)
                ours = 100.0 * result[metric] if result is not None else None
                diff = ours - paper if ours is not None else None
                cells.append({
                    "variant": variant, "dataset": dataset, "split": split, "metric": metric, "paper": paper,
                    "ours": ours, "diff": diff,
                    "pass": None if diff is None else bool(abs(diff) <= tolerance + 1e-9),
                    "num_samples": int(result["num_samples"]) if result is not None else None,
                })
    return cells


def _number(value, signed=False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def markdown_tables(cells: list[dict], tolerance: float = TOLERANCE) -> str:
    """For each metric, the paper's layout (one column per split, plus the average over the cells measured): per
    variant the authors' row, ours, and the difference with its pass mark."""
    blocks = []
    for metric in METRICS:
        header = "| model | " + " | ".join(REPORTED_SPLITS) + " | Avg |"
        lines = [f"### {metric}", "", header, "|---|" + "---:|" * (len(REPORTED_SPLITS) + 1)]
        for variant in dict.fromkeys(c["variant"] for c in cells):
            row = {(c["dataset"], c["split"]): c for c in cells if c["variant"] == variant and c["metric"] == metric}
            both = [c for c in row.values() if c["ours"] is not None]
            paper_avg = sum(c["paper"] for c in both) / len(both) if both else None
            ours_avg = sum(c["ours"] for c in both) / len(both) if both else None
            name = VARIANT_NAMES[variant]

            def cell(column, key, signed=False):
                c = row.get(column)
                if c is None:
                    return "–"
                text = _number(c[key], signed)
                if key == "diff" and c["pass"] is not None:
                    text += " " + (PASS if c["pass"] else FAIL)
                return text

            lines.append(f"| {name}, paper | " + " | ".join(cell(col, "paper") for col in REPORTED_COLUMNS)
                         + f" | {_number(paper_avg)} |")
            lines.append(f"| {name}, ours | " + " | ".join(cell(col, "ours") for col in REPORTED_COLUMNS)
                         + f" | {_number(ours_avg)} |")
            avg_diff = None if ours_avg is None else ours_avg - paper_avg
            lines.append(f"| {name}, Δ | " + " | ".join(cell(col, "diff", True) for col in REPORTED_COLUMNS)
                         + f" | {_number(avg_diff, True)} |")
        blocks.append("\n".join(lines))
    measured = [c for c in cells if c["pass"] is not None]
    passed = sum(c["pass"] for c in measured)
    return (
        "# DETRIS: the paper's numbers and ours\n\n"
        f"Percent. \"paper\": reported by the authors (official README; the paper's Table 1 reports mIoU), rounded to "
        f"0.1. \"ours\": `detris eval` of the converted official checkpoint (every expression, masks at the original "
        f"image size, threshold 0.35). Δ = ours − paper; {PASS} when |Δ| ≤ {tolerance:g}, {FAIL} otherwise. Avg: over "
        f"the cells measured.\n\n**{passed} of {len(measured)} measured cells within ±{tolerance:g} points.**\n\n"
        + "\n\n".join(blocks) + "\n"
    )


# ----- the command ------------------------------------------------------------------------------------------------
def reproduce(official_dir, refer_root, images_root, output, device=None, dtype="float32", batch_size=16,
              max_samples=None, grid=0, config=None, overwrite=False, tolerance=TOLERANCE, progress=True, log=print) -> dict:
    import torch

    output = Path(output)
    checkpoints = find_checkpoints(official_dir, log)  # before anything is written
    output.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    log("found " + ", ".join(f"{c['path'].name} (DETRIS-{c['variant']}, {c['dataset']})" for c in checkpoints))
    datasets = {}
    for dataset in dict.fromkeys(d for c in checkpoints for d in c["evaluated_on"]):
        datasets[dataset] = prepare_dataset(dataset, refer_root, images_root, output / "data" / slug(dataset),
                                            overwrite, progress, log)
    measured = {}
    for checkpoint in checkpoints:
        model_dir = convert(checkpoint, output / "models" / checkpoint["name"], config, overwrite, log)
        for dataset in checkpoint["evaluated_on"]:
            splits = EVAL_SETS[dataset][2]
            missing = [s for s in splits if s not in datasets[dataset]]
            if missing:
                raise ValueError(f"{dataset} has no split(s) {missing} in the refer files; it has {list(datasets[dataset])}")
            log(f"evaluating {checkpoint['name']} on {dataset} {', '.join(splits)} ({device}, {dtype})")
            results = evaluate(model_dir, datasets[dataset], splits, output / "eval" / checkpoint["name"] / slug(dataset),
                               device, dtype, batch_size, max_samples, grid, overwrite)
            measured.setdefault(checkpoint["variant"], {})[dataset] = {s: results[s] for s in splits}
    cells = compare(measured, tolerance)
    report = {
        "tolerance": tolerance,
        "max_samples": max_samples,
        "device": device,
        "dtype": dtype,
        "checkpoints": [{"file": str(c["path"]), "variant": c["variant"], "dataset": c["dataset"],
                         "model": str(output / "models" / c["name"])} for c in checkpoints],
        "cells": cells,
    }
    text = markdown_tables(cells, tolerance)
    if max_samples is not None:
        text += f"\nAt most {max_samples} expressions per split were evaluated (`--max-samples`): not a reproduction.\n"
    (output / "reproduction.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "reproduction.md").write_text(text)
    return report


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detris reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--official-dir", required=True, help="folder holding the official .pth files (any depth)")
    parser.add_argument("--refer-root", required=True, help="folder with refcoco/, refcoco+/, refcocog/ (refer files)")
    parser.add_argument("--images-root", required=True, help="COCO train2014 images")
    parser.add_argument("--output", default="reproduction", help="working folder: data/, models/, eval/, the tables")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-samples", type=int, default=None, help="expressions per split (a quick look, not a reproduction)")
    parser.add_argument("--grid", type=int, default=0, help="best/worst prediction grids per split (0: none)")
    parser.add_argument("--config", default=None, help="a DETRIS config.json for checkpoints of a non-preset architecture")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="pass mark, in points of percent")
    parser.add_argument("--overwrite", action="store_true", help="redo every step instead of reusing its output")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    if args.tolerance < 0 or not math.isfinite(args.tolerance):
        print(f"detris reproduce: --tolerance must be a finite number >= 0, got {args.tolerance}", file=sys.stderr)
        return 2
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    try:
        report = reproduce(args.official_dir, args.refer_root, args.images_root, args.output, args.device, args.dtype,
                           args.batch_size, args.max_samples, args.grid, args.config, args.overwrite, args.tolerance,
                           progress=not args.no_progress, log=log)
    except (ValueError, FileNotFoundError) as error:  # a missing folder, a checkpoint or annotation that does not fit
        print(f"detris reproduce: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print((Path(args.output) / "reproduction.md").read_text())
    measured = [c for c in report["cells"] if c["pass"] is not None]
    print(f"RESULT cells_within_{args.tolerance:g}={sum(c['pass'] for c in measured)}/{len(measured)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
