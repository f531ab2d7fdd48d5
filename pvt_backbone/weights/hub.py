"""Published PVTv2 weights by name: one table, one enum class per builder, download on demand with hash checks.

Every entry of ``PUBLISHED`` is a ``PublishedWeights``: where the file lives (a URL, or a Hugging Face hub repository
and file), its key layout, what the publisher reports for it (ImageNet top-1, COCO box AP), its licence, and the
preprocessing it was evaluated with. ``weights="pvt_v2_b2.in1k"`` (or ``PVTv2_B2_Weights.DEFAULT``) works wherever a
backbone or classifier takes ``weights=``: ``load_weights`` passes names through ``resolve_source``.

Files are downloaded once into ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``), the directory
``torch.hub.load_state_dict_from_url`` uses; Hugging Face entries go through ``huggingface_hub``'s own cache. A file
already there is used without touching the network, and so is a file fetched by hand and put at the entry's
``cache_path`` (hub entries too). Where the publisher states a SHA-256 (mmdetection's file names carry its first 8
hex digits), a file that does not match is deleted and refused. A classifier's ``DEFAULT`` is the authors' release,
which needs nothing but torch; ``IMAGENET1K_TIMM`` is timm's safetensors copy of it (needs ``huggingface_hub``).

Example:
    >>> entry = get_weights("pvt_v2_b2.in1k")
    >>> entry.builder, entry.metrics["imagenet_top1"], entry.license, entry.cache_path.name
    ('pvt_v2_b2', 82.0, 'apache-2.0', 'pvt_v2_b2.pth')
    >>> PVTv2_B2_Weights.DEFAULT is PVTv2_B2_Weights.IMAGENET1K_V1
    True
    >>> list_weights("pvt_v2_b0")
    ['pvt_v2_b0.in1k', 'pvt_v2_b0.in1k_timm']
    >>> PVTv2_B0_Weights.DEFAULT.transforms()(torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)).shape
    torch.Size([3, 224, 224])
"""

from __future__ import annotations

import difflib
import http.client
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import torch

from .io import HUB_PREFIX, WeightsSource, _resolve_path, atomic_write, file_sha256
from .layouts import CheckpointError

if TYPE_CHECKING:
    from torchvision.transforms import v2

__all__ = [
    "Preprocessing",
    "PublishedWeights",
    "WeightsEnum",
    "WeightsLike",
    "PUBLISHED",
    "CLASSIFIER_PREPROCESSING",
    "DETECTOR_PREPROCESSING",
    "WEIGHTS_ENUMS",
    "get_weights",
    "list_weights",
    "resolve_weights",
    "resolve_source",
    "PVTv2_B0_Weights",
    "PVTv2_B1_Weights",
    "PVTv2_B2_Weights",
    "PVTv2_B2_Li_Weights",
    "PVTv2_B3_Weights",
    "PVTv2_B4_Weights",
    "PVTv2_B5_Weights",
    "RetinaNet_PVTv2_B0_FPN_Weights",
    "RetinaNet_PVTv2_B1_FPN_Weights",
    "RetinaNet_PVTv2_B2_FPN_Weights",
    "RetinaNet_PVTv2_B3_FPN_Weights",
    "RetinaNet_PVTv2_B4_FPN_Weights",
    "RetinaNet_PVTv2_B5_FPN_Weights",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# The record
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """How images were fed to the model when the publisher measured it; ``PublishedWeights.transforms()`` builds it.

    ``resize`` is the shorter side in pixels (capped so the longer side stays <= ``max_size`` when given), ``crop``
    the side of the centre crop, ``mean``/``std`` RGB statistics in 0-1 units. ``in_model``: the model resizes and
    normalises by itself (torchvision detectors), so the pipeline only turns images into (3, H, W) floats in [0, 1].
    """

    resize: int
    interpolation: Literal["bicubic", "bilinear"]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: int | None = None
    max_size: int | None = None
    pad_divisor: int = 1
    in_model: bool = False

    def describe(self) -> str:
        """One line, e.g. ``resize shorter side to 248 (bicubic), centre crop 224, normalise mean ... std ...``."""
        size = f"resize shorter side to {self.resize}" + (f", longer <= {self.max_size}" if self.max_size else "")
        parts = [f"{size} ({self.interpolation})"]
        if self.crop:
            parts.append(f"centre crop {self.crop}")
        parts.append(f"normalise RGB in 0-1 units with mean {self.mean} std {self.std}")
        if self.pad_divisor > 1:
            parts.append(f"pad to a multiple of {self.pad_divisor}")
        return ", ".join(parts) + (" (done inside the model)" if self.in_model else "")


@dataclass(frozen=True)
class PublishedWeights:
    """One published checkpoint: where it is, what it holds, what its publisher reports for it.

    Exactly one of ``url`` and ``hf_hub_id`` is set (``filename`` is the file inside the hub repository).
    ``sha256`` is the publisher's hash or hash prefix (mmdetection's 8 hex digits), ``None`` when none is stated.
    ``metrics`` keys: ``imagenet_top1``/``imagenet_top5`` (%, 224 px) and ``coco_box_ap``/``coco_mask_ap`` (COCO
    val2017). ``num_params`` and ``gmacs`` (multiply-accumulates / 1e9 at 224 x 224) are our builder's, measured with
    ``pvt_backbone.flops.count_macs``; ``None`` for detectors, whose mmdetection model differs from ours.

    ``builder`` is the ``create_model`` name of the architecture. The mmdetection RetinaNets name their neck and head
    as mmdetection does, not as torchvision does: their backbone loads through ``weights_backbone=`` (``load_weights``
    reads the ``mmdet`` layout under ``backbone.`` and drops the rest, with a ``LoadWarning``).
    """

    name: str
    builder: str  # the ``create_model`` name of the architecture
    task: Literal["classification", "detection"]
    source: str  # who publishes the file
    page: str  # where the facts below are stated
    layout: str  # key layout in ``pvt_backbone.weights.LAYOUTS``
    license: str
    recipe: str
    preprocessing: Preprocessing
    metrics: Mapping[str, float] = field(default_factory=dict, hash=False)
    url: str | None = None
    hf_hub_id: str | None = None
    filename: str | None = None
    sha256: str | None = None
    num_params: int | None = None
    gmacs: float | None = None

    def __post_init__(self) -> None:
        if (self.url is None) == (self.hf_hub_id is None) or (self.hf_hub_id is not None and not self.filename):
            raise ValueError(f"{self.name}: give either url or hf_hub_id with filename")
        if self.sha256 is not None and not (
            8 <= len(self.sha256) <= 64 and all(c in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError(f"{self.name}: sha256 must be 8 to 64 lower-case hex digits, got {self.sha256!r}")
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))

    @property
    def download_url(self) -> str:
        """The file's URL (for a hub entry, the hub's ``resolve/main`` address)."""
        return self.url or f"https://huggingface.co/{self.hf_hub_id}/resolve/main/{self.filename}"

    @property
    def cache_path(self) -> Path:
        """Where a downloaded file is kept, and where one fetched by hand may be put: ``<torch hub>/checkpoints``."""
        if self.url is not None:
            name = self.url.rstrip("/").rsplit("/", 1)[-1]
        else:
            name = f"{str(self.hf_hub_id).rsplit('/', 1)[-1]}{Path(str(self.filename)).suffix}"
        return Path(torch.hub.get_dir()) / "checkpoints" / name

    def transforms(self) -> v2.Compose:
        """The evaluation preprocessing as ``torchvision.transforms.v2``: PIL image or (..., 3, H, W) uint8/float
        tensor -> (..., 3, crop, crop) float32 (classifiers), or (..., 3, H, W) float32 in [0, 1] (detectors)."""
        from torchvision.transforms import InterpolationMode, v2

        p = self.preprocessing
        to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        if p.in_model:
            return v2.Compose(to_float)
        steps: list[Callable[..., Any]] = [
            v2.Resize(p.resize, interpolation=InterpolationMode(p.interpolation), max_size=p.max_size, antialias=True)
        ]
        if p.crop:
            steps.append(v2.CenterCrop(p.crop))
        # resize and crop first: a PIL input is resized by PIL, as the publishers' pipelines did
        return v2.Compose([*steps, *to_float, v2.Normalize(list(p.mean), list(p.std))])

    def resolve(self, *, progress: bool = False) -> Path:
        """The local file, downloaded and checked if needed (see ``resolve_weights``)."""
        return resolve_weights(self, progress=progress)


# ---------------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------------

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CROP_PCT = 0.9  # timm's pvt_v2 default_cfgs: crop_pct 0.9, bicubic, ImageNet mean/std, 224 px input

CLASSIFIER_PREPROCESSING = Preprocessing(
    resize=math.floor(224 / _CROP_PCT), interpolation="bicubic", mean=_IMAGENET_MEAN, std=_IMAGENET_STD, crop=224
)
# mmdetection's COCO test pipeline: Resize (1333, 800) keep_ratio, to RGB, Normalize mean (123.675, 116.28, 103.53)
# std (58.395, 57.12, 57.375) in 0-255 units (ImageNet's x 255), pad to 32. Our torchvision detectors do the same
# inside the model with their defaults min_size=800, max_size=1333, ImageNet mean/std and size_divisible=32.
DETECTOR_PREPROCESSING = Preprocessing(
    resize=800,
    interpolation="bilinear",
    mean=_IMAGENET_MEAN,
    std=_IMAGENET_STD,
    max_size=1333,
    pad_divisor=32,
    in_model=True,
)

# Authors' ImageNet-1K classifiers: whai362/PVT classification/README.md (Model Zoo, "PVTv2 on ImageNet-1K": Acc@1 at
# 224 px, [GitHub] links to the v2 release); licence: the repository's Apache 2.0. No hash is published.
# Parameters and GMACs: our pvt_v2_* builders, count_macs at 224 x 224 (tests/test_weights_hub.py checks them).
_AUTHORS = "whai362/PVT GitHub release v2"
_AUTHORS_PAGE = "https://github.com/whai362/PVT/blob/v2/classification/README.md"
_AUTHORS_RECIPE = "ImageNet-1K from scratch by the PVTv2 authors (whai362/PVT classification/, 300 epochs)"
# (variant, authors' Acc@1, timm's top-1, timm's top-5, parameters, GMACs)
_CLASSIFIERS: tuple[tuple[str, float, float, float, int, float], ...] = (
    ("b0", 70.5, 70.654, 90.206, 3_666_760, 0.566),
    ("b1", 78.7, 78.698, 94.490, 14_009_000, 2.108),
    ("b2", 82.0, 82.062, 95.966, 25_362_856, 4.027),
    ("b2_li", 82.1, 82.200, 96.108, 22_553_512, 3.889),
    ("b3", 83.1, 83.120, 96.560, 45_238_696, 6.897),
    ("b4", 83.6, 83.710, 96.672, 62_556_072, 10.101),
    ("b5", 83.8, 83.760, 96.634, 81_956_008, 11.717),
)

# timm's copies on the Hugging Face hub: timm/models/pvt_v2.py default_cfgs ('pvt_v2_b*.in1k', hf_hub_id 'timm/',
# license 'apache-2.0'); the model cards say "Trained on ImageNet-1k by paper authors" and list model.safetensors;
# top-1/top-5: huggingface/pytorch-image-models results/results-imagenet.csv (224 px, crop_pct 0.9, bicubic).
_TIMM = "timm on the Hugging Face hub"
_TIMM_RECIPE = "the authors' ImageNet-1K weights in timm's layout; top-1/top-5 as timm measures them"

# mmdetection's COCO RetinaNets: open-mmlab/mmdetection configs/pvt/README.md and metafile.yml ("RetinaNet (PVTv2)":
# 12 epochs, 8x V100, box AP on COCO val2017, backbone from the authors' pvt_v2_b*.pth). File names end in the first
# 8 hex digits of the file's SHA-256 (mmdetection's tools/model_converters/publish_model.py). Licence: mmdetection's
# Apache 2.0; the model zoo states none of its own. mmdetection has no b2_li RetinaNet.
_MMDET = "mmdetection model zoo (download.openmmlab.com)"
_MMDET_PAGE = "https://github.com/open-mmlab/mmdetection/blob/main/configs/pvt/README.md"
_MMDET_ROOT = "https://download.openmmlab.com/mmdetection/v2.0/pvt"
# (variant, file stem without the hash, hash prefix, box AP)
_RETINANETS: tuple[tuple[str, str, str, float], ...] = (
    ("b0", "retinanet_pvtv2-b0_fpn_1x_coco_20210831_103157", "13e9aabe", 37.1),
    ("b1", "retinanet_pvtv2-b1_fpn_1x_coco_20210831_103318", "7e169a7d", 41.2),
    ("b2", "retinanet_pvtv2-b2_fpn_1x_coco_20210901_174843", "529f0b9a", 44.6),
    ("b3", "retinanet_pvtv2-b3_fpn_1x_coco_20210903_151512", "8357deff", 46.0),
    ("b4", "retinanet_pvtv2-b4_fpn_1x_coco_20210901_170151", "83795c86", 46.3),
    ("b5", "retinanet_pvtv2-b5_fpn_1x_coco_20210902_201800", "3420eb57", 46.1),
)
# The authors' own COCO detectors (whai362/PVT detection/README.md) are on Google Drive only: no stable URL, no entry.


def _classifier_entries() -> list[PublishedWeights]:
    entries = []
    for variant, top1, timm_top1, timm_top5, params, gmacs in _CLASSIFIERS:
        common: dict[str, Any] = dict(
            builder=f"pvt_v2_{variant}",
            task="classification",
            license="apache-2.0",
            preprocessing=CLASSIFIER_PREPROCESSING,
            num_params=params,
            gmacs=gmacs,
        )
        entries.append(
            PublishedWeights(
                name=f"pvt_v2_{variant}.in1k",
                source=_AUTHORS,
                page=_AUTHORS_PAGE,
                layout="pvt",
                recipe=_AUTHORS_RECIPE,
                metrics={"imagenet_top1": top1},
                url=f"https://github.com/whai362/PVT/releases/download/v2/pvt_v2_{variant}.pth",
                **common,
            )
        )
        entries.append(
            PublishedWeights(
                name=f"pvt_v2_{variant}.in1k_timm",
                source=_TIMM,
                page=f"https://huggingface.co/timm/pvt_v2_{variant}.in1k",
                layout="timm",
                recipe=_TIMM_RECIPE,
                metrics={"imagenet_top1": timm_top1, "imagenet_top5": timm_top5},
                hf_hub_id=f"timm/pvt_v2_{variant}.in1k",
                filename="model.safetensors",
                **common,
            )
        )
    return entries


def _retinanet_entries() -> list[PublishedWeights]:
    return [
        PublishedWeights(
            name=f"retinanet_pvt_v2_{variant}_fpn.coco_mmdet",
            builder=f"retinanet_pvt_v2_{variant}_fpn",
            task="detection",
            source=_MMDET,
            page=_MMDET_PAGE,
            layout="mmdet",
            license="apache-2.0",
            recipe=f"mmdetection RetinaNet + FPN, COCO train2017, 12 epochs (1x), backbone from pvt_v2_{variant}.in1k",
            preprocessing=DETECTOR_PREPROCESSING,
            metrics={"coco_box_ap": box_ap},
            url=f"{_MMDET_ROOT}/{stem.rsplit('_', 2)[0]}/{stem}-{prefix}.pth",
            sha256=prefix,
        )
        for variant, stem, prefix, box_ap in _RETINANETS
    ]


PUBLISHED: Mapping[str, PublishedWeights] = MappingProxyType(
    {entry.name: entry for entry in _classifier_entries() + _retinanet_entries()}
)
"""Every published checkpoint by name."""


# ---------------------------------------------------------------------------------------------------------------------
# Enum access, one class per builder
# ---------------------------------------------------------------------------------------------------------------------


class WeightsEnum(Enum):
    """Base of the per-builder classes; a member's value is its ``PublishedWeights``, whose fields and methods the
    member also answers (``PVTv2_B2_Weights.DEFAULT.url``, ``.transforms()``, ``.resolve()``)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.value, name)


class PVTv2_B0_Weights(WeightsEnum):
    IMAGENET1K_V1 = PUBLISHED["pvt_v2_b0.in1k"]
    IMAGENET1K_TIMM = PUBLISHED["pvt_v2_b0.in1k_timm"]
    DEFAULT = IMAGENET1K_V1


class PVTv2_B1_Weights(WeightsEnum):
    IMAGENET1K_V1 = PUBLISHED["pvt_v2_b1.in1k"]
    IMAGENET1K_TIMM = PUBLISHED["pvt_v2_b1.in1k_timm"]
    DEFAULT = IMAGENET1K_V1


class PVTv2_B2_Weights(WeightsEnum):
    IMAGENET1K_V1 = PUBLISHED["pvt_v2_b2.in1k"]
    IMAGENET1K_TIMM = PUBLISHED["pvt_v2_b2.in1k_timm"]
    DEFAULT = IMAGENET1K_V1


class PVTv2_B2_Li_Weights(WeightsEnum):
    IMAGENET1K_V1 = PUBLISHED["pvt_v2_b2_li.in1k"]
    IMAGENET1K_TIMM = PUBLISHED["pvt_v2_b2_li.in1k_timm"]
    DEFAULT = IMAGENET1K_V1


class PVTv2_B3_Weights(WeightsEnum):
    IMAGENET1K_V1 = PUBLISHED["pvt_v2_b3.in1k"]
    IMAGENET1K_TIMM = PUBLISHED["pvt_v2_b3.in1k_timm"]
    DEFAULT = IMAGENET1K_V1


class PVTv2_B4_Weights(WeightsEnum):
    IMAGENET1K_V1 = PUBLISHED["pvt_v2_b4.in1k"]
    IMAGENET1K_TIMM = PUBLISHED["pvt_v2_b4.in1k_timm"]
    DEFAULT = IMAGENET1K_V1


class PVTv2_B5_Weights(WeightsEnum):
    IMAGENET1K_V1 = PUBLISHED["pvt_v2_b5.in1k"]
    IMAGENET1K_TIMM = PUBLISHED["pvt_v2_b5.in1k_timm"]
    DEFAULT = IMAGENET1K_V1


class RetinaNet_PVTv2_B0_FPN_Weights(WeightsEnum):
    COCO_MMDET_1X = PUBLISHED["retinanet_pvt_v2_b0_fpn.coco_mmdet"]
    DEFAULT = COCO_MMDET_1X


class RetinaNet_PVTv2_B1_FPN_Weights(WeightsEnum):
    COCO_MMDET_1X = PUBLISHED["retinanet_pvt_v2_b1_fpn.coco_mmdet"]
    DEFAULT = COCO_MMDET_1X


class RetinaNet_PVTv2_B2_FPN_Weights(WeightsEnum):
    COCO_MMDET_1X = PUBLISHED["retinanet_pvt_v2_b2_fpn.coco_mmdet"]
    DEFAULT = COCO_MMDET_1X


class RetinaNet_PVTv2_B3_FPN_Weights(WeightsEnum):
    COCO_MMDET_1X = PUBLISHED["retinanet_pvt_v2_b3_fpn.coco_mmdet"]
    DEFAULT = COCO_MMDET_1X


class RetinaNet_PVTv2_B4_FPN_Weights(WeightsEnum):
    COCO_MMDET_1X = PUBLISHED["retinanet_pvt_v2_b4_fpn.coco_mmdet"]
    DEFAULT = COCO_MMDET_1X


class RetinaNet_PVTv2_B5_FPN_Weights(WeightsEnum):
    COCO_MMDET_1X = PUBLISHED["retinanet_pvt_v2_b5_fpn.coco_mmdet"]
    DEFAULT = COCO_MMDET_1X


WEIGHTS_ENUMS: Mapping[str, type[WeightsEnum]] = MappingProxyType(
    {next(iter(cls)).value.builder: cls for cls in WeightsEnum.__subclasses__()}
)
"""The enum class of each builder that has published weights, by ``create_model`` name."""

WeightsLike = WeightsSource | PublishedWeights | WeightsEnum
"""What ``weights=`` takes: a path, ``"hf-hub:REPO"``, a state dict, a published name, entry or enum member."""


# ---------------------------------------------------------------------------------------------------------------------
# Look-up
# ---------------------------------------------------------------------------------------------------------------------


def _lookup(name: str) -> PublishedWeights | None:
    """The entry named ``name``, or ``"Class.MEMBER"`` of an enum class; None if neither."""
    if name in PUBLISHED:
        return PUBLISHED[name]
    class_name, _, member = name.partition(".")
    enum = next((cls for cls in WEIGHTS_ENUMS.values() if cls.__name__ == class_name), None)
    if enum is not None and member in enum.__members__:
        return enum.__members__[member].value
    return None


def _unknown(name: str) -> str:
    choices = list(PUBLISHED) + [f"{cls.__name__}.{m}" for cls in WEIGHTS_ENUMS.values() for m in cls.__members__]
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f"did you mean {' or '.join(map(repr, close))}?" if close else "list_weights() names them all"


def get_weights(name: str) -> PublishedWeights:
    """The published entry named ``name`` (``"pvt_v2_b2.in1k"``) or ``"PVTv2_B2_Weights.DEFAULT"``.

    Raises:
        ValueError: no such entry; the message suggests close names.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    entry = _lookup(name)
    if entry is None:
        raise ValueError(f"no published weights named {name!r}; {_unknown(name)}")
    return entry


def list_weights(builder: str | None = None) -> list[str]:
    """Names of the published entries, sorted; with ``builder`` (a ``create_model`` name), only those fitting it.

    Raises:
        ValueError: ``builder`` is no registered model name.
    """
    if builder is not None:
        from ..registry import MODELS  # the registry builds models; imported only when asked

        if builder not in MODELS:
            close = difflib.get_close_matches(str(builder), MODELS, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; see list_models()"
            raise ValueError(f"unknown model {builder!r}{hint}")
    return sorted(name for name, entry in PUBLISHED.items() if builder is None or entry.builder == builder)


# ---------------------------------------------------------------------------------------------------------------------
# Resolution: name -> checked local file
# ---------------------------------------------------------------------------------------------------------------------


def _hash_ok(entry: PublishedWeights, path: Path) -> bool:
    """Whether ``path`` matches the stated SHA-256 (or its prefix); True when none is stated."""
    return entry.sha256 is None or file_sha256(path).startswith(entry.sha256)


def _hash_error(entry: PublishedWeights, path: Path, digest: str) -> CheckpointError:
    return CheckpointError(
        f"the file downloaded for {entry.name!r} from {entry.download_url} has SHA-256 {digest}, but its publisher "
        f"states {entry.sha256}: it is damaged or not this checkpoint, and was deleted ({path}). Try again, or "
        f"download it by hand and put it at {entry.cache_path}"
    )


def _unavailable(entry: PublishedWeights, error: BaseException) -> FileNotFoundError:
    return FileNotFoundError(
        f"cannot download the weights {entry.name!r} ({type(error).__name__}: {error}). Without network access, "
        f"download {entry.download_url} elsewhere and put the file at {entry.cache_path}; it is used from there"
    )


def _download_url(entry: PublishedWeights, target: Path, *, progress: bool) -> Path:
    """Download to a temp file beside ``target``, check the hash, rename; a mismatch deletes the temp file."""

    def write(temp: Path) -> None:
        torch.hub.download_url_to_file(str(entry.url), str(temp), progress=progress)
        if not _hash_ok(entry, temp):
            raise _hash_error(entry, temp, file_sha256(temp))

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        return atomic_write(target, write)
    except (OSError, http.client.HTTPException) as exc:  # URLError/HTTPError, DNS, refused, timeout, cut short
        raise _unavailable(entry, exc) from exc


def _hf_download(repo_id: str, filename: str) -> Path:
    """The file from the Hugging Face hub cache, fetched first when it is not there."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return Path(cached)
    return Path(hf_hub_download(repo_id, filename))


def _download_hub(entry: PublishedWeights) -> Path:
    try:
        path = _hf_download(str(entry.hf_hub_id), str(entry.filename))
    except ImportError as exc:
        raise FileNotFoundError(
            f"the weights {entry.name!r} live on the Hugging Face hub, which needs huggingface_hub (pip install "
            f"huggingface_hub); or download {entry.download_url} and put the file at {entry.cache_path}"
        ) from exc
    except Exception as exc:  # the hub raises many types (offline, not found, gated); all mean "not available"
        raise _unavailable(entry, exc) from exc
    if not _hash_ok(entry, path):
        digest = file_sha256(path)
        for item in {path, path.resolve()}:  # the hub cache links the file name to a blob
            item.unlink(missing_ok=True)
        raise _hash_error(entry, path, digest)
    return path


def _entry_of(value: object) -> PublishedWeights | None:
    if isinstance(value, WeightsEnum):
        return value.value
    if isinstance(value, PublishedWeights):
        return value
    if isinstance(value, str) and not os.path.exists(value):
        return _lookup(value)
    return None


def _fetch(entry: PublishedWeights, *, progress: bool) -> Path:
    """The checked local file of ``entry``: the cached copy when valid, else a fresh download."""
    cached = entry.cache_path
    if cached.is_file():
        if _hash_ok(entry, cached):
            return cached
        logger.warning(
            "%s does not match the SHA-256 %s stated for %r; downloading again", cached, entry.sha256, entry.name
        )
        cached.unlink()
    if entry.url is not None:
        return _download_url(entry, cached, progress=progress)
    return _download_hub(entry)


def resolve_weights(value: str | os.PathLike[str] | PublishedWeights | WeightsEnum, *, progress: bool = False) -> Path:
    """A local file for ``value``: an existing path as is; a published name, entry or enum member downloaded on demand.

    A published file is kept in ``torch.hub.get_dir()/checkpoints`` (hub entries: the Hugging Face cache) and used
    from there without network access while it matches the publisher's SHA-256 (when one is stated). A download that
    does not match is deleted. ``"hf-hub:REPO"`` gives the repository's ``model.safetensors``.

    Raises:
        FileNotFoundError: no such file nor published name (close names suggested), or the download failed: the
            message names the entry, its URL and the path where a file fetched by hand is picked up.
        CheckpointError: the downloaded file does not match the stated SHA-256.

    Example:
        >>> torch.save({"w": torch.zeros(1)}, "mine.pth")
        >>> resolve_weights("mine.pth")
        PosixPath('mine.pth')
    """
    if not isinstance(value, (str, os.PathLike, PublishedWeights, WeightsEnum)):
        raise TypeError(f"weights must be a path or a published weights name, got {type(value).__name__}")
    entry = _entry_of(value)
    if entry is not None:
        return _fetch(entry, progress=progress)
    text = os.fspath(value)
    if os.path.exists(text):
        return Path(text)
    if text.startswith(HUB_PREFIX):
        return _resolve_path(text)
    raise FileNotFoundError(f"weights file not found: {text} (nor is it a published weights name; {_unknown(text)})")


def resolve_source(source: WeightsLike) -> WeightsSource:
    """``source`` with published names, entries and enum members replaced by their local file (``resolve_weights``);
    paths that exist, ``"hf-hub:"`` sources and state dicts pass through unchanged for ``read_checkpoint``."""
    if isinstance(source, Mapping):
        return source
    if isinstance(source, str) and (source.startswith(HUB_PREFIX) or os.path.exists(source)):
        return source
    if isinstance(source, (str, PublishedWeights, WeightsEnum)):
        return resolve_weights(source)
    return source
