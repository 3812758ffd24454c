"""Device-agnostic measuring tools for the DETRIS benchmarks: the machine's matmul peak, timers that synchronise the
accelerator, peak-memory meters, FLOP counting on the meta device and the CPU allocator setting used for speed.

Everything runs on CPU and on CUDA; CUDA-only calls (`torch.cuda.synchronize`, `max_memory_allocated`) are behind
`device.type == "cuda"` checks.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import statistics
import threading
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# The reference peak of each kind of machine (docs/benchmarks.md, Targets): fp32 2048^2 on CPU, bf16 8192^2 on GPU.
PEAK_MATMUL = {"cpu": (torch.float32, 2048), "cuda": (torch.bfloat16, 8192)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch.cuda.is_available() is False")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- the machine -------------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    from modeling_detris import native_low_precision_cpu
    from modeling_detris.quantization_detris import cpu_flags, cpu_info, cpu_isa

    cpu_name, flags = cpu_info("model name") or platform.processor() or platform.machine(), cpu_flags()
    info = {
        "device": str(device),
        "cpu": cpu_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")),
        "cpu_bf16_matmul_fast": native_low_precision_cpu(torch.bfloat16),
        "cpu_isa": cpu_isa(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return info


def machine_label(info: dict) -> str:
    if info["device"].startswith("cuda"):
        return f"{info['gpu']} (torch {info['torch']}, CUDA {info.get('cuda')})"
    native = "native bf16" if info["cpu_native_bf16"] else "no native bf16"
    return (f"{info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads, "
            f"{info['cpu_capability']}, {native} (torch {info['torch']})")


class MatmulMeter:
    """The machine's matmul rate, re-measured as often as wanted (side by side with the model): the best of
    `repeats` timed `size`^2 matmuls into a preallocated output."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None, size: int | None = None, repeats: int = 3):
        default_dtype, default_size = PEAK_MATMUL.get(device.type, PEAK_MATMUL["cpu"])
        self.device, self.dtype, self.size = device, dtype or default_dtype, size or default_size
        self.repeats = repeats
        generator = torch.Generator(device="cpu").manual_seed(0)
        self.a = torch.randn(self.size, self.size, generator=generator).to(device, self.dtype)
        self.b = torch.randn(self.size, self.size, generator=generator).to(device, self.dtype)
        self.out = torch.empty(self.size, self.size, device=device, dtype=self.dtype)
        self.flops = 2 * self.size**3
        self.samples: list[float] = []
        torch.matmul(self.a, self.b, out=self.out)  # warm-up
        synchronize(device)

    def measure(self) -> float:
        best = float("inf")
        for _ in range(self.repeats):
            synchronize(self.device)
            start = time.perf_counter()
            torch.matmul(self.a, self.b, out=self.out)
            synchronize(self.device)
            best = min(best, time.perf_counter() - start)
        rate = self.flops / best
        self.samples.append(rate)
        return rate

    @property
    def label(self) -> str:
        return f"{_dtype_name(self.dtype)} {self.size}x{self.size} matmul"


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


# ----- timing ------------------------------------------------------------------------------------------------------
def alternate(device: torch.device, meter: MatmulMeter, fn, iterations: int, warmup: int = 1) -> dict:
    """Runs `fn` `iterations` times, each one between two matmul-rate measurements (mm, fn, mm, fn, ..., mm), so
    that the model and the peak it is compared with see the same machine state. Returns the per-iteration seconds,
    the matmul rates and the two estimates of the ratio: best against best (the minimum-time rule for noisy
    machines) and the median of per-iteration ratios against the mean of the two neighbouring matmuls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    rates = [meter.measure()]
    times = []
    for _ in range(iterations):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        rates.append(meter.measure())
    return {"seconds": times, "matmul_flops_per_s": rates}


def summarise(times: list[float], rates: list[float], flops_per_iteration: float, items_per_iteration: int) -> dict:
    best_time, median_time = min(times), statistics.median(times)
    peak = max(rates)
    neighbours = [(rates[i] + rates[i + 1]) / 2 for i in range(len(times))]
    paired = [flops_per_iteration / t / r for t, r in zip(times, neighbours)]
    return {
        "items_per_s": items_per_iteration / best_time,
        "items_per_s_median": items_per_iteration / median_time,
        "seconds_per_iteration": times,
        "achieved_flops_per_s": flops_per_iteration / best_time,
        "matmul_peak_flops_per_s": peak,
        "matmul_flops_per_s": rates,
        "utilisation": flops_per_iteration / best_time / peak,
        "utilisation_paired_median": statistics.median(paired),
    }


# ----- memory ------------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of the code run inside the context.

    CUDA: `torch.cuda.max_memory_allocated` (everything allocated by torch on the device, weights included).
    CPU: the resident set size sampled every millisecond by a thread, minus the resident size on entry, plus
    `baseline_bytes` (pass the weights' size); the glibc allocator is set to return freed blocks at once for the
    duration (see `cpu_allocator`), so the RSS follows the live tensors rather than the allocator's cache."""

    def __init__(self, device: torch.device, baseline_bytes: int = 0, interval: float = 0.001):
        self.device, self.baseline, self.interval = device, baseline_bytes, interval
        self.peak_bytes: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._allocator = cpu_allocator("release")
        self._allocator.__enter__()
        self._start = _rss_bytes()
        self._max = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._max = max(self._max, _rss_bytes())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return False
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, _rss_bytes())
        self._allocator.__exit__(*exc)
        self.peak_bytes = int(self._max - self._start + self.baseline)
        return False


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# ----- the CPU allocator -------------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def _libc():
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_ALLOCATOR_MODES = ["default"]  # stack of the active modes (contexts nest)


def _apply_allocator_mode(libc, mode: str) -> None:
    if mode == "keep":
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    elif mode == "release":
        libc.malloc_trim(0)
        libc.mallopt(_M_MMAP_MAX, 65536)
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    else:  # glibc's defaults, except that the mmap threshold stays fixed once it has been set
        libc.mallopt(_M_MMAP_MAX, 65536)
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)


@contextlib.contextmanager
def cpu_allocator(mode: str):
    """glibc `malloc` settings for the duration (no effect on other C libraries); contexts nest.

    - `"keep"`: large blocks come from the heap and freed memory is kept (`M_MMAP_MAX=0`, no trimming). By default
      glibc gives every block over its mmap threshold (at most 32 MB) back to the kernel on free, so each new
      activation tensor of a DETRIS forward page-faults its memory again (a [2058, 3072] fp32 MLP activation: about
      6,000 faults, 20-25 ms on these machines).
    - `"release"`: every block over 64 kB is mmapped and returned on free, so the resident size follows the live
      tensors (used to measure peak memory on CPU).
    - `"default"`: glibc's settings.
    On exit the enclosing mode is restored."""
    if mode not in ("keep", "release", "default"):
        raise ValueError(f"unknown allocator mode {mode!r}")
    libc = _libc()
    if libc is None:
        yield
        return
    _ALLOCATOR_MODES.append(mode)
    _apply_allocator_mode(libc, mode)
    try:
        yield
    finally:
        _ALLOCATOR_MODES.pop()
        _apply_allocator_mode(libc, _ALLOCATOR_MODES[-1])


# ----- FLOPs -------------------------------------------------------------------------------------------------------
def count_flops(fn) -> int:
    """FLOPs of the matmuls and convolutions `fn` runs (torch's FlopCounterMode; elementwise work is not counted)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


_FLOP_CACHE: dict[tuple[str, int], dict] = {}


def count_model_flops(config, batch_size: int = 1) -> dict:
    """Counted FLOPs of one DETRIS forward (eval) and one training step (forward + backward with the official
    trainable set: adapters and head), per sample. Counted on the meta device: no memory, no time, exact shapes.
    Attention is counted as its two matmuls whichever implementation runs (same arithmetic)."""
    from modeling_detris import DetrisForReferringSegmentation

    key = (config.to_json_string(use_diff=False), batch_size)
    if key in _FLOP_CACHE:
        return dict(_FLOP_CACHE[key])
    with torch.device("meta"):
        model = DetrisForReferringSegmentation(config)
    pixel_values, input_ids, labels = make_inputs(config, batch_size, torch.device("meta"))
    model.eval()
    with torch.no_grad():
        forward = count_flops(lambda: model(pixel_values=pixel_values, input_ids=input_ids))
    model.train()

    def step():
        model(pixel_values=pixel_values, input_ids=input_ids, labels=labels).loss.backward()

    train = count_flops(step)
    _FLOP_CACHE[key] = {"forward_per_sample": forward / batch_size, "train_step_per_sample": train / batch_size}
    return dict(_FLOP_CACHE[key])


def make_inputs(config, batch_size: int, device: torch.device, seed: int = 0):
    """Random letterboxed-image-like pixel values (float32, as the processor gives), CLIP-like ids (SOT, words,
    EOT, zero padding; lengths vary across the batch) and binary labels."""
    size, length = config.input_size, config.word_len
    sot, eot = config.text_config.bos_token_id, config.text_config.eos_token_id
    if device.type == "meta":
        pixel_values = torch.empty(batch_size, 3, size, size, device=device)
        input_ids = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        labels = torch.empty(batch_size, size, size, device=device)
        return pixel_values, input_ids, labels
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    input_ids = torch.zeros(batch_size, length, dtype=torch.long)
    for row in range(batch_size):
        words = 1 + (row * 5 + 3) % (length - 2)
        input_ids[row, 0] = sot
        input_ids[row, 1 : 1 + words] = torch.randint(1, min(sot, eot), (words,), generator=generator)
        input_ids[row, 1 + words] = eot
    labels = (torch.rand(batch_size, size, size, generator=generator) > 0.5).float()
    return pixel_values.to(device), input_ids.to(device), labels.to(device)
