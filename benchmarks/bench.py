"""`detris bench`: the options are parsed before torch is imported (so `--help` is instant), then the run."""

from benchmarks.options import build_arg_parser


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    from benchmarks.bench_model import run_parsed

    return run_parsed(args)
