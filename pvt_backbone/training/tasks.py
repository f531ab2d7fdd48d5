"""The four tasks as data: which models serve each, how to build one, what its loss and metrics are.

``ModelSpec`` is everything that rebuilds a trained model (it is what ``run.json`` stores next to the weights), and
``DataSpec`` everything that rebuilds its datasets. Both are plain frozen dataclasses with ``to_dict``/``from_dict``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator

from heads import group_norm

from ..detection import trainable_to_frozen_stages
from ..registry import create_model
from ..segmentation import segmentation_loss
from .data import (
    CocoDetection,
    SegmentationFolder,
    SyntheticConfig,
    SyntheticSegmentation,
    SyntheticShapes,
)
from .data.augment import MULTISCALE_SIZES
from .data.protocol import check_protocol, inference_settings
from .evaluation import evaluate_detection, evaluate_segmentation, normalize_images
from .seg_inference import InferenceView, SegmentationInference

__all__ = [
    "TASKS",
    "MODEL_TASK",
    "DATASETS",
    "HEAD_NORMS",
    "DEFAULT_IMAGE_SIZE",
    "ModelSpec",
    "DataSpec",
    "resolve_task_model",
    "build_model",
    "build_datasets",
    "training_loss",
    "evaluate",
    "primary_metric",
    "plotted_metrics",
    "steps_per_epoch",
    "check_same_classes",
]

TASKS: dict[str, tuple[str, ...]] = {
    "detection": ("fasterrcnn", "retinanet", "fcos"),
    "instance": ("maskrcnn",),
    "keypoints": ("keypointrcnn",),
    "segmentation": ("semantic_fpn", "segformer_head"),
}
MODEL_TASK = {model: task for task, models in TASKS.items() for model in models}
DATASETS = ("synthetic", "coco", "folder")
_IOU_TYPES = {"detection": ("bbox",), "instance": ("bbox", "segm"), "keypoints": ("bbox", "keypoints")}
_PRIMARY = {"detection": "bbox_mAP", "instance": "segm_mAP", "keypoints": "keypoints_mAP", "segmentation": "mIoU"}
HEAD_NORMS = ("default", "bn", "gn")
# Default image side per dataset kind: tiny synthetic scenes, COCO's shorter side, a common segmentation crop.
DEFAULT_IMAGE_SIZE = {"synthetic": 160, "coco": 800, "folder": 512}


def resolve_task_model(task: str | None, model: str | None) -> tuple[str, str]:
    """Fill in whichever of task and model is missing and check that they fit together.

    >>> resolve_task_model(None, "maskrcnn"), resolve_task_model("segmentation", None)
    (('instance', 'maskrcnn'), ('segmentation', 'semantic_fpn'))
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if model is not None and model not in MODEL_TASK:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODEL_TASK)}")
    if model is None:
        task = task or "detection"
        return task, TASKS[task][0]
    if task is not None and MODEL_TASK[model] != task:
        raise ValueError(f"model {model!r} does not do task {task!r}; models for {task}: {', '.join(TASKS[task])}")
    return MODEL_TASK[model], model


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a model.

    ``num_classes`` is what the model predicts: for detectors the categories plus background (labels 1..K), for
    segmenters the class ids 0..C-1. ``class_names`` names labels 1..K (detectors) or ids 0..C-1 (segmenters).
    ``options`` are extra keyword arguments for the builder (e.g. ``{"fpn_channels": 128}``), JSON values only;
    ``anchor_sizes`` (one list of sizes per pyramid level, e.g. ``[[16, 23], [32, 45], ...]``) builds the anchor
    generator (aspect ratios 0.5, 1, 2) of the anchor-based detectors. ``head_norm``:
    ``"default"`` keeps each builder's choice (GroupNorm in the segmentation heads, no norm in the detectors' FPN);
    ``"bn"`` puts BatchNorm there (what ``TrainConfig(sync_bn=True)`` converts to SyncBatchNorm); ``"gn"`` GroupNorm.
    """

    task: str
    model: str
    variant: str
    num_classes: int
    image_size: int
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...] = ()
    keypoint_names: tuple[str, ...] = ()
    head_norm: str = "default"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        resolve_task_model(self.task, self.model)
        if self.head_norm not in HEAD_NORMS:
            raise ValueError(f"head_norm must be one of {', '.join(HEAD_NORMS)}, got {self.head_norm!r}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 px, got {self.image_size}")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "category_ids", tuple(self.category_ids))
        object.__setattr__(self, "keypoint_names", tuple(self.keypoint_names))
        try:  # JSON values only, in their JSON form (tuples become lists), so a spec equals its run.json copy
            object.__setattr__(self, "options", json.loads(json.dumps(dict(self.options))))
        except TypeError as error:
            raise TypeError(f"model options must be JSON values (numbers, strings, lists): {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown model spec fields {unknown}; expected {sorted(names)}")
        return cls(**data)

    @classmethod
    def for_dataset(cls, task: str, model: str, variant: str, dataset: Any, *, image_size: int, **extra: Any):
        """The spec that fits a training dataset's classes (and keypoints)."""
        if task == "segmentation":
            return cls(task, model, variant, dataset.num_classes, image_size, dataset.classes, **extra)
        if task == "keypoints" and not dataset.keypoint_names:
            raise ValueError("task 'keypoints' needs a dataset with keypoints")
        return cls(
            task,
            model,
            variant,
            dataset.num_classes,
            image_size,
            dataset.categories,
            category_ids=dataset.category_ids,
            keypoint_names=dataset.keypoint_names if task == "keypoints" else (),
            **extra,
        )


def build_model(spec: ModelSpec, *, weights_backbone: str | None = None, trainable_stages: int = 4) -> nn.Module:
    """Build the model a spec describes, with a fresh head (and backbone weights when given).

    ``trainable_stages`` (torchvision's ``trainable_backbone_layers``: 4 trains every backbone stage, 0 none) freezes
    the first ``4 - trainable_stages`` stages of the backbone.
    """
    if spec.task == "segmentation":
        head = "fpn" if spec.model == "semantic_fpn" else "mlp"
        options = dict(spec.options)
        if spec.head_norm != "default":
            options["norm_layer"] = nn.BatchNorm2d if spec.head_norm == "bn" else group_norm
        frozen = trainable_to_frozen_stages(trainable_stages)
        if frozen:
            options["frozen_stages"] = frozen
        return create_model(
            f"semantic_fpn_pvt_v2_{spec.variant}",
            num_classes=spec.num_classes,
            weights_backbone=weights_backbone,
            head=head,
            **options,
        )
    kwargs: dict[str, Any] = {
        "min_size": spec.image_size,
        "max_size": max(spec.image_size, round(spec.image_size * 1333 / 800)),
    }
    if spec.task == "keypoints":
        kwargs["num_keypoints"] = len(spec.keypoint_names)
    if spec.head_norm != "default":
        kwargs["fpn_norm_layer"] = nn.BatchNorm2d if spec.head_norm == "bn" else group_norm
    options = dict(spec.options)
    anchor_sizes = options.pop("anchor_sizes", None)
    if anchor_sizes is not None:
        kwargs[_anchor_argument(spec.model)] = _anchor_generator(anchor_sizes)
    kwargs.update(options)
    return create_model(
        f"{spec.model}_pvt_v2_{spec.variant}_fpn",
        num_classes=spec.num_classes,
        weights_backbone=weights_backbone,
        trainable_stages=trainable_stages,
        **kwargs,
    )


def _anchor_argument(model: str) -> str:
    if model == "fcos":
        raise ValueError("fcos is anchor-free: anchor_sizes applies to fasterrcnn, maskrcnn, keypointrcnn, retinanet")
    return "anchor_generator" if model == "retinanet" else "rpn_anchor_generator"


def _anchor_generator(sizes: Any) -> AnchorGenerator:
    """One tuple of anchor sizes per pyramid level, aspect ratios 0.5, 1 and 2 at every level."""
    try:
        levels = tuple(tuple(int(size) for size in level) for level in sizes)
    except TypeError:
        raise ValueError(f"anchor_sizes must be one list of sizes per pyramid level, got {sizes!r}") from None
    return AnchorGenerator(levels, ((0.5, 1.0, 2.0),) * len(levels))


@dataclass(frozen=True)
class DataSpec:
    """Where the data comes from.

    ``synthetic`` needs nothing (``synthetic_classes`` shape classes, ``train_size``/``val_size`` scenes of
    ``image_size`` px); ``coco`` needs ``train_images`` + ``train_annotations`` (and ``val_*`` to evaluate);
    ``folder`` needs ``train_images`` + ``train_masks`` (and ``val_*``), optionally ``num_classes`` and
    ``class_names_file`` (a text file, one class name per line; COCO data names its classes by its categories).

    Training augmentation of the detection tasks, ``augment``: ``"flip"`` (horizontal flip, p = 0.5), ``"none"``,
    ``"multiscale"`` (flip, shorter side one of ``multiscale_sizes``, longer side at most ``max_size``; mmdet's 3x:
    480..800 step 32, 1333), ``"detr"`` (flip, then multi-scale or DETR's resize + random crop + multi-scale),
    ``"lsj"`` (large-scale jitter: scale 0.1..2.0, ``image_size`` square crop, flip, pad);
    ``photometric=True`` adds photometric distortion. Boxes, masks and keypoints follow (keypoints ``left_*`` /
    ``right_*`` swap on a flip). ``group_aspect_ratio=True`` batches images of one aspect-ratio group (w/h >= 1 or
    < 1) together. See :mod:`pvt_backbone.training.data.augment` and :mod:`~pvt_backbone.training.data.grouping`.

    Segmentation, ``seg_protocol``: ``"square"`` trains and evaluates at ``image_size`` x ``image_size``;
    ``"keep_ratio"`` is mmseg's ADE20K protocol: training rescales to fit ``seg_scale`` (longer, shorter; default
    (4 x ``image_size``, ``image_size``), i.e. (2048, 512)) times a ratio in ``seg_ratio_range``, crops
    ``image_size`` square with no class above ``cat_max_ratio`` of the crop, flips, distorts photometrically and
    pads with 255; evaluation rescales to fit ``seg_scale`` and runs ``eval_mode`` ``"whole"`` or ``"slide"``
    (``slide_crop`` default ``image_size``, ``slide_stride`` default two thirds of it), over ``test_scales``
    ratios and, with ``test_flip``, mirrored copies, averaging logits at the original size.
    ``reduce_zero_label=True`` (``folder`` only) maps mask id 0 to 255 and moves the others down by one (ADE20K).
    """

    kind: str = "synthetic"
    train_images: str | None = None
    train_annotations: str | None = None
    train_masks: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    val_masks: str | None = None
    num_classes: int | None = None
    synthetic_classes: int = 3
    train_size: int = 1000
    val_size: int = 50
    image_size: int | None = None
    seed: int = 0
    class_names_file: str | None = None
    augment: str = "flip"
    multiscale_sizes: tuple[int, ...] = MULTISCALE_SIZES
    max_size: int = 1333
    photometric: bool = False
    group_aspect_ratio: bool = False
    seg_protocol: str = "square"
    seg_scale: tuple[int, int] | None = None
    seg_ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    eval_mode: str = "whole"
    slide_crop: int | None = None
    slide_stride: int | None = None
    test_scales: tuple[float, ...] = (1.0,)
    test_flip: bool = False
    reduce_zero_label: bool = False

    def __post_init__(self) -> None:
        if self.kind not in DATASETS:
            raise ValueError(f"unknown dataset {self.kind!r}; expected one of {', '.join(DATASETS)}")
        check_protocol(self)

    @property
    def resolved_image_size(self) -> int:
        return self.image_size if self.image_size is not None else DEFAULT_IMAGE_SIZE[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _need(spec: DataSpec, *names: str) -> None:
    missing = [name for name in names if getattr(spec, name) is None]
    if missing:
        raise ValueError(f"dataset {spec.kind!r} needs {' and '.join(missing)}")


def build_datasets(spec: DataSpec, task: str, *, train: bool = True, val: bool = True) -> tuple[Any, Any]:
    """(train, val) datasets for a task; either is None when not requested or, for val, not configured. With
    ``seg_protocol="keep_ratio"`` the val set is an ``InferenceView`` carrying its ``SegmentationInference``."""
    train_set, val_set = _build_datasets(spec, task, train=train, val=val)
    if task == "segmentation" and spec.seg_protocol == "keep_ratio" and val_set is not None:
        settings = inference_settings(spec, spec.resolved_image_size)
        val_set = InferenceView(val_set, SegmentationInference(**settings))
    return train_set, val_set


def _build_datasets(spec: DataSpec, task: str, *, train: bool, val: bool) -> tuple[Any, Any]:
    if spec.class_names_file is not None and spec.kind != "folder":
        raise ValueError(f"class_names_file is for dataset 'folder'; dataset {spec.kind!r} names its classes itself")
    if spec.kind == "synthetic":
        config = SyntheticConfig(
            image_size=spec.resolved_image_size, num_classes=spec.synthetic_classes, seed=spec.seed
        )
        cls = SyntheticSegmentation if task == "segmentation" else SyntheticShapes
        return (
            cls("train", num_images=spec.train_size, config=config) if train else None,
            cls("val", num_images=spec.val_size, config=config) if val else None,
        )
    if spec.kind == "coco":
        if task == "segmentation":
            raise ValueError("dataset 'coco' serves detection, instance and keypoints; for segmentation use 'folder'")
        options = {"masks": task == "instance", "keypoints": task == "keypoints"}
        train_set = val_set = None
        if train:
            _need(spec, "train_images", "train_annotations")
            train_set = CocoDetection(spec.train_images, spec.train_annotations, **options)
        if val and (spec.val_images or spec.val_annotations):
            _need(spec, "val_images", "val_annotations")
            val_set = CocoDetection(spec.val_images, spec.val_annotations, **options)
        return train_set, val_set
    if task != "segmentation":
        raise ValueError(f"dataset 'folder' serves segmentation only, not {task!r}; for boxes use 'coco'")
    train_set = val_set = None
    if train:
        _need(spec, "train_images", "train_masks")
        train_set = SegmentationFolder(
            spec.train_images,
            spec.train_masks,
            num_classes=spec.num_classes,
            class_names_file=spec.class_names_file,
            reduce_zero_label=spec.reduce_zero_label,
        )
    if val and (spec.val_images or spec.val_masks):
        _need(spec, "val_images", "val_masks")
        classes = spec.num_classes if spec.num_classes is not None else (train_set.num_classes if train_set else None)
        val_set = SegmentationFolder(
            spec.val_images,
            spec.val_masks,
            num_classes=classes,
            class_names_file=spec.class_names_file,
            reduce_zero_label=spec.reduce_zero_label,
        )
    return train_set, val_set


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def training_loss(model: nn.Module, task: str, batch: Any, device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward pass in train mode: (total loss, named parts). Detectors return their loss dict (they normalise
    inside); segmenters see ImageNet-normalised images and are scored with cross-entropy ignoring 255."""
    images, targets = _to_device(batch, device)
    if task == "segmentation":
        loss = segmentation_loss(model(normalize_images(images)), targets)
        return loss, {"loss_seg": loss.detach()}
    parts = model(images, targets)
    total = sum(parts.values())
    return total, {k: v.detach() for k, v in parts.items()}


def evaluate(
    model: nn.Module,
    dataset: Any,
    spec: ModelSpec,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    amp: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Task metrics of ``model`` on ``dataset``: COCOeval stats for detectors, mIoU/pixel accuracy for segmenters."""
    if spec.task == "segmentation":  # an InferenceView (keep-ratio protocol) brings its own inference
        return evaluate_segmentation(
            model,
            dataset,
            size=spec.image_size,
            device=device,
            amp=amp,
            progress=progress,
            inference=getattr(dataset, "inference", None),
        )
    return evaluate_detection(
        model,
        dataset,
        iou_types=_IOU_TYPES[spec.task],
        batch_size=batch_size,
        device=device,
        amp=amp,
        progress=progress,
    )


def primary_metric(task: str) -> str:
    """The metric a task is judged by: ``bbox_mAP``, ``segm_mAP``, ``keypoints_mAP`` or ``mIoU``."""
    return _PRIMARY[task]


def plotted_metrics(task: str) -> tuple[str, ...]:
    """What the loss curve shows next to the loss: mAP and mAP50 of the task's main IoU type, or mIoU and pixel
    accuracy."""
    if task == "segmentation":
        return ("mIoU", "pixel_accuracy")
    return (f"{_PRIMARY[task]}50", _PRIMARY[task])


def steps_per_epoch(samples_per_rank: int, batch_size: int) -> int:
    """Optimizer steps in one pass over a rank's shard (the last batch may be short; at least 1).

    >>> steps_per_epoch(10, 4)
    3
    """
    return max(1, math.ceil(samples_per_rank / batch_size))


def check_same_classes(spec: ModelSpec, names: Sequence[str]) -> None:
    """Raise ``ValueError`` unless a dataset's class ``names`` are the ones the model was trained on, in order."""
    if tuple(names) != spec.class_names:
        raise ValueError(
            f"the checkpoint was trained on classes {list(spec.class_names)} but this dataset has {list(names)}"
        )
