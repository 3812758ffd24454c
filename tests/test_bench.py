"""`detris bench` (benchmarks/): FLOP counts against the reference counts, the measuring tools, and the short mode
end to end through the CLI."""

import json
import time

import pytest
import torch

from benchmarks.bench_model import plan, preset_config
from benchmarks.harness import PeakMemory, count_model_flops, cpu_allocator, summarise

# docs/benchmarks.md: FlopCounterMode counts of the *official* DETRIS code at 448 px, batch 1, word_len 17.
OFFICIAL_GFLOPS = {"base": (316.24, 728.24), "large": (829.92, 1760.32)}


def text_gate_saving(config) -> float:
    """FLOPs of one forward that the official text gates spend and ours do not: with a single key the attention
    weights are exactly 1, so the official q projection of every pixel and its out projection cannot change the
    output (modeling_detris.heads.TextGate). Three gates, two [G*G, C] x [C, C] products each."""
    positions, width = config.grid_size**2, config.fusion_hidden_size
    return 3 * 2 * (2 * positions * width * width)


@pytest.mark.parametrize("preset", ["base", "large"])
def test_counted_flops_match_the_reference_count(preset):
    config = preset_config(preset)
    counted = count_model_flops(config)
    saving = text_gate_saving(config)
    official_forward, official_train = (g * 1e9 for g in OFFICIAL_GFLOPS[preset])
    # forward: the official count minus the text gates' dead products; training: the same products also lose their
    # input and weight gradients in the official (trainable) head, so three times the forward saving.
    assert counted["forward_per_sample"] == pytest.approx(official_forward - saving, rel=2e-3)
    assert counted["train_step_per_sample"] == pytest.approx(official_train - 3 * saving, rel=2e-3)
    # and the headline figure itself is within 1.1 %
    assert counted["forward_per_sample"] == pytest.approx(official_forward, rel=1.1e-2)


def test_flops_scale_with_batch_and_do_not_depend_on_attention():
    config = preset_config("tiny")
    one = count_model_flops(config, batch_size=1)
    three = count_model_flops(config, batch_size=3)
    assert three["forward_per_sample"] == pytest.approx(one["forward_per_sample"], rel=1e-6)
    eager = count_model_flops(preset_config("tiny", attn_implementation="eager"))
    assert eager == one
    assert one["train_step_per_sample"] > 1.5 * one["forward_per_sample"]


def test_one_factor_at_a_time_grid():
    points = plan(["base"], [1, 2, 4], ["fp32", "bf16", "fp16"], ["sdpa", "eager"], (2, "fp32", "sdpa"), False)
    assert points[0] == ("base", 2, "fp32", "sdpa")
    assert len(points) == len(set(points)) == 1 + 2 + 2 + 1
    assert ("base", 4, "bf16", "sdpa") not in points
    full = plan(["base"], [1, 2], ["fp32", "bf16"], ["sdpa"], (2, "fp32", "sdpa"), True)
    assert len(full) == 4


def test_utilisation_is_counted_flops_over_the_matmul_peak():
    stats = summarise([2.0, 1.0, 4.0], [10.0, 50.0, 40.0, 20.0], flops_per_iteration=30.0, items_per_iteration=3)
    assert stats["items_per_s"] == 3.0  # best time
    assert stats["items_per_s_median"] == 1.5
    assert stats["achieved_flops_per_s"] == 30.0
    assert stats["matmul_peak_flops_per_s"] == 50.0
    assert stats["utilisation"] == pytest.approx(30.0 / 50.0)
    # per iteration against the mean of its two neighbouring matmuls: 15/30, 30/45, 7.5/30
    assert stats["utilisation_paired_median"] == pytest.approx(0.5)


def test_cpu_peak_memory_sees_a_large_temporary():
    with cpu_allocator("keep"):
        with PeakMemory(torch.device("cpu"), baseline_bytes=1000) as memory:
            block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
            time.sleep(0.05)  # the sampler reads the resident size every millisecond
            del block
    assert memory.peak_bytes >= 1000 + 60 * 2**20


def test_short_bench_through_the_cli(tmp_path, one_thread):
    from training.cli import main

    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert main(["bench", "--short", "--quiet", "--json", str(out_json), "--markdown", str(out_md)]) == 0
    results = json.loads(out_json.read_text())
    assert results["machine"]["device"] == "cpu" and results["peak"] == "fp32 256x256 matmul"
    records = results["records"]
    kinds = {r["benchmark"] for r in records}
    assert kinds == {"inference", "training", "evaluation", "data"}
    model_records = [r for r in records if r["benchmark"] != "data"]
    assert {(r["precision"], r["attention"]) for r in model_records if r["benchmark"] == "inference"} >= {
        ("fp32", "sdpa"), ("bf16", "sdpa"), ("fp32", "eager")}
    for r in model_records:
        assert "error" not in r, r
        assert r["items_per_s"] > 0 and r["flops_per_item"] > 0 and r["peak_memory_bytes"] > 0
        assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_item"] * r["items_per_s"], rel=1e-9)
        assert r["utilisation"] == pytest.approx(r["achieved_flops_per_s"] / r["matmul_peak_flops_per_s"], rel=1e-9)
        assert r["matmul_peak_flops_per_s"] == max(r["matmul_flops_per_s"])
        assert len(r["matmul_flops_per_s"]) == len(r["seconds_per_iteration"]) + 1  # alternating, mm first and last
    tiny = count_model_flops(preset_config("tiny"))
    assert {r["flops_per_item"] for r in model_records if r["benchmark"] == "training"} == {tiny["train_step_per_sample"]}
    evaluation = [r for r in records if r["benchmark"] == "evaluation"]
    assert {r["sentences"] for r in evaluation} == {8}
    data = {r["mode"]: r["items_per_s"] for r in records if r["benchmark"] == "data"}
    assert set(data) == {"official", "on_the_fly", "cached", "cached_cpu_normalise"} and min(data.values()) > 0
    target = results["target"]
    assert target["threads"] == 1 and target["rounds"] == 2  # the full run: 2 threads, 5 rounds
    for name in ("ours_fp32_sdpa", "official_graph_fp32_eager", "ours_bf16_sdpa"):
        assert len(target["seconds"][name]) == 2
        assert target[f"{name}_utilisation"] == pytest.approx(
            target[f"{name}_flops_per_s"] / target["matmul_peak_flops_per_s"], rel=1e-9)
    assert target["ours_vs_official_speed"] == pytest.approx(
        min(target["seconds"]["official_graph_fp32_eager"]) / min(target["seconds"]["ours_fp32_sdpa"]), rel=1e-9)
    fast = results["fast_cpu"]
    assert fast["threads"] == 1 and fast["rounds"] == 2 and set(fast["batches"]) == {"1", "2"}
    assert set(fast["cpu_isa"]) >= {"avx512_vnni", "avx512_bf16", "amx_bf16"} and fast["modes"][-1] in ("bf16", "int8")
    assert "int8" in fast["modes"] and fast["auto_mode"] in ("bf16", "int8", "fp32")
    for row in fast["batches"].values():
        names = {"ours_fp32_sdpa", "official_graph_fp32_eager", *(f"fast_{m}" for m in fast["modes"])}
        assert set(row["seconds"]) == names and all(len(t) == 2 for t in row["seconds"].values())
        assert row["vs_official"]["official_graph_fp32_eager"] == 1.0
        for name, seconds in row["seconds"].items():
            assert row["vs_official"][name] == pytest.approx(
                min(row["seconds"]["official_graph_fp32_eager"]) / min(seconds), rel=1e-9)
    table = out_md.read_text()
    assert "Fast CPU path (DETRIS-tiny @56 forward, 1 threads" in table and "AMX-BF16" in table
    assert "| 2 | fast path int8 (backbone linears) |" in table
    assert table.startswith("Machine: ") and "| inference | DETRIS-tiny @56 | 2 | fp32 | sdpa |" in table
    assert "| training | DETRIS-tiny @56 | 2 | bf16 autocast | sdpa |" in table
    assert "data loading (official)" in table and "CPU target" in table
    fits = {(f["benchmark"], f["precision"], f["attention"]): f for f in results["memory_fits"]}
    assert set(fits) == {("inference", "fp32", "sdpa"), ("training", "fp32", "sdpa")}  # the batch sizes 1, 2 rows
    assert all(f["batch_sizes"] == [1, 2] and f["batch"] == 32 for f in fits.values())
    assert "Peak memory against batch size" in table


def test_memory_fit_is_least_squares_over_the_measured_batches():
    from benchmarks.bench_model import memory_fits

    def row(batch, mib, precision="fp32", **extra):
        return {"benchmark": "training", "preset": "large", "model": "DETRIS-L", "input_size": 448, "batch_size": batch,
                "precision": precision, "attention": "sdpa", "peak_memory_bytes": mib * 2**20, **extra}

    rows = [row(1, 3000), row(2, 5000), row(4, 9000), row(2, 7000, "bf16"), row(8, 1, "fp16", error="out of memory")]
    (fit,) = memory_fits(rows, batch=32)  # bf16 has one batch size, the failed fp16 point is left out
    assert fit["batch_sizes"] == [1, 2, 4] and fit["max_residual_bytes"] == pytest.approx(0, abs=1e-3)
    assert fit["per_sample_bytes"] == pytest.approx(2000 * 2**20) and fit["fixed_bytes"] == pytest.approx(1000 * 2**20)
    assert fit["predicted_bytes"] == pytest.approx(65000 * 2**20) and fit["measured_bytes"] is None
    (fit,) = memory_fits(rows + [row(32, 60000)], batch=32)
    assert fit["measured_bytes"] == 60000 * 2**20


def test_bench_rejects_unknown_options(capsys):
    from benchmarks.bench_model import main

    with pytest.raises(SystemExit):
        main(["--short", "--precisions", "fp8"])
    with pytest.raises(SystemExit):
        main(["--short", "--benchmarks", "inference,warp"])
    with pytest.raises(SystemExit):
        main(["--short", "--fast-cpu-modes", "int4"])
