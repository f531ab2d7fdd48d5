"""Loading PVTv2 weights in any layout into our backbone or classifier: strict by default, all or nothing.

``load_weights`` reads the file (``pvt_backbone.weights.io``), maps its keys to native (``detect.to_native``), plans
what to load (a head the model lacks, stages a pruned backbone does not build, RGB first-conv weights for another
input channel count, dtype casts), compares every tensor with the model (``state_dict.compare_state_dicts``) and then
loads, or raises one ``CheckpointError`` and leaves the model unchanged.

Example:
    >>> save_weights(pvt_v2_b0(), "pvt_v2_b0.safetensors", layout="pvt").layout  # a classifier, authors' key layout
    'pvt'
    >>> model = PVTv2Backbone.b0(out_indices=(1, 2, 3))
    >>> report = load_weights(model, "pvt_v2_b0.safetensors")
    >>> report.layout, report.variant, len(report.loaded), [d.key for d in report.dropped]
    ('pvt', 'b0', 176, ['head.weight', 'head.bias'])
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..config import VARIANTS
from .detect import Architecture, infer_architecture, to_native
from .hub import WeightsLike, resolve_source
from .io import Checkpoint, read_checkpoint
from .layouts import (
    SHOWN,
    CheckpointError,
    Conversion,
    DroppedKey,
    dropped_lines,
    keep_stages,
    split_head,
    stage_of,
    unwrap_checkpoint,
)
from .state_dict import StateDictDiff, compare_state_dicts, load_state_dict_strict

__all__ = ["LoadReport", "LoadWarning", "load_weights", "load_model_weights"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# The plan: what to load, decided before anything is loaded
# ---------------------------------------------------------------------------------------------------------------------


def _adapt_first_conv(weight: Tensor, channels: int) -> Tensor:
    """RGB patch-embedding weight (O, 3, k, k) -> (O, channels, k, k): sum for 1 channel, else repeat and rescale."""
    work = weight.float()
    if channels == 1:
        adapted = work.sum(dim=1, keepdim=True)
    else:
        adapted = work.repeat(1, math.ceil(channels / 3), 1, 1)[:, :channels] * (3 / channels)
    return adapted.to(weight.dtype)


def _variant_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return next((name for name, c in VARIANTS.items() if c == config), None)


def _model_name(model: nn.Module) -> str:
    variant = _variant_of(model)
    return f"{type(model).__name__} ({'PVTv2-' + variant if variant else 'custom config'})"


@dataclass
class _Plan:
    """What ``load_weights`` will load (native keys, adapted) and how it differs from the model, filled in steps."""

    state_dict: dict[str, Tensor] = field(default_factory=dict)
    comparison: StateDictDiff = field(default_factory=lambda: compare_state_dicts({}, {}))
    dropped: list[DroppedKey] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    fresh: set[str] = field(default_factory=set)  # model keys intentionally not loaded (fresh head)


def _plan_head(
    file_sd: Mapping[str, Tensor], model_sd: Mapping[str, Tensor], plan: _Plan, *, fresh_head: bool
) -> dict[str, Tensor]:
    """The file's tensors with or without its ``head.*``; what was dropped and why goes into ``plan``."""
    body, head = split_head(file_sd)
    model_head = {k for k in model_sd if k.startswith("head.")}
    if head and not model_head:
        plan.dropped += [
            DroppedKey(k, "classifier head: the model has none (a backbone, or num_classes=0)") for k in head
        ]
        return body
    if model_head and fresh_head:
        plan.dropped += [DroppedKey(k, "classifier head: fresh_head=True keeps the model's new head") for k in head]
        classes = model_sd["head.weight"].shape[0] if "head.weight" in model_sd else 0
        plan.notes.append(f"classifier head left freshly initialised ({classes} classes); train it before use")
        plan.fresh = model_head
        return body
    if "head.weight" in model_sd and "head.weight" in head:
        have, want = head["head.weight"].shape[0], model_sd["head.weight"].shape[0]
        if have != want:
            plan.hints.append(
                f"the file's head has {have} classes, the model's {want}: build with num_classes={have}, or pass "
                "fresh_head=True to load everything else and keep a new head"
            )
    elif model_head and not head:
        plan.hints.append(
            "the file has no classifier head (a backbone checkpoint): pass fresh_head=True to train a new one"
        )
    return dict(file_sd)


def _plan_channels(state_dict: dict[str, Tensor], model_sd: Mapping[str, Tensor], plan: _Plan) -> None:
    """Adapt an RGB first conv ``(C, 3, k, k)`` in place to the model's ``(C, C_in, k, k)`` when only C_in differs."""
    key = "patch_embed.proj.weight"
    if key not in state_dict or key not in model_sd:
        return
    have, want = state_dict[key], model_sd[key]
    if (
        have.dim() == 4
        and have.shape[1] == 3
        and want.shape[1] != 3
        and have.shape[:1] + have.shape[2:] == want.shape[:1] + want.shape[2:]
    ):
        state_dict[key] = _adapt_first_conv(have, want.shape[1])
        how = "summed over RGB" if want.shape[1] == 1 else f"RGB repeated and scaled by 3/{want.shape[1]}"
        plan.notes.append(f"adapted {key} from 3 to {want.shape[1]} input channels ({how})")


def _plan(file_sd: Mapping[str, Tensor], model_sd: Mapping[str, Tensor], *, fresh_head: bool) -> _Plan:
    """Decide what to load: head handling, stage pruning, first-conv adaptation, then compare with the model."""
    plan = _Plan()
    state_dict = _plan_head(file_sd, model_sd, plan, fresh_head=fresh_head)
    model_stages = {stage for key in model_sd if (stage := stage_of(key)) is not None}
    if model_stages:
        state_dict, pruned = keep_stages(state_dict, max(model_stages) + 1)
        plan.dropped += pruned
    _plan_channels(state_dict, model_sd, plan)
    cast = sorted(
        {
            f"{t.dtype} -> {model_sd[k].dtype}".replace("torch.", "")
            for k, t in state_dict.items()
            if k in model_sd and t.dtype != model_sd[k].dtype and t.is_floating_point()
        }
    )
    if cast:
        plan.notes.append(f"cast {', '.join(cast)}")
    plan.state_dict = state_dict
    plan.comparison = compare_state_dicts(state_dict, model_sd, ignore=plan.fresh)
    return plan


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadReport:
    """What ``load_weights`` did. ``loaded`` are model keys now holding file tensors; ``missing`` are model keys left
    as initialised (a fresh head, or anything under ``strict=False``); ``unexpected`` and ``mismatched`` are file keys
    skipped under ``strict=False``; ``dropped`` are file entries left out by rule, each with its reason."""

    source: str
    sha256: str | None
    layout: str
    prefix: str
    container: str
    architecture: Architecture | None
    loaded: tuple[str, ...]
    dropped: tuple[DroppedKey, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[str, ...]
    notes: tuple[str, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def variant(self) -> str | None:
        """The PVTv2 variant the file's shapes fit, or None."""
        return self.architecture.variant if self.architecture else None

    def summary(self) -> str:
        """Human-readable multi-line account, as the CLI prints it."""
        what = self.architecture.describe() if self.architecture else "unknown architecture"
        where = f" under {self.prefix!r}" if self.prefix else ""
        lines = [f"loaded {len(self.loaded)} tensors from {self.source} (layout {self.layout}{where}; {what})"]
        lines += [f"  note: {note}" for note in self.notes]
        lines += dropped_lines(self.dropped)
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mismatched", self.mismatched),
        ):
            if keys:
                lines.append(
                    f"  {label} ({len(keys)}): {', '.join(keys[:SHOWN])}" + (" ..." if len(keys) > SHOWN else "")
                )
        return "\n".join(lines)


def _architecture(native: Mapping[str, Tensor]) -> Architecture | None:
    """The architecture the shapes describe, or None for a state dict too incomplete to tell."""
    try:
        return infer_architecture(native)
    except CheckpointError:
        return None


def _refusal(model: nn.Module, source: str, layout: str, architecture: Architecture | None, plan: _Plan) -> Exception:
    """The strict-mode error: what the file holds, every difference from the model, and how to resolve it."""
    looks = architecture.describe() if architecture else "an incomplete PVTv2 state dict"
    lines = [
        f"cannot load {source} into {_model_name(model)}:",
        f"  the file ({layout} layout) holds {looks}",
        *plan.comparison.lines(),
        *[f"  hint: {hint}" for hint in plan.hints],
    ]
    if architecture and architecture.lookalike and not architecture.variants:
        lines.append(
            f"  hint: {architecture.lookalike} shares PVTv2's key names but uses MLP ratio 4 in every stage; "
            "it is a different model"
        )
    elif architecture and architecture.variant and architecture.variant != _variant_of(model):
        lines.append(
            f"  hint: build the matching model, e.g. PVTv2Backbone.{architecture.variant}() or "
            f"pvt_v2_{architecture.variant}(), or load what fits with load_weights(model, weights, strict=False)"
        )
    lines.append("Nothing was loaded; the model is unchanged.")
    return CheckpointError("\n".join(lines))


def _apply(model: nn.Module, plan: _Plan) -> tuple[str, ...]:
    """Load the planned tensors that match the model (all of them unless ``strict=False``); returns their keys."""
    skip = set(plan.comparison.unexpected) | set(plan.comparison.mismatched)
    to_load = {k: v for k, v in plan.state_dict.items() if k not in skip}
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # compared with the model before
    return tuple(to_load)


def _report(
    checkpoint: Checkpoint,
    conversion: Conversion,
    architecture: Architecture | None,
    plan: _Plan,
    loaded: tuple[str, ...],
    notes: list[str],
) -> LoadReport:
    comparison = plan.comparison
    return LoadReport(
        **checkpoint.provenance(conversion),
        architecture=architecture,
        loaded=loaded,
        dropped=conversion.dropped + tuple(plan.dropped),
        missing=comparison.missing + tuple(sorted(plan.fresh)),
        unexpected=comparison.unexpected,
        mismatched=comparison.mismatched,
        notes=tuple(conversion.notes) + tuple(notes),
    )


class LoadWarning(UserWarning):
    """``load_weights`` left out file entries a user may not expect, or ``strict=False`` left model keys unloaded.

    Not warned about: a classifier head the model lacks (or ``fresh_head=True`` replaces), stages a pruned backbone
    does not build, and container entries next to the weights or non-tensor values (``optimizer``, ``meta``,
    ``epoch``, ...). Warned about: any other dropped key (e.g. a detector's neck and heads outside the backbone
    prefix), and under ``strict=False`` missing, unexpected or shape-mismatched keys.
    """


def _expected_drop(item: DroppedKey) -> bool:
    """Container entries and non-tensor values are named ``[...]`` (see ``unwrap_checkpoint``)."""
    return item.key.startswith("[")


def _warn(source: str, surprising: tuple[DroppedKey, ...], unloaded: list[str]) -> None:
    """One ``LoadWarning`` naming the surprising drops and, for a partial load, the keys left out (``unloaded``)."""
    lines = dropped_lines(surprising) + unloaded
    if not lines:
        return
    what = "strict=False left keys unloaded" if unloaded else "some entries of the file were not loaded"
    message = f"loading {source}: {what}\n" + "\n".join(lines)
    warnings.warn(message, LoadWarning, stacklevel=_outside_stacklevel())


def _outside_stacklevel() -> int:
    """``stacklevel`` of the first frame outside this package, so a warning names the user's line (a constructor's
    ``weights=`` loads from inside the package)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1  # level 1: the function calling warnings.warn
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _log(report: LoadReport, notes: list[str], *, incomplete: bool) -> None:
    """INFO: the summary line and the load's own notes; DEBUG: each dropped entry; WARNING: a partial load."""
    logger.info(report.summary().splitlines()[0])
    for note in notes:
        logger.info("%s", note)
    for item in report.dropped:
        logger.debug("dropped %s: %s", item.key, item.reason)
    if incomplete:
        logger.warning("strict=False: not everything was loaded\n%s", report.summary())


def load_weights(
    model: nn.Module,
    source: WeightsLike,
    *,
    strict: bool = True,
    layout: str = "auto",
    prefix: str | None = None,
    fresh_head: bool = False,
    trust_pickle: bool = False,
) -> LoadReport:
    """Load a PVTv2 checkpoint in any layout into ``model`` (a ``PVTv2Backbone``, ``PVTv2`` or any module with
    native keys), after checking every tensor against the model.

    Expected differences are handled and reported: a classifier head the model lacks is dropped, stages a pruned
    backbone does not build are dropped, RGB first-conv weights are adapted to ``in_channels`` != 3, half-precision
    tensors are cast to the model's dtype. Anything else, i.e. a missing, unexpected or shape-mismatched key, raises
    one ``CheckpointError`` that lists them (first few and counts) and says which variant the file looks like, and
    the model is left unchanged. ``strict=False`` loads the matching tensors and reports the rest instead.

    Args:
        model: the module to fill; its parameters keep their device and dtype.
        source: path, ``save_pretrained`` directory, ``"hf-hub:REPO[@REVISION]"``, checkpoint dict, or published
            weights: a name such as ``"pvt_v2_b2.in1k"`` or an enum member such as ``PVTv2_B2_Weights.DEFAULT``,
            downloaded once into the torch hub cache (see ``pvt_backbone.weights.hub``). An existing path wins.
        layout: ``"auto"`` (from sentinel keys) or one of ``timm``, ``timm_features``, ``pvt``, ``hf``, ``mmdet``,
            ``lucid``.
        prefix: exact prefix of the PVTv2 keys inside the file (default: found automatically).
        fresh_head: keep the model's freshly initialised classifier head instead of loading the file's (needed when
            ``num_classes`` differs from the file's head, or the file has none).
        trust_pickle: allow pickles that need code (``torch.load(weights_only=False)``); only for trusted files.

    Returns:
        A ``LoadReport``; a summary is logged at INFO on the ``pvt_backbone.weights`` logger, and a ``LoadWarning``
        is emitted when entries other than a classifier head, unbuilt stages or container entries were dropped, or
        when ``strict=False`` left keys unloaded (see ``LoadWarning``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    checkpoint = read_checkpoint(resolve_source(source), trust_pickle=trust_pickle)
    conversion = to_native(checkpoint.content, layout=layout, prefix=prefix)
    architecture = _architecture(conversion.state_dict)
    plan = _plan(conversion.state_dict, model.state_dict(), fresh_head=fresh_head)
    if plan.comparison and strict:
        raise _refusal(model, checkpoint.source, conversion.layout, architecture, plan)
    loaded = _apply(model, plan)
    notes = list(plan.notes)
    if architecture and architecture.lookalike:
        notes.append(f"these weights have the shapes of {architecture.lookalike}")
    report = _report(checkpoint, conversion, architecture, plan, loaded, notes)
    _log(report, notes, incomplete=not strict and bool(plan.comparison or plan.hints))
    surprising = tuple(item for item in conversion.dropped if not _expected_drop(item))
    _warn(report.source, surprising, plan.comparison.lines() if not strict and plan.comparison else [])
    return report


def load_model_weights(
    model: nn.Module,
    source: WeightsLike,
    *,
    trust_pickle: bool = False,
    hint: str = "weights= takes the whole model's state dict; backbone-only weights go in weights_backbone=",
) -> nn.Module:
    """Load a whole model's state dict (a detector's, a segmenter's: any ``nn.Module``) under its own keys, strictly.

    ``source`` is a file (``.safetensors`` or a ``torch.save`` pickle, read as ``read_checkpoint`` reads), a
    ``hf-hub:`` path, a published weights name or enum member (``pvt_backbone.weights.hub``) or a dict; a
    ``state_dict``/``model`` container is unwrapped. Unlike ``load_weights`` no layout is
    mapped: every key and shape must match ``model`` exactly, or ``CheckpointError`` lists the differences, ends with
    ``hint``, and ``model`` is untouched.

    Example:
        >>> trained = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> twin = load_model_weights(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), trained.state_dict())
        >>> torch.equal(twin[2].weight, trained[2].weight)
        True
    """
    checkpoint = read_checkpoint(resolve_source(source), trust_pickle=trust_pickle)
    state_dict, _, _ = unwrap_checkpoint(checkpoint.content)
    load_state_dict_strict(model, state_dict, source=checkpoint.source, hint=hint)
    return model
