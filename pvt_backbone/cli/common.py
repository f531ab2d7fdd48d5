"""What ``pvt-train``, ``pvt-evaluate`` and ``pvt-predict`` share: the model and dataset flags, ``--model-arg
KEY=VALUE`` parsing, the ``--runtime``/``--exported`` flags that swap the eager model for its whole-model export,
and the checks of flag combinations argparse cannot express (each a :class:`~pvt_backbone.cli.runner.UsageError`,
exit status 2)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import check_int
from ..runtime import RUNTIMES
from ..training.data.augment import DETECTION_AUGMENTS
from ..training.data.protocol import SEG_PROTOCOLS
from ..training.exported import load_exported
from ..training.inference import OneBasedLabels
from ..training.tasks import DATASETS, MODEL_TASK, TASKS, DataSpec, ModelSpec
from .arguments import image_size_argument
from .runner import UsageError, flag_names

__all__ = [
    "DATASET_FLAGS",
    "DATA_FIELD_DESTS",
    "add_model_arguments",
    "add_data_arguments",
    "data_spec_from_args",
    "data_spec_flags",
    "check_data_arguments",
    "check_dataset_task",
    "parse_model_args",
    "add_threads_argument",
    "apply_threads",
    "add_runtime_arguments",
    "check_runtime_arguments",
    "exported_model",
]

# DataSpec fields whose flag is not ``--<field>``.
DATA_FIELD_DESTS = {"kind": "dataset", "seed": "data_seed"}
# The path flags each file-based dataset needs, per split: (images, labels).
DATASET_FLAGS = {
    "coco": ("images", "annotations"),
    "folder": ("images", "masks"),
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--task`` and ``--model`` (either may be left out; the other fills it in)."""
    parser.add_argument("--task", choices=list(TASKS), help="default: the model's task, or detection")
    parser.add_argument("--model", choices=list(MODEL_TASK), help="default: the task's first model (fasterrcnn, ...)")


def add_data_arguments(parser: argparse.ArgumentParser, *, train: bool = True) -> None:
    """The ``data`` flag group; ``train=False`` leaves out the training-split flags."""
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
    _add_protocol_arguments(parser, train=train)


def _add_protocol_arguments(parser: argparse.ArgumentParser, *, train: bool) -> None:
    """The augmentation and evaluation-protocol flags (the ``DataSpec`` fields of the same names)."""
    group = parser.add_argument_group("augmentation and protocol")
    if train:
        group.add_argument(
            "--augment", choices=DETECTION_AUGMENTS, default="flip", help="detection training augmentation (flip)"
        )
        group.add_argument("--photometric", action="store_true", help="detection: add photometric distortion")
        group.add_argument(
            "--group-aspect-ratio", action="store_true", help="batch portrait and landscape images apart"
        )
    group.add_argument(
        "--seg-protocol",
        choices=SEG_PROTOCOLS,
        default="square",
        help="segmentation: square resize, or mmseg's keep_ratio (rescale, crop, slide) (square)",
    )
    group.add_argument("--eval-mode", choices=("whole", "slide"), default="whole", help="keep_ratio evaluation")
    group.add_argument(
        "--test-scales", type=float, nargs="+", default=[1.0], metavar="R", help="keep_ratio: test ratios (1.0)"
    )
    group.add_argument("--test-flip", action="store_true", help="keep_ratio: also evaluate mirrored images")
    group.add_argument(
        "--reduce-zero-label", action="store_true", help="folder: mask id 0 -> ignored, others - 1 (ADE20K)"
    )


def data_spec_from_args(args: argparse.Namespace) -> DataSpec:
    """The :class:`DataSpec` the flags of :func:`add_data_arguments` describe."""
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
        augment=getattr(args, "augment", "flip"),
        photometric=getattr(args, "photometric", False),
        group_aspect_ratio=getattr(args, "group_aspect_ratio", False),
        seg_protocol=args.seg_protocol,
        eval_mode=args.eval_mode,
        test_scales=tuple(args.test_scales),
        test_flip=args.test_flip,
        reduce_zero_label=args.reduce_zero_label,
    )


def data_spec_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """How the library names each :class:`DataSpec` field (``data.<field>``) -> its flag in ``parser``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_data_arguments(parser)
        >>> flags = data_spec_flags(parser)
        >>> flags["data.kind"], flags["data.seed"], flags["data.train_size"]
        ('--dataset', '--data-seed', '--train-size')
    """
    flags = flag_names(parser)
    names = {
        f"data.{field.name}": DATA_FIELD_DESTS.get(field.name, field.name) for field in dataclasses.fields(DataSpec)
    }
    return {name: flags[dest] for name, dest in names.items() if dest in flags}


def _split_flags(kind: str, split: str) -> tuple[str, ...]:
    return tuple(f"{split}_{what}" for what in DATASET_FLAGS[kind])


def _missing(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    return ["--" + name.replace("_", "-") for name in names if getattr(args, name, None) is None]


def check_data_arguments(args: argparse.Namespace, *, train: bool, require_val: bool = False) -> None:
    """Raise :class:`UsageError` when a file-based ``--dataset`` lacks the path flags it needs.

    Training needs both training paths; validation paths are optional unless ``require_val``, but one without the
    other is an error. Synthetic data needs no paths.

    Example:
        >>> args = argparse.Namespace(dataset="coco", train_images="img", train_annotations=None)
        >>> check_data_arguments(args, train=True)
        Traceback (most recent call last):
        ...
        pvt_backbone.cli.runner.UsageError: dataset 'coco' needs --train-annotations
    """
    kind = args.dataset
    if kind not in DATASET_FLAGS:
        return
    splits = [("train", True)] if train else []
    splits.append(("val", require_val or any(getattr(args, name, None) for name in _split_flags(kind, "val"))))
    for split, needed in splits:
        missing = _missing(args, _split_flags(kind, split)) if needed else []
        if missing:
            raise UsageError(f"dataset {kind!r} needs {' and '.join(missing)}")


def check_dataset_task(kind: str, task: str) -> None:
    """Raise :class:`UsageError` when ``--dataset`` cannot serve ``task``: ``coco`` has no semantic masks, ``folder``
    has nothing but semantic masks.

    Example:
        >>> check_dataset_task("coco", "instance")
        >>> check_dataset_task("folder", "detection")
        Traceback (most recent call last):
        ...
        pvt_backbone.cli.runner.UsageError: dataset 'folder' serves segmentation only, not 'detection'; for boxes \
use --dataset coco
    """
    if kind == "coco" and task == "segmentation":
        raise UsageError(
            "dataset 'coco' serves detection, instance and keypoints; for segmentation use --dataset folder"
        )
    if kind == "folder" and task != "segmentation":
        raise UsageError(f"dataset 'folder' serves segmentation only, not {task!r}; for boxes use --dataset coco")


def parse_model_args(items: Sequence[str] | None) -> dict[str, Any]:
    """``["fpn_channels=128", "box_score_thresh=0.3"]`` -> ``{"fpn_channels": 128, "box_score_thresh": 0.3}``.

    Values are Python literals (numbers, booleans, tuples, strings); anything else stays a string. A malformed item
    is a :class:`UsageError`.

    Example:
        >>> parse_model_args(["fpn_channels=128", "anchor_sizes=((32,), (64,))", "name=wide"])
        {'fpn_channels': 128, 'anchor_sizes': ((32,), (64,)), 'name': 'wide'}
    """
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--model-arg expects KEY=VALUE with KEY a keyword name, got {item!r}")
        try:
            options[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key] = raw
    return options


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: the CPU threads torch uses in this process (default: torch's own choice)."""
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads torch uses (default: torch's choice)")


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` after checking it is >= 1 (:class:`UsageError` naming ``--threads``);
    ``None`` leaves torch's setting.

    Example:
        >>> apply_threads(0)
        Traceback (most recent call last):
        ...
        pvt_backbone.cli.runner.UsageError: --threads must be an int >= 1, got 0
    """
    if threads is None:
        return
    try:
        check_int("threads", threads, minimum=1)
    except (ValueError, TypeError) as error:
        raise UsageError(f"--{error}") from None
    torch.set_num_threads(threads)


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--runtime``, ``--exported FILE`` and ``--exported-size HxW``: run the checkpoint's whole-model export
    (``pvt-export --checkpoint``) instead of the eager model; :func:`check_runtime_arguments` checks them together."""
    group = parser.add_argument_group("exported model")
    group.add_argument(
        "--runtime",
        choices=("eager", *RUNTIMES),
        default="eager",
        help="eager (the checkpoint in PyTorch, default), or run --exported with onnxruntime, openvino or torch (.pt2)",
    )
    group.add_argument("--exported", help="the checkpoint's whole-model export (pvt-export --checkpoint ...)")
    group.add_argument("--exported-size", type=image_size_argument, help="HxW the export takes (its pvt-export --size)")


def check_runtime_arguments(args: argparse.Namespace) -> None:
    """Raise :class:`UsageError` unless ``--runtime`` (not eager), ``--exported`` and ``--exported-size`` come
    together, and ``FileNotFoundError`` when ``--exported`` is no file.

    Example:
        >>> check_runtime_arguments(argparse.Namespace(runtime="eager", exported="m.onnx", exported_size=None))
        Traceback (most recent call last):
        ...
        pvt_backbone.cli.runner.UsageError: --exported and --exported-size need --runtime onnxruntime, openvino or torch
    """
    if args.runtime == "eager":
        if args.exported is not None or args.exported_size is not None:
            raise UsageError(
                f"--exported and --exported-size need --runtime {', '.join(RUNTIMES[:-1])} or {RUNTIMES[-1]}"
            )
        return
    if args.exported is None or args.exported_size is None:
        raise UsageError(f"--runtime {args.runtime} needs --exported FILE and --exported-size HxW")
    if not Path(args.exported).is_file():
        raise FileNotFoundError(f"--exported {args.exported}: no such file")


def exported_model(args: argparse.Namespace, eager: nn.Module, spec: ModelSpec) -> nn.Module:
    """``--exported`` run by ``--runtime``, called as the eager model is (the checkpoint supplies names and task);
    the eager model itself with ``--runtime eager``. Checks the flags with :func:`check_runtime_arguments`."""
    check_runtime_arguments(args)
    if args.runtime == "eager":
        return eager
    size = (args.exported_size.height, args.exported_size.width)
    offset = 1 if isinstance(eager, OneBasedLabels) else 0  # exports of a published RetinaNet label 0..K-1
    return load_exported(args.exported, runtime=args.runtime, task=spec.task, size=size, label_offset=offset)
