"""Argument validators shared by the library: each returns the checked value or raises naming it and what is allowed.

Booleans are refused where a number is asked for (``True`` is an ``int`` to Python, never a count to a user), and
floats must be finite: ``nan`` and ``inf`` pass every ``<``/``>`` comparison one way or the other.

Example:
    >>> check_int("batch_size", 4, minimum=1)
    4
    >>> check_float("lr", float("inf"), minimum=0.0, inclusive=False)
    Traceback (most recent call last):
    ...
    ValueError: lr must be a finite number > 0.0, got inf
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["check_int", "check_float", "check_rate", "check_choice"]


def _bounds(minimum: float | None, maximum: float | None, inclusive: bool) -> str:
    low = ">=" if inclusive else ">"
    high = "<=" if inclusive else "<"
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]" if inclusive else f" in ({minimum}, {maximum})"
    if minimum is not None:
        return f" {low} {minimum}"
    if maximum is not None:
        return f" {high} {maximum}"
    return ""


def _in_range(value: float, minimum: float | None, maximum: float | None, inclusive: bool) -> bool:
    if inclusive:
        return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    return (minimum is None or value > minimum) and (maximum is None or value < maximum)


def check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) within ``[minimum, maximum]``, else ``ValueError``/``TypeError``.

    Example:
        >>> check_int("frozen_stages", 5, minimum=0, maximum=4)
        Traceback (most recent call last):
        ...
        ValueError: frozen_stages must be an int in [0, 4], got 5
    """
    wanted = f"an int{_bounds(minimum, maximum, True)}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")
    if not _in_range(value, minimum, maximum, True):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return value


def check_float(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    inclusive: bool = True,
) -> float:
    """``float(value)`` if it is a finite real number within the bounds (both inclusive or both exclusive).

    Example:
        >>> check_float("drop_path_rate", 0.1, minimum=0.0, maximum=1.0)
        0.1
    """
    wanted = f"a finite number{_bounds(minimum, maximum, inclusive)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or not _in_range(value, minimum, maximum, inclusive):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return float(value)


def check_rate(name: str, value: object) -> float:
    """A dropout or drop-path probability: a finite number in [0, 1) (1 would drop everything).

    Example:
        >>> check_rate("drop_path_rate", 1.0)
        Traceback (most recent call last):
        ...
        ValueError: drop_path_rate must be a finite number in [0, 1), got 1.0
    """
    wanted = "a finite number in [0, 1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``ValueError`` listing them.

    Example:
        >>> check_choice("schedule", "step", ("cosine", "poly"))
        Traceback (most recent call last):
        ...
        ValueError: schedule must be one of ['cosine', 'poly'], got 'step'
    """
    options = list(allowed)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value
