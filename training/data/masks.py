"""Mask helpers: COCO segmentation (polygons / RLE) <-> compressed RLE <-> numpy.

Masks are stored in the datasets as ``{"size": [h, w], "counts": str}``
(pycocotools' compressed RLE, counts decoded as ASCII).  Rasterisation is
done with pycocotools, as the refer API (``REFER.getMask``) does.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
from pycocotools import mask as mask_utils

__all__ = [
    "MaskError",
    "segmentation_to_rle",
    "binary_mask_to_rle",
    "decode_rle",
    "rle_area",
    "rle_bbox",
    "normalize_rle",
]


class MaskError(ValueError):
    """A segmentation that cannot be turned into a mask; the message says why."""


def _rle_to_str(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def _rle_to_coco(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def binary_mask_to_rle(mask: np.ndarray) -> dict:
    """Encode a 2-D mask (nonzero = foreground) as a compressed RLE with str counts."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise MaskError(f"mask must be 2-D (h, w), got shape {mask.shape}")
    return _rle_to_str(mask_utils.encode(np.asfortranarray((mask != 0).astype(np.uint8))))


def decode_rle(rle: dict) -> np.ndarray:
    """Decode a (str- or bytes-counts) compressed RLE to a ``uint8`` 0/1 array of shape (h, w)."""
    return mask_utils.decode(_rle_to_coco(rle))


def rle_area(rle: dict) -> int:
    return int(mask_utils.area(_rle_to_coco(rle)))


def rle_bbox(rle: dict) -> list[float]:
    """COCO ``[x, y, w, h]`` of the mask (all zeros for an empty mask)."""
    return [float(v) for v in mask_utils.toBbox(_rle_to_coco(rle))]


def normalize_rle(rle: dict, height: int, width: int) -> dict:
    """Validate an RLE dict (compressed str/bytes counts or uncompressed list counts) -> compressed str RLE."""
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise MaskError(f"RLE must be a dict with 'size' and 'counts', got {type(rle).__name__} {str(rle)[:80]!r}")
    size = list(rle["size"])
    if len(size) != 2 or [int(size[0]), int(size[1])] != [int(height), int(width)]:
        raise MaskError(f"RLE size is {size}, expected [height, width] = [{height}, {width}] of the image")
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, Real) and c >= 0 for c in counts):
            raise MaskError("uncompressed RLE counts must be non-negative integers")
        if sum(int(c) for c in counts) != int(height) * int(width):
            raise MaskError(f"uncompressed RLE counts sum to {sum(int(c) for c in counts)}, expected h*w = {height * width}")
        return _rle_to_str(mask_utils.frPyObjects({"size": [int(height), int(width)], "counts": counts}, int(height), int(width)))
    if isinstance(counts, (str, bytes)):
        out = {"size": [int(height), int(width)], "counts": counts}
        try:
            # decoding validates the string (pycocotools would otherwise read garbage)
            m = mask_utils.decode(_rle_to_coco(out))
        except Exception as exc:
            raise MaskError(f"compressed RLE counts could not be decoded ({exc})") from exc
        if m.shape != (int(height), int(width)):
            raise MaskError(f"RLE decodes to shape {m.shape}, expected {(int(height), int(width))}")
        return _rle_to_str(out)
    raise MaskError(f"RLE counts must be str, bytes or list of int, got {type(counts).__name__}")


def segmentation_to_rle(segmentation, height: int, width: int) -> tuple[dict, int]:
    """COCO ``segmentation`` (list of polygons, or RLE dict) -> (compressed RLE, n_dropped_degenerate_polygons).

    Polygons are rasterised with pycocotools and merged (union).  A polygon with
    fewer than 3 points (< 6 coordinates, zero area) is dropped and counted;
    odd lengths, non-numbers, NaN/inf raise :class:`MaskError`.
    """
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise MaskError(f"image size must be positive, got height={height}, width={width}")
    if isinstance(segmentation, dict):
        return normalize_rle(segmentation, height, width), 0
    if not isinstance(segmentation, (list, tuple)):
        raise MaskError(
            f"segmentation must be a list of polygons or an RLE dict, got {type(segmentation).__name__}"
        )
    polygons = []
    dropped = 0
    for i, poly in enumerate(segmentation):
        if not isinstance(poly, (list, tuple)):
            raise MaskError(f"polygon {i} must be a flat list of numbers [x1, y1, x2, y2, ...], got {type(poly).__name__}")
        if not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in poly):
            bad = next(v for v in poly if not (isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)))
            raise MaskError(f"polygon {i} has a non-finite or non-numeric coordinate {bad!r}; expected finite numbers")
        if len(poly) % 2:
            raise MaskError(f"polygon {i} has {len(poly)} coordinates, expected an even number (x, y pairs)")
        # far-away vertices overflow pycocotools' rasteriser (an empty mask, silently): refuse them
        limit = 2 * max(height, width)
        far = next((v for v in poly if not -limit <= v <= limit), None)
        if far is not None:
            raise MaskError(f"polygon {i} has a coordinate {far!r}, expected pixel coordinates within +-{limit} "
                            f"(twice the {height}x{width} image)")
        if len(poly) < 6:
            dropped += 1
            continue
        polygons.append([float(v) for v in poly])
    if not polygons:
        empty = np.zeros((height, width), dtype=np.uint8)
        return binary_mask_to_rle(empty), dropped
    rles = mask_utils.frPyObjects(polygons, height, width)
    return _rle_to_str(mask_utils.merge(rles)), dropped
