"""The DETRIS adapters as a PEFT method, laid out like peft's own tuners:

- `config.py`: `DetrisPeftType` (`DETRIS`) and `DetrisAdapterConfig`;
- `layer.py`: the tuner layers `DenseAlignerLayer` / `TextAdapterLayer` (implemented in `modeling_detris.tuner_layers`);
- `model.py`: the tuner `DetrisAdapterModel` and `to_standalone_model`.

Importing this package (which `import modeling_detris` does) registers the method with peft. peft's `PeftType` is a
closed Enum and `register_peft_method` refuses names outside it, so the registration inserts `DetrisPeftType.DETRIS`
into peft's type -> config / tuner / prefix mappings directly. Without the import, peft cannot read a DETRIS
`adapter_config.json`: `PeftConfig.from_pretrained`, `PeftModel.from_pretrained`, `model.load_adapter` and
`AutoModel.from_pretrained(<adapter dir>)` raise `KeyError: 'DETRIS'` (peft has no plug-in discovery).
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .config import DetrisAdapterConfig, DetrisPeftType, adapter_presets
from .layer import DenseAlignerLayer, DetrisTunerLayer, TextAdapterLayer
from .model import MERGE_MESSAGE, DetrisAdapterModel, release_side_inputs, split_standalone_model, to_standalone_model


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


register_detris_peft()

__all__ = [
    "DenseAlignerLayer",
    "DetrisAdapterConfig",
    "DetrisAdapterModel",
    "DetrisPeftType",
    "DetrisTunerLayer",
    "MERGE_MESSAGE",
    "TextAdapterLayer",
    "adapter_presets",
    "register_detris_peft",
    "release_side_inputs",
    "split_standalone_model",
    "to_standalone_model",
]
