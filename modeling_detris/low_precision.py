"""bf16 / fp16 DETRIS on CPUs without native low-precision matrix arithmetic.

PyTorch runs bf16 and fp16 matrix products and convolutions on the CPU through oneDNN only when the CPU supports them
(AVX512-BF16 / AMX, or at least AVX-512 for oneDNN's bf16 path). Elsewhere (e.g. AVX2-only CPUs such as AMD Zen 2/3)
they fall back to scalar reference kernels that are 50-500x slower than fp32: a DETRIS-B forward in bf16 takes
minutes instead of seconds, almost all of it in `_slow_conv2d_forward` and bf16 `addmm`.

`low_precision_emulation` fixes that for the ops that matter (linear, convolutions, matmuls, SDPA) the way native bf16
hardware computes them: low-precision inputs and weights, fp32 accumulation, output rounded to the low-precision
dtype. Only the arithmetic inside these ops is widened; every tensor between ops stays bf16 / fp16, so the model
still runs end to end in its dtype (same memory, same rounding points). Under `torch.autocast("cpu", bf16/fp16)`
the same ops get autocast's semantics (inputs rounded to the autocast dtype, output in that dtype). Nothing changes
for fp32, on accelerators, or on CPUs with native support.
"""

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)

# Ops whose low-precision CPU fallback kernels are slow; all of them accumulate in fp32 on native hardware.
_WIDENED_OPS = frozenset(
    {
        F.linear,
        F.conv1d,
        F.conv2d,
        F.scaled_dot_product_attention,
        torch.matmul,
        torch.mm,
        torch.bmm,
        torch.addmm,
        torch.baddbmm,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.Tensor.mm,
        torch.Tensor.bmm,
    }
)


@functools.lru_cache(maxsize=None)
def native_low_precision_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU runs `dtype` matmuls / convolutions through oneDNN (fast) rather than reference kernels."""
    if dtype not in LOW_PRECISION_DTYPES:
        return True
    name = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):
        return False


class _WidenLowPrecisionOps(TorchFunctionMode):
    """Runs the ops of `_WIDENED_OPS` in fp32 on low-precision CPU tensors and rounds their output back."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _WIDENED_OPS:
            return func(*args, **kwargs)
        autocast_dtype = None
        if torch.is_autocast_enabled("cpu"):
            autocast_dtype = torch.get_autocast_dtype("cpu")
            if autocast_dtype not in LOW_PRECISION_DTYPES or native_low_precision_cpu(autocast_dtype):
                autocast_dtype = None
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if autocast_dtype is not None:
            target = autocast_dtype
        else:
            dtypes = {t.dtype for t in tensors}
            if len(dtypes) != 1 or not all(t.device.type == "cpu" for t in tensors):
                return func(*args, **kwargs)
            target = dtypes.pop()
            if target not in LOW_PRECISION_DTYPES or native_low_precision_cpu(target):
                return func(*args, **kwargs)

        def widen(value):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.to(target).float()  # rounded to the low precision first, as autocast / storage would
            return value

        with torch.autocast("cpu", enabled=False):
            out = func(*(widen(a) for a in args), **{k: widen(v) for k, v in kwargs.items()})
        return out.to(target)


def needs_low_precision_emulation(device: torch.device, dtype: torch.dtype) -> bool:
    """True on a CPU without native support when the parameters (`dtype`) or an active CPU autocast are bf16 / fp16."""
    if torch.device(device).type != "cpu":
        return False
    if dtype in LOW_PRECISION_DTYPES and not native_low_precision_cpu(dtype):
        return True
    if torch.is_autocast_enabled("cpu"):
        autocast_dtype = torch.get_autocast_dtype("cpu")
        return autocast_dtype in LOW_PRECISION_DTYPES and not native_low_precision_cpu(autocast_dtype)
    return False


def low_precision_emulation(device: torch.device, dtype: torch.dtype):
    """Context for a forward pass of a model with parameters of `dtype` on `device`: widens the slow low-precision
    CPU ops when needed (see the module docstring), else does nothing."""
    if needs_low_precision_emulation(device, dtype):
        return _WidenLowPrecisionOps()
    return contextlib.nullcontext()


__all__ = ["low_precision_emulation", "native_low_precision_cpu", "needs_low_precision_emulation"]
