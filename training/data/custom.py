"""Custom referring-segmentation datasets from a folder (format documented in docs/data.md).

::

    ROOT/
      train.jsonl        one JSON object per line; every ``*.jsonl`` file is a split named after it
      val.jsonl
      images/...         image files (paths relative to ROOT must stay inside it; absolute paths only with
                         allow_absolute_paths=True, `--allow-absolute-paths`)
      masks/...          optional PNG masks

Each line describes one referred object::

    {"image": "images/0001.jpg",
     "expressions": ["the red mug on the left", "left mug"],
     "mask": "masks/0001_0.png"}                     # PNG: nonzero pixels = object
    # or  "polygons": [[x1, y1, x2, y2, x3, y3, ...], ...]   (COCO polygons, pixels)
    # or  "rle": {"size": [h, w], "counts": "..."}            (COCO RLE, compressed str or list counts)

Optional keys: ``ref_id`` (int, default: running index over all files), ``ann_id`` (default ref_id),
``image_id`` (default: index of the image path in order of first appearance), ``category`` (str),
``category_id`` (int, default -1), ``sent_ids`` (list of int), ``bbox`` ([x, y, w, h], default: the
mask's box), ``height`` / ``width`` (checked against the image when given).
"""

from __future__ import annotations

import glob
import json
import os
from collections import OrderedDict

import numpy as np
from datasets import DatasetDict
from PIL import Image
from tqdm.auto import tqdm

from .masks import binary_mask_to_rle
from .rows import RowBuilder, image_header_size, inside_root, rows_to_datasetdict
from .schema import CorruptAnnotationError

__all__ = ["load_custom_folder", "read_png_mask"]

_MASK_KEYS = ("mask", "polygons", "rle")


def read_png_mask(path: str) -> np.ndarray:
    """Binary mask from a PNG: single-channel -> nonzero; RGB(A) -> any nonzero colour channel."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., :3].any(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    return (arr != 0).astype(np.uint8)


def load_custom_folder(
    root: str,
    *,
    dataset_name: str = "custom",
    image_mode: str = "path",
    check_images: bool = True,
    progress: bool = True,
    allow_absolute_paths: bool = False,
) -> DatasetDict:
    """Load a custom folder (see module docstring) into the shared DatasetDict structure. Image and mask paths are
    relative to `root` and must resolve inside it (`..` and symlinks leading out are refused); absolute paths are
    taken as they are only with `allow_absolute_paths`."""

    def resolve(value, what, label):
        if not isinstance(value, str):
            raise CorruptAnnotationError(f"{label}: {what} is {value!r}, expected a path string")
        if os.path.isabs(value):
            if not allow_absolute_paths:
                raise CorruptAnnotationError(f"{label}: {what} {value!r} is an absolute path; expected a path relative "
                                             "to the root (or pass --allow-absolute-paths)")
            return value
        return inside_root(os.path.join(root, value), root, what, label)

    root = os.path.abspath(root)
    files = sorted(glob.glob(os.path.join(root, "*.jsonl")))
    if not files:
        raise FileNotFoundError(f"{root}: no *.jsonl annotation file found; expected e.g. {root}/train.jsonl")
    builder = RowBuilder(dataset_name, image_mode=image_mode, check_images=check_images)
    image_ids: dict[str, int] = {}
    sizes: dict[str, tuple[int, int]] = {}
    split_rows: "OrderedDict[str, list]" = OrderedDict()
    running = 0
    for fpath in files:
        split = os.path.splitext(os.path.basename(fpath))[0]
        try:
            with open(fpath, encoding="utf-8") as fh:
                lines = fh.readlines()
        except UnicodeDecodeError as exc:
            raise CorruptAnnotationError(f"{fpath}: not UTF-8 text ({exc})") from exc
        rows = split_rows.setdefault(split, [])
        for lineno, line in enumerate(tqdm(lines, desc=f"{dataset_name}/{split}", disable=not progress), start=1):
            if not line.strip():
                continue
            where = f"{os.path.basename(fpath)}:{lineno}"
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise CorruptAnnotationError(f"{where}: not valid JSON ({exc})") from exc
            if not isinstance(rec, dict):
                raise CorruptAnnotationError(f"{where}: a line must be a JSON object, got {type(rec).__name__}")
            try:
                ref_id = int(rec.get("ref_id", running))
                for key in ("ann_id", "image_id", "category_id", "height", "width"):
                    if key in rec:
                        int(rec[key])
            except (TypeError, ValueError) as exc:
                raise CorruptAnnotationError(f"{where}: an id or size is not an integer ({exc})") from exc
            running += 1
            label = f"{where} ref_id={ref_id}"
            if "image" not in rec or not isinstance(rec["image"], str):
                raise CorruptAnnotationError(f"{label}: 'image' is {rec.get('image')!r}, expected a path string")
            sentences = rec.get("expressions", rec.get("sentences"))
            if isinstance(sentences, str):
                sentences = [sentences]
            given = [k for k in _MASK_KEYS if k in rec]
            if len(given) != 1:
                raise CorruptAnnotationError(f"{label}: has mask keys {given}, expected exactly one of {list(_MASK_KEYS)}")
            img_path = resolve(rec["image"], "image", label)
            if img_path not in sizes:
                if not os.path.isfile(img_path):
                    raise FileNotFoundError(f"{dataset_name} {label}: image file not found: {img_path}")
                sizes[img_path] = image_header_size(img_path)
            h, w = sizes[img_path]
            if ("height" in rec and int(rec["height"]) != h) or ("width" in rec and int(rec["width"]) != w):
                raise CorruptAnnotationError(
                    f"{label}: height/width given as {rec.get('height')}x{rec.get('width')}, the image is {h}x{w}"
                )
            if given[0] == "mask":
                mpath = resolve(rec["mask"], "mask", label)
                if not os.path.isfile(mpath):
                    raise FileNotFoundError(f"{dataset_name} {label}: mask file not found: {mpath}")
                mh, mw = image_header_size(mpath)
                if (mh, mw) != (h, w):
                    raise CorruptAnnotationError(f"{label}: mask {mpath} is {mh}x{mw}, expected the image size {h}x{w}")
                m = read_png_mask(mpath)
                if m.shape != (h, w):
                    raise CorruptAnnotationError(
                        f"{label}: mask {mpath} is {m.shape[0]}x{m.shape[1]}, expected the image size {h}x{w}"
                    )
                segmentation = binary_mask_to_rle(m)
            elif given[0] == "polygons":
                segmentation = rec["polygons"]
                if not isinstance(segmentation, list):
                    raise CorruptAnnotationError(f"{label}: 'polygons' must be a list of flat coordinate lists")
            else:
                segmentation = rec["rle"]
            image_id = int(rec.get("image_id", image_ids.setdefault(img_path, len(image_ids))))
            row = builder(
                split=split,
                ref_id=ref_id,
                ann_id=int(rec.get("ann_id", ref_id)),
                image_id=image_id,
                category_id=int(rec.get("category_id", -1)),
                category=str(rec.get("category", "")),
                sentences=sentences,
                sent_ids=rec.get("sent_ids"),
                image_path=img_path,
                file_name=os.path.basename(img_path),
                height=h,
                width=w,
                bbox=rec.get("bbox"),
                segmentation=segmentation,
            )
            rows.append(row)
    builder.report()
    return rows_to_datasetdict(split_rows, image_mode)
