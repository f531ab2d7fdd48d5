"""FPN neck: torchvision's ``FeaturePyramidNetwork`` with validated inputs and explicit extra levels.

The top-down pathway, lateral 1x1 convs and 3x3 output convs are torchvision's own; this module adds the checks and
the choice of extra levels. Upsampling goes to each lateral map's exact size (torchvision interpolates to the
lateral's shape), so ceil-sized pyramids such as 63/32/16/8 work; a fixed factor of 2 would not.

Extra levels:
    ``"pool"``: torchvision's ``LastLevelMaxPool`` (a stride-2 subsample of the last output), key ``"pool"``; the
        level Faster/Mask/Keypoint R-CNN's RPN expects.
    ``"p6p7"``: ``P6P7Block``, keys ``"p6"`` and ``"p7"``; the RetinaNet/FCOS levels. Its input is chosen by an
        explicit ``source``: ``"p5"`` (the last FPN output, default) or ``"c5"`` (the last input map). torchvision's
        ``LastLevelP6P7`` instead picks P5 whenever ``in_channels == out_channels``, which silently changes the
        source for backbones whose last stage happens to be as wide as the FPN (PVTv2-B0: 256).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from ._checks import check_positive_int

__all__ = ["FPN", "P6P7Block", "EXTRA_LEVELS", "P6P7_SOURCES", "extra_level_names"]

EXTRA_LEVELS: dict[str | None, tuple[str, ...]] = {None: (), "pool": ("pool",), "p6p7": ("p6", "p7")}
P6P7_SOURCES = ("p5", "c5")


def _check_source(source: object) -> str:
    if source not in P6P7_SOURCES:
        raise ValueError(f"source must be one of {P6P7_SOURCES} (the map P6 is computed from), got {source!r}")
    return str(source)


def extra_level_names(extra_levels: str | None) -> tuple[str, ...]:
    """Keys an ``FPN`` appends after the input keys: ``()``, ``("pool",)`` or ``("p6", "p7")``."""
    if extra_levels not in EXTRA_LEVELS:
        raise ValueError(f"extra_levels must be one of {list(EXTRA_LEVELS)}, got {extra_levels!r}")
    return EXTRA_LEVELS[extra_levels]


class P6P7Block(ExtraFPNBlock):
    """RetinaNet's two extra levels: P6 = conv3x3/2(source), P7 = conv3x3/2(ReLU(P6)).

    ``source="p5"`` reads the last FPN output (``out_channels`` wide); ``source="c5"`` reads the last input map and
    needs ``c5_channels``. The choice is stored and never inferred from channel counts.

    Example:
        >>> block = P6P7Block(256, source="c5", c5_channels=512)
        >>> block.p6.in_channels, block.source
        (512, 'c5')
    """

    def __init__(
        self, out_channels: int, *, source: Literal["p5", "c5"] = "p5", c5_channels: int | None = None
    ) -> None:
        super().__init__()
        check_positive_int("out_channels", out_channels)
        self.source = _check_source(source)
        if self.source == "c5":
            if c5_channels is None:
                raise ValueError("source='c5' needs c5_channels (the channel count of the last input map)")
            in_channels = check_positive_int("c5_channels", c5_channels)
        else:
            in_channels = out_channels
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        """Append P6 and P7 to ``results`` (FPN outputs) computed from ``results[-1]`` or ``x[-1]`` (inputs)."""
        p6 = self.p6(results[-1] if self.source == "p5" else x[-1])
        p7 = self.p7(F.relu(p6))
        return [*results, p6, p7], [*names, "p6", "p7"]

    def extra_repr(self) -> str:
        return f"source={self.source!r}"


class FPN(FeaturePyramidNetwork):
    """Feature pyramid over a dict of maps: ``{name: (B, C_i, H_i, W_i)}`` -> ``{name: (B, out_channels, H_i, W_i)}``.

    The input maps come highest resolution first, one per entry of ``in_channels``; the output keeps their keys and
    sizes and appends the extra levels (see the module docstring). Parameter names are torchvision's
    (``inner_blocks.i.0``, ``layer_blocks.i.0``, ``extra_blocks.p6``), so the layout matches ``BackboneWithFPN.fpn``.

    Args:
        in_channels: channels of the input maps, highest resolution first.
        out_channels: channels of every output map.
        extra_levels: ``None``, ``"pool"`` or ``"p6p7"``.
        p6p7_source: input of P6 when ``extra_levels="p6p7"``: ``"p5"`` or ``"c5"``.
        norm_layer: optional norm after every FPN conv (e.g. ``nn.BatchNorm2d``); ``None`` = conv with bias.

    Example:
        >>> fpn = FPN([64, 128, 320, 512], 256, extra_levels="pool")
        >>> sizes = (63, 32, 16, 8)  # ceil-sized, as PVTv2 gives for a 250x250 image
        >>> maps = {str(i): torch.rand(1, c, s, s) for i, (c, s) in enumerate(zip(fpn.in_channels, sizes))}
        >>> {k: tuple(v.shape[-2:]) for k, v in fpn(maps).items()}
        {'0': (63, 63), '1': (32, 32), '2': (16, 16), '3': (8, 8), 'pool': (4, 4)}
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        *,
        extra_levels: Literal["pool", "p6p7"] | None = None,
        p6p7_source: Literal["p5", "c5"] = "p5",
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        if isinstance(in_channels, (str, bytes)) or not isinstance(in_channels, Sequence) or not in_channels:
            raise TypeError(f"in_channels must be a non-empty sequence of positive ints, got {in_channels!r}")
        channels = tuple(check_positive_int("in_channels entries", c) for c in in_channels)
        check_positive_int("out_channels", out_channels)
        extra_names = extra_level_names(extra_levels)
        source = _check_source(p6p7_source)
        extra: ExtraFPNBlock | None = None
        if extra_levels == "pool":
            extra = LastLevelMaxPool()
        elif extra_levels == "p6p7":
            extra = P6P7Block(out_channels, source=source, c5_channels=channels[-1])  # type: ignore[arg-type]
        super().__init__(list(channels), out_channels, extra_blocks=extra, norm_layer=norm_layer)
        self.in_channels = channels
        self.out_channels = out_channels
        self.extra_levels = extra_levels
        self.extra_names = extra_names

    def forward(self, x: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:  # type: ignore[override]
        """``{name: (B, C_i, H_i, W_i)}`` in ``in_channels`` order -> ``OrderedDict`` of (B, out_channels, ...) maps."""
        if not isinstance(x, Mapping):
            raise TypeError(f"FPN expects a dict of feature maps (name -> NCHW tensor), got {type(x).__name__}")
        if len(x) != len(self.in_channels):
            raise ValueError(
                f"FPN was built for {len(self.in_channels)} maps with channels {list(self.in_channels)}, "
                f"got {len(x)}: {list(x)}"
            )
        for (name, feature), channels in zip(x.items(), self.in_channels):
            if feature.dim() != 4 or feature.shape[1] != channels:
                raise ValueError(
                    f"FPN input {name!r} must be (B, {channels}, H, W) (in_channels={list(self.in_channels)}), "
                    f"got shape {tuple(feature.shape)}"
                )
        return super().forward(dict(x))  # an OrderedDict

    def output_names(self, input_names: Sequence[str]) -> tuple[str, ...]:
        """Keys of the output for inputs named ``input_names``: the input names, then the extra levels."""
        return (*input_names, *self.extra_names)
