"""`detris bench`: DETRIS throughput, memory and utilisation on this machine (CPU, or CUDA when present).

What is measured (each figure with its utilisation = counted FLOP/s / the matmul peak measured in the same run,
fp32 2048^2 on CPU, bf16 8192^2 on GPU, re-measured between the model's iterations: mm, model, mm, model, ..., mm):

- ``inference``: images/s of ``model(pixel_values, input_ids)`` (eval, ``inference_mode``), the model loaded in the
  precision (``dtype=torch.bfloat16`` etc.), eager or SDPA attention, several batch sizes;
- ``training``: samples/s of one optimiser step (forward with labels, backward, Adam step, ``zero_grad``) with the
  official trainable set (adapters + head; backbones frozen), fp32 parameters and ``torch.autocast`` for bf16 /
  fp16 (GradScaler for fp16 on CUDA); no host-device synchronisation inside the step;
- ``evaluation``: sentences/s of ``training.evaluation.evaluate_model`` end to end on synthetic RefCOCO-like data
  (JPEG decode, letterbox, tokenisation, forward, post-processing to the original size, IoU counts);
- ``data``: data-loader samples/s per core (``benchmarks/bench_data.py``; no FLOPs, so no utilisation);
- ``target`` (CPU): the CPU target check (docs/benchmarks.md, Targets), DETRIS-B forward at batch 2 with 2 threads,
  alternating with the matmul: ours fp32 (SDPA), the official implementation's graph (fp32, eager attention) and ours
  loaded in bf16;
- ``fast_cpu`` (CPU): the fast CPU path (``modeling_detris.quantization_detris.optimize_for_cpu``: bf16 and / or
  int8) beside ours fp32 and the official graph, DETRIS-B forward at batch 1 and 2, 2 threads, alternating rounds,
  as speed ratios; the CPU features that decide the path (VNNI, AVX512-BF16, AMX) are printed with the table.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the actual model (meta device): DETRIS-B
313.0 GFLOPs per 448 image forward (the official code costs 316.2, counted the same way: its text gates also project
the pixels through q/k/out, 3.2 GFLOPs that cannot change the output, see ``TextGate`` and docs/benchmarks.md).

Model weights are random (``DetrisForReferringSegmentation(DetrisConfig.from_preset(...))``): nothing is downloaded.
By default the grid varies one factor at a time around a reference point (batch 2 on CPU / 32 on GPU, SDPA, fp32
on CPU / bf16 on GPU); ``--full-grid`` runs every combination. ``--short`` runs a tiny DETRIS in a few seconds
(the test suite's smoke test).

    detris bench [--device auto|cpu|cuda] [--presets base,large] [--batch-sizes 1,2,4] [--precisions fp32,bf16,fp16]
                 [--attention sdpa,eager] [--benchmarks inference,training,evaluation,data,target,fast_cpu]
                 [--full-grid] [--compile] [--json bench.json] [--markdown bench.md] [--short]

Method, results and the speed work: docs/benchmarks.md.
"""

import argparse

ALL_BENCHMARKS = ("inference", "training", "evaluation", "data", "target", "fast_cpu")


def csv_list(cast):
    return lambda text: [cast(x) for x in text.split(",") if x]


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detris bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    p.add_argument("--short", action="store_true",
                   help="tiny DETRIS, two iterations, 256^2 matmul, one-thread target check: a smoke test of seconds")
    p.add_argument("--presets", type=csv_list(str), default=None, help="comma list of base, large, tiny (default base,large)")
    p.add_argument("--input-size", type=int, default=None, help="input side (default the preset's, 448)")
    p.add_argument("--batch-sizes", type=csv_list(int), default=None, help="default 1,2,4 on CPU, 1,8,32,64 on CUDA")
    p.add_argument("--reference-batch", type=int, default=None, help="batch of the one-factor grid (2 CPU / 32 CUDA)")
    p.add_argument("--precisions", type=csv_list(str), default=None, help="comma list of fp32, bf16, fp16 (default all)")
    p.add_argument("--reference-precision", default=None, help="fp32 on CPU, bf16 on CUDA")
    p.add_argument("--attention", type=csv_list(str), default=["sdpa", "eager"], help="sdpa,eager (first = reference)")
    p.add_argument("--full-grid", action="store_true", help="every combination instead of one factor at a time")
    p.add_argument("--benchmarks", type=csv_list(str), default=list(ALL_BENCHMARKS), help=f"subset of {','.join(ALL_BENCHMARKS)}")
    p.add_argument("--iterations", type=int, default=None, help="timed iterations per point (3 CPU / 10 CUDA)")
    p.add_argument("--inner", type=int, default=None, help="model calls per timed iteration (1 CPU / 5 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model for the inference / training points (compilation is in the warm-up)")
    p.add_argument("--allocator", choices=("keep", "default"), default="keep",
                   help="CPU malloc: keep freed memory (default; avoids page faults) or glibc's defaults")
    p.add_argument("--matmul-size", type=int, default=None, help="peak matmul side (2048 CPU / 8192 CUDA)")
    p.add_argument("--eval-sentences", type=int, default=None, help="sentences in the evaluation benchmark (16 CPU / 3811 CUDA)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="(8 CPU / 64 CUDA)")
    p.add_argument("--eval-precisions", type=csv_list(str), default=None, help="(fp32 CPU / bf16,fp32 CUDA)")
    p.add_argument("--eval-workers", type=int, default=None, help="data-loader workers in the evaluation (0 CPU / 8 CUDA)")
    p.add_argument("--target-rounds", type=int, default=None, help="alternating rounds of the CPU target check (5)")
    p.add_argument("--target-threads", type=int, default=None, help="threads of the CPU target check (2)")
    p.add_argument("--fast-cpu-modes", type=csv_list(str), default=None,
                   help="fast CPU paths to time (bf16,int8; default: int8, and bf16 where the CPU has it natively)")
    p.add_argument("--fast-cpu-batch-sizes", type=csv_list(int), default=[1, 2], help="batch sizes of fast_cpu (1,2)")
    p.add_argument("--memory-fit-batch", type=int, default=32,
                   help="batch size at which the peak-memory fits are evaluated (the DETRIS-L goal: 32)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the markdown table here")
    p.add_argument("--quiet", action="store_true")
    return p
