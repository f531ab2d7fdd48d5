#!/usr/bin/env python
r"""Train a PVTv2 detector or segmenter: ``pvt-train`` from a checkout (same flags; ``--help`` lists them).

    python tools/train.py --dataset synthetic --model fasterrcnn --variant b0 --max-steps 300 --output-dir runs/x
    torchrun --standalone --nproc_per_node=2 tools/train.py --dataset synthetic --model fasterrcnn --variant b0 \
        --max-steps 300 --output-dir runs/x
    python tools/train.py ... --output-dir runs/x --resume

The command lives in :mod:`pvt_backbone.cli.train`.
"""

import sys

from pvt_backbone.cli.runner import run_command
from pvt_backbone.cli.train import main

__all__: list[str] = []  # a script: the command is pvt_backbone.cli.train

if __name__ == "__main__":
    sys.exit(run_command(main))
