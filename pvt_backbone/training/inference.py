"""Use a trained checkpoint: rebuild the model from its ``run.json``, predict on images, draw the predictions.

Drawing uses ``torchvision.utils.draw_bounding_boxes``, ``draw_segmentation_masks`` and ``draw_keypoints``.

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
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

from ..checks import check_float
from ..weights.layouts import CheckpointError
from .checkpoint import CheckpointNotFound, RunCheckpoint, load_run_weights, resolve_checkpoint
from .data.folder import IMAGE_SUFFIXES
from .evaluation import segmentation_logits
from .tasks import ModelSpec, build_model

__all__ = ["Detections", "SegmentationMap", "load_trained", "predict", "draw", "find_images", "PALETTE"]

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


@dataclass(frozen=True)
class Detections:
    """Detections of one image (N kept, in input pixels): ``boxes`` (N, 4) xyxy, ``scores`` (N,), ``labels`` (N,) in
    1..K, ``names`` their class names, ``masks`` (N, H, W) bool or None, ``keypoints`` (N, K, 3) or None."""

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


def load_trained(path: str | Path, *, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec]:
    """The eval-mode model of a run directory, checkpoint directory or ``model.safetensors`` with its ``run.json``.

    Raises:
        CheckpointNotFound: (a ``FileNotFoundError``) no checkpoint at ``path``, or no ``run.json`` beside it.
        CheckpointError: (a ``ValueError``) the ``run.json`` is not JSON or does not describe a model, or the
            weights do not fit the model it describes; the message names the file.
    """
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
    device = next(model.parameters()).device
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


def _colour(label: int) -> str:
    return PALETTE[label % len(PALETTE)]


def draw(image: Tensor, prediction: Any, *, line_width: int | None = None) -> Tensor:
    """Draw a prediction on a (3, H, W) image in [0, 1]; returns (3, H, W) uint8.

    Detections: masks (alpha 0.45), boxes with ``"name score"`` labels, keypoints. Segmentation: every class but
    0 (background) painted over the image.
    """
    canvas = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    width = line_width or max(1, round(min(canvas.shape[-2:]) / 160))
    if isinstance(prediction, SegmentationMap):
        ids = [int(i) for i in prediction.classes.unique() if int(i) != 0]
        if ids:
            masks = torch.stack([prediction.classes == i for i in ids])
            canvas = draw_segmentation_masks(canvas, masks, alpha=0.5, colors=[_colour(i) for i in ids])
        return canvas
    if len(prediction.scores) == 0:
        return canvas
    colours = [_colour(int(label)) for label in prediction.labels]
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
