"""The registry: every builder is listed, every listed name builds what its name says, weights reach the model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet

from pvt_backbone import PVTv2, PVTv2Backbone, create_model, list_models
from pvt_backbone.config import VARIANTS
from pvt_backbone.registry import KINDS, MODELS
from pvt_backbone.segmentation import PVTv2Segmenter
from pvt_backbone.weights import CheckpointError, load_model_weights

EXPECTED_CLASS = {
    "backbone": PVTv2Backbone,
    "classifier": PVTv2,
    "fasterrcnn": FasterRCNN,
    "maskrcnn": MaskRCNN,
    "keypointrcnn": KeypointRCNN,
    "retinanet": RetinaNet,
    "fcos": FCOS,
    "semantic_fpn": PVTv2Segmenter,
}


def _family(name: str) -> str:
    kind = MODELS[name].kind
    return kind if kind in ("backbone", "classifier") else name.split("_pvt_v2_")[0]


def _required(name: str) -> dict:
    return {"num_classes": 3} if MODELS[name].kind in ("detector", "segmenter") else {}


def test_every_builder_and_variant_is_listed() -> None:
    names = list_models()
    assert names == sorted(names) and len(names) == len(EXPECTED_CLASS) * len(VARIANTS)
    for variant in VARIANTS:
        assert f"pvt_v2_{variant}" in names and f"maskrcnn_pvt_v2_{variant}_fpn" in names
    assert sum(len(list_models(kind=kind)) for kind in KINDS) == len(names)


@pytest.mark.parametrize("name", list_models())
def test_each_name_builds_its_class_and_variant(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name, **_required(name))
    assert isinstance(model, EXPECTED_CLASS[_family(name)])
    trunk = model if isinstance(model, (PVTv2Backbone, PVTv2)) else next(
        m for m in model.modules() if isinstance(m, PVTv2Backbone)
    )
    assert trunk.config == VARIANTS[MODELS[name].variant]


def test_pattern_and_kind_filters() -> None:
    assert list_models("retinanet_*_b5_*") == ["retinanet_pvt_v2_b5_fpn"]
    assert list_models("nothing*") == []
    assert all(MODELS[name].kind == "classifier" for name in list_models(kind="classifier"))
    with pytest.raises(ValueError, match="kind must be one of"):
        list_models(kind="detectors")


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match="did you mean pvt_v2_b2_backbone"):
        create_model("pvt_v2_b2_backbon")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50")


def test_backbone_weights_in_any_layout(tmp_path) -> None:
    source = create_model("pvt_v2_b0")
    path = tmp_path / "cls.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    backbone = create_model("pvt_v2_b0_backbone", weights=path)
    assert torch.equal(backbone.state_dict()["patch_embed.proj.weight"], source.state_dict()["patch_embed.proj.weight"])


def test_whole_detector_weights_round_trip_and_refusal(tmp_path) -> None:
    trained = create_model("retinanet_pvt_v2_b0_fpn", num_classes=4)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    loaded = create_model("retinanet_pvt_v2_b0_fpn", num_classes=4, weights=path)
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    other = create_model("retinanet_pvt_v2_b0_fpn", num_classes=5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="mismatch"):
        load_model_weights(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched
    backbone_only = create_model("pvt_v2_b0").state_dict()
    with pytest.raises(CheckpointError, match="weights_backbone"):
        create_model("retinanet_pvt_v2_b0_fpn", num_classes=4, weights=backbone_only)


def test_published_detector_files_go_to_the_builders_weights(tmp_path) -> None:
    from pvt_backbone.detection import pvt_fpn_backbone
    from pvt_backbone.mmdet_compat import mmdet_retinanet
    from pvt_backbone.weights.detectors import is_detector_file, save_detector, to_mmdet_state_dict

    backbone = pvt_fpn_backbone("b0", out_indices=(1, 2, 3), extra_levels="p6p7", p6p7_source="c5", fpn_channels=16)
    published = mmdet_retinanet(backbone, 3)  # mmdet's RetinaNet: what a published file holds
    mmdet_file = tmp_path / "retinanet_mmdet.pth"
    torch.save({"meta": {}, "state_dict": to_mmdet_state_dict(published.state_dict(), "retinanet")}, mmdet_file)
    assert is_detector_file(mmdet_file)
    model = create_model("retinanet_pvt_v2_b0_fpn", weights=mmdet_file)  # no num_classes: the file has it
    assert model.load_report.arch == "retinanet" and model.class_names == ("class_0", "class_1", "class_2")
    assert all(torch.equal(v, published.state_dict()[k]) for k, v in model.state_dict().items())
    ours = save_detector(model, tmp_path / "retinanet.safetensors")
    assert is_detector_file(ours)
    again = create_model("retinanet_pvt_v2_b0_fpn", weights=ours)
    assert all(torch.equal(v, published.state_dict()[k]) for k, v in again.state_dict().items())
    with pytest.raises(ValueError, match="variant 'b1' does not match"):  # the builder's check, not a strict load
        create_model("retinanet_pvt_v2_b1_fpn", weights=ours)
    # Training output (torchvision keys) is no detector file: it keeps going through load_model_weights.
    trained = tmp_path / "model.safetensors"
    untrained = create_model("retinanet_pvt_v2_b0_fpn", num_classes=4)
    save_file({k: v.contiguous() for k, v in untrained.state_dict().items()}, str(trained))
    assert not is_detector_file(trained)
    assert not hasattr(create_model("retinanet_pvt_v2_b0_fpn", num_classes=4, weights=trained), "load_report")
