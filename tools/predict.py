#!/usr/bin/env python
"""Predict with a trained checkpoint and draw the results: ``pvt-predict`` from a checkout (same flags; ``--help``
lists them).

    python tools/predict.py --checkpoint runs/demo --input photo.jpg --output-dir preds
    python tools/predict.py --checkpoint runs/demo --input "data/val/*.jpg" --output-dir preds --json

The command lives in :mod:`pvt_backbone.cli.predict`.
"""

import sys

from pvt_backbone.cli.predict import main
from pvt_backbone.cli.runner import run_command

__all__: list[str] = []  # a script: the command is pvt_backbone.cli.predict

if __name__ == "__main__":
    sys.exit(run_command(main))
