"""PVTv2 building blocks: overlapping patch embedding, spatial-reduction attention, depthwise-conv MLP, block.

Architecture from "PVT v2: Improved Baselines with Pyramid Vision Transformer" (Wang et al., CVMJ 2022).
Submodule names equal timm's ``pvt_v2`` names, so checkpoints map by identity.

Layout: every module here takes and returns tokens as a ``(B, H, W, C)`` tensor. Linear layers and LayerNorm act
on the last dimension directly, and the convolutions see ``x.permute(0, 3, 1, 2)``, an NCHW view in channels-last
memory, so going between tokens and maps never copies. The stem converts the image to channels-last once, so its
conv output is channels-last too and the first LayerNorm reads contiguous tokens.

Each module has one forward. Eval-mode inference without autograd runs the same function with fewer allocations
through :mod:`pvt_backbone.fast_inference`, chosen by ``PVTv2Stage.forward``.

Linear SRA pools keys and values adaptively to 7x7. In eager mode and under ``torch.compile`` that is
``nn.AdaptiveAvgPool2d``; while exporting (``torch.export``, the ONNX exporters, ``torch.jit.trace``) it is
:func:`adaptive_avg_pool2d_matmul`, the same average written as two matrix products built from the input's own
sizes, because ONNX has no adaptive pooling and the exporter would otherwise bake in the example's window sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

__all__ = [
    "OverlapPatchEmbed",
    "SpatialReductionAttention",
    "MlpDWConv",
    "Block",
    "init_weights",
    "to_map",
    "to_tokens",
    "call_module",
    "adaptive_avg_pool2d_matmul",
    "pool_matrix",
    "LINEAR_POOL_SIZE",
]

LINEAR_POOL_SIZE = 7  # linear SRA's reduced key/value map is LINEAR_POOL_SIZE x LINEAR_POOL_SIZE


def to_map(tokens: Tensor) -> Tensor:
    """(B, H, W, C) tokens -> (B, C, H, W) view."""
    return tokens.permute(0, 3, 1, 2)


def to_tokens(feature_map: Tensor) -> Tensor:
    """(B, C, H, W) map -> (B, H, W, C) view."""
    return feature_map.permute(0, 2, 3, 1)


def call_module(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``: the default way :meth:`SpatialReductionAttention.attend` applies its layers."""
    return module(x)


def pool_matrix(size: int, output_size: int, like: Tensor) -> Tensor:
    """(output_size, size) averaging weights of adaptive pooling along one axis, in ``like``'s dtype and device.

    Row ``i`` is ``1 / count`` on the input positions ``[floor(i * size / output_size), ceil((i + 1) * size /
    output_size))`` (the window ``adaptive_avg_pool2d`` averages) and 0 elsewhere. ``size`` may be symbolic: the
    matrix is built with tensor ops from it, so an exported graph builds it for the size it runs at.

    Example:
        >>> pool_matrix(3, 2, torch.empty(0))
        tensor([[0.5000, 0.5000, 0.0000],
                [0.0000, 0.5000, 0.5000]])
    """
    positions = torch.arange(size, device=like.device)
    rows = torch.arange(output_size, device=like.device).unsqueeze(1)
    # Integer forms of floor(i * size / out) <= p < ceil((i + 1) * size / out): no division by a symbolic size.
    inside = (positions * output_size + output_size > rows * size) & (positions * output_size < (rows + 1) * size)
    weights = inside.to(like.dtype)
    return weights / weights.sum(dim=1, keepdim=True)


def adaptive_avg_pool2d_matmul(x: Tensor, output_size: int | tuple[int, int]) -> Tensor:
    """``F.adaptive_avg_pool2d(x, output_size)`` as ``P_h @ x @ P_w^T`` (:func:`pool_matrix`), equal to float rounding.

    Takes a (B, C, H, W) map in any memory format and returns a (B, C, out_h, out_w) view of channels-last memory:
    the products run on the (B, H, W, C) tokens, contracting W and then H, so a channels-last input is read as is.
    Every op has an ONNX form and all sizes come from ``x``, so dynamic-size exports compute it at every size.

    Example:
        >>> x = torch.randn(2, 3, 10, 13)
        >>> torch.allclose(adaptive_avg_pool2d_matmul(x, 7), F.adaptive_avg_pool2d(x, 7), atol=1e-6)
        True
    """
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    tokens = to_tokens(x)  # (B, H, W, C)
    along_w = torch.matmul(pool_matrix(x.shape[3], out_w, x), tokens)  # (B, H, out_w, C)
    along_h = torch.matmul(pool_matrix(x.shape[2], out_h, x), along_w.flatten(2))  # (B, out_h, out_w * C)
    return to_map(along_h.unflatten(2, (out_w, x.shape[1])))


def _exporting() -> bool:
    """Whether the call is being captured for a graph file (torch.export, ONNX, jit trace), not run or compiled."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


class OverlapPatchEmbed(nn.Module):
    """Strided conv with ``kernel // 2`` padding, then LayerNorm: (B, C_in, H, W) -> (B, ceil(H/s), ceil(W/s), C)."""

    def __init__(self, in_channels: int, embed_dim: int, *, patch_size: int, stride: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) map in any memory format -> (B, H', W', C) contiguous tokens."""
        # No-op for the later stages (their input is a channels-last view already); for the stem it copies the small
        # image once so the conv writes channels-last and the LayerNorm does not copy its (larger) output.
        x = x.contiguous(memory_format=torch.channels_last)
        return self.norm(to_tokens(self.proj(x)))


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys and values come from a spatially reduced copy of the tokens.

    Standard SRA reduces with a conv of kernel = stride = ``sr_ratio`` then LayerNorm; linear SRA pools to 7x7, then
    1x1 conv, LayerNorm and GELU. ``kv`` packs keys then values along its output rows. The pool is ``self.pool``
    (``nn.AdaptiveAvgPool2d``, no parameters) when run, :func:`adaptive_avg_pool2d_matmul` when exported.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        sr_ratio: int,
        linear: bool,
        qkv_bias: bool,
        attn_drop: float,
        proj_drop: float,
        sr_norm_eps: float,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.linear = linear
        self.pool: nn.Module | None = nn.AdaptiveAvgPool2d(LINEAR_POOL_SIZE) if linear else None
        self.sr: nn.Conv2d | None = None
        self.norm: nn.LayerNorm | None = None
        self.act: nn.Module | None = nn.GELU() if linear else None
        if linear or sr_ratio > 1:
            kernel = 1 if linear else sr_ratio
            self.sr = nn.Conv2d(dim, dim, kernel_size=kernel, stride=kernel)
            self.norm = nn.LayerNorm(dim, eps=sr_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) normalized tokens -> (B, H, W, C) attention output."""
        return self.proj_drop(self.proj(self.attend(x)))

    def attend(
        self,
        x: Tensor,
        *,
        linear: Callable[[nn.Linear, Tensor], Tensor] = call_module,
        conv2d: Callable[[nn.Conv2d, Tensor], Tensor] = call_module,
    ) -> Tensor:
        """Heads' attention outputs, concatenated: (B, H, W, C), before the output projection.

        ``linear`` and ``conv2d`` apply ``q``/``kv`` and ``sr`` (default: call the module); the inference path passes
        its oneDNN versions (:mod:`pvt_backbone.fast_inference`).
        """
        batch, height, width, dim = x.shape
        head_dim = dim // self.num_heads
        q = linear(self.q, x).reshape(batch, height * width, self.num_heads, head_dim).transpose(1, 2)
        kv_source = x
        if self.sr is not None and self.norm is not None:
            reduced = to_map(x)
            if self.pool is not None:
                # ONNX lowers adaptive pooling to fixed windows, wrong at other sizes: export the size-built form.
                reduced = adaptive_avg_pool2d_matmul(reduced, LINEAR_POOL_SIZE) if _exporting() else self.pool(reduced)
            kv_source = self.norm(to_tokens(conv2d(self.sr, reduced)))
            if self.act is not None:
                kv_source = self.act(kv_source)
        kv = linear(self.kv, kv_source).reshape(batch, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        # SDPA lays its (B, heads, N, head_dim) output out as (B, N, heads, head_dim), so this is a view, not a copy.
        return out.transpose(1, 2).reshape(batch, height, width, dim)


class MlpDWConv(nn.Module):
    """fc1 -> [ReLU if linear] -> depthwise 3x3 conv -> GELU -> dropout -> fc2 -> dropout, on (B, H, W, C) tokens."""

    def __init__(self, dim: int, hidden_dim: int, *, linear: bool, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.relu: nn.Module | None = nn.ReLU() if linear else None
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) tokens -> (B, H, W, C)."""
        x = self.fc1(x)
        if self.relu is not None:
            x = self.relu(x)
        x = self.act(to_tokens(self.dwconv(to_map(x))))
        return self.drop2(self.fc2(self.drop1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(attn(norm1(x))), then x + DropPath(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        hidden_dim: int,
        sr_ratio: int,
        linear: bool,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path: float,
        norm_eps: float,
        sr_norm_eps: float,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        make_norm = norm_layer or (lambda d: nn.LayerNorm(d, eps=norm_eps))
        self.norm1 = make_norm(dim)
        self.attn = SpatialReductionAttention(
            dim,
            num_heads=num_heads,
            sr_ratio=sr_ratio,
            linear=linear,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            sr_norm_eps=sr_norm_eps,
        )
        self.drop_path1 = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        self.norm2 = make_norm(dim)
        self.mlp = MlpDWConv(dim, hidden_dim, linear=linear, drop=proj_drop)
        self.drop_path2 = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) tokens -> (B, H, W, C) tokens; never writes ``x``."""
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def init_weights(module: nn.Module) -> None:
    """Initialisation of the reference: truncated normal (std 0.02) linears, fan-out normal convs, unit norms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, std=(2.0 / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
