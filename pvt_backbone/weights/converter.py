"""Inspecting and converting checkpoint files: what the ``pvt-convert`` command prints and does.

This is the one weights module that builds models (``PVTv2Backbone`` on the meta device, to check a file against a
variant's exact keys and shapes; whole detectors through ``pvt_backbone.detection``'s builders, so a converted
detector file has passed a strict load), so ``pvt_backbone.weights`` does not import it: ``pvt_backbone.backbone``
imports that package.

Whole detectors (an mmdet RetinaNet / Faster R-CNN / Mask R-CNN checkpoint, or a ``save_detector`` file):
``inspect_detector`` reads what one holds, ``convert_detector`` writes it as ``save_detector``'s ``.safetensors``
(``to="detector"``) or as mmdet's ``.pth`` (``to="mmdet"``, ``save_mmdet_detector``); mmdet -> detector -> mmdet
gives the same keys and bit-identical tensors.

Example:
    >>> save_weights(pvt_v2_b0(), "b0.safetensors").num_tensors
    178
    >>> info = inspect_checkpoint("b0.safetensors", variant="b0")
    >>> info.layout, info.architecture.variant, info.architecture.num_classes, info.dtypes
    ('timm', 'b0', 1000, ('float32',))
    >>> report = convert_checkpoint("b0.safetensors", "b0_mmdet.safetensors", to="mmdet", dtype="float16")
    >>> report.written.layout, report.written.num_tensors, sorted({d.key for d in report.dropped})
    ('mmdet', 160, ['head.bias', 'head.weight'])
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..backbone import PVTv2Backbone
from ..config import NUM_STAGES, VARIANTS, PVTv2Config
from .detect import Architecture, infer_architecture, to_native
from .detectors import DETECTOR_ARCHS, load_detector, read_detector_file, save_detector, to_mmdet_state_dict
from .io import Checkpoint, WeightsSource, atomic_write, read_checkpoint
from .layouts import (
    LAYOUTS,
    NATIVE,
    CheckpointError,
    DroppedKey,
    dropped_lines,
    get_layout,
    split_head,
    unwrap_checkpoint,
)
from .save import DTYPES, SaveReport, write_safetensors
from .state_dict import compare_state_dicts

__all__ = [
    "CONVERT_TARGETS",
    "DETECTOR_TARGETS",
    "CheckpointInfo",
    "ConvertReport",
    "DetectorInfo",
    "DetectorConvertReport",
    "inspect_checkpoint",
    "convert_checkpoint",
    "inspect_detector",
    "convert_detector",
    "save_mmdet_detector",
]

CONVERT_TARGETS = ("backbone", "classifier", *LAYOUTS)
# Whole-detector outputs: "detector" is save_detector's .safetensors, "mmdet" mmdet's own .pth checkpoint.
DETECTOR_TARGETS = ("detector", "mmdet")


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's layout, architecture and provenance, as ``inspect_checkpoint`` finds them."""

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
    misfit: tuple[str, ...] = ()  # what the tensors were checked against, then each difference; () when they fit

    @property
    def fits(self) -> bool:
        """Whether every tensor has the key and shape of the configuration the shapes point to."""
        return not self.misfit

    def format(self) -> str:
        """One ``label: value`` line per fact (file, sha256, layout, variant, parameters, head, shapes, metadata)."""
        arch = self.architecture
        lines = [
            f"file:       {self.source}",
            f"sha256:     {self.sha256 or '-'}",
            f"layout:     {self.layout}"
            + (f" under prefix {self.prefix!r}" if self.prefix else "")
            + (f" in {self.container}" if self.container else ""),
            f"variant:    {self._variant()}",
            f"parameters: {arch.num_params:,} in {self.num_tensors} native tensors ({', '.join(self.dtypes)}; "
            f"{self.file_tensors} tensors in the file)",
            f"head:       {arch.num_classes} classes" if arch.num_classes else "head:       none (backbone weights)",
            f"shapes:     {arch.describe()}",
        ]
        if self.misfit:
            lines += [f"  does not fit {self.misfit[0]}:", *self.misfit[1:]]
        lines += [f"metadata:   {key} = {value}" for key, value in self.metadata.items()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines + dropped_lines(self.dropped))

    def _variant(self) -> str:
        arch = self.architecture
        if self.misfit:
            return f"none: the tensors do not fit {self.misfit[0]} (listed under shapes)"
        name = arch.variant or ("/".join(arch.variants) if arch.variants else "none")
        return name + (f" (lookalike: {arch.lookalike})" if arch.lookalike else "")


def _inferred_config(native: Mapping[str, Tensor], architecture: Architecture) -> PVTv2Config:
    """The configuration the shapes describe, padded to four stages (the pad builds nothing: only the first
    ``num_stages`` are checked). ``num_heads`` changes no shape, so one head per stage stands in for it."""
    pad = NUM_STAGES - architecture.num_stages
    try:
        return PVTv2Config(
            embed_dims=architecture.embed_dims + architecture.embed_dims[-1:] * pad,
            depths=architecture.depths + (1,) * pad,
            num_heads=(1,) * NUM_STAGES,
            mlp_ratios=architecture.mlp_ratios + architecture.mlp_ratios[-1:] * pad,
            sr_ratios=architecture.sr_ratios + (1,) * pad,
            qkv_bias="stages.0.blocks.0.attn.q.bias" in native,
            linear=architecture.linear,
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"its shapes describe no buildable PVTv2 configuration: {exc}") from None


def _misfit(native: Mapping[str, Tensor], architecture: Architecture, variant: str | None) -> tuple[str, list[str]]:
    """(what was checked, one line per kind of difference; [] when every key and shape fits).

    ``variant`` None: the variant the shapes point to, or the custom configuration they describe.
    """
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    name = variant if variant is not None else (architecture.variants[0] if architecture.variants else None)
    config = VARIANTS[name] if name else _inferred_config(native, architecture)
    _, head = split_head(native)
    with torch.device("meta"):  # keys and shapes only: no memory, no init
        model = PVTv2Backbone(config, out_indices=(architecture.num_stages - 1,), in_channels=architecture.in_channels)
    expected = dict(model.state_dict())
    if head:
        expected["head.weight"] = torch.empty(architecture.num_classes, config.embed_dims[-1], device="meta")
        expected["head.bias"] = torch.empty(architecture.num_classes, device="meta")
    target = f"PVTv2-{name}" if name else "the custom configuration its shapes describe"
    return target, compare_state_dicts(native, expected).lines()


def _check_fit(native: Mapping[str, Tensor], architecture: Architecture, variant: str | None) -> None:
    """Raise unless every native tensor has exactly the key and shape of ``variant`` (default: the inferred one)."""
    target, lines = _misfit(native, architecture, variant)
    if not lines:
        return
    if variant is not None:
        first = f"the checkpoint is not {target}; it holds {architecture.describe()}"
    else:
        what = f"point to {architecture.describe()}" if architecture.variants else f"describe {architecture.describe()}"
        fits = target if architecture.variants else "that configuration"
        first = f"the checkpoint's shapes {what}, but not every tensor fits {fits}:"
    raise CheckpointError("\n".join([first, *lines]))


def _inspect(
    source: WeightsSource, *, layout: str, prefix: str | None, variant: str | None, trust_pickle: bool, strict: bool
) -> tuple[CheckpointInfo, Checkpoint, dict[str, Tensor]]:
    """(the info, the checkpoint as read, its native state dict); ``strict`` raises where the tensors do not fit."""
    checkpoint = read_checkpoint(source, trust_pickle=trust_pickle)
    conversion = to_native(checkpoint.content, layout=layout, prefix=prefix)
    file_tensors = len(unwrap_checkpoint(checkpoint.content)[0])
    architecture = infer_architecture(conversion.state_dict)
    misfit: tuple[str, ...] = ()
    if strict or variant is not None:
        _check_fit(conversion.state_dict, architecture, variant)
    else:
        target, lines = _misfit(conversion.state_dict, architecture, None)
        misfit = (target, *lines) if lines else ()
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in conversion.state_dict.values()})
    info = CheckpointInfo(
        **checkpoint.provenance(conversion),
        architecture=architecture,
        file_tensors=file_tensors,
        num_tensors=len(conversion.state_dict),
        dtypes=tuple(dtypes),
        dropped=conversion.dropped,
        notes=conversion.notes,
        misfit=misfit,
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

    Every tensor is checked against the keys and shapes of the variant the shapes point to (or the custom
    configuration they describe); differences are reported in ``misfit``, and the file is not labelled a variant.
    ``variant`` requires that variant instead, and raises where the file does not fit it.

    Raises:
        CheckpointError: unreadable file, unknown layout, PVT v1, or (with ``variant``) a key or shape mismatch.
    """
    return _inspect(source, layout=layout, prefix=prefix, variant=variant, trust_pickle=trust_pickle, strict=False)[0]


@dataclass(frozen=True)
class ConvertReport:
    """``convert_checkpoint``'s account: what was read and what was written."""

    read: CheckpointInfo
    written: SaveReport
    dropped: tuple[DroppedKey, ...]  # by the ``to`` choice (head for a backbone) and by the target layout

    def format(self) -> str:
        """A ``read ...`` and a ``wrote ...`` line, each followed by its notes and dropped entries."""
        info, out = self.read, self.written
        lines = [
            f"read  {info.source}: layout {info.layout}"
            + (f" under prefix {info.prefix!r}" if info.prefix else "")
            + f", {info.file_tensors} tensors -> {info.num_tensors} native, {info.architecture.describe()}"
        ]
        lines += [f"  note: {note}" for note in info.notes]
        lines += dropped_lines(info.dropped)
        lines.append(f"wrote {out.path}: layout {out.layout}, {out.num_tensors} tensors, variant {out.variant}")
        lines += [f"  note: {note}" for note in out.notes]
        lines += dropped_lines(self.dropped)
        return "\n".join(lines)


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
    """Convert a checkpoint file to ``output`` (``.safetensors``, written atomically) in another layout.

    Args:
        from_layout: the input's layout, ``"auto"`` (from sentinel keys) or one of ``LAYOUTS``.
        to: ``backbone`` (native keys without a head), ``classifier`` (native keys with the head; the input must have
            one), or a layout name (``timm``, ``timm_features``, ``pvt``, ``hf``, ``mmdet``, ``lucid``), which keeps
            the head if the layout can hold it.
        variant: require the weights to be exactly this variant; default: the variant the shapes point to (or the
            custom configuration they describe). Either way every key and shape is checked, and a file that does
            not fit raises ``CheckpointError`` before anything is written.
        dtype: cast floating tensors of the output (``"float16"``, ``"bfloat16"``, ...).
    """
    if to not in CONVERT_TARGETS:
        raise ValueError(f"unknown target {to!r}; expected one of {list(CONVERT_TARGETS)}")
    info, checkpoint, native = _inspect(
        source, layout=from_layout, prefix=None, variant=variant, trust_pickle=trust_pickle, strict=True
    )
    body, head = split_head(native)
    dropped: tuple[DroppedKey, ...] = ()
    if to == "backbone":
        native = body
        dropped = tuple(DroppedKey(key, 'to="backbone" writes no classifier head') for key in head)
    elif to == "classifier" and not head:
        raise CheckpointError(f'{info.source} has no classifier head; to="classifier" needs one (use to="backbone")')
    layout = NATIVE if to in ("backbone", "classifier") else get_layout(to).name
    written = write_safetensors(native, output, layout=layout, dtype=dtype, source=checkpoint, variant=variant)
    return ConvertReport(info, written, dropped + written.dropped)


_ARCH_NAMES = {"retinanet": "RetinaNet", "fasterrcnn": "Faster R-CNN", "maskrcnn": "Mask R-CNN"}
_SHOWN_NAMES = 8  # class names --inspect lists before "..."


@dataclass(frozen=True)
class DetectorInfo:
    """A whole detector checkpoint as ``inspect_detector`` reads it (no model built)."""

    source: str
    sha256: str | None
    arch: str  # "retinanet", "fasterrcnn" or "maskrcnn"
    backbone_layout: str
    architecture: Architecture
    num_classes: int  # K, without a background
    class_names: tuple[str, ...] | None  # as stored in the file, mmdet label order
    fpn_channels: int
    num_tensors: int

    def format(self) -> str:
        """One ``label: value`` line per fact: file, sha256, detector, variant, backbone shapes, classes, FPN width,
        tensors."""
        names = self.class_names
        shown = (
            "not stored"
            if not names
            else ", ".join(names[:_SHOWN_NAMES]) + (", ..." if len(names) > _SHOWN_NAMES else "")
        )
        return "\n".join(
            [
                f"file:       {self.source}",
                f"sha256:     {self.sha256 or '-'}",
                f"detector:   mmdet {_ARCH_NAMES[self.arch]} ({DETECTOR_ARCHS[self.arch]}), backbone layout "
                f"{self.backbone_layout}",
                f"variant:    {self.architecture.variant or 'custom'}",
                f"backbone:   {self.architecture.describe()}",
                f"classes:    {self.num_classes} ({shown})",
                f"fpn:        {self.fpn_channels} channels",
                f"tensors:    {self.num_tensors} (our layout)",
            ]
        )


def inspect_detector(source: WeightsSource, *, trust_pickle: bool = False) -> DetectorInfo:
    """What a whole detector checkpoint (mmdet's, or a ``save_detector`` file) holds, read without building it.

    Raises:
        FileNotFoundError, CheckpointError: as ``read_detector_file``.
    """
    file = read_detector_file(source, arch=None, trust_pickle=trust_pickle)
    return DetectorInfo(
        source=file.source,
        sha256=file.sha256,
        arch=file.arch,
        backbone_layout=file.backbone_layout,
        architecture=file.architecture,
        num_classes=file.num_classes,
        class_names=file.class_names,
        fpn_channels=file.fpn_channels,
        num_tensors=len(file.state_dict),
    )


@dataclass(frozen=True)
class DetectorConvertReport:
    """``convert_detector``'s account: the model the file loaded into, and what was written."""

    source: str
    path: Path
    to: str
    arch: str
    variant: str
    num_classes: int  # K, without a background
    num_tensors: int

    def format(self) -> str:
        what = "detector .safetensors" if self.to == "detector" else "mmdet checkpoint"
        return (
            f"read  {self.source}: mmdet {_ARCH_NAMES[self.arch]}, variant {self.variant}, {self.num_classes} "
            f"classes, loaded strictly into {DETECTOR_ARCHS[self.arch]}\nwrote {self.path}: {what}, "
            f"{self.num_tensors} tensors"
        )


def _names_without_background(model: nn.Module) -> list[str]:
    names = list(getattr(model, "class_names", ()))
    return names[1:] if names[:1] == ["__background__"] else names


def save_mmdet_detector(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write a detector loaded from a published file (``weights=``) as mmdet saves one: ``torch.save`` of
    ``{"meta": {"dataset_meta": {"classes": [...]}, ...}, "state_dict": ...}`` in mmdet's keys, atomically.

    The backbone keeps the layout it was loaded from (``model.load_report.backbone_layout``), so reading the file
    again gives bit-identical tensors.

    Raises:
        ValueError: a model without a detector ``load_report``.
    """
    report = getattr(model, "load_report", None)
    arch = getattr(report, "arch", None)
    if arch not in DETECTOR_ARCHS:
        raise ValueError(f"save_mmdet_detector writes detectors built with weights=, got {type(model).__name__}")
    if arch == "maskrcnn" and not model.roi_heads.has_mask():
        arch = "fasterrcnn"  # a Faster R-CNN built from a Mask R-CNN file: its mask head was left out
    layout = report.backbone_layout  # type: ignore[union-attr]
    state_dict = to_mmdet_state_dict(model.state_dict(), arch, backbone_layout=layout)
    meta = {"dataset_meta": {"classes": _names_without_background(model)}, "pvt_backbone.source": report.source}
    return atomic_write(Path(path), lambda temp: torch.save({"meta": meta, "state_dict": state_dict}, temp))


def convert_detector(
    source: WeightsSource,
    output: str | os.PathLike[str],
    *,
    to: str = "detector",
    variant: PVTv2Config | str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_pickle: bool = False,
) -> DetectorConvertReport:
    """Convert a whole detector file: loaded strictly into its ``pvt_backbone.detection`` builder, then written.

    Args:
        to: ``"detector"`` (``save_detector``'s ``.safetensors``, which ``weights=`` reads back and which stores the
            backbone config) or ``"mmdet"`` (mmdet's ``.pth`` checkpoint, ``save_mmdet_detector``).
        variant: the backbone's configuration (``load_detector``); needed for a custom backbone in an mmdet file.
        dtype: cast floating tensors (``to="detector"`` only).

    Raises:
        ValueError: an unknown ``to``, an output suffix that does not fit it, or ``dtype`` with ``to="mmdet"``.
        FileNotFoundError, CheckpointError: as ``load_detector``.
    """
    suffix = {"detector": ".safetensors", "mmdet": ".pth"}
    if to not in suffix:
        raise ValueError(f"unknown detector target {to!r}; expected one of {list(DETECTOR_TARGETS)}")
    if Path(output).suffix != suffix[to]:
        raise ValueError(f'output {output} must end with {suffix[to]} for to="{to}"')
    if dtype is not None and to == "mmdet":
        raise ValueError('dtype casts to="detector" output only; mmdet checkpoints keep the file\'s dtypes')
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
    model = load_detector(source, variant=variant, trust_pickle=trust_pickle)
    if to == "detector":
        path = save_detector(model, output, dtype=DTYPES[dtype] if isinstance(dtype, str) else dtype)
    else:
        path = save_mmdet_detector(model, output)
    report = model.load_report
    return DetectorConvertReport(
        source=report.source,
        path=path,
        to=to,
        arch=report.arch,
        variant=report.variant or "custom",
        num_classes=len(_names_without_background(model)),
        num_tensors=len(model.state_dict()),
    )
