"""Small synthetic refer-format fixtures for the tests (no COCO needed).

:func:`make_refer_fixture` writes, under ``root``::

    refer/refcoco/  instances.json  refs(unc).p  refs(google).p
    refer/refcoco+/ instances.json  refs(unc).p
    refer/refcocog/ instances.json  refs(umd).p  refs(google).p
    images/COCO_train2014_00000000000{1,2,3}.jpg

The refs pickles are written like Python 2 wrote them (protocol 2, ``str`` as BINSTRING
byte strings), with unc-style (train/val/testA/testB), umd-style (train/val/test) and
google-style (train/val) splits.  Annotations cover multi-polygon, uncompressed RLE,
compressed RLE and a degenerate zero-area polygon.
"""

from __future__ import annotations

import json
import os
import struct

import cv2
import numpy as np

__all__ = ["py2_pickle_dumps", "make_refer_fixture", "FIXTURE_IMAGES"]

FIXTURE_IMAGES = {1: (48, 64), 2: (60, 40), 3: (32, 32)}  # image_id -> (height, width)


def py2_pickle_dumps(obj) -> bytes:
    """Pickle plain data the way Python 2's cPickle (protocol 2) did: ``str`` as (SHORT_)BINSTRING bytes."""
    out = bytearray(b"\x80\x02")

    def emit(o):
        if o is None:
            out.extend(b"N")
        elif o is True:
            out.extend(b"\x88")
        elif o is False:
            out.extend(b"\x89")
        elif isinstance(o, int):
            if -(2**31) <= o < 2**31:
                out.extend(b"J" + struct.pack("<i", o))
            else:
                n = (o.bit_length() + 8) // 8
                out.extend(b"\x8a" + bytes([n]) + o.to_bytes(n, "little", signed=True))
        elif isinstance(o, float):
            out.extend(b"G" + struct.pack(">d", o))
        elif isinstance(o, (str, bytes)):
            data = o.encode("utf-8") if isinstance(o, str) else o
            if len(data) < 256:
                out.extend(b"U" + bytes([len(data)]) + data)
            else:
                out.extend(b"T" + struct.pack("<i", len(data)) + data)
        elif isinstance(o, list):
            out.extend(b"]")
            if o:
                out.extend(b"(")
                for v in o:
                    emit(v)
                out.extend(b"e")
        elif isinstance(o, tuple):
            out.extend(b"(")
            for v in o:
                emit(v)
            out.extend(b"t")
        elif isinstance(o, dict):
            out.extend(b"}")
            if o:
                out.extend(b"(")
                for k, v in o.items():
                    emit(k)
                    emit(v)
                out.extend(b"u")
        else:
            raise TypeError(f"cannot pickle {type(o).__name__} as plain data")

    emit(obj)
    out.extend(b".")
    return bytes(out)


def _image(image_id, h, w):
    rng = np.random.default_rng(image_id)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return cv2.GaussianBlur(img, (5, 5), 0)


def _rle_uncompressed(mask: np.ndarray) -> dict:
    flat = mask.T.reshape(-1)  # column-major, as COCO
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            run, cur = 0, v
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _annotations():
    from pycocotools import mask as mask_utils

    m3 = np.zeros(FIXTURE_IMAGES[2], np.uint8)
    m3[10:30, 5:25] = 1
    m5 = np.zeros(FIXTURE_IMAGES[3], np.uint8)
    m5[4:20, 8:28] = 1
    rle5 = mask_utils.encode(np.asfortranarray(m5))
    anns = [
        {"id": 101, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": [[5.0, 5.0, 30.0, 6.0, 28.0, 30.0, 4.5, 25.0], [40.0, 10.0, 60.0, 10.0, 50.0, 40.0]],
         "bbox": [4.5, 5.0, 55.5, 35.0]},
        {"id": 102, "image_id": 1, "category_id": 18, "iscrowd": 0,
         "segmentation": [[10.0, 30.0, 40.0, 30.0, 40.0, 46.0, 10.0, 46.0]], "bbox": [10.0, 30.0, 30.0, 16.0]},
        {"id": 103, "image_id": 2, "category_id": 47, "iscrowd": 1,
         "segmentation": _rle_uncompressed(m3), "bbox": [5.0, 10.0, 20.0, 20.0]},
        {"id": 104, "image_id": 2, "category_id": 1, "iscrowd": 0,  # zero area: collinear points
         "segmentation": [[5.0, 5.0, 15.0, 15.0, 25.0, 25.0]], "bbox": [5.0, 5.0, 20.0, 20.0]},
        {"id": 105, "image_id": 3, "category_id": 18, "iscrowd": 0,
         "segmentation": {"size": [int(v) for v in rle5["size"]], "counts": rle5["counts"].decode("ascii")},
         "bbox": [8.0, 4.0, 20.0, 16.0]},
    ]
    return anns


_CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
               {"id": 18, "name": "dog", "supercategory": "animal"},
               {"id": 47, "name": "cup", "supercategory": "kitchen"}]

# (ref_id, ann_id, image_id, sentences) ; splits per scheme below
_REFS = [
    (1, 101, 1, ["man on the left", "guy in red"]),
    (2, 102, 1, ["brown dog", "dog lying down", "the dog"]),
    (3, 103, 2, ["white cup"]),
    (4, 104, 2, ["tiny thing"]),
    (5, 105, 3, ["dog on the right", "caf\u00e9 dog"]),
]
SCHEMES = {
    "unc": {1: "train", 2: "train", 3: "val", 4: "testA", 5: "testB"},
    "umd": {1: "train", 2: "train", 3: "val", 4: "test", 5: "test"},
    "google": {1: "train", 2: "val", 3: "train", 4: "train", 5: "val"},
}


def make_refs(scheme: str, ref_offset: int = 0) -> list:
    refs = []
    sent_id = 1000 * (ref_offset + 1)
    for ref_id, ann_id, image_id, sents in _REFS:
        sentences = []
        for s in sents:
            sentences.append({"tokens": s.split(), "raw": s.upper(), "sent_id": sent_id, "sent": s})
            sent_id += 1
        cat = next(a["category_id"] for a in _annotations() if a["id"] == ann_id)
        refs.append({
            "image_id": image_id, "split": SCHEMES[scheme][ref_id], "sentences": sentences,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "category_id": cat,
            "ann_id": ann_id, "sent_ids": [s["sent_id"] for s in sentences], "ref_id": ref_id + ref_offset,
        })
    return refs


def make_refer_fixture(root: str) -> dict:
    """Write the fixture under ``root``; returns ``{"refer_root", "images_root", "annotations"}``."""
    refer_root = os.path.join(root, "refer")
    images_root = os.path.join(root, "images")
    os.makedirs(images_root, exist_ok=True)
    images = []
    for image_id, (h, w) in FIXTURE_IMAGES.items():
        name = f"COCO_train2014_{image_id:012d}.jpg"
        cv2.imwrite(os.path.join(images_root, name), _image(image_id, h, w))
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    anns = _annotations()
    instances = {"images": images, "annotations": anns, "categories": _CATEGORIES}
    layout = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
    for k, (dataset, schemes) in enumerate(layout.items()):
        d = os.path.join(refer_root, dataset)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "instances.json"), "w") as fh:
            json.dump(instances, fh)
        for scheme in schemes:
            with open(os.path.join(d, f"refs({scheme}).p"), "wb") as fh:
                fh.write(py2_pickle_dumps(make_refs(scheme, ref_offset=100 * k)))
    return {"refer_root": refer_root, "images_root": images_root, "annotations": anns, "instances": instances}


def rewrite_instances(fixture: dict, change) -> str:
    """Apply `change(instances)` to the fixture's refcoco `instances.json` in place; returns its path."""
    path = os.path.join(fixture["refer_root"], "refcoco", "instances.json")
    with open(path) as handle:
        instances = json.load(handle)
    change(instances)
    with open(path, "w") as handle:
        json.dump(instances, handle)
    return path
