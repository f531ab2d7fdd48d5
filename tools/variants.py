"""Print every PVTv2 variant: pyramid shapes, parameters and GMACs at 224x224 and 800x1333.

Usage: python tools/variants.py [--height H --width W]
"""

from __future__ import annotations

import argparse
import sys

import torch

from pvt_backbone import VARIANTS, PVTv2Backbone
from pvt_backbone.classifier import build_classifier
from pvt_backbone.flops import count_macs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=250, help="input height for the printed pyramid shapes")
    parser.add_argument("--width", type=int, default=333, help="input width for the printed pyramid shapes")
    args = parser.parse_args(argv)

    header = ("variant", "params (cls)", "params (backbone)", "GMACs@224", "GMACs@800x1333", "pyramid")
    print(f"{header[0]:<7} {header[1]:>13} {header[2]:>17} {header[3]:>10} {header[4]:>15}  {header[5]}")
    for name in VARIANTS:
        with torch.device("meta"):
            classifier_params = sum(p.numel() for p in build_classifier(name).parameters())
            backbone = PVTv2Backbone.from_config(name)
            shapes = backbone(torch.empty(1, 3, args.height, args.width))
        backbone_params = sum(p.numel() for p in backbone.parameters())
        macs_224 = count_macs(lambda name=name: build_classifier(name), 224, 224) / 1e9
        macs_det = count_macs(lambda name=name: PVTv2Backbone.from_config(name), 800, 1333) / 1e9
        pyramid = " ".join(f"{k}:{tuple(v.shape[1:])}" for k, v in shapes.items())
        print(
            f"{name:<7} {classifier_params:>13,} {backbone_params:>17,} {macs_224:>10.3f} {macs_det:>15.1f}  {pyramid}"
        )
    print(f"(pyramid shapes are (C, H, W) for a {args.height}x{args.width} input; GMACs@224 include the head)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
