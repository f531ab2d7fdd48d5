"""The learning-rate schedule of a run: linear warm-up, then cosine or poly decay to a floor.

Per optimizer step ``t`` of a run of ``total`` steps, every parameter group's LR is its own base LR times

* ``warmup_start + (1 - warmup_start) * t / warmup`` while ``t < warmup`` (torch's ``LinearLR``), then
* ``min_ratio + (1 - min_ratio) * d(p)`` with ``p = min(1, (t - warmup) / max(1, total - warmup))`` and
  ``d(p) = (1 + cos(pi * p)) / 2`` (``"cosine"``) or ``(1 - p) ** 0.9`` (``"poly"``).

Example:
    >>> optimizer = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=1.0)
    >>> scheduler = LRSchedule(total=6, warmup=2, kind="cosine", min_ratio=0.1).scheduler(optimizer)
    >>> lrs = []
    >>> for _ in range(7):
    ...     lrs.append(round(optimizer.param_groups[0]["lr"], 4))
    ...     optimizer.step()
    ...     scheduler.step()
    >>> lrs
    [0.001, 0.5005, 1.0, 0.8682, 0.55, 0.2318, 0.1]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LinearLR, LRScheduler, SequentialLR

from ..checks import check_choice, check_float, check_int

__all__ = ["LRSchedule", "SCHEDULES", "WARMUP_START", "POLY_POWER", "DEFAULT_MAX_WARMUP"]

SCHEDULES = ("cosine", "poly")
WARMUP_START = 1e-3  # LR factor of the first warm-up step
POLY_POWER = 0.9
DEFAULT_MAX_WARMUP = 500  # steps; the default warm-up is 5% of the run, capped here


@dataclass(frozen=True)
class LRSchedule:
    """The LR factor of every step of a run (see the module docstring); equal schedules, equal LRs.

    ``warmup`` is at most ``total``; ``warmup=0`` starts the decay at step 0.
    """

    total: int
    warmup: int
    kind: str = "cosine"
    min_ratio: float = 0.0
    warmup_start: float = WARMUP_START

    def __post_init__(self) -> None:
        check_int("total", self.total, minimum=1)
        check_int("warmup", self.warmup, minimum=0, maximum=self.total)
        check_choice("kind", self.kind, SCHEDULES)
        check_float("min_ratio", self.min_ratio, minimum=0.0, maximum=1.0)
        check_float("warmup_start", self.warmup_start, minimum=0.0, maximum=1.0)
        if self.warmup_start == 0:  # LinearLR multiplies its way up from it
            raise ValueError("warmup_start must be > 0, got 0")

    @classmethod
    def for_run(cls, *, total: int, warmup_steps: int | None, kind: str, min_ratio: float) -> LRSchedule:
        """The schedule of a run of ``total`` steps; ``warmup_steps=None`` warms up over 5% of it (1 to 500 steps).

        >>> LRSchedule.for_run(total=300, warmup_steps=None, kind="poly", min_ratio=0.01).warmup
        15
        """
        warmup = warmup_steps if warmup_steps is not None else min(DEFAULT_MAX_WARMUP, max(1, total // 20))
        return cls(total=total, warmup=min(warmup, total), kind=kind, min_ratio=min_ratio)

    def decay(self, step: int) -> float:
        """The LR factor ``step`` steps after the warm-up (1 at 0, ``min_ratio`` from ``total - warmup`` on)."""
        progress = min(1.0, step / max(1, self.total - self.warmup))
        if self.kind == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            shape = (1 - progress) ** POLY_POWER
        return self.min_ratio + (1 - self.min_ratio) * shape

    def scheduler(self, optimizer: Optimizer) -> LRScheduler:
        """A torch scheduler for ``optimizer`` (its groups' current LRs are the base LRs); step it once per step.

        The warm-up is ``LinearLR``. The decay is a ``LambdaLR``: its floor is ``min_ratio`` times each group's own
        base LR (backbone groups differ by ``backbone_lr_mult``), which ``CosineAnnealingLR`` (one absolute
        ``eta_min`` for every group) and ``PolynomialLR`` (decays to 0) cannot express.
        """
        decay = LambdaLR(optimizer, lambda step: self.decay(step))
        if self.warmup == 0:
            return decay
        warm = LinearLR(optimizer, start_factor=self.warmup_start, end_factor=1.0, total_iters=self.warmup)
        return SequentialLR(optimizer, [warm, decay], milestones=[self.warmup])

    def describe(self) -> str:
        """
        >>> LRSchedule(total=100, warmup=5, kind="poly", min_ratio=0.01).describe()
        '(total 100 steps, warm-up 5, poly, min lr ratio 0.01)'
        """
        return f"(total {self.total} steps, warm-up {self.warmup}, {self.kind}, min lr ratio {self.min_ratio})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LRSchedule:
        return cls(**data)
