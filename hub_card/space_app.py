"""DETRIS referring image segmentation: the Gradio app of a Hugging Face Space.

Upload a photo (or paste it, or take it with the webcam), type one or several referring expressions, one per line
("the dog on the left"), and get one mask per expression: an overlay where each expression has its own colour, a
legend naming them, each mask as a PNG at the image's size, and the time the model took. All expressions of an
image go through the model as one batch (one forward pass).

`detris space` writes this file unchanged as the Space's `app.py`; `detris app` serves it locally. It imports
nothing of detris-hf: the model and its processor are loaded with `trust_remote_code=True` from an exported folder
(`detris export`) or a Hub repository, as any Hub user does. Decoding, letterbox, post-processing and the overlay
are the processor's (`to_rgb_uint8`, `processor(...)`, `post_process_referring_segmentation`,
`draw_referring_overlay`), so the page shows what every DETRIS tool computes and draws.

Settings come from `space_config.json` beside this file (written by `detris space`), overridden by the environment:

- `DETRIS_MODEL`: the model folder (relative to this file or absolute) or Hub repo id;
- `DETRIS_DEVICE`: a torch device; default `cuda` when a GPU is present, else `cpu`;
- `DETRIS_FAST_CPU`: the CPU inference path, `auto` (the default: bf16 or int8 where this CPU has a fast path for
  it, else fp32), `bf16`, `int8`, or `fp32` to turn it off (`optimize_for_cpu` of the model folder's
  `quantization_detris.py`; ignored on a GPU);
- `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT`: where Gradio listens (its own variables).

Examples are read from `examples/examples.json` (`[{"file", "expressions", "source", "license"}, ...]`).
"""

import base64
import html
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoModel, AutoProcessor

HERE = Path(__file__).resolve().parent
SETTINGS_FILE = "space_config.json"
EXAMPLES_FILE = "examples.json"
DEFAULT_THRESHOLD = 0.35
DEFAULT_MAX_EXPRESSIONS = 16
OUTPUT_MAX_AGE_S = 3600
IMAGE_HEIGHT = 360  # pixels on the page; small images are scaled up to it
READABLE_FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"


class DemoError(ValueError):
    """A mistake in what a person submitted; the message is shown on the page as is."""


# ---------------------------------------------------------------------------------------------------------------
# Settings and examples
# ---------------------------------------------------------------------------------------------------------------


def load_settings(folder=HERE) -> dict:
    """`space_config.json` of `folder` (empty when absent), with `DETRIS_MODEL` / `DETRIS_DEVICE` /
    `DETRIS_FAST_CPU` applied."""
    path = Path(folder) / SETTINGS_FILE
    settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if os.environ.get("DETRIS_MODEL"):
        settings["model"] = os.environ["DETRIS_MODEL"]
    if os.environ.get("DETRIS_DEVICE"):
        settings["device"] = os.environ["DETRIS_DEVICE"]
    if os.environ.get("DETRIS_FAST_CPU"):
        settings["fast_cpu"] = os.environ["DETRIS_FAST_CPU"]
    if not settings.get("model"):
        raise SystemExit(f"No model: set DETRIS_MODEL or write {{\"model\": ...}} into {path}")
    return settings


def resolve_model(model: str, folder=HERE) -> str:
    """A folder named relative to the app (`model`) becomes its absolute path; anything else (an absolute folder
    or a Hub repo id) is returned unchanged."""
    local = Path(folder) / model
    return str(local) if not Path(model).is_absolute() and local.is_dir() else model


@dataclass
class Example:
    file: str
    expressions: list = field(default_factory=list)
    source: str = ""
    license: str = ""


def load_examples(folder) -> list:
    """The examples listed in `folder/examples.json` whose image file exists."""
    path = Path(folder) / EXAMPLES_FILE
    if not path.is_file():
        return []
    examples = []
    for entry in json.loads(path.read_text(encoding="utf-8")):
        image = Path(folder) / entry["file"]
        if image.is_file():
            examples.append(Example(str(image), list(entry["expressions"]), entry.get("source", ""), entry.get("license", "")))
    return examples


# ---------------------------------------------------------------------------------------------------------------
# What a person submits
# ---------------------------------------------------------------------------------------------------------------


def parse_expressions(text, max_expressions: int = DEFAULT_MAX_EXPRESSIONS) -> list:
    """One expression per non-blank line, stripped."""
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise DemoError(f"The expressions must be text, got {type(text).__name__}; expected one expression per line.")
    expressions = [line.strip() for line in text.splitlines() if line.strip()]
    if not expressions:
        raise DemoError(
            f"The expression box is empty ({text!r}): type at least one referring expression, one per line, "
            "e.g. 'the dog on the left'."
        )
    if len(expressions) > max_expressions:
        raise DemoError(
            f"{len(expressions)} expressions given; this demo segments at most {max_expressions} per image "
            "(one per line)."
        )
    return expressions


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) < 1.0:
        raise DemoError(f"The threshold is {threshold!r}; expected a probability strictly between 0 and 1 (default 0.35).")
    return float(threshold)


def image_source(image):
    """(what PIL opens, the name to show) for a file path or Gradio's file payload (a dict with `path` or a `data:`
    URL, and the uploader's `orig_name`); (None, None) when there is no image."""
    if isinstance(image, dict):
        name = image.get("orig_name")
        if image.get("path"):
            return image["path"], name or Path(image["path"]).name
        url = image.get("url") or ""
        if url.startswith("data:") and "," in url:
            try:
                return io.BytesIO(base64.b64decode(url.split(",", 1)[1])), name or "pasted image"
            except ValueError as error:
                raise DemoError(f"The pasted image is not valid base64 data ({error}).") from error
        return None, None
    if image is None or (isinstance(image, str) and not image.strip()):
        return None, None
    return image, Path(str(image)).name


def load_image(image, max_pixels, decode=None) -> np.ndarray:
    """The uploaded image (a path or Gradio's file payload) as an RGB uint8 array, decoded by `decode` (the model's
    image processor's own decoding, `Segmenter.decode`: EXIF orientation, grey and 16-bit modes, alpha), refused with
    a readable message when it is missing, not an image, corrupt, or larger than `max_pixels` (checked from the
    header, before decoding)."""
    source, name = image_source(image)
    if source is None:
        raise DemoError("No image: upload a photo (or paste one, or take one with the webcam), or pick an example below.")
    try:
        with Image.open(source) as handle:
            width, height = handle.size
            if width <= 0 or height <= 0:
                raise DemoError(f"{name!r} has a size of {width} x {height} pixels; expected at least 1 x 1.")
            if max_pixels is not None and width * height > max_pixels:
                raise DemoError(
                    f"The image is {width} x {height} = {width * height:,} pixels, more than this demo's limit of "
                    f"{max_pixels:,} pixels (the processor's max_image_pixels). Downscale it and upload it again."
                )
            return decode(handle)
    except DemoError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise DemoError(_unreadable(name, error)) from error
    except FileNotFoundError as error:
        raise DemoError(f"The uploaded file {name!r} is gone; upload the image again.") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise DemoError(f"{name!r} could not be decoded ({error}); the file looks truncated or corrupt.") from error


def _unreadable(name: str, error: Exception) -> str:
    if isinstance(error, Image.DecompressionBombError):
        return f"{name!r} is refused by Pillow's decompression-bomb guard ({error}). Downscale it and upload it again."
    return f"{name!r} is not an image this demo can read; expected a {READABLE_FORMATS} file."


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_cpu_optimizer(model: str, revision=None):
    """`optimize_for_cpu(model, mode)` from the model folder's or repository's `quantization_detris.py` (shipped by
    `detris export` beside the model's code)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module("quantization_detris.optimize_for_cpu", model, revision=revision)


class Segmenter:
    """A DETRIS model and its processor on `device` (default: the GPU when there is one, else the CPU). On the Space
    they come from the exported folder's code (`trust_remote_code=True`); `detris app` passes False unless asked, so
    the classes detris-hf registered are used instead.

    On the CPU, `cpu_mode` (`"auto"`, `"bf16"`, `"int8"`, `"fp32"`; None: fp32) runs the model through
    `cpu_optimizer(model, cpu_mode)` (default: the folder's `optimize_for_cpu`, `load_cpu_optimizer`); the mode used
    is `self.cpu_mode`. With `"auto"`, a folder without that file runs in fp32."""

    def __init__(self, model: str, device=None, revision=None, trust_remote_code: bool = True, cpu_mode=None,
                 cpu_optimizer=None):
        self.model_id = str(model)
        self.device = torch.device(device or default_device())
        self.model = AutoModel.from_pretrained(self.model_id, trust_remote_code=trust_remote_code, revision=revision)
        self.model = self.model.to(self.device).eval()
        self.cpu_mode = "fp32"
        if cpu_mode not in (None, "fp32") and self.device.type == "cpu":
            try:
                optimize = cpu_optimizer or load_cpu_optimizer(self.model_id, revision)
            except OSError as error:
                if cpu_mode != "auto":
                    raise
                print(f"no fast CPU path for {self.model_id} ({error}); running in fp32", file=sys.stderr)
            else:
                self.model = optimize(self.model, cpu_mode)
                self.cpu_mode = self.model.cpu_inference_mode
        self.processor = AutoProcessor.from_pretrained(self.model_id, trust_remote_code=trust_remote_code,
                                                       revision=revision)
        self.max_image_pixels = getattr(self.processor.image_processor, "max_image_pixels", None)
        # The module of the image processor (the exported `image_processing_detris.py` on the Space): its decoding
        # is the one the model's inputs get, so the page decodes uploads with it too.
        self.image_processing = sys.modules[type(self.processor.image_processor).__module__]

    @property
    def device_label(self) -> str:
        """The device, with the CPU inference mode when it is not fp32: `cpu`, `cpu (bf16)`, `cuda`."""
        return str(self.device) + (f" ({self.cpu_mode})" if self.cpu_mode != "fp32" else "")

    def decode(self, image: Image.Image) -> np.ndarray:
        """An opened PIL image as the RGB uint8 array the processor would make of it."""
        return self.image_processing.to_rgb_uint8(image, self.max_image_pixels)

    @torch.inference_mode()
    def segment(self, image: np.ndarray, expressions: list, threshold: float = DEFAULT_THRESHOLD):
        """Masks (boolean `(H, W)` arrays at the image's size), scores (mean probability over each mask, 0 for an
        empty one) and the seconds the model took (pre-processing, one forward pass for every expression,
        post-processing)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        inputs = self.processor(images=image, text=list(expressions), return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        logits = self.model(
            pixel_values=inputs["pixel_values"].to(self.device, dtype), input_ids=inputs["input_ids"].to(self.device)
        ).logits.float()
        masks = self.processor.post_process_referring_segmentation(logits, inputs["original_sizes"], threshold=threshold)
        probabilities = torch.sigmoid(logits[:, 0])
        foreground = probabilities > threshold
        count = foreground.flatten(1).sum(dim=1)
        scores = torch.where(count > 0, (probabilities * foreground).flatten(1).sum(dim=1) / count.clamp(min=1), 0.0)
        masks = [mask.cpu().numpy().astype(bool) for mask in masks]
        scores = scores.cpu().tolist()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return masks, scores, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# The outputs
# ---------------------------------------------------------------------------------------------------------------


def hex_colour(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def legend_html(expressions: list, colours: list, masks: list, scores: list) -> str:
    rows = []
    for index, (text, rgb, mask, score) in enumerate(zip(expressions, colours, masks, scores)):
        colour_code = hex_colour(rgb)
        share = 100.0 * float(mask.mean()) if mask.size else 0.0
        detail = f"{share:.1f} % of the image, score {score:.2f}" if mask.any() else "no pixel above the threshold"
        rows.append(
            f'<li class="detris-legend-item" data-colour="{colour_code}">'
            f'<span class="detris-swatch" style="background-color: {colour_code};"></span> '
            f'<span class="detris-expression">{html.escape(text)}</span> '
            f'<span class="detris-detail">({detail})</span></li>'
        )
    return '<ul class="detris-legend">' + "".join(rows) + "</ul>"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "expression"


def _output_root() -> Path:
    root = Path(os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir()) / "detris-space-masks"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _remove_old_outputs(root: Path, max_age_s: float = OUTPUT_MAX_AGE_S) -> None:
    now = time.time()
    for folder in root.iterdir():
        try:
            if folder.is_dir() and now - folder.stat().st_mtime > max_age_s:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


def save_masks(masks: list, expressions: list) -> list:
    """Each mask as an 8-bit PNG (255 inside, 0 outside) at the image's size, in a fresh folder per request."""
    root = _output_root()
    _remove_old_outputs(root)
    folder = root / uuid.uuid4().hex
    folder.mkdir()
    paths = []
    for index, (mask, text) in enumerate(zip(masks, expressions), start=1):
        path = folder / f"mask_{index:02d}_{_slug(text)}.png"
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)
        paths.append(str(path))
    return paths


def timing_markdown(seconds: float, device, count: int, width: int, height: int) -> str:
    plural = "expression" if count == 1 else "expressions"
    return (
        f"**Model time: {seconds * 1000:.0f} ms** on `{device}` for {count} {plural} in one forward pass "
        f"(image {width} x {height} px)."
    )


def run(segmenter: Segmenter, image, text, threshold, max_expressions: int = DEFAULT_MAX_EXPRESSIONS):
    """The page's request: (overlay array, legend HTML, mask PNG paths, timing Markdown). `image` is a file path or
    Gradio's file payload. Raises `DemoError` for a person's mistake."""
    if image_source(image)[0] is None:
        load_image(None, None)  # the "no image" message, before any other
    expressions = parse_expressions(text, max_expressions)
    threshold = check_threshold(threshold)
    image = load_image(image, segmenter.max_image_pixels, segmenter.decode)
    try:
        masks, scores, seconds = segmenter.segment(image, expressions, threshold)
    except ValueError as error:  # the processor's own checks (size, content) name the bad value
        raise DemoError(f"The model could not process this image: {error}") from error
    # the processor's renderer (the one every DETRIS tool draws with; on the Space, the exported file's)
    colours = [segmenter.processor.overlay_colour(index) for index in range(len(expressions))]
    overlay = np.asarray(segmenter.processor.draw_referring_overlay(image, masks, expressions))
    height, width = image.shape[:2]
    return (
        overlay,
        legend_html(expressions, colours, masks, scores),
        save_masks(masks, expressions),
        timing_markdown(seconds, segmenter.device_label, len(expressions), width, height),
    )


# ---------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------


CSS = """
.detris-legend { list-style: none; padding: 0; margin: 0; }
.detris-legend-item { display: flex; align-items: center; gap: 0.5em; margin: 0.2em 0; }
.detris-swatch { display: inline-block; width: 1.1em; height: 1.1em; border-radius: 3px; border: 1px solid #0005; }
.detris-detail { opacity: 0.7; font-size: 0.9em; }
#detris-image img, #detris-overlay img { width: 100%; height: 100%; object-fit: contain; }
"""

DESCRIPTION = (
    "Upload an image, type one or more referring expressions (one per line) and press **Segment**: each "
    "expression gets its own colour on the overlay, and its mask can be downloaded as a PNG at the image's size. "
    "All expressions of an image run through the model in one forward pass."
)


def build_demo(segmenter: Segmenter, examples=(), title: str = "DETRIS referring image segmentation",
               description: str = DESCRIPTION, max_expressions: int = DEFAULT_MAX_EXPRESSIONS) -> gr.Blocks:
    def segment(image, text, threshold):
        try:
            return run(segmenter, image, text, threshold, max_expressions)
        except DemoError as error:
            raise gr.Error(str(error), print_exception=False) from error
        except Exception as error:  # never a stack trace on the page; the server log keeps it
            traceback.print_exc()
            raise gr.Error(f"The demo failed on this request ({type(error).__name__}: {error}); try another image "
                           "or expression.", print_exception=False) from error

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(OUTPUT_MAX_AGE_S, OUTPUT_MAX_AGE_S)) as demo:
        gr.Markdown(f"# {title}\n\n{description}")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard", "webcam"],
                                 height=IMAGE_HEIGHT, elem_id="detris-image")
                text = gr.Textbox(label="Referring expressions, one per line", lines=3, max_lines=max_expressions,
                                  placeholder="the dog on the left\nthe red car", elem_id="detris-text")
                threshold = gr.Slider(0.05, 0.95, value=DEFAULT_THRESHOLD, step=0.01, label="Mask threshold",
                                      elem_id="detris-threshold")
                button = gr.Button("Segment", variant="primary", elem_id="detris-submit")
            with gr.Column():
                overlay = gr.Image(label="Overlay", type="numpy", format="png", interactive=False, height=IMAGE_HEIGHT,
                                   elem_id="detris-overlay")
                legend = gr.HTML(elem_id="detris-legend")
                timing = gr.Markdown(elem_id="detris-timing")
                masks = gr.File(label="Masks (PNG, at the image's size)", file_count="multiple", interactive=False,
                                elem_id="detris-masks")
        if examples:
            gr.Examples(
                examples=[[example.file, "\n".join(example.expressions)] for example in examples],
                inputs=[image, text],
                label="Examples (click one, then Segment)",
                examples_per_page=12,
                cache_examples=False,
                elem_id="detris-examples",
            )
            credits = sorted({f"{example.source} ({example.license})" for example in examples if example.source})
            if credits:
                gr.Markdown("Example images: " + "; ".join(credits) + ".")
        shown = Path(segmenter.model_id).name if Path(segmenter.model_id).is_dir() else segmenter.model_id
        gr.Markdown(f"Model: `{shown}` on `{segmenter.device_label}`.")
        # preprocess=False: the function gets the upload as Gradio's file payload (already checked and moved into
        # Gradio's cache) and decodes it itself, so a file that is not an image gets a readable message instead of
        # Gradio's component error.
        button.click(segment, inputs=[image, text, threshold], outputs=[overlay, legend, masks, timing],
                     api_name="segment", concurrency_limit=1, preprocess=False)
    return demo


def theme():
    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])


def launch(demo: gr.Blocks, **kwargs):
    """Serve `demo` (Gradio's defaults and environment variables for host and port unless given)."""
    kwargs.setdefault("max_file_size", "64mb")
    return demo.queue(default_concurrency_limit=1).launch(theme=theme(), css=CSS, **kwargs)


def load_segmenter(settings: dict, folder=HERE) -> Segmenter:
    """The Space's model as `settings` (`load_settings`) name it; on the CPU it runs the fast path `fast_cpu`
    (default `"auto"`)."""
    return Segmenter(resolve_model(settings["model"], folder), settings.get("device"), settings.get("revision"),
                     cpu_mode=settings.get("fast_cpu", "auto"))


def main():
    settings = load_settings(HERE)
    segmenter = load_segmenter(settings, HERE)
    examples = load_examples(HERE / settings.get("examples", "examples"))
    demo = build_demo(segmenter, examples, title=settings.get("title", "DETRIS referring image segmentation"),
                      max_expressions=int(settings.get("max_expressions", DEFAULT_MAX_EXPRESSIONS)))
    launch(demo)


if __name__ == "__main__":
    main()
