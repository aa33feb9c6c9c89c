"""The subscription tracker: gap detection, gap repair and late start.

Sans-I/O (STYLE.md section 1): the plant's engine feeds it live batches,
heartbeats, replay chunks and errors with the current (monotonic) time, asks
it for the requests to send with :meth:`Tracker.actions`, and hands the
messages in :attr:`Tracker.ready` to the application. No sockets, no clock,
no logging here.

Theory of operation
-------------------
The tracker expects ``next_seq``. It learns the stream from two sources:

* **live batches** ``first..last`` from the PUB socket, which may be lost
  silently (ZeroMQ drops at the high-water mark, the slow-joiner window, a
  Wi-Fi outage);
* **replay chunks** from the node's log, asked for explicitly.

A live batch that starts at ``next_seq`` (or overlaps it) is delivered. One
that starts above it is a **gap**: the batch is buffered (bounded by
``buffer_limit`` records; past that it is dropped and fetched later) and a
replay of exactly ``next_seq .. first_buffered - 1`` is requested. A
heartbeat whose ``last_seq`` is at or above ``next_seq`` is a gap at the
tail (the batch was lost): a replay up to that seq is requested (a gap is
never requested open-ended: the node would chase its tail and resend what
arrives live; only a start by time, whose seq is not known yet, is).
:meth:`Tracker.admits` tells the engine, from a batch's head alone, whether the
batch will be used (then :meth:`Tracker.take` gets its records), so the records
of one that would be ignored or dropped are never decoded. Chunks are delivered in order; when the replay is done the
buffer is drained. Only one replay is in flight per subscription; it is
retried (new request id, with exponential backoff) when no chunk arrives
within ``request_timeout``.

**Late start** is the same mechanism: a subscription starting at seq *S*
simply has ``next_seq = S``, so the first live batch is a gap that replay
fills; a start by time asks the node which seq that is (``since``). Live
traffic is buffered meanwhile, so the seam has no gap and no duplicate.

Flow control: the node sends a chunk only against credit. The tracker grants
credit while the application's ready queue has room for another chunk, so a
slow consumer is never flooded; live batches arriving while the ready queue
is full are dropped (and fetched later by replay).

Memory: the ready queue and the gap buffer are bounded both in messages
(``ready_limit``, ``buffer_limit``) and in bytes (``ready_bytes``,
``buffer_bytes``): a count alone lets 65,536 messages of 256 KiB fill 16 GiB
of a Pi's RAM. A message is reckoned at its share of the wire size of the
batch or chunk that brought it plus :data:`~orbcast.envelope.MSG_OVERHEAD` (the Python objects
it is decoded into). The application thread pops the ready queue, so the
byte count is kept from the engine's side alone: the messages delivered
together form a *group* ``(last seq, bytes)``, and a group counts until the
next message to pop lies beyond it. (Either bound may be passed by one live
batch, and by the chunks already granted.)
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Callable

from orbcast.envelope import (MAX_BODY_BYTES, MAX_SEQ, MSG_OVERHEAD, Cancel, Credit, Message, ReplayRequest,
                              chunk_bytes)
from orbcast.errors import RemoteProtocolError

__all__ = ["Tracker", "Start", "wire_size"]

#: Retry delay after a "not-active" answer (a failover is under way).
NOT_ACTIVE_RETRY_S = 0.1
#: Backoff ceiling for replay retries when the node does not answer.
MAX_RETRY_BACKOFF_S = 5.0


@dataclass(frozen=True, slots=True)
class Start:
    """Where a subscription starts: ``Start.now()``, ``Start.at_seq(n)``
    (deliver from seq n), ``Start.at_time(ns)`` (first record at or after)."""

    kind: str
    value: int = 0

    @classmethod
    def now(cls) -> "Start":
        return cls("now")

    @classmethod
    def at_seq(cls, seq: int) -> "Start":
        if not 1 <= seq <= MAX_SEQ:
            raise ValueError(f"a start seq is in 1..{MAX_SEQ}, got {seq}")
        return cls("seq", seq)

    @classmethod
    def at_time(cls, ns: int) -> "Start":
        # checked here: it would otherwise fail only when the request is built, in tick()
        if not 0 <= ns <= MAX_SEQ:
            raise ValueError(f"a start time is in 0..{MAX_SEQ} ns since 1970, got {ns}")
        return cls("time", ns)


class Tracker:
    """One subscription's position, gap buffer, replay cursor and ready queue.

    ``prefix`` filters what reaches :attr:`ready` (seq continuity is tracked
    over every seq regardless). ``new_rid()`` allocates request ids.
    """

    def __init__(self, *, start: Start, prefix: str = "", new_rid: Callable[[], int],
                 buffer_limit: int = 20_000, ready_limit: int = 65_536, credit: int = 4,
                 chunk_records: int = 4096, request_timeout: float = 2.0,
                 to_seq: int | None = None, ready_bytes: int = 1 << 62,
                 buffer_bytes: int = 1 << 62, chunk_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.prefix = prefix
        self._new_rid = new_rid
        self.buffer_limit = buffer_limit
        self.ready_limit = ready_limit
        self.ready_bytes_limit = ready_bytes
        self.buffer_bytes_limit = buffer_bytes
        #: What one granted chunk may add to the ready queue, in bytes.
        self.chunk_bytes = chunk_bytes(chunk_records, chunk_body_bytes)
        self.credit = credit
        self.chunk_records = chunk_records
        self.request_timeout = request_timeout
        #: Stop after this seq (bounded replays); None follows live forever.
        self.to_seq = to_seq
        self.ready: deque[Message] = deque()
        # (last seq, bytes) of the messages delivered together, oldest first;
        # only the engine's thread touches these (see ready_bytes())
        self._groups: deque[tuple[int, int]] = deque()
        self._ready_bytes = 0
        #: While credit is owed for bytes: the seq whose pop brings the ready
        #: queue under half its byte bound (the application wakes the engine then).
        self.resume_seq = 0
        self.next_seq: int | None = start.value if start.kind == "seq" else None
        self._since: int | None = start.value if start.kind == "time" else None
        #: A start by time delivers nothing stamped before it, also after the node
        #: resolved it to a seq (records sequenced since may be stamped earlier when
        #: the time is ahead of the node's clock); cleared by the first one at or after.
        self._min_time: int | None = self._since or None
        self.known_tail = 0                   # highest seq known to exist
        #: For a start by time: the seq the node resolved it to.
        self.resolved_start: int | None = None
        self._buf: list[tuple[int, int, list[Message], int]] = []   # (first, last, matching msgs, bytes)
        self._buf_n = 0                       # records covered by the buffer
        self._buf_bytes = 0                   # their bytes (as reckoned for ready)
        # replay in flight
        self._rid: int | None = None
        self._req_to: int | None = None       # the replay in flight asked up to this seq
        self._outstanding = 0                 # chunks granted and not yet received
        self._owed = 0                        # credit withheld while ready is full
        self._deadline = 0.0
        self._backoff = request_timeout
        self._retry_at = 0.0
        self._out: list[object] = []
        # counters
        self.gaps = 0
        self.repaired = 0
        self.buffer_hwm = 0
        self.dropped_live = 0
        self.replays = 0
        self.retries = 0
        self.lost_to_retention = 0
        self.live_delivered = 0

    # --- inputs --------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """True once a bounded subscription delivered up to ``to_seq``."""
        return self.to_seq is not None and self.next_seq is not None and self.next_seq > self.to_seq

    def admits(self, first: int, last: int, now: float, nbytes: int = 0) -> bool:
        """Whether live batch ``first..last`` will be used; decided from its
        head alone. If not (we hold it already, or it must be dropped because
        the gap buffer or the ready queue is full) it is accounted for here
        (tail, drop counter, replay request) and nothing more is to be done:
        the caller need not decode it, so a consumer that has fallen behind
        stops spending its CPU on batches it throws away. If so, hand its
        messages to :meth:`take`. ``nbytes`` is the batch's records' wire size
        (for the gap buffer's byte bound). This is the one place that decides."""
        nxt = self.next_seq
        if nxt is None:
            if self._since is None:
                return True                  # "now": the stream starts here
        elif last < nxt or self.finished:
            if last > self.known_tail:
                self.known_tail = last
            return False
        elif first <= nxt:
            if self._has_room():
                return True
            if last > self.known_tail:
                self.known_tail = last
            self.dropped_live += 1           # the consumer is slow: fetched later by replay
            return False
        n = last - first + 1
        if (self._buf_n + n <= self.buffer_limit and self._has_room()
                and self._buf_bytes + nbytes + n * MSG_OVERHEAD <= self.buffer_bytes_limit):
            return True                      # a gap (or a start by time): it is buffered
        if last > self.known_tail:
            self.known_tail = last
        self.dropped_live += 1               # no room to buffer it: fetched later by replay
        if nxt is not None:
            self._maybe_request(now)
        return False

    def take(self, first: int, last: int, msgs: list[Message], now: float,
             nbytes: int | None = None) -> None:
        """The decoded records of a live batch that :meth:`admits` accepted
        (only the application thread pops :attr:`ready` meanwhile, which
        leaves that decision standing); ``nbytes``: their wire size, reckoned
        from the messages if not given."""
        if nbytes is None:
            nbytes = wire_size(msgs)
        if last > self.known_tail:
            self.known_tail = last
        if self.next_seq is None:
            if self._since is not None:      # waiting for the time lookup: buffer
                self._buffer(first, last, msgs, nbytes)
                return
            self.next_seq = first            # "now": the stream starts here
            if self.finished:
                return
        if first <= self.next_seq:
            self.live_delivered += self._deliver(msgs, self.next_seq, nbytes)
            self.next_seq = last + 1
            self._drain_buffer()
        else:
            self._buffer(first, last, msgs, nbytes)
        self._maybe_request(now)

    def on_batch(self, first: int, last: int, msgs: list[Message], now: float,
                 nbytes: int | None = None) -> None:
        """A live batch (records ``first..last``, all of them, decoded):
        :meth:`admits`, then :meth:`take` if admitted."""
        if nbytes is None:
            nbytes = wire_size(msgs)
        if self.admits(first, last, now, nbytes):
            self.take(first, last, msgs, now, nbytes)

    def on_heartbeat(self, last_seq: int, now: float) -> None:
        """The node's newest seq is ``last_seq`` (a tail gap if we lack it)."""
        if last_seq > self.known_tail:
            self.known_tail = last_seq
        if self.next_seq is None and self._since is None:
            self.next_seq = last_seq + 1     # "now" with an idle stream
        self._maybe_request(now)

    def on_chunk(self, rid: int, start_seq: int, next_seq: int, last_seq: int, done: bool,
                 msgs: list[Message], now: float, nbytes: int | None = None) -> None:
        """A replay chunk for request ``rid`` (ignored if stale).

        ``msgs`` must be in increasing seq order (as :func:`~orbcast.envelope.decode_records`
        guarantees) and lie in ``start_seq .. next_seq - 1``; a chunk that breaks that
        would deliver seqs twice or skip some, so it raises
        :class:`~orbcast.errors.RemoteProtocolError` and changes nothing (the replay
        then times out and is asked again)."""
        if rid != self._rid:
            return
        if next_seq < start_seq or (msgs and (msgs[0].seq < start_seq or msgs[-1].seq >= next_seq)):
            raise RemoteProtocolError(
                f"replay chunk {start_seq}..{next_seq - 1} holds records outside that range")
        if self._req_to is not None and next_seq > self._req_to + 1:
            # More than was asked for: taken only up to what was asked (the cursor
            # must not jump past seqs this chunk does not prove it holds; the rest
            # comes live, from the buffer, or is asked for again).
            n = len(msgs)
            next_seq = self._req_to + 1
            msgs = msgs[:bisect.bisect_left([m.seq for m in msgs], next_seq)]
            if nbytes is not None and n:
                nbytes = nbytes * len(msgs) // n
        if last_seq > self.known_tail:
            self.known_tail = last_seq
        resolving = self.next_seq is None
        if resolving:                        # start-by-time: the node told us where
            self.next_seq = self.resolved_start = start_seq
            self._since = None
        if start_seq > self.next_seq:        # we missed a chunk: start over
            self._reset_replay(now, cancel=True)
            self._maybe_request(now)
            return
        self.repaired += self._deliver(msgs, self.next_seq,
                                       wire_size(msgs) if nbytes is None else nbytes)
        if next_seq > self.next_seq:
            self.next_seq = next_seq
        if self.to_seq is not None and self.next_seq > self.to_seq + 1:
            self.next_seq = self.to_seq + 1
        self._outstanding -= 1
        self._deadline = now + self.request_timeout
        self._backoff = self.request_timeout
        self._drain_buffer()
        if done:
            self._rid = None
            self._outstanding = 0
            self._owed = 0
            asked = self._req_to
            if asked is not None and last_seq < asked and last_seq < self.known_tail \
                    and not self._buf:
                # We asked for a tail the node's log does not reach (a heartbeat or
                # WELCOME that overstated it, or a new leader with a shorter log):
                # believe the log, or we would ask for that tail again at once, for
                # ever. (A chunk cut before a newer heartbeat does not count: it
                # answered a shorter request.)
                self.known_tail = max(last_seq, self.next_seq - 1)
        else:
            # the time request had credit 1 (see _maybe_request): open the pipeline now
            self._grant(self.credit if resolving else 1)
        self._maybe_request(now)

    def on_error(self, rid: int, code: str, first_available: int | None, now: float) -> None:
        """The node refused replay ``rid``."""
        if rid != self._rid:
            return
        self._reset_replay(now, cancel=False)
        if code == "not-active":
            # a failover is under way: the plant is switching nodes; ask again
            # soon rather than after a growing backoff
            self._retry_at = now + min(self.request_timeout, NOT_ACTIVE_RETRY_S)
            self._backoff = self.request_timeout
        if code == "gone" and first_available and self.next_seq is not None \
                and first_available > self.next_seq:
            # Skip what retention deleted, but not what the live buffer holds.
            jump = first_available
            if self._buf and self._buf[0][0] < jump:
                jump = self._buf[0][0]
            self.lost_to_retention += jump - self.next_seq
            self.next_seq = jump
            self._retry_at = now
            self._drain_buffer()              # buffered live batches may now be due
        self._maybe_request(now)

    def consumed(self, now: float) -> None:
        """The application took messages from :attr:`ready`: maybe grant credit.

        The plant's engine calls this on every turn; it is cheap when nothing is owed."""
        if self._owed:
            if len(self.ready) < self.ready_limit // 2 and \
                    self.ready_bytes() <= self.ready_bytes_limit // 2:
                n, self._owed = self._owed, 0
                if self._outstanding <= 0:
                    # the node was idle because of us: its answer is due from now on
                    self._deadline = now + self.request_timeout
                self._grant(n)
            else:                            # still full: when to wake us (Subscription.get)
                self.resume_seq = self._resume_point()
        self._maybe_request(now)

    def tick(self, now: float) -> None:
        """Check timers (replay timeout, retry backoff)."""
        if self._rid is not None and now >= self._deadline and not self._paused:
            self.retries += 1
            self._reset_replay(now, cancel=True)
        self._maybe_request(now)

    def restart_replay(self, now: float) -> None:
        """The plant switched nodes: ask again at once, on the new node."""
        if self._rid is not None:
            self._reset_replay(now, cancel=False)
        self._retry_at = now
        self._backoff = self.request_timeout
        self._maybe_request(now)

    def actions(self) -> list[object]:
        """Requests to send (``ReplayRequest``, ``Credit``, ``Cancel``)."""
        out, self._out = self._out, []
        return out

    def deadline(self) -> float | None:
        """When :meth:`tick` next needs to run."""
        if self._rid is not None:
            return None if self._paused else self._deadline   # consumed() resumes a pause
        if not self._has_room():
            return None                       # consumed() wakes us
        if self._gap_exists():
            return self._retry_at
        return None

    def stats(self) -> dict[str, int]:
        return {"next_seq": self.next_seq or 0, "known_tail": self.known_tail,
                "gaps": self.gaps, "repaired": self.repaired, "buffer_hwm": self.buffer_hwm,
                "dropped_live": self.dropped_live, "replays": self.replays,
                "replay_retries": self.retries, "lost_to_retention": self.lost_to_retention,
                "ready": len(self.ready),
                # as the engine last reckoned it (any thread may call stats())
                "ready_bytes": self._ready_bytes if self.ready else 0}

    def ready_bytes(self) -> int:
        """Bytes held by :attr:`ready` (as reckoned: see the module doc); the
        engine's thread only. Forgets the groups the application has popped:
        those whose last seq lies below the next message to pop."""
        groups = self._groups
        if groups:
            try:
                head = self.ready[0].seq
            except IndexError:               # all popped
                groups.clear()
                self._ready_bytes = 0
                return 0
            while groups and groups[0][0] < head:
                self._ready_bytes -= groups.popleft()[1]
        return self._ready_bytes

    # --- internals -------------------------------------------------------------

    @property
    def _paused(self) -> bool:
        """We withhold every credit (the ready queue is full) and no chunk is due: the
        node is silent because of us, which is no reason to time the replay out."""
        return self._owed > 0 and self._outstanding <= 0

    def _has_room(self) -> bool:
        return len(self.ready) < self.ready_limit and self.ready_bytes() < self.ready_bytes_limit

    def _resume_point(self) -> int:
        """The seq after whose pop the ready queue holds at most half its byte
        bound (0 if it does now)."""
        half = self.ready_bytes_limit // 2
        if self.ready_bytes() <= half:
            return 0
        acc = 0
        for last, b in reversed(self._groups):
            acc += b
            if acc > half:
                return last
        return 0                             # not reached: the groups sum to ready_bytes

    def _deliver(self, msgs: list[Message], from_seq: int, nbytes: int) -> int:
        """Append the deliverable ones to :attr:`ready` (``msgs`` came in
        ``nbytes`` of records); returns how many. (Counted here, not from
        ``len(ready)``: the application thread pops from ``ready`` concurrently.)"""
        prefix = self.prefix
        to = self.to_seq
        ready = self.ready
        n = len(msgs)
        if self._min_time is not None and msgs:
            kept = self._not_before(msgs, from_seq)
            if len(kept) != n:
                nbytes = nbytes * len(kept) // n
                msgs, n = kept, len(kept)
        if not prefix and to is None:
            # the common case (everything, unbounded): skip what we have, take the rest
            if msgs and msgs[0].seq >= from_seq:
                ready.extend(msgs)
                self._count(msgs[-1].seq, nbytes + n * MSG_OVERHEAD)
                return n
            i = 0
            while i < n and msgs[i].seq < from_seq:
                i += 1
            ready.extend(msgs[i:])
            k = n - i
            last = msgs[-1].seq if k else 0
        else:
            k = 0
            last = 0
            for m in msgs:
                if m.seq < from_seq:
                    continue
                if to is not None and m.seq > to:
                    break
                if not prefix or m.topic.startswith(prefix):
                    ready.append(m)
                    k += 1
                    last = m.seq
        if k:
            self._count(last, nbytes * k // n + k * MSG_OVERHEAD)
        return k

    def _not_before(self, msgs: list[Message], from_seq: int) -> list[Message]:
        """``msgs`` without those stamped before the start time (the start by time
        of a subscription); from the first one at or after it, everything. Only a
        record at or past the cursor (``from_seq``) counts: one already passed is
        skipped anyway, and times need not grow with seqs across a failover."""
        t = self._min_time
        for i, m in enumerate(msgs):
            if m.time >= t and m.seq >= from_seq:
                self._min_time = None
                return msgs[i:]
        return []

    def _count(self, last_seq: int, b: int) -> None:
        self._groups.append((last_seq, b))
        self._ready_bytes += b

    def _buffer(self, first: int, last: int, msgs: list[Message], nbytes: int) -> None:
        """Keep a batch above the cursor (:meth:`admits` checked the room)."""
        n = last - first + 1
        if self.prefix and msgs:
            k = len(msgs)
            msgs = [m for m in msgs if m.topic.startswith(self.prefix)]
            nbytes = nbytes * len(msgs) // k
        i = bisect.bisect(self._buf, (first,))
        self._buf.insert(i, (first, last, msgs, nbytes))
        self._buf_n += n
        self._buf_bytes += nbytes + len(msgs) * MSG_OVERHEAD
        if self._buf_n > self.buffer_hwm:
            self.buffer_hwm = self._buf_n

    def _drain_buffer(self) -> None:
        buf = self._buf
        while buf and self.next_seq is not None and buf[0][0] <= self.next_seq:
            first, last, msgs, nbytes = buf.pop(0)
            self._buf_n -= last - first + 1
            self._buf_bytes -= nbytes + len(msgs) * MSG_OVERHEAD
            if last >= self.next_seq:
                self._deliver(msgs, self.next_seq, nbytes)
                self.next_seq = last + 1

    def _gap_exists(self) -> bool:
        if self.next_seq is None:
            return self._since is not None
        if self.finished:
            return False
        if self._buf:
            return True
        tail = self.known_tail if self.to_seq is None else min(self.known_tail, self.to_seq)
        return tail >= self.next_seq

    def _maybe_request(self, now: float) -> None:
        if self._rid is not None or not self._gap_exists() or now < self._retry_at:
            return
        if not self._has_room():
            return                            # resume when the app catches up
        if self.next_seq is None:             # start by time
            # Credit 1: the first chunk tells us where the start is, so no later chunk
            # may overtake it; had it been lost, the next one would look like the start.
            req = ReplayRequest(rid=self._new_rid(), from_seq=1, since=self._since,
                                to_seq=self.to_seq, topic=self.prefix, credit=1,
                                max_records=self.chunk_records)
        else:
            # Exactly the missing range: up to the first buffered batch, else up
            # to the newest seq known to exist. Never open-ended: the node would
            # chase its growing tail and send again what arrives live meanwhile
            # (a consumer behind a busy stream decoded much of it twice).
            to = self._buf[0][0] - 1 if self._buf else self.known_tail
            if self.to_seq is not None:
                to = min(to, self.to_seq)
            if to < self.next_seq:
                return
            self.gaps += 1
            # as much credit as the ready queue has room for (at least 1: it is not full)
            req = ReplayRequest(rid=self._new_rid(), from_seq=self.next_seq, to_seq=to,
                                topic=self.prefix,
                                credit=max(1, min(self.credit, self._chunk_room())),
                                max_records=self.chunk_records)
        self.replays += 1
        self._req_to = req.to_seq
        self._rid = req.rid
        self._outstanding = req.credit
        self._owed = 0
        self._deadline = now + self.request_timeout
        self._out.append(req)

    def _chunk_room(self) -> int:
        """How many more chunks the ready queue has room for, counting those
        granted and not yet received (each may bring ``chunk_records`` messages
        and ``chunk_bytes`` bytes)."""
        by_count = (self.ready_limit - len(self.ready)) // self.chunk_records
        by_bytes = (self.ready_bytes_limit - self.ready_bytes()) // self.chunk_bytes
        return min(by_count, by_bytes) - max(self._outstanding, 0)

    def _grant(self, n: int) -> None:
        """Grant ``n`` more chunks, as many as there is room for; owe the rest
        (granted by :meth:`consumed` once the application has made room)."""
        if self._rid is None:
            return
        k = max(0, min(n, self._chunk_room()))
        if k:
            self._outstanding += k
            self._out.append(Credit(rid=self._rid, credit=k))
        if k < n:
            self._owed += n - k
            self.resume_seq = self._resume_point()

    def _reset_replay(self, now: float, *, cancel: bool) -> None:
        if cancel and self._rid is not None:
            self._out.append(Cancel(rid=self._rid))
        self._rid = None
        self._outstanding = 0
        self._owed = 0
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, MAX_RETRY_BACKOFF_S)


def wire_size(msgs: list[Message]) -> int:
    """About the wire size of ``msgs`` as records (for callers that do not
    have the frame they came in)."""
    return sum(len(m.payload) + len(m.topic) + len(m.producer) + 36 for m in msgs)
