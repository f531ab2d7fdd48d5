"""Training checkpoints that a crash or Ctrl-C mid-save cannot corrupt.

A run directory holds::

    checkpoints/
        latest.json                 {"step": 300, "name": "step_00000300"}   <- the only pointer; replaced atomically
        step_00000200/ ...          the previous checkpoint, kept until a newer one is complete
        step_00000300/
            model.safetensors       every model tensor under its own state-dict key (our native layout)
            state.pt                optimizer, scheduler, grad scaler, step, per-rank RNG states
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "Checkpoint",
    "CheckpointNotFound",
    "atomic_write",
    "save_checkpoint",
    "latest_checkpoint",
    "resolve_checkpoint",
    "save_model_weights",
    "load_model_weights",
    "load_training_state",
]

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
RUN = "run.json"
_STEP_DIR = re.compile(r"^step_(\d{8})(?:-(\d+))?$")


class CheckpointNotFound(FileNotFoundError):
    """No complete checkpoint where one was expected."""


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint directory and the step it was taken at."""

    directory: Path
    step: int

    @property
    def weights(self) -> Path:
        return self.directory / WEIGHTS

    @property
    def state(self) -> Path:
        return self.directory / STATE

    @property
    def run(self) -> Path:
        return self.directory / RUN

    def run_info(self) -> dict[str, Any]:
        """The ``run.json`` written with the checkpoint (empty if there is none, e.g. a bare weights file)."""
        return json.loads(self.run.read_text()) if self.run.is_file() else {}


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temp)`` for a temp file next to ``path``, flush it to disk, then ``os.replace`` it onto ``path``.

    If ``write`` raises (or the process dies) the temp file is removed (or left as a hidden ``.*.tmp``) and
    ``path`` keeps its previous content.
    """
    path = Path(path)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(handle)
    try:
        write(Path(temp))
        with open(temp, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write(path, lambda temp: temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def save_model_weights(model: nn.Module, path: str | Path, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write every tensor of ``model.state_dict()`` under its own key to a safetensors file, atomically."""
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors sharing memory
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    header = {"format": "pt", "pvt_backbone.layout": "native", **(metadata or {})}
    atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=header))


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load a file written by ``save_model_weights`` into ``model``: every key must match in name and shape.

    Raises ``ValueError`` (model untouched) on a missing, unexpected or mis-shaped key, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFound(f"{path}: weights file not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: cannot read safetensors file ({error})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or mismatched:
        parts = [
            f"{label} {len(keys)} ({', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched))
            if keys
        ]
        raise ValueError(
            f"{path}: weights do not fit this {type(model).__name__}: {'; '.join(parts)}. Build the model with the "
            "task, model, variant and class count of the run that wrote them (see run.json next to the file)"
        )
    model.load_state_dict(tensors, strict=True)


def _step_dirs(root: Path) -> list[Checkpoint]:
    found = []
    for entry in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / WEIGHTS).is_file() and (entry / STATE).is_file():
            found.append(Checkpoint(entry, int(match.group(1))))
    return sorted(found, key=lambda c: (c.directory.stat().st_mtime_ns, c.step))  # oldest written first


def latest_checkpoint(output_dir: str | Path) -> Checkpoint | None:
    """The checkpoint ``checkpoints/latest.json`` points at, or None when the run has none yet."""
    root = Path(output_dir) / CHECKPOINT_DIR
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    try:
        data = json.loads(pointer.read_text())
        checkpoint = Checkpoint(root / data["name"], int(data["step"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{pointer}: unreadable checkpoint pointer ({error})") from None
    if not (checkpoint.weights.is_file() and checkpoint.state.is_file()):
        raise CheckpointNotFound(f"{pointer} points at {checkpoint.directory}, which is incomplete or gone")
    return checkpoint


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """A run directory (its latest checkpoint), a checkpoint directory, or a ``model.safetensors`` file."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors weights file, a checkpoint directory or a run directory")
        match = _STEP_DIR.match(path.parent.name)
        return Checkpoint(path.parent, int(match.group(1)) if match else 0)
    if (path / WEIGHTS).is_file():
        match = _STEP_DIR.match(path.name)
        return Checkpoint(path, int(match.group(1)) if match else 0)
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
) -> Checkpoint:
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
    checkpoint = Checkpoint(root / name, step)
    for old in _step_dirs(root)[: -max(keep, 1)]:
        if old.directory != checkpoint.directory:
            shutil.rmtree(old.directory, ignore_errors=True)
    return checkpoint


def load_training_state(checkpoint: Checkpoint) -> dict[str, Any]:
    """The ``state.pt`` of a checkpoint (``torch.load(weights_only=True)``, on the CPU)."""
    try:
        return torch.load(checkpoint.state, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointNotFound(f"{checkpoint.state}: training state not found") from None
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{checkpoint.state}: cannot read training state ({error})") from None
