"""Image decoding and the official DETRIS letterbox (docs/data.md), in uint8.

These are the pixel operations the data pipeline needs outside the processor
(the uint8 cache and the official-style benchmark baseline).  The processor
(``processing_detris``) stays the reference for model inputs; the cache is
tested to give identical tensors.
"""

from __future__ import annotations

import io
import os

import cv2
import numpy as np

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "decode_image",
    "letterbox_matrices",
    "letterbox_image",
    "letterbox_mask",
    "normalize_numpy",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BORDER_VALUE = tuple(m * 255 for m in CLIP_MEAN)


def _decode_bytes(data: bytes, what: str) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise ValueError(f"could not decode image {what} ({len(data)} bytes); expected a JPEG/PNG/... file")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def decode_image(value) -> np.ndarray:
    """Decode any ``image`` column value to an RGB ``uint8`` array (H, W, 3), as the official code does
    (OpenCV ``IMREAD_COLOR``: EXIF orientation applied, alpha dropped, grey -> 3 channels).

    Accepts a path string, a ``{"bytes", "path"}`` dict (``datasets.Image(decode=False)``), raw bytes,
    a ``PIL.Image`` (EXIF-transposed, converted to RGB) or an (H, W, 3) uint8 array.
    """
    if isinstance(value, np.ndarray):
        if value.ndim != 3 or value.shape[2] != 3 or value.dtype != np.uint8:
            raise ValueError(f"image array has shape {value.shape} dtype {value.dtype}, expected (H, W, 3) uint8 RGB")
        return value
    if isinstance(value, (str, os.PathLike)):
        with open(value, "rb") as fh:
            return _decode_bytes(fh.read(), os.fspath(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(value), "<bytes>")
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return _decode_bytes(value["bytes"], value.get("path") or "<bytes>")
        if value.get("path"):
            return decode_image(value["path"])
        raise ValueError("image dict has neither 'bytes' nor 'path'")
    try:
        from PIL import Image, ImageOps
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(value, Image.Image):
        return np.asarray(ImageOps.exif_transpose(value).convert("RGB"))
    raise TypeError(f"cannot decode an image from {type(value).__name__}; expected a path, bytes, dict, PIL image or array")


def letterbox_matrices(height: int, width: int, size: int = 448) -> tuple[np.ndarray, np.ndarray]:
    """Forward and inverse 2x3 affine matrices of the official letterbox (float32 corner points)."""
    scale = min(size / height, size / width)
    new_h, new_w = height * scale, width * scale
    bias_x, bias_y = (size - new_w) / 2.0, (size - new_h) / 2.0
    src = np.array([[0, 0], [width, 0], [0, height]], np.float32)
    dst = np.array([[bias_x, bias_y], [new_w + bias_x, bias_y], [bias_x, new_h + bias_y]], np.float32)
    return cv2.getAffineTransform(src, dst), cv2.getAffineTransform(dst, src)


def letterbox_image(image: np.ndarray, size: int = 448, matrix: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 (size, size, 3): cubic affine warp, CLIP-mean border."""
    if matrix is None:
        matrix, _ = letterbox_matrices(image.shape[0], image.shape[1], size)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_CUBIC, borderValue=BORDER_VALUE)


def letterbox_mask(mask: np.ndarray, size: int = 448, matrix: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W) mask in 0/255 -> uint8 (size, size): bilinear affine warp, border 0 (soft edges)."""
    if matrix is None:
        matrix, _ = letterbox_matrices(mask.shape[0], mask.shape[1], size)
    return cv2.warpAffine(mask, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)


def normalize_numpy(letterboxed: np.ndarray) -> np.ndarray:
    """uint8 (S, S, 3) -> float32 (3, S, S): /255, CLIP mean/std (float32 arithmetic)."""
    x = letterboxed.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
