"""RefCOCO family from the Hub parquet copies ``jxu124/refcoco``, ``jxu124/refcocoplus``, ``jxu124/refcocog``.

Those repos hold one row per ref (UNC splits for refcoco/refcoco+, UMD for refcocog;
no Google split) with the COCO annotation as a JSON string (``raw_anns``), the image
info as JSON (``raw_image_info``) and an ``image_path`` but no image bytes, so a COCO
``train2014`` folder is still needed.  The rows are converted to the shared structure
(:mod:`training.data.schema`); splits are keyed by the per-row refer ``split`` column
(``train``, ``val``, ``testA``, ``testB``, ``test``), as in :func:`build_refer_dataset`.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import datasets
from datasets import DatasetDict
from tqdm.auto import tqdm

from configuration_detris.release import HUB_REFER_REPOS, HUB_REFER_SPLIT_BY

from .rows import RowBuilder, annotation_int, check_split_sizes, rows_to_datasetdict
from .schema import COCO_CATEGORIES, CorruptAnnotationError

__all__ = ["load_refer_from_hub", "convert_hub_refer"]


def _json(value, label, what):
    if isinstance(value, (dict, list)):
        return value
    try:
        return json.loads(value)
    except (TypeError, ValueError) as exc:
        raise CorruptAnnotationError(f"{label}: {what} is not valid JSON ({exc})") from exc


def _resolve_image(images_root: str, file_name: str, image_path: str | None) -> str:
    candidates = [os.path.join(images_root, file_name)]
    if image_path:
        candidates += [os.path.join(images_root, image_path), os.path.join(images_root, os.path.basename(image_path))]
    for c in candidates:
        if os.path.isfile(c):
            return c
    return candidates[0]


def convert_hub_refer(
    hub: "datasets.DatasetDict | datasets.Dataset",
    images_root: str,
    dataset: str,
    *,
    image_mode: str = "path",
    check_images: bool = True,
    check_counts: bool | str = "auto",
    progress: bool = True,
) -> DatasetDict:
    """Convert a loaded jxu124-schema dataset (any split layout) to the shared structure."""
    if isinstance(hub, datasets.Dataset):
        hub = DatasetDict({"all": hub})
    builder = RowBuilder(dataset, image_mode=image_mode, check_images=check_images, root=images_root)
    split_rows: "OrderedDict[str, list]" = OrderedDict()
    total = sum(len(d) for d in hub.values())
    bar = tqdm(total=total, desc=f"{dataset} (hub parquet)", disable=not progress, unit="ref")
    for hub_split, ds in hub.items():
        for r in ds:
            bar.update(1)
            label = f"{dataset} ref_id={r.get('ref_id')}"
            ann = _json(r["raw_anns"], label, "raw_anns")
            info = _json(r["raw_image_info"], label, "raw_image_info")
            sents = r["sentences"]
            texts = [s.get("sent", s.get("raw")) if isinstance(s, dict) else s for s in sents]
            sent_ids = r.get("sent_ids")
            if sent_ids is None or len(sent_ids) != len(texts):
                sent_ids = [s.get("sent_id", j) if isinstance(s, dict) else j for j, s in enumerate(sents)]
            if "segmentation" not in ann:
                raise CorruptAnnotationError(f"{label} (ann_id={r.get('ann_id')}): raw_anns has no 'segmentation'")
            file_name = info.get("file_name") or os.path.basename(r.get("image_path") or "")
            cat_id = annotation_int(r.get("category_id", ann.get("category_id", -1)), "category_id", label)
            split = r.get("split") or ("val" if hub_split == "validation" else hub_split)
            row = builder(
                split=split,
                ref_id=r["ref_id"],
                ann_id=r.get("ann_id", ann.get("id")),
                image_id=r.get("image_id", info.get("id")),
                category_id=cat_id,
                category=COCO_CATEGORIES.get(cat_id, ""),
                sentences=texts,
                sent_ids=sent_ids,
                image_path=_resolve_image(images_root, file_name, r.get("image_path")),
                file_name=file_name,
                height=info.get("height"),
                width=info.get("width"),
                bbox=ann.get("bbox"),  # COCO xywh, as in the refer path
                segmentation=ann["segmentation"],
            )
            split_rows.setdefault(row["split"], []).append(row)
    bar.close()
    builder.report()
    dd = rows_to_datasetdict(split_rows, image_mode)
    check_split_sizes(dd, (dataset, HUB_REFER_SPLIT_BY.get(dataset, "")), check_counts)
    return dd


def load_refer_from_hub(
    dataset: str = "refcoco",
    images_root: str = ".",
    *,
    repo_id: str | None = None,
    data_files=None,
    image_mode: str = "path",
    check_images: bool = True,
    check_counts: bool | str = "auto",
    progress: bool = True,
    **load_kwargs,
) -> DatasetDict:
    """Load ``jxu124/*`` with ``datasets.load_dataset(repo_id)`` (online) or local parquet ``data_files``.

    Args:
        dataset: ``refcoco``, ``refcoco+`` or ``refcocog`` (umd).  The Google split is not on the Hub:
            build it with :func:`training.data.build_refer_dataset`.
        images_root: COCO ``train2014`` folder.
        repo_id: Hub repo (default from :data:`HUB_REFER_REPOS`).
        data_files: local parquet file(s) with the same schema; when given, nothing is downloaded.
    """
    if dataset not in HUB_REFER_REPOS:
        raise ValueError(f"dataset is {dataset!r}, expected one of {sorted(HUB_REFER_REPOS)}")
    if data_files is not None:
        hub = datasets.load_dataset("parquet", data_files=data_files, **load_kwargs)
    else:
        hub = datasets.load_dataset(repo_id or HUB_REFER_REPOS[dataset], **load_kwargs)
    return convert_hub_refer(
        hub, images_root, dataset,
        image_mode=image_mode, check_images=check_images, check_counts=check_counts, progress=progress,
    )
