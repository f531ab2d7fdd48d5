"""Whole-model export: detectors and segmenters with normalisation and post-processing inside, their ONNX and
OpenVINO forms checked against the eager models, the runtime wrapper, and INT8 quantisation (tiny models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import batched_nms

from pvt_backbone import PVTv2Backbone, PVTv2Config, detection
from pvt_backbone.export import export_onnx
from pvt_backbone.export_models import (
    ExportableDetector,
    _paste_masks,
    compare_detections,
    eager_detections,
    export_model_program,
    export_verified_model_onnx,
    exportable,
    nms_mask,
    onnx_translations,
    padded_to_list,
    save_verified_model_program,
    verify_model_outputs,
)
from pvt_backbone.runtime import load_runtime
from pvt_backbone.segmentation import semantic_fpn_pvt_v2

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SMALL: dict[str, int] = {}  # the default FPN width: narrower ones tie many scores at random init
RCNN_SMALL = {**SMALL, "rpn_post_nms_top_n_test": 50, "box_detections_per_img": 10, "box_score_thresh": 0.0}


def _detector(kind: str, config: PVTv2Config) -> torch.nn.Module:
    options = {"retinanet": {"score_thresh": 0.0}, "fcos": {"score_thresh": 0.0}}.get(kind, RCNN_SMALL)
    builder = getattr(detection, f"{kind}_pvt_v2_fpn")
    model = builder("b0", num_classes=3, **SMALL, **options).eval()
    if kind in ("retinanet", "fcos"):  # spread the near-constant initial scores: ties make the kept set arbitrary
        torch.nn.init.normal_(model.head.classification_head.cls_logits.weight, std=0.05)
    return model


def _boxes(n: int) -> torch.Tensor:
    corner = torch.rand(n, 2) * 40
    return torch.cat([corner, corner + 1 + torch.rand(n, 2) * 20], dim=1)


@pytest.mark.parametrize("kind", ["retinanet", "fcos", "fasterrcnn", "maskrcnn"])
def test_wrapper_matches_the_eager_detector(kind: str, tiny_config: PVTv2Config) -> None:
    detector = _detector(kind, tiny_config)
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        outputs = ExportableDetector(detector)(images)
    expected, actual = eager_detections(detector, images), padded_to_list(outputs)
    assert [len(d["boxes"]) for d in expected] == [len(d["boxes"]) for d in actual]
    assert sum(len(d["boxes"]) for d in expected) > 0
    result = compare_detections(expected, actual, atol=1e-4)
    assert result.ok, result
    boxes, scores, labels, count = outputs[:4]
    assert boxes.shape[:2] == scores.shape == labels.shape and count.shape == (2,)
    padding = torch.arange(scores.shape[1]).unsqueeze(0) >= count.unsqueeze(1)
    assert bool((labels[padding] == -1).all()) and bool((scores[padding] == 0).all())
    if kind == "maskrcnn":
        assert outputs[4].shape == (2, scores.shape[1], 64, 96)


def test_nms_mask_keeps_what_batched_nms_keeps() -> None:
    boxes = torch.stack([_boxes(30), _boxes(30)])
    scores, groups = torch.rand(2, 30), torch.randint(0, 3, (2, 30))
    valid = torch.rand(2, 30) > 0.2
    keep = nms_mask(boxes, scores, groups, valid, 0.3, 3)
    for b in range(2):
        index = valid[b].nonzero().squeeze(1)
        expected = index[batched_nms(boxes[b, index], scores[b, index], groups[b, index], 0.3)]
        assert sorted(keep[b].nonzero().squeeze(1).tolist()) == sorted(expected.tolist())


def test_nms_mask_onnx_form_agrees(tmp_path: Path) -> None:
    class Keep(torch.nn.Module):
        def forward(self, boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
            return nms_mask(boxes, scores, groups, scores > 0.1, 0.4, 4)

    args = (torch.stack([_boxes(25)] * 2), torch.rand(2, 25), torch.randint(0, 4, (2, 25)))
    program = torch.onnx.export(Keep(), args, dynamo=True, custom_translation_table=onnx_translations(), verbose=False)
    program.save(str(tmp_path / "nms.onnx"))
    from pvt_backbone.export import onnxruntime_session

    session = onnxruntime_session(tmp_path / "nms.onnx")
    feed = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    assert torch.equal(torch.from_numpy(session.run(None, feed)[0]), Keep()(*args))


def test_paste_matches_torchvision() -> None:
    masks = torch.rand(6, 28, 28)
    boxes = torch.tensor([[3.2, 4.7, 40.1, 30.0], [0.0, 0.0, 64.0, 48.0], [50.5, 10.0, 63.9, 47.9]] * 2)
    boxes[3:] += torch.rand(3, 4) * 2
    expected = paste_masks_in_image(masks[:, None], boxes, (48, 64))[:, 0]
    assert torch.allclose(_paste_masks(masks, boxes, 48, 64), expected, atol=1e-5)


def test_retinanet_onnx_and_openvino_match_eager(tiny_config: PVTv2Config, tmp_path: Path) -> None:
    detector = _detector("retinanet", tiny_config)
    images = torch.rand(3, 3, 64, 64)
    result = export_verified_model_onnx(
        detector, torch.rand(1, 3, 64, 64), images, tmp_path / "ret.onnx", dynamic_size=False
    )
    assert result.ok and result.max_abs_diff < 1e-4, result
    runtime = load_runtime(tmp_path / "ret.onnx", runtime="onnxruntime")
    assert compare_detections(eager_detections(detector, images), runtime(images), atol=1e-4).ok
    program = export_model_program(detector, torch.rand(1, 3, 64, 64), dynamic_size=False)
    assert save_verified_model_program(program, tmp_path / "ret.pt2", detector, images).ok
    from_program = load_runtime(tmp_path / "ret.pt2", runtime="torch")(images)
    assert compare_detections(eager_detections(detector, images), from_program, atol=1e-4).ok
    pytest.importorskip("openvino")
    from pvt_backbone.export_openvino import export_verified_openvino

    xml = tmp_path / "ret.xml"
    check = export_verified_openvino(
        tmp_path / "ret.onnx", detector, images, xml, compare=lambda _, got: verify_model_outputs(detector, images, got)
    )
    assert check.ok, check
    assert compare_detections(eager_detections(detector, images), load_runtime(xml, "openvino")(images)).ok


def test_faster_rcnn_program_runs_at_other_sizes(tiny_config: PVTv2Config) -> None:
    detector = _detector("fasterrcnn", tiny_config)
    with pytest.raises(ValueError, match="multiples of 32"):
        export_model_program(detector, torch.rand(1, 3, 64, 70))
    program = export_model_program(detector, torch.rand(1, 3, 96, 128)).module()  # min_dynamic_size: 96
    for shape in ((2, 3, 160, 224), (1, 3, 96, 96)):
        images = torch.rand(shape)
        with torch.no_grad():
            found = padded_to_list(program(images))
        assert sum(len(d["boxes"]) for d in found) > 0
        result = compare_detections(eager_detections(detector, images), found, atol=1e-4)
        assert result.ok, (shape, result)


def test_mask_rcnn_onnx_runs_at_another_size(tiny_config: PVTv2Config, tmp_path: Path) -> None:
    detector = _detector("maskrcnn", tiny_config)
    images = torch.rand(2, 3, 160, 224)
    result = export_verified_model_onnx(detector, torch.rand(1, 3, 192, 160), images, tmp_path / "mask.onnx")
    assert result.ok, result
    other = torch.rand(1, 3, 256, 192)
    found = load_runtime(tmp_path / "mask.onnx", runtime="onnxruntime")(other)
    assert found[0]["masks"].shape[-2:] == (256, 192)
    assert compare_detections(eager_detections(detector, other), found, atol=1e-4).ok


def test_segmenter_exports_dynamic_sizes_to_every_runtime(tiny_config: PVTv2Config, tmp_path: Path) -> None:
    segmenter = semantic_fpn_pvt_v2(tiny_config, num_classes=4).eval()
    images = torch.rand(3, 3, 96, 64)
    result = export_verified_model_onnx(segmenter, torch.rand(1, 3, 96, 64), images, tmp_path / "seg.onnx")
    assert result.ok and result.max_abs_diff < 1e-4, result
    with torch.no_grad():
        expected = exportable(segmenter)(images)[0]
    logits = load_runtime(tmp_path / "seg.onnx", "onnxruntime")(images)
    assert logits.shape == (3, 4, 96, 64) and torch.allclose(logits, expected, atol=1e-4)
    other = torch.rand(2, 3, 70, 100)  # another size, not a multiple of the stride either
    with torch.no_grad():
        expected_other = exportable(segmenter)(other)[0]
    assert torch.allclose(load_runtime(tmp_path / "seg.onnx", "onnxruntime")(other), expected_other, atol=1e-4)
    program = export_model_program(segmenter, torch.rand(1, 3, 96, 64))
    assert save_verified_model_program(program, tmp_path / "seg.pt2", segmenter, images, atol=1e-4).ok
    assert torch.allclose(load_runtime(tmp_path / "seg.pt2", "torch")(images), expected, atol=1e-4)
    assert torch.allclose(load_runtime(tmp_path / "seg.pt2", "torch")(other), expected_other, atol=1e-4)


@pytest.mark.isolated
def test_int8_backbone_runs_and_its_cosine_is_high(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from pvt_backbone import export_openvino as ov

    torch.manual_seed(0)
    model = PVTv2Backbone.b0().eval()
    onnx_path = export_onnx(model, torch.rand(1, 3, 64, 64), tmp_path / "b0.onnx")
    assert ov.export_verified_openvino(onnx_path, model, torch.randn(2, 3, 64, 96), tmp_path / "b0.xml").ok
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    calibration = ov.calibration_images("synthetic", 8, (64, 64))
    quantized = ov.quantize_openvino(ov.convert_openvino(onnx_path), calibration, preprocess=lambda x: (x - mean) / std)
    held_out = (ov.calibration_images("synthetic", 4, (64, 64), split="val") - mean) / std
    int8 = ov.compile_openvino(quantized)
    cosine = ov.feature_cosine(lambda x: list(model(x).values()), lambda x: ov.run_openvino(int8, x), held_out)
    assert 0.9 < cosine <= 1.0 + 1e-6, cosine
    features = load_runtime(ov.save_openvino(quantized, tmp_path / "b0.int8.xml"), "openvino")(held_out)
    assert sorted(features) == ["0", "1", "2", "3"] and features["3"].shape == (4, 256, 2, 2)
