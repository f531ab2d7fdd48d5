"""The keep-ratio segmentation protocol: training crops, label reduction, sliding-window and multi-scale inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pvt_backbone.training.data import DataError, SegmentationFolder
from pvt_backbone.training.data.seg_transforms import (
    KeepRatioSegmentation,
    cat_max_crop,
    fit_scale,
    reduce_zero_label,
)
from pvt_backbone.training.evaluation import evaluate_segmentation, segmentation_logits
from pvt_backbone.training.seg_inference import InferenceView, SegmentationInference, _windows, slide_logits
from pvt_backbone.training.tasks import DataSpec, build_datasets
from pvt_backbone.training.trainer import TrainConfig, train


class _PerPixel(nn.Module):
    """A segmenter without receptive field: a 1x1 conv at output stride 1."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Pairs:
    """(image, mask) pairs of the given sizes (mask: class = column band, a 255 strip on top)."""

    ignore_index = 255
    classes = ("a", "b", "c")
    num_classes = 3

    def __init__(self, sizes: list[tuple[int, int]]) -> None:
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = self.sizes[index]
        generator = torch.Generator().manual_seed(index)
        mask = (torch.arange(width) * 3 // width).expand(height, width).clone()
        mask[:2] = 255
        return torch.rand(3, height, width, generator=generator), mask


def test_window_placement_follows_mmseg() -> None:
    assert _windows(683, 512, 341) == [(0, 512), (171, 683)]
    assert _windows(512, 512, 341) == [(0, 512)]
    assert _windows(300, 512, 341) == [(0, 300)]
    assert _windows(1200, 512, 341) == [(0, 512), (341, 853), (682, 1194), (688, 1200)]


@pytest.mark.parametrize("size", [(37, 53), (16, 61)])
def test_sliding_window_equals_whole_image_for_a_per_pixel_model(size: tuple[int, int]) -> None:
    model = _PerPixel().eval()
    image = torch.rand(1, 3, *size)
    with torch.no_grad():
        whole = segmentation_logits(model, image, size=None)
        assert torch.allclose(slide_logits(model, image, crop=16, stride=11), whole, atol=1e-6)
        # scale equal to the image: no rescale, so slide and whole inference (with flip) agree too
        scale = (max(size), min(size))
        slide = SegmentationInference(scale=scale, mode="slide", crop=16, stride=11, flip=True)(model, image)
        plain = SegmentationInference(scale=scale, mode="whole")(model, image)
    assert torch.allclose(slide, whole, atol=1e-5) and torch.allclose(plain, whole, atol=1e-6)


def test_multi_scale_flip_logits_come_back_at_the_original_size() -> None:
    model = _PerPixel().eval()
    rows, columns = torch.meshgrid(torch.linspace(0, 1, 30), torch.linspace(0, 1, 45), indexing="ij")
    image = torch.stack([rows, columns, rows * columns])[None]  # smooth: resampling nearly keeps it
    inference = SegmentationInference(scale=(96, 32), mode="slide", crop=24, stride=16, scales=(0.75, 1.0, 1.5))
    with torch.no_grad():
        logits = inference(model, image)
        single = SegmentationInference(scale=(96, 32), mode="whole")(model, image)
    assert logits.shape == (1, 3, 30, 45)
    assert not torch.allclose(logits, single)  # the extra scales contribute
    assert torch.allclose(logits, single, atol=0.05)  # ... to an average of near-equal per-pixel logits


def test_reduce_zero_label_mapping() -> None:
    mask = torch.tensor([[0, 1, 2], [150, 255, 7]])
    assert reduce_zero_label(mask).tolist() == [[255, 0, 1], [149, 255, 6]]
    assert reduce_zero_label(mask.numpy()).tolist() == [[255, 0, 1], [149, 255, 6]]


def _write_folder(root: Path, sizes: list[tuple[int, int]], zero_label: bool = False) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate(sizes):
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[:, width // 3 :] = 1
        mask[height // 2 :, 2 * width // 3 :] = 2
        if zero_label:
            mask += 1
            mask[:3] = 0  # unlabelled
        pixels = (rng.random((height, width, 3)) * 60).astype(np.uint8) + (mask[..., None] * 60).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        Image.fromarray(mask).save(masks / f"{i}.png")
    return images, masks


def test_folder_reduces_zero_label(tmp_path: Path) -> None:
    images, masks = _write_folder(tmp_path, [(20, 30)], zero_label=True)
    with pytest.raises(DataError, match="outside"):
        SegmentationFolder(images, masks, num_classes=3)
    data = SegmentationFolder(images, masks, num_classes=3, reduce_zero_label=True)
    raw = np.asarray(Image.open(masks / "0.png"), dtype=np.int64)
    mask = data[0][1]
    assert bool((mask[raw == 0] == 255).all()) and torch.equal(mask[raw > 0], torch.from_numpy(raw[raw > 0] - 1))
    assert SegmentationFolder(images, masks, reduce_zero_label=True).num_classes == 3
    with pytest.raises(ValueError, match="reduce_zero_label"):
        DataSpec(reduce_zero_label=True)


def test_cat_max_ratio_is_respected() -> None:
    mask = torch.zeros(40, 40, dtype=torch.int64)
    mask[:, 30:] = 1  # a single 16 px draw has ~1 in 4 chance of holding < 75 % class 0
    mask[:8] = 255  # ignored pixels do not count
    qualified = 0
    for seed in range(40):
        top, left = cat_max_crop(mask, 16, np.random.default_rng(seed), cat_max_ratio=0.75)
        crop = mask[top : top + 16, left : left + 16]
        labelled = crop[crop != 255]
        share = max(int((labelled == c).sum()) for c in (0, 1)) / labelled.numel()
        if share < 0.75 and len(labelled.unique()) > 1:
            qualified += 1
        else:  # kept only when none of the 10 draws qualifies: the same draws again find none
            rng = np.random.default_rng(seed)
            for _ in range(10):
                top_, left_ = int(rng.integers(25)), int(rng.integers(25))
                window = mask[top_ : top_ + 16, left_ : left_ + 16]
                window = window[window != 255]
                assert window.numel() == 0 or (window == 0).float().mean() >= 0.75 or (window == 1).all()
    assert qualified >= 30
    first = [cat_max_crop(mask, 16, np.random.default_rng(seed), cat_max_ratio=1.0)[1] for seed in range(40)]
    assert sum(left > 18 for left in first) < 20  # without the check most crops are class 0 alone


def test_keep_ratio_training_view() -> None:
    data = _Pairs([(30, 90), (60, 40)])
    view = KeepRatioSegmentation(data, crop_size=32, scale=(128, 32), ratio_range=(0.5, 2.0))
    shapes = set()
    for seed in range(8):
        image, mask = view[(seed % 2, seed)]
        again = view[(seed % 2, seed)]
        assert torch.equal(image, again[0]) and torch.equal(mask, again[1])
        assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 1, 2, 255}
        shapes.add(int((mask == 255).sum()))
    assert len(shapes) > 1  # padding and ignore strips vary with the rescale
    assert fit_scale(30, 90, (128, 32)) == (32, 96)  # shorter side reaches 32 before the longer reaches 128


def test_evaluation_uses_the_view_inference() -> None:
    model = _PerPixel().eval()
    data = _Pairs([(20, 33), (25, 19)])
    inference = SegmentationInference(scale=(64, 16), mode="slide", crop=16, stride=11, flip=True)
    view = InferenceView(data, inference)
    assert view.num_classes == 3 and len(view) == 2
    direct = evaluate_segmentation(model, data, inference=inference)
    assert evaluate_segmentation(model, view, inference=view.inference) == direct
    assert 0.0 <= direct["mIoU"] <= 1.0


def test_tiny_semantic_fpn_trains_with_the_keep_ratio_protocol(tmp_path: Path) -> None:
    images, masks = _write_folder(tmp_path / "data", [(64, 96), (80, 64), (64, 64)])
    val_images, val_masks = _write_folder(tmp_path / "val", [(48, 80)])
    data = DataSpec(
        kind="folder",
        train_images=str(images),
        train_masks=str(masks),
        val_images=str(val_images),
        val_masks=str(val_masks),
        image_size=64,
        seg_protocol="keep_ratio",
        seg_scale=(128, 64),
        eval_mode="slide",
        slide_crop=48,
    )
    _, val_set = build_datasets(data, "segmentation")
    assert isinstance(val_set, InferenceView) and val_set.inference.stride == 32
    config = TrainConfig(
        output_dir=str(tmp_path / "run"),
        model="semantic_fpn",
        variant="b0",
        data=data,
        max_steps=2,
        batch_size=2,
        eval_at_start=False,
        lr=1e-3,
        warmup_steps=1,
        workers=0,
        log_every=1,
        save_every=0,
        progress=False,
    )
    result = train(config)
    assert result.steps == 2 and result.evals and 0.0 <= result.evals[-1]["mIoU"] <= 1.0
