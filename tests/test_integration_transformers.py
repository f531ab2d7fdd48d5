"""Our PVTv2 backbone inside transformers' Mask2Former, UperNet, Deformable DETR and RT-DETR: interface, parity with
transformers' own PvtV2 backbone, a training step, post-processing and state-dict round trips, on tiny configs."""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pvt_backbone import PVTv2Backbone, PVTv2Config, save_weights  # noqa: E402
from pvt_backbone.integrations.transformers import (  # noqa: E402
    TransformersBackbone,
    backbone_from_hf,
    deformable_detr_pvt_v2,
    find_backbone,
    hf_pvt_v2_config,
    mask2former_pvt_v2,
    rt_detr_pvt_v2,
    swap_backbone,
    upernet_pvt_v2,
)

# One block per stage, narrow; transformers' PvtV2 uses one LayerNorm eps (1e-6) for every norm.
TINY = PVTv2Config(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2))
TINY_HF_EPS = dataclasses.replace(TINY, embed_norm_eps=1e-6)
NUM_LABELS = 3
ALL, LAST3 = (0, 1, 2, 3), (1, 2, 3)

_DETR = {
    "d_model": 32,
    "encoder_ffn_dim": 32,
    "decoder_ffn_dim": 32,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "decoder_layers": 2,  # transformers ties the box heads of decoder layers 1.. to layer 0: needs two
    "num_queries": 7,
}
_RT = {**_DETR, "encoder_hidden_dim": 32, "decoder_in_channels": [32, 32, 32], "num_denoising": 4}
# name -> (builder, transformers model class, config class, out_indices, tiny decoder overrides, fields compared)
HEADS: dict[str, tuple[Callable[..., Any], str, str, tuple[int, ...], dict[str, Any], tuple[str, ...]]] = {
    "mask2former": (
        mask2former_pvt_v2,
        "Mask2FormerForUniversalSegmentation",
        "Mask2FormerConfig",
        ALL,
        {
            "feature_size": 32,
            "mask_feature_size": 32,
            "hidden_dim": 32,
            "encoder_feedforward_dim": 64,
            "dim_feedforward": 64,
            "encoder_layers": 1,
            "decoder_layers": 2,
            "num_attention_heads": 2,
            "num_queries": 5,
            "train_num_points": 64,
        },
        ("class_queries_logits", "masks_queries_logits"),
    ),
    "upernet": (
        upernet_pvt_v2,
        "UperNetForSemanticSegmentation",
        "UperNetConfig",
        ALL,
        {"hidden_size": 32, "auxiliary_channels": 16},
        ("logits",),
    ),
    "deformable_detr": (
        deformable_detr_pvt_v2,
        "DeformableDetrForObjectDetection",
        "DeformableDetrConfig",
        LAST3,
        {**_DETR, "encoder_layers": 1},
        ("logits", "pred_boxes"),
    ),
    "rt_detr": (
        rt_detr_pvt_v2,
        "RTDetrForObjectDetection",
        "RTDetrConfig",
        LAST3,
        _RT,
        ("logits", "pred_boxes"),
    ),
}
# RT-DETR's FPN upsamples by exactly 2: sides must be multiples of 32; the others take odd sizes.
SIZES = {"mask2former": (61, 77), "upernet": (61, 77), "deformable_detr": (61, 77), "rt_detr": (64, 96)}


def build(name: str, variant: PVTv2Config = TINY, **extra: Any) -> torch.nn.Module:
    builder, _, _, _, overrides, _ = HEADS[name]
    return builder(variant, num_labels=NUM_LABELS, **{**overrides, **extra})


@functools.cache
def shared(name: str) -> torch.nn.Module:
    """One model per head, built once for the tests that only read it (they set eval mode)."""
    torch.manual_seed(0)
    return build(name).eval()


def build_native(name: str, model_class: str, config_class: str) -> torch.nn.Module:
    """The same model with transformers' own PvtV2Backbone (random weights)."""
    _, _, _, out_indices, overrides, _ = HEADS[name]
    extra = {"encoder_in_channels": [32, 48, 64], "feat_strides": [8, 16, 32]} if "RTDetr" in model_class else {}
    config = getattr(transformers, config_class)(
        backbone_config=hf_pvt_v2_config(TINY_HF_EPS, out_indices=out_indices),
        use_pretrained_backbone=False,
        num_labels=NUM_LABELS,
        **overrides,
        **extra,
    )
    return getattr(transformers, model_class)(config)


def inputs(name: str, batch: int = 1) -> dict[str, torch.Tensor]:
    height, width = SIZES[name]
    pixels = {"pixel_values": torch.randn(batch, 3, height, width)}
    if name == "deformable_detr":
        pixels["pixel_mask"] = torch.ones(batch, height, width, dtype=torch.long)
    return pixels


def labels(name: str, batch: int) -> dict[str, Any]:
    height, width = SIZES[name]
    if name == "mask2former":
        return {
            "mask_labels": [(torch.rand(2, height, width) > 0.5).float() for _ in range(batch)],
            "class_labels": [torch.tensor([0, 2]) for _ in range(batch)],
        }
    if name == "upernet":
        return {"labels": torch.randint(0, NUM_LABELS, (batch, height, width))}
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]])  # normalized (cx, cy, w, h)
    return {"labels": [{"class_labels": torch.tensor([1, 2]), "boxes": boxes} for _ in range(batch)]}


# -- the adapter -----------------------------------------------------------------------------------------------------
def test_adapter_matches_transformers_backbone_interface() -> None:
    hf = transformers.PvtV2Backbone(hf_pvt_v2_config(TINY_HF_EPS, out_indices=LAST3)).eval()
    ours = TransformersBackbone(backbone_from_hf(hf)).eval()
    for attribute in ("stage_names", "out_features", "out_indices", "channels", "num_features"):
        assert list(getattr(ours, attribute)) == list(getattr(hf, attribute)), attribute
    assert ours.out_feature_channels == hf.out_feature_channels
    assert ours.strides == [8, 16, 32]
    x = torch.randn(2, 3, 61, 77)
    with torch.no_grad():
        theirs, mine = hf(x, output_hidden_states=True), ours(x, output_hidden_states=True)
        plain = ours.forward_with_filtered_kwargs(x, output_attentions=True, output_hidden_states=False)
        as_tuple = ours(x, return_dict=False)
    assert isinstance(mine, transformers.modeling_outputs.BackboneOutput)
    assert len(mine.feature_maps) == 3 and len(mine.hidden_states) == len(theirs.hidden_states) == 4
    for a, b in zip(theirs.feature_maps + theirs.hidden_states, mine.feature_maps + mine.hidden_states):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    assert mine.attentions is None and plain.hidden_states is None and plain.attentions is None
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and torch.equal(as_tuple[0][0], plain.feature_maps[0])


def test_adapter_keys_are_ours_under_one_prefix() -> None:
    backbone = PVTv2Backbone(TINY, out_indices=LAST3)
    adapter = TransformersBackbone(backbone)
    assert list(adapter.state_dict()) == ["backbone." + key for key in backbone.state_dict()]
    with pytest.raises(TypeError, match="PVTv2Backbone"):
        TransformersBackbone(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


# -- parity with transformers' own PvtV2 backbone --------------------------------------------------------------------
PARITY = [(name, spec[1], spec[2]) for name, spec in HEADS.items()] + [
    ("rt_detr", "RTDetrV2ForObjectDetection", "RTDetrV2Config")
]


@pytest.mark.parametrize(("name", "model_class", "config_class"), PARITY, ids=[p[1] for p in PARITY])
def test_swap_keeps_outputs(name: str, model_class: str, config_class: str) -> None:
    native = build_native(name, model_class, config_class).eval()
    swapped = swap_backbone(copy.deepcopy(native), backbone_from_hf(find_backbone(native)))
    assert isinstance(find_backbone(swapped), TransformersBackbone)
    assert not isinstance(find_backbone(native), TransformersBackbone)
    batch = inputs(name, batch=2)
    with torch.no_grad():
        expected, got = native(**batch, output_hidden_states=True), swapped(**batch, output_hidden_states=True)
    for field in HEADS[name][5]:  # what the head predicts: 1e-4
        torch.testing.assert_close(got[field], expected[field], atol=1e-4, rtol=0, msg=f"{model_class}.{field}")
    pairs = list(zip(_tensors(expected), _tensors(got), strict=True))
    assert len(pairs) > len(HEADS[name][5])
    # Every other tensor, hidden states included: Deformable DETR's encoder states move by up to ~4e-4 (the
    # backbone maps differ by ~3e-6, float32 summation order), which its predictions do not show.
    for index, (a, b) in enumerate(pairs):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=0, msg=lambda m, i=index: f"{model_class} tensor {i}: {m}")


def _tensors(value: object) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


# -- training ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(HEADS))
def test_training_step_reaches_every_parameter(name: str) -> None:
    model = build(name).train()
    batch = 2  # UperNet's pooling module batch-normalizes 1x1 maps: one image has one value per channel
    out = model(**inputs(name, batch), **labels(name, batch))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    # No head here has unused trainable parameters on these configs; a name listed here would be one.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    backbone = find_backbone(model).backbone
    before = backbone.patch_embed.proj.weight.detach().clone()
    assert backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, backbone.patch_embed.proj.weight)


# -- prediction through the image processors -------------------------------------------------------------------------
def _image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)


def test_mask2former_post_processing() -> None:
    processor = transformers.Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    batch = processor(images=[_image()], return_tensors="pt")
    with torch.no_grad():
        out = shared("mask2former").eval()(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    semantic = processor.post_process_semantic_segmentation(out, target_sizes=[(70, 90)])[0]
    assert semantic.shape == (70, 90) and 0 <= int(semantic.min()) and int(semantic.max()) < NUM_LABELS
    instance = processor.post_process_instance_segmentation(out, threshold=0.0, target_sizes=[(70, 90)])[0]
    assert instance["segmentation"].shape == (70, 90)
    assert all(0 <= info["label_id"] < NUM_LABELS for info in instance["segments_info"])


def test_upernet_post_processing() -> None:
    processor = transformers.SegformerImageProcessor(size={"height": 61, "width": 77})
    batch = processor(images=[_image()], return_tensors="pt")
    with torch.no_grad():
        out = shared("upernet").eval()(pixel_values=batch["pixel_values"])
    assert out.logits.shape == (1, NUM_LABELS, 61, 77)
    maps = processor.post_process_semantic_segmentation(out, target_sizes=[(70, 90)])
    assert maps[0].shape == (70, 90) and int(maps[0].max()) < NUM_LABELS


@pytest.mark.parametrize(
    ("name", "processor"),
    [
        (
            "deformable_detr",
            lambda: transformers.DeformableDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        ),
        ("rt_detr", lambda: transformers.RTDetrImageProcessor(size={"height": 64, "width": 96})),
    ],
)
def test_detector_post_processing(name: str, processor: Callable[[], Any]) -> None:
    image_processor = processor()
    batch = image_processor(images=[_image()], return_tensors="pt")
    with torch.no_grad():
        out = shared(name).eval()(**batch)
    result = image_processor.post_process_object_detection(out, threshold=0.0, target_sizes=[(70, 90)])[0]
    assert result["boxes"].ndim == 2 and result["boxes"].shape[1] == 4 and len(result["boxes"]) > 0
    assert len(result["scores"]) == len(result["labels"]) == len(result["boxes"])
    assert ((result["scores"] >= 0) & (result["scores"] <= 1)).all()
    assert ((result["labels"] >= 0) & (result["labels"] < NUM_LABELS)).all()


# -- state dicts and weights -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(HEADS))
def test_backbone_keys_keep_our_names(name: str) -> None:
    model = shared(name)
    backbone = find_backbone(model)
    prefix = next(k for k, v in model.named_modules() if v is backbone) + ".backbone."
    ours = [k.removeprefix(prefix) for k in model.state_dict() if k.startswith(prefix)]
    assert ours == list(PVTv2Backbone(TINY, out_indices=HEADS[name][3]).state_dict())


@pytest.mark.parametrize("name", ["mask2former"])
def test_state_dict_round_trip(name: str) -> None:
    first = shared(name).eval()
    torch.manual_seed(1)
    second = build(name).eval()
    batch = inputs(name)
    field = HEADS[name][5][0]
    with torch.no_grad():
        assert not torch.allclose(first(**batch)[field], second(**batch)[field])
        second.load_state_dict(first.state_dict(), strict=True)
        torch.testing.assert_close(second(**batch)[field], first(**batch)[field], atol=0, rtol=0)


def test_weights_backbone_loads_through_our_loader(tmp_path) -> None:
    source = PVTv2Backbone(TINY)
    path = tmp_path / "tiny.safetensors"
    save_weights(source, path, layout="hf")
    model = build("upernet", weights_backbone=path)
    loaded = find_backbone(model).backbone
    assert loaded.load_report is not None and loaded.load_report.layout == "hf"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


# -- checks ----------------------------------------------------------------------------------------------------------
def test_swap_rejects_wrong_channels_strides_and_models() -> None:
    model = build("mask2former")
    with pytest.raises(ValueError, match=r"channels \[16, 32, 48, 64\], got \[32, 48, 64\]"):
        swap_backbone(model, PVTv2Backbone(TINY, out_indices=LAST3))
    with pytest.raises(ValueError, match=r"strides \[16, 32, 64\] \(config.feat_strides\), got \[8, 16, 32\]"):
        build("rt_detr", feat_strides=[16, 32, 64])
    with pytest.raises(TypeError, match="does not know where Linear keeps its backbone"):
        swap_backbone(torch.nn.Linear(2, 2), PVTv2Backbone(TINY))
    with pytest.raises(TypeError, match="PVTv2Backbone or a TransformersBackbone"):
        swap_backbone(model, torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="backbone_config"):
        build("upernet", backbone_config=hf_pvt_v2_config(TINY))


def test_swap_into_the_base_model_keeps_mode() -> None:
    model = build("mask2former").eval()
    adapter = TransformersBackbone(PVTv2Backbone(TINY)).train()
    swap_backbone(model.model, adapter)  # Mask2FormerModel: pixel_level_module.encoder
    assert find_backbone(model) is adapter and not adapter.training
