"""Rendering a benchmark report: JSON, a Markdown table of ratios, and a throughput plot."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from pvt_backbone.weights.io import atomic_write

from .harness import Report
from .measure import Measurement

__all__ = ["to_json", "to_markdown", "plot_throughput"]


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
        + "".join(f", {k}={report.machine[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in report.machine)
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
            what = f"{m.impl} ({m.mode})" if m.model != "detector" or m.mode != "eager" else m.impl
            lines.append(
                f"| {what} {m.task} {m.dtype} | {m.case} | {_fmt(m.images_per_s(_batch_of(m.case)), '{:.2f}')} | "
                f"{_fmt(m.median_s, '{:.3f}')} | {_fmt(m.peak_memory_mib, '{:.0f}')} | {m.note} |"
            )
    if report.notes:
        lines += [""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


# the runtime rows drawn in the plot; openvino-pinned is the same model as openvino fp32, and contended rows are not
_PLOTTED_MODES = ("eager", "compiled", "onnxruntime", "openvino-dynamic", "openvino")


def _series(report: Report, task: str) -> dict[str, list[tuple[float, float, str]]]:
    """(megapixels, images/s, size) per line of the plot: the runtime rows (backbone) when the report has them,
    else the fp32 eager classifiers, ours and timm; batch 1, quiet runs only."""
    runtime_rows = [m for m in report.measurements if m.impl.startswith(("ours-", "timm-"))]
    rows = runtime_rows or [m for m in report.measurements if m.impl in ("ours", "timm") and m.dtype == "fp32"]
    series: dict[str, list[tuple[float, float, str]]] = {}
    for m in rows:
        if m.task != task or _batch_of(m.case) != 1 or m.model == "detector" or not m.median_s:
            continue
        if "contended" in m.mode or m.mode not in _PLOTTED_MODES:
            continue
        height, width = (int(v) for v in m.case.split()[0].split("x"))
        runtime = {
            "ours-eager": "pvt_backbone eager",
            "timm-features": "timm eager",
            "ours": "pvt_backbone eager",
            "timm": "timm eager",
        }.get(m.impl, m.impl.removeprefix("ours-"))
        series.setdefault(f"{runtime} {m.dtype}", []).append((height * width / 1e6, 1 / m.median_s, m.case.split()[0]))
    return series


def plot_throughput(report: Report, path: str | os.PathLike[str], *, task: str = "inference") -> Path | None:
    """PNG of throughput (images/s) vs input megapixels at batch 1: every runtime row (our backbone in eager fp32 and
    bf16, compiled, timm's, onnxruntime fp32/INT8, OpenVINO dynamic and fp32/bf16/INT8) when the report has them,
    else ours vs timm eager fp32.

    Returns ``None`` without matplotlib (install the ``bench`` extra).
    """
    try:
        from matplotlib.figure import Figure  # optional (bench extra); no pyplot, so no global backend change
    except ImportError:
        return None
    series = _series(report, task)
    if not series:
        return None
    figure = Figure(figsize=(6.4, 4.2), dpi=120)
    axis = figure.subplots()
    for label, points in series.items():
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        if label == "pvt_backbone eager fp32":
            for x, y, name in points:
                axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("input megapixels (batch 1)")
    axis.set_ylabel("images / s")
    axis.set_title(f"PVTv2-{report.settings.get('variant')} {task}, {report.machine.get('cpu')}", fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(target, lambda temp: figure.savefig(temp, format="png"))
