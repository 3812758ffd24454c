"""Referring-segmentation metrics: official goldens (metric_golden.json), evaluate module, distributed use."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from processing_detris import REFERRING_IOU_METRIC_PATH, ReferringSegmentationMetric, intersection_and_union
from processing_detris.metrics import compute_referring_metrics


FIXTURES = Path(__file__).parent / "fixtures" / "processing"
GOLDEN = json.loads((FIXTURES / "metric_golden.json").read_text())
PAIRS = np.load(FIXTURES / "metric_pairs.npz")
PREDS = [PAIRS[f"pred_{k}"] for k in range(40)]
GTS = [PAIRS[f"gt_{k}"] for k in range(40)]
KEYS = ["mIoU", "oIoU", "Pr@50", "Pr@60", "Pr@70", "Pr@80", "Pr@90"]


def assert_matches_golden(results, per_sample=None):
    for key in KEYS:
        assert abs(results[key] - GOLDEN[key]) <= 1e-6, (key, results[key], GOLDEN[key])
    if per_sample is not None:
        np.testing.assert_allclose(per_sample, GOLDEN["per_sample_iou"], rtol=0, atol=1e-6)


def test_accumulator_matches_golden_including_empty_cases():
    metric = ReferringSegmentationMetric()
    metric.update(PREDS[:13], GTS[:13])
    metric.update(PREDS[13:], GTS[13:])
    results = metric.compute()
    assert results["num_samples"] == 40
    assert_matches_golden(results, metric.per_sample_iou().numpy())
    # pairs 0-2: empty/empty, empty gt, empty prediction -> IoU 0 (I / (U + 1e-6), as official)
    assert metric.per_sample_iou()[:3].tolist() == [0.0, 0.0, 0.0]


def test_batched_tensors_on_device_match_lists():
    same = [k for k in range(40) if PREDS[k].shape == PREDS[3].shape]
    preds = torch.from_numpy(np.stack([PREDS[k] for k in same]))
    gts = torch.from_numpy(np.stack([GTS[k] for k in same]))
    i_batched, u_batched = intersection_and_union(preds, gts)
    i_list, u_list = intersection_and_union([PREDS[k] for k in same], [GTS[k] for k in same])
    assert torch.equal(i_batched, i_list) and torch.equal(u_batched, u_list)


def test_all_empty_unions_and_no_samples():
    results = compute_referring_metrics([0, 0], [0, 0])
    assert results["mIoU"] == 0.0 and results["oIoU"] == 0.0 and results["Pr@50"] == 0.0
    with pytest.raises(ValueError, match="No samples"):
        ReferringSegmentationMetric().compute()


def test_precision_thresholds_are_the_official_float32_ones():
    # IoU = I / (U + 1e-6): 1/2 -> 0.49999975 (not > 0.5), 3/5 -> 0.59999988 (> 0.5, not > 0.6000000238)
    results = compute_referring_metrics([1, 3, 10**7], [2, 5, 10**7])
    assert results["Pr@50"] == pytest.approx(2 / 3) and results["Pr@60"] == pytest.approx(1 / 3)
    assert results["Pr@90"] == pytest.approx(1 / 3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        intersection_and_union([PREDS[3], PREDS[4]], [GTS[3]])
    with pytest.raises(ValueError, match="must be the same 2-D"):
        intersection_and_union([np.zeros((3, 4), bool)], [np.zeros((4, 3), bool)])
    with pytest.raises(ValueError, match="0 <= I <= U"):
        ReferringSegmentationMetric().add_counts([5], [4])


def test_gathered_counts_drop_the_duplicated_tail():
    i, u = intersection_and_union(PREDS, GTS)
    # two ranks, a sampler padded 40 -> 42 samples by repeating the first two
    padded_i, padded_u = torch.cat([i, i[:2]]), torch.cat([u, u[:2]])
    metric = ReferringSegmentationMetric()
    metric.add_gathered(padded_i, padded_u, num_samples=40)
    assert_matches_golden(metric.compute())
    with pytest.raises(ValueError, match="num_samples=50"):
        metric.add_gathered(i, u, num_samples=50)


def test_gather_and_add_uses_gather_for_metrics():
    class FakeAccelerator:  # gather_for_metrics semantics: concatenated, duplicated tail already removed
        def __init__(self):
            self.calls = 0

        def gather_for_metrics(self, tensors):
            self.calls += 1
            return tensors

    i, u = intersection_and_union(PREDS, GTS)
    accelerator = FakeAccelerator()
    metric = ReferringSegmentationMetric()
    metric.gather_and_add(accelerator, i, u)
    assert accelerator.calls == 1
    assert_matches_golden(metric.compute())


def test_evaluate_module_loads_offline_and_matches(monkeypatch):
    import evaluate  # the `train` extra, installed by `make install`

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    metric = evaluate.load(REFERRING_IOU_METRIC_PATH)
    results = metric.compute(predictions=PREDS, references=GTS)
    assert results["num_samples"] == 40
    assert_matches_golden(results, results["per_sample_iou"])
