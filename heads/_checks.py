"""Argument validators shared by the heads (this package stands alone, so it keeps its own two)."""

from __future__ import annotations

import math

__all__ = ["check_positive_int", "check_rate"]


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an ``int`` >= 1 (not a ``bool``), else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_rate(name: str, value: object) -> float:
    """A dropout probability: a finite number in [0, 1), else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a finite number in [0, 1), got {value!r}")
    return float(value)
