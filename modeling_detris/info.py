"""Parameter accounting of a DETRIS model, counted from its module tree.

    detris info base                  # a preset, built on the meta device (no memory, no weights)
    detris info path/to/converted     # a saved model folder
"""

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from configuration_detris import DetrisConfig
from configuration_detris.configuration_detris import PRESET_ALIASES, PRESETS

from .tuner_layers import DenseAlignerLayer, TextAdapterLayer


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


def _adapter_params(module: nn.Module, layer_cls) -> list[nn.Parameter]:
    params = []
    for sub in module.modules():
        if isinstance(sub, layer_cls):
            for name in sub.adapter_layer_names:
                params.extend(getattr(sub, name).parameters())
    return params


def count_parameters(model) -> ParameterCounts:
    """Counts by role. The frozen backbone is everything in the two encoders that is not an adapter, plus CLIP's
    unused `logit_scale` (the official convention, which counts the whole CLIP text tower)."""
    dense = _numel(_adapter_params(model.vision_model, DenseAlignerLayer))
    text = _numel(_adapter_params(model.text_model, TextAdapterLayer))
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


def load_for_counting(model_or_preset: str):
    """A preset name is built on the meta device (fast, no memory); anything else is loaded with `from_pretrained`."""
    from .modeling_detris import DetrisForReferringSegmentation

    if model_or_preset.lower() in PRESETS or model_or_preset.lower() in PRESET_ALIASES:
        config = DetrisConfig.from_preset(model_or_preset)
        with torch.device("meta"):
            return DetrisForReferringSegmentation(config)
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
    parser.add_argument("model", help=f"a preset ({', '.join(PRESETS)}) or a model folder / Hub id")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    counts = count_parameters(load_for_counting(args.model))
    if args.json:
        print(json.dumps(dict(asdict(counts), adapters_percent_of_backbone=counts.adapters_percent_of_backbone), indent=2))
    else:
        print(format_counts(counts, f"DETRIS parameters: {args.model}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
