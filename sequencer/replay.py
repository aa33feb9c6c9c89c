"""Replay sessions: serve a range of the log to one plant, chunk by chunk,
under the plant's credit (flow control).

A plant sends ``REPLAY`` with a credit of *k* chunks; the node sends at most
*k* chunks and then waits for ``CREDIT``. So a slow Pi is never flooded, and
the node never holds more than one chunk per session in memory: records are
read from the log only when a chunk is cut. Sessions without credit for
``idle_s`` seconds are dropped (the plant retries if it is still there).

This module does no socket I/O and reads no clock: the driver passes
``now`` and a log object with ``read(from_seq, max_records=, max_bytes=)``,
``seq_for_time(ns)`` and ``first_seq``, and sends the frames it gets back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Protocol

from orbcast.envelope import Error, ReplayRequest, chunk_frames, encode, record_topic
from orbcast.errors import LogCorruptedError

__all__ = ["ReplayManager", "LogReader"]

_BODY = itemgetter(2)   # the body of a (seq, time_ns, body) log record


class LogReader(Protocol):
    first_seq: int

    def read(self, from_seq: int, *, max_records: int, max_bytes: int) -> list[tuple[int, int, bytes]]: ...

    def seq_for_time(self, time_ns: int) -> int: ...


@dataclass(slots=True)
class _Session:
    route: bytes
    rid: int
    next_seq: int
    to_seq: int | None
    until: int | None
    topic: str
    credit: int
    max_records: int
    touched: float
    #: the requester's read ACL (link security), checked at every chunk; None: all
    readable: Callable[[str], bool] | None = None


class ReplayManager:
    """All open replay sessions of one node."""

    def __init__(self, *, max_sessions: int, chunk_bytes: int, idle_s: float) -> None:
        self.max_sessions = max_sessions
        self.chunk_bytes = chunk_bytes
        self.idle_s = idle_s
        self._s: dict[tuple[bytes, int], _Session] = {}
        self.replayed_records = 0
        self.chunks_sent = 0
        #: LogCorruptedErrors met by :meth:`pump` since the driver last took them
        self.corruptions: list[LogCorruptedError] = []

    def __len__(self) -> int:
        return len(self._s)

    @property
    def ready(self) -> bool:
        """True if some session has credit (the driver should not sleep)."""
        return any(s.credit > 0 for s in self._s.values())

    def open(self, route: bytes, req: ReplayRequest, log: LogReader, now: float, *,
             readable: Callable[[str], bool] | None = None) -> list[bytes] | None:
        """Start a session. Returns error frames to send, or ``None``.

        ``readable(topic)`` (link security) filters every chunk by the
        requester's read ACL *when the chunk is cut*, so a revocation or a
        narrowed allowlist applies to a replay already running."""
        key = (route, req.rid)
        if key not in self._s and len(self._s) >= self.max_sessions:
            return encode(Error(rid=req.rid, code="busy",
                                message=f"too many replays open (max {self.max_sessions}); retry later"))
        start = max(req.from_seq, 1)
        if req.since is not None:
            start = max(start, log.seq_for_time(req.since))
        first = log.first_seq
        if first > 1 and start < first:
            return encode(Error(rid=req.rid, code="gone", first_available=first,
                                message=f"seqs before {first} were removed by retention"))
        self._s[key] = _Session(route, req.rid, start, req.to_seq, req.until, req.topic,
                                req.credit, req.max_records, now, readable)
        return None

    def credit(self, route: bytes, rid: int, n: int, now: float) -> bool:
        """Add credit; False if the session is unknown (expired or done)."""
        s = self._s.get((route, rid))
        if s is None:
            return False
        s.credit = min(s.credit + n, 64)
        s.touched = now
        return True

    def cancel(self, route: bytes, rid: int) -> None:
        self._s.pop((route, rid), None)

    def expire(self, now: float) -> int:
        """Drop sessions idle for longer than ``idle_s``; returns how many."""
        dead = [k for k, s in self._s.items() if now - s.touched > self.idle_s]
        for k in dead:
            del self._s[k]
        return len(dead)

    def pump(self, log: LogReader, *, durable_seq: int, epoch: int, now: float,
             budget: int) -> list[tuple[bytes, list[bytes]]]:
        """Cut up to ``budget`` chunks across sessions with credit.

        Returns ``(route, frames)`` pairs. Only records ``<= durable_seq`` are
        served. A session whose chunk meets a damaged log is answered with a
        ``log-corrupted`` ERROR and closed (the error is kept in
        :attr:`corruptions` for the driver to log); the other sessions go on.
        """
        out: list[tuple[bytes, list[bytes]]] = []
        for key, s in list(self._s.items()):
            if budget <= 0:
                break
            while s.credit > 0 and budget > 0:
                try:
                    frames, done = self._cut(s, log, durable_seq, epoch)
                except LogCorruptedError as exc:
                    self.corruptions.append(exc)
                    out.append((s.route, self.fail(s.route, s.rid, "log-corrupted", str(exc))))
                    budget -= 1
                    break
                out.append((s.route, frames))
                s.credit -= 1
                s.touched = now
                budget -= 1
                if done:
                    del self._s[key]
                    break
        return out

    def fail(self, route: bytes, rid: int, code: str, message: str) -> list[bytes]:
        """Drop a session after an error and return the error frames."""
        self._s.pop((route, rid), None)
        return encode(Error(rid=rid, code=code, message=message))

    def sessions(self) -> list[tuple[bytes, int]]:
        return list(self._s)

    def _cut(self, s: _Session, log: LogReader, durable_seq: int, epoch: int) -> tuple[list[bytes], bool]:
        limit = durable_seq if s.to_seq is None else min(s.to_seq, durable_seq)
        start = s.next_seq
        bodies: list[bytes] = []
        done = False
        if start > limit:
            done = True
        else:
            want = min(s.max_records, limit - start + 1)
            recs = log.read(start, max_records=want, max_bytes=self.chunk_bytes)
            nxt = start
            topic = s.topic
            until = s.until
            readable = s.readable
            if not topic and until is None and readable is None:
                # no per-record filter (the common case without a read ACL): read()
                # returns consecutive seqs, so only a tail can lie past the limit (when
                # retention moved the log's start past ours); take the bodies in one
                # C-level pass
                take = recs
                if take and take[-1][0] > limit:
                    take = [r for r in take if r[0] <= limit]
                if take:
                    nxt = take[-1][0] + 1
                    bodies = list(map(_BODY, take))
            else:
                # topics repeat within a chunk: decide each distinct one once (prefix
                # and read ACL), so the ACL is still the one in force at this chunk
                keep: dict[str, bool] = {}     # at most one entry per record of the chunk
                for seq, t, body in recs:
                    if seq > limit:
                        break
                    if until is not None and t >= until:
                        done = True
                        break
                    nxt = seq + 1
                    if not topic and readable is None:
                        bodies.append(body)
                        continue
                    rt = record_topic(body)
                    ok = keep.get(rt)
                    if ok is None:
                        ok = keep[rt] = rt.startswith(topic) and (readable is None or readable(rt))
                    if ok:
                        bodies.append(body)
            if not recs:
                done = True   # nothing more in the log (should not happen below durable_seq)
            s.next_seq = nxt
            if nxt > limit:
                done = True
        self.replayed_records += len(bodies)
        self.chunks_sent += 1
        return chunk_frames(s.rid, epoch, start, s.next_seq, durable_seq, done, bodies), done

    def stats(self) -> dict[str, Any]:
        return {"replays_open": len(self._s), "replayed_records": self.replayed_records,
                "replay_chunks": self.chunks_sent}
