"""``pvt-benchmark``: our PVTv2 against timm's pvt_v2 (same weights), ONNX Runtime and a Faster R-CNN pair.

Quick run:  pvt-benchmark --sizes 224x224:1 --tasks inference --dtypes fp32 --iterations 3 --no-detector
Full run:   pvt-benchmark --json runs/bench.json --markdown runs/bench.md --plot tools/throughput.png
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from pvt_backbone.cli.arguments import image_size_argument, image_sizes_argument
from pvt_backbone.cli.runner import command_parser, entry_point
from pvt_backbone.config import VARIANTS
from pvt_backbone.weights.io import atomic_write

from .harness import DTYPES, MODES, TASKS, BenchmarkSettings, run_benchmark
from .measure import threads
from .report import plot_throughput, to_json, to_markdown
from .targets import summarize_targets

__all__ = ["build_parser", "main", "run"]


def _choices(text: str, allowed: tuple[str, ...], name: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise argparse.ArgumentTypeError(
            f"{name} must be a comma-separated subset of {','.join(allowed)}, got {text!r}"
        )
    return values


def _write(path: str, text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda temp: temp.write_text(text))


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults are ``BenchmarkSettings()``'s."""
    defaults = BenchmarkSettings()
    parser = command_parser(__doc__)
    parser.add_argument("--variant", default=defaults.variant, choices=sorted(VARIANTS))
    parser.add_argument(
        "--sizes", type=image_sizes_argument, default=defaults.cases, help="HxW[:batch],... (default: %(default)s)"
    )
    parser.add_argument(
        "--train-sizes", type=image_sizes_argument, help="cases for the training step (default: --sizes)"
    )
    parser.add_argument("--tasks", type=lambda t: _choices(t, TASKS, "--tasks"), default=defaults.tasks)
    parser.add_argument("--dtypes", type=lambda t: _choices(t, DTYPES, "--dtypes"), default=defaults.dtypes)
    parser.add_argument("--modes", type=lambda t: _choices(t, MODES, "--modes"), default=defaults.modes)
    parser.add_argument("--iterations", type=int, default=defaults.iterations, help="timed runs per implementation")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-timm", action="store_true", help="time only our model")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    parser.add_argument("--no-int8", action="store_true", help="skip the INT8 rows (OpenVINO and onnxruntime)")
    parser.add_argument(
        "--no-compiled-runtime",
        action="store_true",
        help="skip the runtime table's torch.compile row (freezing, cpp_wrapper; about 30 s to compile per size)",
    )
    parser.add_argument(
        "--calibration-size", type=int, default=defaults.calibration, help="synthetic scenes to calibrate INT8 on"
    )
    parser.add_argument(
        "--contended", action="store_true", help="also time the runtimes with a busy-loop process on one core"
    )
    parser.add_argument("--no-detector", action="store_true", help="skip the Faster R-CNN comparison")
    parser.add_argument(
        "--detector-runtimes",
        action="store_true",
        help="also time whole RetinaNet and Faster R-CNN exports in onnxruntime and OpenVINO at 800x1344",
    )
    parser.add_argument("--no-checkpointing", action="store_true", help="skip the gradient-checkpointing memory rows")
    parser.add_argument("--checkpointing-size", type=image_size_argument, default=defaults.checkpointing_case)
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 even on CPUs without bf16 kernels (slow)")
    parser.add_argument("--json", help="write the full report as JSON here")
    parser.add_argument("--markdown", help="write the Markdown table here")
    parser.add_argument("--plot", help="write a throughput-vs-resolution PNG here (needs matplotlib: the bench extra)")
    return parser


def _settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchmarkSettings:
    if args.iterations < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--iterations and --threads must be >= 1, --warmup >= 0")
    settings = dataclasses.replace(
        BenchmarkSettings(),
        variant=args.variant,
        cases=args.sizes,
        train_cases=args.train_sizes,
        tasks=args.tasks,
        dtypes=args.dtypes,
        modes=args.modes,
        iterations=args.iterations,
        warmup=args.warmup,
        device=args.device,
        compare_timm=not args.no_timm,
        onnx=not args.no_onnx,
        int8=not args.no_int8,
        calibration=args.calibration_size,
        compiled_runtime=not args.no_compiled_runtime,
        contended=args.contended,
        detector=not args.no_detector,
        detector_runtimes=args.detector_runtimes,
        checkpointing=not args.no_checkpointing,
        checkpointing_case=args.checkpointing_size,
        force_bf16=args.force_bf16,
    )
    if settings.compare_timm and importlib.util.find_spec("timm") is None:
        parser.error("timm is not installed; pass --no-timm to time our model alone")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the table and the targets go to stdout, progress to stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = _settings(args, parser)
    with threads(args.threads):
        report = run_benchmark(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    table = to_markdown(report)
    print(table)
    for line in summarize_targets(report):
        print(line)
    if args.json:
        _write(args.json, to_json(report))
    if args.markdown:
        _write(args.markdown, table)
    if args.plot:
        written = plot_throughput(report, args.plot)
        print(f"plot: {written}" if written else "plot: skipped (matplotlib missing or no fp32 eager batch-1 rows)")
    return 0


run = entry_point(main)

if __name__ == "__main__":
    run()
