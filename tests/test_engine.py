"""Engine: the COCOeval wrapper on a hand-checkable case, segmentation metrics, crash-safe checkpoints, the LR
schedule, the run's settings, and exact resume."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lr_probe import lrs, two_groups
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_runs import tiny_run_config
from torch import nn

from pvt_backbone import PVTv2Backbone
from pvt_backbone.training import checkpoint as ckpt
from pvt_backbone.training import trainer
from pvt_backbone.training.data.base import coco_from_dict
from pvt_backbone.training.evaluation import ConfusionMatrix, coco_evaluate, coco_results
from pvt_backbone.training.schedule import LRSchedule
from pvt_backbone.training.tasks import DataSpec, ModelSpec, build_datasets, build_model
from pvt_backbone.training.trainer import TrainConfig, read_log, train
from pvt_backbone.weights import CheckpointError, load_weights
from pvt_backbone.weights.io import atomic_write


# -- COCO evaluation -------------------------------------------------------------------------------------------------
def _squares(image_size: int, squares: list[tuple[int, int, int]]):
    """COCO ground truth: image i + 1 holds one square object (x, y, side) of category id 7 (label 1 maps to 7)."""
    annotations = [
        {
            "id": i + 1,
            "image_id": i + 1,
            "category_id": 7,
            "bbox": [x, y, side, side],
            "area": side * side,
            "iscrowd": 0,
            "segmentation": [[x, y, x + side, y, x + side, y + side, x, y + side]],
        }
        for i, (x, y, side) in enumerate(squares)
    ]
    images = [{"id": i + 1, "width": image_size, "height": image_size} for i in range(len(squares))]
    return coco_from_dict({"images": images, "categories": [{"id": 7, "name": "thing"}], "annotations": annotations})


def _ground_truth():
    """Two 100x100 images with one 40x40 object each."""
    return _squares(100, [(10, 10, 40), (20, 20, 40)])


def _output(box: list[float], score: float) -> dict[str, torch.Tensor]:
    x0, y0, x1, y1 = box
    mask = torch.zeros(1, 1, 100, 100)
    mask[0, 0, round(y0) : round(y1), round(x0) : round(x1)] = 0.9
    return {"boxes": torch.tensor([box]), "labels": torch.tensor([1]), "scores": torch.tensor([score]), "masks": mask}


def test_coco_wrapper_matches_a_hand_computed_case() -> None:
    coco = _ground_truth()
    perfect = coco_results([_output([10, 10, 50, 50], 0.9), _output([20, 20, 60, 60], 0.8)], [1, 2], [7])
    assert {r["category_id"] for r in perfect} == {7}
    assert perfect[0]["bbox"] == [10.0, 10.0, 40.0, 40.0]  # xyxy -> xywh
    metrics = coco_evaluate(coco, perfect, ("bbox", "segm"))
    assert metrics["bbox_mAP"] == pytest.approx(1.0) and metrics["bbox_mAP50"] == pytest.approx(1.0)
    assert metrics["segm_mAP"] == pytest.approx(1.0)
    assert metrics["bbox_mAP_small"] == -1.0  # no small ground truth: COCOeval's "undefined"

    # Second box 28.8 px wide instead of 40: IoU 0.72. It matches at IoU thresholds 0.50..0.70 (5 of 10), where
    # AP = 1; at 0.75..0.95 recall stops at 1/2 with precision 1, and the 101-point interpolated AP is 51/101.
    partial = coco_results([_output([10, 10, 50, 50], 0.9), _output([20, 20, 48.8, 60], 0.8)], [1, 2], [7])
    metrics = coco_evaluate(coco, partial, ("bbox",))
    assert metrics["bbox_mAP50"] == pytest.approx(1.0)
    assert metrics["bbox_mAP75"] == pytest.approx(51 / 101)
    assert metrics["bbox_mAP"] == pytest.approx((5 * 1.0 + 5 * 51 / 101) / 10)


def test_segm_scoring_uses_the_mask_area() -> None:
    """COCO rates segm detections by mask area: a false positive with a 5x5 mask in a 200x200 box is "small", so it
    must not cost precision in the "large" range, where the one (100x100) object is found exactly."""
    coco = _squares(200, [(10, 10, 100)])
    masks = torch.zeros(2, 1, 200, 200)
    masks[0, 0, 10:110, 10:110] = 0.9
    masks[1, 0, 190:195, 190:195] = 0.9
    output = {
        "boxes": torch.tensor([[10.0, 10.0, 110.0, 110.0], [0.0, 0.0, 200.0, 200.0]]),
        "labels": torch.tensor([1, 1]),
        "scores": torch.tensor([0.8, 0.9]),  # the false positive ranks first
        "masks": masks,
    }
    metrics = coco_evaluate(coco, coco_results([output], [1], [7]), ("segm",))
    assert metrics["segm_mAP_large"] == pytest.approx(1.0)
    assert metrics["segm_mAP"] < 1.0  # in the "all" range the false positive does cost precision


def test_coco_wrapper_scores_no_detections_as_zero() -> None:
    metrics = coco_evaluate(_ground_truth(), [], ("bbox", "segm"))
    assert metrics["bbox_mAP"] == 0.0 and metrics["segm_mAP50"] == 0.0
    with pytest.raises(ValueError, match="iou_type must be"):
        coco_evaluate(_ground_truth(), [], ("boxes",))


def test_confusion_matrix_miou_and_pixel_accuracy() -> None:
    cm = ConfusionMatrix(3)
    prediction = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    target = torch.tensor([[0, 0, 1, 2], [2, 2, 255, 255]])
    cm.update(prediction, target)
    metrics = cm.metrics()
    # class 0: 2/2, class 1: 1/2 (one false positive), class 2: 2/3 (one false negative)
    assert metrics["iou"] == pytest.approx([1.0, 0.5, 2 / 3])
    assert metrics["mIoU"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]))


# -- checkpoints -----------------------------------------------------------------------------------------------------
def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _save(root: Path, step: int, net: nn.Module, keep: int = 2) -> ckpt.RunCheckpoint:
    return ckpt.save_checkpoint(root, step=step, model=net, state={"step": step}, run={"model": "net"}, keep=keep)


def _confusion_rank(rank: int, port: int, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        matrix = ConfusionMatrix(2)
        matrix.update(torch.tensor([rank, 1]), torch.tensor([1, 1]))  # rank 0: one miss, one hit; rank 1: two hits
        matrix.all_reduce("cpu")
        results.put((rank, matrix.matrix.tolist()))
    finally:
        torch.distributed.destroy_process_group()


def test_confusion_matrix_sums_over_processes() -> None:
    import multiprocessing
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_confusion_rank, args=(rank, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    gathered = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert gathered == {0: [[0, 0], [1, 3]], 1: [[0, 0], [1, 3]]}  # rows: target, columns: prediction


def test_checkpoint_round_trip_pointer_and_pruning(tmp_path: Path) -> None:
    nets = [_net(seed) for seed in range(3)]
    for step, net in zip((10, 20, 30), nets):
        saved = _save(tmp_path, step, net)
    assert ckpt.latest_checkpoint(tmp_path) == saved and saved.step == 30
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_00000020", "step_00000030"]
    restored = _net(99)
    ckpt.load_run_weights(restored, saved.weights)
    assert _same(restored, nets[2])
    assert ckpt.load_training_state(saved) == {"step": 30} and saved.run_info() == {"model": "net"}
    for path in (tmp_path, saved.directory, saved.weights):
        assert ckpt.resolve_checkpoint(path).directory == saved.directory
    wrong = nn.Sequential(nn.Conv2d(3, 5, 3))
    built = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"model\.safetensors into Sequential") as error:
        ckpt.load_run_weights(wrong, saved.weights)
    assert isinstance(error.value, ValueError) and "of the run that wrote the file (see run.json" in str(error.value)
    assert all(torch.equal(built[k], v) for k, v in wrong.state_dict().items())  # a refused load changes nothing
    with pytest.raises(ckpt.CheckpointNotFound, match="weights file not found"):
        ckpt.load_run_weights(restored, tmp_path / "absent.safetensors")
    (tmp_path / "torn.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(CheckpointError, match="cannot read .*torn.safetensors"):  # the message is weights.io's
        ckpt.load_run_weights(restored, tmp_path / "torn.safetensors")


@pytest.mark.parametrize("fail_in", ["state", "weights"])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch, fail_in: str) -> None:
    first = _net(0)
    _save(tmp_path, 1, first)

    def die_mid_write(_obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\x00partial")  # half a file, then Ctrl-C
        raise KeyboardInterrupt

    if fail_in == "state":
        monkeypatch.setattr(ckpt.torch, "save", die_mid_write)
    else:
        monkeypatch.setattr(ckpt, "save_file", lambda tensors, path, metadata=None: die_mid_write(None, path))
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, _net(1))
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.step == 1
    restored = _net(5)
    ckpt.load_run_weights(restored, latest.weights)
    assert _same(restored, first)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
import torch
from torch import nn
from pvt_backbone.training import checkpoint as ckpt

def net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))

def save(step, model):
    ckpt.save_checkpoint(sys.argv[1], step=step, model=model, state={"step": step}, run={"model": "net"})

def killed(_obj, path, *args, **kwargs):
    Path(path).write_bytes(b"\\x00partial")  # the weights are written, the state half: then kill -9
    os.kill(os.getpid(), signal.SIGKILL)

save(1, net(0))
torch.save = killed
save(2, net(1))
"""


def test_killed_save_leaves_debris_that_the_next_save_clears(tmp_path: Path) -> None:
    """A process killed with SIGKILL mid-save keeps the previous checkpoint loadable; the next save clears it."""
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    debris = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert len(debris) == 1 and (debris[0] / "model.safetensors").is_file()  # killed in the middle of step 2
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.step == 1
    restored = _net(5)
    ckpt.load_run_weights(restored, latest.weights)
    assert _same(restored, _net(0)) and ckpt.load_training_state(latest) == {"step": 1}
    _save(tmp_path, 2, _net(1))
    assert not debris[0].exists() and ckpt.latest_checkpoint(tmp_path).step == 2


def test_atomic_write_failure_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "file.json"
    target.write_text("old")

    def fail(temp: Path) -> None:
        temp.write_text("new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_detector_checkpoint_feeds_load_weights_for_the_backbone(tmp_path: Path) -> None:
    from pvt_backbone.detection import fasterrcnn_pvt_v2_fpn

    detector = fasterrcnn_pvt_v2_fpn("b0", num_classes=3, min_size=64, max_size=64)
    path = tmp_path / "model.safetensors"
    ckpt.save_model_weights(detector, path)
    backbone = PVTv2Backbone.b0()
    load_weights(backbone, path)
    assert _same(backbone, detector.backbone.body)


def test_model_weights_are_labelled_as_a_whole_model(tmp_path: Path) -> None:
    net = _net(0)
    path = tmp_path / "model.safetensors"
    ckpt.save_model_weights(net, path, metadata={"pvt_backbone.step": "3"})
    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
    assert header["pvt_backbone.kind"] == "model" and header["pvt_backbone.model_class"] == "Sequential"
    assert "pvt_backbone.layout" not in header and header["pvt_backbone.step"] == "3"

    # A file with the older header (keys of the whole model, labelled as the native backbone layout) still loads.
    old = tmp_path / "old.safetensors"
    tensors = {k: v.clone() for k, v in _net(1).state_dict().items()}
    save_file(tensors, str(old), metadata={"format": "pt", "pvt_backbone.layout": "native"})
    restored = _net(2)
    ckpt.load_run_weights(restored, old)
    assert _same(restored, _net(1))


# -- schedule and resume ---------------------------------------------------------------------------------------------
def _factor(step: int, *, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """The LR factor of a step, written out: linear warm-up from 1e-3 to 1, then cosine or poly (power 0.9) decay
    from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return 1e-3 + (1 - 1e-3) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else (1 - progress) ** 0.9
    return min_ratio + (1 - min_ratio) * decay


@pytest.mark.parametrize(
    ("total", "warmup", "kind", "min_ratio"),
    [
        (110, 10, "cosine", 0.1),
        (110, 10, "poly", 0.0),
        (300, 15, "poly", 0.01),
        (50, 0, "cosine", 0.01),
        (1, 1, "poly", 0.5),
    ],
)
def test_schedule_lrs_follow_the_formula_at_every_step(total: int, warmup: int, kind: str, min_ratio: float) -> None:
    optimizer = two_groups()
    scheduler = LRSchedule(total=total, warmup=warmup, kind=kind, min_ratio=min_ratio).scheduler(optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    for step, (head_lr, body_lr) in enumerate(lrs(optimizer, scheduler, total + 1)):
        expected = _factor(step, total=total, warmup=warmup, kind=kind, min_ratio=min_ratio)
        assert head_lr == pytest.approx(expected, rel=1e-12, abs=1e-15), step
        assert body_lr == pytest.approx(expected / 10, rel=1e-12, abs=1e-16), step  # the floor is per group


def test_warmup_then_cosine_and_poly() -> None:
    optimizer = two_groups()
    cosine = [lr for lr, _ in lrs(optimizer, LRSchedule(110, 10, "cosine", 0.1).scheduler(optimizer), 111)]
    assert cosine[0] == pytest.approx(1e-3) and cosine[5] == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert cosine[10] == 1.0 and cosine[60] == pytest.approx(0.55) and cosine[110] == pytest.approx(0.1)
    optimizer = two_groups()
    poly = [lr for lr, _ in lrs(optimizer, LRSchedule(110, 10, "poly", 0.0).scheduler(optimizer), 111)]
    assert poly[60] == pytest.approx(0.5**0.9) and poly[110] == 0.0
    assert LRSchedule.for_run(total=100_000, warmup_steps=None, kind="poly", min_ratio=0.0).warmup == 500
    assert LRSchedule.for_run(total=10, warmup_steps=None, kind="poly", min_ratio=0.0).warmup == 1
    assert LRSchedule.for_run(total=10, warmup_steps=50, kind="poly", min_ratio=0.0).warmup == 10  # capped at total


@pytest.mark.parametrize("stop", [3, 10, 25])  # in the warm-up, at its end, in the decay
def test_schedule_state_round_trip_continues_bit_identically(stop: int) -> None:
    schedule = LRSchedule(total=40, warmup=10, kind="cosine", min_ratio=0.05)
    optimizer = two_groups(lr=2e-4)
    reference = lrs(optimizer, schedule.scheduler(optimizer), 40)
    first = two_groups(lr=2e-4)
    scheduler = schedule.scheduler(first)
    lrs(first, scheduler, stop)
    saved = {"optimizer": first.state_dict(), "scheduler": scheduler.state_dict()}
    resumed = two_groups(lr=2e-4)
    scheduler = schedule.scheduler(resumed)
    resumed.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    assert lrs(resumed, scheduler, 40 - stop) == reference[stop:]


def test_schedule_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="warmup must be an int in"):
        LRSchedule(total=5, warmup=6)
    with pytest.raises(ValueError, match="kind must be one of"):
        LRSchedule(total=5, warmup=1, kind="step")
    with pytest.raises(ValueError, match="min_ratio must be a finite number in"):
        LRSchedule(total=5, warmup=1, min_ratio=1.5)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("lr", float("inf"), ValueError),
        ("lr", 0.0, ValueError),
        ("clip_grad", float("nan"), ValueError),
        ("clip_grad", -1.0, ValueError),
        ("min_lr_ratio", -1.0, ValueError),
        ("min_lr_ratio", 1.5, ValueError),
        ("weight_decay", float("nan"), ValueError),
        ("backbone_lr_mult", float("inf"), ValueError),
        ("batch_size", 0, ValueError),
        ("batch_size", 2.0, TypeError),
        ("max_steps", True, TypeError),
        ("warmup_steps", -1, ValueError),
        ("trainable_stages", 5, ValueError),
        ("eval_every", -1, ValueError),
        ("schedule", "step", ValueError),
        ("head_norm", "ln", ValueError),
        ("device", "tpu", ValueError),
    ],
)
def test_config_check_names_the_bad_field(field: str, value: object, error: type[Exception]) -> None:
    config = TrainConfig(output_dir="unused", **{"max_steps": 10, field: value})
    with pytest.raises(error, match=rf"^{field} must be"):
        config.check()


def test_config_check_wants_one_length_and_compatible_norms() -> None:
    for lengths in ({}, {"epochs": 1, "max_steps": 1}):
        with pytest.raises(ValueError, match="give exactly one of epochs and max_steps"):
            TrainConfig(output_dir="unused", **lengths).check()
    with pytest.raises(ValueError, match="sync_bn synchronises BatchNorm"):
        TrainConfig(output_dir="unused", epochs=1, sync_bn=True, head_norm="gn").check()
    TrainConfig(output_dir="unused", epochs=1, warmup_steps=None, min_lr_ratio=1.0, clip_grad=0.0).check()


def test_dataset_errors_name_the_parameters() -> None:
    with pytest.raises(ValueError, match=r"^dataset 'coco' needs train_images and train_annotations$"):
        build_datasets(DataSpec(kind="coco"), "detection")
    with pytest.raises(ValueError, match=r"^dataset 'folder' needs train_masks$"):
        build_datasets(DataSpec(kind="folder", train_images="images"), "segmentation")


def test_segmenter_trainable_stages_freeze_the_first_stages() -> None:
    spec = ModelSpec("segmentation", "semantic_fpn", "b0", 2, 64, ("a", "b"))
    model = build_model(spec, trainable_stages=2)

    def part(name: str) -> str:
        return "patch_embed" if name.startswith("patch_embed.") else ".".join(name.split(".")[:2])

    parameters = list(model.backbone.named_parameters())
    assert {part(name) for name, p in parameters if not p.requires_grad} == {"patch_embed", "stages.0", "stages.1"}
    assert {part(name) for name, p in parameters if p.requires_grad} == {"stages.2", "stages.3"}
    assert all(p.requires_grad for p in model.head.parameters())
    with pytest.raises(ValueError, match="trainable_stages must lie in"):
        build_model(spec, trainable_stages=5)


def _tiny_run(output_dir: Path, **overrides) -> TrainConfig:
    return tiny_run_config(output_dir, **overrides)


def test_resume_continues_with_the_same_losses(tmp_path: Path) -> None:
    full = tmp_path / "full"
    train(_tiny_run(full))
    reference = {r["step"]: r["loss"] for r in read_log(full / "log.jsonl")}
    assert sorted(reference) == [1, 2, 3, 4]

    # The run "died" after the step-2 checkpoint: its pointer is back on step 2 and its log still has steps 3, 4.
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step_00000004")
    (crashed / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "name": "step_00000002"}))
    result = train(_tiny_run(crashed, resume=True))
    resumed = {r["step"]: r["loss"] for r in read_log(crashed / "log.jsonl")}
    assert sorted(resumed) == [1, 2, 3, 4]  # the stale records of steps 3 and 4 were replaced, not duplicated
    assert resumed == reference  # bit-identical losses at steps 3 and 4
    assert result.steps == 4 and result.checkpoint.step == 4
    assert reference[1] != reference[4]  # it did train

    with pytest.raises(ValueError, match="batch_size is 2 here but 1 in the run being resumed"):
        train(_tiny_run(crashed, resume=str(crashed / "checkpoints" / "step_00000002"), batch_size=2))
    with pytest.raises(ValueError, match=r"max_steps is 8 steps here but 4 steps .*to train longer"):  # longer
        train(_tiny_run(crashed, resume=str(crashed / "checkpoints" / "step_00000002"), max_steps=8))
    with pytest.raises(FileExistsError, match="already holds a run with checkpoints; pass resume=True to continue"):
        train(_tiny_run(crashed))
    state_path = crashed / "checkpoints" / "step_00000004" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["schedule"] == {"total": 4, "warmup": 1, "kind": "cosine", "min_ratio": 0.01, "warmup_start": 1e-3}
    del state["schedule"]  # a training state without its schedule cannot be continued exactly
    torch.save(state, state_path)
    with pytest.raises(ValueError, match="holds no LR schedule record"):
        train(_tiny_run(crashed, resume=True))


def test_a_non_finite_loss_stops_the_run_naming_the_parameters(tmp_path: Path, monkeypatch) -> None:
    def nan_loss(model, task, batch, device):
        loss = sum(p.sum() for p in model.parameters()) * float("nan")
        return loss, {"loss_box": loss.detach()}

    monkeypatch.setattr(trainer, "training_loss", nan_loss)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 1 \(loss_box=nan\); lower lr, keep clip_grad"):
        train(_tiny_run(tmp_path / "nan"))
