"""The sequencing core: deduplicate, stamp, and release after durability.

Sans-I/O (STYLE.md section 1): no sockets, no clock, no files, no logging.
The driver feeds it decoded PUBLISH frames with the current time and the
ZeroMQ route they came from, takes the stamped records to write to the log,
and tells it when they are durable; only then does the core hand back the
egress batches and the acks. Nothing is published or acknowledged before
the point of no return (STYLE.md section 5).

Theory of operation
-------------------
``publish(route, rid, producer, items, now)``
    For each ``(producer_seq, topic, payload)``: if the dedup table knows the
    pair, the original seq is acked again (after it is durable); otherwise
    the next seq is assigned, the record encoded once (the same bytes go to
    the log, the egress batch and replays) and queued as *unwritten*.
``take_unwritten()``
    The records the driver must append to the log, in seq order.
``durable(upto_seq)``
    Everything up to ``upto_seq`` is on disk (and, with a standby, held by
    it). Returns the egress batches and the acks that may now leave.

The dedup table is keyed by ``(producer_id, producer_seq)`` with no time
window; see :class:`DedupTable` for how it stays bounded in memory.
"""

from __future__ import annotations

import bisect
import sys
import zlib
from array import array
from dataclasses import dataclass, field
from itertools import repeat
from typing import Sequence

import cbor2

from orbcast.envelope import (MAX_BATCH_RECORDS, cbor_text, decode_record,
                               encode_record, encode_records)
from orbcast.errors import RemoteProtocolError

__all__ = ["DedupTable", "SequencerCore", "Released", "UNKNOWN_OLD"]

#: Runs of (producer_seq -> seq) remembered per producer. A run is a stretch
#: of consecutive producer seqs that got consecutive seqs (one publish frame
#: usually makes one run), so 4096 runs cover at least 4096 and usually far
#: more recent messages per producer. Older pairs are searched for in the log
#: by the driver (rare, counted).
MAX_RUNS_PER_PRODUCER = 4096
#: ...but the runs covering a producer's newest MIN_PSEQ_WINDOW producer seqs
#: are never evicted: a plant's outbox (10,000 messages by default) can never
#: hold an unacked message older than that, so its resends always hit memory
#: and never the (slow) log search. HARD_MAX_RUNS bounds memory when a
#: producer's seqs fragment: a sensor publishing one message at a time among
#: other producers makes one run per message. 16,384 runs still cover a
#: default outbox, and cost 384 KiB per producer at most (three int64 arrays).
MIN_PSEQ_WINDOW = 1 << 16
HARD_MAX_RUNS = 1 << 14
#: Runs are evicted once a limit is exceeded by this many, then down to the
#: limit: one move of the arrays per EVICT_SLACK new runs, not one per run.
EVICT_SLACK = 1024
#: Bytes of record bodies per egress batch. Small, because ZeroMQ counts its
#: high-water mark in messages: a subscriber that stops reading holds up to
#: egress_hwm batches of the node's memory (1,000 x 64 KiB by default; with
#: batches of ~1 MiB it was gigabytes). Batches this size cost no throughput.
MAX_EGRESS_BATCH_BYTES = 64 * 1024
#: Topic encodings cached by the hot path; bounded so a producer cycling
#: through unique topics cannot grow the cache without limit.
TOPIC_CACHE_SIZE = 4096

#: Sequence a frame of new consecutive producer seqs as one run (one dedup
#: update, records encoded together). Tests turn it off to compare the fast
#: path with the item-by-item one.
FRAME_RUNS = True

#: Returned by :meth:`DedupTable.lookup` when the pair is older than the
#: in-memory window: the caller must consult the log.
UNKNOWN_OLD = -1


def _runs() -> "array[int]":
    return array("q")


class _Producer:
    __slots__ = ("hi", "floor", "starts", "seqs", "counts", "enc")

    def __init__(self, pid: str) -> None:
        self.hi = -1            # highest producer_seq sequenced
        self.floor = 0          # pairs below floor may exist but were evicted
        # Run i: producer_seqs starts[i] .. starts[i] + counts[i] - 1 got seqs[i] ..
        # Typed arrays, 24 bytes per run (Python int lists took about 90).
        self.starts = _runs()
        self.seqs = _runs()
        self.counts = _runs()
        self.enc = cbor_text(pid)


class DedupTable:
    """Maps ``(producer_id, producer_seq)`` to the seq it was given.

    Memory is bounded per producer by :data:`MAX_RUNS_PER_PRODUCER` (beyond
    the newest :data:`MIN_PSEQ_WINDOW` producer seqs) and :data:`HARD_MAX_RUNS`; pairs
    below a producer's ``floor`` were evicted; for them, and for any pair below a
    producer's oldest run, :meth:`lookup` answers :data:`UNKNOWN_OLD` and the
    driver decides (it searches the log for evicted pairs).

    ``known_from``: the table holds the pair of every record from this seq on
    (except pairs below a producer's ``floor``). 1 when it has seen the whole
    history; the first seq of the log when it was rebuilt from a log whose
    oldest records retention had removed (it is not pruned by retention, so it
    can know more than the log); 0 while unknown (built from an empty log: the
    driver sets it to the first seq it records). A pair absent from the table
    and at or above its producer's floor was never sequenced if this is 1, and
    may have been sequenced before ``known_from`` otherwise, if its producer is
    in ``partial`` (the driver decides which are).
    """

    def __init__(self, known_from: int = 1) -> None:
        self._p: dict[str, _Producer] = {}
        self.known_from = known_from
        #: Producers the table learned from history it rebuilt or copied after a cut
        #: (known_from > 1), not live: they may have pairs from before known_from.
        self.partial: set[str] = set()

    def __len__(self) -> int:
        return len(self._p)

    def __contains__(self, pid: object) -> bool:
        return pid in self._p

    def producers(self) -> list[str]:
        return list(self._p)

    def producer(self, pid: str) -> _Producer:
        p = self._p.get(pid)
        if p is None:
            p = self._p[pid] = _Producer(pid)
        return p

    def lookup(self, pid: str, pseq: int) -> int | None:
        """The seq of the pair, ``None`` if never sequenced, or
        :data:`UNKNOWN_OLD` if it is below the remembered window."""
        p = self._p.get(pid)
        if p is None or pseq > p.hi:
            return None
        if pseq < p.floor or not p.starts or pseq < p.starts[0]:
            # below everything remembered: evicted, or (a table rebuilt from a log that
            # retention has cut, or a standby's) never seen here. Not "never sequenced".
            return UNKNOWN_OLD
        i = bisect.bisect_right(p.starts, pseq) - 1
        if i >= 0 and pseq < p.starts[i] + p.counts[i]:
            return p.seqs[i] + (pseq - p.starts[i])
        return None

    def max_seq(self) -> int:
        """The highest seq any remembered pair was given (0 for an empty table)."""
        return max((max(map(int.__add__, p.seqs, p.counts)) - 1 for p in self._p.values()
                    if p.seqs), default=0)

    def truncate_after(self, seq: int) -> None:
        """Forget every pair given a seq above ``seq`` (their records were set aside);
        what the table knows of older records, retention-removed ones included, stays."""
        for pid, p in list(self._p.items()):
            keep = [i for i, s0 in enumerate(p.seqs) if s0 <= seq]
            if len(keep) != len(p.seqs):
                p.starts = array("q", (p.starts[i] for i in keep))
                p.counts = array("q", (p.counts[i] for i in keep))
                p.seqs = array("q", (p.seqs[i] for i in keep))
            for i, (s0, c) in enumerate(zip(p.seqs, p.counts)):
                if s0 + c - 1 > seq:
                    p.counts[i] = seq - s0 + 1
            if p.starts:        # (evicted pairs below the floor stay "sequenced")
                p.hi = max(max(map(int.__add__, p.starts, p.counts)) - 1, p.floor - 1)
            elif p.floor:
                p.hi = p.floor - 1
            else:
                del self._p[pid]
                self.partial.discard(pid)

    def record(self, pid: str, pseq: int, seq: int) -> None:
        """Remember that ``(pid, pseq)`` was given ``seq``."""
        self._record(self.producer(pid), pseq, seq)

    @staticmethod
    def _record_run(p: _Producer, pseq: int, seq: int, n: int) -> None:
        """``_record(p, pseq + i, seq + i)`` for ``i in range(n)``, with
        ``pseq > p.hi`` (a frame of new consecutive producer seqs): extends the
        newest run or starts one, then evicts exactly as :meth:`_record` would."""
        if p.starts:
            i = len(p.starts) - 1
            c = p.counts[i]
            if p.starts[i] + c == pseq and p.seqs[i] + c == seq:
                p.counts[i] = c + n
                p.hi = pseq + n - 1
                return
        DedupTable._record(p, pseq, seq)
        if n > 1:
            p.counts[-1] += n - 1
            p.hi = pseq + n - 1

    @staticmethod
    def _record(p: _Producer, pseq: int, seq: int) -> None:
        if pseq > p.hi:
            if p.starts:
                i = len(p.starts) - 1
                n = p.counts[i]
                if p.starts[i] + n == pseq and p.seqs[i] + n == seq:
                    p.counts[i] = n + 1
                    p.hi = pseq
                    return
            p.starts.append(pseq)
            p.seqs.append(seq)
            p.counts.append(1)
            p.hi = pseq
        else:  # a late, out-of-order producer seq (a hole being filled)
            i = bisect.bisect_right(p.starts, pseq)
            if i > 0:
                n = p.counts[i - 1]
                if p.starts[i - 1] + n == pseq and p.seqs[i - 1] + n == seq:
                    p.counts[i - 1] = n + 1      # consecutive hole fills make one run
                    return
            p.starts.insert(i, pseq)
            p.seqs.insert(i, seq)
            p.counts.insert(i, 1)
        n = len(p.starts)
        if n > MAX_RUNS_PER_PRODUCER + EVICT_SLACK:
            # Evict in chunks: dropping the oldest run moves every other one, so a
            # producer at a limit would pay that move for each new message.
            keep_from = p.hi - MIN_PSEQ_WINDOW
            drop = 0
            excess = n - MAX_RUNS_PER_PRODUCER
            hard = n - HARD_MAX_RUNS if n > HARD_MAX_RUNS + EVICT_SLACK else 0
            while drop < excess and (p.starts[drop] + p.counts[drop] <= keep_from or drop < hard):
                drop += 1
            if drop:
                del p.starts[:drop], p.seqs[:drop], p.counts[:drop]
                p.floor = p.starts[0]

    def snapshot(self, covered_seq: int) -> bytes:
        """Serialise the table; ``covered_seq`` is the last seq it reflects.

        Version 2 (docs/protocol.md 7.5): per producer, its three run columns as
        little-endian int64s, concatenated and zlib-compressed (level 1). For
        20 fragmented producers at the run limit that is about 1 MB written in
        30 ms; version 1's CBOR integer lists took 3 MB and 0.3 s of the loop.
        """
        return cbor2.dumps({"v": 2, "seq": covered_seq, "from": self.known_from,
                            "partial": sorted(self.partial), "producers": {
            pid: [p.hi, p.floor, zlib.compress(_le(p.starts) + _le(p.seqs) + _le(p.counts), 1)]
            for pid, p in self._p.items()}})

    @classmethod
    def restore(cls, blob: bytes) -> tuple["DedupTable", int]:
        """Inverse of :meth:`snapshot`, and reads version 1 (written before
        2026-12); returns ``(table, covered_seq)``. A snapshot without ``"from"``
        (written before it was added) restores with ``known_from`` 0: the caller
        decides. Raises ``ValueError`` on any damage."""
        try:
            d = cbor2.loads(blob)
            if d["v"] not in (1, 2):
                raise ValueError("unsupported dedup snapshot version")
            t = cls(known_from=int(d.get("from", 0)))
            if t.known_from < 0:
                raise ValueError("negative 'from'")
            t.partial = set(d.get("partial", ()))
            if not all(type(x) is str for x in t.partial):
                raise ValueError("'partial' holds a non-string")
            partial_unknown = "partial" not in d and t.known_from > 1
            for pid, entry in d["producers"].items():
                p = t.producer(pid)
                if d["v"] == 1:
                    hi, floor, starts, seqs, counts = entry
                    cols = [array("q", starts), array("q", seqs), array("q", counts)]
                else:
                    hi, floor, packed = entry
                    flat = _from_le(zlib.decompress(packed))
                    k = len(flat) // 3
                    if len(flat) != 3 * k:
                        raise ValueError("run columns of unequal length")
                    cols = [flat[:k], flat[k:2 * k], flat[2 * k:]]
                if not (len(cols[0]) == len(cols[1]) == len(cols[2])):
                    raise ValueError("inconsistent runs")
                p.hi, p.floor = int(hi), int(floor)
                p.starts, p.seqs, p.counts = cols
            if partial_unknown:      # a snapshot from before the key: trust nothing it lists
                t.partial = set(t._p)
            return t, int(d["seq"])
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"damaged dedup snapshot: {exc}") from exc


def _le(a: "array[int]") -> bytes:
    """The int64s of ``a`` as little-endian bytes (the snapshot is portable)."""
    if _BIG_ENDIAN:
        a = array("q", a)
        a.byteswap()
    return a.tobytes()


def _from_le(b: bytes) -> "array[int]":
    if len(b) % 8:
        raise ValueError("run columns are not whole int64s")
    a = array("q")
    a.frombytes(b)
    if _BIG_ENDIAN:
        a.byteswap()
    return a


_BIG_ENDIAN = sys.byteorder == "big"


@dataclass(slots=True)
class Released:
    """What may leave the node once records are durable."""

    #: Egress batches: (first_seq, last_seq, [record bodies]).
    batches: list[tuple[int, int, list[bytes]]] = field(default_factory=list)
    #: Acks: (route, rid, [pseq0, seq0, pseq1, seq1, ...]).
    acks: list[tuple[bytes, int, list[int]]] = field(default_factory=list)


class SequencerCore:
    """Assigns gap-free seqs from ``last_seq + 1`` and releases acks and
    egress batches only for durable records.

    ``last_seq`` / ``last_time`` come from the log at start; ``epoch`` is the
    leadership term stamped on every record and ack.
    """

    def __init__(self, *, last_seq: int, last_time: int, epoch: int, dedup: DedupTable) -> None:
        self.epoch = epoch
        self.dedup = dedup
        self.next_seq = last_seq + 1       # next seq to assign
        self.durable_seq = last_seq        # everything <= this is durable
        self.last_time = last_time
        self._unwritten: list[tuple[int, int, bytes]] = []
        self._undurable: list[bytes] = []           # bodies with seq > durable_seq
        self._acks: list[tuple[int, bytes, int, list[int]]] = []   # (need_seq, route, rid, pairs)
        self._topics: dict[str, bytes] = {}
        #: counters (read by the driver)
        self.sequenced = 0
        self.duplicates = 0

    @property
    def last_seq(self) -> int:
        """The newest assigned seq (durable or not)."""
        return self.next_seq - 1

    def publish(self, route: bytes, rid: int, producer: str,
                items: Sequence[tuple[int, str, bytes]], now: int,
                old_lookup: "callable[[str, int], int | None] | None" = None) -> None:  # type: ignore[valid-type]
        """Sequence one PUBLISH frame's items. ``now`` is ns since the epoch.

        ``old_lookup(producer, pseq)`` answers for pairs below what the table
        remembers (the driver searches its log, or raises ``too-old``); without it
        they are refused with ``too-old``.
        """
        p = self.dedup.producer(producer)
        seq = self.next_seq
        n = len(items)
        if n and items[0][0] > p.hi and FRAME_RUNS:
            pseqs = [it[0] for it in items]
            if pseqs[-1] - pseqs[0] == n - 1 and (
                    n == 1 or all(map(int.__lt__, pseqs, pseqs[1:]))):
                # The common frame: a run of new, consecutive producer seqs. One
                # dedup run, records encoded with the shared fields packed once.
                t = now if now > self.last_time else self.last_time
                self.last_time = t
                self._publish_run(route, rid, p, pseqs, items, seq, t)
                return
        # Every pair the producer may have sequenced already is resolved before anything
        # changes: a refusal (too-old, from old_lookup or without one) leaves no trace,
        # and an eviction caused by an earlier item of this frame cannot hide a pair.
        old_seqs: dict[int, int | None] = {}
        if p.hi >= 0:                   # (runs may all be gone while the floor stays)
            hi, lookup = p.hi, self.dedup.lookup
            for pseq, _topic, _payload in items:
                if pseq > hi or pseq in old_seqs:
                    continue
                old = lookup(producer, pseq)
                if old == UNKNOWN_OLD:
                    if old_lookup is None:
                        raise RemoteProtocolError(
                            f"producer_seq {pseq} of {producer!r} is older than the dedup "
                            f"window", code="too-old")
                    # records not yet durable may not be in the log yet
                    old = self._pending_lookup(producer, pseq)
                    if old is None:
                        old = old_lookup(producer, pseq)
                old_seqs[pseq] = old
        t = now if now > self.last_time else self.last_time
        self.last_time = t
        epoch = self.epoch
        topics = self._topics
        pairs: list[int] = []
        unwritten = self._unwritten
        undurable = self._undurable
        need = 0
        record = DedupTable._record
        lookup = self.dedup.lookup
        try:
            for pseq, topic, payload in items:
                if pseq <= p.hi:
                    if pseq in old_seqs:
                        old = old_seqs[pseq]
                    else:
                        # above the producer's highest when the frame came: only this
                        # frame can have sequenced it (an earlier item), so the table
                        # or its pending records know it, else it is new. (Below the
                        # window now, e.g. under the first items of a frame resent out
                        # of order: never a reason to ask the log.)
                        old = lookup(producer, pseq)
                        if old == UNKNOWN_OLD:
                            old = self._pending_lookup(producer, pseq)
                    if old is not None:
                        self.duplicates += 1
                        pairs.append(pseq)
                        pairs.append(old)
                        if old > need:
                            need = old
                        continue
                tenc = topics.get(topic)
                if tenc is None:
                    if len(topics) >= TOPIC_CACHE_SIZE:
                        topics.clear()
                    tenc = topics[topic] = cbor_text(topic)
                body = encode_record(seq, epoch, t, p.enc, pseq, tenc, payload)
                unwritten.append((seq, t, body))
                undurable.append(body)
                record(p, pseq, seq)
                if old_seqs:
                    old_seqs.pop(pseq, None)     # the table knows it now (a repeat in the frame)
                pairs.append(pseq)
                pairs.append(seq)
                need = seq
                seq += 1
        finally:
            # Lookups that can fail ran before the loop; should anything else fail
            # half-way, seqs already handed out stay handed out: never twice.
            self.sequenced += seq - self.next_seq
            self.next_seq = seq
        self._acks.append((need, route, rid, pairs))

    def _publish_run(self, route: bytes, rid: int, p: _Producer, pseqs: list[int],
                     items: Sequence[tuple[int, str, bytes]], seq: int, t: int) -> None:
        """:meth:`publish` of items whose producer seqs are ``pseqs[0] + i``, all
        above the producer's highest: every item is new and they get ``seq + i``."""
        n = len(items)
        bodies = encode_records(seq, self.epoch, t, p.enc, items)
        last = seq + n - 1
        self._unwritten.extend(zip(range(seq, last + 1), repeat(t), bodies))
        self._undurable.extend(bodies)
        DedupTable._record_run(p, pseqs[0], seq, n)
        pairs = [0] * (2 * n)
        pairs[0::2] = pseqs
        pairs[1::2] = range(seq, last + 1)
        self.next_seq = last + 1
        self.sequenced += n
        self._acks.append((last, route, rid, pairs))

    def _pending_lookup(self, producer: str, pseq: int) -> int | None:
        """The seq of ``(producer, pseq)`` among the records that are not durable yet
        (rare path: only for pairs below what the table remembers, which the log
        may not hold yet)."""
        for i, body in enumerate(self._undurable):
            m = decode_record(body)
            if m.producer_seq == pseq and m.producer == producer:
                return self.durable_seq + 1 + i
        return None

    def take_unwritten(self) -> list[tuple[int, int, bytes]]:
        """Records assigned since the last call, for the log: ``(seq, time, body)``."""
        out, self._unwritten = self._unwritten, []
        return out

    @property
    def has_unwritten(self) -> bool:
        return bool(self._unwritten)

    @property
    def has_waiting(self) -> bool:
        """True if acks or records wait for :meth:`durable`."""
        return bool(self._acks) or bool(self._undurable)

    def durable(self, upto_seq: int) -> Released:
        """Records ``<= upto_seq`` are durable: release their batches and acks."""
        out = Released()
        if upto_seq > self.last_seq:
            raise ValueError(f"durable({upto_seq}) beyond last assigned seq {self.last_seq}")
        n = upto_seq - self.durable_seq
        if n > 0:
            bodies = self._undurable[:n]
            del self._undurable[:n]
            first = self.durable_seq + 1
            start = 0
            size = 0
            for i, b in enumerate(bodies):
                size += len(b)
                if i > start and (i - start >= MAX_BATCH_RECORDS or size > MAX_EGRESS_BATCH_BYTES):
                    out.batches.append((first + start, first + i - 1, bodies[start:i]))
                    start, size = i, len(b)
            out.batches.append((first + start, upto_seq, bodies[start:]))
            self.durable_seq = upto_seq
        acks = self._acks
        k = 0
        while k < len(acks) and acks[k][0] <= upto_seq:
            _, route, rid, pairs = acks[k]
            out.acks.append((route, rid, pairs))
            k += 1
        if k:
            del acks[:k]
        return out
