"""Use a trained checkpoint: rebuild the model from its ``run.json``, predict on images, draw the predictions.

``load_trained`` also takes a published detector file (an mmdet RetinaNet / Faster R-CNN / Mask R-CNN checkpoint or a
``save_detector`` ``.safetensors``), which needs no ``run.json``: the model is built by its
``pvt_backbone.detection`` builder's ``weights=`` (mmdet's resizing, 800 / 1333 px, and mean/std) and its
``ModelSpec`` names ``model.class_names``, with COCO's category ids when they are COCO's 80 classes.

Drawing uses ``torchvision.utils.draw_bounding_boxes``, ``draw_segmentation_masks`` and ``draw_keypoints``; class id
``i`` is drawn in :func:`class_colour` ``(i)`` (``PALETTE[i]``, then generated colours).

Example:
    A one-step segmentation run on synthetic scenes, then its checkpoint used on a validation scene:

    >>> from pvt_backbone.training import DataSpec, TrainConfig, train
    >>> from pvt_backbone.training.data import SyntheticConfig, SyntheticSegmentation
    >>> data = DataSpec(image_size=64, train_size=1, val_size=1)
    >>> config = TrainConfig(output_dir="run", model="segformer_head", variant="b0", data=data, max_steps=1,
    ...                      batch_size=1, eval=False, workers=0, progress=False, device="cpu")
    >>> result = train(config)
    >>> model, spec = load_trained("run")
    >>> image, _ = SyntheticSegmentation("val", num_images=1, config=SyntheticConfig(image_size=64))[0]
    >>> prediction = predict(model, spec, image)
    >>> prediction.classes.shape, prediction.names
    (torch.Size([64, 64]), ('background', 'circle', 'square', 'triangle'))
    >>> picture = draw(image, prediction)
    >>> picture.shape, picture.dtype
    (torch.Size([3, 64, 64]), torch.uint8)
    >>> draw(image, prediction, scale=2.5).shape  # drawn on a larger copy, for labels that fit
    torch.Size([3, 160, 160])
"""

from __future__ import annotations

import colorsys
import glob
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

from ..checks import check_float
from ..weights.detectors import COCO_CATEGORY_IDS, COCO_CLASSES, is_detector_file, load_detector
from ..weights.layouts import CheckpointError
from .checkpoint import CheckpointNotFound, RunCheckpoint, load_run_weights, resolve_checkpoint
from .data.folder import IMAGE_SUFFIXES
from .evaluation import segmentation_logits
from .tasks import ModelSpec, build_model

__all__ = [
    "OneBasedLabels",
    "Detections",
    "SegmentationMap",
    "load_trained",
    "load_published_detector",
    "predict",
    "draw",
    "scale_prediction",
    "check_draw_scale",
    "find_images",
    "PALETTE",
    "MAX_DRAW_SCALE",
    "class_colour",
    "mask_rle",
]

# Distinct, saturated colours (Tableau 10 and a few more), one per class id.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#e7ba52",
    "#ad494a",
    "#637939",
    "#7b4173",
    "#3182bd",
)
# Largest factor :func:`draw` enlarges a picture by (a 4000 px photo at 8x is already 32000 px wide).
MAX_DRAW_SCALE = 8.0


def class_colour(class_id: int) -> tuple[int, int, int]:
    """The RGB colour of a class id: ``PALETTE[class_id]``, and for ids past the palette a generated colour (hues
    spaced by the golden ratio of a turn, alternating brightness), unlike its neighbours'.

    Example:
        >>> class_colour(1), class_colour(16), class_colour(17)
        ((255, 127, 14), (129, 29, 191), (35, 235, 101))
        >>> len({class_colour(i) for i in range(256)})  # one colour per id a uint8 mask can hold
        256
    """
    if class_id < len(PALETTE):
        code = PALETTE[class_id].lstrip("#")
        return int(code[0:2], 16), int(code[2:4], 16), int(code[4:6], 16)
    extra = class_id - len(PALETTE)
    red, green, blue = colorsys.hsv_to_rgb((extra * 0.618034 + 0.77) % 1.0, 0.85, 0.92 if extra % 2 else 0.75)
    return round(red * 255), round(green * 255), round(blue * 255)


def mask_rle(mask: Tensor) -> dict[str, Any]:
    """An (H, W) bool mask as COCO compressed RLE: ``{"size": [H, W], "counts": str}`` (``pycocotools.mask.decode``
    reads it back).

    Example:
        >>> rle = mask_rle(torch.tensor([[True, False], [True, True]]))
        >>> rle["size"], mask_utils.decode({**rle, "counts": rle["counts"].encode()}).tolist()
        ([2, 2], [[1, 0], [1, 1]])
    """
    rle = mask_utils.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@dataclass(frozen=True)
class Detections:
    """Detections of one image (N kept, in input pixels): ``boxes`` (N, 4) xyxy, ``scores`` (N,), ``labels`` (N,) in
    1..K, ``names`` their class names, ``masks`` (N, H, W) bool or None, ``keypoints`` (N, K, 3) or None.

    :meth:`to_json` gives one dict per detection: ``box_xyxy``, ``score``, ``label``, ``name`` (and ``category_id``
    when given), plus ``mask_area`` and ``segmentation`` (:func:`mask_rle`) with masks, ``keypoints`` with keypoints.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: tuple[str, ...]
    masks: Tensor | None = None
    keypoints: Tensor | None = None

    def to_json(self, category_ids: tuple[int, ...] = ()) -> list[dict[str, Any]]:
        out = []
        for i in range(len(self.scores)):
            x0, y0, x1, y1 = (round(float(v), 2) for v in self.boxes[i])
            item: dict[str, Any] = {
                "box_xyxy": [x0, y0, x1, y1],
                "score": round(float(self.scores[i]), 4),
                "label": int(self.labels[i]),
                "name": self.names[i],
            }
            if category_ids:
                item["category_id"] = category_ids[int(self.labels[i]) - 1]
            if self.masks is not None:
                item["mask_area"] = int(self.masks[i].sum())
                item["segmentation"] = mask_rle(self.masks[i])
            if self.keypoints is not None:
                item["keypoints"] = [[round(float(v), 2) for v in point] for point in self.keypoints[i]]
            out.append(item)
        return out


@dataclass(frozen=True)
class SegmentationMap:
    """Class id per pixel, (H, W) int64, at the input image's size; ``classes`` names the ids."""

    classes: Tensor
    names: tuple[str, ...]

    def to_json(self) -> dict[str, int]:
        counts = torch.bincount(self.classes.flatten(), minlength=len(self.names))
        return {name: int(c) for name, c in zip(self.names, counts) if c > 0}


class OneBasedLabels(nn.Module):
    """A detector whose outputs label classes 0..K-1 (a published RetinaNet: mmdet's class index), seen with labels
    1..K as ``ModelSpec`` and the COCO evaluation count them; training-mode calls (losses) pass through unchanged.

    ``detector`` is the wrapped model; ``class_names`` is indexed by the shifted label (index 0
    ``"__background__"``), ``load_report`` is the detector's.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.class_names: tuple[str, ...] = ("__background__", *detector.class_names)
        self.load_report = getattr(detector, "load_report", None)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """(3, H, W) images in [0, 1] -> the detector's output, eval-mode ``labels`` (N,) plus one."""
        output = self.detector(images, targets)
        if self.training:
            return output
        return [{**detections, "labels": detections["labels"] + 1} for detections in output]


def load_published_detector(
    path: str | Path, *, device: torch.device | str = "cpu", trust_pickle: bool = False
) -> tuple[nn.Module, ModelSpec]:
    """The eval-mode detector of a published detector file and its ``ModelSpec`` (labels 1..K named by
    ``class_names``; a RetinaNet is wrapped in :class:`OneBasedLabels`).

    Raises:
        FileNotFoundError, CheckpointError, ValueError: as ``pvt_backbone.weights.detectors.load_detector``.
    """
    model = load_detector(path, trust_pickle=trust_pickle)
    arch = model.load_report.arch
    if arch == "retinanet":
        model = OneBasedLabels(model)
    names = tuple(model.class_names[1:])
    spec = ModelSpec(
        "instance" if arch == "maskrcnn" else "detection",
        arch,
        model.load_report.variant or "custom",
        len(names) + 1,
        max(32, _min_size(model)),
        names,
        COCO_CATEGORY_IDS if names == COCO_CLASSES else (),
    )
    return model.to(device).eval(), spec


def _min_size(model: nn.Module) -> int:
    """The shorter side a detector resizes images to (its transform's ``min_size``)."""
    return int(getattr(model, "detector", model).transform.min_size[0])


def load_trained(
    path: str | Path, *, device: torch.device | str = "cpu", trust_pickle: bool = False
) -> tuple[nn.Module, ModelSpec]:
    """The eval-mode model of a run directory, checkpoint directory or ``model.safetensors`` with its ``run.json``;
    or of a published detector file (:func:`load_published_detector`; ``trust_pickle`` for its pickle).

    Raises:
        CheckpointNotFound: (a ``FileNotFoundError``) no checkpoint at ``path``, or no ``run.json`` beside it.
        CheckpointError: (a ``ValueError``) the ``run.json`` is not JSON or does not describe a model, or the
            weights do not fit the model it describes; the message names the file.
    """
    if Path(path).is_file() and is_detector_file(path, trust_pickle=trust_pickle):
        return load_published_detector(path, device=device, trust_pickle=trust_pickle)
    checkpoint = resolve_checkpoint(path)
    spec = _model_spec(checkpoint)
    try:
        model = build_model(spec)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{checkpoint.run}: its model description cannot be built: {error}") from None
    load_run_weights(model, checkpoint.weights)
    return model.to(device).eval(), spec


def _model_spec(checkpoint: RunCheckpoint) -> ModelSpec:
    """The :class:`ModelSpec` in a checkpoint's ``run.json``, every way it can be broken named with the file."""
    try:
        info = checkpoint.run_info()
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{checkpoint.run}: not a readable run description ({error})") from None
    if not isinstance(info, dict) or "model" not in info:
        raise CheckpointNotFound(
            f"{checkpoint.run}: not found or has no model description; a trained model needs the run.json that "
            "training writes next to model.safetensors"
        )
    try:
        return ModelSpec.from_dict(info["model"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{checkpoint.run}: its model description is incomplete or invalid: {error}") from None


@torch.no_grad()
def predict(model: nn.Module, spec: ModelSpec, image: Tensor, *, score_threshold: float = 0.5) -> Any:
    """One (3, H, W) image in [0, 1] -> ``Detections`` (scores >= ``score_threshold``) or ``SegmentationMap``."""
    check_float("score_threshold", score_threshold, minimum=0.0, maximum=1.0)
    device = next(model.parameters(), torch.empty(0)).device  # an exported model has no parameters: cpu
    if spec.task == "segmentation":
        logits = segmentation_logits(model, image[None].to(device), size=spec.image_size)
        return SegmentationMap(logits.argmax(1)[0].cpu(), spec.class_names)
    output = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
    keep = output["scores"] >= score_threshold
    labels = output["labels"][keep]
    names = tuple(spec.class_names[int(i) - 1] if 1 <= int(i) <= len(spec.class_names) else str(int(i)) for i in labels)
    masks = output["masks"][keep][:, 0] > 0.5 if "masks" in output else None
    keypoints = output["keypoints"][keep] if "keypoints" in output else None
    return Detections(output["boxes"][keep], output["scores"][keep], labels, names, masks, keypoints)


def check_draw_scale(scale: object) -> float:
    """``float(scale)`` if it is a finite number in (0, ``MAX_DRAW_SCALE``]; ``TypeError``/``ValueError`` otherwise.

    Example:
        >>> check_draw_scale(0)
        Traceback (most recent call last):
        ...
        ValueError: scale must be a finite number in (0, 8], got 0
    """
    value = check_float("scale", scale)
    if not 0 < value <= MAX_DRAW_SCALE:
        raise ValueError(f"scale must be a finite number in (0, {MAX_DRAW_SCALE:g}], got {scale!r}")
    return value


def scale_prediction(prediction: Any, scale: float) -> Any:
    """A prediction on an image enlarged ``scale`` times: boxes and keypoint coordinates multiplied, masks and
    class maps resized nearest-neighbour to the enlarged (H', W') = (round(H * scale), round(W * scale)).

    Example:
        >>> segmentation = SegmentationMap(torch.tensor([[0, 1], [2, 3]]), ("a", "b", "c", "d"))
        >>> scale_prediction(segmentation, 2.0).classes.shape
        torch.Size([4, 4])
    """
    check_draw_scale(scale)
    if isinstance(prediction, SegmentationMap):
        return SegmentationMap(_resize_nearest(prediction.classes, scale), prediction.names)
    masks = _resize_nearest(prediction.masks, scale) if prediction.masks is not None else None
    keypoints = prediction.keypoints
    if keypoints is not None:
        keypoints = torch.cat([keypoints[..., :2] * scale, keypoints[..., 2:]], dim=-1)
    return replace(prediction, boxes=prediction.boxes * scale, masks=masks, keypoints=keypoints)


def _resize_nearest(maps: Tensor, scale: float) -> Tensor:
    """(..., H, W) integer or bool maps -> (..., round(H * scale), round(W * scale)), nearest neighbour."""
    size = [max(1, round(side * scale)) for side in maps.shape[-2:]]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).to(torch.uint8 if maps.dtype == torch.bool else torch.float32)
    resized = F.interpolate(flat, size=size, mode="nearest-exact") if flat.numel() else flat.new_zeros(0, 1, *size)
    return resized.to(maps.dtype).reshape(*maps.shape[:-2], *size)


def _enlarge(image: Tensor, scale: float) -> Tensor:
    """A (3, H, W) image in [0, 1] resized bilinearly to (3, round(H * scale), round(W * scale))."""
    size = [max(1, round(side * scale)) for side in image.shape[-2:]]
    return F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def draw(image: Tensor, prediction: Any, *, line_width: int | None = None, scale: float = 1.0) -> Tensor:
    """Draw a prediction on a (3, H, W) image in [0, 1]; returns (3, H', W') uint8, (H', W') = (H, W) * ``scale``.

    Detections: masks (alpha 0.45), boxes with ``"name score"`` labels, keypoints. Segmentation: every class but
    0 (background) painted over the image. ``scale`` in (0, ``MAX_DRAW_SCALE``] draws on an enlarged copy (the
    prediction scaled with it, :func:`scale_prediction`), so that the fixed-size label text fits small images.
    """
    check_draw_scale(scale)
    if scale != 1.0:
        image, prediction = _enlarge(image, scale), scale_prediction(prediction, scale)
    canvas = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    width = line_width or max(1, round(min(canvas.shape[-2:]) / 160))
    if isinstance(prediction, SegmentationMap):
        ids = [int(i) for i in prediction.classes.unique() if int(i) != 0]
        if ids:
            masks = torch.stack([prediction.classes == i for i in ids])
            canvas = draw_segmentation_masks(canvas, masks, alpha=0.5, colors=[class_colour(i) for i in ids])
        return canvas
    if len(prediction.scores) == 0:
        return canvas
    return _draw_detections(canvas, prediction, width)


def _draw_detections(canvas: Tensor, prediction: Detections, width: int) -> Tensor:
    """Masks, labelled boxes and keypoints of ``prediction`` on a (3, H, W) uint8 canvas."""
    colours = [class_colour(int(label)) for label in prediction.labels]
    if prediction.masks is not None:
        canvas = draw_segmentation_masks(canvas, prediction.masks, alpha=0.45, colors=colours)
    text = [f"{name} {float(score):.2f}" for name, score in zip(prediction.names, prediction.scores)]
    canvas = draw_bounding_boxes(
        canvas,
        prediction.boxes,
        labels=text,
        colors=colours,
        width=width,
        label_colors="white",
        label_background_colors=colours,
        fill_labels=True,
    )
    if prediction.keypoints is not None:
        visible = prediction.keypoints[..., 2:] > 0
        canvas = draw_keypoints(
            canvas, prediction.keypoints[..., :2], visibility=visible[..., 0], colors="white", radius=max(1, width + 1)
        )
    return canvas


def find_images(source: str | Path) -> list[Path]:
    """An image file, every image in a folder (sorted, not recursive), or every image a glob pattern matches."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return found
    matches = sorted(Path(p) for p in glob.glob(str(source), recursive=True))
    found = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise FileNotFoundError(f"{source}: no such image file or folder, and no image matches it as a glob pattern")
    return found
