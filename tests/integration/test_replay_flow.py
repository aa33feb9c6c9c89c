"""Replay to one plant: flow control and delivery against a real node (issue 3).

The node serves a log written beforehand with its own LogStore (much faster
than publishing it); the plant is in this process so the test can look at
its tracker. Waiting is on conditions with deadlines, never a bare sleep.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orbcast.envelope import cbor_text, encode_record
from plant.client import Plant
from sequencer.log import LogStore
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.timeout(120)

#: More than the tracker's ready queue (65,536) plus the chunks in flight, so a
#: consumer that does not read makes the plant withhold credit.
N = 100_000


def prefill(data: Path, n: int) -> None:
    log = LogStore(data / "log")
    pid, topic, t = cbor_text("fill"), cbor_text("fill/x"), time.time_ns()
    for s in range(1, n + 1, 8192):
        e = min(n, s + 8191)
        log.append([(q, t, encode_record(q, 1, t, pid, q, topic, q.to_bytes(4, "big")))
                    for q in range(s, e + 1)])
    log.sync()
    log.close()


@pytest.fixture
def filled_node(tmp_path: Path, node_factory):
    node = node_factory()
    prefill(node.data, N)
    return node.start()


def test_a_replay_paused_by_a_full_queue_resumes_without_a_retry(tmp_path: Path, filled_node) -> None:
    """The application does not read until the plant withholds credit (its ready
    queue is full) and the node has nothing more in flight; then it reads
    everything. The withheld credit must go out as soon as the queue drains, not
    after the request timeout and a retry."""
    with Plant(sequencers=[filled_node.ingress], producer_id="flow", data=str(tmp_path / "p"),
               outbox=False, request_timeout_ms=1000) as p:
        sub = p.replay(1, N)
        tr = sub.tracker
        wait_for(lambda: tr._owed > 0 and tr._outstanding <= 0, 30, "the plant to withhold credit")
        expect = 1
        while expect <= N:
            m = sub.get(timeout=10)           # OrbcastTimeout if the replay stalls
            assert m is not None and m.seq == expect and m.payload == expect.to_bytes(4, "big")
            expect += 1
        assert sub.get(timeout=10) is None    # a bounded replay ends by itself
        assert tr.stats()["replay_retries"] == 0, tr.stats()
        assert tr.replays == 1


def test_get_many_and_the_iterator_deliver_a_replay_in_order_once(tmp_path: Path, filled_node) -> None:
    """Bulk reads, single reads and iteration mixed on one subscription: every seq
    once, in order, lists never longer than asked, and the position follows."""
    with Plant(sequencers=[filled_node.ingress], producer_id="many", data=str(tmp_path / "p"),
               outbox=False) as p:
        sub = p.replay(1, N)
        with pytest.raises(ValueError):
            sub.get_many(0)
        got: list[int] = []
        it = iter(sub)
        while True:
            batch = sub.get_many(1000, timeout=10)
            if not batch:
                break
            assert len(batch) <= 1000
            got.extend(m.seq for m in batch)
            assert sub.position == got[-1]
            m = sub.get(timeout=10)
            if m is not None:
                got.append(m.seq)
            m2 = next(it, None)
            if m2 is not None:
                got.append(m2.seq)
        assert got == list(range(1, N + 1))
        assert sub.delivered == N and sub.position == N
        assert sub.get_many(10, timeout=10) == []        # finished: stays empty


def test_get_many_with_a_checkpoint_saves_the_position(tmp_path: Path, filled_node) -> None:
    """With auto_ack, a list counts as processed at the next call: after reading to
    the end and closing, the checkpoint names the last seq; a new subscription on
    the same checkpoint starts right after it."""
    data = str(tmp_path / "p")
    with Plant(sequencers=[filled_node.ingress], producer_id="cp", data=data, outbox=False) as p:
        sub = p.subscribe(start=1, checkpoint="bulk", to_seq=5000)
        n = 0
        while batch := sub.get_many(777, timeout=10):
            assert batch[0].seq == n + 1
            n = batch[-1].seq
        assert n == 5000
        sub.close()
    with Plant(sequencers=[filled_node.ingress], producer_id="cp", data=data, outbox=False) as p:
        sub = p.subscribe(start=1, checkpoint="bulk", to_seq=5100)
        m = sub.get(timeout=10)
        assert m is not None and m.seq == 5001
        sub.close()
