"""Convert a PVTv2 checkpoint between key layouts, or inspect one: the ``pvt-convert`` command as a script.

Usage and options: ``python tools/convert_weights.py --help`` (the command lives in ``pvt_backbone.cli.convert``).
"""

from __future__ import annotations

import sys

from pvt_backbone.cli.convert import main
from pvt_backbone.cli.runner import run_command

if __name__ == "__main__":
    sys.exit(run_command(main))
