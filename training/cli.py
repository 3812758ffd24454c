"""The `detris` command: a thin dispatcher. Each subcommand lives with the package it serves and is imported by its
module name only when it runs."""

import contextlib
import sys

USAGE = """usage: detris <command> [options]

commands:
  convert    convert an official DETRIS .pth checkpoint to a transformers folder (modeling_detris.convert_original)
  provenance compare a base folder's frozen backbones with the public DINOv2 / CLIP weights (modeling_detris.provenance)
  info       parameter counts of a preset or a saved model (modeling_detris.info)
  data       build datasets: refer | hub | custom | refshapes | cache (training.data.cli)
  train      train adapters + head: accelerate loop, or transformers.Trainer with --trainer hf (training.train)
  eval       official evaluation: mIoU / oIoU / Pr@X tables and prediction grids (training.evaluation)
  demo       the end-to-end demo run by `make demo` (training.demo)
  bench      throughput, memory and FLOP utilisation on this machine, CPU or CUDA (benchmarks.bench)
  reproduce  convert the official checkpoints, evaluate them on RefCOCO/+/G-Ref, compare with the paper (training.reproduce)
  card       write the model card (README.md) of a model or adapter folder (hub_card.card)
  export     write a Hub-ready folder: weights, processor, remote code, card (hub_card.export)
  push       export and upload a folder to the Hub (hub_card.push)
  predict    segment images for referring expressions, write overlays and masks (hub_card.predict)
  space      write a ready Hugging Face Space (Gradio demo page) for a model (hub_card.space)
  app        serve the Space's demo page locally (hub_card.space)

`detris <command> --help` shows a command's options.
"""


# command -> "module:function", imported only when that command runs (so `detris --help` and `detris X --help` load
# nothing they do not need, and this dispatcher depends on no package it dispatches to)
COMMANDS = {
    "convert": "training.cli:convert_main",
    "provenance": "modeling_detris.provenance:main",
    "info": "modeling_detris.info:main",
    "data": "training.data.cli:main",
    "train": "training.train:main",
    "eval": "training.evaluation:main",
    "demo": "training.demo:main",
    "bench": "benchmarks.bench:main",
    "reproduce": "training.reproduce:main",
    "card": "hub_card.card:main",
    "export": "hub_card.export:main",
    "push": "hub_card.push:main",
    "predict": "hub_card.predict:main",
    "space": "hub_card.space:main",
    "app": "hub_card.space:app_main",
}


def convert_main(argv) -> int:
    """`detris convert`: the converter (modeling_detris) with the processor written beside each converted model
    (processing_detris); the two packages do not import each other, so the dispatcher joins them."""
    from importlib import import_module

    if wants_help(argv):
        with package_without_init("modeling_detris.convert_original"):
            return import_module("modeling_detris.convert_original").main(argv)
    save_processor = import_module("processing_detris.processing_detris").save_processor
    convert = import_module("modeling_detris.convert_original").main
    return convert(argv, save_extras=lambda folder, config: save_processor(str(folder), config=config))


@contextlib.contextmanager
def package_without_init(module_name: str):
    """Import `module_name` without running its top-level package's `__init__` (modeling_detris and hub_card register
    with transformers there, which imports torch: seconds), for printing a command's `--help`, which needs only its
    argument parser. The package and everything imported under it are forgotten afterwards, so a later import runs
    the real `__init__`."""
    import importlib.util

    package = module_name.split(".")[0]
    spec = importlib.util.find_spec(package) if package not in sys.modules else None
    if spec is None or spec.submodule_search_locations is None:
        yield
        return
    sys.modules[package] = importlib.util.module_from_spec(spec)  # has __path__, its code not run
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]


def wants_help(argv) -> bool:
    return any(arg in ("-h", "--help") for arg in argv[: argv.index("--") if "--" in argv else len(argv)])


def resolve(command: str):
    """The `main(argv)` function of a command, imported by name."""
    from importlib import import_module

    module_name, function = COMMANDS[command].split(":")
    try:
        module = import_module(module_name)
    except ModuleNotFoundError as error:  # `benchmarks` lives beside the packages, not inside an installed wheel
        if error.name != module_name.split(".")[0]:
            raise
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        module = import_module(module_name)
    return getattr(module, function)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"detris: unknown command {command!r}; expected one of {sorted(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        return 2
    if wants_help(rest):  # argparse prints the help and exits before the command does anything
        module_name = COMMANDS[command].split(":")[0]
        with package_without_init(module_name):
            return resolve(command)(rest) or 0
    return resolve(command)(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
