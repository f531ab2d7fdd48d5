"""Multiply-accumulate counts from ``torch.utils.flop_counter``, computed on the meta device (no memory, no compute)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs"]


def count_macs(build: Callable[[], nn.Module], height: int, width: int, *, in_channels: int = 3, batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass (convs, linears, attention matmuls) of ``build()``.

    The model is built on the meta device, so even b5 at 800x1333 costs nothing. Papers' "GFLOPs" for PVTv2 are
    these MACs divided by 1e9.

    Example:
        >>> count_macs(lambda: pvt_v2_b2(), 224, 224) / 1e9
        4.026734592
    """
    with torch.device("meta"):
        model = build().eval()
        images = torch.empty(batch, in_channels, height, width)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    return counter.get_total_flops() // 2
