"""`detris export --model DIR --output HUBDIR`: a folder ready to be pushed to the Hub.

For a model folder, HUBDIR gets:

- `config.json` (with `auto_map` for AutoConfig / AutoModel and the `referring-image-segmentation` custom pipeline)
  and `model.safetensors`;
- the processor files (`processor_config.json` with `auto_map` for AutoProcessor / AutoImageProcessor,
  `tokenizer.json`, `tokenizer_config.json` with `auto_map` for AutoTokenizer);
- the remote code, our role files copied (`hub_card.remote_code`): `configuration_detris.py`, `modeling_detris.py`,
  `image_processing_detris.py`, `tokenization_detris.py`, `processing_detris.py` and `pipeline_detris.py`, with
  `from configuration_detris import ...` made `from .configuration_detris import ...`;
- the CLIP BPE merges and their licence files, and the model card `README.md`.

`AutoModel.from_pretrained(HUBDIR, trust_remote_code=True)` / `AutoProcessor.from_pretrained(...)` then work where
detris-hf is not installed (torch, transformers, peft, opencv-python-headless, ftfy, regex and pillow are).

An adapter-only folder (PEFT) is exported as its adapter files plus its own card; loading it needs detris-hf (the
DETRIS PEFT method has to be registered), which the card says.

The folder is written under a hidden staging name and renamed at the end, so a failed export leaves nothing that
looks complete; a re-run removes what killed runs left. An `--output` that is or contains `--model` is refused.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from configuration_detris.folders import atomic_folder

from .card import CardError, add_card_arguments, build_model_card, card_for_folder
from .folders import OutputFolderError, check_output_folder, is_adapter_folder, read_text_file
from .remote_code import HUB_FILES, PIPELINE_FILE, ROLE_FILES, RemoteCodeError, write_remote_code

MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_detris.DetrisConfig",
    "AutoModel": "modeling_detris.DetrisForReferringSegmentation",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_detris.DetrisProcessor"}
IMAGE_PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "image_processing_detris.DetrisImageProcessor",
    "AutoProcessor": "processing_detris.DetrisProcessor",
}
TOKENIZER_AUTO_MAP = {
    "AutoProcessor": "processing_detris.DetrisProcessor",
    "AutoTokenizer": ["tokenization_detris.DetrisTokenizer", None],
}


def custom_pipelines() -> dict:
    """config.json's `custom_pipelines` entry (a function: the pipeline module imports torch, `--help` does not)."""
    from .pipeline import TASK

    return {TASK: {"impl": f"{PIPELINE_FILE.name}.ReferringImageSegmentationPipeline", "pt": ["AutoModel"], "tf": [],
                   "type": "multimodal"}}


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Copied when present: the adapter's own processor (its text length), and how a folder was converted.
ADAPTER_EXTRA_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "conversion.json")
MODEL_EXTRA_FILES = ("backbone_provenance.json", "conversion.json")


class ExportError(ValueError):
    """The model folder cannot be exported; the message names the bad value and what was expected."""


def _update_json(path: Path, update) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    update(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_model_folder(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ExportError(f"--model {str(model_dir)!r} is not a folder; expected a saved DETRIS model folder")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{model_dir} has no config.json; expected a DETRIS model folder (save_pretrained output)")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type != "detris":
        raise ExportError(f"{config_path} has model_type {model_type!r}; expected 'detris'")


def load_processor(model_dir: Path, config):
    """The folder's processor, or (when the folder has none) the default one for the config; checked against the
    config's `word_len` and `input_size`."""
    from processing_detris import DetrisImageProcessor, DetrisProcessor

    if (model_dir / "processor_config.json").is_file():
        processor = DetrisProcessor.from_pretrained(str(model_dir))
        note = None
    else:
        size = {"height": config.input_size, "width": config.input_size}
        processor = DetrisProcessor(image_processor=DetrisImageProcessor(size=size), word_len=config.word_len)
        note = (f"{model_dir} has no processor files: wrote the default DETRIS processor "
                f"(word_len={config.word_len}, {config.input_size}x{config.input_size})")
    if processor.word_len != config.word_len:
        raise ExportError(
            f"the processor pads text to word_len={processor.word_len} but the model expects word_len={config.word_len}"
        )
    size = processor.image_processor.size
    height, width = int(size["height"]), int(size["width"])
    if (height, width) != (config.input_size, config.input_size):
        raise ExportError(
            f"the processor letterboxes to {height}x{width} but the model expects {config.input_size}x{config.input_size}"
        )
    return processor, note


def export_model_folder(
    model_dir,
    output_dir,
    eval_results=None,
    repo_id: str | None = None,
    overwrite: bool = False,
    base_models=None,
    datasets=None,
    training_notes: str | None = None,
    log=print,
) -> list[str]:
    """Export `model_dir` to `output_dir` (see the module docstring); returns the exported file names."""
    from modeling_detris import DetrisForReferringSegmentation

    model_dir, output = Path(model_dir), Path(output_dir)
    if is_adapter_folder(model_dir):
        return export_adapter_folder(model_dir, output, eval_results, repo_id, overwrite, base_models, datasets, log)
    from transformers.utils import logging

    check_model_folder(model_dir)
    # shown only when the export takes more than a second (a full-size model: loading and writing ~700 MB)
    progress = logging.tqdm(total=3, desc=f"export {model_dir.name}", unit="step", delay=1)
    progress.set_postfix_str("loading the model")
    model = DetrisForReferringSegmentation.from_pretrained(str(model_dir))
    processor, note = load_processor(model_dir, model.config)
    if note:
        log(note)
    repo_id = repo_id or output.resolve().name
    check_output_folder(output, [model_dir], overwrite)
    with progress, atomic_folder(output, overwrite=True) as staging:
        progress.update()
        progress.set_postfix_str("writing weights, processor and code")
        write_remote_code(staging, HUB_FILES)
        model.save_pretrained(str(staging), safe_serialization=True)
        processor.save_pretrained(str(staging))
        progress.update()
        progress.set_postfix_str("writing the card")

        def model_config(data):
            data["auto_map"] = dict(MODEL_AUTO_MAP)
            data["custom_pipelines"] = custom_pipelines()

        def processor_config(data):
            data["auto_map"] = dict(PROCESSOR_AUTO_MAP)
            if "image_processor" not in data:
                raise ExportError("processor_config.json has no nested image_processor; cannot add its auto_map")
            data["image_processor"]["auto_map"] = dict(IMAGE_PROCESSOR_AUTO_MAP)

        def tokenizer_config(data):
            data["auto_map"] = json.loads(json.dumps(TOKENIZER_AUTO_MAP))

        _update_json(staging / "config.json", model_config)
        _update_json(staging / "processor_config.json", processor_config)
        _update_json(staging / "tokenizer_config.json", tokenizer_config)
        for name in MODEL_EXTRA_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, staging / name)
        card = build_model_card(
            model, repo_id, eval_results, remote_code=True, base_models=base_models, datasets=datasets,
            training_notes=training_notes,
        )
        card.save(str(staging / "README.md"))
        files = sorted(p.name for p in staging.iterdir())
        progress.update()
    return files


def export_adapter_folder(model_dir, output, eval_results=None, repo_id=None, overwrite=False, base_models=None,
                          datasets=None, log=print) -> list[str]:
    """Copy an adapter-only folder's adapter files (and its processor and `conversion.json`, when present) and write
    its card. With `base_models`, the copy's `base_model_name_or_path` names `base_models[0]` (the base's Hub id, so
    that `AutoModel.from_pretrained(<adapter repo>)` finds it) instead of the local folder it was saved against."""
    model_dir, output = Path(model_dir), Path(output)
    missing = [name for name in ADAPTER_FILES if not (model_dir / name).is_file()]
    if missing:
        raise ExportError(f"{model_dir} is an adapter folder without {missing}; expected {list(ADAPTER_FILES)}")
    repo_id = repo_id or output.resolve().name
    card = card_for_folder(model_dir, repo_id, eval_results, base_models=base_models, datasets=datasets)
    check_output_folder(output, [model_dir], overwrite)
    with atomic_folder(output, overwrite=True) as staging:
        for name in ADAPTER_FILES + ADAPTER_EXTRA_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, staging / name)
        if base_models:
            _update_json(staging / "adapter_config.json", lambda data: data.update(base_model_name_or_path=base_models[0]))
        card.save(str(staging / "README.md"))
        files = sorted(p.name for p in staging.iterdir())
    return files


def is_exported_folder(folder) -> bool:
    """A `detris export` output: model files with the flat code and auto_map, or adapter files with a card."""
    folder = Path(folder)
    if is_adapter_folder(folder):
        return (folder / "README.md").is_file()
    config = folder / "config.json"
    if not config.is_file():
        return False
    auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map") or {}
    return auto_map == MODEL_AUTO_MAP and all((folder / f"{spec.name}.py").is_file() for spec in ROLE_FILES)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="detris export", description="write a Hub-ready folder (weights, processor, remote code, card)")
    parser.add_argument("--model", required=True, help="DETRIS model folder (or adapter-only folder)")
    parser.add_argument("--output", required=True, help="the Hub-ready folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    add_card_arguments(parser)
    args = parser.parse_args(argv)
    try:
        from .eval_results import load_eval_results

        evaluations = load_eval_results(args.eval_results, args.eval_dataset) if args.eval_results else None
        files = export_model_folder(
            args.model, args.output, evaluations, args.repo_id, args.overwrite, args.base_model, args.dataset,
            read_text_file(args.training_notes, "--training-notes"), log=lambda message: print(message, file=sys.stderr),
        )
    except (ExportError, CardError, OutputFolderError, RemoteCodeError, ValueError) as error:
        print(f"detris export: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {', '.join(files)}", file=sys.stderr)
    return 0


__all__ = ["ExportError", "export_adapter_folder", "export_model_folder", "is_exported_folder", "main"]
