"""DETRIS configuration. Importing this package registers `DetrisConfig` with `AutoConfig`."""

from transformers import AutoConfig

from .configuration_detris import ADAPTER_INIT_MODES, PRESET_ALIASES, PRESETS, DetrisAdapterSettings, DetrisConfig

AutoConfig.register(DetrisConfig.model_type, DetrisConfig, exist_ok=True)

__all__ = ["ADAPTER_INIT_MODES", "DetrisAdapterSettings", "DetrisConfig", "PRESETS", "PRESET_ALIASES"]
