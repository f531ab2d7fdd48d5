"""PVTv2 checkpoint key layouts and lossless conversion between them: the tables and pure functions over dicts.

No model, no file I/O and no guessing here: every function takes a ``Mapping[str, Tensor]`` (or a nested checkpoint
dict) in a named layout and returns new dicts plus typed reports. ``pvt_backbone.weights.detect`` finds the layout and
prefix of an unknown checkpoint (``to_native(layout="auto")``); ``pvt_backbone.weights`` reads, loads and saves.

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

Tensors keep their layout everywhere: a Linear weight is ``(out, in)``, a conv weight ``(out, in, k, k)``; ``kv`` is
``(2C, C)`` with the key rows first; mmdet's fused ``in_proj_weight`` is ``(3C, C)`` = [q; k; v] rows.

Example:
    >>> native = build_classifier("b0").state_dict()               # our classifier: native keys, 1000-class head
    >>> hf = from_native(native, "hf").state_dict
    >>> tuple(hf["pvt_v2.encoder.layers.0.blocks.0.attention.key.weight"].shape)  # rows [0:C] of attn.kv
    (32, 32)
    >>> back = map_to_native(hf, "hf")
    >>> back.layout, back.state_dict.keys() == native.keys()
    ('hf', True)
    >>> all(torch.equal(back.state_dict[k], v) for k, v in native.items())
    True
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from functools import cache

import torch
from torch import Tensor

from ..config import NUM_STAGES

__all__ = [
    "CheckpointError",
    "SHOWN",
    "Op",
    "Rule",
    "Layout",
    "LAYOUTS",
    "NATIVE",
    "get_layout",
    "DroppedKey",
    "dropped_lines",
    "Conversion",
    "scope_kind",
    "unwrap_checkpoint",
    "map_to_native",
    "from_native",
    "split_head",
    "keep_stages",
    "stage_of",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, recognised, converted or loaded; the message says why."""


SHOWN = 5  # offending keys listed per category in a message

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


_PARAMS = ("weight", "bias")
# Native module names inside each scope kind ("" = the scope itself is the module).
_NATIVE_MODULES: dict[str, tuple[str, ...]] = {
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


def dropped_lines(dropped: Iterable[DroppedKey]) -> list[str]:
    """Dropped entries grouped by reason, one indented line each: ``  dropped 2 (reason): a, b``.

    Example:
        >>> dropped_lines([DroppedKey("head.weight", "no head"), DroppedKey("head.bias", "no head")])
        ['  dropped 2 (no head): head.weight, head.bias']
    """
    by_reason: dict[str, list[str]] = {}
    for item in dropped:
        by_reason.setdefault(item.reason, []).append(item.key)
    return [
        f"  dropped {len(keys)} ({reason}): {', '.join(keys[:SHOWN])}" + (" ..." if len(keys) > SHOWN else "")
        for reason, keys in by_reason.items()
    ]


@dataclass(frozen=True)
class Conversion:
    """The result of a conversion: the new state dict and everything that happened on the way."""

    state_dict: dict[str, Tensor]
    layout: str  # source layout for ``to_native``, target layout for ``from_native``
    prefix: str = ""  # prefix stripped from the source keys
    container: str = ""  # e.g. "['state_dict']": where the weights sat inside the checkpoint
    dropped: tuple[DroppedKey, ...] = ()
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------------------------
# Parsing keys of a layout
# ---------------------------------------------------------------------------------------------------------------------

_Scope = tuple[str, int, int]  # (kind, stage, block); block = -1 outside blocks


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
    unknown = covered - set(_NATIVE_MODULES[kind])
    assert not unknown, f"layout {layout_name} names unknown native modules {unknown}"
    same = tuple(Rule(kind, (name,), (name,)) for name in _NATIVE_MODULES[kind] if name not in covered)
    order = _NATIVE_MODULES[kind].index
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
            for param in _PARAMS:
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


def _parse(layout_name: str, key: str) -> tuple[_Scope, str, str] | None:
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


def scope_kind(layout_name: str, key: str) -> str | None:
    """The scope kind (``"embed"``, ``"block"``, ``"norm"``, ``"head"``) of a key of the layout, or None if no rule
    maps it.

    Example:
        >>> scope_kind("pvt", "block2.0.mlp.dwconv.dwconv.weight"), scope_kind("timm", "block2.0.mlp.fc1.weight")
        ('block', None)
    """
    parsed = _parse(get_layout(layout_name).name, key)
    return None if parsed is None else parsed[0][0]


def _scope_prefix(layout: Layout, scope: _Scope) -> str:
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
    groups: Mapping[_Scope, Mapping[tuple[str, str], Tensor]], src: Layout, dst: Layout, *, to_native: bool
) -> tuple[dict[str, Tensor], list[str]]:
    """Apply the rules of ``src`` (to native) or ``dst`` (from native) to every scope; returns (state dict, notes)."""
    layout = src if to_native else dst
    out: dict[str, Tensor] = {}
    applied: dict[Rule, set[_Scope]] = defaultdict(set)
    problems: list[str] = []
    for scope, leaves in groups.items():
        for rule in _rules(layout.name, scope[0]):
            for param in _PARAMS:
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
        raise CheckpointError(f"incomplete {src.name} checkpoint: " + "; ".join(problems[:SHOWN]))
    notes = []
    show = lambda names: " + ".join(name + "*" if name.endswith("_") else name for name in names)  # noqa: E731
    for rule, scopes in applied.items():
        a, b = (rule.layout, rule.native) if to_native else (rule.native, rule.layout)
        verb = _VERBS[rule.op][0 if to_native else 1]
        notes.append(f"{verb} {show(a)} -> {show(b)} in {len(scopes)} blocks")
    return out, notes


# ---------------------------------------------------------------------------------------------------------------------
# Containers and the conversions
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


def _group(
    layout_name: str, state_dict: Mapping[str, Tensor]
) -> tuple[dict[_Scope, dict[tuple[str, str], Tensor]], list[str]]:
    """Keys of one layout -> (tensors grouped by scope as ``{(module, param): tensor}``, keys no rule maps)."""
    groups: dict[_Scope, dict[tuple[str, str], Tensor]] = defaultdict(dict)
    unmapped = []
    for key, tensor in state_dict.items():
        parsed = _parse(layout_name, key)
        if parsed is None:
            unmapped.append(key)
        else:
            scope, module, param = parsed
            groups[scope][(module, param)] = tensor
    return groups, unmapped


def _strip_model_prefix(state_dict: Mapping[str, Tensor], layout: Layout) -> dict[str, Tensor]:
    """Remove the layout's ``model_prefix`` (HF's ``pvt_v2.``, present with a head) from the keys that carry it."""
    if not layout.model_prefix:
        return dict(state_dict)
    stripped = {key.removeprefix(layout.model_prefix): tensor for key, tensor in state_dict.items()}
    if len(stripped) != len(state_dict):
        raise CheckpointError(f"the {layout.name} keys appear both with and without {layout.model_prefix!r}")
    return stripped


def map_to_native(state_dict: Mapping[str, Tensor], layout: str, *, prefix: str = "") -> Conversion:
    """Flat keys of ``layout`` (any file prefix already removed) -> native (timm) state dict, losslessly.

    The layout's ``model_prefix`` is removed where present. ``prefix`` names where the keys sat in the file, for the
    report and the messages. ``pvt_backbone.weights.detect.to_native`` finds layout and prefix and then calls this.

    Returns:
        ``Conversion`` with native keys; tensors keep their dtype; ``layout`` is the source layout.

    Raises:
        CheckpointError: a key no rule of the layout maps, or one half of a split/fused pair without the other.
    """
    source = get_layout(layout)
    groups, unmapped = _group(source.name, _strip_model_prefix(state_dict, source))
    if unmapped:
        shown = ", ".join(repr(prefix + k) for k in unmapped[:SHOWN]) + (" ..." if len(unmapped) > SHOWN else "")
        where = f"under {prefix!r}" if prefix else "at the top level"
        raise CheckpointError(f"{len(unmapped)} key(s) {where} match no rule of the {source.name} layout: {shown}")
    native, notes = _map_groups(groups, source, LAYOUTS[NATIVE], to_native=True)
    if prefix:
        notes.insert(0, f"stripped prefix {prefix!r}")
    return Conversion(native, source.name, prefix, notes=tuple(notes))


def from_native(state_dict: Mapping[str, Tensor], layout: str) -> Conversion:
    """Native (timm) state dict -> ``layout``, losslessly; a head is exported if present and the layout has one.

    Split and fused tensors are fresh, contiguous and share no memory, so the result can be saved as safetensors.

    Raises:
        CheckpointError: a key that is not native; b2_li (linear SRA) into ``mmdet``, which cannot express it.
    """
    target = get_layout(layout)
    groups, unmapped = _group(NATIVE, state_dict)
    if unmapped:
        shown = ", ".join(repr(k) for k in unmapped[:SHOWN])
        raise CheckpointError(f"{len(unmapped)} key(s) are not native PVTv2 keys: {shown}")
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
    out, notes = _map_groups(groups, LAYOUTS[NATIVE], target, to_native=False)
    if target.model_prefix and target.head is not None and any(scope[0] == "head" for scope in groups):
        head = target.head
        out = {key if key.startswith(head) else target.model_prefix + key: tensor for key, tensor in out.items()}
    return Conversion(out, target.name, dropped=tuple(dropped), notes=tuple(notes))


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
