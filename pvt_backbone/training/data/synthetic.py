"""Built-in data: deterministic synthetic scenes of textured shapes on cluttered backgrounds, generated from a seed.

Scene ``i`` of a split is a pure function of ``(seed, split, i)`` and the ``SyntheticConfig``: no files, nothing to
download, identical on every machine and in every DataLoader worker. Each scene carries everything the tasks
need: boxes, instance masks (occlusion-aware), four keypoints per object (its top-, right-, bottom- and left-most
points) and a semantic mask.

Example:
    >>> from pvt_backbone.training.data import SyntheticConfig, SyntheticShapes
    >>> data = SyntheticShapes("val", num_images=4, config=SyntheticConfig(image_size=128, num_classes=3))
    >>> image, target = data[0]
    >>> image.shape, target["boxes"].shape, target["masks"].shape, target["keypoints"].shape
    (torch.Size([3, 128, 128]), torch.Size([3, 4]), torch.Size([3, 128, 128]), torch.Size([3, 4, 3]))
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

from ...checks import check_float, check_int
from .base import DetectionDataset, SegmentationDataset, coco_from_dict

__all__ = [
    "SHAPES",
    "KEYPOINT_NAMES",
    "SyntheticConfig",
    "Scene",
    "render_scene",
    "SyntheticShapes",
    "SyntheticSegmentation",
    "write_coco",
    "write_mask_folder",
]

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
KEYPOINT_NAMES = ("top", "right", "bottom", "left")
_TEXTURES = ("solid", "stripes", "checker", "noise")
_SPLITS = {"train": 0, "val": 1}  # split name -> its code in the scene seed


@dataclass(frozen=True)
class SyntheticConfig:
    """How the scenes look.

    Args:
        image_size: side of the square images in pixels (>= 32).
        num_classes: how many shape classes appear, the first ``num_classes`` of ``SHAPES`` (1..6).
        min_objects / max_objects: objects per image, drawn uniformly (``min_objects=0`` allows empty images).
        min_scale / max_scale: object diameter as a fraction of the image side, within [0.05, 0.9].
        clutter: distractor strokes and blobs drawn on the background (>= 0).
        seed: base seed (>= 0); every scene is a function of (seed, split, index).

    Example:
        >>> SyntheticConfig(num_classes=2).categories
        ('circle', 'square')
    """

    image_size: int = 160
    num_classes: int = 3
    min_objects: int = 1
    max_objects: int = 4
    min_scale: float = 0.22
    max_scale: float = 0.5
    clutter: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("image_size", self.image_size, minimum=32)
        check_int("num_classes", self.num_classes, minimum=1, maximum=len(SHAPES))
        check_int("min_objects", self.min_objects, minimum=0)
        check_int("max_objects", self.max_objects, minimum=self.min_objects)
        check_float("min_scale", self.min_scale, minimum=0.05, maximum=0.9)
        check_float("max_scale", self.max_scale, minimum=self.min_scale, maximum=0.9)
        check_int("clutter", self.clutter, minimum=0)
        check_int("seed", self.seed, minimum=0)

    @property
    def categories(self) -> tuple[str, ...]:
        """The shape names of labels 1..``num_classes``."""
        return SHAPES[: self.num_classes]


@dataclass(frozen=True)
class Scene:
    """One rendered scene (NumPy, HWC). N objects, K = 4 keypoints; labels count from 1, 0 is background."""

    image: np.ndarray  # (H, W, 3) uint8
    boxes: np.ndarray  # (N, 4) float32, xyxy pixel edges of the visible mask
    labels: np.ndarray  # (N,) int64 in 1..num_classes
    masks: np.ndarray  # (N, H, W) uint8, visible part of each object
    keypoints: np.ndarray  # (N, 4, 3) float32: x, y, visibility (2 visible, 1 occluded)
    semantic: np.ndarray  # (H, W) uint8 class id per pixel


def _split_code(split: str) -> int:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    return _SPLITS[split]


def _polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of the polygonal shapes, rotated by ``angle`` around the centre."""
    if kind == "square":
        corners = [(math.pi / 4 + k * math.pi / 2, radius) for k in range(4)]
    elif kind == "triangle":
        corners = [(-math.pi / 2 + k * 2 * math.pi / 3, radius) for k in range(3)]
    elif kind == "star":
        corners = [(-math.pi / 2 + k * math.pi / 5, radius if k % 2 == 0 else radius * 0.45) for k in range(10)]
    elif kind == "cross":
        arm, w = radius, radius * 0.36
        local = [
            (w, -arm),
            (w, -w),
            (arm, -w),
            (arm, w),
            (w, w),
            (w, arm),
            (-w, arm),
            (-w, w),
            (-arm, w),
            (-arm, -w),
            (-w, -w),
            (-w, -arm),
        ]
        corners = [(math.atan2(y, x), math.hypot(x, y)) for x, y in local]
    else:
        raise AssertionError(kind)
    return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for a, r in corners]


def _shape_mask(kind: str, size: int, cx: float, cy: float, radius: float, angle: float, aspect: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if kind in ("circle", "ring"):
        rx, ry = radius * aspect, radius / aspect
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=1)
        if kind == "ring":
            draw.ellipse((cx - 0.55 * rx, cy - 0.55 * ry, cx + 0.55 * rx, cy + 0.55 * ry), fill=0)
    else:
        draw.polygon(_polygon(kind, cx, cy, radius, angle), fill=1)
    return np.asarray(canvas, dtype=np.uint8)


def _colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A random colour at least some distance from ``avoid`` (the local background), so objects stay visible."""
    for _ in range(20):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - avoid).sum() > 150:
            break
    return colour.astype(np.float32)


def _texture(rng: np.random.Generator, size: int, base: np.ndarray) -> np.ndarray:
    """A (size, size, 3) float texture around colour ``base``: solid, stripes, checker or noise."""
    kind = _TEXTURES[rng.integers(len(_TEXTURES))]
    out = np.broadcast_to(base, (size, size, 3)).copy()
    if kind == "solid":
        return out
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(4, 10)
    if kind == "stripes":
        theta = rng.uniform(0, math.pi)
        on = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period) > 0
    elif kind == "checker":
        on = ((xx // period) + (yy // period)) % 2 == 0
    else:
        return np.clip(out + rng.normal(0, 28, size=out.shape), 0, 255)
    shade = rng.uniform(0.45, 0.75)
    out[on] *= shade
    return out


def _background(rng: np.random.Generator, size: int, clutter: int) -> np.ndarray:
    """A two-colour gradient with low-frequency blotches, noise, and random strokes and blobs as distractors."""
    c0, c1 = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = np.clip(0.5 + (xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta), 0, 1)[..., None]
    image = c0 * (1 - t) + c1 * t
    coarse = rng.normal(0, 25, size=(4, 4, 3)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(np.uint8(np.clip(coarse + 128, 0, 255))).resize((size, size), Image.BILINEAR))
    image = image + blotches.astype(np.float32) - 128 + rng.normal(0, 8, size=image.shape)
    canvas = Image.fromarray(np.uint8(np.clip(image, 0, 255)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(clutter):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.6:  # a stroke
            x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, size=4))
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 4)))
        else:  # a small blob, smaller than any object
            r = rng.uniform(1.5, 0.04 * size + 2)
            x, y = (float(v) for v in rng.uniform(0, size, size=2))
            draw.ellipse((x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r), fill=colour)
    return np.asarray(canvas, dtype=np.float32)


def _extreme_points(full: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """(4, 3) keypoints: top-, right-, bottom-, left-most pixel centres of ``full``; visibility from ``visible``."""
    ys, xs = np.nonzero(full)
    picks = (np.argmin(ys), np.argmax(xs), np.argmax(ys), np.argmin(xs))
    points = np.zeros((4, 3), dtype=np.float32)
    for k, i in enumerate(picks):
        x, y = int(xs[i]), int(ys[i])
        points[k] = (x + 0.5, y + 0.5, 2.0 if visible[y, x] else 1.0)
    return points


def render_scene(config: SyntheticConfig, split: str, index: int) -> Scene:
    """Render scene ``index`` of ``split``; the same arguments always give the same arrays."""
    rng = np.random.default_rng([config.seed, _split_code(split), index])
    size = config.image_size
    image = _background(rng, size, config.clutter)
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    labels: list[int] = []
    full_masks: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    for _ in range(count):
        label = int(rng.integers(1, config.num_classes + 1))
        kind = SHAPES[label - 1]
        for _attempt in range(20):
            radius = 0.5 * size * rng.uniform(config.min_scale, config.max_scale)
            cx, cy = rng.uniform(radius, size - radius, size=2)
            full = _shape_mask(kind, size, cx, cy, radius, rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.25))
            # Accept if it hides at most a fifth of every object already placed.
            if full.sum() >= 16 and all((full & m).sum() <= 0.2 * m.sum() for m in visible):
                break
        else:
            continue
        for m in visible:
            m &= 1 - full
        local = image[full.astype(bool)].mean(axis=0)
        image = np.where(full[..., None].astype(bool), _texture(rng, size, _colour(rng, local)), image)
        labels.append(label)
        full_masks.append(full)
        visible.append(full.copy())
    masks = np.stack(visible) if visible else np.zeros((0, size, size), dtype=np.uint8)
    boxes = np.zeros((len(labels), 4), dtype=np.float32)
    keypoints = np.zeros((len(labels), len(KEYPOINT_NAMES), 3), dtype=np.float32)
    semantic = np.zeros((size, size), dtype=np.uint8)
    for i, (label, full, m) in enumerate(zip(labels, full_masks, masks)):
        ys, xs = np.nonzero(m)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        keypoints[i] = _extreme_points(full, m)
        semantic[m.astype(bool)] = label
    return Scene(
        image=np.uint8(np.clip(image, 0, 255)),
        boxes=boxes,
        labels=np.asarray(labels, dtype=np.int64),
        masks=masks,
        keypoints=keypoints,
        semantic=semantic,
    )


def _image_tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


class _SyntheticBase:
    def __init__(self, split: str = "train", *, num_images: int = 256, config: SyntheticConfig | None = None) -> None:
        _split_code(split)
        check_int("num_images", num_images, minimum=1)
        self.split = split
        self.num_images = num_images
        self.config = config if config is not None else SyntheticConfig()

    def __len__(self) -> int:
        return self.num_images

    def _scene(self, index: int) -> Scene:
        self._scene_range(index)
        return render_scene(self.config, self.split, index % self.num_images)

    def image_name(self, index: int) -> str:
        return f"synthetic_{self.split}_{index:06d}.png"

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of scene ``index``: every scene is ``config.image_size`` square."""
        self._scene_range(index)
        return self.config.image_size, self.config.image_size

    def _scene_range(self, index: int) -> None:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")


class SyntheticShapes(_SyntheticBase, DetectionDataset):
    """Detection, instance-segmentation and keypoint data: ``num_images`` scenes of ``split``.

    Labels 1..K name ``SHAPES[:K]``; the COCO category id of label k is k. Every object has a mask and the four
    keypoints ``KEYPOINT_NAMES``.
    """

    has_masks = True
    keypoint_names = KEYPOINT_NAMES

    def __init__(self, split: str = "train", *, num_images: int = 256, config: SyntheticConfig | None = None) -> None:
        super().__init__(split, num_images=num_images, config=config)
        self.categories = self.config.categories
        self.category_ids = tuple(range(1, len(self.categories) + 1))

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        scene = self._scene(index)
        target = {
            "boxes": torch.from_numpy(scene.boxes),
            "labels": torch.from_numpy(scene.labels),
            "masks": torch.from_numpy(scene.masks),
            "keypoints": torch.from_numpy(scene.keypoints),
            "image_id": index + 1,
        }
        return _image_tensor(scene.image), target

    @cached_property
    def coco(self) -> COCO:
        """Ground truth of all scenes as a pycocotools index (image ids are ``index + 1``), masks as RLE."""
        size = self.config.image_size
        images, annotations = [], []
        for index in range(self.num_images):
            scene = self._scene(index)
            images.append({"id": index + 1, "width": size, "height": size, "file_name": self.image_name(index)})
            for box, label, mask, points in zip(scene.boxes, scene.labels, scene.masks, scene.keypoints):
                rle = mask_utils.encode(np.asfortranarray(mask))
                rle["counts"] = rle["counts"].decode("ascii")
                x0, y0, x1, y1 = (float(v) for v in box)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": index + 1,
                        "category_id": int(label),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": float(mask.sum()),
                        "iscrowd": 0,
                        "segmentation": rle,
                        "keypoints": [float(v) for v in points.reshape(-1)],
                        "num_keypoints": int((points[:, 2] > 0).sum()),
                    }
                )
        categories = [
            {"id": i + 1, "name": name, "supercategory": "shape", "keypoints": list(KEYPOINT_NAMES), "skeleton": []}
            for i, name in enumerate(self.categories)
        ]
        return coco_from_dict({"images": images, "annotations": annotations, "categories": categories})


class SyntheticSegmentation(_SyntheticBase, SegmentationDataset):
    """Semantic segmentation of the same scenes: class 0 is background, class k is ``SHAPES[k - 1]``."""

    def __init__(self, split: str = "train", *, num_images: int = 256, config: SyntheticConfig | None = None) -> None:
        super().__init__(split, num_images=num_images, config=config)
        self.classes = ("background",) + self.config.categories

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        scene = self._scene(index)
        return _image_tensor(scene.image), torch.from_numpy(scene.semantic.astype(np.int64))


def write_coco(dataset: SyntheticShapes, image_dir: str | Path, annotation_file: str | Path) -> None:
    """Save scenes as PNG files plus a COCO instances JSON (RLE masks, keypoints): a ready ``--dataset coco`` input."""
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    for index in range(len(dataset)):
        Image.fromarray(dataset._scene(index).image).save(image_dir / dataset.image_name(index))
    Path(annotation_file).write_text(json.dumps(dataset.coco.dataset))


def write_mask_folder(dataset: SyntheticSegmentation, image_dir: str | Path, mask_dir: str | Path) -> None:
    """Save scenes as ``image_dir/<name>.png`` and class-id masks ``mask_dir/<name>.png``: a ``--dataset folder``."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for index in range(len(dataset)):
        scene = dataset._scene(index)
        Image.fromarray(scene.image).save(image_dir / dataset.image_name(index))
        Image.fromarray(scene.semantic).save(mask_dir / dataset.image_name(index))
