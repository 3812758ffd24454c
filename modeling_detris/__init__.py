"""DETRIS model. Importing this package registers `DetrisConfig` / `DetrisForReferringSegmentation` with
`AutoConfig` / `AutoModel`, and the DETRIS adapters (`DetrisAdapterConfig`, `peft_type="DETRIS"`) with peft."""

from transformers import AutoConfig, AutoModel

from configuration_detris import DetrisConfig

from .modeling_detris import (
    DetrisForReferringSegmentation,
    DetrisPreTrainedModel,
    DetrisSegmentationOutput,
)
from .peft_detris import DetrisAdapterConfig, DetrisAdapterModel, DetrisPeftType, to_standalone_model
from .tuner_layers import DenseAlignerLayer, TextAdapterLayer

AutoConfig.register(DetrisConfig.model_type, DetrisConfig, exist_ok=True)
AutoModel.register(DetrisConfig, DetrisForReferringSegmentation, exist_ok=True)

__all__ = [
    "DetrisConfig",
    "DetrisForReferringSegmentation",
    "DetrisPreTrainedModel",
    "DetrisSegmentationOutput",
    "DenseAlignerLayer",
    "TextAdapterLayer",
    "DetrisAdapterConfig",
    "DetrisAdapterModel",
    "DetrisPeftType",
    "to_standalone_model",
]
