#!/usr/bin/env python
"""Export a PVTv2 backbone or classifier to .pt2 and/or ONNX, verified at a second size: ``pvt-export``.

    python tools/export.py --variant b2 --weights pvt_v2_b2.pth --out exports/pvt_v2_b2 --format both
    python tools/export.py --variant b2_li --format onnx --static-size --size 224x224 --verify-size 224x224:2
"""

import sys

from pvt_backbone.cli.export import main
from pvt_backbone.cli.runner import run_command

if __name__ == "__main__":
    sys.exit(run_command(main))
