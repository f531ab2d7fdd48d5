"""``pvt-export``: a PVTv2 backbone or classifier to a torch.export program (.pt2) and/or ONNX, verified at a second
size against the eager model.

    pvt-export --variant b2 --weights pvt_v2_b2.pth --out exports/pvt_v2_b2 --format both
    pvt-export --variant b2_li --format onnx --static-size --size 224x224 --verify-size 224x224:2
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import VARIANTS
from ..export import export_onnx, export_program, save_program, verify_onnx, verify_program
from ..registry import create_model
from .arguments import ImageSize, image_size_argument
from .runner import command_parser, entry_point

__all__ = ["build_parser", "main", "run"]


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
        "--verify-size", type=image_size_argument, default=ImageSize(256, 320, 2), help="second HxW[:batch]"
    )
    parser.add_argument("--static-size", action="store_true", help="fixed height/width (needed for b2_li in ONNX)")
    parser.add_argument("--static-batch", action="store_true", help="fixed batch size")
    parser.add_argument("--atol", type=float, default=1e-4)
    return parser


def _images(size: ImageSize) -> torch.Tensor:
    return torch.randn(size.batch, 3, size.height, size.width)


def main(argv: Sequence[str] | None = None) -> int:
    """Export, verify, print one line per file; exit 1 if a verification exceeds ``--atol``."""
    args = build_parser().parse_args(argv)
    name = f"pvt_v2_{args.variant}" + ("_backbone" if args.model == "backbone" else "")
    model = create_model(name, weights=args.weights).eval()
    example, check = _images(args.size), _images(args.verify_size)
    dynamic = {
        "dynamic_batch": not args.static_batch,
        "dynamic_height": not args.static_size,
        "dynamic_width": not args.static_size,
    }
    out = Path(args.out)
    failed = False
    if args.format in ("pt2", "both"):
        program = export_program(model, example, **dynamic)
        path = save_program(program, out.with_suffix(".pt2"))
        result = verify_program(program, model, check, atol=args.atol)
        failed |= not result.ok
        print(f"{path}: max |export - eager| = {result.max_abs_diff:.2e} at {result.input_shape}")
    if args.format in ("onnx", "both"):
        path = export_onnx(model, example, out.with_suffix(".onnx"), **dynamic)
        result = verify_onnx(path, model, check, atol=args.atol)
        failed |= not result.ok
        print(f"{path}: max |onnxruntime - eager| = {result.max_abs_diff:.2e} at {result.input_shape}")
    if failed:
        raise ValueError(f"verification failed: the exported model differs from eager by more than atol={args.atol}")
    return 0


run = entry_point(main)

if __name__ == "__main__":
    run()
