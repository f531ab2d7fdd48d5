"""``pvt-convert``: convert a PVTv2 checkpoint between key layouts, or inspect one.

Usage:
    pvt-convert INPUT OUTPUT [--from auto|timm|timm_features|pvt|hf|mmdet|lucid]
        [--to backbone|classifier|timm|timm_features|pvt|hf|mmdet|lucid] [--variant NAME]
        [--dtype float32|float16|bfloat16] [--trust-pickle]
    pvt-convert --inspect FILE [--from ...] [--variant NAME] [--trust-pickle]

``python tools/convert_weights.py`` runs the same command. OUTPUT is a ``.safetensors`` file, written atomically; the
work is done by ``pvt_backbone.weights.converter``. Exit status (through ``cli.runner.run_command``): 0 done, 1 an
error (one line on stderr), 2 a usage error.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..config import VARIANTS
from ..weights import DTYPES, LAYOUTS, CheckpointError
from ..weights.converter import CONVERT_TARGETS, convert_checkpoint, inspect_checkpoint
from .runner import command_parser, entry_point, in_flags

__all__ = ["build_parser", "main", "run"]

_SOURCES = ("auto", *LAYOUTS)
# The library names its Python parameters; this command has flags for them.
_FLAGS = {
    "trust_pickle=True": "--trust-pickle",
    'to="backbone"': "--to backbone",
    'to="classifier"': "--to classifier",
}


@contextmanager
def _worded_in_flags() -> Iterator[None]:
    """Re-raise a ``CheckpointError`` whose message names a parameter this command sets with a flag, naming the flag."""
    try:
        yield
    except CheckpointError as error:
        worded = in_flags(str(error), _FLAGS)
        if worded == str(error):
            raise
        raise CheckpointError(worded) from error


def build_parser() -> argparse.ArgumentParser:
    """The ``pvt-convert`` command line: INPUT OUTPUT to convert, or --inspect FILE."""
    parser = command_parser(__doc__)
    parser.add_argument("input", nargs="?", metavar="INPUT", help="checkpoint file, save_pretrained dir or hf-hub:REPO")
    parser.add_argument("output", nargs="?", metavar="OUTPUT", help="output .safetensors file")
    parser.add_argument("--from", dest="source", default="auto", choices=_SOURCES, help="input layout (default: auto)")
    parser.add_argument("--to", default="backbone", choices=CONVERT_TARGETS, help="output layout (default: backbone)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="require exactly this variant's keys and shapes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors of the output")
    parser.add_argument("--trust-pickle", action="store_true", help="allow pickles that need code (trusted files only)")
    parser.add_argument("--inspect", metavar="FILE", help="print layout, variant, parameter count and head size")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Convert INPUT to OUTPUT, or inspect FILE, and print the report; returns 0.

    Library errors (``CheckpointError``, ``FileNotFoundError``, ...) propagate for ``run_command`` to word; usage
    errors exit 2 through argparse.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.inspect is not None and (args.input is not None or args.output is not None):
        parser.error("--inspect FILE takes no INPUT/OUTPUT")
    if args.inspect is None and (args.input is None or args.output is None):
        parser.error("INPUT and OUTPUT are required (or use --inspect FILE)")
    with _worded_in_flags():
        if args.inspect is not None:
            text = inspect_checkpoint(
                args.inspect, layout=args.source, variant=args.variant, trust_pickle=args.trust_pickle
            ).format()
        else:
            text = convert_checkpoint(
                args.input,
                args.output,
                from_layout=args.source,
                to=args.to,
                variant=args.variant,
                dtype=args.dtype,
                trust_pickle=args.trust_pickle,
            ).format()
    print(in_flags(text, _FLAGS))
    return 0


run = entry_point(main)

if __name__ == "__main__":
    run()
