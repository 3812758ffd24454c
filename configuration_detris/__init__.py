"""DETRIS configuration. Taking a name from this package (`from configuration_detris import DetrisConfig`) registers
`DetrisConfig` with `AutoConfig`.

The names are loaded on first use, so that `configuration_detris.release` (the release facts: plain tables) can be
read without importing transformers or torch.
"""

import importlib


def __getattr__(name: str):
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(".configuration_detris", __name__)
    if not hasattr(module, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from transformers import AutoConfig

    AutoConfig.register(module.DetrisConfig.model_type, module.DetrisConfig, exist_ok=True)
    value = getattr(module, name)
    globals()[name] = value
    return value


__all__ = ["ADAPTER_INIT_MODES", "DetrisAdapterSettings", "DetrisConfig", "PRESETS", "PRESET_ALIASES"]
