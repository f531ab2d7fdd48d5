"""Side-by-side speed and memory of our PVTv2 and timm's ``pvt_v2_*`` with the same weights (``tools/benchmark.py``).

Method: both classifiers get identical weights (timm's state dict through :func:`pvt_backbone.weights.load_weights`)
and their logits are checked equal (fp32, 1e-5) before anything is timed. For every case (image size, batch), task
(inference, training step = forward + backward), dtype (fp32, bf16 autocast) and mode (eager, ``torch.compile``),
each implementation is warmed up, then the implementations run interleaved, alternating which goes first, and the
medians are compared. FLOPs come from ``torch.utils.flop_counter`` on the meta device and are turned into achieved
GFLOP/s and a fraction of the machine's matmul peak measured at start-up (best of several fp32 GEMMs). Peak memory is
how far one step raises the process's peak resident set size above its level before the step (Linux ``VmHWM``,
reset per measurement: activations, gradients, workspaces) on CPU, and ``torch.cuda.max_memory_allocated`` above
``memory_allocated`` at entry on CUDA; it is measured in a separate, untimed run of each step. The
gradient-checkpointing rows run each setting in a fresh process, so both start from the same heap.

Everything returns plain dataclasses; :func:`to_markdown`, :func:`to_json` and :func:`plot_throughput` render them.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from pvt_backbone import create_model, load_weights
from pvt_backbone.cli.arguments import ImageSize

from .detector_runtimes import measure_detector_runtimes
from .measure import (
    Measurement,
    PeakMemory,
    count_gflop,
    cpu_bf16_kernels,
    machine_info,
    make_step,
    matmul_peak_gflops,
    time_interleaved,
)
from .runtimes import RuntimeSettings, measure_runtimes

__all__ = [
    "TASKS",
    "DTYPES",
    "MODES",
    "Report",
    "BenchmarkSettings",
    "settings_from",
    "check_same_outputs",
    "run_benchmark",
    "checkpointing_step",
]

TASKS = ("inference", "train")
DTYPES = ("fp32", "bf16")
MODES = ("eager", "compile")


@dataclass
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    matmul_peak_gflops: float
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BenchmarkSettings:
    """What to run; the defaults are the full matrix minus torch.compile (slow to compile on 2 cores)."""

    variant: str = "b2"
    cases: tuple[ImageSize, ...] = (
        ImageSize(224, 224, 1),
        ImageSize(224, 224, 8),
        ImageSize(512, 512, 1),
        ImageSize(800, 1333, 1),
    )
    train_cases: tuple[ImageSize, ...] | None = None  # None: same as ``cases``
    tasks: tuple[str, ...] = TASKS
    dtypes: tuple[str, ...] = DTYPES
    modes: tuple[str, ...] = ("eager",)
    iterations: int = 5
    warmup: int = 1
    device: str = "cpu"
    compare_timm: bool = True
    onnx: bool = True  # onnxruntime and (when installed) OpenVINO fp32 rows
    int8: bool = True  # INT8 rows beside them: OpenVINO (NNCF) and onnxruntime's static quantization
    calibration: int = 32  # synthetic scenes the INT8 rows are calibrated on
    compiled_runtime: bool = True  # torch.compile (freezing, cpp_wrapper) row among the runtimes
    contended: bool = False  # time the runtimes again with one core busy
    detector: bool = True
    detector_runtimes: bool = False  # whole RetinaNet / Faster R-CNN in eager, onnxruntime and OpenVINO
    checkpointing: bool = True
    checkpointing_case: ImageSize = ImageSize(512, 512, 1)
    force_bf16: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calibration < 1:
            raise ValueError(f"calibration must be >= 1 scene, got {self.calibration}")
        for name, allowed in (("tasks", TASKS), ("dtypes", DTYPES), ("modes", MODES)):
            bad = [value for value in getattr(self, name) if value not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {getattr(self, name)!r}")
        if self.iterations < 1 or self.warmup < 0:
            raise ValueError(f"iterations must be >= 1 and warmup >= 0, got {self.iterations} and {self.warmup}")


def settings_from(**overrides: Any) -> BenchmarkSettings:
    """``BenchmarkSettings`` with the given fields replaced (unknown names raise ``TypeError``)."""
    return dataclasses.replace(BenchmarkSettings(), **overrides)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _build_pair(variant: str, device: torch.device, compare_timm: bool, seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    ours = create_model(f"pvt_v2_{variant}")
    models: dict[str, nn.Module] = {"ours": ours}
    if compare_timm:
        import timm

        reference = timm.create_model(f"pvt_v2_{variant}", pretrained=False)
        load_weights(ours, reference.state_dict())
        models["timm"] = reference
    return {name: model.to(device) for name, model in models.items()}


def check_same_outputs(models: dict[str, nn.Module], images: Tensor, *, atol: float = 1e-5) -> float:
    """Max |ours - timm| over the logits in eval mode; raises ``AssertionError`` above ``atol``."""
    if "timm" not in models:
        return 0.0
    with torch.inference_mode():
        ours, reference = (models[name].eval()(images) for name in ("ours", "timm"))
    diff = (ours - reference).abs().max().item()
    if diff > atol:
        raise AssertionError(f"ours and timm differ by {diff:.3g} > {atol} with the same weights; not timing")
    return diff


def _bf16_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_bf16_kernels()


def run_benchmark(settings: BenchmarkSettings, *, log: Callable[[str], None] = print) -> Report:
    """Run everything ``settings`` selects and return the report (see the module docstring for the method)."""
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {settings.device!r} requested but CUDA is not available")
    peak = matmul_peak_gflops(device)
    report = Report(
        machine=machine_info(settings.device),
        settings=_jsonable(dataclasses.asdict(settings)),
        matmul_peak_gflops=peak,
    )
    log(f"machine: {report.machine}; fp32 matmul peak {peak:.1f} GFLOP/s")
    models = _build_pair(settings.variant, device, settings.compare_timm, settings.seed)
    build = functools.partial(create_model, f"pvt_v2_{settings.variant}")
    torch.manual_seed(settings.seed)
    for case in sorted({*settings.cases, *(settings.train_cases or ())}, key=lambda c: (c.height * c.width, c.batch)):
        _measure_case(report, models, case, build, settings, device, log)
    if settings.onnx:
        _measure_onnx(report, models["ours"], settings, device, log)
    if settings.checkpointing:
        _measure_checkpointing(report, settings, device, log)
    if settings.detector:
        _measure_detector(report, settings, device, log)
    if settings.detector_runtimes:
        rows, notes = measure_detector_runtimes(
            settings.variant,
            iterations=max(1, settings.iterations // 2),
            warmup=settings.warmup,
            threads=torch.get_num_threads(),
            log=log,
        )
        report.measurements.extend(rows)
        report.notes.extend(notes)
    return report


def _measure_case(
    report: Report,
    models: dict[str, nn.Module],
    case: ImageSize,
    build: Callable[[], nn.Module],
    settings: BenchmarkSettings,
    device: torch.device,
    log: Callable[[str], None],
) -> None:
    """Every task, dtype and mode ``settings`` selects for one input geometry."""
    images = torch.randn(case.batch, 3, case.height, case.width, device=device)
    if "timm" in models:
        diff = check_same_outputs(models, images)
        report.notes.append(f"{case}: max |ours - timm| logits = {diff:.2e} (fp32, same weights)")
    for task in settings.tasks:
        task_cases = settings.cases if task == "inference" else (settings.train_cases or settings.cases)
        if case not in task_cases:
            continue
        gflop = count_gflop(build, case, task)
        for dtype in settings.dtypes:
            if dtype == "bf16" and not (settings.force_bf16 or _bf16_available(device)):
                note = "skipped: no native bf16 matmul kernels on this CPU (oneDNN bf16 unsupported)"
                for name in models:
                    skipped = Measurement(name, settings.variant, task, dtype, "-", str(case), note=note)
                    report.measurements.append(skipped)
                continue
            for mode in settings.modes:
                _measure(report, models, images, case, task, dtype, mode, gflop, settings, device, log)


def _measure(
    report: Report,
    models: dict[str, nn.Module],
    images: Tensor,
    case: ImageSize,
    task: str,
    dtype: str,
    mode: str,
    gflop: float,
    settings: BenchmarkSettings,
    device: torch.device,
    log: Callable[[str], None],
) -> None:
    runnable = {name: (torch.compile(model) if mode == "compile" else model) for name, model in models.items()}
    steps = {name: make_step(model, images, task, dtype) for name, model in runnable.items()}
    notes = {}
    if mode == "compile":  # the first call compiles; keep its time out of the warm-up count
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            notes[name] = f"{name}: compile+first step {time.perf_counter() - start:.0f} s"
    memory = {}
    for name, step in steps.items():
        if PeakMemory.supported(device):
            with PeakMemory(device) as peak:
                step()
            memory[name] = peak.mib
    times = time_interleaved(steps, iterations=settings.iterations, warmup=settings.warmup, device=device)
    for name in models:
        m = Measurement(name, settings.variant, task, dtype, mode, str(case), times[name], gflop, memory.get(name))
        m.note = notes.get(name, "")
        report.measurements.append(m)
        log(
            f"{name:5s} {task:9s} {dtype} {mode:7s} {case}: median {m.median_s * 1e3:.0f} ms, "
            f"{m.images_per_s(case.batch):.2f} img/s, peak mem {m.peak_memory_mib or 0:.0f} MiB"
        )
    if mode == "compile":
        torch._dynamo.reset()


def _measure_onnx(
    report: Report,
    model: nn.Module,
    settings: BenchmarkSettings,
    device: torch.device,
    log: Callable[[str], None],
) -> None:
    """Our backbone (the classifier's weights) in eager fp32/bf16, beside timm's and in onnxruntime and OpenVINO
    (fp32, bf16, INT8) on CPU at every inference case (see :mod:`benchmarks.runtimes`)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        report.notes.append("ONNX: skipped (onnxruntime not installed)")
        return
    runtime_settings = RuntimeSettings(
        int8=settings.int8,
        calibration=settings.calibration,
        contended=settings.contended,
        threads=torch.get_num_threads(),
        timm_peer=settings.compare_timm,
        compiled=settings.compiled_runtime,
    )
    rows, notes = measure_runtimes(
        model.cpu(),
        settings.cases,
        variant=settings.variant,
        iterations=settings.iterations,
        warmup=settings.warmup,
        settings=runtime_settings,
        log=log,
    )
    report.measurements.extend(rows)
    report.notes.extend(notes)
    model.to(device)


def _measure_checkpointing(
    report: Report, settings: BenchmarkSettings, device: torch.device, log: Callable[[str], None]
) -> None:
    """Training-step peak memory and time of our model with and without gradient checkpointing.

    Each setting runs in a fresh process (``spawn``): the RSS peak of a process that has already run other models
    depends on what its heap holds, which made the in-process figures swing by 100+ MiB between runs.
    """
    if not PeakMemory.supported(device):
        report.notes.append("checkpointing: skipped (peak memory not measurable on this platform)")
        return
    case = settings.checkpointing_case
    iterations = max(1, settings.iterations // 2)
    for enabled in (False, True):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            peak_mib, times = pool.submit(
                checkpointing_step,
                settings.variant,
                case,
                enabled=enabled,
                iterations=iterations,
                device=str(device),
                num_threads=torch.get_num_threads(),
                seed=settings.seed,
            ).result()
        mode = "checkpointing" if enabled else "no checkpointing"
        m = Measurement("ours", settings.variant, "train", "fp32", mode, str(case), times, None, peak_mib)
        report.measurements.append(m)
        log(f"grad checkpointing={enabled}: peak memory {peak_mib:.0f} MiB, median {m.median_s:.2f} s")


def checkpointing_step(
    variant: str, case: ImageSize, *, enabled: bool, iterations: int, device: str, num_threads: int, seed: int
) -> tuple[float, list[float]]:
    """Peak memory (MiB, see :class:`PeakMemory`) and times (s) of our classifier's training step in this process."""
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    target = torch.device(device)
    model = create_model(f"pvt_v2_{variant}", grad_checkpointing=enabled).to(target)
    step = make_step(model, torch.randn(case.batch, 3, case.height, case.width, device=target), "train", "fp32")
    step()
    with PeakMemory(target) as peak:
        step()
    times = time_interleaved({"step": step}, iterations=iterations, warmup=0, device=target)["step"]
    return float(peak.mib or 0.0), times


def _measure_detector(report: Report, settings: BenchmarkSettings, device: torch.device, log: Callable) -> None:
    """Faster R-CNN + FPN at 800x1333: our backbone vs torchvision's ResNet-50, random weights, eval, batch 1."""
    torch.manual_seed(settings.seed)
    ours = f"fasterrcnn_pvt_v2_{settings.variant}_fpn"
    detectors = {
        ours: create_model(ours, num_classes=91),
        "fasterrcnn_resnet50_fpn": fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91),
    }
    image = [torch.rand(3, 800, 1333, device=device)]
    steps = {}
    for name, detector in detectors.items():
        detector.to(device).eval()

        def step(detector: nn.Module = detector) -> None:
            with torch.inference_mode():
                detector(image)

        steps[name] = step
    times = time_interleaved(steps, iterations=max(1, settings.iterations // 2), warmup=1, device=device)
    for name, detector in detectors.items():
        params = sum(p.numel() for p in detector.parameters())
        m = Measurement(name, "detector", "inference", "fp32", "eager", "800x1333 b1", times[name])
        m.note = f"{params / 1e6:.1f}M parameters"
        report.measurements.append(m)
        log(f"{name}: {m.images_per_s(1):.3f} img/s, {m.note}")
