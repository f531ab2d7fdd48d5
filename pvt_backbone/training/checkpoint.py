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
renamed into place, and only then does ``latest.json`` move to it; older ones are pruned last (renamed hidden, then
deleted). An interrupted or killed save leaves ``latest.json`` on the previous complete checkpoint, and its debris is
cleared by the next save. Weights holding NaN or infinity are refused before anything is written; a full disk is
reported as ``OSError`` (``errno.ENOSPC``) naming the directory. Directories and files get the umask's usual modes.
``model.safetensors`` of a detector or segmenter also feeds ``load_weights(backbone, path)``, which picks out the
``backbone.body.`` PVTv2 tensors.
"""

from __future__ import annotations

import errno
import json
import re
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn

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
    "check_finite_weights",
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
_TEMP_PREFIX = ".tmp-"  # hidden directories of a save in progress or a prune; any left over are debris
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # what torch.save, safetensors and the file system raise


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


def check_finite_weights(model: nn.Module, *, step: int, hint: str = "") -> None:
    """Raise ``ValueError`` naming the first parameter or buffer of ``model`` that holds NaN or infinity.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> check_finite_weights(net, step=3)
        >>> with torch.no_grad():
        ...     net.bias[0] = float("nan")
        >>> check_finite_weights(net, step=3)
        Traceback (most recent call last):
        ...
        ValueError: cannot save step 3: bias holds 1 non-finite value of 2 (1 NaN); nothing was written
    """
    for name, tensor in model.state_dict().items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        bad, nan = int((~finite).sum()), int(torch.isnan(tensor).sum())
        raise ValueError(
            f"cannot save step {step}: {name} holds {bad} non-finite value{'s' if bad > 1 else ''} of "
            f"{tensor.numel()} ({nan} NaN); nothing was written{hint}"
        )


def _payload_bytes(value: Any) -> int:
    """Bytes of the tensors and byte strings in a (nested) value: about what writing it takes on disk."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_payload_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_payload_bytes(v) for v in value)
    return 0


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _out_of_space(error: BaseException, directory: Path, needed: int) -> bool:
    """Whether a failed write ran out of space: ENOSPC (or a quota), said in the text (safetensors), or, for an
    error without an errno (torch.save's ``unexpected pos`` after a short write), implied by the free space left."""
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    if "no space left" in text or "os error 28" in text:
        return True
    free = _free_bytes(directory) if code is None else None
    return free is not None and free < needed


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.0f} KiB"


def _unwritten(error: BaseException, root: Path, step: int, needed: int) -> BaseException:
    """The error a failed checkpoint write raises: a full disk as one clear ``OSError`` (``errno.ENOSPC``), any other
    write failure as an ``OSError`` naming the directory, on one line."""
    if not isinstance(error, _WRITE_ERRORS):
        return error  # Ctrl-C, a bug: as it is
    where = f"cannot write the checkpoint of step {step} in {root}"
    if _out_of_space(error, root, needed):
        full = OSError(
            f"{where}: no space left on device (the checkpoint needs about {_size(needed)}); nothing was written "
            "(latest.json is unchanged)"
        )
        full.errno = errno.ENOSPC
        return full
    if isinstance(error, OSError):
        return error
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return OSError(f"{where}: {lines[0] if lines else type(error).__name__}")


def _raise_unwritten(error: BaseException, root: Path, step: int, needed: int) -> NoReturn:
    failure = _unwritten(error, root, step, needed)
    if failure is error:
        raise error
    raise failure from error


def _fresh_directory(root: Path, name: str) -> Path:
    """A new hidden directory under ``root`` made with the umask's mode (``tempfile.mkdtemp`` would make it 0700)."""
    while True:
        candidate = root / f"{_TEMP_PREFIX}{name}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate


def _clear_debris(root: Path) -> None:
    """Remove what an interrupted save or prune left: hidden temp directories and pointer temp files."""
    for stale in root.glob(f"{_TEMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(f".{LATEST}.*"):
        stale.unlink(missing_ok=True)


def _unused_name(root: Path, step: int) -> str:
    name, suffix = f"step_{step:08d}", 1
    while (root / name).exists():  # saving one step twice (e.g. right after a resume) never overwrites
        name = f"step_{step:08d}-{suffix}"
        suffix += 1
    return name


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

    Raises:
        ValueError: a parameter or buffer holds NaN or infinity (nothing is written).
        OSError: a write failed; ``errno.ENOSPC`` and "no space left on device" when the disk is full. The
            previous checkpoint and ``latest.json`` are untouched.
    """
    check_finite_weights(model, step=step)
    root = Path(output_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    _clear_debris(root)
    name = _unused_name(root, step)
    needed = _payload_bytes(model.state_dict()) + _payload_bytes(dict(state))
    temp = _fresh_directory(root, name)
    try:
        metadata = {
            "pvt_backbone.step": str(step),
            **{f"pvt_backbone.{k}": str(v) for k, v in run.items() if isinstance(v, (str, int, float))},
        }
        save_model_weights(model, temp / WEIGHTS, metadata=metadata)
        atomic_write(temp / STATE, lambda path: torch.save(dict(state), path))
        _write_json(temp / RUN, run)
        temp.replace(root / name)
    except BaseException as error:
        shutil.rmtree(temp, ignore_errors=True)
        _raise_unwritten(error, root, step, needed)
    try:
        _write_json(root / LATEST, {"step": step, "name": name})
    except BaseException as error:  # the pointer stays on the previous checkpoint: drop the one it cannot name
        shutil.rmtree(root / name, ignore_errors=True)
        _raise_unwritten(error, root, step, needed)
    checkpoint = RunCheckpoint(root / name, step)
    for old in _step_dirs(root)[: -max(keep, 1)]:
        if old.directory != checkpoint.directory:
            _remove(old.directory)
    return checkpoint


def _remove(directory: Path) -> None:
    """Delete a checkpoint directory: hidden first, so a kill mid-delete leaves debris, not a half checkpoint."""
    hidden = directory.with_name(f"{_TEMP_PREFIX}prune-{directory.name}")
    try:
        directory.replace(hidden)
    except OSError:
        hidden = directory
    shutil.rmtree(hidden, ignore_errors=True)


def _load_failure(error: BaseException) -> str:
    """The one line that says why ``torch.load`` refused a file (its weights-only message spans many lines)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    return first.split(". ", 1)[0].rstrip(".")  # the reason, without torch's advice on allow-listing


def load_training_state(checkpoint: RunCheckpoint) -> dict[str, Any]:
    """The ``state.pt`` of a checkpoint (``torch.load(weights_only=True)``, on the CPU).

    Raises:
        CheckpointNotFound: there is no ``state.pt``.
        CheckpointError: it cannot be read (damaged, not a torch file, or a pickle that needs code); one line.
    """
    try:
        state = torch.load(checkpoint.state, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointNotFound(f"{checkpoint.state}: training state not found") from None
    except Exception as error:  # a truncated or foreign file
        raise CheckpointError(
            f"{checkpoint.state}: cannot read training state ({_load_failure(error)}); the file is damaged or was not "
            "written by save_checkpoint"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{checkpoint.state}: not a training state (holds a {type(state).__name__})")
    return state
