"""Collator (processor outputs), the uint8 letterbox cache (bit-identical to on-the-fly) and the benchmark."""

import importlib.util
import os

import numpy as np
import pytest
import torch

from processing_detris import DetrisProcessor
from training.data import (
    DetrisDataCollator,
    DeviceNormalizer,
    LetterboxCache,
    RefShapesConfig,
    build_letterbox_cache,
    build_refer_dataset,
    build_refshapes,
    decode_rle,
    to_sentence_level,
)
from refer_fixture import make_refer_fixture

pytestmark = [pytest.mark.filterwarnings("ignore:.*zero-area.*"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # pycocotools + numpy 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def processor():
    return DetrisProcessor()


@pytest.fixture(scope="module")
def refer_ds(tmp_path_factory):
    f = make_refer_fixture(str(tmp_path_factory.mktemp("fx")))
    return build_refer_dataset(f["refer_root"], f["images_root"], "refcoco", "unc", progress=False)


@pytest.fixture(scope="module")
def shapes():
    return build_refshapes(RefShapesConfig(seed=3, n_train=12, n_validation=4, n_test=4))


def _all_rows(dd):
    return [r for ds in dd.values() for r in ds]


def test_train_collator_outputs_and_seeded_sampling(processor, refer_ds):
    rows = _all_rows(refer_ds)
    out = DetrisDataCollator(processor, train=True, seed=0)(rows)
    assert out["pixel_values"].shape == (5, 3, 448, 448) and out["pixel_values"].dtype == torch.float32
    assert out["input_ids"].shape == (5, 17) and out["labels"].shape == (5, 448, 448)
    assert float(out["labels"].min()) >= 0 and float(out["labels"].max()) <= 1
    # the zero-area ref (ref 4) gives an all-zero target, the others do not
    per_ref = {r["ref_id"]: float(out["labels"][i].sum()) for i, r in enumerate(rows)}
    assert per_ref[4] == 0 and all(v > 0 for k, v in per_ref.items() if k != 4)
    # same seed -> same sentences; each input_ids is the tokenisation of one of the row's sentences
    draws = []
    for seed in (0, 0, 1):
        c = DetrisDataCollator(processor, train=True, seed=seed)
        draws.append(torch.cat([c(rows)["input_ids"] for _ in range(6)]))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    for i, r in enumerate(rows * 6):
        options = processor(text=r["sentences"], return_tensors="pt")["input_ids"]
        assert any(torch.equal(draws[0][i], o) for o in options)
    # every sentence of a multi-sentence ref gets drawn eventually
    ref2 = [r for r in rows if r["ref_id"] == 2][0]
    c = DetrisDataCollator(processor, train=True, seed=5)
    seen = {tuple(c([ref2])["input_ids"][0].tolist()) for _ in range(30)}
    assert len(seen) == len(ref2["sentences"])


def test_eval_collator_keeps_original_size_and_gt(processor, refer_ds):
    rows = _all_rows(refer_ds)
    n_sent = sum(len(r["sentences"]) for r in rows)
    out = DetrisDataCollator(processor, train=False)(rows)
    assert out["input_ids"].shape[0] == out["pixel_values"].shape[0] == n_sent
    assert "labels" not in out
    assert out["original_sizes"].tolist() == [[r["height"], r["width"]] for r in rows for _ in r["sentences"]]
    for gt, (h, w) in zip(out["gt_masks"], out["original_sizes"].tolist()):
        assert gt.dtype == torch.bool and tuple(gt.shape) == (h, w)
    assert out["sent_ids"].tolist() == [s for r in rows for s in r["sent_ids"]]
    first = DetrisDataCollator(processor, train=False, eval_sentences="first")(rows)
    assert first["input_ids"].shape[0] == len(rows)
    # sentence-level rows: one sample per row, same tensors as the object-level expansion
    sv = [r for ds in to_sentence_level(refer_ds).values() for r in ds]
    out2 = DetrisDataCollator(processor, train=False)(sv)
    assert torch.equal(out2["input_ids"], out["input_ids"]) and torch.equal(out2["pixel_values"], out["pixel_values"])


@pytest.mark.parametrize("source", ["refer", "refshapes"])
def test_cache_is_bit_identical_to_on_the_fly(processor, refer_ds, shapes, source, tmp_path):
    ds = refer_ds["train"] if source == "refer" else shapes["train"]
    if source == "refer":
        from datasets import concatenate_datasets

        ds = concatenate_datasets(list(refer_ds.values()))
    cache_dir = build_letterbox_cache(ds, str(tmp_path / "cache"), processor=processor, progress=False)
    cache = LetterboxCache(cache_dir, train=False)
    norm = DeviceNormalizer.from_processor(processor)
    assert norm.use_formula
    lut_only = DeviceNormalizer(norm.lut.view(3, 256).clone())
    lut_only.use_formula = False
    rows = ds.to_list()[:6]
    for i, row in enumerate(rows):
        ref = processor(images=[_img(row)], text=row["sentences"][:1], masks=[decode_rle(row["mask"]) * 255],
                        return_tensors="pt")
        item = LetterboxCache.collate([cache.item(i, 0)])
        assert item["pixel_values"].dtype == torch.uint8 and item["labels"].dtype == torch.uint8
        for normaliser in (norm, lut_only) if i < 2 else (norm,):
            got = normaliser(item)
            assert torch.equal(got["pixel_values"], ref["pixel_values"])
            assert torch.equal(got["labels"], ref["labels"])
        ids = processor(text=row["sentences"], return_tensors="pt")["input_ids"]
        assert torch.equal(torch.stack([cache.item(i, j)["input_ids"] for j in range(len(row["sentences"]))]), ids)
        assert cache.original_sizes[i].tolist() == [row["height"], row["width"]]
        assert np.allclose(cache.inverse_affine[i], processor(images=[_img(row)])["inverse_affines"][0].numpy())
    # random sentence sampling in train mode is seeded
    a = [LetterboxCache(cache_dir, train=True, seed=1)[i]["input_ids"] for i in range(len(cache))]
    b = [LetterboxCache(cache_dir, train=True, seed=1)[i]["input_ids"] for i in range(len(cache))]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(FileExistsError):
        build_letterbox_cache(ds, cache_dir, processor=processor, progress=False)


def _img(row):
    from training.data.collate import processor_image

    return processor_image(row["image"])


def test_cache_in_dataloader_with_workers(processor, shapes, tmp_path):
    cache_dir = build_letterbox_cache(shapes["validation"], str(tmp_path / "c"), processor=processor, progress=False)
    cache = LetterboxCache(cache_dir, train=True, seed=0)
    dl = torch.utils.data.DataLoader(cache, batch_size=4, num_workers=2, collate_fn=LetterboxCache.collate,
                                     generator=torch.Generator().manual_seed(0))
    batches = list(dl)
    assert sum(b["pixel_values"].shape[0] for b in batches) == len(cache)
    assert batches[0]["pixel_values"].dtype == torch.uint8


def test_benchmark_quick_mode_prints_rates_and_ratio(processor, capsys):
    spec = importlib.util.spec_from_file_location("bench_data", os.path.join(ROOT, "benchmarks", "bench_data.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.run(n_images=2, refs_per_image=2, batch_size=4, min_time=0.05, processor=processor)
    out = capsys.readouterr().out
    for key in ("official", "on_the_fly", "cached"):
        assert res[key] > 0
    assert "official per-sample pipeline" in out and "ratio to official" in out and "cached uint8" in out
    assert res["cached_vs_official"] == pytest.approx(res["cached"] / res["official"])


def test_cache_follows_a_saved_processor_of_another_size(shapes, tmp_path):
    """`detris data cache --processor DIR` letterboxes to the processor's size (a `SizeDict` once loaded), not 448."""
    from training.data.cli import main as data_main

    DetrisProcessor.from_model_config(type("C", (), {"input_size": 224, "word_len": 17})()).save_pretrained(tmp_path / "p")
    loaded = DetrisProcessor.from_pretrained(tmp_path / "p")
    shapes.save_to_disk(str(tmp_path / "ds"))
    assert data_main(["cache", "--dataset-dir", str(tmp_path / "ds"), "--split", "validation", "--processor",
                      str(tmp_path / "p"), "--output", str(tmp_path / "c"), "--no-progress"]) == 0
    cache = LetterboxCache(str(tmp_path / "c"), train=False)
    item = LetterboxCache.collate([cache.item(0, 0)])
    row = shapes["validation"][0]
    ref = loaded(images=[_img(row)], text=row["sentences"][:1], return_tensors="pt")
    assert item["pixel_values"].shape[-2:] == (224, 224)
    assert torch.equal(DeviceNormalizer.from_processor(loaded)(item)["pixel_values"], ref["pixel_values"])
