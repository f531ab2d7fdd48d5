"""``pvt-evaluate --runtime``: a trained run's whole-model export scores the eager run's mAP (and a segmenter's mIoU)
on the same validation set, through onnxruntime (and OpenVINO where installed), also where each image has to be
fitted into the exported size and its detections mapped back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_runs import tiny_run_config

from pvt_backbone.cli import evaluate as evaluate_cli
from pvt_backbone.cli import export as export_cli
from pvt_backbone.cli.runner import EXIT_ERROR, EXIT_USAGE, run_command
from pvt_backbone.training.data import SyntheticConfig, SyntheticShapes, load_image
from pvt_backbone.training.inference import load_trained
from pvt_backbone.training.tasks import DataSpec
from pvt_backbone.training.trainer import train

RUNTIMES = ["onnxruntime", *(["openvino"] if importlib.util.find_spec("openvino") else [])]


def _trained_and_exported(root: Path, **overrides: object) -> Path:
    """``root``/run trained, and exported whole to ``root``/export.onnx at 64x64 (the run's image size)."""
    train(tiny_run_config(root / "run", save_every=0, device="cpu", **overrides))
    # 64 px is below an R-CNN's smallest dynamic side (96), so the export takes the run's size only
    argv = [
        "--checkpoint",
        str(root / "run"),
        "--to",
        "onnx",
        "--size",
        "64x64",
        "--verify-size",
        "64x64:1",
        "--static-size",
    ]
    assert run_command(export_cli.main, [*argv, "--out", str(root / "export")]) == 0
    return root


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _trained_and_exported(tmp_path_factory.mktemp("evaluate_det"), max_steps=1)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = DataSpec(image_size=64, train_size=1, val_size=3, synthetic_classes=2)
    return _trained_and_exported(
        tmp_path_factory.mktemp("evaluate_seg"), model="segformer_head", model_options={}, data=data, max_steps=1
    )


def _metrics(root: Path, extra: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    argv = ["--checkpoint", str(root / "run"), "--device", "cpu", "--no-progress", *extra]
    assert run_command(evaluate_cli.main, argv) == 0
    return json.loads(capsys.readouterr().out)


def _exported(root: Path, runtime: str) -> list[str]:
    return ["--runtime", runtime, "--exported", str(root / "export.onnx"), "--exported-size", "64x64"]


def _coco_from_eager(root: Path, side: int, *, count: int = 3, per_image: int = 4) -> list[str]:
    """Synthetic scenes of ``side`` px saved as PNGs with the eager detector's top detections as their COCO ground
    truth: the eager run scores a high mAP on them, an export whose boxes are not mapped back scores low."""
    model, spec = load_trained(root / "run", device="cpu")
    model.eval()
    folder = root / f"coco_{side}"
    folder.mkdir()
    scenes = SyntheticShapes("val", num_images=count, config=SyntheticConfig(image_size=side, num_classes=2))
    ids = list(spec.category_ids or range(1, len(spec.class_names) + 1))
    images, annotations = [], []
    for index in range(count):
        picture = (scenes[index][0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(picture).save(folder / f"{index}.png")
        with torch.no_grad():  # on the pixels the evaluation reads back
            found = model([load_image(folder / f"{index}.png")])[0]
        images.append({"id": index + 1, "file_name": f"{index}.png", "width": side, "height": side})
        for box, label in zip(found["boxes"][:per_image].tolist(), found["labels"][:per_image].tolist()):
            x0, y0, x1, y1 = box
            annotation = {"bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
            annotations.append({**annotation, "id": len(annotations) + 1, "image_id": index + 1})
            annotations[-1]["category_id"] = ids[label - 1]
    categories = [{"id": i, "name": name} for i, name in zip(ids, spec.class_names)]
    labels = {"images": images, "annotations": annotations, "categories": categories}
    (folder / "instances.json").write_text(json.dumps(labels))
    return ["--dataset", "coco", "--val-images", str(folder), "--val-annotations", str(folder / "instances.json")]


# Scenes at the exported size (64 px), and larger ones (96 px) that the eager detector resizes to 64 inside and the
# export sees fitted into 64x64: their boxes score only if mapped back by 1.5.
@pytest.mark.parametrize("side", [64, 96])
def test_an_exported_detector_scores_the_eager_map(
    detector: Path, side: int, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _coco_from_eager(detector, side)
    eager = _metrics(detector, data, capsys)["metrics"]
    assert eager["bbox_mAP"] > 0.5, eager  # the ground truth is its own top detections
    for runtime in RUNTIMES:
        report = _metrics(detector, [*data, *_exported(detector, runtime)], capsys)
        assert report["runtime"] == runtime and report["exported"].endswith("export.onnx")
        got = report["metrics"]
        for name in ("bbox_mAP", "bbox_mAP50", "bbox_mAP75"):
            assert got[name] == pytest.approx(eager[name], abs=1e-3), (runtime, name)
        assert got["bbox_per_class"] == pytest.approx(eager["bbox_per_class"], abs=1e-3), runtime


def test_an_exported_segmenter_scores_the_eager_miou(segmenter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eager = _metrics(segmenter, [], capsys)["metrics"]
    got = _metrics(segmenter, _exported(segmenter, "onnxruntime"), capsys)["metrics"]
    assert got["mIoU"] == pytest.approx(eager["mIoU"], abs=1e-3)
    assert got["pixel_accuracy"] == pytest.approx(eager["pixel_accuracy"], abs=1e-3)


def test_runtime_flags_are_checked(detector: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = ["--checkpoint", str(detector / "run"), "--device", "cpu"]
    export = str(detector / "export.onnx")
    usage = {
        "--runtime onnxruntime needs --exported FILE and --exported-size HxW": ["--runtime", "onnxruntime"],
        "--exported and --exported-size need --runtime": ["--exported", export, "--exported-size", "64x64"],
        "need --runtime onnxruntime, openvino or torch": ["--exported-size", "64x64"],
        "--amp": ["--amp", *_exported(detector, "onnxruntime")],
    }
    for message, extra in usage.items():
        assert run_command(evaluate_cli.main, [*run, *extra]) == EXIT_USAGE, extra
        assert message in capsys.readouterr().err, extra
    missing = ["--runtime", "onnxruntime", "--exported", str(detector / "absent.onnx"), "--exported-size", "64x64"]
    assert run_command(evaluate_cli.main, [*run, *missing]) == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert "absent.onnx" in err and "no such file" in err and len(err.splitlines()) == 1
