"""Published mmdet detectors through the commands: pvt-convert --to detector / mmdet / --inspect, pvt-predict and
pvt-evaluate on a detector file, and the COCO category ids of an 80-class file.

The fixtures are tests/fixtures/mmdet/ (real mmdet 3.3 checkpoints of a tiny custom PVTv2: its num_heads come from
--arch-config, as weights do not fix them). Commands run in-process through ``run_command``.
"""

from __future__ import annotations

import fractions
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pvt_backbone.cli import convert, evaluate, predict
from pvt_backbone.cli.runner import run_command
from pvt_backbone.training.data.synthetic import SyntheticConfig, SyntheticShapes, write_coco
from pvt_backbone.training.inference import OneBasedLabels, load_trained
from pvt_backbone.weights.detectors import COCO_CATEGORY_IDS, COCO_CLASSES, is_detector_file

FIXTURES = Path(__file__).parent / "fixtures" / "mmdet"
ARCH_CONFIG = json.dumps({"embed_dims": [8, 16, 32, 32], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 4]})
THINGS = [f"thing{i}" for i in range(5)]


def _run(capsys: pytest.CaptureFixture[str], main, *argv: object) -> tuple[int, str, str]:
    code = run_command(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both fixtures converted to detector .safetensors (with their backbone config) by pvt-convert."""
    folder = tmp_path_factory.mktemp("converted")
    paths = {}
    for name in ("maskrcnn", "retinanet"):
        paths[name] = folder / f"{name}.safetensors"
        argv = [str(FIXTURES / f"{name}.pth"), str(paths[name]), "--to", "detector", "--arch-config", ARCH_CONFIG]
        assert run_command(convert.main, argv) == 0
    return paths


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scene")
    image, _ = SyntheticShapes("val", num_images=1, config=SyntheticConfig(image_size=64))[0]
    path = folder / "scene.png"
    Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(path)
    return path


def test_round_trip_mmdet_to_detector_to_mmdet_is_bit_exact(capsys, converted, tmp_path) -> None:
    code, out, _ = _run(capsys, convert.main, converted["maskrcnn"], tmp_path / "back.pth", "--to", "mmdet")
    assert code == 0 and "mmdet checkpoint, 142 tensors" in out
    original = torch.load(FIXTURES / "maskrcnn.pth", weights_only=True)
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back["meta"]["dataset_meta"]["classes"] == THINGS
    assert back["state_dict"].keys() == original["state_dict"].keys()
    assert all(torch.equal(back["state_dict"][k], v) for k, v in original["state_dict"].items())
    assert is_detector_file(converted["maskrcnn"]) and is_detector_file(tmp_path / "back.pth")


def test_inspect_names_the_detector(capsys, converted) -> None:
    code, out, _ = _run(capsys, convert.main, "--inspect", FIXTURES / "retinanet.pth")
    assert code == 0 and "detector:   mmdet RetinaNet (retinanet_pvt_v2_fpn)" in out
    assert "classes:    5 (thing0, thing1, thing2, thing3, thing4)" in out and "variant:    custom" in out
    code, out, _ = _run(capsys, convert.main, "--inspect", converted["maskrcnn"])
    assert code == 0 and "mmdet Mask R-CNN (maskrcnn_pvt_v2_fpn)" in out and "fpn:        16 channels" in out


def test_convert_errors_are_worded_for_the_command_line(capsys, tmp_path) -> None:
    code, _, err = _run(capsys, convert.main, FIXTURES / "maskrcnn.pth", tmp_path / "d.safetensors", "--to", "detector")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "pass --arch-config JSON" in err
    assert not (tmp_path / "d.safetensors").exists()
    code, _, err = _run(
        capsys, convert.main, FIXTURES / "maskrcnn.pth", tmp_path / "d.safetensors", "--to", "detector",
        "--arch-config", '{"embed_dims": [8]}',
    )  # fmt: skip
    assert code == 2 and "--arch-config: not PVTv2Config fields" in err
    not_a_detector = FIXTURES / "inputs.safetensors"
    code, _, err = _run(capsys, convert.main, not_a_detector, tmp_path / "d.safetensors", "--to", "detector")
    assert code == 1 and "holds no whole detector" in err
    code, _, err = _run(
        capsys, convert.main, FIXTURES / "retinanet.pth", tmp_path / "r.safetensors", "--to", "mmdet",
        "--arch-config", ARCH_CONFIG,
    )  # fmt: skip
    assert code == 1 and "must end with .pth" in err and "--to mmdet" in err


def test_predict_on_a_detector_file_names_its_classes(capsys, converted, scene, tmp_path) -> None:
    for name in ("maskrcnn", "retinanet"):
        out_dir = tmp_path / name
        argv = ["--checkpoint", converted[name], "--input", scene, "--output-dir", out_dir, "--json"]
        code, _, err = _run(capsys, predict.main, *argv, "--score-threshold", "0.05")
        assert code == 0, err
        report = json.loads((out_dir / "predictions.json").read_text())
        detections = report["images"][0]["detections"]
        assert report["task"] == ("instance" if name == "maskrcnn" else "detection") and detections
        assert all(d["name"] == THINGS[d["label"] - 1] for d in detections)  # labels 1..K for both detectors
        assert ("segmentation" in detections[0]) == (name == "maskrcnn")
        assert Image.open(out_dir / "scene.png").size == (64, 64)


def test_predict_on_an_mmdet_file_with_a_custom_backbone_says_how_to_convert_it(capsys, scene, tmp_path) -> None:
    argv = ["--checkpoint", FIXTURES / "retinanet.pth", "--input", scene, "--output-dir", tmp_path / "out"]
    code, _, err = _run(capsys, predict.main, *argv)
    assert code == 1 and "pvt-convert --to detector --arch-config JSON" in err
    checkpoint = torch.load(FIXTURES / "retinanet.pth", weights_only=True)
    checkpoint["meta"]["lr"] = fractions.Fraction(1, 3)  # a global torch's safe loader refuses
    torch.save(checkpoint, tmp_path / "meta_lr.pth")
    argv[1] = tmp_path / "meta_lr.pth"
    code, _, err = _run(capsys, predict.main, *argv)
    assert code == 1 and "opt in with --trust-pickle" in err
    code, _, err = _run(capsys, predict.main, *argv, "--trust-pickle")  # read; then its custom backbone stops it
    assert code == 1 and "--arch-config" in err and "pickle" not in err


def test_evaluate_a_detector_file_on_coco_annotations_of_its_classes(capsys, converted, tmp_path) -> None:
    scenes = SyntheticShapes("val", num_images=2, config=SyntheticConfig(image_size=64))
    write_coco(scenes, tmp_path / "img", tmp_path / "shapes.json")
    annotations = json.loads((tmp_path / "shapes.json").read_text())
    annotations["categories"] = [{"id": i + 1, "name": name} for i, name in enumerate(THINGS)]
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    data = ["--dataset", "coco", "--val-images", tmp_path / "img", "--val-annotations", tmp_path / "ann.json"]
    code, out, err = _run(capsys, evaluate.main, "--checkpoint", converted["maskrcnn"], *data, "--no-progress")
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    assert 0.0 <= metrics["bbox_mAP"] <= 1.0 and "segm_mAP" in metrics and "thing0" in err
    code, _, err = _run(capsys, evaluate.main, "--checkpoint", converted["retinanet"])
    assert code == 2 and "pass --dataset" in err


def test_an_80_class_file_gets_cocos_names_and_category_ids(tmp_path) -> None:
    checkpoint = torch.load(FIXTURES / "retinanet.pth", weights_only=True)
    del checkpoint["meta"]["dataset_meta"]
    state = checkpoint["state_dict"]
    state["bbox_head.retina_cls.weight"] = torch.randn(9 * 80, 16, 3, 3) * 0.01
    state["bbox_head.retina_cls.bias"] = torch.full((9 * 80,), 2.0)  # every class scores high: detections exist
    torch.save(checkpoint, tmp_path / "coco.pth")
    assert run_command(
        convert.main, [str(tmp_path / "coco.pth"), str(tmp_path / "coco.safetensors"), "--to", "detector",
                       "--arch-config", ARCH_CONFIG],
    ) == 0  # fmt: skip
    model, spec = load_trained(tmp_path / "coco.safetensors")
    assert isinstance(model, OneBasedLabels) and spec.class_names == COCO_CLASSES
    assert spec.category_ids == COCO_CATEGORY_IDS and len(set(COCO_CATEGORY_IDS)) == 80
    assert COCO_CATEGORY_IDS[:12] == (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13) and COCO_CATEGORY_IDS[-1] == 90
    with torch.no_grad():
        labels = model([torch.rand(3, 40, 48)])[0]["labels"]
    assert labels.min() >= 1 and labels.max() <= 80
    assert model.class_names[int(labels[0])] == COCO_CLASSES[int(labels[0]) - 1]
