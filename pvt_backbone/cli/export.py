"""``pvt-export``: a PVTv2 backbone, classifier, whole detector or segmenter to a torch.export program (.pt2), ONNX
and/or OpenVINO (fp32, optionally INT8), verified at a second size against the eager model.

    pvt-export --variant b2 --weights pvt_v2_b2.pth --out exports/pvt_v2_b2 --format both
    pvt-export --variant b2 --to openvino --static-size --size 512x512 --verify-size 512x512:2 --out exports/b2_512
    pvt-export --model retinanet --num-classes 91 --size 512x512 --verify-size 640x480 --to onnx --out exports/ret
    pvt-export --to openvino --int8 --calibration synthetic --calibration-size 64 --out exports/pvt_v2_b2
    pvt-export --checkpoint runs/demo --to onnx --size 96x96 --verify-size 96x96:2 --out exports/demo

Whole models (--model retinanet/fcos/fasterrcnn/maskrcnn/segmenter) take RGB images in [0, 1] at the exported size
(heights and widths multiples of 32 for detectors; normalisation is inside) and return fixed-size outputs (boxes,
scores, labels, num_detections [, masks]), with dynamic sizes unless --static-size: from 160 px for RetinaNet and FCOS,
96 px for the R-CNNs, 64 px for segmenters. --to openvino writes <out>.xml/.bin (through ONNX) and, with --int8,
<out>.int8.xml/.bin calibrated on --calibration (a folder of images or "synthetic") and prints its feature cosine
similarity to fp32 on held-out synthetic scenes.

The sizes are checked before anything is exported: both at least the model's smallest input, --verify-size at least
64x64 with a dynamic size (torch.export needs every stage map of the dynamic range to be at least 2), and equal to
--size where --static-size/--static-batch fix it. Each file is written under a temporary name, verified there and only
then renamed onto its path: a file that fails its verification never appears (an older file there stays as it was).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checks import check_float
from ..config import VARIANTS
from ..export import (
    DEFAULT_MIN_SIZE,
    Verification,
    check_export_sizes,
    export_onnx,
    export_program,
    export_verified_onnx,
    save_verified_program,
)
from ..registry import create_model
from ..training.evaluation import normalize_images
from .arguments import ImageSize, image_size_argument
from .runner import UsageError, command_parser, entry_point, in_flags

__all__ = ["build_parser", "main", "run"]

# The export library's parameter names, as this command spells them.
_FLAGS = {
    "example": "--size",
    "verify_input": "--verify-size",
    "atol": "--atol",
    "dynamic_height=False and dynamic_width=False": "--static-size",
    "dynamic_size=False": "--static-size",
    "dynamic_size=True": "dynamic sizes",
    "dynamic_batch=False": "--static-batch",
    "export_program": "--format pt2",
}
FEATURE_MODELS = ("backbone", "classifier")
WHOLE_MODELS = ("retinanet", "fcos", "fasterrcnn", "maskrcnn", "segmenter")
FORMATS = ("pt2", "onnx", "both", "openvino")


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = command_parser(__doc__)
    parser.add_argument("--variant", default="b2", choices=sorted(VARIANTS))
    parser.add_argument("--model", default="backbone", choices=FEATURE_MODELS + WHOLE_MODELS)
    parser.add_argument("--num-classes", type=int, default=None, help="whole models (default 91, segmenter 150)")
    parser.add_argument("--weights", help="checkpoint in any supported layout (default: random initialisation)")
    parser.add_argument(
        "--checkpoint",
        help="a trained run (directory or model.safetensors with its run.json): export its whole model; "
        "replaces --variant, --model, --num-classes and --weights",
    )
    parser.add_argument("--out", required=True, help="output path without suffix; .pt2 / .onnx / .xml are appended")
    parser.add_argument("--format", "--to", dest="format", default="both", choices=FORMATS)
    parser.add_argument("--size", type=image_size_argument, default=ImageSize(224, 224), help="example HxW[:batch]")
    parser.add_argument(
        "--verify-size",
        type=image_size_argument,
        default=ImageSize(256, 320, 2),
        help=f"second HxW[:batch] (at least {DEFAULT_MIN_SIZE}x{DEFAULT_MIN_SIZE} unless --static-size)",
    )
    parser.add_argument(
        "--static-size", action="store_true", help="fixed height/width (OpenVINO runs a static shape faster)"
    )
    parser.add_argument("--static-batch", action="store_true", help="fixed batch size")
    parser.add_argument("--atol", type=float, default=None, help="largest |export - eager| (default 1e-4; 1e-3 whole)")
    parser.add_argument("--int8", action="store_true", help="with --to openvino: also an NNCF INT8 model")
    parser.add_argument("--calibration", default="synthetic", help="image folder or 'synthetic' (for --int8)")
    parser.add_argument("--calibration-size", type=int, default=32, help="calibration images (for --int8)")
    return parser


def _images(size: ImageSize, whole: bool) -> Tensor:
    if whole:  # whole models take RGB in [0, 1]
        return torch.rand(size.batch, 3, size.height, size.width)
    return torch.randn(size.batch, 3, size.height, size.width)


def _check_sizes(args: argparse.Namespace, model: nn.Module, example: Tensor, check: Tensor) -> None:
    """Everything that would make an export or its verification fail, before either runs (:class:`UsageError`)."""
    try:
        check_float("atol", args.atol, minimum=0.0)
        if args.int8 and args.format != "openvino":
            raise ValueError("--int8 needs --to openvino")
        if args.calibration_size < 1:
            raise ValueError(f"--calibration-size must be >= 1, got {args.calibration_size}")
        if args.int8 and args.calibration != "synthetic" and not Path(args.calibration).is_dir():
            raise ValueError(f"--calibration {args.calibration} is neither a folder of images nor 'synthetic'")
        if args.model in WHOLE_MODELS:
            _check_whole_sizes(args, model, example, check)
            return
        check_export_sizes(model, example, check, **_dynamic(args))
    except ValueError as error:
        raise UsageError(in_flags(str(error), _FLAGS)) from None


def _check_whole_sizes(args: argparse.Namespace, model: nn.Module, example: Tensor, check: Tensor) -> None:
    from ..export_models import exportable, min_dynamic_size

    smallest = min_dynamic_size(exportable(model))
    for name, x in (("--size", example), ("--verify-size", check)):
        if args.model != "segmenter" and (x.shape[-2] % 32 or x.shape[-1] % 32):
            raise ValueError(f"{name} {x.shape[-2]}x{x.shape[-1]}: detector sizes must be multiples of 32")
        if not args.static_size and min(x.shape[-2:]) < smallest:
            raise ValueError(
                f"{name} {x.shape[-2]}x{x.shape[-1]} is below {smallest} px, the smallest dynamic size "
                "(--static-size exports at --size only)"
            )
    if args.static_size and check.shape[-2:] != example.shape[-2:]:
        raise ValueError("--verify-size must equal --size with --static-size (the export takes one height and width)")
    if args.static_batch and check.shape[0] != example.shape[0]:
        raise ValueError(f"--verify-size batch {check.shape[0]} differs from --size batch with --static-batch")


def _dynamic(args: argparse.Namespace) -> dict[str, bool]:
    return {
        "dynamic_batch": not args.static_batch,
        "dynamic_height": not args.static_size,
        "dynamic_width": not args.static_size,
    }


def _report(path: Path, against: str, result: Verification) -> None:
    verdict = "" if result.ok else f", above --atol {result.atol:g}: not written"
    print(f"{path}: max |{against} - eager| = {result.max_abs_diff:.2e} at {result.input_shape}{verdict}")


def _trained(args: argparse.Namespace) -> nn.Module:
    """The whole model of ``--checkpoint``; sets ``args.model`` to its kind."""
    from ..export_models import exportable
    from ..training.inference import OneBasedLabels, load_trained

    given = [f"--{name.replace('_', '-')}" for name in ("weights", "num_classes") if getattr(args, name) is not None]
    if given:
        raise UsageError(f"--checkpoint describes the model: leave out {', '.join(given)}")
    model, spec = load_trained(args.checkpoint)
    if isinstance(model, OneBasedLabels):  # a published RetinaNet file: export the detector itself (labels 0..K-1)
        model = model.detector
    args.model = "segmenter" if spec.task == "segmentation" else spec.model
    if args.model not in WHOLE_MODELS:
        raise UsageError(f"--checkpoint holds a {spec.model} model; whole-model export takes {', '.join(WHOLE_MODELS)}")
    return exportable(model.eval())


def _build(args: argparse.Namespace) -> nn.Module:
    if args.checkpoint is not None:
        return _trained(args)
    if args.model in FEATURE_MODELS:
        name = f"pvt_v2_{args.variant}" + ("_backbone" if args.model == "backbone" else "")
        return create_model(name, weights=args.weights).eval()
    from ..export_models import exportable

    if args.model == "segmenter":
        from ..segmentation import semantic_fpn_pvt_v2

        model: nn.Module = semantic_fpn_pvt_v2(args.variant, num_classes=args.num_classes or 150)
    else:
        from .. import detection

        builder = getattr(detection, f"{args.model}_pvt_v2_fpn")
        model = builder(args.variant, num_classes=args.num_classes or 91)
    if args.weights:
        from ..weights.load import load_model_weights

        load_model_weights(model, args.weights)
    return exportable(model.eval())


def _write_formats(
    args: argparse.Namespace, pt2: Callable[[Path], Verification], onnx: Callable[[Path], Verification]
) -> list[str]:
    """Run the .pt2 and/or .onnx writer ``--format`` selects; returns the paths that failed their verification."""
    out, failed = Path(args.out), []
    for suffix, write, runtime in ((".pt2", pt2, "export"), (".onnx", onnx, "onnxruntime")):
        if args.format in (suffix[1:], "both"):
            path = out.with_suffix(suffix)
            result = write(path)
            _report(path, runtime, result)
            failed += [] if result.ok else [str(path)]
    return failed


def _export_features(args: argparse.Namespace, model: nn.Module, example: Tensor, check: Tensor) -> list[str]:
    """Backbone/classifier: .pt2 and/or .onnx; returns the paths that failed their verification."""
    return _write_formats(
        args,
        lambda path: save_verified_program(
            export_program(model, example, **_dynamic(args)), path, model, check, atol=args.atol
        ),
        lambda path: export_verified_onnx(model, example, check, path, atol=args.atol, **_dynamic(args)),
    )


def _whole_options(args: argparse.Namespace) -> dict[str, bool | None]:
    return {"dynamic_batch": not args.static_batch, "dynamic_size": False if args.static_size else None}


def _export_whole(args: argparse.Namespace, model: nn.Module, example: Tensor, check: Tensor) -> list[str]:
    """Detector/segmenter: .pt2 and/or .onnx of the whole model; returns the paths that failed their verification."""
    from ..export_models import export_model_program, export_verified_model_onnx, save_verified_model_program

    options = _whole_options(args)
    return _write_formats(
        args,
        lambda path: save_verified_model_program(
            export_model_program(model, example, **options), path, model, check, atol=args.atol
        ),
        lambda path: export_verified_model_onnx(model, example, check, path, atol=args.atol, **options),
    )


def _export_openvino(args: argparse.Namespace, model: nn.Module, example: Tensor, check: Tensor) -> list[str]:
    """ONNX in a temporary folder -> OpenVINO fp32 (verified) [-> INT8]; returns the paths that failed."""
    from .. import export_openvino as ov

    whole = args.model in WHOLE_MODELS
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as directory:
        onnx_path = Path(directory) / "model.onnx"
        if whole:
            from ..export_models import export_model_onnx, verify_model_outputs

            export_model_onnx(model, example, onnx_path, **_whole_options(args))
            compare: Callable[..., Verification] | None = lambda _eager, got: verify_model_outputs(  # noqa: E731
                model, check, got, atol=args.atol
            )
        else:
            export_onnx(model, example, onnx_path, **_dynamic(args))
            compare = None
        path = out.with_suffix(".xml")
        result = ov.export_verified_openvino(onnx_path, model, check, path, atol=args.atol, compare=compare)
        _report(path, "openvino", result)
        if not result.ok:
            return [str(path)]
        if args.int8:
            _quantize(args, onnx_path, out, whole, example)
    return []


def _quantize(args: argparse.Namespace, onnx_path: Path, out: Path, whole: bool, example: Tensor) -> None:
    from .. import export_openvino as ov

    size = tuple(example.shape[-2:])
    try:
        images = ov.calibration_images(args.calibration, args.calibration_size, size)
    except FileNotFoundError as error:
        raise UsageError(f"--calibration: {error}") from None
    preprocess = None if whole else normalize_images
    quantized = ov.quantize_openvino(ov.convert_openvino(onnx_path), images, preprocess=preprocess)
    path = ov.save_openvino(quantized, out.with_suffix(".int8.xml"))
    held_out = ov.calibration_images(ov.SYNTHETIC, 8, size, split="val")
    held_out = held_out if whole else normalize_images(held_out)
    fp32, int8 = ov.compile_openvino(out.with_suffix(".xml")), ov.compile_openvino(quantized)
    cosine = ov.feature_cosine(lambda x: ov.run_openvino(fp32, x), lambda x: ov.run_openvino(int8, x), held_out)
    print(
        f"{path}: INT8 ({len(images)} calibration images), output cosine similarity to fp32 = {cosine:.4f} "
        f"on {len(held_out)} held-out synthetic images"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Export, verify, print one line per file; exit 1 if a verification exceeds ``--atol`` (that file not written)."""
    args = build_parser().parse_args(argv)
    model = _build(args)
    whole = args.model in WHOLE_MODELS
    if args.atol is None:
        args.atol = 1e-3 if whole else 1e-4
    example, check = _images(args.size, whole), _images(args.verify_size, whole)
    _check_sizes(args, model, example, check)
    if args.format == "openvino":
        failed = _export_openvino(args, model, example, check)
    else:
        failed = (_export_whole if whole else _export_features)(args, model, example, check)
    if failed:
        raise ValueError(
            f"verification failed: {', '.join(failed)} differ(s) from the eager model by more than --atol "
            f"{args.atol:g}, so nothing was written there"
        )
    return 0


run = entry_point(main)

if __name__ == "__main__":
    run()
