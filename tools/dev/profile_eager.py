"""Where our eager inference spends its time: torch.profiler's operator table for one backbone and input size.

    .venv/bin/python tools/dev/profile_eager.py [--variant b2] [--size 512x512] [--runs 3] [--rows 15] [--openvino]
        [--onnxruntime]

Prints the median time of a forward pass (inference mode, after warm-up) and the operators sorted by self CPU time
per pass, each with its share. ``--openvino`` adds the same model exported to ONNX, fixed to the input's shape and
run by OpenVINO fp32 with its per-layer counters (``PERF_COUNT``), summed per layer type; ``--onnxruntime`` the
dynamic-shape export in onnxruntime with its own profiler (``SessionOptions.enable_profiling``), summed per operator
type. Random weights; nothing is
downloaded. A diagnostic, not a benchmark: timing is for ``tools/benchmark.py``.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pvt_backbone import PVTv2Backbone
from pvt_backbone.cli.arguments import image_size_argument


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="b2")
    parser.add_argument("--size", type=image_size_argument, default=image_size_argument("512x512"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--openvino", action="store_true", help="also OpenVINO's per-layer times (static shape)")
    parser.add_argument("--onnxruntime", action="store_true", help="also onnxruntime's per-operator times (dynamic)")
    args = parser.parse_args()
    model = getattr(PVTv2Backbone, args.variant)().eval()
    x = torch.randn(args.size.batch, 3, args.size.height, args.size.width)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(args.runs):
                model(x)
    print(f"{args.variant} {args.size}: median {statistics.median(times) * 1e3:.1f} ms per pass")
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    for event in events[: args.rows]:
        per_pass = event.self_cpu_time_total / args.runs / 1e3
        share = event.self_cpu_time_total / total
        print(f"{event.key:55s} {per_pass:8.2f} ms {share:6.1%}  x{event.count // args.runs}")
    if args.openvino:
        _print_openvino_layers(model, x, args.runs, args.rows)
    if args.onnxruntime:
        _print_onnxruntime_operators(model, x, args.runs, args.rows)


def _print_onnxruntime_operators(model: torch.nn.Module, x: torch.Tensor, runs: int, rows: int) -> None:
    """onnxruntime fp32's kernel times for the dynamic-shape export of ``model`` at ``x``, per operator type."""
    import onnxruntime

    from pvt_backbone.export import export_onnx

    with tempfile.TemporaryDirectory() as directory:
        path = export_onnx(model, x, Path(directory) / "model.onnx")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(directory) / "profile")
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        session.run(None, feed)  # warm-up, left out of the sums below
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        events = json.loads(Path(session.end_profiling()).read_text())
    passes = [e for e in events if e.get("name") == "model_run"]
    timed_from = passes[1]["ts"] if len(passes) > 1 else 0  # microseconds; skips the warm-up pass
    totals: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= timed_from:
            totals[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
            counts[event["args"]["op_name"]] += 1
    print(f"\nonnxruntime fp32, dynamic shape: median {statistics.median(times) * 1e3:.1f} ms per pass")
    overall = sum(totals.values())
    for op_type, per_pass in totals.most_common(rows):
        print(f"{op_type:55s} {per_pass:8.2f} ms {per_pass / overall:6.1%}  x{counts[op_type] // runs}")


def _print_openvino_layers(model: torch.nn.Module, x: torch.Tensor, runs: int, rows: int) -> None:
    """OpenVINO fp32's per-layer counters for ``model`` at ``x``'s shape, summed per layer type, per pass."""
    import openvino

    from pvt_backbone.export import export_onnx
    from pvt_backbone.export_openvino import convert_openvino

    with tempfile.TemporaryDirectory() as directory:
        path = export_onnx(model, x, Path(directory) / "model.onnx")
        static = convert_openvino(path, shape=tuple(x.shape))
    # compile_openvino's settings (fp32, no pinning, torch's thread count) plus the per-layer counters
    config = {
        "PERF_COUNT": True,
        "INFERENCE_PRECISION_HINT": "f32",
        "ENABLE_CPU_PINNING": False,
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
    }
    request = openvino.Core().compile_model(static, "CPU", config).create_infer_request()
    totals: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    request.infer({0: x.numpy()})  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        request.infer({0: x.numpy()})
        times.append(time.perf_counter() - start)
        for layer in request.profiling_info:
            totals[layer.node_type] += layer.real_time.total_seconds() * 1e3 / runs
            counts[layer.node_type] += 1
    print(f"\nOpenVINO fp32, static shape: median {statistics.median(times) * 1e3:.1f} ms per pass")
    overall = sum(totals.values())
    for node_type, per_pass in totals.most_common(rows):
        print(f"{node_type:55s} {per_pass:8.2f} ms {per_pass / overall:6.1%}  x{counts[node_type] // runs}")


if __name__ == "__main__":
    main()
