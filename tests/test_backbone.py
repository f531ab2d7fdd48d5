"""The backbone contract: keys, shapes, metadata, options, freezing, checkpointing, validation, export."""

import dataclasses
import warnings

import pytest
import torch
from torch.export import Dim, export

from pvt_backbone import VARIANTS, PVTv2Backbone, PVTv2Config, load_weights, pvt_v2_b0
from pvt_backbone.classifier import build_classifier
from pvt_backbone.config import stage_sizes
from pvt_backbone.layers import adaptive_avg_pool2d_matmul, pool_matrix
from pvt_backbone.weights import LoadReport
from pvt_backbone.weights.load import LoadWarning

SIZES = [(224, 224), (250, 333), (333, 250), (97, 61)]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_contract_over_variant_table(name: str) -> None:
    """Shapes for every variant on the meta device (no compute) agree with feature_info and ceil-based sizes."""
    with torch.device("meta"):
        model = PVTv2Backbone.from_config(name)
    for size in SIZES:
        with torch.device("meta"):
            features = model(torch.empty(2, 3, *size))
        assert list(features) == ["0", "1", "2", "3"]
        heights, widths = stage_sizes(size[0]), stage_sizes(size[1])
        for spec, (key, feature) in zip(model.feature_info, features.items(), strict=True):
            assert spec.name == key
            i = int(key)
            assert tuple(feature.shape) == (2, spec.channels, heights[i], widths[i])
            assert spec.stride == 4 * 2**i == model.strides[i]
            assert spec.module == f"stages.{i}" and model.get_submodule(spec.module) is model.stages[i]


def test_real_forward_odd_sizes_both_orientations() -> None:
    model = PVTv2Backbone.b0().eval()
    for size, expected in [((250, 333), [(63, 84), (32, 42), (16, 21), (8, 11)]), ((333, 250), None)]:
        with torch.no_grad():
            features = model(torch.randn(1, 3, *size))
        got = [tuple(f.shape[-2:]) for f in features.values()]
        assert got == (expected or [(w, h) for h, w in [(63, 84), (32, 42), (16, 21), (8, 11)]])
        assert [f.shape[1] for f in features.values()] == list(model.channels) == [32, 64, 160, 256]
        for f in features.values():
            assert f.dtype == torch.float32 and torch.isfinite(f).all()


def test_feature_info_agrees_with_outputs(tiny_config: PVTv2Config) -> None:
    for indices in [(0, 1, 2, 3), (1, 3), (-1,), (2, 0)]:
        model = PVTv2Backbone(tiny_config, out_indices=indices).eval()
        features = model(torch.randn(1, 3, 64, 96))
        assert tuple(features) == tuple(spec.name for spec in model.feature_info)
        for spec, feature in zip(model.feature_info, features.values(), strict=True):
            assert feature.shape[1] == spec.channels
            assert 64 / feature.shape[-2] == spec.stride and 96 / feature.shape[-1] == spec.stride


def test_out_indices_subset_and_pruning(tiny_config: PVTv2Config) -> None:
    model = PVTv2Backbone(tiny_config, out_indices=(-3,)).eval()
    assert model.out_indices == (1,)  # -3 is stage 1
    assert len(model.stages) == 2
    assert all(not name.startswith(("stages.2", "stages.3")) for name, _ in model.named_parameters())

    full = PVTv2Backbone(tiny_config).eval()
    full.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x)["1"], full(x)["1"])


def test_every_built_parameter_gets_a_gradient(tiny_config: PVTv2Config) -> None:
    """No unused parameters under DDP: every parameter of a pruned backbone is reached by the loss."""
    model = PVTv2Backbone(tiny_config, out_indices=(0, 2))
    sum(f.sum() for f in model(torch.randn(2, 3, 64, 64)).values()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_input_channels(tiny_config: PVTv2Config) -> None:
    model = PVTv2Backbone(tiny_config, in_channels=1)
    assert model.patch_embed.proj.weight.shape[1] == 1
    assert model(torch.randn(1, 1, 64, 64))["3"].shape == (1, 32, 2, 2)


@pytest.mark.parametrize(
    ("make_input", "error", "message"),
    [
        (lambda: torch.randn(3, 64, 64), ValueError, r"expected a 4-D \(B, 3, H, W\) tensor, got shape \(3, 64, 64\)"),
        (lambda: torch.randn(1, 4, 64, 64), ValueError, r"expected 3 input channels .* got 4"),
        (lambda: torch.zeros(1, 3, 64, 64, dtype=torch.uint8), ValueError, r"floating-point input, got dtype"),
        (lambda: torch.randn(1, 3, 28, 64), ValueError, r"28x64 is too small.*>= 29 px"),
        (lambda: torch.randn(1, 3, 64, 20), ValueError, r"64x20 is too small"),
        (lambda: [1, 2, 3], TypeError, r"expected a torch.Tensor"),
    ],
)
def test_input_validation(tiny_config: PVTv2Config, make_input, error: type[Exception], message: str) -> None:
    model = PVTv2Backbone(tiny_config)
    with pytest.raises(error, match=message):
        model(make_input())


def test_smallest_accepted_input(tiny_config: PVTv2Config) -> None:
    model = PVTv2Backbone(tiny_config).eval()
    assert model.min_input_size == 29
    assert model(torch.randn(1, 3, 29, 29))["0"].shape[-2:] == (8, 8)
    linear = PVTv2Backbone(dataclasses.replace(tiny_config, linear=True)).eval()
    assert linear(torch.randn(1, 3, 9, 9))["3"].shape[-2:] == (1, 1)


def test_matmul_pooling_equals_adaptive_avg_pool_at_every_size() -> None:
    """Every height and every width in 1..40 (pairs (n, 41 - n) and (n, n)), sizes below 7 and non-multiples."""
    for height in range(1, 41):
        for width in {41 - height, height}:
            x = torch.randn(2, 3, height, width)
            for layout in (torch.contiguous_format, torch.channels_last):
                pooled = adaptive_avg_pool2d_matmul(x.contiguous(memory_format=layout), 7)
                assert pooled.shape == (2, 3, 7, 7)
                assert pooled.is_contiguous(memory_format=torch.channels_last)
                torch.testing.assert_close(pooled, torch.nn.functional.adaptive_avg_pool2d(x, 7), rtol=0, atol=1e-6)
    x = torch.randn(1, 4, 23, 9)
    want = torch.nn.functional.adaptive_avg_pool2d(x, (5, 3))
    torch.testing.assert_close(adaptive_avg_pool2d_matmul(x, (5, 3)), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"4-D \(B, C, H, W\) tensor, got shape \(4, 23, 9\)"):
        adaptive_avg_pool2d_matmul(x[0], 7)


def test_pool_matrix_rows_are_the_adaptive_windows() -> None:
    for size in (3, 7, 10, 50):
        weights = pool_matrix(size, 7, torch.empty(0, dtype=torch.float64))
        for row in range(7):
            start, end = row * size // 7, -(-(row + 1) * size // 7)
            expected = torch.zeros(size, dtype=torch.float64)
            expected[start:end] = 1 / (end - start)
            torch.testing.assert_close(weights[row], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_channels": 0}, r"in_channels must be an int >= 1, got 0"),
        ({"drop_path_rate": 1.0}, r"drop_path_rate must be a finite number in \[0, 1\), got 1.0"),
        ({"attn_drop_rate": -0.1}, r"attn_drop_rate must be a finite number in \[0, 1\)"),
        ({"frozen_stages": 5}, r"frozen_stages must be an int in \[0, 4\], got 5"),
    ],
)
def test_option_validation(tiny_config: PVTv2Config, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PVTv2Backbone(tiny_config, **kwargs)


def test_frozen_stages_cannot_exceed_built_stages(tiny_config: PVTv2Config) -> None:
    with pytest.raises(ValueError, match=r"frozen_stages must be an int in \[0, 2\]"):
        PVTv2Backbone(tiny_config, out_indices=(1,), frozen_stages=3)


@pytest.mark.parametrize("frozen", [0, 1, 2, 4])
def test_freezing(tiny_config: PVTv2Config, frozen: int) -> None:
    model = PVTv2Backbone(tiny_config, frozen_stages=frozen, drop_path_rate=0.1)
    model.train()
    frozen_prefixes = (["patch_embed."] if frozen else []) + [f"stages.{i}." for i in range(frozen)]
    for name, param in model.named_parameters():
        assert param.requires_grad == (not name.startswith(tuple(frozen_prefixes))), name
    for name, module in model.named_modules():
        if name.startswith(tuple(p.rstrip(".") for p in frozen_prefixes)):
            assert not module.training, name
        elif name:
            assert module.training, name
    output = sum(f.sum() for f in model(torch.randn(1, 3, 64, 64)).values())
    assert output.requires_grad == (frozen < 4)
    if frozen < 4:
        output.backward()
    for name, param in model.named_parameters():
        assert (param.grad is None) == name.startswith(tuple(frozen_prefixes)), name


def test_freeze_stages_after_construction(tiny_config: PVTv2Config) -> None:
    model = PVTv2Backbone(tiny_config)
    model.freeze_stages(1)
    assert not model.patch_embed.proj.weight.requires_grad and not model.stages[0].norm.weight.requires_grad
    assert model.stages[1].downsample.proj.weight.requires_grad
    model.train()
    assert not model.stages[0].training and model.stages[1].training
    model.freeze_stages(0)
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    assert model.stages[0].training


def test_gradient_checkpointing_matches_plain(tiny_config: PVTv2Config) -> None:
    plain = PVTv2Backbone(tiny_config, drop_path_rate=0.0)
    checkpointed = PVTv2Backbone(tiny_config, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.grad_checkpointing and not plain.grad_checkpointing
    x = torch.randn(2, 3, 64, 80)
    outputs = []
    for model in (plain, checkpointed):
        features = model(x)
        sum((f * torch.linspace(0, 1, f.numel()).view_as(f)).sum() for f in features.values()).backward()
        outputs.append((features, {n: p.grad for n, p in model.named_parameters()}))
    (f_plain, g_plain), (f_ckpt, g_ckpt) = outputs
    for key in f_plain:
        torch.testing.assert_close(f_plain[key], f_ckpt[key], rtol=0, atol=0)
    for name in g_plain:
        torch.testing.assert_close(g_plain[name], g_ckpt[name], rtol=1e-6, atol=1e-7)


def test_checkpointing_is_used_in_training(tiny_config: PVTv2Config, monkeypatch: pytest.MonkeyPatch) -> None:
    import pvt_backbone.backbone as backbone_module

    calls = []
    original = backbone_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(backbone_module, "checkpoint", counting)
    model = PVTv2Backbone(tiny_config, out_indices=(1, 3))
    model.set_grad_checkpointing(True)
    model(torch.randn(1, 3, 64, 64))
    assert calls == [False] * sum(tiny_config.depths)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(calls) == sum(tiny_config.depths)  # no recomputation bookkeeping without autograd


def test_dropout_only_while_training(tiny_config: PVTv2Config) -> None:
    model = PVTv2Backbone(tiny_config, drop_path_rate=0.3, attn_drop_rate=0.3, proj_drop_rate=0.3)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    first, second = model(x), model(x)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    model.train()
    torch.manual_seed(1)
    train_a = model(x)["3"]
    torch.manual_seed(2)
    train_b = model(x)["3"]
    assert not torch.allclose(train_a, train_b)


def test_drop_path_ramps_over_all_blocks() -> None:
    with torch.device("meta"):
        model = PVTv2Backbone.b2(drop_path_rate=0.15, out_indices=(0, 1))
    rates = [getattr(block.drop_path1, "p", 0.0) for stage in model.stages for block in stage.blocks]
    total = sum(VARIANTS["b2"].depths)  # 16 blocks in the full model; the ramp ignores pruning
    assert rates == pytest.approx([0.15 * k / (total - 1) for k in range(7)])
    assert isinstance(model.stages[0].blocks[0].drop_path1, torch.nn.Identity)  # rate 0 -> no-op


def test_maps_are_channels_last_nchw(tiny_config: PVTv2Config) -> None:
    features = PVTv2Backbone(tiny_config).eval()(torch.randn(2, 3, 64, 64))
    for feature in features.values():
        assert feature.dim() == 4 and feature.is_contiguous(memory_format=torch.channels_last)


def test_headline_example_from_readme() -> None:
    model = PVTv2Backbone.b2(out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        features = model(torch.rand(1, 3, 224, 224))
    assert {name: tuple(f.shape) for name, f in features.items()} == {
        "0": (1, 64, 56, 56),
        "1": (1, 128, 28, 28),
        "2": (1, 320, 14, 14),
        "3": (1, 512, 7, 7),
    }
    assert (model.channels, model.strides) == ((64, 128, 320, 512), (4, 8, 16, 32))


def test_no_out_channels_attribute() -> None:
    with torch.device("meta"):
        assert not hasattr(PVTv2Backbone.b0(), "out_channels")


def test_torch_export_dynamic_height_width() -> None:
    model = PVTv2Backbone.b0().eval()
    program = export(
        model,
        (torch.randn(2, 3, 96, 128),),
        dynamic_shapes={"x": {0: Dim("batch", max=64), 2: Dim("height", min=64), 3: Dim("width", min=64)}},
    )
    for batch, size in [(1, (64, 64)), (2, (250, 333)), (1, (65, 97))]:
        x = torch.randn(batch, 3, *size)
        exported, eager = program.module()(x), model(x)
        assert list(exported) == list(eager)
        for key in eager:
            torch.testing.assert_close(exported[key], eager[key], rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_without_graph_breaks(tiny_config: PVTv2Config) -> None:
    torch._dynamo.reset()
    model = PVTv2Backbone(tiny_config).eval()
    explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 64, 64))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# -- what a load did: kept on the model, warned about when surprising -------------------------------------------------


def _random_classifier_state(config: PVTv2Config | str) -> dict[str, torch.Tensor]:
    model = build_classifier(config, num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1)  # unlike any initialisation
    return model.state_dict()


def test_models_built_with_weights_keep_their_load_report(tiny_config: PVTv2Config) -> None:
    state = _random_classifier_state("b0")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoadWarning)  # head, unbuilt stages, container entries: expected, no warning
        built = {
            "constructor": PVTv2Backbone("b0", out_indices=(0, 1), weights={"state_dict": state, "epoch": 3}),
            "b0": PVTv2Backbone.b0(weights=state),
            "pvt_v2_b0": pvt_v2_b0(num_classes=5, weights=state),
            "build_classifier": build_classifier("b0", num_classes=5, weights=state),
        }
    for name, model in built.items():
        report = model.load_report
        assert isinstance(report, LoadReport), name
        assert set(report.loaded) == set(model.state_dict()), name
        torch.testing.assert_close(model.state_dict()["patch_embed.proj.weight"], state["patch_embed.proj.weight"])
    pruned = built["constructor"].load_report
    assert pruned is not None
    dropped = {item.key for item in pruned.dropped}
    assert {"head.weight", "head.bias", "['epoch']"} <= dropped
    assert any(key.startswith("stages.3.") for key in dropped)
    assert not any(key.startswith("head.") for key in built["pvt_v2_b0"].load_report.dropped)  # type: ignore[union-attr]
    assert PVTv2Backbone(tiny_config).load_report is None
    assert build_classifier(tiny_config).load_report is None


def test_keys_dropped_outside_the_backbone_warn(tiny_config: PVTv2Config) -> None:
    source = PVTv2Backbone(tiny_config)
    detector = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    detector["neck.lateral.weight"] = torch.zeros(8, 8, 1, 1)
    with pytest.warns(LoadWarning, match=r"neck\.lateral\.weight") as caught:
        model = PVTv2Backbone(tiny_config, weights=detector)
    assert len(caught) == 1
    assert model.load_report is not None
    assert [item.key for item in model.load_report.dropped] == ["neck.lateral.weight"]
    assert caught[0].filename == __file__  # points at the line that built the model


def test_partial_load_warns_with_what_was_left(tiny_config: PVTv2Config) -> None:
    state = PVTv2Backbone(tiny_config).state_dict()
    del state["stages.3.norm.weight"]
    model = PVTv2Backbone(tiny_config)
    with pytest.warns(LoadWarning, match=r"strict=False left keys unloaded(.|\n)*stages\.3\.norm\.weight"):
        report = load_weights(model, state, strict=False)
    assert report.missing == ("stages.3.norm.weight",)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoadWarning)
        load_weights(model, PVTv2Backbone(tiny_config).state_dict(), strict=False)  # complete: nothing to say
