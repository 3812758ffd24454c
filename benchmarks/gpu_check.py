"""`make gpu-check`: the one-command acceptance run on a CUDA machine (about 5 minutes on one H100/H200-class GPU).

Steps, each timed, each recorded with its error if it fails (the run goes on):

1. ``peak``: the bf16 8192^2 matmul rate (the utilisation reference), measured between the model's iterations;
2. ``parity``: the golden stand-in DETRIS-B (``tests/fixtures/golden``: the official-layout stand-in weights,
   converted) on the GPU against the official fp32 outputs stored there: fp32 with SDPA and eager attention
   (TF32 off; every output within 1e-4), bf16 with SDPA, with SDPA held to its fused kernels (flash, memory-
   efficient; no math fallback), and with
   ``flash_attention_2`` when the ``flash_attn`` package is installed (logits, and the masks at IoU >= 0.99);
3. ``throughput``: DETRIS-B and DETRIS-L at 448 px, bf16: inference images/s (the model loaded in bf16) and
   training samples/s (fp32 parameters, bf16 autocast, Adam), batch 32, each with its utilisation of the peak;
   DETRIS-L training at batch 32 also gives the peak memory;
4. ``evaluation``: ``training.evaluation.evaluate_model`` end to end on 10,834 synthetic RefCOCO-sized sentences
   (the size of RefCOCO val): JPEG decode, letterbox, tokenise (8 loader workers), forward in bf16,
   post-processing to the original size, IoU;
5. ``targets``: the gaps to the GPU targets: B inference >= 50 % and B training >= 35 % of the bf16 peak, 10,834
   sentences in <= 15 s, DETRIS-L training at batch 32 within 80 GB.

Writes ``benchmarks/results/gpu.json`` and ``gpu.md`` (``--output-dir``) and prints the table.
``--dry-run`` runs every step with a tiny DETRIS and a few sentences on whatever device there is (the CPU in the test
suite, ``tests/test_gpu_check.py``); its parity step compares the device against the same tiny model's fp32 CPU
outputs instead of the golden files.

    python -m benchmarks.gpu_check [--dry-run] [--device auto|cuda|cpu] [--output-dir benchmarks/results]
                                   [--steps peak,parity,throughput,evaluation] [--eval-sentences 10834]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_model import (
    PRESET_NAMES,
    jsonable,
    bench_evaluation,
    bench_inference,
    bench_training,
    build_model,
    evaluation_data,
    preset_config,
    variant,
)
from benchmarks.harness import (
    MatmulMeter,
    count_model_flops,
    cpu_allocator,
    machine_info,
    machine_label,
    make_inputs,
    resolve_device,
    synchronize,
)

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "fixtures" / "golden"
STEPS = ("peak", "parity", "throughput", "evaluation")

# The GPU targets (DETRIS-B in bf16 against the bf16 matmul peak; RefCOCO val's size; DETRIS-L's recipe batch).
TARGETS = {"inference_utilisation": 0.50, "training_utilisation": 0.35, "evaluation_seconds": 15.0,
           "large_training_memory_gb": 80.0}
REFCOCO_VAL_SENTENCES = 10_834
FP32_TOLERANCE = 1e-4
BF16_MASK_IOU = 0.99
OUTPUT_NAMES = ("logits", "text_state", "text_tokens", "vision_feature_0", "vision_feature_1", "vision_feature_2",
                "neck", "decoder_output")


def settings(dry_run: bool) -> dict:
    if dry_run:
        return dict(parity_preset="tiny", presets={"base": "tiny", "large": "tiny"}, batch=2, iterations=1, inner=1,
                    matmul_size=256, eval_sentences=8, eval_batch=4, eval_workers=0)
    return dict(parity_preset="base", presets={"base": "base", "large": "large"}, batch=32, iterations=5, inner=3,
                matmul_size=8192, eval_sentences=REFCOCO_VAL_SENTENCES, eval_batch=64, eval_workers=8)


# ----- parity ------------------------------------------------------------------------------------------------------
def _named_outputs(out) -> dict[str, torch.Tensor]:
    return {"logits": out.logits, "text_state": out.text_embeds, "text_tokens": out.word_features,
            "vision_feature_0": out.vision_features[0], "vision_feature_1": out.vision_features[1],
            "vision_feature_2": out.vision_features[2], "neck": out.neck_output, "decoder_output": out.decoder_output}


def golden_reference():
    """The golden stand-in DETRIS-B (fp32, CPU), its inputs and the official fp32 outputs (numpy)."""
    from modeling_detris.convert_original import convert_checkpoint

    sys.path.insert(0, str(GOLDEN))
    try:
        from original_weights import make_state_dict, read_keys
    finally:
        sys.path.remove(str(GOLDEN))
    official = make_state_dict(read_keys(GOLDEN / "keys_base.tsv"), seed=0)
    model = convert_checkpoint(None, "base", 17, official=official)
    with np.load(GOLDEN / "model_base_seed0.npz") as data:
        outputs = {key: data[key] for key in data.files}
    pixel_values = torch.from_numpy(np.random.RandomState(1234).standard_normal((2, 3, 448, 448)).astype(np.float32))
    input_ids = torch.from_numpy(outputs["input_ids"])
    return model, pixel_values, input_ids, {k: outputs[k] for k in OUTPUT_NAMES}, "official fp32 outputs (golden files)"


def self_reference(preset: str):
    """A random tiny DETRIS, its inputs and its own fp32 CPU outputs: the dry run's stand-in for the golden files."""
    config = preset_config(preset)
    model = build_model(config, torch.device("cpu"))
    pixel_values, input_ids, _ = make_inputs(config, 2, torch.device("cpu"))
    with torch.inference_mode():
        out = _named_outputs(model(pixel_values=pixel_values, input_ids=input_ids))
    return model, pixel_values, input_ids, {k: v.numpy() for k, v in out.items()}, "the same model's fp32 CPU outputs"


@contextlib.contextmanager
def exact_fp32(device):
    """TF32 off for matmuls and convolutions (CUDA's cuDNN defaults to TF32 convolutions)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def parity_cases(device) -> list[dict]:
    cases = [dict(name="fp32 sdpa", dtype=torch.float32, attention="sdpa"),
             dict(name="fp32 eager", dtype=torch.float32, attention="eager"),
             dict(name="bf16 sdpa", dtype=torch.bfloat16, attention="sdpa"),
             # fused kernels only (no math fallback): flash where the call has no mask (DINOv2), memory-efficient
             # (CUDA) or flash (CPU) where it has one (text, decoder)
             dict(name="bf16 sdpa fused kernels only", dtype=torch.bfloat16, attention="sdpa", fused_only=True)]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        cases.append(dict(name="bf16 flash_attention_2", dtype=torch.bfloat16, attention="flash_attention_2"))
    return cases


def run_parity(device, preset: str, dry_run: bool) -> dict:
    from processing_detris import DetrisImageProcessor

    model, pixel_values, input_ids, reference, source = self_reference(preset) if dry_run else golden_reference()
    processor = DetrisImageProcessor(size=model.config.input_size)
    sizes = [(model.config.input_size, model.config.input_size), (480, 640)]
    ref_logits = torch.from_numpy(reference["logits"]).to(device)
    ref_masks = processor.post_process_referring_segmentation(ref_logits, sizes)
    rows = []
    for case in parity_cases(device):
        row = {"case": case["name"]}
        try:
            candidate = variant(model, case["dtype"], "eager" if case["attention"] == "eager" else "sdpa").to(device)
            if case["attention"] == "flash_attention_2":
                candidate.set_attn_implementation("flash_attention_2")
            kernel = contextlib.nullcontext()
            if case.get("fused_only"):
                from torch.nn.attention import SDPBackend, sdpa_kernel

                kernel = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
            with exact_fp32(device), kernel, torch.inference_mode():
                out = _named_outputs(candidate(pixel_values=pixel_values.to(device), input_ids=input_ids.to(device)))
            diffs = {}
            for name, golden in reference.items():
                value = out[name].float().cpu().numpy()[tuple(slice(0, n) for n in golden.shape)]
                diffs[name] = float(np.abs(value - golden).max())
            masks = processor.post_process_referring_segmentation(out["logits"].float(), sizes)
            ious = [float((a & b).sum() / (a | b).sum()) for a, b in zip(masks, ref_masks)]
            row.update(max_abs_diff=diffs, logits_max_abs_diff=diffs["logits"], mask_iou=min(ious))
            if case["dtype"] == torch.float32:
                row.update(bar=f"every output within {FP32_TOLERANCE:g}", met=max(diffs.values()) <= FP32_TOLERANCE)
            else:
                row.update(bar=f"masks at IoU >= {BF16_MASK_IOU}", met=min(ious) >= BF16_MASK_IOU)
        except Exception as exc:  # noqa: BLE001  (a kernel missing on this GPU: record it, go on)
            row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", met=False)
        finally:
            candidate = None
            _free(device)
        rows.append(row)
    return {"reference": source, "model": PRESET_NAMES[preset], "cases": rows}


# ----- throughput, evaluation ----------------------------------------------------------------------------------------
def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_throughput(device, meter, role: str, preset: str, s: dict) -> list[dict]:
    config = preset_config(preset)
    flops = count_model_flops(config)
    base = build_model(config, device)
    records = []
    for kind in ("inference", "training"):
        record = {"benchmark": kind, "role": role, "model": PRESET_NAMES[preset], "preset": preset,
                  "batch_size": s["batch"], "precision": "bf16" if kind == "inference" else "bf16 autocast"}
        try:
            if kind == "inference":
                model = variant(base, torch.bfloat16, "sdpa")
                record.update(bench_inference(model, config, device, meter, s["batch"], s["iterations"],
                                              flops["forward_per_sample"], s["inner"]))
            else:
                model = variant(base, torch.float32, "sdpa")
                record.update(bench_training(model, config, device, meter, s["batch"], s["iterations"],
                                             flops["train_step_per_sample"], "bf16", s["inner"]))
        except torch.OutOfMemoryError as exc:
            record["error"] = f"out of memory: {str(exc).splitlines()[0][:200]}"
        finally:
            model = None
            _free(device)
        records.append(record)
    return records


def run_evaluation(device, meter, preset: str, s: dict) -> dict:
    config = preset_config(preset)
    flops = count_model_flops(config)
    started = time.perf_counter()
    dataset = evaluation_data(s["eval_sentences"])
    made = time.perf_counter() - started
    model = variant(build_model(config, device), torch.bfloat16, "sdpa")
    record = bench_evaluation(model, config, device, meter, dataset, s["eval_batch"], flops["forward_per_sample"],
                              s["eval_workers"])
    record.update(benchmark="evaluation", model=PRESET_NAMES[preset], preset=preset, batch_size=s["eval_batch"],
                  precision="bf16", data_generation_seconds=made)
    return record


# ----- targets -------------------------------------------------------------------------------------------------------
def target_gaps(results: dict) -> list[dict]:
    """One row per GPU target: measured value, goal, met, gap (how far from the goal, in the goal's unit)."""
    rows = []
    by_role = {(r["role"], r["benchmark"]): r for r in results.get("throughput", [])}
    for kind, key in (("inference", "inference_utilisation"), ("training", "training_utilisation")):
        r = by_role.get(("base", kind))
        goal = TARGETS[key]
        if r and "utilisation" in r:
            rows.append({"target": f"{r['model']} {kind} bf16, batch {r['batch_size']}: utilisation of the bf16 peak",
                         "measured": r["utilisation"], "goal": goal, "met": r["utilisation"] >= goal,
                         "gap": max(0.0, goal - r["utilisation"]), "unit": "fraction"})
    e = results.get("evaluation")
    if e and "seconds" in e:
        seconds = e["seconds"] * REFCOCO_VAL_SENTENCES / e["sentences"]
        rows.append({"target": f"{REFCOCO_VAL_SENTENCES:,} sentences end to end ({e['model']} bf16; measured on "
                               f"{e['sentences']:,}, scaled)", "measured": seconds,
                     "goal": TARGETS["evaluation_seconds"], "met": seconds <= TARGETS["evaluation_seconds"],
                     "gap": max(0.0, seconds - TARGETS["evaluation_seconds"]), "unit": "s"})
    r = by_role.get(("large", "training"))
    if r and r.get("peak_memory_bytes"):
        gb = r["peak_memory_bytes"] / 1e9
        rows.append({"target": f"{r['model']} training peak memory at batch {r['batch_size']}", "measured": gb,
                     "goal": TARGETS["large_training_memory_gb"], "met": gb <= TARGETS["large_training_memory_gb"],
                     "gap": max(0.0, gb - TARGETS["large_training_memory_gb"]), "unit": "GB"})
    elif r and r.get("error"):
        rows.append({"target": f"{r['model']} training at batch {r['batch_size']}", "measured": None,
                     "goal": TARGETS["large_training_memory_gb"], "met": False, "gap": None, "unit": "GB",
                     "error": r["error"]})
    return rows


# ----- report --------------------------------------------------------------------------------------------------------
def _value(value, unit):
    if value is None:
        return "-"
    return f"{100 * value:.1f} %" if unit == "fraction" else f"{value:,.2f} {unit}"


def markdown(results: dict) -> str:
    lines = [f"# GPU check{' (dry run: tiny sizes)' if results['dry_run'] else ''}", "",
             f"Machine: {results['machine_label']}. Run {results['started']} to {results.get('finished', '-')} "
             f"({results.get('seconds', 0):.0f} s). Peak reference: {results.get('peak_label', '-')}, "
             f"{results.get('peak_flops_per_s', 0) / 1e12:,.1f} TFLOP/s at best.", ""]
    parity = results.get("parity")
    if parity:
        lines += [f"Golden parity ({parity['model']}, against {parity['reference']}):", "",
                  "| case | bar | worst output diff | logits diff | mask IoU | met |", "|---|---|---|---|---|---|"]
        for c in parity["cases"]:
            if c.get("error"):
                lines.append(f"| {c['case']} | - | {c['error']} | | | no |")
                continue
            worst = max(c["max_abs_diff"], key=c["max_abs_diff"].get)
            lines.append(f"| {c['case']} | {c['bar']} | {c['max_abs_diff'][worst]:.2e} ({worst}) | "
                         f"{c['logits_max_abs_diff']:.2e} | {c['mask_iou']:.4f} | {'yes' if c['met'] else 'NO'} |")
        lines.append("")
    records = results.get("throughput") or []
    if records or results.get("evaluation"):
        lines += ["| benchmark | model | batch | precision | throughput | utilisation of the peak | peak memory (GB) |",
                  "|---|---|---|---|---|---|---|"]
        for r in records:
            model = r["model"] + (f" (as {PRESET_NAMES[r['role']]})" if r["preset"] != r["role"] else "")
            if r.get("error"):
                lines.append(f"| {r['benchmark']} | {model} | {r['batch_size']} | {r['precision']} | {r['error']} | | |")
                continue
            unit = "images/s" if r["benchmark"] == "inference" else "samples/s"
            lines.append(f"| {r['benchmark']} | {model} | {r['batch_size']} | {r['precision']} | "
                         f"{r['items_per_s']:,.1f} {unit} | {100 * r['utilisation']:.1f} % | "
                         f"{r['peak_memory_bytes'] / 1e9:.2f} |")
        e = results.get("evaluation")
        if e and not e.get("error"):
            lines.append(f"| evaluation end to end | {e['model']} | {e['batch_size']} | bf16 | "
                         f"{e['items_per_s']:,.1f} sentences/s ({e['sentences']:,} in {e['seconds']:.1f} s) | "
                         f"{100 * e['utilisation']:.1f} % | {e['peak_memory_bytes'] / 1e9:.2f} |")
        lines.append("")
    gaps = results.get("targets") or []
    if gaps:
        lines += ["Targets:", "", "| target | measured | goal | met | gap |", "|---|---|---|---|---|"]
        for g in gaps:
            goal = f"{'>=' if g['unit'] == 'fraction' else '<='} {_value(g['goal'], g['unit'])}"
            lines.append(f"| {g['target']} | {_value(g['measured'], g['unit'])} | {goal} | {'yes' if g['met'] else 'NO'} | "
                         f"{_value(g['gap'], g['unit']) if g['gap'] is not None else g.get('error', '-')} |")
        lines.append("")
    errors = {k: v for k, v in results.get("step_errors", {}).items()}
    if errors:
        lines += ["Steps that failed:", ""] + [f"- {k}: {v}" for k, v in errors.items()] + [""]
    lines.append("Step times: " + ", ".join(f"{k} {v:.1f} s" for k, v in results.get("step_seconds", {}).items()))
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    device = resolve_device(args.device)
    s = settings(args.dry_run)
    if args.eval_sentences is not None:
        s["eval_sentences"] = args.eval_sentences
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the speed steps
    info = machine_info(device)
    results = {"dry_run": args.dry_run, "machine": info, "machine_label": machine_label(info),
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": s, "step_seconds": {}, "step_errors": {}}
    started = time.perf_counter()
    log = (lambda *a: print(*a, flush=True)) if not args.quiet else (lambda *a: None)
    log(f"gpu-check on {results['machine_label']}{' (dry run)' if args.dry_run else ''}")
    meter = MatmulMeter(device, dtype=torch.bfloat16, size=s["matmul_size"])
    results["peak_label"] = meter.label

    def step(name, fn):
        if name not in args.steps:
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001  (one failing step must not hide the others' results)
            results["step_errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            log(f"{name} failed: {results['step_errors'][name]}")
        finally:
            _free(device)
        results["step_seconds"][name] = time.perf_counter() - t0
        log(f"{name}: {results['step_seconds'][name]:.1f} s")

    allocator = cpu_allocator("keep") if device.type == "cpu" else contextlib.nullcontext()
    with allocator:
        step("peak", lambda: meter.measure())
        step("parity", lambda: results.__setitem__("parity", run_parity(device, s["parity_preset"], args.dry_run)))

        def throughput():
            results["throughput"] = []
            for role in ("base", "large"):
                results["throughput"] += run_throughput(device, meter, role, s["presets"][role], s)

        step("throughput", throughput)
        step("evaluation", lambda: results.__setitem__("evaluation", run_evaluation(device, meter, s["presets"]["base"], s)))
    synchronize(device)
    results["peak_flops_per_s"] = max(meter.samples, default=0.0)
    results["targets"] = target_gaps(results)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["seconds"] = time.perf_counter() - started
    return results


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny DETRIS, few sentences: checks the command in seconds")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cuda[:N] or cpu")
    p.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"),
                   help="where gpu.json and gpu.md go (gpu-dry-run.* for a dry run)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {','.join(STEPS)}")
    p.add_argument("--eval-sentences", type=int, default=None, help=f"(default {REFCOCO_VAL_SENTENCES:,}; dry run 8)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    args.steps = [x for x in args.steps.split(",") if x]
    unknown = set(args.steps) - set(STEPS)
    if unknown:
        print(f"gpu-check: unknown steps {sorted(unknown)}; expected some of {','.join(STEPS)}", file=sys.stderr)
        return 2
    if not args.dry_run and resolve_device(args.device).type != "cuda":
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False); use --dry-run to check the command on "
              "the CPU", file=sys.stderr)
        return 2
    results = jsonable(run(args))
    table = markdown(results)
    print("\n" + table)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-dry-run" if args.dry_run else "gpu"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
