"""Small durable-file helpers shared by every process.

A rename or a new file is durable only once its directory is fsynced too
(the directory entry lives there). Every module that creates or replaces a
file it relies on after a power cut calls :func:`fsync_dir` after it.
"""

from __future__ import annotations

import os

__all__ = ["fsync_dir"]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync ``directory`` (its entries: new, renamed and removed files).
    Raises ``OSError`` as ``os.fsync`` does."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
