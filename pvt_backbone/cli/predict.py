"""Predict with a trained checkpoint on an image, a folder or a glob; write pictures (boxes, masks, labels drawn with
torchvision.utils) and optionally a JSON of the detections.

    pvt-predict --checkpoint runs/demo --input photo.jpg --output-dir preds
    pvt-predict --checkpoint runs/demo --input "data/val/*.jpg" --output-dir preds --json
    pvt-predict --checkpoint runs/seg --input data/val_images --output-dir preds   # also <name>_mask.png

Each input x.jpg gives <output-dir>/x.png; --json writes <output-dir>/predictions.json.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import nn

from ..training.data import load_image
from ..training.distributed import DEVICES, setup_distributed
from ..training.inference import SegmentationMap, draw, find_images, load_trained, predict
from ..training.tasks import ModelSpec
from ..weights.io import atomic_write
from .runner import UsageError, command_parser, entry_point

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The ``pvt-predict`` command line."""
    parser = command_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or model.safetensors")
    parser.add_argument("--input", required=True, help="image file, folder of images, or glob pattern (quote it)")
    parser.add_argument("--output-dir", required=True, help="pictures (and predictions.json) go here")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this")
    parser.add_argument("--json", action="store_true", help="also write predictions.json")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    return parser


def _save_png(array: np.ndarray, path: Path) -> None:
    """(H, W, 3) or (H, W) uint8 -> a PNG at ``path``, written atomically."""
    atomic_write(path, lambda temp: Image.fromarray(array).save(temp, format="PNG"))


def _predict_one(model: nn.Module, spec: ModelSpec, path: Path, output_dir: Path, threshold: float) -> dict[str, Any]:
    """Predict on one image file, write ``<stem>.png`` (and ``<stem>_mask.png``); returns its JSON record."""
    image = load_image(path)
    prediction = predict(model, spec, image, score_threshold=threshold)
    _save_png(draw(image, prediction).permute(1, 2, 0).numpy(), output_dir / f"{path.stem}.png")
    record: dict[str, Any] = {"file": str(path), "width": image.shape[-1], "height": image.shape[-2]}
    if isinstance(prediction, SegmentationMap):
        _save_png(prediction.classes.numpy().astype(np.uint8), output_dir / f"{path.stem}_mask.png")
        record["class_pixels"] = prediction.to_json()
    else:
        record["detections"] = prediction.to_json(spec.category_ids)
    what = f"{len(record['detections'])} detections" if "detections" in record else "segmentation"
    print(f"{path} -> {output_dir / (path.stem + '.png')} ({what})")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """``pvt-predict``: one picture per input image, and ``predictions.json`` with ``--json``."""
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.score_threshold <= 1.0:
        raise UsageError(f"--score-threshold must lie in [0, 1], got {args.score_threshold}")
    images = find_images(args.input)
    model, spec = load_trained(args.checkpoint, device=setup_distributed(args.device).device)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = [_predict_one(model, spec, path, output_dir, args.score_threshold) for path in images]
    if args.json:
        text = json.dumps({"checkpoint": str(args.checkpoint), "task": spec.task, "images": records}, indent=2)
        atomic_write(output_dir / "predictions.json", lambda temp: temp.write_text(text + "\n"))
    return 0


run = entry_point(main)

if __name__ == "__main__":
    run()
