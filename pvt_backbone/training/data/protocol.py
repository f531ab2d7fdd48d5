"""The training recipe's data protocol as ``DataSpec`` fields: checking them, and the training view they select.

A spec here is anything with ``DataSpec``'s fields (``pvt_backbone.training.tasks.DataSpec``); the defaults
(``augment="flip"``, ``seg_protocol="square"``) select the plain flip views of :mod:`.transforms`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...checks import check_choice, check_float, check_int
from .augment import DETECTION_AUGMENTS, DetectionAugment
from .seg_transforms import KeepRatioSegmentation
from .transforms import AugmentedDetection, AugmentedSegmentation, collate_detection, collate_segmentation

__all__ = ["SEG_PROTOCOLS", "check_protocol", "seg_scale", "inference_settings", "training_view"]

SEG_PROTOCOLS = ("square", "keep_ratio")
_EVAL_MODES = ("whole", "slide")


def _set(spec: Any, name: str, value: Any) -> None:
    object.__setattr__(spec, name, value)  # the spec is a frozen dataclass


def check_protocol(spec: Any) -> None:
    """Check the augmentation and segmentation-protocol fields of a spec and store sequences as tuples (a spec
    read back from JSON then equals the original)."""
    check_choice("augment", spec.augment, DETECTION_AUGMENTS)
    check_choice("seg_protocol", spec.seg_protocol, SEG_PROTOCOLS)
    check_choice("eval_mode", spec.eval_mode, _EVAL_MODES)
    _set(spec, "multiscale_sizes", tuple(spec.multiscale_sizes))
    DetectionAugment(spec.augment, sizes=spec.multiscale_sizes, max_size=spec.max_size)  # checks sizes, max_size
    if spec.seg_scale is not None:
        if len(spec.seg_scale) != 2:
            raise ValueError(f"seg_scale must be (longer, shorter) side limits, got {spec.seg_scale!r}")
        _set(
            spec,
            "seg_scale",
            (
                check_int("seg_scale[0]", spec.seg_scale[0], minimum=1),
                check_int("seg_scale[1]", spec.seg_scale[1], minimum=1),
            ),
        )
    if len(spec.seg_ratio_range) != 2:
        raise ValueError(f"seg_ratio_range must be (low, high), got {spec.seg_ratio_range!r}")
    low = check_float("seg_ratio_range[0]", spec.seg_ratio_range[0], minimum=0.0, inclusive=False)
    _set(spec, "seg_ratio_range", (low, check_float("seg_ratio_range[1]", spec.seg_ratio_range[1], minimum=low)))
    check_float("cat_max_ratio", spec.cat_max_ratio, minimum=0.0, maximum=1.0, inclusive=False)
    for name in ("slide_crop", "slide_stride"):
        if getattr(spec, name) is not None:
            check_int(name, getattr(spec, name), minimum=1)
    _set(
        spec,
        "test_scales",
        tuple(check_float("test_scales[i]", s, minimum=0.0, inclusive=False) for s in spec.test_scales),
    )
    if not spec.test_scales:
        raise ValueError("test_scales must hold at least one ratio, got ()")
    if spec.reduce_zero_label and spec.kind != "folder":
        raise ValueError(f"reduce_zero_label applies to dataset 'folder' masks, not dataset {spec.kind!r}")


def seg_scale(spec: Any, image_size: int) -> tuple[int, int]:
    """(longer, shorter) rescale limits: ``seg_scale``, else (4 x ``image_size``, ``image_size``) (2048, 512)."""
    return spec.seg_scale if spec.seg_scale is not None else (4 * image_size, image_size)


def inference_settings(spec: Any, image_size: int) -> dict[str, Any]:
    """Keyword arguments of ``SegmentationInference`` for a keep-ratio spec: ``slide_crop`` defaults to
    ``image_size``, ``slide_stride`` to two thirds of it (341 for 512).

    >>> from types import SimpleNamespace
    >>> spec = SimpleNamespace(seg_scale=None, eval_mode="slide", slide_crop=None, slide_stride=None,
    ...                        test_scales=(1.0,), test_flip=False)
    >>> inference_settings(spec, 512)
    {'scale': (2048, 512), 'mode': 'slide', 'crop': 512, 'stride': 341, 'scales': (1.0,), 'flip': False}
    """
    crop = spec.slide_crop if spec.slide_crop is not None else image_size
    stride = spec.slide_stride if spec.slide_stride is not None else max(1, crop * 2 // 3)
    return {
        "scale": seg_scale(spec, image_size),
        "mode": spec.eval_mode,
        "crop": crop,
        "stride": min(stride, crop),
        "scales": tuple(spec.test_scales),
        "flip": bool(spec.test_flip),
    }


def training_view(dataset: Any, task: str, spec: Any, image_size: int) -> tuple[Any, Callable[[list], Any]]:
    """The augmented training view of ``dataset`` for ``task`` and its collate function.

    Detection tasks: :class:`AugmentedDetection` with the ``augment`` policy (``lsj`` on an ``image_size``
    canvas). Segmentation: ``square`` resizes to ``image_size`` square and flips (:class:`AugmentedSegmentation`);
    ``keep_ratio`` is :class:`KeepRatioSegmentation` with ``image_size`` crops.
    """
    if task == "segmentation":
        if spec.seg_protocol == "keep_ratio":
            view = KeepRatioSegmentation(
                dataset,
                crop_size=image_size,
                scale=seg_scale(spec, image_size),
                ratio_range=spec.seg_ratio_range,
                cat_max_ratio=spec.cat_max_ratio,
            )
            return view, collate_segmentation
        return AugmentedSegmentation(dataset, size=image_size), collate_segmentation
    augment = DetectionAugment(
        spec.augment,
        sizes=spec.multiscale_sizes,
        max_size=spec.max_size,
        lsj_size=image_size,
        photometric=spec.photometric,
    )
    return AugmentedDetection(dataset, augment=augment), collate_detection
