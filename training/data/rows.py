"""Row construction, split-size checks and crash-safe saving, shared by every source."""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from numbers import Real

from datasets import Dataset, DatasetDict

from configuration_detris.release import OFFICIAL_REF_COUNTS, OFFICIAL_SENTENCE_COUNTS

from .masks import MaskError, rle_area, rle_bbox, segmentation_to_rle
from .schema import CorruptAnnotationError, image_value, object_features

__all__ = [
    "RowBuilder",
    "rows_to_datasetdict",
    "check_split_sizes",
    "save_atomic",
    "SplitSizeWarning",
]



class SplitSizeWarning(UserWarning):
    pass


# Largest image a dataset may reference (height x width); COCO images are at most 640 x 640. Bigger annotations are
# refused when the dataset is built, before a collator could try to allocate them.
MAX_IMAGE_PIXELS = 40_000_000


def annotation_int(value, what: str, label: str) -> int:
    """`int(value)` for an id or size read from an annotation file; anything else raises CorruptAnnotationError
    naming `label` (the file and record) and `what`."""
    if isinstance(value, bool):
        value = repr(value)  # True / False are no ids
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise CorruptAnnotationError(f"{label}: {what} is {value!r}, expected an integer") from None


def read_json(path: str):
    """`json.load` of a UTF-8 file; a decoding error names the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptAnnotationError(f"{path}: not a valid UTF-8 JSON file ({exc})") from exc


def inside_root(path: str, root: str, what: str, label: str) -> str:
    """`path` if it resolves (symlinks followed) inside `root`; a path escaping it (`..`, absolute, symlink) is
    refused."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise CorruptAnnotationError(f"{label}: {what} {path!r} resolves to {real!r}, outside {real_root!r}; expected "
                                     "a file inside the dataset's root")
    return path


def image_header_size(path: str) -> tuple[int, int]:
    """(height, width) read from the image header, after EXIF orientation (what the decoders will produce); a file
    that is not an image, or is truncated, raises CorruptAnnotationError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums (catches truncated PNGs) without decoding the pixels
        with Image.open(path) as im:  # verify() leaves the image unusable: read the header again
            w, h = im.size
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:
                orientation = 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, IndexError, EOFError, struct.error,
            Image.DecompressionBombError) as exc:  # what PIL raises for malformed, header-only or huge files
        raise CorruptAnnotationError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return int(h), int(w)


def _ref_label(dataset, ref_id, ann_id=None) -> str:
    s = f"{dataset} ref_id={ref_id}"
    if ann_id is not None:
        s += f" (ann_id={ann_id})"
    return s


def _fix_text(s) -> str:
    """Python-2 ``str`` objects come back latin-1 decoded; undo that when they were really UTF-8."""
    if isinstance(s, bytes):
        try:
            return s.decode("utf-8")
        except UnicodeDecodeError:
            return s.decode("latin-1")
    if not isinstance(s, str):
        raise TypeError(type(s).__name__)
    if s.isascii():
        return s
    try:
        return s.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return s


class RowBuilder:
    """Turns one referred object into a validated row; every error names the ref."""

    def __init__(self, dataset: str, image_mode: str = "path", check_images: bool = True, root: str | None = None):
        self.dataset = dataset
        self.image_mode = image_mode
        self.check_images = check_images
        self.root = root  # image paths must resolve inside it (when given)
        self._image_size: dict[str, tuple[int, int]] = {}
        self._ref_ids: set = set()
        self.empty_masks: list = []
        self.dropped_polygons = 0

    def image(self, path: str, ref_label: str, height: int, width: int):
        """The `image` column value; with `check_images`, the file must exist, be an image and have the
        annotation's size."""
        if self.root is not None:
            inside_root(path, self.root, "image", ref_label)
        if self.check_images:
            size = self._image_size.get(path)
            if size is None:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{ref_label}: image file not found: {path}")
                size = self._image_size[path] = image_header_size(path)
            if size != (height, width):
                raise CorruptAnnotationError(f"{ref_label}: the annotation says the image is {height}x{width}, the "
                                             f"file {path} is {size[0]}x{size[1]}; expected equal sizes")
        return image_value(path, self.image_mode)

    def __call__(
        self,
        *,
        split: str,
        ref_id,
        ann_id,
        image_id,
        category_id,
        category: str,
        sentences,
        sent_ids,
        image_path: str,
        file_name: str,
        height,
        width,
        bbox,
        segmentation,
        extra: dict | None = None,
    ) -> dict:
        label = _ref_label(self.dataset, ref_id, ann_id)
        ref_id, ann_id, image_id, category_id = (annotation_int(value, what, label) for value, what in (
            (ref_id, "ref_id"), (ann_id, "ann_id"), (image_id, "image_id"), (category_id, "category_id")))
        try:
            height, width = int(height), int(width)
        except (TypeError, ValueError) as exc:
            raise CorruptAnnotationError(f"{label}: image height/width {height!r}/{width!r} are not integers") from exc
        if height <= 0 or width <= 0:
            raise CorruptAnnotationError(f"{label}: image size {height}x{width}, expected positive height and width")
        if height * width > MAX_IMAGE_PIXELS:
            raise CorruptAnnotationError(f"{label}: image size {height}x{width} is over the limit of "
                                         f"{MAX_IMAGE_PIXELS:,} pixels; expected a real image size")
        if ref_id in self._ref_ids:
            raise CorruptAnnotationError(f"{label}: ref_id {ref_id} appears twice; expected unique ref_ids")
        self._ref_ids.add(ref_id)
        if not isinstance(sentences, (list, tuple)) or not sentences:
            raise CorruptAnnotationError(f"{label}: sentences is {sentences!r}, expected a non-empty list of strings")
        try:
            sentences = [_fix_text(s) for s in sentences]
        except TypeError as exc:
            raise CorruptAnnotationError(f"{label}: a sentence has type {exc}, expected str") from exc
        if sent_ids is not None and not isinstance(sent_ids, (list, tuple)):
            raise CorruptAnnotationError(f"{label}: sent_ids is {sent_ids!r}, expected a list of integers")
        sent_ids = [annotation_int(i, "a sent_id", label) for i in sent_ids] if sent_ids is not None else \
            list(range(len(sentences)))
        if len(sent_ids) != len(sentences):
            raise CorruptAnnotationError(
                f"{label}: {len(sent_ids)} sent_ids for {len(sentences)} sentences, expected equal lengths"
            )
        try:
            rle, dropped = segmentation_to_rle(segmentation, height, width)
        except MaskError as exc:
            raise CorruptAnnotationError(f"{label}: corrupt segmentation: {exc}") from exc
        self.dropped_polygons += dropped
        if rle_area(rle) == 0:
            self.empty_masks.append(ref_id)
        if bbox is None:
            bbox = rle_bbox(rle)
        if (
            not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
        ):
            raise CorruptAnnotationError(f"{label}: bbox is {bbox!r}, expected 4 finite numbers [x, y, w, h]")
        row = {
            "dataset": self.dataset,
            "split": str(split),
            "ref_id": int(ref_id),
            "ann_id": int(ann_id),
            "image_id": int(image_id),
            "category_id": int(category_id),
            "category": str(category),
            "sentences": sentences,
            "sent_ids": sent_ids,
            "image": self.image(image_path, label, height, width),
            "file_name": str(file_name),
            "height": height,
            "width": width,
            "bbox": [float(v) for v in bbox],
            "mask": rle,
        }
        if extra:
            row.update(extra)
        return row

    def report(self) -> None:
        if self.empty_masks:
            shown = ", ".join(str(r) for r in self.empty_masks[:10])
            more = "" if len(self.empty_masks) <= 10 else f" (+{len(self.empty_masks) - 10} more)"
            warnings.warn(
                f"{self.dataset}: {len(self.empty_masks)} ref(s) have an empty (zero-area) mask and are kept "
                f"with an all-zero target: ref_id {shown}{more}",
                stacklevel=3,
            )


def rows_to_datasetdict(split_rows: dict[str, list[dict]], image_mode: str, extra_features=None) -> DatasetDict:
    feats = object_features(image_mode, extra_features)
    return DatasetDict({split: Dataset.from_list(rows, features=feats) for split, rows in split_rows.items()})


def check_split_sizes(dd: DatasetDict, key: tuple[str, str], check: bool | str = "auto") -> list[str]:
    """Compare split sizes with the official counts; warn with both numbers on a mismatch.

    ``check="auto"`` compares only when the build looks complete (>= 50 % of the official total),
    so small fixtures and subsets stay quiet.  Returns the warning messages.
    """
    if check is False or key not in OFFICIAL_REF_COUNTS:
        return []
    expected = OFFICIAL_REF_COUNTS[key]
    total = sum(len(d) for d in dd.values())
    if check == "auto" and total < 0.5 * sum(expected.values()):
        return []
    msgs = []
    for split, n_exp in expected.items():
        n = len(dd[split]) if split in dd else 0
        if n != n_exp:
            msgs.append(f"{key[0]} ({key[1]}) split {split!r}: {n} refs, expected {n_exp} (official count)")
    for split in dd:
        if split not in expected:
            msgs.append(f"{key[0]} ({key[1]}) has an unexpected split {split!r} with {len(dd[split])} refs")
    for split, n_exp in OFFICIAL_SENTENCE_COUNTS.get(key, {}).items():
        if split in dd:
            n = sum(len(s) for s in dd[split]["sentences"])
            if n != n_exp:
                msgs.append(f"{key[0]} ({key[1]}) split {split!r}: {n} sentences, expected {n_exp} (official count)")
    for m in msgs:
        warnings.warn(m, SplitSizeWarning, stacklevel=2)
    return msgs


def save_atomic(dd, output: str, overwrite: bool = False, num_proc: int | None = None, extra: dict | None = None) -> str:
    """``save_to_disk`` of ``dd`` (and of each ``extra`` {subfolder: dataset}) written whole or not at all
    (``configuration_detris.folders.atomic_folder``); a failure leaves ``output`` untouched."""
    from configuration_detris.folders import atomic_folder

    output = os.path.abspath(output)
    with atomic_folder(output, overwrite=overwrite) as staging:
        dd.save_to_disk(str(staging), num_proc=num_proc)
        for name, data in (extra or {}).items():
            data.save_to_disk(os.path.join(staging, name), num_proc=num_proc)
    return output
