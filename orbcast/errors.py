"""The one exception hierarchy of orbcast.

Every error raised by orbcast code derives from :class:`OrbcastError`. The
branches say who is to blame:

* :class:`LocalProtocolError` - *we* misused the API or tried to send
  something the protocol forbids (a bug in the caller).
* :class:`RemoteProtocolError` - the *peer* sent something malformed. These
  are caught by the drivers, counted, answered with an error frame where one
  can be sent, and never kill a process.
* :class:`ClosedError` - we closed the object and then used it.
* :class:`BrokenError` - it broke under us (``__cause__`` is set).

Leaves also inherit the builtin they most resemble (``ValueError``,
``RuntimeError``, ``TimeoutError``) so generic handlers keep working.
This module imports nothing but the standard library and must stay that way.
"""

from __future__ import annotations

__all__ = [
    "OrbcastError",
    "ConfigError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "FrameTooLarge",
    "ClosedError",
    "BrokenError",
    "LogCorruptedError",
    "DurabilityError",
    "AuthenticationError",
    "ReplayRejected",
    "OutboxFull",
    "OutboxWriteFailed",
    "OrbcastTimeout",
]


class OrbcastError(Exception):
    """Root of every orbcast error."""


class ConfigError(OrbcastError, ValueError):
    """A configuration value is missing, malformed or inconsistent.

    ``field`` names the offending setting (``section.key``), ``source`` where
    it came from (a file path, an environment variable, a CLI flag).
    """

    def __init__(self, message: str, *, field: str | None = None, source: str | None = None):
        where = []
        if field:
            where.append(field)
        if source:
            where.append(f"from {source}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.field = field
        self.source = source


class LocalProtocolError(OrbcastError, ValueError):
    """We tried to build or send something the protocol does not allow."""


class RemoteProtocolError(OrbcastError, ValueError):
    """A peer sent bytes that do not decode to a valid message.

    ``code`` is the short machine-readable error code that goes back to the
    sender in an ``ERROR`` frame (see docs/protocol.md).
    """

    code = "bad-frame"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class FrameTooLarge(RemoteProtocolError):
    """A frame exceeds a size limit. ``size`` and ``limit`` are in bytes."""

    code = "too-large"

    def __init__(self, size: int, limit: int, what: str = "frame"):
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class ClosedError(OrbcastError, RuntimeError):
    """The object was closed by its owner and then used."""


class BrokenError(OrbcastError, RuntimeError):
    """The object broke underneath us; ``__cause__`` holds the original error."""


class LogCorruptedError(OrbcastError, RuntimeError):
    """A log segment is damaged somewhere other than its torn tail.

    The log refuses to guess: ``path`` and ``offset`` (bytes from the start of
    the file) say where the first bad record starts so an operator can look.
    """

    def __init__(self, path: str, offset: int, reason: str):
        super().__init__(f"log segment {path} is corrupted at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class DurabilityError(BrokenError):
    """A write or fsync of durable state failed; the process must stop."""


class AuthenticationError(RemoteProtocolError):
    """A frame failed authentication (bad tag, unknown key, replayed frame).

    This is the single error type of every link-security rejection.
    """

    code = "auth"


class ReplayRejected(OrbcastError, RuntimeError):
    """The sequencer refused a replay request.

    ``code`` is the protocol error code (``gone`` when the range was deleted by
    retention, ``busy`` when too many replays are open, ...);
    ``first_available`` is the oldest seq the node still holds, when known.
    """

    def __init__(self, message: str, *, code: str = "rejected", first_available: int | None = None):
        super().__init__(message)
        self.code = code
        self.first_available = first_available


class OutboxFull(OrbcastError, RuntimeError):
    """The plant's on-disk outbox is at its count or byte bound.

    Nothing was written. ``count`` / ``size`` are the outbox's current depth.
    """

    def __init__(self, count: int, size: int, max_count: int, max_bytes: int):
        super().__init__(
            f"outbox full: {count} messages / {size} bytes "
            f"(limits {max_count} messages / {max_bytes} bytes)"
        )
        self.count = count
        self.size = size
        self.max_count = max_count
        self.max_bytes = max_bytes


class OutboxWriteFailed(OrbcastError, RuntimeError):
    """The plant's on-disk outbox could not write a batch (a full disk, say).

    Nothing of the batch was written and the outbox stays usable: publishing
    again succeeds once there is room. (A failed *fsync* is different: the
    outbox then stops, :class:`DurabilityError`.)
    """


class OrbcastTimeout(OrbcastError, TimeoutError):
    """An operation did not complete within its deadline."""
