# Copyright 2025 The detris-hf authors. Licensed under the MIT License.
"""Referring-segmentation metrics with the official DETRIS semantics (`engine/engine.py`).

A *sample* is one (image, referring expression) pair; every expression of a referred object is its own sample.
For sample `i` with binary prediction `P_i` and ground truth `G_i` (both at the original image resolution):

- `I_i = |P_i AND G_i|`, `U_i = |P_i OR G_i|` (pixel counts, int64);
- `IoU_i = I_i / (U_i + 1e-6)` (float64). An empty prediction on an empty ground truth therefore scores **0**,
  not 1, exactly as in the official code;
- **mIoU** (mean IoU, the number DETRIS/CRIS/ETRIS tables report) `= mean_i IoU_i`: every expression weighs
  the same, whatever the object size;
- **oIoU** (overall or cumulative IoU) `= sum_i I_i / sum_i U_i`: large objects weigh more. If every union is
  empty (`sum_i U_i = 0`) it is reported as 0.0 (the official code would divide by zero);
- **Pr@X** for X in {50, 60, 70, 80, 90} `=` fraction of samples with `IoU_i > X/100`, a **strict** `>`, with the
  thresholds of `torch.arange(0.5, 1.0, 0.1)` (float32: 0.5, 0.6000000238..., 0.6999999881..., ...), the
  fraction computed in float32 like the official `(iou > t).float().mean()`.

Distributed evaluation: keep the per-sample `(I, U)` pairs, gather them across processes, then compute. The
duplicated samples a distributed sampler appends to even out the last batch must be dropped before computing:
either gather with `accelerator.gather_for_metrics` (which drops them; see
[`ReferringSegmentationMetric.gather_and_add`]) or pass `num_samples` (the true dataset size) to
[`ReferringSegmentationMetric.add_gathered`].
"""

from collections.abc import Sequence

import numpy as np
import torch


IOU_EPSILON = 1e-6
PRECISION_THRESHOLDS = tuple(float(t) for t in torch.arange(0.5, 1.0, 0.1))  # float32 values, as official
PRECISION_NAMES = tuple(f"Pr@{round(t * 100)}" for t in PRECISION_THRESHOLDS)


def _as_bool(mask, name: str, index: int):
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            mask = mask != 0
        return mask
    mask = np.asarray(mask)
    return mask if mask.dtype == np.bool_ else mask != 0


def intersection_and_union(predictions, references) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Per-sample intersection and union pixel counts.

    Args:
        predictions, references: either two tensors/arrays of identical shape `(B, H, W)` (batched, computed on
            the tensors' device), or two sequences of `B` masks, each pair of identical `(H, W)` shape. Non-bool
            masks are binarised with `!= 0` (the official code only uses non-zero-ness of the ground truth).

    Returns:
        `(intersections, unions)`: two int64 tensors of shape `(B,)` (on the inputs' device for batched tensors,
        on the CPU otherwise).
    """
    if isinstance(predictions, torch.Tensor) and isinstance(references, torch.Tensor) and predictions.ndim == 3:
        if predictions.shape != references.shape:
            raise ValueError(f"Predictions {tuple(predictions.shape)} and references {tuple(references.shape)} differ in shape.")
        pred, ref = _as_bool(predictions, "predictions", 0), _as_bool(references, "references", 0).to(predictions.device)
        return (pred & ref).flatten(1).sum(1, dtype=torch.int64), (pred | ref).flatten(1).sum(1, dtype=torch.int64)
    if isinstance(predictions, np.ndarray) and predictions.ndim == 3:
        predictions = list(predictions)
    if isinstance(references, np.ndarray) and references.ndim == 3:
        references = list(references)
    if isinstance(predictions, torch.Tensor) and predictions.ndim == 3:
        predictions = list(predictions)
    if isinstance(references, torch.Tensor) and references.ndim == 3:
        references = list(references)
    if not isinstance(predictions, Sequence) or not isinstance(references, Sequence):
        raise TypeError("predictions and references must be (B, H, W) tensors/arrays or sequences of (H, W) masks.")
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references; expected one each.")
    intersections, unions = [], []
    for index, (pred, ref) in enumerate(zip(predictions, references)):
        pred, ref = _as_bool(pred, "predictions", index), _as_bool(ref, "references", index)
        if tuple(pred.shape) != tuple(ref.shape) or len(pred.shape) != 2:
            raise ValueError(
                f"Sample {index}: prediction shape {tuple(pred.shape)} and reference shape {tuple(ref.shape)} must "
                "be the same 2-D (height, width); post-process predictions to the original image size first."
            )
        if isinstance(pred, torch.Tensor) or isinstance(ref, torch.Tensor):
            pred, ref = torch.as_tensor(pred), torch.as_tensor(ref).to(torch.as_tensor(pred).device)
            intersections.append(int((pred & ref).sum()))
            unions.append(int((pred | ref).sum()))
        else:
            intersections.append(int(np.count_nonzero(pred & ref)))
            unions.append(int(np.count_nonzero(pred | ref)))
    return torch.tensor(intersections, dtype=torch.int64), torch.tensor(unions, dtype=torch.int64)


def compute_referring_metrics(intersections, unions) -> dict[str, float]:
    """
    mIoU, oIoU and Pr@50..Pr@90 from per-sample intersections and unions (see the module docstring for the
    exact definitions). Returns a dict with the keys `mIoU`, `oIoU`, `Pr@50`, ..., `Pr@90`, `num_samples`.
    """
    intersections = torch.as_tensor(intersections).detach().cpu().to(torch.float64).flatten()
    unions = torch.as_tensor(unions).detach().cpu().to(torch.float64).flatten()
    if intersections.shape != unions.shape:
        raise ValueError(f"Got {intersections.numel()} intersections but {unions.numel()} unions.")
    if intersections.numel() == 0:
        raise ValueError("No samples to compute referring-segmentation metrics on.")
    if bool((intersections < 0).any()) or bool((intersections > unions).any()):
        raise ValueError("Invalid counts: every intersection must satisfy 0 <= I <= U.")
    ious = intersections / (unions + IOU_EPSILON)
    total_union = float(unions.sum())
    results = {
        "mIoU": float(ious.mean()),
        "oIoU": float(intersections.sum()) / total_union if total_union > 0 else 0.0,
    }
    thresholds = torch.arange(0.5, 1.0, 0.1)
    for name, threshold in zip(PRECISION_NAMES, thresholds):
        results[name] = float((ious > threshold).float().mean())
    results["num_samples"] = int(ious.numel())
    return results


class ReferringSegmentationMetric:
    """
    Accumulator for referring segmentation: stores per-sample intersection `I` and union `U` and computes mIoU,
    oIoU and Pr@50..90 with the official DETRIS definitions (see the module docstring).

    Single process:

    ```python
    metric = ReferringSegmentationMetric()
    for batch in loader:
        masks = processor.post_process_referring_segmentation(model(**inputs).logits, batch["original_sizes"])
        metric.update(masks, batch["gt_masks"])  # gt at original resolution
    print(metric.compute())
    ```

    Several processes (accelerate): compute `(I, U)` per sample locally and let `gather_for_metrics` drop the
    samples the sampler duplicated at the end, on every process:

    ```python
    i, u = intersection_and_union(masks, gt_masks)
    metric.gather_and_add(accelerator, i.to(accelerator.device), u.to(accelerator.device))
    ```

    Or gather yourself (e.g. `torch.distributed.all_gather`) in dataset order and pass the true dataset size:
    `metric.add_gathered(all_i, all_u, num_samples=len(dataset))`.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self._intersections: list[torch.Tensor] = []
        self._unions: list[torch.Tensor] = []

    def __len__(self) -> int:
        return sum(int(t.numel()) for t in self._intersections)

    def update(self, predictions, references) -> tuple[torch.Tensor, torch.Tensor]:
        """Add a batch of predicted and ground-truth masks (see [`intersection_and_union`]); returns its `(I, U)`."""
        intersections, unions = intersection_and_union(predictions, references)
        self.add_counts(intersections, unions)
        return intersections, unions

    def add_counts(self, intersections, unions):
        """Add per-sample intersection and union counts (1-D, same length)."""
        intersections = torch.as_tensor(intersections).detach().to("cpu", torch.int64).flatten()
        unions = torch.as_tensor(unions).detach().to("cpu", torch.int64).flatten()
        if intersections.shape != unions.shape:
            raise ValueError(f"Got {intersections.numel()} intersections but {unions.numel()} unions.")
        if bool((intersections < 0).any()) or bool((intersections > unions).any()):
            raise ValueError("Invalid counts: every intersection must satisfy 0 <= I <= U.")
        self._intersections.append(intersections)
        self._unions.append(unions)

    def add_gathered(self, intersections, unions, num_samples: int | None = None):
        """
        Add counts already gathered from all processes, in dataset order. `num_samples`, when given, keeps only
        the first `num_samples` entries: the tail a distributed sampler duplicated to even out the last batch.
        """
        intersections = torch.as_tensor(intersections).flatten()
        unions = torch.as_tensor(unions).flatten()
        if num_samples is not None:
            if num_samples < 0 or num_samples > intersections.numel():
                raise ValueError(f"num_samples={num_samples} but only {intersections.numel()} gathered samples.")
            intersections, unions = intersections[:num_samples], unions[:num_samples]
        self.add_counts(intersections, unions)

    def gather_and_add(self, accelerator, intersections, unions):
        """Gather this process's per-sample counts from all processes with `accelerator.gather_for_metrics`
        (which drops the duplicated tail of the last batch) and add them. Call on every process."""
        gathered_i, gathered_u = accelerator.gather_for_metrics(
            (torch.as_tensor(intersections).flatten(), torch.as_tensor(unions).flatten())
        )
        self.add_counts(gathered_i, gathered_u)

    @property
    def intersections(self) -> torch.Tensor:
        return torch.cat(self._intersections) if self._intersections else torch.zeros(0, dtype=torch.int64)

    @property
    def unions(self) -> torch.Tensor:
        return torch.cat(self._unions) if self._unions else torch.zeros(0, dtype=torch.int64)

    def per_sample_iou(self) -> torch.Tensor:
        """`I / (U + 1e-6)` per sample, float64."""
        return self.intersections.to(torch.float64) / (self.unions.to(torch.float64) + IOU_EPSILON)

    def compute(self) -> dict[str, float]:
        """mIoU, oIoU, Pr@50..Pr@90 and num_samples over everything added so far."""
        return compute_referring_metrics(self.intersections, self.unions)


__all__ = [
    "IOU_EPSILON",
    "PRECISION_NAMES",
    "PRECISION_THRESHOLDS",
    "ReferringSegmentationMetric",
    "compute_referring_metrics",
    "intersection_and_union",
]
