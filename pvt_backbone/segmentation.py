"""Semantic segmentation with a PVTv2 backbone: Semantic FPN (FPN neck + ``heads.SemanticFPNHead``) or an all-MLP
head (``heads.MLPSegHead`` directly on the four stages, SegFormer style), a loss and a predict that resizes first.

Labels follow the ADE20K/mmseg convention: class indices ``0 .. num_classes - 1``, ``ignore_index`` (255) for pixels
that count nowhere (padding, "other"); with ADE20K's raw labels (0 = other) map 0 to 255 and subtract 1 from the rest
("reduce_zero_label") before training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads import FPN, MLPSegHead, SemanticFPNHead, group_norm, resize_bilinear

from .backbone import PVTv2Backbone
from .checks import check_int
from .config import PVTv2Config, get_config
from .detection import WeightsArg

__all__ = ["PVTv2Segmenter", "semantic_fpn_pvt_v2", "segmentation_loss", "IGNORE_INDEX", "SEG_HEADS"]

IGNORE_INDEX = 255
SEG_HEADS = ("fpn", "mlp")


def segmentation_loss(logits: Tensor, target: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pixel-wise cross entropy; logits are resized to the target's size first (bilinear) if they differ.

    Args:
        logits: (B, K, h, w) float scores.
        target: (B, H, W) integer class indices in ``[0, K)`` or ``ignore_index``.
        ignore_index: label of pixels that contribute nothing.

    Returns:
        Scalar mean over non-ignored pixels; 0 (still connected to ``logits``) when every pixel is ignored.

    Example:
        >>> loss = segmentation_loss(torch.randn(2, 5, 16, 16), torch.randint(0, 5, (2, 64, 64)))
        >>> loss.shape
        torch.Size([])
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, K, H, W), got shape {tuple(logits.shape)}")
    if target.dim() != 3 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target must be (B, H, W) class indices with B={logits.shape[0]}, got shape {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}; use target.long()")
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    num_classes = logits.shape[1]
    labels = target[valid]
    if bool((labels < 0).any()) or bool((labels >= num_classes).any()):
        bad = labels[(labels < 0) | (labels >= num_classes)].unique()[:5].tolist()
        raise ValueError(
            f"target holds labels {bad} outside [0, {num_classes}) that are not ignore_index={ignore_index}"
        )
    logits = resize_bilinear(logits, target.shape[-2:])
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)


class PVTv2Segmenter(nn.Module):
    """Image -> per-pixel class logits at the input resolution.

    ``backbone`` gives the four stage maps, ``neck`` (an FPN, or ``None`` for the MLP head) refines them, ``head``
    turns them into stride-4 logits, which ``forward`` resizes to the input size.

    Example:
        >>> model = semantic_fpn_pvt_v2("b0", num_classes=150)
        >>> model(torch.rand(1, 3, 250, 333)).shape
        torch.Size([1, 150, 250, 333])
        >>> model(torch.rand(1, 3, 250, 333), return_low_res=True).shape
        torch.Size([1, 150, 63, 84])
    """

    def __init__(
        self,
        backbone: PVTv2Backbone,
        head: nn.Module,
        *,
        neck: nn.Module | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.ignore_index = ignore_index

    @property
    def num_classes(self) -> int:
        return int(self.head.num_classes)

    def forward(self, images: Tensor, *, return_low_res: bool = False) -> Tensor:
        """(B, C_in, H, W) float images -> (B, num_classes, H, W) logits; with ``return_low_res`` the stride-4 map
        (B, num_classes, ceil(H / 4), ceil(W / 4))."""
        features = self.backbone(images)
        if self.neck is not None:
            features = self.neck(features)
        logits = self.head(features)
        if return_low_res:
            return logits
        return resize_bilinear(logits, images.shape[-2:])

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """``segmentation_loss`` with this model's ``ignore_index``; low-resolution logits are resized first."""
        return segmentation_loss(logits, target, ignore_index=self.ignore_index)

    @torch.no_grad()
    def predict(self, images: Tensor, *, size: Sequence[int] | None = None) -> Tensor:
        """(B, C_in, H, W) images -> (B, H', W') int64 class map: stride-4 logits are resized to ``size`` (default:
        the input size) and only then argmax'ed. Call ``model.eval()`` first (dropout)."""
        logits = self(images, return_low_res=True)
        return resize_bilinear(logits, images.shape[-2:] if size is None else size).argmax(dim=1)


def semantic_fpn_pvt_v2(
    variant: PVTv2Config | str = "b2",
    *,
    num_classes: int,
    weights_backbone: WeightsArg = None,
    head: Literal["fpn", "mlp"] = "fpn",
    norm_layer: Callable[[int], nn.Module] | None = group_norm,
    ignore_index: int = IGNORE_INDEX,
    **backbone_options: Any,
) -> PVTv2Segmenter:
    """PVTv2 semantic segmenter.

    ``head="fpn"``: Semantic FPN as in the PVTv2 ADE20K results (FPN neck of width 256 on the four stages, then the
    Kirillov et al. head of width 128). ``head="mlp"``: SegFormer-style all-MLP head on the four stages, width 256 for
    B0-sized models (last stage <= 256 channels) and 768 otherwise.

    Args:
        variant: a variant name or ``PVTv2Config``.
        num_classes: number of classes (``ignore_index`` excluded).
        weights_backbone: backbone checkpoint path, passed to the backbone constructor as ``weights=``; its
            ``LoadReport`` is ``model.backbone.load_report``.
        head: ``"fpn"`` or ``"mlp"``.
        norm_layer: head norm factory (default GroupNorm, so batch size 1 trains; ``nn.BatchNorm2d`` for SyncBN).
        ignore_index: label ignored by ``loss``.
        **backbone_options: ``PVTv2Backbone`` options (``in_channels``, ``drop_path_rate``, ``frozen_stages``, ...).

    Example:
        >>> model = semantic_fpn_pvt_v2("b0", num_classes=19, head="mlp")
        >>> model(torch.rand(2, 3, 97, 130)).shape
        torch.Size([2, 19, 97, 130])
    """
    if head not in SEG_HEADS:
        raise ValueError(f"head must be one of {SEG_HEADS}, got {head!r}")
    check_int("ignore_index", ignore_index)
    if "weights" in backbone_options:
        raise TypeError("pass the backbone checkpoint as weights_backbone=, not weights=")
    config = get_config(variant)
    if weights_backbone is not None:
        backbone_options["weights"] = weights_backbone
    backbone = PVTv2Backbone(config, out_indices=(0, 1, 2, 3), **backbone_options)
    if head == "fpn":
        neck = FPN(backbone.channels, 256)
        decoder: nn.Module = SemanticFPNHead(
            [neck.out_channels] * len(backbone.channels), num_classes, norm_layer=norm_layer
        )
        return PVTv2Segmenter(backbone, decoder, neck=neck, ignore_index=ignore_index)
    width = 256 if config.embed_dims[-1] <= 256 else 768
    decoder = MLPSegHead(backbone.channels, num_classes, channels=width, norm_layer=norm_layer)
    return PVTv2Segmenter(backbone, decoder, ignore_index=ignore_index)
