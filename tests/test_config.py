"""The variant table, parameter counts and metadata computed from configs alone."""

import dataclasses

import pytest
import torch

from pvt_backbone import VARIANTS, PVTv2Backbone, PVTv2Config
from pvt_backbone.classifier import build_classifier
from pvt_backbone.config import normalize_out_indices, stage_sizes

# (classifier with 1000-class head, backbone) parameter counts from pvt-formats.md section 4.
EXPECTED_PARAMS = {
    "b0": (3_666_760, 3_409_760),
    "b1": (14_009_000, 13_496_000),
    "b2": (25_362_856, 24_849_856),
    "b2_li": (22_553_512, 22_040_512),
    "b3": (45_238_696, 44_725_696),
    "b4": (62_556_072, 62_043_072),
    "b5": (81_956_008, 81_443_008),
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_table_covers_every_variant() -> None:
    assert set(VARIANTS) == set(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        classifier = build_classifier(name)
        backbone = PVTv2Backbone.from_config(name)
    assert (_count(classifier), _count(backbone)) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_classmethod_equals_from_config(name: str) -> None:
    with torch.device("meta"):
        via_method = getattr(PVTv2Backbone, name)()
        via_name = PVTv2Backbone.from_config(VARIANTS[name])
    assert via_method.config == via_name.config == VARIANTS[name]
    shapes = {k: v.shape for k, v in via_method.state_dict().items()}
    assert shapes == {k: v.shape for k, v in via_name.state_dict().items()}


def test_pruned_backbone_counts_only_built_stages() -> None:
    with torch.device("meta"):
        full = PVTv2Backbone.b2()
        pruned = PVTv2Backbone.b2(out_indices=(0, 1))
    assert len(pruned.stages) == 2
    assert _count(pruned) == _count(full.patch_embed) + _count(full.stages[0]) + _count(full.stages[1])


def test_b2_li_is_linear_everywhere() -> None:
    with torch.device("meta"):
        model = PVTv2Backbone.b2_li()
    for stage in model.stages:
        for block in stage.blocks:
            assert block.attn.sr.kernel_size == (1, 1)
            assert block.mlp.relu is not None
    # Stage 3 has sr/norm only in the linear variant (sr_ratio 1).
    with torch.device("meta"):
        assert PVTv2Backbone.b2().stages[3].blocks[0].attn.sr is None


def test_layernorm_eps_split() -> None:
    with torch.device("meta"):
        model = PVTv2Backbone.b0()
    eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps["patch_embed.norm"] == 1e-5
    assert eps["stages.1.downsample.norm"] == 1e-5
    assert eps["stages.0.blocks.0.attn.norm"] == 1e-5
    assert eps["stages.0.blocks.0.norm1"] == 1e-6
    assert eps["stages.0.blocks.0.norm2"] == 1e-6
    assert eps["stages.3.norm"] == 1e-6


def test_feature_info_from_config() -> None:
    specs = VARIANTS["b2"].feature_info((1, 3))
    assert [(s.name, s.channels, s.stride, s.module) for s in specs] == [
        ("1", 128, 8, "stages.1"),
        ("3", 512, 32, "stages.3"),
    ]
    with torch.device("meta"):
        assert PVTv2Backbone.b2(out_indices=(1, 3)).feature_info == specs


def test_stage_sizes_are_ceil_based() -> None:
    assert stage_sizes(250) == (63, 32, 16, 8)
    assert stage_sizes(333) == (84, 42, 21, 11)
    assert stage_sizes(224) == (56, 28, 14, 7)


def test_min_input_size() -> None:
    assert VARIANTS["b2"].min_input_size() == 29
    assert VARIANTS["b2_li"].min_input_size() == 1
    # Stage 0 alone still needs its 8x8 spatial reduction.
    assert VARIANTS["b2"].min_input_size(num_stages=1) == 29


@pytest.mark.parametrize(
    ("indices", "expected"),
    [((0, 1, 2, 3), (0, 1, 2, 3)), ((3, 1), (1, 3)), ((-1,), (3,)), ((-4, -1), (0, 3)), ([2], (2,))],
)
def test_normalize_out_indices(indices: tuple[int, ...], expected: tuple[int, ...]) -> None:
    assert normalize_out_indices(indices) == expected


@pytest.mark.parametrize(
    ("indices", "error", "message"),
    [
        ((), ValueError, r"at least one stage in \[-4, 3\]"),
        ((4,), ValueError, r"must lie in \[-4, 3\], got \(4,\)"),
        ((-5,), ValueError, r"must lie in \[-4, 3\]"),
        ((1, 1), ValueError, r"names a stage twice"),
        ((3, -1), ValueError, r"names a stage twice"),
        ((1.0,), TypeError, r"must contain ints"),
        (3, TypeError, r"must be a sequence of ints"),
    ],
)
def test_out_indices_errors(indices: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        normalize_out_indices(indices)  # type: ignore[arg-type]
    with pytest.raises(error, match=message), torch.device("meta"):
        PVTv2Backbone.b0(out_indices=indices)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embed_dims": (8, 16, 24)}, r"embed_dims must have 4 entries"),
        ({"depths": (1, 0, 1, 1)}, r"depths entries must be positive"),
        ({"num_heads": (3, 1, 1, 1)}, r"embed_dims\[0\]=8 is not divisible by num_heads\[0\]=3"),
        ({"mlp_ratios": (8, 8, 4, 4.1)}, r"not a whole number"),
        ({"norm_eps": 0.0}, r"norm_eps must be > 0"),
    ],
)
def test_config_validation(tiny_config: PVTv2Config, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(tiny_config, **overrides)


def test_config_is_frozen_and_hashable(tiny_config: PVTv2Config) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_config.linear = True  # type: ignore[misc]
    assert PVTv2Config(embed_dims=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4]) == tiny_config
    assert hash(tiny_config)


def test_unknown_variant() -> None:
    with pytest.raises(ValueError, match=r"unknown PVTv2 variant 'b9'.*'b2_li'"):
        PVTv2Backbone.from_config("b9")
