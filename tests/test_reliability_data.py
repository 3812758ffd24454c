"""Annotation files whose ids or sizes are not integers: refused when the dataset is built, naming the file and the
record (never a bare `int()` error), and at the command line in one line with exit code 2."""

import json
import os
import pickle
import struct
import zlib

import pytest

from training.data import CorruptAnnotationError, build_refer_dataset, load_custom_folder
from training.data.cli import main as data_main
from refer_fixture import make_refer_fixture, rewrite_instances

pytestmark = [pytest.mark.filterwarnings("ignore:.*zero-area.*"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


@pytest.fixture
def fx(tmp_path):
    return make_refer_fixture(str(tmp_path / "fx"))



def _change_refs(fx, change):
    path = os.path.join(fx["refer_root"], "refcoco", "refs(unc).p")
    with open(path, "rb") as handle:
        refs = pickle.load(handle, encoding="latin1")
    change(refs)
    with open(path, "wb") as handle:
        pickle.dump(refs, handle, protocol=2)


@pytest.mark.parametrize("change, message", [
    (lambda i: i["images"][0].update(id="abc"), r"instances.json: images\[0\]: id is 'abc', expected an integer"),
    (lambda i: i["annotations"][1].update(id=None), r"instances.json: annotations\[1\]: id is None, expected an integer"),
    (lambda i: i["categories"][0].update(id="1.5"), r"instances.json: categories\[0\]: id is '1.5', expected an integer"),
    (lambda i: i["images"][0].pop("id"), r"instances.json: images\[0\] is .*, expected an object with an 'id'"),
    (lambda i: i.update(images=[5]), r"instances.json: images\[0\] is 5, expected an object with an 'id'"),
    (lambda i: i["annotations"][0].update(image_id="abc"), r"refcoco ref_id=\d+: annotation \d+'s image_id is 'abc'"),
])
def test_non_integer_ids_in_instances_name_the_file_and_record(fx, change, message):
    rewrite_instances(fx, change)
    with pytest.raises(CorruptAnnotationError, match=message):
        build_refer_dataset(fx["refer_root"], fx["images_root"], "refcoco", "unc", progress=False)


@pytest.mark.parametrize("change, message", [
    (lambda refs: refs[0].update(category_id="x"), r"refcoco ref_id=\d+: category_id is 'x', expected an integer"),
    (lambda refs: refs[0].update(ref_id=True), r"ref_id is 'True', expected an integer"),
])
def test_non_integer_ids_in_refs_name_the_ref(fx, change, message):
    _change_refs(fx, change)
    with pytest.raises(CorruptAnnotationError, match=message):
        build_refer_dataset(fx["refer_root"], fx["images_root"], "refcoco", "unc", progress=False)


def test_a_non_integer_id_ends_in_one_line_at_the_command_line(fx, tmp_path, capsys):
    rewrite_instances(fx, lambda i: i["images"][0].update(id="abc"))
    output = tmp_path / "out"
    assert data_main(["refer", "--dataset", "refcoco", "--refer-root", fx["refer_root"], "--images-root",
                      fx["images_root"], "--output", str(output), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("detris data refer: ")
    assert "instances.json: images[0]: id is 'abc', expected an integer" in error
    assert not output.exists()


@pytest.mark.parametrize("flag, value", [("--n-train", "-1"), ("--n-validation", "-3"), ("--n-test", "-2")])
def test_refshapes_scene_counts_must_not_be_negative(tmp_path, capsys, flag, value):
    output = tmp_path / "rs"
    assert data_main(["refshapes", "--output", str(output), flag, value, "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    name = flag[2:].replace("-", "_")
    assert error == f"detris data refshapes: {name} is {value}, expected a number of scenes >= 0"
    assert not output.exists()


def _header_only_png(path, width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height", [(4000, 3000), (20000, 20000)])
def test_header_only_pngs_are_refused_when_building(tmp_path, width, height):
    root = tmp_path / "c"
    (root / "images").mkdir(parents=True)
    _header_only_png(root / "images" / "a.png", width, height)
    line = {"image": "images/a.png", "expressions": ["x"], "polygons": [[0, 0, 10, 0, 10, 10]]}
    (root / "train.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(CorruptAnnotationError, match=r"a.png: not a readable image"):
        load_custom_folder(str(root), progress=False)


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_letterbox_cache_never_unpickles_and_names_a_damaged_file(tmp_path):
    import numpy as np

    from training.data.cache import LetterboxCache, build_letterbox_cache
    from training.data.refshapes import RefShapesConfig, build_refshapes

    rows = build_refshapes(RefShapesConfig(seed=1, n_train=1, n_validation=0, n_test=0))["train"]
    cache = tmp_path / "cache"
    build_letterbox_cache(rows, str(cache), size=56, progress=False)
    marker = tmp_path / "code-ran"
    for name in ("ref_ids", "images"):  # .npy files holding pickled objects instead of numbers
        crafted = np.empty(1, dtype=object)
        crafted[0] = _RunsCode(str(marker))
        np.save(cache / f"{name}.npy", crafted, allow_pickle=True)
        with pytest.raises(ValueError, match=f"{name}.npy: not a readable cache array"):
            LetterboxCache(str(cache))
        assert not marker.exists()
    (cache / "meta.json").write_text("{half")
    with pytest.raises(ValueError, match="meta.json: not a valid UTF-8 JSON file"):
        LetterboxCache(str(cache))
