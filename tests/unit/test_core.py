"""Tests of sequencer.core: gap-free seqs, idempotent publish (dedup), release only after
durability, batch splitting, the bounded dedup window, snapshots, monotonic time.

Sans-I/O: literal ``now`` values, records decoded with the envelope codec, the "log"
is a Python list. The last test is a Hypothesis model check of the whole core.
"""

from __future__ import annotations

import zlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orbcast.envelope import MAX_BATCH_RECORDS, Message, decode_record
from orbcast.errors import RemoteProtocolError
from sequencer import core as core_mod
from sequencer.core import (
    MAX_EGRESS_BATCH_BYTES,
    MAX_RUNS_PER_PRODUCER,
    UNKNOWN_OLD,
    DedupTable,
    SequencerCore,
)


def new_core(last_seq: int = 0, last_time: int = 0, epoch: int = 1) -> SequencerCore:
    return SequencerCore(last_seq=last_seq, last_time=last_time, epoch=epoch, dedup=DedupTable())


def items(*pseqs: int, topic: str = "t", size: int = 1) -> list[tuple[int, str, bytes]]:
    return [(p, topic, bytes([p % 256]) * size) for p in pseqs]


def written(c: SequencerCore) -> list[Message]:
    return [decode_record(body) for _s, _t, body in c.take_unwritten()]


# --- sequencing ----------------------------------------------------------------------------

def test_seqs_are_gap_free_from_last_seq_plus_one() -> None:
    c = new_core(last_seq=41, last_time=5, epoch=3)
    c.publish(b"r1", 1, "kitchen", [(7, "sensors/t", b"21.5"), (8, "sensors/h", b"")], now=1000)
    c.publish(b"r2", 2, "garden", items(1), now=1001)
    recs = c.take_unwritten()
    assert [s for s, _t, _b in recs] == [42, 43, 44]
    assert [decode_record(b) for _s, _t, b in recs] == [
        Message(42, 3, 1000, "kitchen", 7, "sensors/t", b"21.5"),
        Message(43, 3, 1000, "kitchen", 8, "sensors/h", b""),
        Message(44, 3, 1001, "garden", 1, "t", b"\x01"),
    ]
    assert [t for _s, t, _b in recs] == [1000, 1000, 1001]
    assert c.last_seq == 44 and c.sequenced == 3
    assert c.take_unwritten() == [] and not c.has_unwritten


def test_resend_gets_the_original_seq_after_many_interleaved_producers() -> None:
    c = new_core()
    c.publish(b"p", 1, "p", items(1, 2, 3), now=1)
    original = {m.producer_seq: m.seq for m in written(c)}
    for i in range(500):
        c.publish(b"o", 10 + i, f"other{i % 37}", items(i), now=2 + i)
    written(c)
    last = c.last_seq
    c.publish(b"p", 2000, "p", items(3, 1, 2), now=9999)
    assert c.take_unwritten() == []                     # nothing new
    assert c.last_seq == last and c.duplicates == 3
    acks = c.durable(c.last_seq).acks
    assert acks[-1] == (b"p", 2000, [3, original[3], 1, original[1], 2, original[2]])


def test_duplicate_inside_one_frame() -> None:
    c = new_core()
    c.publish(b"r", 1, "p", items(5, 6, 5, 5), now=1)
    recs = written(c)
    assert [(m.seq, m.producer_seq) for m in recs] == [(1, 5), (2, 6)]
    assert c.durable(2).acks == [(b"r", 1, [5, 1, 6, 2, 5, 1, 5, 1])]


def test_holes_are_sequenced_when_they_arrive() -> None:
    c = new_core()
    c.publish(b"r", 1, "p", items(1, 3), now=1)
    c.publish(b"r", 2, "p", items(2), now=1)           # a hole filled late: new seq
    assert [(m.seq, m.producer_seq) for m in written(c)] == [(1, 1), (2, 3), (3, 2)]
    c.publish(b"r", 3, "p", items(3, 2, 1), now=1)
    assert c.take_unwritten() == []
    assert c.durable(3).acks[-1] == (b"r", 3, [3, 2, 2, 3, 1, 1])


def test_time_never_goes_backwards() -> None:
    c = new_core(last_time=100)
    c.publish(b"r", 1, "p", items(1), now=50)           # behind the log's last time
    c.publish(b"r", 2, "p", items(2), now=200)
    c.publish(b"r", 3, "p", items(3, 4), now=150)       # clock stepped back
    c.publish(b"r", 4, "p", items(5), now=201)
    assert [t for _s, t, _b in c.take_unwritten()] == [100, 200, 200, 200, 201]
    assert c.last_time == 201


# --- release after durability ----------------------------------------------------------------

def test_nothing_leaves_before_durable() -> None:
    c = new_core()
    c.publish(b"a", 1, "p", items(1, 2), now=1)
    c.publish(b"b", 2, "q", items(1), now=2)
    c.take_unwritten()
    assert c.has_waiting
    out = c.durable(0)
    assert out.batches == [] and out.acks == []
    out = c.durable(1)                                   # ack 1 needs seq 2
    assert [(f, l) for f, l, _ in out.batches] == [(1, 1)] and out.acks == []
    out = c.durable(3)
    assert [(f, l) for f, l, _ in out.batches] == [(2, 3)]
    assert out.acks == [(b"a", 1, [1, 1, 2, 2]), (b"b", 2, [1, 3])]
    assert not c.has_waiting
    assert c.durable(3).acks == [] and c.durable(2).batches == []   # idempotent, never backwards


def test_acks_leave_in_publish_order() -> None:
    c = new_core()
    c.publish(b"a", 1, "p", items(1), now=1)            # seq 1
    c.publish(b"b", 2, "q", items(1, 2, 3), now=1)      # seqs 2..4
    c.publish(b"a", 3, "p", items(1), now=1)            # duplicate of seq 1
    # the duplicate needs only seq 1 but must not overtake the ack in front of it
    assert c.durable(1).acks == [(b"a", 1, [1, 1])]
    assert c.durable(3).acks == []
    assert c.durable(4).acks == [(b"b", 2, [1, 2, 2, 3, 3, 4]), (b"a", 3, [1, 1])]


def test_ack_of_a_resend_waits_for_the_original_to_be_durable() -> None:
    c = new_core()
    c.publish(b"a", 1, "p", items(1, 2), now=1)
    c.publish(b"a", 2, "p", items(2), now=1)            # resent before it is durable
    assert c.durable(1).acks == []
    assert c.durable(2).acks == [(b"a", 1, [1, 1, 2, 2]), (b"a", 2, [2, 2])]


def test_durable_beyond_the_last_seq_is_refused() -> None:
    c = new_core(last_seq=10)
    c.publish(b"a", 1, "p", items(1), now=1)
    with pytest.raises(ValueError):
        c.durable(12)
    assert c.durable(11).acks == [(b"a", 1, [1, 11])]


def test_batches_carry_exactly_the_released_bodies() -> None:
    c = new_core(last_seq=100)
    for i in range(10):
        c.publish(b"a", i, "p", items(i, topic=f"t/{i}"), now=i)
    bodies = [b for _s, _t, b in c.take_unwritten()]
    out = [c.durable(103), c.durable(107), c.durable(110)]
    assert [[(f, l) for f, l, _ in o.batches] for o in out] == [[(101, 103)], [(104, 107)], [(108, 110)]]
    assert [b for o in out for _f, _l, bs in o.batches for b in bs] == bodies


def test_batches_split_at_max_batch_records(monkeypatch: pytest.MonkeyPatch) -> None:
    # the byte limit (64 KiB) cuts first for any real record: lift it to reach this one
    monkeypatch.setattr(core_mod, "MAX_EGRESS_BATCH_BYTES", 1 << 30)
    c = new_core()
    n = 2 * MAX_BATCH_RECORDS + 5
    c.publish(b"a", 1, "p", [(i, "t", b"") for i in range(n)], now=1)
    bodies = [b for _s, _t, b in c.take_unwritten()]
    out = c.durable(n)
    assert [(f, l) for f, l, _ in out.batches] == [
        (1, MAX_BATCH_RECORDS), (MAX_BATCH_RECORDS + 1, 2 * MAX_BATCH_RECORDS),
        (2 * MAX_BATCH_RECORDS + 1, n)]
    assert [len(bs) for _f, _l, bs in out.batches] == [MAX_BATCH_RECORDS, MAX_BATCH_RECORDS, 5]
    assert [b for _f, _l, bs in out.batches for b in bs] == bodies


@pytest.mark.parametrize("sizes", [
    [20_000] * 12,                                    # several records per batch
    [100] * 3 + [MAX_EGRESS_BATCH_BYTES + 10] + [100] * 3,   # one oversized record alone
    [MAX_EGRESS_BATCH_BYTES // 2 - 40] * 5,
])
def test_batches_split_by_bytes(sizes: list[int]) -> None:
    c = new_core()
    c.publish(b"a", 1, "p", [(i, "t", b"x" * s) for i, s in enumerate(sizes)], now=1)
    bodies = [b for _s, _t, b in c.take_unwritten()]
    out = c.durable(len(sizes))
    assert [b for _f, _l, bs in out.batches for b in bs] == bodies
    expect_first = 1
    for k, (first, last, bs) in enumerate(out.batches):
        assert first == expect_first and last - first + 1 == len(bs)
        expect_first = last + 1
        size = sum(map(len, bs))
        assert size <= MAX_EGRESS_BATCH_BYTES or len(bs) == 1
        if k + 1 < len(out.batches):     # greedy: the next record would not have fitted
            nxt = out.batches[k + 1][2][0]
            assert size + len(nxt) > MAX_EGRESS_BATCH_BYTES
    assert expect_first == len(sizes) + 1
    assert len(out.batches) > 1


# --- the dedup window ---------------------------------------------------------------------

@pytest.fixture(autouse=True)
def small_pseq_window(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Most eviction tests use a few thousand spaced pairs; shrink the protected
    producer-seq window so eviction is reachable with them (the window itself
    is tested separately)."""
    if "evicts_in_chunks" not in request.keywords:
        monkeypatch.setattr(core_mod, "EVICT_SLACK", 0)      # exact limits, as tested below
    if "keeps_pseq_window" not in request.keywords:
        monkeypatch.setattr(core_mod, "MIN_PSEQ_WINDOW", 0)


@pytest.mark.keeps_pseq_window
def test_runs_inside_the_pseq_window_are_never_evicted() -> None:
    """A fragmented producer keeps every pair of its newest MIN_PSEQ_WINDOW
    producer seqs in memory (its outbox cannot be older), so resends never
    need the slow log search, as long as they take at most HARD_MAX_RUNS runs
    (next test); past the window the runs are evicted."""
    t = DedupTable()
    n = core_mod.MAX_RUNS_PER_PRODUCER + 500
    spaced(t, "p", n)                          # hi = 2n - 1, far inside the window
    assert t.producer("p").floor == 0
    assert t.lookup("p", 1) == 1               # the oldest pair is still remembered
    big = DedupTable()
    step = 2 * core_mod.MIN_PSEQ_WINDOW // core_mod.MAX_RUNS_PER_PRODUCER
    for i in range(core_mod.MAX_RUNS_PER_PRODUCER + 50):
        big.record("p", step * i + 1, 10 * i + 1)
    p = big.producer("p")
    assert p.floor > 0
    assert big.lookup("p", 1) == UNKNOWN_OLD           # evicted: outside the window
    for i in range(core_mod.MAX_RUNS_PER_PRODUCER + 50):
        pseq = step * i + 1
        if pseq > p.hi - core_mod.MIN_PSEQ_WINDOW:       # inside the window: remembered
            assert big.lookup("p", pseq) == 10 * i + 1


@pytest.mark.evicts_in_chunks
@pytest.mark.keeps_pseq_window
def test_a_producer_at_the_run_limit_evicts_in_chunks() -> None:
    """One message per run at HARD_MAX_RUNS: runs are dropped EVICT_SLACK + 1 at
    a time, so the arrays move once per that many messages (each move copies
    every run), and the table never holds more than the limit plus the slack."""
    t = DedupTable()
    limit, slack = core_mod.HARD_MAX_RUNS, core_mod.EVICT_SLACK
    sizes = []
    for pseq in range(1, limit + 3 * slack + 10):
        t.record("p", 2 * pseq, 3 * pseq)              # never contiguous: a run each
        sizes.append(len(t.producer("p").starts))
    assert max(sizes) == limit + slack
    drops = [i for i in range(1, len(sizes)) if sizes[i] < sizes[i - 1]]
    assert len(drops) == 3                             # one chunked eviction per slack + 1 runs
    assert all(sizes[i] == limit for i in drops)
    p = t.producer("p")
    assert t.lookup("p", p.floor) is not None and t.lookup("p", p.floor - 2) == UNKNOWN_OLD
    assert t.lookup("p", 2 * (len(sizes))) == 3 * len(sizes)     # the newest one


@pytest.mark.evicts_in_chunks
@pytest.mark.keeps_pseq_window
def test_sensors_publishing_one_message_at_a_time_stay_small_and_resends_hit_memory() -> None:
    """20 producers whose single-message frames interleave (GPIO sensors at
    1 Hz) make one run per message. Each keeps at most HARD_MAX_RUNS runs, and
    those still cover a default outbox (10,000 messages): a resend of any of
    them is answered from memory with its seq, never UNKNOWN_OLD. Memory is
    three int64 arrays (24 bytes per run; Python int lists took about 90, and
    65,536 runs per producer were kept: 78 MB for these 20 sensors)."""
    from plant.outbox import DEFAULT_MAX_COUNT
    assert core_mod.HARD_MAX_RUNS >= DEFAULT_MAX_COUNT
    t = DedupTable()
    producers = [f"sensor-{i:02d}" for i in range(20)]
    n = core_mod.HARD_MAX_RUNS + 3000
    seq = 0
    for pseq in range(1, n + 1):
        for pid in producers:
            seq += 1
            t.record(pid, pseq, seq)
    for k, pid in enumerate(producers):
        p = t.producer(pid)
        assert core_mod.HARD_MAX_RUNS <= len(p.starts) <= core_mod.HARD_MAX_RUNS + core_mod.EVICT_SLACK
        assert p.floor == n - len(p.starts) + 1
        for pseq in (n, n - DEFAULT_MAX_COUNT + 1, p.floor):
            assert t.lookup(pid, pseq) == (pseq - 1) * len(producers) + k + 1
        assert t.lookup(pid, p.floor - 1) == UNKNOWN_OLD
        assert p.starts.itemsize == p.seqs.itemsize == p.counts.itemsize == 8
    blob = t.snapshot(seq)
    assert len(blob) <= 20 * core_mod.HARD_MAX_RUNS * 4       # compressed on disk
    r, covered = DedupTable.restore(blob)
    assert covered == seq and r.snapshot(seq) == blob


def test_max_seq_is_the_highest_seq_any_remembered_pair_got() -> None:
    t = DedupTable()
    assert t.max_seq() == 0
    for i in range(10):
        t.record("a", i, 100 + i)                         # one run: seqs 100..109
    t.record("b", 5, 7)
    t.record("b", 2, 300)                                 # a late hole fill
    assert t.max_seq() == 300
    t.record("a", 10, 110)
    assert t.max_seq() == 300
    t.record("a", 11, 400)
    assert t.max_seq() == 400


def test_a_version_1_snapshot_still_restores() -> None:
    """A node upgraded in place reads the snapshot its old version wrote."""
    t = DedupTable()
    spaced(t, "spaced", 50)
    t.record("holes", 10, 1)
    t.record("holes", 5, 2)
    v1 = cbor2.dumps({"v": 1, "seq": 77, "producers": {
        pid: [p.hi, p.floor, list(p.starts), list(p.seqs), list(p.counts)]
        for pid, p in t._p.items()}})
    r, covered = DedupTable.restore(v1)
    assert covered == 77 and r.known_from == 0          # not recorded then: the node decides
    r.known_from = t.known_from
    assert r.snapshot(77) == t.snapshot(77)


def test_consecutive_hole_fills_merge_into_one_run() -> None:
    t = DedupTable()
    t.record("p", 1, 1)
    t.record("p", 100, 2)                      # pseqs 2..99 are a hole
    runs = len(t.producer("p").starts)
    for k, pseq in enumerate(range(2, 100)):   # filled later, in order, consecutive seqs
        t.record("p", pseq, 3 + k)
    assert len(t.producer("p").starts) == runs + 1
    assert [t.lookup("p", x) for x in (1, 2, 99, 100)] == [1, 3, 100, 2]


def spaced(table: DedupTable, pid: str, n: int) -> None:
    """n runs: pseq 2i+1 -> seq 10i+1 (never contiguous, so one run each)."""
    for i in range(n):
        table.record(pid, 2 * i + 1, 10 * i + 1)


def test_dedup_runs_compress_consecutive_pairs() -> None:
    t = DedupTable()
    for i in range(10_000):
        t.record("p", i, 100 + i)
    assert [t.lookup("p", i) for i in (0, 5000, 9999)] == [100, 5100, 10099]
    assert t.lookup("p", 10_000) is None and t.lookup("q", 0) is None
    assert len(t.producer("p").starts) == 1


def test_dedup_window_eviction_sets_the_floor() -> None:
    t = DedupTable()
    extra = 10
    spaced(t, "p", MAX_RUNS_PER_PRODUCER + extra)
    p = t.producer("p")
    assert len(p.starts) == MAX_RUNS_PER_PRODUCER
    assert p.floor == 2 * extra + 1                      # first remembered pseq
    for i in range(extra):                               # evicted pairs and holes below the floor
        assert t.lookup("p", 2 * i + 1) == UNKNOWN_OLD
        assert t.lookup("p", 2 * i + 2) == UNKNOWN_OLD
    i = extra
    assert t.lookup("p", 2 * i + 1) == 10 * i + 1        # still remembered
    assert t.lookup("p", 2 * i + 2) is None              # a hole inside the window
    last = MAX_RUNS_PER_PRODUCER + extra - 1
    assert t.lookup("p", 2 * last + 1) == 10 * last + 1
    assert t.lookup("p", 2 * last + 2) is None           # above hi: never seen


def test_old_lookup_answers_below_the_window() -> None:
    c = new_core(last_seq=19_999)            # the spaced pairs are "in the log" below
    spaced(c.dedup, "p", MAX_RUNS_PER_PRODUCER + 5)
    calls: list[tuple[str, int]] = []

    def old_lookup(pid: str, pseq: int) -> int | None:
        calls.append((pid, pseq))
        return 7 if pseq == 1 else None

    c.publish(b"r", 1, "p", items(1, 2), now=1, old_lookup=old_lookup)
    assert calls == [("p", 1), ("p", 2)]
    recs = written(c)
    assert [(m.seq, m.producer_seq) for m in recs] == [(20_000, 2)]   # 2 was a hole: new
    assert c.durable(20_000).acks == [(b"r", 1, [1, 7, 2, 20_000])]
    assert c.duplicates == 1


def test_too_old_without_old_lookup_is_refused_with_no_state_change() -> None:
    c = new_core()
    spaced(c.dedup, "p", MAX_RUNS_PER_PRODUCER + 5)
    c.publish(b"r", 1, "q", items(1), now=5)
    snap = c.dedup.snapshot(0)
    before = (c.next_seq, c.last_time, c.sequenced, c.duplicates)
    with pytest.raises(RemoteProtocolError) as ei:
        c.publish(b"r", 2, "p", items(99_999, 1), now=10)   # a new item, then a too-old one
    assert ei.value.code == "too-old"
    assert (c.next_seq, c.last_time, c.sequenced, c.duplicates) == before
    assert c.dedup.snapshot(0) == snap
    assert [m.seq for m in written(c)] == [1]
    assert c.durable(1).acks == [(b"r", 1, [1, 1])]         # no ack queued for the refused frame


def test_a_frame_that_moves_the_window_still_finds_its_pairs_and_a_failed_lookup_changes_nothing(
        ) -> None:
    """The window can move *during* a frame (its new runs evict old ones): a pair of
    the same frame that was in memory when the frame came is still found (it used to
    be refused after seqs were handed out); a lookup that fails changes nothing, and
    no seq is ever handed out twice."""
    c = new_core()
    for i in range(MAX_RUNS_PER_PRODUCER):              # exactly full: floor still 0
        c.publish(b"r", i, "p", items(2 * i + 1), now=1)
        c.publish(b"r", i, "other", items(i), now=1)    # keep p's seqs non-contiguous
    written(c)
    c.durable(c.last_seq)                               # all in the log: only old_lookup knows them
    assert c.dedup.producer("p").floor == 0
    n = c.next_seq
    c.publish(b"r", 1, "p", items(10**6, 1), now=2)     # the new run evicts pseq 1's run
    assert c.dedup.producer("p").floor > 1
    assert [(m.seq, m.producer_seq) for m in written(c)] == [(n, 10**6)]
    assert c.durable(n).acks == [(b"r", 1, [10**6, n, 1, 1])]    # pseq 1: its seq, 1

    def failing(pid: str, pseq: int) -> int | None:
        raise OSError("log unreadable")

    before = (c.next_seq, c.dedup.snapshot(0))
    with pytest.raises(OSError):
        c.publish(b"r", 4, "p", items(10**6 + 20, 1), now=4, old_lookup=failing)   # 1: evicted
    assert (c.next_seq, c.dedup.snapshot(0)) == before and not c.has_unwritten
    c.publish(b"r", 5, "q", items(2), now=5)
    assert [m.seq for m in written(c)] == [n + 1]          # unique and gap-free
    assert c.dedup.lookup("p", 10**6) == n                # what was handed out stays known


def test_a_fresh_old_pair_resent_before_it_is_written_is_not_sequenced_twice() -> None:
    c = new_core(last_seq=49_999)
    spaced(c.dedup, "p", MAX_RUNS_PER_PRODUCER + 5)
    c.publish(b"r", 1, "p", items(2), now=1, old_lookup=lambda pid, pseq: None)   # below the floor
    c.publish(b"r", 2, "p", items(2), now=1, old_lookup=lambda pid, pseq: None)   # not in the log yet
    assert [m.seq for m in written(c)] == [50_000]
    assert c.durable(50_000).acks == [(b"r", 1, [2, 50_000]), (b"r", 2, [2, 50_000])]


def test_rebuild_dedup_from_the_log() -> None:
    c = new_core(last_seq=3)
    for pid, pseq, seq in [("p", 1, 1), ("p", 2, 2), ("q", 1, 3)]:   # as the node does at start
        c.dedup.record(pid, pseq, seq)
    c.publish(b"r", 1, "p", items(2, 3), now=1)
    assert [(m.seq, m.producer_seq) for m in written(c)] == [(4, 3)]
    assert c.durable(4).acks == [(b"r", 1, [2, 2, 3, 4])]


# --- snapshots ----------------------------------------------------------------------------

def test_snapshot_restore_round_trip() -> None:
    t = DedupTable()
    spaced(t, "spaced", MAX_RUNS_PER_PRODUCER + 20)
    for i in range(300):
        t.record("dense", i, 5000 + i)
    t.record("holes", 10, 1)
    t.record("holes", 5, 2)                              # out of order
    t.record("ü-not-ascii", 0, 3)
    blob = t.snapshot(covered_seq=987)
    r, covered = DedupTable.restore(blob)
    assert covered == 987 and len(r) == len(t) == 4
    for pid in ("spaced", "dense", "holes", "ü-not-ascii", "absent"):
        for pseq in range(0, 2 * (MAX_RUNS_PER_PRODUCER + 25)):
            assert r.lookup(pid, pseq) == t.lookup(pid, pseq), (pid, pseq)
    assert r.snapshot(987) == blob
    # the restored table keeps working: a run extends, a new producer appears
    r.record("dense", 300, 5300)
    assert r.lookup("dense", 300) == 5300 and len(r.producer("dense").starts) == 1


@pytest.mark.parametrize("blob", [
    b"", b"\xff\xff", b"\xa0",
    b"\xa1\x61v\x03",                                    # {"v": 3}: unknown version
    # version 2: the packed columns not zlib, not whole int64s, or not three equal columns
    cbor2.dumps({"v": 2, "seq": 0, "producers": {"p": [0, 0, b"not zlib"]}}),
    cbor2.dumps({"v": 2, "seq": 0, "producers": {"p": [0, 0, zlib.compress(b"1234567")]}}),
    cbor2.dumps({"v": 2, "seq": 0, "producers": {"p": [0, 0, zlib.compress(bytes(16))]}}),
    cbor2.dumps({"v": 2, "seq": 0, "producers": {"p": [0, 0, [1], [1], [1]]}}),
    # {"v": 1, "seq": 0, "producers": {"p": [0, 0, [1], [], []]}}: runs of unequal length
    b"\xa3\x61v\x01\x63seq\x00\x69producers\xa1\x61p\x85\x00\x00\x81\x01\x80\x80",
])
def test_restore_refuses_damage_with_value_error(blob: bytes) -> None:
    with pytest.raises(ValueError):
        DedupTable.restore(blob)


# --- the whole core against a model (Hypothesis) ------------------------------------------

PRODUCERS = ["a", "b", "c"]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("pub"), st.sampled_from(PRODUCERS),
                  st.lists(st.integers(0, 40), min_size=1, max_size=6),
                  st.integers(0, 1000)),
        st.tuples(st.just("commit"), st.floats(0, 1)),
    ),
    min_size=1, max_size=60,
)


@settings(max_examples=250, deadline=None)
@given(ops, st.sampled_from([1, 2, 4, MAX_RUNS_PER_PRODUCER]), st.integers(0, 5))
def test_model(program: list[tuple], window: int, last_seq: int) -> None:
    saved = core_mod.MAX_RUNS_PER_PRODUCER
    core_mod.MAX_RUNS_PER_PRODUCER = window   # a small window makes the log path common
    try:
        run_model(program, last_seq)
    finally:
        core_mod.MAX_RUNS_PER_PRODUCER = saved


def run_model(program: list[tuple], last_seq: int) -> None:
    c = new_core(last_seq=last_seq)
    log: list[Message] = []                  # records the "driver" wrote, in order
    published: list[tuple[bytes, int, list[int]]] = []
    acks: list[tuple[bytes, int, list[int]]] = []
    batches: list[tuple[int, int, list[bytes]]] = []

    def old_lookup(pid: str, pseq: int) -> int | None:
        for m in log:
            if m.producer == pid and m.producer_seq == pseq:
                return m.seq
        return None

    def commit(frac: float) -> None:
        log.extend(written(c))
        written_upto = log[-1].seq if log else last_seq
        upto = c.durable_seq + round(frac * (written_upto - c.durable_seq))
        out = c.durable(upto)
        for _route, _rid, pairs in out.acks:     # released only when durable
            assert max(pairs[1::2]) <= upto
        acks.extend(out.acks)
        batches.extend(out.batches)

    for rid, op in enumerate(program):
        if op[0] == "pub":
            _, pid, pseqs, now = op
            c.publish(pid.encode(), rid, pid, items(*pseqs), now=now, old_lookup=old_lookup)
            published.append((pid.encode(), rid, pseqs))
        else:
            commit(op[1])
    commit(1.0)

    # seqs are last_seq+1 .. N, gap-free, in log order, times never decrease
    assert [m.seq for m in log] == list(range(last_seq + 1, c.next_seq))
    assert all(a.time <= b.time for a, b in zip(log, log[1:]))
    # every (producer, pseq) maps to exactly one seq
    by_pair: dict[tuple[str, int], int] = {}
    for m in log:
        assert (m.producer, m.producer_seq) not in by_pair, m
        by_pair[(m.producer, m.producer_seq)] = m.seq
    assert set(by_pair) == {(pid.decode(), p) for pid, _rid, ps in published for p in ps}
    # one ack per publish, in publish order, each pair matching the assignment
    assert [(r, rid) for r, rid, _ in acks] == [(r, rid) for r, rid, _ in published]
    for (route, _rid, pairs), (_r, _i, pseqs) in zip(acks, published):
        assert pairs[0::2] == pseqs
        assert pairs[1::2] == [by_pair[(route.decode(), p)] for p in pseqs]
    # egress: every record exactly once, in order, in contiguous batches
    expect = last_seq + 1
    for first, last, bodies in batches:
        assert first == expect and last - first + 1 == len(bodies)
        expect = last + 1
    assert [decode_record(b) for _f, _l, bs in batches for b in bs] == log
    assert not c.has_waiting


# --- the frame-run fast path is the item-by-item path, only faster ----------------------

run_ops = st.lists(
    st.one_of(
        st.tuples(st.just("pub"), st.sampled_from(PRODUCERS),
                  st.lists(st.integers(0, 40), min_size=1, max_size=6),
                  st.integers(0, 1000)),
        # a frame of consecutive producer seqs (what plants send)
        st.tuples(st.just("run"), st.sampled_from(PRODUCERS), st.integers(0, 60),
                  st.integers(1, 12), st.integers(0, 1000)),
        st.tuples(st.just("commit"), st.floats(0, 1)),
    ),
    min_size=1, max_size=40,
)


def _drive(program: list[tuple], fast: bool) -> tuple:
    saved = core_mod.FRAME_RUNS
    core_mod.FRAME_RUNS = fast
    try:
        c = new_core(last_seq=3)
        log: list[tuple[int, int, bytes]] = []

        def old_lookup(pid: str, pseq: int) -> int | None:
            for _s, _t, body in log:
                m = decode_record(body)
                if m.producer == pid and m.producer_seq == pseq:
                    return m.seq
            return None

        acks: list = []
        batches: list = []
        for rid, op in enumerate(program):
            if op[0] == "commit":
                log.extend(c.take_unwritten())
                out = c.durable(c.durable_seq + round(op[1] * (c.last_seq - c.durable_seq)))
                acks.extend(out.acks)
                batches.extend(out.batches)
                continue
            if op[0] == "pub":
                _, pid, pseqs, now = op
            else:
                _, pid, start, n, now = op
                pseqs = list(range(start, start + n))
            c.publish(pid.encode(), rid, pid, items(*pseqs), now=now, old_lookup=old_lookup)
        log.extend(c.take_unwritten())
        out = c.durable(c.last_seq)
        acks.extend(out.acks)
        batches.extend(out.batches)
        return (log, acks, batches, c.dedup.snapshot(c.last_seq), c.sequenced, c.duplicates)
    finally:
        core_mod.FRAME_RUNS = saved


@settings(max_examples=250, deadline=None)
@given(run_ops, st.sampled_from([1, 2, 4, MAX_RUNS_PER_PRODUCER]))
def test_frame_runs_match_the_item_by_item_path(program: list[tuple], window: int) -> None:
    saved = core_mod.MAX_RUNS_PER_PRODUCER
    core_mod.MAX_RUNS_PER_PRODUCER = window   # eviction must behave the same too
    try:
        assert _drive(program, fast=True) == _drive(program, fast=False)
    finally:
        core_mod.MAX_RUNS_PER_PRODUCER = saved


def test_a_frame_of_new_consecutive_pseqs_is_one_dedup_run() -> None:
    c = new_core()
    c.publish(b"r", 1, "a", items(*range(5, 2053)), now=10)
    p = c.dedup.producer("a")
    assert (list(p.starts), list(p.seqs), list(p.counts), p.hi) == ([5], [1], [2048], 2052)
    c.publish(b"r", 2, "a", items(*range(2053, 2060)), now=11)
    assert (list(p.starts), list(p.seqs), list(p.counts), p.hi) == ([5], [1], [2055], 2059)
    assert c.dedup.lookup("a", 2059) == 2055
    assert c.dedup.lookup("a", 4) == UNKNOWN_OLD        # below everything remembered: the log decides


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PRODUCERS), st.integers(0, 60)), min_size=1,
                max_size=80), st.integers(0, 90), st.sampled_from([1, 2, 4, MAX_RUNS_PER_PRODUCER]))
def test_truncate_after_forgets_exactly_the_pairs_set_aside(pairs: list[tuple[str, int]], cut: int,
                                                             window: int) -> None:
    """After a history check cuts the log at ``cut``, the table answers as one that
    never saw the records after it: same seqs for what stays, never-sequenced for
    what went (above the producer's highest remaining), UNKNOWN_OLD only where an
    eviction made it so before."""
    saved = core_mod.MAX_RUNS_PER_PRODUCER
    core_mod.MAX_RUNS_PER_PRODUCER = window
    try:
        t = DedupTable()
        seen: dict[tuple[str, int], int] = {}
        seq = 0
        for pid, pseq in pairs:
            if (pid, pseq) in seen:
                continue
            seq += 1
            seen[(pid, pseq)] = seq
            t.record(pid, pseq, seq)
        before = {k: t.lookup(*k) for k in seen}
        t.truncate_after(cut)
        for (pid, pseq), s in seen.items():
            got = t.lookup(pid, pseq)
            if s <= cut:
                assert got == before[(pid, pseq)]           # the seq, or UNKNOWN_OLD if evicted
            else:
                assert got in (None, UNKNOWN_OLD), (pid, pseq, s, got)
                assert got is None or pseq < t.producer(pid).floor or \
                    pseq < t.producer(pid).starts[0]
        for pid in PRODUCERS:                               # hi: the highest remaining pair
            kept = [ps for (p, ps), s in seen.items() if p == pid and s <= cut]
            if pid in t._p and t.producer(pid).starts:
                assert t.producer(pid).hi == max(kept)
    finally:
        core_mod.MAX_RUNS_PER_PRODUCER = saved


def test_an_evicted_pair_is_still_searched_when_every_run_of_its_producer_was_set_aside() -> None:
    """Runs 1..9 of p were evicted (floor 10); the runs it had left were all in a
    tail set aside (truncate_after). A resend below the floor must still be asked of
    the log, not taken as new."""
    t = DedupTable()
    for ps, s in [(10, 100), (11, 101)]:
        t.record("p", ps, s)
    t.producer("p").floor = 10
    t.truncate_after(99)
    assert (t.producer("p").hi, list(t.producer("p").starts)) == (9, [])
    c = SequencerCore(last_seq=99, last_time=0, epoch=1, dedup=t)
    calls: list[int] = []

    def old_lookup(pid: str, pseq: int) -> int | None:
        calls.append(pseq)
        return 5                                            # the log holds (p, 5) at seq 5
    c.publish(b"r", 1, "p", [(5, "t", b"x")], 1, old_lookup)
    assert calls == [5] and c.next_seq == 100 and c.duplicates == 1
    assert c.durable(99).acks == [(b"r", 1, [5, 5])]
