"""The learning-rate schedule of a run: linear warm-up, then cosine, poly or step decay.

Per optimizer step ``t`` (0-based) of a run of ``total`` steps, every parameter group's LR is its own base LR times

* ``warmup_start + (1 - warmup_start) * t / warmup`` while ``t < warmup`` (torch's ``LinearLR``; mmdet's
  ``warmup="linear"`` with ``warmup_ratio=warmup_start``), then
* ``min_ratio + (1 - min_ratio) * d(p)`` with ``p = min(1, (t - warmup) / max(1, total - warmup))`` and
  ``d(p) = (1 + cos(pi * p)) / 2`` (``"cosine"``) or ``(1 - p) ** 0.9`` (``"poly"``), or
* ``gamma ** k`` with ``k`` the number of ``milestones`` ``<= t`` (``"step"``: torch's ``MultiStepLR``, its
  milestones counted in steps from the start of the run, warm-up included).

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

import bisect
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LinearLR, LRScheduler, SequentialLR

from ..checks import check_choice, check_float, check_int

__all__ = [
    "LRSchedule",
    "SCHEDULES",
    "MILESTONE_UNITS",
    "WARMUP_START",
    "POLY_POWER",
    "DEFAULT_GAMMA",
    "DEFAULT_MIN_RATIO",
    "DEFAULT_MAX_WARMUP",
    "milestone_steps",
]

SCHEDULES = ("cosine", "poly", "step")
MILESTONE_UNITS = ("epochs", "steps")
WARMUP_START = 1e-3  # LR factor of the first warm-up step (mmdet's warmup_ratio)
POLY_POWER = 0.9
DEFAULT_GAMMA = 0.1  # LR factor per milestone of a step schedule (MultiStepLR's default)
DEFAULT_MIN_RATIO = 0.01  # floor of the cosine and poly schedules unless told
DEFAULT_MAX_WARMUP = 500  # steps; the default warm-up is 5% of the run, capped here


def milestone_steps(milestones: Sequence[int], *, unit: str, steps_per_epoch: int) -> tuple[int, ...]:
    """Milestones as optimizer steps: ``unit="steps"`` keeps them; ``unit="epochs"`` makes epoch ``e`` step
    ``e * steps_per_epoch``, so the LR drops from the first step of the epoch after ``e`` epochs, as an epoch-based
    ``MultiStepLR`` (or mmdet's ``step=[8, 11]``) drops it.

    >>> milestone_steps([8, 11], unit="epochs", steps_per_epoch=100)
    (800, 1100)
    """
    check_choice("milestone_unit", unit, MILESTONE_UNITS)
    check_int("steps_per_epoch", steps_per_epoch, minimum=1)
    scale = steps_per_epoch if unit == "epochs" else 1
    return tuple(check_int("milestone", value, minimum=1) * scale for value in milestones)


@dataclass(frozen=True)
class LRSchedule:
    """The LR factor of every step of a run (see the module docstring); equal schedules, equal LRs.

    ``warmup`` is at most ``total``; ``warmup=0`` starts the decay at step 0. ``milestones`` (steps, increasing) and
    ``gamma`` belong to ``kind="step"`` alone, whose ``min_ratio`` is 0; a milestone inside the warm-up takes effect
    when the warm-up ends, and one past ``total`` is never reached.
    """

    total: int
    warmup: int
    kind: str = "cosine"
    min_ratio: float = 0.0
    warmup_start: float = WARMUP_START
    milestones: tuple[int, ...] = ()
    gamma: float = DEFAULT_GAMMA

    def __post_init__(self) -> None:
        check_int("total", self.total, minimum=1)
        check_int("warmup", self.warmup, minimum=0, maximum=self.total)
        check_choice("kind", self.kind, SCHEDULES)
        check_float("min_ratio", self.min_ratio, minimum=0.0, maximum=1.0)
        check_float("warmup_start", self.warmup_start, minimum=0.0, maximum=1.0)
        if self.warmup_start == 0:  # LinearLR multiplies its way up from it
            raise ValueError("warmup_start must be > 0, got 0")
        object.__setattr__(self, "milestones", tuple(self.milestones))
        self._check_step_fields()

    def _check_step_fields(self) -> None:
        if self.kind != "step":
            if self.milestones or self.gamma != DEFAULT_GAMMA:
                raise ValueError(
                    f"milestones and gamma belong to kind='step', got kind={self.kind!r} with "
                    f"milestones={list(self.milestones)}, gamma={self.gamma}"
                )
            return
        if not self.milestones:  # a step schedule without steps is a constant LR: surely a mistake
            raise ValueError("kind must be one of 'cosine', 'poly', or 'step' with milestones; got no milestones")
        for value in self.milestones:
            check_int("milestone", value, minimum=1)
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"milestones must increase, got {list(self.milestones)}")
        check_float("gamma", self.gamma, minimum=0.0, maximum=1.0, inclusive=False)
        if self.min_ratio != 0:
            raise ValueError(f"min_ratio belongs to cosine and poly; kind='step' decays by gamma, got {self.min_ratio}")

    @classmethod
    def for_run(
        cls,
        *,
        total: int,
        warmup_steps: int | None,
        kind: str,
        min_ratio: float | None,
        warmup_start: float = WARMUP_START,
        milestones: Sequence[int] = (),
        gamma: float = DEFAULT_GAMMA,
    ) -> LRSchedule:
        """The schedule of a run of ``total`` steps; ``warmup_steps=None`` warms up over 5% of it (1 to 500 steps),
        and a warm-up longer than the run is cut to it. ``min_ratio=None``: ``DEFAULT_MIN_RATIO`` for cosine and
        poly, 0 for step. ``milestones`` are in steps (:func:`milestone_steps` converts epochs).

        >>> LRSchedule.for_run(total=300, warmup_steps=None, kind="poly", min_ratio=0.01).warmup
        15
        """
        warmup = warmup_steps if warmup_steps is not None else min(DEFAULT_MAX_WARMUP, max(1, total // 20))
        if min_ratio is None:
            min_ratio = 0.0 if kind == "step" else DEFAULT_MIN_RATIO
        return cls(
            total=total,
            warmup=min(warmup, total),
            kind=kind,
            min_ratio=min_ratio,
            warmup_start=warmup_start,
            milestones=tuple(milestones),
            gamma=gamma,
        )

    def decay(self, step: int) -> float:
        """The LR factor ``step`` steps after the warm-up (cosine and poly: 1 at 0, ``min_ratio`` from
        ``total - warmup`` on; step: ``gamma`` to the number of milestones reached by run step ``warmup + step``)."""
        if self.kind == "step":
            return self.gamma ** bisect.bisect_right(self.milestones, self.warmup + step)
        progress = min(1.0, step / max(1, self.total - self.warmup))
        if self.kind == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            shape = (1 - progress) ** POLY_POWER
        return self.min_ratio + (1 - self.min_ratio) * shape

    def scheduler(self, optimizer: Optimizer) -> LRScheduler:
        """A torch scheduler for ``optimizer`` (its groups' current LRs are the base LRs); step it once per step.

        The warm-up is ``LinearLR``. The decay is a ``LambdaLR`` in closed form: its floor is ``min_ratio`` times
        each group's own base LR (backbone groups differ by ``backbone_lr_mult``), which ``CosineAnnealingLR`` (one
        absolute ``eta_min`` for every group) and ``PolynomialLR`` (decays to 0) cannot express; for ``"step"`` it
        is ``MultiStepLR``'s ``gamma ** k`` with the milestones counted from the run's first step rather than from
        the warm-up's end. Its state holds no function or counter, so a checkpoint of it loads with
        ``weights_only=True``.
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
        >>> LRSchedule(total=100, warmup=5, kind="step", milestones=(60, 90)).describe()
        '(total 100 steps, warm-up 5, step x0.1 at steps [60, 90])'
        """
        if self.kind == "step":
            decay = f"step x{self.gamma:g} at steps {list(self.milestones)}"
        else:
            decay = f"{self.kind}, min lr ratio {self.min_ratio}"
        return f"(total {self.total} steps, warm-up {self.warmup}, {decay})"

    def to_dict(self) -> dict[str, Any]:
        """JSON values; ``milestones`` and ``gamma`` only for ``kind="step"`` (a cosine or poly record has none)."""
        data = dataclasses.asdict(self)
        if self.kind == "step":
            data["milestones"] = list(self.milestones)
        else:
            del data["milestones"], data["gamma"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LRSchedule:
        return cls(**data)
