"""RefShapes: a deterministic synthetic referring-segmentation dataset.

Each image holds 3-6 flat-coloured shapes (circle, square, triangle, diamond, cross; six
colours; small or large) on a low-saturation textured background (flat, gradient, noise,
stripes, checker).  Later shapes may partly occlude earlier ones (each keeps >= 55 % of
its area visible; shapes of the same colour never touch), and masks are the exact
visible pixels.  Expressions are generated only when they pick out exactly one shape,
and need the text to do so:

=============  =================================================================
``kind``        "the circle"                               (only circle)
``colour``      "the red shape" / "the red one"            (only red shape)
``colour_kind`` "the red circle"
``size``        "the big circle", "the small red square", "the biggest shape"
``spatial``     "the leftmost triangle", "the blue shape on the right"
``ordinal``     "the second circle from the left"
``relation``    "the circle above the blue square", "the shape to the left of the cross"
=============  =================================================================

A group ``G`` is "shape" (all), a kind, "<colour> shape" or "<colour> <kind>".  Positions
compare shape centres and require a margin, sizes compare visible areas (ratio >= 1.6).

Splits (disjoint seeds): ``train`` never contains any held-out (colour, kind) combination;
``validation`` is drawn like train (new scenes); ``test`` scenes contain held-out
combinations and every target is one (compositional generalisation).

Rows follow the shared structure (:mod:`training.data.schema`) with PNG bytes in ``image``,
plus ``expression_types`` (one per sentence) and ``scene`` (JSON: every shape's kind,
colour, rgb, size class, centre, radius, visible area and visible-mask RLE).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
from datasets import Dataset, DatasetDict, List, Value

from processing_detris.metrics import IOU_EPSILON, ReferringSegmentationMetric, intersection_and_union

from .masks import binary_mask_to_rle, decode_rle, rle_bbox
from .schema import object_features

__all__ = [
    "RefShapesConfig",
    "KINDS",
    "COLOURS",
    "held_out_combinations",
    "generate_scene",
    "build_refshapes",
    "text_blind_baseline",
]

KINDS = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 185),
    "orange": (245, 140, 30),
}
SPLITS = ("train", "validation", "test")
EXPRESSION_TYPES = ("kind", "colour", "colour_kind", "size", "spatial", "ordinal", "relation")
ORDINALS = ("first", "second", "third", "fourth", "fifth")
SIZE_RATIO = 1.6


@dataclass
class RefShapesConfig:
    seed: int = 0
    image_size: int = 128
    n_train: int = 2000
    n_validation: int = 250
    n_test: int = 250
    min_shapes: int = 3
    max_shapes: int = 6
    refs_per_image: int = 2
    max_sentences: int = 3
    min_visible: float = 0.55
    held_out: tuple = field(default=None)  # (colour, kind) pairs; None -> derived from the seed
    size_scale: float = 1.0  # multiplies every shape's radius (small ones are 6-8.5 %, large 12-16 % of the side)
    expression_types: tuple = EXPRESSION_TYPES  # the kinds of expression generated (a subset of EXPRESSION_TYPES)

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f"image_size is {self.image_size}, expected >= 32")
        if not 1 <= self.min_shapes <= self.max_shapes:
            raise ValueError(f"min_shapes/max_shapes are {self.min_shapes}/{self.max_shapes}, expected 1 <= min <= max")
        for name in ("n_train", "n_validation", "n_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} is {getattr(self, name)}, expected a number of scenes >= 0")
        if self.held_out is None:
            self.held_out = held_out_combinations(self.seed)
        self.held_out = tuple(tuple(p) for p in self.held_out)
        self.expression_types = tuple(self.expression_types)
        unknown = [t for t in self.expression_types if t not in EXPRESSION_TYPES]
        if unknown or not self.expression_types:
            raise ValueError(f"expression_types {list(self.expression_types)} must be a non-empty subset of {list(EXPRESSION_TYPES)}")
        if not 0.25 <= self.size_scale <= 2.5:
            raise ValueError(f"size_scale is {self.size_scale}, expected a value in [0.25, 2.5]")
        for c, k in self.held_out:
            if c not in COLOURS or k not in KINDS:
                raise ValueError(f"held-out combination {(c, k)} is not a (colour, kind) in {list(COLOURS)} x {list(KINDS)}")


def held_out_combinations(seed: int = 0) -> tuple:
    """One held-out colour per kind (5 of the 30 combinations), each colour used at most once."""
    colours = list(COLOURS)
    rng = np.random.default_rng([seed, 7])
    perm = rng.permutation(len(colours))
    return tuple((colours[perm[i]], k) for i, k in enumerate(KINDS))


# ------------------------------------------------------------------------------------------------
# rendering


def _shape_mask(kind: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        a = 0.85 * r
        return (np.abs(dx) <= a) & (np.abs(dy) <= a)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if kind == "cross":
        t = 0.36 * r
        return ((np.abs(dx) <= r) & (np.abs(dy) <= t)) | ((np.abs(dy) <= r) & (np.abs(dx) <= t))
    if kind == "triangle":
        s = math.sqrt(3) / 2
        p = [(0.0, -1.1 * r), (1.1 * r * s, 0.55 * r), (-1.1 * r * s, 0.55 * r)]
        inside = np.ones_like(dx, dtype=bool)
        for (x1, y1), (x2, y2) in zip(p, p[1:] + p[:1]):
            inside &= (x2 - x1) * (dy - y1) - (y2 - y1) * (dx - x1) >= 0
        return inside
    raise ValueError(f"kind is {kind!r}, expected one of {KINDS}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(70, 190)
    tint = rng.uniform(-12, 12, size=3)
    col = np.clip(base + tint, 0, 255).astype(np.float32)
    style = rng.integers(5)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if style == 0:  # flat
        field_ = np.zeros((size, size), np.float32)
    elif style == 1:  # gradient
        ang = rng.uniform(0, 2 * np.pi)
        field_ = (np.cos(ang) * xs + np.sin(ang) * ys) * rng.uniform(30, 60)
    elif style == 2:  # noise
        field_ = rng.normal(0, rng.uniform(6, 14), size=(size, size)).astype(np.float32)
    elif style == 3:  # stripes
        period = rng.uniform(0.08, 0.2)
        field_ = np.sign(np.sin(2 * np.pi * (xs if rng.integers(2) else ys) / period)) * rng.uniform(8, 18)
    else:  # checker
        n = rng.integers(4, 10)
        field_ = ((np.floor(xs * n) + np.floor(ys * n)) % 2 * 2 - 1) * rng.uniform(8, 18)
    img = col[None, None, :] + field_[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _place_objects(rng, cfg: RefShapesConfig, split: str):
    size = cfg.image_size
    n = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    kinds_pool = list(rng.choice(KINDS, size=int(rng.integers(2, 4)), replace=False))
    colours_pool = list(rng.choice(list(COLOURS), size=int(rng.integers(2, 5)), replace=False))
    held = set(cfg.held_out)
    objects = []
    for _ in range(n):
        for _attempt in range(30):
            kind = str(rng.choice(kinds_pool))
            colour = str(rng.choice(colours_pool))
            if split != "test" and (colour, kind) in held:
                continue
            big = bool(rng.integers(2))
            r = size * cfg.size_scale * (rng.uniform(0.12, 0.16) if big else rng.uniform(0.06, 0.085))
            cx, cy = rng.uniform(r + 2, size - r - 2, size=2)
            full = _shape_mask(kind, cx, cy, r, size)
            grown = _dilate(full)
            if any(o["colour"] == colour and (o["full"] & grown).any() for o in objects):
                continue
            cand = objects + [dict(kind=kind, colour=colour, size="large" if big else "small",
                                   cx=float(cx), cy=float(cy), r=float(r), full=full)]
            idmap = _idmap(cand, size)
            if all((idmap == i).sum() >= cfg.min_visible * o["full"].sum() for i, o in enumerate(cand)):
                objects = cand
                break
    return objects


def _dilate(m: np.ndarray) -> np.ndarray:
    return cv2.dilate(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


def _idmap(objects, size):
    idmap = np.full((size, size), -1, np.int16)
    for i, o in enumerate(objects):
        idmap[o["full"]] = i
    return idmap


def _render(rng, objects, size):
    img = _background(rng, size)
    idmap = _idmap(objects, size)
    for i, o in enumerate(objects):
        img[idmap == i] = COLOURS[o["colour"]]
        o["visible"] = idmap == i
        o["area"] = int(o["visible"].sum())
    return img


# ------------------------------------------------------------------------------------------------
# expressions


def _group_phrases(o):
    """Groups containing ``o``: (phrase, predicate)."""
    c, k = o["colour"], o["kind"]
    return [
        ("shape", lambda p: True),
        (k, lambda p, k=k: p["kind"] == k),
        (f"{c} shape", lambda p, c=c: p["colour"] == c),
        (f"{c} {k}", lambda p, c=c, k=k: p["colour"] == c and p["kind"] == k),
    ]


def _unique_nps(o, objs):
    """Noun phrases (without "the") that identify ``o`` alone by attributes: (type, phrase)."""
    out = []
    same_kind = [p for p in objs if p["kind"] == o["kind"]]
    same_col = [p for p in objs if p["colour"] == o["colour"]]
    same_ck = [p for p in same_kind if p["colour"] == o["colour"]]
    if len(same_kind) == 1:
        out.append(("kind", o["kind"]))
    if len(same_col) == 1:
        out.append(("colour", f"{o['colour']} shape"))
    if len(same_ck) == 1 and len(same_kind) > 1 and len(same_col) > 1:
        out.append(("colour_kind", f"{o['colour']} {o['kind']}"))
    return out


_AXES = {  # name -> (coordinate, sign): smaller key value first
    "left": ("cx", 1), "right": ("cx", -1), "top": ("cy", 1), "bottom": ("cy", -1),
}
_EXTREME = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}
_PAIR = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_RELATIONS = {"above": ("cy", -1), "below": ("cy", 1), "to the left of": ("cx", -1), "to the right of": ("cx", 1)}


def _relation_holds(t, a, rel, margin):
    axis, sign = _RELATIONS[rel]
    other = "cx" if axis == "cy" else "cy"
    d = (t[axis] - a[axis]) * sign
    return d >= margin and d >= 1.3 * abs(t[other] - a[other])


def candidate_expressions(o, objs, size):
    """All (type, sentence) that single out ``o`` among ``objs``."""
    margin = 0.08 * size
    out = []
    for typ, np_ in _unique_nps(o, objs):
        if typ == "colour":
            out.append((typ, f"the {np_}"))
            out.append((typ, f"the {o['colour']} one"))
        else:
            out.append((typ, f"the {np_}"))
    for phrase, pred in _group_phrases(o):
        group = [p for p in objs if pred(p)]
        if len(group) < 2:
            continue
        others = [p for p in group if p is not o]
        # size: o is bigger / smaller than all the others by SIZE_RATIO
        if all(o["area"] >= SIZE_RATIO * p["area"] for p in others):
            out.append(("size", f"the {'big' if len(group) == 2 else 'biggest'} {phrase}"))
        if all(p["area"] >= SIZE_RATIO * o["area"] for p in others):
            out.append(("size", f"the {'small' if len(group) == 2 else 'smallest'} {phrase}"))
        for side, (axis, sign) in _AXES.items():
            order = sorted(group, key=lambda p: p[axis] * sign)
            keys = [p[axis] * sign for p in order]
            idx = order.index(o)
            gaps_ok = (idx == 0 or keys[idx] - keys[idx - 1] >= margin) and (
                idx == len(order) - 1 or keys[idx + 1] - keys[idx] >= margin)
            if not gaps_ok:
                continue
            if idx == 0:
                out.append(("spatial", f"the {phrase} {_PAIR[side]}" if len(group) == 2 else f"the {_EXTREME[side]} {phrase}"))
            elif len(group) >= 3 and idx < len(order) - 1 and idx < len(ORDINALS):
                out.append(("ordinal", f"the {ORDINALS[idx]} {phrase} from the {side}"))
    # relations: "the <G> <rel> the <anchor NP>", G must not identify o by itself
    for a in objs:
        if a is o:
            continue
        anchors = [np_ for _, np_ in _unique_nps(a, objs)]
        if not anchors:
            continue
        for phrase, pred in _group_phrases(o):
            group = [p for p in objs if pred(p) and p is not a]
            if len(group) < 2:
                continue
            for rel in _RELATIONS:
                holds = [p for p in group if _relation_holds(p, a, rel, margin)]
                if holds == [o] and all(
                    p is o or _relation_fails_clearly(p, a, rel, margin) for p in group
                ):
                    for anchor_np in anchors:
                        out.append(("relation", f"the {phrase} {rel} the {anchor_np}"))
    return out


def _relation_fails_clearly(p, a, rel, margin):
    axis, sign = _RELATIONS[rel]
    other = "cx" if axis == "cy" else "cy"
    d = (p[axis] - a[axis]) * sign
    # well outside the relation: behind the anchor, or clearly dominated by the other axis
    return d <= 0.5 * margin or d <= 0.8 * abs(p[other] - a[other])


def _select_sentences(rng, cands, k):
    by_type = {}
    for typ, s in cands:
        by_type.setdefault(typ, []).append(s)
    types = list(by_type)
    rng.shuffle(types)
    chosen = []
    while len(chosen) < k and any(by_type.values()):
        for t in types:
            if by_type[t] and len(chosen) < k:
                s = by_type[t].pop(int(rng.integers(len(by_type[t]))))
                chosen.append((t, s))
    return chosen


# ------------------------------------------------------------------------------------------------
# scenes and the dataset


def generate_scene(cfg: RefShapesConfig, split: str, index: int):
    """(image uint8 RGB, objects, [(target index, [(type, sentence), ...]), ...]) for one scene."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    held = set(cfg.held_out)
    for _attempt in range(50):
        objects = _place_objects(rng, cfg, split)
        img = _render(rng, objects, cfg.image_size)
        targets = []
        for i, o in enumerate(objects):
            if split == "test" and (o["colour"], o["kind"]) not in held:
                continue
            cands = [(t, e) for t, e in candidate_expressions(o, objects, cfg.image_size) if t in cfg.expression_types]
            if cands:
                targets.append((i, cands))
        if targets:
            order = rng.permutation(len(targets))[: cfg.refs_per_image]
            refs = [(targets[j][0], _select_sentences(rng, targets[j][1], cfg.max_sentences)) for j in sorted(order)]
            return img, objects, refs
    raise RuntimeError(f"RefShapes: could not generate a referable scene for {split}[{index}] (seed {cfg.seed})")


def _scene_rows(cfg: RefShapesConfig, split: str, index: int, image_id: int, ref_base: int):
    img, objects, refs = generate_scene(cfg, split, index)
    ok, png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    png = png.tobytes()
    rles = [binary_mask_to_rle(o["visible"]) for o in objects]
    scene = [
        {"kind": o["kind"], "colour": o["colour"], "rgb": list(COLOURS[o["colour"]]), "size": o["size"],
         "cx": round(o["cx"], 3), "cy": round(o["cy"], 3), "r": round(o["r"], 3), "area": o["area"], "mask": rles[i]}
        for i, o in enumerate(objects)
    ]
    scene_json = json.dumps(scene, separators=(",", ":"))
    file_name = f"refshapes_{split}_{index:06d}.png"
    rows = []
    for j, (ti, sents) in enumerate(refs):
        o = objects[ti]
        ref_id = ref_base + j
        rows.append({
            "dataset": "refshapes",
            "split": split,
            "ref_id": ref_id,
            "ann_id": image_id * 16 + ti,
            "image_id": image_id,
            "category_id": KINDS.index(o["kind"]),
            "category": o["kind"],
            "sentences": [s for _, s in sents],
            "sent_ids": [ref_id * 8 + k for k in range(len(sents))],
            "image": {"bytes": png, "path": file_name},
            "file_name": file_name,
            "height": cfg.image_size,
            "width": cfg.image_size,
            "bbox": rle_bbox(rles[ti]),
            "mask": rles[ti],
            "expression_types": [t for t, _ in sents],
            "target_index": ti,
            "scene": scene_json,
        })
    return rows


def refshapes_features():
    return object_features(
        "bytes",
        {"expression_types": List(Value("string")), "target_index": Value("int32"), "scene": Value("string")},
    )


def _split_rows(args):
    cfg_dict, split, start, stop, image_base = args
    cfg = RefShapesConfig(**cfg_dict)
    rows = []
    for i in range(start, stop):
        image_id = image_base + i
        rows.extend(_scene_rows(cfg, split, i, image_id, image_id * 8))
    return rows


def build_refshapes(cfg: RefShapesConfig | None = None, num_proc: int = 1, progress: bool = False,
                    **overrides) -> DatasetDict:
    """Generate the RefShapes DatasetDict (``train``, ``validation``, ``test``); same config -> same bytes.
    ``progress`` shows a bar counting the generated scenes."""
    from tqdm.auto import tqdm

    cfg = cfg or RefShapesConfig(**overrides)
    if overrides and cfg is not None and not isinstance(cfg, RefShapesConfig):
        raise TypeError("cfg must be a RefShapesConfig")
    counts = {"train": cfg.n_train, "validation": cfg.n_validation, "test": cfg.n_test}
    bases = {"train": 0, "validation": 10_000_000, "test": 20_000_000}
    cfg_dict = asdict(cfg)
    jobs = []
    for split in SPLITS:
        n = counts[split]
        step = max(1, math.ceil(n / max(1, num_proc * 4)))
        jobs += [(cfg_dict, split, s, min(n, s + step), bases[split]) for s in range(0, n, step)]
    bar = tqdm(total=sum(counts.values()), desc="RefShapes scenes", unit="scene", disable=not progress)
    parts = []
    if num_proc > 1:
        import multiprocessing as mp

        with mp.get_context("spawn" if os.name == "nt" else "fork").Pool(num_proc) as pool:
            for job, rows in zip(jobs, pool.imap(_split_rows, jobs)):
                parts.append(rows)
                bar.update(job[3] - job[2])
    else:
        for job in jobs:
            parts.append(_split_rows(job))
            bar.update(job[3] - job[2])
    bar.close()
    feats = refshapes_features()
    by_split = {s: [] for s in SPLITS}
    for (_, split, *_), rows in zip(jobs, parts):
        by_split[split].extend(rows)
    return DatasetDict({s: Dataset.from_list(by_split[s], features=feats) for s in SPLITS if counts[s] > 0})


# ------------------------------------------------------------------------------------------------
# text-blind baseline


def text_blind_baseline(ds: Dataset) -> dict:
    """mIoU / oIoU (per sentence, DETRIS semantics, `processing_detris.metrics`) of predictions that ignore the text.

    Strategies: ``all_shapes`` (union of every shape), ``largest_shape`` (the most salient shape, by visible
    area), ``random_shape`` (expected IoU of a uniformly chosen shape: the mean over shapes of their IoU, and for
    oIoU the mean intersection over the mean union).  ``best`` is the highest mIoU.
    """
    metrics = {k: ReferringSegmentationMetric() for k in ("all_shapes", "largest_shape")}
    random_iou, random_i, random_u = [], 0.0, 0.0
    for row in ds.select_columns(["scene", "mask", "sentences"]):
        scene = json.loads(row["scene"])
        gt = decode_rle(row["mask"]).astype(bool)
        masks = [decode_rle(o["mask"]).astype(bool) for o in scene]
        candidates = [np.logical_or.reduce(masks), masks[int(np.argmax([o["area"] for o in scene]))], *masks]
        intersections, unions = intersection_and_union(candidates, [gt] * len(candidates))
        per_shape_iou = intersections[2:].double() / (unions[2:].double() + IOU_EPSILON)
        for _ in row["sentences"]:
            for metric, index in zip(metrics.values(), (0, 1)):
                metric.add_counts(intersections[index:index + 1], unions[index:index + 1])
            random_iou.append(float(per_shape_iou.mean()))
            random_i += float(intersections[2:].double().mean())
            random_u += float(unions[2:].double().mean())
    out = {}
    for k, metric in metrics.items():
        result = metric.compute() if len(metric) else {"mIoU": 0.0, "oIoU": 0.0}
        out[k] = {"mIoU": result["mIoU"], "oIoU": result["oIoU"], "n": len(metric)}
    out["random_shape"] = {"mIoU": float(np.mean(random_iou)) if random_iou else 0.0,
                           "oIoU": random_i / random_u if random_u > 0 else 0.0, "n": len(random_iou)}
    out["best"] = max(("all_shapes", "largest_shape", "random_shape"), key=lambda k: out[k]["mIoU"])
    return out
