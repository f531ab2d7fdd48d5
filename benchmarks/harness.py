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

import contextlib
import dataclasses
import gc
import json
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "Case",
    "Measurement",
    "Report",
    "BenchmarkSettings",
    "parse_case",
    "machine_info",
    "matmul_peak_gflops",
    "PeakMemory",
    "time_interleaved",
    "run_benchmark",
    "to_markdown",
    "to_json",
    "plot_throughput",
]

TASKS = ("inference", "train")
DTYPES = ("fp32", "bf16")
MODES = ("eager", "compile")


@dataclass(frozen=True)
class Case:
    """One input geometry: ``batch`` images of ``height`` x ``width``."""

    height: int
    width: int
    batch: int

    def __str__(self) -> str:
        return f"{self.height}x{self.width} b{self.batch}"


def parse_case(text: str) -> Case:
    """``"512x512:1"`` or ``"224x224"`` (batch 1) -> ``Case``; ``ValueError`` naming the accepted form otherwise."""
    size, _, batch = text.strip().partition(":")
    height, _, width = size.partition("x")
    try:
        case = Case(int(height), int(width), int(batch or 1))
    except ValueError:
        raise ValueError(f"size {text!r} is not of the form HEIGHTxWIDTH[:BATCH], e.g. 800x1333:1") from None
    if min(case.height, case.width, case.batch) < 1:
        raise ValueError(f"size {text!r} must have positive height, width and batch")
    return case


@dataclass
class Measurement:
    """One implementation on one case/task/dtype/mode. Times in seconds; memory in MiB."""

    impl: str
    model: str
    task: str
    dtype: str
    mode: str
    case: str
    times: list[float] = field(default_factory=list)
    gflop: float | None = None
    peak_memory_mib: float | None = None
    note: str = ""

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def images_per_s(self, batch: int) -> float | None:
        median = self.median_s
        return batch / median if median else None

    def gflops_per_s(self) -> float | None:
        median = self.median_s
        return self.gflop / median if median and self.gflop else None


@dataclass
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    matmul_peak_gflops: float
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BenchmarkSettings:
    """What to run; the defaults are the issue's full matrix minus torch.compile (slow to compile on 2 cores)."""

    variant: str = "b2"
    cases: tuple[Case, ...] = (Case(224, 224, 1), Case(224, 224, 8), Case(512, 512, 1), Case(800, 1333, 1))
    train_cases: tuple[Case, ...] | None = None  # None: same as ``cases``
    tasks: tuple[str, ...] = TASKS
    dtypes: tuple[str, ...] = DTYPES
    modes: tuple[str, ...] = ("eager",)
    iterations: int = 5
    warmup: int = 1
    device: str = "cpu"
    compare_timm: bool = True
    onnx: bool = True
    detector: bool = True
    checkpointing: bool = True
    checkpointing_case: Case = Case(512, 512, 1)
    force_bf16: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("tasks", TASKS), ("dtypes", DTYPES), ("modes", MODES)):
            bad = [value for value in getattr(self, name) if value not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {getattr(self, name)!r}")
        if self.iterations < 1 or self.warmup < 0:
            raise ValueError(f"iterations must be >= 1 and warmup >= 0, got {self.iterations} and {self.warmup}")


# -- machine --------------------------------------------------------------------------------------------------------
def machine_info(device: str) -> dict[str, Any]:
    """CPU model, core count, torch version, threads and (on CUDA) the GPU name."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_bf16_kernels": bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }
    with contextlib.suppress(ImportError):
        import timm

        info["timm"] = timm.__version__
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(
    device: str | torch.device = "cpu", *, size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32
) -> float:
    """Best GEMM throughput of ``size``^3 over ``repeats`` runs: the roofline the model runs are compared with (fp32).

    >>> matmul_peak_gflops(size=256, repeats=1) > 0
    True
    """
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


class PeakMemory:
    """How far a block raises memory above its level at entry: CUDA max allocated, or on Linux the process's peak RSS
    (``VmHWM``, reset first). Weights already resident (both models', when they share the device) are not counted.

    ``PeakMemory.supported(device)`` says whether it can measure; ``with PeakMemory(device) as peak: ...`` then
    ``peak.mib``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None  # peak during the block, above the level at entry
        self.baseline_mib = 0.0

    @staticmethod
    def supported(device: torch.device) -> bool:
        if device.type == "cuda":
            return True
        return Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()

    def __enter__(self) -> PeakMemory:
        gc.collect()
        _release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mib = torch.cuda.memory_allocated(self.device) / 2**20
        elif self.supported(self.device):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.baseline_mib = _current_memory_mib(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.baseline_mib
        elif self.supported(self.device):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.mib = int(line.split()[1]) / 1024 - self.baseline_mib
                    break


def _release_free_heap() -> None:
    """Hand memory freed by earlier steps back to the OS (glibc ``malloc_trim``), so RSS growth is this step's own."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


# -- steps ----------------------------------------------------------------------------------------------------------
def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(model: nn.Module, images: Tensor, task: str, dtype: str) -> Callable[[], None]:
    """A closure running one inference forward (``torch.inference_mode``) or one training forward + backward."""
    device = images.device
    if task == "inference":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), _autocast(device, dtype):
                model(images)

        return infer
    model.train()
    labels = torch.randint(0, 1000, (images.shape[0],), device=device)

    def train() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            logits = model(images)
        nn.functional.cross_entropy(logits.float(), labels).backward()

    return train


def time_interleaved(
    steps: dict[str, Callable[[], None]], *, iterations: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Warm every step up, then run them round-robin ``iterations`` times, reversing the order every round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for round_index in range(iterations):
        for name in order if round_index % 2 == 0 else reversed(order):
            _synchronize(device)
            start = time.perf_counter()
            steps[name]()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def count_gflop(build: Callable[[], nn.Module], case: Case, task: str) -> float:
    """FLOPs (2 per multiply-add) of one step, counted on the meta device, in GFLOP.

    A training step is estimated as 3x the forward (backward ~ 2x forward): counting the backward on the meta device
    gave implausible totals (about 19x the forward), so it is not used.
    """
    with torch.device("meta"):
        model = build().eval()
        images = torch.empty(case.batch, 3, case.height, case.width)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    forward = counter.get_total_flops() / 1e9
    return forward if task == "inference" else 3 * forward


# -- the run --------------------------------------------------------------------------------------------------------
def _build_pair(variant: str, device: torch.device, compare_timm: bool, seed: int) -> dict[str, nn.Module]:
    from pvt_backbone import classifier
    from pvt_backbone.weights import load_weights

    torch.manual_seed(seed)
    ours = getattr(classifier, f"pvt_v2_{variant}")()
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
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


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
    from pvt_backbone import classifier

    build = getattr(classifier, f"pvt_v2_{settings.variant}")
    torch.manual_seed(settings.seed)
    for case in sorted({*settings.cases, *(settings.train_cases or ())}, key=lambda c: (c.height * c.width, c.batch)):
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
                        report.measurements.append(
                            Measurement(name, settings.variant, task, dtype, "-", str(case), note=note)
                        )
                    continue
                for mode in settings.modes:
                    _measure(report, models, images, case, task, dtype, mode, gflop, settings, device, log)
    if settings.onnx:
        _measure_onnx(report, models["ours"], settings, device, build, log)
    if settings.checkpointing:
        _measure_checkpointing(report, settings, device, log)
    if settings.detector:
        _measure_detector(report, settings, device, log)
    return report


def _measure(
    report: Report,
    models: dict[str, nn.Module],
    images: Tensor,
    case: Case,
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
    build: Callable[[], nn.Module],
    log: Callable[[str], None],
) -> None:
    """Our classifier exported once (dynamic batch/H/W) and run by onnxruntime on CPU at every inference case."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        report.notes.append("ONNX: skipped (onnxruntime not installed)")
        return
    import tempfile

    from pvt_backbone.export import export_onnx, onnxruntime_session

    if settings.variant == "b2_li":
        report.notes.append("ONNX: skipped for b2_li (adaptive pooling needs one fixed size per export)")
        return
    cpu_model = model.to("cpu").eval()
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        path = export_onnx(cpu_model, torch.randn(1, 3, 224, 224), Path(directory) / "model.onnx")
        report.notes.append(f"ONNX: exported once with dynamic batch/H/W in {time.perf_counter() - start:.0f} s")
        session = onnxruntime_session(path, threads=torch.get_num_threads())
        input_name = session.get_inputs()[0].name
        for case in settings.cases:
            images = torch.randn(case.batch, 3, case.height, case.width)
            feed = {input_name: images.numpy()}
            with torch.inference_mode():
                diff = abs(session.run(None, feed)[0] - cpu_model(images).numpy()).max()
            times = time_interleaved(
                {"onnxruntime": lambda feed=feed: session.run(None, feed)},
                iterations=settings.iterations,
                warmup=settings.warmup,
                device=torch.device("cpu"),
            )
            gflop = count_gflop(build, case, "inference")
            m = Measurement(
                "ours-onnxruntime",
                settings.variant,
                "inference",
                "fp32",
                "onnx",
                str(case),
                times["onnxruntime"],
                gflop,
            )
            m.note = f"max |ORT - eager| {diff:.1e}"
            report.measurements.append(m)
            log(f"onnxruntime {case}: median {m.median_s * 1e3:.0f} ms ({m.note})")
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
    variant: str, case: Case, *, enabled: bool, iterations: int, device: str, num_threads: int, seed: int
) -> tuple[float, list[float]]:
    """Peak memory (MiB, see :class:`PeakMemory`) and times (s) of our classifier's training step in this process."""
    from pvt_backbone import classifier

    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    target = torch.device(device)
    model = getattr(classifier, f"pvt_v2_{variant}")(grad_checkpointing=enabled).to(target)
    step = make_step(model, torch.randn(case.batch, 3, case.height, case.width, device=target), "train", "fp32")
    step()
    with PeakMemory(target) as peak:
        step()
    times = time_interleaved({"step": step}, iterations=iterations, warmup=0, device=target)["step"]
    return float(peak.mib or 0.0), times


def _current_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _measure_detector(report: Report, settings: BenchmarkSettings, device: torch.device, log: Callable) -> None:
    """Faster R-CNN + FPN at 800x1333: our backbone vs torchvision's ResNet-50, random weights, eval, batch 1."""
    try:
        from pvt_backbone.detection import fasterrcnn_pvt_v2_fpn
    except ImportError:
        report.notes.append("detector: skipped (pvt_backbone.detection not available)")
        return
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(settings.seed)
    detectors = {
        f"fasterrcnn_pvt_v2_{settings.variant}_fpn": fasterrcnn_pvt_v2_fpn(settings.variant, num_classes=91),
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


# -- rendering ------------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _batch_of(case: str) -> int:
    return int(case.rsplit("b", 1)[1]) if " b" in case else 1


def to_json(report: Report) -> str:
    rows = []
    for m in report.measurements:
        row = dataclasses.asdict(m)
        row.update(
            median_s=m.median_s,
            images_per_s=m.images_per_s(_batch_of(m.case)),
            gflops_per_s=m.gflops_per_s(),
            # the peak is fp32's, so only fp32 rows get a fraction
            fraction_of_matmul_peak=(m.gflops_per_s() or 0) / report.matmul_peak_gflops
            if m.gflops_per_s() and m.dtype == "fp32"
            else None,
        )
        rows.append(row)
    payload = {
        "machine": report.machine,
        "settings": report.settings,
        "matmul_peak_gflops": report.matmul_peak_gflops,
        "measurements": rows,
        "notes": report.notes,
    }
    return json.dumps(payload, indent=2)


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def to_markdown(report: Report) -> str:
    """One row per (task, dtype, mode, case): ours, timm, speed-up (timm median / ours median), GFLOP/s, memory."""
    peak = report.matmul_peak_gflops
    lines = [
        f"Machine: {report.machine.get('cpu')}, {report.machine.get('cores')} cores, torch "
        f"{report.machine.get('torch')} ({report.machine.get('torch_threads')} threads)"
        + (f", GPU {report.machine['gpu']}" if "gpu" in report.machine else "")
        + f"; measured fp32 matmul peak {peak:.0f} GFLOP/s.",
        "",
        "| task | dtype | mode | input | ours img/s | timm img/s | speed-up | ours GFLOP/s (of peak) | "
        "peak mem ours / timm (MiB) | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    grouped: dict[tuple, dict[str, Measurement]] = {}
    for m in report.measurements:
        if m.impl in ("ours", "timm") and m.model != "detector" and "checkpointing" not in m.mode:
            grouped.setdefault((m.task, m.dtype, m.mode, m.case), {})[m.impl] = m
    for (task, dtype, mode, case), pair in grouped.items():
        ours, timm = pair.get("ours"), pair.get("timm")
        batch = _batch_of(case)
        speedup = None
        if ours and timm and ours.median_s and timm.median_s:
            speedup = timm.median_s / ours.median_s
        rate = ours.gflops_per_s() if ours else None
        achieved = "-" if not rate else f"{rate:.0f} ({rate / peak:.0%})" if dtype == "fp32" else f"{rate:.0f}"
        memory = f"{_fmt(ours.peak_memory_mib if ours else None, '{:.0f}')} / " + _fmt(
            timm.peak_memory_mib if timm else None, "{:.0f}"
        )
        note = "; ".join(n for n in {(ours.note if ours else ""), (timm.note if timm else "")} if n)
        lines.append(
            f"| {task} | {dtype} | {mode} | {case} | {_fmt(ours.images_per_s(batch) if ours else None, '{:.2f}')} | "
            f"{_fmt(timm.images_per_s(batch) if timm else None, '{:.2f}')} | {_fmt(speedup, '{:.2f}x')} | {achieved} | "
            f"{memory} | {note} |"
        )
    others = [m for m in report.measurements if m.impl not in ("ours", "timm") or "checkpointing" in m.mode]
    if others:
        lines += ["", "| what | input | img/s | median (s) | peak mem (MiB) | note |", "|---|---|---:|---:|---:|---|"]
        for m in others:
            what = f"{m.impl} ({m.mode})" if m.model != "detector" else m.impl
            lines.append(
                f"| {what} {m.task} {m.dtype} | {m.case} | {_fmt(m.images_per_s(_batch_of(m.case)), '{:.2f}')} | "
                f"{_fmt(m.median_s, '{:.3f}')} | {_fmt(m.peak_memory_mib, '{:.0f}')} | {m.note} |"
            )
    if report.notes:
        lines += [""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def plot_throughput(report: Report, path: str | os.PathLike[str], *, task: str = "inference") -> Path | None:
    """PNG of fp32 eager throughput (images/s) vs input megapixels at batch 1, ours vs timm (and ONNX Runtime).

    Returns ``None`` without matplotlib (install the ``bench`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series: dict[str, list[tuple[float, float, str]]] = {}
    for m in report.measurements:
        if m.task != task or m.dtype != "fp32" or m.mode not in ("eager", "onnx") or _batch_of(m.case) != 1:
            continue
        if m.model == "detector" or not m.median_s:
            continue
        height, width = (int(v) for v in m.case.split()[0].split("x"))
        label = {"ours": "pvt_backbone (eager)", "timm": "timm (eager)"}.get(m.impl, "pvt_backbone (ONNX Runtime)")
        series.setdefault(label, []).append((height * width / 1e6, 1 / m.median_s, m.case.split()[0]))
    if not series:
        return None
    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, points in series.items():
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        if label.startswith("pvt_backbone (eager"):
            for x, y, name in points:
                axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("input megapixels (batch 1)")
    axis.set_ylabel("images / s")
    axis.set_title(f"PVTv2-{report.settings.get('variant')} {task}, fp32, {report.machine.get('cpu')}", fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp.png")
    figure.savefig(temporary)
    plt.close(figure)
    os.replace(temporary, target)
    return target


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None``: leave it)."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def settings_from(**overrides: Any) -> BenchmarkSettings:
    """``BenchmarkSettings`` with the given fields replaced (unknown names raise ``TypeError``)."""
    return dataclasses.replace(BenchmarkSettings(), **overrides)


def summarize_targets(report: Report, cases: Sequence[str] = ("512x512 b1", "800x1333 b1", "224x224 b8")) -> list[str]:
    """The issue's targets as lines of text, computed from the report (no claims without a measurement)."""
    lines = []
    index = {(m.impl, m.task, m.dtype, m.mode, m.case): m for m in report.measurements}
    for case in cases:
        ours, timm = (
            index.get(("ours", "inference", "fp32", "eager", case)),
            index.get(("timm", "inference", "fp32", "eager", case)),
        )
        if ours and timm and ours.median_s and timm.median_s:
            lines.append(f"fp32 inference {case}: {timm.median_s / ours.median_s:.2f}x timm (target >= 1.3x)")
    for case in cases:
        ours_bf16, timm = (
            index.get(("ours", "inference", "bf16", "eager", case)),
            index.get(("timm", "inference", "fp32", "eager", case)),
        )
        if ours_bf16 and timm and ours_bf16.median_s and timm.median_s:
            lines.append(f"bf16 inference {case}: {timm.median_s / ours_bf16.median_s:.2f}x timm fp32 (target >= 2x)")
    ours, timm = (
        index.get(("ours", "train", "fp32", "eager", "512x512 b1")),
        index.get(("timm", "train", "fp32", "eager", "512x512 b1")),
    )
    if ours and timm and ours.median_s and timm.median_s:
        lines.append(f"training step 512x512 b1: {timm.median_s / ours.median_s:.2f}x timm (target >= 1.15x)")
    plain = [m for m in report.measurements if m.mode == "no checkpointing"]
    checkpointed = [m for m in report.measurements if m.mode == "checkpointing"]
    if plain and checkpointed and plain[0].peak_memory_mib and checkpointed[0].peak_memory_mib:
        ratio = checkpointed[0].peak_memory_mib / plain[0].peak_memory_mib
        lines.append(
            f"training step {plain[0].case} with grad checkpointing: peak memory {checkpointed[0].peak_memory_mib:.0f} "
            f"vs {plain[0].peak_memory_mib:.0f} MiB without ({ratio:.2f}x; target <= 0.5x)"
        )
    return lines
