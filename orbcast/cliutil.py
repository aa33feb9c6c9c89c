"""Shared command-line plumbing: ``prog: error: ...`` and exit codes.

Expected failures (bad config, a node that does not answer, bad input)
print one line and exit non-zero with no traceback; ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

import zmq

from .errors import OrbcastError

__all__ = ["run_main", "setup_logging"]


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
