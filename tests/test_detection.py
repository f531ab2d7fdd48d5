"""PVTv2 + FPN inside torchvision's five detectors: train step, eval format, levels, anchors, freezing, export."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.fx.experimental._config as fx_config
from safetensors.torch import save_file
from torch import nn
from torch.export import Dim, export
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from pvt_backbone import VARIANTS, PVTv2Backbone, PVTv2Config
from pvt_backbone.detection import (
    DETECTORS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PVTv2FPN,
    fasterrcnn_pvt_v2_fpn,
    fcos_pvt_v2_fpn,
    keypointrcnn_pvt_v2_fpn,
    maskrcnn_pvt_v2_fpn,
    pvt_fpn_backbone,
    retinanet_pvt_v2_fpn,
    trainable_to_frozen_stages,
)
from pvt_backbone.segmentation import semantic_fpn_pvt_v2
from pvt_backbone.weights.layouts import CheckpointError

NUM_CLASSES = 3
NUM_KEYPOINTS = 4
BUILDERS = {
    "fasterrcnn": fasterrcnn_pvt_v2_fpn,
    "maskrcnn": maskrcnn_pvt_v2_fpn,
    "keypointrcnn": keypointrcnn_pvt_v2_fpn,
    "retinanet": retinanet_pvt_v2_fpn,
    "fcos": fcos_pvt_v2_fpn,
}
# Small sizes and few proposals/detections keep every case to a few seconds on a CPU.
SMALL = {"min_size": 64, "max_size": 96}
RCNN_SMALL = {
    "rpn_pre_nms_top_n_train": 64,
    "rpn_post_nms_top_n_train": 32,
    "rpn_pre_nms_top_n_test": 64,
    "rpn_post_nms_top_n_test": 16,
    "box_batch_size_per_image": 8,  # <= 2 positives per image reach the (heavy) keypoint and mask heads
    "box_detections_per_img": 2,
}
DENSE_SMALL = {"score_thresh": 0.001, "topk_candidates": 32, "detections_per_img": 2}
EXTRA = {
    "fasterrcnn": RCNN_SMALL,
    "maskrcnn": RCNN_SMALL,
    # The default keypoint head (8 convs of 512 channels on 14x14 RoIs) dominates: one RoI per image.
    "keypointrcnn": {
        **RCNN_SMALL,
        "box_batch_size_per_image": 4,
        "box_detections_per_img": 1,
        "num_keypoints": NUM_KEYPOINTS,
    },
    "retinanet": DENSE_SMALL,
    "fcos": DENSE_SMALL,
}
IMAGE_SIZES = ((67, 93), (75, 61))  # odd, non-square, one portrait one landscape


@pytest.fixture
def tiny() -> PVTv2Config:
    return PVTv2Config(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))


def _targets(name: str) -> list[dict[str, torch.Tensor]]:
    targets = []
    for height, width in IMAGE_SIZES:
        boxes = torch.tensor([[5.0, 6.0, 40.0, 50.0], [20.0, 10.0, width - 3.0, height - 4.0]])
        target = {"boxes": boxes, "labels": torch.tensor([1, NUM_CLASSES - 1])}
        if name == "maskrcnn":
            masks = torch.zeros(2, height, width, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                masks[k, y0:y1, x0:x1] = 1
            target["masks"] = masks
        if name == "keypointrcnn":
            xs = torch.linspace(0, 1, NUM_KEYPOINTS)
            points = [
                torch.stack([x0 + xs * (x1 - x0), y0 + xs * (y1 - y0), torch.ones(NUM_KEYPOINTS)], 1)
                for x0, y0, x1, y1 in boxes
            ]
            target["keypoints"] = torch.stack(points)
        targets.append(target)
    return targets


@pytest.mark.parametrize("name", list(BUILDERS))
def test_train_step_and_eval_format_with_b0(name: str) -> None:
    model = BUILDERS[name]("b0", num_classes=NUM_CLASSES, **SMALL, **EXTRA[name])
    images = [torch.rand(3, h, w) for h, w in IMAGE_SIZES]

    model.train()
    losses = model(images, _targets(name))
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert trainable and not missing, f"{name}: parameters without a gradient (DDP would call them unused): {missing}"

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert isinstance(detections, list) and len(detections) == len(images)
    expected_keys = {"boxes", "labels", "scores"} | {
        "maskrcnn": {"masks"},
        "keypointrcnn": {"keypoints", "keypoints_scores"},
    }.get(name, set())
    for (height, width), det in zip(IMAGE_SIZES, detections):
        assert set(det) == expected_keys
        n = det["boxes"].shape[0]
        assert 0 < n <= 2, f"{name}: expected 1..2 detections at these thresholds, got {n}"
        assert det["boxes"].shape == (n, 4) and det["boxes"].dtype == torch.float32
        assert det["labels"].shape == (n,) and det["labels"].dtype == torch.int64
        assert det["scores"].shape == (n,) and det["scores"].dtype == torch.float32
        assert bool((det["labels"] >= 0).all() and (det["labels"] < NUM_CLASSES).all())
        boxes = det["boxes"]
        assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all())
        if name == "maskrcnn":
            assert det["masks"].shape == (n, 1, height, width)
        if name == "keypointrcnn":
            assert det["keypoints"].shape == (n, NUM_KEYPOINTS, 3)
            assert det["keypoints_scores"].shape == (n, NUM_KEYPOINTS)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_canonical_levels_normalisation_and_padding(name: str, tiny: PVTv2Config) -> None:
    spec = DETECTORS[name]
    model = BUILDERS[name](tiny, num_classes=NUM_CLASSES, fpn_channels=32, **EXTRA[name])
    assert isinstance(model.backbone, PVTv2FPN) and model.backbone.out_channels == 32
    expected = ("0", "1", "2", "3", "pool") if spec.extra_levels == "pool" else ("1", "2", "3", "p6", "p7")
    assert model.backbone.names == spec.level_names == expected
    assert model.transform.image_mean == list(IMAGENET_MEAN) and model.transform.image_std == list(IMAGENET_STD)
    assert model.transform.size_divisible == 32
    generator = model.rpn.anchor_generator if spec.anchor_arg == "rpn_anchor_generator" else model.anchor_generator
    assert len(generator.sizes) == len(expected)
    if spec.extra_levels == "p6p7":  # RetinaNet: the published P6 from C5; FCOS: mmdet's FCOS, P6 from P5
        assert model.backbone.fpn.extra_blocks.source == ("c5" if name == "retinanet" else "p5")


def test_padded_batch_gives_exact_strides_at_every_level(tiny: PVTv2Config) -> None:
    model = fasterrcnn_pvt_v2_fpn(tiny, num_classes=2, fpn_channels=8, min_size=100, max_size=1000).eval()
    image_list, _ = model.transform([torch.rand(3, 100, 151)])
    padded = image_list.tensors.shape[-2:]
    assert padded == (128, 160)
    features = model.backbone(image_list.tensors)
    assert model.backbone.strides == (4, 8, 16, 32, 64)
    for stride, feature in zip(model.backbone.strides, features.values()):
        assert tuple(feature.shape[-2:]) == tuple(math.ceil(side / stride) for side in padded)
        if stride <= 32:
            assert tuple(p // f for p, f in zip(padded, feature.shape[-2:])) == (stride, stride)


@pytest.mark.parametrize("source", ["p5", "c5"])
def test_b0_p6_input_is_the_named_source(source: str) -> None:
    model = pvt_fpn_backbone("b0", out_indices=(1, 2, 3), extra_levels="p6p7", p6p7_source=source).eval()
    assert model.body.channels[-1] == model.out_channels == 256  # the case torchvision resolves by channel count
    seen: dict[str, torch.Tensor] = {}
    model.fpn.extra_blocks.p6.register_forward_hook(lambda module, args, output: seen.update(p6_input=args[0]))
    model.body.register_forward_hook(lambda module, args, output: seen.update(c5=output["3"]))
    with torch.no_grad():
        out = model(torch.rand(1, 3, 96, 128))
    expected = out["3"] if source == "p5" else seen["c5"]
    assert seen["p6_input"] is expected
    assert not torch.equal(out["3"], seen["c5"])


def test_wrong_anchor_levels_are_rejected_at_build_time() -> None:
    four = AnchorGenerator(sizes=((32,), (64,), (128,), (256,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    with pytest.raises(ValueError, match=r"rpn_anchor_generator has 4 entries in sizes but this detector has 5 "):
        fasterrcnn_pvt_v2_fpn("b0", num_classes=2, rpn_anchor_generator=four)
    with pytest.raises(ValueError, match=r"5 pyramid levels \(1, 2, 3, p6, p7\)"):
        retinanet_pvt_v2_fpn("b0", num_classes=2, anchor_generator=four)
    uneven = AnchorGenerator(sizes=((32,),) * 5, aspect_ratios=((1.0,),) * 4 + ((0.5, 1.0),))
    with pytest.raises(ValueError, match=r"gives \[1, 1, 1, 1, 2\] anchors per location"):
        fcos_pvt_v2_fpn("b0", num_classes=2, anchor_generator=uneven)


def test_custom_matching_anchors_and_roi_pool_are_accepted_and_wrong_roi_names_rejected(tiny: PVTv2Config) -> None:
    five = AnchorGenerator(sizes=((16,), (32,), (64,), (128,), (256,)), aspect_ratios=((1.0,),) * 5)
    model = fasterrcnn_pvt_v2_fpn(tiny, num_classes=2, fpn_channels=8, rpn_anchor_generator=five)
    assert model.rpn.anchor_generator is five
    bad = MultiScaleRoIAlign(featmap_names=[0, 1], output_size=7, sampling_ratio=2)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"box_roi_pool reads feature maps \[0, 1\] that the backbone does not return"):
        maskrcnn_pvt_v2_fpn(tiny, num_classes=2, box_roi_pool=bad)


@pytest.mark.parametrize("trainable", [0, 1, 2, 3, 4])
def test_trainable_stages_requires_grad_pattern(trainable: int, tiny: PVTv2Config) -> None:
    model = fasterrcnn_pvt_v2_fpn(tiny, num_classes=2, fpn_channels=8, trainable_stages=trainable).train()
    body = model.backbone.body
    frozen = 4 - trainable
    assert body.frozen_stages == trainable_to_frozen_stages(trainable) == frozen
    assert all(p.requires_grad == (trainable == 4) for p in body.patch_embed.parameters())
    assert body.patch_embed.training == (trainable == 4)
    for index, stage in enumerate(body.stages):
        assert all(p.requires_grad == (index >= frozen) for p in stage.parameters()), (trainable, index)
        assert stage.training == (index >= frozen)
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    assert all(p.requires_grad for p in model.roi_heads.parameters())


def test_trainable_stages_counts_unbuilt_stages_as_trainable() -> None:
    assert trainable_to_frozen_stages(0, num_built=3) == 3
    assert trainable_to_frozen_stages(2, num_built=3) == 2
    for bad, error in ((5, ValueError), (-1, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(error, match=r"trainable_stages must .*\[0, 4\]"):
            trainable_to_frozen_stages(bad)  # type: ignore[arg-type]


def test_other_bad_arguments_are_rejected(tiny: PVTv2Config) -> None:
    with pytest.raises(TypeError, match="not frozen_stages"):
        fasterrcnn_pvt_v2_fpn(tiny, num_classes=2, frozen_stages=1)
    with pytest.raises(TypeError, match="not frozen_stages"):
        pvt_fpn_backbone(tiny, frozen_stages=1)
    with pytest.raises(TypeError, match="as weights_backbone="):
        fcos_pvt_v2_fpn(tiny, num_classes=2, weights="x.safetensors")
    with pytest.raises(FileNotFoundError, match="x.safetensors"):  # a whole-detector file for RetinaNet
        retinanet_pvt_v2_fpn(tiny, weights="x.safetensors")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['box_score_threshold'\]"):
        fasterrcnn_pvt_v2_fpn(tiny, num_classes=2, box_score_threshold=0.5)
    with pytest.raises(ValueError, match="size_divisible must be a multiple of 32"):
        fcos_pvt_v2_fpn(tiny, num_classes=2, size_divisible=16)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        fasterrcnn_pvt_v2_fpn(tiny, num_classes=0)


def test_four_channel_input_needs_matching_mean_and_std_and_then_runs(tiny: PVTv2Config) -> None:
    with pytest.raises(ValueError, match="in_channels=4: pass image_mean and image_std with 4 entries"):
        fasterrcnn_pvt_v2_fpn(tiny, num_classes=2, in_channels=4)
    with pytest.raises(ValueError, match=r"image_std must have one entry per input channel \(4\)"):
        fasterrcnn_pvt_v2_fpn(tiny, num_classes=2, in_channels=4, image_mean=[0.5] * 4, image_std=[0.2] * 3)
    model = fasterrcnn_pvt_v2_fpn(
        tiny, num_classes=2, in_channels=4, image_mean=[0.5] * 4, image_std=[0.25] * 4, fpn_channels=8, **SMALL
    )
    assert model.backbone.body.patch_embed.proj.in_channels == 4
    losses = model(
        [torch.rand(4, 70, 90)], [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 50.0]]), "labels": torch.tensor([1])}]
    )
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        assert set(model.eval()([torch.rand(4, 70, 90)])[0]) == {"boxes", "labels", "scores"}


@pytest.mark.slow
def test_torch_export_with_dynamic_height_and_width(tiny: PVTv2Config) -> None:
    model = pvt_fpn_backbone(tiny, fpn_channels=8).eval()
    height, width = Dim("height", min=64, max=1024), Dim("width", min=64, max=1024)
    # Experimental torch option: reason about sizes without specialising on 0/1, so the "pool" level may be 1 px.
    with fx_config.patch(backed_size_oblivious=True):
        program = export(model, (torch.rand(1, 3, 200, 264),), dynamic_shapes={"x": {2: height, 3: width}})
    exported = program.module()
    for size in ((64, 75), (131, 97)):
        image = torch.rand(1, 3, *size)
        with torch.no_grad():
            expected, got = model(image), exported(image)
        assert list(got) == list(expected) == ["0", "1", "2", "3", "pool"]
        for name in expected:
            torch.testing.assert_close(got[name], expected[name])


def test_odd_sizes_through_the_backbone_give_ceil_sized_levels() -> None:
    model = pvt_fpn_backbone("b0", extra_levels="pool").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 67, 93))
    assert isinstance(out, OrderedDict)
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(17, 24), (9, 12), (5, 6), (3, 3), (2, 2)]
    assert model.strides == (4, 8, 16, 32, 64)


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_weights_backbone_loads_a_saved_backbone_state_dict(tmp_path, suffix: str, tiny: PVTv2Config) -> None:
    source = PVTv2Backbone(tiny)
    with torch.no_grad():
        for p in source.parameters():
            p.uniform_(-1, 1)  # unlike any initialisation
    path = tmp_path / f"backbone.{suffix}"
    if suffix == "pth":
        torch.save(source.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    bodies: list[nn.Module] = [
        pvt_fpn_backbone(tiny, weights=str(path), fpn_channels=8).body,
        fasterrcnn_pvt_v2_fpn(tiny, num_classes=2, weights_backbone=path, fpn_channels=8).backbone.body,
        retinanet_pvt_v2_fpn(tiny, num_classes=2, weights_backbone=path, fpn_channels=32).backbone.body,
        semantic_fpn_pvt_v2(tiny, num_classes=2, weights_backbone=path).backbone,
    ]
    for body in bodies:
        state = body.state_dict()
        assert state.keys() == source.state_dict().keys()
        assert body.load_report is not None and set(body.load_report.loaded) == set(state)
        assert body.load_report.source.endswith(path.name)
        for key, value in source.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    other = PVTv2Config(embed_dims=(8, 16, 24, 40), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))
    with pytest.raises(CheckpointError):
        fasterrcnn_pvt_v2_fpn(other, num_classes=2, weights_backbone=path)
    assert fasterrcnn_pvt_v2_fpn(tiny, num_classes=2, fpn_channels=8).backbone.body.load_report is None


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_builds_with_matching_widths(variant: str) -> None:
    """Level choice per detector is variant-independent (tested above); here the widths across the variant table."""
    config = VARIANTS[variant]
    with torch.device("meta"):  # shapes only, no compute
        detector = retinanet_pvt_v2_fpn(variant, num_classes=3, p6p7_source="c5")
        segmenter = semantic_fpn_pvt_v2(variant, num_classes=3, head="mlp")
    assert detector.backbone.fpn.in_channels == config.embed_dims[1:]
    assert detector.backbone.fpn.extra_blocks.p6.in_channels == config.embed_dims[-1]
    assert detector.backbone.out_channels == 256 and detector.head.classification_head.num_classes == 3
    assert segmenter.head.in_channels == config.embed_dims
    assert segmenter.head.channels == (256 if config.embed_dims[-1] <= 256 else 768)
