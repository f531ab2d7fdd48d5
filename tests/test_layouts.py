"""Pure key-layout mapping: detection, containers and prefixes, lossless round trips, architecture inference."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn

import pvt_backbone.weights.converter
from pvt_backbone import VARIANTS, PVTv2Backbone, PVTv2Config
from pvt_backbone.classifier import build_classifier
from pvt_backbone.weights.detect import convert, detect_layout, infer_architecture, to_native
from pvt_backbone.weights.layouts import (
    LAYOUTS,
    CheckpointError,
    DroppedKey,
    dropped_lines,
    from_native,
    keep_stages,
    map_to_native,
    scope_kind,
    split_head,
    unwrap_checkpoint,
)


@functools.cache
def meta_state_dict(variant: str) -> dict[str, Tensor]:
    """Keys and shapes of our own classifier (head included) without allocating memory."""
    with torch.device("meta"):
        return dict(build_classifier(variant).state_dict())


@functools.cache
def random_state_dict(variant: str) -> dict[str, Tensor]:
    """Our classifier's keys with random values (no model built: fast even for b2_li)."""
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=generator) for k, v in meta_state_dict(variant).items()}


@functools.cache
def _tiny(linear: bool) -> dict[str, Tensor]:
    config = PVTv2Config(embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4), linear=linear)
    return {k: v.detach().clone() for k, v in build_classifier(config, num_classes=5).state_dict().items()}


def tiny_state_dict(linear: bool = False) -> dict[str, Tensor]:
    """A tiny classifier's native state dict (a new dict each call; the tensors are shared, never modified)."""
    return dict(_tiny(linear))


def expected_native(native: dict[str, Tensor], layout: str) -> dict[str, Tensor]:
    """What survives a native -> layout -> native trip: everything but a head the layout cannot hold."""
    return {k: v for k, v in native.items() if LAYOUTS[layout].head is not None or not k.startswith("head.")}


# ---------------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "layout"),
    # mmdet cannot express linear SRA: its refusal is tested below.
    [(v, layout) for v in ("b0", "b2_li") for layout in LAYOUTS if not (layout == "mmdet" and VARIANTS[v].linear)],
)
def test_round_trip_is_bit_exact(variant: str, layout: str) -> None:
    native = random_state_dict(variant)
    exported = from_native(native, layout)
    back = to_native(exported.state_dict)
    assert back.layout == layout
    want = expected_native(native, layout)
    assert sorted(back.state_dict) == sorted(want)
    for key, tensor in want.items():
        assert back.state_dict[key].dtype == tensor.dtype
        assert torch.equal(back.state_dict[key], tensor), key


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trip_keys_and_shapes_for_every_variant(variant: str, layout: str) -> None:
    native = meta_state_dict(variant)
    if layout == "mmdet" and VARIANTS[variant].linear:
        with pytest.raises(CheckpointError, match="no linear SRA"):
            from_native(native, layout)
        return
    back = to_native(from_native(native, layout).state_dict)
    want = expected_native(native, layout)
    assert {k: v.shape for k, v in back.state_dict.items()} == {k: v.shape for k, v in want.items()}
    assert infer_architecture(back.state_dict).variant == variant


# Key counts of the reference dumps (pvt-formats.md §2): B2 and B2-Li, 1000-class head where the layout has one.
@pytest.mark.parametrize(
    ("variant", "layout", "count"),
    [
        ("b2", "timm", 334),
        ("b2", "pvt", 334),
        ("b2", "hf", 366),
        ("b2", "mmdet", 300),
        ("b2", "lucid", 334),
        ("b2", "timm_features", 332),
        ("b2_li", "timm", 346),
        ("b2_li", "hf", 378),
    ],
)
def test_key_counts_match_the_reference_dumps(variant: str, layout: str, count: int) -> None:
    assert len(from_native(meta_state_dict(variant), layout).state_dict) == count


def test_hf_key_and_value_are_the_row_halves_of_kv() -> None:
    native = random_state_dict("b0")
    hf = from_native(native, "hf").state_dict
    kv = native["stages.2.blocks.1.attn.kv.weight"]
    dim = kv.shape[1]
    prefix = "pvt_v2.encoder.layers.2.blocks.1.attention."
    assert torch.equal(hf[prefix + "key.weight"], kv[:dim])
    assert torch.equal(hf[prefix + "value.weight"], kv[dim:])
    assert torch.equal(hf[prefix + "value.bias"], native["stages.2.blocks.1.attn.kv.bias"][dim:])
    assert torch.equal(hf["classifier.weight"], native["head.weight"])
    # Saved tensors must not share memory: the halves are separate, contiguous storages.
    key, value = hf[prefix + "key.weight"], hf[prefix + "value.weight"]
    assert key.is_contiguous() and value.is_contiguous()
    assert key.untyped_storage().data_ptr() != value.untyped_storage().data_ptr()


def test_hf_backbone_keys_have_no_model_prefix() -> None:
    body, _ = split_head(random_state_dict("b0"))
    hf = from_native(body, "hf").state_dict
    assert all(key.startswith("encoder.layers.") for key in hf)
    assert to_native(hf).layout == "hf"


def test_mmdet_in_proj_is_q_then_kv_and_mlp_is_1x1_conv() -> None:
    native = random_state_dict("b0")
    mm = from_native(native, "mmdet").state_dict
    q, kv = native["stages.1.blocks.0.attn.q.weight"], native["stages.1.blocks.0.attn.kv.weight"]
    assert torch.equal(mm["layers.1.1.0.attn.attn.in_proj_weight"], torch.cat([q, kv]))
    fc1 = native["stages.1.blocks.0.mlp.fc1.weight"]
    assert mm["layers.1.1.0.ffn.layers.0.weight"].shape == (*fc1.shape, 1, 1)
    assert torch.equal(mm["layers.1.1.0.ffn.layers.4.bias"], native["stages.1.blocks.0.mlp.fc2.bias"])
    assert torch.equal(mm["layers.0.0.projection.weight"], native["patch_embed.proj.weight"])
    assert torch.equal(mm["layers.3.2.weight"], native["stages.3.norm.weight"])


def test_mmdet_in_proj_computes_torch_multihead_attention() -> None:
    """mmdet runs attention through nn.MultiheadAttention on [q; k; v] rows; our q/kv split must compute the same."""
    config = PVTv2Config(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))
    backbone = PVTv2Backbone(config).eval()
    attn = backbone.stages[3].blocks[0].attn  # sr_ratio 1: keys and values come from the tokens themselves
    native = {f"stages.3.blocks.0.attn.{k}": v for k, v in attn.state_dict().items()}
    mm = from_native(native, "mmdet").state_dict
    mha = nn.MultiheadAttention(32, num_heads=4, batch_first=True)
    mha.load_state_dict(
        {
            "in_proj_weight": mm["layers.3.1.0.attn.attn.in_proj_weight"],
            "in_proj_bias": mm["layers.3.1.0.attn.attn.in_proj_bias"],
            "out_proj.weight": mm["layers.3.1.0.attn.attn.out_proj.weight"],
            "out_proj.bias": mm["layers.3.1.0.attn.attn.out_proj.bias"],
        }
    )
    tokens = torch.randn(2, 3, 5, 32)
    with torch.no_grad():
        ours = attn(tokens).reshape(2, 15, 32)
        flat = tokens.reshape(2, 15, 32)
        theirs = mha(flat, flat, flat, need_weights=False)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_pvt_layout_is_one_based_with_nested_dwconv() -> None:
    pvt = from_native(random_state_dict("b0"), "pvt").state_dict
    for key in (
        "patch_embed1.proj.weight",
        "patch_embed4.norm.bias",
        "block1.0.mlp.dwconv.dwconv.weight",
        "norm4.bias",
    ):
        assert key in pvt
    assert "head.weight" in pvt and not any(k.startswith("stages") for k in pvt)


def test_convert_between_layouts_directly() -> None:
    native = random_state_dict("b0")
    hf = from_native(native, "hf").state_dict
    result = convert(hf, dst="pvt")
    assert result.state_dict.keys() == from_native(native, "pvt").state_dict.keys()
    assert torch.equal(result.state_dict["block2.1.attn.kv.weight"], native["stages.1.blocks.1.attn.kv.weight"])


def test_mmdet_refuses_linear_sra() -> None:
    with pytest.raises(CheckpointError, match="no linear SRA"):
        from_native(tiny_state_dict(linear=True), "mmdet")


# ---------------------------------------------------------------------------------------------------------------------
# Detection, containers, prefixes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_detect_layout_from_sentinels(layout: str) -> None:
    exported = from_native(tiny_state_dict(), layout).state_dict
    assert detect_layout(exported) == (layout, "")


def test_lucid_without_head_is_timm() -> None:
    body, _ = split_head(tiny_state_dict())
    assert detect_layout(from_native(body, "lucid").state_dict) == ("timm", "")


def test_wrong_layout_or_prefix_errors_name_what_is_there() -> None:
    detector = {"backbone." + k: v for k, v in from_native(tiny_state_dict(), "mmdet").state_dict.items()}
    with pytest.raises(CheckpointError, match=r"hf keys in the checkpoint: found mmdet under 'backbone\.'"):
        to_native(detector, layout="hf")
    with pytest.raises(CheckpointError, match=r"prefix 'bb\.'; it holds mmdet under 'backbone\.'"):
        to_native(detector, layout="mmdet", prefix="bb.")
    with pytest.raises(CheckpointError, match="holds no PVTv2 layout"):
        to_native({"fc.weight": torch.zeros(2, 2)}, layout="hf")


@pytest.mark.parametrize("prefix", ["", "model."])
def test_headless_lucid_converts_when_asked_for_by_name(prefix: str) -> None:
    body, _ = split_head(tiny_state_dict())
    lucid = {prefix + k: v for k, v in from_native(body, "lucid").state_dict.items()}
    conversion = to_native(lucid, layout="lucid")
    assert conversion.layout == "lucid" and conversion.state_dict.keys() == body.keys()


@pytest.mark.parametrize("container", [None, "state_dict", "model", "module", "state_dict_ema"])
@pytest.mark.parametrize("prefix", ["", "module.", "model.", "backbone.", "backbone.body.", "module.backbone."])
@pytest.mark.parametrize("layout", ["timm", "pvt", "hf", "mmdet", "lucid"])
def test_containers_and_prefixes(container: str | None, prefix: str, layout: str) -> None:
    native = tiny_state_dict()
    flat = {prefix + k: v for k, v in from_native(native, layout).state_dict.items()}
    checkpoint: dict[str, object] = flat
    if container is not None:
        checkpoint = {container: flat, "meta": {"epoch": 3}, "optimizer": {"state": {}}, "epoch": 3}
    result = to_native(checkpoint, layout="auto")
    assert (result.layout, result.prefix) == (layout, prefix)
    assert result.state_dict.keys() == expected_native(native, layout).keys()
    if container is not None:
        assert result.container == f"[{container!r}]"
        assert {d.key for d in result.dropped} == {"['meta']", "['optimizer']", "['epoch']"}


def test_detector_checkpoint_keeps_backbone_and_reports_the_rest() -> None:
    body, _ = split_head(tiny_state_dict())
    flat = {"backbone." + k: v for k, v in from_native(body, "mmdet").state_dict.items()}
    flat["neck.lateral_convs.0.conv.weight"] = torch.zeros(4, 8, 1, 1)
    flat["bbox_head.cls_convs.0.weight"] = torch.zeros(4)
    flat["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(2, 4)
    result = to_native({"meta": {"mmdet_version": "3.3.0"}, "state_dict": flat})
    assert (result.layout, result.prefix) == ("mmdet", "backbone.")
    assert result.state_dict.keys() == body.keys()
    dropped = {d.key: d.reason for d in result.dropped}
    assert "neck.lateral_convs.0.conv.weight" in dropped and "roi_head.bbox_head.fc_cls.weight" in dropped
    assert "prefix 'backbone.'" in dropped["bbox_head.cls_convs.0.weight"]


@pytest.mark.parametrize("parity", [0, 1])  # the sentinel key with or without the prefix
def test_mixed_prefixes_raise(parity: int) -> None:
    native = tiny_state_dict()
    mixed = {("module." + k if i % 2 == parity else k): v for i, (k, v) in enumerate(native.items())}
    assert len(mixed) == len(native)
    with pytest.raises(CheckpointError, match="mixed prefixes"):
        to_native(mixed)


def test_two_weight_sets_need_an_explicit_prefix() -> None:
    native = tiny_state_dict()
    both = {**{"student." + k: v for k, v in native.items()}, **{"teacher." + k: v * 2 for k, v in native.items()}}
    with pytest.raises(CheckpointError, match="several PVTv2 weight sets.*prefix="):
        to_native(both)
    picked = to_native(both, prefix="teacher.")
    assert torch.equal(picked.state_dict["stages.0.norm.weight"], native["stages.0.norm.weight"] * 2)


def test_unmapped_key_under_the_prefix_is_an_error() -> None:
    flat = {"backbone." + k: v for k, v in tiny_state_dict().items()}
    flat["backbone.stages.0.blocks.0.attn.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"1 key\(s\) under 'backbone.' match no rule.*attn\.extra"):
        to_native(flat)


def test_mixed_prefix_under_the_prefix_names_the_second_prefix() -> None:
    flat = {"backbone." + k: v for k, v in tiny_state_dict().items()}
    flat["backbone.ema.stages.0.norm.weight"] = torch.zeros(8)  # a layout key behind a second prefix
    with pytest.raises(CheckpointError, match=r"mixed prefixes: .* 1 carry another prefix: 'backbone\.ema\."):
        to_native(flat)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_map_to_native_with_a_named_layout_matches_detection(layout: str) -> None:
    exported = from_native(tiny_state_dict(), layout).state_dict
    named, detected = map_to_native(exported, layout), to_native(exported)
    assert (named.layout, named.prefix, named.notes) == (detected.layout, "", detected.notes)
    assert named.state_dict.keys() == detected.state_dict.keys()
    assert all(torch.equal(named.state_dict[k], v) for k, v in detected.state_dict.items())


def test_map_to_native_names_unmapped_keys_and_the_prefix() -> None:
    body = dict(tiny_state_dict())
    body["stages.0.blocks.0.attn.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"1 key\(s\) at the top level match no rule of the timm layout"):
        map_to_native(body, "timm")
    with pytest.raises(CheckpointError, match=r"under 'net\.' match no rule.*'net\.stages\.0\.blocks\.0\.attn\.extra"):
        map_to_native(body, "native", prefix="net.")
    del body["stages.0.blocks.0.attn.extra.weight"]
    result = map_to_native(body, "native", prefix="net.")
    assert result.prefix == "net." and result.notes[0] == "stripped prefix 'net.'"
    with pytest.raises(ValueError, match="unknown layout 'onnx'"):
        map_to_native(body, "onnx")


def test_scope_kind_and_dropped_lines() -> None:
    assert [scope_kind("hf", k) for k in ("encoder.layers.2.layer_norm.bias", "classifier.weight", "pos_embed")] == [
        "norm",
        "head",
        None,
    ]
    assert scope_kind("native", "stages.0.downsample.proj.weight") is None  # stage 0 is embedded by patch_embed
    dropped = [DroppedKey(f"neck.{i}", "not PVTv2") for i in range(7)] + [DroppedKey("head.bias", "no head")]
    assert dropped_lines(dropped) == [
        "  dropped 7 (not PVTv2): neck.0, neck.1, neck.2, neck.3, neck.4 ...",
        "  dropped 1 (no head): head.bias",
    ]


def test_the_package_convert_is_the_function_next_to_the_converter_module() -> None:
    # importing a submodule sets the package attribute of its name: one named "convert" would replace the function

    assert callable(pvt_backbone.weights.converter.convert_checkpoint)
    assert pvt_backbone.weights.convert is convert


def test_renamed_keys_are_not_a_known_layout() -> None:
    renamed = {"encoder_" + k.replace(".", "_"): v for k, v in tiny_state_dict().items()}
    with pytest.raises(CheckpointError, match="not a PVTv2 checkpoint in any known layout"):
        to_native(renamed)


def test_incomplete_split_pair_is_an_error() -> None:
    hf = from_native(tiny_state_dict(), "hf").state_dict
    del hf["pvt_v2.encoder.layers.1.blocks.0.attention.value.weight"]
    with pytest.raises(CheckpointError, match="attention.value.weight is missing next to"):
        to_native(hf)


def test_explicit_layout_that_does_not_match() -> None:
    with pytest.raises(CheckpointError, match="exactly one set of hf keys"):
        to_native(tiny_state_dict(), layout="hf")
    assert to_native(tiny_state_dict(), layout="native").layout == "timm"
    with pytest.raises(ValueError, match="unknown layout 'onnx'"):
        to_native(tiny_state_dict(), layout="onnx")


def test_unwrap_reports_non_tensors_and_rejects_empty() -> None:
    flat, path, dropped = unwrap_checkpoint({"model": {"a.weight": torch.zeros(1), "version": 2}, "args": None})
    assert list(flat) == ["a.weight"] and path == "['model']"
    assert {d.key for d in dropped} == {"['args']", "['model']['version']"}
    with pytest.raises(CheckpointError, match="no tensors found.*'epoch'"):
        unwrap_checkpoint({"epoch": 3, "args": {}})


# ---------------------------------------------------------------------------------------------------------------------
# Look-alikes and inference
# ---------------------------------------------------------------------------------------------------------------------


def pvt_v1_state_dict() -> dict[str, Tensor]:
    """PVT v1 (pvt_small) keys: the original names plus position embeddings, a class token and a final norm."""
    sd = {
        "cls_token": torch.zeros(1, 1, 512),
        "pos_embed1": torch.zeros(1, 3136, 64),
        "pos_embed4": torch.zeros(1, 50, 512),
        "patch_embed1.proj.weight": torch.zeros(64, 3, 4, 4),
        "block1.0.norm1.weight": torch.zeros(64),
        "block1.0.attn.q.weight": torch.zeros(64, 64),
        "block1.0.mlp.fc1.weight": torch.zeros(512, 64),
        "norm.weight": torch.zeros(512),
        "head.weight": torch.zeros(1000, 512),
    }
    return sd


def test_pvt_v1_is_rejected_with_a_helpful_message() -> None:
    with pytest.raises(CheckpointError, match="PVT v1 checkpoint, not PVTv2.*cls_token.*pos_embed1"):
        to_native(pvt_v1_state_dict())
    with pytest.raises(CheckpointError, match="PVT v1"):
        detect_layout({"backbone.layers.0.1.0.pos_embed": None, "backbone.layers.0.1.1.norm1.weight": None})


def mit_state_dict(name: str) -> dict[str, Tensor]:
    """SegFormer MiT keys in the original layout: PVTv2 names, MLP ratio 4 everywhere."""
    config = PVTv2Config(
        embed_dims=(64, 128, 320, 512),
        depths={"b2": (3, 4, 6, 3), "b5": (3, 6, 40, 3)}[name],
        mlp_ratios=(4, 4, 4, 4),
    )
    with torch.device("meta"):
        native = PVTv2Backbone(config).state_dict()
    return from_native(native, "pvt").state_dict


def test_mit_is_recognised_as_a_lookalike() -> None:
    result = to_native(mit_state_dict("b2"))
    arch = infer_architecture(result.state_dict)
    assert arch.variants == () and arch.lookalike == "SegFormer MiT-b2"
    assert "SegFormer MiT-b2, not a PVTv2 variant" in arch.describe()
    b5 = infer_architecture(to_native(mit_state_dict("b5")).state_dict)
    assert b5.variant == "b5" and b5.lookalike == "SegFormer MiT-b5"
    assert "shape-identical to SegFormer MiT-b5" in b5.describe()


def test_transformers_segformer_gets_a_hint() -> None:
    with pytest.raises(CheckpointError, match="SegFormer checkpoint"):
        to_native({"segformer.encoder.block.0.0.attention.self.query.weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_infer_every_variant(variant: str) -> None:
    arch = infer_architecture(meta_state_dict(variant))
    config = VARIANTS[variant]
    assert arch.variants == (variant,)
    assert arch.embed_dims == config.embed_dims and arch.depths == config.depths
    assert arch.mlp_ratios == tuple(map(float, config.mlp_ratios))
    assert arch.linear == config.linear and arch.num_classes == 1000 and arch.in_channels == 3
    assert arch.num_params == sum(v.numel() for v in meta_state_dict(variant).values())


def test_infer_parameter_counts_of_the_reference() -> None:
    assert infer_architecture(meta_state_dict("b2")).num_params == 25_362_856
    body, _ = split_head(meta_state_dict("b2"))
    arch = infer_architecture(body)
    assert (arch.num_params, arch.num_classes) == (24_849_856, 0)


def test_pruned_backbone_fits_several_variants() -> None:
    body, _ = split_head(meta_state_dict("b3"))
    kept, dropped = keep_stages(body, 2)
    assert all(not k.startswith(("stages.2.", "stages.3.")) for k in kept)
    assert dropped and all("stage 2" in d.reason or "stage 3" in d.reason for d in dropped)
    arch = infer_architecture(kept)
    assert arch.num_stages == 2 and arch.variant is None
    assert set(arch.variants) == {"b2", "b3"}  # stages 0-1 of b2 and b3 are identical
    assert "stages 0-1 of PVTv2-b2 or b3" in arch.describe()


def test_infer_rejects_incomplete_dicts() -> None:
    native = tiny_state_dict()
    del native["stages.1.blocks.0.mlp.fc1.weight"]
    with pytest.raises(CheckpointError, match="'stages.1.blocks.0.mlp.fc1.weight' is missing"):
        infer_architecture(native)
