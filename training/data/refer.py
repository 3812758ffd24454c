"""RefCOCO / RefCOCO+ / RefCOCOg (umd, google) and the mixed set from the original refer files.

Layout (as the refer project ships it)::

    REFER_ROOT/
      refcoco/   instances.json  refs(unc).p  refs(google).p
      refcoco+/  instances.json  refs(unc).p
      refcocog/  instances.json  refs(umd).p  refs(google).p
    IMAGES_ROOT/  COCO_train2014_000000581857.jpg ...     (COCO train2014)

A ref's own ``file_name`` carries the annotation id as a suffix
(``COCO_train2014_000000581857_16.jpg``); the image used is the one that
``instances.json`` names for the ref's ``image_id``.
"""

from __future__ import annotations

import os
from collections import OrderedDict

from datasets import DatasetDict, concatenate_datasets
from tqdm.auto import tqdm

from configuration_detris.release import DEFAULT_SPLIT_BY, MIXED_DATASETS, REFER_SOURCE, REFER_SPLIT_BY

from .rows import RowBuilder, annotation_int, check_split_sizes, read_json, rows_to_datasetdict
from .safe_pickle import load_data_pickle
from .schema import CorruptAnnotationError

__all__ = [
    "build_refer_dataset",
    "build_mixed_dataset",
    "load_refer_files",
    "MIXED_SOURCES",
]

# the mixed training set never uses the Google split of G-Ref (its val images overlap the UNC train images)
MIXED_SOURCES = tuple(REFER_SOURCE[dataset] for dataset in MIXED_DATASETS)
_REQUIRED_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


def _check_dataset(dataset: str, split_by: str) -> None:
    if dataset not in REFER_SPLIT_BY:
        raise ValueError(f"dataset is {dataset!r}, expected one of {sorted(REFER_SPLIT_BY)}")
    if split_by not in REFER_SPLIT_BY[dataset]:
        raise ValueError(f"split_by is {split_by!r} for {dataset}, expected one of {REFER_SPLIT_BY[dataset]}")


def load_refer_files(refer_root: str, dataset: str, split_by: str, refs_sha256: str | None = None):
    """Return ``(refs, instances)`` read safely from ``refer_root/dataset``."""
    _check_dataset(dataset, split_by)
    folder = os.path.join(refer_root, dataset)
    refs_path = os.path.join(folder, f"refs({split_by}).p")
    inst_path = os.path.join(folder, "instances.json")
    for p in (refs_path, inst_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found; expected the refer layout REFER_ROOT/{dataset}/{{instances.json, refs({split_by}).p}}")
    refs = load_data_pickle(refs_path, sha256=refs_sha256)
    if not isinstance(refs, list):
        raise CorruptAnnotationError(f"{refs_path}: holds a {type(refs).__name__}, expected a list of ref dicts")
    instances = read_json(inst_path)
    if not isinstance(instances, dict):
        raise CorruptAnnotationError(f"{inst_path}: holds a {type(instances).__name__}, expected a COCO instances object")
    for key in ("images", "annotations"):
        if key not in instances:
            raise CorruptAnnotationError(f"{inst_path}: missing key {key!r}, expected a COCO instances file")
    return refs, instances


def _by_id(instances: dict, key: str, path: str) -> dict:
    """`instances[key]` (a list of COCO records) indexed by their integer `id`; a bad record names the file and index."""
    records = instances.get(key, [])
    if not isinstance(records, list):
        raise CorruptAnnotationError(f"{path}: {key} is a {type(records).__name__}, expected a list")
    indexed = {}
    for k, record in enumerate(records):
        if not isinstance(record, dict) or "id" not in record:
            raise CorruptAnnotationError(f"{path}: {key}[{k}] is {record!r:.80}, expected an object with an 'id'")
        indexed[annotation_int(record["id"], "id", f"{path}: {key}[{k}]")] = record
    return indexed


def build_refer_dataset(
    refer_root: str,
    images_root: str,
    dataset: str = "refcoco",
    split_by: str | None = None,
    *,
    image_mode: str = "path",
    check_images: bool = True,
    check_counts: bool | str = "auto",
    progress: bool = True,
    refs_sha256: str | None = None,
) -> DatasetDict:
    """Build a :class:`datasets.DatasetDict` (one row per ref, splits as in the refs file).

    Args:
        refer_root: folder holding ``refcoco/``, ``refcoco+/``, ``refcocog/``.
        images_root: COCO ``train2014`` folder.
        dataset: ``refcoco``, ``refcoco+`` or ``refcocog``.
        split_by: ``unc`` / ``umd`` / ``google`` (default: unc, unc, umd).
        image_mode: ``"path"`` (absolute path strings) or ``"bytes"`` (an ``Image`` column whose bytes are
            embedded when saved).
        check_images: raise ``FileNotFoundError`` (naming the file and the ref) for a missing image.
        check_counts: compare split sizes with the official counts (``"auto"``: only for complete builds).
        refs_sha256: optional expected SHA-256 of the refs pickle.
    """
    split_by = split_by or DEFAULT_SPLIT_BY.get(dataset, "")
    _check_dataset(dataset, split_by)
    refs, instances = load_refer_files(refer_root, dataset, split_by, refs_sha256)
    inst_path = os.path.join(refer_root, dataset, "instances.json")
    images = _by_id(instances, "images", inst_path)
    anns = _by_id(instances, "annotations", inst_path)
    cats = {cat_id: c.get("name", "") for cat_id, c in _by_id(instances, "categories", inst_path).items()}
    builder = RowBuilder(dataset, image_mode=image_mode, check_images=check_images, root=images_root)
    split_rows: "OrderedDict[str, list]" = OrderedDict()
    for i, ref in enumerate(tqdm(refs, desc=f"{dataset}({split_by}) refs", disable=not progress, unit="ref")):
        if not isinstance(ref, dict):
            raise CorruptAnnotationError(f"{dataset} ref #{i}: is a {type(ref).__name__}, expected a dict")
        missing = [k for k in _REQUIRED_REF_KEYS if k not in ref]
        label = f"{dataset} ref_id={ref.get('ref_id', f'#{i}')}"
        if missing:
            raise CorruptAnnotationError(f"{label}: missing key(s) {missing}, expected {list(_REQUIRED_REF_KEYS)}")
        ref_id, ann_id, image_id = (annotation_int(ref[key], key, label) for key in ("ref_id", "ann_id", "image_id"))
        ann = anns.get(ann_id)
        if ann is None:
            raise CorruptAnnotationError(f"{label}: ann_id={ann_id} is not in instances.json")
        img = images.get(image_id)
        if img is None:
            raise CorruptAnnotationError(f"{label}: image_id={image_id} is not in instances.json")
        if annotation_int(ann.get("image_id", image_id), f"annotation {ann_id}'s image_id", label) != image_id:
            raise CorruptAnnotationError(
                f"{label}: annotation {ann_id} belongs to image {ann.get('image_id')}, expected image_id={image_id}"
            )
        if "segmentation" not in ann:
            raise CorruptAnnotationError(f"{label} (ann_id={ann_id}): annotation has no 'segmentation'")
        sents = ref["sentences"]
        if not isinstance(sents, list) or not sents:
            raise CorruptAnnotationError(f"{label}: sentences is {sents!r}, expected a non-empty list")
        texts, sent_ids = [], []
        ref_sent_ids = ref.get("sent_ids") or []
        for j, s in enumerate(sents):
            text = s.get("sent", s.get("raw")) if isinstance(s, dict) else s
            sid = s.get("sent_id") if isinstance(s, dict) else None
            if sid is None:
                sid = ref_sent_ids[j] if j < len(ref_sent_ids) else j
            if text is None:
                raise CorruptAnnotationError(f"{label}: sentence {j} has neither 'sent' nor 'raw'")
            texts.append(text)
            sent_ids.append(sid)
        cat_id = annotation_int(ref.get("category_id", ann.get("category_id", -1)), "category_id", label)
        file_name = img.get("file_name")
        if not file_name:
            raise CorruptAnnotationError(f"{label}: image_id={image_id} has no file_name in instances.json")
        row = builder(
            split=ref["split"],
            ref_id=ref_id,
            ann_id=ann_id,
            image_id=image_id,
            category_id=cat_id,
            category=cats.get(cat_id, ""),
            sentences=texts,
            sent_ids=sent_ids,
            image_path=os.path.join(images_root, file_name),
            file_name=file_name,
            height=img.get("height"),
            width=img.get("width"),
            bbox=ann.get("bbox"),
            segmentation=ann["segmentation"],
        )
        split_rows.setdefault(row["split"], []).append(row)
    builder.report()
    dd = rows_to_datasetdict(split_rows, image_mode)
    check_split_sizes(dd, (dataset, split_by), check_counts)
    return dd


def build_mixed_dataset(
    refer_root: str,
    images_root: str,
    *,
    splits=("train", "val"),
    image_mode: str = "path",
    check_images: bool = True,
    check_counts: bool | str = "auto",
    progress: bool = True,
) -> DatasetDict:
    """The mixed set: RefCOCO(unc) + RefCOCO+(unc) + RefCOCOg(umd), per split (never the Google split).

    Rows keep their ``dataset`` column, so ``(dataset, ref_id)`` is unique.
    """
    parts = {s: [] for s in splits}
    for dataset, split_by in MIXED_SOURCES:
        dd = build_refer_dataset(
            refer_root, images_root, dataset, split_by,
            image_mode=image_mode, check_images=check_images, check_counts=False, progress=progress,
        )
        for s in splits:
            if s not in dd:
                raise ValueError(f"{dataset}({split_by}) has no split {s!r}; its splits are {list(dd)}")
            parts[s].append(dd[s])
    out = DatasetDict({s: concatenate_datasets(v) for s, v in parts.items()})
    check_split_sizes(out, ("mixed", "mixed"), check_counts)
    return out
