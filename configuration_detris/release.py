"""The facts of the DETRIS release, in one table: datasets and their spellings, text lengths, splits and their sizes,
variants, the public backbones, and the numbers the authors report.

Everything here is plain data plus small lookups; this module imports nothing (not even torch), so reading a table
never loads a model. The converter, the data tools, `detris reproduce` and the model cards all read it from here.

Reported numbers come from the official DETRIS README (https://github.com/jiaqihuang01/DETRIS), whose "Avg" column
the DETRIS-B / -L rows reproduce (70.4 / 68.0 and 72.2 / 69.9); mIoU is the metric of the paper's Table 1, the oIoU
rows come from the authors' later oIoU code. They are REPORTED numbers, in percent, not measured by detris-hf.
"""

from pathlib import PurePath

# ----- datasets ---------------------------------------------------------------------------------------------------
# Other spellings of the dataset names (lower case) -> canonical name.
DATASET_ALIASES = {
    "refcocog_u": "refcocog-umd",
    "refcocog-u": "refcocog-umd",
    "refcocog_umd": "refcocog-umd",
    "refcocog_g": "refcocog-google",
    "refcocog-g": "refcocog-google",
    "refcocog_google": "refcocog-google",
    "refcoco_plus": "refcoco+",
    "refcocoplus": "refcoco+",
    "refcoco_mixed": "mixed",
    "mix": "mixed",
}

# Text length (SOT + tokens + EOT, padded) each release was trained with: G-Ref umd has longer expressions.
WORD_LEN = {"refcoco": 17, "refcoco+": 17, "refcocog-google": 17, "refcocog-umd": 22, "mixed": 17}
DEFAULT_WORD_LEN = 17

# Folder name of a dataset in a release (`detris convert --split-adapters`, `detris reproduce`): no `+` in paths.
DATASET_FOLDER_NAMES = {
    "refcoco": "refcoco",
    "refcoco+": "refcoco-plus",
    "refcocog-umd": "refcocog-umd",
    "refcocog-google": "refcocog-google",
    "mixed": "mixed",
}

# How an official checkpoint file names its dataset (`base_refcocog_u.pth`): first matching token wins.
CHECKPOINT_NAME_TOKENS = (
    ("refcocog_u", "refcocog-umd"),
    ("refcocog_g", "refcocog-google"),
    ("refcoco+", "refcoco+"),
    ("mix", "mixed"),
    ("refcoco", "refcoco"),
)

# ----- the refer annotations and their splits ---------------------------------------------------------------------
# refer dataset -> the split schemes (`split_by`) its annotations come in; the first is the default.
REFER_SPLIT_BY = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
DEFAULT_SPLIT_BY = {name: schemes[0] for name, schemes in REFER_SPLIT_BY.items()}

# canonical dataset -> (refer dataset, split_by)
REFER_SOURCE = {
    "refcoco": ("refcoco", "unc"),
    "refcoco+": ("refcoco+", "unc"),
    "refcocog-umd": ("refcocog", "umd"),
    "refcocog-google": ("refcocog", "google"),
}

# The splits the paper evaluates, per dataset.
EVALUATION_SPLITS = {
    "refcoco": ("val", "testA", "testB"),
    "refcoco+": ("val", "testA", "testB"),
    "refcocog-umd": ("val", "test"),
    "refcocog-google": ("val",),
}
# DETRIS-L* (one model trained on the mix) is evaluated on each of these.
MIXED_DATASETS = ("refcoco", "refcoco+", "refcocog-umd")

# refs per split of the official preprocessing, keyed by (refer dataset, split_by).
OFFICIAL_REF_COUNTS = {
    ("refcoco", "unc"): {"train": 42404, "val": 3811, "testA": 1975, "testB": 1810},
    ("refcoco+", "unc"): {"train": 42278, "val": 3805, "testA": 1975, "testB": 1798},
    ("refcocog", "umd"): {"train": 42226, "val": 2573, "test": 5023},
    ("refcocog", "google"): {"train": 44822, "val": 5000},
    ("mixed", "mixed"): {"train": 126908, "val": 10189},
}
# expressions per split; only the ones that were checked against the official files
OFFICIAL_SENTENCE_COUNTS = {
    ("refcoco", "unc"): {"val": 10834, "testA": 5657, "testB": 5095},
}

# The refer datasets as Hub datasets (`detris data hub`), and the split scheme those copies use.
HUB_REFER_REPOS = {"refcoco": "jxu124/refcoco", "refcoco+": "jxu124/refcocoplus", "refcocog": "jxu124/refcocog"}
HUB_REFER_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}

# canonical dataset -> (display name, model-index dataset type, dataset config, Hub dataset id for a card's
# `datasets:` metadata or None)
DATASET_CARD_NAMES = {
    "refcoco": ("RefCOCO (UNC)", "jxu124/refcoco", "unc", "jxu124/refcoco"),
    "refcoco+": ("RefCOCO+ (UNC)", "jxu124/refcocoplus", "unc", "jxu124/refcocoplus"),
    "refcocog-umd": ("G-Ref (UMD)", "jxu124/refcocog", "umd", "jxu124/refcocog"),
    "refcocog-google": ("G-Ref (Google)", "refcocog", "google", None),
    "mixed": ("RefCOCO + RefCOCO+ + G-Ref (UMD), mixed", "refcoco-mixed", "mixed", None),
}

# ----- variants and backbones -------------------------------------------------------------------------------------
VARIANT_NAMES = {"base": "DETRIS-B", "large": "DETRIS-L", "large-mixed": "DETRIS-L*"}

# Public DINOv2-with-registers checkpoints by (hidden size, layers), and the one per variant.
PUBLIC_VISION_BACKBONES = {
    (768, 12): "facebook/dinov2-with-registers-base",
    (1024, 24): "facebook/dinov2-with-registers-large",
}
VARIANT_VISION_BACKBONE = {
    "base": "facebook/dinov2-with-registers-base",
    "large": "facebook/dinov2-with-registers-large",
    "large-mixed": "facebook/dinov2-with-registers-large",
}
# The public CLIP checkpoint of the text tower, and that tower's (hidden size, layers, vocabulary size).
PUBLIC_TEXT_BACKBONE = "openai/clip-vit-base-patch16"
PUBLIC_TEXT_BACKBONE_SHAPE = (512, 12, 49408)

# ----- the numbers the authors report ------------------------------------------------------------------------------
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


# ----- lookups ----------------------------------------------------------------------------------------------------
def canonical_dataset(name: str) -> str:
    """The canonical name of a release dataset (`refcocog_u` -> `refcocog-umd`); ValueError for any other name."""
    key = str(name).lower()
    key = DATASET_ALIASES.get(key, key)
    if key not in WORD_LEN:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(WORD_LEN)} (or {sorted(DATASET_ALIASES)})")
    return key


def dataset_from_checkpoint_name(path) -> str | None:
    """The dataset an official release file is named after (`base_refcocog_u.pth` -> `refcocog-umd`), or None."""
    stem = PurePath(path).stem.lower()
    for token, dataset in CHECKPOINT_NAME_TOKENS:
        if token in stem:
            return dataset
    return None


def variant_from_checkpoint_name(path) -> str | None:
    """`base`, `large` or `large-mixed` from an official file name (`base_refcoco.pth`, `lagre_refcoco.pth`,
    `mix.pth`), or None."""
    stem = PurePath(path).stem.lower()
    if "mix" in stem:
        return "large-mixed"
    if stem.startswith("base"):
        return "base"
    if stem.startswith(("large", "lagre")):  # the official README spells it `lagre_refcoco.pth`
        return "large"
    return None


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
    """The authors' numbers for `dataset` as one evaluation-results JSON entry (percent), for the given splits
    (default: all they report), or None when they report none."""
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
    "CHECKPOINT_NAME_TOKENS",
    "DATASET_ALIASES",
    "DATASET_CARD_NAMES",
    "DATASET_FOLDER_NAMES",
    "DEFAULT_SPLIT_BY",
    "DEFAULT_WORD_LEN",
    "EVALUATION_SPLITS",
    "HUB_REFER_REPOS",
    "HUB_REFER_SPLIT_BY",
    "MIXED_DATASETS",
    "OFFICIAL_README",
    "OFFICIAL_REF_COUNTS",
    "OFFICIAL_SENTENCE_COUNTS",
    "PAPER_URL",
    "PUBLIC_TEXT_BACKBONE",
    "PUBLIC_TEXT_BACKBONE_SHAPE",
    "PUBLIC_VISION_BACKBONES",
    "REFER_SOURCE",
    "REFER_SPLIT_BY",
    "REPORTED",
    "REPORTED_COLUMNS",
    "REPORTED_SOURCE",
    "REPORTED_SPLITS",
    "VARIANT_NAMES",
    "VARIANT_VISION_BACKBONE",
    "WORD_LEN",
    "canonical_dataset",
    "dataset_from_checkpoint_name",
    "reported_cells",
    "reported_evaluation",
    "reported_value",
    "variant_from_checkpoint_name",
]
