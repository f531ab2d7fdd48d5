"""Metrics: pycocotools' ``COCOeval`` for boxes, masks and keypoints; mIoU and pixel accuracy for segmentation.

We never compute mAP ourselves: model outputs become COCO result dicts and ``COCOeval`` scores them against the
dataset's COCO ground truth. Under ``torch.distributed`` each rank runs its shard of the images and the results are
gathered before scoring, so every rank returns the same numbers.

Example:
    >>> from pvt_backbone.training.data import SyntheticConfig, SyntheticShapes
    >>> model = fasterrcnn_pvt_v2_fpn("b0", num_classes=4, min_size=64, max_size=64, fpn_channels=32)
    >>> scenes = SyntheticShapes("val", num_images=2, config=SyntheticConfig(image_size=64))
    >>> metrics = evaluate_detection(model, scenes, iou_types=("bbox",))
    >>> sorted(metrics)[:3], all(-1.0 <= metrics[f"bbox_{name}"] <= 1.0 for name in COCO_STAT_NAMES)
    (['bbox_mAP', 'bbox_mAP50', 'bbox_mAP75'], True)
    >>> set(metrics["bbox_per_class"]) <= set(scenes.categories)  # AP per category name
    True
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from tqdm import tqdm

from heads import resize_bilinear

from ..amp import autocast
from ..checks import check_float, check_int
from ..detection import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "COCO_STAT_NAMES",
    "KEYPOINT_STAT_NAMES",
    "DEFAULT_KEYPOINT_SIGMA",
    "coco_results",
    "coco_evaluate",
    "evaluate_detection",
    "ConfusionMatrix",
    "evaluate_segmentation",
    "segmentation_logits",
    "normalize_images",
]

# Names of COCOeval.stats[0:6] (the AP half of its summary), per IoU type.
COCO_STAT_NAMES = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large")
KEYPOINT_STAT_NAMES = ("mAP", "mAP50", "mAP75", "mAP_medium", "mAP_large")
# OKS falloff per keypoint for datasets that are not COCO persons (COCO's own 17 sigmas are pycocotools' default).
DEFAULT_KEYPOINT_SIGMA = 0.05


def coco_results(
    outputs: Sequence[dict[str, Tensor]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
    *,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """torchvision detector outputs -> COCO result dicts.

    Args:
        outputs: one dict per image: ``boxes`` (N, 4) xyxy, ``labels`` (N,) in 1..K, ``scores`` (N,), optionally
            ``masks`` (N, 1, H, W) probabilities and ``keypoints`` (N, K, 3).
        image_ids: COCO image id of each output.
        category_ids: COCO category id of label k at position k - 1.
        mask_threshold: probability above which a mask pixel is foreground.

    Returns:
        ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` per detection, plus ``"segmentation"``
        (compressed RLE, counts as str) and ``"keypoints"`` (3K floats) when present.
    """
    check_float("mask_threshold", mask_threshold, minimum=0.0, maximum=1.0)
    results: list[dict[str, Any]] = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().float().cpu()
        labels = output["labels"].detach().cpu().tolist()
        scores = output["scores"].detach().float().cpu().tolist()
        masks = output.get("masks")
        if masks is not None:
            binary = (masks.detach()[:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
        keypoints = output.get("keypoints")
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            label = labels[i]
            if not 1 <= label <= len(category_ids):
                continue  # background or an out-of-range class never scores
            result: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": int(category_ids[label - 1]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(scores[i]),
            }
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(binary[i]))
                rle["counts"] = rle["counts"].decode("ascii")
                result["segmentation"] = rle
            if keypoints is not None:
                result["keypoints"] = [float(v) for v in keypoints[i].detach().cpu().reshape(-1)]
            results.append(result)
    return results


def coco_evaluate(
    coco_gt: COCO,
    results: Sequence[dict[str, Any]],
    iou_types: Iterable[str] = ("bbox",),
    *,
    image_ids: Sequence[int] | None = None,
    keypoint_sigmas: Sequence[float] | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Score COCO results with ``COCOeval``; returns ``{"<iou_type>_<stat>": value}`` from ``COCOeval.stats`` and
    ``{"<iou_type>_per_class": {category name: AP}}``.

    ``iou_type`` is ``"bbox"``, ``"segm"`` or ``"keypoints"``; stats are ``COCO_STAT_NAMES`` (area range "all",
    100 detections). The per-class AP is ``mAP``'s average (IoU 0.50:0.95, area "all", 100 detections; 20 for
    keypoints) over one category's slice of ``COCOeval.eval["precision"]``; categories without ground truth in the
    scored images are left out, so the mean of the per-class APs is ``mAP``. A category name that occurs twice is
    keyed ``"<name> (id <id>)"``. No results at all scores 0.0 (pycocotools cannot load an empty result list).
    ``image_ids`` restricts scoring to those images (default: every image of ``coco_gt``). ``verbose`` prints
    pycocotools' summary table.
    """
    metrics: dict[str, Any] = {}
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm", "keypoints"):
            raise ValueError(f"iou_type must be 'bbox', 'segm' or 'keypoints', got {iou_type!r}")
        names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else COCO_STAT_NAMES
        relevant = [r for r in results if _has_field(r, iou_type)]
        if iou_type == "segm":  # with a "bbox" key, loadRes takes the box area: wrong small/medium/large split
            relevant = [{k: v for k, v in r.items() if k != "bbox"} for r in relevant]
        if not relevant:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in names})
            metrics[f"{iou_type}_per_class"] = _per_class_without_results(coco_gt, image_ids)
            continue
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with sink:
            coco_dt = coco_gt.loadRes([dict(r) for r in relevant])  # loadRes mutates its input
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            if iou_type == "keypoints":
                evaluator.params.kpt_oks_sigmas = _sigmas(coco_gt, keypoint_sigmas)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        # COCOeval reports -1 where there is no ground truth (e.g. no small objects); keep it: it means "undefined".
        metrics.update({f"{iou_type}_{name}": float(v) for name, v in zip(names, evaluator.stats)})
        metrics[f"{iou_type}_per_class"] = _per_class_ap(evaluator, coco_gt)
    return metrics


def _category_keys(coco_gt: COCO, category_ids: Sequence[int]) -> list[str]:
    """Each category's name, or ``"<name> (id <id>)"`` where two categories share a name."""
    names = [coco_gt.cats[i]["name"] for i in category_ids]
    return [f"{name} (id {i})" if names.count(name) > 1 else name for name, i in zip(names, category_ids)]


def _per_class_ap(evaluator: COCOeval, coco_gt: COCO) -> dict[str, float]:
    """AP per category from an accumulated ``COCOeval``: the mean of its precision over IoU thresholds and recall
    points, area "all", the largest max-detections; categories without ground truth (precision -1) are left out."""
    # precision: (IoU thresholds, recall points, categories, area ranges, max detections); -1 = no ground truth
    precision = evaluator.eval["precision"][:, :, :, evaluator.params.areaRngLbl.index("all"), -1]
    per_class: dict[str, float] = {}
    for k, key in enumerate(_category_keys(coco_gt, evaluator.params.catIds)):
        values = precision[:, :, k]
        values = values[values > -1]
        if values.size:
            per_class[key] = float(values.mean())
    return per_class


def _per_class_without_results(coco_gt: COCO, image_ids: Sequence[int] | None) -> dict[str, float]:
    """0.0 for each category with (non-crowd) ground truth in the scored images: nothing was detected."""
    ids = coco_gt.getImgIds() if image_ids is None else list(image_ids)
    annotations = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=ids, iscrowd=False))
    present = sorted({a["category_id"] for a in annotations})
    keys = dict(zip(coco_gt.getCatIds(), _category_keys(coco_gt, coco_gt.getCatIds())))
    return {keys[i]: 0.0 for i in present}


def _has_field(result: dict[str, Any], iou_type: str) -> bool:
    return (
        iou_type == "bbox"
        or (iou_type == "segm" and "segmentation" in result)
        or (iou_type == "keypoints" and "keypoints" in result)
    )


def _sigmas(coco_gt: COCO, sigmas: Sequence[float] | None) -> np.ndarray:
    if sigmas is not None:
        return np.asarray(sigmas, dtype=np.float64)
    names = next((c.get("keypoints") for c in coco_gt.dataset["categories"] if c.get("keypoints")), None)
    count = len(names) if names else 17
    if count == 17:  # COCO persons: pycocotools' own sigmas
        return COCOeval(iouType="keypoints").params.kpt_oks_sigmas
    return np.full(count, DEFAULT_KEYPOINT_SIGMA)


# -- distributed helpers -------------------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(items: list[Any]) -> list[Any]:
    rank, world = _rank_world()
    if world == 1:
        return items
    gathered: list[list[Any] | None] = [None] * world
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in (part or [])]


def _shard(length: int) -> list[int]:
    """This rank's dataset indices: ``rank::world_size`` under ``torch.distributed``, all of them otherwise."""
    rank, world = _rank_world()
    return list(range(rank, length, world))


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The bare model (DDP unwrapped) in eval mode; its train/eval mode is restored afterwards, also on error."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- detection -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_detection(
    model: nn.Module,
    dataset: Any,
    *,
    iou_types: Sequence[str] = ("bbox",),
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Run a torchvision detector over a ``DetectionDataset`` and score it with ``COCOeval`` (:func:`coco_evaluate`:
    the stats and AP per class name).

    The model is put in eval mode and restored afterwards. Under ``torch.distributed`` every rank evaluates images
    ``rank::world_size`` and all ranks return the same metrics. ``amp`` runs the forward passes under
    :func:`pvt_backbone.amp.autocast`; the outputs are cast back to float32 before scoring.
    """
    check_int("batch_size", batch_size, minimum=1)
    device = torch.device(device)
    indices = _shard(len(dataset))
    results: list[dict[str, Any]] = []
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if progress:
        batches = tqdm(batches, desc="eval", leave=False, dynamic_ncols=True)
    with _evaluating(model) as model:
        for batch in batches:
            samples = [dataset[i] for i in batch]
            images = [image.to(device) for image, _ in samples]
            with autocast(device, enabled=amp):
                outputs = model(images)
            outputs = [{k: v.float() if v.is_floating_point() else v for k, v in o.items()} for o in outputs]
            ids = [target["image_id"] for _, target in samples]
            results.extend(coco_results(outputs, ids, dataset.category_ids))
    results = _gather(results)
    metrics: dict[str, Any] = {}
    if _rank_world()[0] == 0:
        metrics = coco_evaluate(dataset.coco, results, iou_types)
    return _broadcast(metrics)


def _broadcast(value: dict[str, Any]) -> dict[str, Any]:
    rank, world = _rank_world()
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- segmentation --------------------------------------------------------------------------------------------------
class ConfusionMatrix:
    """Pixel counts ``matrix[true, predicted]`` over ``num_classes`` classes; ``ignore_index`` pixels are skipped.

    >>> cm = ConfusionMatrix(2)
    >>> cm.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 255]]))
    >>> cm.metrics()["mIoU"], cm.metrics()["pixel_accuracy"]
    (0.5, 0.6666666666666666)
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255) -> None:
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add an (..., H, W) predicted class map and its target (same shape)."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        valid = target != self.ignore_index
        t, p = target[valid].long().cpu(), prediction[valid].long().cpu()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(f"target has class ids outside [0, {self.num_classes}) other than {self.ignore_index}")
        self.matrix += torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        """Sum the matrix over processes; ``device`` is where the process group communicates (CUDA for nccl)."""
        if _rank_world()[1] > 1:
            total = self.matrix.to(device)
            dist.all_reduce(total)
            self.matrix = total.cpu()

    def metrics(self) -> dict[str, Any]:
        """``mIoU`` (mean over classes that occur in target or prediction), ``pixel_accuracy``, ``iou`` per class
        (NaN for classes that never occur)."""
        m = self.matrix.double()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
        present = union > 0
        total = m.sum()
        return {
            "mIoU": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_accuracy": float(inter.sum() / total) if total > 0 else 0.0,
            "iou": [float(v) for v in iou],
        }


def normalize_images(images: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> ImageNet-normalised, as the PVTv2 backbone was pretrained.

    The detectors normalise inside (``GeneralizedRCNNTransform``); the segmenters take normalised images.

    Example:
        >>> normalize_images(torch.full((1, 3, 1, 1), 0.485))[0, 0].item()
        0.0
    """
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def segmentation_logits(model: nn.Module, image: Tensor, *, size: int | None) -> Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B, num_classes, H, W) logits: the model sees the normalised image resized
    to ``size`` x ``size`` (if given), and its logits are resized back bilinearly before any argmax.

    Example:
        >>> model = semantic_fpn_pvt_v2("b0", num_classes=3, head="mlp").eval()
        >>> with torch.no_grad():
        ...     segmentation_logits(model, torch.rand(1, 3, 50, 70), size=64).shape
        torch.Size([1, 3, 50, 70])
    """
    height, width = image.shape[-2:]
    if size is not None:
        image = resize_bilinear(image, (size, size))
    logits = model(normalize_images(image))
    if logits.shape[-2:] != (height, width):
        logits = resize_bilinear(logits.float(), (height, width))
    return logits


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    dataset: Any,
    *,
    size: int | None = None,
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: bool = False,
    inference: Callable[[nn.Module, Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """mIoU and pixel accuracy of a segmenter over a ``SegmentationDataset``, at each image's own resolution.

    Images go through the model one at a time (sizes may differ), resized to ``size`` x ``size`` when given.
    ``inference(model, image)``, when given, maps a (1, 3, H, W) image in [0, 1] to its (1, C, H, W) logits
    instead (e.g. :class:`~pvt_backbone.training.seg_inference.SegmentationInference`); ``size`` is then unused.
    """
    if size is not None:
        check_int("size", size, minimum=1)
    device = torch.device(device)
    matrix = ConfusionMatrix(dataset.num_classes, ignore_index=dataset.ignore_index)
    indices: Iterable[int] = _shard(len(dataset))
    if progress:
        indices = tqdm(indices, desc="eval", leave=False, dynamic_ncols=True)
    with _evaluating(model) as model:
        for index in indices:
            image, mask = dataset[index]
            with autocast(device, enabled=amp):
                if inference is not None:
                    logits = inference(model, image[None].to(device))
                else:
                    logits = segmentation_logits(model, image[None].to(device), size=size)
            matrix.update(logits.argmax(1)[0].cpu(), mask)
    matrix.all_reduce(device)
    return matrix.metrics()
