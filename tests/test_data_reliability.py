"""Untrusted annotation files: what a dataset build refuses (and how), and what it never touches. Each case is
refused when the dataset is built, with a message naming the file or the ref, not later at train time."""

import json
import os

import cv2
import datasets
import numpy as np
import pytest

from training.data import CorruptAnnotationError, build_refer_dataset, load_custom_folder
from training.data.cli import main as data_main
from refer_fixture import make_refer_fixture, rewrite_instances

pytestmark = [pytest.mark.filterwarnings("ignore:.*zero-area.*"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


@pytest.fixture
def fx(tmp_path):
    return make_refer_fixture(str(tmp_path / "fx"))



def _build(fx):
    return build_refer_dataset(fx["refer_root"], fx["images_root"], "refcoco", "unc", progress=False)


def test_absurd_image_sizes_are_refused_when_building(fx):
    def huge(instances):
        instances["images"][0].update(height=100000, width=100000)

    rewrite_instances(fx, huge)
    with pytest.raises(CorruptAnnotationError, match="100000x100000 is over the limit"):
        _build(fx)


def test_an_annotation_size_that_disagrees_with_the_image_is_refused(fx):
    def wrong(instances):
        instances["images"][0].update(height=480, width=640)

    rewrite_instances(fx, wrong)
    with pytest.raises(CorruptAnnotationError, match="480x640, the file .* is 48x64"):
        _build(fx)


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_files_that_are_not_readable_images_are_refused(fx, content):
    path = os.path.join(fx["images_root"], "COCO_train2014_000000000003.jpg")
    if content == "truncated":
        ok, png = cv2.imencode(".png", np.full((32, 32, 3), 7, np.uint8))
        content = png.tobytes()[: len(png) // 2]
    with open(path, "wb") as handle:
        handle.write(content)
    with pytest.raises(CorruptAnnotationError, match="COCO_train2014_000000000003.jpg: not a readable image"):
        _build(fx)


def test_file_names_escaping_the_images_root_are_refused(fx, tmp_path):
    secret = tmp_path / "secret.png"
    cv2.imwrite(str(secret), np.zeros((48, 64, 3), np.uint8))

    def escape(instances):
        instances["images"][0]["file_name"] = "../secret.png"

    rewrite_instances(fx, escape)
    with pytest.raises(CorruptAnnotationError, match="outside"):
        _build(fx)
    # a symlink inside the root that leads out of it is refused the same way
    rewrite_instances(fx, lambda instances: instances["images"][0].update(file_name="link.png"))
    os.symlink(secret, os.path.join(fx["images_root"], "link.png"))
    with pytest.raises(CorruptAnnotationError, match="outside"):
        _build(fx)


def test_duplicate_ref_ids_and_far_away_polygons_are_refused(tmp_path):
    root = tmp_path / "c"
    (root / "images").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "a.png"), np.full((20, 30, 3), 128, np.uint8))
    square = [[0, 0, 10, 0, 10, 10, 0, 10]]
    line = {"image": "images/a.png", "expressions": ["the box"], "polygons": square}
    (root / "train.jsonl").write_text(json.dumps(dict(line, ref_id=7)) + "\n" + json.dumps(dict(line, ref_id=7)) + "\n")
    with pytest.raises(CorruptAnnotationError, match="ref_id 7 appears twice"):
        load_custom_folder(str(root), progress=False)
    far = dict(line, polygons=[[0, 0, 1e12, 0, 10, 10]])
    (root / "train.jsonl").write_text(json.dumps(far) + "\n")
    with pytest.raises(CorruptAnnotationError, match="coordinate 1000000000000.0, expected pixel coordinates within"):
        load_custom_folder(str(root), progress=False)


def test_custom_paths_stay_inside_the_root_unless_absolute_paths_are_allowed(tmp_path):
    root = tmp_path / "c"
    (root / "images").mkdir(parents=True)
    outside = tmp_path / "outside.png"
    cv2.imwrite(str(outside), np.full((20, 30, 3), 128, np.uint8))
    square = [[0, 0, 10, 0, 10, 10, 0, 10]]
    for image in ("../outside.png", str(outside)):
        (root / "train.jsonl").write_text(json.dumps({"image": image, "expressions": ["x"], "polygons": square}) + "\n")
        with pytest.raises(CorruptAnnotationError, match="outside|absolute path"):
            load_custom_folder(str(root), progress=False)
    rows = load_custom_folder(str(root), progress=False, allow_absolute_paths=True)["train"].to_list()
    assert rows[0]["image"] == str(outside)


def test_decoding_errors_name_the_file(fx, tmp_path):
    path = os.path.join(fx["refer_root"], "refcoco", "instances.json")
    with open(path, "w") as handle:
        handle.write('{"images": [')
    with pytest.raises(CorruptAnnotationError, match="instances.json: not a valid UTF-8 JSON file"):
        _build(fx)
    with open(path, "wb") as handle:
        handle.write(b'{"images": "\xff\xfe"}')
    with pytest.raises(CorruptAnnotationError, match="instances.json: not a valid UTF-8 JSON file"):
        _build(fx)
    root = tmp_path / "c"
    root.mkdir()
    (root / "train.jsonl").write_bytes(b'{"image": "\xff"}\n')
    with pytest.raises(CorruptAnnotationError, match="train.jsonl: not UTF-8"):
        load_custom_folder(str(root), progress=False)
    (root / "train.jsonl").write_text('{"image": "a.png", "ref_id": "abc", "expressions": ["x"], "polygons": []}\n')
    with pytest.raises(CorruptAnnotationError, match="train.jsonl:1: an id or size is not an integer"):
        load_custom_folder(str(root), progress=False)


def test_data_custom_refuses_an_output_that_is_or_holds_its_input(tmp_path, capsys):
    root = tmp_path / "c"
    (root / "images").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "a.png"), np.full((20, 30, 3), 128, np.uint8))
    line = json.dumps({"image": "images/a.png", "expressions": ["the box"], "polygons": [[0, 0, 10, 0, 10, 10, 0, 10]]})
    (root / "train.jsonl").write_text(line + "\n")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for output in (root, tmp_path, root / "out"):
        assert data_main(["custom", "--root", str(root), "--output", str(output), "--overwrite", "--no-progress"]) == 2
        error = capsys.readouterr().err.strip()
        assert "overlaps the input --root" in error and len(error.splitlines()) == 1
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path):
    output = tmp_path / "rs"
    staging = tmp_path / ".rs.partial"
    staging.mkdir()
    (staging / "half-written.arrow").write_bytes(b"x" * 10)
    assert data_main(["refshapes", "--output", str(output), "--n-train", "2", "--n-validation", "1", "--n-test", "1",
                      "--no-progress"]) == 0
    assert not staging.exists() and datasets.load_from_disk(str(output))["train"].num_rows > 0
    assert [p.name for p in tmp_path.iterdir()] == ["rs"]


def test_user_mistakes_in_data_commands_end_in_one_line(tmp_path, capsys):
    assert data_main(["custom", "--root", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("detris data custom:") and "no *.jsonl" in error and len(error.splitlines()) == 1


def test_cache_size_comes_from_the_processor(tmp_path):
    from processing_detris import DetrisImageProcessor, DetrisProcessor

    from training.data.cache import LetterboxCache, build_letterbox_cache
    from training.data.refshapes import RefShapesConfig, build_refshapes

    rows = build_refshapes(RefShapesConfig(seed=1, n_train=1, n_validation=0, n_test=0))["train"]
    previous = os.umask(0o022)
    try:
        build_letterbox_cache(rows, str(tmp_path / "cache"), processor=DetrisProcessor(DetrisImageProcessor(
            size={"height": 224, "width": 224})), progress=False)
        assert data_main(["refshapes", "--output", str(tmp_path / "rs"), "--n-train", "2", "--n-validation", "1",
                          "--n-test", "1", "--no-progress"]) == 0
    finally:
        os.umask(previous)
    assert LetterboxCache(str(tmp_path / "cache")).images.shape[-1] == 224
    for folder in ("cache", "rs"):  # written folders follow the umask (others can read a shared data folder)
        assert os.stat(tmp_path / folder).st_mode & 0o777 == 0o755, folder
