"""Plants ignore acks and replay chunks from an older leadership epoch (issue 4).

A fake node on a real ROUTER socket plays a deposed leader: the plant has
already seen epoch 5, so an ACK stamped epoch 3 must not complete the
publish (the record may be set aside when that node rejoins); the same ACK
stamped 5 does.
"""

from __future__ import annotations

from pathlib import Path

import zmq

from orbcast import envelope as env
from orbcast.config import PlantConfig
from plant.client import Plant
from tests.integration.conftest import free_port

ROUTE_TIMEOUT_MS = 5000


def recv(sock: zmq.Socket) -> tuple[bytes, object]:
    assert sock.poll(ROUTE_TIMEOUT_MS), "the plant sent nothing"
    route, *frames = sock.recv_multipart()
    return route, env.decode(frames)


def test_acks_from_an_older_epoch_are_ignored(tmp_path: Path) -> None:
    ctx = zmq.Context()
    node = ctx.socket(zmq.ROUTER)
    node.setsockopt(zmq.LINGER, 0)
    ingress = f"tcp://127.0.0.1:{free_port()}"
    node.bind(ingress)
    cfg = PlantConfig(sequencers=[ingress], producer_id="ep", data=str(tmp_path / "p"),
                      request_timeout_ms=60_000)
    try:
        with Plant(cfg, outbox=False) as p:
            route, hello = recv(node)
            assert isinstance(hello, env.Hello)
            node.send_multipart([route, *env.encode(env.Welcome(
                rid=hello.rid, node="n", role="active", epoch=5, first_seq=0, last_seq=0,
                egress=f"tcp://127.0.0.1:{free_port()}"))])
            t = p.publish_nowait("t/x", b"m")
            while True:
                route, pub = recv(node)
                if isinstance(pub, env.Publish):
                    break
            pseq = pub.items[0][0]
            node.send_multipart([route, *env.encode(env.Ack(rid=pub.rid, epoch=3, pairs=(pseq, 7)))])
            # a PING round trip proves the stale ack was processed before we look
            ping_route, ping = None, None
            fut = p._request(env.Ping(rid=0), 5)
            while not isinstance(ping, env.Ping):
                ping_route, ping = recv(node)
            node.send_multipart([ping_route, *env.encode(env.Pong(rid=ping.rid, epoch=5, last_seq=0,
                                                                 role="active"))])
            fut.result()
            assert not t.done() and p.counters["stale_epoch"] == 1
            node.send_multipart([route, *env.encode(env.Ack(rid=pub.rid, epoch=5, pairs=(pseq, 9)))])
            assert t.result(5) == 9
    finally:
        node.close(0)
        ctx.term()
