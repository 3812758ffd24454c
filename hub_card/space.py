"""`detris space` (a ready Hugging Face Space folder) and `detris app` (the same app served locally).

```bash
detris space --model DIR_OR_REPO --output SPACEDIR [--model-repo-id ORG/NAME] [--title T] [--overwrite]
             [--fast-cpu auto|bf16|int8|fp32]
detris app --model DIR_OR_REPO [--port 7860] [--host 127.0.0.1] [--device cuda] [--trust-remote-code]
           [--fast-cpu [auto|bf16|int8]]
```

SPACEDIR gets:

- `app.py`: `hub_card/space_app.py` unchanged (Gradio; it imports nothing of detris-hf and loads the model and
  processor with `trust_remote_code=True`);
- `requirements.txt`: the app's runtime packages pinned to the versions installed here (no detris-hf);
- `README.md`: the Space card, with the YAML header (`title`, `sdk: gradio`, `sdk_version`, `app_file`,
  `models`, `license`) and the licences of the example images;
- `space_config.json`: which model the app loads, title, limits, and `fast_cpu`: the CPU inference path the app
  applies with the exported folder's `optimize_for_cpu` (`--fast-cpu`, default `auto`: bf16 or int8 where the
  Space's CPU has a fast path, else fp32; `fp32` turns it off);
- `examples/`: small scenes of coloured shapes drawn here with their expressions, and a few real photographs
  shipped by scikit-image (`examples.json` lists them with source and licence), so the examples work offline;
- `model/` when `--model` is a local folder: its `detris export` (weights, processor, remote code), so the Space
  runs on its own. With a Hub repo id the app downloads that repository instead and nothing is copied.

`detris push --model SPACEDIR --repo-id ORG/NAME` uploads such a folder as a Gradio Space.

`detris app` loads the model with detris-hf's own classes; a folder's or repository's code runs only with
`--trust-remote-code`. `detris app --fast-cpu` runs it on the CPU through `modeling_detris.optimize_for_cpu`
(`auto` when given without a mode).
"""

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from configuration_detris.folders import publish

from .export import export_model_folder, is_exported_folder
from .folders import check_repo_id, is_adapter_folder, looks_like_repo_id, staging_folder

APP_SOURCE = Path(__file__).with_name("space_app.py")
CARD_TEMPLATE = Path(__file__).with_name("space_card_template.md")
MODEL_FOLDER = "model"
EXAMPLES_FOLDER = "examples"
DEFAULT_TITLE = "DETRIS referring image segmentation"
# The app's imports (gradio, torch, transformers, numpy, pillow) and what the model's remote code needs.
RUNTIME_PACKAGES = (
    "gradio", "torch", "transformers", "peft", "safetensors", "huggingface_hub", "numpy", "pillow",
    "opencv-python-headless", "ftfy", "regex",
)
SHAPE_SCENES = 4
# Real photographs shipped in scikit-image's wheel (skimage/data), with the licences its documentation states.
PHOTOS = (
    ("astronaut.png", ["the astronaut", "the flag"],
     "scikit-image `data.astronaut`: Eileen Collins, NASA Great Images database", "public domain (NASA)"),
    ("coffee.png", ["the cup of coffee", "the spoon"],
     "scikit-image `data.coffee`: photo by Rachel Michetti, courtesy of Pikolo Espresso Bar", "CC0"),
    ("chelsea.png", ["the cat"], "scikit-image `data.chelsea`: Chelsea the cat, photo by Stefan van der Walt", "CC0"),
    ("rocket.jpg", ["the rocket", "the launch tower"],
     "scikit-image `data.rocket`: DSCOVR on Falcon 9, SpaceX", "public domain (released by SpaceX)"),
)
SHAPES_SOURCE = "coloured shapes drawn by detris-hf"
SHAPES_LICENSE = "MIT"
SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (235, 210, 40),
                 "purple": (140, 60, 185), "orange": (245, 140, 30)}
SHAPE_KINDS = ("circle", "square", "triangle")


class SpaceError(ValueError):
    """Bad `detris space` / `detris app` arguments; the message names the bad value and what was expected."""


# ---------------------------------------------------------------------------------------------------------------
# Pieces of the folder
# ---------------------------------------------------------------------------------------------------------------


def check_model_argument(model) -> tuple:
    """(`"folder"`, Path) for a local model folder, (`"repo"`, id) for a Hub repo id; refused otherwise."""
    path = Path(model)
    if path.is_dir():
        if is_adapter_folder(path):
            raise SpaceError(
                f"--model {str(model)!r} is an adapter-only folder; expected a full model folder "
                "(`to_standalone_model(model).save_pretrained(DIR)`) or its `detris export`"
            )
        if not (path / "config.json").is_file():
            raise SpaceError(f"--model {str(model)!r} has no config.json; expected a DETRIS model folder or a Hub repo id")
        return "folder", path
    if looks_like_repo_id(str(model)):
        return "repo", str(model)
    raise SpaceError(f"--model {str(model)!r} is neither a folder nor a Hub repo id; expected a DETRIS model folder "
                     "or ORG/NAME")


def pinned_requirements(packages=RUNTIME_PACKAGES) -> str:
    """`name==version` for every package, from the versions installed here (local labels such as `+cpu` dropped:
    the Space installs the plain wheel)."""
    lines = []
    for name in packages:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError as error:
            hint = " (pip install 'detris-hf[space]')" if name == "gradio" else ""
            raise SpaceError(f"{name} is not installed{hint}; requirements.txt pins the installed version of each of "
                             f"{list(packages)}") from error
        lines.append(f"{name}=={version.split('+')[0]}")
    return "\n".join(lines) + "\n"


def scikit_image_data_dir() -> Path | None:
    """scikit-image's bundled sample images, found without importing scikit-image (None when not installed)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return folder if folder.is_dir() else None


def draw_shape_scene(index: int, width: int = 224, height: int = 168):
    """Scene `index`: three shapes of different kinds and colours on a light background, and an expression for
    each (`the red circle`, ...) plus one naming the leftmost by its place. Returns `(PIL image, expressions)`."""
    from PIL import Image, ImageDraw

    kinds = [SHAPE_KINDS[(index + k) % len(SHAPE_KINDS)] for k in range(3)]
    names = list(SHAPE_COLOURS)
    colours = [names[(2 * index + 3 * k) % len(names)] for k in range(3)]
    image = Image.new("RGB", (width, height), (236, 233, 226))
    draw = ImageDraw.Draw(image)
    radius = height // 7
    places = []
    for k, (kind, colour) in enumerate(zip(kinds, colours)):
        cx = width * (2 * k + 1) // 6
        cy = height // 2 + (height // 5) * (1 if (index + k) % 2 else -1)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        fill = SHAPE_COLOURS[colour]
        if kind == "circle":
            draw.ellipse(box, fill=fill)
        elif kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
        places.append((cx, kind, colour))
    expressions = [f"the {colour} {kind}" for _, kind, colour in places]
    expressions.append(f"the {min(places)[1]} on the left")
    return image, expressions


def write_examples(folder, scenes: int = SHAPE_SCENES, photos: bool = True, log=print) -> list:
    """Shape scenes (`draw_shape_scene`) with their expressions, and the scikit-image photographs; writes
    `folder/examples.json` and returns its entries."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(scenes):
        image, expressions = draw_shape_scene(index)
        name = f"shapes_{index:02d}.png"
        image.save(folder / name)
        entries.append({"file": name, "expressions": expressions, "source": SHAPES_SOURCE, "license": SHAPES_LICENSE})
    if photos:
        data_dir = scikit_image_data_dir()
        if data_dir is None:
            log("scikit-image is not installed (pip install 'detris-hf[space]'): no photographs among the examples")
        else:
            for name, expressions, source, license_name in PHOTOS:
                if not (data_dir / name).is_file():
                    log(f"scikit-image has no {name} in {data_dir}: skipped")
                    continue
                shutil.copyfile(data_dir / name, folder / f"photo_{name}")
                entries.append({"file": f"photo_{name}", "expressions": list(expressions), "source": source,
                                "license": license_name})
    (folder / "examples.json").write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    return entries


def _max_image_pixels(model_folder: Path | None) -> int:
    from processing_detris import DEFAULT_MAX_IMAGE_PIXELS

    if model_folder is not None and (model_folder / "processor_config.json").is_file():
        data = json.loads((model_folder / "processor_config.json").read_text(encoding="utf-8"))
        value = data.get("image_processor", {}).get("max_image_pixels")
        if value:
            return int(value)
    return DEFAULT_MAX_IMAGE_PIXELS


def space_card(title: str, model_repo_id: str | None, bundled: bool, examples: list, max_pixels: int,
               max_expressions: int) -> str:
    from huggingface_hub import SpaceCard, SpaceCardData

    gradio_version = pinned_requirements(("gradio",)).strip().split("==")[1]
    card_data = SpaceCardData(
        title=title,
        sdk="gradio",
        sdk_version=gradio_version,
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        app_file="app.py",
        license="mit",
        models=[model_repo_id] if model_repo_id else None,
        tags=["detris", "referring-image-segmentation", "image-segmentation"],
        emoji="\N{DIRECT HIT}",
        colorFrom="indigo",
        colorTo="blue",
        short_description="Referring image segmentation with DETRIS",
    )
    if bundled:
        model_text = "the exported model in `model/`" + (f" (from [{model_repo_id}](https://huggingface.co/{model_repo_id}))"
                                                          if model_repo_id else "")
    else:
        model_text = f"[{model_repo_id}](https://huggingface.co/{model_repo_id})"
    photo_note = None
    if any(entry["file"].startswith("photo_") for entry in examples):
        photo_note = ("The photographs come from scikit-image's sample data (`skimage.data`); the licences above are "
                      "those its documentation states for each image.")
    card = SpaceCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        title=title,
        model_text=model_text,
        max_pixels=f"{max_pixels:,}",
        max_expressions=max_expressions,
        examples=examples,
        photo_note=photo_note,
    )
    return str(card)


# ---------------------------------------------------------------------------------------------------------------
# detris space
# ---------------------------------------------------------------------------------------------------------------


def write_space(model, output, model_repo_id: str | None = None, title: str = DEFAULT_TITLE, overwrite: bool = False,
                scenes: int = SHAPE_SCENES, photos: bool = True, max_expressions: int = 16,
                log=print, fast_cpu: str = "auto") -> list:
    """Write the Space folder (see the module docstring); returns the paths written, relative to `output`."""
    kind, source = check_model_argument(model)
    if model_repo_id is not None:
        check_repo_id(model_repo_id, "--model-repo-id")
    if kind == "repo":
        if model_repo_id is not None and model_repo_id != source:
            raise SpaceError(f"--model-repo-id {model_repo_id!r} differs from --model {source!r}; give one of them")
        model_repo_id = source
    if not 1 <= max_expressions <= 64:
        raise SpaceError(f"--max-expressions {max_expressions} is outside [1, 64]")
    if not 0 <= scenes <= 100:
        raise SpaceError(f"--scenes {scenes} is outside [0, 100]")
    from modeling_detris.quantization_detris import CPU_MODES

    if fast_cpu not in CPU_MODES:
        raise SpaceError(f"--fast-cpu {fast_cpu!r} is not one of {list(CPU_MODES)}")
    output = Path(output)
    staging = staging_folder(output, [source] if kind == "folder" else [], overwrite)
    try:
        model_folder = None
        if kind == "folder":
            model_folder = staging / MODEL_FOLDER
            if is_exported_folder(source):
                log(f"{source} is already an export: copying it into {MODEL_FOLDER}/")
                shutil.copytree(source, model_folder, ignore=shutil.ignore_patterns(".*"))
            else:
                log(f"exporting {source} into {MODEL_FOLDER}/ (weights, processor, remote code)")
                export_model_folder(source, model_folder, repo_id=model_repo_id, log=log)
        else:
            log(f"the app will load {source} from the Hub")
        shutil.copyfile(APP_SOURCE, staging / "app.py")
        (staging / "requirements.txt").write_text(pinned_requirements(), encoding="utf-8")
        settings = {"model": MODEL_FOLDER if kind == "folder" else source, "title": title,
                    "max_expressions": max_expressions, "examples": EXAMPLES_FOLDER, "fast_cpu": fast_cpu}
        (staging / "space_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        examples = write_examples(staging / EXAMPLES_FOLDER, scenes, photos, log=log)
        if kind == "folder" and model_repo_id is None:
            log("no --model-repo-id: the card's `models:` stays empty (the model is bundled in model/)")
        card = space_card(title, model_repo_id, kind == "folder", examples, _max_image_pixels(model_folder),
                          max_expressions)
        (staging / "README.md").write_text(card, encoding="utf-8")
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="detris space", description="write a ready Hugging Face Space (Gradio) folder")
    parser.add_argument("--model", required=True, help="DETRIS model folder (raw or exported) or Hub repo id ORG/NAME")
    parser.add_argument("--output", required=True, help="the Space folder to write")
    parser.add_argument("--model-repo-id", default=None,
                        help="the model's Hub repo, named in the card's `models:` (default: --model when it is a repo id)")
    parser.add_argument("--title", default=DEFAULT_TITLE)
    parser.add_argument("--scenes", type=int, default=SHAPE_SCENES,
                        help=f"number of example scenes of coloured shapes (default {SHAPE_SCENES})")
    parser.add_argument("--no-photos", action="store_true", help="leave out the scikit-image photographs")
    parser.add_argument("--max-expressions", type=int, default=16, help="most expressions per image (default 16)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--fast-cpu", default="auto", metavar="MODE",
                        help="auto, bf16, int8 or fp32: the app's CPU inference path (default auto: bf16 or int8 where the Space's CPU has a "
                             "fast path, else fp32; fp32 turns it off)")
    args = parser.parse_args(argv)
    try:
        files = write_space(args.model, args.output, args.model_repo_id, args.title, args.overwrite, args.scenes,
                            not args.no_photos, args.max_expressions, log=lambda message: print(message, file=sys.stderr),
                            fast_cpu=args.fast_cpu)
    except ValueError as error:
        print(f"detris space: {error}", file=sys.stderr)
        return 2
    top = sorted({name.split("/")[0] for name in files})
    print(f"wrote {args.output}: {', '.join(top)}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# detris app
# ---------------------------------------------------------------------------------------------------------------


def build_app(model, device=None, examples_dir=None, scenes: int = SHAPE_SCENES, photos: bool = True,
              title: str = DEFAULT_TITLE, trust_remote_code: bool = False, log=print, fast_cpu: str | None = None):
    """The Space's app (`hub_card.space_app`) around `model`, a folder or Hub repo id, loaded with detris-hf's own
    classes (the folder's code runs only with `trust_remote_code`); examples are written into `examples_dir` (none
    when it is None); on the CPU, `fast_cpu` (a mode of `optimize_for_cpu`; None: fp32). Returns
    `(demo, segmenter)`."""
    import modeling_detris  # noqa: F401  (registers DETRIS with AutoModel: our classes, not the folder's code)
    import processing_detris  # noqa: F401  (registers the processor with AutoProcessor)
    from modeling_detris.quantization_detris import CPU_MODES, optimize_for_cpu

    from . import space_app

    kind, source = check_model_argument(model)
    if fast_cpu is not None and fast_cpu not in CPU_MODES:
        raise SpaceError(f"--fast-cpu {fast_cpu!r} is not one of {list(CPU_MODES)}")
    try:
        segmenter = space_app.Segmenter(str(source), device=device, trust_remote_code=trust_remote_code,
                                        cpu_mode=fast_cpu, cpu_optimizer=optimize_for_cpu)
    except ValueError as error:
        if trust_remote_code or "trust_remote_code" not in str(error):
            raise
        raise SpaceError(
            f"--model {str(source)!r} is not a DETRIS model detris-hf can load with its own classes: it needs its own "
            "Python code; pass --trust-remote-code to run that code (only for a source you trust)"
        ) from error
    examples = []
    if examples_dir is not None:
        write_examples(examples_dir, scenes, photos, log=log)
        examples = space_app.load_examples(examples_dir)
    log(f"loaded {source} on {segmenter.device_label}")
    return space_app.build_demo(segmenter, examples, title=title), segmenter


def app_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="detris app", description="serve the Space's Gradio app locally")
    parser.add_argument("--model", required=True, help="DETRIS model folder or Hub repo id ORG/NAME")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--no-examples", action="store_true", help="serve without the examples gallery")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model folder's or repository's own Python code (default: detris-hf's classes)")
    parser.add_argument("--fast-cpu", nargs="?", const="auto", default=None, metavar="MODE",
                        help="auto, bf16, int8 or fp32: on the CPU, run the model in bf16 or int8 (auto when no mode is given: the fast path "
                             "this CPU has, else fp32)")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        print(f"detris app: --port {args.port} is outside [1, 65535]", file=sys.stderr)
        return 2
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="detris-app-") as tmp:
        try:
            demo, _ = build_app(args.model, args.device, None if args.no_examples else Path(tmp) / EXAMPLES_FOLDER,
                                trust_remote_code=args.trust_remote_code, log=log, fast_cpu=args.fast_cpu)
        except ValueError as error:
            print(f"detris app: {error}", file=sys.stderr)
            return 2
        from .space_app import launch

        launch(demo, server_name=args.host, server_port=args.port)
    return 0


__all__ = ["SpaceError", "app_main", "build_app", "check_model_argument", "draw_shape_scene", "main",
           "pinned_requirements", "write_examples", "write_space"]
