"""Hub-parquet (offline, local file with the jxu124 schema) and custom-folder sources give the refer structure."""

import json
import os

import cv2
import datasets
import numpy as np
import pytest

from training.data import (
    CorruptAnnotationError,
    build_refer_dataset,
    decode_rle,
    load_custom_folder,
    load_refer_from_hub,
)
from refer_fixture import make_refer_fixture

pytestmark = [pytest.mark.filterwarnings("ignore:.*zero-area.*"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # pycocotools + numpy 2


@pytest.fixture
def fx(tmp_path):
    f = make_refer_fixture(str(tmp_path / "fx"))
    f["reference"] = build_refer_dataset(f["refer_root"], f["images_root"], "refcoco", "unc", progress=False)
    return f


def _rows(dd):
    return {split: ds.to_list() for split, ds in dd.items()}


def _write_jxu124_parquet(fx, out_dir):
    """A local parquet copy with the jxu124/refcoco schema (docs/data.md, "From the Hub parquet copies")."""
    import pickle

    refs = pickle.loads(open(os.path.join(fx["refer_root"], "refcoco", "refs(unc).p"), "rb").read(), encoding="latin1")
    anns = {a["id"]: a for a in fx["annotations"]}
    images = {im["id"]: im for im in fx["instances"]["images"]}
    hub_split = {"train": "train", "val": "validation", "testA": "testA", "testB": "testB"}
    per_split = {}
    for ref in refs:
        ann, im = anns[ref["ann_id"]], images[ref["image_id"]]
        sents = [{"raw": s["raw"].encode("latin1").decode(), "sent": s["sent"].encode("latin1").decode(),
                  "sent_id": s["sent_id"], "tokens": [t.encode("latin1").decode() for t in s["tokens"]]}
                 for s in ref["sentences"]]
        x, y, w, h = ann["bbox"]
        per_split.setdefault(hub_split[ref["split"]], []).append({
            "sent_ids": ref["sent_ids"], "file_name": ref["file_name"], "ann_id": ref["ann_id"], "ref_id": ref["ref_id"],
            "image_id": ref["image_id"], "split": ref["split"], "sentences": sents,
            "category_id": ref["category_id"], "raw_anns": json.dumps(ann), "raw_image_info": json.dumps(im),
            "raw_sentences": json.dumps(sents), "image_path": f"coco/train2014/{im['file_name']}",
            "bbox": [x, y, x + w, y + h], "captions": [s["sent"] for s in sents],
            "global_image_id": f"coco.{ref['image_id']}", "anns_id": str(ref["ann_id"]),
        })
    files = {}
    for split, rows in per_split.items():
        files[split] = os.path.join(out_dir, f"{split}-00000-of-00001.parquet")
        datasets.Dataset.from_list(rows).to_parquet(files[split])
    return files


def test_hub_parquet_matches_refer_path(fx, tmp_path):
    files = _write_jxu124_parquet(fx, str(tmp_path))
    dd = load_refer_from_hub("refcoco", fx["images_root"], data_files=files, progress=False,
                             cache_dir=str(tmp_path / "hf_cache"))
    assert dd["train"].features == fx["reference"]["train"].features
    assert _rows(dd) == _rows(fx["reference"])


def test_hub_loader_uses_load_dataset_with_repo_id(monkeypatch, fx, tmp_path):
    files = _write_jxu124_parquet(fx, str(tmp_path))
    seen = {}
    real = datasets.load_dataset

    def fake(path, **kw):  # the online path: load_dataset("jxu124/refcocoplus")
        seen["path"] = path
        return real("parquet", data_files=files, cache_dir=str(tmp_path / "hf_cache"))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    dd = load_refer_from_hub("refcoco+", fx["images_root"], progress=False)
    assert seen["path"] == "jxu124/refcocoplus"
    assert set(dd["train"]["dataset"]) == {"refcoco+"}


def _custom_folder(fx, root):
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    anns = {a["id"]: a for a in fx["annotations"]}
    lines = {}
    for split, ds in fx["reference"].items():
        for row in ds:
            ann = anns[row["ann_id"]]
            rec = {"image": row["image"], "expressions": row["sentences"], "ref_id": row["ref_id"],
                   "ann_id": row["ann_id"], "image_id": row["image_id"], "category": row["category"],
                   "category_id": row["category_id"], "sent_ids": row["sent_ids"], "bbox": ann["bbox"]}
            if row["ann_id"] == 101:  # PNG mask
                path = f"masks/{row['ref_id']}.png"
                cv2.imwrite(os.path.join(root, path), decode_rle(row["mask"]) * 255)
                rec["mask"] = path
            elif isinstance(ann["segmentation"], list):
                rec["polygons"] = ann["segmentation"]
            else:
                rec["rle"] = ann["segmentation"]
            lines.setdefault(split, []).append(rec)
    for split, recs in lines.items():
        with open(os.path.join(root, f"{split}.jsonl"), "w") as fh:
            fh.write("\n".join(json.dumps(r) for r in recs) + "\n")


def test_custom_folder_matches_refer_path(fx, tmp_path):
    root = str(tmp_path / "custom")
    _custom_folder(fx, root)
    dd = load_custom_folder(root, dataset_name="refcoco", progress=False, allow_absolute_paths=True)
    assert dd["train"].features == fx["reference"]["train"].features
    ref = _rows(fx["reference"])
    got = _rows(dd)
    assert sorted(got) == sorted(ref)
    for split in ref:
        assert got[split] == ref[split]


def test_custom_folder_minimal_and_errors(tmp_path):
    root = tmp_path / "c"
    (root / "images").mkdir(parents=True)
    img = np.full((20, 30, 3), 128, np.uint8)
    cv2.imwrite(str(root / "images" / "a.png"), img)
    m = np.zeros((20, 30), np.uint8)
    m[2:8, 3:9] = 255
    cv2.imwrite(str(root / "m.png"), m)
    (root / "train.jsonl").write_text(
        json.dumps({"image": "images/a.png", "expressions": ["the box"], "mask": "m.png"}) + "\n"
        + json.dumps({"image": "images/a.png", "expressions": "whole left", "polygons": [[0, 0, 10, 0, 10, 20, 0, 20]]}) + "\n"
    )
    dd = load_custom_folder(str(root), progress=False)
    rows = dd["train"].to_list()
    assert [r["ref_id"] for r in rows] == [0, 1] and [r["image_id"] for r in rows] == [0, 0]
    assert rows[0]["bbox"] == [3.0, 2.0, 6.0, 6.0] and rows[1]["sentences"] == ["whole left"]
    assert np.array_equal(decode_rle(rows[0]["mask"]), (m > 0).astype(np.uint8))
    # a mask of the wrong size names the line and both sizes
    cv2.imwrite(str(root / "m.png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(CorruptAnnotationError, match=r"train.jsonl:1 ref_id=0.*10x10, expected the image size 20x30"):
        load_custom_folder(str(root), progress=False)
    (root / "train.jsonl").write_text(json.dumps({"image": "images/missing.png", "expressions": ["x"], "rle": {}}) + "\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_custom_folder(str(root), progress=False)
    (root / "train.jsonl").write_text(json.dumps({"image": "images/a.png", "expressions": ["x"]}) + "\n")
    with pytest.raises(CorruptAnnotationError, match="exactly one of"):
        load_custom_folder(str(root), progress=False)
