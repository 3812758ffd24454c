"""The `detris` command: a thin dispatcher. Each subcommand lives with the package it serves."""

import sys

USAGE = """usage: detris <command> [options]

commands:
  convert    convert an official DETRIS .pth checkpoint to a transformers folder (modeling_detris.convert_original)
  provenance compare a base folder's frozen backbones with the public DINOv2 / CLIP weights (modeling_detris.provenance)
  info       parameter counts of a preset or a saved model (modeling_detris.info)
  data       build datasets: refer | hub | custom | refshapes | cache (training.data.cli)
  train      train adapters + head with accelerate (training.train)
  eval       official evaluation: mIoU / oIoU / Pr@X tables and prediction grids (training.evaluation)
  demo       the end-to-end demo run by `make demo` (training.demo)
  bench      throughput, memory and FLOP utilisation on this machine, CPU or CUDA (benchmarks.bench_model)
  reproduce  convert the official checkpoints, evaluate them on RefCOCO/+/G-Ref, compare with the paper (training.reproduce)
  card       write the model card (README.md) of a model or adapter folder (hub_card.card)
  export     write a Hub-ready folder: weights, processor, remote code, card (hub_card.export)
  push       export and upload a folder to the Hub (hub_card.push)
  predict    segment images for referring expressions, write overlays and masks (hub_card.predict)
  space      write a ready Hugging Face Space (Gradio demo page) for a model (hub_card.space)
  app        serve the Space's demo page locally (hub_card.space)

`detris <command> --help` shows a command's options.
"""


def _save_processor(output_dir, config):
    """Write the processor beside a converted model, with the model's text length and input size."""
    from processing_detris.processing_detris import save_processor

    save_processor(str(output_dir), config=config)


def _convert(argv):
    from modeling_detris.convert_original import main

    return main(argv, save_extras=_save_processor)


def _info(argv):
    from modeling_detris.info import main

    return main(argv)


def _data(argv):
    from training.data.cli import main

    return main(argv)


def _train(argv):
    from training.train import main

    return main(argv)


def _eval(argv):
    from training.evaluation import main

    return main(argv)


def _demo(argv):
    from training.demo import main

    return main(argv)


def _provenance(argv):
    from modeling_detris.provenance import main

    return main(argv)


def _reproduce(argv):
    from training.reproduce import main

    return main(argv)


def _hub(name):
    def run(argv):
        from importlib import import_module

        return import_module(f"hub_card.{name}").main(argv)

    return run


COMMANDS = {"convert": _convert, "info": _info, "data": _data, "train": _train, "eval": _eval, "demo": _demo}
COMMANDS.update({"provenance": _provenance, "reproduce": _reproduce})
COMMANDS.update({name: _hub(name) for name in ("card", "export", "push", "predict", "space")})


def _app(argv):
    from hub_card.space import app_main

    return app_main(argv)


COMMANDS["app"] = _app


def _bench(argv):
    try:
        from benchmarks.bench_model import main
    except ModuleNotFoundError as exc:  # an editable install made before `benchmarks` was packaged
        if exc.name != "benchmarks":
            raise
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from benchmarks.bench_model import main
    return main(argv)


COMMANDS["bench"] = _bench


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"detris: unknown command {command!r}; expected one of {sorted(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[command](rest) or 0


if __name__ == "__main__":
    sys.exit(main())
