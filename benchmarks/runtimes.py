"""Deployment runtimes timed beside each other: onnxruntime fp32, OpenVINO fp32 and OpenVINO INT8 (NNCF) of the
same classifier (same weights as the eager rows), each checked against the eager logits before any timing
(fp32: max |diff| <= 1e-4; INT8: logit cosine similarity, reported), then timed interleaved. With ``contended``
every runtime is timed a second time while a busy-loop child process pinned to one core competes for the CPU, and
the note gives the contended / quiet median ratio.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from pvt_backbone.cli.arguments import ImageSize
from pvt_backbone.export import export_onnx, onnxruntime_session

from .measure import Measurement, count_gflop, time_interleaved

__all__ = ["FP32_ATOL", "busy_core", "runtime_steps", "measure_runtimes"]

FP32_ATOL = 1e-4
Step = Callable[[], None]


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


def _int8_model(onnx_path: Path, case: ImageSize) -> object:
    from pvt_backbone.export_openvino import calibration_images, convert_openvino, quantize_openvino
    from pvt_backbone.training.evaluation import normalize_images

    images = calibration_images("synthetic", 8, (case.height, case.width))
    return quantize_openvino(convert_openvino(onnx_path), images, preprocess=normalize_images)


def runtime_steps(
    onnx_path: Path, model: nn.Module, images: Tensor, *, int8: bool, threads: int
) -> tuple[dict[str, Step], dict[str, str]]:
    """One step per available runtime on ``images`` and a note each (checked against eager ``model`` first).

    Raises ``AssertionError`` when an fp32 runtime differs from eager by more than ``FP32_ATOL``.
    """
    with torch.inference_mode():
        expected = model(images)
    session = onnxruntime_session(onnx_path, threads=threads)
    feed = {session.get_inputs()[0].name: images.numpy()}
    def eager() -> Tensor:
        with torch.inference_mode():
            return model(images)

    # eager is timed in the same interleaved rounds as the runtimes (and beside them under --contended)
    outputs = {"eager fp32": eager, "onnxruntime fp32": lambda: torch.from_numpy(session.run(None, feed)[0])}
    try:
        from pvt_backbone.export_openvino import compile_openvino, convert_openvino, run_openvino
    except ImportError:  # pragma: no cover - openvino is optional
        compile_openvino = None
    if compile_openvino is not None:
        fp32 = compile_openvino(convert_openvino(onnx_path), threads=threads)
        outputs["openvino fp32"] = lambda: run_openvino(fp32, images)[0]
        if int8:
            quantized = compile_openvino(
                _int8_model(onnx_path, ImageSize(*images.shape[-2:], images.shape[0])), threads=threads
            )
            outputs["openvino int8"] = lambda: run_openvino(quantized, images)[0]
    notes = {}
    for name, run in outputs.items():
        if name == "eager fp32":
            notes[name] = "the reference"
            continue
        got = run().float()
        if name.endswith("int8"):
            cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
            notes[name] = f"logit cosine vs eager fp32 {cosine:.4f}"
            continue
        diff = (got - expected).abs().max().item()
        if diff > FP32_ATOL:
            raise AssertionError(f"{name} differs from eager by {diff:.3g} > {FP32_ATOL}; not timing")
        notes[name] = f"max abs diff vs eager {diff:.1e}"
    return {name: _discarding(run) for name, run in outputs.items()}, notes


def _discarding(run: Callable[[], Tensor]) -> Step:
    def step() -> None:
        run()

    return step


def measure_runtimes(
    model: nn.Module,
    cases: tuple[ImageSize, ...],
    *,
    variant: str,
    iterations: int,
    warmup: int,
    int8: bool,
    contended: bool,
    build: Callable[[], nn.Module],
    log: Callable[[str], None],
) -> tuple[list[Measurement], list[str]]:
    """Rows for every runtime at every case (see the module docstring) and notes for the report."""
    cpu_model = model.to("cpu").eval()
    rows: list[Measurement] = []
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        path = export_onnx(cpu_model, torch.randn(1, 3, 224, 224), Path(directory) / "model.onnx")
        notes = [f"ONNX: exported once with dynamic batch/H/W in {time.perf_counter() - start:.0f} s"]
        for case in cases:
            images = torch.randn(case.batch, 3, case.height, case.width)
            steps, step_notes = runtime_steps(path, cpu_model, images, int8=int8, threads=torch.get_num_threads())
            gflop = count_gflop(build, case, "inference")
            quiet = time_interleaved(steps, iterations=iterations, warmup=warmup, device=torch.device("cpu"))
            busy = {}
            if contended:
                with busy_core(0):
                    busy = time_interleaved(steps, iterations=iterations, warmup=warmup, device=torch.device("cpu"))
            for name in steps:
                runtime, dtype = name.split()
                m = Measurement(f"ours-{runtime}", variant, "inference", dtype, runtime, str(case), quiet[name], gflop)
                m.note = step_notes[name]
                rows.append(m)
                if busy:
                    c = Measurement(
                        f"ours-{runtime}",
                        variant,
                        "inference",
                        dtype,
                        f"{runtime} contended",
                        str(case),
                        busy[name],
                        gflop,
                    )
                    c.note = f"one core busy: {c.median_s / m.median_s:.2f}x the quiet median"
                    rows.append(c)
                log(f"{name} {case}: median {m.median_s * 1e3:.1f} ms ({m.note})")
    return rows, notes
