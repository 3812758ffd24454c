"""The DETRIS results reported by the authors: the one table of them in the code (model cards, adapter cards'
`model-index`, `detris reproduce`).

Source: ARCHITECTURE.md §6.1, from the official README (https://github.com/jiaqihuang01/DETRIS), whose "Avg"
column the DETRIS-B / -L rows reproduce (70.4 / 68.0 and 72.2 / 69.9). mIoU is the metric of the paper's Table 1;
the oIoU rows come from the authors' later oIoU code. REPORTED numbers, in percent: not measured by detris-hf.
"""

PAPER_URL = "https://arxiv.org/abs/2501.08580"
OFFICIAL_README = "https://github.com/jiaqihuang01/DETRIS"
REPORTED_SOURCE = {"name": "reported by the DETRIS authors (official README; paper Table 1 for mIoU)", "url": OFFICIAL_README}

# (dataset, split) of each column, and its label in the authors' table.
REPORTED_COLUMNS = (
    ("refcoco", "val"), ("refcoco", "testA"), ("refcoco", "testB"),
    ("refcoco+", "val"), ("refcoco+", "testA"), ("refcoco+", "testB"),
    ("refcocog-umd", "val"), ("refcocog-umd", "test"),
    ("refcocog-google", "val"),
)
REPORTED_SPLITS = ("RefCOCO val", "RefCOCO testA", "RefCOCO testB", "RefCOCO+ val", "RefCOCO+ testA",
                   "RefCOCO+ testB", "G-Ref val(u)", "G-Ref test(u)", "G-Ref val(g)")
REPORTED = {  # REPORTED by the authors (percent), one value per column above; None: not reported
    "base": {
        "mIoU": (76.0, 78.2, 73.5, 68.9, 74.0, 61.5, 67.9, 68.1, 65.9),
        "oIoU": (74.3, 77.6, 71.4, 65.6, 72.0, 56.5, 65.2, 66.4, 63.2),
    },
    "large": {
        "mIoU": (77.3, 79.0, 75.2, 70.8, 75.3, 64.7, 69.3, 70.2, 67.9),
        "oIoU": (76.1, 78.3, 73.2, 67.9, 73.3, 60.2, 66.8, 68.0, 65.0),
    },
    "large-mixed": {  # one model trained on RefCOCO + RefCOCO+ + G-Ref (umd), evaluated on each
        "mIoU": (81.0, 81.9, 79.0, 75.2, 78.6, 70.2, 74.6, 75.3, None),
        "oIoU": (80.7, 82.2, 77.9, 73.1, 77.5, 66.0, 73.2, 74.7, None),
    },
}


def reported_value(variant: str, metric: str, dataset: str, split: str) -> float | None:
    """The authors' number (percent) for one cell, or None when they report none."""
    if variant not in REPORTED or metric not in REPORTED[variant] or (dataset, split) not in REPORTED_COLUMNS:
        return None
    return REPORTED[variant][metric][REPORTED_COLUMNS.index((dataset, split))]


def reported_cells(variant: str) -> list[tuple[str, str]]:
    """The (dataset, split) columns the authors report for `variant`."""
    if variant not in REPORTED:
        return []
    return [column for column, value in zip(REPORTED_COLUMNS, REPORTED[variant]["mIoU"]) if value is not None]


def reported_evaluation(variant: str, dataset: str, splits=None) -> dict | None:
    """The authors' numbers for `dataset` as an evaluation JSON entry (`hub_card.eval_results` schema, percent), for
    the given splits (default: all they report), or None when they report none."""
    results = {}
    for column_dataset, split in REPORTED_COLUMNS:
        if column_dataset != dataset or (splits is not None and split not in splits):
            continue
        metrics = {m: reported_value(variant, m, dataset, split) for m in ("mIoU", "oIoU")}
        metrics = {m: v for m, v in metrics.items() if v is not None}
        if metrics:
            results[split] = metrics
    if not results:
        return None
    return {"dataset": dataset, "units": "percent", "source": dict(REPORTED_SOURCE), "results": results}


__all__ = [
    "OFFICIAL_README",
    "PAPER_URL",
    "REPORTED",
    "REPORTED_COLUMNS",
    "REPORTED_SOURCE",
    "REPORTED_SPLITS",
    "reported_cells",
    "reported_evaluation",
    "reported_value",
]
