#!/usr/bin/env python
"""Evaluate a trained checkpoint: ``pvt-evaluate`` from a checkout (same flags; ``--help`` lists them).

    python tools/evaluate.py --checkpoint runs/x
    python tools/evaluate.py --checkpoint runs/x --dataset coco --val-images data/val --val-annotations val.json

The command lives in :mod:`pvt_backbone.cli.evaluate`.
"""

import sys

from pvt_backbone.cli.evaluate import main
from pvt_backbone.cli.runner import run_command

__all__: list[str] = []  # a script: the command is pvt_backbone.cli.evaluate

if __name__ == "__main__":
    sys.exit(run_command(main))
