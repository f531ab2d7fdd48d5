"""Saving PVTv2 weights as safetensors in any key layout, atomically, with provenance in the header metadata.

Example:
    >>> report = save_weights(pvt_v2_b0(), "b0_hf.safetensors", layout="hf", dtype="bfloat16")
    >>> report.layout, report.variant, report.num_tensors, report.metadata["pvt_backbone.dtype"]
    ('hf', 'b0', 194, 'bfloat16')
    >>> sorted(read_checkpoint("b0_hf.safetensors").metadata)[:3]
    ['format', 'pvt_backbone.dtype', 'pvt_backbone.layout']
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..version import __version__
from .detect import infer_architecture
from .io import HUB_PREFIX, Checkpoint, WeightsSource, atomic_write, file_sha256
from .layouts import CheckpointError, DroppedKey, from_native
from .load import LoadReport

__all__ = ["DTYPES", "SaveReport", "save_weights", "write_safetensors", "safetensors_ready"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SaveReport:
    """What ``save_weights`` wrote."""

    path: Path
    layout: str
    variant: str | None
    num_tensors: int
    dropped: tuple[DroppedKey, ...]
    notes: tuple[str, ...]
    metadata: Mapping[str, str]


def safetensors_ready(tensors: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """What safetensors can write: on the CPU, optionally cast (floating tensors), contiguous, none sharing memory."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        if tensor.is_meta:
            raise ValueError(f"{key} is on the meta device; materialise the model before saving")
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
    return DTYPES[dtype]


def _source_fields(source: WeightsSource | LoadReport | Checkpoint | None) -> dict[str, str]:
    """Provenance metadata: the source's file name (or hub id) and, for a file, its SHA-256."""
    if source is None:
        return {}
    if isinstance(source, (LoadReport, Checkpoint)):
        name, digest = source.source, source.sha256
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name, digest = (path.name, file_sha256(path)) if path.is_file() else (str(source), None)
    elif isinstance(source, Mapping):
        return {"pvt_backbone.source": "<state dict>"}
    else:
        raise TypeError(f"source must be a path, state dict, LoadReport or Checkpoint, got {type(source).__name__}")
    fields = {"pvt_backbone.source": Path(name).name if not name.startswith(HUB_PREFIX) else name}
    if digest:
        fields["pvt_backbone.source_sha256"] = digest
    return fields


def write_safetensors(
    native: Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    layout: str,
    dtype: torch.dtype | str | None = None,
    source: WeightsSource | LoadReport | Checkpoint | None = None,
    variant: str | None = None,
) -> SaveReport:
    """Write a native state dict to ``path`` in ``layout``: ``save_weights`` for a state dict, plus ``variant``.

    Args:
        variant: the variant recorded in the metadata, already checked by the caller; default: inferred from the
            shapes (``"unknown"`` when they fit no single table variant).
    """

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"output {path} must end with .safetensors (weights are written as safetensors)")
    torch_dtype = _dtype(dtype)
    if variant is None:
        try:
            variant = infer_architecture(native).variant
        except CheckpointError:
            variant = None
    conversion = from_native(native, layout)
    tensors = safetensors_ready(conversion.state_dict, torch_dtype)
    metadata = {
        "format": "pt",  # transformers refuses safetensors files without it
        "pvt_backbone.layout": conversion.layout,
        "pvt_backbone.variant": variant or "unknown",
        "pvt_backbone.version": __version__,
        **_source_fields(source),
    }
    metadata["pvt_backbone.dtype"] = ",".join(sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}))
    atomic_write(path, lambda temp: save_file(tensors, temp, metadata=metadata))
    return SaveReport(path, conversion.layout, variant, len(tensors), conversion.dropped, conversion.notes, metadata)


def save_weights(
    model: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    layout: str = "native",
    dtype: torch.dtype | str | None = None,
    source: WeightsSource | LoadReport | None = None,
) -> SaveReport:
    """Write a model's weights (or a native state dict) as ``.safetensors`` in any layout, atomically.

    Tensors are written contiguous and non-aliased (split key/value halves are separate tensors). The header metadata
    records ``pvt_backbone.layout``, ``pvt_backbone.variant``, ``pvt_backbone.dtype``, ``pvt_backbone.version`` and,
    when ``source`` is given (a path, or the ``LoadReport`` of the load), the source file name and SHA-256.

    Args:
        model: our backbone or classifier, or a native state dict.
        path: output file ending in ``.safetensors``; written to a temp file in the same directory, then renamed.
        layout: ``native`` (= ``timm``), ``timm_features``, ``pvt``, ``hf``, ``mmdet`` or ``lucid``; the head is written
            when the model has one and the layout can hold it (``mmdet`` cannot: reported in ``dropped``).
        dtype: cast floating tensors (``"float16"``, ``"bfloat16"``, ``torch.float32``, ...).
        source: where the weights came from, for the provenance metadata.
    """
    state_dict = model.state_dict() if isinstance(model, nn.Module) else model
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"model must be an nn.Module or a state dict, got {type(model).__name__}")
    return write_safetensors(state_dict, path, layout=layout, dtype=dtype, source=source)
