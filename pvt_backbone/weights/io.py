"""File I/O for weights and every other file the project writes: reading checkpoint files, and the one atomic writer.

* ``read_checkpoint``: ``.safetensors`` via ``safetensors.torch.load_file``; ``.pth/.pt/.bin/.ckpt`` via
  ``torch.load(weights_only=True)`` (a pickle that needs code is refused unless ``trust_pickle=True``); a directory
  written by ``save_pretrained``; ``hf-hub:REPO[@REVISION]`` through ``huggingface_hub`` when installed. Nothing here
  interprets the keys (``pvt_backbone.weights.detect`` does).
* ``atomic_write``: write a temp file beside the target, fsync, rename; a failed write keeps the old file.

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
import tempfile
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
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


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


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    if path.suffix in _TORCH_SUFFIXES:
        return False
    with open(path, "rb") as handle:  # safetensors: 8-byte little-endian header size, then a JSON object
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_torch(path: Path, trust_pickle: bool) -> Any:
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read {path}: the file is empty (truncated or corrupt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if trust_pickle or "Weights only load failed" not in text:
            raise CheckpointError(
                f"cannot read {path}: {_first_line(exc)} (is the file truncated or corrupt?)"
            ) from None
        detail = " ".join(text.partition("WeightsUnpickler error:")[2].split("Check the documentation")[0].split())
        if detail.startswith("Unsupported global"):
            what = detail.partition("GLOBAL")[2].partition(" was not")[0].strip()
            raise CheckpointError(
                f"{path} is a pickle that needs Python code ({what}) to load, which torch.load(weights_only=True) "
                "refuses. Only if you trust where the file came from, opt in with trust_pickle=True and convert it "
                "to safetensors once"
            ) from None
        raise CheckpointError(
            f"cannot read {path} with torch.load(weights_only=True): {detail or _first_line(exc)}. The file is "
            "truncated or corrupt, or a pickle with code; if you trust it, try trust_pickle=True"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {_first_line(exc)} (is the file truncated or corrupt?)") from None


def read_checkpoint(source: WeightsSource, *, trust_pickle: bool = False) -> Checkpoint:
    """Read a checkpoint onto the CPU without interpreting its keys.

    Args:
        source: see ``WeightsSource``. ``.safetensors`` (or a safetensors header) -> ``load_file``; anything else ->
            ``torch.load(weights_only=True)``.
        trust_pickle: allow ``torch.load(weights_only=False)``, which can run code stored in the file.

    Raises:
        FileNotFoundError: no such file. CheckpointError: unreadable, truncated, corrupt or refused pickle.
    """
    if isinstance(source, Mapping):
        return Checkpoint(source, "<state dict>")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"weights must be a path, 'hf-hub:REPO', or a state dict, got {type(source).__name__}")
    path = _resolve_path(source)
    label = str(source) if str(source).startswith(HUB_PREFIX) else str(path)
    if _is_safetensors(path):
        try:
            content = load_file(path, device="cpu")
            with safe_open(path, "pt") as handle:
                metadata = dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read {path} as safetensors: {exc} (is the file truncated or corrupt?)"
            ) from None
    else:
        content, metadata = _read_torch(path, trust_pickle), {}
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a state dict or checkpoint dict")
    return Checkpoint(content, label, file_sha256(path), metadata)


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, mode: int = 0o644) -> Path:
    """Call ``write(temp)`` for a temp file beside ``path``, fsync it, then rename it onto ``path``.

    If ``write`` raises (or the process dies), ``path`` keeps its previous content and the temp file is removed (or
    left as a hidden ``.<name>.*.tmp`` after a kill). The temp file keeps ``path``'s suffix, for writers that choose
    the format by it (ONNX, torch.export).

    Raises:
        FileNotFoundError: ``path``'s directory does not exist.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "note.txt"
        >>> atomic_write(target, lambda temp: temp.write_text("done")).read_text()
        'done'
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"output directory {target.parent} does not exist (writing {target.name})")
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        with open(temp, "rb") as stream:
            os.fsync(stream.fileno())
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target
