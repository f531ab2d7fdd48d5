"""The reference's ImageNet classifier: all four stages plus a pooled linear head, and one builder per variant.

State-dict keys are the backbone's keys plus ``head.weight`` and ``head.bias`` (timm's classifier layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from heads import ClassificationHead

from .backbone import PVTv2Trunk
from .config import NUM_STAGES, PVTv2Config, get_config
from .weights import LoadReport, WeightsLike, load_weights

__all__ = ["PVTv2", "PVT_V2", "build_classifier"] + [
    f"pvt_v2_{name}" for name in ("b0", "b1", "b2", "b2_li", "b3", "b4", "b5")
]


class PVTv2(PVTv2Trunk):
    """PVTv2 image classifier: (B, C_in, H, W) image -> (B, num_classes) logits.

    ``img_size`` changes no parameter (PVTv2 has no position embedding); it records the nominal training size.
    ``num_classes=0`` returns the pooled (B, C_3) features. ``weights`` loads a checkpoint in any layout strictly
    after construction (see ``load_weights``), or published weights by name (``"pvt_v2_b2.in1k"``) or enum member
    (``PVTv2_B2_Weights.DEFAULT``, see ``pvt_backbone.weights.hub``); ``fresh_head=True`` keeps the new head instead
    of the file's (needed when ``num_classes`` differs from the file's head or the file has none). ``load_report``
    keeps the ``LoadReport`` of that load (``None`` without weights).

    Example:
        >>> model = pvt_v2_b2()
        >>> model(torch.rand(2, 3, 224, 224)).shape
        torch.Size([2, 1000])
    """

    def __init__(
        self,
        config: PVTv2Config | str,
        *,
        num_classes: int = 1000,
        img_size: int = 224,
        head_drop_rate: float = 0.0,
        weights: WeightsLike | None = None,
        fresh_head: bool = False,
        **options: Any,
    ) -> None:
        config = get_config(config)
        super().__init__(config, num_stages=NUM_STAGES, **options)
        self.out_indices = (NUM_STAGES - 1,)
        self.img_size = img_size
        self.head = ClassificationHead(config.embed_dims[-1], num_classes, drop_rate=head_drop_rate)
        self.load_report: LoadReport | None = None  # what ``weights=`` loaded; None without weights
        if weights is not None:
            self.load_report = load_weights(self, weights, fresh_head=fresh_head)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one of ``num_classes`` outputs (0: return pooled features)."""
        self.head.reset(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) floating image -> (B, num_classes) logits, or (B, C_3) features if num_classes == 0."""
        return self.head(self.forward_features(x)[str(NUM_STAGES - 1)])

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"img_size={self.img_size}, num_classes={self.num_classes}, in_chans={self.in_channels}, patch_size=7, "
            f"embed_dims={list(c.embed_dims)}, num_heads={list(c.num_heads)}, mlp_ratios={list(c.mlp_ratios)}, "
            f"depths={list(c.depths)}, sr_ratios={list(c.sr_ratios)}, qkv_bias={c.qkv_bias}, linear={c.linear}, "
            f"drop_path_rate={self.drop_path_rate}"
        )


PVT_V2 = PVTv2

_CONFIG_KWARGS = ("embed_dims", "depths", "num_heads", "mlp_ratios", "sr_ratios", "qkv_bias", "linear")
_OPTION_KWARGS = (
    "drop_path_rate",
    "attn_drop_rate",
    "proj_drop_rate",
    "frozen_stages",
    "grad_checkpointing",
    "norm_layer",
)
_OTHER_KWARGS = ("drop_rate", "head_drop_rate", "in_chans", "weights", "fresh_head")


def build_classifier(
    variant: PVTv2Config | str,
    *,
    img_size: int = 224,
    num_classes: int = 1000,
    in_channels: int = 3,
    **kwargs: Any,
) -> PVTv2:
    """Build a classifier from a variant with the reference builders' keyword arguments.

    ``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios``, ``sr_ratios``, ``qkv_bias`` and ``linear`` override the
    variant's config; ``drop_rate`` has the reference's meaning (dropout after attention projection and in the MLP,
    same as ``proj_drop_rate``); ``head_drop_rate`` is dropout before the head; ``in_chans`` is an alias of
    ``in_channels``; ``weights`` (path, ``hf-hub:REPO``, dict or published name, any layout) is loaded strictly, and
    ``fresh_head=True`` keeps a new head when ``num_classes`` differs from the file's.
    """
    allowed = _CONFIG_KWARGS + _OPTION_KWARGS + _OTHER_KWARGS
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; allowed: {sorted(allowed)}")
    overrides = {key: kwargs.pop(key) for key in _CONFIG_KWARGS if key in kwargs}
    config = dataclasses.replace(get_config(variant), **overrides)
    if "in_chans" in kwargs:
        in_channels = kwargs.pop("in_chans")
    if "drop_rate" in kwargs:
        if "proj_drop_rate" in kwargs:
            raise TypeError("pass either drop_rate (the reference's name) or proj_drop_rate, not both")
        kwargs["proj_drop_rate"] = kwargs.pop("drop_rate")
    return PVTv2(config, img_size=img_size, num_classes=num_classes, in_channels=in_channels, **kwargs)


def pvt_v2_b0(img_size: int = 224, num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> PVTv2:
    """PVTv2-B0 classifier (3,666,760 parameters with 1000 classes)."""
    return build_classifier("b0", img_size=img_size, num_classes=num_classes, in_channels=in_channels, **kwargs)


def pvt_v2_b1(img_size: int = 224, num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> PVTv2:
    """PVTv2-B1 classifier (14,009,000 parameters with 1000 classes)."""
    return build_classifier("b1", img_size=img_size, num_classes=num_classes, in_channels=in_channels, **kwargs)


def pvt_v2_b2(img_size: int = 224, num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> PVTv2:
    """PVTv2-B2 classifier (25,362,856 parameters with 1000 classes)."""
    return build_classifier("b2", img_size=img_size, num_classes=num_classes, in_channels=in_channels, **kwargs)


def pvt_v2_b2_li(img_size: int = 224, num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> PVTv2:
    """PVTv2-B2-Li classifier, linear SRA (22,553,512 parameters with 1000 classes)."""
    return build_classifier("b2_li", img_size=img_size, num_classes=num_classes, in_channels=in_channels, **kwargs)


def pvt_v2_b3(img_size: int = 224, num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> PVTv2:
    """PVTv2-B3 classifier (45,238,696 parameters with 1000 classes)."""
    return build_classifier("b3", img_size=img_size, num_classes=num_classes, in_channels=in_channels, **kwargs)


def pvt_v2_b4(img_size: int = 224, num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> PVTv2:
    """PVTv2-B4 classifier (62,556,072 parameters with 1000 classes)."""
    return build_classifier("b4", img_size=img_size, num_classes=num_classes, in_channels=in_channels, **kwargs)


def pvt_v2_b5(img_size: int = 224, num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> PVTv2:
    """PVTv2-B5 classifier (81,956,008 parameters with 1000 classes)."""
    return build_classifier("b5", img_size=img_size, num_classes=num_classes, in_channels=in_channels, **kwargs)
