"""The row structure shared by every DETRIS dataset (RefCOCO family, custom folders, RefShapes).

One row per referred object:

=============  ==========================================================
``dataset``    source name (``refcoco``, ``refcoco+``, ``refcocog``, ``custom``, ``refshapes``)
``split``      split name as the refer API spells it (``train``, ``val``, ``testA``, ...)
``ref_id``     int64 reference id (unique within ``dataset``)
``ann_id``     int64 COCO annotation id
``image_id``   int64 image id
``category_id`` int64 COCO category id (-1 when unknown)
``category``   category name ("" when unknown)
``sentences``  list of referring expressions (str)
``sent_ids``   list of int64 sentence ids (same length as ``sentences``)
``image``      absolute path (``image_mode="path"``, a string) or
               ``datasets.Image(decode=False)`` (``image_mode="bytes"``; bytes are
               embedded by ``save_to_disk`` / ``push_to_hub``)
``file_name``  image file name
``height``     original image height (int32)
``width``      original image width (int32)
``bbox``       COCO ``[x, y, w, h]`` (float32 x 4)
``mask``       COCO compressed RLE ``{"size": [h, w], "counts": str}``
=============  ==========================================================

The sentence-level view (:func:`to_sentence_level`) replaces ``sentences`` /
``sent_ids`` by ``sentence`` / ``sent_id`` / ``sent_index`` (one row per expression).
"""

from __future__ import annotations

import os

from datasets import Dataset, DatasetDict, Features, Image, List, Value

__all__ = [
    "object_features",
    "sentence_features",
    "to_sentence_level",
    "image_value",
    "COCO_CATEGORIES",
    "CorruptAnnotationError",
]

IMAGE_MODES = ("path", "bytes")


class CorruptAnnotationError(ValueError):
    """An annotation that cannot be turned into a row; the message names the ref."""


def _image_feature(image_mode: str):
    if image_mode == "path":
        return Value("string")
    if image_mode == "bytes":
        return Image(decode=False)
    raise ValueError(f"image_mode is {image_mode!r}, expected one of {IMAGE_MODES}")


def object_features(image_mode: str = "path", extra: dict | None = None) -> Features:
    feats = {
        "dataset": Value("string"),
        "split": Value("string"),
        "ref_id": Value("int64"),
        "ann_id": Value("int64"),
        "image_id": Value("int64"),
        "category_id": Value("int64"),
        "category": Value("string"),
        "sentences": List(Value("string")),
        "sent_ids": List(Value("int64")),
        "image": _image_feature(image_mode),
        "file_name": Value("string"),
        "height": Value("int32"),
        "width": Value("int32"),
        "bbox": List(Value("float32"), length=4),
        "mask": {"size": List(Value("int32"), length=2), "counts": Value("string")},
    }
    if extra:
        feats.update(extra)
    return Features(feats)


def sentence_features(features: Features) -> Features:
    out = {}
    for name, feat in features.items():
        if name == "sentences":
            out["sentence"] = Value("string")
        elif name == "sent_ids":
            out["sent_id"] = Value("int64")
            out["sent_index"] = Value("int32")
        else:
            out[name] = feat
    return Features(out)


def image_value(path: str, image_mode: str):
    """The value stored in the ``image`` column for a file on disk."""
    path = os.path.abspath(path)
    if image_mode == "path":
        return path
    if image_mode == "bytes":
        return {"path": path, "bytes": None}
    raise ValueError(f"image_mode is {image_mode!r}, expected one of {IMAGE_MODES}")


def _explode(batch: dict) -> dict:
    out = {k: [] for k in batch if k not in ("sentences", "sent_ids")}
    out.update(sentence=[], sent_id=[], sent_index=[])
    n = len(batch["sentences"])
    for i in range(n):
        sents = batch["sentences"][i]
        ids = batch["sent_ids"][i]
        for j, s in enumerate(sents):
            for k in batch:
                if k not in ("sentences", "sent_ids"):
                    out[k].append(batch[k][i])
            out["sentence"].append(s)
            out["sent_id"].append(ids[j] if j < len(ids) else -1)
            out["sent_index"].append(j)
    return out


def to_sentence_level(ds: Dataset | DatasetDict, num_proc: int | None = None):
    """One row per referring expression (official evaluation counts every sentence)."""
    if isinstance(ds, DatasetDict):
        return DatasetDict({k: to_sentence_level(v, num_proc=num_proc) for k, v in ds.items()})
    feats = sentence_features(ds.features)
    return ds.map(
        _explode,
        batched=True,
        remove_columns=ds.column_names,
        features=feats,
        num_proc=num_proc,
        desc="sentence-level view",
        load_from_cache_file=False,
    )


# COCO 2014 categories (id -> name), used where a source carries only the id (jxu124 parquet).
COCO_CATEGORIES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}
