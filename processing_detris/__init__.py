"""DETRIS pre/post-processing: image processor, tokenizer, processor, overlays and metrics.

Importing this package registers the classes with `AutoProcessor`, `AutoImageProcessor` and `AutoTokenizer` for
`model_type="detris"` (the config class is `configuration_detris.DetrisConfig`). A saved processor folder also
names its classes in `auto_map` and carries their files, so `AutoProcessor.from_pretrained(folder,
trust_remote_code=True)` works where this package is not imported.
"""

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from configuration_detris import DetrisConfig

from .image_processing_detris import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DetrisImageProcessor,
    apply_affine_to_points,
    get_letterbox_affine,
    letterbox_image,
    letterbox_mask,
    to_mask_uint8,
    to_rgb_uint8,
)
from .metrics import ReferringSegmentationMetric, compute_referring_metrics, intersection_and_union
from .processing_detris import DetrisProcessor, draw_referring_overlay, overlay_colour, save_processor
from .referring_iou import REFERRING_IOU_METRIC_PATH
from .tokenization_detris import DetrisTokenizer, clean_text


AutoImageProcessor.register(DetrisConfig, image_processor_classes={"pil": DetrisImageProcessor}, exist_ok=True)
AutoTokenizer.register(DetrisConfig, tokenizer_class=DetrisTokenizer, exist_ok=True)
AutoProcessor.register(DetrisConfig, DetrisProcessor, exist_ok=True)

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
    "draw_referring_overlay",
    "get_letterbox_affine",
    "intersection_and_union",
    "letterbox_image",
    "letterbox_mask",
    "overlay_colour",
    "save_processor",
    "to_mask_uint8",
    "to_rgb_uint8",
]
