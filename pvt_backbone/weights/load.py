"""Reading, loading and saving PVTv2 weights; the key mapping itself lives in ``pvt_backbone.layouts``.

* ``read_checkpoint``: ``.safetensors`` via ``safetensors.torch.load_file``; ``.pth/.pt/.bin/.ckpt`` via
  ``torch.load(weights_only=True)`` (a pickle that needs code is refused unless ``trust_pickle=True``); a directory
  written by ``save_pretrained``; ``hf-hub:REPO[@REVISION]`` through ``huggingface_hub`` when installed.
* ``load_weights``: any layout into our backbone or classifier, strict by default, all-or-nothing.
* ``save_weights``: safetensors in any layout, atomic, with provenance in the header metadata.
* ``inspect_checkpoint`` / ``convert_checkpoint``: what ``tools/convert_weights.py`` prints and does.

Example:
    >>> model = PVTv2Backbone.b2(out_indices=(1, 2, 3))
    >>> report = load_weights(model, "pvt_v2_b2.pth")          # the authors' classifier release
    >>> report.layout, report.variant, len(report.loaded), [d.key for d in report.dropped]
    ('pvt', 'b2', 332, ['head.weight', 'head.bias'])
    >>> save_weights(model, "b2_backbone.safetensors", source=report).num_tensors
    332
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import VARIANTS
from .layouts import (
    LAYOUTS,
    NATIVE,
    Architecture,
    CheckpointError,
    Conversion,
    DroppedKey,
    from_native,
    get_layout,
    infer_architecture,
    keep_stages,
    split_head,
    stage_of,
    to_native,
    unwrap_checkpoint,
)
from .state_dict import SHOWN as _SHOWN
from .state_dict import StateDictDiff, compare_state_dicts

__all__ = [
    "WeightsSource",
    "Checkpoint",
    "LoadReport",
    "SaveReport",
    "CheckpointInfo",
    "ConvertReport",
    "read_checkpoint",
    "load_weights",
    "save_weights",
    "inspect_checkpoint",
    "convert_checkpoint",
]

logger = logging.getLogger(__name__)

WeightsSource = str | os.PathLike | Mapping[str, Any]
"""A file path, a ``save_pretrained`` directory, ``"hf-hub:REPO[@REVISION]"``, or an in-memory checkpoint dict."""

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
_HUB = "hf-hub:"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as read: the raw (possibly nested) dict plus where it came from."""

    content: Mapping[str, Any]
    source: str  # file path, "hf-hub:..." or "<state dict>"
    sha256: str | None = None  # of the file; None for an in-memory dict
    metadata: Mapping[str, str] = field(default_factory=dict)  # safetensors header metadata


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_hub(spec: str) -> Path:
    repo, _, revision = spec[len(_HUB) :].partition("@")
    if repo.count("/") != 1:
        raise CheckpointError(f"expected 'hf-hub:ORG/NAME[@REVISION]', got {spec!r}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise CheckpointError(f"{spec!r} needs huggingface_hub: pip install huggingface_hub") from exc
    try:
        return Path(hf_hub_download(repo, "model.safetensors", revision=revision or None))
    except Exception as exc:  # the hub raises many types (offline, not found, gated); all mean "not available"
        raise CheckpointError(f"cannot get model.safetensors of {spec!r} from the Hugging Face hub: {exc}") from exc


def _resolve_path(source: str | os.PathLike) -> Path:
    if isinstance(source, str) and source.startswith(_HUB):
        return _resolve_hub(source)
    path = Path(source)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"weights directory {path} has no model.safetensors or pytorch_model.bin")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    if path.suffix in _TORCH_SUFFIXES:
        return False
    with open(path, "rb") as handle:  # safetensors: 8-byte little-endian header size, then a JSON object
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_torch(path: Path, trust_pickle: bool) -> Any:
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read {path}: the file is empty (truncated or corrupt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if trust_pickle or "Weights only load failed" not in text:
            raise CheckpointError(
                f"cannot read {path}: {_first_line(exc)} (is the file truncated or corrupt?)"
            ) from None
        detail = " ".join(text.partition("WeightsUnpickler error:")[2].split("Check the documentation")[0].split())
        if detail.startswith("Unsupported global"):
            what = detail.partition("GLOBAL")[2].partition(" was not")[0].strip()
            raise CheckpointError(
                f"{path} is a pickle that needs Python code ({what}) to load, which torch.load(weights_only=True) "
                "refuses. Only if you trust where the file came from, opt in with trust_pickle=True "
                "(tools/convert_weights.py: --trust-pickle) and convert it to safetensors once"
            ) from None
        raise CheckpointError(
            f"cannot read {path} with torch.load(weights_only=True): {detail or _first_line(exc)}. The file is "
            "truncated or corrupt, or a pickle with code; if you trust it, try trust_pickle=True (--trust-pickle)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {_first_line(exc)} (is the file truncated or corrupt?)") from None


def read_checkpoint(source: WeightsSource, *, trust_pickle: bool = False) -> Checkpoint:
    """Read a checkpoint onto the CPU without interpreting its keys.

    Args:
        source: see ``WeightsSource``. ``.safetensors`` (or a safetensors header) -> ``load_file``; anything else ->
            ``torch.load(weights_only=True)``.
        trust_pickle: allow ``torch.load(weights_only=False)``, which can run code stored in the file.

    Raises:
        FileNotFoundError: no such file. CheckpointError: unreadable, truncated, corrupt or refused pickle.
    """
    if isinstance(source, Mapping):
        return Checkpoint(source, "<state dict>")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"weights must be a path, 'hf-hub:REPO', or a state dict, got {type(source).__name__}")
    path = _resolve_path(source)
    label = str(source) if str(source).startswith(_HUB) else str(path)
    if _is_safetensors(path):
        try:
            content = load_file(path, device="cpu")
            with safe_open(path, "pt") as handle:
                metadata = dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read {path} as safetensors: {exc} (is the file truncated or corrupt?)"
            ) from None
    else:
        content, metadata = _read_torch(path, trust_pickle), {}
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a state dict or checkpoint dict")
    return Checkpoint(content, label, _sha256(path), metadata)


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
    state_dict: dict[str, Tensor]
    comparison: StateDictDiff
    dropped: list[DroppedKey]
    notes: list[str]
    hints: list[str]
    fresh: set[str]  # model keys intentionally not loaded (fresh head)


def _plan(file_sd: Mapping[str, Tensor], model_sd: Mapping[str, Tensor], *, fresh_head: bool) -> _Plan:
    """Decide what to load: head handling, stage pruning, first-conv adaptation, then compare with the model."""
    dropped, notes, hints = [], [], []
    body, head = split_head(file_sd)
    model_head = {k for k in model_sd if k.startswith("head.")}
    state_dict: dict[str, Tensor] = dict(file_sd)
    if head and not model_head:
        state_dict = body
        dropped += [DroppedKey(k, "classifier head: the model has none (a backbone, or num_classes=0)") for k in head]
    elif model_head and fresh_head:
        state_dict = body
        dropped += [DroppedKey(k, "classifier head: fresh_head=True keeps the model's new head") for k in head]
        classes = model_sd["head.weight"].shape[0] if "head.weight" in model_sd else 0
        notes.append(f"classifier head left freshly initialised ({classes} classes); train it before use")
    elif "head.weight" in model_sd and "head.weight" in head:
        have, want = head["head.weight"].shape[0], model_sd["head.weight"].shape[0]
        if have != want:
            hints.append(
                f"the file's head has {have} classes, the model's {want}: build with num_classes={have}, or pass "
                "fresh_head=True to load everything else and keep a new head"
            )
    elif model_head and not head:
        hints.append("the file has no classifier head (a backbone checkpoint): pass fresh_head=True to train a new one")

    model_stages = {stage for key in model_sd if (stage := stage_of(key)) is not None}
    if model_stages:
        state_dict, pruned = keep_stages(state_dict, max(model_stages) + 1)
        dropped += pruned

    key = "patch_embed.proj.weight"
    if key in state_dict and key in model_sd:
        have, want = state_dict[key], model_sd[key]
        if (
            have.dim() == 4
            and have.shape[1] == 3
            and want.shape[1] != 3
            and have.shape[:1] + have.shape[2:] == (want.shape[:1] + want.shape[2:])
        ):
            state_dict[key] = _adapt_first_conv(have, want.shape[1])
            how = "summed over RGB" if want.shape[1] == 1 else f"RGB repeated and scaled by 3/{want.shape[1]}"
            notes.append(f"adapted {key} from 3 to {want.shape[1]} input channels ({how})")

    fresh = model_head if (model_head and fresh_head) else set()
    comparison = compare_state_dicts(state_dict, model_sd, ignore=fresh)
    cast = sorted(
        {
            f"{t.dtype} -> {model_sd[k].dtype}".replace("torch.", "")
            for k, t in state_dict.items()
            if k in model_sd and t.dtype != model_sd[k].dtype and t.is_floating_point()
        }
    )
    if cast:
        notes.append(f"cast {', '.join(cast)}")
    return _Plan(state_dict, comparison, dropped, notes, hints, fresh)


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
        lines += _dropped_lines(self.dropped)
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mismatched", self.mismatched),
        ):
            if keys:
                lines.append(
                    f"  {label} ({len(keys)}): {', '.join(keys[:_SHOWN])}" + (" ..." if len(keys) > _SHOWN else "")
                )
        return "\n".join(lines)


def _dropped_lines(dropped: tuple[DroppedKey, ...] | list[DroppedKey]) -> list[str]:
    """Dropped entries grouped by reason: ``  dropped 2 (reason): a, b``."""
    by_reason: dict[str, list[str]] = {}
    for item in dropped:
        by_reason.setdefault(item.reason, []).append(item.key)
    return [
        f"  dropped {len(keys)} ({reason}): {', '.join(keys[:_SHOWN])}" + (" ..." if len(keys) > _SHOWN else "")
        for reason, keys in by_reason.items()
    ]


def load_weights(
    model: nn.Module,
    source: WeightsSource,
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
        source: path, ``save_pretrained`` directory, ``"hf-hub:REPO[@REVISION]"`` or checkpoint dict.
        layout: ``"auto"`` (from sentinel keys) or one of ``timm``, ``timm_features``, ``pvt``, ``hf``, ``mmdet``,
            ``lucid``.
        prefix: exact prefix of the PVTv2 keys inside the file (default: found automatically).
        fresh_head: keep the model's freshly initialised classifier head instead of loading the file's (needed when
            ``num_classes`` differs from the file's head, or the file has none).
        trust_pickle: allow pickles that need code (``torch.load(weights_only=False)``); only for trusted files.

    Returns:
        A ``LoadReport``; a summary is logged at INFO on the ``pvt_backbone.weights`` logger.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    checkpoint = read_checkpoint(source, trust_pickle=trust_pickle)
    conversion = to_native(checkpoint.content, layout=layout, prefix=prefix)
    try:
        architecture: Architecture | None = infer_architecture(conversion.state_dict)
    except CheckpointError:
        architecture = None
    model_sd = model.state_dict()
    plan = _plan(conversion.state_dict, model_sd, fresh_head=fresh_head)
    comparison = plan.comparison

    if comparison and strict:
        looks = architecture.describe() if architecture else "an incomplete PVTv2 state dict"
        lines = [
            f"cannot load {checkpoint.source} into {_model_name(model)}:",
            f"  the file ({conversion.layout} layout) holds {looks}",
            *comparison.lines(),
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
                f"pvt_v2_{architecture.variant}(), or pass strict=False to load what fits"
            )
        lines.append("Nothing was loaded; the model is unchanged.")
        raise CheckpointError("\n".join(lines))

    skip = set(comparison.unexpected) | set(comparison.mismatched)
    to_load = {k: v for k, v in plan.state_dict.items() if k not in skip}
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # validated above
    notes = list(plan.notes)
    if architecture and architecture.lookalike:
        notes.append(f"these weights have the shapes of {architecture.lookalike}")
    report = LoadReport(
        **_provenance(checkpoint, conversion),
        architecture=architecture,
        loaded=tuple(to_load),
        dropped=conversion.dropped + tuple(plan.dropped),
        missing=comparison.missing + tuple(sorted(plan.fresh)),
        unexpected=comparison.unexpected,
        mismatched=comparison.mismatched,
        notes=tuple(conversion.notes) + tuple(notes),
    )
    logger.info(report.summary().splitlines()[0])
    for note in notes:
        logger.info("%s", note)
    for item in report.dropped:
        logger.debug("dropped %s: %s", item.key, item.reason)
    if not strict and (comparison or plan.hints):
        logger.warning("strict=False: not everything was loaded\n%s", report.summary())
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaveReport:
    """What ``save_weights`` wrote."""

    path: Path
    layout: str
    variant: str | None
    num_tensors: int
    dropped: tuple[DroppedKey, ...]
    notes: tuple[str, ...]
    metadata: Mapping[str, str]


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` in ``path``'s directory, then rename over ``path``; never leaves a partial file."""
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"output directory {directory} does not exist")
    handle, temp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _prepare(tensors: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """CPU, optional dtype cast of floating tensors, contiguous, and no two tensors sharing memory."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        if tensor.is_meta:
            raise ValueError(f"{key} is on the meta device; materialise the model before saving")
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
    return DTYPES[dtype]


def _source_fields(source: WeightsSource | LoadReport | Checkpoint | None) -> dict[str, str]:
    if source is None:
        return {}
    if isinstance(source, (LoadReport, Checkpoint)):
        name, digest = source.source, source.sha256
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name, digest = (path.name, _sha256(path)) if path.is_file() else (str(source), None)
    elif isinstance(source, Mapping):
        return {"pvt_backbone.source": "<state dict>"}
    else:
        raise TypeError(f"source must be a path, state dict, LoadReport or Checkpoint, got {type(source).__name__}")
    fields = {"pvt_backbone.source": Path(name).name if not name.startswith(_HUB) else name}
    if digest:
        fields["pvt_backbone.source_sha256"] = digest
    return fields


def _write_safetensors(
    native: Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    layout: str,
    dtype: torch.dtype | str | None,
    source: WeightsSource | LoadReport | Checkpoint | None,
    variant: str | None = None,
) -> SaveReport:
    from .. import __version__  # the package is fully imported by the time anything is saved

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"output {path} must end with .safetensors (weights are written as safetensors)")
    torch_dtype = _dtype(dtype)
    if variant is None:
        try:
            variant = infer_architecture(native).variant
        except CheckpointError:
            variant = None
    conversion = from_native(native, layout)
    tensors = _prepare(conversion.state_dict, torch_dtype)
    metadata = {
        "format": "pt",  # transformers refuses safetensors files without it
        "pvt_backbone.layout": conversion.layout,
        "pvt_backbone.variant": variant or "unknown",
        "pvt_backbone.version": __version__,
        **_source_fields(source),
    }
    metadata["pvt_backbone.dtype"] = ",".join(sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}))
    _atomic_write(path, lambda temp: save_file(tensors, temp, metadata=metadata))
    return SaveReport(path, conversion.layout, variant, len(tensors), conversion.dropped, conversion.notes, metadata)


def save_weights(
    model: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    layout: str = "native",
    dtype: torch.dtype | str | None = None,
    source: WeightsSource | LoadReport | None = None,
) -> SaveReport:
    """Write a model's weights (or a native state dict) as ``.safetensors`` in any layout, atomically.

    Tensors are written contiguous and non-aliased (split key/value halves are separate tensors). The header metadata
    records ``pvt_backbone.layout``, ``pvt_backbone.variant``, ``pvt_backbone.dtype``, ``pvt_backbone.version`` and,
    when ``source`` is given (a path, or the ``LoadReport`` of the load), the source file name and SHA-256.

    Args:
        model: our backbone or classifier, or a native state dict.
        path: output file ending in ``.safetensors``; written to a temp file in the same directory, then renamed.
        layout: ``native`` (= ``timm``), ``timm_features``, ``pvt``, ``hf``, ``mmdet`` or ``lucid``; the head is written
            when the model has one and the layout can hold it (``mmdet`` cannot: reported in ``dropped``).
        dtype: cast floating tensors (``"float16"``, ``"bfloat16"``, ``torch.float32``, ...).
        source: where the weights came from, for the provenance metadata.
    """
    state_dict = model.state_dict() if isinstance(model, nn.Module) else model
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"model must be an nn.Module or a state dict, got {type(model).__name__}")
    return _write_safetensors(state_dict, path, layout=layout, dtype=dtype, source=source)


# ---------------------------------------------------------------------------------------------------------------------
# Inspecting and converting files (tools/convert_weights.py)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's layout, architecture and provenance, as ``--inspect`` prints it."""

    source: str
    sha256: str | None
    layout: str
    prefix: str
    container: str
    architecture: Architecture
    file_tensors: int  # tensors in the file (or under its container), before mapping
    num_tensors: int  # native tensors after mapping (key/value pairs joined, neck and heads dropped)
    dtypes: tuple[str, ...]
    dropped: tuple[DroppedKey, ...]
    notes: tuple[str, ...]
    metadata: Mapping[str, str]

    def format(self) -> str:
        arch = self.architecture
        lines = [
            f"file:       {self.source}",
            f"sha256:     {self.sha256 or '-'}",
            f"layout:     {self.layout}"
            + (f" under prefix {self.prefix!r}" if self.prefix else "")
            + (f" in {self.container}" if self.container else ""),
            f"variant:    {arch.variant or ('/'.join(arch.variants) if arch.variants else 'none')}"
            + (f" (lookalike: {arch.lookalike})" if arch.lookalike else ""),
            f"parameters: {arch.num_params:,} in {self.num_tensors} native tensors ({', '.join(self.dtypes)}; "
            f"{self.file_tensors} tensors in the file)",
            f"head:       {arch.num_classes} classes" if arch.num_classes else "head:       none (backbone weights)",
            f"shapes:     {arch.describe()}",
        ]
        lines += [f"metadata:   {key} = {value}" for key, value in self.metadata.items()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines + _dropped_lines(self.dropped))


def _check_variant(native: Mapping[str, Tensor], variant: str, architecture: Architecture) -> None:
    """Raise unless every native tensor has exactly the key and shape our ``variant`` model has."""
    from ..backbone import PVTv2Backbone  # local import: backbone.py imports this module

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    body, head = split_head(native)
    with torch.device("meta"):
        model = PVTv2Backbone(variant, out_indices=(architecture.num_stages - 1,), in_channels=architecture.in_channels)
    expected = dict(model.state_dict())
    if head:
        expected["head.weight"] = torch.empty(architecture.num_classes, VARIANTS[variant].embed_dims[-1], device="meta")
        expected["head.bias"] = torch.empty(architecture.num_classes, device="meta")
    comparison = compare_state_dicts(native, expected, ignore=set())
    if comparison:
        raise CheckpointError(
            "\n".join(
                [f"the checkpoint is not PVTv2-{variant}; it holds {architecture.describe()}", *comparison.lines()]
            )
        )


def _provenance(checkpoint: Checkpoint, conversion: Conversion) -> dict[str, Any]:
    """Where weights came from and how they were read: the fields ``LoadReport`` and ``CheckpointInfo`` share."""
    return {
        "source": checkpoint.source,
        "sha256": checkpoint.sha256,
        "layout": conversion.layout,
        "prefix": conversion.prefix,
        "container": conversion.container,
        "metadata": dict(checkpoint.metadata),
    }


def _inspect(
    source: WeightsSource, *, layout: str, prefix: str | None, variant: str | None, trust_pickle: bool
) -> tuple[CheckpointInfo, Checkpoint, dict[str, Tensor]]:
    checkpoint = read_checkpoint(source, trust_pickle=trust_pickle)
    conversion = to_native(checkpoint.content, layout=layout, prefix=prefix)
    file_tensors = len(unwrap_checkpoint(checkpoint.content)[0])
    architecture = infer_architecture(conversion.state_dict)
    if variant is not None:
        _check_variant(conversion.state_dict, variant, architecture)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in conversion.state_dict.values()})
    info = CheckpointInfo(
        **_provenance(checkpoint, conversion),
        architecture=architecture,
        file_tensors=file_tensors,
        num_tensors=len(conversion.state_dict),
        dtypes=tuple(dtypes),
        dropped=conversion.dropped,
        notes=conversion.notes,
    )
    return info, checkpoint, conversion.state_dict


def inspect_checkpoint(
    source: WeightsSource,
    *,
    layout: str = "auto",
    prefix: str | None = None,
    variant: str | None = None,
    trust_pickle: bool = False,
) -> CheckpointInfo:
    """Read a checkpoint, find its layout and infer its architecture without building a model.

    ``variant`` additionally checks that every tensor matches that variant's keys and shapes.

    Raises:
        CheckpointError: unreadable file, unknown layout, PVT v1, or (with ``variant``) a shape mismatch.
    """
    return _inspect(source, layout=layout, prefix=prefix, variant=variant, trust_pickle=trust_pickle)[0]


@dataclass(frozen=True)
class ConvertReport:
    """``convert_checkpoint``'s account: what was read and what was written."""

    read: CheckpointInfo
    written: SaveReport
    dropped: tuple[DroppedKey, ...]  # by the --to choice (head for a backbone) and by the target layout

    def format(self) -> str:
        info, out = self.read, self.written
        lines = [
            f"read  {info.source}: layout {info.layout}"
            + (f" under prefix {info.prefix!r}" if info.prefix else "")
            + f", {info.file_tensors} tensors -> {info.num_tensors} native, {info.architecture.describe()}"
        ]
        lines += [f"  note: {note}" for note in info.notes]
        lines += _dropped_lines(info.dropped)
        lines.append(f"wrote {out.path}: layout {out.layout}, {out.num_tensors} tensors, variant {out.variant}")
        lines += [f"  note: {note}" for note in out.notes]
        lines += _dropped_lines(self.dropped)
        return "\n".join(lines)


CONVERT_TARGETS = ("backbone", "classifier", *LAYOUTS)


def convert_checkpoint(
    source: WeightsSource,
    output: str | os.PathLike,
    *,
    from_layout: str = "auto",
    to: str = "backbone",
    variant: str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_pickle: bool = False,
) -> ConvertReport:
    """Convert a checkpoint file to ``output`` (``.safetensors``) in another layout.

    Args:
        to: ``backbone`` (native keys without a head), ``classifier`` (native keys with the head; the input must have
            one), or a layout name (``timm``, ``timm_features``, ``pvt``, ``hf``, ``mmdet``, ``lucid``), which keeps
            the head if the layout can hold it.
        variant: require the weights to be exactly this variant (keys and shapes); default: inferred.
    """
    if to not in CONVERT_TARGETS:
        raise ValueError(f"unknown target {to!r}; expected one of {list(CONVERT_TARGETS)}")
    info, checkpoint, native = _inspect(
        source, layout=from_layout, prefix=None, variant=variant, trust_pickle=trust_pickle
    )
    body, head = split_head(native)
    dropped: tuple[DroppedKey, ...] = ()
    if to == "backbone":
        native = body
        dropped = tuple(DroppedKey(key, "--to backbone writes no classifier head") for key in head)
    elif to == "classifier" and not head:
        raise CheckpointError(f"{info.source} has no classifier head; --to classifier needs one (use --to backbone)")
    layout = NATIVE if to in ("backbone", "classifier") else get_layout(to).name
    written = _write_safetensors(native, output, layout=layout, dtype=dtype, source=checkpoint, variant=variant)
    return ConvertReport(info, written, dropped + written.dropped)
