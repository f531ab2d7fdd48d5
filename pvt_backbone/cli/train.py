r"""Train a PVTv2 detector or segmenter.

One process:
    pvt-train --dataset synthetic --model fasterrcnn --variant b0 --max-steps 300 --output-dir runs/x
Several processes (DDP; gloo on CPU, NCCL on GPU):
    torchrun --standalone --nproc_per_node=2 -m pvt_backbone.cli.train --dataset synthetic --model fasterrcnn \
        --variant b0 --max-steps 300 --output-dir runs/x
COCO-format data:
    pvt-train --task instance --dataset coco --train-images data/train --train-annotations data/train.json \
        --val-images data/val --val-annotations data/val.json --epochs 12 --output-dir runs/coco
A named recipe (the paper's settings; pvt_backbone/training/recipes/) or a JSON file of the same shape, any flag
overriding it; --print-config shows the resolved settings (in that shape) and exits:
    pvt-train --recipe retinanet_1x --train-images coco/train2017 --train-annotations coco/train.json \
        --weights-backbone pvt_v2_b2.pth --output-dir runs/retina
    pvt-train --recipe mask_rcnn_1x --print-config > mine.json; pvt-train --config mine.json --output-dir runs/m
A recipe's LR is for its total batch; another process count x --batch-size scales it linearly (not an explicit --lr).
Continue a run where it stopped (its settings come from its run.json; flags given must agree, or be cadence flags
such as --save-every):
    pvt-train --output-dir runs/x --resume
Start a new run from a trained model (a run directory, a checkpoint directory or a model.safetensors):
    pvt-train ... --init-from runs/x --max-steps 1000 --output-dir runs/y
Ctrl-C or SIGTERM checkpoints the step reached and exits 130 (143 for SIGTERM); --resume continues from there. Under
torchrun every process stops after the same step and saves it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import VARIANTS
from ..training.checkpoint import latest_checkpoint, resolve_checkpoint
from ..training.distributed import DEFAULT_TIMEOUT, DEVICES
from ..training.recipes import Recipe, list_recipes, load_recipe
from ..training.schedule import DEFAULT_GAMMA, DEFAULT_MIN_RATIO, MILESTONE_UNITS, SCHEDULES, WARMUP_START
from ..training.tasks import HEAD_NORMS, DataSpec, resolve_task_model
from ..training.trainer import DEFAULT_SAVE_EVERY, SettingsError, TrainConfig, TrainingInterrupted, train
from .common import (
    DATA_FIELD_DESTS,
    add_data_arguments,
    add_model_arguments,
    add_threads_argument,
    apply_threads,
    check_data_arguments,
    check_dataset_task,
    data_spec_flags,
    data_spec_from_args,
    parse_model_args,
)
from .runner import UsageError, command_parser, entry_point, flag_names, in_flags

__all__ = ["build_parser", "config_from_args", "typed_flags", "resumed_config", "printable_config", "main", "run"]

# TrainConfig fields whose flag's destination is not the field's name.
_FIELD_DESTS = {"eval": "no_eval", "progress": "no_progress", "model_options": "model_arg"}
# Fields a resume always takes from the command line: where this run writes, and what it resumes.
_FROM_COMMAND_LINE = ("output_dir", "resume")
_LENGTHS = ("epochs", "max_steps")  # one or the other


def _add_model_group(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="b2", help="PVTv2 variant (default b2)")
    parser.add_argument("--weights-backbone", help="backbone checkpoint (any layout load_weights reads)")
    parser.add_argument(
        "--init-from",
        metavar="RUN_OR_FILE",
        help="start from a whole trained model (run dir, checkpoint dir or model.safetensors); step 0, new optimizer",
    )
    parser.add_argument("--trainable-stages", type=int, default=4, help="backbone stages trained, from the last (4)")
    parser.add_argument(
        "--head-norm",
        choices=HEAD_NORMS,
        default="default",
        help="norm in the neck/heads: the builder's default, BatchNorm or GroupNorm",
    )
    parser.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="extra builder argument, repeatable, e.g. fpn_channels=128 box_score_thresh=0.3",
    )


def _add_optimizer_group(parser: argparse.ArgumentParser) -> None:
    length = parser.add_argument_group("schedule").add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="passes over the training set (one of the two; --resume: the run's)")
    length.add_argument("--max-steps", type=int, help="optimizer steps")
    opt = parser.add_argument_group("optimizer")
    opt.add_argument("--batch-size", type=int, default=2, help="images per process and step (default 2)")
    opt.add_argument("--lr", type=float, default=2e-4, help="AdamW peak learning rate (default 2e-4)")
    opt.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    opt.add_argument("--backbone-lr-mult", type=float, default=1.0, help="backbone LR multiplier (default 1)")
    opt.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 5%% of the run, at most 500)")
    opt.add_argument(
        "--warmup-ratio", type=float, default=WARMUP_START, help=f"LR factor of the first step (default {WARMUP_START})"
    )
    opt.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="decay after warm-up (default cosine)")
    opt.add_argument(
        "--min-lr-ratio", type=float, help=f"cosine, poly: final LR / peak LR (default {DEFAULT_MIN_RATIO})"
    )
    opt.add_argument("--milestones", type=int, nargs="+", metavar="N", help="step: LR x --gamma at each, e.g. 8 11")
    opt.add_argument(
        "--milestone-unit", choices=MILESTONE_UNITS, default="epochs", help="what --milestones count (default epochs)"
    )
    opt.add_argument("--gamma", type=float, default=DEFAULT_GAMMA, help=f"step: LR factor (default {DEFAULT_GAMMA})")
    opt.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm, 0 = off (default 1)")
    opt.add_argument("--amp", action="store_true", help="mixed precision (fp16 on GPU, bf16 on CPU)")


def _add_run_group(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", help="logs, loss.png and checkpoints go here (required unless --print-config)")
    run.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="continue the latest checkpoint of --output-dir, or of PATH (run or checkpoint dir)",
    )
    run.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end only)")
    run.add_argument("--eval-at-start", action="store_true", help="also evaluate before the first step")
    run.add_argument("--no-eval", action="store_true", help="never evaluate")
    run.add_argument(
        "--save-every",
        type=int,
        default=DEFAULT_SAVE_EVERY,
        help=f"checkpoint every N steps, 0 = at the end only (default {DEFAULT_SAVE_EVERY}, and at the end)",
    )
    run.add_argument("--keep-checkpoints", type=int, default=2, help="complete checkpoints kept (default 2)")
    run.add_argument("--log-every", type=int, default=10, help="log a JSON line every N steps (default 10)")
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm in the heads under torchrun (needs CUDA)")
    run.add_argument("--workers", type=int, default=2, help="DataLoader workers per process (default 2)")
    run.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    run.add_argument("--device", choices=DEVICES, default="auto", help="default: GPU if available")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--tensorboard", action="store_true", help="also TensorBoard scalars in <output-dir>/tensorboard")
    run.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"under torchrun: how long a process waits for a silent peer before failing (default {DEFAULT_TIMEOUT:g})",
    )


def _add_class_names_argument(parser: argparse.ArgumentParser) -> None:
    """``--class-names FILE`` in the data group: what ``run.json`` then names each class id of a mask folder."""
    group = next((g for g in parser._action_groups if g.title == "data"), parser)  # argparse lists groups only here
    group.add_argument(
        "--class-names",
        dest="class_names_file",
        metavar="FILE",
        help="folder: text file of class names, one per line in id order (# comments and blank lines skipped)",
    )


def _add_recipe_group(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("recipe")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--recipe", metavar="NAME", help=f"start from a named recipe: {', '.join(list_recipes())}")
    source.add_argument("--config", metavar="FILE", help="start from a recipe JSON file (the --print-config shape)")
    group.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")


def build_parser() -> argparse.ArgumentParser:
    """The ``pvt-train`` command line; its epilog is the usage examples above."""
    parser = command_parser(__doc__)
    _add_recipe_group(parser)
    _add_model_group(parser)
    add_data_arguments(parser)
    _add_class_names_argument(parser)
    _add_optimizer_group(parser)
    _add_run_group(parser)
    add_threads_argument(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the parsed flags describe, one flag per field."""
    return TrainConfig(
        output_dir=args.output_dir,
        task=args.task,
        model=args.model,
        variant=args.variant,
        weights_backbone=args.weights_backbone,
        init_from=args.init_from,
        trainable_stages=args.trainable_stages,
        head_norm=args.head_norm,
        model_options=parse_model_args(args.model_arg),
        data=dataclasses.replace(data_spec_from_args(args), class_names_file=args.class_names_file),
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        backbone_lr_mult=args.backbone_lr_mult,
        warmup_steps=args.warmup_steps,
        warmup_ratio=args.warmup_ratio,
        schedule=args.schedule,
        min_lr_ratio=args.min_lr_ratio,
        milestones=tuple(args.milestones or ()),
        milestone_unit=args.milestone_unit,
        gamma=args.gamma,
        clip_grad=args.clip_grad,
        amp=args.amp,
        sync_bn=args.sync_bn,
        workers=args.workers,
        seed=args.seed,
        device=args.device,
        eval=not args.no_eval,
        eval_at_start=args.eval_at_start,
        eval_every=args.eval_every,
        save_every=args.save_every,
        log_every=args.log_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        progress=not args.no_progress,
        dist_timeout=args.dist_timeout,
        tensorboard=args.tensorboard,
    )


def typed_flags(argv: Sequence[str] | None = None) -> set[str]:
    """The destinations of the flags given on the command line ``argv`` (``sys.argv[1:]`` when None), as opposed to
    those left at their defaults.

    Example:
        >>> sorted(typed_flags(["--output-dir", "runs/x", "--resume", "--save-every", "5"]))
        ['output_dir', 'resume', 'save_every']
    """
    parser = build_parser()
    for action in parser._actions:  # argparse keeps its actions only here
        action.default, action.required = argparse.SUPPRESS, False
    for group in parser._mutually_exclusive_groups:
        group.required = False
    given, _ = parser.parse_known_args(sys.argv[1:] if argv is None else [str(arg) for arg in argv])
    return set(vars(given))


def _resumed_record(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``run.json`` of the checkpoint ``--resume`` names, or None when there is none to read (the trainer then
    says why it cannot resume)."""
    checkpoint = latest_checkpoint(args.output_dir) if args.resume is True else resolve_checkpoint(args.resume)
    record = checkpoint.run_info() if checkpoint is not None else {}
    return record if isinstance(record.get("train"), dict) else None


def _recipe(args: argparse.Namespace) -> Recipe | None:
    """The recipe ``--recipe`` names or ``--config`` holds (None without either)."""
    if args.config is not None:
        return load_recipe(Path(args.config))
    return load_recipe(args.recipe) if args.recipe is not None else None


def _world_size() -> int:
    """The process count of this run: torchrun's ``WORLD_SIZE``, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _recipe_config(args: argparse.Namespace, typed: set[str], recipe: Recipe) -> TrainConfig:
    """The recipe's run with each flag in ``typed`` replacing its value (``--model-arg`` keys join the recipe's
    ``model_options``); untyped flags leave the recipe's values, and fields the recipe leaves out take the flags'
    defaults."""
    given = config_from_args(args)
    train_fields = [spec.name for spec in dataclasses.fields(TrainConfig) if spec.name not in ("data", "recipe")]
    overrides = {name: getattr(given, name) for name in train_fields if _FIELD_DESTS.get(name, name) in typed}
    if "model_options" in overrides:
        overrides["model_options"] = {**recipe.train.get("model_options", {}), **given.model_options}
    overrides.pop("output_dir", None)
    data_fields = [spec.name for spec in dataclasses.fields(DataSpec)]
    data = {name: getattr(given.data, name) for name in data_fields if DATA_FIELD_DESTS.get(name, name) in typed}
    config = recipe.train_config(args.output_dir, world_size=_world_size(), data=data, **overrides)
    untouched = [n for n in train_fields if n not in recipe.train and n not in overrides and n not in _LENGTHS]
    spec = config.data
    defaults = {n: getattr(given.data, n) for n in data_fields if n not in recipe.data and n not in data}
    return dataclasses.replace(
        config, **{n: getattr(given, n) for n in untouched}, data=dataclasses.replace(spec, **defaults)
    )


def _given_config(args: argparse.Namespace, typed: set[str]) -> tuple[TrainConfig, set[str]]:
    """The settings the command line describes, recipe included, and the flag destinations it chose (typed, or
    set by the recipe: what a resume takes from here rather than from the run's ``run.json``)."""
    recipe = _recipe(args)
    if recipe is None:
        return config_from_args(args), typed
    chosen = {_FIELD_DESTS.get(name, name) for name in recipe.train} | {"recipe"}
    chosen |= {DATA_FIELD_DESTS.get(name, name) for name in recipe.data}
    return _recipe_config(args, typed, recipe), typed | chosen


def resumed_config(args: argparse.Namespace, typed: set[str]) -> TrainConfig:
    """The settings of a ``--resume``: the run's own (its ``run.json``), with the flags in ``typed`` (and the
    values of a ``--recipe`` or ``--config``) applied on top (the trainer then refuses those that change the run);
    without ``--resume``, the command line's settings."""
    given, chosen = _given_config(args, typed)
    record = _resumed_record(args) if args.resume is not False else None
    if record is None:
        return given
    saved = {name: value for name, value in record["train"].items() if name != "data"}
    values = {}
    for spec in dataclasses.fields(TrainConfig):
        typed_here = _FIELD_DESTS.get(spec.name, spec.name) in chosen or spec.name in _FROM_COMMAND_LINE
        if spec.name != "data":
            values[spec.name] = getattr(given, spec.name) if typed_here or spec.name not in saved else saved[spec.name]
    if chosen & set(_LENGTHS):  # the length as given, in whichever spelling
        values["epochs"], values["max_steps"] = given.epochs, given.max_steps
    saved_data = {**DataSpec().to_dict(), **(record.get("data") or {})}
    data = {
        spec.name: getattr(given.data, spec.name)
        if DATA_FIELD_DESTS.get(spec.name, spec.name) in chosen
        else saved_data[spec.name]
        for spec in dataclasses.fields(DataSpec)
    }
    return TrainConfig(**values, data=DataSpec(**data))


def printable_config(config: TrainConfig, recipe: Recipe | None = None) -> dict[str, Any]:
    """The resolved settings in a recipe file's shape (``--config`` reads it back to the same settings): the run's
    own images per step as ``total_batch`` with its (scaled) LR, and ``scaled_from`` the recipe's pair."""
    record = config.recipe or {}
    train = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("output_dir", "resume", "data", "recipe")}
    printed: dict[str, Any] = {
        "name": recipe.name if recipe is not None else "custom",
        "description": recipe.description if recipe is not None else "settings given on the command line",
        "source": recipe.source if recipe is not None else "",
    }
    if recipe is not None and recipe.notes:
        printed["notes"] = list(recipe.notes)
    printed["total_batch"] = record.get("images_per_step", config.batch_size * _world_size())
    printed.update(train=train, data=config.data.to_dict())
    if record.get("lr_scale", 1.0) != 1.0:
        printed["scaled_from"] = {"lr": record["recipe_lr"], "total_batch": record["total_batch"]}
    elif recipe is not None and recipe.scaled_from is not None:
        printed["scaled_from"] = dict(recipe.scaled_from)
    return json.loads(json.dumps(printed))


def _check_command_line(args: argparse.Namespace, config: TrainConfig) -> None:
    """Flag combinations argparse cannot express (:class:`UsageError`), and a run that would be overwritten."""
    if args.resume is False and config.epochs is None and config.max_steps is None:
        raise UsageError("one of the arguments --epochs --max-steps is required (unless --resume or a recipe)")
    try:
        task, _ = resolve_task_model(config.task, config.model)
    except ValueError as error:
        raise UsageError(str(error)) from None
    check_dataset_task(config.data.kind, task)
    if args.resume is False:
        check_data_arguments(_data_flags(config.data), train=True)
        if config.data.class_names_file is not None and config.data.kind != "folder":
            raise UsageError(f"--class-names is for --dataset folder; --dataset {config.data.kind} names its classes")
        if latest_checkpoint(args.output_dir) is not None:
            raise FileExistsError(
                f"{args.output_dir} already holds a run with checkpoints; pass --resume to continue it, or choose "
                "another --output-dir"
            )


def _data_flags(data: DataSpec) -> argparse.Namespace:
    """The data settings as the dataset flags would hold them (a recipe may set what no flag was given for)."""
    return argparse.Namespace(dataset=data.kind, **{k: v for k, v in data.to_dict().items() if k != "kind"})


def _note_scaling(config: TrainConfig, prog: str) -> None:
    """Say on stderr (rank 0) when a recipe's LR was scaled to this run's images per step."""
    record = config.recipe or {}
    if record.get("lr_scale", 1.0) == 1.0 or os.environ.get("RANK", "0") != "0":
        return
    print(
        f"{prog}: recipe {record['name']}: {_world_size()} process(es) x {config.batch_size} images = "
        f"{record['images_per_step']} per step, not the recipe's {record['total_batch']}: lr {record['recipe_lr']:g} "
        f"-> {record['lr']:g} (linear scaling; --lr sets it as given)",
        file=sys.stderr,
    )


def _checked_config(config: TrainConfig, parser: argparse.ArgumentParser) -> TrainConfig:
    """The run's settings, checked; a bad value is a usage error worded with its flag (``--lr``, not ``lr``)."""
    try:
        config.check()
    except (ValueError, TypeError) as error:
        raise UsageError(in_flags(str(error), flag_names(parser))) from error
    return config


def _in_flags(error: SettingsError, parser: argparse.ArgumentParser, args: argparse.Namespace) -> SettingsError:
    """A refused setting worded for the command line: ``--lr``, ``--data-seed``, ``--resume``, not the parameters."""
    flags = {
        **flag_names(parser),
        **data_spec_flags(parser),
        "resume=True": "--resume",
        f"resume={str(args.resume)!r}": f"--resume {args.resume}",
        "sync_bn=True": "--sync-bn",
        "world_size": "the process count",
    }
    named = {name: flags[name] for name in error.settings if name in flags}
    return SettingsError(in_flags(str(error), named), settings=error.settings)


def _interrupted(stop: TrainingInterrupted, parser: argparse.ArgumentParser) -> int:
    """Say where the interrupted run's checkpoint is (rank 0); the exit status is 128 + the signal's number."""
    if stop.checkpoint is not None:
        print(
            f"{parser.prog}: interrupted at step {stop.step}; checkpoint: {stop.checkpoint.directory}; continue with "
            "--resume",
            file=sys.stderr,
        )
    return 128 + stop.signal_number


def main(argv: Sequence[str] | None = None) -> int:
    """``pvt-train``: train, then print where the last checkpoint went (rank 0 only)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.output_dir is None and not (args.print_config and args.resume is False):
        raise UsageError("the following arguments are required: --output-dir")
    config = resumed_config(args, typed_flags(argv))
    if args.print_config:
        print(json.dumps(printable_config(_checked_config(config, parser), _recipe(args)), indent=2))
        return 0
    _check_command_line(args, config)
    _note_scaling(config, parser.prog)
    try:
        result = train(_checked_config(config, parser))
    except SettingsError as error:  # a resume with other settings, or sync_bn on a CPU
        raise _in_flags(error, parser, args) from error
    except TrainingInterrupted as stop:
        return _interrupted(stop, parser)
    if result.checkpoint is not None and os.environ.get("RANK", "0") == "0":
        print(f"checkpoint: {result.checkpoint.directory} (step {result.steps}, {result.seconds:.0f} s)")
    return 0


run = entry_point(main)

if __name__ == "__main__":
    run()
