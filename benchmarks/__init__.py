"""Benchmark harness: our PVTv2 against its peers on the same weights and machine (``pvt-benchmark``).

Not part of the library: ``import pvt_backbone`` never imports it. ``measure`` times and sizes one step, ``harness``
runs the matrix, ``report`` renders it, ``targets`` checks this project's performance targets, ``cli`` is the command.
"""

__all__: list[str] = []
