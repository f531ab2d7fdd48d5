"""PVTv2 checkpoint key layouts and lossless conversion between them: pure functions over state dicts.

No model and no file I/O here: every function takes a ``Mapping[str, Tensor]`` (or a nested checkpoint dict) and
returns new dicts plus typed reports. ``pvt_backbone.weights`` does the reading, loading and saving.

The native layout is timm's ``pvt_v2`` key layout (our module names), so ``"native"`` and ``"timm"`` are one layout.
Every layout is one literal ``Layout`` row below: where its scopes live, and the few modules whose name or tensor
differs from native. Stage ``i`` is 0-based, ``s = i + 1``, block ``j``; B2 key counts with a 1000-class head:

=================  ==================================================================================  =====
layout             keys                                                                                B2
=================  ==================================================================================  =====
``timm``           ``patch_embed.*``, ``stages.{i}.downsample.*``, ``stages.{i}.blocks.{j}.*``,        334
                   ``stages.{i}.norm.*``, ``head.*``
``timm_features``  timm ``features_only=True``: ``stages_{i}.*``, no head                              332
``pvt``            authors' release: ``patch_embed{s}.*``, ``block{s}.{j}.*`` (``mlp.dwconv.dwconv``),  334
                   ``norm{s}.*``, ``head.*``
``hf``             transformers: ``pvt_v2.encoder.layers.{i}.{patch_embedding,blocks.{j},layer_norm}.*``  366
                   (``pvt_v2.`` only with the head), ``attention.key`` / ``value`` = rows [0:C], [C:2C] of
                   our ``kv``, ``classifier.*``
``mmdet``          ``layers.{i}.0.*`` embed, ``layers.{i}.1.{j}.*`` blocks, ``layers.{i}.2.*`` norm;      300
                   ``attn.attn.in_proj_*`` = [q; kv] rows, MLP fc1/fc2 as 1x1 convs; no head, no b2_li
``lucid``          timm keys with the head as ``classifier.*``                                         334
=================  ==================================================================================  =====

Example:
    >>> hf = from_native(state_dict, "hf").state_dict           # state_dict: a native b2 classifier state dict
    >>> tuple(hf["pvt_v2.encoder.layers.0.blocks.0.attention.key.weight"].shape)
    (64, 64)
    >>> back = to_native(hf)                                      # layout detected from sentinel keys
    >>> back.layout, all(torch.equal(back.state_dict[k], v) for k, v in state_dict.items())
    ('hf', True)
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from functools import cache

import torch
from torch import Tensor

from ..config import NUM_STAGES, VARIANTS

__all__ = [
    "CheckpointError",
    "Op",
    "Rule",
    "Layout",
    "LAYOUTS",
    "NATIVE",
    "DroppedKey",
    "Conversion",
    "Architecture",
    "detect_layout",
    "unwrap_checkpoint",
    "to_native",
    "from_native",
    "convert",
    "infer_architecture",
    "split_head",
    "keep_stages",
    "stage_of",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, recognised, converted or loaded; the message says why."""


# ---------------------------------------------------------------------------------------------------------------------
# The rule tables
# ---------------------------------------------------------------------------------------------------------------------


class Op(Enum):
    """How native tensors become layout tensors; every op is exactly invertible (no arithmetic on values)."""

    SAME = "same"  # one tensor, unchanged
    SPLIT = "split"  # one native (2C, ...) tensor -> two layout tensors: rows [0:C], rows [C:2C]
    FUSE = "fuse"  # native q (C, ...) and kv (2C, ...) -> one layout tensor [q; kv] of (3C, ...)
    CONV1X1 = "conv1x1"  # native Linear weight (O, I) -> 1x1 conv weight (O, I, 1, 1); biases unchanged


@dataclass(frozen=True)
class Rule:
    """Native module(s) of one scope kind -> layout module(s), applied to their ``weight`` and ``bias``.

    A module name ending in ``_`` takes the parameter name without a dot (mmdet's ``in_proj_weight``).
    """

    kind: str  # "embed", "block", "norm" or "head"
    native: tuple[str, ...]
    layout: tuple[str, ...]
    op: Op = Op.SAME


def _rule(kind: str, native: str | tuple[str, ...], layout: str | tuple[str, ...], op: Op = Op.SAME) -> Rule:
    as_tuple = lambda names: (names,) if isinstance(names, str) else tuple(names)  # noqa: E731
    return Rule(kind, as_tuple(native), as_tuple(layout), op)


PARAMS = ("weight", "bias")
# Native module names inside each scope kind ("" = the scope itself is the module).
NATIVE_MODULES: dict[str, tuple[str, ...]] = {
    "embed": ("proj", "norm"),
    "block": (
        "norm1",
        "attn.q",
        "attn.kv",
        "attn.proj",
        "attn.sr",
        "attn.norm",
        "norm2",
        "mlp.fc1",
        "mlp.dwconv",
        "mlp.fc2",
    ),
    "norm": ("",),
    "head": ("",),
}


@dataclass(frozen=True)
class Layout:
    """One checkpoint key layout: scope templates plus the modules whose name or tensor differs from native.

    Templates use ``{i}`` (0-based stage), ``{s}`` (1-based stage) and ``{j}`` (block index). Modules not named in
    ``rules`` keep their native name and tensor.
    """

    name: str
    source: str  # where users get checkpoints in this layout (for docs and messages)
    sentinel: str  # a key every checkpoint in this layout has
    stem: str  # stage-0 patch embedding
    downsample: str  # patch embedding of stage i >= 1
    block: str
    norm: str  # stage-output norm
    head: str | None  # None: the layout has no classifier head
    rules: tuple[Rule, ...] = ()
    model_prefix: str = ""  # in front of every body key when a head is present (HF's base_model_prefix)


LAYOUTS: dict[str, Layout] = {
    "timm": Layout(
        name="timm",
        source="timm hub timm/pvt_v2_b*.in1k model.safetensors; our native layout",
        sentinel="stages.0.blocks.0.norm1.weight",
        stem="patch_embed.",
        downsample="stages.{i}.downsample.",
        block="stages.{i}.blocks.{j}.",
        norm="stages.{i}.norm.",
        head="head.",
    ),
    "timm_features": Layout(
        name="timm_features",
        source="state_dict() of timm.create_model(..., features_only=True)",
        sentinel="stages_0.blocks.0.norm1.weight",
        stem="patch_embed.",
        downsample="stages_{i}.downsample.",
        block="stages_{i}.blocks.{j}.",
        norm="stages_{i}.norm.",
        head=None,
    ),
    "pvt": Layout(
        name="pvt",
        source="authors' GitHub release whai362/PVT v2/pvt_v2_b*.pth (also their detection/segmentation code)",
        sentinel="block1.0.norm1.weight",
        stem="patch_embed1.",
        downsample="patch_embed{s}.",
        block="block{s}.{j}.",
        norm="norm{s}.",
        head="head.",
        rules=(_rule("block", "mlp.dwconv", "mlp.dwconv.dwconv"),),
    ),
    "hf": Layout(
        name="hf",
        source="transformers hub OpenGVLab/pvt_v2_b* model.safetensors (PvtV2ForImageClassification / PvtV2Model)",
        sentinel="encoder.layers.0.blocks.0.layer_norm_1.weight",
        stem="encoder.layers.0.patch_embedding.",
        downsample="encoder.layers.{i}.patch_embedding.",
        block="encoder.layers.{i}.blocks.{j}.",
        norm="encoder.layers.{i}.layer_norm.",
        head="classifier.",
        model_prefix="pvt_v2.",
        rules=(
            _rule("embed", "norm", "layer_norm"),
            _rule("block", "norm1", "layer_norm_1"),
            _rule("block", "attn.q", "attention.query"),
            _rule("block", "attn.kv", ("attention.key", "attention.value"), Op.SPLIT),
            _rule("block", "attn.proj", "attention.proj"),
            _rule("block", "attn.sr", "attention.spatial_reduction"),
            _rule("block", "attn.norm", "attention.layer_norm"),
            _rule("block", "norm2", "layer_norm_2"),
            _rule("block", "mlp.fc1", "mlp.dense1"),
            _rule("block", "mlp.dwconv", "mlp.dwconv.dwconv"),
            _rule("block", "mlp.fc2", "mlp.dense2"),
        ),
    ),
    "mmdet": Layout(
        name="mmdet",
        source="mmdetection PyramidVisionTransformerV2 (detector checkpoints: 'backbone.' inside 'state_dict')",
        sentinel="layers.0.1.0.norm1.weight",
        stem="layers.0.0.",
        downsample="layers.{i}.0.",
        block="layers.{i}.1.{j}.",
        norm="layers.{i}.2.",
        head=None,
        rules=(
            _rule("embed", "proj", "projection"),
            _rule("block", ("attn.q", "attn.kv"), "attn.attn.in_proj_", Op.FUSE),
            _rule("block", "attn.proj", "attn.attn.out_proj"),
            _rule("block", "mlp.fc1", "ffn.layers.0", Op.CONV1X1),
            _rule("block", "mlp.dwconv", "ffn.layers.1"),
            _rule("block", "mlp.fc2", "ffn.layers.4", Op.CONV1X1),
        ),
    ),
    "lucid": Layout(
        name="lucid",
        source="lucid hub lucid-dl/pvt-v2-b* model.safetensors",
        sentinel="stages.0.blocks.0.norm1.weight",
        stem="patch_embed.",
        downsample="stages.{i}.downsample.",
        block="stages.{i}.blocks.{j}.",
        norm="stages.{i}.norm.",
        head="classifier.",
    ),
}
NATIVE = "timm"
_ALIASES = {"native": NATIVE}

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
_CONTAINERS = ("state_dict", "model", "module", "model_state_dict", "state_dict_ema", "model_ema", "ema")


def get_layout(name: str) -> Layout:
    """The ``Layout`` of a name (``"native"`` = ``"timm"``)."""
    name = _ALIASES.get(name, name)
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; expected one of {['native', *LAYOUTS]}")
    return LAYOUTS[name]


# ---------------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DroppedKey:
    """A checkpoint entry that was deliberately not used, and why."""

    key: str
    reason: str


@dataclass(frozen=True)
class Conversion:
    """The result of a conversion: the new state dict and everything that happened on the way."""

    state_dict: dict[str, Tensor]
    layout: str  # source layout for ``to_native``, target layout for ``from_native``
    prefix: str = ""  # prefix stripped from the source keys
    container: str = ""  # e.g. "['state_dict']": where the weights sat inside the checkpoint
    dropped: tuple[DroppedKey, ...] = ()
    notes: tuple[str, ...] = ()


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


# ---------------------------------------------------------------------------------------------------------------------
# Parsing keys of a layout
# ---------------------------------------------------------------------------------------------------------------------

Scope = tuple[str, int, int]  # (kind, stage, block); block = -1 outside blocks


def _param_key(module: str, param: str) -> str:
    if not module:
        return param
    return f"{module}{param}" if module.endswith("_") else f"{module}.{param}"


@cache
def _rules(layout_name: str, kind: str) -> tuple[Rule, ...]:
    """All rules of one scope kind: the layout's own rows plus same-name rows for every other native module."""
    layout = LAYOUTS[layout_name]
    own = tuple(rule for rule in layout.rules if rule.kind == kind)
    covered = {name for rule in own for name in rule.native}
    unknown = covered - set(NATIVE_MODULES[kind])
    assert not unknown, f"layout {layout_name} names unknown native modules {unknown}"
    same = tuple(Rule(kind, (name,), (name,)) for name in NATIVE_MODULES[kind] if name not in covered)
    order = NATIVE_MODULES[kind].index
    rules = tuple(sorted(own + same, key=lambda rule: order(rule.native[0])))  # native module order
    layout_names = [name for rule in rules for name in rule.layout]
    assert len(layout_names) == len(set(layout_names)), f"layout {layout_name}: a {kind} module is mapped twice"
    return rules


@cache
def _leaves(layout_name: str, kind: str) -> dict[str, tuple[str, str]]:
    """Leaf key (module + param) in the layout's names -> (module, param), for one scope kind."""
    leaves = {}
    for rule in _rules(layout_name, kind):
        for module in rule.layout:
            for param in PARAMS:
                leaves[_param_key(module, param)] = (module, param)
    return leaves


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for field, group in (("{i}", "(?P<i>\\d+)"), ("{s}", "(?P<s>\\d+)"), ("{j}", "(?P<j>\\d+)")):
        pattern = pattern.replace(re.escape(field), group)
    return re.compile(pattern)


@cache
def _scopes(layout_name: str) -> tuple[tuple[str, re.Pattern[str], bool], ...]:
    """(kind, compiled template, is_stem) for every scope of a layout, most specific first."""
    layout = LAYOUTS[layout_name]
    scopes = [
        ("embed", _template_regex(layout.stem), True),
        ("embed", _template_regex(layout.downsample), False),
        ("block", _template_regex(layout.block), False),
        ("norm", _template_regex(layout.norm), False),
    ]
    if layout.head is not None:
        scopes.append(("head", _template_regex(layout.head), False))
    return tuple(scopes)


def _parse(layout_name: str, key: str) -> tuple[Scope, str, str] | None:
    """Key -> ((kind, stage, block), module, param) under the layout's scopes and names, or None if no rule maps it."""
    for kind, regex, is_stem in _scopes(layout_name):
        match = regex.match(key)
        if match is None:
            continue
        groups = match.groupdict()
        if kind == "head":
            stage = -1
        elif is_stem:
            stage = 0
        else:
            stage = int(groups["i"]) if "i" in groups else int(groups["s"]) - 1
            if not 0 <= stage < NUM_STAGES or (kind == "embed" and stage == 0):
                continue
        leaf = _leaves(layout_name, kind).get(key[match.end() :])
        if leaf is not None:
            block = int(groups["j"]) if "j" in groups else -1
            return (kind, stage, block), leaf[0], leaf[1]
    return None


def _scope_prefix(layout: Layout, scope: Scope) -> str:
    kind, stage, block = scope
    if kind == "head":
        assert layout.head is not None
        return layout.head
    template = {"embed": layout.stem if stage == 0 else layout.downsample, "block": layout.block, "norm": layout.norm}
    return template[kind].format(i=stage, s=stage + 1, j=block)


# ---------------------------------------------------------------------------------------------------------------------
# The tensor ops
# ---------------------------------------------------------------------------------------------------------------------


def _forward(op: Op, tensors: list[Tensor], names: list[str]) -> list[Tensor]:
    """Native tensors -> layout tensors."""
    if op is Op.SAME:
        return tensors
    if op is Op.SPLIT:
        (kv,) = tensors
        if kv.shape[0] % 2:
            raise CheckpointError(f"{names[0]} has {kv.shape[0]} rows; a key/value split needs an even number")
        half = kv.shape[0] // 2
        return [kv[:half].clone(), kv[half:].clone()]
    if op is Op.FUSE:
        q, kv = tensors
        if kv.shape[0] != 2 * q.shape[0] or kv.shape[1:] != q.shape[1:]:
            raise CheckpointError(f"{names[1]} {tuple(kv.shape)} is not twice {names[0]} {tuple(q.shape)} in rows")
        return [torch.cat([q, kv])]
    (weight,) = tensors  # CONV1X1
    return [weight.reshape(*weight.shape, 1, 1) if weight.dim() == 2 else weight]


def _inverse(op: Op, tensors: list[Tensor], names: list[str]) -> list[Tensor]:
    """Layout tensors -> native tensors (exact inverse of ``_forward``)."""
    if op is Op.SAME:
        return tensors
    if op is Op.SPLIT:
        key, value = tensors
        if key.shape != value.shape:
            raise CheckpointError(f"{names[0]} {tuple(key.shape)} and {names[1]} {tuple(value.shape)} differ in shape")
        return [torch.cat([key, value])]
    if op is Op.FUSE:
        (fused,) = tensors
        if fused.shape[0] % 3:
            raise CheckpointError(f"{names[0]} has {fused.shape[0]} rows; [q; k; v] needs a multiple of 3")
        dim = fused.shape[0] // 3
        return [fused[:dim].clone(), fused[dim:].clone()]
    (weight,) = tensors  # CONV1X1
    if weight.dim() == 4:
        if weight.shape[2:] != (1, 1):
            raise CheckpointError(f"{names[0]} {tuple(weight.shape)} is not a 1x1 convolution")
        return [weight.reshape(weight.shape[0], weight.shape[1])]
    return [weight]


# How the notes name each op: (layout -> native, native -> layout).
_VERBS = {
    Op.SPLIT: ("concatenated", "split"),
    Op.FUSE: ("split", "fused"),
    Op.CONV1X1: ("squeezed 1x1 conv", "reshaped to 1x1 conv"),
}


def _map_groups(
    groups: Mapping[Scope, Mapping[tuple[str, str], Tensor]], src: Layout, dst: Layout, *, to_native: bool
) -> tuple[dict[str, Tensor], list[str]]:
    """Apply the rules of ``src`` (to native) or ``dst`` (from native) to every scope; returns (state dict, notes)."""
    layout = src if to_native else dst
    out: dict[str, Tensor] = {}
    applied: dict[Rule, set[Scope]] = defaultdict(set)
    problems: list[str] = []
    for scope, leaves in groups.items():
        for rule in _rules(layout.name, scope[0]):
            for param in PARAMS:
                names_in = rule.layout if to_native else rule.native
                names_out = rule.native if to_native else rule.layout
                present = [(module, param) in leaves for module in names_in]
                if not any(present):
                    continue
                src_keys = [_scope_prefix(src, scope) + _param_key(m, param) for m in names_in]
                if not all(present):
                    missing = [k for k, ok in zip(src_keys, present) if not ok]
                    problems.append(f"{missing[0]} is missing next to {src_keys[present.index(True)]}")
                    continue
                tensors = [leaves[(module, param)] for module in names_in]
                mapped = (_inverse if to_native else _forward)(rule.op, tensors, src_keys)
                for module, tensor in zip(names_out, mapped):
                    out[_scope_prefix(dst, scope) + _param_key(module, param)] = tensor
                if rule.op is not Op.SAME:
                    applied[rule].add(scope)
    if problems:
        raise CheckpointError(f"incomplete {src.name} checkpoint: " + "; ".join(problems[:5]))
    notes = []
    show = lambda names: " + ".join(name + "*" if name.endswith("_") else name for name in names)  # noqa: E731
    for rule, scopes in applied.items():
        a, b = (rule.layout, rule.native) if to_native else (rule.native, rule.layout)
        verb = _VERBS[rule.op][0 if to_native else 1]
        notes.append(f"{verb} {show(a)} -> {show(b)} in {len(scopes)} blocks")
    return out, notes


# ---------------------------------------------------------------------------------------------------------------------
# Containers, prefixes, detection
# ---------------------------------------------------------------------------------------------------------------------


def unwrap_checkpoint(checkpoint: Mapping[str, object]) -> tuple[dict[str, Tensor], str, tuple[DroppedKey, ...]]:
    """Find the flat ``name -> Tensor`` dict inside a checkpoint.

    Descends into the first of ``state_dict``, ``model``, ``module``, ``model_state_dict``, ``state_dict_ema``,
    ``model_ema``, ``ema`` that holds a dict; the entries next to it (``meta``, ``optimizer``, ``epoch``, ...) and any
    non-tensor values are returned as dropped.

    Returns:
        (state dict, container path such as ``"['state_dict']"``, dropped entries)
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    path, dropped, node = "", [], checkpoint
    while True:
        container = next((key for key in _CONTAINERS if isinstance(node.get(key), Mapping)), None)
        if container is None:
            break
        for key in node:
            if key != container:
                dropped.append(DroppedKey(f"{path}[{key!r}]", f"checkpoint entry next to {container!r}"))
        path += f"[{container!r}]"
        node = node[container]  # type: ignore[assignment]
    tensors = {str(key): value for key, value in node.items() if isinstance(value, Tensor)}
    if not tensors:
        entries = ", ".join(repr(key) for key in list(node)[:8]) or "none"
        raise CheckpointError(
            f"no tensors found in the checkpoint{' at ' + path if path else ''} (entries: {entries}); "
            f"weights are expected at the top level or under one of {list(_CONTAINERS)}"
        )
    for key, value in node.items():
        if not isinstance(value, Tensor):
            dropped.append(DroppedKey(f"{path}[{key!r}]", f"not a tensor ({type(value).__name__})"))
    return tensors, path, tuple(dropped)


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
    """
    keys = list(keys)
    _reject_lookalikes(keys)
    found = list(_candidates(keys, LAYOUTS))
    if len(found) == 1:
        return found[0]
    if found:
        listed = ", ".join(f"{name} under {prefix!r}" for name, prefix in found)
        raise CheckpointError(f"the checkpoint holds several PVTv2 weight sets ({listed}); pass prefix= to pick one")
    hint = ""
    if any(key.startswith(("segformer.", "encoder.block.")) or ".encoder.block." in key for key in keys):
        hint = " It looks like a transformers SegFormer checkpoint, which is not PVTv2."
    sentinels = ", ".join(f"{layout.name}: {layout.sentinel!r}" for layout in LAYOUTS.values())
    shown = ", ".join(repr(key) for key in keys[:5])
    raise CheckpointError(
        f"not a PVTv2 checkpoint in any known layout: none of the sentinel keys ({sentinels}) occurs, with or without "
        f"a prefix. First keys: {shown} ({len(keys)} in all).{hint}"
    )


def _looks_like_body_key(layout_name: str, key: str) -> bool:
    """Whether some dot-suffix of ``key`` is a non-head key of the layout (to catch mixed prefixes)."""
    parts = key.split(".")
    for start in range(len(parts)):
        parsed = _parse(layout_name, ".".join(parts[start:]))
        if parsed is not None and parsed[0][0] != "head":
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------------
# Public conversions
# ---------------------------------------------------------------------------------------------------------------------


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
    explicit_prefix = prefix is not None
    flat, container, dropped_list = unwrap_checkpoint(checkpoint)
    dropped = list(dropped_list)
    _reject_lookalikes(flat)
    if layout == "auto" and prefix is None:
        name, prefix = detect_layout(flat)
    else:
        name = get_layout(layout).name if layout != "auto" else ""
        pool = [name] if name else list(LAYOUTS)
        found = [(n, p) for n, p in _candidates(flat, pool) if prefix is None or p == prefix]
        if not found and prefix is not None and name:
            found = [(name, prefix)]
        if len(found) != 1:
            what = f"{name} keys" if name else "PVTv2 keys"
            where = f" under prefix {prefix!r}" if prefix is not None else ""
            # name what is there, so a wrong --from or prefix can be corrected from the message alone
            present = found or list(_candidates(flat, LAYOUTS))
            listing = ", ".join(f"{n} under {p!r}" for n, p in present)
            options = f": found {listing}" if present else ": it holds no PVTv2 layout this package knows"
            raise CheckpointError(f"cannot find exactly one set of {what}{where} in the checkpoint{options}")
        name, prefix = found[0]
    source = LAYOUTS[name]

    body: dict[str, Tensor] = {}
    for key, tensor in flat.items():
        if key.startswith(prefix):
            body[key[len(prefix) :]] = tensor
        elif not explicit_prefix and _looks_like_body_key(name, key):
            raise CheckpointError(
                f"mixed prefixes: the {name} keys sit under {prefix!r} but {key!r} looks like one without it; "
                "pass prefix= to pick one set"
            )
        else:
            reason = f"outside the PVTv2 weights (prefix {prefix!r})" if prefix else "not a PVTv2 key"
            dropped.append(DroppedKey(key, reason))
    if not body:
        present = ", ".join(f"{n} under {p!r}" for n, p in _candidates(flat, LAYOUTS)) or "no PVTv2 layout"
        raise CheckpointError(f"no key of the checkpoint starts with the prefix {prefix!r}; it holds {present}")
    if source.model_prefix:
        stripped = {
            k[len(source.model_prefix) :] if k.startswith(source.model_prefix) else k: v for k, v in body.items()
        }
        if len(stripped) != len(body):
            raise CheckpointError(f"the {name} keys appear both with and without {source.model_prefix!r}")
        body = stripped

    groups: dict[Scope, dict[tuple[str, str], Tensor]] = defaultdict(dict)
    unmapped = []
    for key, tensor in body.items():
        parsed = _parse(name, key)
        if parsed is None:
            unmapped.append(prefix + key)
        else:
            scope, module, param = parsed
            groups[scope][(module, param)] = tensor
    if unmapped:
        shown = ", ".join(repr(k) for k in unmapped[:5]) + (" ..." if len(unmapped) > 5 else "")
        if any(_looks_like_body_key(name, key) for key in unmapped):
            raise CheckpointError(
                f"mixed prefixes: the {name} keys sit under {prefix!r} but {len(unmapped)} carry another prefix: "
                f"{shown}; pass prefix= to pick one set"
            )
        where = f"under {prefix!r}" if prefix else "at the top level"
        raise CheckpointError(f"{len(unmapped)} key(s) {where} match no rule of the {name} layout: {shown}")
    state_dict, notes = _map_groups(groups, source, LAYOUTS[NATIVE], to_native=True)
    if prefix:
        notes.insert(0, f"stripped prefix {prefix!r}")
    return Conversion(state_dict, name, prefix, container, tuple(dropped), tuple(notes))


def from_native(state_dict: Mapping[str, Tensor], layout: str) -> Conversion:
    """Native (timm) state dict -> ``layout``, losslessly; a head is exported if present and the layout has one.

    Split and fused tensors are fresh, contiguous and share no memory, so the result can be saved as safetensors.

    Raises:
        CheckpointError: a key that is not native; b2_li (linear SRA) into ``mmdet``, which cannot express it.
    """
    target = get_layout(layout)
    native = LAYOUTS[NATIVE]
    groups: dict[Scope, dict[tuple[str, str], Tensor]] = defaultdict(dict)
    unmapped = []
    for key, tensor in state_dict.items():
        parsed = _parse(NATIVE, key)
        if parsed is None:
            unmapped.append(key)
        else:
            groups[parsed[0]][(parsed[1], parsed[2])] = tensor
    if unmapped:
        raise CheckpointError(
            f"{len(unmapped)} key(s) are not native PVTv2 keys: {', '.join(repr(k) for k in unmapped[:5])}"
        )
    dropped = []
    if target.head is None:
        for scope in [scope for scope in groups if scope[0] == "head"]:
            leaves = groups.pop(scope)
            dropped += [
                DroppedKey(f"head.{param}", f"the {target.name} layout has no classifier head") for _, param in leaves
            ]
    # Only linear SRA has a 1x1 ``sr`` conv (standard SRA with ratio 1 has no ``sr`` at all).
    if target.name == "mmdet" and any(
        module == "attn.sr" and param == "weight" and tensor.shape[-2:] == (1, 1)
        for leaves in groups.values()
        for (module, param), tensor in leaves.items()
    ):
        raise CheckpointError(
            "mmdet's PyramidVisionTransformerV2 has no linear SRA, so b2_li weights cannot be exported to it"
        )
    out, notes = _map_groups(groups, native, target, to_native=False)
    if target.model_prefix and target.head is not None and any(scope[0] == "head" for scope in groups):
        head = target.head
        out = {key if key.startswith(head) else target.model_prefix + key: tensor for key, tensor in out.items()}
    return Conversion(out, target.name, dropped=tuple(dropped), notes=tuple(notes))


def convert(checkpoint: Mapping[str, object], *, src: str = "auto", dst: str) -> Conversion:
    """Any layout -> any layout via native; ``dropped`` and ``notes`` cover both steps."""
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
# Native state-dict helpers
# ---------------------------------------------------------------------------------------------------------------------

_STAGE_KEY = re.compile(r"stages\.(\d+)\.")


def stage_of(key: str) -> int | None:
    """Stage a native key belongs to: ``patch_embed.*`` -> 0, ``stages.{i}.*`` -> i, anything else -> None."""
    if key.startswith("patch_embed."):
        return 0
    match = _STAGE_KEY.match(key)
    return int(match.group(1)) if match else None


def split_head(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Native state dict -> (body, head) where head holds the ``head.*`` entries."""
    body = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    head = {k: v for k, v in state_dict.items() if k.startswith("head.")}
    return body, head


def keep_stages(state_dict: Mapping[str, Tensor], num_stages: int) -> tuple[dict[str, Tensor], tuple[DroppedKey, ...]]:
    """Keep the native keys of the first ``num_stages`` stages (a backbone pruned by ``out_indices``) and the rest."""
    kept, dropped = {}, []
    for key, tensor in state_dict.items():
        stage = stage_of(key)
        if stage is not None and stage >= num_stages:
            dropped.append(
                DroppedKey(key, f"stage {stage} is not built by this model (it stops at stage {num_stages - 1})")
            )
        else:
            kept[key] = tensor
    return kept, tuple(dropped)


def infer_architecture(state_dict: Mapping[str, Tensor]) -> Architecture:
    """Dims, depths, MLP ratios, SR ratios, linear flag, head size and matching variants of a native state dict.

    Raises:
        CheckpointError: a key needed for the inference is missing or stages are not contiguous from 0.
    """

    def get(key: str) -> Tensor:
        if key not in state_dict:
            raise CheckpointError(f"cannot infer the architecture: {key!r} is missing")
        return state_dict[key]

    stages = sorted({stage for key in state_dict if (stage := stage_of(key)) is not None})
    if not stages or stages != list(range(len(stages))):
        raise CheckpointError(f"cannot infer the architecture: stages present are {stages}, expected 0, 1, ...")
    dims, depths, ratios, srs, linear = [], [], [], [], False
    for stage in stages:
        embed = "patch_embed." if stage == 0 else f"stages.{stage}.downsample."
        dim = get(embed + "proj.weight").shape[0]
        blocks = {int(k.split(".")[3]) for k in state_dict if k.startswith(f"stages.{stage}.blocks.")}
        if blocks != set(range(len(blocks))) or not blocks:
            raise CheckpointError(f"cannot infer the architecture: stage {stage} has blocks {sorted(blocks)}")
        hidden = get(f"stages.{stage}.blocks.0.mlp.fc1.weight").shape[0]
        sr = state_dict.get(f"stages.{stage}.blocks.0.attn.sr.weight")
        kernel = 1 if sr is None else sr.shape[-1]
        linear = linear or (sr is not None and kernel == 1)
        dims.append(dim)
        depths.append(len(blocks))
        ratios.append(hidden / dim)
        srs.append(kernel)
    embed_dims, mlp_ratios, n = tuple(dims), tuple(ratios), len(stages)
    variants = tuple(
        name
        for name, config in VARIANTS.items()
        if config.embed_dims[:n] == embed_dims
        and config.depths[:n] == tuple(depths)
        and tuple(map(float, config.mlp_ratios[:n])) == mlp_ratios
        and config.linear == linear
        and (linear or config.sr_ratios[:n] == tuple(srs))
    )
    lookalike = None
    if n == NUM_STAGES and not linear and mlp_ratios == (4.0,) * NUM_STAGES:
        mit = [name for name, (d, dep) in _MIT_VARIANTS.items() if d == embed_dims and dep == tuple(depths)]
        lookalike = f"SegFormer MiT-{mit[0]}" if mit else None
    head = state_dict.get("head.weight")
    return Architecture(
        embed_dims=embed_dims,
        depths=tuple(depths),
        mlp_ratios=mlp_ratios,
        sr_ratios=tuple(srs),
        linear=linear,
        in_channels=get("patch_embed.proj.weight").shape[1],
        num_classes=0 if head is None else head.shape[0],
        num_params=sum(t.numel() for t in state_dict.values()),
        variants=variants,
        lookalike=lookalike,
    )
