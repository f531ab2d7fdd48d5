"""Optimizer parameter groups for PVTv2 models: no weight decay on norms and biases, optional backbone LR factor.

Recipes that train PVTv2 well (from the PVTv2 detection and segmentation releases): AdamW, lr 1e-4 (RetinaNet,
3x Mask R-CNN) to 2e-4 (1x Mask R-CNN, Semantic FPN), weight decay 1e-4 (1x schedules) to 0.05 (3x multi-scale);
torchvision's reference SGD settings (lr 0.02, momentum 0.9, wd 1e-4) train PVT poorly.

    >>> model = fasterrcnn_pvt_v2_fpn("b0", num_classes=3)
    >>> optimizer = torch.optim.AdamW(param_groups(model, lr=2e-4, weight_decay=1e-4))
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .backbone import PVTv2Trunk
from .checks import check_float

__all__ = ["param_groups", "NORM_TYPES"]

# Modules whose parameters are affine norm scales/shifts: never decayed.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def _backbone_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of the pretrained PVTv2 parameters: the patch embedding and stages of every trunk (no head, no neck)."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, PVTv2Trunk):
            for part in (module.patch_embed, module.stages):
                ids.update(id(p) for p in part.parameters())
    return ids


def _check_number(name: str, value: object, *, allow_zero: bool) -> float:
    """A finite number ``>= 0`` (``allow_zero``) or ``> 0``: ``ValueError`` otherwise, ``TypeError`` for a bool."""
    return check_float(name, value, minimum=0.0, inclusive=allow_zero)


def param_groups(
    model: nn.Module, *, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into optimizer groups.

    Biases, norm parameters (BatchNorm, GroupNorm, LayerNorm, ...) and every other 1-D parameter get weight decay 0;
    the rest get ``weight_decay``. Parameters of the PVTv2 backbone (patch embedding and stages of any
    ``PVTv2Backbone`` / ``PVTv2`` inside ``model``) get ``lr * backbone_lr_mult``; everything else (FPN, heads,
    classifier) gets ``lr``. Frozen parameters (``requires_grad=False``) are left out; shared parameters appear once.

    Returns:
        Up to four non-empty groups, each a dict with ``params``, ``lr``, ``weight_decay`` and ``name`` (one of
        ``"backbone_decay"``, ``"backbone_no_decay"``, ``"decay"``, ``"no_decay"``), for any ``torch.optim``
        optimizer.

    Example:
        >>> groups = param_groups(semantic_fpn_pvt_v2("b0", num_classes=2), lr=2e-4, weight_decay=1e-4)
        >>> [(g["name"], g["lr"], g["weight_decay"]) for g in groups]  # doctest: +NORMALIZE_WHITESPACE
        [('backbone_decay', 0.0002, 0.0001), ('backbone_no_decay', 0.0002, 0.0),
         ('decay', 0.0002, 0.0001), ('no_decay', 0.0002, 0.0)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    lr = _check_number("lr", lr, allow_zero=False)
    weight_decay = _check_number("weight_decay", weight_decay, allow_zero=True)
    backbone_lr_mult = _check_number("backbone_lr_mult", backbone_lr_mult, allow_zero=False)

    backbone_ids = _backbone_parameter_ids(model)
    groups: dict[str, dict[str, Any]] = {
        "backbone_decay": {"lr": lr * backbone_lr_mult, "weight_decay": weight_decay},
        "backbone_no_decay": {"lr": lr * backbone_lr_mult, "weight_decay": 0.0},
        "decay": {"lr": lr, "weight_decay": weight_decay},
        "no_decay": {"lr": lr, "weight_decay": 0.0},
    }
    members: dict[str, list[nn.Parameter]] = {name: [] for name in groups}
    seen: set[int] = set()
    for module in model.modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            no_decay = isinstance(module, NORM_TYPES) or param_name.endswith("bias") or param.ndim <= 1
            prefix = "backbone_" if id(param) in backbone_ids else ""
            members[prefix + ("no_decay" if no_decay else "decay")].append(param)
    return [{"params": members[name], "name": name, **settings} for name, settings in groups.items() if members[name]]
