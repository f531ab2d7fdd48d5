"""Which layout and prefix a checkpoint's keys are in, and what its tensor shapes say about the model that wrote it.

* ``detect_layout``: the layout from sentinel keys (one key every checkpoint of a layout has, ``Layout.sentinel``)
  behind any dot-terminated prefix (``module.``, ``backbone.``, ``backbone.body.``, ...). timm and lucid share every
  body key, so their heads decide.
* Look-alikes are refused by name: PVT v1 (absolute position embeddings, a class token) and transformers SegFormer
  keys; SegFormer's MiT encoder shares PVTv2's key names in our layouts, so ``infer_architecture`` tells it apart by
  its shapes (MLP ratio 4 in every stage).
* ``to_native`` / ``convert``: ``layout="auto"`` and ``prefix=None`` resolved here, then mapped by the tables of
  ``pvt_backbone.weights.layouts`` (``map_to_native``, ``from_native``).

Example:
    >>> native = build_classifier("b0").state_dict()
    >>> mmdet = {"backbone." + k: v for k, v in from_native(native, "mmdet").state_dict.items()}
    >>> detect_layout(mmdet)
    ('mmdet', 'backbone.')
    >>> result = to_native({"state_dict": mmdet, "meta": {"epoch": 12}})
    >>> result.layout, result.container, result.notes[0]
    ('mmdet', "['state_dict']", "stripped prefix 'backbone.'")
    >>> infer_architecture(result.state_dict).describe()[:58]
    'PVTv2-b0 (embed dims 32/64/160/256, depths 2/2/2/2, MLP ra'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

from ..config import NUM_STAGES, VARIANTS
from .layouts import (
    LAYOUTS,
    SHOWN,
    CheckpointError,
    Conversion,
    DroppedKey,
    from_native,
    get_layout,
    map_to_native,
    scope_kind,
    stage_of,
    unwrap_checkpoint,
)

__all__ = ["Architecture", "detect_layout", "to_native", "convert", "infer_architecture"]

# SegFormer's MiT encoder shares PVTv2's key names (same embeds, SRA, depthwise-conv MLP) but uses MLP ratio 4 in every
# stage, so only the shapes tell them apart; MiT-b5 is shape-identical to PVTv2-b5.
_MIT_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
_V1_KEY = re.compile(r"(^|\.)(pos_embed\d*|cls_token)(\.|$)")


# ---------------------------------------------------------------------------------------------------------------------
# Layout and prefix
# ---------------------------------------------------------------------------------------------------------------------


def _candidates(keys: Iterable[str], layout_names: Iterable[str]) -> dict[tuple[str, str], None]:
    """(layout, prefix) pairs whose sentinel key occurs, behind any dot-terminated prefix."""
    found: dict[tuple[str, str], None] = {}
    key_set = set(keys)
    for name in layout_names:
        layout = LAYOUTS[name]
        for key in key_set:
            if key == layout.sentinel or key.endswith("." + layout.sentinel):
                prefix = key[: len(key) - len(layout.sentinel)]
                if layout.model_prefix and prefix.endswith(layout.model_prefix):
                    prefix = prefix[: len(prefix) - len(layout.model_prefix)]
                found[(name, prefix)] = None
    # timm and lucid share every body key (lucid's head is "classifier.", timm's "head."): when both match under one
    # prefix, the head decides, and a headless file counts as timm. A single requested layout is kept as found.
    for name, prefix in list(found):
        if name == "timm" and ("lucid", prefix) in found:
            is_lucid = f"{prefix}classifier.weight" in key_set and f"{prefix}head.weight" not in key_set
            found.pop(("timm" if is_lucid else "lucid", prefix))
    return found


def _listing(found: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{name} under {prefix!r}" for name, prefix in found)


def _reject_lookalikes(keys: Iterable[str]) -> None:
    v1 = sorted({match.group(2) for key in keys if (match := _V1_KEY.search(key))})
    if v1:
        raise CheckpointError(
            f"this is a PVT v1 checkpoint, not PVTv2: it has {', '.join(v1[:4])} (absolute position embeddings and a "
            "class token). PVTv2 has neither and adds a depthwise conv to every MLP, so v1 weights cannot be mapped; "
            "use a PVTv2 file (e.g. the release pvt_v2_b2.pth or timm/pvt_v2_b2.in1k)"
        )


def detect_layout(keys: Iterable[str]) -> tuple[str, str]:
    """Layout and prefix of a flat state dict's keys, from sentinel keys.

    Returns:
        (layout name, prefix in front of the layout's keys, ``""`` if none), e.g. ``("mmdet", "backbone.")``.

    Raises:
        CheckpointError: PVT v1 keys, no known layout, or several layouts/prefixes at once.

    Example:
        >>> detect_layout(["module.block1.0.norm1.weight", "module.head.weight"])
        ('pvt', 'module.')
    """
    keys = list(keys)
    _reject_lookalikes(keys)
    found = list(_candidates(keys, LAYOUTS))
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(
            f"the checkpoint holds several PVTv2 weight sets ({_listing(found)}); pass prefix= to pick one"
        )
    hint = ""
    if any(key.startswith(("segformer.", "encoder.block.")) or ".encoder.block." in key for key in keys):
        hint = " It looks like a transformers SegFormer checkpoint, which is not PVTv2."
    sentinels = ", ".join(f"{layout.name}: {layout.sentinel!r}" for layout in LAYOUTS.values())
    shown = ", ".join(repr(key) for key in keys[:SHOWN])
    raise CheckpointError(
        f"not a PVTv2 checkpoint in any known layout: none of the sentinel keys ({sentinels}) occurs, with or without "
        f"a prefix. First keys: {shown} ({len(keys)} in all).{hint}"
    )


def _resolve(keys: Iterable[str], layout: str, prefix: str | None) -> tuple[str, str]:
    """(layout name, prefix) for the requested ``layout`` (or ``"auto"``) and ``prefix`` (or None: found)."""
    keys = list(keys)
    if layout == "auto" and prefix is None:
        return detect_layout(keys)
    name = get_layout(layout).name if layout != "auto" else ""
    found = [(n, p) for n, p in _candidates(keys, [name] if name else LAYOUTS) if prefix is None or p == prefix]
    if not found and prefix is not None and name:
        found = [(name, prefix)]  # both given: trusted, the mapping itself checks every key
    if len(found) == 1:
        return found[0]
    # name what is there, so a wrong layout or prefix can be corrected from the message alone
    what = f"{name} keys" if name else "PVTv2 keys"
    where = f" under prefix {prefix!r}" if prefix is not None else ""
    present = found or list(_candidates(keys, LAYOUTS))
    options = f": found {_listing(present)}" if present else ": it holds no PVTv2 layout this package knows"
    raise CheckpointError(f"cannot find exactly one set of {what}{where} in the checkpoint{options}")


def _looks_like_body_key(layout_name: str, key: str) -> bool:
    """Whether some dot-suffix of ``key`` is a non-head key of the layout (to catch mixed prefixes)."""
    parts = key.split(".")
    return any(scope_kind(layout_name, ".".join(parts[start:])) not in (None, "head") for start in range(len(parts)))


def _split_prefix(
    flat: Mapping[str, Tensor], layout_name: str, prefix: str, *, explicit: bool
) -> tuple[dict[str, Tensor], list[DroppedKey]]:
    """(the keys under ``prefix`` with it removed, the entries outside it as dropped).

    Unless the prefix was given (``explicit``), a layout key outside it means two weight sets under different
    prefixes, which is an error rather than a silent pick.
    """
    body: dict[str, Tensor] = {}
    dropped = []
    for key, tensor in flat.items():
        if key.startswith(prefix):
            body[key[len(prefix) :]] = tensor
        elif not explicit and _looks_like_body_key(layout_name, key):
            raise CheckpointError(
                f"mixed prefixes: the {layout_name} keys sit under {prefix!r} but {key!r} looks like one without it; "
                "pass prefix= to pick one set"
            )
        else:
            reason = f"outside the PVTv2 weights (prefix {prefix!r})" if prefix else "not a PVTv2 key"
            dropped.append(DroppedKey(key, reason))
    if not body:
        present = _listing(_candidates(flat, LAYOUTS)) or "no PVTv2 layout"
        raise CheckpointError(f"no key of the checkpoint starts with the prefix {prefix!r}; it holds {present}")
    return body, dropped


def _reject_mixed_prefixes(body: Mapping[str, Tensor], layout_name: str, prefix: str) -> None:
    """Keys under ``prefix`` that no rule maps but that end in a layout key carry a second prefix."""
    model_prefix = LAYOUTS[layout_name].model_prefix
    unmapped = [key for key in body if scope_kind(layout_name, key.removeprefix(model_prefix)) is None]
    if any(_looks_like_body_key(layout_name, key.removeprefix(model_prefix)) for key in unmapped):
        shown = ", ".join(repr(prefix + k) for k in unmapped[:SHOWN]) + (" ..." if len(unmapped) > SHOWN else "")
        raise CheckpointError(
            f"mixed prefixes: the {layout_name} keys sit under {prefix!r} but {len(unmapped)} carry another prefix: "
            f"{shown}; pass prefix= to pick one set"
        )


def to_native(checkpoint: Mapping[str, object], *, layout: str = "auto", prefix: str | None = None) -> Conversion:
    """Any PVTv2 checkpoint dict -> native (timm) state dict, losslessly.

    Unwraps containers, finds the layout from sentinel keys (or uses ``layout``), strips the prefix in front of it
    (``module.``, ``backbone.``, ``backbone.body.``, ... or ``prefix`` if given) and maps every key by the layout's
    rule table. Entries outside the prefix (a detector's neck and heads) are dropped and reported; a key under the
    prefix that no rule maps is an error, as are PVTv2-looking keys outside it (mixed prefixes).

    Args:
        checkpoint: a flat ``name -> Tensor`` dict or a nested checkpoint (``{"state_dict": ..., "meta": ...}``).
        layout: ``"auto"`` or one of ``LAYOUTS`` (``"native"`` = ``"timm"``).
        prefix: the exact prefix of the PVTv2 keys; default: found from the sentinel key.

    Returns:
        ``Conversion`` with native keys; tensors keep their dtype; ``layout`` is the source layout.
    """
    flat, container, unwrapped = unwrap_checkpoint(checkpoint)
    _reject_lookalikes(flat)
    name, found = _resolve(flat, layout, prefix)
    body, outside = _split_prefix(flat, name, found, explicit=prefix is not None)
    _reject_mixed_prefixes(body, name, found)
    mapped = map_to_native(body, name, prefix=found)
    return dataclasses.replace(mapped, container=container, dropped=unwrapped + tuple(outside) + mapped.dropped)


def convert(checkpoint: Mapping[str, object], *, src: str = "auto", dst: str) -> Conversion:
    """Any layout -> any layout via native; ``dropped`` and ``notes`` cover both steps.

    Example:
        >>> pvt = from_native(build_classifier("b0").state_dict(), "pvt").state_dict
        >>> result = convert(pvt, dst="mmdet")
        >>> result.layout, [d.key for d in result.dropped], len(result.state_dict)
        ('mmdet', ['head.weight', 'head.bias'], 160)
    """
    first = to_native(checkpoint, layout=src)
    second = from_native(first.state_dict, dst)
    return dataclasses.replace(
        second,
        prefix=first.prefix,
        container=first.container,
        dropped=first.dropped + second.dropped,
        notes=first.notes + second.notes,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Architecture from shapes
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """What the shapes of a native state dict say about the model that wrote it (``num_heads`` is not recoverable).

    ``variants`` lists the PVTv2 table entries consistent with the shapes (exactly one for a full checkpoint; a pruned
    backbone with fewer stages may fit several). ``lookalike`` names a different model with the same key names.
    """

    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    sr_ratios: tuple[int, ...]
    linear: bool
    in_channels: int
    num_classes: int  # 0: no classifier head
    num_params: int
    variants: tuple[str, ...]
    lookalike: str | None = None

    @property
    def variant(self) -> str | None:
        """The one PVTv2 variant these weights fit, or None."""
        return self.variants[0] if len(self.variants) == 1 else None

    @property
    def num_stages(self) -> int:
        return len(self.embed_dims)

    def describe(self) -> str:
        """One line, e.g. ``PVTv2-b2 (embed dims 64/128/320/512, depths 3/4/6/3, ..., 25,362,856 parameters)``."""
        if self.lookalike and not self.variants:
            name = f"{self.lookalike}, not a PVTv2 variant"
        elif not self.variants:
            name = "a custom PVTv2 configuration (no table variant)"
        elif self.num_stages < NUM_STAGES:
            name = f"stages 0-{self.num_stages - 1} of PVTv2-{' or '.join(self.variants)}"
        else:
            name = f"PVTv2-{self.variants[0]}" + (f" (shape-identical to {self.lookalike})" if self.lookalike else "")
        join = lambda values: "/".join(f"{v:g}" for v in values)  # noqa: E731
        sr = "linear SRA" if self.linear else f"SR ratios {join(self.sr_ratios)}"
        head = f"{self.num_classes}-class head" if self.num_classes else "no head"
        channels = f", {self.in_channels} input channels" if self.in_channels != 3 else ""
        return (
            f"{name} (embed dims {join(self.embed_dims)}, depths {join(self.depths)}, MLP ratios "
            f"{join(self.mlp_ratios)}, {sr}, {head}{channels}, {self.num_params:,} parameters)"
        )


def _required(state_dict: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state_dict:
        raise CheckpointError(f"cannot infer the architecture: {key!r} is missing")
    return state_dict[key]


def _stage_shape(state_dict: Mapping[str, Tensor], stage: int) -> tuple[int, int, float, int]:
    """(embed dim, depth, MLP ratio, SR kernel; 1 = no ``sr`` conv or a linear-SRA 1x1 one) of one native stage.

    The dim is rows of the patch-embedding conv ``(C, C_in, k, k)``; the MLP ratio rows of block 0's ``fc1``
    ``(hidden, C)`` over C; the SR kernel the last side of ``attn.sr.weight`` ``(C, C, sr, sr)``.
    """
    embed = "patch_embed." if stage == 0 else f"stages.{stage}.downsample."
    dim = _required(state_dict, embed + "proj.weight").shape[0]
    blocks = {int(k.split(".")[3]) for k in state_dict if k.startswith(f"stages.{stage}.blocks.")}
    if blocks != set(range(len(blocks))) or not blocks:
        raise CheckpointError(f"cannot infer the architecture: stage {stage} has blocks {sorted(blocks)}")
    hidden = _required(state_dict, f"stages.{stage}.blocks.0.mlp.fc1.weight").shape[0]
    sr = state_dict.get(f"stages.{stage}.blocks.0.attn.sr.weight")
    return dim, len(blocks), hidden / dim, 1 if sr is None else sr.shape[-1]


def _table_variants(
    dims: tuple[int, ...], depths: tuple[int, ...], ratios: tuple[float, ...], srs: tuple[int, ...], linear: bool
) -> tuple[str, ...]:
    """The ``VARIANTS`` whose first ``len(dims)`` stages have these shapes (SR ratios only for standard SRA)."""
    n = len(dims)
    return tuple(
        name
        for name, config in VARIANTS.items()
        if config.embed_dims[:n] == dims
        and config.depths[:n] == depths
        and tuple(map(float, config.mlp_ratios[:n])) == ratios
        and config.linear == linear
        and (linear or config.sr_ratios[:n] == srs)
    )


def _mit_lookalike(
    dims: tuple[int, ...], depths: tuple[int, ...], ratios: tuple[float, ...], linear: bool
) -> str | None:
    if len(dims) != NUM_STAGES or linear or ratios != (4.0,) * NUM_STAGES:
        return None
    mit = [name for name, (d, dep) in _MIT_VARIANTS.items() if d == dims and dep == depths]
    return f"SegFormer MiT-{mit[0]}" if mit else None


def infer_architecture(state_dict: Mapping[str, Tensor]) -> Architecture:
    """Dims, depths, MLP ratios, SR ratios, linear flag, head size and matching variants of a native state dict.

    Linear SRA is recognised by its 1x1 ``sr`` conv; the head size is the rows of ``head.weight`` ``(classes, C)``.

    Raises:
        CheckpointError: a key needed for the inference is missing or stages are not contiguous from 0.

    Example:
        >>> arch = infer_architecture(PVTv2Backbone.b0(out_indices=(0, 1)).state_dict())
        >>> arch.num_stages, arch.variants, arch.num_classes
        (2, ('b0',), 0)
    """
    stages = sorted({stage for key in state_dict if (stage := stage_of(key)) is not None})
    if not stages or stages != list(range(len(stages))):
        raise CheckpointError(f"cannot infer the architecture: stages present are {stages}, expected 0, 1, ...")
    shapes = [_stage_shape(state_dict, stage) for stage in stages]
    dims = tuple(shape[0] for shape in shapes)
    depths = tuple(shape[1] for shape in shapes)
    ratios = tuple(shape[2] for shape in shapes)
    srs = tuple(shape[3] for shape in shapes)
    linear = any(kernel == 1 and f"stages.{i}.blocks.0.attn.sr.weight" in state_dict for i, kernel in enumerate(srs))
    head = state_dict.get("head.weight")
    return Architecture(
        embed_dims=dims,
        depths=depths,
        mlp_ratios=ratios,
        sr_ratios=srs,
        linear=linear,
        in_channels=_required(state_dict, "patch_embed.proj.weight").shape[1],
        num_classes=0 if head is None else head.shape[0],
        num_params=sum(t.numel() for t in state_dict.values()),
        variants=_table_variants(dims, depths, ratios, srs, linear),
        lookalike=_mit_lookalike(dims, depths, ratios, linear),
    )
