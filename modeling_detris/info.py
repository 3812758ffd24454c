"""Parameter accounting of a DETRIS model, counted from its module tree.

    detris info base                  # a preset, built on the meta device (no memory, no weights)
    detris info path/to/converted     # a saved model folder
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from configuration_detris.release import VARIANT_NAMES

# torch, transformers and the model are imported where used, so that `detris info --help` prints at once


@dataclass
class ParameterCounts:
    total: int
    frozen_backbone: int
    vision_backbone: int
    text_backbone: int
    dense_aligners: int
    text_adapters: int
    adapters: int
    neck: int
    decoder: int
    projector: int
    head: int
    trainable: int

    @property
    def adapters_percent_of_backbone(self) -> float:
        return 100.0 * self.adapters / self.frozen_backbone

    @property
    def dense_aligners_percent_of_vision(self) -> float:
        return 100.0 * self.dense_aligners / self.vision_backbone


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _adapter_params(module: torch.nn.Module, adapter_cls) -> list[torch.nn.Parameter]:
    return [p for sub in module.modules() if isinstance(sub, adapter_cls) for p in sub.parameters()]


def count_parameters(model) -> ParameterCounts:
    """Counts by role. The frozen backbone is everything in the two encoders that is not an adapter, plus CLIP's
    unused `logit_scale` (the official convention, which counts the whole CLIP text tower)."""
    from .modeling_detris import DenseAligner, TextAdapter

    dense = _numel(_adapter_params(model.vision_model, DenseAligner))
    text = _numel(_adapter_params(model.text_model, TextAdapter))
    vision_all = _numel(model.vision_model.parameters())
    text_all = _numel(model.text_model.parameters()) + model.logit_scale.numel()
    neck, decoder, projector = (_numel(m.parameters()) for m in (model.neck, model.decoder, model.projector))
    return ParameterCounts(
        total=_numel(model.parameters()),
        frozen_backbone=vision_all - dense + text_all - text,
        vision_backbone=vision_all - dense,
        text_backbone=text_all - text,
        dense_aligners=dense,
        text_adapters=text,
        adapters=dense + text,
        neck=neck,
        decoder=decoder,
        projector=projector,
        head=neck + decoder + projector,
        trainable=_numel(p for p in model.parameters() if p.requires_grad),
    )


HEAD_PREFIXES = ("neck.", "decoder.", "projector.")
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def release_sizes(model, dtype: torch.dtype | None = None) -> dict[str, dict[str, int]]:
    """What each folder of a release holds, counted from the model's state dict (works on the meta device), with
    floating-point tensors stored in `dtype` (`num_batches_tracked` stays int64; the safetensors header, some tens
    of kB, comes on top of `bytes`): `standalone` (the whole model), `base` (backbones + head, no adapters),
    `adapter` (adapters + head: the adapter folder of `detris convert --split-adapters`), `adapters_only` (an
    adapter folder saved with `modules_to_save=None`). Each: `parameters`, `statistics` (BatchNorm running
    statistics and counters), `bytes`. `dtype` None: float32."""
    import torch

    itemsize = torch.empty((), dtype=dtype or torch.float32, device="meta").element_size()
    sizes = {name: {"parameters": 0, "statistics": 0, "bytes": 0} for name in ("standalone", "base", "adapter", "adapters_only")}
    adapter_keys = set(model.adapter_state_dict())
    for key, tensor in model.state_dict().items():
        is_adapter, is_head = key in adapter_keys, key.startswith(HEAD_PREFIXES)
        kind = "statistics" if key.endswith(STATISTICS) else "parameters"
        nbytes = tensor.numel() * (itemsize if tensor.is_floating_point() else tensor.element_size())
        for folder, included in (("standalone", True), ("base", not is_adapter), ("adapter", is_adapter or is_head),
                                 ("adapters_only", is_adapter)):
            if included:
                sizes[folder][kind] += tensor.numel()
                sizes[folder]["bytes"] += nbytes
    return sizes


def format_sizes(model) -> str:
    """A markdown table of `release_sizes` in fp32 and bf16 (MB = 10^6 bytes)."""
    import torch

    fp32, bf16 = release_sizes(model, torch.float32), release_sizes(model, torch.bfloat16)
    labels = {
        "standalone": "whole model (`detris convert`, `to_standalone_model`)",
        "base": "base: backbones + head (`--split-adapters` base/)",
        "adapter": "adapter folder: adapters + head (`--split-adapters`)",
        "adapters_only": "adapters only (`modules_to_save=None`)",
    }
    lines = ["| folder | parameters | BatchNorm statistics | fp32 | bf16 |", "|---|---:|---:|---:|---:|"]
    for key, label in labels.items():
        lines.append(
            f"| {label} | {fp32[key]['parameters']:,d} | {fp32[key]['statistics']:,d} | "
            f"{fp32[key]['bytes'] / 1e6:.1f} MB | {bf16[key]['bytes'] / 1e6:.1f} MB |"
        )
    ratio = fp32["adapter"]["bytes"] / fp32["standalone"]["bytes"]
    lines.append(f"\nadapter folder / whole model: {ratio:.3f} (1/{1 / ratio:.1f}); tensor data only, without the file headers")
    return "\n".join(lines)


def load_for_counting(model_or_preset: str):
    """A preset name is built on the meta device (fast, no memory); anything else is loaded with `from_pretrained`."""
    import torch

    from configuration_detris import DetrisConfig
    from configuration_detris.configuration_detris import PRESET_ALIASES, PRESETS

    from .modeling_detris import DetrisForReferringSegmentation

    if model_or_preset.lower() in PRESETS or model_or_preset.lower() in PRESET_ALIASES:
        config = DetrisConfig.from_preset(model_or_preset)
        with torch.device("meta"):
            return DetrisForReferringSegmentation(config)
    if not Path(model_or_preset).is_dir() and not re.fullmatch(r"[\w.-]+/[\w.-]+", model_or_preset):
        raise ValueError(f"{model_or_preset!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder; "
                         "expected a preset, a saved DETRIS model folder or a Hub id ORG/NAME")
    return DetrisForReferringSegmentation.from_pretrained(model_or_preset)


def format_counts(counts: ParameterCounts, title: str) -> str:
    rows = [
        ("total", counts.total),
        ("frozen backbone (DINOv2 + CLIP text)", counts.frozen_backbone),
        ("  vision backbone", counts.vision_backbone),
        ("  text backbone", counts.text_backbone),
        ("trainable adapters", counts.adapters),
        ("  Dense Aligners", counts.dense_aligners),
        ("  text adapters", counts.text_adapters),
        ("trainable head", counts.head),
        ("  neck", counts.neck),
        ("  decoder", counts.decoder),
        ("  projector", counts.projector),
        ("trainable total", counts.trainable),
    ]
    lines = [title] + [f"  {name:<40s}{value:>14,d}" for name, value in rows]
    lines.append(
        f"adapters: {counts.adapters:,d} = {counts.adapters_percent_of_backbone:.2f} % of the frozen backbone "
        f"({counts.frozen_backbone:,d})"
    )
    lines.append(f"Dense Aligners / DINOv2 alone: {counts.dense_aligners_percent_of_vision:.2f} %")
    return "\n".join(lines)


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="detris info", description="DETRIS parameter counts")
    parser.add_argument("model", help=f"a preset ({', '.join(VARIANT_NAMES)}) or a model folder / Hub id")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--sizes", action="store_true",
                        help="print the sizes of the release folders (whole, base, adapter) in fp32 and bf16")
    return parser


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        model = load_for_counting(args.model)
    except (ValueError, OSError) as error:  # not a preset, folder or reachable repository: one line, exit code 2
        print(f"detris info: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if args.sizes:
        print(format_sizes(model))
        return 0
    counts = count_parameters(model)
    if args.json:
        print(json.dumps(dict(asdict(counts), adapters_percent_of_backbone=counts.adapters_percent_of_backbone), indent=2))
    else:
        print(format_counts(counts, f"DETRIS parameters: {args.model}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
