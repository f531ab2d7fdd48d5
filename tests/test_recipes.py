"""The named training recipes: every file loads and holds the published values, each one trains end to end on tiny
synthetic settings, the LR follows the recipe's schedule (scaled linearly to the run's batch), and ``pvt-train
--recipe`` / ``--config`` / ``--print-config`` resolve, override, record and resume as documented."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from pvt_backbone.cli import train as train_cli
from pvt_backbone.cli.runner import run_command
from pvt_backbone.training import trainer
from pvt_backbone.training.recipes import Recipe, RecipeError, list_recipes, load_recipe, scaled_lr
from pvt_backbone.training.trainer import read_log, train

PAPER = ("retinanet_1x", "mask_rcnn_1x", "mask_rcnn_3x_ms", "semantic_fpn_ade20k_40k")
# name: (model, lr, weight decay, schedule, length, milestones in epochs, warm-up steps, warm-up ratio)
PUBLISHED = {
    "retinanet_1x": ("retinanet", 1e-4, 1e-4, "step", {"epochs": 12}, [8, 11], 500, 1e-3),
    "mask_rcnn_1x": ("maskrcnn", 2e-4, 1e-4, "step", {"epochs": 12}, [8, 11], 500, 1e-3),
    "mask_rcnn_3x_ms": ("maskrcnn", 1e-4, 0.05, "step", {"epochs": 36}, [27, 33], 500, 1e-3),
    "semantic_fpn_ade20k_40k": ("semantic_fpn", 1e-4, 1e-4, "poly", {"max_steps": 40_000}, None, 0, None),
}
# Tiny settings for a run of two steps on synthetic data, whatever the recipe (the RPN ones only for R-CNNs).
TINY = {"variant": "b0", "max_steps": 2, "batch_size": 1, "workers": 0, "eval": False, "progress": False}
TINY_DATA = {"kind": "synthetic", "image_size": 64, "train_size": 4, "val_size": 2, "synthetic_classes": 2}
TINY_RCNN = {"box_batch_size_per_image": 16, "rpn_post_nms_top_n_train": 32, "rpn_batch_size_per_image": 32}
TINY_CLI = "--variant b0 --dataset synthetic --image-size 64 --train-size 4 --val-size 2 --synthetic-classes 2"
TINY_CLI += " --workers 0 --no-progress --no-eval --max-steps 2 --batch-size 1 --model-arg fpn_channels=32"


def _cli(argv: list, capsys) -> tuple[int, str, str]:
    """``pvt-train argv``: exit status, stdout, stderr."""
    try:
        status = run_command(train_cli.main, [str(arg) for arg in argv])
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# -- the files -------------------------------------------------------------------------------------------------------
def test_every_recipe_file_loads_validates_and_round_trips() -> None:
    assert set(PUBLISHED) | {"cpu_demo"} == set(list_recipes())
    for name in list_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.origin.endswith(f"recipes/{name}.json")
        assert len(recipe.source) > 40 and recipe.description
        assert Recipe.from_dict(recipe.to_dict(), origin=recipe.origin) == recipe
        recipe.train_config("unused").check()


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipes_hold_the_published_values(name: str) -> None:
    model, lr, decay, schedule, length, milestones, warmup, ratio = PUBLISHED[name]
    recipe = load_recipe(name)
    train = recipe.train
    assert (train["model"], recipe.lr, train["weight_decay"], train["schedule"]) == (model, lr, decay, schedule)
    assert {key: train[key] for key in ("epochs", "max_steps") if key in train} == length
    assert recipe.total_batch == 16 and recipe.batch_size == 2  # 2 images on each of 8 GPUs
    assert train["warmup_steps"] == warmup and train.get("warmup_ratio") == ratio
    assert train.get("milestones") == milestones and train["clip_grad"] == 0.0  # the configs clip no gradients
    assert "whai362/PVT" in recipe.source and "2106.13797" in recipe.source
    data = recipe.data_spec()
    if name == "semantic_fpn_ade20k_40k":
        assert train["min_lr_ratio"] == 0.0 and data.num_classes == 150 and data.image_size == 512
        assert data.seg_protocol == "keep_ratio" and data.reduce_zero_label
    else:
        assert data.kind == "coco" and (data.image_size, data.max_size) == (800, 1333) and data.group_aspect_ratio
        assert data.augment == ("detr" if name == "mask_rcnn_3x_ms" else "flip")


def test_cpu_demo_recipe_is_the_demo_run() -> None:
    config = load_recipe("cpu_demo").train_config("runs/demo", max_steps=1000)
    assert (config.model, config.variant, config.head_norm, config.lr, config.batch_size) == (
        "fasterrcnn",
        "b0",
        "gn",
        1e-3,
        4,
    )
    assert config.recipe["lr_scale"] == 1.0 and config.max_steps == 1000 and config.eval_every == 250
    assert config.model_options["fpn_channels"] == 64 and config.data.image_size == 96


def test_a_recipe_the_trainer_cannot_run_is_refused_by_name(tmp_path: Path) -> None:
    base = load_recipe("retinanet_1x").to_dict()
    with pytest.raises(RecipeError, match=r"data option 'mosaic' not supported by this version's DataSpec"):
        Recipe.from_dict({**base, "data": {**base["data"], "mosaic": True}})
    with pytest.raises(RecipeError, match=r"train fields \['optimizer'\] are not TrainConfig settings"):
        Recipe.from_dict({**base, "train": {**base["train"], "optimizer": "sgd"}})
    with pytest.raises(RecipeError, match=r"^recipe 'retinanet_1x': lr must be a finite number > 0.0, got -1"):
        Recipe.from_dict({**base, "train": {**base["train"], "lr": -1}})
    with pytest.raises(RecipeError, match=r"unknown keys \['steps'\]"):
        Recipe.from_dict({**base, "steps": 3})
    with pytest.raises(RecipeError, match=r"^unknown recipe 'nope'; the recipes are cpu_demo, mask_rcnn_1x"):
        load_recipe("nope")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(RecipeError, match="broken.json: not valid JSON"):
        load_recipe(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.json")


# -- LR: scaling and schedule ----------------------------------------------------------------------------------------
def test_linear_scaling_follows_the_images_per_step() -> None:
    recipe = load_recipe("mask_rcnn_1x")
    assert recipe.train_config("x", world_size=8).lr == 2e-4  # the recipe's own 8 x 2
    assert recipe.train_config("x", world_size=1).lr == pytest.approx(2e-4 * 2 / 16)
    wide = recipe.train_config("x", world_size=4, batch_size=8)  # 32 images per step
    assert wide.lr == pytest.approx(4e-4) and wide.recipe["lr_scale"] == pytest.approx(2.0)
    explicit = recipe.train_config("x", world_size=1, lr=3e-4)
    assert explicit.lr == 3e-4 and explicit.recipe["overrides"] == ["lr"] and explicit.recipe["lr_scale"] == 1.0
    assert scaled_lr(1e-4, images_per_step=16, total_batch=16) == 1e-4


def test_recipe_lr_at_chosen_steps_before_and_after_a_resume() -> None:
    """retinanet_1x at 100 steps an epoch: warm-up over 500 steps from 0.001, x0.1 from step 800 and from step 1100;
    resumed at step 900 from the saved optimizer and scheduler states."""
    config = load_recipe("retinanet_1x").train_config("x", world_size=8)
    schedule = trainer._schedule(config, per_epoch=100)  # the trainer's own conversion
    assert schedule.milestones == (800, 1100) and schedule.total == 1200 and schedule.warmup == 500

    def expected(step: int) -> float:
        warm = 1e-3 + (1 - 1e-3) * step / 500 if step < 500 else 1.0
        return 1e-4 * warm * 0.1 ** sum(step >= m for m in (800, 1100))

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=config.lr)

    first = optimizer()
    scheduler = schedule.scheduler(first)
    seen = {}
    for step in range(900):
        seen[step] = first.param_groups[0]["lr"]
        first.step()
        scheduler.step()
    state = {"optimizer": first.state_dict(), "scheduler": scheduler.state_dict()}
    resumed = optimizer()
    scheduler = schedule.scheduler(resumed)
    resumed.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for step in range(900, 1200):
        seen[step] = resumed.param_groups[0]["lr"]
        resumed.step()
        scheduler.step()
    for step in (0, 1, 250, 499, 500, 799, 800, 899, 900, 1099, 1100, 1199):
        assert seen[step] == pytest.approx(expected(step), rel=1e-9), step


# -- end to end ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mask_rcnn_1x", "mask_rcnn_3x_ms", "semantic_fpn_ade20k_40k", "cpu_demo"])
def test_each_recipe_trains_two_steps_on_tiny_synthetic_data(name: str, tmp_path: Path) -> None:
    recipe = load_recipe(name)
    data = dict(TINY_DATA)
    options = {"fpn_channels": 32} if name != "semantic_fpn_ade20k_40k" else {}
    if "rcnn" in name or name == "cpu_demo":
        options.update(TINY_RCNN)
    if name == "semantic_fpn_ade20k_40k":
        data["reduce_zero_label"] = False  # an ADE20K mask convention; synthetic masks start at 0
    if name == "mask_rcnn_3x_ms":
        data.update(multiscale_sizes=[48, 64], max_size=96)
    options = {**recipe.train.get("model_options", {}), **options}
    config = recipe.train_config(str(tmp_path / "run"), data=data, model_options=options, **TINY)
    result = train(config)
    assert result.steps == 2
    losses = [record for record in read_log(tmp_path / "run" / "log.jsonl") if "loss" in record]
    assert [record["step"] for record in losses] == [1, 2]
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in losses)
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["train"]["recipe"]["name"] == name and saved["train"]["schedule"] == recipe.train["schedule"]
    assert saved["train"]["lr"] == pytest.approx(recipe.lr * 1 / recipe.total_batch)  # 1 image per step


def test_cli_recipe_trains_records_writes_tensorboard_and_resumes(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["--recipe", "retinanet_1x", *TINY_CLI.split(), "--save-every", "1", "--log-every", "1", "--tensorboard"]
    status, _, err = _cli([*argv, "--output-dir", run], capsys)
    assert status == 0, err
    assert "lr 0.0001 -> 6.25e-06 (linear scaling" in err  # 1 process x 1 image, not 16
    record = json.loads((run / "run.json").read_text())["train"]
    assert record["lr"] == pytest.approx(1e-4 / 16) and record["schedule"] == "step" and record["milestones"] == [8, 11]
    assert record["recipe"]["name"] == "retinanet_1x" and record["recipe"]["lr_scale"] == pytest.approx(1 / 16)
    assert "max_steps" in record["recipe"]["overrides"] and record["recipe"]["values"]["train"]["epochs"] == 12
    logged = {r["step"]: r for r in read_log(run / "log.jsonl") if "loss" in r}

    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    board = accumulator.EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert {"train/loss", "train/lr", "train/classification", "train/bbox_regression"} <= set(board.Tags()["scalars"])
    for tag in ("loss", "lr", "classification"):
        events = board.Scalars(f"train/{tag}")
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([logged[s][tag] for s in (1, 2)], rel=1e-6)

    # The run "died" after step 1: --resume with nothing but --output-dir takes every setting from run.json.
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 1, "name": "step_00000001"}))
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    status, _, err = _cli(["--output-dir", run, "--resume", "--no-progress"], capsys)
    assert status == 0, err
    resumed = {r["step"]: r["loss"] for r in read_log(run / "log.jsonl") if "loss" in r}
    assert resumed == {step: r["loss"] for step, r in logged.items()}  # step 2 again, bit for bit
    assert json.loads((run / "run.json").read_text())["train"]["recipe"] == record["recipe"]


def test_print_config_round_trips_through_config(tmp_path: Path, capsys) -> None:
    status, out, err = _cli(["--recipe", "mask_rcnn_3x_ms", "--print-config"], capsys)
    assert status == 0, err
    printed = json.loads(out)
    assert printed["name"] == "mask_rcnn_3x_ms" and printed["total_batch"] == 2  # this one process's batch
    assert printed["train"]["lr"] == pytest.approx(1e-4 / 8)
    assert printed["scaled_from"] == {"lr": 1e-4, "total_batch": 16}
    assert printed["data"]["augment"] == "detr" and printed["train"]["milestones"] == [27, 33]
    (tmp_path / "mine.json").write_text(out)
    status, again, err = _cli(["--config", tmp_path / "mine.json", "--print-config"], capsys)
    assert status == 0, err
    assert json.loads(again) == printed  # nothing scaled twice
    train = load_recipe(tmp_path / "mine.json").train_config("x")
    assert train.lr == printed["train"]["lr"] and train.epochs == 36


def test_a_typed_flag_overrides_only_itself(capsys, monkeypatch) -> None:
    base = ["--recipe", "retinanet_1x", "--print-config"]
    _, out, _ = _cli(base, capsys)
    reference = json.loads(out)
    status, out, err = _cli([*base, "--weight-decay", "0.02", "--milestones", "9", "12"], capsys)
    assert status == 0, err
    changed = json.loads(out)
    assert changed["train"]["weight_decay"] == 0.02 and changed["train"]["milestones"] == [9, 12]
    differing = {k for k in reference["train"] if reference["train"][k] != changed["train"][k]}
    assert differing == {"weight_decay", "milestones"} and changed["data"] == reference["data"]
    _, out, _ = _cli([*base, "--lr", "3e-4"], capsys)  # an explicit LR is used as given
    explicit = json.loads(out)
    assert explicit["train"]["lr"] == 3e-4 and "scaled_from" not in explicit
    monkeypatch.setenv("WORLD_SIZE", "8")  # torchrun's 8 processes x 2: the recipe's own batch
    _, out, _ = _cli(base, capsys)
    full = json.loads(out)
    assert full["train"]["lr"] == 1e-4 and full["total_batch"] == 16 and "scaled_from" not in full


def test_unknown_recipe_is_one_line_listing_the_names(tmp_path: Path, capsys) -> None:
    status, _, err = _cli(["--recipe", "retina", "--output-dir", tmp_path / "r"], capsys)
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1, err
    assert lines[0].endswith(f"unknown recipe 'retina'; the recipes are {', '.join(list_recipes())}")
    assert not (tmp_path / "r").exists()


def test_augmentation_and_protocol_flags_reach_the_data_spec(capsys) -> None:
    base = ["--recipe", "semantic_fpn_ade20k_40k", "--print-config"]
    _, out, _ = _cli(base, capsys)
    reference = json.loads(out)["data"]
    assert reference["seg_protocol"] == "keep_ratio" and reference["eval_mode"] == "whole"
    flags = ["--eval-mode", "slide", "--test-scales", "0.75", "1.25", "--test-flip", "--group-aspect-ratio"]
    status, out, err = _cli([*base, *flags], capsys)
    assert status == 0, err
    data = json.loads(out)["data"]
    assert data["eval_mode"] == "slide" and data["test_scales"] == [0.75, 1.25] and data["test_flip"] is True
    assert data["group_aspect_ratio"] is True and data["reduce_zero_label"] is True  # the recipe's, untouched
    assert {k for k in data if data[k] != reference[k]} == {
        "eval_mode",
        "test_scales",
        "test_flip",
        "group_aspect_ratio",
    }
    status, out, err = _cli(["--recipe", "retinanet_1x", "--print-config", "--augment", "lsj", "--photometric"], capsys)
    assert status == 0, err
    assert json.loads(out)["data"]["augment"] == "lsj" and json.loads(out)["data"]["photometric"] is True
