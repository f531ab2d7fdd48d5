r"""Train a PVTv2 detector or segmenter.

One process:
    pvt-train --dataset synthetic --model fasterrcnn --variant b0 --max-steps 300 --output-dir runs/x
Several processes (DDP; gloo on CPU, NCCL on GPU):
    torchrun --standalone --nproc_per_node=2 -m pvt_backbone.cli.train --dataset synthetic --model fasterrcnn \
        --variant b0 --max-steps 300 --output-dir runs/x
COCO-format data:
    pvt-train --task instance --dataset coco --train-images data/train --train-annotations data/train.json \
        --val-images data/val --val-annotations data/val.json --epochs 12 --output-dir runs/coco
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
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..config import VARIANTS
from ..training.checkpoint import latest_checkpoint, resolve_checkpoint
from ..training.distributed import DEFAULT_TIMEOUT, DEVICES
from ..training.schedule import SCHEDULES
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

__all__ = ["build_parser", "config_from_args", "typed_flags", "resumed_config", "main", "run"]

# TrainConfig fields whose flag's destination is not the field's name.
_FIELD_DESTS = {"eval": "no_eval", "progress": "no_progress", "model_options": "model_arg"}
# Fields a resume always takes from the command line: where this run writes, and what it resumes.
_FROM_COMMAND_LINE = ("output_dir", "resume")


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
    opt.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="decay after warm-up")
    opt.add_argument("--min-lr-ratio", type=float, default=0.01, help="final LR / peak LR (default 0.01)")
    opt.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm, 0 = off (default 1)")
    opt.add_argument("--amp", action="store_true", help="mixed precision (fp16 on GPU, bf16 on CPU)")


def _add_run_group(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", required=True, help="logs, loss.png and checkpoints go here")
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
    run.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"under torchrun: how long a process waits for a silent peer before failing (default {DEFAULT_TIMEOUT:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``pvt-train`` command line; its epilog is the usage examples above."""
    parser = command_parser(__doc__)
    _add_model_group(parser)
    add_data_arguments(parser)
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
        data=data_spec_from_args(args),
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        backbone_lr_mult=args.backbone_lr_mult,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        min_lr_ratio=args.min_lr_ratio,
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


def resumed_config(args: argparse.Namespace, typed: set[str]) -> TrainConfig:
    """The settings of a ``--resume``: the run's own (its ``run.json``), with the flags in ``typed`` applied on top
    (the trainer then refuses those that change the run); without ``--resume``, the flags' settings."""
    given = config_from_args(args)
    record = _resumed_record(args) if args.resume is not False else None
    if record is None:
        return given
    saved = {name: value for name, value in record["train"].items() if name != "data"}
    values = {}
    for spec in dataclasses.fields(TrainConfig):
        typed_here = _FIELD_DESTS.get(spec.name, spec.name) in typed or spec.name in _FROM_COMMAND_LINE
        if spec.name != "data":
            values[spec.name] = getattr(given, spec.name) if typed_here or spec.name not in saved else saved[spec.name]
    if typed & {"epochs", "max_steps"}:  # the length as given, in whichever spelling
        values["epochs"], values["max_steps"] = given.epochs, given.max_steps
    saved_data = {**DataSpec().to_dict(), **(record.get("data") or {})}
    data = {
        spec.name: getattr(given.data, spec.name)
        if DATA_FIELD_DESTS.get(spec.name, spec.name) in typed
        else saved_data[spec.name]
        for spec in dataclasses.fields(DataSpec)
    }
    return TrainConfig(**values, data=DataSpec(**data))


def _check_command_line(args: argparse.Namespace, config: TrainConfig) -> None:
    """Flag combinations argparse cannot express (:class:`UsageError`), and a run that would be overwritten."""
    if args.resume is False and args.epochs is None and args.max_steps is None:
        raise UsageError("one of the arguments --epochs --max-steps is required (unless --resume)")
    try:
        task, _ = resolve_task_model(config.task, config.model)
    except ValueError as error:
        raise UsageError(str(error)) from None
    check_dataset_task(config.data.kind, task)
    if args.resume is False:
        check_data_arguments(args, train=True)
        if latest_checkpoint(args.output_dir) is not None:
            raise FileExistsError(
                f"{args.output_dir} already holds a run with checkpoints; pass --resume to continue it, or choose "
                "another --output-dir"
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
    config = resumed_config(args, typed_flags(argv))
    _check_command_line(args, config)
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
