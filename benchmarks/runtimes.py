"""Deployment runtimes timed beside our eager backbone: timm, eager bf16, torch.compile, onnxruntime, OpenVINO.

Model: the backbone (:class:`PVTv2Backbone`, four stage maps) with the weights of the classifier timed in the main
table, because a deployment exports the backbone or a whole detector, and the stage maps are what a detector reads.
timm's peer is ``timm.create_model(..., features_only=True)`` with the same weights. Inputs are held-out synthetic
scenes (the "val" split, ImageNet-normalised), so quantization ranges meet image-like activations.

Rows per case, all timed in the same interleaved rounds:

* ``eager fp32``: the reference; ``timm`` fp32 (where timm is installed); ``eager bf16`` under CPU autocast (only
  where oneDNN has native bf16 kernels);
* ``compiled fp32``: ``torch.compile`` of our backbone with inductor's ``freezing`` (weights folded in as constants
  and prepacked) and ``cpp_wrapper`` (no Python between kernels), specialised to the case's shape;
* ``onnxruntime fp32``: the dynamic-shape ONNX export (batch, height, width), one file for every case;
  ``onnxruntime int8``: that file after onnxruntime's static quantization (QDQ, per-channel int8 weights, uint8
  activations, which is its fast x86 form; MinMax ranges), calibrated on as many "train" scenes as OpenVINO's, at
  the case's size up to 512x512 pixels and above that at the same aspect ratio scaled to that area (its calibration
  holds a scene's every activation in memory);
* ``openvino-dynamic fp32``: the same dynamic file in OpenVINO, i.e. the very export onnxruntime runs;
* ``openvino fp32`` / ``bf16`` / ``int8``: the file fixed to the case's static shape, which is how one deploys it
  (:func:`~pvt_backbone.export_openvino.convert_openvino` ``shape=``); bf16 where the CPU plugin reports it; INT8 is
  NNCF post-training quantization calibrated on ``calibration`` scenes of the "train" split. These compile with CPU
  pinning off; ``openvino-pinned fp32`` is the static fp32 model with the plugin's default pinning, for comparison.

Checked before timing: fp32 rows within ``FP32_ATOL`` of eager on every stage (else ``AssertionError``); bf16 and INT8
rows report the cosine similarity of each stage map to eager fp32, averaged over ``ACCURACY_IMAGES`` held-out scenes,
and the note gives the lowest stage. With ``contended`` every row is timed again while a busy-loop child process
pinned to core 0 competes for the CPU; the note gives the contended / quiet median ratio, and ours / timm.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pvt_backbone import PVTv2Backbone
from pvt_backbone.amp import autocast
from pvt_backbone.cli.arguments import ImageSize
from pvt_backbone.export import export_onnx, onnxruntime_session
from pvt_backbone.weights import load_weights

from .measure import Measurement, count_gflop, cpu_bf16_kernels, time_interleaved

__all__ = [
    "FP32_ATOL",
    "ACCURACY_IMAGES",
    "RuntimeSettings",
    "busy_core",
    "backbone_models",
    "scene_images",
    "runtime_runs",
    "measure_runtimes",
]

FP32_ATOL = 1e-4
ACCURACY_IMAGES = 8
Run = Callable[[Tensor], list[Tensor]]


@dataclass(frozen=True)
class RuntimeSettings:
    """What :func:`measure_runtimes` times: the INT8 rows (and on how many calibration scenes), contention, threads,
    whether timm's backbone runs beside ours, and whether the ``torch.compile`` row is built (about 30 s a case)."""

    int8: bool = True
    calibration: int = 32
    contended: bool = False
    threads: int = 1
    timm_peer: bool = True
    compiled: bool = True


def _spin() -> None:  # pragma: no cover - runs in the child process
    while True:
        pass


@contextlib.contextmanager
def busy_core(core: int = 0) -> Iterator[None]:
    """A busy-loop child process pinned to ``core`` (where the OS allows pinning) for the duration of the block."""
    child = multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
    child.start()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(child.pid, {core})
    try:
        yield
    finally:
        child.terminate()
        child.join(timeout=10)


def backbone_models(classifier: nn.Module, variant: str, *, timm_peer: bool = True) -> dict[str, nn.Module]:
    """Our backbone (``"eager"``) and, if timm is installed and ``timm_peer``, timm's ``features_only`` model
    (``"timm"``), both with ``classifier``'s weights (its head dropped), in eval mode on CPU."""
    ours = getattr(PVTv2Backbone, variant)()
    load_weights(ours, {key: value.cpu() for key, value in classifier.state_dict().items()})
    models = {"eager": ours.eval()}
    if timm_peer:
        try:
            import timm
        except ImportError:  # pragma: no cover - timm is a benchmark extra
            return models
        peer = timm.create_model(f"pvt_v2_{variant}", pretrained=False, features_only=True)
        # timm's feature wrapper names the stage modules stages_N
        peer.load_state_dict(
            {re.sub(r"^stages\.(\d+)", r"stages_\1", key): value for key, value in ours.state_dict().items()}
        )
        models["timm"] = peer.eval()
    return models


def scene_images(count: int, case: ImageSize, split: str) -> Tensor:
    """(count, 3, H, W) ImageNet-normalised synthetic scenes of ``split`` at the case's size."""
    from pvt_backbone.export_openvino import calibration_images
    from pvt_backbone.training.evaluation import normalize_images

    return normalize_images(calibration_images("synthetic", count, (case.height, case.width), split=split))


def _eager(model: nn.Module, *, bf16: bool = False) -> Run:
    def run(x: Tensor) -> list[Tensor]:
        with torch.inference_mode(), autocast("cpu", enabled=bf16):
            outputs = model(x)
        return list(outputs.values()) if isinstance(outputs, dict) else list(outputs)

    return run


def _compiled(model: nn.Module) -> Run:
    """``torch.compile`` with frozen weights and the C++ wrapper, one static graph per input shape."""
    from torch._inductor import config

    run = _eager(torch.compile(model, dynamic=False))

    def frozen(x: Tensor) -> list[Tensor]:
        # compiling happens on a shape's first call; torch.compile(options=...) did not freeze (eager speed in a trial)
        with config.patch(freezing=True, cpp_wrapper=True):
            return run(x)

    return frozen


def _onnxruntime_run(path: Path, threads: int) -> Run:
    session = onnxruntime_session(path, threads=threads)
    name = session.get_inputs()[0].name
    return lambda x: [torch.from_numpy(out) for out in session.run(None, {name: x.numpy()})]


# onnxruntime's calibration session keeps every activation of a scene alive: 5.3 GB peak at 512x512, so about 20 GB
# at 800x1333, past a 24 GiB machine with the rest of the benchmark loaded
ORT_CALIBRATION_PIXELS = 512 * 512


def _onnxruntime_calibration_size(case: ImageSize) -> ImageSize:
    """``case``, or the same aspect ratio at ``ORT_CALIBRATION_PIXELS`` (sides rounded to 32) when it is larger."""
    scale = math.sqrt(ORT_CALIBRATION_PIXELS / (case.height * case.width))
    if scale >= 1:
        return case
    height, width = (max(32, round(side * scale / 32) * 32) for side in (case.height, case.width))
    return ImageSize(height, width, case.batch)


def _onnxruntime_int8(onnx_path: Path, calibration: Tensor, directory: Path) -> Path:
    """onnxruntime's static INT8 quantization of ``onnx_path`` (module docstring), calibrated one scene at a time."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnxruntime_session(onnx_path).get_inputs()[0].name

    class Scenes(CalibrationDataReader):
        def __init__(self) -> None:
            self.scenes = iter(calibration)

        def get_next(self) -> dict | None:
            scene = next(self.scenes, None)
            return None if scene is None else {name: scene[None].numpy()}

    prepared, quantized = directory / "int8-prepared.onnx", directory / "int8.onnx"
    # the symbolic shape pass cannot follow the dynamic H/W arithmetic of the export; ONNX's own inference can
    quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(quantized),
        Scenes(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return quantized


def _openvino_runs(
    onnx_path: Path, case: ImageSize, settings: RuntimeSettings, calibration: Tensor | None
) -> dict[str, Run]:
    """OpenVINO: the dynamic export and the export fixed to ``case``'s shape, fp32, bf16 where available and INT8
    calibrated on ``calibration`` if given; pinning off except for the ``openvino-pinned`` row."""
    try:
        from pvt_backbone import export_openvino as ov
    except ImportError:  # pragma: no cover - openvino is optional
        return {}

    def compiled_run(model: object, precision: str = "f32", pinning: bool | None = False) -> Run:
        compiled = ov.compile_openvino(model, threads=settings.threads, precision=precision, pinning=pinning)
        return lambda x: ov.run_openvino(compiled, x)

    shape = (case.batch, 3, case.height, case.width)
    static = ov.convert_openvino(onnx_path, shape=shape)
    runs = {"openvino-dynamic fp32": compiled_run(ov.convert_openvino(onnx_path))}
    for precision in ("f32", "bf16") if ov.openvino_bf16_supported() else ("f32",):
        runs[f"openvino {'fp32' if precision == 'f32' else precision}"] = compiled_run(static, precision)
    runs["openvino-pinned fp32"] = compiled_run(static, pinning=None)
    if calibration is not None:
        single = ov.convert_openvino(onnx_path, shape=(1, *shape[1:]))  # calibrated one scene at a time
        quantized = ov.quantize_openvino(single, calibration)
        if case.batch != 1:
            quantized.reshape(list(shape))
        runs["openvino int8"] = compiled_run(quantized)
    return runs


def runtime_runs(
    onnx_path: Path, models: dict[str, nn.Module], case: ImageSize, settings: RuntimeSettings
) -> dict[str, Run]:
    """Every available row for ``case`` (see the module docstring), keyed ``"<runtime> <dtype>"``.

    The INT8 files are written beside ``onnx_path``.
    """
    runs: dict[str, Run] = {"eager fp32": _eager(models["eager"])}
    if "timm" in models:
        runs["timm fp32"] = _eager(models["timm"])
    if cpu_bf16_kernels():
        runs["eager bf16"] = _eager(models["eager"], bf16=True)
    if settings.compiled:
        runs["compiled fp32"] = _compiled(models["eager"])
    runs["onnxruntime fp32"] = _onnxruntime_run(onnx_path, settings.threads)
    calibration = scene_images(settings.calibration, case, "train") if settings.int8 else None
    if calibration is not None:
        ort_case = _onnxruntime_calibration_size(case)
        scenes = calibration if ort_case == case else scene_images(settings.calibration, ort_case, "train")
        runs["onnxruntime int8"] = _onnxruntime_run(
            _onnxruntime_int8(onnx_path, scenes, onnx_path.parent), settings.threads
        )
    runs.update(_openvino_runs(onnx_path, case, settings, calibration))
    return runs


def _accuracy_note(name: str, run: Run, reference: Run, images: Tensor, batch: int) -> str:
    """The fp32 check (raises) or the per-stage cosine similarity of a reduced-precision row."""
    from pvt_backbone.export_openvino import output_cosines

    if name.endswith("fp32"):
        worst = 0.0
        for start in range(0, images.shape[0], batch):
            x = images[start : start + batch]
            for want, got in zip(reference(x), run(x), strict=True):
                worst = max(worst, (got.float() - want).abs().max().item())
        if worst > FP32_ATOL:
            raise AssertionError(f"{name} differs from eager by {worst:.3g} > {FP32_ATOL}; not timing")
        return f"max abs diff vs eager {worst:.1e}"
    cosines = output_cosines(reference, run, images, batch=batch)
    return f"stage cosine vs eager fp32: min {min(cosines):.4f} ({', '.join(f'{c:.4f}' for c in cosines)})"


def _impl_and_mode(runtime: str) -> tuple[str, str]:
    if runtime == "timm":
        return "timm-features", "eager"
    return f"ours-{runtime}", runtime


def _rows(
    case: ImageSize, variant: str, gflop: float, quiet: dict, busy: dict, notes: dict[str, str]
) -> list[Measurement]:
    """Measurements for one case: each row quiet, then (if timed) contended, with ours / timm under contention."""
    rows = []
    for name, times in quiet.items():
        runtime, dtype = name.split()
        impl, mode = _impl_and_mode(runtime)
        m = Measurement(impl, variant, "inference", dtype, mode, str(case), times, gflop)
        m.note = notes[name]
        rows.append(m)
        if busy:
            c = Measurement(impl, variant, "inference", dtype, f"{mode} contended", str(case), busy[name], gflop)
            c.note = f"one core busy: {c.median_s / m.median_s:.2f}x the quiet median"
            if name == "eager fp32" and "timm fp32" in busy:
                c.note += f"; {statistics.median(busy['timm fp32']) / c.median_s:.2f}x timm's contended median"
            rows.append(c)
    return rows


def measure_runtimes(
    classifier: nn.Module,
    cases: Sequence[ImageSize],
    *,
    variant: str,
    iterations: int,
    warmup: int,
    settings: RuntimeSettings,
    log: Callable[[str], None],
) -> tuple[list[Measurement], list[str]]:
    """Rows for every runtime at every case (see the module docstring) and notes for the report."""
    models = backbone_models(classifier, variant, timm_peer=settings.timm_peer)
    build = getattr(PVTv2Backbone, variant)
    rows: list[Measurement] = []
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        path = export_onnx(models["eager"], torch.randn(1, 3, 224, 224), Path(directory) / "backbone.onnx")
        notes = [
            f"runtimes: the backbone exported once to ONNX (dynamic batch/H/W) in {time.perf_counter() - start:.0f} s"
        ]
        for case in cases:
            count = max(ACCURACY_IMAGES // case.batch, 1) * case.batch
            images = scene_images(count, case, "val")
            runs = runtime_runs(path, models, case, settings)
            step_notes = {"eager fp32": "the reference"}
            for name, run in runs.items():
                if name != "eager fp32":
                    step_notes[name] = _accuracy_note(name, run, runs["eager fp32"], images, case.batch)
            timed = images[: case.batch]
            steps = {name: (lambda run=run, x=timed: run(x)) for name, run in runs.items()}
            quiet = time_interleaved(steps, iterations=iterations, warmup=warmup, device=torch.device("cpu"))
            busy = {}
            if settings.contended:
                with busy_core(0):
                    busy = time_interleaved(steps, iterations=iterations, warmup=warmup, device=torch.device("cpu"))
            case_rows = _rows(case, variant, count_gflop(build, case, "inference"), quiet, busy, step_notes)
            rows.extend(case_rows)
            for m in case_rows:
                log(f"{m.impl} {m.mode} {m.dtype} {case}: median {m.median_s * 1e3:.1f} ms ({m.note})")
    return rows, notes
