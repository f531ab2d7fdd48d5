"""OpenVINO conversion options: a static input shape, the inference precision, per-output cosine similarity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pvt_backbone import PVTv2Backbone, PVTv2Config
from pvt_backbone.export import export_onnx

ov = pytest.importorskip("pvt_backbone.export_openvino")
pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    config = PVTv2Config(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))
    model = PVTv2Backbone(config).eval()
    return model, export_onnx(model, torch.rand(1, 3, 64, 64), tmp_path_factory.mktemp("ov") / "tiny.onnx")


def _eager(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model(x).values())


def test_static_shape_runs_that_shape_only_and_matches_eager(exported: tuple[torch.nn.Module, Path]) -> None:
    model, path = exported
    static = ov.convert_openvino(path, shape=(2, 3, 96, 64))
    assert [d.get_length() for d in static.inputs[0].get_partial_shape()] == [2, 3, 96, 64]
    assert ov.convert_openvino(path).inputs[0].get_partial_shape().is_dynamic
    x = torch.rand(2, 3, 96, 64)
    compiled = ov.compile_openvino(static)
    for want, got in zip(_eager(model, x), ov.run_openvino(compiled, x), strict=True):
        assert torch.allclose(want, got, atol=1e-4)
    with pytest.raises(RuntimeError):
        ov.run_openvino(compiled, torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"shape must be four positive sizes \(B, C, H, W\), got \(3, 64, 64\)"):
        ov.convert_openvino(path, shape=(3, 64, 64))


def test_precision_is_checked_and_bf16_stays_close(exported: tuple[torch.nn.Module, Path]) -> None:
    model, path = exported
    with pytest.raises(ValueError, match=r"precision must be one of \['f32', 'bf16'\], got 'fp16'"):
        ov.compile_openvino(ov.convert_openvino(path), precision="fp16")
    if not ov.openvino_bf16_supported():
        pytest.skip("this CPU has no bf16 execution in OpenVINO")
    compiled = ov.compile_openvino(ov.convert_openvino(path), precision="bf16")
    x = torch.rand(4, 3, 64, 64)
    cosines = ov.output_cosines(lambda b: _eager(model, b), lambda b: ov.run_openvino(compiled, b), x, batch=2)
    assert len(cosines) == 4 and all(0.99 < c <= 1.0 + 1e-6 for c in cosines), cosines
    exact = ov.run_openvino(ov.compile_openvino(ov.convert_openvino(path)), x)
    assert any((a - b).abs().max() > 1e-5 for a, b in zip(exact, ov.run_openvino(compiled, x), strict=True))


def test_output_cosines_per_output_and_batch_rule() -> None:
    x = torch.rand(4, 3, 8, 8)
    same = ov.output_cosines(lambda b: [b, b.mean(1)], lambda b: [b, b.mean(1)], x, batch=2)
    assert same == pytest.approx([1.0, 1.0])
    flipped = ov.output_cosines(lambda b: [b, b], lambda b: [b, -b], x)
    assert flipped == pytest.approx([1.0, -1.0])
    assert ov.feature_cosine(lambda b: [b, b], lambda b: [b, -b], x) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"number of images \(4\) must be a positive multiple of batch=3"):
        ov.output_cosines(lambda b: [b], lambda b: [b], x, batch=3)


def test_pinning_reaches_the_plugin_and_is_checked(exported: tuple[torch.nn.Module, Path]) -> None:
    _, path = exported
    model = ov.convert_openvino(path, shape=(1, 3, 64, 64))
    assert ov.compile_openvino(model).get_property("ENABLE_CPU_PINNING") is False  # our default: shared cores
    for pinning in (False, True):
        assert ov.compile_openvino(model, pinning=pinning).get_property("ENABLE_CPU_PINNING") is pinning
    with pytest.raises(TypeError, match="pinning must be True, False or None, got str"):
        ov.compile_openvino(model, pinning="no")
