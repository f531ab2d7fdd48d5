"""One-process A/B of the inference path's CPU choices: oneDNN with reordered weights vs ``F.linear``/``F.conv2d``,
and the MLP chunk size, on the b2 backbone with random weights.

    .venv/bin/python tools/dev/ab_fast_inference.py [--sizes 224x224:1,224x224:8,512x512:1] [--rounds 3] [--runs 8]

Each round times every configuration once (median of ``--runs`` passes after two warm-up passes), interleaved, so a
slow spell of the machine hits all of them; prints each configuration's per-round medians and its best round beside
the current default's. A development diagnostic, not a benchmark row.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pvt_backbone.fast_inference as fast_inference
from pvt_backbone import PVTv2Backbone
from pvt_backbone.cli.arguments import image_size_argument
from pvt_backbone.layers import call_module

DEFAULT_CHUNK = fast_inference.MLP_CHUNK_ELEMENTS
ONEDNN = (fast_inference.linear, fast_inference.conv2d)
MODULE_CALLS = (call_module, call_module)


def _configure(onednn: bool, chunk: int) -> None:
    fast_inference.linear, fast_inference.conv2d = ONEDNN if onednn else MODULE_CALLS
    fast_inference.MLP_CHUNK_ELEMENTS = chunk


def _median_ms(model: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="224x224:1,224x224:8,512x512:1")
    parser.add_argument("--chunks", default=f"{1 << 22},{DEFAULT_CHUNK}", help="MLP_CHUNK_ELEMENTS values to try")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = PVTv2Backbone.b2().eval()
    configs = [(onednn, int(chunk)) for onednn in (False, True) for chunk in dict.fromkeys(args.chunks.split(","))]
    for size in (image_size_argument(text) for text in args.sizes.split(",")):
        x = torch.randn(size.batch, 3, size.height, size.width)
        rounds: dict[tuple[bool, int], list[float]] = {config: [] for config in configs}
        for _ in range(args.rounds):
            for config in configs:
                _configure(*config)
                rounds[config].append(_median_ms(model, x, args.runs))
        _configure(True, DEFAULT_CHUNK)
        default = min(rounds[(True, DEFAULT_CHUNK)])
        for (onednn, chunk), medians in rounds.items():
            label = f"{'oneDNN reordered' if onednn else 'F.linear/F.conv2d'}, chunk 2^{chunk.bit_length() - 1}"
            shown = " ".join(f"{m:7.1f}" for m in medians)
            print(
                f"{size.height}x{size.width} b{size.batch}  {label:34s} {shown}  best {min(medians):7.1f} ms"
                f"  default is {min(medians) / default:.2f}x faster"
            )


if __name__ == "__main__":
    main()
