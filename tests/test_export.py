"""Deployment: torch.export (.pt2) and ONNX with dynamic batch/height/width, checked at a second size; b2_li too."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pvt_backbone import PVTv2Backbone, PVTv2Config
from pvt_backbone.classifier import build_classifier
from pvt_backbone.export import (
    check_export_sizes,
    export_onnx,
    export_program,
    export_verified_onnx,
    load_program,
    save_program,
    save_verified_program,
    verify_onnx,
    verify_program,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture
def linear_config(tiny_config: PVTv2Config) -> PVTv2Config:
    return dataclasses.replace(tiny_config, linear=True)


def test_pt2_round_trip_with_dynamic_batch_height_width(tiny_config: PVTv2Config, tmp_path: Path) -> None:
    model = PVTv2Backbone(tiny_config).eval()
    program = export_program(model, torch.randn(1, 3, 96, 128))
    path = save_program(program, tmp_path / "tiny.pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt2"]  # no temporary left behind
    loaded = load_program(path)
    for shape in [(2, 3, 256, 320), (1, 3, 65, 97)]:
        result = verify_program(loaded, model, torch.randn(*shape))
        assert result.ok and result.max_abs_diff <= 1e-4, result
        assert result.input_shape == shape


def test_pt2_rejects_sizes_below_min_size(tiny_config: PVTv2Config) -> None:
    model = PVTv2Backbone(tiny_config).eval()
    with pytest.raises(ValueError, match="below min_size=64"):
        export_program(model, torch.randn(1, 3, 48, 96))
    with pytest.raises(ValueError, match="4-D"):
        export_program(model, torch.randn(3, 64, 64))


def test_onnx_dynamic_size_runs_at_a_second_size(tiny_config: PVTv2Config, tmp_path: Path) -> None:
    import onnx

    model = PVTv2Backbone(tiny_config).eval()
    path = export_onnx(model, torch.randn(1, 3, 224, 224), tmp_path / "tiny.onnx")
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == ["feature_0", "feature_1", "feature_2", "feature_3"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for i, d in enumerate(dims) if i != 1), dims  # batch, height, width are symbolic
    result = verify_onnx(path, model, torch.randn(2, 3, 256, 320))
    assert result.ok and result.max_abs_diff <= 1e-4, result


def test_onnx_classifier_has_one_named_output(tiny_config: PVTv2Config, tmp_path: Path) -> None:
    model = build_classifier(tiny_config, num_classes=7).eval()
    path = export_onnx(
        model, torch.randn(2, 3, 96, 96), tmp_path / "cls.onnx", dynamic_height=False, dynamic_width=False
    )
    result = verify_onnx(path, model, torch.randn(3, 3, 96, 96))
    assert result.ok, result


def test_linear_sra_onnx_with_dynamic_size_is_exact_at_other_sizes(linear_config: PVTv2Config, tmp_path: Path) -> None:
    """One dynamic export, run at sizes whose stage maps are not multiples of 7 (nor 7x7 pooling's example windows)."""
    import onnx

    model = PVTv2Backbone(linear_config).eval()
    path = export_onnx(model, torch.randn(1, 3, 64, 64), tmp_path / "li.onnx")
    graph = onnx.load(str(path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for i, d in enumerate(dims) if i != 1), dims  # batch, height, width are symbolic
    assert not {node.op_type for node in graph.node} & {"AveragePool", "GlobalAveragePool"}  # no fixed windows
    for shape in [(1, 3, 64, 96), (2, 3, 100, 132), (1, 3, 65, 97)]:
        result = verify_onnx(path, model, torch.randn(*shape))
        assert result.ok and result.max_abs_diff <= 1e-4, result


def test_linear_sra_onnx_at_a_static_size_not_a_multiple_of_seven(linear_config: PVTv2Config, tmp_path: Path) -> None:
    model = PVTv2Backbone(linear_config).eval()
    path = export_onnx(
        model, torch.randn(1, 3, 100, 132), tmp_path / "li.onnx", dynamic_height=False, dynamic_width=False
    )
    result = verify_onnx(path, model, torch.randn(3, 3, 100, 132))  # batch stays dynamic
    assert result.ok and result.max_abs_diff <= 1e-4, result


def test_export_onnx_checks_the_model_and_example_before_exporting(linear_config: PVTv2Config, tmp_path: Path) -> None:
    model = PVTv2Backbone(linear_config).eval()
    with pytest.raises(ValueError, match=r"example must be a 4-D \(B, C, H, W\) tensor, got \(3, 64, 64\)"):
        export_onnx(model, torch.randn(3, 64, 64), tmp_path / "bad.onnx")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        export_onnx(lambda x: x, torch.randn(1, 3, 64, 64), tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())


def test_linear_sra_pools_with_the_module_eagerly_and_with_matrices_in_exports(linear_config: PVTv2Config) -> None:
    """Eager runs keep ``nn.AdaptiveAvgPool2d`` (bit-for-bit); the traced graph has no adaptive pooling op."""
    model = PVTv2Backbone(linear_config, out_indices=(0,)).eval()
    attention = model.stages[0].blocks[0].attn
    assert isinstance(attention.pool, torch.nn.AdaptiveAvgPool2d) and not list(attention.pool.state_dict())
    calls: list[tuple[int, ...]] = []
    attention.pool.register_forward_hook(lambda module, inputs, output: calls.append(tuple(output.shape)))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    assert calls == [(1, 8, 7, 7)]
    program = export_program(model, torch.randn(1, 3, 64, 64))
    targets = {str(node.target) for node in program.graph.nodes}
    assert not any("adaptive_avg_pool" in target for target in targets), targets
    assert calls == [(1, 8, 7, 7)]  # the export did not call the module


def test_writers_check_suffix_and_leave_nothing_on_failure(
    tiny_config: PVTv2Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = PVTv2Backbone(tiny_config).eval()
    program = export_program(model, torch.randn(2, 3, 64, 64), dynamic_height=False, dynamic_width=False)
    with pytest.raises(ValueError, match=r"must end in '\.pt2'"):
        save_program(program, tmp_path / "model.onnx")

    def failing_save(program, name):  # writes part of a file, then fails
        Path(name).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_program(program, tmp_path / "model.pt2")
    assert not list(tmp_path.iterdir())


def test_verified_writers_keep_a_failed_export_off_the_path(tiny_config: PVTv2Config, tmp_path: Path) -> None:
    model, other = PVTv2Backbone(tiny_config).eval(), PVTv2Backbone(tiny_config).eval()  # two random inits
    example, x = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 96, 64)
    program = export_program(model, example)
    (tmp_path / "kept.pt2").write_bytes(b"older export")
    assert not save_verified_program(program, tmp_path / "kept.pt2", other, x).ok
    assert not save_verified_program(program, tmp_path / "new.pt2", other, x).ok
    assert export_verified_onnx(model, example, x, tmp_path / "new.onnx", threads=1).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.pt2", "new.onnx"]
    assert (tmp_path / "kept.pt2").read_bytes() == b"older export"  # what was there stays as it was
    # onnxruntime's kernels round differently from eager ones, so nothing meets atol=0
    assert not export_verified_onnx(model, example, x, tmp_path / "bad.onnx", atol=0.0, threads=1).ok
    assert "bad.onnx" not in {p.name for p in tmp_path.iterdir()}
    result = save_verified_program(program, tmp_path / "good.pt2", model, x)
    assert result.ok and verify_program(load_program(tmp_path / "good.pt2"), model, x).ok


def test_sizes_an_export_cannot_take_are_value_errors(tiny_config: PVTv2Config) -> None:
    model = PVTv2Backbone(tiny_config).eval()
    example = torch.randn(1, 3, 64, 64)
    static = export_program(model, example, dynamic_height=False, dynamic_width=False)
    with pytest.raises(ValueError, match=r"does not accept x of shape \(1, 3, 96, 64\)"):
        verify_program(static, model, torch.randn(1, 3, 96, 64))
    with pytest.raises(ValueError, match="verify_input 32x32 is below 64x64"):
        check_export_sizes(model, example, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="dynamic_height=False accepts that size only"):
        check_export_sizes(model, example, torch.randn(1, 3, 96, 64), dynamic_height=False)
    with pytest.raises(ValueError, match="verify_input batch 2 differs from example batch 1"):
        check_export_sizes(model, example, torch.randn(2, 3, 64, 64), dynamic_batch=False)
    with pytest.raises(ValueError, match="atol must be"):
        verify_program(static, model, example, atol=float("nan"))
