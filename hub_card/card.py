"""Model cards for DETRIS folders: `detris card --model DIR [--eval-results results.json] [--output README.md]`.

A model folder (config.json + weights) gets a card with YAML metadata (license, library, pipeline tag, base models,
datasets, tags, and a `model-index` built from the evaluation JSON: one entry per dataset / split / metric; schema in
`hub_card.eval_results`) and a body: a usage snippet, the metric definitions, parameter counts computed from the
model, the training recipe, limitations and the citation. An adapter-only folder (adapter_config.json +
adapter_model.safetensors) gets its own card that names its base model.
"""

import argparse
import json
import sys
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from configuration_detris.release import (
    DATASET_ALIASES,
    DATASET_CARD_NAMES,
    OFFICIAL_README,
    PAPER_URL,
    REPORTED,
    REPORTED_SPLITS,
    VARIANT_NAMES,
    reported_evaluation,
)

from .folders import is_adapter_folder, looks_like_repo_id, read_text_file
from .eval_results import METRIC_NAMES, load_eval_results, parse_evaluation, to_model_index

TEMPLATES = Path(__file__).parent  # *_card_template.md (package data: setup.cfg ships *.md)
BASE_TAGS = ["detris", "referring-image-segmentation", "image-segmentation", "vision-language", "dinov2", "clip"]
CARD_VARIANT_NAMES = {**VARIANT_NAMES, "large-mixed": f"{VARIANT_NAMES['large-mixed']} (mixed RefCOCO/+/G-Ref training)"}

OFFICIAL_RECIPE = """The official recipe (`jiaqihuang01/DETRIS` configs), which `detris train` reproduces:

| | |
|---|---|
| trainable | adapters + neck / decoder / projector; both backbones frozen |
| loss | binary cross-entropy on the mask logits against the ground truth resized (nearest) to {side}x{side} |
| optimiser | Adam, lr 1e-4, weight decay 0 |
| schedule | MultiStepLR, gamma 0.1, stepped per epoch: {schedule} |
| batch | 32 in total (e.g. 2 GPUs x 16), `drop_last` |
| precision | fp16 autocast with a gradient scaler; SyncBatchNorm across GPUs |
| data | {input_size}x{input_size} letterbox, no augmentation; one random expression of the object per step |
| model selection | the epoch with the best validation mIoU (first expression of each object) |

RefCOCO / RefCOCO+ / G-Ref (umd) with DETRIS-B train 65 epochs (milestones 35, 55); G-Ref (google), every
DETRIS-L and the mixed DETRIS-L* train 50 epochs (milestone 35)."""


class CardError(ValueError):
    """Bad input to the card generator; the message names the bad value and what was expected."""


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def detect_variant(config) -> str | None:
    """The official preset `config` is an instance of (`base`, `large`, `large-mixed`), or None."""
    from configuration_detris import PRESETS

    for name, preset in PRESETS.items():
        vision, text = preset["vision_config"], preset["text_config"]
        if (
            config.vision_config.hidden_size == vision["hidden_size"]
            and config.vision_config.num_hidden_layers == vision["num_hidden_layers"]
            and config.text_config.hidden_size == text["hidden_size"]
            and config.text_config.num_hidden_layers == text["num_hidden_layers"]
            and list(config.vision_adapter_layers) == list(preset["vision_adapter_layers"])
            and config.vision_adapter_dim == preset["vision_adapter_dim"]
            and list(config.text_adapter_layers) == list(preset["text_adapter_layers"])
            and config.text_adapter_dim == preset["text_adapter_dim"]
            and list(config.neck_tap_layers) == list(preset["neck_tap_layers"])
        ):
            return name
    return None


def default_base_models(config) -> list[str]:
    """The public checkpoints DETRIS starts from, where the backbone shapes match them."""
    from modeling_detris.provenance import public_text_id, public_vision_id  # here: `detris card --help` stays light

    return [model for model in (public_vision_id(config), public_text_id(config)) if model is not None]


def has_remote_code(model_dir) -> bool:
    """True if the folder is a `detris export` (config.json with an `auto_map` and the flat code files)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return False
    auto_map = json.loads(config_path.read_text(encoding="utf-8")).get("auto_map") or {}
    return "AutoModel" in auto_map and (model_dir / "modeling_detris.py").is_file()


def usage_snippet(model_id: str, remote_code: bool) -> str:
    """The Python usage example of the card (tested by executing it)."""
    if remote_code:
        head = (
            "import torch\n"
            "from PIL import Image\n"
            "from transformers import AutoModel, AutoProcessor\n\n"
            f'model_id = "{model_id}"\n'
            "# The model code ships with the checkpoint (configuration_, modeling_, image_processing_, tokenization_ and\n"
            "# processing_detris.py).\n"
            "model = AutoModel.from_pretrained(model_id, trust_remote_code=True).eval()\n"
            "processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)\n"
        )
    else:
        head = (
            "import torch\n"
            "from PIL import Image\n"
            "from transformers import AutoModel, AutoProcessor\n\n"
            "import modeling_detris, processing_detris  # detris-hf: registers DETRIS with the Auto classes\n\n"
            f'model_id = "{model_id}"\n'
            "model = AutoModel.from_pretrained(model_id).eval()\n"
            "processor = AutoProcessor.from_pretrained(model_id)\n"
        )
    return head + (
        "\n"
        'image = Image.open("photo.jpg")\n'
        'expressions = ["the man on the left", "the dog"]\n'
        'inputs = processor(images=image, text=expressions, return_tensors="pt")  # the image once per expression\n'
        "with torch.inference_mode():\n"
        "    outputs = model(**inputs)\n"
        'masks = processor.post_process_referring_segmentation(outputs.logits, inputs["original_sizes"])\n'
        "for expression, mask in zip(expressions, masks):\n"
        '    print(expression, mask.shape, int(mask.sum()))  # boolean (height, width) mask at the image size'
    )


def pipeline_snippet(model_id: str, remote_code: bool) -> tuple[str, str]:
    if remote_code:
        text = (
            "The `referring-image-segmentation` pipeline ships with the checkpoint too "
            "(`pipeline_detris.py`, registered in `config.json`):"
        )
        code = (
            "from transformers import pipeline\n\n"
            f'pipe = pipeline(model="{model_id}", trust_remote_code=True)\n'
            'result = pipe("photo.jpg", "the man on the left")  # {"text", "score", "mask", "mask_image"}\n'
            'results = pipe("photo.jpg", ["the man on the left", "the dog"])  # one batch, one result each'
        )
    else:
        text = "With detris-hf installed, the `referring-image-segmentation` pipeline wraps the same steps:"
        code = (
            "import hub_card  # detris-hf: registers the pipeline task\n"
            "from transformers import pipeline\n\n"
            f'pipe = pipeline("referring-image-segmentation", model="{model_id}")\n'
            'result = pipe("photo.jpg", "the man on the left")  # {"text", "score", "mask", "mask_image"}'
        )
    return text, code


def evaluation_tables(evaluations) -> str:
    blocks = []
    for evaluation in evaluations:
        present = [m for m in METRIC_NAMES if any(m in s.metrics for s in evaluation.splits)]
        header = "| split | samples | " + " | ".join(present) + " |"
        rule = "|---|---:|" + "---:|" * len(present)
        rows = []
        for split in evaluation.splits:
            cells = [f"{split.metrics[m]:.2f}" if m in split.metrics else "–" for m in present]
            samples = f"{split.num_samples:,d}" if split.num_samples else "–"
            rows.append(f"| {split.split} | {samples} | " + " | ".join(cells) + " |")
        source = ""
        if evaluation.source_name or evaluation.source_url:
            name = evaluation.source_name or evaluation.source_url
            source = f" Source: [{name}]({evaluation.source_url})." if evaluation.source_url else f" Source: {name}."
        blocks.append(f"**{evaluation.dataset_name}** (percent).{source}\n\n" + "\n".join([header, rule, *rows]))
    return "\n\n".join(blocks)


def reported_table(variant: str | None) -> str | None:
    if variant not in REPORTED:
        return None
    rows = ["| metric | " + " | ".join(REPORTED_SPLITS) + " |", "|---|" + "---:|" * len(REPORTED_SPLITS)]
    for metric, values in REPORTED[variant].items():
        rows.append(f"| {metric} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in values) + " |")
    return (
        f"{CARD_VARIANT_NAMES[variant]} as reported in the [official repository]({OFFICIAL_README}) "
        f"([paper]({PAPER_URL}); its Table 1 reports mIoU). These are the authors' numbers, not measured on this "
        "checkpoint.\n\n" + "\n".join(rows)
    )


def training_recipe(config, variant: str | None, notes: str | None) -> str:
    side = 4 * config.grid_size
    parts = []
    if notes:
        parts.append(notes.strip())
    if variant is not None:
        schedule = "lr 1e-4, x0.1 after epoch 35 (and again after 55 in the 65-epoch runs)"
        parts.append(OFFICIAL_RECIPE.format(side=side, schedule=schedule, input_size=config.input_size))
    elif not notes:
        parts.append(
            "A custom DETRIS configuration; its training run is not described in the folder (pass "
            "`--training-notes FILE.md` to `detris card`). The official recipe for the published sizes: Adam lr 1e-4 "
            "without weight decay, batch 32, BCE loss on the mask logits, 50-65 epochs with a x0.1 step after 35."
        )
    return "\n\n".join(parts)


def _list(values) -> str:
    return ", ".join(str(v) for v in values) if values else "none"


# ----------------------------------------------------------------------------------------------------------------
# Cards
# ----------------------------------------------------------------------------------------------------------------


def build_model_card(
    model,
    model_id: str,
    evaluations=None,
    remote_code: bool = True,
    model_name: str | None = None,
    base_models: list[str] | None = None,
    datasets: list[str] | None = None,
    training_notes: str | None = None,
) -> ModelCard:
    """The card of a whole DETRIS model (`model` may live on the meta device: only shapes are read)."""
    from modeling_detris.info import count_parameters

    config = model.config
    evaluations = evaluations or []
    variant = detect_variant(config)
    counts = count_parameters(model)
    name = model_name or model_id.rstrip("/").split("/")[-1]
    dataset_ids = list(datasets or [])
    for evaluation in evaluations:
        if evaluation.hub_dataset and evaluation.hub_dataset not in dataset_ids:
            dataset_ids.append(evaluation.hub_dataset)
    base = default_base_models(config) if base_models is None else list(base_models)
    eval_results = to_model_index(evaluations) if evaluations else None
    card_data = ModelCardData(
        model_name=name,
        license="mit",
        library_name="transformers",
        pipeline_tag="image-segmentation",
        base_model=base or None,
        datasets=dataset_ids or None,
        tags=BASE_TAGS + (["custom_code"] if remote_code else []),
        metrics=["mean_iou"] if evaluations else None,
        eval_results=eval_results,
    )
    vision, text = config.vision_config, config.text_config
    description = CARD_VARIANT_NAMES.get(variant, "a custom DETRIS configuration")
    reported = reported_table(variant)
    if not config.adapters_in_model:
        description = (
            f"the frozen base of {description}: the DINOv2 and CLIP text backbones and a head, without adapters. Load "
            "a per-dataset DETRIS adapter on it (`PeftModel.from_pretrained(base, adapter)`; several adapters can share "
            "it and be switched with `set_adapter`), which brings its own adapters and head. Alone, this model does "
            "not segment anything meaningful"
        )
        reported = None
    pipe_text, pipe_code = pipeline_snippet(model_id, remote_code)
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "model_card_template.md"),
        title=name,
        variant_description=description,
        usage_note=None if remote_code else (
            "This folder holds no model code: install detris-hf (or use the `detris export` of this folder, which "
            "ships the code for `trust_remote_code=True`)."
        ),
        usage_snippet=usage_snippet(model_id, remote_code),
        pipeline_text=pipe_text,
        pipeline_snippet=pipe_code,
        model_id=model_id,
        evaluation_tables=evaluation_tables(evaluations) if evaluations else None,
        reported_table=reported,
        counts=counts,
        logits_side=4 * config.grid_size,
        input_size=config.input_size,
        word_len=config.word_len,
        threshold=config.mask_threshold,
        vision_description=(
            f"DINOv2 with {vision.num_register_tokens} registers, {vision.num_hidden_layers} layers, width "
            f"{vision.hidden_size}, patch {vision.patch_size} (frozen)"
        ),
        text_description=f"CLIP text transformer, {text.num_hidden_layers} layers, width {text.hidden_size} (frozen)",
        vision_adapter_layers=_list(config.vision_adapter_layers),
        vision_adapter_dim=config.vision_adapter_dim,
        text_adapter_layers=_list(config.text_adapter_layers),
        text_adapter_dim=config.text_adapter_dim,
        training_recipe=training_recipe(config, variant, training_notes),
    )


def _human_size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000


def adapter_statistics(folder) -> tuple[int, int]:
    """(parameters, BatchNorm statistics) stored in `adapter_model.safetensors`, from the tensor shapes."""
    from safetensors import safe_open

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise CardError(f"{folder} has adapter_config.json but no adapter_model.safetensors; expected both (PEFT format)")
    params = buffers = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            numel = 1
            for dim in handle.get_slice(key).get_shape():
                numel *= dim
            if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                buffers += numel
            else:
                params += numel
    return params, buffers


def adapter_variant(adapter_config: dict) -> str | None:
    """The official preset (`base`, `large`, `large-mixed`) whose adapters and base width an adapter config has."""
    from configuration_detris import PRESETS
    from modeling_detris.peft_detris import adapter_presets

    for name, fields in adapter_presets().items():
        if adapter_config.get("base_vision_hidden_size") not in (None, PRESETS[name]["vision_config"]["hidden_size"]):
            continue
        if all(adapter_config.get(key) == value for key, value in fields.items()):
            return name
    return None


def reported_beside(evaluations, variant: str | None) -> list:
    """The authors' numbers for the datasets and splits of `evaluations` (parsed evaluations), where they report
    any for `variant`."""
    reported = []
    for evaluation in evaluations:
        entry = reported_evaluation(variant, evaluation.dataset, [s.split for s in evaluation.splits]) if variant else None
        if entry is not None:
            parsed = parse_evaluation(entry, "reported")
            parsed.dataset_name = evaluation.dataset_name  # the same model-index dataset as ours
            parsed.dataset_type, parsed.dataset_config = evaluation.dataset_type, evaluation.dataset_config
            reported.append(parsed)
    return reported


def reported_model_index(reported) -> list:
    """`model-index` entries of the authors' numbers, each marked as reported in its metric name."""
    results = to_model_index(reported)
    for result in results:
        result.metric_name = f"{result.metric_type} reported by the DETRIS authors, not measured here (%)"
    return results


def build_adapter_card(
    folder, model_id: str, evaluations=None, base_model: str | None = None, datasets: list[str] | None = None
) -> ModelCard:
    """The card of an adapter-only folder (PEFT format); it names the base model the adapter needs, the dataset it
    was trained on (from `conversion.json` or the evaluations) and, beside an evaluation of ours, the numbers the
    authors report for the same splits (marked as reported in `model-index`)."""

    folder = Path(folder)
    adapter_config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    base = base_model or adapter_config.get("base_model_name_or_path")
    if not base:
        raise CardError(
            f"{folder}/adapter_config.json names no base_model_name_or_path; pass --base-model ORG/NAME (the Hub id "
            "of the DETRIS base model the adapter was trained on)"
        )
    if not looks_like_repo_id(str(base)):
        given = "--base-model" if base_model else f"{folder}/adapter_config.json's base_model_name_or_path"
        raise CardError(
            f"{given} is {str(base)!r}, a local path, not a Hub id: a card (and an exported adapter_config.json) would "
            "publish it as a broken link; pass --base-model ORG/NAME (the Hub id of the DETRIS base model)"
        )
    conversion_path = folder / "conversion.json"
    conversion = json.loads(conversion_path.read_text(encoding="utf-8")) if conversion_path.is_file() else {}
    variant = conversion.get("variant") or adapter_variant(adapter_config)
    evaluations = evaluations or []
    reported = reported_beside(evaluations, variant)
    params, buffers = adapter_statistics(folder)
    dataset_ids = list(datasets or [])
    trained_on = conversion.get("dataset")
    trained_on = DATASET_ALIASES.get(trained_on, trained_on) if trained_on else None
    if trained_on in DATASET_CARD_NAMES and DATASET_CARD_NAMES[trained_on][3] and DATASET_CARD_NAMES[trained_on][3] not in dataset_ids:
        dataset_ids.append(DATASET_CARD_NAMES[trained_on][3])
    for evaluation in evaluations:
        if evaluation.hub_dataset and evaluation.hub_dataset not in dataset_ids:
            dataset_ids.append(evaluation.hub_dataset)
    name = model_id.rstrip("/").split("/")[-1]
    peft_type = str(adapter_config.get("peft_type", "unknown"))
    eval_results = (to_model_index(evaluations) + reported_model_index(reported)) if evaluations else None
    card_data = ModelCardData(
        model_name=name,
        license="mit",
        library_name="peft",
        pipeline_tag="image-segmentation",
        base_model=base,
        datasets=dataset_ids or None,
        tags=BASE_TAGS + ["peft", "adapter"],
        eval_results=eval_results,
    )
    skip = {"base_model_name_or_path", "peft_type", "revision", "auto_mapping", "task_type", "inference_mode"}
    rows = [(key, f"`{json.dumps(value)}`") for key, value in sorted(adapter_config.items()) if key not in skip and value not in (None, [], {})]
    snippet = (
        "import torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModel, AutoProcessor\n\n"
        "import modeling_detris  # detris-hf: registers DETRIS with AutoModel and its PEFT method with PEFT\n"
        "import processing_detris  # detris-hf: registers the DETRIS processor with AutoProcessor\n\n"
        f'base = AutoModel.from_pretrained("{base}")\n'
        f'model = PeftModel.from_pretrained(base, "{model_id}").eval()\n'
        # The adapter's own processor pads the text to the length it was trained with (22 for G-Ref umd).
        f'processor = AutoProcessor.from_pretrained("{model_id if (folder / "processor_config.json").is_file() else base}")'
    )
    modules_to_save = adapter_config.get("modules_to_save") or []
    base_link = base if "://" in base else f"https://huggingface.co/{base}"
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "adapter_card_template.md"),
        title=name,
        has_head=bool(modules_to_save),
        base_model=base,
        base_model_link=base_link,
        dataset_note=_trained_on_note(trained_on, evaluations),
        source_note=_source_note(conversion),
        usage_snippet=snippet,
        peft_type=peft_type,
        num_parameters=params,
        num_buffers=buffers,
        file_size=_human_size((folder / "adapter_model.safetensors").stat().st_size),
        config_rows=rows,
        evaluation_tables=evaluation_tables(evaluations) if evaluations else None,
        reported_tables=(
            f"{CARD_VARIANT_NAMES.get(variant, variant)}, as reported by the authors for the same splits "
            f"([official repository]({OFFICIAL_README}), [paper]({PAPER_URL})); not measured on this adapter.\n\n"
            + evaluation_tables(reported)
        ) if reported else None,
    )


def _trained_on_note(dataset: str | None, evaluations) -> str | None:

    if dataset:
        return f"trained on {DATASET_CARD_NAMES[dataset][0] if dataset in DATASET_CARD_NAMES else dataset}"
    return f"trained on {', '.join(e.dataset_name for e in evaluations)}" if evaluations else None


def _source_note(conversion: dict) -> str | None:
    if not conversion.get("file"):
        return None
    return (
        f"Converted with `detris convert --split-adapters` from the official checkpoint `{conversion['file']}` "
        f"(SHA-256 `{conversion.get('sha256', '?')}`); text length {conversion.get('word_len', '?')} tokens."
    )


def card_for_folder(
    folder,
    model_id: str | None = None,
    eval_results=None,
    base_models: list[str] | None = None,
    datasets: list[str] | None = None,
    training_notes: str | None = None,
    model=None,
) -> ModelCard:
    """The card of a model folder or an adapter folder. `eval_results` is a path or parsed evaluations."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CardError(f"--model {str(folder)!r} is not a folder; expected a saved DETRIS model or adapter folder")
    evaluations = load_eval_results(eval_results) if isinstance(eval_results, (str, Path)) else eval_results
    model_id = model_id or folder.resolve().name
    if is_adapter_folder(folder):
        base = base_models[0] if base_models else None
        return build_adapter_card(folder, model_id, evaluations, base_model=base, datasets=datasets)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CardError(
            f"{folder} has neither config.json (a model folder) nor adapter_config.json (an adapter folder)"
        )
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type != "detris":
        raise CardError(f"{config_path} has model_type {model_type!r}; expected 'detris'")
    if model is None:
        from modeling_detris import DetrisForReferringSegmentation

        model = DetrisForReferringSegmentation.from_pretrained(str(folder))
    return build_model_card(
        model, model_id, evaluations, remote_code=has_remote_code(folder), base_models=base_models,
        datasets=datasets, training_notes=training_notes,
    )


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def add_card_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-results", default=None,
                        help="evaluation JSON (schema: docs/hub.md), or the results.json of `detris eval`")
    parser.add_argument("--eval-dataset", default=None,
                        help="the dataset a `detris eval` results.json was measured on (e.g. refcoco)")
    parser.add_argument("--repo-id", default=None, help="Hub id shown in the usage snippets (default: the folder name)")
    parser.add_argument("--base-model", action="append", default=None,
                        help="base model Hub id(s) for the metadata (repeatable; default: from the backbone shapes, "
                             "or the adapter's base_model_name_or_path)")
    parser.add_argument("--dataset", action="append", default=None, help="training dataset Hub id(s) for the metadata")
    parser.add_argument("--training-notes", default=None, help="markdown file describing the training run")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="detris card", description="write the model card (README.md) of a DETRIS folder")
    parser.add_argument("--model", required=True, help="DETRIS model folder or adapter folder")
    parser.add_argument("--output", default=None, help="where to write the card (default: MODEL/README.md)")
    add_card_arguments(parser)
    args = parser.parse_args(argv)
    try:
        card = card_for_folder(
            args.model, args.repo_id,
            load_eval_results(args.eval_results, args.eval_dataset) if args.eval_results else None, base_models=args.base_model, datasets=args.dataset,
            training_notes=read_text_file(args.training_notes, "--training-notes"),
        )
    except ValueError as error:
        print(f"detris card: {error}", file=sys.stderr)
        return 2
    output = Path(args.output) if args.output else Path(args.model) / "README.md"
    card.save(str(output))
    print(f"wrote {output}", file=sys.stderr)
    return 0


__all__ = [
    "CardError",
    "adapter_variant",
    "build_adapter_card",
    "build_model_card",
    "card_for_folder",
    "detect_variant",
    "has_remote_code",
    "usage_snippet",
]
