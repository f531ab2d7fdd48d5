"""The training loop: AdamW with warm-up and cosine or poly decay, gradient clipping, AMP, periodic evaluation,
JSON-lines logs, a loss-curve PNG, atomic checkpoints, exact resume, and DistributedDataParallel under torchrun.

One call does a whole run::

    result = train(TrainConfig(model="fasterrcnn", variant="b0", max_steps=300, output_dir="runs/x"))
    result.evals[-1]["bbox_mAP50"]

Under ``torchrun --nproc_per_node=N`` the same call runs one DDP replica per process (gloo on CPU, NCCL on GPU),
each on its own shard of every epoch; rank 0 alone prints, logs and writes. Resuming restores weights, optimizer,
scheduler, grad scaler, the position in the data stream and every rank's RNG, so the losses continue exactly as
in an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import (
    Checkpoint,
    atomic_write,
    latest_checkpoint,
    load_model_weights,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint,
)
from .data.transforms import (
    AugmentedDetection,
    AugmentedSegmentation,
    ResumableSampler,
    collate_detection,
    collate_segmentation,
)
from .distributed import DistInfo, barrier, cleanup_distributed, replica_digests, setup_distributed
from .tasks import (
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

__all__ = ["TrainConfig", "TrainResult", "WarmupDecay", "train", "plot_loss_curve", "read_log"]

LOG_FILE = "log.jsonl"
LOSS_PNG = "loss.png"


@dataclass
class TrainConfig:
    """Every knob of a run; ``tools/train.py`` maps its flags one to one onto these fields.

    Length: ``max_steps`` optimizer steps, or ``epochs`` passes over the training set (per-rank shard / batch size
    steps each). ``batch_size`` is per process. ``warmup_steps=None`` warms up over 5% of the run (at most 500).
    ``eval_every`` / ``save_every`` count steps (0: only at the end). ``resume``: ``True`` continues the latest
    checkpoint of ``output_dir``; a path continues that run or checkpoint.
    """

    output_dir: str
    task: str | None = None
    model: str | None = None
    variant: str = "b2"
    weights_backbone: str | None = None
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
    schedule: str = "cosine"
    min_lr_ratio: float = 0.01
    clip_grad: float = 1.0
    amp: bool = False
    sync_bn: bool = False
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    eval: bool = True
    eval_at_start: bool = False
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    keep_checkpoints: int = 2
    resume: bool | str = False
    progress: bool = True

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        resolve_task_model(self.task, self.model)
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("give exactly one of epochs (--epochs N) and max_steps (--max-steps N)")
        for name in ("epochs", "max_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        positive = {
            "batch_size": self.batch_size,
            "log_every": self.log_every,
            "keep_checkpoints": self.keep_checkpoints,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("eval_every", "save_every", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, clip_grad >= 0; got {self.lr}, {self.weight_decay}, {self.clip_grad}"
            )
        if self.schedule not in ("cosine", "poly"):
            raise ValueError(f"schedule must be 'cosine' or 'poly', got {self.schedule!r}")
        if self.sync_bn and self.head_norm not in ("default", "bn"):
            raise ValueError(f"sync_bn synchronises BatchNorm; it cannot be combined with head_norm={self.head_norm!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainResult:
    """What a run produced: the trained (bare) model, its spec, every evaluation, the last checkpoint."""

    model: nn.Module
    spec: ModelSpec
    steps: int
    evals: list[dict[str, Any]]
    checkpoint: Checkpoint | None
    seconds: float


class WarmupDecay:
    """LR factor per step: linear warm-up from ``warmup_start`` to 1 over ``warmup`` steps, then cosine or poly
    (power 0.9) decay to ``min_ratio`` at ``total`` steps. A callable object, so ``LambdaLR.state_dict`` keeps it.

    >>> f = WarmupDecay(total=100, warmup=10, kind="cosine", min_ratio=0.0)
    >>> round(f(0), 3), f(10), round(f(55), 3), f(100)
    (0.001, 1.0, 0.5, 0.0)
    """

    def __init__(self, *, total: int, warmup: int, kind: str, min_ratio: float, warmup_start: float = 1e-3) -> None:
        self.total, self.warmup, self.kind = total, warmup, kind
        self.min_ratio, self.warmup_start = min_ratio, warmup_start

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_start + (1 - self.warmup_start) * step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            decay = (1 - progress) ** 0.9
        return self.min_ratio + (1 - self.min_ratio) * decay


def _describe(schedule: WarmupDecay) -> str:
    return (
        f"(total {schedule.total} steps, warm-up {schedule.warmup}, {schedule.kind}, min lr ratio {schedule.min_ratio})"
    )


# -- logging -------------------------------------------------------------------------------------------------------
def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` (a torn last line from a crash is skipped)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class _Log:
    """Rank 0's JSON-lines log; on resume it drops records after the resumed step, so the file reads as one run."""

    def __init__(self, path: Path, *, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_log(path) if r.get("step", 0) <= resume_step]
            atomic_write(path, lambda temp: temp.write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")


def plot_loss_curve(records: list[dict[str, Any]], path: str | Path, *, metrics: Sequence[str] = ()) -> None:
    """Training loss per step (raw and smoothed) and, on a second axis, each of ``metrics`` at every evaluation
    that logged it; written as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        smooth, acc = [], losses[0]
        for value in losses:
            acc = 0.9 * acc + 0.1 * value
            smooth.append(acc)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        ax.plot(steps, smooth, color="tab:blue", linewidth=2, label="loss (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    curves = [(m, [r for r in records if m in r.get("eval", {})]) for m in metrics]
    curves = [(m, evals) for m, evals in curves if evals]
    if curves:
        twin = ax.twinx()
        for (metric, evals), colour in zip(curves, ("tab:orange", "tab:green", "tab:red", "tab:purple")):
            steps = [r["step"] for r in evals]
            twin.plot(steps, [r["eval"][metric] for r in evals], "o-", color=colour, label=f"val {metric}")
        twin.set_ylabel("validation metric")
        twin.set_ylim(0, 1)
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        ax.legend(handles, labels, loc="center right")
    fig.tight_layout()
    atomic_write(path, lambda temp: fig.savefig(temp, format="png"))
    plt.close(fig)


# -- RNG state -----------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    """This process's RNG states as plain Python values (bytes, ints, lists): picklable across ranks and loadable
    with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return state


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_byte_tensor(state["torch"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_byte_tensor(state["cuda"]))


def _all_rng_states(info: DistInfo) -> list[dict[str, Any]]:
    mine = _rng_state()
    if not info.distributed:
        return [mine]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


# -- the run -------------------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _average(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of each value over ranks (one small all-reduce)."""
    if not info.distributed:
        return values
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(packed)
    return dict(zip(keys, (packed / info.world_size).tolist()))


def _autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def _find_resume(config: TrainConfig) -> Checkpoint | None:
    if config.resume is False or config.resume is None:
        if latest_checkpoint(config.output_dir) is not None:
            raise FileExistsError(
                f"{config.output_dir} already holds a run with checkpoints; pass --resume to continue it, or choose "
                "another --output-dir"
            )
        return None
    if config.resume is True:
        checkpoint = latest_checkpoint(config.output_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"{config.output_dir}: nothing to resume (no checkpoints/latest.json)")
        return checkpoint
    return resolve_checkpoint(config.resume)


def train(config: TrainConfig, *, on_eval: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Run a training job; see the module docstring. ``on_eval(step, metrics)`` is called on every rank."""
    config.check()
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = setup_distributed(config.device)
    try:
        return _run(config, info, on_eval)
    finally:
        if owns_group:
            cleanup_distributed()


def _run(config: TrainConfig, info: DistInfo, on_eval: Callable | None) -> TrainResult:
    started = time.perf_counter()
    task, model_name = resolve_task_model(config.task, config.model)
    output_dir = Path(config.output_dir)
    resume_from = _find_resume(config)
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
    if resume_from is not None:
        saved = resume_from.run_info().get("model")
        if saved is not None and ModelSpec.from_dict(saved) != spec:
            raise ValueError(
                f"{resume_from.directory}: cannot resume, the checkpoint's model {saved} differs from "
                f"this run's {spec.to_dict()}"
            )

    if config.sync_bn and info.distributed and info.device.type != "cuda":
        raise ValueError(
            "--sync-bn needs GPUs: torch's SyncBatchNorm runs on CUDA only; on CPU leave it off (the heads then use "
            "their default GroupNorm, which needs no synchronisation)"
        )
    _seed_everything(config.seed)
    model = build_model(spec, weights_backbone=config.weights_backbone, trainable_stages=config.trainable_stages)
    if config.sync_bn and info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(info.device)

    from ..optim import param_groups

    groups = param_groups(
        model, lr=config.lr, weight_decay=config.weight_decay, backbone_lr_mult=config.backbone_lr_mult
    )
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    sampler_probe = ResumableSampler(len(train_set), rank=info.rank, world_size=info.world_size, seed=config.seed)
    per_epoch = steps_per_epoch(sampler_probe.samples_per_epoch, config.batch_size)
    total = config.max_steps if config.max_steps is not None else config.epochs * per_epoch
    warmup = config.warmup_steps if config.warmup_steps is not None else min(500, max(1, total // 20))
    schedule = WarmupDecay(total=total, warmup=min(warmup, total), kind=config.schedule, min_ratio=config.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(info.device.type, enabled=config.amp and info.device.type == "cuda")

    start_step = 0
    if resume_from is not None:
        load_model_weights(model, resume_from.weights)
        state = load_training_state(resume_from)
        if state.get("world_size") != info.world_size or state.get("batch_size") != config.batch_size:
            raise ValueError(
                f"{resume_from.state}: saved with {state.get('world_size')} process(es) x batch size "
                f"{state.get('batch_size')}, resumed with {info.world_size} x {config.batch_size}; "
                "exact resume needs the same"
            )
        optimizer.load_state_dict(state["optimizer"])
        requested = WarmupDecay(**vars(schedule))
        scheduler.load_state_dict(state["scheduler"])  # writes the saved fields into ``schedule``
        if vars(schedule) != vars(requested):
            raise ValueError(
                f"{resume_from.state}: saved with the schedule {_describe(schedule)}, resumed with "
                f"{_describe(requested)}; "
                "exact resume needs the same max steps/epochs, warm-up, schedule and min lr ratio "
                "(to train longer, start a new run from this run's weights)"
            )
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"][info.rank])
        start_step = int(state["step"])

    wrapped: nn.Module = model
    if info.distributed:
        # PVTv2's depthwise convs produce channels-last gradients; DDP copies them into its buckets and says so once
        # per rank. Correctness is unaffected, so the note is silenced.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    if task == "segmentation":
        train_view = AugmentedSegmentation(train_set, size=spec.image_size)
        collate = collate_segmentation
    else:
        train_view = AugmentedDetection(train_set)
        collate = collate_detection
    sampler = ResumableSampler(
        len(train_set),
        rank=info.rank,
        world_size=info.world_size,
        seed=config.seed,
        start=start_step * config.batch_size,
    )
    loader = DataLoader(
        train_view,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),  # worker seeds never touch the global RNG
        persistent_workers=False,
    )

    log: _Log | None = None
    run_info = {"model": spec.to_dict(), "data": config.data.to_dict(), "train": _train_fields(config)}
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(output_dir / "run.json", lambda p: p.write_text(json.dumps(run_info, indent=2) + "\n"))
        log = _Log(output_dir / LOG_FILE, resume_step=start_step if resume_from is not None else None)
    evals: list[dict[str, Any]] = []

    def run_eval(step: int) -> None:
        metrics = evaluate(
            wrapped,
            val_set,
            spec,
            device=info.device,
            batch_size=config.batch_size,
            amp=config.amp,
            progress=config.progress and info.is_main,
        )
        evals.append({"step": step, **metrics})
        if log is not None:
            log.write({"step": step, "eval": metrics})
            summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            _print(info, f"step {step}: {summary}")
        if on_eval is not None:
            on_eval(step, metrics)

    if val_set is not None and config.eval_at_start and start_step == 0:
        run_eval(0)

    progress = None
    if config.progress and info.is_main:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=start_step, desc="train", dynamic_ncols=True, unit="step")
    checkpoint = resume_from
    trainable = [p for p in model.parameters() if p.requires_grad]
    images_per_step = config.batch_size * info.world_size
    wrapped.train()
    batches = iter(loader)
    step = start_step
    try:
        for step in range(start_step + 1, total + 1):
            tick = time.perf_counter()
            batch = next(batches)
            with _autocast(info.device, config.amp):
                loss, parts = training_loss(wrapped, task, batch, info.device)
            finite = torch.isfinite(loss.detach()).to(torch.int32)
            if info.distributed:  # every rank stops together; one rank raising alone leaves the others waiting
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite.item():
                if torch.isfinite(loss):
                    raise FloatingPointError(f"the loss is not finite on another process at step {step}")
                detail = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step} ({detail}); lower --lr, keep --clip-grad on, "
                    "or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            grad_norm = None
            if config.clip_grad > 0:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.clip_grad))
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            values = _average({"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}, info)
            seconds = time.perf_counter() - tick
            if progress is not None:
                progress.set_postfix(
                    loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_step / seconds:.1f}"
                )
                progress.update(1)
            if log is not None and (step % config.log_every == 0 or step == total or step == start_step + 1):
                record = {
                    "step": step,
                    "epoch": round(step / per_epoch, 4),
                    **values,
                    "lr": lr,
                    "images_per_s": round(images_per_step / seconds, 3),
                }
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                log.write(record)
            if val_set is not None and config.eval_every and step % config.eval_every == 0 and step != total:
                run_eval(step)
            if (config.save_every and step % config.save_every == 0) or step == total:
                checkpoint = _save(output_dir, step, model, optimizer, scheduler, scaler, config, info, run_info)
        if info.distributed and total > start_step:
            digests = replica_digests(model, info)  # DDP keeps replicas identical; prove it before anyone relies on it
            if log is not None:
                log.write({"step": total, "replicas": {"world_size": info.world_size, "param_sha256": digests}})
            if len(set(digests)) != 1:
                raise RuntimeError(f"DDP replicas diverged: parameter digests per rank {digests}")
        if val_set is not None and total > start_step:
            run_eval(total)
    finally:
        if progress is not None:
            progress.close()
    if info.is_main and log is not None:
        plot_loss_curve(read_log(log.path), output_dir / LOSS_PNG, metrics=plotted_metrics(task))
    barrier()
    return TrainResult(model, spec, step, evals, checkpoint, time.perf_counter() - started)


def _train_fields(config: TrainConfig) -> dict[str, Any]:
    fields = asdict(config)
    fields.pop("data")
    return fields


def _save(output_dir, step, model, optimizer, scheduler, scaler, config, info, run_info) -> Checkpoint | None:
    rng = _all_rng_states(info)  # every rank takes part
    checkpoint = None
    if info.is_main:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,
            "world_size": info.world_size,
            "batch_size": config.batch_size,
        }
        checkpoint = save_checkpoint(
            output_dir, step=step, model=model, state=state, run=run_info, keep=config.keep_checkpoints
        )
    barrier()
    return checkpoint if info.is_main else latest_checkpoint(output_dir)


def _print(info: DistInfo, message: str) -> None:
    if info.is_main:
        from tqdm import tqdm

        tqdm.write(message)
