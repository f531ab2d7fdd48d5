#!/usr/bin/env python
"""Evaluate a trained checkpoint: COCO mAP (bbox, segm, keypoints) for detectors, mIoU and pixel accuracy for
segmenters.

    python tools/evaluate.py --checkpoint runs/x                      # the run's own validation data
    python tools/evaluate.py --checkpoint runs/x --dataset coco --val-images data/val --val-annotations val.json
    python tools/evaluate.py --checkpoint runs/seg --dataset folder --val-images img --val-masks masks --json m.json

--checkpoint takes a run directory (its latest checkpoint), a checkpoint directory or its model.safetensors.
Under torchrun every process evaluates a shard of the images.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pvt_backbone.cli.common import add_data_arguments, data_spec_from_args, run_cli
from pvt_backbone.training.checkpoint import atomic_write, resolve_checkpoint
from pvt_backbone.training.distributed import cleanup_distributed, setup_distributed
from pvt_backbone.training.inference import load_trained
from pvt_backbone.training.tasks import DataSpec, build_datasets, check_same_classes, evaluate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or model.safetensors")
    add_data_arguments(parser, train=False)
    parser.set_defaults(dataset=None, val_size=None)
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (detectors)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (fp16 on GPU, bf16 on CPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", metavar="PATH", help="also write the metrics to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    info = setup_distributed(args.device)
    try:
        model, spec = load_trained(args.checkpoint, device=info.device)
        if args.dataset is None:  # the validation data of the run that wrote the checkpoint
            saved = resolve_checkpoint(args.checkpoint).run_info().get("data", {})
            data = DataSpec(**{**saved, **({"val_size": args.val_size} if args.val_size is not None else {})})
        else:
            data = data_spec_from_args(args)
            if data.kind == "synthetic" and args.image_size is None:
                data = DataSpec(**{**data.to_dict(), "image_size": spec.image_size})
        _, dataset = build_datasets(data, spec.task, train=False)
        if dataset is None:
            raise ValueError(
                f"no validation data: dataset {data.kind!r} needs --val-images and "
                f"{'--val-annotations' if data.kind == 'coco' else '--val-masks'}"
            )
        check_same_classes(spec, dataset.classes if spec.task == "segmentation" else dataset.categories)
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
        result = {
            "checkpoint": str(args.checkpoint),
            "task": spec.task,
            "model": spec.model,
            "images": len(dataset),
            "metrics": metrics,
        }
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            atomic_write(Path(args.json), lambda temp: temp.write_text(text + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
