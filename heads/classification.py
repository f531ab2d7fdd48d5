"""Classification head: global average pool, dropout, linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_positive_int

__all__ = ["ClassificationHead"]


class ClassificationHead(nn.Module):
    """(B, C, H, W) map -> (B, num_classes) logits: mean over H and W, dropout, then a linear layer.

    The linear layer's parameters sit directly on this module (``weight``, ``bias``), so a model that stores the head
    as ``head`` has the timm keys ``head.weight`` and ``head.bias``. With ``num_classes=0`` there are no parameters
    and the pooled (B, C) features are returned.

    Example:
        >>> head = ClassificationHead(512, 1000)
        >>> head(torch.rand(2, 512, 7, 7)).shape
        torch.Size([2, 1000])
    """

    def __init__(self, in_channels: int, num_classes: int, *, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.drop = nn.Dropout(drop_rate)
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        self.reset(num_classes)

    @property
    def num_classes(self) -> int:
        return 0 if self.weight is None else self.weight.shape[0]

    def reset(self, num_classes: int) -> None:
        """Replace the linear layer by a freshly initialised one with ``num_classes`` outputs (0 = none)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if num_classes == 0:
            self.weight, self.bias = None, None
            return
        # keep where and in what precision the head lives (the model may have been moved or cast already)
        like = {"device": self.weight.device, "dtype": self.weight.dtype} if self.weight is not None else {}
        self.weight = nn.Parameter(torch.empty(num_classes, self.in_channels, **like))
        self.bias = nn.Parameter(torch.zeros(num_classes, **like))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.drop(x.mean(dim=(-2, -1)))
        if self.weight is None:
            return pooled
        return F.linear(pooled, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_classes={self.num_classes}, drop_rate={self.drop.p}"
