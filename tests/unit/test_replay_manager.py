"""Tests of sequencer.replay.ReplayManager against a tiny in-memory log.

The fake log follows the LogStore contract that ReplayManager relies on:
``read(from_seq, max_records=, max_bytes=)`` starts at ``max(from_seq, first_seq)``,
returns at most ``max_records`` records and no more than ``max_bytes`` of bodies except
that the first record is always whole; ``seq_for_time(ns)`` is the first seq whose
time is ``>= ns`` (``last + 1`` when none is); ``first_seq`` is the oldest retained seq.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from orbcast.envelope import Error, Message, ReplayChunk, ReplayRequest, decode, decode_records, encode_record
from sequencer.replay import ReplayManager

TOPICS = ["a/x", "b/y", "a/z", "c"]


def rec(seq: int, t: int | None = None, size: int = 3) -> Message:
    time = 1000 * seq if t is None else t
    return Message(seq, 1, time, "p", seq, TOPICS[seq % len(TOPICS)], b"\x07" * size)


class FakeLog:
    def __init__(self, msgs: list[Message], first_seq: int | None = None) -> None:
        self.msgs = {m.seq: m for m in msgs}
        self.bodies = {m.seq: encode_record(*m) for m in msgs}
        self.last = max(self.msgs, default=0)
        self.first_seq = first_seq if first_seq is not None else min(self.msgs, default=0)
        self.reads: list[tuple[int, int, int]] = []

    def read(self, from_seq: int, *, max_records: int, max_bytes: int) -> list[tuple[int, int, bytes]]:
        self.reads.append((from_seq, max_records, max_bytes))
        out: list[tuple[int, int, bytes]] = []
        used = 0
        for s in range(max(from_seq, self.first_seq), self.last + 1):
            if len(out) >= max_records:
                break
            b = self.bodies[s]
            if out and used + len(b) > max_bytes:
                break
            used += len(b)
            out.append((s, self.msgs[s].time, b))
        return out

    def seq_for_time(self, time_ns: int) -> int:
        for s in range(max(self.first_seq, 1), self.last + 1):
            if self.msgs[s].time >= time_ns:
                return s
        return self.last + 1


def log_of(n: int, **kw: int) -> FakeLog:
    return FakeLog([rec(s) for s in range(1, n + 1)], **kw)


def mgr(max_sessions: int = 8, chunk_bytes: int = 1 << 20, idle_s: float = 30.0) -> ReplayManager:
    return ReplayManager(max_sessions=max_sessions, chunk_bytes=chunk_bytes, idle_s=idle_s)


def chunks(out: list[tuple[bytes, list[bytes]]]) -> list[tuple[bytes, ReplayChunk, list[Message]]]:
    res = []
    for route, frames in out:
        ev = decode(frames)
        assert type(ev) is ReplayChunk
        res.append((route, ev, decode_records(ev.records)))
    return res


def spans(out: list[tuple[bytes, list[bytes]]]) -> list[tuple[int, int, bool, list[int]]]:
    return [(c.start_seq, c.next_seq, c.done, [m.seq for m in ms]) for _r, c, ms in chunks(out)]


# --- chunking and credit ---------------------------------------------------------------------

def test_chunks_cover_the_range_in_order() -> None:
    log = log_of(10)
    m = mgr()
    assert m.open(b"r", ReplayRequest(rid=1, credit=10, max_records=3), log, now=0.0) is None
    out = m.pump(log, durable_seq=10, epoch=4, now=1.0, budget=100)
    assert spans(out) == [(1, 4, False, [1, 2, 3]), (4, 7, False, [4, 5, 6]), (7, 10, False, [7, 8, 9]),
                          (10, 11, True, [10])]
    cs = chunks(out)
    assert all(r == b"r" and c.rid == 1 and c.epoch == 4 and c.last_seq == 10 for r, c, _ in cs)
    assert [m_ for _r, _c, ms in cs for m_ in ms] == [log.msgs[s] for s in range(1, 11)]
    assert len(m) == 0                                   # done: the session is gone
    assert m.stats() == {"replays_open": 0, "replayed_records": 10, "replay_chunks": 4}


def test_the_final_chunk_is_not_an_empty_extra() -> None:
    log = log_of(9)
    m = mgr()
    m.open(b"r", ReplayRequest(rid=1, credit=10, max_records=3), log, now=0.0)
    assert [d for _s, _n, d, _ in spans(m.pump(log, durable_seq=9, epoch=1, now=0.0, budget=10))] \
        == [False, False, True]


def test_credit_exhaustion_stops_sending_and_credit_resumes() -> None:
    log = log_of(20)
    m = mgr()
    m.open(b"r", ReplayRequest(rid=1, credit=2, max_records=2), log, now=0.0)
    assert m.ready
    out = spans(m.pump(log, durable_seq=20, epoch=1, now=0.0, budget=100))
    assert [s[:2] for s in out] == [(1, 3), (3, 5)]
    assert not m.ready
    assert m.pump(log, durable_seq=20, epoch=1, now=0.0, budget=100) == []
    assert m.credit(b"r", 1, 1, now=1.0) is True
    assert [s[:2] for s in spans(m.pump(log, durable_seq=20, epoch=1, now=1.0, budget=100))] == [(5, 7)]
    assert m.pump(log, durable_seq=20, epoch=1, now=1.0, budget=100) == []
    assert m.credit(b"r", 2, 1, now=1.0) is False        # unknown rid
    assert m.credit(b"other", 1, 1, now=1.0) is False    # same rid, other connection


def test_credit_is_capped_at_64() -> None:
    log = log_of(200)
    m = mgr()
    m.open(b"r", ReplayRequest(rid=1, credit=60, max_records=1), log, now=0.0)
    m.credit(b"r", 1, 64, now=0.0)
    assert len(m.pump(log, durable_seq=200, epoch=1, now=0.0, budget=1000)) == 64


def test_budget_is_shared_across_sessions() -> None:
    log = log_of(50)
    m = mgr()
    m.open(b"a", ReplayRequest(rid=1, credit=2, max_records=5), log, now=0.0)
    m.open(b"b", ReplayRequest(rid=1, credit=2, max_records=5), log, now=0.0)
    out = m.pump(log, durable_seq=50, epoch=1, now=0.0, budget=3)
    assert [r for r, _ in out] == [b"a", b"a", b"b"]
    out = m.pump(log, durable_seq=50, epoch=1, now=0.0, budget=3)
    assert [r for r, _ in out] == [b"b"]                 # a has no credit left
    assert [c.start_seq for _r, c, _ in chunks(out)] == [6]


def test_only_durable_records_are_served() -> None:
    log = log_of(10)
    m = mgr()
    m.open(b"r", ReplayRequest(rid=1, credit=8, max_records=4), log, now=0.0)
    out = spans(m.pump(log, durable_seq=6, epoch=1, now=0.0, budget=10))
    assert out == [(1, 5, False, [1, 2, 3, 4]), (5, 7, True, [5, 6])]
    assert max(s for _a, _b, _d, ss in out for s in ss) == 6


def test_start_beyond_the_end_is_an_empty_done_chunk() -> None:
    log = log_of(5)
    m = mgr()
    m.open(b"r", ReplayRequest(rid=3, from_seq=9), log, now=0.0)
    assert spans(m.pump(log, durable_seq=5, epoch=1, now=0.0, budget=10)) == [(9, 9, True, [])]
    m.open(b"r", ReplayRequest(rid=4, from_seq=3, to_seq=2), log, now=0.0)
    assert spans(m.pump(log, durable_seq=5, epoch=1, now=0.0, budget=10)) == [(3, 3, True, [])]


def test_chunk_bytes_bound_the_chunk() -> None:
    log = FakeLog([rec(s, size=100) for s in range(1, 11)])
    body = len(log.bodies[1])
    m = mgr(chunk_bytes=2 * body + 1)
    m.open(b"r", ReplayRequest(rid=1, credit=20, max_records=100), log, now=0.0)
    out = spans(m.pump(log, durable_seq=10, epoch=1, now=0.0, budget=20))
    assert [ss for _a, _b, _d, ss in out] == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    assert all(mb == 2 * body + 1 for _f, _n, mb in log.reads)


# --- filters and bounds ---------------------------------------------------------------------

def test_topic_filter_advances_past_filtered_records() -> None:
    log = log_of(12)
    m = mgr()
    m.open(b"r", ReplayRequest(rid=1, credit=20, max_records=4, topic="a/"), log, now=0.0)
    out = spans(m.pump(log, durable_seq=12, epoch=1, now=0.0, budget=20))
    assert [(s, n) for s, n, _d, _ in out] == [(1, 5), (5, 9), (9, 13)]
    got = [s for _s, _n, _d, ss in out for s in ss]
    assert got == [s for s in range(1, 13) if TOPICS[s % 4].startswith("a/")]


def test_topic_filter_can_make_a_chunk_empty_but_still_advancing() -> None:
    log = FakeLog([Message(s, 1, s, "p", s, "a" if s > 6 else "b", b"") for s in range(1, 10)])
    m = mgr()
    m.open(b"r", ReplayRequest(rid=1, credit=20, max_records=3, topic="a"), log, now=0.0)
    out = spans(m.pump(log, durable_seq=9, epoch=1, now=0.0, budget=20))
    assert out == [(1, 4, False, []), (4, 7, False, []), (7, 10, True, [7, 8, 9])]


def test_to_seq_stops_the_replay() -> None:
    log = log_of(10)
    m = mgr()
    m.open(b"r", ReplayRequest(rid=1, from_seq=2, to_seq=5, credit=20, max_records=3), log, now=0.0)
    assert spans(m.pump(log, durable_seq=10, epoch=1, now=0.0, budget=20)) == [
        (2, 5, False, [2, 3, 4]), (5, 6, True, [5])]


def test_since_and_until_by_time() -> None:
    log = log_of(10)                                      # time = 1000 * seq
    m = mgr()
    m.open(b"r", ReplayRequest(rid=1, since=2500, until=6000, credit=20, max_records=2), log, now=0.0)
    out = spans(m.pump(log, durable_seq=10, epoch=1, now=0.0, budget=20))
    assert out == [(3, 5, False, [3, 4]), (5, 6, True, [5])]   # stops before the record at 6000
    assert len(m) == 0


def test_until_before_anything_is_an_empty_done_chunk() -> None:
    log = log_of(5)
    m = mgr()
    m.open(b"r", ReplayRequest(rid=1, until=10), log, now=0.0)
    assert spans(m.pump(log, durable_seq=5, epoch=1, now=0.0, budget=20)) == [(1, 1, True, [])]


def test_since_after_everything_resolves_to_the_end() -> None:
    log = log_of(5)
    m = mgr()
    m.open(b"r", ReplayRequest(rid=1, since=10**9), log, now=0.0)
    assert spans(m.pump(log, durable_seq=5, epoch=1, now=0.0, budget=20)) == [(6, 6, True, [])]


# --- refusals -------------------------------------------------------------------------------

def test_gone_when_the_start_was_removed_by_retention() -> None:
    log = FakeLog([rec(s) for s in range(5, 11)])
    assert log.first_seq == 5
    m = mgr()
    frames = m.open(b"r", ReplayRequest(rid=7, from_seq=3), log, now=0.0)
    assert frames is not None
    err = decode(frames)
    assert type(err) is Error and (err.rid, err.code, err.first_available) == (7, "gone", 5)
    assert len(m) == 0
    assert m.open(b"r", ReplayRequest(rid=8, from_seq=5), log, now=0.0) is None
    # a start by time before everything resolves to the first retained seq: not gone
    assert m.open(b"r", ReplayRequest(rid=9, since=0), log, now=0.0) is None
    out = m.pump(log, durable_seq=10, epoch=1, now=0.0, budget=2)
    assert [c.start_seq for _r, c, _ in chunks(out)] == [5, 5]


def test_retention_during_a_replay_never_serves_past_the_limit() -> None:
    """Retention moves the log's start past the session's cursor: read() then returns
    later seqs than asked, and those past to_seq must not be sent."""
    log = log_of(10)
    m = mgr()
    assert m.open(b"r", ReplayRequest(rid=1, from_seq=1, to_seq=4, credit=4), log, now=0.0) is None
    log.first_seq = 3                                    # 1 and 2 removed meanwhile
    assert spans(m.pump(log, durable_seq=10, epoch=1, now=0.0, budget=4)) == [(1, 5, True, [3, 4])]
    m = mgr()
    assert m.open(b"r", ReplayRequest(rid=2, from_seq=1, to_seq=2, credit=4), log_of(10), now=0.0) is None
    log.first_seq = 6                                    # everything up to to_seq is gone
    assert spans(m.pump(log, durable_seq=10, epoch=1, now=0.0, budget=1)) == [(1, 1, False, [])]


def test_a_read_acl_filters_even_a_replay_without_a_prefix() -> None:
    """The unfiltered fast path must not bypass the requester's read ACL, and the ACL
    in force when each chunk is cut applies (a revocation stops a running replay)."""
    allowed = {"a/"}

    def readable(topic: str) -> bool:
        return any(topic.startswith(p) for p in allowed)

    log = log_of(12)
    m = mgr()
    assert m.open(b"r", ReplayRequest(rid=1, from_seq=1, credit=1, max_records=6), log, now=0.0,
                  readable=readable) is None
    assert spans(m.pump(log, durable_seq=12, epoch=1, now=0.0, budget=4)) == [(1, 7, False, [2, 4, 6])]
    allowed.clear()                                      # revoked
    m.credit(b"r", 1, 1, now=0.0)
    assert spans(m.pump(log, durable_seq=12, epoch=1, now=0.0, budget=4)) == [(7, 13, True, [])]


def test_never_gone_when_the_log_starts_at_one_or_is_empty() -> None:
    m = mgr()
    assert m.open(b"r", ReplayRequest(rid=1, from_seq=1), log_of(3), now=0.0) is None
    assert m.open(b"r", ReplayRequest(rid=2, from_seq=1), FakeLog([]), now=0.0) is None


def test_busy_when_too_many_sessions() -> None:
    log = log_of(3)
    m = mgr(max_sessions=2)
    assert m.open(b"a", ReplayRequest(rid=1), log, now=0.0) is None
    assert m.open(b"b", ReplayRequest(rid=1), log, now=0.0) is None   # same rid, other connection
    frames = m.open(b"c", ReplayRequest(rid=5), log, now=0.0)
    err = decode(frames)  # type: ignore[arg-type]
    assert type(err) is Error and (err.rid, err.code) == (5, "busy")
    assert len(m) == 2 and (b"c", 5) not in m.sessions()
    # re-opening an existing session is a replacement, not a new one
    assert m.open(b"a", ReplayRequest(rid=1, from_seq=3), log, now=0.0) is None
    assert spans(m.pump(log, durable_seq=3, epoch=1, now=0.0, budget=1)) == [(3, 4, True, [3])]


def test_busy_is_checked_before_gone() -> None:
    log = FakeLog([rec(s) for s in range(5, 8)])
    m = mgr(max_sessions=1)
    m.open(b"a", ReplayRequest(rid=1, from_seq=5), log, now=0.0)
    frames = m.open(b"b", ReplayRequest(rid=1, from_seq=1), log, now=0.0)
    assert frames is not None
    err = decode(frames)
    assert type(err) is Error and err.code == "busy"


def test_cancel_and_fail_remove_the_session() -> None:
    log = log_of(5)
    m = mgr()
    m.open(b"a", ReplayRequest(rid=1), log, now=0.0)
    m.open(b"a", ReplayRequest(rid=2), log, now=0.0)
    m.cancel(b"a", 1)
    m.cancel(b"a", 99)                                    # unknown: no error
    assert m.sessions() == [(b"a", 2)]
    err = decode(m.fail(b"a", 2, "log-corrupted", "bad crc"))
    assert type(err) is Error and (err.rid, err.code, err.message) == (2, "log-corrupted", "bad crc")
    assert len(m) == 0 and m.pump(log, durable_seq=5, epoch=1, now=0.0, budget=5) == []


# --- idle expiry ---------------------------------------------------------------------------

def test_idle_sessions_expire() -> None:
    log = log_of(100)
    m = mgr(idle_s=30.0)
    m.open(b"a", ReplayRequest(rid=1, credit=1, max_records=1), log, now=100.0)
    m.open(b"b", ReplayRequest(rid=1, credit=1, max_records=1), log, now=100.0)
    m.pump(log, durable_seq=100, epoch=1, now=110.0, budget=10)   # both sent a chunk at 110
    assert m.credit(b"a", 1, 1, now=125.0)               # a is active again at 125
    assert m.expire(140.0) == 0                           # b idle exactly 30 s: kept
    assert m.expire(140.5) == 1                           # b idle > 30 s: dropped
    assert m.sessions() == [(b"a", 1)]
    assert m.credit(b"b", 1, 1, now=141.0) is False
    assert m.expire(155.0) == 0
    assert m.expire(155.1) == 1 and len(m) == 0


# --- a randomized check against a model ----------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_requests_deliver_exactly_the_filtered_range(data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 40))
    first = data.draw(st.integers(1, max(1, n)))
    log = FakeLog([rec(s) for s in range(first, n + 1)], first_seq=first if n else 0)
    durable = data.draw(st.integers(0, n))
    req = ReplayRequest(
        rid=data.draw(st.integers(0, 10)),
        from_seq=data.draw(st.integers(0, n + 2)),
        to_seq=data.draw(st.none() | st.integers(0, n + 2)),
        since=data.draw(st.none() | st.integers(0, 1000 * (n + 2))),
        until=data.draw(st.none() | st.integers(0, 1000 * (n + 2))),
        topic=data.draw(st.sampled_from(["", "a/", "b", "c", "zz"])),
        credit=data.draw(st.integers(1, 4)),
        max_records=data.draw(st.integers(1, 7)),
    )
    m = mgr(chunk_bytes=data.draw(st.sampled_from([1, 60, 1 << 20])))
    err = m.open(b"r", req, log, now=0.0)
    start = max(req.from_seq, 1)
    if req.since is not None:
        start = max(start, log.seq_for_time(req.since))
    if first > 1 and start < first:
        assert err is not None and decode(err).code == "gone"  # type: ignore[union-attr]
        return
    assert err is None
    got: list[ReplayChunk] = []
    msgs: list[Message] = []
    for _ in range(1000):
        out = m.pump(log, durable_seq=durable, epoch=1, now=0.0, budget=data.draw(st.integers(1, 3)))
        for _r, c, ms in chunks(out):
            got.append(c)
            msgs.extend(ms)
        if not len(m):
            break
        if not m.ready:
            m.credit(b"r", req.rid, data.draw(st.integers(1, 3)), now=0.0)
    assert len(m) == 0
    # chunks are contiguous, only the last is done
    assert got and got[0].start_seq == start
    assert all(a.next_seq == b.start_seq for a, b in zip(got, got[1:]))
    assert [c.done for c in got] == [False] * (len(got) - 1) + [True]
    # exactly the model's records
    limit = durable if req.to_seq is None else min(req.to_seq, durable)
    expect = []
    for s in range(start, limit + 1):
        r = log.msgs[s]
        if req.until is not None and r.time >= req.until:
            break
        if r.topic.startswith(req.topic):
            expect.append(r)
    assert msgs == expect
    assert all(c.start_seq <= mm.seq < c.next_seq for c in got for mm in decode_records(c.records))


def test_a_damaged_log_fails_only_the_replay_that_reaches_the_damage() -> None:
    """A chunk that meets corruption ends that session with ``log-corrupted``
    (naming the file and offset); a session reading elsewhere goes on, and the
    chunks cut for it in the same pump are not lost."""
    from orbcast.errors import LogCorruptedError

    class DamagedLog(FakeLog):
        def read(self, from_seq: int, *, max_records: int, max_bytes: int) -> list[tuple[int, int, bytes]]:
            got = super().read(from_seq, max_records=max_records, max_bytes=max_bytes)
            if any(40 <= s <= 45 for s, _t, _b in got):
                raise LogCorruptedError("/data/log/2023-12-10.seg", 4242, "bad CRC")
            return got

    log = DamagedLog([rec(s) for s in range(1, 101)])
    m = mgr()
    m.open(b"a", ReplayRequest(rid=1, from_seq=35, credit=4, max_records=5), log, now=0.0)
    m.open(b"b", ReplayRequest(rid=2, from_seq=60, credit=4, max_records=5), log, now=0.0)
    out = m.pump(log, durable_seq=100, epoch=1, now=0.0, budget=8)
    a = [decode(f) for r, f in out if r == b"a"]
    assert [type(e) for e in a] == [ReplayChunk, Error]
    assert (a[0].start_seq, a[0].next_seq) == (35, 40)
    assert a[1].code == "log-corrupted" and a[1].rid == 1 and "byte offset 4242" in a[1].message
    assert spans([(r, f) for r, f in out if r == b"b"]) == [
        (60, 65, False, [60, 61, 62, 63, 64]), (65, 70, False, list(range(65, 70))),
        (70, 75, False, list(range(70, 75))), (75, 80, False, list(range(75, 80)))]
    assert m.sessions() == [(b"b", 2)] and len(m.corruptions) == 1
