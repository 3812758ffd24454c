"""`detris reproduce` end to end on the refer-format fixture with tiny stand-in official checkpoints (their numbers are
meaningless; the plumbing, the tables and the pass marks are checked), and the table logic on chosen numbers."""

import json
import os

import pytest

from official_standins import make_official_checkpoint, write_config
from training.cli import main as cli
from refer_fixture import make_refer_fixture
from configuration_detris.release import variant_from_checkpoint_name
from training.reproduce import compare, find_checkpoints, markdown_tables

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*zero-area.*"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

OFFICIAL_FILES = {  # path under --official-dir -> (variant, datasets evaluated)
    "base/base_refcoco.pth": ("base", ["refcoco"]),
    "base/base_refcoco+.pth": ("base", ["refcoco+"]),
    "base/base_refcocog_u.pth": ("base", ["refcocog-umd"]),
    "base/base_refcocog_g.pth": ("base", ["refcocog-google"]),
    "mix/mix.pth": ("large-mixed", ["refcoco", "refcoco+", "refcocog-umd"]),
}
# expressions per split in the fixture (tests/refer_fixture.py): every one of them must be evaluated
SENTENCES = {("refcoco", "val"): 1, ("refcoco", "testA"): 1, ("refcoco", "testB"): 2, ("refcoco+", "val"): 1,
             ("refcoco+", "testA"): 1, ("refcoco+", "testB"): 2, ("refcocog-umd", "val"): 1,
             ("refcocog-umd", "test"): 3, ("refcocog-google", "val"): 5}


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    fixture = make_refer_fixture(str(root / "refer-fixture"))
    for index, name in enumerate(OFFICIAL_FILES):
        make_official_checkpoint(root / "official" / name, seed=index + 1)
    (root / "official" / "notes.pth").write_bytes(b"not a checkpoint")  # its name tells nothing: skipped
    args = ["reproduce", "--official-dir", str(root / "official"), "--refer-root", fixture["refer_root"],
            "--images-root", fixture["images_root"], "--output", str(root / "out"), "--config",
            str(write_config(root / "tiny.json")), "--no-progress", "--batch-size", "2"]
    assert cli(args) == 0
    return root / "out", args


def test_reproduce_writes_both_tables_from_the_evaluations(reproduction, capsys):
    out, _ = reproduction
    report = json.loads((out / "reproduction.json").read_text())
    cells = report["cells"]
    # DETRIS-B: 9 cells, DETRIS-L*: 8 (no G-Ref google), for mIoU and oIoU.
    assert len(cells) == 2 * (9 + 8) and {c["metric"] for c in cells} == {"mIoU", "oIoU"}
    for cell in cells:
        name = "base-" + cell["dataset"].replace("+", "-plus") if cell["variant"] == "base" else "large-mixed-mixed"
        results = json.loads((out / "eval" / name / cell["dataset"].replace("+", "-plus") / "results.json").read_text())
        measured = results[cell["split"]]
        assert cell["ours"] == pytest.approx(100 * measured[cell["metric"]])
        assert cell["num_samples"] == measured["num_samples"] == SENTENCES[(cell["dataset"], cell["split"])]
        assert cell["diff"] == pytest.approx(cell["ours"] - cell["paper"])
        assert cell["pass"] == (abs(cell["diff"]) <= 0.3)
    paper = {(c["variant"], c["metric"], c["dataset"], c["split"]): c["paper"] for c in cells}
    assert paper[("base", "mIoU", "refcoco", "val")] == 76.0 and paper[("base", "oIoU", "refcocog-google", "val")] == 63.2
    assert paper[("large-mixed", "mIoU", "refcocog-umd", "test")] == 75.3

    text = (out / "reproduction.md").read_text()
    assert "### mIoU" in text and "### oIoU" in text
    assert "| DETRIS-B, paper | 76.00 | 78.20 | 73.50 | 68.90 | 74.00 | 61.50 | 67.90 | 68.10 | 65.90 | 70.44 |" in text
    ours = next(c for c in cells if (c["variant"], c["metric"], c["dataset"], c["split"]) == ("base", "oIoU", "refcoco+", "testB"))
    assert f"{ours['diff']:+.2f} {'✓' if ours['pass'] else '✗'}" in text
    measured = sum(c["pass"] is not None for c in cells)
    assert f"of {measured} measured cells within ±0.3 points" in text

    # Every official file became a whole model folder with its text length (22 only for G-Ref umd).
    for name, word_len in (("base-refcoco", 17), ("base-refcocog-umd", 22), ("base-refcocog-google", 17), ("large-mixed-mixed", 17)):
        assert json.loads((out / "models" / name / "config.json").read_text())["word_len"] == word_len
    assert sorted(p.name for p in (out / "data").iterdir()) == ["refcoco", "refcoco-plus", "refcocog-google", "refcocog-umd"]


def test_a_second_run_reuses_every_step(reproduction, capsys):
    out, args = reproduction
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    stamps.update({p: p.stat().st_mtime_ns for p in out.rglob("results.json")})
    before = json.loads((out / "reproduction.json").read_text())["cells"]
    assert cli(args) == 0
    assert "RESULT cells_within_0.3=" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    assert json.loads((out / "reproduction.json").read_text())["cells"] == before


def test_pass_marks_at_the_tolerance():
    measured = {"base": {"refcoco": {"val": {"mIoU": 0.7629, "oIoU": 0.7399, "num_samples": 10834},
                                     "testA": {"mIoU": 0.7851, "oIoU": 0.7760, "num_samples": 5657}}}}
    cells = {(c["metric"], c["dataset"], c["split"]): c for c in compare(measured)}
    assert cells[("mIoU", "refcoco", "val")]["pass"] is True  # 76.29 vs 76.0: +0.29
    assert cells[("oIoU", "refcoco", "val")]["pass"] is False  # 73.99 vs 74.3: -0.31
    assert cells[("mIoU", "refcoco", "testA")]["pass"] is False  # 78.51 vs 78.2: +0.31
    assert cells[("oIoU", "refcoco", "testA")]["pass"] is True  # 77.60 vs 77.6: 0
    assert cells[("mIoU", "refcoco", "testB")]["ours"] is None and cells[("mIoU", "refcoco", "testB")]["pass"] is None
    text = markdown_tables(list(cells.values()))
    assert "| DETRIS-B, Δ | +0.29 ✓ | +0.31 ✗ | – |" in text
    assert "| DETRIS-B, Δ | -0.31 ✗ | +0.00 ✓ | – |" in text
    assert "**2 of 4 measured cells within ±0.3 points.**" in text


def test_official_file_names(tmp_path):
    names = ("base_refcoco+.pth", "lagre_refcoco.pth", "large_refcocog_g.pth", "mix.pth", "x.pth")
    assert [variant_from_checkpoint_name(n) for n in names] == ["base", "large", "large", "large-mixed", None]
    (tmp_path / "base").mkdir()
    for name in ("base_refcoco.pth", "base_refcoco_copy.pth"):
        (tmp_path / "base" / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"several checkpoints .* are \['base-refcoco'\]"):
        find_checkpoints(tmp_path, log=lambda message: None)
    os.remove(tmp_path / "base" / "base_refcoco_copy.pth")
    assert [c["name"] for c in find_checkpoints(tmp_path)] == ["base-refcoco"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no official DETRIS checkpoint"):
        find_checkpoints(tmp_path / "empty")
    with pytest.raises(ValueError, match="is not a folder"):
        find_checkpoints(tmp_path / "missing")
