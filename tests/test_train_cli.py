"""The commands end to end on tiny settings: a 2-process torchrun run with gloo on loopback, evaluate and predict on
its checkpoint, COCO-format and mask-folder datasets, and the error contract: one short line and exit 1 for errors,
exit 2 for usage errors, 130 for Ctrl-C."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pvt_backbone.cli import evaluate as evaluate_cli
from pvt_backbone.cli import predict as predict_cli
from pvt_backbone.cli import train as train_cli
from pvt_backbone.cli.runner import run_command
from pvt_backbone.training.data import (
    SyntheticConfig,
    SyntheticSegmentation,
    SyntheticShapes,
    write_coco,
    write_mask_folder,
)
from pvt_backbone.training.distributed import parameter_digest
from pvt_backbone.training.evaluation import ConfusionMatrix, coco_results, evaluate_detection
from pvt_backbone.training.inference import load_trained, predict
from pvt_backbone.training.tasks import DataSpec
from pvt_backbone.training.trainer import TrainConfig, read_log, train

ROOT = Path(__file__).resolve().parents[1]
# Light R-CNN settings so a step takes a fraction of a second on a CPU.
TINY_RCNN = [
    arg
    for option in (
        "fpn_channels=32",
        "box_batch_size_per_image=16",
        "rpn_post_nms_top_n_train=32",
        "rpn_batch_size_per_image=32",
        "rpn_post_nms_top_n_test=32",
        "box_detections_per_img=20",
    )
    for arg in ("--model-arg", option)
]
TINY_DATA = "--image-size 64 --train-size 8 --val-size 2 --workers 0 --no-progress".split()
SHAPES3 = ("circle", "square", "triangle")


COMMANDS = {"train": train_cli, "evaluate": evaluate_cli, "predict": predict_cli}


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_tool(name: str, argv: list) -> int:
    """The command's exit status, as ``sys.exit(run_command(main))`` would give it (argparse exits by itself)."""
    try:
        return run_command(COMMANDS[name].main, [str(a) for a in argv])
    except SystemExit as exit:
        return exit.code


def _first_eval(run: Path) -> dict:
    return next(r["eval"] for r in read_log(run / "log.jsonl") if "eval" in r)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """``torchrun --standalone --nproc_per_node=2 tools/train.py ...`` on CPU (gloo over loopback), 3 steps."""
    output = tmp_path_factory.mktemp("ddp") / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(ROOT / "tools" / "train.py"), "--output-dir", str(output)]
    command += "--dataset synthetic --model fasterrcnn --variant b0 --max-steps 3 --batch-size 1 --log-every 1".split()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    done = subprocess.run(
        command + TINY_DATA + TINY_RCNN, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return output


def test_torchrun_two_processes_train_identical_replicas(ddp_run: Path) -> None:
    records = read_log(ddp_run / "log.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # rank 0 alone logs: no duplicates
    replicas = next(r["replicas"] for r in records if "replicas" in r)
    assert replicas["world_size"] == 2
    model, spec = load_trained(ddp_run)
    # Both ranks' parameters hash to the saved checkpoint's: identical replicas, and that is what was written.
    assert replicas["param_sha256"] == [parameter_digest(model)] * 2
    assert [p.name for p in (ddp_run / "checkpoints").iterdir() if p.is_dir()] == ["step_00000003"]
    assert "bbox_mAP50" in _first_eval(ddp_run)  # sharded evaluation ran
    assert (ddp_run / "loss.png").stat().st_size > 1000
    assert spec.model == "fasterrcnn" and spec.class_names == SHAPES3


def test_evaluate_cli_prints_and_writes_metrics(ddp_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "metrics.json"
    assert _run_tool("evaluate", ["--checkpoint", ddp_run, "--json", out, "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["images"] == 2 and 0.0 <= printed["metrics"]["bbox_mAP50"] <= 1.0


def test_predict_draws_an_odd_sized_image(ddp_run: Path, tmp_path: Path) -> None:
    image = SyntheticShapes("val", num_images=1, config=SyntheticConfig(image_size=96))[0][0]
    Image.fromarray((image[:, :53, :77].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "odd.jpg")
    out = tmp_path / "pred"
    argv = ["--checkpoint", ddp_run, "--input", tmp_path / "*.jpg", "--output-dir", out, "--json"]
    assert _run_tool("predict", argv + ["--score-threshold", "0"]) == 0
    with Image.open(out / "odd.png") as picture:
        assert picture.size == (77, 53) and picture.mode == "RGB"
    listing = json.loads((out / "predictions.json").read_text())["images"]
    assert listing[0]["width"] == 77 and listing[0]["height"] == 53
    for det in listing[0]["detections"]:
        x0, y0, x1, y1 = det["box_xyxy"]
        assert 0 <= x0 <= x1 <= 77 and 0 <= y0 <= y1 <= 53 and det["name"] in SHAPES3


def test_coco_instance_segmentation_train_evaluate(tmp_path: Path) -> None:
    config = SyntheticConfig(image_size=64, num_classes=2)
    write_coco(SyntheticShapes("train", num_images=4, config=config), tmp_path / "train", tmp_path / "train.json")
    write_coco(SyntheticShapes("val", num_images=2, config=config), tmp_path / "val", tmp_path / "val.json")
    run = tmp_path / "run"
    argv = ["--train-images", tmp_path / "train", "--train-annotations", tmp_path / "train.json"]
    argv += ["--val-images", tmp_path / "val", "--val-annotations", tmp_path / "val.json", "--output-dir", run]
    argv += "--task instance --variant b0 --dataset coco --max-steps 2".split()
    assert _run_tool("train", argv + TINY_DATA + TINY_RCNN) == 0
    assert {"bbox_mAP", "segm_mAP", "segm_mAP50"} <= set(_first_eval(run))
    assert load_trained(run)[1].model == "maskrcnn"


def test_mask_folder_segmentation_train_evaluate_predict(tmp_path: Path, capsys) -> None:
    config = SyntheticConfig(image_size=64, num_classes=2)
    write_mask_folder(SyntheticSegmentation("train", num_images=4, config=config), tmp_path / "ti", tmp_path / "tm")
    write_mask_folder(SyntheticSegmentation("val", num_images=2, config=config), tmp_path / "vi", tmp_path / "vm")
    run = tmp_path / "run"
    val = ["--dataset", "folder", "--val-images", tmp_path / "vi", "--val-masks", tmp_path / "vm", "--num-classes", 3]
    argv = ["--train-images", tmp_path / "ti", "--train-masks", tmp_path / "tm", "--output-dir", run, *val]
    argv += "--model segformer_head --variant b0 --max-steps 2".split()
    assert _run_tool("train", argv + TINY_DATA) == 0
    metrics = _first_eval(run)
    assert 0.0 <= metrics["mIoU"] <= 1.0 and 0.0 <= metrics["pixel_accuracy"] <= 1.0 and len(metrics["iou"]) == 3
    capsys.readouterr()
    assert _run_tool("evaluate", ["--checkpoint", run, *val, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["mIoU"] == pytest.approx(metrics["mIoU"])
    out = tmp_path / "pred"
    assert _run_tool("predict", ["--checkpoint", run, "--input", tmp_path / "vi", "--output-dir", out]) == 0
    with Image.open(out / "synthetic_val_000000_mask.png") as mask:
        assert mask.size == (64, 64) and mask.getextrema()[1] <= 2


def test_keypoint_rcnn_trains_and_scores_oks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = ["--output-dir", run, *"--task keypoints --variant b0 --max-steps 2 --batch-size 2".split()]
    assert _run_tool("train", argv + TINY_DATA + TINY_RCNN) == 0
    assert {"bbox_mAP50", "keypoints_mAP", "keypoints_mAP50"} <= set(_first_eval(run))
    model, spec = load_trained(run)
    assert spec.keypoint_names == ("top", "right", "bottom", "left") and model.roi_heads.keypoint_predictor is not None


def test_amp_step_is_finite(tmp_path: Path) -> None:
    options = {"fpn_channels": 32, "box_batch_size_per_image": 16, "rpn_post_nms_top_n_train": 32}
    data = DataSpec(image_size=64, train_size=4, val_size=2)
    config = TrainConfig(
        output_dir=str(tmp_path),
        model="fasterrcnn",
        variant="b0",
        model_options=options,
        data=data,
        max_steps=2,
        amp=True,
        eval=False,
        workers=0,
        log_every=1,
        progress=False,
    )
    result = train(config)
    losses = [r["loss"] for r in read_log(tmp_path / "log.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast leaves the weights fp32


# (command, arguments, message, exit status): 1 for errors, 2 for command lines argparse cannot reject itself.
CLI_ERRORS = [
    ("train", "--dataset coco --train-images nowhere --train-annotations x.json", "nowhere: image folder not found", 1),
    ("train", "--dataset folder --task detection", "dataset 'folder' serves segmentation only", 2),
    ("train", "--dataset coco --task segmentation", "dataset 'coco' serves detection, instance and keypoints", 2),
    ("train", "--task segmentation --model fasterrcnn", "model 'fasterrcnn' does not do task 'segmentation'", 2),
    ("train", "--dataset coco", "dataset 'coco' needs --train-images and --train-annotations", 2),
    ("train", "--dataset folder --task segmentation --train-images a", "dataset 'folder' needs --train-masks", 2),
    ("train", "--dataset coco --train-images a --train-annotations b --val-images c", "needs --val-annotations", 2),
    ("train", "--model-arg fpn_channels", "--model-arg expects KEY=VALUE with KEY a keyword name", 2),
    ("train", "--lr inf", "--lr must be a finite number > 0.0, got inf", 2),
    ("train", "--clip-grad nan", "--clip-grad must be a finite number >= 0.0, got nan", 2),
    ("train", "--min-lr-ratio -1", "--min-lr-ratio must be a finite number in [0.0, 1.0], got -1.0", 2),
    ("train", "--seed -1", "--seed must be an int >= 0, got -1", 2),
    ("train", "--dist-timeout 0", "--dist-timeout must be a finite number > 0.0, got 0.0", 2),
    ("train", "--sync-bn --device cpu", "--sync-bn needs CUDA: torch's SyncBatchNorm does not run on the CPU", 1),
    ("train", "--resume", "nothing to resume", 1),
    ("train", "--output-dir {run}", "already holds a run with checkpoints; pass --resume", 1),
    ("evaluate", "--checkpoint {tmp}/missing", "missing: no such file or directory", 1),
    ("evaluate", "--checkpoint {run} --dataset folder --val-masks m", "dataset 'folder' needs --val-images", 2),
    ("predict", "--checkpoint {run} --input {tmp}/*.jpg --output-dir {tmp}/p", "no image matches it", 1),
    ("predict", "--checkpoint {run} --input x --output-dir p --score-threshold 1.5", "--score-threshold must lie", 2),
]


@pytest.mark.parametrize(("tool", "args", "message", "code"), CLI_ERRORS, ids=[m for _, _, m, _ in CLI_ERRORS])
def test_cli_errors_are_one_short_line(
    tool: str, args: str, message: str, code: int, tmp_path: Path, ddp_run: Path, capsys
) -> None:
    argv = args.format(tmp=tmp_path, run=ddp_run).split()
    if tool == "train":
        argv = ["--max-steps", "1", *argv] + ([] if "--output-dir" in argv else ["--output-dir", str(tmp_path / "r")])
    status = _run_tool(tool, argv)
    err = capsys.readouterr().err
    assert status == code and message in err and "Traceback" not in err
    assert err.startswith(f"{Path(sys.argv[0]).name}: error: ") and len(err.strip().splitlines()) == 1


def test_resume_with_changed_flags_names_the_flags(ddp_run: Path, tmp_path: Path, capsys) -> None:
    """A resume refuses settings that differ from the run's, worded with the flags; nothing is written."""
    argv = ["--resume", ddp_run, "--output-dir", tmp_path / "r", "--lr", "1e-3", "--data-seed", "1"]
    argv += "--dataset synthetic --model fasterrcnn --variant b0 --max-steps 3 --batch-size 1 --log-every 1".split()
    assert _run_tool("train", argv + TINY_DATA + TINY_RCNN) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        f"error: --resume {ddp_run}: --data-seed is 1 here but 0 in the run being resumed; --lr and the process "
        "count differ too"
    )
    assert not (tmp_path / "r").exists()


def test_dist_timeout_flag_reaches_the_config() -> None:
    parser = train_cli.build_parser()
    args = parser.parse_args(["--max-steps", "1", "--output-dir", "x", "--dist-timeout", "45"])
    assert train_cli.config_from_args(args).dist_timeout == 45.0
    assert train_cli.config_from_args(parser.parse_args(["--max-steps", "1", "--output-dir", "x"])).dist_timeout == 600


def test_argparse_errors_exit_2_with_usage(tmp_path: Path, capsys) -> None:
    assert _run_tool("train", ["--max-steps", "1", "--epochs", "1", "--output-dir", tmp_path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and "error: argument --epochs: not allowed with argument --max-steps" in err
    assert _run_tool("evaluate", []) == 2
    assert "the following arguments are required: --checkpoint" in capsys.readouterr().err
    assert _run_tool("predict", ["--checkpoint", "x", "--input", "y", "--output-dir", "z", "--device", "tpu"]) == 2
    assert "argument --device: invalid choice: 'tpu'" in capsys.readouterr().err


def test_ctrl_c_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def interrupted(config: TrainConfig) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "train", interrupted)
    assert _run_tool("train", ["--max-steps", "1", "--output-dir", tmp_path / "r"]) == 130
    assert capsys.readouterr().err.strip().endswith(": interrupted")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_scripts_and_entry_points_run_the_same_command(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    assert _tool(name).main is COMMANDS[name].main  # tools/<name>.py is a shim over pvt_backbone.cli.<name>
    assert f"pvt-{name} " in COMMANDS[name].build_parser().format_help()  # the epilog shows the command's usage
    monkeypatch.setattr(sys, "argv", [f"pvt-{name}", "--checkpoint", str(tmp_path / "gone")])
    if name == "train":
        sys.argv[1:] = ["--max-steps", "1", "--output-dir", str(tmp_path), "--dataset", "coco"]
    elif name == "predict":
        sys.argv += ["--input", str(tmp_path), "--output-dir", str(tmp_path / "p")]
    with pytest.raises(SystemExit) as exited:
        COMMANDS[name].run()  # the [project.scripts] target
    err = capsys.readouterr().err
    assert exited.value.code in (1, 2) and err.startswith(f"pvt-{name}: error: ") and len(err.splitlines()) == 1


def test_library_checks_name_parameters_not_flags(ddp_run: Path) -> None:
    model, spec = load_trained(ddp_run)
    image = torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match=r"^score_threshold must be a finite number in \[0.0, 1.0\], got 1.5$"):
        predict(model, spec, image, score_threshold=1.5)
    with pytest.raises(ValueError, match=r"^batch_size must be an int >= 1, got 0$"):
        evaluate_detection(model, SyntheticShapes("val", num_images=1), batch_size=0)
    with pytest.raises(ValueError, match=r"^num_classes must be an int >= 1, got 0$"):
        ConfusionMatrix(0)
    with pytest.raises(TypeError, match=r"^num_classes must be an int >= 1, got True"):
        ConfusionMatrix(True)
    with pytest.raises(ValueError, match=r"^mask_threshold must be a finite number in \[0.0, 1.0\], got nan$"):
        coco_results([], [], [1], mask_threshold=float("nan"))


def test_cli_error_from_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "ann.json"
    (tmp_path / "img").mkdir()
    bad.write_text(json.dumps({"images": [], "categories": [{"id": 1}], "annotations": []}))
    command = [sys.executable, str(ROOT / "tools" / "train.py"), "--dataset", "coco", "--train-images"]
    command += [str(tmp_path / "img"), "--train-annotations", str(bad), "--max-steps", "1", "--output-dir", "out"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"train.py: error: {bad}: empty dataset: 'images' lists no image"
