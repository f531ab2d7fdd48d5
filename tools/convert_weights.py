"""Convert a PVTv2 checkpoint between layouts, or inspect one.

Usage:
    python tools/convert_weights.py INPUT OUTPUT [--from auto|timm|pvt|hf|mmdet|lucid]
        [--to backbone|classifier|timm|pvt|hf|mmdet|lucid] [--variant NAME] [--dtype float32|float16|bfloat16]
        [--trust-pickle]
    python tools/convert_weights.py --inspect FILE [--from ...] [--variant NAME] [--trust-pickle]

OUTPUT is a .safetensors file, written atomically. All logic lives in ``pvt_backbone.weights``.
"""

from __future__ import annotations

import argparse
import sys

from pvt_backbone import VARIANTS
from pvt_backbone.weights import CONVERT_TARGETS, DTYPES, convert_checkpoint, inspect_checkpoint

SOURCES = ("auto", "timm", "timm_features", "pvt", "hf", "mmdet", "lucid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_weights.py",
        description="Convert a PVTv2 checkpoint (timm, authors' .pth, transformers, mmdet, lucid) to safetensors "
        "in any of those layouts, or --inspect one.",
    )
    parser.add_argument("input", nargs="?", metavar="INPUT", help="checkpoint file, save_pretrained dir or hf-hub:REPO")
    parser.add_argument("output", nargs="?", metavar="OUTPUT", help="output .safetensors file")
    parser.add_argument("--from", dest="source", default="auto", choices=SOURCES, help="input layout (default: auto)")
    parser.add_argument("--to", default="backbone", choices=CONVERT_TARGETS, help="output layout (default: backbone)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="require exactly this variant's keys and shapes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors of the output")
    parser.add_argument("--trust-pickle", action="store_true", help="allow pickles that need code (trusted files only)")
    parser.add_argument("--inspect", metavar="FILE", help="print layout, variant, parameter count and head size")
    args = parser.parse_args(argv)
    if args.inspect is not None and (args.input is not None or args.output is not None):
        parser.error("--inspect FILE takes no INPUT/OUTPUT")
    if args.inspect is None and (args.input is None or args.output is None):
        parser.error("INPUT and OUTPUT are required (or use --inspect FILE)")

    try:
        if args.inspect is not None:
            info = inspect_checkpoint(
                args.inspect, layout=args.source, variant=args.variant, trust_pickle=args.trust_pickle
            )
            print(info.format())
        else:
            report = convert_checkpoint(
                args.input,
                args.output,
                from_layout=args.source,
                to=args.to,
                variant=args.variant,
                dtype=args.dtype,
                trust_pickle=args.trust_pickle,
            )
            print(report.format())
    except Exception as exc:  # any failure: a short message and a non-zero status, never a traceback
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
