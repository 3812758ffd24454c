"""The evaluation-results JSON that `detris card` / `detris export` turn into a model card's `model-index`.

The `results.json` that `detris eval` writes (`{"val": {"mIoU": ..., ...}, "test": {...}}`: split name -> metrics as
fractions) is accepted as it is; it names no dataset, so the caller gives it (`--eval-dataset refcoco`).

Schema (one evaluation; a list of such objects, or `{"evaluations": [...]}`, is accepted too):

```json
{
  "dataset": "refcoco",
  "units": "fraction",
  "source": {"name": "detris eval", "url": "https://..."},
  "results": {
    "val":   {"mIoU": 0.7601, "oIoU": 0.7432, "Pr@50": 0.871, "Pr@60": 0.84, "Pr@70": 0.79, "Pr@80": 0.68,
              "Pr@90": 0.33, "num_samples": 10834},
    "testA": {"mIoU": 0.782, "oIoU": 0.776, "num_samples": 5657}
  }
}
```

- `dataset` (required): `refcoco`, `refcoco+`, `refcocog-umd`, `refcocog-google`, `mixed` (aliases such as
  `refcocog_u` accepted), or any other name / Hub dataset id (e.g. `refshapes`), used as is.
- `results` (required): split name -> metrics. Metric names: `mIoU`, `oIoU`, `Pr@50` ... `Pr@90` (`Pr@0.5`,
  `Prec@50`, `P@0.5` are read as `Pr@50`); `num_samples` (int, optional) is the number of (image, expression)
  pairs evaluated and is shown in the card, not in `model-index`. Any other key is refused.
- `units` (optional): `"fraction"` (default; what `processing_detris.compute_referring_metrics` returns, values
  in [0, 1]) or `"percent"` (values in [0, 100]). Cards and `model-index` always show percent, rounded to 2
  decimals, the convention of the paper's tables.
- `dataset_name`, `dataset_type`, `dataset_config` (optional): override the display name, the `model-index`
  dataset type (a Hub id where one exists) and config.
- `source` (optional): `{"name": ..., "url": ...}` where the numbers come from (e.g. the paper, for reported
  numbers); written to `model-index` as `source_name` / `source_url`.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from configuration_detris.release import DATASET_ALIASES, DATASET_CARD_NAMES

METRIC_NAMES = ("mIoU", "oIoU", "Pr@50", "Pr@60", "Pr@70", "Pr@80", "Pr@90")
METRIC_DESCRIPTIONS = {
    "mIoU": "mean IoU",
    "oIoU": "overall IoU",
    **{f"Pr@{t}": f"precision at IoU > 0.{t // 10}" for t in (50, 60, 70, 80, 90)},
}

UNITS = ("fraction", "percent")
_TOP_KEYS = {"dataset", "results", "units", "source", "dataset_name", "dataset_type", "dataset_config"}


class EvalResultsError(ValueError):
    """The evaluation JSON does not follow the schema; the message names the bad value and what was expected."""


def canonical_metric(name: str) -> str | None:
    """`mIoU`, `oIoU` or `Pr@XX` for the accepted spellings, else None."""
    key = name.strip()
    lowered = key.lower()
    if lowered in ("miou", "mean_iou", "mean-iou"):
        return "mIoU"
    if lowered in ("oiou", "overall_iou", "overall-iou", "ciou"):
        return "oIoU"
    for prefix in ("pr@", "prec@", "precision@", "p@"):
        if lowered.startswith(prefix):
            value = lowered[len(prefix) :]
            try:
                number = float(value)
            except ValueError:
                return None
            threshold = round(number * 100) if number < 1 else round(number)
            candidate = f"Pr@{threshold}"
            return candidate if candidate in METRIC_NAMES else None
    return None


@dataclass
class SplitResult:
    split: str
    metrics: dict[str, float]  # percent
    num_samples: int | None = None


@dataclass
class DatasetEvaluation:
    dataset: str  # canonical key or the name as given
    dataset_name: str
    dataset_type: str
    dataset_config: str | None
    hub_dataset: str | None
    splits: list[SplitResult] = field(default_factory=list)
    source_name: str | None = None
    source_url: str | None = None


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EvalResultsError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def parse_evaluation(entry: dict, where: str = "evaluation") -> DatasetEvaluation:
    if not isinstance(entry, dict):
        raise EvalResultsError(f"{where} must be a JSON object with 'dataset' and 'results', got {type(entry).__name__}")
    unknown = sorted(set(entry) - _TOP_KEYS)
    if unknown:
        raise EvalResultsError(f"{where} has unknown keys {unknown}; expected only {sorted(_TOP_KEYS)}")
    dataset = entry.get("dataset")
    if not isinstance(dataset, str) or not dataset.strip():
        raise EvalResultsError(f"{where}.dataset must be a non-empty string such as 'refcoco', got {dataset!r}")
    units = entry.get("units", "fraction")
    if units not in UNITS:
        raise EvalResultsError(f"{where}.units must be one of {list(UNITS)}, got {units!r}")
    key = DATASET_ALIASES.get(dataset.lower(), dataset.lower())
    if key in DATASET_CARD_NAMES:
        name, dtype, config, hub = DATASET_CARD_NAMES[key]
    else:
        key, name, dtype, config, hub = dataset, dataset, dataset, None, (dataset if "/" in dataset else None)
    evaluation = DatasetEvaluation(
        dataset=key,
        dataset_name=entry.get("dataset_name", name),
        dataset_type=entry.get("dataset_type", dtype),
        dataset_config=entry.get("dataset_config", config),
        hub_dataset=hub,
    )
    source = entry.get("source")
    if source is not None:
        if not isinstance(source, dict) or set(source) - {"name", "url"}:
            raise EvalResultsError(f"{where}.source must be an object with 'name' and/or 'url', got {source!r}")
        evaluation.source_name, evaluation.source_url = source.get("name"), source.get("url")

    results = entry.get("results")
    if not isinstance(results, dict) or not results:
        raise EvalResultsError(
            f"{where}.results must be a non-empty object mapping split names to metrics, e.g. "
            f'{{"val": {{"mIoU": 0.76, "oIoU": 0.74}}}}, got {results!r}'
        )
    scale = 100.0 if units == "fraction" else 1.0
    upper = 1.0 if units == "fraction" else 100.0
    for split, metrics in results.items():
        split_where = f"{where}.results[{split!r}]"
        if not isinstance(metrics, dict) or not metrics:
            raise EvalResultsError(f"{split_where} must be a non-empty object of metrics, got {metrics!r}")
        parsed, num_samples = {}, None
        for name, value in metrics.items():
            if name == "num_samples":
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise EvalResultsError(f"{split_where}.num_samples must be a positive integer, got {value!r}")
                num_samples = value
                continue
            canonical = canonical_metric(name)
            if canonical is None:
                raise EvalResultsError(
                    f"{split_where} has an unknown metric {name!r}; expected one of {list(METRIC_NAMES)} or num_samples"
                )
            if canonical in parsed:
                raise EvalResultsError(f"{split_where} gives {canonical} twice (as {name!r} and another spelling)")
            number = _number(value, f"{split_where}.{name}")
            if not 0.0 <= number <= upper:
                hint = ' (percent values need "units": "percent")' if units == "fraction" else ""
                raise EvalResultsError(
                    f"{split_where}.{name} = {number} is outside [0, {upper:g}] for units {units!r}{hint}"
                )
            parsed[canonical] = round(number * scale, 2)
        if not parsed:
            raise EvalResultsError(f"{split_where} has no metric; expected at least one of {list(METRIC_NAMES)}")
        ordered = {name: parsed[name] for name in METRIC_NAMES if name in parsed}
        evaluation.splits.append(SplitResult(str(split), ordered, num_samples))
    return evaluation


def is_eval_output(data) -> bool:
    """The `results.json` of `detris eval`: an object mapping split names to objects of metrics."""
    return (
        isinstance(data, dict) and bool(data) and not set(data) & _TOP_KEYS and "evaluations" not in data
        and all(isinstance(v, dict) and v and all(canonical_metric(k) or k == "num_samples" for k in v)
                for v in data.values())
    )


def parse_eval_results(data, dataset: str | None = None) -> list[DatasetEvaluation]:
    """Parse the JSON value (already decoded) into evaluations; see the module docstring for the schema. `dataset`
    names the dataset of a `detris eval` results.json (which names none)."""
    if is_eval_output(data):
        if not dataset:
            raise EvalResultsError(
                f"this is the results.json of `detris eval` (splits {sorted(data)}), which names no dataset; pass "
                "--eval-dataset NAME (e.g. refcoco, refcocog-umd, or a Hub dataset id)"
            )
        data = {"dataset": dataset, "units": "fraction", "results": data}
    elif dataset:
        raise EvalResultsError("--eval-dataset names the dataset of a `detris eval` results.json only; this file "
                               "already follows the evaluation schema (its entries name their dataset)")
    if isinstance(data, dict) and "evaluations" in data:
        if set(data) != {"evaluations"}:
            raise EvalResultsError(f"an object with 'evaluations' must have no other key, got {sorted(data)}")
        data = data["evaluations"]
    entries = data if isinstance(data, list) else [data]
    if not entries:
        raise EvalResultsError("the evaluation JSON holds an empty list; expected at least one evaluation")
    return [parse_evaluation(entry, f"evaluation[{index}]") for index, entry in enumerate(entries)]


def load_eval_results(path, dataset: str | None = None) -> list[DatasetEvaluation]:
    path = Path(path)
    if not path.is_file():
        raise EvalResultsError(f"evaluation results file {str(path)!r} does not exist; expected a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EvalResultsError(f"{path} is not valid JSON: {error}") from error
    try:
        return parse_eval_results(data, dataset)
    except EvalResultsError as error:
        raise EvalResultsError(f"{path}: {error}") from error


def to_model_index(evaluations: list[DatasetEvaluation]):
    """One `huggingface_hub.EvalResult` per dataset / split / metric."""
    from huggingface_hub import EvalResult

    results = []
    for evaluation in evaluations:
        for split in evaluation.splits:
            for metric, value in split.metrics.items():
                results.append(
                    EvalResult(
                        task_type="image-segmentation",
                        task_name="Referring image segmentation",
                        dataset_type=evaluation.dataset_type,
                        dataset_name=evaluation.dataset_name,
                        dataset_config=evaluation.dataset_config,
                        dataset_split=split.split,
                        metric_type=metric,
                        metric_name=f"{metric} ({METRIC_DESCRIPTIONS[metric]}, %)",
                        metric_value=value,
                        source_name=evaluation.source_name,
                        source_url=evaluation.source_url,
                    )
                )
    return results


__all__ = [
    "DatasetEvaluation",
    "EvalResultsError",
    "METRIC_NAMES",
    "SplitResult",
    "is_eval_output",
    "load_eval_results",
    "parse_eval_results",
    "to_model_index",
]
