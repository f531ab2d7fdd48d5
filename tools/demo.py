#!/usr/bin/env python
"""`make demo`: train a PVTv2 detector on the built-in synthetic shapes, with mAP before and after and pictures.

Writes runs/demo/metrics.json ({"before": {...}, "after": {...}, "seconds": ...}), runs/demo/predictions.png,
runs/demo/loss.png, and the run itself (log.jsonl, run.json, checkpoints/) in runs/demo. Nothing is downloaded:
the backbone starts from random weights and the data is generated from a seed. Sized for a 2-core CPU. The settings
are the ``cpu_demo`` recipe (pvt_backbone/training/recipes/cpu_demo.json; ``pvt-train --recipe cpu_demo`` runs the
same training).

    python tools/demo.py [--output-dir runs/demo] [--steps N]
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.utils import make_grid

from heads import resize_bilinear
from pvt_backbone.cli.runner import command_parser, run_command
from pvt_backbone.training.inference import draw, predict
from pvt_backbone.training.recipes import load_recipe
from pvt_backbone.training.tasks import ModelSpec, build_datasets
from pvt_backbone.training.trainer import TrainConfig, TrainResult, train
from pvt_backbone.weights.io import atomic_write

__all__ = [
    "RECIPE",
    "MODEL",
    "VARIANT",
    "IMAGE_SIZE",
    "CLASSES",
    "STEPS",
    "BATCH_SIZE",
    "LR",
    "HEAD_NORM",
    "MODEL_OPTIONS",
    "VAL_IMAGES",
    "EVAL_EVERY",
    "TARGET_MAP50",
    "main",
]

# The recipe, tuned to train in a few minutes on 2 CPU cores (its file says why each value); the names below are
# read from it for the messages and metrics.json.
RECIPE = load_recipe("cpu_demo")
MODEL = RECIPE.train["model"]
VARIANT = RECIPE.train["variant"]
IMAGE_SIZE = RECIPE.data["image_size"]
CLASSES = RECIPE.data["synthetic_classes"]  # circle, square, triangle
STEPS = RECIPE.train["max_steps"]
BATCH_SIZE = RECIPE.batch_size
LR = RECIPE.lr
HEAD_NORM = RECIPE.train["head_norm"]
MODEL_OPTIONS = RECIPE.train["model_options"]
VAL_IMAGES = RECIPE.data["val_size"]
EVAL_EVERY = RECIPE.train["eval_every"]  # points on the loss curve's mAP line
TARGET_MAP50 = 0.5


def _picture(model: nn.Module, spec: ModelSpec, dataset: Any, *, count: int = 8, zoom: int = 3) -> torch.Tensor:
    """Predictions (score >= 0.5) on the first validation scenes, drawn on ``zoom`` x enlarged copies so the labels
    stay legible; a 2 x 4 grid, (3, H, W) uint8."""
    tiles = []
    for index in range(count):
        image, _ = dataset[index]
        found = predict(model, spec, image, score_threshold=0.5)
        large = resize_bilinear(image[None], (image.shape[-2] * zoom, image.shape[-1] * zoom))[0]
        tiles.append(draw(large, dataclasses.replace(found, boxes=found.boxes * zoom), line_width=2))
    return make_grid(tiles, nrow=4, padding=6, pad_value=255)


def _recipe(output: Path, steps: int) -> TrainConfig:
    """The training run of the demo (the ``cpu_demo`` recipe, one process), writing into ``output``."""
    return RECIPE.train_config(str(output), world_size=1, max_steps=steps)


def _metrics(result: TrainResult, seconds: float, steps: int) -> dict[str, Any]:
    """What metrics.json holds: mAP before and after training, the wall time and the recipe."""
    keys = ("bbox_mAP50", "bbox_mAP")
    before, after = result.evals[0], result.evals[-1]
    return {
        "before": {k: round(before[k], 4) for k in keys},
        "after": {k: round(after[k], 4) for k in keys},
        "seconds": round(seconds, 1),
        "recipe": {
            "model": MODEL,
            "variant": VARIANT,
            "image_size": IMAGE_SIZE,
            "classes": CLASSES,
            "steps": steps,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "val_images": VAL_IMAGES,
        },
    }


def _write_outputs(output: Path, config: TrainConfig, result: TrainResult, metrics: dict[str, Any]) -> None:
    """metrics.json and predictions.png (the trainer has written loss.png and the run itself)."""
    atomic_write(output / "metrics.json", lambda temp: temp.write_text(json.dumps(metrics, indent=2) + "\n"))
    _, val = build_datasets(config.data, "detection", train=False)
    grid = _picture(result.model.eval(), result.spec, val).permute(1, 2, 0).numpy()
    atomic_write(output / "predictions.png", lambda temp: Image.fromarray(grid).save(temp, format="PNG"))


def main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate and draw; exit 1 when the final bbox mAP50 misses ``TARGET_MAP50``."""
    parser = command_parser(__doc__)
    parser.add_argument("--output-dir", default="runs/demo", help="cleared and refilled (default runs/demo)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    config = _recipe(output, args.steps)
    print(
        f"Training {MODEL} with a PVTv2-{VARIANT.upper()} backbone (random init) for {args.steps} steps of "
        f"{BATCH_SIZE} synthetic {IMAGE_SIZE}x{IMAGE_SIZE} images ({CLASSES} shape classes); "
        f"evaluating on {VAL_IMAGES} validation scenes before and after.",
        flush=True,
    )
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    metrics = _metrics(result, seconds, args.steps)
    _write_outputs(output, config, result, metrics)
    before, after = result.evals[0], result.evals[-1]
    print(
        f"\nbbox mAP50: {before['bbox_mAP50']:.3f} -> {after['bbox_mAP50']:.3f}   "
        f"bbox mAP: {before['bbox_mAP']:.3f} -> {after['bbox_mAP']:.3f}   ({seconds:.0f} s train + eval)"
    )
    for name in ("metrics.json", "predictions.png", "loss.png"):
        print(f"wrote {output / name}")
    if after["bbox_mAP50"] < TARGET_MAP50:
        print(f"demo: bbox mAP50 {after['bbox_mAP50']:.3f} is below the target {TARGET_MAP50}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
