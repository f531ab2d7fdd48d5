"""Where our eager inference spends its time: torch.profiler's operator table for one backbone and input size.

    .venv/bin/python tools/dev/profile_eager.py [--variant b2] [--size 512x512] [--runs 3] [--rows 15]

Prints the median time of a forward pass (inference mode, after warm-up) and the operators sorted by self CPU time
per pass, each with its share. Random weights; nothing is downloaded. A diagnostic, not a benchmark: timing is for
``tools/benchmark.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

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


if __name__ == "__main__":
    main()
