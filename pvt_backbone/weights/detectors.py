"""Read a whole mmdetection PVTv2 detector checkpoint for our torchvision detectors: what it holds and its tensors.

``read_detector_file`` takes an mmdet 3.x / 2.x RetinaNet, Faster R-CNN or Mask R-CNN checkpoint (``{"meta": ...,
"state_dict": ...}``; backbone in mmdet's PVTv2 layout or the authors' ``pvt`` layout) and returns a
``DetectorFile``: the detector kind, the sizes the file fixes (classes, FPN width, RoI head widths), the backbone's
architecture and norm eps, the class names, and the state dict in our key layout
(``pvt_backbone.weights.detector_layouts``). ``pvt_backbone.detection``'s builders build from it (``weights=``) and
keep a ``DetectorLoadReport`` as ``model.load_report``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..config import PVTv2Config
from .detect import Architecture, infer_architecture, to_native
from .detector_layouts import DetectorConversion, detector_arch, neck_head_to_mmdet, neck_head_to_ours
from .io import Checkpoint, WeightsSource, atomic_write, read_checkpoint
from .layouts import CheckpointError, DroppedKey, dropped_lines, from_native, unwrap_checkpoint

__all__ = [
    "COCO_CLASSES",
    "COCO_CATEGORY_IDS",
    "DETECTOR_ARCHS",
    "LAYOUT_EPS",
    "DetectorFile",
    "DetectorLoadReport",
    "read_detector_file",
    "to_mmdet_state_dict",
    "save_detector",
    "class_names_for",
    "is_detector_file",
    "stored_backbone_config",
    "load_detector",
]

# The 80 COCO detection categories in mmdet's label order (label k = k-th name).
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

# COCO's category id of each of COCO_CLASSES: 1..90 with the ten ids the 2017 annotations leave unused skipped.
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))

# The detector kinds an mmdet checkpoint holds, each with its pvt_backbone.detection builder's name.
DETECTOR_ARCHS: dict[str, str] = {
    "retinanet": "retinanet_pvt_v2_fpn",
    "fasterrcnn": "fasterrcnn_pvt_v2_fpn",
    "maskrcnn": "maskrcnn_pvt_v2_fpn",
}
# First keys of an mmdet detector's neck and heads; our torchvision-layout state dicts use other names
# (backbone.fpn.*, head.*, rpn.*, roi_heads.*).
_MMDET_HEAD_PREFIXES = ("neck.", "bbox_head.", "rpn_head.", "roi_head.")

# (patch-embedding/SR norm eps, block/stage norm eps) of the code that wrote a backbone layout. mmdet's PVTv2 uses
# 1e-6 in every LayerNorm; the authors' detection code (layout "pvt") keeps torch's 1e-5 in the embedding/SR norms.
LAYOUT_EPS: dict[str, tuple[float, float]] = {"mmdet": (1e-6, 1e-6), "pvt": (1e-5, 1e-6)}


@dataclass(frozen=True)
class DetectorFile:
    """An mmdet detector checkpoint as read: sizes it fixes, its backbone, and ``state_dict`` in our key layout."""

    arch: str  # "retinanet", "fasterrcnn" or "maskrcnn" (what the file holds)
    num_classes: int  # mmdet's K, without a background
    fpn_channels: int
    representation_size: int | None  # R-CNN shared FC width
    mask_channels: int | None  # Mask R-CNN mask-head conv width
    backbone_layout: str  # "mmdet" or "pvt"
    architecture: Architecture
    eps: tuple[float, float]  # (embed_norm_eps, norm_eps) of the backbone's code
    class_names: tuple[str, ...] | None  # stored in the file's meta, mmdet label order
    state_dict: dict[str, Tensor]  # our keys (backbone.body.*, backbone.fpn.*, heads)
    dropped: tuple[DroppedKey, ...]
    source: str
    sha256: str | None
    container: str


@dataclass(frozen=True)
class DetectorLoadReport:
    """What a detector builder's ``weights=`` loaded (``model.load_report``)."""

    source: str
    sha256: str | None
    arch: str
    backbone_layout: str
    architecture: Architecture
    loaded: tuple[str, ...]
    dropped: tuple[DroppedKey, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def variant(self) -> str | None:
        """The PVTv2 variant the backbone's shapes fit, or None."""
        return self.architecture.variant

    def summary(self) -> str:
        """Multi-line account: tensors loaded, file kind, notes, dropped entries by reason."""
        lines = [
            f"loaded {len(self.loaded)} tensors from {self.source} (mmdet {self.arch}, backbone layout "
            f"{self.backbone_layout}; {self.architecture.describe()})"
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines + dropped_lines(self.dropped))


def _classes_in_meta(content: Mapping[str, Any]) -> tuple[str, ...] | None:
    """mmdet 3 ``meta["dataset_meta"]["classes"]`` or mmdet 2 ``meta["CLASSES"]``, when they are strings."""
    meta = content.get("meta")
    if not isinstance(meta, Mapping):
        return None
    dataset = meta.get("dataset_meta")
    names = dataset.get("classes") if isinstance(dataset, Mapping) else None
    names = names if names is not None else meta.get("CLASSES")
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def _classes_in_metadata(metadata: Mapping[str, str]) -> tuple[str, ...] | None:
    """Class names ``save_detector`` stored in a safetensors header (a JSON list)."""
    text = metadata.get("pvt_backbone.class_names")
    names = json.loads(text) if text else None
    return tuple(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def _rows(state_dict: Mapping[str, Tensor], key: str) -> int:
    if key not in state_dict:
        raise CheckpointError(f"cannot read the detector's sizes: {key!r} is missing")
    return int(state_dict[key].shape[0])


def _sizes(ours: Mapping[str, Tensor], arch: str) -> tuple[int, int, int | None, int | None]:
    """(K, FPN width, representation size, mask channels) from our-layout shapes."""
    width = _rows(ours, "backbone.fpn.inner_blocks.0.0.weight")
    if arch == "retinanet":
        anchors = _rows(ours, "head.regression_head.bbox_reg.weight") // 4
        return _rows(ours, "head.classification_head.cls_logits.weight") // anchors, width, None, None
    classes = _rows(ours, "roi_heads.box_predictor.cls_score.weight") - 1
    representation = _rows(ours, "roi_heads.box_head.fc6.weight")
    mask = _rows(ours, "roi_heads.mask_head.0.0.weight") if "roi_heads.mask_head.0.0.weight" in ours else None
    return classes, width, representation, mask


def _split(flat: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    backbone = {k: v for k, v in flat.items() if k.startswith("backbone.")}
    if not backbone:
        raise CheckpointError(
            "no 'backbone.*' keys: not a whole mmdet detector checkpoint (a backbone-only file goes to "
            "weights_backbone=)"
        )
    return backbone, {k: v for k, v in flat.items() if not k.startswith("backbone.")}


def _read(weights: object, trust_pickle: bool) -> Checkpoint:
    if isinstance(weights, (str, os.PathLike)) and not os.path.exists(weights):
        from .hub import resolve_weights  # the published-weights registry; a name resolves to a local file

        weights = resolve_weights(weights)
    return read_checkpoint(weights, trust_pickle=trust_pickle)  # type: ignore[arg-type]


def read_detector_file(weights: object, *, arch: str | None, trust_pickle: bool = False) -> DetectorFile:
    """Read an mmdet detector checkpoint for a detector of kind ``arch`` (``"retinanet"``, ``"fasterrcnn"``,
    ``"maskrcnn"``); a Mask R-CNN file serves a Faster R-CNN with its mask head dropped.

    Args:
        weights: a path, a published weights name (``pvt_backbone.weights.hub.resolve_weights``) or a checkpoint
            dict.
        arch: the detector being built; None: the kind the file holds.
        trust_pickle: allow pickles that need code to load (``torch.load(weights_only=False)``).

    Raises:
        FileNotFoundError: no such file nor published name. CheckpointError: not an mmdet detector of a kind
        ``arch`` can take, or keys no table maps.
    """
    checkpoint = _read(weights, trust_pickle)
    others = _split(unwrap_checkpoint(checkpoint.content)[0])[1]
    file_arch = detector_arch(others)
    arch = arch or file_arch
    backbone = to_native(checkpoint.content, prefix="backbone.")
    allowed = {"retinanet": ("retinanet",), "fasterrcnn": ("fasterrcnn", "maskrcnn"), "maskrcnn": ("maskrcnn",)}
    if file_arch not in allowed[arch]:
        raise CheckpointError(f"{checkpoint.source} holds an mmdet {file_arch}, which a {arch} cannot load")
    if backbone.layout not in LAYOUT_EPS:
        raise CheckpointError(
            f"the backbone of {checkpoint.source} is in the {backbone.layout} layout; mmdet detector files have "
            f"{sorted(LAYOUT_EPS)}"
        )
    heads: DetectorConversion = neck_head_to_ours(others, arch)
    ours = {"backbone.body." + k: v for k, v in backbone.state_dict.items()} | heads.state_dict
    classes, width, representation, mask = _sizes(ours, arch)
    outside = tuple(d for d in backbone.dropped if not d.key.startswith(("neck.", "bbox_head.", "rpn_head.", "roi_")))
    return DetectorFile(
        arch=file_arch,
        num_classes=classes,
        fpn_channels=width,
        representation_size=representation,
        mask_channels=mask,
        backbone_layout=backbone.layout,
        architecture=infer_architecture(backbone.state_dict),
        eps=LAYOUT_EPS[backbone.layout],
        class_names=_classes_in_meta(checkpoint.content) or _classes_in_metadata(checkpoint.metadata),
        state_dict=ours,
        dropped=outside + heads.dropped,
        source=checkpoint.source,
        sha256=checkpoint.sha256,
        container=backbone.container,
    )


def class_names_for(num_classes: int, stored: tuple[str, ...] | None, *, background: bool) -> tuple[str, ...]:
    """Names indexed by output label: ``stored`` if it has ``num_classes`` entries, COCO's for 80, else
    ``class_<i>``; with ``background`` (R-CNNs) index 0 is ``"__background__"``.

    Raises:
        CheckpointError: ``stored`` names a different number of classes than the head has.

    Example:
        >>> class_names_for(2, None, background=True)
        ('__background__', 'class_0', 'class_1')
    """
    if stored is not None and len(stored) != num_classes:
        raise CheckpointError(f"the file names {len(stored)} classes but its head has {num_classes}")
    names = stored or (COCO_CLASSES if num_classes == len(COCO_CLASSES) else None)
    names = names or tuple(f"class_{i}" for i in range(num_classes))
    return ("__background__", *names) if background else tuple(names)


def to_mmdet_state_dict(
    state_dict: Mapping[str, Tensor], arch: str, *, backbone_layout: str = "mmdet"
) -> dict[str, Tensor]:
    """Our detector's state dict (a model built with ``weights=`` or by ``pvt_backbone.mmdet_compat``) -> mmdet keys.

    The backbone (``backbone.body.*``) is written in ``backbone_layout`` (``"mmdet"`` or the authors' ``"pvt"``)
    under ``backbone.``; the neck and heads by ``NECK_HEAD_RULES``. The inverse of ``read_detector_file``'s
    ``state_dict``: a round trip gives the same keys and bit-identical tensors.

    Raises:
        CheckpointError: a key no table maps, or a backbone the layout cannot express.
    """
    if backbone_layout not in LAYOUT_EPS:
        raise ValueError(f"backbone_layout must be one of {sorted(LAYOUT_EPS)}, got {backbone_layout!r}")
    body = {k.removeprefix("backbone.body."): v for k, v in state_dict.items() if k.startswith("backbone.body.")}
    rest = {k: v for k, v in state_dict.items() if not k.startswith("backbone.body.")}
    backbone = from_native(body, backbone_layout).state_dict
    return {"backbone." + k: v for k, v in backbone.items()} | neck_head_to_mmdet(rest, arch).state_dict


def _detector_arch(model: nn.Module) -> str:
    from ..mmdet_compat import MMDetRetinaNet, MMDetRoIHeads

    if isinstance(model, MMDetRetinaNet):
        return "retinanet"
    heads = getattr(model, "roi_heads", None)
    if isinstance(heads, MMDetRoIHeads):
        return "maskrcnn" if heads.has_mask() else "fasterrcnn"
    raise ValueError(
        f"save_detector writes detectors that compute mmdet's function (built with weights= or by "
        f"pvt_backbone.mmdet_compat), got {type(model).__name__}; save other models with torch.save(state_dict)"
    )


def save_detector(
    model: nn.Module, path: str | os.PathLike[str], *, dtype: torch.dtype | None = None, source: str | None = None
) -> Path:
    """Write a published-layout detector as ``.safetensors`` in mmdet's keys, readable again by ``weights=``.

    The backbone keeps the layout it was loaded from (``model.load_report.backbone_layout``; mmdet's otherwise), so
    its norm eps is recovered on reading. Header metadata: ``pvt_backbone.architecture``, ``.variant``,
    ``.num_classes`` (K, no background), ``.class_names`` (JSON, mmdet label order), ``.backbone_layout``,
    ``.norm_eps``, ``.backbone_config`` (the ``PVTv2Config`` as JSON, which names ``num_heads``: weights do not
    fix it; ``stored_backbone_config`` reads it), ``.source`` and ``.source_sha256`` (from the load report, or
    ``source``).

    Raises:
        ValueError: a model that does not compute mmdet's function, or a path not ending in ``.safetensors``.
    """
    from safetensors.torch import save_file

    from .save import safetensors_ready

    target = Path(path)
    if target.suffix != ".safetensors":
        raise ValueError(f"output {target} must end with .safetensors")
    arch = _detector_arch(model)
    report = getattr(model, "load_report", None)
    layout = report.backbone_layout if isinstance(report, DetectorLoadReport) else "mmdet"
    tensors = safetensors_ready(to_mmdet_state_dict(model.state_dict(), arch, backbone_layout=layout), dtype)
    names = tuple(getattr(model, "class_names", ()))
    names = names[1:] if names[:1] == ("__background__",) else names
    metadata = {
        "format": "pt",
        "pvt_backbone.architecture": arch,
        "pvt_backbone.variant": infer_architecture(to_native(tensors, prefix="backbone.").state_dict).variant
        or "custom",
        "pvt_backbone.num_classes": str(len(names)),
        "pvt_backbone.class_names": json.dumps(list(names)),
        "pvt_backbone.backbone_layout": layout,
        "pvt_backbone.backbone_config": _config_json(model),
        "pvt_backbone.norm_eps": json.dumps(list(LAYOUT_EPS[layout])),
        "pvt_backbone.source": source or (report.source if isinstance(report, DetectorLoadReport) else ""),
        "pvt_backbone.source_sha256": (report.sha256 or "") if isinstance(report, DetectorLoadReport) else "",
    }
    return atomic_write(target, lambda temp: save_file(tensors, str(temp), metadata=metadata))


def _config_json(model: nn.Module) -> str:
    """The backbone's ``PVTv2Config`` as a JSON object ("" for a model without ``backbone.body.config``)."""
    config = getattr(getattr(getattr(model, "backbone", None), "body", None), "config", None)
    return json.dumps(dataclasses.asdict(config)) if dataclasses.is_dataclass(config) else ""


def stored_backbone_config(metadata: Mapping[str, str]) -> PVTv2Config | None:
    """The backbone ``PVTv2Config`` ``save_detector`` wrote into a file's header metadata, or None without one.

    Raises:
        CheckpointError: the entry is there but does not describe a ``PVTv2Config``.

    Example:
        >>> stored_backbone_config({"pvt_backbone.backbone_config": '{"embed_dims": [8, 16, 32, 32], '
        ...                         '"depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 4]}'}).num_heads
        (1, 2, 4, 4)
        >>> stored_backbone_config({}) is None
        True
    """
    text = metadata.get("pvt_backbone.backbone_config")
    if not text:
        return None
    try:
        return PVTv2Config(**json.loads(text))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"pvt_backbone.backbone_config is no PVTv2Config: {error}") from None


def _mmdet_keys(keys: Iterable[str]) -> bool:
    """Whether state-dict keys are a whole mmdet detector's: a ``backbone.*`` key and a neck or head key."""
    names = list(keys)
    return any(k.startswith("backbone.") for k in names) and any(k.startswith(_MMDET_HEAD_PREFIXES) for k in names)


def is_detector_file(source: WeightsSource, *, trust_pickle: bool = False) -> bool:
    """Whether ``source`` (a path or a checkpoint dict) holds a whole detector in mmdet's keys: an mmdet checkpoint
    or a ``save_detector`` file, what the builders' ``weights=`` take. False for a state dict in our torchvision
    layout (``backbone.body.*``, ``roi_heads.*``: what training writes) and for a path that does not exist.

    A ``.safetensors`` file is told by its header (metadata, keys) without reading tensors; other files are read.

    Raises:
        CheckpointError: an existing file that is not a readable checkpoint (or a pickle that needs code without
        ``trust_pickle=True``).

    Example:
        >>> is_detector_file({"state_dict": {"backbone.patch_embed1.proj.weight": torch.zeros(1),
        ...                                  "neck.fpn_convs.0.conv.weight": torch.zeros(1)}})
        True
        >>> is_detector_file({"backbone.body.stages.0.norm.weight": torch.zeros(1)})
        False
    """
    if isinstance(source, Mapping):
        return _mmdet_keys(unwrap_checkpoint(source)[0])
    if not isinstance(source, (str, os.PathLike)) or not os.path.isfile(source):
        return False
    try:
        with safe_open(os.fspath(source), "pt") as handle:
            metadata, keys = handle.metadata() or {}, list(handle.keys())
        return "pvt_backbone.architecture" in metadata or _mmdet_keys(keys)
    except (SafetensorError, OSError, ValueError):  # not safetensors: read it as any checkpoint
        return _mmdet_keys(unwrap_checkpoint(read_checkpoint(source, trust_pickle=trust_pickle).content)[0])


def _file_arch_and_config(source: WeightsSource, trust_pickle: bool) -> tuple[str, PVTv2Config | None]:
    """(the detector kind a file holds, the backbone config its metadata stores or None)."""
    checkpoint = _read(source, trust_pickle)
    others = _split(unwrap_checkpoint(checkpoint.content)[0])[1]
    return detector_arch(others), stored_backbone_config(checkpoint.metadata)


def load_detector(
    source: WeightsSource,
    *,
    variant: PVTv2Config | str | None = None,
    trust_pickle: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """The detector a file holds (mmdet RetinaNet, Faster or Mask R-CNN checkpoint, or a ``save_detector`` file),
    built by its ``pvt_backbone.detection`` builder with ``weights=source`` (strict load, ``load_report``,
    ``class_names``), in train mode as the builders return it.

    Args:
        variant: the backbone's configuration; default: the one ``save_detector`` stored in the file, else the
            table variant its shapes fit. A custom backbone in an mmdet file needs it (weights do not fix
            ``num_heads``).
        kwargs: for the builder (``min_size``, ``max_size``, ``score_thresh``, ...).

    Raises:
        FileNotFoundError, CheckpointError: as ``read_detector_file``. ValueError: ``variant`` or ``kwargs`` that
        disagree with the file, or a custom backbone without ``variant``.
    """
    from .. import detection

    arch, stored = _file_arch_and_config(source, trust_pickle)
    build = getattr(detection, DETECTOR_ARCHS[arch])
    return build(variant if variant is not None else stored, weights=source, trust_pickle=trust_pickle, **kwargs)
