"""The node's dedup fallback for pairs older than its table (docs/protocol.md 5.2):
a real node object, a real log on disk; nothing mocked."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orbcast import envelope as env
from orbcast.errors import RemoteProtocolError
from sequencer.core import UNKNOWN_OLD
from sequencer.log import NS_PER_DAY, LogStore
from tests.unit.test_node_snapshot import make_node


def write_log(data: Path, records: list[tuple[int, int, str, int, bytes]], now_ns: int) -> None:
    """Records ``(seq, time_ns, producer, producer_seq, payload)`` into ``data/log``."""
    with LogStore(data / "log", now_ns=now_ns, fsync=False) as log:
        log.append([(s, t, env.encode_record(s, 1, t, p, ps, "t", pl)) for s, t, p, ps, pl in records])


def test_an_old_pair_is_found_in_the_log_and_a_chance_match_is_not_taken_for_it(
        tmp_path: Path) -> None:
    now = time.time_ns()
    chance = b"..." + env.record_pair_bytes("p", 7) + b"..."   # the pair's bytes in a payload
    write_log(tmp_path / "d", [(1, now, "x", 1, chance), (2, now, "p", 7, b"real")], now)
    n = make_node(tmp_path)
    try:
        assert n.log.first_seq == 1
        assert n._old_lookup("p", 7) == 2
        assert n._old_lookup("p", 8) is None          # the whole log is here: never sequenced
        assert n._old_lookup("x", 7) is None
        assert n.counters["dedup_log_lookups"] == 3
    finally:
        n.close()


def test_a_pair_retention_may_have_removed_is_refused_not_sequenced_again(tmp_path: Path) -> None:
    """The table rebuilt from a log that retention cut knows producer p from seq 101
    on. A resend of one of p's older pairs is in no table and in no log any more: it
    was probably sequenced on the removed day, so it is refused (too-old), and the
    node changes nothing."""
    now = time.time_ns()
    old = now - 30 * NS_PER_DAY
    recs = [(s, old, "p", s, b"old") for s in range(1, 101)]
    recs += [(100 + s, now, "p", 100 + s, b"new") for s in range(1, 51)]
    write_log(tmp_path / "d", recs, old)
    n = make_node(tmp_path)                            # opening applies retention (7 days)
    try:
        assert (n.log.first_seq, n.log.last_seq) == (101, 150)
        assert n.dedup.lookup("p", 120) == 120
        assert n.dedup.lookup("p", 50) == UNKNOWN_OLD
        core = n.core
        assert core is not None
        snap = n.dedup.snapshot(0)
        with pytest.raises(RemoteProtocolError) as ei:
            core.publish(b"r", 1, "p", [(50, "t", b"again"), (151, "t", b"new")], 1, n._old_lookup)
        assert ei.value.code == "too-old" and "starts at seq 101" in str(ei.value)
        assert (core.next_seq, core.has_unwritten, core.has_waiting) == (151, False, False)
        assert n.dedup.snapshot(0) == snap
        core.publish(b"r", 2, "p", [(120, "t", b"again"), (151, "t", b"new")], 1, n._old_lookup)
        assert [s for s, _t, _b in core.take_unwritten()] == [151]
        assert core.durable(151).acks == [(b"r", 2, [120, 120, 151, 151])]
    finally:
        n.close()
