# Copyright 2025 The detris-hf authors. Licensed under the MIT License.
"""Processor for DETRIS: [`DetrisImageProcessor`] (letterbox + CLIP normalisation) and [`DetrisTokenizer`]
(offline CLIP BPE, padded with id 0 to exactly `word_len`)."""

import numpy as np
import torch

from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_detris import DEFAULT_THRESHOLD, DetrisImageProcessor, _as_list
from .tokenization_detris import DetrisTokenizer


class DetrisProcessor(ProcessorMixin):
    r"""
    Constructs a DETRIS processor, wrapping a [`DetrisImageProcessor`] and a [`DetrisTokenizer`].

    `processor(images=..., text=..., masks=None, return_tensors="pt")` returns a [`BatchFeature`] with:

    - `pixel_values` `(B, 3, 448, 448)` float32 and the letterbox metadata `original_sizes` `(B, 2)` int64 and
      `inverse_affines` `(B, 2, 3)` float64 (when images are given);
    - `input_ids` `(B, word_len)` int64: `[49406, bpe..., 49407, 0, ...]`, truncated keeping EOT last (when text
      is given). No `attention_mask` is returned: the official model uses only the causal mask in the text
      encoder and derives its decoder padding mask from `input_ids == 0`;
    - `labels` `(B, 448, 448)` float32 soft masks (when `masks` are given).

    Pairing: one image with `N` expressions gives a batch of `N` (the image repeated, as the official evaluation
    runs every expression against its image); `N` images with `N` expressions give `N` pairs; any other count
    mismatch raises a `ValueError`. Text only or images only also work.

    Args:
        image_processor ([`DetrisImageProcessor`], *optional*): defaults to `DetrisImageProcessor()`.
        tokenizer ([`DetrisTokenizer`], *optional*): defaults to the packaged CLIP vocabulary.
        word_len (`int`, *optional*, defaults to 17): text length (17; 22 for G-Ref umd checkpoints). Must equal
            the model config's `word_len`.
    """

    def __init__(self, image_processor=None, tokenizer=None, word_len: int = 17, **kwargs):
        if isinstance(word_len, bool) or not isinstance(word_len, int) or word_len < 2:
            raise ValueError(f"word_len must be an integer >= 2 (SOT + EOT), got {word_len!r}; DETRIS uses 17 or 22.")
        if image_processor is None:
            image_processor = DetrisImageProcessor()
        if tokenizer is None:
            tokenizer = DetrisTokenizer(model_max_length=word_len)
        self.word_len = word_len
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "DetrisProcessor":
        """The processor matching a `DetrisConfig`: letterbox to `config.input_size`, text length `config.word_len`."""
        size = {"height": config.input_size, "width": config.input_size}
        return cls(image_processor=DetrisImageProcessor(size=size), word_len=config.word_len, **kwargs)

    def __call__(self, images=None, text=None, masks=None, return_tensors="pt", **kwargs) -> BatchFeature:
        r"""
        Args:
            images: one image or a list (PIL, numpy `(H, W[, C])`, torch `(C, H, W)`, path or encoded bytes).
            text (`str` or `list[str]`): referring expression(s). The empty string is valid (it gives
                `[SOT, EOT, 0, ...]`, as the official tokenizer).
            masks: one ground-truth mask per image (same `(height, width)`), turned into `labels`.
            return_tensors (`str`, *optional*, defaults to `"pt"`): `"pt"`, `"np"` or `None` (lists).
            kwargs: forwarded to the image processor (e.g. `max_image_pixels`).
        """
        if images is None and text is None:
            raise ValueError("Pass `images`, `text`, or both; got neither.")
        if masks is not None and images is None:
            raise ValueError("`masks` need their `images` (the letterbox matrix depends on the image size).")

        texts = None
        if text is not None:
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, (list, tuple)):
                raise TypeError(f"`text` must be a str or a list of str, got {type(text).__name__}.")
            if len(texts) == 0:
                raise ValueError("`text` is an empty list; expected at least one referring expression.")
            for index, item in enumerate(texts):
                if not isinstance(item, str):
                    raise TypeError(f"`text[{index}]` must be a str, got {type(item).__name__}: {item!r}.")

        data = {}
        if images is not None:
            image_list = _as_list(images, "images")
            mask_list = None if masks is None else _as_list(masks, "masks")
            if mask_list is not None and len(mask_list) != len(image_list):
                raise ValueError(f"Got {len(image_list)} images but {len(mask_list)} masks; expected one mask per image.")
            repeat = 1
            if texts is not None and len(texts) != len(image_list):
                if len(image_list) != 1:
                    raise ValueError(
                        f"Got {len(image_list)} images and {len(texts)} expressions; expected as many expressions as "
                        "images, or a single image with any number of expressions."
                    )
                repeat = len(texts)
            features = self.image_processor(image_list, masks=mask_list, return_tensors=None, **kwargs)
            for key, value in features.items():
                value = np.asarray(value)
                data[key] = np.repeat(value, repeat, axis=0) if repeat > 1 else value

        if texts is not None:
            encoding = self.tokenizer(
                list(texts),
                padding="max_length",
                truncation=True,
                max_length=self.word_len,
                return_attention_mask=False,
            )
            data["input_ids"] = np.asarray(encoding["input_ids"], dtype=np.int64)

        return BatchFeature(data=data, tensor_type=return_tensors)

    def post_process_referring_segmentation(
        self, logits, target_sizes, threshold: float = DEFAULT_THRESHOLD, implementation: str = "torch"
    ) -> list[torch.Tensor]:
        """See [`DetrisImageProcessor.post_process_referring_segmentation`]."""
        return self.image_processor.post_process_referring_segmentation(
            logits, target_sizes, threshold=threshold, implementation=implementation
        )

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids"]


def save_processor(output_dir: str, word_len: int = 17, config=None, **kwargs) -> DetrisProcessor:
    """Write the default DETRIS processor (448 letterbox, CLIP statistics, CLIP BPE with `word_len`) to
    `output_dir` (`processor_config.json`, `tokenizer.json`, `tokenizer_config.json`) and return it."""
    if config is not None:
        processor = DetrisProcessor.from_model_config(config, **kwargs)
    else:
        processor = DetrisProcessor(word_len=word_len, **kwargs)
    processor.save_pretrained(output_dir)
    return processor


__all__ = ["DetrisProcessor", "save_processor"]
