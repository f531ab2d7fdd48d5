"""Probing LR schedules in tests: a two-group optimizer and the LRs a scheduler gives it step by step."""

from __future__ import annotations

import torch
from torch import nn


def two_groups(lr: float = 1.0) -> torch.optim.Optimizer:
    """An optimizer with a backbone-like group at a tenth of the LR, as ``backbone_lr_mult=0.1`` makes."""
    head, body = nn.Linear(2, 2), nn.Linear(2, 2)
    return torch.optim.AdamW([{"params": head.parameters()}, {"params": body.parameters(), "lr": lr / 10}], lr=lr)


def lrs(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[list[float]]:
    """Each group's LR at each of ``steps`` steps (read before the step, as the loop logs it)."""
    seen = []
    for _ in range(steps):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen
