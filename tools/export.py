"""Export a PVTv2 backbone or classifier to a torch.export program (.pt2) and/or ONNX, verified at a second size.

Example:
    python tools/export.py --variant b2 --weights pvt_v2_b2.pth --out exports/pvt_v2_b2 --format both
    python tools/export.py --variant b2_li --format onnx --static-size --size 224x224 --verify-size 224x224:2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.harness import parse_case
from pvt_backbone import PVTv2Backbone, build_classifier
from pvt_backbone.config import VARIANTS
from pvt_backbone.export import export_onnx, export_program, save_program, verify_onnx, verify_program


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="b2", choices=sorted(VARIANTS))
    parser.add_argument("--model", default="backbone", choices=("backbone", "classifier"))
    parser.add_argument("--weights", help="checkpoint in any supported layout (default: random initialisation)")
    parser.add_argument("--out", required=True, help="output path without suffix; .pt2 / .onnx are appended")
    parser.add_argument("--format", default="both", choices=("pt2", "onnx", "both"))
    parser.add_argument("--size", type=parse_case, default=parse_case("224x224:1"), help="example HxW[:batch]")
    parser.add_argument("--verify-size", type=parse_case, default=parse_case("256x320:2"), help="second HxW[:batch]")
    parser.add_argument("--static-size", action="store_true", help="fixed height/width (needed for b2_li in ONNX)")
    parser.add_argument("--static-batch", action="store_true", help="fixed batch size")
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args(argv)

    try:
        if args.model == "backbone":
            model = PVTv2Backbone(args.variant)
        else:
            model = build_classifier(args.variant)
        if args.weights:
            from pvt_backbone.weights import load_weights

            load_weights(model, args.weights)
        model.eval()
        example = torch.randn(args.size.batch, 3, args.size.height, args.size.width)
        check = torch.randn(args.verify_size.batch, 3, args.verify_size.height, args.verify_size.width)
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
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"export: {error}", file=sys.stderr)
        return 1
    if failed:
        print(f"export: verification failed (atol {args.atol})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
