"""Segmentation heads and the PVTv2 segmenter: stride-4 logits, input-size output, batch size 1, SyncBN, loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from heads import MLPSegHead, SemanticFPNHead, group_norm, resize_bilinear
from pvt_backbone import PVTv2Config
from pvt_backbone.segmentation import PVTv2Segmenter, segmentation_loss, semantic_fpn_pvt_v2

CEIL_SIZES = ((17, 24), (9, 12), (5, 6), (3, 3))  # PVTv2 maps of a 67x93 image
HEADS = {"fpn": SemanticFPNHead, "mlp": MLPSegHead}


@pytest.fixture
def tiny() -> PVTv2Config:
    return PVTv2Config(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))


@pytest.mark.parametrize("kind", list(HEADS))
@pytest.mark.parametrize("norm_layer", [group_norm, nn.BatchNorm2d, None])
def test_heads_give_stride_four_logits_at_the_first_maps_exact_size(kind, norm_layer) -> None:
    channels = [16, 16, 16, 16] if kind == "fpn" else [8, 16, 24, 32]
    head = HEADS[kind](channels, num_classes=5, channels=16, norm_layer=norm_layer)
    maps = {str(i): torch.randn(2, c, *size) for i, (c, size) in enumerate(zip(channels, CEIL_SIZES))}
    assert head(maps).shape == (2, 5, 17, 24)
    assert head(list(maps.values())).shape == (2, 5, 17, 24)  # a list works as well as a dict
    norms = [m for m in head.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    if norm_layer is None:
        assert not norms
    else:
        assert norms and all(type(m) is (nn.GroupNorm if norm_layer is group_norm else nn.BatchNorm2d) for m in norms)


def test_semantic_fpn_head_has_the_papers_branch_depths() -> None:
    head = SemanticFPNHead([16] * 4, num_classes=3, channels=8)
    assert [len(blocks) for blocks in head.scale_heads] == [1, 1, 2, 3]  # level i: max(1, i) conv blocks


def test_group_norm_default_fits_any_width() -> None:
    assert group_norm(256).num_groups == 32
    assert group_norm(24).num_groups == 8
    assert group_norm(7).num_groups == 1


def test_head_input_errors_are_readable() -> None:
    head = MLPSegHead([8, 16], num_classes=2, channels=8)
    with pytest.raises(ValueError, match=r"built for 2 maps with channels \[8, 16\], got 1"):
        head([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match=r"map 1 must be \(B, 16, H, W\)"):
        head([torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)])
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        SemanticFPNHead([8], num_classes=0)
    with pytest.raises(ValueError, match=r"dropout must be a finite number in \[0, 1\)"):
        MLPSegHead([8], num_classes=2, dropout=1.5)


@pytest.mark.parametrize("head, size", [("fpn", (67, 93)), ("mlp", (97, 64))])
def test_b0_segmenter_output_matches_any_input_size(head, size) -> None:
    model = semantic_fpn_pvt_v2("b0", num_classes=7, head=head).eval()
    height, width = size
    image = torch.rand(1, 3, height, width)
    with torch.no_grad():
        logits = model(image)
        low = model(image, return_low_res=True)
    assert logits.shape == (1, 7, height, width)
    assert low.shape == (1, 7, math.ceil(height / 4), math.ceil(width / 4))
    expected = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, expected)
    prediction = model.predict(image)
    assert prediction.shape == (1, height, width) and prediction.dtype == torch.int64
    assert torch.equal(prediction, expected.argmax(1))  # resized first, then argmax
    assert model.predict(image, size=(20, 30)).shape == (1, 20, 30)


@pytest.mark.parametrize("head", ["fpn", "mlp"])
def test_batch_of_one_trains_and_every_parameter_gets_a_gradient(head) -> None:
    model = semantic_fpn_pvt_v2("b0", num_classes=4, head=head).train()
    image = torch.rand(1, 3, 64, 80)
    target = torch.randint(0, 4, (1, 64, 80))
    target[:, :10] = 255
    logits = model(image)
    loss = model.loss(logits, target)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert any(isinstance(m, nn.GroupNorm) for m in model.head.modules())


def test_heads_norm_choice_and_widths(tiny) -> None:
    fpn = semantic_fpn_pvt_v2(tiny, num_classes=3)
    assert fpn.neck is not None and fpn.neck.out_channels == 256 and fpn.head.channels == 128
    assert isinstance(fpn.head, SemanticFPNHead) and fpn.head.in_channels == (256,) * 4
    mlp = semantic_fpn_pvt_v2(tiny, num_classes=3, head="mlp")
    assert mlp.neck is None and isinstance(mlp.head, MLPSegHead) and mlp.head.in_channels == tiny.embed_dims
    assert mlp.head.channels == 256
    wide = PVTv2Config(embed_dims=(8, 16, 24, 512), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    assert semantic_fpn_pvt_v2(wide, num_classes=3, head="mlp").head.channels == 768
    with pytest.raises(ValueError, match=r"head must be one of \('fpn', 'mlp'\)"):
        semantic_fpn_pvt_v2(tiny, num_classes=3, head="aspp")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="as weights_backbone="):
        semantic_fpn_pvt_v2(tiny, num_classes=3, weights="x.pth")


@pytest.mark.parametrize("head", ["fpn", "mlp"])
def test_sync_batchnorm_conversion_touches_head_norms_only(head, tiny) -> None:
    model = semantic_fpn_pvt_v2(tiny, num_classes=3, head=head, norm_layer=nn.BatchNorm2d)
    layer_norms = [m for m in model.backbone.modules() if isinstance(m, nn.LayerNorm)]
    batch_norms = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert layer_norms and batch_norms and all(name.startswith("head.") for name in batch_norms)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    synced = [name for name, m in converted.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    assert synced == batch_norms
    assert [m for m in converted.backbone.modules() if isinstance(m, nn.LayerNorm)] == layer_norms


def test_loss_ignores_255_and_resizes_low_resolution_logits() -> None:
    logits = torch.randn(2, 5, 8, 10, requires_grad=True)
    target = torch.randint(0, 5, (2, 32, 40))
    target[0, :16] = 255
    full = F.interpolate(logits, size=(32, 40), mode="bilinear", align_corners=False)
    valid = target != 255
    expected = F.cross_entropy(full.permute(0, 2, 3, 1)[valid], target[valid])
    torch.testing.assert_close(segmentation_loss(logits, target), expected)
    assert resize_bilinear(logits, (8, 10)) is logits

    ignored = torch.full((2, 32, 40), 255)
    zero = segmentation_loss(logits, ignored)
    assert zero.item() == 0.0
    zero.backward()
    assert logits.grad is not None and not logits.grad.any()


def test_loss_rejects_bad_targets() -> None:
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(TypeError, match="integer class indices"):
        segmentation_loss(logits, torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"labels \[7\] outside \[0, 3\) that are not ignore_index=255"):
        segmentation_loss(logits, torch.full((1, 4, 4), 7))
    with pytest.raises(ValueError, match=r"target must be \(B, H, W\)"):
        segmentation_loss(logits, torch.zeros(1, 1, 4, 4, dtype=torch.long))


def test_segmenter_is_a_plain_module_with_a_configurable_ignore_index(tiny) -> None:
    model = semantic_fpn_pvt_v2(tiny, num_classes=3, ignore_index=0)
    assert isinstance(model, PVTv2Segmenter) and model.num_classes == 3 and model.ignore_index == 0
    logits = torch.randn(1, 3, 4, 4)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    assert model.loss(logits, target).item() == 0.0  # every pixel carries the ignore label
