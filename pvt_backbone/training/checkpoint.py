"""Training checkpoints that a crash or Ctrl-C mid-save cannot corrupt.

A run directory holds::

    checkpoints/
        latest.json                 {"step": 300, "name": "step_00000300"}   <- the only pointer; replaced atomically
        step_00000200/ ...          the previous checkpoint, kept until a newer one is complete
        step_00000300/
            model.safetensors       the whole model's state dict, key for key (header: pvt_backbone.kind = model)
            state.pt                optimizer, LR schedule and scheduler, grad scaler, step, per-rank RNG states
            run.json                what rebuilds the model (task, model, variant, classes, image size)

A checkpoint is first written in full into a hidden temp directory (each file itself temp-then-``os.replace``),
renamed into place, and only then does ``latest.json`` move to it; older ones are pruned last. An interrupted save
leaves ``latest.json`` on the previous complete checkpoint. ``model.safetensors`` of a detector or segmenter also
feeds ``load_weights(backbone, path)``, which picks out the ``backbone.body.`` PVTv2 tensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..weights.io import atomic_write
from ..weights.layouts import CheckpointError
from ..weights.load import load_model_weights
from ..weights.save import safetensors_ready

__all__ = [
    "RunCheckpoint",
    "CheckpointNotFound",
    "CHECKPOINT_DIR",
    "LATEST",
    "WEIGHTS",
    "STATE",
    "RUN",
    "MODEL_KIND",
    "save_checkpoint",
    "latest_checkpoint",
    "resolve_checkpoint",
    "save_model_weights",
    "load_run_weights",
    "load_training_state",
]

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
RUN = "run.json"
MODEL_KIND = "model"  # ``pvt_backbone.kind`` of a whole-model weights file (keys as in the model's state dict)
_STEP_DIR = re.compile(r"^step_(\d{8})(?:-(\d+))?$")


class CheckpointNotFound(FileNotFoundError):
    """No complete checkpoint where one was expected."""


@dataclass(frozen=True)
class RunCheckpoint:
    """A saved training step: a complete checkpoint directory and the step it was taken at."""

    directory: Path
    step: int

    @property
    def weights(self) -> Path:
        """The ``model.safetensors`` file."""
        return self.directory / WEIGHTS

    @property
    def state(self) -> Path:
        """The ``state.pt`` file (optimizer, scheduler, scaler, step, RNG states)."""
        return self.directory / STATE

    @property
    def run(self) -> Path:
        """The ``run.json`` file."""
        return self.directory / RUN

    def run_info(self) -> dict[str, Any]:
        """The ``run.json`` written with the checkpoint (empty if there is none, e.g. a bare weights file)."""
        return json.loads(self.run.read_text()) if self.run.is_file() else {}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write(path, lambda temp: temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def save_model_weights(model: nn.Module, path: str | Path, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write every tensor of ``model.state_dict()`` under its own key to a safetensors file, atomically.

    The header metadata says what the keys are: ``pvt_backbone.kind = "model"`` and ``pvt_backbone.model_class``
    (e.g. ``"FasterRCNN"``), then ``metadata``. A detector's or segmenter's file still feeds
    ``load_weights(backbone, path)``, which picks out the PVTv2 tensors by their keys.

    Example:
        >>> from safetensors import safe_open
        >>> save_model_weights(nn.Linear(2, 3), "linear.safetensors", metadata={"pvt_backbone.step": "7"})
        >>> with safe_open("linear.safetensors", "pt") as handle:
        ...     header = handle.metadata()
        >>> for key in sorted(header):
        ...     print(key, "=", header[key])
        format = pt
        pvt_backbone.kind = model
        pvt_backbone.model_class = Linear
        pvt_backbone.step = 7
    """
    tensors = safetensors_ready(model.state_dict())
    header = {
        "format": "pt",
        "pvt_backbone.kind": MODEL_KIND,
        "pvt_backbone.model_class": type(model).__name__,
        **(metadata or {}),
    }
    atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=header))


def load_run_weights(model: nn.Module, path: str | Path) -> None:
    """Load a file written by ``save_model_weights`` into ``model``: every key must match in name and shape.

    Files of any header (``pvt_backbone.kind = "model"``, or the older ``pvt_backbone.layout = "native"``) load
    alike: only the tensors count.

    Raises:
        CheckpointNotFound: ``path`` is not a file.
        CheckpointError: (a ``ValueError``; the model is untouched) the file is unreadable, or a key is missing,
            unexpected or mis-shaped; the message names the file and says how to build a model that fits.

    Example:
        >>> save_model_weights(nn.Linear(2, 3), "linear.safetensors")
        >>> load_run_weights(nn.Linear(2, 3), "linear.safetensors")
        >>> load_run_weights(nn.Linear(2, 4), "linear.safetensors")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pvt_backbone.weights.layouts.CheckpointError: cannot load linear.safetensors into Linear:
        ...
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFound(f"{path}: weights file not found")
    hint = (
        f"build the model with the task, model, variant and class count of the run that wrote the file "
        f"(see {RUN} next to it)"
    )
    load_model_weights(model, path, hint=hint)


def _step_dirs(root: Path) -> list[RunCheckpoint]:
    found = []
    for entry in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / WEIGHTS).is_file() and (entry / STATE).is_file():
            found.append(RunCheckpoint(entry, int(match.group(1))))
    return sorted(found, key=lambda c: (c.directory.stat().st_mtime_ns, c.step))  # oldest written first


def latest_checkpoint(output_dir: str | Path) -> RunCheckpoint | None:
    """The checkpoint ``checkpoints/latest.json`` points at, or None when the run has none yet.

    Raises:
        ValueError: the pointer is unreadable.
        CheckpointNotFound: it points at a checkpoint that is incomplete or gone.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    try:
        data = json.loads(pointer.read_text())
        checkpoint = RunCheckpoint(root / data["name"], int(data["step"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{pointer}: unreadable checkpoint pointer ({error})") from None
    if not (checkpoint.weights.is_file() and checkpoint.state.is_file()):
        raise CheckpointNotFound(f"{pointer} points at {checkpoint.directory}, which is incomplete or gone")
    return checkpoint


def resolve_checkpoint(path: str | Path) -> RunCheckpoint:
    """A run directory (its latest checkpoint), a checkpoint directory, or a ``model.safetensors`` file."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors weights file, a checkpoint directory or a run directory")
        match = _STEP_DIR.match(path.parent.name)
        return RunCheckpoint(path.parent, int(match.group(1)) if match else 0)
    if (path / WEIGHTS).is_file():
        match = _STEP_DIR.match(path.name)
        return RunCheckpoint(path, int(match.group(1)) if match else 0)
    if path.is_dir():
        checkpoint = latest_checkpoint(path)
        if checkpoint is not None:
            return checkpoint
        raise CheckpointNotFound(f"{path}: no checkpoint in this run directory (no {CHECKPOINT_DIR}/{LATEST})")
    raise CheckpointNotFound(f"{path}: no such file or directory")


def save_checkpoint(
    output_dir: str | Path,
    *,
    step: int,
    model: nn.Module,
    state: Mapping[str, Any],
    run: Mapping[str, Any],
    keep: int = 2,
) -> RunCheckpoint:
    """Write the checkpoint of ``step`` under ``output_dir/checkpoints`` and point ``latest.json`` at it.

    Args:
        model: the bare model (not the DDP wrapper); its state-dict keys are the file's keys.
        state: picklable training state (tensors, numbers, strings, lists, dicts), loaded back with
            ``torch.load(weights_only=True)``.
        run: JSON-serialisable description that rebuilds the model.
        keep: complete checkpoints to keep (the ``keep`` written last; at least 1).
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:08d}"
    suffix = 1
    while (root / name).exists():  # saving one step twice (e.g. right after a resume) never overwrites
        name = f"step_{step:08d}-{suffix}"
        suffix += 1
    temp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        metadata = {
            "pvt_backbone.step": str(step),
            **{f"pvt_backbone.{k}": str(v) for k, v in run.items() if isinstance(v, (str, int, float))},
        }
        save_model_weights(model, temp / WEIGHTS, metadata=metadata)
        atomic_write(temp / STATE, lambda path: torch.save(dict(state), path))
        _write_json(temp / RUN, run)
        os.replace(temp, root / name)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _write_json(root / LATEST, {"step": step, "name": name})
    checkpoint = RunCheckpoint(root / name, step)
    for old in _step_dirs(root)[: -max(keep, 1)]:
        if old.directory != checkpoint.directory:
            shutil.rmtree(old.directory, ignore_errors=True)
    return checkpoint


def load_training_state(checkpoint: RunCheckpoint) -> dict[str, Any]:
    """The ``state.pt`` of a checkpoint (``torch.load(weights_only=True)``, on the CPU)."""
    try:
        return torch.load(checkpoint.state, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointNotFound(f"{checkpoint.state}: training state not found") from None
    except Exception as error:  # a truncated or foreign file
        raise CheckpointError(f"{checkpoint.state}: cannot read training state ({error})") from None
