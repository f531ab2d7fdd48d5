"""The training loop: AdamW with warm-up and cosine, poly or step decay, gradient clipping, AMP, periodic evaluation,
JSON-lines logs (and TensorBoard scalars when asked), a loss-curve PNG, atomic checkpoints, exact resume, and
DistributedDataParallel under torchrun.

One call does a whole run::

    result = train(TrainConfig(model="fasterrcnn", variant="b0", max_steps=300, output_dir="runs/x"))
    result.evals[-1]["bbox_mAP50"]

Under ``torchrun --nproc_per_node=N`` the same call runs one DDP replica per process (gloo on CPU, NCCL on GPU),
each on its own shard of every epoch; rank 0 alone prints, logs and writes. Resuming restores weights, optimizer,
scheduler, grad scaler, the position in the data stream and every rank's RNG, so the losses continue exactly as
in an uninterrupted run.

A run is: set up (model, data, optimizer, schedule, resume state), then per step: one training step, logging,
periodic evaluation and checkpointing; then finishing (replica check, final evaluation, loss curve).
"""

from __future__ import annotations

import json
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..amp import autocast
from ..checks import check_choice, check_float, check_int
from ..optim import param_groups
from ..weights.io import atomic_write
from ..weights.layouts import CheckpointError
from .checkpoint import (
    RunCheckpoint,
    check_finite_weights,
    latest_checkpoint,
    load_run_weights,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint,
)
from .data.grouping import GroupedBatchSampler, aspect_ratio_groups, dataset_image_sizes
from .data.protocol import training_view
from .data.transforms import ResumableSampler
from .distributed import (
    DEFAULT_TIMEOUT,
    DEVICES,
    DistInfo,
    barrier,
    cleanup_distributed,
    replica_digests,
    setup_distributed,
)
from .logs import LOG_FILE, LOSS_PNG, RunLog, plot_loss_curve, read_log
from .rng import gather_rng_states, seed_everything, set_rng_state
from .schedule import DEFAULT_GAMMA, MILESTONE_UNITS, SCHEDULES, WARMUP_START, LRSchedule, milestone_steps
from .tasks import (
    HEAD_NORMS,
    DataSpec,
    ModelSpec,
    build_datasets,
    build_model,
    evaluate,
    plotted_metrics,
    resolve_task_model,
    steps_per_epoch,
    training_loss,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "SettingsError",
    "TrainingInterrupted",
    "DEFAULT_SAVE_EVERY",
    "BOARD_DIR",
    "train",
    "plot_loss_curve",
    "read_log",
]

_OnEval = Callable[[int, dict[str, Any]], None]  # on_eval(step, metrics)

# Integer fields and their least allowed value; the optional ones may also be None.
_INT_MINIMUMS: dict[str, int | None] = {
    "epochs": 1,
    "max_steps": 1,
    "batch_size": 1,
    "warmup_steps": 0,
    "eval_every": 0,
    "save_every": 0,
    "log_every": 1,
    "keep_checkpoints": 1,
    "workers": 0,
    "seed": 0,  # numpy generators take no negative seed
}
_OPTIONAL_INTS = ("epochs", "max_steps", "warmup_steps")
DEFAULT_SAVE_EVERY = 500  # steps between checkpoints unless told: an interruption then loses at most this many
BOARD_DIR = "tensorboard"  # TensorBoard event files, under output_dir

# What a resume keeps (TrainConfig's docstring): fields compared with the run being resumed, one by one ...
_RESUME_COMPARED = (
    "task",
    "model",
    "variant",
    "weights_backbone",
    "init_from",
    "trainable_stages",
    "head_norm",
    "model_options",
    "data",
    "batch_size",
    "lr",
    "weight_decay",
    "backbone_lr_mult",
    "clip_grad",
    "amp",
    "sync_bn",
    "seed",
    "device",
)
# ... fields compared through the LR schedule they resolve to ...
_RESUME_SCHEDULED = (
    "epochs",
    "max_steps",
    "warmup_steps",
    "warmup_ratio",
    "schedule",
    "min_lr_ratio",
    "milestones",
    "milestone_unit",
    "gamma",
)
# ... and fields free to change: where the run writes, how often it reports, evaluates and saves, how it loads data.
_RESUME_MAY_DIFFER = (
    "output_dir",
    "resume",
    "workers",
    "eval",
    "eval_at_start",
    "eval_every",
    "save_every",
    "log_every",
    "keep_checkpoints",
    "progress",
    "dist_timeout",
    "tensorboard",
    "recipe",
)
# What a state.pt must hold to be resumed (its "schedule" is checked with the settings).
_STATE_KEYS = ("step", "optimizer", "scheduler", "scaler", "rng", "world_size")


class SettingsError(ValueError):
    """A setting this run cannot use: it differs from the run being resumed, or this machine cannot run it.

    ``settings`` are the parameter spellings the message names (``"resume=True"``, ``"lr"``, ``"data.seed"``), so
    a command line can word them as its flags.
    """

    def __init__(self, message: str, *, settings: tuple[str, ...]) -> None:
        super().__init__(message)
        self.settings = settings


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM after ``step``, with a checkpoint of that step (``checkpoint``, None on
    ranks other than 0); ``signal_number`` is the signal that stopped it."""

    def __init__(self, step: int, checkpoint: RunCheckpoint | None, signal_number: int) -> None:
        where = checkpoint.directory if checkpoint is not None else "saved by rank 0"
        super().__init__(f"interrupted at step {step}; checkpoint: {where}; continue with resume=True")
        self.step = step
        self.checkpoint = checkpoint
        self.signal_number = signal_number


@dataclass
class TrainConfig:
    """Every knob of a run; ``pvt-train`` (``pvt_backbone.cli.train``) maps its flags one to one onto these fields.

    Length: ``max_steps`` optimizer steps, or ``epochs`` passes over the training set (per-rank shard / batch size
    steps each). ``batch_size`` is per process. ``warmup_steps=None`` warms up over 5% of the run (at most 500).
    ``eval_every`` / ``save_every`` count steps (0: only at the end; checkpoints default to every
    ``DEFAULT_SAVE_EVERY`` steps and the last). ``resume``: ``True`` continues the latest checkpoint of
    ``output_dir``; a path continues that run or checkpoint. ``init_from`` starts a new run (step 0, fresh optimizer)
    from a whole trained model: a run directory (its latest checkpoint), a checkpoint directory or a
    ``model.safetensors``; the model these settings build must fit it key for key. The LR warms up linearly over
    ``warmup_steps`` from ``warmup_ratio`` times each group's LR, then decays (``LRSchedule``): ``"cosine"`` or
    ``"poly"`` to ``min_lr_ratio`` times it (None: 0.01), or ``"step"``: times ``gamma`` at each of ``milestones``
    (torch's ``MultiStepLR``), counted in ``milestone_unit`` (``"epochs"``: epoch ``e`` is step ``e`` times the
    run's steps per epoch, so the LR drops from the first step after ``e`` epochs; ``"steps"``: optimizer steps).
    ``tensorboard=True`` also writes the scalars of ``log.jsonl`` (loss parts, lr, numeric eval metrics) to
    ``output_dir/tensorboard`` (rank 0; needs the ``tensorboard`` package). ``recipe`` is a record of the named
    recipe the settings came from (``pvt_backbone.training.recipes``), kept in ``run.json``; it changes nothing.
    ``dist_timeout``: seconds a collective waits for the other processes under torchrun before failing (a hung rank
    then stops the run instead of keeping the others waiting). ``sync_bn=True`` needs CUDA.

    SIGINT or SIGTERM during the steps (in the main thread) lets the current step finish, checkpoints it and raises
    :class:`TrainingInterrupted`; under torchrun the ranks agree on the stop after every step, so all save the same
    step. A second SIGINT stops at once (the last complete checkpoint stays the latest).

    A resume continues the run exactly, so it refuses (:class:`SettingsError`, naming the setting and both values)
    any difference in what changes the run: the model (``task``, ``model``, ``variant``, ``weights_backbone``,
    ``init_from``, ``trainable_stages``, ``head_norm``, ``model_options``), every field of ``data`` (``image_size``
    as resolved), the optimizer (``batch_size``, ``lr``, ``weight_decay``, ``backbone_lr_mult``, ``clip_grad``),
    ``amp``, ``sync_bn``, ``seed``, the device type ``device`` resolves to, the process count, and the LR schedule
    that ``epochs`` or ``max_steps``, ``warmup_steps``, ``warmup_ratio``, ``schedule``, ``min_lr_ratio``,
    ``milestones``, ``milestone_unit`` and ``gamma`` resolve to (the length may be spelled either way if the steps
    agree; a longer run is a new run from the weights). Free to differ, and recorded as given: ``output_dir``,
    ``resume``, ``workers`` (augmentation does not depend on it), ``eval``, ``eval_at_start``, ``eval_every``,
    ``save_every``, ``log_every``, ``keep_checkpoints``, ``progress``, ``dist_timeout``, ``tensorboard`` and
    ``recipe``.

    Example:
        >>> TrainConfig(output_dir="runs/x", max_steps=100, lr=float("inf")).check()
        Traceback (most recent call last):
        ...
        ValueError: lr must be a finite number > 0.0, got inf
    """

    output_dir: str
    task: str | None = None
    model: str | None = None
    variant: str = "b2"
    weights_backbone: str | None = None
    init_from: str | None = None
    trainable_stages: int = 4
    head_norm: str = "default"
    model_options: dict[str, Any] = field(default_factory=dict)
    data: DataSpec = field(default_factory=DataSpec)
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 2
    lr: float = 2e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 1.0
    warmup_steps: int | None = None
    warmup_ratio: float = WARMUP_START
    schedule: str = "cosine"
    min_lr_ratio: float | None = None
    milestones: tuple[int, ...] = ()
    milestone_unit: str = "epochs"
    gamma: float = DEFAULT_GAMMA
    clip_grad: float = 1.0
    amp: bool = False
    sync_bn: bool = False
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    eval: bool = True
    eval_at_start: bool = False
    eval_every: int = 0
    save_every: int = DEFAULT_SAVE_EVERY
    log_every: int = 10
    keep_checkpoints: int = 2
    resume: bool | str = False
    progress: bool = True
    dist_timeout: float = DEFAULT_TIMEOUT
    tensorboard: bool = False
    recipe: dict[str, Any] | None = None

    def check(self) -> None:
        """Raise ``ValueError`` (``TypeError`` for a value of the wrong type) naming the first bad setting."""
        resolve_task_model(self.task, self.model)
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError(
                f"give exactly one of epochs and max_steps, got epochs={self.epochs!r}, max_steps={self.max_steps!r}"
            )
        for name, minimum in _INT_MINIMUMS.items():
            value = getattr(self, name)
            if value is not None or name not in _OPTIONAL_INTS:
                check_int(name, value, minimum=minimum)
        check_int("trainable_stages", self.trainable_stages, minimum=0, maximum=4)
        check_float("lr", self.lr, minimum=0.0, inclusive=False)
        check_float("backbone_lr_mult", self.backbone_lr_mult, minimum=0.0, inclusive=False)
        check_float("weight_decay", self.weight_decay, minimum=0.0)
        check_float("clip_grad", self.clip_grad, minimum=0.0)
        check_float("dist_timeout", self.dist_timeout, minimum=0.0, inclusive=False)
        check_choice("schedule", self.schedule, SCHEDULES)
        self._check_schedule()
        check_choice("head_norm", self.head_norm, HEAD_NORMS)
        check_choice("device", self.device, DEVICES)
        if self.init_from is not None and self.weights_backbone is not None:
            raise ValueError(
                f"init_from={self.init_from!r} loads the whole model, backbone included; leave weights_backbone unset"
            )
        if self.sync_bn and self.head_norm not in ("default", "bn"):
            raise ValueError(f"sync_bn synchronises BatchNorm; it cannot be combined with head_norm={self.head_norm!r}")

    def _check_schedule(self) -> None:
        """The warm-up and decay settings: each belongs to the schedules that use it."""
        check_float("warmup_ratio", self.warmup_ratio, minimum=0.0, maximum=1.0, inclusive=False)
        if self.warmup_ratio == 1.0:
            raise ValueError("warmup_ratio must be < 1 (1 is no warm-up: set warmup_steps=0), got 1.0")
        check_choice("milestone_unit", self.milestone_unit, MILESTONE_UNITS)
        if self.schedule != "step":
            if self.min_lr_ratio is not None:
                check_float("min_lr_ratio", self.min_lr_ratio, minimum=0.0, maximum=1.0)
            if len(self.milestones) or self.gamma != DEFAULT_GAMMA:
                raise ValueError(
                    f"milestones and gamma belong to schedule='step', got schedule={self.schedule!r} with "
                    f"milestones={list(self.milestones)}, gamma={self.gamma}"
                )
            return
        if not len(self.milestones):
            raise ValueError("schedule must be 'cosine', 'poly', or 'step' with milestones; got 'step' and none")
        if self.min_lr_ratio not in (None, 0):
            raise ValueError(
                f"min_lr_ratio belongs to schedule='cosine' and 'poly'; a step schedule decays by gamma at its "
                f"milestones, got min_lr_ratio={self.min_lr_ratio}"
            )
        milestone_steps(self.milestones, unit=self.milestone_unit, steps_per_epoch=1)  # positive ints
        LRSchedule(
            total=max(self.milestones), warmup=0, kind="step", milestones=tuple(self.milestones), gamma=self.gamma
        )


@dataclass
class TrainResult:
    """What a run produced: the trained (bare) model, its spec, every evaluation, the last checkpoint."""

    model: nn.Module
    spec: ModelSpec
    steps: int
    evals: list[dict[str, Any]]
    checkpoint: RunCheckpoint | None
    seconds: float


@dataclass
class _Run:
    """What the loop carries from set-up to finish. ``model`` is the bare model, ``wrapped`` what trains (the DDP
    wrapper under torchrun, else the model itself); ``step`` the last step taken; ``log`` exists on rank 0 only."""

    config: TrainConfig
    info: DistInfo
    spec: ModelSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    train_set: Any
    val_set: Any
    per_epoch: int
    on_eval: _OnEval | None
    start_step: int = 0
    step: int = 0
    checkpoint: RunCheckpoint | None = None
    wrapped: nn.Module = field(init=False)
    trainable: list[nn.Parameter] = field(init=False)
    log: RunLog | None = None
    progress: Any = None  # rank 0's tqdm bar, when config.progress
    board: Any = None  # rank 0's TensorBoard SummaryWriter, when config.tensorboard
    evals: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.wrapped = self.model
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def total(self) -> int:
        return self.schedule.total

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def images_per_step(self) -> int:
        return self.config.batch_size * self.info.world_size

    def run_info(self) -> dict[str, Any]:
        """What ``run.json`` holds: the model spec, the data spec and every other training field."""
        fields = asdict(self.config)
        fields.pop("data")
        return {"model": self.spec.to_dict(), "data": self.config.data.to_dict(), "train": fields}


@dataclass(frozen=True)
class _StepStats:
    """One training step: loss and its parts (mean over ranks), the LR it used, its gradient norm, its time."""

    values: dict[str, float]
    lr: float
    grad_norm: float | None
    seconds: float


def train(config: TrainConfig, *, on_eval: _OnEval | None = None) -> TrainResult:
    """Run a training job; see the module docstring. ``on_eval(step, metrics)`` is called on every rank."""
    config.check()
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = setup_distributed(config.device, timeout=config.dist_timeout)
    try:
        _check_machine(config, info)
        return _run(config, info, on_eval)
    finally:
        if owns_group:
            cleanup_distributed()


def _run(config: TrainConfig, info: DistInfo, on_eval: _OnEval | None) -> TrainResult:
    started = time.perf_counter()
    run = _set_up(config, info, on_eval)
    if run.val_set is not None and config.eval_at_start and run.start_step == 0:
        _evaluate(run, 0)
    run.progress = _progress_bar(run)
    try:
        with _StopRequest() as stop:
            _steps(run, stop)
        _finish(run)
    finally:
        if run.progress is not None:
            run.progress.close()
        if run.board is not None:
            run.board.close()
    _plot(run)
    barrier()
    return TrainResult(run.model, run.spec, run.step, run.evals, run.checkpoint, time.perf_counter() - started)


def _steps(run: _Run, stop: _StopRequest) -> None:
    """Every step from where the run stands to its end; a stop request checkpoints the step reached and raises."""
    batches = iter(_train_loader(run))
    for step in range(run.start_step + 1, run.total + 1):
        run.step = step
        stats = _train_step(run, batches)
        _report(run, stats)
        _evaluate_and_save(run)
        number = stop.agreed(run.info)
        if number:
            if run.checkpoint is None or run.checkpoint.step != run.step:
                run.checkpoint = _save(run)
            _plot(run)
            raise TrainingInterrupted(run.step, run.checkpoint if run.info.is_main else None, number)


def _plot(run: _Run) -> None:
    if run.log is not None:
        plot_loss_curve(read_log(run.log.path), run.output_dir / LOSS_PNG, metrics=plotted_metrics(run.task))


class _StopRequest:
    """SIGINT and SIGTERM while the steps run (main thread only): the first asks the loop to stop after the current
    step; a second SIGINT interrupts at once. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signal_number = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, number: int, frame: object) -> None:
        if self.signal_number and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = self.signal_number or number

    def agreed(self, info: DistInfo) -> int:
        """The signal any rank received (0: none): one small all-reduce under torchrun, so every rank stops after
        the same step and takes part in its checkpoint."""
        if not info.distributed:
            return self.signal_number
        flag = torch.tensor([self.signal_number], dtype=torch.int64, device=info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


# -- set-up --------------------------------------------------------------------------------------------------------
def _check_machine(config: TrainConfig, info: DistInfo) -> None:
    """Refuse what this machine cannot run, before anything is read or written."""
    if config.sync_bn and info.device.type != "cuda":
        raise SettingsError(
            f"sync_bn=True needs CUDA: torch's SyncBatchNorm does not run on the {info.device.type.upper()}, in one "
            "process or many; leave it off there (the heads keep their default norms: GroupNorm in the segmentation "
            "heads, none in the detectors' FPN)",
            settings=("sync_bn=True",),
        )


def _set_up(config: TrainConfig, info: DistInfo, on_eval: _OnEval | None) -> _Run:
    """Model, data, optimizer, schedule and, when resuming, the saved state (checked against these settings first);
    then the run's files on rank 0."""
    task, model_name = resolve_task_model(config.task, config.model)
    resume_from, state = _resume_point(config, info)
    train_set, val_set = build_datasets(config.data, task, val=config.eval)
    spec = ModelSpec.for_dataset(
        task,
        model_name,
        config.variant,
        train_set,
        image_size=config.data.resolved_image_size,
        head_norm="bn" if config.sync_bn else config.head_norm,
        options=dict(config.model_options),
    )
    probe = ResumableSampler(len(train_set), rank=info.rank, world_size=info.world_size, seed=config.seed)
    per_epoch = steps_per_epoch(probe.samples_per_epoch, config.batch_size)
    schedule = _schedule(config, per_epoch)
    if resume_from is not None:
        _check_same_schedule(config, resume_from, state, schedule)
        _check_same_model(config, resume_from, spec)
    model = _build_model(config, info, spec)
    optimizer = _build_optimizer(config, model)
    scaler = torch.amp.GradScaler(info.device.type, enabled=config.amp and info.device.type == "cuda")
    run = _Run(
        config=config,
        info=info,
        spec=spec,
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        scheduler=schedule.scheduler(optimizer),
        scaler=scaler,
        train_set=train_set,
        val_set=val_set,
        per_epoch=per_epoch,
        on_eval=on_eval,
    )
    if resume_from is not None:
        run.start_step = run.step = _restore(run, resume_from, state)
        run.checkpoint = resume_from
    run.wrapped = _wrap_ddp(model, info)
    run.log = _open_outputs(run, resumed=resume_from is not None)
    run.board = _open_board(run, resumed=resume_from is not None)
    return run


def _schedule(config: TrainConfig, per_epoch: int) -> LRSchedule:
    """The run's LR schedule in steps: its length, and milestones in epochs, at ``per_epoch`` steps an epoch."""
    total = config.max_steps if config.max_steps is not None else config.epochs * per_epoch
    return LRSchedule.for_run(
        total=total,
        warmup_steps=config.warmup_steps,
        kind=config.schedule,
        min_ratio=config.min_lr_ratio,
        warmup_start=config.warmup_ratio,
        milestones=milestone_steps(config.milestones, unit=config.milestone_unit, steps_per_epoch=per_epoch),
        gamma=config.gamma,
    )


def _find_resume(config: TrainConfig) -> RunCheckpoint | None:
    """The checkpoint ``config.resume`` names; refuses to start over a run that has checkpoints."""
    if config.resume is False or config.resume is None:
        if latest_checkpoint(config.output_dir) is not None:
            raise FileExistsError(
                f"{config.output_dir} already holds a run with checkpoints; pass resume=True to continue it, or "
                "choose another output_dir"
            )
        return None
    if config.resume is True:
        checkpoint = latest_checkpoint(config.output_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"{config.output_dir}: nothing to resume (no checkpoints/latest.json)")
        return checkpoint
    return resolve_checkpoint(config.resume)


def _resume_point(config: TrainConfig, info: DistInfo) -> tuple[RunCheckpoint | None, dict[str, Any]]:
    """The checkpoint to continue and its training state, once the state is readable and the settings match."""
    checkpoint = _find_resume(config)
    if checkpoint is None:
        return None, {}
    state = load_training_state(checkpoint)
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{checkpoint.state}: not a training state this trainer can resume (it lacks {', '.join(missing)})"
        )
    _check_same_settings(config, info, checkpoint, state)
    return checkpoint, state


def _resume_label(config: TrainConfig) -> str:
    return "resume=True" if config.resume is True else f"resume={str(config.resume)!r}"


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _mismatch(config: TrainConfig, differences: list[tuple[str, str, str]], hint: str = "") -> SettingsError:
    """One line naming the first differing setting with both values (already worded), then the others by name."""
    label = _resume_label(config)
    name, here, saved = differences[0]
    message = f"{label}: {name} is {here} here but {saved} in the run being resumed"
    others = [other for other, _, _ in differences[1:]]
    if others:
        message += f"; {_and(others)} differ{'s' if len(others) == 1 else ''} too"
    return SettingsError(message + hint, settings=(label, name, *others))


def _config_defaults() -> dict[str, Any]:
    defaults = {}
    for spec in fields(TrainConfig):
        if spec.default is not MISSING:
            defaults[spec.name] = spec.default
        elif spec.default_factory is not MISSING:
            defaults[spec.name] = spec.default_factory()
    return defaults


def _compared_values(train: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The compared settings of a run (``_RESUME_COMPARED``, ``data`` field by field as ``data.<field>``), from its
    training and data fields as ``run.json`` stores them; a field the record lacks counts as its default. JSON
    values, so a config and its ``run.json`` copy compare equal."""
    train = {**_config_defaults(), **train}
    data = {**DataSpec().to_dict(), **data}
    known = {spec.name for spec in fields(DataSpec)}
    values: dict[str, Any] = {}
    for name in _RESUME_COMPARED:
        if name == "data":
            values.update({f"data.{key}": data[key] for key in known})
            values["data.image_size"] = DataSpec(**{key: data[key] for key in known}).resolved_image_size
        elif name != "device":  # compared as the device type it resolved to, from the training state
            values[name] = train[name]
    values["task"], values["model"] = resolve_task_model(train["task"], train["model"])
    return json.loads(json.dumps(values))


def _check_same_settings(config: TrainConfig, info: DistInfo, checkpoint: RunCheckpoint, state: dict) -> None:
    """Refuse a resume whose settings differ from the checkpoint's run in anything that changes the run."""
    record = checkpoint.run_info()
    if "train" not in record:
        raise CheckpointError(
            f"{checkpoint.run}: holds no record of the run's settings, so a resume cannot check them; start a new "
            "run from its weights"
        )
    here = _compared_values({**asdict(config), "data": None}, config.data.to_dict())
    saved = _compared_values(record["train"], record.get("data") or {})
    here["device"], saved["device"] = info.device.type, state.get("device", info.device.type)
    here["world_size"], saved["world_size"] = info.world_size, state["world_size"]
    differences = [(name, repr(here[name]), repr(saved[name])) for name in here if here[name] != saved[name]]
    if differences:
        raise _mismatch(config, differences)


def _check_same_schedule(config: TrainConfig, checkpoint: RunCheckpoint, state: dict, requested: LRSchedule) -> None:
    """Refuse a resume whose LR schedule differs from the saved one (each part named by the setting behind it)."""
    if "schedule" not in state:
        raise CheckpointError(
            f"{checkpoint.state}: holds no LR schedule record, so it cannot be resumed exactly; start a new run from "
            "its weights"
        )
    saved = LRSchedule.from_dict(state["schedule"])
    # Each part of the schedule is named by the setting behind it; the length in steps, however it was spelled.
    words = {"total": "max_steps" if config.max_steps is not None else "epochs", "warmup": "warmup_steps"}
    words.update(kind="schedule", min_ratio="min_lr_ratio", warmup_start="warmup_ratio")
    here, there = requested.to_dict(), saved.to_dict()
    keys = [*here, *(key for key in there if key not in here)]  # milestones and gamma exist for step alone
    differences = [
        (words.get(key, key), repr(here.get(key)), repr(there.get(key)))
        for key in keys
        if here.get(key) != there.get(key)
    ]
    longer = requested.total != saved.total
    if longer:  # "total" comes first
        steps = f"{requested.total} steps"
        differences[0] = (
            words["total"],
            steps if config.max_steps else f"{config.epochs} ({steps})",
            f"{saved.total} steps",
        )
    if differences:
        raise _mismatch(
            config, differences, "; to train longer or shorter, start a new run from its weights" if longer else ""
        )


def _check_same_model(config: TrainConfig, checkpoint: RunCheckpoint, spec: ModelSpec) -> None:
    """The model these settings build must be the saved one (the classes come from the data files' contents)."""
    saved = checkpoint.run_info().get("model")
    if saved is not None and ModelSpec.from_dict(saved) != spec:
        raise _mismatch(config, [("model_spec", str(spec.to_dict()), str(saved))])


def _build_model(config: TrainConfig, info: DistInfo, spec: ModelSpec) -> nn.Module:
    """The seeded model on this rank's device (SyncBatchNorm under torchrun with ``sync_bn``)."""
    seed_everything(config.seed)
    model = build_model(spec, weights_backbone=config.weights_backbone, trainable_stages=config.trainable_stages)
    if config.init_from is not None:
        source = resolve_checkpoint(config.init_from)
        load_run_weights(model, source.weights)
        _print(info, f"init_from: loaded the whole model ({len(model.state_dict())} tensors) from {source.weights}")
    elif config.weights_backbone is not None:
        _print(info, f"weights_backbone: {_load_summary(model, config.weights_backbone)}")
    if config.sync_bn and info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(info.device)


def _load_summary(model: nn.Module, source: str) -> str:
    """The first line of the backbone's load report, where the builder kept one (``load_report``)."""
    for module in model.modules():
        report = getattr(module, "load_report", None)
        if report is not None and hasattr(report, "summary"):
            return report.summary().splitlines()[0]
    return f"loaded the backbone from {source}"


def _build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(
        model, lr=config.lr, weight_decay=config.weight_decay, backbone_lr_mult=config.backbone_lr_mult
    )
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _restore(run: _Run, checkpoint: RunCheckpoint, state: dict[str, Any]) -> int:
    """Load a checkpoint's weights and training state into the run; the step it was taken at."""
    load_run_weights(run.model, checkpoint.weights)
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][run.info.rank])
        return int(state["step"])
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as error:
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise CheckpointError(
            f"{checkpoint.state}: the training state does not fit this run ({reason}); it was written for another "
            "model or by another version"
        ) from None


def _wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    if not info.distributed:
        return model
    # PVTv2's depthwise convs produce channels-last gradients; DDP copies them into its buckets and says so once per
    # rank. Correctness is unaffected, so the note is silenced.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _train_loader(run: _Run) -> DataLoader:
    """Augmented training batches from where the run stands (``start_step`` batches in); with
    ``data.group_aspect_ratio`` every batch holds images of one aspect-ratio group."""
    view, collate = training_view(run.train_set, run.task, run.config.data, run.spec.image_size)
    shard = {"rank": run.info.rank, "world_size": run.info.world_size, "seed": run.config.seed}
    batching: dict[str, Any]
    if run.config.data.group_aspect_ratio:
        groups = aspect_ratio_groups(dataset_image_sizes(run.train_set))
        batching = {
            "batch_sampler": GroupedBatchSampler(
                groups, batch_size=run.config.batch_size, start=run.start_step, **shard
            )
        }
    else:
        start = run.start_step * run.config.batch_size
        batching = {
            "batch_size": run.config.batch_size,
            "sampler": ResumableSampler(len(run.train_set), start=start, **shard),
        }
    return DataLoader(
        view,
        **batching,
        num_workers=run.config.workers,
        collate_fn=collate,
        pin_memory=run.info.device.type == "cuda",
        generator=torch.Generator().manual_seed(run.config.seed),  # worker seeds never touch the global RNG
        persistent_workers=False,
    )


def _open_outputs(run: _Run, *, resumed: bool) -> RunLog | None:
    """Rank 0 writes ``run.json`` and opens the log (trimmed to the resumed step); other ranks write nothing."""
    if not run.info.is_main:
        return None
    run.output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(run.run_info(), indent=2) + "\n"
    atomic_write(run.output_dir / "run.json", lambda temp: temp.write_text(text))
    return RunLog(run.output_dir / LOG_FILE, resume_step=run.start_step if resumed else None)


def _open_board(run: _Run, *, resumed: bool) -> Any:
    """Rank 0's TensorBoard writer in ``output_dir/tensorboard`` (``tensorboard=True``); a resumed run's events after
    the resumed step are purged, as its log's records are."""
    if not (run.config.tensorboard and run.info.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # lazily: an optional dependency
    except ImportError as error:
        raise ImportError(f"tensorboard=True needs the tensorboard package ({error})") from None
    return SummaryWriter(str(run.output_dir / BOARD_DIR), purge_step=run.start_step + 1 if resumed else None)


def _board_scalars(run: _Run, step: int, prefix: str, values: dict[str, Any]) -> None:
    """The numeric values of a log record as ``<prefix>/<name>`` scalars at ``step`` (lists such as per-class IoU
    stay in ``log.jsonl``)."""
    if run.board is None:
        return
    for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            run.board.add_scalar(f"{prefix}/{name}", value, step)
    run.board.flush()


def _progress_bar(run: _Run) -> Any:
    if not (run.config.progress and run.info.is_main):
        return None
    return tqdm(total=run.total, initial=run.start_step, desc="train", dynamic_ncols=True, unit="step")


# -- one step ------------------------------------------------------------------------------------------------------
def _train_step(run: _Run, batches: Iterator[Any]) -> _StepStats:
    """Forward, backward, clip, optimizer and scheduler step on the next batch (its loading time included)."""
    tick = time.perf_counter()
    batch = next(batches)
    with autocast(run.info.device, enabled=run.config.amp):
        loss, parts = training_loss(run.wrapped, run.task, batch, run.info.device)
    _check_finite(loss, parts, run.step, run.info)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    grad_norm = None
    if run.config.clip_grad > 0:
        run.scaler.unscale_(run.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.trainable, run.config.clip_grad))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    values = _average({"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}, run.info)
    return _StepStats(values, lr, grad_norm, time.perf_counter() - tick)


def _check_finite(loss: Tensor, parts: dict[str, Tensor], step: int, info: DistInfo) -> None:
    """Raise ``FloatingPointError`` on every rank when the loss is not finite on any."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if info.distributed:  # every rank stops together; one rank raising alone leaves the others waiting
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item():
        return
    if torch.isfinite(loss):
        raise FloatingPointError(f"the loss is not finite on another process at step {step}")
    detail = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
    raise FloatingPointError(
        f"loss is {loss.item()} at step {step} ({detail}); lower lr, keep clip_grad > 0, or check the data"
    )


def _average(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of each value over ranks (one small all-reduce)."""
    if not info.distributed:
        return values
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(packed)
    return dict(zip(keys, (packed / info.world_size).tolist()))


# -- logging, evaluation, checkpoints ------------------------------------------------------------------------------
def _report(run: _Run, stats: _StepStats) -> None:
    """Advance the progress bar; log the step every ``log_every`` steps, at the first and at the last."""
    step, images_per_s = run.step, run.images_per_step / stats.seconds
    if run.progress is not None:
        run.progress.set_postfix(loss=f"{stats.values['loss']:.4f}", lr=f"{stats.lr:.2e}", img_s=f"{images_per_s:.1f}")
        run.progress.update(1)
    if run.log is None or not (step % run.config.log_every == 0 or step in (run.total, run.start_step + 1)):
        return
    record = {
        "step": step,
        "epoch": round(step / run.per_epoch, 4),
        **stats.values,
        "lr": stats.lr,
        "images_per_s": round(images_per_s, 3),
    }
    if stats.grad_norm is not None:
        record["grad_norm"] = stats.grad_norm
    run.log.write(record)
    _board_scalars(run, step, "train", record)


def _evaluate_and_save(run: _Run) -> None:
    """Evaluate every ``eval_every`` steps (the last step's evaluation is the final one); checkpoint every
    ``save_every`` steps and at the last."""
    step, config = run.step, run.config
    if run.val_set is not None and config.eval_every and step % config.eval_every == 0 and step != run.total:
        _evaluate(run, step)
    if (config.save_every and step % config.save_every == 0) or step == run.total:
        run.checkpoint = _save(run)


def _evaluate(run: _Run, step: int) -> None:
    metrics = evaluate(
        run.wrapped,
        run.val_set,
        run.spec,
        device=run.info.device,
        batch_size=run.config.batch_size,
        amp=run.config.amp,
        progress=run.config.progress and run.info.is_main,
    )
    run.evals.append({"step": step, **metrics})
    if run.log is not None:
        run.log.write({"step": step, "eval": metrics})
        _board_scalars(run, step, "eval", metrics)
        summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        _print(run.info, f"step {step}: {summary}")
    if run.on_eval is not None:
        run.on_eval(step, metrics)


def _save(run: _Run) -> RunCheckpoint | None:
    """Checkpoint the current step (every rank takes part; rank 0 writes)."""
    # Every rank checks its replica (DDP keeps them equal), so all stop together rather than rank 0 alone.
    check_finite_weights(run.model, step=run.step, hint="; lower lr, or keep clip_grad > 0")
    rng = gather_rng_states(run.info)
    checkpoint = None
    if run.info.is_main:
        state = {
            "step": run.step,
            "optimizer": run.optimizer.state_dict(),
            "schedule": run.schedule.to_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": rng,
            "world_size": run.info.world_size,
            "batch_size": run.config.batch_size,
            "device": run.info.device.type,
        }
        checkpoint = save_checkpoint(
            run.output_dir,
            step=run.step,
            model=run.model,
            state=state,
            run=run.run_info(),
            keep=run.config.keep_checkpoints,
        )
    barrier()
    return checkpoint if run.info.is_main else latest_checkpoint(run.output_dir)


# -- finishing -----------------------------------------------------------------------------------------------------
def _finish(run: _Run) -> None:
    """After the last step (when this call trained any): check that DDP replicas agree, then evaluate."""
    if run.total <= run.start_step:
        return
    if run.info.distributed:
        digests = replica_digests(run.model, run.info)  # DDP keeps replicas identical; prove it before use
        if run.log is not None:
            run.log.write({"step": run.total, "replicas": {"world_size": run.info.world_size, "param_sha256": digests}})
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP replicas diverged: parameter digests per rank {digests}")
    if run.val_set is not None:
        _evaluate(run, run.total)


def _print(info: DistInfo, message: str) -> None:
    if info.is_main:
        tqdm.write(message)
