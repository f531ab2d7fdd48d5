"""``pvt-export``: a PVTv2 backbone or classifier to a torch.export program (.pt2) and/or ONNX, verified at a second
size against the eager model.

    pvt-export --variant b2 --weights pvt_v2_b2.pth --out exports/pvt_v2_b2 --format both
    pvt-export --variant b2_li --format onnx --static-size --size 224x224 --verify-size 224x224:2

The sizes are checked before anything is exported: both at least the model's smallest input, --verify-size at least
64x64 with a dynamic size (torch.export needs every stage map of the dynamic range to be at least 2), and equal to
--size where --static-size/--static-batch fix it. Each file is written under a temporary name, verified there and only
then renamed onto its path: a file that fails its verification never appears (an older file there stays as it was).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..checks import check_float
from ..config import VARIANTS
from ..export import (
    DEFAULT_MIN_SIZE,
    Verification,
    check_export_sizes,
    check_onnx_exportable,
    export_program,
    export_verified_onnx,
    save_verified_program,
)
from ..registry import create_model
from .arguments import ImageSize, image_size_argument
from .runner import UsageError, command_parser, entry_point, in_flags

__all__ = ["build_parser", "main", "run"]

# The export library's parameter names, as this command spells them.
_FLAGS = {
    "example": "--size",
    "verify_input": "--verify-size",
    "atol": "--atol",
    "dynamic_height=False and dynamic_width=False": "--static-size",
    "dynamic_batch=False": "--static-batch",
    "export_program": "--format pt2",
}


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = command_parser(__doc__)
    parser.add_argument("--variant", default="b2", choices=sorted(VARIANTS))
    parser.add_argument("--model", default="backbone", choices=("backbone", "classifier"))
    parser.add_argument("--weights", help="checkpoint in any supported layout (default: random initialisation)")
    parser.add_argument("--out", required=True, help="output path without suffix; .pt2 / .onnx are appended")
    parser.add_argument("--format", default="both", choices=("pt2", "onnx", "both"))
    parser.add_argument("--size", type=image_size_argument, default=ImageSize(224, 224), help="example HxW[:batch]")
    parser.add_argument(
        "--verify-size",
        type=image_size_argument,
        default=ImageSize(256, 320, 2),
        help=f"second HxW[:batch] (at least {DEFAULT_MIN_SIZE}x{DEFAULT_MIN_SIZE} unless --static-size)",
    )
    parser.add_argument("--static-size", action="store_true", help="fixed height/width (needed for b2_li in ONNX)")
    parser.add_argument("--static-batch", action="store_true", help="fixed batch size")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest |export - eager| a verification accepts")
    return parser


def _images(size: ImageSize) -> torch.Tensor:
    return torch.randn(size.batch, 3, size.height, size.width)


def _check_sizes(args: argparse.Namespace, model: nn.Module, example: torch.Tensor, check: torch.Tensor) -> None:
    """Everything that would make an export or its verification fail, before either runs (:class:`UsageError`)."""
    try:
        check_float("atol", args.atol, minimum=0.0)
        check_export_sizes(model, example, check, **_dynamic(args))
        if args.format in ("onnx", "both"):
            check_onnx_exportable(
                model, example, dynamic_height=not args.static_size, dynamic_width=not args.static_size
            )
    except ValueError as error:
        raise UsageError(in_flags(str(error), _FLAGS)) from None


def _dynamic(args: argparse.Namespace) -> dict[str, bool]:
    return {
        "dynamic_batch": not args.static_batch,
        "dynamic_height": not args.static_size,
        "dynamic_width": not args.static_size,
    }


def _report(path: Path, against: str, result: Verification) -> None:
    verdict = "" if result.ok else f", above --atol {result.atol:g}: not written"
    print(f"{path}: max |{against} - eager| = {result.max_abs_diff:.2e} at {result.input_shape}{verdict}")


def main(argv: Sequence[str] | None = None) -> int:
    """Export, verify, print one line per file; exit 1 if a verification exceeds ``--atol`` (that file not written)."""
    args = build_parser().parse_args(argv)
    name = f"pvt_v2_{args.variant}" + ("_backbone" if args.model == "backbone" else "")
    model = create_model(name, weights=args.weights).eval()
    example, check = _images(args.size), _images(args.verify_size)
    _check_sizes(args, model, example, check)
    out = Path(args.out)
    failed: list[str] = []
    if args.format in ("pt2", "both"):
        program = export_program(model, example, **_dynamic(args))
        path = out.with_suffix(".pt2")
        result = save_verified_program(program, path, model, check, atol=args.atol)
        _report(path, "export", result)
        failed += [] if result.ok else [str(path)]
    if args.format in ("onnx", "both"):
        path = out.with_suffix(".onnx")
        result = export_verified_onnx(model, example, check, path, atol=args.atol, **_dynamic(args))
        _report(path, "onnxruntime", result)
        failed += [] if result.ok else [str(path)]
    if failed:
        raise ValueError(
            f"verification failed: {', '.join(failed)} differ(s) from the eager model by more than --atol "
            f"{args.atol:g}, so nothing was written there"
        )
    return 0


run = entry_point(main)

if __name__ == "__main__":
    run()
