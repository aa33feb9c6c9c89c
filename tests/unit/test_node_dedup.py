"""The node's answer for pairs older than its dedup table (docs/protocol.md 5.2):
a real node object, a real log on disk; nothing mocked (the table's limits are made
small so that eviction happens with a few records)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orbcast import envelope as env
from orbcast.errors import RemoteProtocolError
from sequencer import core as core_mod
from sequencer.core import UNKNOWN_OLD, DedupTable
from sequencer.log import NS_PER_DAY, LogStore
from tests.unit.test_node_snapshot import make_node


def write_log(data: Path, records: list[tuple[int, int, str, int, bytes]], now_ns: int) -> None:
    """Records ``(seq, time_ns, producer, producer_seq, payload)`` into ``data/log``."""
    with LogStore(data / "log", now_ns=now_ns, fsync=False) as log:
        log.append([(s, t, env.encode_record(s, 1, t, p, ps, "t", pl)) for s, t, p, ps, pl in records])


def cut_log(tmp_path: Path) -> None:
    """p's pseqs 1..100 (seqs 1..100) on a day that retention has removed (as if a run
    without a snapshot, or an older version, had deleted it), 101..150 today."""
    now = time.time_ns()
    old = now - 30 * NS_PER_DAY
    recs = [(s, old, "p", s, b"old") for s in range(1, 101)]
    recs += [(s, now, "p", s, b"new") for s in range(101, 151)]
    write_log(tmp_path / "d", recs, old)
    LogStore(tmp_path / "d" / "log", fsync=False).close()     # opening applies retention


def snapshot_p(tmp_path: Path, upto: int) -> None:
    """A dedup snapshot that knows p's pairs 1..upto (seq = producer_seq) and covers upto."""
    t = DedupTable()
    for s in range(1, upto + 1):
        t.record("p", s, s)
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "dedup.snapshot").write_bytes(t.snapshot(upto))


@pytest.fixture
def small_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evict after a few runs, so a few records make evicted pairs."""
    monkeypatch.setattr(core_mod, "MAX_RUNS_PER_PRODUCER", 4)
    monkeypatch.setattr(core_mod, "EVICT_SLACK", 1)
    monkeypatch.setattr(core_mod, "MIN_PSEQ_WINDOW", 0)


def test_an_evicted_pair_is_found_in_the_log_and_a_chance_match_is_not_taken_for_it(
        tmp_path: Path, small_table: None) -> None:
    now = time.time_ns()
    chance = b"..." + env.record_pair_bytes("p", 3) + b"..."   # the pair's bytes in a payload
    recs = [(1, now, "x", 1, chance)]
    for i in range(2, 40, 2):                                   # p's pseqs 1.. apart: one run each
        recs += [(i, now, "p", i // 2, b"real"), (i + 1, now, "x", i, b"")]
    write_log(tmp_path / "d", recs, now)
    n = make_node(tmp_path)
    try:
        p = n.dedup.producer("p")
        assert p.floor > 3 and n.dedup.lookup("p", 3) == UNKNOWN_OLD
        assert n._old_lookup("p", 3) == 6                      # seq 6, not the payload at seq 1
        assert n.counters["dedup_log_lookups"] == 1
        # a frame of many evicted pairs is refused, not searched pair by pair: its
        # plant then sends them one per frame, and each is found
        snap = n.dedup.snapshot(0)
        n._frame_searches = 0                                   # as _handle does per frame
        with pytest.raises(RemoteProtocolError) as ei:
            n.core.publish(b"r", 1, "p", [(ps, "t", b"") for ps in range(1, 8)], now, n._old_lookup)
        assert ei.value.code == "too-old" and "one per frame" in str(ei.value)
        assert n.dedup.snapshot(0) == snap and not n.core.has_unwritten
        assert n.counters["dedup_log_lookups"] == 1 + 4         # the fifth was not made
        n._frame_searches = 0
        n.core.publish(b"r", 2, "p", [(2, "t", b"")], now, n._old_lookup)
        assert n.core.durable(n.core.durable_seq).acks == [(b"r", 2, [2, 4])]
        # the whole log is here (from seq 1): a pair below the floor it does not hold is new
        before = n.counters["dedup_log_lookups"]
        assert n._old_lookup("p", 0) is None
        assert n.counters["dedup_log_lookups"] == before + 1
    finally:
        n.close()


def test_a_pair_retention_may_have_removed_is_refused_without_a_search(tmp_path: Path) -> None:
    """The table rebuilt from a log that retention cut knows p from seq 101 on. A
    resend of one of p's older pairs is in no table and no log: it was probably
    sequenced on the removed day, so the frame is refused (too-old), whatever the
    order of its items, and nothing changes. No log search is needed to know it
    (a client cannot make the node read its whole log at will)."""
    cut_log(tmp_path)
    n = make_node(tmp_path)
    try:
        assert (n.log.first_seq, n.log.last_seq, n.dedup.known_from) == (101, 150, 101)
        assert n.dedup.lookup("p", 120) == 120
        assert n.dedup.lookup("p", 50) == UNKNOWN_OLD
        core = n.core
        assert core is not None
        snap = n.dedup.snapshot(0)
        for frame in ([(151, "t", b"new"), (50, "t", b"again")], [(0, "t", b"zero")]):
            with pytest.raises(RemoteProtocolError) as ei:
                core.publish(b"r", 1, "p", frame, 1, n._old_lookup)
            assert ei.value.code == "too-old" and "only from seq 101" in str(ei.value)
            assert (core.next_seq, core.has_unwritten, core.has_waiting) == (151, False, False)
            assert n.dedup.snapshot(0) == snap
        assert n.counters["dedup_log_lookups"] == 0
        core.publish(b"r", 2, "p", [(120, "t", b"again"), (151, "t", b"new")], 1, n._old_lookup)
        assert [s for s, _t, _b in core.take_unwritten()] == [151]
        assert core.durable(151).acks == [(b"r", 2, [120, 120, 151, 151])]
        # a producer first seen live is as new as one never seen: its messages resent
        # out of order (two frames answered not-active, resent in reverse) are taken,
        # in one frame or in two
        assert n.dedup.partial == {"p"}
        core.publish(b"r", 3, "q", [(4, "t", b""), (5, "t", b""), (1, "t", b""), (2, "t", b"")],
                     2, n._old_lookup)
        core.publish(b"r", 4, "r", [(7, "t", b"")], 2, n._old_lookup)
        core.publish(b"r", 5, "r", [(3, "t", b"")], 2, n._old_lookup)
        assert [(env.decode_record(b).producer, env.decode_record(b).producer_seq)
                for _s, _t, b in core.take_unwritten()] == [("q", 4), ("q", 5), ("q", 1), ("q", 2),
                                                             ("r", 7), ("r", 3)]
    finally:
        n.close()


def test_a_table_that_saw_the_whole_history_takes_a_new_producers_late_first_messages(
        tmp_path: Path) -> None:
    """Retention cut the log, but the snapshot (from 1) still knows everything: a new
    producer whose first frame was refused as a whole and whose later frame went
    through resends the first one message by message; those were never sequenced
    and are taken, not refused."""
    cut_log(tmp_path)
    snapshot_p(tmp_path, 150)
    n = make_node(tmp_path)
    try:
        assert (n.log.first_seq, n.dedup.known_from) == (101, 1)
        assert n.dedup.lookup("p", 50) == 50                    # remembered beyond retention
        core = n.core
        core.publish(b"r", 1, "q", [(4, "t", b"a"), (5, "t", b"b")], 1, n._old_lookup)
        core.publish(b"r", 2, "q", [(1, "t", b"late")], 1, n._old_lookup)
        assert [(s, env.decode_record(b).producer_seq) for s, _t, b in core.take_unwritten()] == [
            (151, 4), (152, 5), (153, 1)]
    finally:
        n.close()


def test_a_snapshot_older_than_the_retention_cut_is_ignored(tmp_path: Path) -> None:
    """The snapshot covers seqs 1..50; the node then sequenced 51..100 on that day
    and crashed; retention removed the day. Snapshot runs plus log runs would make
    pseq 70 a hole between them, sequenced a second time; the snapshot is ignored
    instead, and the resend refused."""
    cut_log(tmp_path)
    snapshot_p(tmp_path, 50)
    n = make_node(tmp_path)
    try:
        assert n.dedup.known_from == 101 and n.dedup.lookup("p", 70) == UNKNOWN_OLD
        with pytest.raises(RemoteProtocolError) as ei:
            n.core.publish(b"r", 1, "p", [(70, "t", b"resend")], 1, n._old_lookup)
        assert ei.value.code == "too-old"
    finally:
        n.close()


def test_retention_at_start_waits_for_the_table_and_its_snapshot(tmp_path: Path) -> None:
    """A node that was down for weeks (after a crash: no snapshot of its last records)
    starts on a log whose oldest day has expired: the table learns that day's pairs
    and is snapshotted before the day is deleted, so a resend from it still gets its
    seq back."""
    now = time.time_ns()
    old = now - 30 * NS_PER_DAY
    write_log(tmp_path / "d", [(1, old, "p", 1, b""), (2, now, "p", 2, b"")], old)
    n = make_node(tmp_path)
    try:
        assert n.log.first_seq == 2                             # the old day is gone
        assert n.dedup.lookup("p", 1) == 1 and n.dedup.known_from == 1
        table, covered = DedupTable.restore((tmp_path / "d" / "dedup.snapshot").read_bytes())
        assert covered == 2 and table.lookup("p", 1) == 1
    finally:
        n.close()


def test_retention_waits_while_the_snapshot_cannot_cover_the_expired_records(
        tmp_path: Path) -> None:
    now = time.time_ns()
    write_log(tmp_path / "d", [(1, now - NS_PER_DAY, "p", 1, b""), (2, now, "p", 2, b"")], now)
    n = make_node(tmp_path)
    try:
        n.core, n._synced_upto = None, 0                        # a standby, nothing synced yet
        assert n._apply_retention(now + 9 * NS_PER_DAY) is False
        assert n.log.first_seq == 1 and not (tmp_path / "d" / "dedup.snapshot").exists()
        n._synced_upto = 2
        assert n._apply_retention(now + 9 * NS_PER_DAY) is True
        assert n.log.first_seq == 2
    finally:
        n.close()


def test_the_snapshot_is_written_before_retention_removes_a_segment(tmp_path: Path) -> None:
    now = time.time_ns()
    write_log(tmp_path / "d", [(1, now - NS_PER_DAY, "p", 1, b""), (2, now, "p", 2, b"")], now)
    n = make_node(tmp_path)
    try:
        snap = tmp_path / "d" / "dedup.snapshot"
        assert not snap.exists()
        n._apply_retention(now + 3 * NS_PER_DAY)                # nothing expires yet: no write
        assert not snap.exists() and n.log.first_seq == 1
        n._apply_retention(now + 9 * NS_PER_DAY)                # yesterday's segment goes
        assert n.log.first_seq == 2
        table, covered = DedupTable.restore(snap.read_bytes())
        assert covered == 2 and table.lookup("p", 1) == 1 and table.known_from == 1
    finally:
        n.close()


def test_snapshot_keeps_known_from_and_an_old_snapshot_restores_unknown() -> None:
    t = DedupTable(known_from=101)
    t.record("p", 1, 101)
    r, _ = DedupTable.restore(t.snapshot(101))
    assert r.known_from == 101
    import cbor2
    d = cbor2.loads(t.snapshot(101))
    del d["from"]
    r, _ = DedupTable.restore(cbor2.dumps(d))
    assert r.known_from == 0
    t.partial = {"p"}
    d = cbor2.loads(t.snapshot(101))
    assert d["partial"] == ["p"] and DedupTable.restore(cbor2.dumps(d))[0].partial == {"p"}
    t.record("q", 1, 102)
    d = cbor2.loads(t.snapshot(102))
    del d["partial"]                        # written before the key: every producer partial
    assert DedupTable.restore(cbor2.dumps(d))[0].partial == {"p", "q"}


def test_a_snapshot_from_before_known_from_trusts_only_a_whole_log(tmp_path: Path) -> None:
    import cbor2
    now = time.time_ns()
    write_log(tmp_path / "d", [(1, now, "p", 1, b"")], now)
    t = DedupTable()
    t.record("p", 1, 1)
    d = cbor2.loads(t.snapshot(1))
    del d["from"]                                           # as the previous version wrote it
    (tmp_path / "d" / "dedup.snapshot").write_bytes(cbor2.dumps(d))
    n = make_node(tmp_path)
    try:
        assert n.dedup.known_from == 1                      # the log starts at 1
    finally:
        n.close()


def test_damage_met_by_the_search_refuses_the_frame_and_the_node_goes_on(
        tmp_path: Path, small_table: None) -> None:
    now = time.time_ns()
    recs = []
    for i in range(1, 2400, 2):                             # p and x alternate: one run per p
        recs += [(i, now, "p", i, b"p" * 20), (i + 1, now, "x", i, b"x" * 20)]
    write_log(tmp_path / "d", recs, now)
    t = DedupTable()                                        # a snapshot: no rebuild reads the log
    for s, _t, pid, ps, _b in recs:
        t.record(pid, ps, s)
    (tmp_path / "d" / "dedup.snapshot").write_bytes(t.snapshot(len(recs)))
    seg = next((tmp_path / "d" / "log").glob("*.seg"))
    data = bytearray(seg.read_bytes())
    at = data.find(env.record_pair_bytes("p", 5))
    data[at + 20] ^= 0x01                                   # in the payload of pseq 5: bad CRC
    seg.write_bytes(bytes(data))
    n = make_node(tmp_path)                                 # open checks only the newest records
    try:
        assert n.dedup.lookup("p", 5) == UNKNOWN_OLD
        with pytest.raises(RemoteProtocolError) as ei:
            n.core.publish(b"r", 1, "p", [(5, "t", b"resend")], now, n._old_lookup)
        assert ei.value.code == "log-corrupted" and seg.name in str(ei.value)
        assert not n.core.has_waiting
        assert n._old_lookup("p", 2001) == 2001             # undamaged records still found
    finally:
        n.close()


def test_a_set_aside_tail_leaves_the_table_and_the_snapshot_the_rest_stays(tmp_path: Path) -> None:
    """The history check (protocol.md 8.5) cuts the log back: the pairs of the set-aside
    records are forgotten (a resend of one is sequenced anew), what the table knew of
    records retention removed is kept, and the snapshot is rewritten to match, so a
    restart loads it instead of rebuilding from the cut log."""
    cut_log(tmp_path)                                       # p 1..100 removed, 101..150 kept
    snapshot_p(tmp_path, 150)
    n = make_node(tmp_path)
    try:
        assert (n.log.first_seq, n.dedup.known_from) == (101, 1)
        n.core, n._synced_upto = None, 140                  # a standby, as the check leaves it
        n.log.truncate_after(140)                           # 141..150 set aside
        n._forget_dedup_after(140)
        assert n.dedup.lookup("p", 50) == 50                # beyond retention: still known
        assert n.dedup.lookup("p", 140) == 140
        assert n.dedup.lookup("p", 141) is None             # set aside: never sequenced here
        table, covered = DedupTable.restore((tmp_path / "d" / "dedup.snapshot").read_bytes())
        assert covered == 140 and table.known_from == 1
        assert (table.lookup("p", 50), table.lookup("p", 141)) == (50, None)
    finally:
        n.close()
    n = make_node(tmp_path)
    try:
        assert n.dedup.lookup("p", 50) == 50 and n.dedup.known_from == 1
    finally:
        n.close()
