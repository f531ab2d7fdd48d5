"""The one exception every dataset raises for bad data: it names the file and the problem."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DataError", "short_message"]


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent.

    The message starts with the offending path, e.g. ``"data/ann.json: annotation id 7 refers to unknown
    image_id 12"``. ``DataError(message)`` with one argument is accepted too (DataLoader workers re-raise that way).
    """

    def __init__(self, path: str | Path, problem: str | None = None) -> None:
        message = str(path) if problem is None else f"{path}: {problem}"
        super().__init__(message)
        self.path = str(path) if problem is not None else None
        self.problem = problem


def short_message(error: BaseException) -> str:
    """The error's message without the worker traceback a DataLoader adds when it re-raises in the main process."""
    text = str(error)
    if "Original Traceback" in text:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        last = lines[-1]
        # "pvt_backbone.data.errors.DataError: <message>" -> "<message>"
        head, sep, tail = last.partition(": ")
        return tail if sep and " " not in head else last
    return text
