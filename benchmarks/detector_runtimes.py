"""Whole detectors timed in eager PyTorch, onnxruntime and OpenVINO fp32: RetinaNet and Faster R-CNN with our backbone.

Each detector (random weights, 91 classes, torchvision's default thresholds) gets one class's classification layer
raised (:func:`with_detections`) so that candidates pass the score threshold and NMS has work, which random weights
alone never give, with scores spread out so that no two candidates near the cut-off tie. It is exported whole with
:func:`pvt_backbone.export_models.export_model_onnx` at ``size`` (a multiple of 32: 800x1333 is padded to 800x1344, as
torchvision's transform pads it), so normalisation, box decoding and NMS run inside every runtime. The eager row is
:func:`~pvt_backbone.export_models.eager_detections` (the torchvision detector at that size, its resize off): the
function the exports compute. Before timing, each runtime's detections are compared with eager
(:func:`~pvt_backbone.export_models.compare_detections`, scores within 1e-3); a runtime that disagrees is not
timed, and the report's notes say so.
OpenVINO gets the export fixed to the static input shape, as for the backbone rows.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN, RetinaNet

from pvt_backbone.cli.arguments import ImageSize
from pvt_backbone.detection import fasterrcnn_pvt_v2_fpn, retinanet_pvt_v2_fpn
from pvt_backbone.export import onnxruntime_session
from pvt_backbone.export_models import compare_detections, eager_detections, export_model_onnx, padded_to_list

from .measure import Measurement, time_interleaved

__all__ = ["DETECTOR_SIZE", "DETECTORS", "SCORE_BIAS", "SCORE_SPREAD", "with_detections", "measure_detector_runtimes"]

SCORE_BIAS = 2.0
SCORE_SPREAD = 30.0

DETECTOR_SIZE = ImageSize(800, 1344, 1)
DETECTORS: dict[str, Callable[..., torch.nn.Module]] = {
    "retinanet": retinanet_pvt_v2_fpn,
    "fasterrcnn": fasterrcnn_pvt_v2_fpn,
}


def with_detections(detector: torch.nn.Module, *, label: int = 1) -> torch.nn.Module:
    """``detector`` (RetinaNet or an R-CNN) with class ``label``'s classification bias raised by ``SCORE_BIAS`` and its
    weights scaled by ``SCORE_SPREAD`` (random initial weights give nearly equal logits everywhere)."""
    with torch.no_grad():
        if isinstance(detector, RetinaNet):
            head = detector.head.classification_head
            head.cls_logits.weight.view(head.num_anchors, head.num_classes, -1)[:, label] *= SCORE_SPREAD
            head.cls_logits.bias.view(head.num_anchors, head.num_classes)[:, label] += SCORE_BIAS
        elif isinstance(detector, FasterRCNN):
            detector.roi_heads.box_predictor.cls_score.weight[label] *= SCORE_SPREAD
            detector.roi_heads.box_predictor.cls_score.bias[label] += SCORE_BIAS
        else:
            raise TypeError(f"expected a RetinaNet or Faster R-CNN, got {type(detector).__name__}")
    return detector


def _runs(path: Path, detector: torch.nn.Module, images: Tensor, threads: int) -> dict[str, Callable[[], object]]:
    """eager, onnxruntime and (where installed) OpenVINO fp32 at the static shape of ``images``."""
    session = onnxruntime_session(path, threads=threads)
    feed = {session.get_inputs()[0].name: images.numpy()}
    runs: dict[str, Callable[[], object]] = {
        "eager": lambda: eager_detections(detector, images),
        "onnxruntime": lambda: session.run(None, feed),
    }
    try:
        from pvt_backbone import export_openvino as ov
    except ImportError:  # pragma: no cover - openvino is optional
        return runs
    compiled = ov.compile_openvino(ov.convert_openvino(path, shape=tuple(images.shape)), threads=threads)
    runs["openvino"] = lambda: ov.run_openvino(compiled, images)
    return runs


def measure_detector_runtimes(
    variant: str,
    *,
    size: ImageSize = DETECTOR_SIZE,
    iterations: int,
    warmup: int,
    threads: int,
    log: Callable[[str], None],
) -> tuple[list[Measurement], list[str]]:
    """One row per detector and runtime at ``size`` (see the module docstring) and notes for the report."""
    rows: list[Measurement] = []
    notes: list[str] = []
    torch.manual_seed(0)
    images = torch.rand(size.batch, 3, size.height, size.width)
    with tempfile.TemporaryDirectory() as directory:
        for kind, build in DETECTORS.items():
            detector = with_detections(build(variant, num_classes=91, min_size=size.height, max_size=size.width)).eval()
            start = time.perf_counter()
            path = export_model_onnx(detector, images, Path(directory) / f"{kind}.onnx")
            runs = _runs(path, detector, images, threads)
            expected = eager_detections(detector, images)  # the reference, computed once
            checks = {
                name: compare_detections(expected, padded_to_list(run()))
                for name, run in runs.items()
                if name != "eager"
            }
            for name, check in checks.items():
                if not check.ok:
                    del runs[name]
                    notes.append(
                        f"{kind} in {name}: detections differ from eager by {check.max_abs_diff:.3g}; not timed"
                    )
            found = len(expected[0]["boxes"])
            notes.append(
                f"{kind}_pvt_v2_{variant}_fpn: exported whole and checked in {time.perf_counter() - start:.0f} s; "
                f"{found} detections on the random image"
            )
            times = time_interleaved(
                dict(runs),
                iterations=iterations,
                warmup=warmup,
                device=torch.device("cpu"),
            )
            for name, measured in times.items():
                m = Measurement(f"{kind}_pvt_v2_{variant}_fpn", "detector", "inference", "fp32", name, str(size))
                m.times = measured
                m.note = "the reference" if name == "eager" else f"detections within {checks[name].max_abs_diff:.1e}"
                rows.append(m)
                log(f"{m.impl} {name} {size}: median {m.median_s:.2f} s ({m.note})")
    return rows, notes
