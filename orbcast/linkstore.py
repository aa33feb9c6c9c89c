"""Durable storage of link (ratchet) session state: one journal per process.

The link layer (:mod:`orbcast.link`) hands out the advanced state of a
session through ``persist(session_id, blob)`` and asks the driver to make it
durable *before* a frame sealed under it leaves the process. Writing one
file per session (write, fsync, rename, fsync the directory) costs two
fsyncs per session per loop turn: a node with a dozen busy plants would
spend more time in fsync for its links than for its log, and an SD card
would take the wear. So the drivers collect the turn's blobs with
:meth:`SessionStore.put` and make them durable together with one append
and one fsync in :meth:`SessionStore.commit`; the journal is rewritten
(atomically, mode 0600) when it grows past a bound.

What it must never do: lose a committed blob, make a secret readable by
anyone but the owner (the directory is 0700, every file 0600), or keep a
deleted session's secrets around longer than the next compaction.

File format (``DIR/sessions.journal``), all integers big-endian::

    header  b"ORSJ" u8 version (1)
    record  u32 length of payload | u32 CRC-32 of payload | payload
    payload u8 op (1 = put, 0 = delete) | u8 len(name) | name (ASCII) | blob (put only)

Replaying the records in order gives the latest blob of every session. A
torn tail (a crash mid-append) is cut off on open: those records were never
committed, so no frame was sent under them. A damaged record in the middle
(a bad CRC, a length that makes no sense) ends the replay there, and then the
store keeps *no* session at all: a blob before the damage may be older than a
state frames were already sealed under, and restoring it would seal new frames
with message keys and nonces already used. Sessions are cheap to re-create
with a new handshake; ``damaged_at`` says where the damage was.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import zlib
from pathlib import Path

from .errors import ConfigError
from .fsutil import fsync_dir
from .keys import write_private_file

__all__ = ["SessionStore", "JOURNAL_NAME"]

JOURNAL_NAME = "sessions.journal"
#: Held with flock while a store is open: two processes sharing one journal would
#: each delete the other's sessions and could restore states older than sent frames.
LOCK_NAME = "sessions.lock"
MAGIC = b"ORSJ"
VERSION = 1
_HEADER = MAGIC + bytes([VERSION])
_REC = struct.Struct(">II")
_PUT, _DELETE = 1, 0
#: A session blob is a few hundred bytes, up to ~100 KiB with 2000 skipped keys.
MAX_BLOB_BYTES = 1 << 20
#: Rewrite the journal once it is this much larger than its live content
#: (bounds the file whatever the traffic; each rewrite is one atomic write).
COMPACT_SLACK_BYTES = 1 << 20


class SessionStore:
    """The latest persisted blob of every link session, in ``directory``.

    Example::

        store = SessionStore("/var/lib/orbcast/links")
        server = LinkServer(ident, "seq-a", allowlist, persist=store.put, defer_persist=True)
        for blob in store.load().values():
            server.restore(blob)
        ...
        server.flush_persist(); store.commit()      # once per turn, before sending

    :meth:`commit` raises ``OSError`` if the write or the fsync fails; the
    caller must then not send what it sealed.
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._lock = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError("link sessions are already in use by another process (same "
                                  "data directory and identity)", source=str(self.dir)) from exc
            raise
        self.path = self.dir / JOURNAL_NAME
        self.fsync = fsync
        self._latest: dict[str, bytes] = {}
        self._pending: dict[str, bytes | None] = {}
        self.damaged_at: int | None = None
        self.commits = 0
        self._live_bytes = 0
        self._size = self._open_existing()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(self._fd, 0o600)
        if self._size == 0:
            self._write(_HEADER)
            self._size = len(_HEADER)
            self._sync()
            if self.fsync:                  # the new file's directory entry, too
                fsync_dir(self.dir)

    # -- reading --------------------------------------------------------------------

    def _open_existing(self) -> int:
        """Replay the journal; cut a torn tail; return the size kept."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        if not data.startswith(_HEADER):
            self.damaged_at = 0
            write_private_file(self.path, _HEADER)
            return len(_HEADER)
        pos = len(_HEADER)
        while pos < len(data):
            if pos + _REC.size > len(data):
                break                               # torn header of the last record
            n, crc = _REC.unpack_from(data, pos)
            end = pos + _REC.size + n
            if n < 2 or n > MAX_BLOB_BYTES + 300:
                self.damaged_at = pos
                break
            if end > len(data):
                break                               # torn payload of the last record
            payload = data[pos + _REC.size:end]
            if zlib.crc32(payload) != crc:
                if end == len(data):
                    break                           # a torn last write
                self.damaged_at = pos
                break
            op, ln = payload[0], payload[1]
            name = payload[2:2 + ln].decode("ascii", "replace")
            if op == _PUT:
                self._latest[name] = payload[2 + ln:]
            else:
                self._latest.pop(name, None)
            pos = end
        if pos < len(data):
            os.truncate(self.path, pos)
        if self.damaged_at is not None:     # see the module docstring: keep nothing
            self._latest.clear()
            write_private_file(self.path, _HEADER)
            pos = len(_HEADER)
        self._live_bytes = sum(len(b) + 64 for b in self._latest.values())
        return pos

    def load(self) -> dict[str, bytes]:
        """The latest committed blob of every session (name -> blob)."""
        return dict(self._latest)

    # -- writing --------------------------------------------------------------------

    def put(self, name: str, blob: bytes | None) -> None:
        """Stage ``blob`` for session ``name`` (None: delete it). Durable after
        :meth:`commit`. This is the ``persist`` callable of the link layer."""
        if not name.isascii() or not 0 < len(name) < 256:
            raise ValueError(f"bad session name {name!r}")
        if blob is not None and len(blob) > MAX_BLOB_BYTES:
            raise ValueError(f"session blob of {len(blob)} bytes is over {MAX_BLOB_BYTES}")
        self._pending[name] = blob

    @property
    def dirty(self) -> bool:
        """True if something was put and not yet committed."""
        return bool(self._pending)

    def commit(self) -> int:
        """Make every staged blob durable (one append, one fsync); return how many."""
        if not self._pending:
            return 0
        parts = []
        for name, blob in self._pending.items():
            nb = name.encode("ascii")
            payload = bytes([_PUT if blob is not None else _DELETE, len(nb)]) + nb + (blob or b"")
            parts.append(_REC.pack(len(payload), zlib.crc32(payload)))
            parts.append(payload)
        buf = b"".join(parts)
        try:
            self._write(buf)
            self._sync()
        except BaseException:
            # a short write (ENOSPC) must not leave a partial record that a later
            # commit appends after: the next open would stop at it. Cut it.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise
        self._size += len(buf)
        n = len(self._pending)
        for name, blob in self._pending.items():
            if blob is None:
                self._latest.pop(name, None)
            else:
                self._latest[name] = blob
        self._pending.clear()
        self.commits += 1
        self._live_bytes = sum(len(b) + 64 for b in self._latest.values())
        if self._size > self._live_bytes + COMPACT_SLACK_BYTES:
            self.compact()
        return n

    def compact(self) -> None:
        """Rewrite the journal with only the live sessions (atomic, mode 0600):
        deleted sessions' secrets leave the disk here."""
        parts = [_HEADER]
        for name, blob in self._latest.items():
            nb = name.encode("ascii")
            payload = bytes([_PUT, len(nb)]) + nb + blob
            parts.append(_REC.pack(len(payload), zlib.crc32(payload)))
            parts.append(payload)
        data = b"".join(parts)
        write_private_file(self.path, data)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._size = len(data)

    def _write(self, buf: bytes) -> None:
        view = memoryview(buf)
        while view:
            view = view[os.write(self._fd, view):]

    def _sync(self) -> None:
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        """Commit what is staged and close the file."""
        if self._fd < 0:
            return
        try:
            self.commit()
        finally:
            os.close(self._fd)
            self._fd = -1
            os.close(self._lock)          # releases the flock
