"""PVTv2 variants as data: one frozen config dataclass, one table, and the feature metadata derived from it.

Everything here is pure Python: a neck can be sized from ``VARIANTS["b2"].feature_info()`` before any
backbone exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "FeatureSpec",
    "PVTv2Config",
    "VARIANTS",
    "NUM_STAGES",
    "PATCH_SIZES",
    "PATCH_STRIDES",
    "normalize_out_indices",
    "get_config",
    "stage_stride",
    "stage_sizes",
]

NUM_STAGES = 4
# Overlapping patch embeddings: a 7x7/4 stem, then a 3x3/2 conv in front of every later stage (padding k // 2).
PATCH_SIZES = (7, 3, 3, 3)
PATCH_STRIDES = (4, 2, 2, 2)


@dataclass(frozen=True)
class FeatureSpec:
    """One returned feature map: its dict key, channel count, stride w.r.t. the input and producing module."""

    name: str
    channels: int
    stride: int
    module: str


def _as_tuple(value: object, name: str, kind: type) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of {NUM_STAGES} {kind.__name__}s, got {value!r}")
    items = tuple(value)  # type: ignore[call-overload]
    if len(items) != NUM_STAGES:
        raise ValueError(f"{name} must have {NUM_STAGES} entries (one per stage), got {len(items)}: {items!r}")
    for item in items:
        ok = isinstance(item, (int, float)) if kind is float else isinstance(item, int)
        if not ok or isinstance(item, bool) or item <= 0:
            raise ValueError(f"{name} entries must be positive {kind.__name__}s, got {items!r}")
    return items


@dataclass(frozen=True)
class PVTv2Config:
    """Architecture of one PVTv2 variant (four stages).

    The defaults are what every released variant shares, so a table row lists only what differs.

    Args:
        embed_dims: channels C_i of the four stages.
        depths: transformer blocks per stage.
        num_heads: attention heads per stage (cannot be inferred from weights; all releases use 1, 2, 5, 8).
        mlp_ratios: MLP hidden width as a multiple of C_i.
        sr_ratios: spatial-reduction ratio R_i of the key/value path (1 = no reduction).
        qkv_bias: bias in the q and kv projections.
        linear: linear SRA (7x7 adaptive average pool, 1x1 conv, LN, GELU in every stage; ReLU after fc1).
        embed_norm_eps: LayerNorm eps of the patch-embedding and spatial-reduction norms (1e-5 in the references).
        norm_eps: LayerNorm eps of the block and stage norms (1e-6 in the references).
    """

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    mlp_ratios: tuple[float, float, float, float] = (8, 8, 4, 4)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    qkv_bias: bool = True
    linear: bool = False
    embed_norm_eps: float = 1e-5
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name, kind in (("embed_dims", int), ("depths", int), ("num_heads", int), ("sr_ratios", int)):
            object.__setattr__(self, name, _as_tuple(getattr(self, name), name, kind))
        object.__setattr__(self, "mlp_ratios", _as_tuple(self.mlp_ratios, "mlp_ratios", float))
        for i, (dim, heads) in enumerate(zip(self.embed_dims, self.num_heads)):
            if dim % heads:
                raise ValueError(f"embed_dims[{i}]={dim} is not divisible by num_heads[{i}]={heads}")
        for i, (dim, ratio) in enumerate(zip(self.embed_dims, self.mlp_ratios)):
            if float(dim * ratio) != int(dim * ratio):
                raise ValueError(f"embed_dims[{i}] * mlp_ratios[{i}] = {dim * ratio} is not a whole number")
        for name in ("embed_norm_eps", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    def hidden_dim(self, stage: int) -> int:
        """MLP hidden width of ``stage``."""
        return int(self.embed_dims[stage] * self.mlp_ratios[stage])

    def feature_info(self, out_indices: tuple[int, ...] | list[int] = (0, 1, 2, 3)) -> tuple[FeatureSpec, ...]:
        """Metadata of the maps a backbone with these ``out_indices`` returns, without building it.

        >>> [(f.name, f.channels, f.stride) for f in VARIANTS["b2"].feature_info((1, 3))]
        [('1', 128, 8), ('3', 512, 32)]
        """
        return tuple(
            FeatureSpec(name=str(i), channels=self.embed_dims[i], stride=stage_stride(i), module=f"stages.{i}")
            for i in normalize_out_indices(out_indices)
        )

    def min_input_size(self, num_stages: int = NUM_STAGES) -> int:
        """Smallest image side the first ``num_stages`` stages accept.

        Standard SRA reduces keys/values with a conv of kernel = stride = R_i, so every stage map must be at least
        R_i wide: for the released variants the stage-1 map must reach 8, i.e. ceil(H / 4) >= 8, H >= 29 px.
        Linear SRA pools adaptively and accepts any size.
        """
        side = 1
        while any(size < need for size, need in zip(stage_sizes(side)[:num_stages], self._sr_needs())):
            side += 1
        return side

    def _sr_needs(self) -> tuple[int, ...]:
        return tuple(1 if self.linear else ratio for ratio in self.sr_ratios)


def stage_stride(stage: int) -> int:
    """Stride of stage ``stage`` w.r.t. the input: 4, 8, 16, 32."""
    return math.prod(PATCH_STRIDES[: stage + 1])


def stage_sizes(side: int) -> tuple[int, ...]:
    """Map side of every stage for an input side: ceil-based, e.g. 250 -> (63, 32, 16, 8)."""
    sizes = []
    for kernel, stride in zip(PATCH_SIZES, PATCH_STRIDES):
        side = (side + 2 * (kernel // 2) - kernel) // stride + 1
        sizes.append(side)
    return tuple(sizes)


def normalize_out_indices(out_indices: tuple[int, ...] | list[int], num_stages: int = NUM_STAGES) -> tuple[int, ...]:
    """Sorted, non-negative stage indices; negatives count from the last stage.

    Raises:
        ValueError: empty, out of ``[-num_stages, num_stages - 1]``, or naming one stage twice.
    """
    allowed = f"[{-num_stages}, {num_stages - 1}]"
    if isinstance(out_indices, int) or not hasattr(out_indices, "__iter__"):
        raise TypeError(f"out_indices must be a sequence of ints in {allowed}, got {out_indices!r}")
    raw = tuple(out_indices)
    if not raw:
        raise ValueError(f"out_indices must name at least one stage in {allowed}, got {out_indices!r}")
    for index in raw:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"out_indices must contain ints in {allowed}, got {out_indices!r}")
        if not -num_stages <= index < num_stages:
            raise ValueError(f"out_indices entries must lie in {allowed}, got {out_indices!r}")
    normalized = tuple(index % num_stages for index in raw)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"out_indices names a stage twice (allowed range {allowed}): {out_indices!r}")
    return tuple(sorted(normalized))


_WIDE = (64, 128, 320, 512)

VARIANTS: dict[str, PVTv2Config] = {
    "b0": PVTv2Config(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": PVTv2Config(embed_dims=_WIDE, depths=(2, 2, 2, 2)),
    "b2": PVTv2Config(embed_dims=_WIDE, depths=(3, 4, 6, 3)),
    "b2_li": PVTv2Config(embed_dims=_WIDE, depths=(3, 4, 6, 3), linear=True),
    "b3": PVTv2Config(embed_dims=_WIDE, depths=(3, 4, 18, 3)),
    "b4": PVTv2Config(embed_dims=_WIDE, depths=(3, 8, 27, 3)),
    "b5": PVTv2Config(embed_dims=_WIDE, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
}


def get_config(config: PVTv2Config | str) -> PVTv2Config:
    """Return ``config`` itself, or the table entry of a variant name."""
    if isinstance(config, PVTv2Config):
        return config
    if isinstance(config, str) and config in VARIANTS:
        return VARIANTS[config]
    raise ValueError(f"unknown PVTv2 variant {config!r}; expected a PVTv2Config or one of {sorted(VARIANTS)}")
