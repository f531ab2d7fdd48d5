#!/usr/bin/env python
"""Predict with a trained checkpoint on an image, a folder or a glob; write pictures (boxes, masks, labels drawn with
torchvision.utils) and optionally a JSON of the detections.

    python tools/predict.py --checkpoint runs/demo --input photo.jpg --output-dir preds
    python tools/predict.py --checkpoint runs/demo --input "data/val/*.jpg" --output-dir preds --json
    python tools/predict.py --checkpoint runs/seg --input data/val_images --output-dir preds   # also <name>_mask.png

Each input x.jpg gives <output-dir>/x.png; --json writes <output-dir>/predictions.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pvt_backbone.cli.common import run_cli
from pvt_backbone.training.checkpoint import atomic_write
from pvt_backbone.training.data import load_image
from pvt_backbone.training.distributed import setup_distributed
from pvt_backbone.training.inference import SegmentationMap, draw, find_images, load_trained, predict


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or model.safetensors")
    parser.add_argument("--input", required=True, help="image file, folder of images, or glob pattern (quote it)")
    parser.add_argument("--output-dir", required=True, help="pictures (and predictions.json) go here")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this")
    parser.add_argument("--json", action="store_true", help="also write predictions.json")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser


def _save_png(array: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda temp: Image.fromarray(array).save(temp, format="PNG"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.score_threshold <= 1.0:
        raise ValueError(f"--score-threshold must lie in [0, 1], got {args.score_threshold}")
    images = find_images(args.input)
    model, spec = load_trained(args.checkpoint, device=setup_distributed(args.device).device)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for path in images:
        image = load_image(path)
        prediction = predict(model, spec, image, score_threshold=args.score_threshold)
        picture = draw(image, prediction).permute(1, 2, 0).numpy()
        _save_png(picture, output_dir / f"{path.stem}.png")
        record = {"file": str(path), "width": image.shape[-1], "height": image.shape[-2]}
        if isinstance(prediction, SegmentationMap):
            _save_png(prediction.classes.numpy().astype(np.uint8), output_dir / f"{path.stem}_mask.png")
            record["class_pixels"] = prediction.to_json()
        else:
            record["detections"] = prediction.to_json(spec.category_ids)
        records.append(record)
        what = f"{len(record['detections'])} detections" if "detections" in record else "segmentation"
        print(f"{path} -> {output_dir / (path.stem + '.png')} ({what})")
    if args.json:
        text = json.dumps({"checkpoint": str(args.checkpoint), "task": spec.task, "images": records}, indent=2)
        atomic_write(output_dir / "predictions.json", lambda temp: temp.write_text(text + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
