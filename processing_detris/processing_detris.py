# Copyright 2025 The detris-hf authors. Licensed under the MIT License.
"""Processor for DETRIS: [`DetrisImageProcessor`] (letterbox + CLIP normalisation) and [`DetrisTokenizer`]
(offline CLIP BPE, padded with id 0 to exactly `word_len`), and [`draw_referring_overlay`], the one picture of
predictions (and ground truth) every DETRIS tool draws."""

import colorsys

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_detris import DEFAULT_THRESHOLD, DetrisImageProcessor, as_image_list, to_rgb_uint8
from .tokenization_detris import DetrisTokenizer


OVERLAY_MIN_WIDTH = 256  # narrower images are scaled up so outlines and captions stay readable
OVERLAY_ALPHA = 0.45


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
            image_list = as_image_list(images, "images")
            mask_list = None if masks is None else as_image_list(masks, "masks")
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

    @staticmethod
    def draw_referring_overlay(image, masks, labels, ground_truth=None, scores=None, width=None) -> Image.Image:
        """See [`draw_referring_overlay`]."""
        return draw_referring_overlay(image, masks, labels, ground_truth=ground_truth, scores=scores, width=width)

    @staticmethod
    def overlay_colour(index: int) -> tuple[int, int, int]:
        """See [`overlay_colour`]."""
        return overlay_colour(index)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids"]


DetrisProcessor.register_for_auto_class("AutoProcessor")


# ----------------------------------------------------------------------------------------------------------------
# Overlays
# ----------------------------------------------------------------------------------------------------------------


def overlay_colour(index: int) -> tuple[int, int, int]:
    """The colour of the `index`-th expression on an overlay: hues spread by the golden ratio, saturated and bright."""
    red, green, blue = colorsys.hsv_to_rgb((0.02 + index * 0.618034) % 1.0, 0.85, 0.95)
    return int(round(red * 255)), int(round(green * 255)), int(round(blue * 255))


def _as_bool_masks(masks, name: str) -> list:
    if masks is None:
        return []
    if isinstance(masks, (torch.Tensor, np.ndarray)) and masks.ndim == 2:
        masks = [masks]
    result = []
    for mask in masks:
        if mask is None:
            result.append(None)
            continue
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu().numpy()
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"Each of `{name}` must be a 2-D (height, width) mask, got shape {tuple(mask.shape)}.")
        result.append(mask != 0 if mask.dtype != np.bool_ else mask)
    return result


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape[::-1] == size:
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127


def _outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """The band of `thickness` pixels along the inside of the mask's boundary (the image border counts as outside)."""
    kernel = np.ones((2 * thickness - 1, 2 * thickness - 1), np.uint8)
    inner = cv2.erode(mask.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return mask & ~inner.astype(bool)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels (words broken only when one alone is too wide)."""
    lines = []
    for paragraph in text.splitlines() or [""]:
        words, line = paragraph.split(" "), ""
        for word in words:
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width or not line and len(word) <= 1:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width and len(word) > 1:
                cut = max(1, next((k for k in range(len(word), 0, -1) if font.getlength(word[:k]) <= width), 1))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def draw_referring_overlay(image, masks, labels, ground_truth=None, scores=None, width: int | None = None) -> Image.Image:
    """
    The picture of referring-segmentation results that every DETRIS tool draws (evaluation grids, `detris predict`,
    the demo, the Space): each prediction tinted and outlined in its own colour ([`overlay_colour`]), each ground
    truth as a dashed outline (its expression's colour alternating with black), and below the image a legend that
    wraps every caption in full (no caption is cut off and nothing covers the image).

    The image is scaled to `width` pixels before drawing (default: its own width, at least 256), so outlines are
    drawn at the final resolution and stay visible however small the image was; their thickness grows with `width`.

    Args:
        image: the original image (anything [`DetrisImageProcessor`] reads: PIL, `(H, W, 3)` uint8 array, path, ...).
        masks: `N` predicted boolean masks `(H, W)` at the image's size (a list, an `(N, H, W)` array/tensor or one
            `(H, W)` mask), e.g. the output of `post_process_referring_segmentation`.
        labels (`str` or `list[str]`): one caption per mask (the referring expression).
        ground_truth (*optional*): one `(H, W)` mask per prediction (entries may be `None`), or a single mask for all.
        scores (`list[float]`, *optional*): one number per mask, printed after its caption (e.g. a score or IoU).
        width (`int`, *optional*): width in pixels of the drawn image (and of the returned picture).

    Returns:
        `PIL.Image.Image` (RGB): `width` wide, the image's aspect ratio kept, with the legend below it.
    """
    rgb = to_rgb_uint8(image, max_image_pixels=None)
    height, original_width = rgb.shape[:2]
    predictions = _as_bool_masks(masks, "masks")
    labels = [labels] if isinstance(labels, str) else list(labels)
    if len(labels) != len(predictions):
        raise ValueError(f"Got {len(predictions)} masks but {len(labels)} labels; expected one label per mask.")
    if scores is not None and len(scores) != len(predictions):
        raise ValueError(f"Got {len(predictions)} masks but {len(scores)} scores; expected one score per mask.")
    if ground_truth is None:
        truths = [None] * len(predictions)
    elif isinstance(ground_truth, (torch.Tensor, np.ndarray)) and ground_truth.ndim == 2:
        truths = _as_bool_masks([ground_truth] * len(predictions), "ground_truth")
    else:
        truths = _as_bool_masks(ground_truth, "ground_truth")
        if len(truths) != len(predictions):
            raise ValueError(f"Got {len(predictions)} masks but {len(truths)} ground-truth masks; expected one each.")
    for name, group in (("masks", predictions), ("ground_truth", truths)):
        for index, mask in enumerate(group):
            if mask is not None and mask.shape != (height, original_width):
                raise ValueError(
                    f"{name}[{index}] has shape {mask.shape} but the image is {(height, original_width)} (height, "
                    "width); post-process the predictions to the original image size first."
                )
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 16):
        raise ValueError(f"width={width!r} must be an int >= 16 (pixels).")

    display_width = width or max(original_width, OVERLAY_MIN_WIDTH)
    display_height = max(1, round(height * display_width / original_width))
    display_size = (display_width, display_height)
    picture = Image.fromarray(rgb)
    if display_size != (original_width, height):
        upscale = display_width > original_width
        picture = picture.resize(display_size, Image.Resampling.NEAREST if upscale else Image.Resampling.LANCZOS)
    canvas = np.asarray(picture, dtype=np.float32).copy()
    thickness = max(2, round(display_width / 160))
    colours = [np.asarray(overlay_colour(index), dtype=np.float32) for index in range(len(predictions))]

    predictions = [_resize_mask(mask, display_size) for mask in predictions]
    for mask, colour in zip(predictions, colours):
        canvas[mask] = (1.0 - OVERLAY_ALPHA) * canvas[mask] + OVERLAY_ALPHA * colour
    for mask, colour in zip(predictions, colours):
        canvas[_outline(mask, thickness)] = colour
    ys, xs = np.mgrid[0:display_height, 0:display_width]
    dashes = ((xs + ys) // (3 * thickness)) % 2 == 0
    for truth, colour in zip(truths, colours):
        if truth is None:
            continue
        edge = _outline(_resize_mask(truth, display_size), thickness)
        canvas[edge & dashes] = colour
        canvas[edge & ~dashes] = 0.0
    drawn = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))

    font_size = max(11, round(display_width / 32))
    font = _font(font_size)
    line_height = round(font_size * 1.3)
    margin = max(3, font_size // 3)
    swatch = font_size
    text_width = max(8, display_width - 3 * margin - swatch)
    entries = []
    for index, label in enumerate(labels):
        caption = label if scores is None else f"{label} ({float(scores[index]):.2f})"
        entries.append((colours[index], _wrap(caption, font, text_width), False))
    if any(truth is not None for truth in truths):
        entries.append((np.zeros(3), _wrap("dashed outline: ground truth", font, text_width), True))
    legend_height = sum(len(lines) for _, lines, _ in entries) * line_height + 2 * margin if entries else 0
    result = Image.new("RGB", (display_width, display_height + legend_height), "white")
    result.paste(drawn, (0, 0))
    draw = ImageDraw.Draw(result)
    y = display_height + margin
    for colour, lines, is_key in entries:
        box = (margin, y + (line_height - swatch) // 2, margin + swatch, y + (line_height - swatch) // 2 + swatch)
        if is_key:
            draw.rectangle(box, outline=(0, 0, 0), width=max(1, thickness // 2))
        else:
            draw.rectangle(box, fill=tuple(int(c) for c in colour))
        for line in lines:
            draw.text((2 * margin + swatch, y), line, fill=(0, 0, 0), font=font)
            y += line_height
    return result


def save_processor(output_dir: str, word_len: int = 17, config=None, **kwargs) -> DetrisProcessor:
    """Write the default DETRIS processor (448 letterbox, CLIP statistics, CLIP BPE with `word_len`) to
    `output_dir` (`processor_config.json`, `tokenizer.json`, `tokenizer_config.json`) and return it."""
    if config is not None:
        processor = DetrisProcessor.from_model_config(config, **kwargs)
    else:
        processor = DetrisProcessor(word_len=word_len, **kwargs)
    processor.save_pretrained(output_dir)
    return processor


__all__ = ["DetrisProcessor", "draw_referring_overlay", "overlay_colour", "save_processor"]
