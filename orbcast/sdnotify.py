"""sd_notify without a dependency: READY, STATUS, WATCHDOG, STOPPING.

systemd tells a ``Type=notify`` service where to report with
``$NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for an abstract socket)
and how often to prove it is alive with ``$WATCHDOG_USEC`` (the unit's
``WatchdogSec=``, in microseconds). A report is one datagram of
newline-separated ``KEY=VALUE`` lines. Outside systemd (no
``$NOTIFY_SOCKET``) every call here is a cheap no-op, so services call it
unconditionally.

How a service uses it (the whole API)::

    n = Notifier.from_env()
    ...bind sockets, open the log...
    n.ready("role=primary last_seq=0")          # READY=1 + STATUS=
    while running:
        poll(timeout=min(my_deadline, n.next_deadline()) - now)
        ...
        n.tick(time.monotonic(), status="role=primary last_seq=123")
    n.stopping("shutting down")                 # STOPPING=1, from the SIGTERM path

``tick`` sends ``WATCHDOG=1`` at most every half watchdog interval (the
pacing systemd recommends) and ``STATUS=`` only when the text changed and at
most every :data:`STATUS_MIN_INTERVAL_S`. Call it from the *main loop*
itself, never from a helper thread: a loop that hangs must stop the pings so
systemd restarts the service.

The pacing (:class:`WatchdogPacer`) is a pure class that takes ``now``;
:class:`Notifier` is the thin driver that owns the socket. Sending never
raises: a vanished socket is logged once and the service keeps running.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["STATUS_MIN_INTERVAL_S", "Notifier", "WatchdogPacer", "notify", "parse_watchdog_usec"]

log = logging.getLogger("orbcast.sdnotify")

#: STATUS= is informational (``systemctl status`` shows it): sending it more
#: than once a second only costs syscalls on a busy loop.
STATUS_MIN_INTERVAL_S = 1.0
#: STATUS text is cut to this many bytes; systemd shows one line anyway.
MAX_STATUS_BYTES = 512


def parse_watchdog_usec(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """The watchdog interval in seconds from ``WATCHDOG_USEC``, or ``None``.

    ``None`` when unset, malformed, zero, or when ``WATCHDOG_PID`` names
    another process (the watchdog is then not ours to feed).
    """
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    wpid = environ.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


class WatchdogPacer:
    """When the next ``WATCHDOG=1`` is due: every ``interval / 2`` seconds.

    Pure: it only sees the ``now`` values (monotonic seconds) it is given.
    """

    def __init__(self, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError("watchdog interval must be positive")
        self.interval = interval_s
        self.period = interval_s / 2
        self._next: float | None = None    # None: due at once

    def due(self, now: float) -> bool:
        return self._next is None or now >= self._next

    def sent(self, now: float) -> None:
        self._next = now + self.period

    def deadline(self, now: float) -> float:
        """Monotonic time by which the owner's loop must call again."""
        return now if self._next is None else self._next


class Notifier:
    """Reports to systemd's notify socket; a no-op when there is none.

    ``socket_path`` is ``$NOTIFY_SOCKET`` (``@`` prefix = abstract
    namespace); ``watchdog_s`` the full watchdog interval (``None``: off).
    Never raises on send errors (they are logged once).
    """

    def __init__(self, socket_path: str | None, watchdog_s: float | None = None) -> None:
        self.socket_path = socket_path or None
        self.pacer = WatchdogPacer(watchdog_s) if watchdog_s and self.socket_path else None
        self._sock: socket.socket | None = None
        self._addr: str | bytes | None = None
        self._warned = False
        self._status: str | None = None
        self._status_at = float("-inf")
        self._pending_status: str | None = None
        self.sent = 0
        if self.socket_path:
            p = self.socket_path
            self._addr = ("\0" + p[1:]) if p.startswith("@") else p

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Build from ``$NOTIFY_SOCKET`` / ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID``."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"), parse_watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    @property
    def watchdog_s(self) -> float | None:
        """The full watchdog interval (seconds), or ``None`` when off."""
        return self.pacer.interval if self.pacer else None

    def send(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True if it went out."""
        if self._addr is None or not lines:
            return False
        data = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, self._addr)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify to %s failed: %s (further failures not logged)",
                            self.socket_path, exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (plus ``STATUS=``): the service now serves."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(self._status_line(status))
        if self.pacer is not None:
            lines.append("WATCHDOG=1")
        ok = self.send(*lines)
        if ok and self.pacer is not None:
            self.pacer.sent(time.monotonic())
        return ok

    def status(self, text: str) -> bool:
        """``STATUS=text`` now (not rate limited; :meth:`tick` is)."""
        return self.send(self._status_line(text))

    def tick(self, now: float, status: str | None = None) -> bool:
        """Call once per main-loop turn with monotonic ``now``.

        Sends ``WATCHDOG=1`` when half the interval has passed since the last
        one, and ``STATUS=`` when ``status`` changed (at most every
        :data:`STATUS_MIN_INTERVAL_S`), in one datagram. Returns True if
        anything was sent.
        """
        if self._addr is None:
            return False
        lines = []
        if self.pacer is not None and self.pacer.due(now):
            lines.append("WATCHDOG=1")
            self.pacer.sent(now)
        if status is not None and status != self._status and now - self._status_at >= STATUS_MIN_INTERVAL_S:
            lines.append(self._status_line(status))
            self._status_at = now
        return self.send(*lines) if lines else False

    def next_deadline(self, now: float) -> float:
        """Latest monotonic time the loop may sleep to (``inf`` when off)."""
        return self.pacer.deadline(now) if self.pacer is not None else float("inf")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: call first thing on SIGTERM's shutdown path."""
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(self._status_line(status))
        return self.send(*lines)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _status_line(self, text: str) -> str:
        self._status = text
        clean = " ".join(text.split())
        b = clean.encode("utf-8")[:MAX_STATUS_BYTES]
        return "STATUS=" + b.decode("utf-8", "ignore")


def notify(*lines: str, environ: Mapping[str, str] | None = None) -> bool:
    """One-shot: send ``lines`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``."""
    n = Notifier.from_env(environ)
    try:
        return n.send(*lines)
    finally:
        n.close()

