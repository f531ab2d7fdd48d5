"""Training, evaluation and prediction for PVTv2 detectors and segmenters: the application behind ``pvt-train``,
``pvt-evaluate`` and ``pvt-predict``. Needs the ``[train]`` extra; ``import pvt_backbone`` never imports it."""

from .checkpoint import RunCheckpoint, latest_checkpoint, load_run_weights, resolve_checkpoint, save_checkpoint
from .evaluation import ConfusionMatrix, coco_evaluate, coco_results, evaluate_detection, evaluate_segmentation
from .inference import Detections, SegmentationMap, draw, load_trained, predict
from .tasks import TASKS, DataSpec, ModelSpec, build_datasets, build_model, evaluate
from .trainer import TrainConfig, TrainResult, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "DataSpec",
    "ModelSpec",
    "TASKS",
    "build_model",
    "build_datasets",
    "evaluate",
    "evaluate_detection",
    "evaluate_segmentation",
    "coco_evaluate",
    "coco_results",
    "ConfusionMatrix",
    "RunCheckpoint",
    "save_checkpoint",
    "latest_checkpoint",
    "resolve_checkpoint",
    "load_run_weights",
    "load_trained",
    "predict",
    "draw",
    "Detections",
    "SegmentationMap",
]
