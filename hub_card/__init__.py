"""The Hub side of detris-hf: model cards, the remote-code export, push, the `referring-image-segmentation`
pipeline and `detris predict`.

Importing this package registers DETRIS with the transformers Auto classes (through `modeling_detris` and
`processing_detris`) and the `referring-image-segmentation` task with transformers' `PIPELINE_REGISTRY`.
"""

import modeling_detris  # noqa: F401  (registers AutoConfig / AutoModel)
import processing_detris  # noqa: F401  (registers AutoProcessor / AutoImageProcessor / AutoTokenizer)

from .pipeline import TASK, ReferringImageSegmentationPipeline, mask_score


def register_pipeline() -> None:
    """Register the `referring-image-segmentation` task (idempotent)."""
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    current = PIPELINE_REGISTRY.supported_tasks.get(TASK)
    if current is not None and current.get("impl") is ReferringImageSegmentationPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=ReferringImageSegmentationPipeline, pt_model=AutoModel, type="multimodal"
    )


register_pipeline()

__all__ = ["ReferringImageSegmentationPipeline", "TASK", "mask_score", "register_pipeline"]
