"""Published mmdet PVTv2 detectors in torchvision: parity with mmdet's own outputs, strict whole-detector loading.

The fixtures in tests/fixtures/mmdet/ were computed by mmdetection 3.3.0 itself (tools/dev/make_mmdet_fixtures.py):
a tiny PVTv2 RetinaNet and Mask R-CNN with random weights, saved as mmdet saves detectors, and what mmdet computed on a
123 x 157 image.
"""

from __future__ import annotations

import dataclasses
import fractions
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor
from torchvision.ops import box_iou

from pvt_backbone.config import VARIANTS, PVTv2Config
from pvt_backbone.detection import fasterrcnn_pvt_v2_fpn, maskrcnn_pvt_v2_fpn, pvt_fpn_backbone, retinanet_pvt_v2_fpn
from pvt_backbone.mmdet_compat import (
    RETINANET_SCALES,
    MMDetAnchors,
    MMDetRoIAlign,
    P6P7FromC5,
    mmdet_rcnn,
    mmdet_retinanet,
)
from pvt_backbone.weights.detect import convert
from pvt_backbone.weights.detectors import COCO_CLASSES, read_detector_file, save_detector, to_mmdet_state_dict
from pvt_backbone.weights.layouts import CheckpointError
from pvt_backbone.weights.load import LoadWarning

FIXTURES = Path(__file__).parent / "fixtures" / "mmdet"
# mmdet's PyramidVisionTransformerV2(embed_dims=8, num_heads=[1, 2, 4, 4], num_layers=[1, 1, 1, 1]); heads are not
# recoverable from weights, so the config is passed.
TINY = PVTv2Config(embed_dims=(8, 16, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 4))
NUM_CLASSES = 5
# The fixture image's own size: scale 1, so torchvision's resize is an exact copy and the inputs equal mmdet's.
SIZE = {"min_size": 123, "max_size": 157}
TOP = 50


@pytest.fixture(scope="module")
def inputs() -> dict[str, Tensor]:
    return load_file(FIXTURES / "inputs.safetensors")


@pytest.fixture(scope="module")
def retinanet() -> torch.nn.Module:
    return retinanet_pvt_v2_fpn(TINY, weights=FIXTURES / "retinanet.pth", **SIZE).eval()


@pytest.fixture(scope="module")
def maskrcnn() -> torch.nn.Module:
    return maskrcnn_pvt_v2_fpn(TINY, weights=FIXTURES / "maskrcnn.pth", **SIZE).eval()


def _relative(ours: Tensor, theirs: Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def _assert_twins(ours: dict[str, Tensor], theirs: dict[str, Tensor], label_offset: int) -> None:
    """Each of mmdet's top detections has one of ours with the same label, IoU > 0.99 and score within 1e-3."""
    boxes, scores = theirs["det_bboxes"][:TOP], theirs["det_scores"][:TOP]
    labels = theirs["det_labels"][:TOP] + label_offset
    assert len(boxes) == TOP and len(ours["boxes"]) >= TOP
    iou = box_iou(boxes, ours["boxes"])
    for i in range(TOP):
        twin = (ours["labels"] == labels[i]) & (iou[i] > 0.99) & ((ours["scores"] - scores[i]).abs() < 1e-3)
        assert twin.any(), f"mmdet detection {i} ({labels[i]}, {scores[i]:.4f}, {boxes[i].tolist()}) has no twin"


def test_fixture_input_is_reproduced_by_the_transform(retinanet, inputs) -> None:
    images, _ = retinanet.transform([inputs["image"].float() / 255])
    assert images.tensors.shape == inputs["input"].shape == (1, 3, 128, 160)
    assert _relative(images.tensors, inputs["input"]) < 1e-5


@torch.no_grad()
def test_retinanet_matches_mmdet(retinanet, inputs) -> None:
    theirs = load_file(FIXTURES / "retinanet_outputs.safetensors")
    head = retinanet.head(list(retinanet.backbone(inputs["input"]).values()))
    flat = lambda name, width: torch.cat(  # noqa: E731 - mmdet (1, A*W, H, W) per level -> ours (1, sum HWA, W)
        [theirs[f"{name}.{i}"].permute(0, 2, 3, 1).reshape(1, -1, width) for i in range(5)], 1
    )
    assert _relative(head["cls_logits"], flat("cls_score", NUM_CLASSES)) < 1e-4
    assert _relative(head["bbox_regression"], flat("bbox_pred", 4)) < 1e-4
    _assert_twins(retinanet([inputs["image"].float() / 255])[0], theirs, label_offset=0)


@torch.no_grad()
def test_maskrcnn_matches_mmdet(maskrcnn, inputs) -> None:
    theirs = load_file(FIXTURES / "maskrcnn_outputs.safetensors")
    features = maskrcnn.backbone(inputs["input"])
    objectness, deltas = maskrcnn.rpn.head(list(features.values()))
    for level, (obj, delta) in enumerate(zip(objectness, deltas)):
        assert _relative(obj, theirs[f"rpn_cls.{level}"]) < 1e-4
        assert _relative(delta, theirs[f"rpn_reg.{level}"]) < 1e-4
    images, _ = maskrcnn.transform([inputs["image"].float() / 255])
    proposals = maskrcnn.rpn(images, features)[0][0]
    assert proposals.shape == theirs["proposals"].shape
    assert _relative(proposals, theirs["proposals"]) < 1e-4
    shapes = [(123, 157)]
    heads = maskrcnn.roi_heads
    logits, box_deltas = heads.box_predictor(
        heads.box_head(heads.box_roi_pool(features, [theirs["proposals"]], shapes))
    )
    mmdet_logits = theirs["roi_cls_score"]
    assert _relative(logits, torch.cat([mmdet_logits[:, -1:], mmdet_logits[:, :-1]], 1)) < 1e-4  # background first
    assert _relative(box_deltas[:, 4:], theirs["roi_bbox_pred"]) < 1e-4 and not box_deltas[:, :4].any()
    masks = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, [theirs["mask_boxes"]], shapes)))
    assert not masks[:, 0].any() and _relative(masks[:, 1:], theirs["mask_logits"]) < 1e-4
    detections = maskrcnn([inputs["image"].float() / 255])[0]
    _assert_twins(detections, theirs, label_offset=1)
    assert detections["masks"].shape[1:] == (1, 123, 157)


def test_load_report_class_names_and_eps(retinanet, maskrcnn) -> None:
    report = maskrcnn.load_report
    assert report.arch == "maskrcnn" and report.backbone_layout == "mmdet" and report.sha256
    assert set(report.loaded) == set(maskrcnn.state_dict())
    assert [d.key for d in report.dropped] == ["['meta']"]
    assert f"loaded {len(maskrcnn.state_dict())} tensors" in report.summary()
    assert retinanet.class_names == tuple(f"thing{i}" for i in range(NUM_CLASSES))
    assert maskrcnn.class_names == ("__background__", *retinanet.class_names)
    config = maskrcnn.backbone.body.config
    assert (config.embed_norm_eps, config.norm_eps) == (1e-6, 1e-6)  # mmdet's PVTv2 LayerNorms
    assert retinanet.backbone.fpn.extra_blocks.source == "c5" and isinstance(
        retinanet.backbone.fpn.extra_blocks, P6P7FromC5
    )


def test_fasterrcnn_from_a_maskrcnn_file_drops_the_mask_head_with_a_warning(maskrcnn, inputs) -> None:
    with pytest.warns(LoadWarning, match="12 entries left out.*mask head"):
        model = fasterrcnn_pvt_v2_fpn(TINY, weights=FIXTURES / "maskrcnn.pth", **SIZE).eval()
    assert sum(d.key.startswith("roi_head.mask_head.") for d in model.load_report.dropped) == 12
    with torch.no_grad():
        ours, full = model([inputs["image"].float() / 255])[0], maskrcnn([inputs["image"].float() / 255])[0]
    torch.testing.assert_close(ours["boxes"], full["boxes"])
    assert torch.equal(ours["labels"], full["labels"])


def _checkpoint(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pth", weights_only=True)


def test_values_that_disagree_with_the_file_are_value_errors(tmp_path) -> None:
    path = FIXTURES / "retinanet.pth"
    with pytest.raises(ValueError, match="num_classes=3 but .* has 5 classes"):
        retinanet_pvt_v2_fpn(TINY, weights=path, num_classes=3)
    with pytest.raises(ValueError, match="num_classes=5 but .* has 6 classes \\(background included\\)"):
        maskrcnn_pvt_v2_fpn(TINY, weights=FIXTURES / "maskrcnn.pth", num_classes=5)
    with pytest.raises(ValueError, match="fpn_channels=256 but .* 16 wide"):
        retinanet_pvt_v2_fpn(TINY, weights=path, fpn_channels=256)
    with pytest.raises(ValueError, match="variant 'b0' does not match"):
        retinanet_pvt_v2_fpn("b0", weights=path)
    with pytest.raises(ValueError, match="no table variant: pass variant=PVTv2Config"):
        retinanet_pvt_v2_fpn(weights=path)
    with pytest.raises(ValueError, match="not both"):
        retinanet_pvt_v2_fpn(TINY, weights=path, weights_backbone=path)
    with pytest.raises(CheckpointError, match="holds an mmdet maskrcnn, which a retinanet cannot load"):
        retinanet_pvt_v2_fpn(TINY, weights=FIXTURES / "maskrcnn.pth")
    with pytest.raises(CheckpointError, match="holds an mmdet retinanet"):
        maskrcnn_pvt_v2_fpn(TINY, weights=path)


def test_leftover_keys_and_shape_mismatches_are_checkpoint_errors() -> None:
    extra = _checkpoint("retinanet")
    extra["state_dict"]["bbox_head.centerness.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="match no row of the retinanet key table: bbox_head.centerness.weight"):
        retinanet_pvt_v2_fpn(TINY, weights=extra)
    wrong = _checkpoint("retinanet")
    wrong["state_dict"]["bbox_head.reg_convs.1.conv.weight"] = torch.zeros(16, 16, 1, 1)
    with pytest.raises(
        CheckpointError, match=r"(?s)head.regression_head.conv.1.0.weight: file \(16, 16, 1, 1\).*Nothing was loaded"
    ):
        retinanet_pvt_v2_fpn(TINY, weights=wrong)
    other = dataclasses.replace(TINY, mlp_ratios=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="does not match"):
        retinanet_pvt_v2_fpn(other, weights=_checkpoint("retinanet"))


def test_pickles_needing_code_need_trust_pickle(tmp_path) -> None:
    checkpoint = _checkpoint("retinanet")
    checkpoint["meta"]["lr"] = fractions.Fraction(1, 3)  # a global torch's safe loader refuses
    path = tmp_path / "pickled.pth"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        retinanet_pvt_v2_fpn(TINY, weights=path)
    assert retinanet_pvt_v2_fpn(TINY, weights=path, trust_pickle=True).class_names[0] == "thing0"


def test_coco_names_for_80_classes_and_authors_backbone_layout() -> None:
    checkpoint = _checkpoint("retinanet")
    del checkpoint["meta"]["dataset_meta"]
    sd = checkpoint["state_dict"]
    sd["bbox_head.retina_cls.weight"] = torch.randn(9 * 80, 16, 3, 3)
    sd["bbox_head.retina_cls.bias"] = torch.randn(9 * 80)
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    authors = convert(backbone, dst="pvt").state_dict  # whai362/PVT detection checkpoints' backbone keys
    checkpoint["state_dict"] = {k: v for k, v in sd.items() if k not in backbone} | {
        "backbone." + k: v for k, v in authors.items()
    }
    model = retinanet_pvt_v2_fpn(TINY, weights=checkpoint)
    assert model.class_names == COCO_CLASSES and model.head.classification_head.num_classes == 80
    assert model.load_report.backbone_layout == "pvt"
    config = model.backbone.body.config
    assert (config.embed_norm_eps, config.norm_eps) == (1e-5, 1e-6)  # the authors' embedding/SR norms use torch's eps
    unnamed = maskrcnn_pvt_v2_fpn(TINY, num_classes=3)
    assert unnamed.class_names == ("__background__", "class_0", "class_1")


@pytest.mark.parametrize("name", ["retinanet", "maskrcnn"])
def test_conversion_round_trip_is_bit_exact(name: str) -> None:
    original = _checkpoint(name)["state_dict"]
    ours = read_detector_file(FIXTURES / f"{name}.pth", arch=name).state_dict
    back = to_mmdet_state_dict(ours, name)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], v) for k, v in original.items())
    authors = to_mmdet_state_dict(ours, name, backbone_layout="pvt")
    assert "backbone.block1.0.norm1.weight" in authors
    again = read_detector_file({"state_dict": authors}, arch=name).state_dict
    assert again.keys() == ours.keys() and all(torch.equal(again[k], v) for k, v in ours.items())


def test_mmdet_anchors_are_unrounded_with_fixed_strides() -> None:
    anchors = MMDetAnchors((8, 16, 32, 64, 128), RETINANET_SCALES)
    base = anchors.cell_anchors[0]
    assert base.shape == (9, 4) and not torch.equal(base, base.round())
    widths = base[:, 2] - base[:, 0]
    expected = torch.tensor([8 * s / r**0.5 for r in (0.5, 1.0, 2.0) for s in RETINANET_SCALES])
    torch.testing.assert_close(widths, expected)
    from torchvision.models.detection.image_list import ImageList

    maps = [torch.zeros(1, 1, h, w) for h, w in ((25, 42), (13, 21), (7, 11), (4, 6), (2, 3))]
    levels = anchors(ImageList(torch.zeros(1, 3, 800, 1344), [(800, 1333)]), maps)[0].split(
        [9 * m.shape[-2] * m.shape[-1] for m in maps]
    )
    for level, stride, feature in zip(levels, anchors.strides, maps):  # centres at (x, y) * stride: not padded // map
        h, w = feature.shape[-2:]
        torch.testing.assert_close(
            (level[-1, :2] + level[-1, 2:]) / 2, torch.tensor([(w - 1.0) * stride, (h - 1.0) * stride])
        )


def test_roi_level_mapping_is_mmdets() -> None:
    pool = MMDetRoIAlign(["0", "1", "2", "3"], 7)
    sides = torch.tensor([10.0, 111.9, 112.0, 224.0, 447.0, 448.0, 2000.0])
    rois = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    assert pool.levels(rois).tolist() == [0, 0, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    "variant, retinanet_m, maskrcnn_m",
    [  # PVTv2 paper, Table 3: #Param (M) of RetinaNet and Mask R-CNN with each backbone, 80 COCO classes
        ("b0", 13.0, 23.5),
        ("b1", 23.8, 33.7),
        ("b2_li", 32.3, 42.2),
        ("b2", 35.1, 45.0),
        ("b3", 55.0, 64.9),
        ("b4", 72.3, 82.2),
        ("b5", 91.7, 101.6),
    ],
)
def test_parameter_counts_equal_the_papers_table(variant: str, retinanet_m: float, maskrcnn_m: float) -> None:
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    with torch.device("meta"):
        retinanet = retinanet_pvt_v2_fpn(variant, num_classes=80)  # the published levels are the default
        rcnn = mmdet_rcnn(pvt_fpn_backbone(variant), 80)
    # Within the table's 0.1M rounding, except B0 (both detectors) and B1 RetinaNet: 12.947M, 23.446M and 23.746M
    # against the printed 13.0, 23.5 and 23.8.
    assert abs(count(retinanet) / 1e6 - retinanet_m) < 0.06
    assert abs(count(rcnn) / 1e6 - maskrcnn_m) < 0.06
    if variant == "b0":
        with torch.device("meta"):
            published = mmdet_retinanet(
                pvt_fpn_backbone(variant, out_indices=(1, 2, 3), extra_levels="p6p7", p6p7_source="c5"), 80
            )
            torchvision_rcnn = maskrcnn_pvt_v2_fpn(variant, num_classes=81)
        assert count(published) == count(retinanet)
        assert count(torchvision_rcnn) - count(rcnn) == 1024 * 4 + 4 + 256 + 1  # torchvision's background rows
    assert variant in VARIANTS


def test_default_retinanet_p7_has_no_relu_but_p5_source_keeps_torchvisions() -> None:
    default = retinanet_pvt_v2_fpn(TINY, num_classes=2, fpn_channels=8).backbone.fpn.extra_blocks
    assert isinstance(default, P6P7FromC5)
    with torch.no_grad():
        default.p6.bias.fill_(-10.0)  # P6 all negative: a ReLU before P7 would zero its input
        p6, p7 = default([torch.zeros(1, 8, 4, 4)], [torch.zeros(1, 32, 4, 4)], ["3"])[0][1:]
    assert (p6 < 0).all() and not torch.equal(p7, default.p7(torch.relu(p6)))
    torchvision_like = retinanet_pvt_v2_fpn(TINY, num_classes=2, fpn_channels=8, p6p7_source="p5")
    assert type(torchvision_like.backbone.fpn.extra_blocks).__name__ == "P6P7Block"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        retinanet_pvt_v2_fpn(TINY, weights=FIXTURES / "retinanet.pth")  # nothing unexpected dropped: no warning


def test_save_detector_writes_safetensors_that_weights_reads_back(maskrcnn, tmp_path) -> None:
    from safetensors import safe_open

    path = save_detector(maskrcnn, tmp_path / "maskrcnn.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["pvt_backbone.architecture"] == "maskrcnn" and metadata["pvt_backbone.num_classes"] == "5"
    assert metadata["pvt_backbone.source_sha256"] == maskrcnn.load_report.sha256
    again = maskrcnn_pvt_v2_fpn(TINY, weights=path)
    assert again.class_names == maskrcnn.class_names
    state = maskrcnn.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())
    with pytest.raises(ValueError, match="compute mmdet's function"):
        save_detector(maskrcnn_pvt_v2_fpn(TINY, num_classes=2, fpn_channels=8), tmp_path / "x.safetensors")
