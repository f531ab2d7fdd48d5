"""Argument types the commands share: an input geometry ``HEIGHTxWIDTH[:BATCH]``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

__all__ = ["ImageSize", "parse_image_size", "image_size_argument", "image_sizes_argument"]


@dataclass(frozen=True)
class ImageSize:
    """An input geometry: ``batch`` images of ``height`` x ``width``; prints as ``"800x1333 b1"``."""

    height: int
    width: int
    batch: int = 1

    def __str__(self) -> str:
        return f"{self.height}x{self.width} b{self.batch}"


def parse_image_size(text: str) -> ImageSize:
    """``"512x512:2"`` or ``"224x224"`` (batch 1) -> ``ImageSize``; ``ValueError`` naming the accepted form otherwise.

    Example:
        >>> parse_image_size("256x320:2")
        ImageSize(height=256, width=320, batch=2)
        >>> str(parse_image_size(" 800x1333 "))
        '800x1333 b1'
    """
    size, _, batch = text.strip().partition(":")
    height, _, width = size.partition("x")
    try:
        parsed = ImageSize(int(height), int(width), int(batch or 1))
    except ValueError:
        raise ValueError(f"size {text!r} is not of the form HEIGHTxWIDTH[:BATCH], e.g. 800x1333:1") from None
    if min(parsed.height, parsed.width, parsed.batch) < 1:
        raise ValueError(f"size {text!r} must have positive height, width and batch")
    return parsed


def image_size_argument(text: str) -> ImageSize:
    """:func:`parse_image_size` as an argparse ``type=`` (its message becomes the usage error)."""
    try:
        return parse_image_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def image_sizes_argument(text: str) -> tuple[ImageSize, ...]:
    """A comma-separated list of sizes, as an argparse ``type=``."""
    return tuple(image_size_argument(part) for part in text.split(",") if part.strip())
