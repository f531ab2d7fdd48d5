"""``pvt-export --checkpoint RUN`` then ``pvt-predict --runtime``: an exported trained model predicts what the eager
one does, with the run's class names, through onnxruntime (and OpenVINO where installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_runs import tiny_run_config

from pvt_backbone.cli import export as export_cli
from pvt_backbone.cli import predict as predict_cli
from pvt_backbone.cli.runner import run_command
from pvt_backbone.training.trainer import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runtime")
    train(tiny_run_config(root / "run", max_steps=2, save_every=0))
    picture = (torch.rand(3, 64, 64) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(picture).save(root / "scene.png")
    return root


def _predictions(root: Path, name: str, extra: list[str]) -> list[dict]:
    argv = ["--checkpoint", str(root / "run"), "--input", str(root / "scene.png"), "--output-dir", str(root / name)]
    assert run_command(predict_cli.main, [*argv, "--json", "--score-threshold", "0", *extra]) == 0
    return json.loads((root / name / "predictions.json").read_text())["images"][0]["detections"]


def test_an_exported_run_predicts_what_the_eager_run_does(trained: Path) -> None:
    # 64 px is below an R-CNN's smallest dynamic side (96), so the export takes the run's size only
    argv = [
        "--checkpoint",
        str(trained / "run"),
        "--to",
        "onnx",
        "--size",
        "64x64",
        "--verify-size",
        "64x64:2",
        "--static-size",
    ]
    assert run_command(export_cli.main, [*argv, "--out", str(trained / "export")]) == 0
    eager = _predictions(trained, "eager", [])
    exported = ["--exported", str(trained / "export.onnx"), "--exported-size", "64x64"]
    runtimes = ["onnxruntime", *(["openvino"] if _has("openvino") else [])]
    for runtime in runtimes:
        got = _predictions(trained, runtime, ["--runtime", runtime, *exported])
        assert [d["name"] for d in got] == [d["name"] for d in eager] and eager, runtime
        for want, have in zip(eager, got):
            assert have["box_xyxy"] == pytest.approx(want["box_xyxy"], abs=0.05), runtime
            assert have["score"] == pytest.approx(want["score"], abs=1e-3), runtime


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_runtime_flags_are_checked(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--checkpoint", str(trained / "run"), "--input", str(trained / "scene.png"), "--output-dir", "x"]
    assert run_command(predict_cli.main, [*argv, "--runtime", "onnxruntime"]) == 2
    assert "--exported FILE and --exported-size HxW" in capsys.readouterr().err
    missing = ["--runtime", "onnxruntime", "--exported", str(trained / "absent.onnx"), "--exported-size", "64x64"]
    assert run_command(predict_cli.main, [*argv, *missing]) == 1
    assert "absent.onnx" in capsys.readouterr().err
    assert run_command(export_cli.main, ["--checkpoint", str(trained / "run"), "--num-classes", "3", "--out", "y"]) == 2
    assert "--checkpoint describes the model" in capsys.readouterr().err
