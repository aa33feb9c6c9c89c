"""Log rate limiting for the bridge: at most one line per period per kind.

A serial line full of noise drops dozens of frames a second, and an outbox
that is full refuses every reading; a warning per event would wear the SD
card (journald writes it) and drown the lines that matter. The driver asks
:class:`LogLimiter` before logging; it says whether a line may go out now
and how many lines of that kind it held back since the last one, so the
line can say so. The caller's counters still count every event.

Pure: no clock, no logging, no locks; the caller passes ``now`` (monotonic
seconds) and serialises calls.
"""

from __future__ import annotations

__all__ = ["LOG_EVERY_S", "LogLimiter", "more"]

#: One warning per second per kind: enough to see that something is going
#: on and when it stopped, never a flood (docs/operations.md 5.1).
LOG_EVERY_S = 1.0


class LogLimiter:
    """Per-kind pacing of log lines.

    Usage::

        ok, held = limiter.allow("dropped", time.monotonic())
        if ok:
            log.warning("dropped a frame%s", more(held))
    """

    def __init__(self, period: float = LOG_EVERY_S) -> None:
        if not period > 0:
            raise ValueError("period must be > 0")
        self.period = period
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, kind: str, now: float) -> tuple[bool, int]:
        """``(True, held)`` if a line of ``kind`` may be logged at ``now``
        (``held`` = lines of that kind suppressed since the last one), else
        ``(False, 0)`` and the line is counted as suppressed."""
        due = self._next.get(kind)
        if due is not None and now < due:
            self._held[kind] = self._held.get(kind, 0) + 1
            return False, 0
        self._next[kind] = now + self.period
        return True, self._held.pop(kind, 0)

    def held(self, kind: str) -> int:
        """Lines of ``kind`` suppressed since the last one allowed."""
        return self._held.get(kind, 0)


def more(held: int) -> str:
    """The suffix of a rate-limited line: ``" (+12 more not logged)"``."""
    return f" (+{held} more not logged)" if held else ""
