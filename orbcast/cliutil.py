"""Shared command-line plumbing: ``prog: error: ...`` and exit codes.

Expected failures (bad config, a node that does not answer, bad input)
print one line and exit non-zero with no traceback; ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys
from typing import Callable, Sequence

import zmq

from .errors import OrbcastError

__all__ = ["StopSignal", "run_main", "setup_logging"]


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_main(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
             dispatch: Callable[[argparse.Namespace], int]) -> int:
    """Parse ``argv`` and call ``dispatch``; map expected errors to exit codes."""
    args = parser.parse_args(argv)
    try:
        return dispatch(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except (OrbcastError, OSError, ValueError, zmq.ZMQError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1


class StopSignal:
    """A stop request that a signal handler may make.

    ``threading.Event.set()`` is not safe in a signal handler: the handler runs
    in the main thread between two bytecodes, and when the main thread is
    inside ``Event.wait()`` holding the Event's own (non-reentrant) lock,
    ``set()`` waits for that lock for ever. This one takes no lock: ``set()``
    sets a flag and writes a byte to a pipe; ``wait()`` is a ``select()`` on
    the pipe. Once set it stays set. Also safe from other threads.
    """

    def __init__(self) -> None:
        self._flag = False
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def set(self) -> None:
        self._flag = True
        w = self._w
        if w >= 0:
            try:
                os.write(w, b"\0")
            except OSError:       # full (a byte is already waiting) or closed
                pass

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        """Until set or ``timeout`` seconds; returns :meth:`is_set`."""
        r = self._r
        if not self._flag and r >= 0:
            try:
                select.select([r], [], [], timeout)
            except OSError:       # closed by another thread (after set(), as close() asks)
                pass
        return self._flag

    def close(self) -> None:
        """Release the pipe (call after :meth:`set`); a later :meth:`set`
        still sets the flag."""
        w, self._w = self._w, -1        # -1 first: a handler never writes to a reused fd
        r, self._r = self._r, -1
        for fd in (w, r):
            if fd >= 0:
                os.close(fd)
