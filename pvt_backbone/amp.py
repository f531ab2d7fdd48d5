"""Mixed precision: the one autocast context the library, the training loop and the benchmarks use."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast", "amp_dtype"]


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """The reduced precision autocast uses on ``device``: float16 on CUDA, bfloat16 elsewhere (CPU autocast's type).

    Example:
        >>> amp_dtype("cpu")
        torch.bfloat16
    """
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def autocast(
    device: torch.device | str, *, enabled: bool = True, dtype: torch.dtype | None = None
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``device`` in ``dtype`` (default :func:`amp_dtype`), or a no-op when not ``enabled``.

    Example:
        >>> with autocast("cpu"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
        >>> with autocast("cpu", enabled=False):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    if not enabled:
        return contextlib.nullcontext()
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype or amp_dtype(device))
