"""`make gpu-check` (benchmarks/gpu_check.py): the dry run on the CPU runs every step with a tiny DETRIS and writes
the JSON and markdown reports, with the gaps to the GPU targets."""

import json

import pytest
import torch

from benchmarks.gpu_check import TARGETS, main, target_gaps


def test_dry_run_runs_every_step_and_writes_the_reports(tmp_path, one_thread):
    assert main(["--dry-run", "--device", "cpu", "--quiet", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu-dry-run.json").read_text())
    table = (tmp_path / "gpu-dry-run.md").read_text()
    assert results["dry_run"] is True and results["step_errors"] == {}
    assert set(results["step_seconds"]) == {"peak", "parity", "throughput", "evaluation"}
    assert results["peak_label"] == "bf16 256x256 matmul" and results["peak_flops_per_s"] > 0
    cases = {c["case"]: c for c in results["parity"]["cases"]}
    assert set(cases) == {"fp32 sdpa", "fp32 eager", "bf16 sdpa", "bf16 sdpa fused kernels only"}  # + flash_attn on CUDA
    assert cases["fp32 sdpa"]["met"] and cases["fp32 eager"]["met"]  # against the same model's fp32 CPU outputs
    assert 0 < cases["bf16 sdpa"]["logits_max_abs_diff"] < 1 and "error" not in cases["bf16 sdpa fused kernels only"]
    throughput = results["throughput"]
    assert [(r["role"], r["benchmark"]) for r in throughput] == [
        ("base", "inference"), ("base", "training"), ("large", "inference"), ("large", "training")]
    for r in throughput:
        assert "error" not in r, r
        assert r["utilisation"] == pytest.approx(r["achieved_flops_per_s"] / r["matmul_peak_flops_per_s"], rel=1e-9)
        assert r["peak_memory_bytes"] > 0 and r["batch_size"] == 2
    evaluation = results["evaluation"]
    assert evaluation["sentences"] == 8 and evaluation["seconds"] > 0 and evaluation["precision"] == "bf16"
    targets = results["targets"]
    assert len(targets) == 4 and all(t["gap"] >= 0 and t["met"] == (t["gap"] == 0) for t in targets)
    assert targets[2]["measured"] == pytest.approx(evaluation["seconds"] * 10_834 / 8)
    assert table.startswith("# GPU check (dry run: tiny sizes)")
    assert "| fp32 sdpa | every output within 0.0001 |" in table and "Targets:" in table


def test_gaps_to_the_targets():
    results = {
        "throughput": [
            {"role": "base", "benchmark": "inference", "model": "DETRIS-B", "batch_size": 32, "utilisation": 0.42},
            {"role": "base", "benchmark": "training", "model": "DETRIS-B", "batch_size": 32, "utilisation": 0.40},
            {"role": "large", "benchmark": "training", "model": "DETRIS-L", "batch_size": 32,
             "peak_memory_bytes": 91e9},
        ],
        "evaluation": {"model": "DETRIS-B", "sentences": 5417, "seconds": 6.0},
    }
    rows = target_gaps(results)
    assert [round(r["gap"], 6) for r in rows] == [0.08, 0.0, 0.0, 11.0]
    assert [r["met"] for r in rows] == [False, True, True, False]
    assert rows[2]["measured"] == pytest.approx(12.0) and rows[3]["goal"] == TARGETS["large_training_memory_gb"]


def test_a_full_run_needs_cuda_and_known_steps(capsys):
    if not torch.cuda.is_available():
        assert main(["--quiet"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["--dry-run", "--steps", "peak,warp"]) == 2
    assert "unknown steps ['warp']" in capsys.readouterr().err
