"""RefCOCO-family builders from refer-format files (fixture generated here; no network, no ../shared)."""

import json
import os
import pickle
import shutil
import warnings

import datasets
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from training.data import (
    CorruptAnnotationError,
    SplitSizeWarning,
    UnsafePickleError,
    build_mixed_dataset,
    build_refer_dataset,
    decode_rle,
    load_data_pickle,
    to_sentence_level,
)
from training.data.cli import main as data_cli
from refer_fixture import SCHEMES, make_refer_fixture, make_refs, py2_pickle_dumps
from training.data.safe_pickle import DataOnlyUnpickler

pytestmark = [pytest.mark.filterwarnings("ignore:.*zero-area.*"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # pycocotools + numpy 2


@pytest.fixture
def fx(tmp_path):
    return make_refer_fixture(str(tmp_path))


def _pycoco_mask(ann, h, w):
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode()}
    return mask_utils.decode(rle)


@pytest.mark.parametrize("dataset,split_by", [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"),
                                              ("refcocog", "google"), ("refcoco", "google")])
def test_refer_rows_match_pycocotools(fx, dataset, split_by):
    dd = build_refer_dataset(fx["refer_root"], fx["images_root"], dataset, split_by, progress=False)
    expected_splits = sorted(set(SCHEMES[split_by].values()))
    assert sorted(dd) == expected_splits
    refs = {r["ref_id"]: r for r in pickle.loads(
        open(os.path.join(fx["refer_root"], dataset, f"refs({split_by}).p"), "rb").read(), encoding="latin1")}
    anns = {a["id"]: a for a in fx["annotations"]}
    images = {im["id"]: im for im in fx["instances"]["images"]}
    n = 0
    for split, ds in dd.items():
        for row in ds:
            n += 1
            ref = refs[row["ref_id"]]
            assert row["split"] == split == ref["split"]
            assert row["dataset"] == dataset
            assert row["ann_id"] == ref["ann_id"] and row["image_id"] == ref["image_id"]
            # python-2 byte strings come back as the original unicode text
            assert row["sentences"] == [s["sent"].encode("latin1").decode("utf-8") for s in ref["sentences"]]
            assert row["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
            im = images[row["image_id"]]
            # the image is the one instances.json names, not the ref's suffixed file_name
            assert row["image"] == os.path.join(fx["images_root"], im["file_name"]) and os.path.isfile(row["image"])
            assert row["file_name"] == im["file_name"] != ref["file_name"]
            assert (row["height"], row["width"]) == (im["height"], im["width"])
            ann = anns[row["ann_id"]]
            assert row["bbox"] == pytest.approx(ann["bbox"])
            assert row["category_id"] == ann["category_id"]
            assert row["category"] == {1: "person", 18: "dog", 47: "cup"}[ann["category_id"]]
            ours = decode_rle(row["mask"])
            ref_mask = _pycoco_mask(ann, im["height"], im["width"])
            assert ours.shape == ref_mask.shape and np.array_equal(ours, ref_mask)
    assert n == 5
    assert "café dog" in [s for ds in dd.values() for r in ds for s in r["sentences"]]


def test_sentence_level_view(fx):
    dd = build_refer_dataset(fx["refer_root"], fx["images_root"], "refcoco", "unc", progress=False)
    sv = to_sentence_level(dd)
    for split in dd:
        rows = list(dd[split])
        flat = [(r["ref_id"], s, sid, j) for r in rows for j, (s, sid) in enumerate(zip(r["sentences"], r["sent_ids"]))]
        got = [(r["ref_id"], r["sentence"], r["sent_id"], r["sent_index"]) for r in sv[split]]
        assert got == flat
        assert "sentences" not in sv[split].column_names
        assert all(r["mask"] == rows[0]["mask"] for r in sv[split] if r["ref_id"] == rows[0]["ref_id"])


def test_mixed_never_uses_google(fx):
    mixed = build_mixed_dataset(fx["refer_root"], fx["images_root"], progress=False)
    assert sorted(mixed) == ["train", "val"]
    # unc train has refs 1, 2; umd train has 1, 2 -> 2 + 2 + 2; google train would have 1, 3, 4
    assert len(mixed["train"]) == 6 and len(mixed["val"]) == 3
    assert sorted(set(mixed["train"]["dataset"])) == ["refcoco", "refcoco+", "refcocog"]
    keys = list(zip(mixed["train"]["dataset"], mixed["train"]["ref_id"]))
    assert len(set(keys)) == len(keys)
    g = [r for r in mixed["train"] if r["dataset"] == "refcocog"]
    assert sorted(r["ref_id"] % 100 for r in g) == [1, 2]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_and_not_executed(fx, tmp_path):
    marker = tmp_path / "pwned"
    refs_path = os.path.join(fx["refer_root"], "refcoco", "refs(unc).p")
    with open(refs_path, "wb") as fh:
        pickle.dump([{"ref_id": 1, "payload": _Evil(marker)}], fh, protocol=2)
    with pytest.raises(UnsafePickleError, match="unsafe pickle opcode|refusing"):
        build_refer_dataset(fx["refer_root"], fx["images_root"], "refcoco", "unc", progress=False)
    assert not marker.exists()
    # second line of defence: the unpickler alone (no opcode scan) refuses to import os.system
    with open(refs_path, "rb") as fh:
        with pytest.raises(UnsafePickleError, match="refusing to import"):
            DataOnlyUnpickler(fh, encoding="latin1").load()
    assert not marker.exists()
    # protocol 0 (GLOBAL / REDUCE opcodes as text) is refused too
    with open(refs_path, "wb") as fh:
        pickle.dump(_Evil(marker), fh, protocol=0)
    with pytest.raises(UnsafePickleError):
        load_data_pickle(refs_path)
    assert not marker.exists()


def test_data_pickle_roundtrip_and_checksum(tmp_path):
    p = tmp_path / "refs.p"
    p.write_bytes(py2_pickle_dumps(make_refs("unc")))
    assert load_data_pickle(p)[0]["ref_id"] == 1
    with pytest.raises(ValueError, match="expected 00"):
        load_data_pickle(p, sha256="00" * 32)


def test_missing_image_names_file_and_ref(fx):
    os.remove(os.path.join(fx["images_root"], "COCO_train2014_000000000002.jpg"))
    with pytest.raises(FileNotFoundError) as exc:
        build_refer_dataset(fx["refer_root"], fx["images_root"], "refcoco", "unc", progress=False)
    msg = str(exc.value)
    assert "COCO_train2014_000000000002.jpg" in msg and "ref_id=3" in msg


@pytest.mark.parametrize("bad,match", [
    ([[1.0, 2.0, 3.0, 4.0, 5.0]], "even number"),
    ([[1.0, 2.0, float("nan"), 4.0, 5.0, 6.0]], "non-finite"),
    ("not a segmentation", "list of polygons or an RLE"),
    ({"size": [10, 10], "counts": "abc"}, "RLE size"),
])
def test_corrupt_annotation_names_ref(fx, bad, match):
    inst_path = os.path.join(fx["refer_root"], "refcoco", "instances.json")
    inst = json.load(open(inst_path))
    for a in inst["annotations"]:
        if a["id"] == 102:
            a["segmentation"] = bad
    # NaN is not valid JSON; write with allow_nan (Python's default) and read it back
    json.dump(inst, open(inst_path, "w"))
    with pytest.raises(CorruptAnnotationError, match=match) as exc:
        build_refer_dataset(fx["refer_root"], fx["images_root"], "refcoco", "unc", progress=False)
    assert "ref_id=2" in str(exc.value) and "ann_id=102" in str(exc.value)


def test_ref_pointing_to_missing_annotation(fx):
    refs = make_refs("unc")
    refs[1]["ann_id"] = 999
    open(os.path.join(fx["refer_root"], "refcoco", "refs(unc).p"), "wb").write(py2_pickle_dumps(refs))
    with pytest.raises(CorruptAnnotationError, match=r"ref_id=2.*ann_id=999"):
        build_refer_dataset(fx["refer_root"], fx["images_root"], "refcoco", "unc", progress=False)


def test_zero_area_mask_kept_and_reported(fx):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        dd = build_refer_dataset(fx["refer_root"], fx["images_root"], "refcoco", "unc", progress=False)
    assert any("zero-area" in str(w.message) and "ref_id 4" in str(w.message) for w in rec)
    row = dd["testA"][0]
    assert row["ref_id"] == 4
    m = decode_rle(row["mask"])
    assert m.shape == (60, 40) and m.sum() == 0


def test_split_size_check_warns_with_both_numbers(fx):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        build_refer_dataset(fx["refer_root"], fx["images_root"], "refcoco", "unc", progress=False, check_counts=True)
    msgs = [str(w.message) for w in rec if issubclass(w.category, SplitSizeWarning)]
    assert "refcoco (unc) split 'val': 1 refs, expected 3811 (official count)" in msgs
    assert "refcoco (unc) split 'val': 1 sentences, expected 10834 (official count)" in msgs
    with warnings.catch_warnings():
        warnings.simplefilter("error", SplitSizeWarning)  # auto: a small build stays quiet
        build_refer_dataset(fx["refer_root"], fx["images_root"], "refcoco", "unc", progress=False)


def test_bad_arguments_name_expected_values(fx):
    with pytest.raises(ValueError, match=r"expected one of \('unc',\)"):
        build_refer_dataset(fx["refer_root"], fx["images_root"], "refcoco+", "umd")
    with pytest.raises(ValueError, match="expected one of"):
        build_refer_dataset(fx["refer_root"], fx["images_root"], "refclef", "unc")


def test_cli_refer_saves_atomically(fx, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--dataset", "refcoco", "--split-by", "unc", "--refer-root", fx["refer_root"],
            "--images-root", fx["images_root"], "--output", str(out), "--no-progress"]
    assert data_cli(["data", "refer"] + args) == 0
    assert "testB 1 refs" in capsys.readouterr().out
    dd = datasets.load_from_disk(str(out))
    ref = build_refer_dataset(fx["refer_root"], fx["images_root"], "refcoco", "unc", progress=False)
    assert {k: v.to_list() for k, v in dd.items()} == {k: v.to_list() for k, v in ref.items()}
    # user mistakes end in one line naming the problem, exit code 2
    assert data_cli(["data", "refer"] + args) == 2
    error = capsys.readouterr().err.strip()
    assert "--overwrite" in error and len(error.splitlines()) == 1
    # a failing rebuild leaves the saved data untouched (and no temp folders behind)
    before = sorted(os.listdir(out))
    shutil.rmtree(fx["images_root"])
    assert data_cli(["data", "refer"] + args + ["--overwrite"]) == 2
    assert "image file not found" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before
    assert datasets.load_from_disk(str(out))["train"].num_rows == 2
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out")] == []


def test_cli_bytes_mode_embeds_images(fx, tmp_path):
    out = tmp_path / "bytes"
    data_cli(["data", "refer", "--dataset", "refcocog", "--refer-root", fx["refer_root"],
              "--images-root", fx["images_root"], "--output", str(out), "--image-mode", "bytes", "--no-progress",
              "--sentence-level"])
    shutil.rmtree(fx["images_root"])  # bytes are embedded: the images are no longer needed
    dd = datasets.load_from_disk(str(out))
    row = dd["train"][0]
    assert isinstance(row["image"]["bytes"], bytes) and row["image"]["bytes"][:2] == b"\xff\xd8"
    sv = datasets.load_from_disk(str(out / "sentences"))
    assert sv["train"].num_rows == 5
