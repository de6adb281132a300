"""Errors raised by the dataset readers."""

from __future__ import annotations

from os import PathLike
from pathlib import Path


class DatasetError(ValueError):
    """A dataset file is missing, unreadable, corrupt or has an unexpected shape or content.

    ``path`` is the offending file (or directory), when there is one; the message always names it.
    """

    def __init__(self, message: str, path: str | PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        if path is not None and str(path) not in message:
            message = f"{path}: {message}"
        super().__init__(message)
