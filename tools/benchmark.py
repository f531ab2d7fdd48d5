#!/usr/bin/env python
"""Benchmark our PVTv2 against timm's pvt_v2 (same weights), ONNX Runtime and a Faster R-CNN pair: ``pvt-benchmark``.

Quick run:  python tools/benchmark.py --sizes 224x224:1 --tasks inference --dtypes fp32 --iterations 3 --no-detector
Full run:   python tools/benchmark.py --json runs/bench.json --markdown runs/bench.md --plot tools/throughput.png
"""

import sys

from benchmarks.cli import main
from pvt_backbone.cli.runner import run_command

if __name__ == "__main__":
    sys.exit(run_command(main))
