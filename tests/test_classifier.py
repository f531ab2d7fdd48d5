"""The reference classifier: builders, keys, head handling, repr."""

import pytest
import torch

import pvt_backbone
from heads import ClassificationHead
from pvt_backbone import VARIANTS, PVTv2, PVTv2Backbone, PVTv2Config
from pvt_backbone.classifier import PVT_V2, build_classifier


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_builders_exist_with_reference_signature(name: str) -> None:
    builder = getattr(pvt_backbone, f"pvt_v2_{name}")
    with torch.device("meta"):
        model = builder(img_size=384, num_classes=10, in_channels=1)
    assert isinstance(model, PVTv2) and model.config == VARIANTS[name]
    assert model.num_classes == 10 and model.img_size == 384 and model.in_channels == 1


def test_alias_and_keys() -> None:
    assert PVT_V2 is PVTv2
    with torch.device("meta"):
        classifier = pvt_backbone.pvt_v2_b2()
        backbone = PVTv2Backbone.b2()
    keys = list(classifier.state_dict())
    assert keys == list(backbone.state_dict()) + ["head.weight", "head.bias"]
    assert len(keys) == 334  # timm's pvt_v2_b2 classifier layout


def test_img_size_changes_no_parameter_and_shows_in_repr() -> None:
    with torch.device("meta"):
        small, large = pvt_backbone.pvt_v2_b0(img_size=224), pvt_backbone.pvt_v2_b0(img_size=512)
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in large.state_dict().items()}
    lines = repr(large).splitlines()
    assert lines[0] == "PVTv2("
    assert lines[1].strip().startswith("img_size=512, num_classes=1000, in_chans=3, patch_size=7, embed_dims=[32, 64")


def test_forward_logits_and_pooled_features(tiny_config: PVTv2Config) -> None:
    model = build_classifier(tiny_config, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 96)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    pooled = model(x)
    assert pooled.shape == (2, 32)
    torch.testing.assert_close(pooled, model.forward_features(x)["3"].mean(dim=(-2, -1)))
    assert "head.weight" not in model.state_dict()
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.head.weight.shape == (5, 32)


def test_reference_kwargs(tiny_config: PVTv2Config) -> None:
    model = build_classifier(
        "b0",
        embed_dims=(8, 16, 24, 32),
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 3, 4),
        linear=True,
        drop_rate=0.1,
        attn_drop_rate=0.2,
        drop_path_rate=0.1,
        in_chans=2,
        head_drop_rate=0.3,
    )
    assert model.config.embed_dims == (8, 16, 24, 32) and model.config.linear
    assert model.in_channels == 2
    attn = model.stages[0].blocks[0].attn
    assert attn.proj_drop.p == 0.1 and attn.attn_drop == 0.2 and model.head.drop.p == 0.3


def test_norm_layer_kwarg(tiny_config: PVTv2Config) -> None:
    model = build_classifier(tiny_config, norm_layer=lambda dim: torch.nn.LayerNorm(dim, eps=1e-3))
    assert model.stages[0].blocks[0].norm1.eps == 1e-3 and model.stages[0].norm.eps == 1e-3
    assert model.patch_embed.norm.eps == 1e-5  # the patch-embedding norm keeps the reference eps


def test_unknown_kwarg_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['pretrained'\]; allowed: "):
        pvt_backbone.pvt_v2_b0(pretrained=True)
    with pytest.raises(TypeError, match=r"either drop_rate .* or proj_drop_rate"):
        pvt_backbone.pvt_v2_b0(drop_rate=0.1, proj_drop_rate=0.1)


def test_head_validation() -> None:
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0, got -1"):
        ClassificationHead(8, -1)
    with pytest.raises(ValueError, match=r"in_channels must be a positive int, got 0"):
        ClassificationHead(0, 3)


def test_classifier_freezing_and_checkpointing(tiny_config: PVTv2Config) -> None:
    model = build_classifier(tiny_config, num_classes=3, frozen_stages=2, grad_checkpointing=True)
    model.train()
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert model.patch_embed.proj.weight.grad is None and model.stages[1].norm.weight.grad is None
    assert model.stages[2].norm.weight.grad is not None and model.head.weight.grad is not None
    assert not model.stages[1].training and model.head.training


def test_head_reset_keeps_device_and_dtype() -> None:
    head = ClassificationHead(8, 4).to(torch.bfloat16)
    head.reset(3)
    assert head.weight.dtype == head.bias.dtype == torch.bfloat16 and head.weight.shape == (3, 8)
    assert head(torch.randn(2, 8, 5, 5, dtype=torch.bfloat16)).shape == (2, 3)
