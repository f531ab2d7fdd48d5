"""Evaluate a trained checkpoint: COCO mAP (bbox, segm, keypoints) for detectors, mIoU and pixel accuracy for
segmenters.

    pvt-evaluate --checkpoint runs/x                      # the run's own validation data
    pvt-evaluate --checkpoint runs/x --dataset coco --val-images data/val --val-annotations val.json
    pvt-evaluate --checkpoint runs/seg --dataset folder --val-images img --val-masks masks --json m.json
    pvt-evaluate --checkpoint runs/demo --runtime openvino --exported exports/demo.int8.xml --exported-size 96x96

--checkpoint takes a run directory (its latest checkpoint), a checkpoint directory or its model.safetensors, or a
published detector file (an mmdet checkpoint, --trust-pickle if its pickle needs code, or what pvt-convert --to
detector wrote), which has no run of its own: pass --dataset coco with the validation images and annotations (the
annotations' classes must be the file's, in order; COCO's 80 give COCO's category ids). It runs at mmdet's test scale.
Under torchrun every process evaluates a shard of the images. The metrics go to stdout as JSON (detectors: also AP
per class name, "<iou type>_per_class"; classes without ground truth are left out); a per-class table (AP per IoU
type, or IoU per class id) goes to stderr. A mask folder's class ids are named as in the checkpoint's run.json.

--runtime onnxruntime|openvino|torch scores the checkpoint's whole-model export (pvt-export --checkpoint RUN --to
onnx|openvino|pt2, fp32 or --int8) instead of the eager model, with the same metric code and data: as in
pvt-predict, each image is fitted into --exported-size keeping its aspect ratio (padded at the bottom and right as
the eager detector pads) and the detections are mapped back to its pixels; segmenters (--seg-protocol square) see
the image resized to --exported-size, their logits resized back. An fp32 export at the size the eager model
resizes to scores what the eager model does (images that need padding come close), so the difference to an INT8
export measures what quantization costs. The JSON then also names "runtime" and "exported".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checks import check_int
from ..training.checkpoint import resolve_checkpoint
from ..training.distributed import DEVICES, cleanup_distributed, setup_distributed
from ..training.inference import load_trained
from ..training.tasks import DataSpec, ModelSpec, build_datasets, check_same_classes, evaluate
from ..weights.detectors import is_detector_file
from ..weights.io import atomic_write
from .common import (
    add_data_arguments,
    add_runtime_arguments,
    add_threads_argument,
    apply_threads,
    check_data_arguments,
    check_runtime_arguments,
    data_spec_from_args,
    exported_model,
)
from .convert import LOADING_FLAGS, worded_in_flags
from .runner import UsageError, command_parser, entry_point, flag_names, in_flags

__all__ = ["build_parser", "per_class_table", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The ``pvt-evaluate`` command line; ``--dataset`` left out means the checkpoint's own validation data."""
    parser = command_parser(__doc__)
    parser.add_argument(
        "--checkpoint", required=True, help="run directory, checkpoint directory, model.safetensors or detector file"
    )
    parser.add_argument("--trust-pickle", action="store_true", help="allow a detector .pth pickle that needs code")
    add_data_arguments(parser, train=False)
    parser.set_defaults(dataset=None, val_size=None)
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (detectors)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (fp16 on GPU, bf16 on CPU)")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--json", metavar="PATH", help="also write the metrics to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_arguments(parser)
    add_threads_argument(parser)
    return parser


def _data_spec(args: argparse.Namespace, spec: ModelSpec) -> DataSpec:
    """The flags' data, or (no ``--dataset``) the validation data of the run that wrote the checkpoint."""
    if args.dataset is None:
        saved = resolve_checkpoint(args.checkpoint).run_info().get("data", {})
        return DataSpec(**{**saved, **({"val_size": args.val_size} if args.val_size is not None else {})})
    data = data_spec_from_args(args)
    if data.kind == "synthetic" and args.image_size is None:  # the scenes the model was trained on
        data = DataSpec(**{**data.to_dict(), "image_size": spec.image_size})
    return data


def _validation_set(args: argparse.Namespace, spec: ModelSpec) -> Any:
    data = _data_spec(args, spec)
    if data.kind == "folder":  # mask ids are counted and named by the model (its run.json), not by a names file
        data = dataclasses.replace(data, class_names_file=None, num_classes=data.num_classes or spec.num_classes)
    _, dataset = build_datasets(data, spec.task, train=False)
    if dataset is None:  # only a run trained without validation paths gets here: the flags' data has them
        raise ValueError(
            f"{args.checkpoint}: no validation data: its run had none; pass --dataset {data.kind} with --val-images "
            f"and {'--val-annotations' if data.kind == 'coco' else '--val-masks'}"
        )
    if data.kind == "folder" and dataset.num_classes == spec.num_classes:
        dataset.classes = spec.class_names
    check_same_classes(spec, dataset.classes if spec.task == "segmentation" else dataset.categories)
    return dataset


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def per_class_table(spec: ModelSpec, metrics: dict[str, Any]) -> str:
    """The per-class metrics as a text table, one row per class name: a segmenter's IoU per class id, a detector's
    AP per IoU type (``"-"``: no ground truth of that class, or no pixel of it in target or prediction).

    Example:
        >>> spec = ModelSpec("detection", "fasterrcnn", "b0", 3, 64, ("circle", "square"))
        >>> print(per_class_table(spec, {"bbox_mAP": 0.5, "bbox_per_class": {"circle": 1.0, "square": 0.0}}))
        class   bbox AP
        circle   1.0000
        square   0.0000
    """
    if spec.task == "segmentation":
        iou = metrics.get("iou", [])  # one value per class id, or already keyed by class name
        columns = {"IoU": iou if isinstance(iou, dict) else dict(zip(spec.class_names, iou))}
    else:
        columns = {
            f"{key[: -len('_per_class')]} AP": value for key, value in metrics.items() if key.endswith("_per_class")
        }
    rows = [["class", *columns]]
    rows += [[name, *(_cell(column.get(name)) for column in columns.values())] for name in spec.class_names]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _report(args: argparse.Namespace, spec: ModelSpec, images: int, metrics: dict[str, Any]) -> None:
    result = {"checkpoint": str(args.checkpoint), "task": spec.task, "model": spec.model, "images": images}
    if args.runtime != "eager":
        result.update(runtime=args.runtime, exported=str(args.exported))
    text = json.dumps({**result, "metrics": metrics}, indent=2)
    print(text)
    print(per_class_table(spec, metrics), file=sys.stderr)  # stdout stays one JSON document
    if args.json:
        atomic_write(Path(args.json), lambda temp: temp.write_text(text + "\n"))


def _check_command_line(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The counts a run needs, checked before the model loads; a bad one is a usage error worded with its flag."""
    if args.dataset is not None:
        check_data_arguments(args, train=False, require_val=True)
    elif Path(args.checkpoint).is_file() and is_detector_file(args.checkpoint, trust_pickle=args.trust_pickle):
        raise UsageError(f"--checkpoint {args.checkpoint} is a detector file, with no run's own data: pass --dataset")
    if args.amp and args.runtime != "eager":
        raise UsageError(
            f"--amp runs the eager model in mixed precision; it does not apply to --runtime {args.runtime}"
        )
    check_runtime_arguments(args)
    try:
        check_int("batch_size", args.batch_size, minimum=1)
        if args.val_size is not None:
            check_int("val_size", args.val_size, minimum=1)
    except ValueError as error:
        raise UsageError(in_flags(str(error), flag_names(parser))) from None


def _check_exported_protocol(args: argparse.Namespace, dataset: Any) -> None:
    """An export takes one fixed size: a keep-ratio segmentation protocol (rescale, slide windows) cannot run on it."""
    if args.runtime != "eager" and getattr(dataset, "inference", None) is not None:
        raise UsageError(
            f"--runtime {args.runtime} evaluates segmenters with --seg-protocol square only (an export takes one "
            "fixed size); this evaluation uses keep_ratio"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``pvt-evaluate``: print the metrics as JSON (rank 0 only) and optionally write them to ``--json``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    _check_command_line(args, parser)
    info = setup_distributed(args.device)
    try:
        with worded_in_flags(LOADING_FLAGS):
            model, spec = load_trained(args.checkpoint, device=info.device, trust_pickle=args.trust_pickle)
        model = exported_model(args, model, spec)
        dataset = _validation_set(args, spec)
        _check_exported_protocol(args, dataset)
        metrics = evaluate(
            model,
            dataset,
            spec,
            device=info.device,
            batch_size=args.batch_size,
            amp=args.amp,
            progress=info.is_main and not args.no_progress,
        )
    finally:
        cleanup_distributed()
    if info.is_main:
        _report(args, spec, len(dataset), metrics)
    return 0


run = entry_point(main)

if __name__ == "__main__":
    run()
