"""Every fast path computes the same function: inference path vs autograd path, layouts, bf16, compile, copies."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pvt_backbone.fast_inference as fast_inference
import pvt_backbone.layers as layers
from pvt_backbone import PVTv2Backbone, PVTv2Config
from pvt_backbone.classifier import build_classifier
from pvt_backbone.fast_inference import applies, block_forward
from pvt_backbone.layers import Block


def _both_paths(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict, dict]:
    model.eval()
    with torch.enable_grad():  # eval + autograd on: the plain (training/export) path
        reference = model(x)
    with torch.inference_mode():
        fast = model(x)
    return reference, fast


def _random_biases(model: torch.nn.Module) -> None:
    """The reference init zeroes biases, which would hide a bias handled wrongly at the image border."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.5)


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize(
    ("shape", "chunk"),
    [
        ((1, 3, 64, 64), 1 << 22),  # everything fits one chunk: unchunked in-place path
        ((3, 3, 97, 131), 1 << 13),  # several images per chunk in the later stages, row bands in the first
        ((2, 3, 250, 333), 1 << 12),  # row bands of 2-3 rows, last band shorter
    ],
)
def test_inference_path_equals_autograd_path(
    tiny_config: PVTv2Config, linear: bool, shape: tuple[int, ...], chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fast_inference, "MLP_CHUNK_ELEMENTS", chunk)
    model = PVTv2Backbone(dataclasses.replace(tiny_config, linear=linear))
    _random_biases(model)
    x = torch.randn(*shape)
    reference, fast = _both_paths(model, x)
    for key in reference:
        torch.testing.assert_close(fast[key], reference[key], rtol=1e-5, atol=1e-5)
        assert fast[key].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("chunk", [1 << 20, 480, 32])  # whole batch, whole images, or bands of 2-3 rows (hidden 16)
@pytest.mark.parametrize("shape", [(2, 1, 1, 8), (1, 1, 7, 8), (1, 7, 1, 8), (3, 5, 6, 8), (1, 23, 9, 8)])
def test_mlp_inference_path_at_every_border(
    linear: bool, chunk: int, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fc1's bias meets the depthwise conv's zero padding at the borders: 1-pixel-wide/high maps, bands, corners."""
    monkeypatch.setattr(fast_inference, "MLP_CHUNK_ELEMENTS", chunk)
    mlp = layers.MlpDWConv(8, 16, linear=linear, drop=0.0).eval()
    with torch.no_grad():
        for parameter in mlp.parameters():
            parameter.normal_()
    x, residual = torch.randn(*shape), torch.randn(*shape)
    expected = residual + mlp(x)
    with torch.inference_mode():
        result = fast_inference._mlp_residual(mlp, x, residual.clone())
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_row_bands_on_b0_widths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real widths (hidden 256 in stage 0) with the default budget lowered so 2-row bands and a halo carry happen."""
    monkeypatch.setattr(fast_inference, "MLP_CHUNK_ELEMENTS", 2 * 20 * 256)
    model = PVTv2Backbone.b0(out_indices=(0, 1))
    reference, fast = _both_paths(model, torch.randn(1, 3, 77, 80))
    for key in reference:
        torch.testing.assert_close(fast[key], reference[key], rtol=1e-5, atol=1e-5)


def test_inference_path_switch(tiny_config: PVTv2Config) -> None:
    block = PVTv2Backbone(tiny_config).stages[0].blocks[0]
    block.eval()
    with torch.no_grad():
        assert applies(block)
    with torch.inference_mode():
        assert applies(block)
    assert not applies(block)  # autograd on
    block.train()
    with torch.no_grad():
        assert not applies(block)  # dropout / drop path may be active


def test_inference_path_never_writes_its_input(tiny_config: PVTv2Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_inference, "MLP_CHUNK_ELEMENTS", 1 << 10)
    model = PVTv2Backbone(tiny_config).eval()
    block: Block = model.stages[0].blocks[0]
    tokens = torch.randn(2, 16, 20, tiny_config.embed_dims[0])
    image = torch.randn(2, 3, 64, 80)
    tokens_before, image_before = tokens.clone(), image.clone()
    with torch.no_grad():
        block_forward(block, tokens)
        model(image)
    assert torch.equal(tokens, tokens_before) and torch.equal(image, image_before)


def test_classifier_paths_agree(tiny_config: PVTv2Config) -> None:
    model = build_classifier(tiny_config, num_classes=5)
    reference, fast = _both_paths(model, torch.randn(2, 3, 96, 64))
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_channels_last_input_gives_the_same_maps(tiny_config: PVTv2Config) -> None:
    model = PVTv2Backbone(tiny_config).eval()
    x = torch.randn(2, 3, 80, 96)
    with torch.no_grad():
        plain = model(x)
        channels_last = model(x.contiguous(memory_format=torch.channels_last))
        strided = model(torch.randn(2, 96, 80, 3).permute(0, 3, 2, 1) * 0 + x)  # an arbitrary non-contiguous input
    for key in plain:
        torch.testing.assert_close(channels_last[key], plain[key], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(strided[key], plain[key], rtol=1e-6, atol=1e-6)


def test_bf16_autocast_within_bf16_tolerance(tiny_config: PVTv2Config) -> None:
    model = PVTv2Backbone(tiny_config).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lowered = model(x)
    for key in reference:
        assert torch.isfinite(lowered[key]).all()
        error = (lowered[key].float() - reference[key]).abs().max() / reference[key].abs().max()
        assert error < 0.05, (key, error.item())  # bf16 keeps 8 mantissa bits; a few roundings per layer


def test_compile_fullgraph_in_eval_no_grad_and_training(tiny_config: PVTv2Config) -> None:
    """The inference branch must not leak into traced graphs: no breaks in either mode, same numbers as eager."""
    torch._dynamo.reset()
    model = PVTv2Backbone(tiny_config).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        eager, traced = model(x), compiled(x)
    for key in eager:
        torch.testing.assert_close(traced[key], eager[key], rtol=1e-5, atol=1e-5)
    model.train()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0


def test_no_activation_copies_in_inference_forward(tiny_config: PVTv2Config) -> None:
    """Token <-> map conversions, SDPA output and LayerNorm inputs are views: every clone is a conv weight."""
    model = PVTv2Backbone(tiny_config).eval()
    weight_shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    x = torch.randn(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as profile:
        model(x)
    clones = [tuple(e.input_shapes[0]) for e in profile.events() if e.name == "aten::clone"]
    assert all(shape in weight_shapes for shape in clones), clones
    names = {e.name for e in profile.events()}
    assert "aten::gelu_" in names and "aten::gelu" not in names  # the MLP's GELU runs in place


def test_stage_is_the_one_switch(tiny_config: PVTv2Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eval + no_grad takes the inference path unless switched off; training and autograd never take it."""
    calls: list[int] = []
    original = fast_inference.block_forward

    def counting(block: Block, x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return original(block, x)

    monkeypatch.setattr(fast_inference, "block_forward", counting)
    model = PVTv2Backbone(tiny_config).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
    assert len(calls) == sum(tiny_config.depths)
    calls.clear()
    model.set_fast_inference(False)
    with torch.no_grad():
        model(x)
    model.set_fast_inference(True)
    model(x)  # autograd on
    model.train()
    with torch.no_grad():
        model(x)
    assert calls == []


def test_forward_hooks_on_a_block_still_fire(tiny_config: PVTv2Config) -> None:
    model = PVTv2Backbone(tiny_config).eval()
    seen: list[tuple[int, ...]] = []
    model.stages[1].blocks[0].register_forward_hook(lambda module, inputs, output: seen.append(tuple(output.shape)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        hooked = model(x)
    assert seen == [(1, 8, 8, tiny_config.embed_dims[1])]
    model.set_fast_inference(False)
    with torch.no_grad():
        plain = model(x)
    for key in plain:
        torch.testing.assert_close(hooked[key], plain[key], rtol=1e-5, atol=1e-5)


def _plain(model: torch.nn.Module, x: torch.Tensor) -> dict:
    model.set_fast_inference(False)
    with torch.no_grad():
        out = model(x)
    model.set_fast_inference(True)
    return out


def test_reordered_weights_follow_weight_changes_and_input_sizes(tiny_config: PVTv2Config) -> None:
    """The oneDNN copies of the weights are remade after in-place writes and for each input size, never stale."""
    model = PVTv2Backbone(tiny_config).eval()
    other = PVTv2Backbone(tiny_config).eval()
    _random_biases(other)
    small, large = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        model(small), model(large)  # fills the cache for both sizes
        model.load_state_dict(other.state_dict())  # copies in place: same tensors, new versions
        after_load = {"small": model(small), "large": model(large)}
        for parameter in model.parameters():
            parameter.mul_(1.5)
        after_scale = model(small)
    for key, expected in other(small).items():
        torch.testing.assert_close(after_load["small"][key], expected, rtol=1e-5, atol=1e-5)
    for key, expected in other(large).items():
        torch.testing.assert_close(after_load["large"][key], expected, rtol=1e-5, atol=1e-5)
    for key, expected in _plain(model, small).items():
        torch.testing.assert_close(after_scale[key], expected, rtol=1e-5, atol=1e-5)


def test_forward_hooks_on_a_linear_or_conv_still_fire(tiny_config: PVTv2Config) -> None:
    model = PVTv2Backbone(tiny_config).eval()
    seen: list[str] = []
    attn = model.stages[0].blocks[0].attn
    attn.q.register_forward_hook(lambda module, inputs, output: seen.append("q"))
    attn.sr.register_forward_hook(lambda module, inputs, output: seen.append("sr"))
    model.stages[1].downsample.proj.register_forward_pre_hook(lambda module, inputs: seen.append("embed"))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert sorted(seen) == ["embed", "q", "sr"]


def test_linear_and_conv2d_fall_back_outside_fp32_cpu() -> None:
    """float64, autocast and string padding take the module's own forward, with its result exactly."""
    layer, conv = torch.nn.Linear(8, 4).double(), torch.nn.Conv2d(4, 4, 3, padding="same")
    x, image = torch.randn(3, 8, dtype=torch.float64), torch.randn(1, 4, 5, 5)
    with torch.inference_mode():
        assert torch.equal(fast_inference.linear(layer, x), layer(x))
        assert torch.equal(fast_inference.conv2d(conv, image), conv(image))
        layer.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lowered = fast_inference.linear(layer, x.float())
        assert lowered.dtype == torch.bfloat16
