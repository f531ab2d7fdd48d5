"""Deployment: torch.export (.pt2) and ONNX with dynamic batch/height/width, checked at a second size; b2_li rules."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pvt_backbone import PVTv2Backbone, PVTv2Config
from pvt_backbone.classifier import build_classifier
from pvt_backbone.export import (
    check_onnx_exportable,
    export_onnx,
    export_program,
    load_program,
    save_program,
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


def test_linear_sra_onnx_at_a_multiple_of_seven(linear_config: PVTv2Config, tmp_path: Path) -> None:
    model = PVTv2Backbone(linear_config).eval()
    path = export_onnx(
        model, torch.randn(1, 3, 224, 224), tmp_path / "li.onnx", dynamic_height=False, dynamic_width=False
    )
    result = verify_onnx(path, model, torch.randn(3, 3, 224, 224))  # batch stays dynamic
    assert result.ok, result


def test_linear_sra_onnx_refuses_sizes_it_would_get_wrong(linear_config: PVTv2Config, tmp_path: Path) -> None:
    model = PVTv2Backbone(linear_config).eval()
    static = {"dynamic_height": False, "dynamic_width": False}
    with pytest.raises(ValueError, match=r"800x1344: its stage maps are 200x336, 100x168, 50x84, 25x42.*multiple of 7"):
        export_onnx(model, torch.randn(1, 3, 800, 1344), tmp_path / "li.onnx", **static)
    with pytest.raises(ValueError, match="dynamic_height=False and dynamic_width=False"):
        export_onnx(model, torch.randn(1, 3, 224, 224), tmp_path / "li.onnx")
    assert not list(tmp_path.iterdir())
    # Only the built stages count: stage 0 alone at 28x56 -> 7x14 is fine, stage 1 (4x7) is not built.
    check_onnx_exportable(PVTv2Backbone(linear_config, out_indices=(0,)), torch.randn(1, 3, 28, 56), **static)
    # Standard SRA has no such restriction.
    check_onnx_exportable(
        PVTv2Backbone(dataclasses.replace(linear_config, linear=False)),
        torch.randn(1, 3, 800, 1344),
        dynamic_height=True,
        dynamic_width=True,
    )


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
