"""What a node sends a plant cannot stop the plant (found by a fuzzing pass):
frames of the wrong kind on the reply path, endpoints it cannot use, and an
endless stream of new endpoints. A small node written for the test (ROUTER in,
PUB out, real ZeroMQ on loopback) answers HELLO and PUBLISH as docs/protocol.md
says and sends whatever the test injects."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import zmq

from orbcast import envelope as env
from plant.client import MAX_LEARNED_ENDPOINTS, Plant
from tests.integration.conftest import free_port, wait_for

pytestmark = pytest.mark.timeout(120)


class TinyNode:
    """One active node: WELCOME for HELLO, ACK + BATCH for PUBLISH, a HEARTBEAT
    every 100 ms; :meth:`inject` sends frames to every plant (``"router"``) or
    on egress (``"pub"``)."""

    def __init__(self) -> None:
        self.ingress = f"tcp://127.0.0.1:{free_port()}"
        self.egress = f"tcp://127.0.0.1:{free_port()}"
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.ingress)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(self.egress)
        self.last = 0
        self.peers: set[bytes] = set()
        self._inject: list[tuple[str, list[bytes]]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def inject(self, where: str, frames: list[bytes]) -> None:
        with self._lock:
            self._inject.append((where, frames))

    def close(self) -> None:
        self._stop = True
        self._t.join(5)

    def _run(self) -> None:
        next_hb = 0.0
        while not self._stop:
            if self.router.poll(10):
                pid, *frames = self.router.recv_multipart()
                self.peers.add(pid)
                self._handle(pid, env.decode(frames))
            with self._lock:
                todo, self._inject = self._inject, []
            for where, frames in todo:
                if where == "pub":
                    self.pub.send_multipart(frames)
                for pid in (self.peers if where == "router" else ()):
                    self.router.send_multipart([pid, *frames])
            if time.monotonic() >= next_hb:
                next_hb = time.monotonic() + 0.1
                self.pub.send_multipart(env.encode(env.Heartbeat(
                    epoch=1, last_seq=self.last, node="tiny", role="active", time=time.time_ns(),
                    ingress=self.ingress)))
        self.router.close(0)
        self.pub.close(0)
        self.ctx.term()

    def _handle(self, pid: bytes, ev: object) -> None:
        if type(ev) is env.Hello:
            self.router.send_multipart([pid, *env.encode(env.Welcome(
                rid=ev.rid, node="tiny", role="active", epoch=1, first_seq=1 if self.last else 0,
                last_seq=self.last, egress=self.egress))])
        elif type(ev) is env.Ping:              # answered with the wrong kind, same rid
            self.router.send_multipart([pid, *env.encode(env.StatusReply(rid=ev.rid,
                                                                         info={"x": 1}))])
        elif type(ev) is env.Publish:
            pairs: list[int] = []
            recs = []
            for pseq, topic, payload in ev.items:
                self.last += 1
                recs.append(env.encode_record(self.last, 1, time.time_ns(), ev.producer, pseq,
                                              topic, payload))
                pairs += [pseq, self.last]
            self.pub.send_multipart(env.batch_frames(1, self.last - len(recs) + 1, self.last, recs))
            self.router.send_multipart([pid, *env.encode(env.Ack(rid=ev.rid, epoch=1,
                                                                 pairs=tuple(pairs)))])


@pytest.fixture
def tiny(tmp_path: Path):
    node = TinyNode()
    p = Plant(sequencers=[node.ingress], producer_id="fz", data=str(tmp_path), outbox=False)
    try:
        assert p.publish("t/a", b"before", timeout=10) == 1
        yield node, p
    finally:
        p.close()
        node.close()


def _still_works(p: Plant, seq: int) -> None:
    assert p.engine_error is None, repr(p.engine_error)
    assert p.publish("t/a", b"after", timeout=10) == seq


def test_a_batch_or_heartbeat_on_the_reply_path_is_counted_and_ignored(tiny) -> None:
    """They have no request id: the reply path used to look one up and stop."""
    node, p = tiny
    rec = env.encode_record(1, 1, 1, "x", 1, "t/a", b"x")
    node.inject("router", env.batch_frames(1, 1, 1, [rec]))
    node.inject("router", env.encode(env.Heartbeat(epoch=1, last_seq=1, node="x", role="active",
                                                   time=1)))
    wait_for(lambda: p.counters["bad_frames"] >= 2 or p.engine_error is not None, 10,
             "the plant to count both frames")
    _still_works(p, 2)


def test_endpoints_a_plant_cannot_use_are_counted_and_ignored(tiny) -> None:
    """A WELCOME whose egress or peer endpoint is not tcp://HOST:PORT, a heartbeat
    naming such an ingress: each used to reach socket.connect() and stop the engine."""
    node, p = tiny
    node.inject("router", env.encode(env.Welcome(rid=999, node="x", role="active", epoch=1,
                                                 first_seq=1, last_seq=1, egress="garbage")))
    node.inject("router", env.encode(env.Welcome(rid=998, node="x", role="standby", epoch=1,
                                                 first_seq=1, last_seq=1, egress=node.egress,
                                                 peer_ingress="garbage")))
    node.inject("pub", env.encode(env.Heartbeat(epoch=1, last_seq=1, node="x", role="active",
                                                time=1, ingress="not an endpoint")))
    wait_for(lambda: p.counters.get("bad_endpoints", 0) >= 3 or p.engine_error is not None, 10,
             "the plant to refuse three endpoints")
    _still_works(p, 2)


def test_announced_endpoints_are_bounded(tiny) -> None:
    """A node announcing a new peer in every WELCOME: the plant keeps at most
    MAX_LEARNED_ENDPOINTS learned ones (it kept every one, with a reconnecting
    SUB connection each, for the life of the process)."""
    node, p = tiny
    for i in range(60):
        port = 20000 + i                   # announced, never connected to by anyone
        node.inject("router", env.encode(env.Welcome(
            rid=10_000 + i, node="x", role="active", epoch=1, first_seq=1, last_seq=1,
            egress=node.egress, peer_ingress=f"tcp://127.0.0.1:{port}",
            peer_egress=f"tcp://127.0.0.1:{port}")))
    wait_for(lambda: "tcp://127.0.0.1:20059" in p._known_eps or p.engine_error is not None, 10,
             "the plant to read the last announcement")
    assert len(p._known_eps) <= 1 + MAX_LEARNED_ENDPOINTS
    assert len(p._egress_connected) <= 1 + MAX_LEARNED_ENDPOINTS
    assert node.egress in p._egress_connected          # the node we talk to stays
    _still_works(p, 2)


def test_a_reply_of_the_wrong_kind_does_not_answer_a_request(tiny) -> None:
    """A STATUS_REPLY under the rid of a PING: ping() returned it (the wrong
    type, failing in the application); now it is counted and the PING still
    waits for its PONG (here: until its timeout)."""
    from orbcast.errors import OrbcastTimeout
    node, p = tiny
    before = p.counters["bad_frames"]
    with pytest.raises(OrbcastTimeout):
        p.ping(timeout=1)
    assert p.counters["bad_frames"] > before
    _still_works(p, 2)
