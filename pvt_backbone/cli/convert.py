"""``pvt-convert``: convert a PVTv2 checkpoint between key layouts, or inspect one.

Usage:
    pvt-convert INPUT OUTPUT [--from auto|timm|timm_features|pvt|hf|mmdet|lucid]
        [--to backbone|classifier|timm|timm_features|pvt|hf|mmdet|lucid] [--variant NAME]
        [--dtype float32|float16|bfloat16] [--trust-pickle]
    pvt-convert DETECTOR OUTPUT --to detector|mmdet [--variant NAME | --arch-config JSON] [--dtype ...]
        [--trust-pickle]
    pvt-convert --inspect FILE [--from ...] [--variant NAME] [--trust-pickle]

``python tools/convert_weights.py`` runs the same command. OUTPUT is a ``.safetensors`` file, written atomically; the
work is done by ``pvt_backbone.weights.converter``. Exit status (through ``cli.runner.run_command``): 0 done, 1 an
error (one line on stderr), 2 a usage error.

A whole detector (an mmdet RetinaNet / Faster R-CNN / Mask R-CNN checkpoint, or a file ``--to detector`` wrote) is
loaded strictly into its torchvision builder and written whole: ``--to detector`` as ``.safetensors`` with its
architecture, variant, classes and backbone config in the header (what ``weights=``, ``pvt-predict`` and
``pvt-evaluate`` read), ``--to mmdet`` as mmdet's ``.pth`` (``{"meta", "state_dict"}``); other ``--to`` values
take its backbone only. Published detectors have table variants; a custom backbone needs ``--arch-config``, a JSON
object of ``PVTv2Config`` fields (or a file holding one), e.g.
``'{"embed_dims": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "num_heads": [1, 2, 5, 8]}'``; the ``.safetensors``
then carries it. ``--inspect`` of a detector names its architecture, variant, class count and first class names.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..config import VARIANTS, PVTv2Config
from ..weights import DTYPES, LAYOUTS, CheckpointError
from ..weights.converter import (
    CONVERT_TARGETS,
    DETECTOR_TARGETS,
    convert_checkpoint,
    convert_detector,
    inspect_checkpoint,
    inspect_detector,
)
from ..weights.detectors import is_detector_file
from .runner import UsageError, command_parser, entry_point, in_flags

__all__ = ["LOADING_FLAGS", "build_parser", "worded_in_flags", "main", "run"]

_SOURCES = ("auto", *LAYOUTS)
# The library names its Python parameters; this command has flags for them.
_FLAGS = {
    "trust_pickle=True": "--trust-pickle",
    'to="backbone"': "--to backbone",
    'to="classifier"': "--to classifier",
    'to="detector"': "--to detector",
    'to="mmdet"': "--to mmdet",
    "variant=PVTv2Config(...)": "--arch-config JSON",
}


# How pvt-predict / pvt-evaluate word a detector file's load errors: they have --trust-pickle; a custom backbone's
# num_heads reaches them in a converted file.
LOADING_FLAGS = {
    "trust_pickle=True": "--trust-pickle",
    "pass variant=PVTv2Config(...) with its num_heads": "convert it once with pvt-convert --to detector "
    "--arch-config JSON (giving its num_heads) and use that file",
}


@contextmanager
def worded_in_flags(flags: dict[str, str] = _FLAGS) -> Iterator[None]:
    """Re-raise a ``ValueError`` whose message names a parameter ``flags`` words for the command line, so worded."""
    try:
        yield
    except ValueError as error:
        worded = in_flags(str(error), flags)
        if worded == str(error):
            raise
        raise (CheckpointError if isinstance(error, CheckpointError) else ValueError)(worded) from error


def build_parser() -> argparse.ArgumentParser:
    """The ``pvt-convert`` command line: INPUT OUTPUT to convert, or --inspect FILE."""
    parser = command_parser(__doc__)
    parser.add_argument("input", nargs="?", metavar="INPUT", help="checkpoint file, save_pretrained dir or hf-hub:REPO")
    parser.add_argument(
        "output", nargs="?", metavar="OUTPUT", help="output .safetensors file (.pth for a detector --to mmdet)"
    )
    parser.add_argument("--from", dest="source", default="auto", choices=_SOURCES, help="input layout (default: auto)")
    parser.add_argument(
        "--to",
        default="backbone",
        choices=(*CONVERT_TARGETS, *(t for t in DETECTOR_TARGETS if t not in CONVERT_TARGETS)),
        help="output layout (default: backbone); detector: a whole detector as .safetensors, mmdet: (of a detector) "
        "mmdet's .pth",
    )
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="require exactly this variant's keys and shapes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors of the output")
    parser.add_argument("--trust-pickle", action="store_true", help="allow pickles that need code (trusted files only)")
    parser.add_argument(
        "--arch-config",
        metavar="JSON",
        help="a detector's custom backbone: PVTv2Config fields as a JSON object, or a .json file holding one",
    )
    parser.add_argument("--inspect", metavar="FILE", help="print layout, variant, parameter count and head size")
    return parser


def _arch_config(text: str | None) -> PVTv2Config | None:
    """``--arch-config``: a JSON object (inline or in a file) of ``PVTv2Config`` fields; ``UsageError`` if not."""
    if text is None:
        return None
    source = Path(text).read_text() if text.endswith(".json") and Path(text).is_file() else text
    try:
        fields = json.loads(source)
        if not isinstance(fields, dict):
            raise TypeError(f"expected a JSON object, got {type(fields).__name__}")
        return PVTv2Config(**fields)
    except (TypeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        raise UsageError(f"--arch-config: not PVTv2Config fields ({error})") from None


def _detector(args: argparse.Namespace) -> str:
    """Convert a whole detector INPUT (``--to detector`` or ``--to mmdet``) and return the report's text."""
    config = _arch_config(args.arch_config)
    if config is not None and args.variant is not None:
        raise UsageError("pass --variant or --arch-config, not both")
    return convert_detector(
        args.input,
        args.output,
        to=args.to,
        variant=config or args.variant,
        dtype=args.dtype,
        trust_pickle=args.trust_pickle,
    ).format()


def _run(args: argparse.Namespace) -> str:
    """The report of --inspect or of the conversion ``args`` ask for."""
    if args.inspect is not None:
        if is_detector_file(args.inspect, trust_pickle=args.trust_pickle):
            return inspect_detector(args.inspect, trust_pickle=args.trust_pickle).format()
        return inspect_checkpoint(
            args.inspect, layout=args.source, variant=args.variant, trust_pickle=args.trust_pickle
        ).format()
    detector = args.to in DETECTOR_TARGETS and is_detector_file(args.input, trust_pickle=args.trust_pickle)
    if detector:
        return _detector(args)
    if args.to == "detector":
        raise ValueError(f"{args.input} holds no whole detector (mmdet RetinaNet / Faster R-CNN / Mask R-CNN)")
    if args.arch_config is not None:
        raise UsageError("--arch-config applies to whole detectors (--to detector or --to mmdet of a detector)")
    return convert_checkpoint(
        args.input,
        args.output,
        from_layout=args.source,
        to=args.to,
        variant=args.variant,
        dtype=args.dtype,
        trust_pickle=args.trust_pickle,
    ).format()


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
    with worded_in_flags():
        text = _run(args)
    print(in_flags(text, _FLAGS))
    return 0


run = entry_point(main)

if __name__ == "__main__":
    run()
