"""Replay to one plant: flow control and delivery against a real node (issue 3).

The node serves a log written beforehand with its own LogStore (much faster
than publishing it); the plant is in this process so the test can look at
its tracker. Waiting is on conditions with deadlines, never a bare sleep.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import zmq

from orbcast import envelope as env
from orbcast.envelope import cbor_text, encode_record
from plant.client import Plant
from sequencer.log import LogStore
from tests.integration.conftest import free_port, wait_for

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
    after the request timeout and a retry. (The timeout is long, so that a loaded
    machine cannot cause a legitimate retry; the old engine never resumed at all.)"""
    with Plant(sequencers=[filled_node.ingress], producer_id="flow", data=str(tmp_path / "p"),
               outbox=False, request_timeout_ms=10_000) as p:
        sub = p.replay(1, N)
        tr = sub.tracker
        wait_for(lambda: tr._owed > 0 and tr._outstanding <= 0, 30, "the plant to withhold credit")
        expect = 1
        while expect <= N:
            m = sub.get(timeout=20)           # OrbcastTimeout if the replay stalls
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


def test_a_chunk_with_records_outside_its_range_is_counted_and_not_delivered(tmp_path: Path) -> None:
    """A fake node on a real ROUTER socket answers a replay with a chunk that says
    1..2 but holds 1..3 (the 3 would come again in the next chunk): the plant
    counts a bad frame and delivers nothing; the honest chunk is then delivered."""
    ctx = zmq.Context()
    node = ctx.socket(zmq.ROUTER)
    node.setsockopt(zmq.LINGER, 0)
    ingress = f"tcp://127.0.0.1:{free_port()}"
    node.bind(ingress)
    recs = [encode_record(s, 1, 1000 + s, "p", s, "t/x", bytes([s])) for s in (1, 2, 3)]

    def serve_until(kind: type) -> tuple[bytes, object]:
        """Answer HELLOs and PINGs until a message of ``kind`` arrives."""
        while True:
            assert node.poll(5000), f"the plant sent no {kind.__name__}"
            route, *frames = node.recv_multipart()
            ev = env.decode(frames)
            if isinstance(ev, env.Hello):
                node.send_multipart([route, *env.encode(env.Welcome(
                    rid=ev.rid, node="n", role="active", epoch=1, first_seq=1, last_seq=3,
                    egress=f"tcp://127.0.0.1:{free_port()}"))])
            if isinstance(ev, env.Ping):
                node.send_multipart([route, *env.encode(env.Pong(rid=ev.rid, epoch=1, last_seq=3,
                                                                 role="active"))])
            if isinstance(ev, kind):
                return route, ev

    try:
        with Plant(sequencers=[ingress], producer_id="bad", data=str(tmp_path / "p"), outbox=False,
                   request_timeout_ms=60_000) as p:
            fut: list = []
            t = threading.Thread(target=lambda: fut.append(p.replay(1, 3)))
            t.start()
            route, rq = serve_until(env.ReplayRequest)
            t.join(10)
            sub = fut[0]
            assert rq.from_seq == 1 and rq.to_seq == 3
            node.send_multipart([route, *env.chunk_frames(rq.rid, 1, 1, 3, 3, False, recs)])
            # a PING round trip proves the chunk was handled before we look
            ping = p._request(env.Ping(rid=0), 5)
            serve_until(env.Ping)
            ping.result()
            assert p.counters["bad_frames"] == 1
            assert list(sub.tracker.ready) == [] and sub.tracker.next_seq == 1
            node.send_multipart([route, *env.chunk_frames(rq.rid, 1, 1, 4, 3, True, recs)])
            assert [m.seq for m in sub.get_many(10, timeout=10)] == [1, 2, 3]
            assert sub.get_many(10, timeout=10) == []
    finally:
        node.close(0)
        ctx.term()
