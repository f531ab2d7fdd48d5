"""The PVTv2 multi-scale backbone: stages, the shared trunk, and ``PVTv2Backbone`` with one constructor per variant.

Parameter names equal timm's ``pvt_v2`` (``patch_embed.*``, ``stages.{i}.downsample.*``, ``stages.{i}.blocks.{j}.*``,
``stages.{i}.norm.*``), so a timm classifier state dict minus ``head.*`` loads by identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from typing_extensions import TypedDict, Unpack

from . import fast_inference
from .checks import check_int, check_rate
from .config import PATCH_SIZES, PATCH_STRIDES, FeatureSpec, PVTv2Config, get_config, normalize_out_indices
from .layers import Block, OverlapPatchEmbed, init_weights
from .weights import LoadReport, WeightsLike, load_weights

__all__ = ["PVTv2Backbone", "PVTv2Trunk", "PVTv2Stage", "BackboneOptions"]


class BackboneOptions(TypedDict, total=False):
    """Keyword options shared by every backbone and classifier constructor."""

    in_channels: int
    drop_path_rate: float
    attn_drop_rate: float
    proj_drop_rate: float
    frozen_stages: int
    grad_checkpointing: bool
    norm_layer: Callable[[int], nn.Module] | None
    weights: WeightsLike | None


def _autocast_mixes(device_type: str, *dtypes: torch.dtype) -> bool:
    """Whether autocast is on for ``device_type`` and casts all ``dtypes`` (it never casts float64)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return False
    return enabled and torch.float64 not in dtypes


class PVTv2Stage(nn.Module):
    """One stage on (B, H, W, C) tokens: [downsample] -> blocks -> LayerNorm. Stage 0's embedding lives outside."""

    def __init__(
        self,
        config: PVTv2Config,
        index: int,
        *,
        drop_path_rates: Sequence[float],
        attn_drop_rate: float,
        proj_drop_rate: float,
        norm_layer: Callable[[int], nn.Module] | None,
    ) -> None:
        super().__init__()
        dim = config.embed_dims[index]
        self.downsample: OverlapPatchEmbed | None = None
        if index > 0:
            self.downsample = OverlapPatchEmbed(
                config.embed_dims[index - 1],
                dim,
                patch_size=PATCH_SIZES[index],
                stride=PATCH_STRIDES[index],
                eps=config.embed_norm_eps,
            )
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads=config.num_heads[index],
                hidden_dim=config.hidden_dim(index),
                sr_ratio=config.sr_ratios[index],
                linear=config.linear,
                qkv_bias=config.qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=rate,
                norm_eps=config.norm_eps,
                sr_norm_eps=config.embed_norm_eps,
                norm_layer=norm_layer,
            )
            for rate in drop_path_rates
        )
        self.norm = norm_layer(dim) if norm_layer is not None else nn.LayerNorm(dim, eps=config.norm_eps)
        self.grad_checkpointing = False
        self.fast_inference = True

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C_prev) tokens (stage 0: the embedded image) -> (B, H', W', C) normalized tokens.

        Under torch.fx symbolic tracing (``x`` a ``torch.fx.Proxy``) only the plain ``Block.forward`` loop is
        recorded: the batch-size test, the inference path and checkpointing branch on values a proxy does not have.
        """
        if isinstance(x, torch.fx.Proxy):
            if self.downsample is not None:
                x = self.downsample(x.permute(0, 3, 1, 2))
            for block in self.blocks:
                x = block(x)
            return self.norm(x)
        # The one place the inference path is chosen: same function, fewer allocations (see fast_inference).
        fast = self.fast_inference and fast_inference.applies(self)
        if self.downsample is not None:
            x = x.permute(0, 3, 1, 2)
            x = fast_inference.patch_embed_forward(self.downsample, x) if fast else self.downsample(x)
        if x.shape[0] == 0:  # an empty batch: every block maps it to itself, and attention cannot reshape nothing
            return self.norm(x)
        return self.norm(self._blocks_forward(x, fast=fast))

    def _blocks_forward(self, x: Tensor, *, fast: bool) -> Tensor:
        """The blocks on (B, H, W, C) tokens: the inference path, checkpointed, or plain."""
        if fast:
            for block in self.blocks:
                x = fast_inference.block_forward(block, x)
        elif self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            for block in self.blocks:
                x = block(x)
        return x


class PVTv2Trunk(nn.Module):
    """Patch embedding and the first ``num_stages`` stages; shared by the backbone and the classifier.

    Subclasses set ``out_indices`` (sorted stage indices whose maps ``forward_features`` returns).
    """

    out_indices: tuple[int, ...]

    def __init__(
        self,
        config: PVTv2Config | str,
        *,
        num_stages: int,
        in_channels: int = 3,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        frozen_stages: int = 0,
        grad_checkpointing: bool = False,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        config = get_config(config)
        self.config = config
        self.in_channels = check_int("in_channels", in_channels, minimum=1)
        self.drop_path_rate = check_rate("drop_path_rate", drop_path_rate)
        self.min_input_size = config.min_input_size(num_stages)
        self.patch_embed = OverlapPatchEmbed(
            in_channels,
            config.embed_dims[0],
            patch_size=PATCH_SIZES[0],
            stride=PATCH_STRIDES[0],
            eps=config.embed_norm_eps,
        )
        # Stochastic depth ramps linearly over all blocks of the full model, built or not, as in the reference.
        total = sum(config.depths)
        rates = [self.drop_path_rate * k / (total - 1) if total > 1 else 0.0 for k in range(total)]
        starts = [sum(config.depths[:i]) for i in range(len(config.depths))]
        self.stages = nn.ModuleList(
            PVTv2Stage(
                config,
                i,
                drop_path_rates=rates[starts[i] : starts[i] + config.depths[i]],
                attn_drop_rate=check_rate("attn_drop_rate", attn_drop_rate),
                proj_drop_rate=check_rate("proj_drop_rate", proj_drop_rate),
                norm_layer=norm_layer,
            )
            for i in range(num_stages)
        )
        self.apply(init_weights)
        self.frozen_stages = 0
        self.freeze_stages(frozen_stages)
        self.set_grad_checkpointing(grad_checkpointing)

    # -- training switches -------------------------------------------------------------------------------------
    def _stage_groups(self) -> list[list[nn.Module]]:
        """Stage i with its patch embedding: stage 0 owns the top-level ``patch_embed``."""
        return [([self.patch_embed] if i == 0 else []) + [stage] for i, stage in enumerate(self.stages)]

    def freeze_stages(self, num_stages: int) -> None:
        """Freeze the first ``num_stages`` stages (with their patch embeddings); make the others trainable.

        Frozen parameters get ``requires_grad=False`` and frozen stages stay in eval mode across ``.train()``.
        ``freeze_stages(0)`` unfreezes everything.
        """
        built = len(self.stages)
        check_int("frozen_stages", num_stages, minimum=0, maximum=built)  # at most the stages built
        self.frozen_stages = num_stages
        for index, group in enumerate(self._stage_groups()):
            for module in group:
                module.requires_grad_(index >= num_stages)
        self.train(self.training)

    def train(self, mode: bool = True) -> PVTv2Trunk:
        super().train(mode)
        for group in self._stage_groups()[: self.frozen_stages]:
            for module in group:
                module.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in the backward pass instead of storing its activations (non-reentrant)."""
        for stage in self.stages:
            stage.grad_checkpointing = bool(enable)

    @property
    def grad_checkpointing(self) -> bool:
        return all(stage.grad_checkpointing for stage in self.stages)

    def set_fast_inference(self, enable: bool = True) -> None:
        """Use :mod:`pvt_backbone.fast_inference` in eval mode without autograd (the default), or always ``forward``."""
        for stage in self.stages:
            stage.fast_inference = bool(enable)

    # -- forward -----------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if isinstance(x, torch.fx.Proxy):  # symbolic tracing (torchvision's feature extraction): no values to check
            return
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor of shape (B, {self.in_channels}, H, W), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D (B, {self.in_channels}, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channels (in_channels={self.in_channels}), "
                f"got {x.shape[1]} in shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point input, got dtype {x.dtype}; convert with x.float()")
        dtype = self.patch_embed.proj.weight.dtype
        if x.dtype != dtype and not _autocast_mixes(x.device.type, x.dtype, dtype):
            raise TypeError(
                f"input dtype {x.dtype} does not match the model's {dtype}; convert with x.to({dtype}), or run "
                "under autocast (pvt_backbone.amp.autocast)"
            )
        height, width = x.shape[-2:]
        if height < self.min_input_size or width < self.min_input_size:
            raise ValueError(
                f"input {height}x{width} is too small: this configuration needs both sides >= {self.min_input_size} "
                "px, because standard spatial-reduction attention reduces keys/values with an sr_ratio x sr_ratio "
                "conv and every stage map must be at least that large (the stage-1 map, ceil(H/4), must be >= 8 "
                "for sr_ratio 8, i.e. >= 29 px)"
            )

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """(B, C_in, H, W) image -> {str(i): (B, C_i, ceil-sized H_i, W_i)} for i in ``out_indices``; B may be 0.

        The maps are NCHW views of channels-last memory (``x.is_contiguous(memory_format=torch.channels_last)``).
        """
        self._check_input(x)
        tokens = self.patch_embed(x)
        features: dict[str, Tensor] = {}
        for index, stage in enumerate(self.stages):
            tokens = stage(tokens)
            if index in self.out_indices:
                features[str(index)] = tokens.permute(0, 3, 1, 2)
        return features


class PVTv2Backbone(PVTv2Trunk):
    """PVTv2 feature pyramid: an image in, one NCHW map per requested stage out.

    Stage i has ``config.embed_dims[i]`` channels and stride ``4 * 2**i``; its size is ceil-based
    (h_0 = ceil(H / 4), h_{i+1} = ceil(h_i / 2)), so a 250x333 input gives 63x84, 32x42, 16x21 and 8x11.
    Stages after ``max(out_indices)`` are not built.

    Args:
        config: a ``PVTv2Config`` or a variant name from ``VARIANTS``.
        out_indices: stages to return (negatives count from the last); normalized to sorted indices.
        in_channels: image channels.
        drop_path_rate: stochastic depth, ramped linearly from 0 over all blocks.
        attn_drop_rate: dropout on attention weights (training only).
        proj_drop_rate: dropout after the attention projection and in the MLP.
        frozen_stages: freeze the first k stages with their patch embeddings (see ``freeze_stages``).
        grad_checkpointing: recompute each block in the backward pass.
        norm_layer: factory for the block and stage norms (default ``LayerNorm(eps=config.norm_eps)``).
        weights: checkpoint to load strictly after construction, in any layout (path, ``hf-hub:REPO``, dict, or a
            published name such as ``"pvt_v2_b2.in1k"`` or enum member, see ``pvt_backbone.weights.hub``); a
            classifier head in it is dropped, stages after ``max(out_indices)`` too (see ``load_weights``). What was
            loaded is kept as ``load_report`` (a ``LoadReport``; ``None`` without weights).

    torchvision's ``create_feature_extractor`` / ``get_graph_node_names`` trace it with torch.fx: node ``stages.{i}``
    is stage i's output as (B, H_i, W_i, C_i) tokens (``.permute(0, 3, 1, 2)`` gives the map ``forward`` returns),
    ``stages.{i}.blocks.{j}`` a block's output in the same layout.

    Example:
        >>> model = PVTv2Backbone.b2(out_indices=(0, 1, 2, 3))
        >>> {k: tuple(v.shape) for k, v in model(torch.rand(1, 3, 224, 224)).items()}
        {'0': (1, 64, 56, 56), '1': (1, 128, 28, 28), '2': (1, 320, 14, 14), '3': (1, 512, 7, 7)}
    """

    def __init__(
        self,
        config: PVTv2Config | str,
        *,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        **options: Unpack[BackboneOptions],
    ) -> None:
        config = get_config(config)
        indices = normalize_out_indices(out_indices, len(config.depths))
        weights = options.pop("weights", None)
        super().__init__(config, num_stages=indices[-1] + 1, **options)
        self.out_indices = indices
        self.feature_info: tuple[FeatureSpec, ...] = config.feature_info(indices)
        # What ``weights=`` loaded (None without weights); a surprising load also warns (``LoadWarning``).
        self.load_report: LoadReport | None = None
        if weights is not None:
            self.load_report = load_weights(self, weights)

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of the returned maps, in ``out_indices`` order."""
        return tuple(spec.channels for spec in self.feature_info)

    @property
    def strides(self) -> tuple[int, ...]:
        """Strides of the returned maps w.r.t. the input, in ``out_indices`` order."""
        return tuple(spec.stride for spec in self.feature_info)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(B, C_in, H, W) floating image -> ``{str(i): (B, C_i, H_i, W_i)}``, highest resolution first."""
        return self.forward_features(x)

    @classmethod
    def from_config(
        cls, config: PVTv2Config | str, *, out_indices: Sequence[int] = (0, 1, 2, 3), **options: Unpack[BackboneOptions]
    ) -> PVTv2Backbone:
        """Build from a ``PVTv2Config`` or a variant name (``"b0"`` ... ``"b5"``, ``"b2_li"``)."""
        return cls(config, out_indices=out_indices, **options)

    @classmethod
    def b0(cls, *, out_indices: Sequence[int] = (0, 1, 2, 3), **options: Unpack[BackboneOptions]) -> PVTv2Backbone:
        """PVTv2-B0: channels 32/64/160/256, depths 2/2/2/2 (3.41M parameters with all stages)."""
        return cls("b0", out_indices=out_indices, **options)

    @classmethod
    def b1(cls, *, out_indices: Sequence[int] = (0, 1, 2, 3), **options: Unpack[BackboneOptions]) -> PVTv2Backbone:
        """PVTv2-B1: channels 64/128/320/512, depths 2/2/2/2 (13.50M parameters)."""
        return cls("b1", out_indices=out_indices, **options)

    @classmethod
    def b2(cls, *, out_indices: Sequence[int] = (0, 1, 2, 3), **options: Unpack[BackboneOptions]) -> PVTv2Backbone:
        """PVTv2-B2: channels 64/128/320/512, depths 3/4/6/3 (24.85M parameters)."""
        return cls("b2", out_indices=out_indices, **options)

    @classmethod
    def b2_li(cls, *, out_indices: Sequence[int] = (0, 1, 2, 3), **options: Unpack[BackboneOptions]) -> PVTv2Backbone:
        """PVTv2-B2-Li: B2 with linear spatial-reduction attention (22.04M parameters)."""
        return cls("b2_li", out_indices=out_indices, **options)

    @classmethod
    def b3(cls, *, out_indices: Sequence[int] = (0, 1, 2, 3), **options: Unpack[BackboneOptions]) -> PVTv2Backbone:
        """PVTv2-B3: channels 64/128/320/512, depths 3/4/18/3 (44.73M parameters)."""
        return cls("b3", out_indices=out_indices, **options)

    @classmethod
    def b4(cls, *, out_indices: Sequence[int] = (0, 1, 2, 3), **options: Unpack[BackboneOptions]) -> PVTv2Backbone:
        """PVTv2-B4: channels 64/128/320/512, depths 3/8/27/3 (62.04M parameters)."""
        return cls("b4", out_indices=out_indices, **options)

    @classmethod
    def b5(cls, *, out_indices: Sequence[int] = (0, 1, 2, 3), **options: Unpack[BackboneOptions]) -> PVTv2Backbone:
        """PVTv2-B5: channels 64/128/320/512, depths 3/6/40/3, MLP ratio 4 (81.44M parameters)."""
        return cls("b5", out_indices=out_indices, **options)
