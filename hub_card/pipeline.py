"""The `referring-image-segmentation` pipeline: one image, one or more expressions, one mask per expression.

```python
import hub_card                      # registers the task with transformers' PIPELINE_REGISTRY
from transformers import pipeline

pipe = pipeline("referring-image-segmentation", model="path/to/detris-model")
pipe("photo.jpg", "the man on the left")              # -> dict
pipe("photo.jpg", ["the man on the left", "the dog"])  # -> list of dicts, one forward pass for both
pipe(["a.jpg", "b.jpg"], "the dog")                     # -> one result per image
```

Each result is `{"text", "score", "mask", "mask_image"}`: `mask` a boolean numpy array `(height, width)` at the
original image size, `mask_image` the same as a PIL "L" image (0 / 255), `score` the mean foreground probability of
the predicted mask (see `mask_score`; 0.0 for an empty mask).

All expressions of one image go through the model as one batch on the pipeline's device, and the masks are warped
back to the image size there too (the processor's batched torch post-processing).

This module imports nothing of ours, so `detris export` ships it unchanged as `pipeline_detris.py` and
`pipeline(model=<exported repo>, trust_remote_code=True)` works without the package.
"""

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline

TASK = "referring-image-segmentation"


def _check_text(text) -> list[str]:
    texts = [text] if isinstance(text, str) else text
    if texts is None:
        raise ValueError("A referring expression is required: pipe(image, 'the man on the left') or a list of them.")
    if not isinstance(texts, (list, tuple)) or not texts:
        raise ValueError(f"`text` must be a non-empty str or a non-empty list of str, got {text!r}.")
    for index, item in enumerate(texts):
        if not isinstance(item, str):
            raise ValueError(f"`text[{index}]` must be a str, got {type(item).__name__}: {item!r}.")
        if not item.strip():
            raise ValueError(f"`text[{index}]` is empty ({item!r}); expected a referring expression such as 'the dog'.")
    return list(texts)


def _check_image(image):
    # a path is checked (and decoded) by the image processor
    if image is None:
        raise ValueError("An image is required: a PIL image, a numpy array, a torch tensor or a file path.")
    return image


def mask_score(probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mean probability over the pixels above `threshold` of each `(B, h, w)` probability map (logit resolution);
    0.0 where no pixel is above it."""
    foreground = probabilities > threshold
    total = (probabilities * foreground).flatten(1).sum(dim=1)
    count = foreground.flatten(1).sum(dim=1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


class ReferringImageSegmentationPipeline(Pipeline):
    """Referring image segmentation with a DETRIS model and its processor (see the module docstring)."""

    _load_processor = True
    _load_image_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __call__(self, image, text=None, **kwargs):
        """`image`: one image (PIL, numpy, torch, file path) or a list of images; `text`: one expression or a list,
        applied to every image. Returns a dict for a single expression, a list of dicts for a list; a list of those
        for a list of images."""
        texts = _check_text(text)
        single_text = isinstance(text, str)
        if isinstance(image, (list, tuple)):
            if not image:
                raise ValueError("`image` is an empty list; expected at least one image.")
            inputs = [{"image": _check_image(item), "text": texts, "single": single_text} for item in image]
        else:
            inputs = {"image": _check_image(image), "text": texts, "single": single_text}
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, threshold=None, **kwargs):
        forward = {}
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
                raise ValueError(f"threshold must be a probability in [0, 1), got {threshold!r}.")
            forward["threshold"] = float(threshold)
        return {}, forward, {}

    def preprocess(self, inputs):
        encoded = self.processor(images=inputs["image"], text=inputs["text"], return_tensors="pt")
        return {
            "pixel_values": encoded["pixel_values"],
            "input_ids": encoded["input_ids"],
            "original_sizes": encoded["original_sizes"],
            "texts": inputs["text"],
            "single": inputs["single"],
        }

    def _forward(self, model_inputs, threshold=None):
        # Runs on the pipeline's device: the forward pass of every expression of the image as one batch, then the
        # batched warp of the masks back to the image size.
        if threshold is None:
            threshold = float(getattr(self.model.config, "mask_threshold", 0.35))
        dtype = next(self.model.parameters()).dtype
        logits = self.model(
            pixel_values=model_inputs["pixel_values"].to(dtype), input_ids=model_inputs["input_ids"]
        ).logits.float()
        masks = self.processor.post_process_referring_segmentation(
            logits, model_inputs["original_sizes"], threshold=threshold
        )
        scores = mask_score(torch.sigmoid(logits[:, 0]), threshold)
        return {"masks": masks, "scores": scores, "texts": model_inputs["texts"], "single": model_inputs["single"]}

    def postprocess(self, model_outputs):
        results = []
        for text, mask, score in zip(model_outputs["texts"], model_outputs["masks"], model_outputs["scores"].tolist()):
            array = mask.detach().cpu().numpy().astype(bool)
            results.append(
                {
                    "text": text,
                    "score": float(score),
                    "mask": array,
                    "mask_image": Image.fromarray(array.astype(np.uint8) * 255),
                }
            )
        return results[0] if model_outputs["single"] else results


__all__ = ["ReferringImageSegmentationPipeline", "TASK", "mask_score"]
