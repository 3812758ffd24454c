"""DETRIS pre/post-processing: image processor, tokenizer, processor and metrics.

Importing this package registers the classes with `AutoProcessor`, `AutoImageProcessor` and `AutoTokenizer` for
`model_type="detris"` (the config class is `configuration_detris.DetrisConfig`).
"""

from .image_processing_detris import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DetrisImageProcessor,
    apply_affine_to_points,
    get_letterbox_affine,
)
from .metrics import ReferringSegmentationMetric, compute_referring_metrics, intersection_and_union
from .processing_detris import DetrisProcessor, save_processor
from .referring_iou import METRIC_PATH as REFERRING_IOU_METRIC_PATH
from .tokenization_detris import DetrisTokenizer, clean_text


def register_auto_classes() -> None:
    """Register the DETRIS processor classes with the transformers Auto classes (idempotent)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    from configuration_detris import DetrisConfig

    AutoImageProcessor.register(DetrisConfig, image_processor_classes={"pil": DetrisImageProcessor}, exist_ok=True)
    AutoTokenizer.register(DetrisConfig, tokenizer_class=DetrisTokenizer, exist_ok=True)
    AutoProcessor.register(DetrisConfig, DetrisProcessor, exist_ok=True)


register_auto_classes()

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DetrisImageProcessor",
    "DetrisProcessor",
    "DetrisTokenizer",
    "REFERRING_IOU_METRIC_PATH",
    "ReferringSegmentationMetric",
    "apply_affine_to_points",
    "clean_text",
    "compute_referring_metrics",
    "get_letterbox_affine",
    "intersection_and_union",
    "register_auto_classes",
    "save_processor",
]
