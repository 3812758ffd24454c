"""DETRIS configuration. Importing this package registers `DetrisConfig` with `AutoConfig`."""

from transformers import AutoConfig

from .configuration_detris import PRESETS, DetrisConfig

AutoConfig.register(DetrisConfig.model_type, DetrisConfig, exist_ok=True)

__all__ = ["DetrisConfig", "PRESETS"]
