"""RefShapes: determinism, expression/mask agreement (independent parser), held-out splits, text-blind baseline."""

import json
import re
import time

import cv2
import numpy as np
import pytest

from training.data import RefShapesConfig, build_refshapes, decode_rle, text_blind_baseline
from training.data.cli import main as data_main
from training.data.refshapes import COLOURS, EXPRESSION_TYPES, KINDS

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2
CFG = dict(seed=11, n_train=40, n_validation=10, n_test=10)


@pytest.fixture(scope="module")
def dd():
    return build_refshapes(RefShapesConfig(**CFG))


def test_deterministic_same_seed_same_bytes(dd):
    again = build_refshapes(RefShapesConfig(**CFG), num_proc=2)
    for split in dd:
        assert dd[split].to_list() == again[split].to_list()
    other = build_refshapes(RefShapesConfig(**{**CFG, "seed": 12}))
    assert other["train"]["image"][0]["bytes"] != dd["train"]["image"][0]["bytes"]


def test_structure_matches_refcoco_family(dd):
    from training.data import object_features

    base = object_features("bytes")
    for name, feat in base.items():
        assert dd["train"].features[name] == feat
    row = dd["train"][0]
    img = cv2.imdecode(np.frombuffer(row["image"]["bytes"], np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (128, 128, 3) and (row["height"], row["width"]) == (128, 128)


# ---- an independent reading of the expressions -------------------------------------------------------
COL = "|".join(COLOURS)
KIND = "|".join(KINDS)
G = rf"(?:(?P<{{p}}c>{COL}) )?(?P<{{p}}k>{KIND}|shape)"


def _g(p):
    return G.format(p=p)


def _members(objs, colour, kind):
    return [i for i, o in enumerate(objs) if (colour is None or o["colour"] == colour) and (kind == "shape" or o["kind"] == kind)]


def _np(objs, text):
    m = re.fullmatch(rf"(?:(?P<c>{COL}) )?(?P<k>{KIND}|shape)", text)
    ms = _members(objs, m["c"], m["k"])
    assert len(ms) == 1, f"anchor {text!r} is ambiguous: {ms}"
    return ms[0]


def resolve(sentence, objs, size=128):
    margin = 0.08 * size
    if m := re.fullmatch(rf"the (?P<c>{COL}) one", sentence):
        ms = _members(objs, m["c"], "shape")
        return ms[0] if len(ms) == 1 else None
    if m := re.fullmatch(rf"the {_g('a')} (?P<rel>above|below|to the left of|to the right of) the (?P<anchor>.+)", sentence):
        a = _np(objs, m["anchor"])
        axis, sign = {"above": ("cy", -1), "below": ("cy", 1), "to the left of": ("cx", -1), "to the right of": ("cx", 1)}[m["rel"]]
        other = "cy" if axis == "cx" else "cx"
        hits = [i for i in _members(objs, m["ac"], m["ak"]) if i != a
                and (objs[i][axis] - objs[a][axis]) * sign > max(0.5 * margin, 0.8 * abs(objs[i][other] - objs[a][other]))]
        return hits[0] if len(hits) == 1 else None
    if m := re.fullmatch(rf"the (?P<ord>second|third|fourth|fifth) {_g('a')} from the (?P<side>left|right|top|bottom)", sentence):
        ms = _members(objs, m["ac"], m["ak"])
        axis, sign = {"left": ("cx", 1), "right": ("cx", -1), "top": ("cy", 1), "bottom": ("cy", -1)}[m["side"]]
        order = sorted(ms, key=lambda i: objs[i][axis] * sign)
        k = ["first", "second", "third", "fourth", "fifth"].index(m["ord"])
        keys = [objs[i][axis] * sign for i in order]
        assert len(set(keys)) == len(keys)
        return order[k] if k < len(order) else None
    ext = {"leftmost": ("cx", 1), "rightmost": ("cx", -1), "topmost": ("cy", 1), "bottommost": ("cy", -1)}
    if m := re.fullmatch(rf"the (?P<e>leftmost|rightmost|topmost|bottommost) {_g('a')}", sentence):
        axis, sign = ext[m["e"]]
        ms = _members(objs, m["ac"], m["ak"])
        assert len(ms) >= 3
        return min(ms, key=lambda i: objs[i][axis] * sign)
    if m := re.fullmatch(rf"the {_g('a')} (?P<p>on the left|on the right|at the top|at the bottom)", sentence):
        axis, sign = {"on the left": ("cx", 1), "on the right": ("cx", -1), "at the top": ("cy", 1), "at the bottom": ("cy", -1)}[m["p"]]
        ms = _members(objs, m["ac"], m["ak"])
        assert len(ms) == 2
        return min(ms, key=lambda i: objs[i][axis] * sign)
    if m := re.fullmatch(rf"the (?P<s>big|small|biggest|smallest) {_g('a')}", sentence):
        ms = _members(objs, m["ac"], m["ak"])
        assert len(ms) == (2 if m["s"] in ("big", "small") else len(ms)) and len(ms) >= 2
        areas = sorted((objs[i]["area"], i) for i in ms)
        if m["s"] in ("big", "biggest"):
            assert areas[-1][0] >= 1.6 * areas[-2][0]
            return areas[-1][1]
        assert areas[1][0] >= 1.6 * areas[0][0]
        return areas[0][1]
    if m := re.fullmatch(rf"the {_g('a')}", sentence):
        ms = _members(objs, m["ac"], m["ak"])
        return ms[0] if len(ms) == 1 else None
    raise AssertionError(f"unparsed expression {sentence!r}")


def test_masks_match_expressions_for_every_type(dd):
    checked = {t: 0 for t in EXPRESSION_TYPES}
    for split in dd:
        for row in dd[split]:
            objs = json.loads(row["scene"])
            img = cv2.cvtColor(cv2.imdecode(np.frombuffer(row["image"]["bytes"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            mask = decode_rle(row["mask"]).astype(bool)
            t = row["target_index"]
            target = objs[t]
            # the mask is exactly the target's visible pixels, all of the target's colour
            assert mask.sum() == target["area"] > 0 and row["mask"] == target["mask"]
            assert (img[mask] == np.array(COLOURS[target["colour"]], np.uint8)).all()
            assert row["category"] == target["kind"]
            vis = [decode_rle(o["mask"]).astype(bool) for o in objs]
            assert sum(v.sum() for v in vis) == np.logical_or.reduce(vis).sum()  # visible masks are disjoint
            for sent, typ in zip(row["sentences"], row["expression_types"]):
                assert resolve(sent, objs) == t, (sent, typ, objs)
                checked[typ] += 1
    assert all(n > 0 for n in checked.values()), checked


def test_held_out_combinations(dd):
    held = {tuple(p) for p in RefShapesConfig(**CFG).held_out}
    assert len(held) == len(KINDS)
    for split in ("train", "validation"):
        for row in dd[split]:
            assert not any((o["colour"], o["kind"]) in held for o in json.loads(row["scene"]))
    for row in dd["test"]:
        o = json.loads(row["scene"])[row["target_index"]]
        assert (o["colour"], o["kind"]) in held


def test_text_blind_baseline_reported(dd, tmp_path, capsys):
    b = text_blind_baseline(dd["validation"])
    for k in ("all_shapes", "largest_shape", "random_shape"):
        assert 0 < b[k]["mIoU"] < 0.6 and 0 < b[k]["oIoU"] < 0.6
        assert b[k]["n"] == sum(len(s) for s in dd["validation"]["sentences"])
    assert b["best"] in b
    assert data_main(["refshapes", "--output", str(tmp_path / "rs"), "--n-train", "6", "--n-validation", "3", "--n-test", "3"]) == 0
    out = capsys.readouterr().out
    assert "text-blind baseline (validation)" in out and "mIoU" in out


def test_default_size_generates_under_a_minute():
    n = 60
    t0 = time.perf_counter()
    build_refshapes(RefShapesConfig(seed=0, n_train=n, n_validation=0, n_test=0))
    dt = time.perf_counter() - t0
    default = RefShapesConfig()
    projected = dt / n * (default.n_train + default.n_validation + default.n_test)
    assert projected < 60, f"default RefShapes would take ~{projected:.0f} s on one core"


def test_size_scale_and_expression_types_options():
    small = build_refshapes(RefShapesConfig(seed=3, n_train=12, n_validation=2, n_test=2))
    large = build_refshapes(RefShapesConfig(seed=3, n_train=12, n_validation=2, n_test=2, size_scale=1.5,
                                            expression_types=("colour", "spatial")))
    radii = lambda ds: np.mean([o["r"] for row in ds for o in json.loads(row["scene"])])  # noqa: E731
    assert radii(large["train"]) > 1.3 * radii(small["train"])
    types = {t for split in large.values() for row in split for t in row["expression_types"]}
    assert types and types <= {"colour", "spatial"}
    with pytest.raises(ValueError, match=r"expression_types \['ordinals'\] must be a non-empty subset"):
        RefShapesConfig(expression_types=("ordinals",))
    with pytest.raises(ValueError, match="size_scale is 3.0, expected a value in"):
        RefShapesConfig(size_scale=3.0)
