"""The durable log store: the canonical sequence on disk, one segment file per UTC day.

The sequencer appends every canonical record here, ``fsync``\\ s a batch (group commit)
before it acks or publishes it, and serves replays and late starts from it. This module
must never advance its in-memory end before the bytes are written, load the bodies of a
whole segment into memory, hand out a record whose CRC or seq does not check, or guess
about damage in the middle of a segment: it refuses with
:class:`~orbcast.errors.LogCorruptedError` naming the file and the byte offset. It opens
no sockets and logs nothing (the driver reports :attr:`LogStore.torn_tails`); it reads
the clock only for the default ``now_ns`` of the constructor and to time ``sync()``.
It is not thread-safe: one driver owns it.

On-disk format (version 1)
==========================
A log directory holds, for each UTC day that has records, ``YYYY-MM-DD.seg`` (the
segment) and ``YYYY-MM-DD.idx`` (its sidecar index), plus ``aside/`` for bytes that
recovery or :meth:`LogStore.truncate_after` removed. A record belongs to the segment of
the UTC day of its ``time_ns`` (``time_ns // NS_PER_DAY`` days after 1970-01-01).
All integers are unsigned big-endian; there is no padding anywhere.

Segment file: a 16-byte header, ``FILE_HEADER = ">8sII"``, then records back to back::

      0   8  magic     SEGMENT_MAGIC = b"\\x89ORBLOG\\n"
      8   4  version   FORMAT_VERSION = 1
     12   4  flags     0 (reserved; a reader refuses any other value)
     16  ..  records

Record: a 24-byte header, ``RECORD_HEADER = ">IIQQ"``, then the body::

      0   4  length    body length in bytes, at most MAX_BODY_SIZE
      4   4  crc       zlib.crc32 of record bytes [8, 24 + length): seq, time_ns, body
      8   8  seq       gap-free: the first record of segment k+1 follows the last of k
     16   8  time_ns   sequencer wall clock, ns since the Unix epoch, non-decreasing
     24  ..  body      opaque bytes (a CBOR canonical record)

Example: seq 1 at 1970-01-02T00:00:00Z (time_ns 86400000000000) with body ``b"hi"`` is
``00000002 <crc> 0000000000000001 00004e94914f0000 6869``.

Index file (derived data, never fsynced): a 16-byte header ``FILE_HEADER`` with magic
``INDEX_MAGIC = b"\\x89ORBIDX\\n"``, version 1 and, in place of flags, ``every`` (the
indexing interval); then ``INDEX_ENTRY = ">QQQ"`` entries ``(seq, time_ns, offset)``
for the segment's first record and every ``every``-th record after it, so entry *i*
names seq ``first_seq + i * every``. Entries are appended after the segment write; an
index that is missing, malformed, or names a record that does not verify is rebuilt
from the segment. A trailing partial entry is ignored.

What is checked, and when
=========================
* Open: every segment's header; the index entry for its first record and the last
  index entry that verifies (seq, time and CRC of the record it names); every record
  from that entry to the end of the file (at most ``every`` records, unless the index
  lagged); seq continuity between segments.
* Read: the CRC and seq of every record :meth:`LogStore.read` returns.
* :func:`verify_segment` (``sequencer check``): every record of one segment.

So damage to an old record is found when it is read or checked, not at open.

Recovery (on open)
==================
At the first record of the **newest** segment that fails (incomplete header, length
past EOF or above MAX_BODY_SIZE, CRC mismatch, seq not previous + 1), recovery decides:

* **torn tail** when the record's declared extent reaches or passes EOF (and no intact
  record with the next seq is found after it: a bit flip in a length field must not
  pass for a torn write), or when every byte from it to EOF is zero. Those bytes are
  copied to ``aside/<segment>.torn-<offset>`` (fsynced), the segment is truncated
  there and fsynced, and the aside path is added to :attr:`LogStore.torn_tails`. A
  segment left with no record (a crash right after it was created) is deleted.
* **corruption in the middle** otherwise: :class:`LogCorruptedError` and nothing on
  disk changes.

Any failure in an older segment is corruption: its tail was fsynced before the next
segment was created (see :meth:`LogStore.append`), so it cannot be torn. Index entries
past the new end are dropped and the index rewritten. One limit of the rule: damage to
the *last* record of the newest segment cannot be told from a torn write, so it is set
aside like one (the aside copy keeps the bytes).

``aside/`` also receives what :meth:`LogStore.truncate_after` removes:
``<segment>.<old last_seq>.tail`` (raw bytes for a cut segment, the whole file for a
segment dropped entirely). Names never collide: ``.1``, ``.2``, ... are appended.
Nothing deletes files from ``aside/``; that is the operator's call.
"""

from __future__ import annotations

import os
import re
import struct
import time
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from types import TracebackType
from typing import Self

from orbcast.errors import (
    ClosedError,
    ConfigError,
    DurabilityError,
    LocalProtocolError,
    LogCorruptedError,
)

__all__ = [
    "FILE_HEADER",
    "FORMAT_VERSION",
    "INDEX_ENTRY",
    "INDEX_MAGIC",
    "MAX_BODY_SIZE",
    "NS_PER_DAY",
    "RECORD_HEADER",
    "SEGMENT_MAGIC",
    "LogStore",
    "Record",
    "verify_segment",
]

Record = tuple[int, int, bytes]
"""``(seq, time_ns, body)``."""

SEGMENT_MAGIC = b"\x89ORBLOG\n"
INDEX_MAGIC = b"\x89ORBIDX\n"
FORMAT_VERSION = 1
FILE_HEADER = struct.Struct(">8sII")  # magic, version, flags (segment) or every (index)
RECORD_HEADER = struct.Struct(">IIQQ")  # length, crc, seq, time_ns
INDEX_ENTRY = struct.Struct(">QQQ")  # seq, time_ns, offset
_LENGTH_CRC = struct.Struct(">II")
_SEQ_TIME = struct.Struct(">QQ")
_HEAD = FILE_HEADER.size  # 16: offset of a segment's first record
_RHEAD = RECORD_HEADER.size  # 24
_CRC_FROM = 8  # the CRC covers a record from its seq field to the end of its body

#: Largest body a record may hold. Real bodies are at most 256 KiB; a length above
#: this is damage (a flipped high bit), not data, and is never allocated.
MAX_BODY_SIZE = 64 << 20
#: One index entry per this many records: a seek scans at most this many headers, and
#: the index costs 24 bytes per 1024 records (~270 KB of RAM for 1 GB of 64 B bodies).
DEFAULT_INDEX_EVERY = 1024
#: Upper bound for ``index_every``; beyond it seeks degrade towards scanning a day.
MAX_INDEX_EVERY = 1 << 20
#: Days kept before today's: a week of replay for a plant that was off (the design's
#: "catch up on the whole day", with margin), ~7 GB at 1 GB/day on a Pi's SD card.
DEFAULT_RETENTION_DAYS = 7
#: read() defaults: one replay chunk. The byte bound is on bodies, not headers.
DEFAULT_MAX_RECORDS = 4096
DEFAULT_MAX_BYTES = 1 << 20
#: Smallest pread of read(): amortises the syscall over ~700 records of 64 B.
READ_BLOCK_MIN = 64 << 10
#: Largest pread of read() (unless one record is bigger): caps the transient buffer so
#: a node serving replays stays within its ~40 MB RSS budget.
READ_BLOCK_MAX = 4 << 20
#: Block size of the scans (recovery, index rebuild, verify_segment, set-aside copies).
SCAN_BLOCK = 1 << 20
#: Block size when stepping over headers to a seq or a time (bodies are skipped).
WALK_BLOCK = 64 << 10
#: A UTC day in ns (Unix time has no leap seconds): segment of t = t // NS_PER_DAY.
NS_PER_DAY = 86_400 * 1_000_000_000
_U64 = 1 << 64  # seq and time_ns are u64 on disk
_EPOCH = date(1970, 1, 1)
_SEGMENT_NAME = re.compile(r"(\d{4}-\d{2}-\d{2})\.seg")
_OPEN_FLAGS = getattr(os, "O_CLOEXEC", 0)
ASIDE_DIR = "aside"  # under the log directory: removed bytes, kept for the operator


def day_name(day: int) -> str:
    """``YYYY-MM-DD`` of ``day`` days after 1970-01-01 (``time_ns // NS_PER_DAY``)."""
    return (_EPOCH + timedelta(days=day)).isoformat()


@dataclass(slots=True)
class _Stats:
    """Work counters, for tests and benchmarks."""

    records_scanned: int = 0  # headers parsed by read(), seeks and seq_for_time
    bytes_read: int = 0


@dataclass(slots=True)
class _Damage:
    """The first record that failed: where, why, and how far it claims to extend."""

    offset: int
    reason: str
    extent: int | None  # offset + 24 + length; None when even the header is incomplete
    next_seq: int  # seq of the record that would follow it (for the evidence search)


@dataclass(slots=True)
class _Scan:
    end: int  # offset just past the last good record
    first_seq: int
    next_seq: int  # seq after the last good record
    last_time: int
    count: int
    damage: _Damage | None


@dataclass(slots=True, eq=False)
class _Segment:
    day: int
    path: str
    idx_path: str
    every: int
    first_seq: int = 0
    last_seq: int = 0
    last_time: int = 0
    size: int = 0  # end of the last good record == file size once open
    iseq: array[int] = field(default_factory=lambda: array("Q"))
    itime: array[int] = field(default_factory=lambda: array("Q"))
    ioff: array[int] = field(default_factory=lambda: array("Q"))
    idx_dirty: bool = False  # the .idx on disk differs from the arrays: rewrite it
    idx_appendable: bool = True  # False after an index write failed (until rewritten)
    rfd: int | None = None
    wfd: int | None = None
    ifd: int | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _pread_exact(fd: int, n: int, off: int) -> bytes:
    data = os.pread(fd, n, off)
    while len(data) < n:  # pread may return less on some filesystems; EOF returns b""
        more = os.pread(fd, n - len(data), off + len(data))
        if not more:
            break
        data += more
    return data


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _scan(fd: int, size: int, off: int, seq: int, first_seq: int, every: int,
          index: tuple[array[int], array[int], array[int]] | None) -> _Scan:
    """CRC-check records from ``off`` to ``size``; stop at the first that fails.

    ``seq`` is the seq the record at ``off`` must have (0: any seq >= 1, which then
    becomes ``first_seq``). Index entries for seqs after the last one already in
    ``index`` are appended to it. Reads ``SCAN_BLOCK`` at a time; keeps no bodies.
    """
    unpack, crc32 = RECORD_HEADER.unpack_from, zlib.crc32
    count, last_time, want = 0, 0, SCAN_BLOCK
    iseq, itime, ioff = index if index is not None else (array("Q"), array("Q"), array("Q"))

    def result(damage: _Damage | None) -> _Scan:
        return _Scan(off, first_seq, seq, last_time, count, damage)

    while off < size:
        if off + _RHEAD > size:
            return result(_Damage(off, "incomplete record header", None, seq + 1))
        blk = _pread_exact(fd, min(max(want, SCAN_BLOCK), size - off), off)
        mv, end, pos, want = memoryview(blk), len(blk), 0, SCAN_BLOCK
        while pos + _RHEAD <= end:
            length, crc, s, t = unpack(blk, pos)
            stop = pos + _RHEAD + length
            at = off + pos
            if length > MAX_BODY_SIZE or off + stop > size:
                why = "absurd body length" if length > MAX_BODY_SIZE else "record runs past EOF"
                off += pos
                return result(_Damage(at, f"{why} ({length} bytes)", at + _RHEAD + length,
                                      (seq or s) + 1))
            if stop > end:  # the record continues in the next block
                want = stop - pos
                break
            if crc32(mv[pos + _CRC_FROM : stop]) != crc:
                off += pos
                return result(_Damage(at, "CRC mismatch", at + _RHEAD + length, (seq or s) + 1))
            if s != seq and not (seq == 0 and s >= 1):
                off += pos
                return result(_Damage(at, f"seq {s} where {seq or '>= 1'} was expected",
                                      at + _RHEAD + length, (seq or s) + 1))
            if seq == 0:
                seq = first_seq = s
            if (s - first_seq) % every == 0 and (not iseq or s > iseq[-1]):
                iseq.append(s)
                itime.append(t)
                ioff.append(at)
            last_time, seq, count, pos = t, seq + 1, count + 1, stop
        off += pos
    return result(None)


def _verify_record(fd: int, size: int, off: int, seq: int, time_ns: int | None) -> bool:
    """Whether a whole record with this seq (and time) and a good CRC starts at ``off``."""
    if off < _HEAD or off + _RHEAD > size:
        return False
    length, crc, s, t = RECORD_HEADER.unpack(_pread_exact(fd, _RHEAD, off))
    if s != seq or (time_ns is not None and t != time_ns):
        return False
    if length > MAX_BODY_SIZE or off + _RHEAD + length > size:
        return False
    return bool(zlib.crc32(_pread_exact(fd, 16 + length, off + _CRC_FROM)) == crc)


def _is_torn(fd: int, size: int, damage: _Damage) -> bool:
    """Apply the torn-tail rule of the module docstring to the first failed record."""
    if damage.extent is None:
        return True  # the header itself is cut off
    if damage.offset > 0 and damage.extent >= size:
        return not _later_record(fd, size, damage.offset + _RHEAD, damage.next_seq)
    pos = damage.offset
    while pos < size:
        chunk = os.pread(fd, min(SCAN_BLOCK, size - pos), pos)
        if not chunk:
            break
        if chunk.strip(b"\0"):
            return False  # a non-zero byte: something was written there
        pos += len(chunk)
    return True


def _later_record(fd: int, size: int, start: int, seq: int) -> bool:
    """Whether an intact record with ``seq`` starts at or after ``start``."""
    needle = struct.pack(">Q", seq)
    pos = start + _CRC_FROM
    while pos < size:
        chunk = os.pread(fd, min(SCAN_BLOCK + 7, size - pos), pos)
        hit = chunk.find(needle)
        while hit >= 0:
            if _verify_record(fd, size, pos + hit - _CRC_FROM, seq, None):
                return True
            hit = chunk.find(needle, hit + 1)
        pos += SCAN_BLOCK
    return False


def _read_index(path: str) -> tuple[int, array[int], array[int], array[int], bool] | None:
    """Load and structurally check an index file: ``(every, seqs, times, offsets, exact)``,
    ``exact`` being False when a partial entry trails. None if missing or malformed."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) < _HEAD + INDEX_ENTRY.size:
        return None
    magic, version, every = FILE_HEADER.unpack_from(data)
    if magic != INDEX_MAGIC or version != FORMAT_VERSION or not 1 <= every <= MAX_INDEX_EVERY:
        return None
    iseq, itime, ioff = array("Q"), array("Q"), array("Q")
    partial = (len(data) - _HEAD) % INDEX_ENTRY.size
    for s, t, o in INDEX_ENTRY.iter_unpack(data[_HEAD : len(data) - partial]):
        if iseq and (s != iseq[-1] + every or t < itime[-1] or o <= ioff[-1]):
            return None
        iseq.append(s)
        itime.append(t)
        ioff.append(o)
    return (every, iseq, itime, ioff, not partial) if ioff[0] == _HEAD else None


def verify_segment(path: str | os.PathLike[str]) -> int:
    """Check every record of one segment file and return how many it holds.

    For ``sequencer check``: reads the whole file, ``SCAN_BLOCK`` at a time. Raises
    :class:`LogCorruptedError` at the first bad header or record (a torn tail too; the
    reason says so), ``OSError`` if the file cannot be read.

    >>> verify_segment("/var/lib/orbcast/log/2024-05-01.seg")  # doctest: +SKIP
    128934
    """
    p = os.fspath(path)
    fd = os.open(p, os.O_RDONLY | _OPEN_FLAGS)
    try:
        size = os.fstat(fd).st_size
        damage = _check_header(fd)
        count = 0
        if damage is None:
            scan = _scan(fd, size, _HEAD, 0, 0, MAX_INDEX_EVERY, None)
            damage, count = scan.damage, scan.count
        if damage is not None:
            torn = " (looks like a torn tail)" if _is_torn(fd, size, damage) else ""
            raise LogCorruptedError(p, damage.offset, damage.reason + torn)
        return count
    finally:
        os.close(fd)


def _check_header(fd: int) -> _Damage | None:
    """The segment header's damage, if any (a bad header is at offset 0)."""
    head = _pread_exact(fd, _HEAD, 0)
    if len(head) < _HEAD:
        return _Damage(0, f"incomplete segment header ({len(head)} bytes)", None, 0)
    magic, version, flags = FILE_HEADER.unpack(head)
    if magic != SEGMENT_MAGIC:
        return _Damage(0, f"bad magic {magic!r}", _HEAD, 0)
    if version != FORMAT_VERSION or flags:
        return _Damage(0, f"unsupported version {version} / flags {flags:#x}", _HEAD, 0)
    return None


class LogStore:
    """The sequencer's log: append, group-commit, read by seq or time, recover.

    Opening the directory (created if missing) recovers it as the module docstring
    describes and then applies retention with ``now_ns`` (default: the wall clock).
    ``fsync=False`` turns every fsync off (tests, tmpfs): then nothing is durable.
    ``index_every`` applies to new segments and rebuilt indexes; existing indexes keep
    their own interval.

    >>> log = LogStore("/var/lib/orbcast/log")  # doctest: +SKIP
    >>> log.append([(log.last_seq + 1, time.time_ns(), b"...")])  # doctest: +SKIP
    >>> log.sync()  # seconds spent in fsync  # doctest: +SKIP
    0.0021

    Raises ``ConfigError`` for ``retention_days < 0`` or ``index_every`` outside
    ``1..MAX_INDEX_EVERY``; :class:`LogCorruptedError` for damage recovery must not
    repair (nothing on disk is changed then); ``DurabilityError`` if setting a torn
    tail aside fails; ``OSError`` if the directory cannot be read.
    """

    def __init__(self, directory: str | os.PathLike[str], *,
                 retention_days: int = DEFAULT_RETENTION_DAYS, fsync: bool = True,
                 index_every: int = DEFAULT_INDEX_EVERY, now_ns: int | None = None,
                 retention_at_open: bool = True) -> None:
        if retention_days < 0:
            raise ConfigError(f"retention_days must be >= 0, got {retention_days}",
                              field="retention_days")
        if not 1 <= index_every <= MAX_INDEX_EVERY:
            raise ConfigError(f"index_every must be in 1..{MAX_INDEX_EVERY}, got {index_every}",
                              field="index_every")
        self._dir = os.fspath(directory)
        self._aside = os.path.join(self._dir, ASIDE_DIR)
        self._retention_days = retention_days
        self._do_fsync = fsync
        self._every = index_every
        self._segs: list[_Segment] = []
        self._closed = False
        self._broken: BaseException | None = None
        #: Fault injection (tests, ADMIN ``fault-disk-full``): raised by the next
        #: segment write instead of writing, as a full disk would.
        self.fault_write_error: OSError | None = None
        self._dirty = False  # the newest segment has writes not yet fsynced
        self._dir_dirty = False  # a segment was created since the last directory fsync
        self._stats = _Stats()
        #: (seq, segment, offset) where the last read() stopped, so that the next one,
        #: if it continues there, needs no seek. Reset when records are removed.
        self._cursor: tuple[int, _Segment, int] | None = None
        #: Aside files that recovery created in this open (torn tails), for the driver to log.
        self.torn_tails: list[str] = []
        os.makedirs(self._dir, exist_ok=True)
        try:
            self._recover()
            if retention_at_open:
                self.apply_retention(time.time_ns() if now_ns is None else now_ns)
        except BaseException:
            self._close_fds()
            raise

    # -- state ------------------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        """Oldest retained seq; 0 when the log is empty."""
        return self._segs[0].first_seq if self._segs else 0

    @property
    def last_seq(self) -> int:
        """Newest seq; 0 when the log is empty."""
        return self._segs[-1].last_seq if self._segs else 0

    @property
    def last_time(self) -> int:
        """``time_ns`` of the newest record; 0 when the log is empty."""
        return self._segs[-1].last_time if self._segs else 0

    @property
    def directory(self) -> str:
        """The log directory, as given."""
        return self._dir

    def __repr__(self) -> str:
        return (f"<LogStore {self._dir!r} seq {self.first_seq}..{self.last_seq},"
                f" {len(self._segs)} segments>")

    # -- writing -----------------------------------------------------------------------

    def append(self, records: Sequence[Record], *, trusted: bool = False) -> None:
        """Write ``records`` after the last one: one ``os.write`` per segment touched.

        Seqs must be ``last_seq + 1, + 2, ...`` (an empty log starts at any seq >= 1), times
        non-decreasing and at least ``last_time``, bodies bytes-like and at most
        ``MAX_BODY_SIZE`` bytes. The records are *not* durable until :meth:`sync`
        returns. When a record's UTC day is later than the newest segment's, that
        segment is fsynced and closed (the one fsync append does, once a day: it
        means a crash can only ever tear the newest segment) and a new one is created.

        ``trusted=True`` is for records the caller built itself and knows to be well
        formed (the sequencing core's output: consecutive seqs, non-decreasing times,
        bounded bytes bodies): only the batch's ends are checked against the log
        (first seq and time, last seq), not every record. Records from a peer (a
        standby's replication) must not be appended with it.

        Raises ``LocalProtocolError`` for a bad seq, time or body, with nothing
        written; ``DurabilityError`` if a write or the roll-over fsync fails (the
        records of earlier days in the batch may be in; the store refuses further
        writes); ``ClosedError`` after :meth:`close`.
        """
        self._check_writable()
        expect, prev_t = self.last_seq + 1, self.last_time
        if self.last_seq == 0 and records and records[0][0] >= 1:
            # an empty log may start anywhere: a standby seeded from an active
            # node whose retention already removed the first days
            expect = records[0][0]
        if trusted and records:
            n = len(records)
            if (records[0][0] != expect or records[-1][0] != expect + n - 1
                    or not prev_t <= records[0][1] <= records[-1][1] < _U64):
                raise LocalProtocolError(f"trusted records {records[0][0]}..{records[-1][0]} do"
                                         f" not follow the log (seq {expect}, time {prev_t})")
            records_to_check: Sequence[Record] = ()
        else:
            records_to_check = records
        for i, rec in enumerate(records_to_check):
            seq, t, body = rec
            if seq != expect:
                raise LocalProtocolError(f"record {i} has seq {seq}, the log expects {expect}")
            if not prev_t <= t < _U64:
                raise LocalProtocolError(f"record {i} (seq {seq}) has time_ns {t}, before {prev_t}"
                                         " or out of range")
            if not isinstance(body, (bytes, bytearray)) or len(body) > MAX_BODY_SIZE:
                raise LocalProtocolError(f"record {i} (seq {seq}) has a body that is not bytes"
                                         f" of at most MAX_BODY_SIZE ({MAX_BODY_SIZE}) bytes")
            expect, prev_t = expect + 1, t
        start = 0
        while start < len(records):
            day = records[start][1] // NS_PER_DAY
            if records[-1][1] // NS_PER_DAY == day:     # times never decrease: the rest
                self._append_day(day, records[start:] if start else records)
                break
            stop = start + 1
            while stop < len(records) and records[stop][1] // NS_PER_DAY == day:
                stop += 1
            self._append_day(day, records[start:stop])
            start = stop

    def _append_day(self, day: int, run: Sequence[Record]) -> None:
        segs = self._segs
        new = not segs or segs[-1].day != day
        if new:
            if segs:
                self._roll(segs[-1])
            name = day_name(day)
            seg = _Segment(day, os.path.join(self._dir, name + ".seg"),
                           os.path.join(self._dir, name + ".idx"), self._every,
                           first_seq=run[0][0])
            base, buf = 0, bytearray(FILE_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, 0))
        else:
            seg = segs[-1]
            base, buf = seg.size, bytearray()
        first, every, pack_lc, pack_st, crc32 = (seg.first_seq, seg.every, _LENGTH_CRC.pack,
                                                  _SEQ_TIME.pack, zlib.crc32)
        entries = []
        for seq, t, body in run:
            if (seq - first) % every == 0:
                entries.append((seq, t, base + len(buf)))
            st = pack_st(seq, t)
            buf += pack_lc(len(body), crc32(body, crc32(st)))
            buf += st
            buf += body
        try:
            if new:
                seg.wfd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                                  | _OPEN_FLAGS, 0o644)
            if self.fault_write_error is not None:
                raise self.fault_write_error
            _write_all(self._wfd(seg), buf)
        except OSError as exc:
            self._broken = exc
            self._undo_write(seg, new)
            raise DurabilityError(f"log: writing {seg.path} failed: {exc}") from exc
        # the bytes are written: now the in-memory state may move
        if new:
            segs.append(seg)
            self._dir_dirty = True
        self._dirty = True
        seg.size, seg.last_seq, seg.last_time = base + len(buf), run[-1][0], run[-1][1]
        for s, t, o in entries:
            seg.iseq.append(s)
            seg.itime.append(t)
            seg.ioff.append(o)
        if new:
            self._write_index(seg)
        elif entries and seg.idx_appendable:
            try:
                _write_all(self._ifd(seg), b"".join(INDEX_ENTRY.pack(*e) for e in entries))
            except OSError:  # derived data: stop appending; the next open rebuilds it
                seg.idx_appendable = False

    def _undo_write(self, seg: _Segment, new: bool) -> None:
        """Best effort after a failed write: leave no partial record behind."""
        try:
            if new and seg.wfd is not None:  # we created the file: remove it
                self._close_seg(seg)
                os.unlink(seg.path)
            elif not new and seg.wfd is not None:
                os.ftruncate(seg.wfd, seg.size)
        except OSError:
            pass

    def _roll(self, seg: _Segment) -> None:
        """Finish the newest segment before a later day's is created: fsync it (and the
        directory, if it was new) so a crash can only ever tear the newest segment."""
        try:
            if self._do_fsync and self._dirty and seg.wfd is not None:
                self._fsync(seg.wfd)
            if self._do_fsync and self._dir_dirty:
                self._fsync_dir(self._dir)
        except OSError as exc:
            self._broken = exc
            raise DurabilityError(f"log: fsync of {seg.path} at day roll-over failed:"
                                  f" {exc}") from exc
        self._dirty = self._dir_dirty = False
        for fd in (seg.wfd, seg.ifd):
            if fd is not None:
                os.close(fd)
        seg.wfd = seg.ifd = None

    def sync(self) -> float:
        """Make every appended record durable (group commit); return the seconds spent.

        fsyncs the newest segment if it was written since the last sync, and the
        directory once after a segment was created. With ``fsync=False`` this does
        nothing and returns ``0.0``.

        Raises ``DurabilityError`` (``__cause__`` is the ``OSError``) if an fsync
        fails: what is on disk is then unknown, so the store refuses further writes
        and syncs; stop the process. ``ClosedError`` after :meth:`close`.
        """
        self._check_writable()
        if not self._do_fsync:
            return 0.0
        started = time.perf_counter()
        try:
            if self._dirty and self._segs:
                self._fsync(self._wfd(self._segs[-1]))
            if self._dir_dirty:
                self._fsync_dir(self._dir)
        except OSError as exc:
            self._broken = exc
            raise DurabilityError(f"log: fsync in {self._dir} failed: {exc}") from exc
        self._dirty = self._dir_dirty = False
        return time.perf_counter() - started

    def sync_recovered(self) -> float:
        """Make what an earlier process left durable; call once after opening.

        After a ``kill -9`` the previous process's last writes may sit in the
        page cache only: the newest segment's tail, and the directory entry of
        a segment it created just before (a power cut would then lose the
        whole file). Both are fsynced here, before the records are trusted
        (acks of resends as duplicates, replays, replication). Returns the
        seconds spent; ``DurabilityError`` as for :meth:`sync`."""
        self._dirty = bool(self._segs)
        self._dir_dirty = True
        return self.sync()

    def _fsync(self, fd: int) -> None:
        """The one place that calls ``os.fsync`` (tests replace it to inject failures)."""
        os.fsync(fd)

    def _fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    # -- reading -----------------------------------------------------------------------

    def read(self, from_seq: int, *, max_records: int = DEFAULT_MAX_RECORDS,
             max_bytes: int = DEFAULT_MAX_BYTES) -> list[Record]:
        """Return records from ``from_seq`` upward, crossing segment boundaries.

        At most ``max_records`` records, and no more body bytes than ``max_bytes``
        except that the first record is always returned whole. Starts at
        ``first_seq`` when ``from_seq`` is older (retention deleted the rest: compare
        the first seq returned with what you asked for); ``[]`` when ``from_seq >
        last_seq``. Seeks with the index, then reads ``READ_BLOCK_MIN..READ_BLOCK_MAX``
        bytes per ``pread``.

        Raises :class:`LogCorruptedError` (path, offset of the bad record) if a record
        to return fails its CRC or seq check; ``LocalProtocolError`` for
        ``max_records < 1`` or ``max_bytes < 0``; ``ClosedError`` after close.

        >>> [seq for seq, _t, _b in log.read(10, max_records=3)]  # doctest: +SKIP
        [10, 11, 12]
        """
        self._check_open()
        if max_records < 1 or max_bytes < 0:
            raise LocalProtocolError(f"read needs max_records >= 1 and max_bytes >= 0,"
                                     f" got {max_records} and {max_bytes}")
        if not self._segs or from_seq > self.last_seq:
            return []
        seq = max(from_seq, self.first_seq)
        k = bisect_right(self._segs, seq, key=lambda s: s.first_seq) - 1
        cursor = self._cursor
        if cursor is not None and cursor[0] == seq and cursor[1] is self._segs[k]:
            off = cursor[2]  # a sequential reader: no seek needed
        else:
            off = self._locate(self._segs[k], seq)[0]
        out: list[Record] = []
        budget = max_bytes
        while True:
            seg = self._segs[k]
            seq, budget, off = self._read_segment(seg, off, seq, out, max_records, budget)
            if budget < 0 or len(out) >= max_records or k + 1 == len(self._segs):
                self._cursor = (seq, seg, off)
                return out
            if seq != seg.last_seq + 1:
                raise LogCorruptedError(seg.path, seg.size, f"segment ends at seq {seq - 1},"
                                        f" expected {seg.last_seq}")
            k, off = k + 1, _HEAD

    def _read_segment(self, seg: _Segment, off: int, seq: int, out: list[Record],
                      limit: int, budget: int) -> tuple[int, int, int]:
        """Append ``seg``'s records from ``(off, seq)`` to ``out`` until its end, ``limit``
        records in ``out``, or the byte budget; return ``(next seq, budget left, its
        offset)``, the budget being -1 when it stopped the read.

        This is the hot loop (about 1 us per small record on a desktop core): one
        ``pread`` per block, one combined test per record, and the error is worked
        out only once a record fails it.
        """
        fd, size = self._rfd(seg), seg.size
        unpack, crc32, append = RECORD_HEADER.unpack_from, zlib.crc32, out.append
        first_seq, seq_end, want = seq, seq + limit - len(out), 0
        # bytes per record on average in this segment, to size the first pread
        average = (size - _HEAD) // (seg.last_seq - seg.first_seq + 1) + 1
        try:
            while off < size and seq < seq_end:
                if off + _RHEAD > size:
                    raise LogCorruptedError(seg.path, off, "incomplete record header")
                expected = min(budget + (seq_end - seq) * _RHEAD, (seq_end - seq) * average)
                n = min(size - off, max(want, READ_BLOCK_MIN, min(READ_BLOCK_MAX, expected)))
                blk = _pread_exact(fd, n, off)
                self._stats.bytes_read += len(blk)
                if len(blk) != n:
                    raise LogCorruptedError(seg.path, off + len(blk),
                                            "segment shorter than expected")
                pos, want, last_header = 0, 0, n - _RHEAD
                while pos <= last_header:
                    length, crc, s, t = unpack(blk, pos)
                    stop = pos + _RHEAD + length
                    # a bytes slice is cheaper than a memoryview one for small records
                    if stop > n or s != seq or crc32(blk[pos + _CRC_FROM : stop]) != crc:
                        if stop > n and length <= MAX_BODY_SIZE and off + stop <= size:
                            want = stop - pos  # whole, but past this block: read it next
                            break
                        raise self._damaged(seg, off + pos, length, s, seq, size)
                    if length > budget and out:
                        return seq, -1, off + pos
                    append((s, t, blk[pos + _RHEAD : stop]))
                    budget -= length
                    seq += 1
                    pos = stop
                    if seq == seq_end:
                        break
                off += pos
            return seq, budget, off
        finally:
            self._stats.records_scanned += seq - first_seq

    @staticmethod
    def _damaged(seg: _Segment, off: int, length: int, found: int, seq: int,
                 size: int) -> LogCorruptedError:
        if length > MAX_BODY_SIZE or off + _RHEAD + length > size:
            return LogCorruptedError(seg.path, off, f"record of {length} bytes runs past the end")
        if found != seq:
            return LogCorruptedError(seg.path, off, f"seq {found} where {seq} was expected")
        return LogCorruptedError(seg.path, off, "CRC mismatch")

    def iter_records(self, from_seq: int = 1) -> Iterator[Record]:
        """Yield every record from ``max(from_seq, first_seq)`` to the end, chunk by chunk
        (built on :meth:`read`; records appended while iterating are included)."""
        seq = from_seq
        while batch := self.read(seq):
            yield from batch
            seq = batch[-1][0] + 1

    def find(self, needle: bytes, *, from_seq: int = 1, to_seq: int | None = None) -> Iterator[Record]:
        """Yield, in seq order, the records from ``max(from_seq, first_seq)`` to ``to_seq``
        (default: the end) whose header or body contains ``needle``.

        For searches by content (the sequencer's dedup fallback): the segment bytes are
        searched ``SCAN_BLOCK`` at a time with ``bytes.find``, in C, and only a record
        with a hit is located (index, then headers) and read with its CRC checked, so a
        search costs about a read of the segments (0.2 s per 145 MB from the page cache
        here; decoding every record took ten times that). The caller checks what it
        found: a hit may be a chance match inside a payload. Raises
        :class:`LogCorruptedError` like :meth:`read` for a damaged record with a hit.
        """
        self._check_open()
        if not needle or len(needle) > SCAN_BLOCK:
            raise LocalProtocolError("find needs a needle of 1..SCAN_BLOCK bytes")
        lo = max(from_seq, self.first_seq)
        hi = self.last_seq if to_seq is None else min(to_seq, self.last_seq)
        overlap = len(needle) - 1
        for seg in list(self._segs):
            if seg.last_seq < lo or seg.first_seq > hi:
                continue
            off = _HEAD if seg.first_seq >= lo else self._locate(seg, lo)[0]
            size = seg.size
            after: tuple[int, int] | None = None    # (offset, seq) just past the last hit's record
            while off < size:
                blk = _pread_exact(self._rfd(seg), min(SCAN_BLOCK + overlap, size - off), off)
                self._stats.bytes_read += len(blk)
                pos = blk.find(needle)
                while pos >= 0:
                    seq, end = self._record_at(seg, off + pos, after)
                    if seq > hi:
                        return
                    if seq >= lo:
                        yield self.read(seq, max_records=1)[0]
                    after = (end, seq + 1)
                    pos = blk.find(needle, end - off) if end - off < len(blk) else -1
                if off + len(blk) >= size:
                    break
                off += len(blk) - overlap
                if after is not None and after[0] > off:
                    off = after[0]                # not into the record with the last hit

    def _record_at(self, seg: _Segment, off: int,
                   after: tuple[int, int] | None = None) -> tuple[int, int]:
        """``(seq, end offset)`` of the record of ``seg`` whose bytes include ``off``;
        ``after`` is a known record start ``(offset, seq)`` at or before it (the walk
        starts there when no index entry is nearer)."""
        at, seq = self._entry(seg, lambda: bisect_right(seg.ioff, off) - 1) or (_HEAD, seg.first_seq)
        if after is not None and at < after[0] <= off:
            at, seq = after
        o, s, _t, length = self._walk(seg, at, seq, until_seq=None, until_time=None, until_off=off)
        return s, o + _RHEAD + length

    def seq_for_time(self, time_ns: int) -> int:
        """The first seq whose time is ``>= time_ns``: ``first_seq`` when ``time_ns`` is
        before everything, ``last_seq + 1`` when after everything (1 on an empty log).

        Bisects the index and then steps over at most one interval of headers (CRCs are
        not checked here; :meth:`read` checks the records). Raises
        :class:`LogCorruptedError` if a header on the way is damaged, ``ClosedError``
        after close.
        """
        self._check_open()
        if not self._segs or time_ns > self.last_time:
            return self.last_seq + 1
        k = bisect_left(self._segs, time_ns, key=lambda s: s.last_time)
        seg = self._segs[k]  # the first segment with a record at or after time_ns
        entry = self._entry(seg, lambda: bisect_left(seg.itime, time_ns) - 1)
        if entry is None:  # the segment's first record is already late enough
            return seg.first_seq
        return self._walk(seg, *entry, until_seq=None, until_time=time_ns)[1]

    def _locate(self, seg: _Segment, seq: int) -> tuple[int, int, int]:
        """``(offset, time_ns, length)`` of record ``seq`` of ``seg``, via the index."""
        entry = self._entry(seg, lambda: bisect_right(seg.iseq, seq) - 1)
        assert entry is not None  # entry 0 is the segment's first record, <= seq
        off, _s, t, length = self._walk(seg, *entry, until_seq=seq, until_time=None)
        return off, t, length

    def _entry(self, seg: _Segment, pick: Callable[[], int]) -> tuple[int, int] | None:
        """``(offset, seq)`` of the index entry ``pick()`` chooses (None for -1), after
        verifying the record it names. An entry that does not verify means the index is
        wrong: it is rebuilt from the segment and ``pick()`` asked again."""
        i = pick()
        if i > 0 and not _verify_record(self._rfd(seg), seg.size, seg.ioff[i], seg.iseq[i],
                                        seg.itime[i]):
            self._rebuild_index(seg)
            i = pick()
        return None if i < 0 else (seg.ioff[i], seg.iseq[i])

    def _walk(self, seg: _Segment, off: int, seq: int, *, until_seq: int | None,
              until_time: int | None, until_off: int | None = None) -> tuple[int, int, int, int]:
        """Step over headers from ``(off, seq)`` to the first record with seq >=
        ``until_seq`` or time >= ``until_time``, or that ends after byte ``until_off``;
        return its ``(offset, seq, time, length)``. Checks seq continuity and lengths,
        not CRCs (the bodies are not read)."""
        fd, size, unpack = self._rfd(seg), seg.size, RECORD_HEADER.unpack_from
        stop_seq = _U64 if until_seq is None else until_seq
        stop_time = _U64 if until_time is None else until_time
        stop_off = _U64 if until_off is None else until_off - _RHEAD
        blk, base, last_header, first = b"", off, -1, seq
        try:
            while True:
                rel = off - base
                if rel > last_header:  # the next header is not (all) in this block
                    blk, base, rel = _pread_exact(fd, min(WALK_BLOCK, size - off), off), off, 0
                    self._stats.bytes_read += len(blk)
                    last_header = len(blk) - _RHEAD
                    if last_header < 0:
                        raise LogCorruptedError(seg.path, off, "record header runs past the end")
                length, _crc, s, t = unpack(blk, rel)
                if s != seq or length > MAX_BODY_SIZE or off + _RHEAD + length > size:
                    raise self._damaged(seg, off, length, s, seq, size)
                if s >= stop_seq or t >= stop_time or off + length > stop_off:
                    return off, s, t, length
                off += _RHEAD + length
                seq += 1
        finally:
            self._stats.records_scanned += seq - first + 1

    # -- recovery and the index ------------------------------------------------------------

    def _recover(self) -> None:
        found = []
        for name in os.listdir(self._dir):
            m = _SEGMENT_NAME.fullmatch(name)
            try:
                if m:
                    found.append(((date.fromisoformat(m.group(1)) - _EPOCH).days, m.group(1)))
            except ValueError:
                continue  # "2023-13-45.seg" is not a segment of ours
        segs = self._segs = [
            _Segment(day, os.path.join(self._dir, stem + ".seg"),
                     os.path.join(self._dir, stem + ".idx"), self._every)
            for day, stem in sorted(found)]
        for k, seg in enumerate(list(segs)):
            expect = segs[k - 1].last_seq + 1 if k else 0
            damage = self._load_segment(seg, expect)
            if damage is None:
                continue
            fd = self._rfd(seg)
            size = os.fstat(fd).st_size
            if k + 1 < len(segs):
                raise LogCorruptedError(seg.path, damage.offset, damage.reason
                                        + " (not the newest segment, so not a torn write)")
            if not _is_torn(fd, size, damage):
                raise LogCorruptedError(seg.path, damage.offset, damage.reason)
            try:
                self._cut_torn(seg, damage.offset, size)
            except OSError as exc:
                raise DurabilityError(f"log: setting aside the torn tail of {seg.path}"
                                      f" failed: {exc}") from exc
        for seg in self._segs:
            if seg.idx_dirty:
                self._write_index(seg)

    def _load_segment(self, seg: _Segment, expect: int) -> _Damage | None:
        """Read a segment's header, index and tail; fill in its bounds. ``expect`` is the
        seq its first record must have (0 for the oldest segment: any)."""
        fd = self._rfd(seg)
        size = os.fstat(fd).st_size
        damage = _check_header(fd)
        if damage is not None:
            return damage
        off, seq, n = _HEAD, 0, 0  # where the scan starts; 0: any seq, no entry kept
        seg.idx_dirty = True
        loaded = _read_index(seg.idx_path)
        if loaded is not None and _verify_record(fd, size, _HEAD, loaded[1][0], loaded[2][0]):
            every, iseq, itime, ioff, exact = loaded
            n = len(iseq)
            while n > 1 and not _verify_record(fd, size, ioff[n - 1], iseq[n - 1], itime[n - 1]):
                n -= 1  # the entry names a record that is not there (torn, or a bad index)
            seg.every, seg.first_seq = every, iseq[0]
            seg.iseq, seg.itime, seg.ioff = iseq[:n], itime[:n], ioff[:n]
            off, seq = ioff[n - 1], iseq[n - 1]
            seg.idx_dirty = not exact or n != len(iseq)
        scan = _scan(fd, size, off, seq, seg.first_seq, seg.every, (seg.iseq, seg.itime, seg.ioff))
        seg.first_seq = scan.first_seq
        seg.idx_dirty |= len(seg.iseq) != n  # the scan found records the index lacked
        seg.size, seg.last_seq, seg.last_time = scan.end, scan.next_seq - 1, scan.last_time
        if scan.end == _HEAD and scan.damage is None:
            return _Damage(_HEAD, "segment holds no record", _HEAD, 0)
        if seg.first_seq and expect and seg.first_seq != expect:
            raise LogCorruptedError(seg.path, _HEAD, f"segment starts at seq {seg.first_seq}"
                                    f" but the previous one ends at seq {expect - 1}")
        return scan.damage

    def _cut_torn(self, seg: _Segment, off: int, size: int) -> None:
        """Copy ``[off, size)`` aside, then truncate the segment at ``off`` (or delete it
        when no record is left)."""
        fd = self._rfd(seg)
        if off < size:
            self.torn_tails.append(self._copy_aside(fd, off, size, f"{seg.name}.torn-{off}"))
        if off > _HEAD:
            wfd = self._wfd(seg)
            os.ftruncate(wfd, off)
            if self._do_fsync:
                self._fsync(wfd)
            seg.size = off
            return
        self._close_seg(seg)
        os.unlink(seg.path)
        self._unlink_index(seg)
        self._segs.remove(seg)
        if self._do_fsync:
            self._fsync_dir(self._dir)

    def _rebuild_index(self, seg: _Segment) -> None:
        """Rescan the whole segment, CRCs included, and rewrite its index."""
        fd, every = self._rfd(seg), self._every
        index: tuple[array[int], array[int], array[int]] = (array("Q"), array("Q"), array("Q"))
        scan = _scan(fd, seg.size, _HEAD, seg.first_seq, seg.first_seq, every, index)
        if scan.damage is not None:
            raise LogCorruptedError(seg.path, scan.damage.offset, scan.damage.reason)
        seg.every, (seg.iseq, seg.itime, seg.ioff) = every, index
        self._write_index(seg)

    def _write_index(self, seg: _Segment) -> None:
        """Replace ``seg``'s index file with its in-memory entries (no fsync: derived data)."""
        if seg.ifd is not None:
            os.close(seg.ifd)
            seg.ifd = None
        parts = [FILE_HEADER.pack(INDEX_MAGIC, FORMAT_VERSION, seg.every)]
        parts += [INDEX_ENTRY.pack(*e) for e in zip(seg.iseq, seg.itime, seg.ioff)]
        tmp = seg.idx_path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(b"".join(parts))
            os.replace(tmp, seg.idx_path)
            seg.idx_dirty, seg.idx_appendable = False, True
        except OSError:
            seg.idx_appendable = False  # the arrays stay right; the next open rebuilds

    # -- removing records ---------------------------------------------------------------

    def expired_upto(self, now_ns: int) -> int:
        """The last seq :meth:`apply_retention` would delete at ``now_ns`` (0: nothing)."""
        self._check_open()
        cutoff = now_ns // NS_PER_DAY - self._retention_days
        last = 0
        for seg in self._segs[:-1]:
            if seg.day >= cutoff:
                break
            last = seg.last_seq
        return last

    def apply_retention(self, now_ns: int) -> list[str]:
        """Delete segments (and their index) whose UTC day is before ``now``'s day minus
        ``retention_days``; the newest segment is never deleted. Returns the removed
        paths. With ``retention_days=7`` a segment of day D is deleted on day D + 8.

        Raises ``OSError`` if a deletion fails (segments already deleted are gone from
        the store too), ``ClosedError`` after close.
        """
        self._check_open()
        cutoff = now_ns // NS_PER_DAY - self._retention_days
        removed: list[str] = []
        while len(self._segs) > 1 and self._segs[0].day < cutoff:
            seg = self._segs[0]
            self._close_seg(seg)
            os.unlink(seg.path)
            del self._segs[0]
            removed.append(seg.path)
            if self._unlink_index(seg):
                removed.append(seg.idx_path)
        if removed and self._do_fsync:
            self._fsync_dir(self._dir)
        return removed

    def truncate_after(self, seq: int) -> str | None:
        """Remove every record with a seq above ``seq`` (a tail that was never replicated).

        First syncs, then, newest first: later segments are moved whole into
        ``aside/<segment>.<old last_seq>.tail``; the segment holding ``seq + 1`` has the
        removed bytes copied to a file of that name (fsynced), is truncated and fsynced
        (or moved whole, if ``seq + 1`` was its first record). A crash at any point leaves
        a log that opens; call again to finish. Returns the aside path for the segment
        that held ``seq + 1``, or None if ``seq >= last_seq``. ``seq`` below
        ``first_seq`` empties the log (``last_seq`` is then 0).

        Raises ``LocalProtocolError`` for a negative seq, :class:`LogCorruptedError` if
        the cut point cannot be found intact, ``DurabilityError`` if a write, rename or
        fsync fails (the store refuses further writes), ``ClosedError`` after close.
        """
        self._check_writable()
        if seq < 0:
            raise LocalProtocolError(f"truncate_after needs a seq >= 0, got {seq}")
        if seq >= self.last_seq:
            return None
        self.sync()
        self._cursor = None
        old_last, segs = self.last_seq, self._segs
        k = max(0, bisect_right(segs, seq + 1, key=lambda s: s.first_seq) - 1)
        cut = None
        if segs[k].first_seq <= seq:
            off, t, length = self._locate(segs[k], seq)
            cut = (off + _RHEAD + length, seq, t)
        try:
            while len(segs) > k + 1:
                self._move_aside(segs[-1], old_last)
            seg = segs[k]
            if cut is None:
                path = self._move_aside(seg, old_last)
            else:
                end, seg.last_seq, seg.last_time = cut
                path = self._copy_aside(self._rfd(seg), end, seg.size,
                                        f"{seg.name}.{old_last}.tail")
                wfd = self._wfd(seg)
                os.ftruncate(wfd, end)
                if self._do_fsync:
                    self._fsync(wfd)
                seg.size = end
                n = bisect_left(seg.ioff, end)
                del seg.iseq[n:], seg.itime[n:], seg.ioff[n:]
                self._write_index(seg)
            if self._do_fsync:
                self._fsync_dir(self._dir)
        except OSError as exc:
            self._broken = exc
            raise DurabilityError(f"log: truncating after seq {seq} failed: {exc}") from exc
        self._dirty = False
        return path

    def _move_aside(self, seg: _Segment, old_last: int) -> str:
        """Rename a whole segment into aside/ (its index is deleted) and forget it."""
        self._close_seg(seg)
        self._make_aside_dir()
        path = self._unique(os.path.join(self._aside, f"{seg.name}.{old_last}.tail"))
        os.rename(seg.path, path)
        self._unlink_index(seg)
        self._segs.remove(seg)
        if self._do_fsync:
            self._fsync_dir(self._aside)
        return path

    def _copy_aside(self, fd: int, start: int, end: int, name: str) -> str:
        """Copy bytes ``[start, end)`` of ``fd`` to a new file in aside/, fsynced."""
        self._make_aside_dir()
        path = self._unique(os.path.join(self._aside, name))
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o644)
        try:
            pos = start
            while pos < end:
                chunk = os.pread(fd, min(SCAN_BLOCK, end - pos), pos)
                if not chunk:
                    break
                _write_all(out, chunk)
                pos += len(chunk)
            if self._do_fsync:
                self._fsync(out)
        finally:
            os.close(out)
        if self._do_fsync:
            self._fsync_dir(self._aside)
        return path

    def _make_aside_dir(self) -> None:
        if not os.path.isdir(self._aside):
            os.makedirs(self._aside, exist_ok=True)
            if self._do_fsync:
                self._fsync_dir(self._dir)

    @staticmethod
    def _unique(path: str) -> str:
        n, candidate = 0, path
        while os.path.lexists(candidate):
            n += 1
            candidate = f"{path}.{n}"
        return candidate

    @staticmethod
    def _unlink_index(seg: _Segment) -> bool:
        try:
            os.unlink(seg.idx_path)
            return True
        except FileNotFoundError:
            return False

    # -- file descriptors and lifecycle -------------------------------------------------

    def _rfd(self, seg: _Segment) -> int:
        if seg.rfd is None:
            seg.rfd = os.open(seg.path, os.O_RDONLY | _OPEN_FLAGS)
        return seg.rfd

    def _wfd(self, seg: _Segment) -> int:
        if seg.wfd is None:
            seg.wfd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | _OPEN_FLAGS)
        return seg.wfd

    def _ifd(self, seg: _Segment) -> int:
        if seg.ifd is None:
            seg.ifd = os.open(seg.idx_path, os.O_WRONLY | os.O_APPEND | _OPEN_FLAGS)
        return seg.ifd

    @staticmethod
    def _close_seg(seg: _Segment) -> None:
        for fd in (seg.rfd, seg.wfd, seg.ifd):
            if fd is not None:
                os.close(fd)
        seg.rfd = seg.wfd = seg.ifd = None

    def _close_fds(self) -> None:
        for seg in self._segs:
            self._close_seg(seg)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"log store {self._dir} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._broken is not None:
            raise DurabilityError(f"log store {self._dir} is broken by an earlier failed write"
                                  " or fsync; reopen it") from self._broken

    def close(self) -> None:
        """Close every file. Does not fsync: call :meth:`sync` first for durability.
        Idempotent; every other method then raises ``ClosedError``."""
        if not self._closed:
            self._closed = True
            self._close_fds()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
