"""File I/O for weights and every other file the project writes: reading checkpoint files, and the one atomic writer.

* ``read_checkpoint``: the format is told by the first bytes, not the name: safetensors via
  ``safetensors.torch.load_file``; torch.save's formats via ``torch.load(weights_only=True)`` (a pickle that needs
  code is refused, naming its globals, unless ``trust_pickle=True``); a directory written by ``save_pretrained``;
  ``hf-hub:REPO[@REVISION]`` through ``huggingface_hub`` when installed. Nothing here interprets the keys
  (``pvt_backbone.weights.detect`` does).
* ``atomic_write``: write a temp file beside the target, fsync, rename; a failed write keeps the old file, a killed
  writer's temp file is removed by the next write, the mode follows the umask.

Example:
    >>> from safetensors.torch import save_file
    >>> save_file({"w": torch.zeros(2, 3)}, "w.safetensors", metadata={"note": "demo"})
    >>> checkpoint = read_checkpoint("w.safetensors")
    >>> checkpoint.source, tuple(checkpoint.content["w"].shape), dict(checkpoint.metadata), len(checkpoint.sha256)
    ('w.safetensors', (2, 3), {'note': 'demo'}, 64)
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .layouts import CheckpointError, Conversion

__all__ = ["WeightsSource", "HUB_PREFIX", "Checkpoint", "file_sha256", "read_checkpoint", "atomic_write"]

WeightsSource = str | os.PathLike | Mapping[str, Any]
"""A file path, a ``save_pretrained`` directory, ``"hf-hub:REPO[@REVISION]"``, or an in-memory checkpoint dict."""

HUB_PREFIX = "hf-hub:"  # a source naming a Hugging Face hub repository rather than a path


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as read: the raw (possibly nested) dict plus where it came from."""

    content: Mapping[str, Any]
    source: str  # file path, "hf-hub:..." or "<state dict>"
    sha256: str | None = None  # of the file; None for an in-memory dict
    metadata: Mapping[str, str] = field(default_factory=dict)  # safetensors header metadata

    def provenance(self, conversion: Conversion) -> dict[str, Any]:
        """Where the weights came from and how their keys were read: the fields load and inspect reports share."""
        return {
            "source": self.source,
            "sha256": self.sha256,
            "layout": conversion.layout,
            "prefix": conversion.prefix,
            "container": conversion.container,
            "metadata": dict(self.metadata),
        }


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_hub(spec: str) -> Path:
    repo, _, revision = spec[len(HUB_PREFIX) :].partition("@")
    if repo.count("/") != 1:
        raise CheckpointError(f"expected 'hf-hub:ORG/NAME[@REVISION]', got {spec!r}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise CheckpointError(f"{spec!r} needs huggingface_hub: pip install huggingface_hub") from exc
    try:
        return Path(hf_hub_download(repo, "model.safetensors", revision=revision or None))
    except Exception as exc:  # the hub raises many types (offline, not found, gated); all mean "not available"
        raise CheckpointError(f"cannot get model.safetensors of {spec!r} from the Hugging Face hub: {exc}") from exc


def _resolve_path(source: str | os.PathLike) -> Path:
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        return _resolve_hub(source)
    path = Path(source)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"weights directory {path} has no model.safetensors or pytorch_model.bin")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


# torch.save writes a zip archive; its legacy format starts with a protocol-2 pickle of this magic number, and the
# oldest one is a tar archive. A plain pickle.dump file starts with the PROTO opcode but is none of these.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_PICKLE_PROTO = b"\x80"
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")  # how torch's refusal names a global
_SHOWN_GLOBALS = 5


def _file_kind(path: Path) -> str:
    """What the first bytes say: ``safetensors``, ``zip`` / ``legacy`` / ``tar`` (torch.save), ``pickle`` or ``""``.

    safetensors starts with an 8-byte little-endian header length followed by a JSON object (``{``); the header
    must fit in the file.
    """
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_LEGACY_MAGIC):
        return "legacy"
    if head[257:262] == b"ustar":
        return "tar"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return "safetensors"
    return "pickle" if head.startswith(_PICKLE_PROTO) else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _not_a_checkpoint(path: Path, kind: str) -> CheckpointError:
    """Neither format: say what the bytes are not (a plain pickle is never unpickled: torch.load cannot read it)."""
    what = (
        "not a torch file but a plain Python pickle (pickle.dump, not torch.save), which torch.load cannot read; it "
        "was not unpickled"
        if kind == "pickle"
        else "not a torch file (torch.save writes a zip archive or, in its legacy format, a pickle with a magic "
        "number); is it truncated or corrupt?"
    )
    return CheckpointError(
        f"cannot read {path}: not a checkpoint: not safetensors (no 8-byte header length followed by a JSON header) "
        f"and {what}"
    )


def _unsafe_globals(path: Path, kind: str, error: BaseException) -> list[str]:
    """The globals (``module.name``) that made ``torch.load(weights_only=True)`` refuse ``path``; [] if none did."""
    found: list[str] = []
    if kind == "zip":
        try:
            found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except (RuntimeError, ValueError, OSError, EOFError, KeyError, pickle.UnpicklingError):
            found = []  # the archive itself is damaged
    return found or sorted(set(_GLOBAL_IN_MESSAGE.findall(str(error))))


def _read_torch(path: Path, kind: str, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        unsafe = [] if trust_pickle else _unsafe_globals(path, kind, exc)
        if unsafe:
            shown = ", ".join(unsafe[:_SHOWN_GLOBALS]) + (" ..." if len(unsafe) > _SHOWN_GLOBALS else "")
            raise CheckpointError(
                f"cannot read {path}: it is a pickle that needs Python code to load ({shown}), which "
                "torch.load(weights_only=True) refuses. Only if you trust where the file came from, opt in with "
                "trust_pickle=True and convert it to safetensors once"
            ) from None
        detail = " ".join(str(exc).partition("WeightsUnpickler error:")[2].split("Check the documentation")[0].split())
        raise CheckpointError(
            f"cannot read {path} as a torch file: {detail or _first_line(exc)} (is the file truncated or corrupt?)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"cannot read {path}: {_first_line(exc)} (is the file truncated or corrupt?)") from None


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        content = load_file(path, device="cpu")
        with safe_open(path, "pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc} (is the file truncated or corrupt?)") from None
    return content, metadata


def read_checkpoint(source: WeightsSource, *, trust_pickle: bool = False) -> Checkpoint:
    """Read a checkpoint onto the CPU without interpreting its keys.

    The format is told by the file's first bytes, whatever its name: safetensors -> ``load_file``; torch.save's zip
    or legacy format -> ``torch.load(weights_only=True)``; anything else (a plain pickle included) is refused unread,
    as not a checkpoint, or as a damaged safetensors file when it is named ``.safetensors``.

    Args:
        source: see ``WeightsSource``.
        trust_pickle: allow ``torch.load(weights_only=False)``, which can run code stored in the file.

    Raises:
        FileNotFoundError: no such file. CheckpointError: not a checkpoint, truncated, corrupt, or a pickle that needs
        code (naming its globals) without ``trust_pickle``.
    """
    if isinstance(source, Mapping):
        return Checkpoint(source, "<state dict>")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"weights must be a path, 'hf-hub:REPO', or a state dict, got {type(source).__name__}")
    path = _resolve_path(source)
    label = str(source) if str(source).startswith(HUB_PREFIX) else str(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read {path}: the file is empty (truncated or corrupt)")
    kind = _file_kind(path)
    if kind == "safetensors" or (not kind and path.suffix == ".safetensors"):  # named so: a damaged safetensors
        content, metadata = _read_safetensors(path)
    elif kind in ("zip", "legacy", "tar"):
        content, metadata = _read_torch(path, kind, trust_pickle), {}
    else:
        raise _not_a_checkpoint(path, kind)
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a state dict or checkpoint dict")
    return Checkpoint(content, label, file_sha256(path), metadata)


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


_TEMP_MIDDLE = re.compile(r"(\d+)\.[0-9a-f]{8,}")  # "<pid>.<random hex>" between ".<name>." and ".tmp<suffix>"


def _temp_path(target: Path) -> Path:
    """``.<name>.<pid>.<random>.tmp<suffix>`` beside ``target``: hidden, owned by this process, same suffix."""
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp{target.suffix}"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (signal 0 checks without signalling); unknown counts as alive."""
    if os.name != "posix":  # os.kill(pid, 0) is not a probe elsewhere
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _remove_dead_writers_temps(target: Path) -> None:
    """Delete temp files of ``target`` whose writer (the PID in the name) no longer runs: debris of a kill."""
    prefix, suffix = f".{target.name}.", f".tmp{target.suffix}"
    with os.scandir(target.parent) as entries:
        for entry in entries:
            name = entry.name
            if not (name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix)):
                continue
            match = _TEMP_MIDDLE.fullmatch(name[len(prefix) : len(name) - len(suffix)])
            if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
                Path(entry.path).unlink(missing_ok=True)


def _create_temp(target: Path) -> tuple[Path, int]:
    """Create a fresh temp file for ``target``; returns it and the mode the umask gives a new file (0o666 & ~umask).

    The kernel applies the umask to ``os.open``'s 0o666, so reading the new file's mode back gives the umask's
    effect without ``os.umask``'s process-wide set-and-restore.
    """
    while True:
        temp = _temp_path(target)
        try:
            handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return temp, os.fstat(handle).st_mode & 0o777
        finally:
            os.close(handle)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; elsewhere directories cannot be opened)."""
    if os.name != "posix":
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, mode: int | None = None) -> Path:
    """Call ``write(temp)`` for a temp file beside ``path``, fsync it, then rename it onto ``path``.

    If ``write`` raises, ``path`` keeps its previous content and the temp file is removed. The temp file is named
    ``.<name>.<pid>.<random>.tmp<suffix>``: it keeps ``path``'s suffix, for writers that choose the format by it
    (ONNX, torch.export), and carries the writer's PID, so a temp file left by a killed writer is removed by the
    next write of the same ``path`` once that PID no longer runs.

    Args:
        mode: permission bits of the written file; default ``0o666`` less the process umask, like ``open``.

    Raises:
        FileNotFoundError: ``path``'s directory does not exist.

    Example:
        >>> target = Path("note.txt")
        >>> atomic_write(target, lambda temp: temp.write_text("done")).read_text()
        'done'
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"output directory {target.parent} does not exist (writing {target.name})")
    _remove_dead_writers_temps(target)
    temp, default_mode = _create_temp(target)
    try:
        write(temp)
        with open(temp, "rb") as stream:
            os.fsync(stream.fileno())
        os.chmod(temp, default_mode if mode is None else mode)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)
    return target
