"""Measuring one step: machine facts, the matmul roofline, peak memory, interleaved timing, FLOP counts."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pvt_backbone.amp import autocast
from pvt_backbone.cli.arguments import ImageSize
from pvt_backbone.flops import count_macs

__all__ = [
    "Measurement",
    "cpu_bf16_kernels",
    "machine_info",
    "matmul_peak_gflops",
    "PeakMemory",
    "make_step",
    "time_interleaved",
    "count_gflop",
    "threads",
]


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


def cpu_bf16_kernels() -> bool:
    """Whether oneDNN has native bf16 matmul kernels on this CPU (AVX512-BF16 / AMX); without, bf16 is emulated."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, core count, torch version, threads, OpenMP settings from the environment and (on CUDA) the GPU."""
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
        "cpu_bf16_kernels": cpu_bf16_kernels(),
    }
    # thread-pool settings change how the runtimes share cores with other processes (README, "Runtimes")
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
        if name in os.environ:
            info[name] = os.environ[name]
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
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _current_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_step(model: nn.Module, images: Tensor, task: str, dtype: str) -> Callable[[], None]:
    """A closure running one inference forward (``torch.inference_mode``) or one training forward + backward."""
    device = images.device
    if task == "inference":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast(device, enabled=dtype == "bf16", dtype=torch.bfloat16):
                model(images)

        return infer
    model.train()
    labels = torch.randint(0, 1000, (images.shape[0],), device=device)

    def train() -> None:
        model.zero_grad(set_to_none=True)
        with autocast(device, enabled=dtype == "bf16", dtype=torch.bfloat16):
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


def count_gflop(build: Callable[[], nn.Module], case: ImageSize, task: str) -> float:
    """FLOPs (2 per multiply-add) of one step in GFLOP, from :func:`pvt_backbone.flops.count_macs` (meta device).

    A training step is estimated as 3x the forward (backward ~ 2x forward): counting the backward on the meta device
    gave implausible totals (about 19x the forward), so it is not used.
    """
    forward = 2 * count_macs(build, case.height, case.width, batch=case.batch) / 1e9
    return forward if task == "inference" else 3 * forward


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
