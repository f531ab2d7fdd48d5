"""The step-decay LR schedule: torch's MultiStepLR factors after a linear warm-up, milestones in epochs or steps,
exact continuation from a saved scheduler state, and the settings it refuses."""

from __future__ import annotations

import pytest
import torch
from lr_probe import lrs, two_groups

from pvt_backbone.training.schedule import LRSchedule, milestone_steps
from pvt_backbone.training.trainer import TrainConfig


def _step_factor(step: int, *, warmup: int, milestones: tuple[int, ...], gamma: float, start: float) -> float:
    """The LR factor of run step ``step``, written out: linear warm-up from ``start`` to 1 over ``warmup`` steps,
    then ``gamma`` per milestone reached."""
    if step < warmup:
        return start + (1 - start) * step / warmup
    return gamma ** sum(1 for milestone in milestones if milestone <= step)


@pytest.mark.parametrize(
    ("warmup", "milestones", "gamma", "start"),
    [(5, (12, 20), 0.1, 1e-3), (0, (3, 4, 9), 0.5, 1e-3), (8, (6, 15), 0.2, 0.01)],  # the last: a milestone in warm-up
)
def test_step_lrs_follow_the_formula_at_every_step(
    warmup: int, milestones: tuple[int, ...], gamma: float, start: float
) -> None:
    schedule = LRSchedule(total=30, warmup=warmup, kind="step", milestones=milestones, gamma=gamma, warmup_start=start)
    optimizer = two_groups()
    for step, (head, body) in enumerate(lrs(optimizer, schedule.scheduler(optimizer), 31)):
        expected = _step_factor(step, warmup=warmup, milestones=milestones, gamma=gamma, start=start)
        assert head == pytest.approx(expected, rel=1e-12), step
        assert body == pytest.approx(expected / 10, rel=1e-12), step


def test_without_warmup_it_is_torchs_multistep_lr() -> None:
    ours, theirs = two_groups(), two_groups()
    mine = LRSchedule(total=40, warmup=0, kind="step", milestones=(10, 25, 30), gamma=0.3).scheduler(ours)
    reference = torch.optim.lr_scheduler.MultiStepLR(theirs, milestones=[10, 25, 30], gamma=0.3)
    for (a, b), (c, d) in zip(lrs(ours, mine, 40), lrs(theirs, reference, 40)):
        assert a == pytest.approx(c, rel=1e-12) and b == pytest.approx(d, rel=1e-12)


@pytest.mark.parametrize("stop", [2, 5, 11, 12, 21])  # in the warm-up, at its end, around and after milestones
def test_step_schedule_resumes_exactly(stop: int) -> None:
    schedule = LRSchedule(total=30, warmup=5, kind="step", milestones=(12, 20))
    optimizer = two_groups(lr=1e-4)
    reference = lrs(optimizer, schedule.scheduler(optimizer), 30)
    first = two_groups(lr=1e-4)
    scheduler = schedule.scheduler(first)
    lrs(first, scheduler, stop)
    saved = {"optimizer": first.state_dict(), "scheduler": scheduler.state_dict(), "schedule": schedule.to_dict()}
    resumed = two_groups(lr=1e-4)
    scheduler = LRSchedule.from_dict(saved["schedule"]).scheduler(resumed)
    resumed.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    continued = lrs(resumed, scheduler, 30 - stop)
    assert continued == reference[stop:]
    for offset, (head, _) in enumerate(continued):
        step = stop + offset
        assert head == pytest.approx(1e-4 * _step_factor(step, warmup=5, milestones=(12, 20), gamma=0.1, start=1e-3))


def test_schedule_records_step_fields_only_for_step() -> None:
    assert LRSchedule(total=10, warmup=1).to_dict() == {
        "total": 10,
        "warmup": 1,
        "kind": "cosine",
        "min_ratio": 0.0,
        "warmup_start": 1e-3,
    }
    step = LRSchedule(total=10, warmup=1, kind="step", milestones=(4, 8), gamma=0.5)
    assert step.to_dict()["milestones"] == [4, 8] and LRSchedule.from_dict(step.to_dict()) == step


def test_milestones_in_epochs_become_steps() -> None:
    assert milestone_steps([8, 11], unit="epochs", steps_per_epoch=7) == (56, 77)
    assert milestone_steps([8, 11], unit="steps", steps_per_epoch=7) == (8, 11)
    schedule = LRSchedule.for_run(total=84, warmup_steps=3, kind="step", min_ratio=None, milestones=(56, 77))
    assert schedule.min_ratio == 0.0 and schedule.decay(56 - 3 - 1) == 1.0 and schedule.decay(56 - 3) == 0.1
    with pytest.raises(ValueError, match="milestone_unit must be one of"):
        milestone_steps([1], unit="iters", steps_per_epoch=1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kind": "step"}, "kind must be one of 'cosine', 'poly', or 'step' with milestones"),
        ({"kind": "cosine", "milestones": (3,)}, "milestones and gamma belong to kind='step'"),
        ({"kind": "step", "milestones": (5, 3)}, r"milestones must increase, got \[5, 3\]"),
        ({"kind": "step", "milestones": (0,)}, "milestone must be an int >= 1"),
        ({"kind": "step", "milestones": (3,), "gamma": 1.5}, "gamma must be a finite number in"),
        ({"kind": "step", "milestones": (3,), "min_ratio": 0.1}, "min_ratio belongs to cosine and poly"),
    ],
)
def test_schedule_refuses_bad_step_settings(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LRSchedule(total=10, warmup=1, **settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"schedule": "step"}, "^schedule must be 'cosine', 'poly', or 'step' with milestones"),
        ({"schedule": "poly", "milestones": (3,)}, "^milestones and gamma belong to schedule='step'"),
        ({"schedule": "step", "milestones": (3,), "min_lr_ratio": 0.01}, "^min_lr_ratio belongs to"),
        ({"schedule": "step", "milestones": (3,), "milestone_unit": "iters"}, "^milestone_unit must be one of"),
        ({"warmup_ratio": 0.0}, "^warmup_ratio must be a finite number in"),
    ],
)
def test_config_check_names_the_bad_schedule_setting(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(output_dir="unused", max_steps=10, **settings).check()
