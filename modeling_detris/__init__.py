"""DETRIS model. Importing this package registers `DetrisConfig` / `DetrisForReferringSegmentation` with
`AutoConfig` / `AutoModel`, and the DETRIS adapters (`DetrisAdapterConfig`, `peft_type="DETRIS"`) with peft."""

from transformers import AutoConfig, AutoModel

from configuration_detris import DetrisConfig

from .modeling_detris import (
    DenseAligner,
    DetrisForReferringSegmentation,
    DetrisPreTrainedModel,
    DetrisSegmentationOutput,
    TextAdapter,
    adapter_base_model_path,
    native_low_precision_cpu,
)
from .peft_detris import (
    DenseAlignerLayer,
    DetrisAdapterConfig,
    DetrisAdapterModel,
    DetrisPeftType,
    TextAdapterLayer,
    register_detris_peft,
    to_standalone_model,
)

AutoConfig.register(DetrisConfig.model_type, DetrisConfig, exist_ok=True)
AutoModel.register(DetrisConfig, DetrisForReferringSegmentation, exist_ok=True)
register_detris_peft()

__all__ = [
    "DenseAligner",
    "DenseAlignerLayer",
    "DetrisAdapterConfig",
    "DetrisAdapterModel",
    "DetrisConfig",
    "DetrisForReferringSegmentation",
    "DetrisPeftType",
    "DetrisPreTrainedModel",
    "DetrisSegmentationOutput",
    "TextAdapter",
    "TextAdapterLayer",
    "adapter_base_model_path",
    "native_low_precision_cpu",
    "to_standalone_model",
]
