"""Semantic segmentation heads over a pyramid of maps: the Semantic FPN head and an all-MLP head.

Both take maps highest resolution first, consecutive levels a factor 2 apart (strides 4, 8, 16, 32 for PVTv2), as a
dict (its values in order) or a list, and return logits at the resolution of the first map (stride 4). Every
upsampling goes to an exact target size with bilinear interpolation (``align_corners=False``), so ceil-sized
pyramids (63, 32, 16, 8) line up. Norms come from ``norm_layer``: ``group_norm`` by default, so batch size 1
trains; pass ``nn.BatchNorm2d`` (and later ``nn.SyncBatchNorm.convert_sync_batchnorm``) or ``None`` (conv bias).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from ._checks import check_positive_int, check_rate

__all__ = ["SemanticFPNHead", "MLPSegHead", "group_norm", "resize_bilinear"]

NormLayer = Callable[[int], nn.Module]


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of ``num_channels`` below that (e.g. 8 for 24 channels)."""
    return nn.GroupNorm(math.gcd(32, num_channels), num_channels)


def _check_channels(in_channels: Sequence[int]) -> tuple[int, ...]:
    if isinstance(in_channels, (str, bytes)) or not isinstance(in_channels, Sequence) or not in_channels:
        raise TypeError(f"in_channels must be a non-empty sequence of positive ints, got {in_channels!r}")
    for c in in_channels:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"in_channels entries must be positive ints, got {list(in_channels)!r}")
    return tuple(in_channels)


def _as_list(features: Mapping[str, Tensor] | Sequence[Tensor], in_channels: tuple[int, ...]) -> list[Tensor]:
    maps = list(features.values()) if isinstance(features, Mapping) else list(features)
    if len(maps) != len(in_channels):
        raise ValueError(
            f"head was built for {len(in_channels)} maps with channels {list(in_channels)}, got {len(maps)}"
        )
    for index, (feature, channels) in enumerate(zip(maps, in_channels)):
        if feature.dim() != 4 or feature.shape[1] != channels:
            raise ValueError(
                f"map {index} must be (B, {channels}, H, W) (in_channels={list(in_channels)}), "
                f"got shape {tuple(feature.shape)}"
            )
    return maps


def resize_bilinear(x: Tensor, size: Sequence[int] | torch.Size) -> Tensor:
    """(B, C, h, w) -> (B, C, H, W), bilinear with ``align_corners=False``; returns ``x`` itself when already (H, W).

    While exporting (``torch.export``, the ONNX exporters) it always interpolates: comparing sizes that are symbolic
    would fix them to the example's, and a same-size bilinear resize copies ``x`` exactly (every weight is 1 or 0).

    Example:
        >>> resize_bilinear(torch.zeros(1, 3, 8, 8), (16, 12)).shape
        torch.Size([1, 3, 16, 12])
    """
    exporting = torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
    if not exporting and tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class SemanticFPNHead(nn.Module):
    """Semantic FPN head ("Panoptic Feature Pyramid Networks", Kirillov et al. 2019): pyramid -> stride-4 logits.

    Level i (stride 4 * 2**i) passes through max(1, i) blocks of conv3x3-norm-ReLU, each but the level-0 block
    followed by a 2x bilinear upsample (to the next finer level's exact size); the level maps are summed, then
    dropout and a 1x1 conv give ``num_classes`` logits at level 0's size.

    Args:
        in_channels: channels of the input maps, highest resolution first (for an FPN neck: all equal).
        num_classes: output channels.
        channels: width of the per-level branches (128 in the paper).
        norm_layer: norm factory called with a channel count; ``None`` for conv bias and no norm.
        dropout: dropout before the classifier.

    Example:
        >>> head = SemanticFPNHead([256] * 4, num_classes=150)
        >>> maps = [torch.rand(1, 256, s, s) for s in (63, 32, 16, 8)]
        >>> head(maps).shape
        torch.Size([1, 150, 63, 63])
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        *,
        channels: int = 128,
        norm_layer: NormLayer | None = group_norm,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_channels = _check_channels(in_channels)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.channels = check_positive_int("channels", channels)
        self.scale_heads = nn.ModuleList()
        for level, c_in in enumerate(self.in_channels):
            blocks = nn.ModuleList()
            for step in range(max(1, level)):
                blocks.append(
                    Conv2dNormActivation(
                        c_in if step == 0 else channels, channels, kernel_size=3, norm_layer=norm_layer
                    )
                )
            self.scale_heads.append(blocks)
        self.dropout = nn.Dropout2d(check_rate("dropout", dropout))
        self.classifier = _classifier(channels, num_classes)

    def forward(self, features: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Maps (B, C_i, H_i, W_i), highest resolution first -> logits (B, num_classes, H_0, W_0)."""
        maps = _as_list(features, self.in_channels)
        sizes = [m.shape[-2:] for m in maps]
        fused: Tensor | None = None
        for level, (blocks, x) in enumerate(zip(self.scale_heads, maps)):
            for step, block in enumerate(blocks):
                x = block(x)
                if level > 0:
                    x = resize_bilinear(x, sizes[level - 1 - step])
            fused = x if fused is None else fused + x
        assert fused is not None
        return self.classifier(self.dropout(fused))

    def extra_repr(self) -> str:
        return f"in_channels={list(self.in_channels)}, num_classes={self.num_classes}, channels={self.channels}"


class MLPSegHead(nn.Module):
    """All-MLP decoder in the style of SegFormer (Xie et al. 2021): pyramid -> stride-4 logits.

    Every level is projected to ``channels`` by a per-pixel linear layer (1x1 conv) and resized to level 0's size;
    the concatenation (level order) is fused by a 1x1 conv-norm-ReLU, then dropout and a 1x1 conv classify.

    Args:
        in_channels: channels of the input maps, highest resolution first (typically the backbone stages).
        num_classes: output channels.
        channels: decoder width (SegFormer: 256 for its B0, 768 for the larger models).
        norm_layer: norm factory of the fuse layer; ``None`` for conv bias and no norm.
        dropout: dropout before the classifier.

    Example:
        >>> head = MLPSegHead([64, 128, 320, 512], num_classes=150)
        >>> maps = [torch.rand(1, c, s, s) for c, s in zip(head.in_channels, (63, 32, 16, 8))]
        >>> head(maps).shape
        torch.Size([1, 150, 63, 63])
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        *,
        channels: int = 256,
        norm_layer: NormLayer | None = group_norm,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_channels = _check_channels(in_channels)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.channels = check_positive_int("channels", channels)
        self.proj = nn.ModuleList(nn.Conv2d(c, channels, kernel_size=1) for c in self.in_channels)
        self.fuse = Conv2dNormActivation(
            channels * len(self.in_channels), channels, kernel_size=1, norm_layer=norm_layer
        )
        self.dropout = nn.Dropout2d(check_rate("dropout", dropout))
        self.classifier = _classifier(channels, num_classes)

    def forward(self, features: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Maps (B, C_i, H_i, W_i), highest resolution first -> logits (B, num_classes, H_0, W_0)."""
        maps = _as_list(features, self.in_channels)
        size = maps[0].shape[-2:]
        projected = [resize_bilinear(proj(x), size) for proj, x in zip(self.proj, maps)]  # the first: no resize
        return self.classifier(self.dropout(self.fuse(torch.cat(projected, dim=1))))

    def extra_repr(self) -> str:
        return f"in_channels={list(self.in_channels)}, num_classes={self.num_classes}, channels={self.channels}"
