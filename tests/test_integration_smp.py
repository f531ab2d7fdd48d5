"""PVTv2 encoders inside segmentation_models_pytorch decoders (pvt_backbone.integrations.smp)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

smp = pytest.importorskip("segmentation_models_pytorch")

from pvt_backbone import VARIANTS, PVTv2Backbone, save_weights  # noqa: E402
from pvt_backbone.integrations import smp as integration  # noqa: E402

# Small decoders over b0: every model below builds and steps in well under a second on a CPU.
TINY: dict[str, dict[str, Any]] = {
    "Unet": {"decoder_channels": (32, 16, 16, 8, 8)},
    "UnetPlusPlus": {"decoder_channels": (16, 16, 8, 8, 8)},
    "MAnet": {"decoder_channels": (32, 16, 16, 8, 8), "decoder_pab_channels": 16},
    "Linknet": {},
    "FPN": {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32},  # GroupNorm(32, C)
    "PSPNet": {"psp_out_channels": 16},
    "PAN": {"encoder_output_stride": 32, "decoder_channels": 16},
    "UPerNet": {"decoder_channels": 32},
    "Segformer": {"decoder_segmentation_channels": 32},
}
SIZE = {"PAN": (256, 288)}  # PAN's pyramid attention pools the stride-32 map down to 1/8 of it, for any encoder
CLASSES = 3


def build(arch: str, **options: Any) -> nn.Module:
    return getattr(smp, arch)("pvt_v2_b0", encoder_weights=None, classes=CLASSES, **{**TINY[arch], **options})


def test_the_table_covers_every_smp_decoder() -> None:
    names = {cls.__name__ for cls in smp._MODEL_ARCHITECTURES}
    assert set(integration.SUPPORTED_DECODERS) | set(integration.REFUSED_DECODERS) == names
    assert set(TINY) == set(integration.SUPPORTED_DECODERS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_is_registered_with_our_channels(variant: str) -> None:
    name = f"pvt_v2_{variant}"
    assert name in smp.encoders.get_encoder_names()
    with torch.device("meta"):
        encoder = smp.encoders.get_encoder(name, weights=None)
    assert isinstance(encoder, integration.PVTv2Encoder)
    assert encoder.out_channels == [3, 0, *VARIANTS[variant].embed_dims]
    assert encoder.output_stride == 32


@pytest.mark.parametrize("arch", integration.SUPPORTED_DECODERS)
def test_decoder_forward_and_training_step(arch: str) -> None:
    model = build(arch)
    height, width = SIZE.get(arch, (64, 96))
    x = torch.rand(2, 3, height, width)
    logits = model(x)
    assert tuple(logits.shape) == (2, CLASSES, height, width)
    target = torch.randint(0, CLASSES, (2, *logits.shape[-2:]))
    nn.functional.cross_entropy(logits, target).backward()
    missing = [name for name, p in model.encoder.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, missing


def test_unet_takes_odd_sizes_other_decoders_ask_for_multiples_of_32() -> None:
    x = torch.rand(1, 3, 45, 71)
    assert tuple(build("Unet").eval()(x).shape) == (1, CLASSES, 45, 71)
    with pytest.raises(RuntimeError, match="divisible by 32"):
        build("FPN")(x)


def test_depth_sets_the_output_stride_and_the_stages_built() -> None:
    model = build("Unet", encoder_depth=3, decoder_channels=(16, 8, 8))
    assert model.encoder.out_channels == [3, 0, 32, 64]
    assert model.encoder.output_stride == 8
    assert len(model.encoder.stages) == 2
    assert tuple(model.eval()(torch.rand(1, 3, 40, 48)).shape) == (1, CLASSES, 40, 48)


@pytest.mark.parametrize("arch", ["Unet", "Segformer"])
def test_state_dict_round_trip(arch: str, tmp_path: Path) -> None:
    model = build(arch).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    twin = build(arch).eval()
    twin.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


def test_encoder_weights_from_a_checkpoint_equal_loading_by_hand(tmp_path: Path) -> None:
    trained = PVTv2Backbone.b0()
    path = tmp_path / "b0.safetensors"
    save_weights(trained, path)
    model = smp.Segformer("pvt_v2_b0", encoder_weights=str(path), classes=CLASSES)
    by_hand = PVTv2Backbone.b0(weights=path)
    assert model.encoder.state_dict().keys() == by_hand.state_dict().keys()
    for key, value in by_hand.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    assert model.encoder.load_report is not None
    again = smp.FPN("pvt_v2_b0", encoder_weights=path, classes=CLASSES)  # a Path works as well
    assert torch.equal(again.encoder.patch_embed.proj.weight, trained.patch_embed.proj.weight)


def test_encoder_weights_adapt_to_in_channels_and_depth(tmp_path: Path) -> None:
    path = tmp_path / "b0.safetensors"
    save_weights(PVTv2Backbone.b0(), path)
    model = smp.Unet(
        "pvt_v2_b0", encoder_weights=str(path), in_channels=1, encoder_depth=4, decoder_channels=(16, 8, 8, 8)
    )
    assert model.encoder.out_channels == [1, 0, 32, 64, 160]
    assert tuple(model.eval()(torch.rand(1, 1, 64, 64)).shape) == (1, 1, 64, 64)


def test_a_wrong_checkpoint_is_refused_strictly(tmp_path: Path) -> None:
    path = tmp_path / "b1.safetensors"
    save_weights(PVTv2Backbone.b1(out_indices=(0,)), path)
    with pytest.raises(ValueError, match="b1"):
        smp.Unet("pvt_v2_b0", encoder_weights=str(path))
    with pytest.raises(FileNotFoundError):
        smp.Unet("pvt_v2_b0", encoder_weights=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("weights", ["imagenet", "ssl"])
def test_smp_weight_names_are_refused_listing_what_is_accepted(weights: str) -> None:
    with pytest.raises(ValueError, match=rf"encoder_weights='{weights}'.*checkpoint path.*hf-hub:"):
        smp.Unet("pvt_v2_b0", encoder_weights=weights)
    with pytest.raises(ValueError, match="checkpoint path"):
        smp.Unet("pvt_v2_b0")  # smp's default is "imagenet"


@pytest.mark.parametrize(
    ("arch", "options", "message"),
    [
        ("DeepLabV3", {}, r"smp\.DeepLabV3 cannot use encoder 'pvt_v2_b0'.*output stride 32.*FPN"),
        ("DeepLabV3Plus", {}, r"smp\.DeepLabV3Plus cannot use .*8 or 16.*UPerNet"),
        ("PAN", {}, r"smp\.PAN asks for output_stride=16.*encoder_output_stride=32"),
        ("FPN", {"encoder_depth": 4}, r"smp\.FPN .* needs encoder_depth=5, got 4"),
        ("DPT", {}, "tu-"),
    ],
)
def test_decoders_that_cannot_work_are_refused_by_name(arch: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        getattr(smp, arch)("pvt_v2_b0", encoder_weights=None, **options)


def test_backbone_options_pass_through_and_unknown_ones_are_refused() -> None:
    model = smp.UPerNet("pvt_v2_b0", encoder_weights=None, drop_path_rate=0.1, frozen_stages=1)
    assert model.encoder.drop_path_rate == 0.1
    assert not any(p.requires_grad for p in model.encoder.stages[0].parameters())
    with pytest.raises(TypeError, match="unexpected encoder options.*'depths'"):
        smp.UPerNet("pvt_v2_b0", encoder_weights=None, depths=(1, 1, 1, 1))


def test_other_encoders_pass_through_and_registering_twice_is_harmless() -> None:
    integration.register()
    assert smp.encoders.get_encoder.__wrapped__.__module__ == "segmentation_models_pytorch.encoders"
    model = smp.FPN("resnet18", encoder_weights=None, classes=CLASSES)
    assert list(model.encoder.out_channels) == [3, 64, 64, 128, 256, 512]


def test_encoder_load_state_dict_drops_a_classifier_head() -> None:
    encoder = integration.create_encoder("pvt_v2_b0")
    state = {**PVTv2Backbone.b0().state_dict(), "head.weight": torch.zeros(2, 256), "head.bias": torch.zeros(2)}
    encoder.load_state_dict(state)
    assert torch.equal(encoder.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    with pytest.raises(RuntimeError, match="Missing key"):
        encoder.load_state_dict({})


def test_set_in_channels_keeps_the_input_check_in_step() -> None:
    encoder = integration.PVTv2Encoder("b0", depth=3)
    encoder.set_in_channels(4, pretrained=False)
    assert encoder.out_channels == [4, 0, 32, 64]
    assert [f.shape[1] for f in encoder(torch.rand(1, 4, 32, 32))] == [4, 0, 32, 64]


@pytest.mark.parametrize("depth", [1, 6])
def test_depth_outside_2_to_5_is_refused(depth: int) -> None:
    with pytest.raises(ValueError, match="depth"):
        smp.Unet("pvt_v2_b0", encoder_weights=None, encoder_depth=depth, decoder_channels=(8,) * depth)
