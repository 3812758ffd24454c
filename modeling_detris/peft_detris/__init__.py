"""The DETRIS adapters as a PEFT method, built on the model and laid out like peft's own tuners:

- `config.py`: `DetrisPeftType` (`DETRIS`) and `DetrisAdapterConfig` (the adapter fields of `DetrisConfig`);
- `layer.py`: the tuner layers `DenseAlignerLayer` / `TextAdapterLayer`, holding the model's own adapter modules;
- `model.py`: the tuner `DetrisAdapterModel`, the standalone <-> PEFT key mapping, `to_standalone_model` and
  `split_standalone_model`.

The standalone model (`modeling_detris.modeling_detris`) imports nothing of this package or of peft. Importing the
`modeling_detris` package registers the method with peft (`register_detris_peft`). peft's `PeftType` is a closed
Enum and `register_peft_method` refuses names outside it, so the registration inserts `DetrisPeftType.DETRIS` into
peft's type -> config / tuner / prefix mappings directly. Without it, peft cannot read a DETRIS
`adapter_config.json` (`KeyError: 'DETRIS'`): peft has no plug-in discovery.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .config import DetrisAdapterConfig, DetrisPeftType, adapter_presets
from .layer import DenseAlignerLayer, DetrisLayer, TextAdapterLayer
from .model import (
    LEGACY_KEY_MAPPING,
    MERGE_MESSAGE,
    DetrisAdapterModel,
    is_adapter_key,
    split_standalone_model,
    standalone_key,
    to_standalone_model,
)


def register_detris_peft() -> None:
    """Make peft know `peft_type="DETRIS"` (idempotent). Refuses to overwrite another method's entry or prefix."""
    peft_type = DetrisPeftType.DETRIS
    for mapping, value in (
        (PEFT_TYPE_TO_CONFIG_MAPPING, DetrisAdapterConfig),
        (PEFT_TYPE_TO_TUNER_MAPPING, DetrisAdapterModel),
        (PEFT_TYPE_TO_PREFIX_MAPPING, DetrisAdapterModel.prefix),
    ):
        existing = mapping.get(peft_type)
        if existing is not None and existing is not value and getattr(existing, "__qualname__", existing) != getattr(value, "__qualname__", value):
            raise RuntimeError(f"peft already maps {peft_type.value!r} to {existing!r}, expected {value!r}")
    for other, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if prefix == DetrisAdapterModel.prefix and other != peft_type:
            raise RuntimeError(f"peft method {other!r} already uses the prefix {prefix!r}")
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = DetrisAdapterConfig
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = DetrisAdapterModel
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = DetrisAdapterModel.prefix


__all__ = [
    "LEGACY_KEY_MAPPING",
    "DenseAlignerLayer",
    "DetrisAdapterConfig",
    "DetrisAdapterModel",
    "DetrisLayer",
    "DetrisPeftType",
    "MERGE_MESSAGE",
    "TextAdapterLayer",
    "adapter_presets",
    "is_adapter_key",
    "register_detris_peft",
    "split_standalone_model",
    "standalone_key",
    "to_standalone_model",
]
