# Copyright 2025 The detris-hf authors. Licensed under the MIT License.
"""Referring-segmentation IoU metrics (mIoU, oIoU, Pr@50..90) with the official DETRIS/CRIS semantics.

An `evaluate` module around `processing_detris.metrics` (the one implementation):
`evaluate.load(processing_detris.REFERRING_IOU_METRIC_PATH)` works offline where `processing_detris` is installed.
"""

import datasets
import evaluate
import numpy as np

from processing_detris.metrics import ReferringSegmentationMetric


_DESCRIPTION = """
Referring image segmentation metrics, as computed by the official DETRIS code. A sample is one
(image, referring expression) pair, with a binary predicted mask and a binary ground-truth mask of the same
(height, width), at the original image resolution.

- I = |pred AND gt|, U = |pred OR gt|, per-sample IoU = I / (U + 1e-6) (empty prediction on empty gt -> 0).
- mIoU = mean of the per-sample IoU (the number reported in DETRIS/CRIS/ETRIS tables).
- oIoU = sum(I) / sum(U) over all samples (overall / cumulative IoU; 0.0 if every union is empty).
- Pr@X = fraction of samples with IoU strictly greater than X/100, X in 50, 60, 70, 80, 90, thresholds as float32
  values of torch.arange(0.5, 1.0, 0.1).

Masks go through Arrow as nested lists of booleans, which is slow for full-resolution masks (about 0.1 s per
480x640 mask). For large evaluations use `processing_detris.metrics.ReferringSegmentationMetric`, which gives the
same numbers from per-sample counts.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D boolean masks): predicted masks (height x width, nested lists or arrays).
    references (`list` of 2-D boolean masks): ground-truth masks, same shapes as the predictions. Non-zero = True.
Returns:
    `dict` with `mIoU`, `oIoU`, `Pr@50`, `Pr@60`, `Pr@70`, `Pr@80`, `Pr@90` (floats), `num_samples` (int) and
    `per_sample_iou` (list of floats).
Examples:
    >>> metric = evaluate.load("processing_detris/referring_iou")
    >>> metric.compute(predictions=[[[True, False]]], references=[[[True, True]]])["mIoU"]  # doctest: +ELLIPSIS
    0.4999...
"""

_CITATION = """
@inproceedings{huang2025detris,
  title={Densely Connected Parameter-Efficient Tuning for Referring Image Segmentation},
  author={Huang, Jiaqi and others},
  booktitle={AAAI},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReferringIou(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.List(datasets.List(datasets.Value("bool"))),
                    "references": datasets.List(datasets.List(datasets.Value("bool"))),
                }
            ),
        )

    def _compute(self, predictions, references):
        metric = ReferringSegmentationMetric()
        metric.update([np.asarray(p, dtype=bool) for p in predictions], [np.asarray(r, dtype=bool) for r in references])
        results = metric.compute()
        results["per_sample_iou"] = metric.per_sample_iou().tolist()
        return results
