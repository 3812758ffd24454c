"""Data-loading throughput, samples/s on ONE core, measured side by side in one run.

Modes (same synthetic RefCOCO-like data: 640x480 JPEGs, ~3 refs per image, COCO RLE masks):

- ``official``: the official per-sample pipeline (DETRIS ``utils/dataset.py``): ``cv2.imdecode`` JPEG -> RGB,
  letterbox ``warpAffine`` (cubic), mask PNG ``imdecode`` + ``warpAffine`` (linear) + ``/255``, image
  ``/255 - mean / std`` with torch (text tokenisation not counted);
- ``on-the-fly``: :class:`training.data.DetrisDataCollator` + ``DetrisProcessor`` (decode, letterbox, RLE mask,
  warp, normalise, tokenise a random sentence), batches of ``--batch-size``;
- ``cached``: :class:`training.data.LetterboxCache` (uint8 letterboxed images + warped masks, pre-tokenised
  sentences) collated to uint8 batches; normalisation is left to the accelerator (``DeviceNormalizer``), whose CPU
  cost is reported separately as ``cached+cpu-normalise``.

Usage: ``python benchmarks/bench_data.py [--quick] [--n-images 64] [--refs-per-image 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.data.cache import DeviceNormalizer, LetterboxCache, build_letterbox_cache  # noqa: E402
from training.data.collate import DetrisDataCollator  # noqa: E402
from training.data.masks import binary_mask_to_rle  # noqa: E402
from training.data.schema import object_features  # noqa: E402

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).reshape(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).reshape(3, 1, 1)


def make_rows(n_images: int, refs_per_image: int, seed: int = 0, height: int = 480, width: int = 640):
    """RefCOCO-like rows: JPEG bytes (quality 90, textured content), elliptic/polygon masks as RLE."""
    rng = np.random.default_rng(seed)
    rows, pngs = [], []
    for i in range(n_images):
        small = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
        img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img.astype(np.int16) + rng.integers(-20, 21, size=img.shape), 0, 255).astype(np.uint8)
        ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        jpg = jpg.tobytes()
        for j in range(refs_per_image):
            m = np.zeros((height, width), np.uint8)
            cx, cy = int(rng.integers(80, width - 80)), int(rng.integers(80, height - 80))
            cv2.ellipse(m, (cx, cy), (int(rng.integers(20, 150)), int(rng.integers(20, 120))),
                        float(rng.uniform(0, 180)), 0, 360, 1, -1)
            rows.append({
                "dataset": "bench", "split": "train", "ref_id": i * 16 + j, "ann_id": i * 16 + j, "image_id": i,
                "category_id": 1, "category": "person",
                "sentences": ["the man on the left in a red shirt", "left guy", "person holding the umbrella"],
                "sent_ids": [0, 1, 2], "image": {"bytes": jpg, "path": f"{i}.jpg"}, "file_name": f"{i}.jpg",
                "height": height, "width": width, "bbox": [0.0, 0.0, 1.0, 1.0], "mask": binary_mask_to_rle(m),
            })
            pngs.append(cv2.imencode(".png", m * 255)[1].tobytes())
    return rows, pngs


def official_sample(jpg: bytes, png: bytes, size: int = 448):
    img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    scale = min(size / h, size / w)
    nh, nw = h * scale, w * scale
    bx, by = (size - nw) / 2.0, (size - nh) / 2.0
    src = np.array([[0, 0], [w, 0], [0, h]], np.float32)
    dst = np.array([[bx, by], [nw + bx, by], [bx, nh + by]], np.float32)
    mat = cv2.getAffineTransform(src, dst)
    img = cv2.warpAffine(img, mat, (size, size), flags=cv2.INTER_CUBIC,
                         borderValue=[0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255])
    mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    mask = cv2.warpAffine(mask, mat, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
    mask = torch.from_numpy(mask / 255.0).float()
    x = torch.from_numpy(img.transpose(2, 0, 1)).float().div_(255.0).sub_(MEAN).div_(STD)
    return x, mask


def _timed(fn, n_samples, min_time):
    fn()  # warm-up
    done, t0 = 0, time.perf_counter()
    while True:
        done += fn()
        dt = time.perf_counter() - t0
        if dt >= min_time and done >= n_samples:
            return done / dt


def run(n_images=64, refs_per_image=3, batch_size=16, min_time=2.0, seed=0, processor=None, verbose=True):
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from datasets import Dataset

    if processor is None:
        from processing_detris import DetrisProcessor

        processor = DetrisProcessor()
    rows, pngs = make_rows(n_images, refs_per_image, seed)
    n = len(rows)
    results = {"n_rows": n, "n_images": n_images, "batch_size": batch_size, "threads": 1,
               "device_note": "samples/s on one CPU core (torch and OpenCV limited to 1 thread)"}

    def official():
        for r, p in zip(rows, pngs):
            official_sample(r["image"]["bytes"], p)
        return n

    collator = DetrisDataCollator(processor, train=True, seed=seed)

    def on_the_fly():
        for s in range(0, n, batch_size):
            collator(rows[s:s + batch_size])
        return n

    with tempfile.TemporaryDirectory() as tmp:
        ds = Dataset.from_list(rows, features=object_features("bytes"))
        t0 = time.perf_counter()
        build_letterbox_cache(ds, os.path.join(tmp, "cache"), processor=processor, progress=False)
        results["cache_build_s"] = time.perf_counter() - t0
        cache = LetterboxCache(os.path.join(tmp, "cache"), train=True, seed=seed)
        norm = DeviceNormalizer.from_processor(processor)

        def cached():
            for s in range(0, n, batch_size):
                LetterboxCache.collate([cache[i] for i in range(s, min(n, s + batch_size))])
            return n

        def cached_norm():
            for s in range(0, n, batch_size):
                norm(LetterboxCache.collate([cache[i] for i in range(s, min(n, s + batch_size))]))
            return n

        results["official"] = _timed(official, n, min_time)
        results["on_the_fly"] = _timed(on_the_fly, n, min_time)
        results["cached"] = _timed(cached, n, min_time)
        results["cached_cpu_normalise"] = _timed(cached_norm, n, min_time)
    for k in ("on_the_fly", "cached", "cached_cpu_normalise"):
        results[f"{k}_vs_official"] = results[k] / results["official"]
    if verbose:
        print(f"data loading, {n} samples ({n_images} 640x480 JPEGs), samples/s per core (1 thread):")
        print(f"  official per-sample pipeline : {results['official']:9.1f} /s  ({1000 / results['official']:.2f} ms/sample)")
        for k, label in (("on_the_fly", "on-the-fly (processor)     "), ("cached", "cached uint8 (device norm) "),
                         ("cached_cpu_normalise", "cached + CPU normalise     ")):
            print(f"  {label} : {results[k]:9.1f} /s  ({1000 / results[k]:.2f} ms/sample)  "
                  f"ratio to official {results[k + '_vs_official']:.2f}x")
        print(f"  one-off cache build: {results['cache_build_s']:.2f} s for {n} rows")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=64)
    p.add_argument("--refs-per-image", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per mode (at least one pass)")
    p.add_argument("--quick", action="store_true", help="tiny run (4 images, 0.2 s per mode) for smoke tests")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.n_images, args.refs_per_image, args.min_time, args.batch_size = 4, 2, 0.2, 4
    res = run(args.n_images, args.refs_per_image, args.batch_size, args.min_time)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
