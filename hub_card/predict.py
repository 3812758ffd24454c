"""`detris predict --model DIR --image FILE [FILE ...] --text "..." [--text ...] --output OUT`.

For every image and every expression it writes into OUT:

- `<image>_<k>_overlay.png`: the image (at least 256 pixels wide) with the mask filled and outlined, and the
  expression and its score in full below it (`processing_detris.draw_referring_overlay`);
- `<image>_<k>_mask.png`: the raw mask, 8-bit grey, 255 inside and 0 outside, at the image's size;

and `predictions.json` listing image, expression, score, mask area and the two files. `k` is the expression's index
(00, 01, ...). All expressions of an image run as one batch (the `referring-image-segmentation` pipeline).
`--fast-cpu [auto|bf16|int8]` runs the model on the CPU through `modeling_detris.optimize_for_cpu` (`auto` when no
mode is given).
"""

import argparse
import json
import os
import sys
from pathlib import Path


def _safe_stem(path: Path, used: set) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem) or "image"
    candidate, index = stem, 1
    while candidate in used:
        index += 1
        candidate = f"{stem}-{index}"
    used.add(candidate)
    return candidate


def load_pipeline(model: str, device=None, trust_remote_code: bool = False):
    import hub_card  # noqa: F401  (registers the task)
    from transformers import pipeline

    from .pipeline import TASK

    try:
        if (Path(model) / "adapter_config.json").is_file() and not (Path(model) / "config.json").is_file():
            return _adapter_pipeline(model, device)
        return pipeline(TASK, model=model, device=device, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if trust_remote_code or "trust_remote_code" not in str(error):
            raise
        raise ValueError(
            f"--model {model!r} is not a DETRIS model detris-hf can load with its own classes: it needs its own Python "
            "code; pass --trust-remote-code to run that code (only for a source you trust)"
        ) from error


def _adapter_pipeline(folder: str, device=None):
    """A PEFT adapter folder over its base (a release's relative `../base` found beside the adapter, which
    transformers' pipeline would look for in the current directory), with the adapter's own processor."""
    from transformers import AutoProcessor, pipeline

    import processing_detris  # noqa: F401
    from modeling_detris import DetrisForReferringSegmentation

    from .pipeline import TASK

    model = DetrisForReferringSegmentation.from_pretrained(folder).eval()
    return pipeline(TASK, model=model, processor=AutoProcessor.from_pretrained(folder), device=device)


def predict(model, images, texts, output, threshold=None, device=None, log=print,
            trust_remote_code: bool = False, fast_cpu: str | None = None) -> list[dict]:
    """Run the pipeline on every (image, expression) and write the files; returns the records. The model is loaded
    with detris-hf's classes; a folder's own code runs only with `trust_remote_code`. `fast_cpu`: a mode of
    `optimize_for_cpu` applied to a model on the CPU (None: as loaded)."""
    from modeling_detris.quantization_detris import CPU_MODES, optimize_for_cpu
    from processing_detris import DEFAULT_MAX_IMAGE_PIXELS, draw_referring_overlay, to_rgb_uint8

    images = [Path(p) for p in images]
    for path in images:
        if not path.is_file():
            raise ValueError(f"--image {str(path)!r} does not exist; expected an image file")
    if not texts:
        raise ValueError('--text is required: give one or more referring expressions, e.g. --text "the dog"')
    for text in texts:
        if not text.strip():
            raise ValueError(f"--text {text!r} is empty; expected a referring expression such as 'the dog'")
    if fast_cpu is not None and fast_cpu not in CPU_MODES:
        raise ValueError(f"--fast-cpu {fast_cpu!r} is not one of {list(CPU_MODES)}")
    if isinstance(model, (str, os.PathLike)) and not Path(model).is_dir() and str(model).count("/") != 1:
        raise ValueError(f"--model {str(model)!r} is not a folder; expected a DETRIS model folder or a Hub id ORG/NAME")
    pipe = model if not isinstance(model, (str, os.PathLike)) else load_pipeline(str(model), device, trust_remote_code)
    if fast_cpu is not None and pipe.device.type == "cpu":
        pipe.model = optimize_for_cpu(pipe.model, fast_cpu)
        log(f"fast CPU path: {pipe.model.cpu_inference_mode}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    records, used = [], set()
    kwargs = {} if threshold is None else {"threshold": threshold}
    max_pixels = getattr(getattr(pipe, "image_processor", None), "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    for path in images:
        stem = _safe_stem(path, used)
        # Header first: a non-image or an image over the pixel limit is refused, naming the file, before decoding.
        image = to_rgb_uint8(str(path), max_image_pixels=max_pixels)
        results = pipe(str(path), list(texts), **kwargs)
        for index, result in enumerate(results):
            mask_file = output / f"{stem}_{index:02d}_mask.png"
            overlay_file = output / f"{stem}_{index:02d}_overlay.png"
            result["mask_image"].save(mask_file)
            draw_referring_overlay(image, [result["mask"]], [result["text"]], scores=[result["score"]]).save(overlay_file)
            records.append(
                {
                    "image": str(path),
                    "text": result["text"],
                    "score": result["score"],
                    "mask_pixels": int(result["mask"].sum()),
                    "mask": mask_file.name,
                    "overlay": overlay_file.name,
                }
            )
            log(f"{path.name} | {result['text']!r}: score {result['score']:.3f}, {int(result['mask'].sum())} px -> {overlay_file}")
    (output / "predictions.json").write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="detris predict", description="segment the object each expression refers to")
    parser.add_argument("--model", required=True, help="DETRIS model folder or Hub id")
    parser.add_argument("--image", required=True, nargs="+", help="image file(s)")
    parser.add_argument("--text", required=True, action="append", help="referring expression (repeat for several)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--threshold", type=float, default=None, help="mask probability threshold (default: the model's, 0.35)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: CPU)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model folder's or repository's own Python code (needed for a model whose code "
                             "detris-hf does not have)")
    parser.add_argument("--fast-cpu", nargs="?", const="auto", default=None, metavar="MODE",
                        help="auto, bf16, int8 or fp32: on the CPU, run the model in bf16 or int8 (auto when no mode is given: the fast path "
                             "this CPU has, else fp32)")
    args = parser.parse_args(argv)
    try:
        predict(args.model, args.image, args.text, args.output, args.threshold, args.device,
                log=lambda message: print(message, file=sys.stderr), trust_remote_code=args.trust_remote_code,
                fast_cpu=args.fast_cpu)
    except ValueError as error:
        print(f"detris predict: {error}", file=sys.stderr)
        return 2
    return 0


__all__ = ["main", "predict"]
