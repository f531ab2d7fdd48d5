"""This project's performance targets, checked against a measured report (they are not library code)."""

from __future__ import annotations

from collections.abc import Sequence

from .harness import Report

__all__ = ["summarize_targets"]


def summarize_targets(report: Report, cases: Sequence[str] = ("512x512 b1", "800x1333 b1", "224x224 b8")) -> list[str]:
    """The project's performance targets as lines of text, computed from the report (no claim without a measurement)."""
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
    return lines + _deployment_targets(report)


def _median(index: dict, impl: str, dtype: str, mode: str, case: str) -> float | None:
    m = index.get((impl, "inference", dtype, mode, case))
    return m.median_s if m else None


def _deployment_targets(report: Report) -> list[str]:
    """The runtime rows' targets: INT8 >= 1.5x eager fp32 at 512x512, eager ahead of the fp32 runtimes at every case
    (OpenVINO on the dynamic export onnxruntime runs and at the case's static shape), and eager >= 1.3x timm with
    one core busy. Where the compiled row exists, its speed relative to static OpenVINO fp32 too."""
    index = {(m.impl, m.task, m.dtype, m.mode, m.case): m for m in report.measurements}
    cases = sorted({m.case for m in report.measurements if m.impl == "ours-eager"}, key=_pixels)
    lines = []
    eager = _median(index, "ours-eager", "fp32", "eager", "512x512 b1")
    for runtime, dtype in (("openvino", "int8"), ("onnxruntime", "int8"), ("openvino", "bf16")):
        fast = _median(index, f"ours-{runtime}", dtype, runtime, "512x512 b1")
        if eager and fast:
            name = "OpenVINO" if runtime == "openvino" else runtime
            lines.append(f"{name} {dtype} at 512x512 b1: {eager / fast:.2f}x our eager fp32 (target >= 1.5x)")
    for case in cases:
        ours = _median(index, "ours-eager", "fp32", "eager", case)
        for runtime in ("openvino", "openvino-dynamic", "onnxruntime"):
            other = _median(index, f"ours-{runtime}", "fp32", runtime, case)
            if ours and other:
                lines.append(f"our eager fp32 at {case}: {other / ours:.2f}x the speed of {runtime} fp32 (target > 1x)")
        compiled, static = (_median(index, f"ours-{r}", "fp32", r, case) for r in ("compiled", "openvino"))
        if compiled and static:
            lines.append(f"torch.compile fp32 at {case}: {static / compiled:.2f}x the speed of openvino fp32")
        busy, peer = (_median(index, impl, "fp32", "eager contended", case) for impl in ("ours-eager", "timm-features"))
        if busy and peer:
            lines.append(f"one core busy, eager fp32 at {case}: {peer / busy:.2f}x timm (target >= 1.3x)")
    return lines


def _pixels(case: str) -> tuple[int, int]:
    size, batch = case.split()
    height, width = (int(side) for side in size.split("x"))
    return height * width, int(batch.removeprefix("b"))
