"""Optimizer parameter groups: every trainable parameter exactly once, no decay on norms/biases, backbone LR."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pvt_backbone import PVTv2Config
from pvt_backbone.classifier import build_classifier
from pvt_backbone.detection import fasterrcnn_pvt_v2_fpn
from pvt_backbone.optim import NORM_TYPES, param_groups
from pvt_backbone.segmentation import semantic_fpn_pvt_v2


@pytest.fixture
def tiny() -> PVTv2Config:
    return PVTv2Config(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))


def _models(tiny: PVTv2Config) -> dict[str, nn.Module]:
    return {
        "fasterrcnn (2 stages frozen)": fasterrcnn_pvt_v2_fpn(tiny, num_classes=3, fpn_channels=8, trainable_stages=2),
        "segmenter (batch norm head)": semantic_fpn_pvt_v2(tiny, num_classes=3, norm_layer=nn.BatchNorm2d),
        "classifier": build_classifier(tiny, num_classes=5),
    }


def test_every_trainable_parameter_is_in_exactly_one_group(tiny: PVTv2Config) -> None:
    for label, model in _models(tiny).items():
        groups = param_groups(model, lr=2e-4, weight_decay=0.05, backbone_lr_mult=0.1)
        grouped = [id(p) for g in groups for p in g["params"]]
        assert len(grouped) == len(set(grouped)), label
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert set(grouped) == trainable, label
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert ("2 stages frozen" in label) == bool(frozen)


def test_norms_biases_and_1d_parameters_get_no_decay(tiny: PVTv2Config) -> None:
    for label, model in _models(tiny).items():
        groups = {g["name"]: g for g in param_groups(model, lr=1e-4, weight_decay=1e-4)}
        no_decay = {id(p) for name, g in groups.items() if name.endswith("no_decay") for p in g["params"]}
        for g in groups.values():
            assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 1e-4)
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                expect = isinstance(module, NORM_TYPES) or name == "bias" or p.ndim <= 1
                assert (id(p) in no_decay) == expect, (label, type(module).__name__, name)
        assert any(isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)) for m in model.modules())


def test_backbone_lr_mult_applies_to_the_pretrained_trunk_only(tiny: PVTv2Config) -> None:
    model = semantic_fpn_pvt_v2(tiny, num_classes=3)
    groups = param_groups(model, lr=1e-3, weight_decay=0.0, backbone_lr_mult=0.1)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = 1e-4 if name.startswith("backbone.") else 1e-3
        assert lr_of[id(p)] == pytest.approx(expected), name
    classifier = build_classifier(tiny, num_classes=5)
    groups = param_groups(classifier, lr=1e-3, weight_decay=0.0, backbone_lr_mult=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(classifier.head.weight)] == pytest.approx(1e-3)  # the head is not backbone
    assert lr_of[id(classifier.patch_embed.proj.weight)] == pytest.approx(5e-4)


def test_shared_parameters_appear_once_and_adamw_accepts_the_groups() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    assert [(g["name"], len(g["params"])) for g in groups] == [("decay", 1), ("no_decay", 1)]
    optimizer = torch.optim.AdamW(groups)
    model(torch.randn(2, 4)).sum().backward()
    before = shared.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, shared.weight)


def test_bad_arguments_are_rejected() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0.0, got 0"):
        param_groups(model, lr=0, weight_decay=0.0)
    with pytest.raises(ValueError, match=r"weight_decay must be a finite number >= 0.0, got -1"):
        param_groups(model, lr=1e-3, weight_decay=-1)
    with pytest.raises(TypeError, match=r"backbone_lr_mult must be a finite number > 0.0, got True"):
        param_groups(model, lr=1e-3, weight_decay=0.0, backbone_lr_mult=True)
    with pytest.raises(ValueError, match="lr must be a finite number > 0.0, got inf"):
        param_groups(model, lr=float("inf"), weight_decay=0.0)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0.0, got nan"):
        param_groups(model, lr=1e-3, weight_decay=float("nan"))
    groups = param_groups(model, lr=1, weight_decay=0)  # ints are numbers too, and zero decay is allowed
    assert {g["lr"] for g in groups} == {1.0} and isinstance(groups[0]["lr"], float)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        param_groups([model], lr=1e-3, weight_decay=0.0)  # type: ignore[arg-type]
