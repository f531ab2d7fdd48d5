"""What the three CLIs share: the dataset flags, ``--model-arg KEY=VALUE`` parsing, and the error wrapper that turns
any failure into one short line on stderr and a non-zero exit (``PVT_DEBUG=1`` shows the traceback instead)."""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..training.data.errors import short_message
from ..training.tasks import DATASETS, MODEL_TASK, TASKS, DataSpec

__all__ = ["add_data_arguments", "data_spec_from_args", "parse_model_args", "run_cli", "EXIT_ERROR", "EXIT_INTERRUPT"]

EXIT_ERROR = 2
EXIT_INTERRUPT = 130


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=list(TASKS), help="default: the model's task, or detection")
    parser.add_argument("--model", choices=list(MODEL_TASK), help="default: the task's first model (fasterrcnn, ...)")


def add_data_arguments(parser: argparse.ArgumentParser, *, train: bool = True) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        choices=DATASETS,
        default="synthetic",
        help="synthetic (built in, no files), coco (images + instances JSON) or folder "
        "(images + PNG class-id masks, 255 = ignore)",
    )
    if train:
        group.add_argument("--train-images", help="training image folder (coco, folder)")
        group.add_argument("--train-annotations", help="training instances JSON (coco)")
        group.add_argument("--train-masks", help="training mask folder (folder)")
    group.add_argument("--val-images", help="validation image folder (coco, folder)")
    group.add_argument("--val-annotations", help="validation instances JSON (coco)")
    group.add_argument("--val-masks", help="validation mask folder (folder)")
    group.add_argument("--num-classes", type=int, help="folder: class count (default: largest mask id + 1)")
    group.add_argument(
        "--image-size",
        type=int,
        help="detectors: shorter image side; segmenters: square input side "
        "(default: synthetic 160, coco 800, folder 512)",
    )
    group.add_argument("--synthetic-classes", type=int, default=3, help="synthetic: shape classes, 1-6 (default 3)")
    if train:
        group.add_argument("--train-size", type=int, default=1000, help="synthetic: training scenes (default 1000)")
    group.add_argument("--val-size", type=int, default=50, help="synthetic: validation scenes (default 50)")
    group.add_argument("--data-seed", type=int, default=0, help="synthetic: scene seed (default 0)")


def data_spec_from_args(args: argparse.Namespace) -> DataSpec:
    return DataSpec(
        kind=args.dataset,
        train_images=getattr(args, "train_images", None),
        train_annotations=getattr(args, "train_annotations", None),
        train_masks=getattr(args, "train_masks", None),
        val_images=args.val_images,
        val_annotations=args.val_annotations,
        val_masks=args.val_masks,
        num_classes=args.num_classes,
        synthetic_classes=args.synthetic_classes,
        train_size=getattr(args, "train_size", 1000),
        val_size=args.val_size if args.val_size is not None else 50,
        image_size=args.image_size,
        seed=args.data_seed,
    )


def parse_model_args(items: Sequence[str] | None) -> dict[str, Any]:
    """``["fpn_channels=128", "box_score_thresh=0.3"]`` -> ``{"fpn_channels": 128, "box_score_thresh": 0.3}``.

    Values are Python literals (numbers, booleans, tuples, strings); anything else stays a string.
    """
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg expects KEY=VALUE with KEY a keyword name, got {item!r}")
        try:
            options[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key] = raw
    return options


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; report failures as ``<prog>: error: <message>`` with exit code 2, Ctrl-C with 130."""
    prog = os.path.basename(sys.argv[0]) or "pvt_backbone"
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    except Exception as error:  # noqa: BLE001 - a CLI reports, it does not crash
        if os.environ.get("PVT_DEBUG"):
            raise
        message = short_message(error).strip() or type(error).__name__
        if not isinstance(error, (ValueError, TypeError, FileNotFoundError, FileExistsError)):
            message = f"{type(error).__name__}: {message}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
