"""The benchmarks of `detris bench` (what each measures and the options: benchmarks/options.py)."""


from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.options import ALL_BENCHMARKS, build_arg_parser
from benchmarks.harness import (
    DTYPES,
    MatmulMeter,
    PeakMemory,
    alternate,
    count_model_flops,
    cpu_allocator,
    machine_info,
    machine_label,
    make_inputs,
    resolve_device,
    summarise,
    synchronize,
    tensor_bytes,
)

PRESET_NAMES = {"base": "DETRIS-B", "large": "DETRIS-L", "tiny": "DETRIS-tiny"}
# A DETRIS small enough for the smoke test (56 px input, width 32) with the real CLIP vocabulary, so that the
# processor's token ids fit and the evaluation path runs unchanged.
TINY = dict(
    vision_config=dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=70,
        num_register_tokens=4, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu",
    ),
    text_config=dict(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=24,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    ),
    vision_adapter_layers=[1, 3], vision_adapter_dim=16, vision_adapter_attention_dim=16,
    vision_adapter_attention_heads=2, text_adapter_layers=[1], text_adapter_dim=16,
    neck_tap_layers=[1, 2], fusion_hidden_size=32, neck_num_attention_heads=2, decoder_num_layers=1,
    decoder_num_attention_heads=2, decoder_ffn_dim=32, projector_hidden_size=8, word_len=7, input_size=56,
)


def preset_config(name: str, input_size: int | None = None, attn_implementation: str = "sdpa"):
    from configuration_detris import DetrisConfig

    if name == "tiny":
        config = DetrisConfig(**copy.deepcopy(TINY), attn_implementation=attn_implementation)
    else:
        config = DetrisConfig.from_preset(name, attn_implementation=attn_implementation)
    if input_size is not None and input_size != config.input_size:
        config.input_size = input_size
        config.check_detris_settings()
    return config


def build_model(config, device: torch.device, seed: int = 0):
    """A randomly initialised DETRIS (official init for adapters and head, the backbones' own init), fp32, eval."""
    from modeling_detris import DetrisForReferringSegmentation

    torch.manual_seed(seed)
    return DetrisForReferringSegmentation(config).to(device).eval()


def variant(model, dtype: torch.dtype, attn_implementation: str, compile: bool = False):
    """A copy of `model` with its parameters in `dtype` (as `from_pretrained(..., dtype=dtype)` loads it) and the
    attention implementation set on the backbones and on our attention modules; `torch.compile`d if asked."""
    clone = copy.deepcopy(model).to(dtype)
    clone.set_attn_implementation(attn_implementation)
    return torch.compile(clone) if compile else clone


# ----- single benchmarks -------------------------------------------------------------------------------------------
def _record(kind, preset, config, batch, precision, attention, unit, **extra) -> dict:
    return {"benchmark": kind, "model": PRESET_NAMES.get(preset, preset), "preset": preset,
            "input_size": config.input_size, "batch_size": batch, "precision": precision, "attention": attention,
            "unit": unit, **extra}


def bench_inference(model, config, device, meter, batch, iterations, flops_per_sample, inner=1) -> dict:
    pixel_values, input_ids, _ = make_inputs(config, batch, device)

    def run():
        for _ in range(inner):
            model(pixel_values=pixel_values, input_ids=input_ids)

    with torch.inference_mode():
        measured = alternate(device, meter, run, iterations)
        with PeakMemory(device, baseline_bytes=tensor_bytes(model)) as memory:
            run()
    stats = summarise(measured["seconds"], measured["matmul_flops_per_s"], flops_per_sample * batch * inner, batch * inner)
    return {**stats, "flops_per_item": flops_per_sample, "peak_memory_bytes": memory.peak_bytes}


def bench_training(model, config, device, meter, batch, iterations, flops_per_sample, precision, inner=1) -> dict:
    """Adam step on the trainable parameters, fp32 parameters, autocast for bf16/fp16 (GradScaler for fp16 on
    CUDA). Nothing in the step reads a value back to the host."""
    dtype = DTYPES[precision]
    pixel_values, input_ids, labels = make_inputs(config, batch, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if (dtype == torch.float16 and device.type == "cuda") else None
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())

    def step():
        for _ in range(inner):
            with autocast:
                loss = model(pixel_values=pixel_values, input_ids=input_ids, labels=labels).loss
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    measured = alternate(device, meter, step, iterations)
    with PeakMemory(device, baseline_bytes=tensor_bytes(model)) as memory:
        step()
    model.eval()
    stats = summarise(measured["seconds"], measured["matmul_flops_per_s"], flops_per_sample * batch * inner, batch * inner)
    return {**stats, "flops_per_item": flops_per_sample, "peak_memory_bytes": memory.peak_bytes,
            "trainable_parameters": sum(p.numel() for p in params)}


def evaluation_data(num_sentences: int, seed: int = 0):
    """A sentence-level dataset of `num_sentences` synthetic RefCOCO-like expressions (640x480 JPEGs, RLE masks)."""
    from datasets import Dataset

    from benchmarks.bench_data import make_rows
    from training.data.schema import object_features
    from training.evaluation import sentence_view

    import datasets

    refs_per_image, sentences_per_ref = 3, 3
    n_images = max(1, math.ceil(num_sentences / (refs_per_image * sentences_per_ref)))
    rows, _ = make_rows(n_images, refs_per_image, seed)
    dataset = Dataset.from_list(rows, features=object_features("bytes"))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return sentence_view(dataset, "all", max_samples=num_sentences)
    finally:
        if bars:
            datasets.enable_progress_bars()


def bench_evaluation(model, config, device, meter, dataset, batch, flops_per_sample, num_workers=0) -> dict:
    from processing_detris import DetrisProcessor
    from training.evaluation import eval_loader, evaluate_model

    processor = DetrisProcessor.from_model_config(config)
    with PeakMemory(device, baseline_bytes=tensor_bytes(model)) as memory:  # warm-up: one batch
        evaluate_model(model, eval_loader(dataset.select(range(min(batch, len(dataset)))), processor, batch), processor)
    loader = eval_loader(dataset, processor, batch, num_workers=num_workers)
    n = len(dataset)

    def run():
        evaluate_model(model, loader, processor)

    measured = alternate(device, meter, run, iterations=1, warmup=0)
    stats = summarise(measured["seconds"], measured["matmul_flops_per_s"], flops_per_sample * n, n)
    return {**stats, "flops_per_item": flops_per_sample, "sentences": n, "seconds": measured["seconds"][0],
            "loader_workers": num_workers, "peak_memory_bytes": memory.peak_bytes}


def bench_data(short: bool) -> dict:
    from benchmarks.bench_data import run

    threads = torch.get_num_threads()
    try:
        if short:
            return run(n_images=4, refs_per_image=2, batch_size=4, min_time=0.2, verbose=False)
        return run(verbose=False)
    finally:
        torch.set_num_threads(threads)


def bench_target(device, meter, rounds: int, threads: int, flops_per_sample: float, preset="base", batch=2) -> dict:
    """The CPU target (docs/benchmarks.md, Targets): ours fp32 (SDPA) >= 85 % of the fp32 matmul rate measured in the
    same run, never slower than the official graph (fp32, eager attention); ours in bf16 reported beside. Each round
    runs mm, ours fp32, mm, official graph, mm, ours bf16, mm; best against best and per-round ratios are reported."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        config = preset_config(preset)
        base = build_model(config, device)
        models = {
            "ours_fp32_sdpa": variant(base, torch.float32, "sdpa"),
            "official_graph_fp32_eager": variant(base, torch.float32, "eager"),
            "ours_bf16_sdpa": variant(base, torch.bfloat16, "sdpa"),
        }
        del base
        pixel_values, input_ids, _ = make_inputs(config, batch, device)
        flops = flops_per_sample * batch
        times = {name: [] for name in models}
        rates = [meter.measure()]
        with torch.inference_mode():
            for model in models.values():  # warm-up
                model(pixel_values=pixel_values, input_ids=input_ids)
            for _ in range(rounds):
                for name, model in models.items():
                    synchronize(device)
                    start = time.perf_counter()
                    model(pixel_values=pixel_values, input_ids=input_ids)
                    synchronize(device)
                    times[name].append(time.perf_counter() - start)
                    rates.append(meter.measure())
        peak = max(rates)
        out = {"preset": preset, "model": PRESET_NAMES[preset], "batch_size": batch, "threads": threads,
               "rounds": rounds, "flops_per_image": flops_per_sample, "matmul_flops_per_s": rates,
               "matmul_peak_flops_per_s": peak, "seconds": times}
        for name, seconds in times.items():
            out[f"{name}_flops_per_s"] = flops / min(seconds)
            out[f"{name}_utilisation"] = flops / min(seconds) / peak
            out[f"{name}_images_per_s"] = batch / min(seconds)
        k = len(models)
        for index, name in enumerate(times):  # per-round ratio against the mean of the two neighbouring matmuls
            paired = [flops / t / ((rates[r * k + index] + rates[r * k + index + 1]) / 2)
                      for r, t in enumerate(times[name])]
            out[f"{name}_utilisation_paired_median"] = statistics.median(paired)
        ours, official, bf16 = (times[n] for n in models)
        out["ours_vs_official_speed"] = min(official) / min(ours)
        out["ours_vs_official_speed_paired_median"] = statistics.median(o / s for o, s in zip(official, ours))
        out["bf16_vs_official_speed"] = min(official) / min(bf16)
        out["bf16_vs_ours_fp32_speed"] = min(ours) / min(bf16)
        out["fp32_target_met"] = out["ours_fp32_sdpa_utilisation"] >= 0.85
        out["never_slower_than_official"] = out["ours_vs_official_speed"] >= 1.0
        info = machine_info(device)
        out["native_bf16"] = bool(info["cpu_native_bf16"])
        out["bf16_target"] = ("met" if out["bf16_vs_official_speed"] >= 2 else "not met") if out["native_bf16"] else (
            "not applicable: this CPU has no native bf16 (no AVX512-BF16 / AMX), so the >= 2x bf16 target cannot be "
            "shown here")
        out["bf16_raw_matmul_flops_per_s"] = _raw_low_precision_matmul_rate(device)
        return out
    finally:
        torch.set_num_threads(previous)


def fast_cpu_modes() -> list[str]:
    """The fast paths worth timing on this CPU: bf16 where it is native, int8 always (fbgemm runs without VNNI too,
    only slower); the one `optimize_for_cpu(mode="auto")` picks comes first."""
    from modeling_detris.quantization_detris import cpu_fast_path, cpu_isa

    isa = cpu_isa()
    modes = (["bf16"] if cpu_fast_path({**isa, "avx512_vnni": False, "avx_vnni": False}) == "bf16" else []) + ["int8"]
    auto = cpu_fast_path()
    return ([auto] if auto in modes else []) + [m for m in modes if m != auto]


def bench_fast_cpu(device, rounds: int, threads: int, modes: list[str], preset="base", batches=(1, 2)) -> dict:
    """The fast CPU path against ours fp32 (SDPA) and the official graph (fp32, eager attention): for each batch
    size, `rounds` rounds of (ours fp32, official graph, fast path per mode), one forward each, after one warm-up
    forward of each. Speed ratios best against best and as the median of the per-round ratios."""
    from modeling_detris.quantization_detris import cpu_fast_path, cpu_isa, optimize_for_cpu

    if device.type != "cpu":
        raise ValueError(f"the fast CPU path is for the CPU, not {device}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        config = preset_config(preset)
        base = build_model(config, device)
        models = {"ours_fp32_sdpa": variant(base, torch.float32, "sdpa"),
                  "official_graph_fp32_eager": variant(base, torch.float32, "eager")}
        for mode in modes:
            models[f"fast_{mode}"] = optimize_for_cpu(variant(base, torch.float32, "sdpa"), mode)
        del base
        out = {"preset": preset, "model": PRESET_NAMES[preset], "input_size": config.input_size, "threads": threads,
               "rounds": rounds, "modes": list(modes), "auto_mode": cpu_fast_path(), "cpu_isa": cpu_isa(), "batches": {}}
        for batch in batches:
            pixel_values, input_ids, _ = make_inputs(config, batch, device)
            times = {name: [] for name in models}
            with torch.inference_mode():
                for model in models.values():  # warm-up
                    model(pixel_values=pixel_values, input_ids=input_ids)
                for _ in range(rounds):
                    for name, model in models.items():
                        start = time.perf_counter()
                        model(pixel_values=pixel_values, input_ids=input_ids)
                        times[name].append(time.perf_counter() - start)
            row = {"seconds": times, "images_per_s": {name: batch / min(t) for name, t in times.items()}}
            for reference in ("official_graph_fp32_eager", "ours_fp32_sdpa"):
                short = "official" if reference.startswith("official") else "ours_fp32"
                row[f"vs_{short}"] = {name: min(times[reference]) / min(t) for name, t in times.items()}
                row[f"vs_{short}_paired_median"] = {
                    name: statistics.median(r / s for r, s in zip(times[reference], t)) for name, t in times.items()}
            out["batches"][str(batch)] = row
        return out
    finally:
        torch.set_num_threads(previous)


def _raw_low_precision_matmul_rate(device, size=512) -> float:
    """Plain `torch.matmul` in bf16 (no emulation): shows whether the CPU has fast bf16 arithmetic at all."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    start = time.perf_counter()
    torch.matmul(a, a)
    synchronize(device)
    return 2 * size**3 / (time.perf_counter() - start)


# ----- the run -----------------------------------------------------------------------------------------------------
def plan(presets, batch_sizes, precisions, attentions, reference, full_grid) -> list[tuple]:
    """(preset, batch, precision, attention) points: the full product, or one factor varied at a time around the
    reference (batch, precision, attention)."""
    ref_batch, ref_precision, ref_attention = reference
    points = []
    for preset in presets:
        if full_grid:
            cand = [(preset, b, p, a) for b in batch_sizes for p in precisions for a in attentions]
        else:
            cand = [(preset, ref_batch, ref_precision, ref_attention)]
            cand += [(preset, b, ref_precision, ref_attention) for b in batch_sizes]
            cand += [(preset, ref_batch, p, ref_attention) for p in precisions]
            cand += [(preset, ref_batch, ref_precision, a) for a in attentions]
        for point in cand:
            if point not in points:
                points.append(point)
    return points


def run(args) -> dict:
    device = resolve_device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    is_cuda = device.type == "cuda"
    allocator = cpu_allocator(args.allocator) if device.type == "cpu" else contextlib.nullcontext()
    info = machine_info(device)
    meter = MatmulMeter(device, size=args.matmul_size)
    results = {"machine": info, "machine_label": machine_label(info), "peak": meter.label,
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "short": args.short, "records": [], "target": None,
               "fast_cpu": None,
               "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}}
    log = (lambda *a: print(*a, flush=True)) if not args.quiet else (lambda *a: None)
    log(f"machine: {results['machine_label']}; peak reference: {meter.label}, first {meter.measure() / 1e9:.1f} GFLOP/s")
    benchmarks = args.benchmarks
    reference = (args.reference_batch, args.reference_precision, args.attention[0])
    points = plan(args.presets, args.batch_sizes, args.precisions, args.attention, reference, args.full_grid)

    with allocator:
        for preset in args.presets:
            config = preset_config(preset, args.input_size)
            flops = count_model_flops(config)
            log(f"{PRESET_NAMES.get(preset, preset)} @ {config.input_size}: {flops['forward_per_sample'] / 1e9:.2f} GFLOPs "
                f"forward, {flops['train_step_per_sample'] / 1e9:.2f} GFLOPs training step (per sample, counted)")
            base = build_model(config, device) if any(b in benchmarks for b in ("inference", "training", "evaluation")) else None
            for kind in ("inference", "training"):
                if kind not in benchmarks:
                    continue
                for _, batch, precision, attention in (p for p in points if p[0] == preset):
                    dtype = DTYPES[precision]
                    record = _record(kind, preset, config, batch, precision, attention,
                                     "images/s" if kind == "inference" else "samples/s",
                                     precision_mode="parameters" if kind == "inference" or dtype == torch.float32 else "autocast",
                                     compiled=args.compile)
                    try:
                        if kind == "inference":
                            model = variant(base, dtype, attention, args.compile)
                            record.update(bench_inference(model, config, device, meter, batch, args.iterations,
                                                          flops["forward_per_sample"], args.inner))
                        else:
                            model = variant(base, torch.float32, attention, args.compile)
                            record.update(bench_training(model, config, device, meter, batch, args.iterations,
                                                         flops["train_step_per_sample"], precision, args.inner))
                    except torch.OutOfMemoryError as exc:  # noqa: PERF203
                        record["error"] = f"out of memory: {str(exc).splitlines()[0]}"
                    except (RuntimeError, NotImplementedError) as exc:  # e.g. a kernel missing for a dtype: keep going
                        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    finally:
                        model = None
                        gc.collect()
                        if is_cuda:
                            torch.cuda.empty_cache()
                    results["records"].append(record)
                    log(format_record(record))
            if "evaluation" in benchmarks:
                dataset = evaluation_data(args.eval_sentences)
                for precision in args.eval_precisions:
                    record = _record("evaluation", preset, config, args.eval_batch_size, precision, reference[2],
                                     "sentences/s", precision_mode="parameters")
                    model = variant(base, DTYPES[precision], reference[2])
                    record.update(bench_evaluation(model, config, device, meter, dataset, args.eval_batch_size,
                                                   flops["forward_per_sample"], args.eval_workers))
                    model = None
                    gc.collect()
                    results["records"].append(record)
                    log(format_record(record))
            base = None
            gc.collect()
        if "data" in benchmarks:
            data = bench_data(args.short)
            results["data_loading"] = data
            for mode in ("official", "on_the_fly", "cached", "cached_cpu_normalise"):
                results["records"].append({"benchmark": "data", "model": "-", "mode": mode, "batch_size": data["batch_size"],
                                           "unit": "samples/s/core", "items_per_s": data[mode], "threads": 1})
                log(format_record(results["records"][-1]))
        if "target" in benchmarks and device.type == "cpu":
            preset = "tiny" if args.short else "base"
            flops = count_model_flops(preset_config(preset))["forward_per_sample"]
            results["target"] = bench_target(device, meter, args.target_rounds, args.target_threads, flops, preset)
            log(format_target(results["target"]))
        if "fast_cpu" in benchmarks and device.type == "cpu":
            modes = args.fast_cpu_modes or fast_cpu_modes()
            results["fast_cpu"] = bench_fast_cpu(device, args.target_rounds, args.target_threads, modes,
                                                 "tiny" if args.short else "base", tuple(args.fast_cpu_batch_sizes))
            log(format_fast_cpu(results["fast_cpu"]))
    if is_cuda:
        results["gpu_targets"] = gpu_targets(results["records"])
    results["memory_fits"] = memory_fits(results["records"], args.memory_fit_batch)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return results


def gpu_targets(records) -> dict:
    """The GPU targets (docs/benchmarks.md, Targets), read off the records (bf16, DETRIS-B): inference >= 50 % and
    training >= 35 % of the bf16 matmul peak; a 3,811-sentence evaluation in <= 15 s."""
    def best(kind):
        cand = [r for r in records if r["benchmark"] == kind and r["preset"] == "base" and r["precision"] == "bf16"
                and "utilisation" in r]
        return max(cand, key=lambda r: r["utilisation"], default=None)

    out = {}
    for kind, goal in (("inference", 0.50), ("training", 0.35)):
        rec = best(kind)
        if rec is not None:
            out[kind] = {"utilisation": rec["utilisation"], "items_per_s": rec["items_per_s"], "batch_size": rec["batch_size"],
                         "goal": goal, "met": rec["utilisation"] >= goal}
    rec = best("evaluation")
    if rec is not None:
        seconds_3811 = 3811 / rec["items_per_s"]
        out["evaluation"] = {"sentences_per_s": rec["items_per_s"], "seconds_for_3811": seconds_3811, "goal_s": 15,
                             "met": seconds_3811 <= 15}
    return out


MEMORY_GOAL_BYTES = 80e9  # DETRIS-L training at batch 32 fits in 80 GB (docs/benchmarks.md, Targets)


def memory_fits(records, batch: int) -> list[dict]:
    """Peak memory against batch size, least squares over the measured points of each (benchmark, model, precision,
    attention) with two or more batch sizes: `fixed + per_sample * batch`, and the value at `batch`. A measured row
    at that batch, where there is one, is reported beside the fit; it, not the fit, is the figure to trust."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("peak_memory_bytes") and r["benchmark"] in ("inference", "training") and not r.get("error"):
            attention = r["attention"] + (" compiled" if r.get("compiled") else "")
            key = (r["benchmark"], r["preset"], r["model"], r["input_size"], r["precision"], r.get("precision_mode"), attention)
            groups.setdefault(key, []).append(r)
    fits = []
    for (benchmark, preset, model, size, precision, mode, attention), rows in groups.items():
        sizes = sorted({r["batch_size"] for r in rows})
        if len(sizes) < 2:
            continue
        xs = [float(r["batch_size"]) for r in rows]
        ys = [float(r["peak_memory_bytes"]) for r in rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        per_sample = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        fixed = my - per_sample * mx
        measured = [r["peak_memory_bytes"] for r in rows if r["batch_size"] == batch]
        fits.append({"benchmark": benchmark, "preset": preset, "model": model, "input_size": size, "precision": precision,
                     "precision_mode": mode, "attention": attention, "batch_sizes": sizes,
                     "fixed_bytes": fixed, "per_sample_bytes": per_sample, "batch": batch,
                     "predicted_bytes": fixed + per_sample * batch,
                     "measured_bytes": measured[0] if measured else None,
                     "max_residual_bytes": max(abs(y - fixed - per_sample * x) for x, y in zip(xs, ys))})
    return fits


# ----- reports -----------------------------------------------------------------------------------------------------
def _fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:,.0f}"


def format_record(r: dict) -> str:
    if r.get("error"):
        return f"{r['benchmark']:<10} {r['model']:<12} b{r['batch_size']:<3} {r['precision']} {r['attention']}: {r['error']}"
    if r["benchmark"] == "data":
        return f"data       {r['mode']:<21} {r['items_per_s']:10.1f} {r['unit']}"
    return (f"{r['benchmark']:<10} {r['model']:<12} b{r['batch_size']:<3} {r['precision']:<4} {r['attention']:<5} "
            f"{r['items_per_s']:9.3f} {r['unit']:<11} {r['achieved_flops_per_s'] / 1e9:8.1f} GFLOP/s  "
            f"util {100 * r['utilisation']:5.1f} % of {r['matmul_peak_flops_per_s'] / 1e9:.1f}  "
            f"peak mem {_fmt_bytes(r.get('peak_memory_bytes'))} MiB")


def format_target(t: dict) -> str:
    return (f"target ({t['model']}, batch {t['batch_size']}, {t['threads']} threads, {t['rounds']} alternating rounds): "
            f"matmul peak {t['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s; "
            f"ours fp32 {100 * t['ours_fp32_sdpa_utilisation']:.1f} % (paired median "
            f"{100 * t['ours_fp32_sdpa_utilisation_paired_median']:.1f} %), official graph "
            f"{100 * t['official_graph_fp32_eager_utilisation']:.1f} %, ours/official speed {t['ours_vs_official_speed']:.2f}x, "
            f"bf16/official {t['bf16_vs_official_speed']:.2f}x")


FAST_CPU_LABELS = {"ours_fp32_sdpa": "ours fp32 (SDPA)", "official_graph_fp32_eager": "official graph fp32 (eager)",
                   "fast_bf16": "fast path bf16", "fast_int8": "fast path int8 (backbone linears)"}


def isa_line(isa: dict) -> str:
    return ", ".join(f"{name.upper().replace('_', '-')} {'yes' if isa.get(name) else 'no'}"
                     for name in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")) + \
        f"; oneDNN native bf16 {'yes' if isa.get('onednn_bf16') else 'no'}"


def format_fast_cpu(f: dict) -> str:
    parts = [f"fast CPU path ({f['model']}, {f['threads']} threads, {f['rounds']} rounds; auto = {f['auto_mode']})"]
    for batch, row in f["batches"].items():
        parts.append(f"batch {batch}: " + ", ".join(
            f"{name} {row['vs_official'][name]:.2f}x official" for name in row["seconds"]))
    return "; ".join(parts)


def markdown_fast_cpu(f: dict) -> list[str]:
    lines = ["", f"Fast CPU path ({f['model']} @{f['input_size']} forward, {f['threads']} threads, {f['rounds']} "
                 f"alternating rounds of ours fp32, official graph, fast path; best against best, in brackets the "
                 f"median of the per-round ratios). `optimize_for_cpu(mode=\"auto\")` picks **{f['auto_mode']}** here. "
                 f"CPU features: {isa_line(f['cpu_isa'])}.", "",
             "| batch | variant | images/s | speed vs official graph | speed vs ours fp32 |", "|---|---|---|---|---|"]
    for batch, row in f["batches"].items():
        for name in row["seconds"]:
            lines.append(f"| {batch} | {FAST_CPU_LABELS.get(name, name)} | {row['images_per_s'][name]:.3f} | "
                         f"{row['vs_official'][name]:.2f}x ({row['vs_official_paired_median'][name]:.2f}x) | "
                         f"{row['vs_ours_fp32'][name]:.2f}x ({row['vs_ours_fp32_paired_median'][name]:.2f}x) |")
    return lines


def markdown(results: dict) -> str:
    peaks = [r["matmul_peak_flops_per_s"] for r in (*results["records"], results.get("target") or {})
             if r.get("matmul_peak_flops_per_s")]
    lines = [f"Machine: {results['machine_label']}. Peak reference: {results['peak']}, measured in the same run between "
             f"the model's iterations ({max(peaks, default=0) / 1e9:.1f} GFLOP/s at best). Run {results['started']}."]
    if results["records"]:
        lines += ["", "| benchmark | model | batch | precision | attention | throughput | GFLOP/item | achieved GFLOP/s | "
                      "matmul GFLOP/s | utilisation | peak memory (MiB) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["records"]:
        if r["benchmark"] == "data":
            lines.append(f"| data loading ({r['mode'].replace('_', ' ')}) | - | {r['batch_size']} | - | - | "
                         f"{r['items_per_s']:,.1f} {r['unit']} | - | - | - | n/a (no FLOPs) | - |")
            continue
        if r.get("error"):
            lines.append(f"| {r['benchmark']} | {r['model']} | {r['batch_size']} | {r['precision']} | {r['attention']} | "
                         f"{r['error']} | | | | | |")
            continue
        precision = r["precision"] + (" autocast" if r.get("precision_mode") == "autocast" else "")
        attention = r["attention"] + (" compiled" if r.get("compiled") else "")
        lines.append(
            f"| {r['benchmark']} | {r['model']} @{r['input_size']} | {r['batch_size']} | {precision} | {attention} | "
            f"{r['items_per_s']:,.3g} {r['unit']} | {r['flops_per_item'] / 1e9:,.1f} | "
            f"{r['achieved_flops_per_s'] / 1e9:,.1f} | {r['matmul_peak_flops_per_s'] / 1e9:,.1f} | "
            f"{100 * r['utilisation']:.1f} % | {_fmt_bytes(r.get('peak_memory_bytes'))} |")
    t = results.get("target")
    if t:
        lines += ["", f"CPU target ({t['model']} forward, batch {t['batch_size']}, {t['threads']} threads, "
                      f"{t['rounds']} rounds alternating with the fp32 matmul, best against best; paired = median of "
                      f"per-round ratios to the neighbouring matmuls):", "",
                  "| | images/s | GFLOP/s | of matmul peak | paired median |", "|---|---|---|---|---|"]
        for name, label in (("ours_fp32_sdpa", "ours fp32 (SDPA)"), ("official_graph_fp32_eager", "official graph fp32 (eager)"),
                            ("ours_bf16_sdpa", "ours bf16 (SDPA)")):
            lines.append(f"| {label} | {t[f'{name}_images_per_s']:.3f} | {t[f'{name}_flops_per_s'] / 1e9:.1f} | "
                         f"{100 * t[f'{name}_utilisation']:.1f} % | {100 * t[f'{name}_utilisation_paired_median']:.1f} % |")
        lines += ["", f"fp32 matmul peak {t['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s; ours / official speed "
                      f"{t['ours_vs_official_speed']:.2f}x (paired median {t['ours_vs_official_speed_paired_median']:.2f}x); "
                      f"bf16 / official {t['bf16_vs_official_speed']:.2f}x; fp32 target (>= 85 %) "
                      f"{'met' if t['fp32_target_met'] else 'not met'}; bf16 target: {t['bf16_target']}; plain bf16 "
                      f"matmul here {t['bf16_raw_matmul_flops_per_s'] / 1e9:.2f} GFLOP/s."]
    if results.get("fast_cpu"):
        lines += markdown_fast_cpu(results["fast_cpu"])
    fits = results.get("memory_fits") or []
    if fits:
        lines += ["", f"Peak memory against batch size (least squares over the measured batch sizes; the value at batch "
                      f"{fits[0]['batch']} is a linear extrapolation unless a measured row is given; the goal: "
                      f"DETRIS-L training at batch 32 within {MEMORY_GOAL_BYTES / 1e9:.0f} GB):", "",
                  "| benchmark | model | precision | attention | measured batches | fixed (MiB) | per sample (MiB) | "
                  "worst residual (MiB) | at batch (GB) | measured there (GB) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for f in fits:
            precision = f["precision"] + (" autocast" if f.get("precision_mode") == "autocast" else "")
            measured = "-" if f["measured_bytes"] is None else f"{f['measured_bytes'] / 1e9:.1f}"
            lines.append(f"| {f['benchmark']} | {f['model']} @{f['input_size']} | {precision} | {f['attention']} | "
                         f"{', '.join(map(str, f['batch_sizes']))} | {_fmt_bytes(f['fixed_bytes'])} | "
                         f"{_fmt_bytes(f['per_sample_bytes'])} | {_fmt_bytes(f['max_residual_bytes'])} | "
                         f"{f['batch']}: {f['predicted_bytes'] / 1e9:.1f} | {measured} |")
    g = results.get("gpu_targets")
    if g:
        lines += ["", "GPU targets (DETRIS-B, bf16): " + "; ".join(
            f"{k} {('%.1f %% (goal %d %%)' % (100 * v['utilisation'], 100 * v['goal'])) if 'utilisation' in v else ('%.1f s for 3,811 sentences (goal 15 s)' % v['seconds_for_3811'])} "
            f"{'met' if v['met'] else 'not met'}" for k, v in g.items())]
    return "\n".join(lines) + "\n"


# ----- command line ------------------------------------------------------------------------------------------------
def apply_defaults(args) -> argparse.Namespace:
    cuda = resolve_device(args.device).type == "cuda"
    if args.short:
        defaults = dict(presets=["tiny"], batch_sizes=[1, 2], reference_batch=2, precisions=["fp32", "bf16"],
                        iterations=2, inner=1, eval_sentences=8, eval_batch_size=4, eval_precisions=["fp32", "bf16"],
                        eval_workers=0, target_rounds=2, target_threads=1, matmul_size=256)
    elif cuda:
        defaults = dict(presets=["base", "large"], batch_sizes=[1, 8, 32, 64], reference_batch=32,
                        precisions=["fp32", "bf16", "fp16"], reference_precision="bf16", iterations=10, inner=5,
                        eval_sentences=3811, eval_batch_size=64, eval_precisions=["bf16", "fp32"], eval_workers=8)
    else:
        defaults = dict(presets=["base", "large"], batch_sizes=[1, 2, 4], reference_batch=2,
                        precisions=["fp32", "bf16", "fp16"], iterations=3, inner=1, eval_sentences=16,
                        eval_batch_size=8, eval_precisions=["fp32"], eval_workers=0)
    defaults.setdefault("reference_precision", "fp32")
    defaults.setdefault("target_rounds", 5)
    defaults.setdefault("target_threads", 2)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    unknown = set(args.benchmarks) - set(ALL_BENCHMARKS)
    if unknown:
        raise SystemExit(f"detris bench: unknown benchmarks {sorted(unknown)}; expected some of {ALL_BENCHMARKS}")
    for name in (*args.precisions, *args.eval_precisions, args.reference_precision):
        if name not in DTYPES:
            raise SystemExit(f"detris bench: unknown precision {name!r}; expected fp32, bf16 or fp16")
    if set(args.fast_cpu_modes or []) - {"bf16", "int8"}:
        raise SystemExit(f"detris bench: --fast-cpu-modes takes bf16 and/or int8, got {','.join(args.fast_cpu_modes)}")
    if set(args.attention) - {"sdpa", "eager"}:
        raise SystemExit("detris bench: --attention takes sdpa and/or eager")
    return args


def jsonable(value):
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def main(argv=None) -> int:
    return run_parsed(build_arg_parser().parse_args(argv))


def run_parsed(args) -> int:
    """`detris bench` after its arguments are parsed (benchmarks/bench.py parses them without importing torch)."""
    args = apply_defaults(args)
    results = jsonable(run(args))
    table = markdown(results)
    if not args.quiet:
        print("\n" + table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
