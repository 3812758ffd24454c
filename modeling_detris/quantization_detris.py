"""A fast CPU inference path for a loaded DETRIS model, chosen by the CPU's instruction set.

    model = AutoModel.from_pretrained("path/or/hub-id").eval()
    model = optimize_for_cpu(model)            # mode="auto": "bf16", "int8" or "fp32" by the CPU
    logits = model(pixel_values=..., input_ids=...).logits

Modes:

- ``"bf16"``: every parameter and buffer in bfloat16 (what ``from_pretrained(..., dtype=torch.bfloat16)`` loads). On
  CPUs with native bf16 matrix units (AMX-BF16, or AVX512-BF16) oneDNN runs the linear layers, convolutions and
  attention in bf16 with fp32 accumulation; a DETRIS-B forward is several times faster than fp32 there.
  Convolution weights are stored channels-last (both fast modes), which spares oneDNN a reorder per call.
- ``"int8"``: the linear layers of the two backbones (DINOv2 blocks and CLIP text layers) get int8 weights
  (per output channel) and int8 activations quantised on the fly per call (``torch.ao.quantization.quantize_dynamic``,
  fbgemm / x86 kernels, fast with AVX512-VNNI or AVX-VNNI). The DETRIS adapters, neck, decoder and projector stay
  fp32: they are a small share of the compute and quantising them costs most of the accuracy.
- ``"fp32"``: the model unchanged.

``"auto"`` picks ``"bf16"`` where the CPU has native bf16, else ``"int8"`` where it has VNNI, else ``"fp32"``
(:func:`cpu_fast_path`). Masks post-processed from either fast path agree with the fp32 masks at IoU >= 0.98.

Saving: the bf16 model saves and reloads as usual (``save_pretrained`` / ``from_pretrained(dtype=torch.bfloat16)``).
An int8 model is not saved: apply ``optimize_for_cpu`` after loading the fp32 (or bf16) folder; quantising DETRIS-B
takes about a second.
"""

from __future__ import annotations

import re
import warnings
from functools import lru_cache

import torch
from torch import nn

CPU_MODES = ("auto", "bf16", "int8", "fp32")

# Linear layers that the int8 path quantises: the frozen backbones' attention and MLP projections. Names are matched
# against `model.named_modules()` (also under a peft wrapper's `base_model.model.` prefix); adapters live under
# `detris_*` submodules and are excluded explicitly.
INT8_LINEAR_PATTERN = re.compile(r"(?:^|\.)(vision_model|text_model)\..*\.(attention|self_attn|mlp)\.(?:base_layer\.)?"
                                 r"(q_proj|k_proj|v_proj|o_proj|out_proj|fc1|fc2)$")
INT8_EXCLUDED_PART = "detris_"


def cpu_info(field: str) -> str | None:
    """The value of `field` ("flags", "model name", ...) of the first CPU in /proc/cpuinfo; None where there is none."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    return frozenset((cpu_info("flags") or "").split())


@lru_cache(maxsize=None)
def cpu_isa() -> dict:
    """The CPU features that decide the fast path: `{"avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
    "amx_int8": bool, "onednn_bf16": bool}` (the last: torch's oneDNN runs bf16 natively on this CPU)."""
    flags = cpu_flags()
    isa = {name: name in flags for name in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")}
    try:
        isa["onednn_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        isa["onednn_bf16"] = False
    return isa


def cpu_fast_path(isa: dict | None = None) -> str:
    """The mode `optimize_for_cpu(mode="auto")` uses on a CPU with features `isa` (default: this CPU's):
    `"bf16"` with native bf16 matrix instructions (AMX-BF16 or AVX512-BF16), else `"int8"` with VNNI, else
    `"fp32"` (no fast path measured: bf16 is emulated and slower, int8 without VNNI was not measured)."""
    isa = cpu_isa() if isa is None else isa
    if (isa.get("amx_bf16") or isa.get("avx512_bf16")) and isa.get("onednn_bf16", True):
        return "bf16"
    if isa.get("avx512_vnni") or isa.get("avx_vnni"):
        return "int8"
    return "fp32"


def int8_linear_names(model: nn.Module) -> list[str]:
    """Names of the `nn.Linear` modules the int8 path quantises (see `INT8_LINEAR_PATTERN`)."""
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and INT8_EXCLUDED_PART not in name and INT8_LINEAR_PATTERN.search(name)]


def quantize_backbone_linears(model: nn.Module) -> nn.Module:
    """In place: int8 dynamic quantisation (per-channel int8 weights, int8 activations per call, fp32 output) of
    the backbones' linear layers; everything else stays in its dtype."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = int8_linear_names(model)
    if not names:
        raise ValueError(f"no backbone nn.Linear found to quantise in {type(model).__name__}")
    with warnings.catch_warnings():
        # torch marks its eager quantisation API as deprecated in favour of torchao, whose eager int8 path is
        # several times slower on CPU; the torch kernels are the fast ones here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*deprecated")
        quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8, inplace=True)
    return model


def optimize_for_cpu(model: nn.Module, mode: str = "auto") -> nn.Module:
    """Prepare a loaded fp32 DETRIS model for fast CPU inference and return it (in eval mode, changed in place).

    Args:
        model: a `DetrisForReferringSegmentation` (or any model with the same backbone layout) on the CPU.
        mode: `"auto"` (by the CPU, see `cpu_fast_path`), `"bf16"`, `"int8"` or `"fp32"` (unchanged).

    The chosen mode is stored as `model.cpu_inference_mode`. Inputs stay as the processor gives them
    (`pixel_values` float32 `(B, 3, S, S)`, `input_ids` `(B, L)`); the bf16 model returns bf16 logits, the others fp32.
    Inference only: the int8 model has no gradients for the quantised layers.
    """
    if mode not in CPU_MODES:
        raise ValueError(f"optimize_for_cpu: mode must be one of {CPU_MODES}, got {mode!r}")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"optimize_for_cpu: the model must be on the CPU, its parameters are on {sorted(devices)}")
    chosen = cpu_fast_path() if mode == "auto" else mode
    model.eval()
    if chosen == "int8" and any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("optimize_for_cpu(mode='int8') needs an fp32 model; load it without `dtype=`")
    if chosen != "fp32":
        # oneDNN convolutions keep channels-last activations without reordering them on every call (same values)
        model.to(memory_format=torch.channels_last)
    if chosen == "bf16":
        model.to(torch.bfloat16)
    elif chosen == "int8":
        quantize_backbone_linears(model)
    model.cpu_inference_mode = chosen
    return model


__all__ = [
    "CPU_MODES", "cpu_fast_path", "cpu_flags", "cpu_info", "cpu_isa", "int8_linear_names", "optimize_for_cpu",
    "quantize_backbone_linears",
]
