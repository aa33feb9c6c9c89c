"""The plant's durable outbox: accepted aspiring messages, kept on disk until acked.

``Plant.publish()`` hands messages to :meth:`Outbox.append`, which numbers them with
producer sequence numbers (*pseqs*) and makes the whole batch durable with one
``write`` and one ``fsync`` (group commit) before it returns. The Plant sends them and,
when the sequencer acks a pseq, calls :meth:`Outbox.ack`. Whatever is not acked is
resent after a timeout, a failover or a reboot; the sequencer deduplicates by
``(producer_id, producer_seq)``, so a resend is always safe. Two things are never
safe, and this module exists to prevent them: losing a message ``append()`` accepted,
and giving two different messages the same pseq.

This module must never return from ``append()`` before the batch is on disk (unless
the outbox was opened with ``fsync=False``), reuse a pseq (also after a restart or
after compaction emptied the file), guess about damage in the middle of the file, or
block: when the outbox is full it raises :class:`~orbcast.errors.OutboxFull` and the
caller decides how to wait. It opens no sockets, reads no clock and logs nothing.
It is not thread-safe: one driver owns it.

On-disk format
==============
One directory per outbox, holding:

``outbox.dat``
    the outbox file, described below;
``outbox.dat.tmp``
    a compaction in progress; a leftover one is never authoritative (the rename is
    the commit point) and is deleted on open;
``outbox.torn``
    a copy of the last torn tail that recovery cut off, kept for inspection (one
    file, overwritten, so crashes cannot fill the card);
``outbox.lock``
    an empty file locked with ``flock`` while the outbox is open, so two processes
    never append to the same file.

All integers are big-endian, unsigned. ``outbox.dat`` starts with a header that is
written once, when the file is created (on first open or by compaction, both via a
temp file + fsync + rename), and never modified::

    HEADER = ">8sHHQI"                                                    24 bytes
      0   8  magic       b"ORBOUTBX"
      8   2  version     1
     10   2  flags       0 (reserved)
     12   8  pseq_floor  next_pseq when the file was written: every pseq below it
                         was assigned once, so numbering resumes at
                         max(pseq_floor, highest ENTRY pseq in the file + 1)
     20   4  crc32       zlib CRC-32 of bytes 0..19

Then records, only ever appended::

    RECORD_HEAD = ">2sBBII"                                               12 bytes
      0   2  rmagic      b"\\xf0\\x0b" (lets recovery find record starts after damage)
      2   1  kind        1 = ENTRY, 2 = ACK
      3   1  flags       0 (reserved)
      4   4  length      body length in bytes, at most MAX_RECORD_BODY
      8   4  crc32       zlib CRC-32 of head bytes 0..7 followed by the body
     12  ..  body        `length` bytes

    ENTRY body: ENTRY_FIXED = ">QH", then topic and payload            10+ bytes
      0   8  pseq        producer_seq; strictly increasing along the file
      8   2  topic_len   length of the UTF-8 topic that follows
     10   n  topic       UTF-8
   10+n  ..  payload     the rest of the body, opaque bytes

    ACK body: one or more ACK_RANGE = ">QQ"                         16 bytes each
      0   8  first       first acked pseq of the range
      8   8  last        last acked pseq of the range (inclusive, >= first)

An entry is *pending* when no later ACK record covers its pseq. ACK ranges name only
entries that were pending when the ACK was written.

Examples in hex: a new outbox's file is just the header
``4f52424f55544258 0001 0000 0000000000000001 bbe37b9e``; then
``append([("a/b", b"hi")])`` as pseq 1 appends the 27-byte record
``f00b 01 00 0000000f 2a465e9c 0000000000000001 0003 612f62 6869``.

Recovery (on open)
==================
Records are read from the header on. A record is *valid* when its rmagic, kind and
flags are known, its body fits in the file and its CRC matches. At the first record
that is not valid, recovery searches the rest of the file for any valid record:

* none found: the bad bytes are a torn tail (a record that runs past EOF, a CRC-bad
  last record, zeros to EOF: what a power cut between ``write`` and ``fsync`` leaves).
  They are copied to ``outbox.torn``, the file is truncated at the bad record and
  fsynced, and everything before it is kept. A torn tail can only hold records of an
  ``append()`` that never returned or acks that were never fsynced (see below), so
  nothing accepted is lost; whole entries in front of the tear are kept (they are
  resent, which dedup absorbs) but never half an entry, because each entry carries
  its own CRC.
* a valid record found after it: that is damage, not a tear. Recovery refuses to
  guess and raises :class:`~orbcast.errors.DurabilityError` naming the file and the
  byte offset of the bad record (its ``__cause__`` is a
  :class:`~orbcast.errors.LogCorruptedError` with ``path``/``offset``/``reason``).
  A CRC-valid record whose content is impossible (pseq not increasing, a topic that
  is not UTF-8, an empty ACK) is damage too.

Why acks are not fsynced
========================
``ack()`` appends its ACK record with ``write`` but no ``fsync``. The record is in the
page cache as soon as ``write`` returns, so it survives ``kill -9`` of the plant; only
a power cut or kernel crash can lose it, and then the entries it covered come back as
pending and are resent. The sequencer answers a resent ``(producer_id,
producer_seq)`` with the seq it already assigned, so a lost ack costs one resend and
nothing else, while an fsync per ack would double the SD card writes of the hot path.
The next ``append()``'s fsync (or a compaction) makes earlier ACK records durable too.

Compaction
==========
ACK records and acked entries are dead weight. When the dead part of the file exceeds
``COMPACT_MIN_DEAD_BYTES`` *and* half the file, :meth:`Outbox.ack` calls
:meth:`Outbox.compact`, which writes the pending entries in pseq order under a fresh
header (``pseq_floor = next_pseq``) to ``outbox.dat.tmp``, fsyncs it, renames it over
``outbox.dat`` and fsyncs the directory. The file therefore stays below about
``2 x (pending records) + COMPACT_MIN_DEAD_BYTES``, and each byte is rewritten a
bounded number of times on average. Because the new header carries ``next_pseq``, a
restart after compaction removed every entry still continues the numbering.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from orbcast.errors import (
    ClosedError,
    ConfigError,
    DurabilityError,
    LocalProtocolError,
    LogCorruptedError,
    OutboxFull,
    OutboxWriteFailed,
)
from orbcast.fsutil import fsync_dir

__all__ = [
    "COMPACT_MIN_DEAD_BYTES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_COUNT",
    "MAX_RECORD_BODY",
    "MAX_TOPIC_BYTES",
    "Outbox",
]

# ---------------------------------------------------------------------------
# File names inside the outbox directory.
FILE_NAME: Final = "outbox.dat"
TEMP_NAME: Final = "outbox.dat.tmp"
TORN_NAME: Final = "outbox.torn"
LOCK_NAME: Final = "outbox.lock"

# ---------------------------------------------------------------------------
# Format constants (see the module docstring for the layout).
MAGIC: Final = b"ORBOUTBX"
VERSION: Final = 1
HEADER: Final = struct.Struct(">8sHHQI")
#: Bytes of the header covered by its CRC (everything before the CRC field).
HEADER_CRC_SPAN: Final = HEADER.size - 4

RECORD_MAGIC: Final = b"\xf0\x0b"
RECORD_HEAD: Final = struct.Struct(">2sBBII")
#: The part of the record head covered by the record CRC (everything before the CRC).
RECORD_HEAD_START: Final = struct.Struct(">2sBBI")
RECORD_CRC_SPAN: Final = RECORD_HEAD_START.size
KIND_ENTRY: Final = 1
KIND_ACK: Final = 2
_KINDS: Final = frozenset({KIND_ENTRY, KIND_ACK})

ENTRY_FIXED: Final = struct.Struct(">QH")
ACK_RANGE: Final = struct.Struct(">QQ")
#: An ENTRY's record head and fixed part in one pack, with (_ENTRY_HEAD) and
#: without (_ENTRY_CRC_INPUT, what the CRC covers before topic and payload) the
#: CRC field: the hot path packs twice and runs three CRCs per entry, not four.
_ENTRY_HEAD: Final = struct.Struct(">2sBBIIQH")
_ENTRY_CRC_INPUT: Final = struct.Struct(">2sBBIQH")

# ---------------------------------------------------------------------------
# Bounds.
#: Default bound on pending messages. A Pi that cannot reach the sequencer for a
#: while keeps publishing into the outbox; 10 000 sensor readings is minutes to hours
#: of backlog while staying far below a Pi Zero's memory (every pending entry is also
#: held in memory).
DEFAULT_MAX_COUNT: Final = 10_000
#: Default bound on pending topic + payload bytes: 16 MiB is held in memory and
#: rewritten by compaction, both cheap even on a 512 MiB Pi Zero.
DEFAULT_MAX_BYTES: Final = 16 << 20
#: Compaction runs only when at least this many dead bytes (acked entries and ACK
#: records) are in the file *and* they are more than half of it. 8 MiB keeps
#: rewrites rare on a busy plant (at most one per 8 MiB of traffic: fewer fsync +
#: rename + directory fsync rounds, less SD-card wear, ~10 % less publisher CPU
#: than 1 MiB in bench/outbox) and caps the garbage an idle outbox carries at a
#: size any SD card can spare.
COMPACT_MIN_DEAD_BYTES: Final = 8 << 20
#: The topic length field is 16 bits. The protocol may allow less; the outbox
#: itself refuses only what it cannot store.
MAX_TOPIC_BYTES: Final = 0xFFFF
#: Largest record body recovery accepts. No sane outbox holds one message near
#: 256 MiB, so a length above this can only be garbage and is treated as a bad record.
MAX_RECORD_BODY: Final = 1 << 28
#: ACK ranges per ACK record (64 KiB of body); a larger ack() writes several records
#: in the same single write.
ACK_RANGES_PER_RECORD: Final = 4096
#: pseqs are 64-bit on disk and on the wire.
MAX_PSEQ: Final = (1 << 64) - 1
#: Compaction writes the temp file in chunks of about this size, so it needs no
#: second copy of the whole outbox in memory.
COMPACT_WRITE_CHUNK: Final = 1 << 20
#: The in-memory pseq index is rebuilt once its acked slots outnumber the pending ones
#: by this many; the slack keeps a small outbox from rebuilding on every ack.
_ORDER_SLACK: Final = 1024

_ENTRY_OVERHEAD: Final = RECORD_HEAD.size + ENTRY_FIXED.size
#: Validated topic encodings kept by append(); a plant uses few topics, and the
#: bound keeps one cycling through unique topics from growing it.
TOPIC_CACHE_SIZE: Final = 1024


def _encode_entries(entries: Iterable[tuple[int, bytes, bytes]], out: list[bytes]) -> int:
    """Append the parts of ENTRY records for ``(pseq, topic, payload)`` to ``out``.

    Returns the bytes added. The caller joins ``out`` once, so a batch costs one
    copy. This is the hot path of ``append()``: one loop, no call per entry.
    """
    head_pack = _ENTRY_HEAD.pack
    crc_input = _ENTRY_CRC_INPUT.pack
    crc32 = zlib.crc32
    fixed_size = ENTRY_FIXED.size
    total = 0
    for pseq, topic, payload in entries:
        tlen = len(topic)
        length = fixed_size + tlen + len(payload)
        crc = crc32(payload, crc32(topic, crc32(crc_input(RECORD_MAGIC, KIND_ENTRY, 0, length,
                                                          pseq, tlen))))
        out += (head_pack(RECORD_MAGIC, KIND_ENTRY, 0, length, crc, pseq, tlen), topic, payload)
        total += RECORD_HEAD.size + length
    return total


def _record(kind: int, body: bytes) -> bytes:
    start = RECORD_HEAD_START.pack(RECORD_MAGIC, kind, 0, len(body))
    return start + zlib.crc32(body, zlib.crc32(start)).to_bytes(4, "big") + body


def _header(pseq_floor: int) -> bytes:
    start = HEADER.pack(MAGIC, VERSION, 0, pseq_floor, 0)[:HEADER_CRC_SPAN]
    return start + zlib.crc32(start).to_bytes(4, "big")


def _ranges(sorted_pseqs: list[int]) -> list[tuple[int, int]]:
    """Coalesce ascending pseqs into inclusive ``(first, last)`` runs."""
    out: list[tuple[int, int]] = []
    first = last = sorted_pseqs[0]
    for p in sorted_pseqs[1:]:
        if p == last + 1:
            last = p
        else:
            out.append((first, last))
            first = last = p
    out.append((first, last))
    return out


def _valid_record_at(data: bytes, pos: int) -> tuple[int, int] | None:
    """Return ``(kind, end)`` if a valid record starts at ``pos``, else None."""
    if pos + RECORD_HEAD.size > len(data):
        return None
    rmagic, kind, flags, length, crc = RECORD_HEAD.unpack_from(data, pos)
    if rmagic != RECORD_MAGIC or kind not in _KINDS or flags != 0 or length > MAX_RECORD_BODY:
        return None
    body = pos + RECORD_HEAD.size
    end = body + length
    if end > len(data):
        return None
    view = memoryview(data)
    if zlib.crc32(view[body:end], zlib.crc32(view[pos : pos + RECORD_CRC_SPAN])) != crc:
        return None
    return kind, end


class Outbox:
    """A durable, bounded, append-only outbox of aspiring messages.

    ``Outbox(directory)`` opens the outbox in ``directory`` (creating both if needed)
    and recovers it (see the module docstring): afterwards :meth:`pending` returns
    every message that was accepted and not acked before the last shutdown or crash.

    Bounds: ``max_count`` pending messages and ``max_bytes`` pending bytes, counted as
    UTF-8 topic + payload (record framing is not counted). Both bound the in-memory
    copy of the pending set too. If a recovered outbox already holds more (it was
    opened with larger bounds before), nothing is dropped: ``append()`` raises
    ``OutboxFull`` until acks bring it back under the bounds.

    ``fsync=False`` skips every ``fsync`` (the outbox then survives ``kill -9`` but
    not a power cut); it is for tests and tmpfs only.

    Raises ``ConfigError`` for non-positive bounds or when another process has the
    outbox open, ``DurabilityError`` if the file is damaged (see the module
    docstring) or cannot be created, read or repaired.

    Example::

        with Outbox("/var/lib/orbcast/outbox") as box:
            first, second = box.append([("sensors/t", b"21.5"), ("sensors/h", b"40")])
            for pseq, topic, payload in box.pending(limit=100):
                ...  # send Publish(pseq, topic, payload)
            box.ack([first])  # on Ack from the sequencer

    Counters for tests and ``plant status``: ``writes`` (``write`` system calls) and
    ``syncs`` (``fsync`` calls on the outbox files and directory).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_count: int = DEFAULT_MAX_COUNT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        fsync: bool = True,
    ) -> None:
        if max_count < 1:
            raise ConfigError(f"max_count must be >= 1, got {max_count}", field="outbox.max_count")
        if max_bytes < 1:
            raise ConfigError(f"max_bytes must be >= 1, got {max_bytes}", field="outbox.max_bytes")
        self._dir = Path(directory)
        self._path = self._dir / FILE_NAME
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._fsync = fsync
        self.writes = 0
        self.syncs = 0
        #: appends refused by write() (a full disk) and cut back: the outbox went on
        self.write_failures = 0
        # pseq -> (topic, payload, topic+payload bytes); insertion order is pseq order.
        self._entries: dict[int, tuple[str, bytes, int]] = {}
        # Ascending pseqs; slots before _head and slots whose pseq is no longer in
        # _entries are acked (lazy deletion), so ack() never shifts the list.
        self._order: list[int] = []
        self._head = 0
        self._size = 0
        self._next_pseq = 1
        self._end = 0  # file size as far as we wrote it
        self._live = 0  # header + records of pending entries: what compaction keeps
        self._broken: BaseException | None = None
        #: topic -> its UTF-8 bytes, for topics already validated (bounded)
        self._topic_cache: dict[str, bytes] = {}
        self._closed = False
        self._fd = -1
        self._lock_fd = -1

        created_dir = not self._dir.exists()
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if created_dir and self._fsync:
                fsync_dir(self._dir.parent)
            self._lock_fd = os.open(self._dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DurabilityError(f"cannot create outbox directory {self._dir}: {exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._release()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    "outbox is already open in another process", source=str(self._dir)
                ) from exc
            raise DurabilityError(f"cannot lock outbox {self._dir}: {exc}") from exc
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    # -- public surface ------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """The outbox directory."""
        return self._dir

    @property
    def path(self) -> Path:
        """The outbox file, ``<directory>/outbox.dat``."""
        return self._path

    @property
    def count(self) -> int:
        """Number of pending (appended, not yet acked) messages."""
        return len(self._entries)

    @property
    def size(self) -> int:
        """Pending bytes: UTF-8 topic + payload summed over pending messages."""
        return self._size

    @property
    def next_pseq(self) -> int:
        """The pseq the next appended message will get (pseqs start at 1)."""
        return self._next_pseq

    @property
    def max_count(self) -> int:
        """Bound on :attr:`count`."""
        return self._max_count

    @property
    def max_bytes(self) -> int:
        """Bound on :attr:`size`."""
        return self._max_bytes

    @staticmethod
    def cost(topic: str, payload: bytes) -> int:
        """What one message adds to :attr:`size`."""
        return len(topic.encode("utf-8")) + len(payload)

    @property
    def file_size(self) -> int:
        """Current size of ``outbox.dat`` in bytes."""
        return self._end

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def append(self, items: Sequence[tuple[str, bytes | bytearray | memoryview]]) -> list[int]:
        """Accept ``items`` (``(topic, payload)`` pairs) durably; return their pseqs.

        The items get consecutive pseqs starting at :attr:`next_pseq` and are written
        as one ``write`` followed by one ``fsync``; the call returns only after both
        succeeded, so every returned pseq survives a power cut. An empty sequence
        returns ``[]`` and writes nothing.

        Raises:
            OutboxFull: the items would push :attr:`count` past ``max_count`` or
                :attr:`size` past ``max_bytes``. Nothing was written, no pseq used.
            LocalProtocolError: an item is malformed (topic not a ``str`` or longer
                than ``MAX_TOPIC_BYTES`` UTF-8 bytes, payload not bytes-like, body over
                ``MAX_RECORD_BODY``) or the
                batch could never fit (more items than ``max_count``, or more bytes
                than ``max_bytes``), so waiting for space would not help.
            DurabilityError: the write or fsync failed. No pseq was returned and the
                in-memory state is unchanged, the bytes written are truncated away
                (best effort), and the outbox is broken: later mutating calls raise
                ``DurabilityError`` too. Close it and stop, or reopen to recover.
            ClosedError: the outbox was closed.
        """
        self._check_writable()
        n = len(items)
        if n == 0:
            return []
        # One pass: validate (topics through a small cache: a plant publishes on
        # few topics) and encode the ENTRY records. This is every publisher's
        # hot path, so no call per entry beyond struct/crc.
        cache = self._topic_cache
        first = self._next_pseq
        head_pack = _ENTRY_HEAD.pack
        crc_input = _ENTRY_CRC_INPUT.pack
        crc32 = zlib.crc32
        fixed_size = ENTRY_FIXED.size
        parts: list[bytes] = []
        prepared: list[tuple[str, bytes, int]] = []
        add = 0
        pseq = first
        for topic, payload in items:
            raw_topic = cache.get(topic) if type(topic) is str else None
            if raw_topic is None:
                raw_topic = self._check_topic(topic)
            if type(payload) is not bytes:
                if not isinstance(payload, (bytearray, memoryview)):
                    raise LocalProtocolError(f"payload must be bytes, got {type(payload).__name__}")
                payload = bytes(payload)
            nbytes = len(raw_topic) + len(payload)
            length = fixed_size + nbytes
            if length > MAX_RECORD_BODY:
                raise LocalProtocolError(
                    f"message of {len(payload)} bytes exceeds the outbox record limit"
                )
            tlen = len(raw_topic)
            crc = crc32(payload, crc32(raw_topic, crc32(crc_input(RECORD_MAGIC, KIND_ENTRY, 0,
                                                                  length, pseq, tlen))))
            parts += (head_pack(RECORD_MAGIC, KIND_ENTRY, 0, length, crc, pseq, tlen),
                      raw_topic, payload)
            prepared.append((topic, payload, nbytes))
            add += nbytes
            pseq += 1
        if n > self._max_count or add > self._max_bytes:
            raise LocalProtocolError(
                f"a batch of {n} messages / {add} bytes can never fit an outbox bounded "
                f"by {self._max_count} messages / {self._max_bytes} bytes"
            )
        count = len(self._entries)
        if count + n > self._max_count or self._size + add > self._max_bytes:
            raise OutboxFull(count, self._size, self._max_count, self._max_bytes)
        if first + n - 1 > MAX_PSEQ:  # 2**64 pseqs: unreachable in practice
            raise LocalProtocolError("producer_seq space exhausted")
        data = b"".join(parts)
        old_end = self._end
        try:
            self._write(data)
        except OSError as exc:
            # write() refused (a full card): nothing of the batch was confirmed. Cut
            # the file back to its last good byte and stay usable; only if that
            # fails too is the file's state unknown.
            try:
                os.ftruncate(self._fd, old_end)
            except OSError:
                self._fail(exc, truncate_to=None)
                raise DurabilityError(
                    f"outbox {self._path}: appending {n} messages failed: {exc}, and "
                    "cutting the file back failed too"
                ) from exc
            self.write_failures += 1
            raise OutboxWriteFailed(
                f"outbox {self._path}: could not write {n} messages ({exc}); nothing "
                "was kept, publish again once there is room"
            ) from exc
        try:
            self._sync()
        except OSError as exc:
            self._fail(exc, truncate_to=old_end)
            raise DurabilityError(
                f"outbox {self._path}: appending {n} messages failed: {exc}"
            ) from exc

        # Point of no return passed: the batch is on disk. Now move memory.
        entries = self._entries
        for i, entry in enumerate(prepared, first):
            entries[i] = entry
        self._order.extend(range(first, first + n))
        self._size += add
        self._end = old_end + len(data)
        self._live += len(data)
        self._next_pseq = first + n
        return list(range(first, first + n))

    def _check_topic(self, topic: object) -> bytes:
        """Validate a topic not seen before and remember its encoding."""
        if not isinstance(topic, str):
            raise LocalProtocolError(f"topic must be str, got {type(topic).__name__}")
        try:
            raw_topic = topic.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise LocalProtocolError(f"topic {topic!r} is not valid UTF-8: {exc}") from exc
        if len(raw_topic) > MAX_TOPIC_BYTES:
            raise LocalProtocolError(
                f"topic of {len(raw_topic)} bytes exceeds {MAX_TOPIC_BYTES} bytes"
            )
        if len(self._topic_cache) >= TOPIC_CACHE_SIZE:
            self._topic_cache.clear()
        self._topic_cache[topic] = raw_topic
        return raw_topic

    def get(self, pseq: int) -> tuple[str, bytes] | None:
        """``(topic, payload)`` of a pending entry, or ``None`` if acked or unknown. O(1)."""
        e = self._entries.get(pseq)
        return None if e is None else (e[0], e[1])

    def pending(self, limit: int | None = None, *, after: int = 0) -> list[tuple[int, str, bytes]]:
        """Return up to ``limit`` pending ``(pseq, topic, payload)`` with pseq > ``after``.

        In ascending pseq order. ``limit=None`` means all. Costs O(log n + k) for k
        returned entries, plus any slots of entries acked out of order inside the
        scanned range (acked slots at the front are swept on every ack, and the index
        is rebuilt when acked slots outnumber pending ones). A sender pages through a
        large backlog with ``after=<last pseq sent>``.

        Raises ``ValueError`` for a negative limit, ``ClosedError`` after close. Works
        on a broken outbox (it shows the last durable state).
        """
        self._check_open()
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        out: list[tuple[int, str, bytes]] = []
        order = self._order
        entries = self._entries
        want = len(entries) if limit is None else min(limit, len(entries))
        i = bisect.bisect_right(order, after, lo=self._head)
        end = len(order)
        while i < end and len(out) < want:
            pseq = order[i]
            entry = entries.get(pseq)
            if entry is not None:
                out.append((pseq, entry[0], entry[1]))
            i += 1
        return out

    def ack(self, pseqs: Iterable[int]) -> int:
        """Mark ``pseqs`` acked; return how many were pending until now.

        Unknown and already-acked pseqs are ignored. The ACK record is written but
        not fsynced (see "Why acks are not fsynced" in the module docstring): after a
        power cut the entries may come back as pending and are resent, which the
        sequencer's dedup absorbs. Costs O(k log k) for k pseqs, plus an occasional
        compaction (amortised O(1) per byte ever appended).

        Raises ``DurabilityError`` if the write (or an automatic compaction) fails;
        the outbox is then broken as described for :meth:`append`. ``ClosedError``
        after close.
        """
        self._check_writable()
        entries = self._entries
        newly = sorted({p for p in pseqs if p in entries})
        if not newly:
            return 0
        runs = _ranges(newly)
        data = b"".join(
            _record(KIND_ACK, b"".join(ACK_RANGE.pack(a, b) for a, b in chunk))
            for chunk in (
                runs[i : i + ACK_RANGES_PER_RECORD]
                for i in range(0, len(runs), ACK_RANGES_PER_RECORD)
            )
        )
        old_end = self._end
        try:
            self._write(data)
        except OSError as exc:
            self._fail(exc, truncate_to=old_end)
            raise DurabilityError(f"outbox {self._path}: writing an ack failed: {exc}") from exc
        self._end = old_end + len(data)
        freed = 0
        for p in newly:
            nbytes = entries.pop(p)[2]
            freed += nbytes
            self._live -= _ENTRY_OVERHEAD + nbytes
        self._size -= freed
        self._sweep()
        dead = self._end - self._live
        if dead > COMPACT_MIN_DEAD_BYTES and 2 * dead > self._end:
            self.compact()
        return len(newly)

    def compact(self) -> None:
        """Rewrite the file with only the pending entries.

        Writes ``outbox.dat.tmp`` (header with ``pseq_floor = next_pseq``, then the
        pending entries in pseq order), fsyncs it, renames it over ``outbox.dat`` and
        fsyncs the directory. A crash at any point leaves either the old or the new
        file, both complete. :meth:`ack` calls this automatically when the dead part of
        the file passes ``COMPACT_MIN_DEAD_BYTES`` and half the file.

        Raises ``DurabilityError`` (the outbox is then broken) if any step fails,
        ``ClosedError`` after close.
        """
        self._check_writable()
        try:
            end = self._write_file(self._next_pseq, self._entries)
            new_fd = os.open(self._path, os.O_RDWR | os.O_APPEND)
        except OSError as exc:
            self._fail(exc, truncate_to=None)
            raise DurabilityError(f"outbox {self._path}: compaction failed: {exc}") from exc
        os.close(self._fd)
        self._fd = new_fd
        self._end = end
        self._live = end
        self._order = list(self._entries)
        self._head = 0

    def close(self) -> None:
        """Close the file and release the directory lock. Idempotent.

        Everything appended has already been fsynced, so close adds no durability;
        it only releases resources. Afterwards every method but ``close`` raises
        ``ClosedError``; the properties keep their last values.
        """
        if self._closed:
            return
        self._closed = True
        self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self._broken else "open"
        return (
            f"<Outbox {str(self._dir)!r} {state} count={self.count}/{self._max_count} "
            f"size={self._size}/{self._max_bytes} next_pseq={self._next_pseq}>"
        )

    # -- I/O steps (separate so tests can make them fail) ---------------------------

    def _write(self, data: bytes) -> None:
        """Append ``data`` to the outbox file."""
        self._write_to(self._fd, data)

    def _sync(self) -> None:
        if self._fsync:
            os.fsync(self._fd)
            self.syncs += 1

    def _sync_dir(self) -> None:
        if self._fsync:
            fsync_dir(self._dir)
            self.syncs += 1

    def _write_file(self, pseq_floor: int, entries: dict[int, tuple[str, bytes, int]]) -> int:
        """Atomically replace ``outbox.dat`` with ``entries`` under a new header.

        Returns the new file size. Raises ``OSError``; the temp file is removed then.
        """
        tmp = self._dir / TEMP_NAME
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            parts: list[bytes] = [_header(pseq_floor)]
            pending_len = HEADER.size
            total = 0
            for pseq, (topic, payload, _) in entries.items():
                pending_len += _encode_entries([(pseq, topic.encode("utf-8"), payload)], parts)
                if pending_len >= COMPACT_WRITE_CHUNK:
                    total += self._write_to(fd, b"".join(parts))
                    parts.clear()
                    pending_len = 0
            if parts:
                total += self._write_to(fd, b"".join(parts))
            if self._fsync:
                os.fsync(fd)
                self.syncs += 1
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        os.close(fd)
        try:
            os.replace(tmp, self._path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        self._sync_dir()
        return total

    def _write_to(self, fd: int, data: bytes) -> int:
        """Write all of ``data``: one ``write`` call unless the kernel writes short."""
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            self.writes += 1
            view = view[written:]
        return len(data)

    # -- open and recovery ------------------------------------------------------

    def _open(self) -> None:
        _unlink_quietly(self._dir / TEMP_NAME)
        if not self._path.exists():
            try:
                self._write_file(1, {})
            except OSError as exc:
                raise DurabilityError(f"cannot create outbox {self._path}: {exc}") from exc
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_APPEND)
            with open(self._fd, "rb", closefd=False) as f:
                data = f.read()
        except OSError as exc:
            raise DurabilityError(f"cannot read outbox {self._path}: {exc}") from exc
        good_end = self._recover(data)
        if good_end < len(data):
            self._cut_torn_tail(data, good_end)
        self._end = good_end

    def _damage(self, offset: int, reason: str) -> DurabilityError:
        err = DurabilityError(
            f"outbox {self._path} is damaged at byte offset {offset}: {reason}; "
            "refusing to guess (inspect or move the file aside)"
        )
        err.__cause__ = LogCorruptedError(str(self._path), offset, reason)
        return err

    def _recover(self, data: bytes) -> int:
        """Load ``data`` into memory; return the offset where valid records end."""
        if len(data) < HEADER.size:
            raise self._damage(0, f"file of {len(data)} bytes is shorter than the header")
        magic, version, flags, floor, crc = HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            raise self._damage(0, f"bad magic {magic!r}, not an outbox file")
        if zlib.crc32(data[:HEADER_CRC_SPAN]) != crc:
            raise self._damage(0, "header CRC mismatch")
        if version != VERSION or flags != 0:
            raise self._damage(0, f"unsupported version {version} / flags {flags}")
        if floor < 1:
            raise self._damage(0, f"pseq_floor {floor} < 1")

        entries = self._entries
        view = memoryview(data)
        last_pseq = 0
        pos = HEADER.size
        size = len(data)
        live = HEADER.size
        while pos < size:
            found = _valid_record_at(data, pos)
            if found is None:
                later = self._find_valid_record(data, pos + 1)
                if later is not None:
                    raise self._damage(
                        pos, f"invalid record followed by a valid one at offset {later}"
                    )
                break  # torn tail: the caller truncates at pos
            kind, end = found
            body = pos + RECORD_HEAD.size
            if kind == KIND_ENTRY:
                if end - body < ENTRY_FIXED.size:
                    raise self._damage(pos, "ENTRY body shorter than its fixed part")
                pseq, topic_len = ENTRY_FIXED.unpack_from(data, body)
                tstart = body + ENTRY_FIXED.size
                if tstart + topic_len > end:
                    raise self._damage(pos, "ENTRY topic runs past the record")
                if pseq <= last_pseq:
                    raise self._damage(pos, f"pseq {pseq} does not follow pseq {last_pseq}")
                try:
                    topic = str(view[tstart : tstart + topic_len], "utf-8")
                except UnicodeDecodeError:
                    raise self._damage(pos, "ENTRY topic is not UTF-8") from None
                payload = bytes(view[tstart + topic_len : end])
                nbytes = topic_len + len(payload)
                entries[pseq] = (topic, payload, nbytes)
                self._size += nbytes
                live += end - pos
                last_pseq = pseq
            else:
                blen = end - body
                if blen == 0 or blen % ACK_RANGE.size:
                    raise self._damage(pos, f"ACK body of {blen} bytes is not whole ranges")
                for off in range(body, end, ACK_RANGE.size):
                    first, last = ACK_RANGE.unpack_from(data, off)
                    if first < 1 or last < first:
                        raise self._damage(pos, f"bad ACK range {first}..{last}")
                    if last - first + 1 <= len(entries):
                        hits = [p for p in range(first, last + 1) if p in entries]
                    else:
                        hits = [p for p in entries if first <= p <= last]
                    for p in hits:
                        nbytes = entries.pop(p)[2]
                        self._size -= nbytes
                        live -= _ENTRY_OVERHEAD + nbytes
            pos = end
        self._order = list(entries)
        self._next_pseq = max(floor, last_pseq + 1)
        self._live = live
        return pos

    @staticmethod
    def _find_valid_record(data: bytes, start: int) -> int | None:
        """Offset of the first valid record at or after ``start``, else None."""
        pos = data.find(RECORD_MAGIC, start)
        while pos != -1:
            if _valid_record_at(data, pos) is not None:
                return pos
            pos = data.find(RECORD_MAGIC, pos + 1)
        return None

    def _cut_torn_tail(self, data: bytes, good_end: int) -> None:
        """Copy ``data[good_end:]`` aside to ``outbox.torn`` and truncate it away."""
        try:
            fd = os.open(self._dir / TORN_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                self._write_to(fd, data[good_end:])
            finally:
                os.close(fd)
        except OSError:
            pass  # the copy is for inspection only; truncation must still happen
        try:
            os.ftruncate(self._fd, good_end)
            self._sync()
        except OSError as exc:
            raise DurabilityError(
                f"cannot truncate the torn tail of {self._path} at offset {good_end}: {exc}"
            ) from exc

    # -- state guards -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"outbox {self._dir} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._broken is not None:
            raise DurabilityError(
                f"outbox {self._path} is broken by an earlier failed write "
                f"({self._broken}); reopen it to recover from disk"
            ) from self._broken

    def _fail(self, exc: BaseException, *, truncate_to: int | None) -> None:
        """Mark the outbox broken after a failed durable step.

        After a failed fsync the kernel's view of the file cannot be trusted
        (retrying fsync may report success for data that never reached the card), so
        the outbox stops accepting writes. The unconfirmed bytes are truncated away
        (best effort) so that a reopen does not resurrect messages whose append()
        raised.
        """
        self._broken = exc
        if truncate_to is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, truncate_to)

    def _sweep(self) -> None:
        """Advance past acked slots at the head of the pseq index; rebuild the index
        once its acked slots outnumber the pending ones (amortised O(1) per ack)."""
        order = self._order
        entries = self._entries
        head = self._head
        n = len(order)
        while head < n and order[head] not in entries:
            head += 1
        self._head = head
        if n - len(entries) > len(entries) + _ORDER_SLACK:
            self._order = list(entries)
            self._head = 0

    def _release(self) -> None:
        """Close the outbox file, then the lock file (which releases the flock)."""
        fds = (self._fd, self._lock_fd)
        self._fd = self._lock_fd = -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
