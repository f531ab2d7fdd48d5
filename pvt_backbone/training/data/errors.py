"""The one exception every dataset raises for bad data: it names the file and the problem."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DataError", "DataWarning"]


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent.

    The message starts with the offending path, e.g. ``"data/ann.json: annotation id 7 refers to unknown
    image_id 12"``. ``DataError(message)`` with one argument is accepted too (DataLoader workers re-raise that way).

    Example:
        >>> error = DataError("data/ann.json", "no categories")
        >>> str(error), error.path, error.problem
        ('data/ann.json: no categories', 'data/ann.json', 'no categories')
    """

    def __init__(self, path: str | Path, problem: str | None = None) -> None:
        message = str(path) if problem is None else f"{path}: {problem}"
        super().__init__(message)
        self.path = str(path) if problem is not None else None
        self.problem = problem


class DataWarning(UserWarning):
    """A dataset file was repaired when the dataset was built (e.g. a COCO field that COCO tools derive was missing).

    The message starts with the file, says how many entries were repaired and how.
    """
