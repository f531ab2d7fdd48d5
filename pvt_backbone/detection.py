"""PVTv2 inside torchvision's detectors: the backbone + FPN module and one builder per detector.

``pvt_fpn_backbone`` returns ``PVTv2FPN``, the module torchvision's detectors expect: ``forward(images)`` gives an
``OrderedDict[str, Tensor]`` of equally wide maps and ``out_channels`` is that width. Its keys follow torchvision's
convention: stage ``i`` is ``"i"``; the extra levels are ``"pool"`` (R-CNNs) or ``"p6"``, ``"p7"`` (RetinaNet, FCOS).

Each detector is one row of ``DETECTORS`` (levels, extra levels, which arguments hold anchors and RoI poolers):

========================  ===============  ===================  =============================
builder                   pyramid levels   default anchors      RoI poolers read
========================  ===============  ===================  =============================
fasterrcnn_pvt_v2_fpn     0 1 2 3 pool     torchvision's, 5     0 1 2 3
maskrcnn_pvt_v2_fpn       0 1 2 3 pool     torchvision's, 5     0 1 2 3 (box and mask)
keypointrcnn_pvt_v2_fpn   0 1 2 3 pool     torchvision's, 5     0 1 2 3 (box and keypoint)
retinanet_pvt_v2_fpn      1 2 3 p6 p7      torchvision's, 5     -
fcos_pvt_v2_fpn           1 2 3 p6 p7      torchvision's, 5     -
========================  ===============  ===================  =============================

RetinaNet's extra levels are the published ones (mmdet's ``add_extra_convs="on_input"``): P6 = conv(C5), P7 =
conv(P6) without a ReLU (``p6p7_source="p5"`` gives torchvision's P6 = conv(P5), P7 = conv(ReLU(P6))). FCOS keeps
mmdet's published FCOS levels: P6 from P5 with a ReLU before P7.

The detectors normalise and resize inside (``GeneralizedRCNNTransform``): feed RGB float images in [0, 1], not
normalised. The builders set ImageNet's mean/std (the backbone's pretraining) and keep ``size_divisible=32``, so
the padded batch is a multiple of the largest stride and the anchor strides come out exact.

``weights_backbone=`` is loaded by the backbone constructor (``PVTv2Backbone(weights=...)``); its ``LoadReport`` is
``model.backbone.body.load_report`` (``None`` without weights).

``weights=`` (RetinaNet, Faster R-CNN, Mask R-CNN) takes a whole mmdetection 3.x / 2.x PVTv2 detector checkpoint (a
path, a published weights name, or a checkpoint dict) and builds the detector that computes mmdet's function
(``pvt_backbone.mmdet_compat``: anchors, box coding, RoIAlign, class layouts, test-time selection, mmdet's mean/std
and ``min_size=800, max_size=1333``). Variant, class count and FPN width come from the file (a passed value that
disagrees is a ``ValueError``); every key is mapped or explicitly dropped (``pvt_backbone.weights.detector_layouts``)
and loaded strictly; ``model.load_report`` says what was loaded and dropped. A Mask R-CNN file serves
``fasterrcnn_pvt_v2_fpn`` with its mask head dropped (a ``LoadWarning``). Pickles that need code load only with
``trust_pickle=True``. R-CNN labels are mmdet's class index + 1, RetinaNet labels mmdet's.

``model.class_names`` is a tuple indexed by output label (index 0 ``"__background__"`` for R-CNNs): the names in the
file's meta, else COCO's 80 for 80 classes, else ``"class_<i>"``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from heads import FPN
from heads.fpn import extra_level_names

from .backbone import BackboneOptions, PVTv2Backbone
from .checks import check_int
from .config import NUM_STAGES, VARIANTS, PVTv2Config, get_config

__all__ = [
    "PVTv2FPN",
    "DetectorSpec",
    "DETECTORS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "pvt_fpn_backbone",
    "trainable_to_frozen_stages",
    "fasterrcnn_pvt_v2_fpn",
    "maskrcnn_pvt_v2_fpn",
    "keypointrcnn_pvt_v2_fpn",
    "retinanet_pvt_v2_fpn",
    "fcos_pvt_v2_fpn",
]

# A checkpoint for PVTv2Backbone(weights=...): a path, "hf-hub:REPO" or a state dict.
WeightsArg = str | os.PathLike[str] | Mapping[str, Tensor] | None
# A whole mmdet detector checkpoint for the builders' weights=: a path, a published weights name or a checkpoint dict.
DetectorWeightsArg = str | os.PathLike[str] | Mapping[str, object] | None
# Detectors whose builders take a whole mmdet checkpoint as weights= (pvt_backbone.mmdet_compat).
_PUBLISHED = ("retinanet", "fasterrcnn", "maskrcnn")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Largest stride of a canonical pyramid level fed to anchors: padded sizes must be multiples of it.
_PAD_MULTIPLE = 32


class PVTv2FPN(nn.Module):
    """PVTv2 backbone followed by an FPN: (B, C_in, H, W) image -> ``OrderedDict`` of (B, out_channels, H_l, W_l).

    ``body`` is the ``PVTv2Backbone``, ``fpn`` the ``heads.FPN`` (the attribute names of torchvision's
    ``BackboneWithFPN``). ``out_channels`` is the FPN width; ``names`` and ``strides`` list the output levels.

    Example:
        >>> model = pvt_fpn_backbone("b0", extra_levels="pool")
        >>> {k: tuple(v.shape[1:]) for k, v in model(torch.rand(1, 3, 250, 333)).items()}
        {'0': (256, 63, 84), '1': (256, 32, 42), '2': (256, 16, 21), '3': (256, 8, 11), 'pool': (256, 4, 6)}
    """

    def __init__(self, body: PVTv2Backbone, fpn: FPN) -> None:
        super().__init__()
        if fpn.in_channels != body.channels:
            raise ValueError(
                f"FPN in_channels {list(fpn.in_channels)} do not match the backbone's {list(body.channels)}"
            )
        self.body = body
        self.fpn = fpn
        self.out_channels: int = fpn.out_channels
        stage_names = tuple(spec.name for spec in body.feature_info)
        self.names: tuple[str, ...] = fpn.output_names(stage_names)
        extra_strides = tuple(body.strides[-1] * 2 ** (k + 1) for k in range(len(fpn.extra_names)))
        self.strides: tuple[int, ...] = (*body.strides, *extra_strides)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """(B, C_in, H, W) image -> ``{name: (B, out_channels, H_l, W_l)}``, highest resolution first."""
        return self.fpn(self.body(x))


def trainable_to_frozen_stages(trainable_stages: int, num_built: int = NUM_STAGES) -> int:
    """torchvision's ``trainable_backbone_layers`` meaning -> the backbone's ``frozen_stages``.

    ``trainable_stages`` counts from the last of the four stages: 4 trains everything (patch embedding included),
    0 freezes every stage. Stages that are not built (after ``max(out_indices)``) count as trainable, so the result
    is ``min(4 - trainable_stages, num_built)``.
    """
    if isinstance(trainable_stages, bool) or not isinstance(trainable_stages, int):
        raise TypeError(f"trainable_stages must be an int in [0, {NUM_STAGES}], got {trainable_stages!r}")
    if not 0 <= trainable_stages <= NUM_STAGES:
        raise ValueError(
            f"trainable_stages must lie in [0, {NUM_STAGES}] (stages left trainable, counted from the last), "
            f"got {trainable_stages!r}"
        )
    return min(NUM_STAGES - trainable_stages, num_built)


def pvt_fpn_backbone(
    variant: PVTv2Config | str = "b2",
    *,
    weights: WeightsArg = None,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    fpn_channels: int = 256,
    extra_levels: Literal["pool", "p6p7"] | None = "pool",
    p6p7_source: Literal["p5", "c5"] = "p5",
    fpn_norm_layer: Callable[..., nn.Module] | None = None,
    trainable_stages: int = NUM_STAGES,
    **backbone_kwargs: Any,
) -> PVTv2FPN:
    """Build a PVTv2 backbone with an FPN on top, ready for torchvision's detectors.

    Args:
        variant: a variant name (``"b0"`` ... ``"b5"``, ``"b2_li"``) or a ``PVTv2Config``.
        weights: backbone checkpoint path, passed to the backbone constructor as ``weights=``; its ``LoadReport`` is
            ``model.body.load_report``.
        out_indices: backbone stages fed to the FPN.
        fpn_channels: FPN width (``out_channels``).
        extra_levels: ``"pool"`` (key ``"pool"``), ``"p6p7"`` (keys ``"p6"``, ``"p7"``) or ``None``.
        p6p7_source: input of P6: ``"p5"`` (last FPN output) or ``"c5"`` (last backbone map), whatever the widths.
        fpn_norm_layer: optional norm after every FPN conv.
        trainable_stages: stages left trainable counted from the last (torchvision's ``trainable_backbone_layers``).
        **backbone_kwargs: ``PVTv2Backbone`` options (``in_channels``, ``drop_path_rate``, ``grad_checkpointing``,
            ...); ``frozen_stages`` is set from ``trainable_stages`` and may not be passed.

    Example:
        >>> model = pvt_fpn_backbone("b0", out_indices=(1, 2, 3), extra_levels="p6p7")
        >>> model.names, model.strides, model.out_channels
        (('1', '2', '3', 'p6', 'p7'), (8, 16, 32, 64, 128), 256)
    """
    if "frozen_stages" in backbone_kwargs:
        raise TypeError("pass trainable_stages (stages left trainable, counted from the last), not frozen_stages")
    if weights is not None:
        backbone_kwargs["weights"] = weights
    body = PVTv2Backbone(variant, out_indices=out_indices, **backbone_kwargs)
    body.freeze_stages(trainable_to_frozen_stages(trainable_stages, len(body.stages)))
    fpn = FPN(
        body.channels,
        fpn_channels,
        extra_levels=extra_levels,
        p6p7_source=p6p7_source,
        norm_layer=fpn_norm_layer,
    )
    return PVTv2FPN(body, fpn)


@dataclass(frozen=True)
class DetectorSpec:
    """How one torchvision detector consumes the pyramid."""

    model_cls: type[nn.Module]
    out_indices: tuple[int, ...]
    extra_levels: Literal["pool", "p6p7"]
    anchor_arg: str
    roi_pool_args: tuple[str, ...]

    @property
    def level_names(self) -> tuple[str, ...]:
        """Keys of the pyramid the detector receives, e.g. ``("0", "1", "2", "3", "pool")``."""
        return (*(str(i) for i in self.out_indices), *extra_level_names(self.extra_levels))

    @property
    def num_levels(self) -> int:
        return len(self.level_names)


_RCNN_LEVELS = (0, 1, 2, 3)
_DENSE_LEVELS = (1, 2, 3)

DETECTORS: dict[str, DetectorSpec] = {
    "fasterrcnn": DetectorSpec(FasterRCNN, _RCNN_LEVELS, "pool", "rpn_anchor_generator", ("box_roi_pool",)),
    "maskrcnn": DetectorSpec(MaskRCNN, _RCNN_LEVELS, "pool", "rpn_anchor_generator", ("box_roi_pool", "mask_roi_pool")),
    "keypointrcnn": DetectorSpec(
        KeypointRCNN, _RCNN_LEVELS, "pool", "rpn_anchor_generator", ("box_roi_pool", "keypoint_roi_pool")
    ),
    "retinanet": DetectorSpec(RetinaNet, _DENSE_LEVELS, "p6p7", "anchor_generator", ()),
    "fcos": DetectorSpec(FCOS, _DENSE_LEVELS, "p6p7", "anchor_generator", ()),
}

# Keyword arguments torchvision's detectors pass on to GeneralizedRCNNTransform through **kwargs.
_TRANSFORM_KWARGS = ("size_divisible", "fixed_size", "_skip_resize")
# Keyword arguments of pvt_fpn_backbone a detector builder accepts besides the backbone options.
_NECK_KWARGS = ("fpn_channels", "p6p7_source", "fpn_norm_layer")
# frozen_stages comes from trainable_stages and weights from weights_backbone.
_BACKBONE_KWARGS = tuple(key for key in BackboneOptions.__annotations__ if key not in ("frozen_stages", "weights"))


def _check_anchor_generator(name: str, generator: object, spec: DetectorSpec, level_names: Sequence[str]) -> None:
    levels = f"{spec.num_levels} pyramid levels ({', '.join(level_names)})"
    if isinstance(generator, AnchorGenerator):
        counts = {"sizes": len(generator.sizes), "aspect_ratios": len(generator.aspect_ratios)}
        for field, count in counts.items():
            if count != spec.num_levels:
                raise ValueError(
                    f"{name} has {count} entries in {field} but this detector has {levels}; give one tuple of "
                    f"{field} per level, e.g. sizes=((32,), (64,), (128,), (256,), (512,))"
                )
    per_level = getattr(generator, "num_anchors_per_location", None)
    if callable(per_level):
        anchors = list(per_level())
        if len(anchors) != spec.num_levels:
            raise ValueError(f"{name} produces anchors for {len(anchors)} levels but this detector has {levels}")
        if len(set(anchors)) > 1:
            raise ValueError(
                f"{name} gives {anchors} anchors per location across levels; the detector head is shared by all "
                "levels, so every level needs the same number of sizes x aspect ratios"
            )


def _check_roi_pool(name: str, pool: object, level_names: Sequence[str]) -> None:
    if isinstance(pool, MultiScaleRoIAlign):
        missing = [n for n in pool.featmap_names if n not in level_names]
        if missing:
            raise ValueError(
                f"{name} reads feature maps {missing} that the backbone does not return; available: "
                f"{list(level_names)} (names are strings, e.g. featmap_names=['0', '1', '2', '3'])"
            )


def _check_image_stats(kwargs: dict[str, Any], in_channels: object) -> None:
    check_int("in_channels", in_channels, minimum=1)
    if in_channels == 3:
        kwargs.setdefault("image_mean", list(IMAGENET_MEAN))
        kwargs.setdefault("image_std", list(IMAGENET_STD))
    elif "image_mean" not in kwargs or "image_std" not in kwargs:
        raise ValueError(
            f"in_channels={in_channels}: pass image_mean and image_std with {in_channels} entries each (the "
            "ImageNet defaults have 3)"
        )
    for key in ("image_mean", "image_std"):
        values = kwargs[key]
        if not isinstance(values, Sequence) or len(values) != in_channels:
            raise ValueError(f"{key} must have one entry per input channel ({in_channels}), got {values!r}")
    if any(not s > 0 for s in kwargs["image_std"]):
        raise ValueError(f"image_std entries must be > 0, got {kwargs['image_std']!r}")


def _check_kwargs(name: str, spec: DetectorSpec, kwargs: dict[str, Any]) -> None:
    accepted = set(inspect.signature(spec.model_cls.__init__).parameters) - {
        "self",
        "backbone",
        "num_classes",
        "kwargs",
    }
    accepted |= set(_TRANSFORM_KWARGS)
    unknown = sorted(set(kwargs) - accepted - set(_NECK_KWARGS) - set(_BACKBONE_KWARGS))
    if "frozen_stages" in kwargs:
        raise TypeError("pass trainable_stages (stages left trainable, counted from the last), not frozen_stages")
    if "weights" in kwargs:
        raise TypeError(
            f"{name}_pvt_v2_fpn takes no whole-detector weights= (published mmdet detectors: "
            f"{', '.join(_PUBLISHED)}); pass the backbone checkpoint as weights_backbone="
        )
    if unknown:
        raise TypeError(
            f"{name}_pvt_v2_fpn got unexpected keyword arguments {unknown}; allowed: {spec.model_cls.__name__} "
            f"options, backbone options {list(_BACKBONE_KWARGS)} and neck options {list(_NECK_KWARGS)}"
        )
    size_divisible = kwargs.get("size_divisible", _PAD_MULTIPLE)
    check_int("size_divisible", size_divisible, minimum=1)
    if size_divisible % _PAD_MULTIPLE:
        raise ValueError(
            f"size_divisible must be a multiple of {_PAD_MULTIPLE} (the stride of the coarsest stage), got "
            f"{size_divisible}: otherwise the anchor strides derived from padded size // map size are wrong"
        )
    if kwargs.get(spec.anchor_arg) is not None:
        _check_anchor_generator(spec.anchor_arg, kwargs[spec.anchor_arg], spec, spec.level_names)
    for arg in spec.roi_pool_args:
        if kwargs.get(arg) is not None:
            _check_roi_pool(arg, kwargs[arg], spec.level_names)


def _check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (background included for R-CNNs), got {num_classes!r}")
    return num_classes


def _set_class_names(model: nn.Module, name: str, num_classes: int, stored: tuple[str, ...] | None = None) -> None:
    """``model.class_names``: a tuple indexed by output label ("__background__" first for R-CNNs)."""
    from .weights.detectors import class_names_for

    rcnn = name not in ("retinanet", "fcos")
    model.class_names = class_names_for(num_classes - rcnn, stored, background=rcnn)  # type: ignore[assignment]


def _build_detector(
    name: str,
    variant: PVTv2Config | str | None,
    *,
    num_classes: int | None,
    weights_backbone: WeightsArg,
    trainable_stages: int,
    kwargs: dict[str, Any],
    weights: DetectorWeightsArg = None,
) -> nn.Module:
    spec = DETECTORS[name]
    trust_pickle = bool(kwargs.pop("trust_pickle", False))
    _check_kwargs(name, spec, kwargs)
    if weights is not None:
        if weights_backbone is not None:
            raise ValueError("pass weights= (a whole detector) or weights_backbone= (a backbone), not both")
        return _build_published(name, variant, num_classes, weights, trust_pickle, trainable_stages, kwargs)
    if num_classes is None:
        raise ValueError(f"{name}_pvt_v2_fpn needs num_classes (background included for R-CNNs) without weights=")
    num_classes = _check_num_classes(num_classes)
    _check_image_stats(kwargs, kwargs.get("in_channels", 3))
    backbone_options = {key: kwargs.pop(key) for key in _BACKBONE_KWARGS + _NECK_KWARGS if key in kwargs}
    if name == "retinanet":  # the published RetinaNet's P6 reads C5 (mmdet's add_extra_convs="on_input")
        backbone_options.setdefault("p6p7_source", "c5")
    backbone = pvt_fpn_backbone(
        "b2" if variant is None else variant,
        weights=weights_backbone,
        out_indices=spec.out_indices,
        extra_levels=spec.extra_levels,
        trainable_stages=trainable_stages,
        **backbone_options,
    )
    if name == "retinanet" and backbone.fpn.extra_blocks.source == "c5":
        from .mmdet_compat import P6P7FromC5

        fpn = backbone.fpn
        fpn.extra_blocks = P6P7FromC5(fpn.out_channels, c5_channels=fpn.in_channels[-1])
    model = spec.model_cls(backbone, num_classes=num_classes, **kwargs)
    _set_class_names(model, name, num_classes)
    return model


def _published_config(variant: PVTv2Config | str | None, file: Any) -> PVTv2Config:
    """The backbone config for a detector file: its table variant (or ``variant``, checked), with its norm eps."""
    arch = file.architecture
    if variant is None:
        if arch.variant is None:
            raise ValueError(
                f"the backbone in {file.source} is {arch.describe()}, no table variant: pass "
                "variant=PVTv2Config(...) with its num_heads"
            )
        config = VARIANTS[arch.variant]
    else:
        config = get_config(variant)
        shapes = (config.embed_dims, config.depths, tuple(map(float, config.mlp_ratios)), config.linear)
        if shapes != (arch.embed_dims, arch.depths, arch.mlp_ratios, arch.linear):
            raise ValueError(f"variant {variant!r} does not match {file.source}, which holds {arch.describe()}")
    return dataclasses.replace(config, embed_norm_eps=file.eps[0], norm_eps=file.eps[1])


def _check_file_sizes(name: str, num_classes: int | None, kwargs: dict[str, Any], file: Any) -> int:
    """The model's ``num_classes`` (torchvision's meaning) from the file; passed values must agree."""
    expected = file.num_classes + (name != "retinanet")
    if num_classes is not None and _check_num_classes(num_classes) != expected:
        meaning = "" if name == "retinanet" else " (background included)"
        raise ValueError(f"num_classes={num_classes} but {file.source} has {expected} classes{meaning}")
    width = kwargs.pop("fpn_channels", None)
    if width is not None and width != file.fpn_channels:
        raise ValueError(f"fpn_channels={width} but {file.source} has an FPN {file.fpn_channels} wide")
    for fixed in ("p6p7_source", "fpn_norm_layer", "in_channels"):
        if fixed in kwargs:
            raise ValueError(f"{fixed} is fixed by the published detector in {file.source}; leave it out")
    return expected


def _build_published(
    name: str,
    variant: PVTv2Config | str | None,
    num_classes: int | None,
    weights: DetectorWeightsArg,
    trust_pickle: bool,
    trainable_stages: int,
    kwargs: dict[str, Any],
) -> nn.Module:
    """mmdet's detector of a whole checkpoint, loaded strictly, with ``load_report`` and ``class_names``."""
    from .mmdet_compat import mmdet_rcnn, mmdet_retinanet
    from .weights.detectors import DetectorLoadReport, read_detector_file
    from .weights.load import LoadWarning
    from .weights.state_dict import load_state_dict_strict

    if name not in _PUBLISHED:
        raise TypeError(f"{name}_pvt_v2_fpn has no published mmdet weights; pass weights_backbone=")
    file = read_detector_file(weights, arch=name, trust_pickle=trust_pickle)
    total = _check_file_sizes(name, num_classes, kwargs, file)
    spec = DETECTORS[name]
    backbone_options = {key: kwargs.pop(key) for key in _BACKBONE_KWARGS if key in kwargs}
    backbone = pvt_fpn_backbone(
        _published_config(variant, file),
        out_indices=spec.out_indices,
        extra_levels=spec.extra_levels,
        fpn_channels=file.fpn_channels,
        trainable_stages=trainable_stages,
        **backbone_options,
    )
    if name == "retinanet":
        model = mmdet_retinanet(backbone, file.num_classes, **kwargs)
    else:
        mask = file.mask_channels if name == "maskrcnn" else None
        model = mmdet_rcnn(
            backbone, file.num_classes, representation_size=file.representation_size, mask_channels=mask, **kwargs
        )
    load_state_dict_strict(
        model, file.state_dict, source=file.source, hint="the file's detector differs from mmdet's published one"
    )
    note = f"eps {file.eps[0]:g}/{file.eps[1]:g} (embedding and SR / block norms) of the {file.backbone_layout} code"
    model.load_report = DetectorLoadReport(  # type: ignore[assignment]
        file.source,
        file.sha256,
        file.arch,
        file.backbone_layout,
        file.architecture,
        tuple(file.state_dict),
        file.dropped,
        (note,),
    )
    unexpected = [d for d in file.dropped if not d.key.startswith("[")]
    if unexpected:
        warnings.warn(
            f"{file.source}: {len(unexpected)} entries left out, e.g. {unexpected[0].key} "
            f"({unexpected[0].reason}); see model.load_report",
            LoadWarning,
            stacklevel=3,
        )
    _set_class_names(model, name, total, file.class_names)
    return model


def fasterrcnn_pvt_v2_fpn(
    variant: PVTv2Config | str | None = None,
    *,
    num_classes: int | None = None,
    weights: DetectorWeightsArg = None,
    weights_backbone: WeightsArg = None,
    trainable_stages: int = 4,
    **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN with a PVTv2 + FPN backbone (levels ``"0"``-``"3"`` + ``"pool"``).

    ``num_classes`` includes the background (inferred from ``weights=``, a whole mmdet Faster or Mask R-CNN file; see
    the module docstring). ``variant`` defaults to the file's, else ``"b2"``. ``kwargs`` go to
    ``torchvision.models.detection.FasterRCNN``
    (``min_size``, ``max_size``, ``box_score_thresh``, ``rpn_anchor_generator``, ...), except backbone options
    (``in_channels``, ``drop_path_rate``, ``grad_checkpointing``, ...) and neck options (``fpn_channels``,
    ``fpn_norm_layer``) and ``trust_pickle``. Input: list of (C_in, H, W) float images in [0, 1]; train-mode
    output: loss dict; eval output: one dict per image with ``boxes`` (N, 4) xyxy in input pixels, ``labels`` (N,),
    ``scores`` (N,).

    Example:
        >>> model = fasterrcnn_pvt_v2_fpn("b0", num_classes=3, min_size=128, max_size=192).eval()
        >>> sorted(model([torch.rand(3, 120, 150)])[0])
        ['boxes', 'labels', 'scores']
    """
    return _build_detector(  # type: ignore[return-value]
        "fasterrcnn",
        variant,
        num_classes=num_classes,
        weights=weights,
        weights_backbone=weights_backbone,
        trainable_stages=trainable_stages,
        kwargs=kwargs,
    )


def maskrcnn_pvt_v2_fpn(
    variant: PVTv2Config | str | None = None,
    *,
    num_classes: int | None = None,
    weights: DetectorWeightsArg = None,
    weights_backbone: WeightsArg = None,
    trainable_stages: int = 4,
    **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN with a PVTv2 + FPN backbone (levels ``"0"``-``"3"`` + ``"pool"``).

    As ``fasterrcnn_pvt_v2_fpn`` (``weights=``: an mmdet Mask R-CNN file); eval output adds ``masks`` (N, 1, H, W)
    probabilities at input size.

    Example:
        >>> model = maskrcnn_pvt_v2_fpn("b0", num_classes=3, min_size=128, max_size=192).eval()
        >>> sorted(model([torch.rand(3, 120, 150)])[0])
        ['boxes', 'labels', 'masks', 'scores']
    """
    return _build_detector(  # type: ignore[return-value]
        "maskrcnn",
        variant,
        num_classes=num_classes,
        weights=weights,
        weights_backbone=weights_backbone,
        trainable_stages=trainable_stages,
        kwargs=kwargs,
    )


def keypointrcnn_pvt_v2_fpn(
    variant: PVTv2Config | str | None = None,
    *,
    num_classes: int | None = None,
    weights_backbone: WeightsArg = None,
    trainable_stages: int = 4,
    **kwargs: Any,
) -> KeypointRCNN:
    """Keypoint R-CNN with a PVTv2 + FPN backbone (levels ``"0"``-``"3"`` + ``"pool"``).

    As ``fasterrcnn_pvt_v2_fpn``; ``num_keypoints`` (default 17) goes to ``KeypointRCNN``; eval output adds
    ``keypoints`` (N, K, 3) and ``keypoints_scores`` (N, K).

    Example:
        >>> model = keypointrcnn_pvt_v2_fpn("b0", num_classes=2, num_keypoints=5, min_size=128, max_size=192)
        >>> sorted(model.eval()([torch.rand(3, 120, 150)])[0])
        ['boxes', 'keypoints', 'keypoints_scores', 'labels', 'scores']
    """
    return _build_detector(  # type: ignore[return-value]
        "keypointrcnn",
        variant,
        num_classes=num_classes,
        weights_backbone=weights_backbone,
        trainable_stages=trainable_stages,
        kwargs=kwargs,
    )


def retinanet_pvt_v2_fpn(
    variant: PVTv2Config | str | None = None,
    *,
    num_classes: int | None = None,
    weights: DetectorWeightsArg = None,
    weights_backbone: WeightsArg = None,
    trainable_stages: int = 4,
    **kwargs: Any,
) -> RetinaNet:
    """RetinaNet with a PVTv2 + FPN backbone (levels ``"1"``-``"3"`` + ``"p6"``, ``"p7"``; P6 from C5, no ReLU).

    ``num_classes`` excludes a background; with ``weights=`` (a whole mmdet RetinaNet file) it is inferred.
    ``kwargs`` go to ``torchvision.models.detection.RetinaNet`` (``min_size``, ``score_thresh``, ``anchor_generator``,
    ...), except backbone options, neck options (``fpn_channels``, ``p6p7_source``, ``fpn_norm_layer``) and
    ``trust_pickle``. Eval output: one dict per image with ``boxes``, ``labels``, ``scores``.

    Example:
        >>> model = retinanet_pvt_v2_fpn("b0", num_classes=3, min_size=128, max_size=192).eval()
        >>> sorted(model([torch.rand(3, 120, 150)])[0])
        ['boxes', 'labels', 'scores']
    """
    return _build_detector(  # type: ignore[return-value]
        "retinanet",
        variant,
        num_classes=num_classes,
        weights=weights,
        weights_backbone=weights_backbone,
        trainable_stages=trainable_stages,
        kwargs=kwargs,
    )


def fcos_pvt_v2_fpn(
    variant: PVTv2Config | str | None = None,
    *,
    num_classes: int | None = None,
    weights_backbone: WeightsArg = None,
    trainable_stages: int = 4,
    **kwargs: Any,
) -> FCOS:
    """FCOS with a PVTv2 + FPN backbone (levels ``"1"``-``"3"`` + ``"p6"``, ``"p7"``; P6 from P5).

    As ``retinanet_pvt_v2_fpn`` without ``weights=``, for ``torchvision.models.detection.FCOS``; P6 reads P5 and P7
    a ReLU of P6, as mmdet's published FCOS (``add_extra_convs="on_output"``, ``relu_before_extra_convs=True``).

    Example:
        >>> model = fcos_pvt_v2_fpn("b0", num_classes=3, min_size=128, max_size=192).eval()
        >>> sorted(model([torch.rand(3, 120, 150)])[0])
        ['boxes', 'labels', 'scores']
    """
    return _build_detector(  # type: ignore[return-value]
        "fcos",
        variant,
        num_classes=num_classes,
        weights_backbone=weights_backbone,
        trainable_stages=trainable_stages,
        kwargs=kwargs,
    )
