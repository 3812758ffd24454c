"""``detris data ...`` subcommands.

Hook into the ``detris`` dispatcher (training/cli.py) with::

    from training.data.cli import add_data_subcommands
    add_data_subcommands(subparsers)            # adds "data" with refer / hub / custom / refshapes / cache
    args = parser.parse_args(argv); return args.func(args)

or run ``python -m training.data.cli refer --dataset refcoco ...`` (:func:`main`).
Every builder saves with ``save_to_disk`` into a staging folder and renames it
(``configuration_detris.folders.atomic_folder``), so a failure never leaves a half-written ``--output``, and a staging folder left by a killed run is removed by the
next one. An ``--output`` that is, contains or lies inside an input folder is refused. Mistakes in the inputs
(missing files, corrupt annotations) end in one line and exit code 2.
"""

from __future__ import annotations

import argparse
import pickle
import sys

__all__ = ["add_data_subcommands", "build_parser", "main"]

# user mistakes (a bad path, a corrupt annotation, an existing --output): one line, exit code 2. CorruptAnnotationError,
# UnsafePickleError (an UnpicklingError) and the JSON / Unicode decode errors are ValueErrors or handled as such.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               pickle.UnpicklingError)


def _common_output(p):
    p.add_argument("--output", required=True, help="folder for save_to_disk (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--image-mode", choices=("path", "bytes"), default="path",
                   help="store absolute image paths (default) or embed the image bytes")
    p.add_argument("--sentence-level", action="store_true",
                   help="also save the one-row-per-expression view under OUTPUT/sentences")
    p.add_argument("--no-progress", action="store_true")


def _check_output(args, **inputs):
    from training.folders import check_not_inside

    check_not_inside(args.output, inputs)


def _finish(dd, args):
    from .rows import save_atomic
    from .schema import to_sentence_level

    extra = {"sentences": to_sentence_level(dd)} if args.sentence_level else None
    save_atomic(dd, args.output, overwrite=args.overwrite, extra=extra)
    print(f"saved {args.output}: " + ", ".join(f"{k} {len(v)} refs / {sum(map(len, v['sentences']))} sentences"
                                               for k, v in dd.items()))
    return 0


def _run_refer(args):
    _check_output(args, **{"--refer-root": args.refer_root, "--images-root": args.images_root})
    from .refer import build_mixed_dataset, build_refer_dataset

    kw = dict(image_mode=args.image_mode, check_images=not args.no_check_images,
              check_counts={"auto": "auto", "yes": True, "no": False}[args.check_counts], progress=not args.no_progress)
    if args.dataset == "mixed":
        dd = build_mixed_dataset(args.refer_root, args.images_root, **kw)
    else:
        dd = build_refer_dataset(args.refer_root, args.images_root, args.dataset, args.split_by,
                                 refs_sha256=args.refs_sha256, **kw)
    return _finish(dd, args)


def _run_hub(args):
    _check_output(args, **{"--images-root": args.images_root})
    from .hub import load_refer_from_hub

    dd = load_refer_from_hub(args.dataset, args.images_root, repo_id=args.repo_id, data_files=args.data_files,
                             image_mode=args.image_mode, check_images=not args.no_check_images,
                             progress=not args.no_progress)
    return _finish(dd, args)


def _run_custom(args):
    _check_output(args, **{"--root": args.root})
    from .custom import load_custom_folder

    dd = load_custom_folder(args.root, dataset_name=args.name, image_mode=args.image_mode,
                            progress=not args.no_progress, allow_absolute_paths=args.allow_absolute_paths)
    return _finish(dd, args)


def add_refshapes_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--output", required=True, help="folder for save_to_disk (written atomically)")
    p.add_argument("--seed", type=int, default=0, help="same seed and sizes -> the same dataset, byte for byte")
    p.add_argument("--image-size", type=int, default=128, help="side of the square images, pixels (>= 32)")
    p.add_argument("--n-train", type=int, default=2000, help="scenes in the train split")
    p.add_argument("--n-validation", type=int, default=250, help="scenes in the validation split")
    p.add_argument("--n-test", type=int, default=250,
                   help="scenes in the test split (colour/kind pairs never seen in training)")
    p.add_argument("--num-proc", type=int, default=1, help="processes generating scenes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true")
    return p


def _run_refshapes(args):
    import time

    from .refshapes import RefShapesConfig, build_refshapes, text_blind_baseline
    from .rows import save_atomic

    started = time.perf_counter()
    cfg = RefShapesConfig(seed=args.seed, image_size=args.image_size, n_train=args.n_train,
                          n_validation=args.n_validation, n_test=args.n_test)
    dd = build_refshapes(cfg, num_proc=args.num_proc, progress=not getattr(args, "no_progress", False))
    seconds = time.perf_counter() - started
    save_atomic(dd, args.output, overwrite=args.overwrite)
    print(f"RefShapes: {', '.join(f'{k} {len(v)} refs' for k, v in dd.items())}; generated in {seconds:.1f} s -> {args.output}")
    for split in ("validation", "test"):
        if split in dd:
            b = text_blind_baseline(dd[split])
            print(f"text-blind baseline ({split}): " + ", ".join(
                f"{k} mIoU {b[k]['mIoU']:.3f} oIoU {b[k]['oIoU']:.3f}" for k in ("all_shapes", "largest_shape", "random_shape")))
    return 0


def _run_cache(args):
    _check_output(args, **{"--dataset-dir": args.dataset_dir})
    import datasets

    from .cache import build_letterbox_cache

    dd = datasets.load_from_disk(args.dataset_dir)
    ds = dd[args.split] if isinstance(dd, datasets.DatasetDict) else dd
    processor = None
    if args.processor:
        from processing_detris import DetrisProcessor

        processor = DetrisProcessor.from_pretrained(args.processor)
    build_letterbox_cache(ds, args.output, processor=processor, size=args.size, overwrite=args.overwrite,
                          progress=not args.no_progress)
    print(f"cache written to {args.output} ({len(ds)} rows)")
    return 0


def _add_refer(sub):
    p = sub.add_parser("refer", help="RefCOCO / RefCOCO+ / RefCOCOg / mixed from the refer files + COCO train2014")
    p.add_argument("--dataset", required=True, choices=("refcoco", "refcoco+", "refcocog", "mixed"))
    p.add_argument("--split-by", choices=("unc", "umd", "google"), default=None,
                   help="default: unc for refcoco/refcoco+, umd for refcocog (mixed ignores it)")
    p.add_argument("--refer-root", required=True, help="folder holding refcoco/, refcoco+/, refcocog/")
    p.add_argument("--images-root", required=True, help="COCO train2014 folder")
    p.add_argument("--refs-sha256", default=None, help="expected SHA-256 of the refs pickle")
    p.add_argument("--check-counts", choices=("auto", "yes", "no"), default="auto",
                   help="compare split sizes with the official counts (auto: for complete builds)")
    p.add_argument("--no-check-images", action="store_true")
    _common_output(p)
    p.set_defaults(func=_run_refer)
    return p


def add_data_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add ``data`` (with its own subcommands) to an ``argparse`` subparsers object; returns the ``data`` parser."""
    data = subparsers.add_parser("data", help="build datasets (RefCOCO family, custom, RefShapes) and caches")
    sub = data.add_subparsers(dest="data_command", required=True)
    _add_refer(sub)

    p = sub.add_parser("hub", help="RefCOCO family from the jxu124/* parquet repos (or local parquet files)")
    p.add_argument("--dataset", required=True, choices=("refcoco", "refcoco+", "refcocog"))
    p.add_argument("--images-root", required=True, help="COCO train2014 folder")
    p.add_argument("--repo-id", default=None)
    p.add_argument("--data-files", nargs="+", default=None, help="local parquet files (no download)")
    p.add_argument("--no-check-images", action="store_true")
    _common_output(p)
    p.set_defaults(func=_run_hub)

    p = sub.add_parser("custom", help="a custom folder (images + *.jsonl, see docs/data.md)")
    p.add_argument("--root", required=True)
    p.add_argument("--name", default="custom", help="value of the dataset column")
    p.add_argument("--allow-absolute-paths", action="store_true",
                   help="accept absolute image/mask paths in the JSONL (relative paths must stay inside --root)")
    _common_output(p)
    p.set_defaults(func=_run_custom)

    p = sub.add_parser("refshapes", help="generate the synthetic RefShapes dataset",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_refshapes_arguments(p)
    p.set_defaults(func=_run_refshapes)

    p = sub.add_parser("cache", help="letterboxed uint8 cache of a saved dataset split")
    p.add_argument("--dataset-dir", required=True, help="a folder written by save_to_disk")
    p.add_argument("--split", default="train")
    p.add_argument("--output", required=True)
    p.add_argument("--processor", default=None, help="processor folder/repo (pre-tokenises sentences)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_cache)
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detris")
    add_data_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv=None) -> int:
    """``main(["refer", "--dataset", ...])`` == ``detris data refer --dataset ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["data"]:
        argv = ["data"] + argv
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(f"detris data {args.data_command}: {_one_line(error)}", file=sys.stderr)
        return 2


def _one_line(error) -> str:
    text = str(error) if not isinstance(error, FileNotFoundError) or not error.filename else \
        f"{error.filename}: {error.strerror or error}"
    return " ".join(text.split())


if __name__ == "__main__":
    raise SystemExit(main())
