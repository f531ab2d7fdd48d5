"""Command-line programs (the top layer; ``import pvt_backbone`` never imports them).

``pvt-train``, ``pvt-evaluate``, ``pvt-predict`` (need the ``[train]`` extra), ``pvt-convert``, ``pvt-export``; each
module has ``main(argv) -> int`` and ``run``, its installed entry point. ``runner`` holds the error contract.
"""

__all__: list[str] = []
