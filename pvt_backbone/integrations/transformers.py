"""PVTv2 backbones inside transformers' detectors and segmenters (extra ``[hf]``).

transformers' heads get their backbone from ``load_backbone(config)``: they read its ``channels`` when they are built
and call it with ``pixel_values`` for ``BackboneOutput.feature_maps``, a tuple of (B, C_i, H_i, W_i) maps in stage
order. ``TransformersBackbone`` gives a ``PVTv2Backbone`` that interface, ``swap_backbone`` puts one in place of a
built model's backbone after checking channels and strides, and the ``*_pvt_v2`` builders configure a model for a
PVTv2 variant in code (nothing is downloaded) and swap ours in.

Where each model keeps the backbone that is replaced, and what its strides are checked against:

===================================  ====================================  ==========================================
model                                backbone module                       strides checked against
===================================  ====================================  ==========================================
Mask2FormerForUniversalSegmentation  ``model.pixel_level_module.encoder``  ``config.feature_strides``
UperNetForSemanticSegmentation       ``backbone``                          ``config.backbone_config`` (PvtV2Config)
DeformableDetrForObjectDetection     ``model.backbone.model``              ``config.backbone_config`` (PvtV2Config)
RTDetrForObjectDetection             ``model.backbone.model``              ``config.feat_strides``
RTDetrV2ForObjectDetection           ``model.backbone.model``              ``config.feat_strides``
===================================  ====================================  ==========================================

The base models (``Mask2FormerModel``, ``DeformableDetrModel``, ``RTDetrModel``, ``RTDetrV2Model``) keep it at the
same path without the leading ``model.``. Channels are always checked against the replaced backbone's ``channels``
(what the head was built for).

Example:
    >>> from pvt_backbone.integrations.transformers import upernet_pvt_v2
    >>> model = upernet_pvt_v2("b0", num_labels=3, hidden_size=32, auxiliary_channels=16).eval()
    >>> tuple(model(torch.rand(1, 3, 61, 77)).logits.shape)
    (1, 3, 61, 77)
    >>> type(model.backbone).__name__, model.backbone.out_features, model.backbone.channels
    ('TransformersBackbone', ['stage1', 'stage2', 'stage3', 'stage4'], [32, 64, 160, 256])
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import transformers
from torch import Tensor, nn
from transformers.modeling_outputs import BackboneOutput

from ..backbone import PVTv2Backbone
from ..checks import check_int
from ..config import NUM_STAGES, PVTv2Config, get_config, normalize_out_indices
from ..weights import WeightsSource, load_weights

__all__ = [
    "STAGE_NAMES",
    "TransformersBackbone",
    "as_transformers_backbone",
    "hf_pvt_v2_config",
    "backbone_from_hf",
    "find_backbone",
    "swap_backbone",
    "mask2former_pvt_v2",
    "upernet_pvt_v2",
    "deformable_detr_pvt_v2",
    "rt_detr_pvt_v2",
]

# transformers' names of the four PVTv2 stages (``PvtV2Config.stage_names``).
STAGE_NAMES: tuple[str, ...] = tuple(f"stage{i + 1}" for i in range(NUM_STAGES))


class TransformersBackbone(nn.Module):
    """A ``PVTv2Backbone`` with the interface transformers' heads expect from ``load_backbone``.

    Its state dict is the wrapped backbone's under ``backbone.`` (``backbone.patch_embed.*``,
    ``backbone.stages.{i}.*``), so our checkpoints load into it with that prefix.

    Attributes (as on transformers' ``PvtV2Backbone``): ``stage_names`` (``stage1`` ... ``stage4``), ``out_indices``
    and ``out_features`` (the returned stages, 0-based indices and names), ``channels`` (their widths),
    ``num_features`` (the width of every stage), ``out_feature_channels`` (stage name -> width); also ``strides``.

    ``forward`` returns ``BackboneOutput``: ``feature_maps`` is the tuple of (B, C_i, H_i, W_i) maps of
    ``out_indices`` in stage order (ceil-sized: H_0 = ceil(H / 4), H_{i+1} = ceil(H_i / 2)); ``hidden_states`` is
    ``None`` unless ``output_hidden_states`` is true, then the maps of every built stage (all four when stage 4 is
    returned, as transformers' ``PvtV2Backbone`` gives); ``attentions`` is always ``None``: the attention is computed
    fused and its weights are never materialised (``has_attentions = False``).

    Example:
        >>> adapter = TransformersBackbone(PVTv2Backbone.b0(out_indices=(1, 2, 3)))
        >>> out = adapter(torch.rand(1, 3, 64, 64), output_hidden_states=True)
        >>> [tuple(m.shape) for m in out.feature_maps], len(out.hidden_states), out.attentions
        ([(1, 64, 8, 8), (1, 160, 4, 4), (1, 256, 2, 2)], 4, None)
        >>> adapter.out_features, next(iter(adapter.state_dict()))
        (['stage2', 'stage3', 'stage4'], 'backbone.patch_embed.proj.weight')
    """

    has_attentions = False

    def __init__(self, backbone: PVTv2Backbone) -> None:
        super().__init__()
        if not isinstance(backbone, PVTv2Backbone):
            raise TypeError(f"backbone must be a PVTv2Backbone, got {type(backbone).__name__}")
        self.backbone = backbone
        self.stage_names = list(STAGE_NAMES)

    @property
    def out_indices(self) -> list[int]:
        """0-based indices of the returned stages, sorted."""
        return list(self.backbone.out_indices)

    @property
    def out_features(self) -> list[str]:
        """Names of the returned stages (``stage1`` ... ``stage4``), in stage order."""
        return [self.stage_names[i] for i in self.backbone.out_indices]

    @property
    def channels(self) -> list[int]:
        """Channels of the returned maps, in stage order."""
        return list(self.backbone.channels)

    @property
    def strides(self) -> list[int]:
        """Strides of the returned maps w.r.t. the input, in stage order."""
        return list(self.backbone.strides)

    @property
    def num_features(self) -> list[int]:
        """Channels of every stage of the variant, returned or not."""
        return list(self.backbone.config.embed_dims)

    @property
    def out_feature_channels(self) -> dict[str, int]:
        """Stage name -> channels, for every stage."""
        return dict(zip(self.stage_names, self.num_features))

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BackboneOutput | tuple[tuple[Tensor, ...], ...]:
        """(B, C_in, H, W) image -> ``BackboneOutput`` (see the class); ``return_dict=False`` gives the tuple
        ``(feature_maps,)``, plus ``(hidden_states,)`` when they are requested. ``output_attentions`` is accepted and
        ignored (``attentions`` is ``None``)."""
        hidden: tuple[Tensor, ...] | None = None
        if output_hidden_states:
            features, hidden = self._with_stage_maps(pixel_values)
        else:
            features = self.backbone(pixel_values)
        feature_maps = tuple(features[str(i)] for i in self.backbone.out_indices)
        if return_dict is False:
            return (feature_maps,) if hidden is None else (feature_maps, hidden)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden, attentions=None)

    def _with_stage_maps(self, pixel_values: Tensor) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
        """Run the backbone once, also keeping every built stage's (B, H_i, W_i, C_i) tokens as an NCHW map."""
        captured: list[Tensor] = []

        def keep(_module: nn.Module, _inputs: object, output: Tensor) -> None:
            captured.append(output.permute(0, 3, 1, 2))

        handles = [stage.register_forward_hook(keep) for stage in self.backbone.stages]
        try:
            features = self.backbone(pixel_values)
        finally:
            for handle in handles:
                handle.remove()
        return features, tuple(captured)

    def forward_with_filtered_kwargs(
        self, *args: Any, **kwargs: Any
    ) -> BackboneOutput | tuple[tuple[Tensor, ...], ...]:
        """``forward`` without ``output_attentions`` (``has_attentions`` is false), as ``BackboneMixin`` does."""
        kwargs.pop("output_attentions", None)
        return self(*args, **kwargs)


def as_transformers_backbone(backbone: PVTv2Backbone | TransformersBackbone) -> TransformersBackbone:
    """``backbone`` itself if it is a ``TransformersBackbone``, else a ``PVTv2Backbone`` wrapped in one."""
    if isinstance(backbone, TransformersBackbone):
        return backbone
    if isinstance(backbone, PVTv2Backbone):
        return TransformersBackbone(backbone)
    raise TypeError(f"backbone must be a PVTv2Backbone or a TransformersBackbone, got {type(backbone).__name__}")


# -- configs both ways ---------------------------------------------------------------------------------------------
def _whole(name: str, values: Sequence[float]) -> list[int]:
    if any(float(v) != int(v) for v in values):
        raise ValueError(f"transformers' PvtV2Config takes whole {name}, got {tuple(values)!r}")
    return [int(v) for v in values]


def hf_pvt_v2_config(
    variant: PVTv2Config | str, *, out_indices: Sequence[int] = (0, 1, 2, 3)
) -> transformers.PvtV2Config:
    """transformers' ``PvtV2Config`` of a PVTv2 variant (ours: a ``PVTv2Config`` or a name from ``VARIANTS``).

    transformers' PvtV2 uses one LayerNorm eps everywhere (``layer_norm_eps``, set from ``norm_eps``); our
    variants use ``embed_norm_eps`` = 1e-5 in the patch-embedding and spatial-reduction norms, as the reference.

    >>> hf = hf_pvt_v2_config("b2", out_indices=(1, 2, 3))
    >>> hf.hidden_sizes, hf.depths, hf.out_features, hf.layer_norm_eps
    ([64, 128, 320, 512], [3, 4, 6, 3], ['stage2', 'stage3', 'stage4'], 1e-06)
    """
    config = get_config(variant)
    return transformers.PvtV2Config(
        hidden_sizes=list(config.embed_dims),
        depths=list(config.depths),
        num_attention_heads=list(config.num_heads),
        mlp_ratios=_whole("mlp_ratios", config.mlp_ratios),
        sr_ratios=list(config.sr_ratios),
        qkv_bias=config.qkv_bias,
        linear_attention=config.linear,
        layer_norm_eps=config.norm_eps,
        out_indices=list(normalize_out_indices(out_indices)),
    )


def backbone_from_hf(backbone: nn.Module) -> PVTv2Backbone:
    """Our ``PVTv2Backbone`` equal to a transformers ``PvtV2Backbone`` (its config, out_indices and weights).

    The weights go through our ``hf`` layout converter (``load_weights``, strict); every LayerNorm gets
    transformers' ``layer_norm_eps``, so the maps match transformers' own.

    >>> hf = transformers.PvtV2Backbone(hf_pvt_v2_config("b0", out_indices=(2, 3))).eval()
    >>> ours = backbone_from_hf(hf).eval()
    >>> x = torch.rand(1, 3, 64, 64)
    >>> all(torch.allclose(a, b, atol=1e-5) for a, b in zip(hf(x).feature_maps, ours(x).values()))
    True
    """
    config = getattr(backbone, "config", None)
    if not isinstance(config, transformers.PvtV2Config):
        raise TypeError(f"backbone must be a transformers PvtV2Backbone, got {type(backbone).__name__}")
    eps = config.layer_norm_eps
    ours = PVTv2Config(
        embed_dims=tuple(config.hidden_sizes),
        depths=tuple(config.depths),
        num_heads=tuple(config.num_attention_heads),
        mlp_ratios=tuple(config.mlp_ratios),
        sr_ratios=tuple(config.sr_ratios),
        qkv_bias=config.qkv_bias,
        linear=config.linear_attention,
        embed_norm_eps=eps,
        norm_eps=eps,
    )
    result = PVTv2Backbone(ours, out_indices=tuple(config.out_indices), in_channels=config.num_channels)
    load_weights(result, backbone.state_dict(), layout="hf")
    return result.to(next(backbone.parameters()).device).train(backbone.training)


# -- swapping ------------------------------------------------------------------------------------------------------
# Model class name -> (path of the backbone module, the config attribute declaring the strides of its maps).
_SLOTS: dict[str, tuple[str, str | None]] = {
    "Mask2FormerForUniversalSegmentation": ("model.pixel_level_module.encoder", "feature_strides"),
    "Mask2FormerModel": ("pixel_level_module.encoder", "feature_strides"),
    "UperNetForSemanticSegmentation": ("backbone", None),
    "DeformableDetrForObjectDetection": ("model.backbone.model", None),
    "DeformableDetrModel": ("backbone.model", None),
    "RTDetrForObjectDetection": ("model.backbone.model", "feat_strides"),
    "RTDetrModel": ("backbone.model", "feat_strides"),
    "RTDetrV2ForObjectDetection": ("model.backbone.model", "feat_strides"),
    "RTDetrV2Model": ("backbone.model", "feat_strides"),
}


def _slot(model: nn.Module) -> tuple[nn.Module, str, str | None]:
    """(module holding the backbone, its attribute name, the strides config attribute) for a supported model."""
    for cls in type(model).__mro__:
        if cls.__name__ in _SLOTS:
            path, strides_attr = _SLOTS[cls.__name__]
            *parents, name = path.split(".")
            holder = model
            for part in parents:
                holder = getattr(holder, part)
            return holder, name, strides_attr
    raise TypeError(
        f"swap_backbone does not know where {type(model).__name__} keeps its backbone; supported: {sorted(_SLOTS)}"
    )


def _expected_strides(model: nn.Module, strides_attr: str | None, current: nn.Module) -> tuple[list[int] | None, str]:
    """Strides the model was configured for and where that came from; ``None`` where nothing declares them."""
    config = getattr(model, "config", None)
    declared = getattr(config, strides_attr, None) if strides_attr else None
    if declared is not None:
        return [int(s) for s in declared], f"config.{strides_attr}"
    if isinstance(current, TransformersBackbone):
        return current.strides, "the backbone it replaces"
    backbone_config = getattr(config, "backbone_config", None)
    patch_strides = getattr(backbone_config, "strides", None)
    indices = getattr(backbone_config, "out_indices", None)
    if patch_strides is None or indices is None:
        return None, ""
    cumulative = list(itertools.accumulate(patch_strides, operator.mul))
    return [cumulative[i] for i in indices], "config.backbone_config (strides at out_indices)"


def _check_fit(
    model: nn.Module, holder: nn.Module, strides_attr: str | None, current: nn.Module, new: TransformersBackbone
) -> None:
    name = type(model).__name__
    described = f"the PVTv2 backbone (out_indices {new.out_indices})"
    # A timm backbone inside the DETR family is unwrapped and has no ``channels``: its encoder keeps them.
    expected = getattr(current, "channels", None) or getattr(holder, "intermediate_channel_sizes", None)
    if expected is not None and list(expected) != new.channels:
        raise ValueError(
            f"{name} was built for backbone channels {list(expected)}, got {new.channels} from {described}; "
            "choose out_indices giving those channels, or build the model for this backbone (e.g. with the "
            "*_pvt_v2 builders of pvt_backbone.integrations.transformers)"
        )
    strides, source = _expected_strides(model, strides_attr, current)
    if strides is not None and strides != new.strides:
        raise ValueError(f"{name} was configured for strides {strides} ({source}), got {new.strides} from {described}")


def find_backbone(model: nn.Module) -> nn.Module:
    """The backbone module of a supported transformers model (see the module docstring for where it lives).

    >>> find_backbone(upernet_pvt_v2("b0", num_labels=2)).out_indices
    [0, 1, 2, 3]
    """
    holder, name, _ = _slot(model)
    return getattr(holder, name)


def swap_backbone(model: nn.Module, backbone: PVTv2Backbone | TransformersBackbone) -> nn.Module:
    """Put ``backbone`` in place of the backbone of a transformers detector/segmenter; returns ``model``.

    Supported models and where their backbone lives: see the module docstring. The new backbone must return the
    channels the head was built with (the replaced backbone's ``channels``) and the strides the model declares;
    otherwise ``ValueError`` names both. The backbone takes the replaced one's train/eval mode; it is not moved to
    another device or dtype. ``model.config.backbone_config`` is left as it was.

    Raises:
        TypeError: ``model`` is not a supported class, or ``backbone`` is neither a ``PVTv2Backbone`` nor a
            ``TransformersBackbone``.
        ValueError: channels or strides differ from what the model was configured for.
    """
    adapter = as_transformers_backbone(backbone)
    holder, name, strides_attr = _slot(model)
    current = getattr(holder, name)
    _check_fit(model, holder, strides_attr, current, adapter)
    adapter.train(current.training)
    setattr(holder, name, adapter)
    return model


# -- builders ------------------------------------------------------------------------------------------------------
_BACKBONE_KEYS = frozenset(
    {"backbone_config", "backbone", "use_timm_backbone", "use_pretrained_backbone", "backbone_kwargs"}
)


def _build(
    model_class: Callable[[Any], nn.Module],
    config_class: Callable[..., Any],
    variant: PVTv2Config | str,
    *,
    out_indices: tuple[int, ...],
    num_labels: int,
    weights_backbone: WeightsSource | None,
    backbone_options: Mapping[str, Any] | None,
    defaults: Callable[[PVTv2Backbone], dict[str, Any]],
    overrides: dict[str, Any],
) -> nn.Module:
    """Our backbone, a model config built for it in code (no download), the model, and the swap."""
    clash = sorted(_BACKBONE_KEYS & set(overrides))
    if clash:
        raise TypeError(f"{clash} cannot be overridden: the backbone config is built from variant={variant!r}")
    check_int("num_labels", num_labels, minimum=1)
    backbone = PVTv2Backbone(variant, out_indices=out_indices, weights=weights_backbone, **dict(backbone_options or {}))
    config = config_class(
        backbone_config=hf_pvt_v2_config(backbone.config, out_indices=out_indices),
        use_pretrained_backbone=False,
        num_labels=num_labels,
        **{**defaults(backbone), **overrides},
    )
    return swap_backbone(model_class(config), backbone)


_BUILDER_ARGS = """
    Args:
        variant: a ``PVTv2Config`` or a variant name (``"b0"`` ... ``"b5"``, ``"b2_li"``).
        num_labels: classes of the head ({labels}).
        weights_backbone: backbone checkpoint in any layout our loader reads (path, ``hf-hub:REPO`` or dict),
            loaded strictly by ``PVTv2Backbone(weights=...)``; ``None``: random initialisation.
        backbone_options: more ``PVTv2Backbone`` keywords (``drop_path_rate``, ``frozen_stages``,
            ``grad_checkpointing``, ...).
        **config_overrides: keyword arguments of ``{config}`` (decoder widths, queries, layers, losses...); the
            backbone keys (``backbone_config``, ``backbone``, ``use_timm_backbone``, ``use_pretrained_backbone``,
            ``backbone_kwargs``) are set here and raise ``TypeError``.
"""


def mask2former_pvt_v2(
    variant: PVTv2Config | str,
    *,
    num_labels: int,
    weights_backbone: WeightsSource | None = None,
    backbone_options: Mapping[str, Any] | None = None,
    **config_overrides: Any,
) -> nn.Module:
    """``Mask2FormerForUniversalSegmentation`` over all four PVTv2 stages (strides 4, 8, 16, 32).

    The pixel decoder consumes the four maps (its deformable encoder the last three, the mask features stride 4).
    """
    return _build(
        transformers.Mask2FormerForUniversalSegmentation,
        transformers.Mask2FormerConfig,
        variant,
        out_indices=(0, 1, 2, 3),
        num_labels=num_labels,
        weights_backbone=weights_backbone,
        backbone_options=backbone_options,
        defaults=lambda backbone: {"feature_strides": list(backbone.strides)},
        overrides=config_overrides,
    )


def upernet_pvt_v2(
    variant: PVTv2Config | str,
    *,
    num_labels: int,
    weights_backbone: WeightsSource | None = None,
    backbone_options: Mapping[str, Any] | None = None,
    **config_overrides: Any,
) -> nn.Module:
    """``UperNetForSemanticSegmentation`` over all four PVTv2 stages.

    The UPerNet head consumes the four maps (PPM on stage 4, FPN over all); the auxiliary FCN head stage 3.
    """
    return _build(
        transformers.UperNetForSemanticSegmentation,
        transformers.UperNetConfig,
        variant,
        out_indices=(0, 1, 2, 3),
        num_labels=num_labels,
        weights_backbone=weights_backbone,
        backbone_options=backbone_options,
        defaults=lambda backbone: {},
        overrides=config_overrides,
    )


def deformable_detr_pvt_v2(
    variant: PVTv2Config | str,
    *,
    num_labels: int,
    weights_backbone: WeightsSource | None = None,
    backbone_options: Mapping[str, Any] | None = None,
    **config_overrides: Any,
) -> nn.Module:
    """``DeformableDetrForObjectDetection`` over PVTv2 stages 2-4 (strides 8, 16, 32).

    The encoder consumes the three maps plus a fourth level made from stage 4 by a stride-2 conv
    (``num_feature_levels=4``). Multi-scale deformable attention runs in pure PyTorch unless a hub kernel is
    installed.
    """
    return _build(
        transformers.DeformableDetrForObjectDetection,
        transformers.DeformableDetrConfig,
        variant,
        out_indices=(1, 2, 3),
        num_labels=num_labels,
        weights_backbone=weights_backbone,
        backbone_options=backbone_options,
        defaults=lambda backbone: {},
        overrides=config_overrides,
    )


def rt_detr_pvt_v2(
    variant: PVTv2Config | str,
    *,
    num_labels: int,
    weights_backbone: WeightsSource | None = None,
    backbone_options: Mapping[str, Any] | None = None,
    **config_overrides: Any,
) -> nn.Module:
    """``RTDetrForObjectDetection`` over PVTv2 stages 2-4 (strides 8, 16, 32).

    The hybrid encoder consumes the three maps (``encoder_in_channels`` and ``feat_strides`` are set from the
    backbone); its FPN upsamples by exactly 2, so image sides must be multiples of 32.
    """
    return _build(
        transformers.RTDetrForObjectDetection,
        transformers.RTDetrConfig,
        variant,
        out_indices=(1, 2, 3),
        num_labels=num_labels,
        weights_backbone=weights_backbone,
        backbone_options=backbone_options,
        defaults=lambda backbone: {
            "encoder_in_channels": list(backbone.channels),
            "feat_strides": list(backbone.strides),
        },
        overrides=config_overrides,
    )


for _builder, _labels, _config in (
    (mask2former_pvt_v2, "the class predictor adds a no-object class", "transformers.Mask2FormerConfig"),
    (upernet_pvt_v2, "at least 2 for the loss", "transformers.UperNetConfig"),
    (deformable_detr_pvt_v2, "the detection classes", "transformers.DeformableDetrConfig"),
    (rt_detr_pvt_v2, "the detection classes", "transformers.RTDetrConfig"),
):
    _builder.__doc__ = (_builder.__doc__ or "") + _BUILDER_ARGS.format(labels=_labels, config=_config)
