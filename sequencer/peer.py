"""The peer link between the two sequencer nodes: frames and codec.

Each node binds a ROUTER on its ``peer`` endpoint and connects a DEALER to
the other node's. Every message a node sends goes out on its DEALER and
arrives on the other node's ROUTER, so the link is two one-way streams and
no reply routing is needed. Same two-frame shape as the envelope
(docs/protocol.md, "Peer link"):

``PEER_HB`` (48)  head ``[1, 48, epoch, last_seq]``, body map: ``node``,
                  ``role``, ``ingress``, ``egress``, ``in_sync`` (the active
                  node's verdict on its standby), ``epochs`` (the leadership
                  history ``[[epoch, first_seq], ...]``), ``time``.
``REPL`` (49)     head ``[1, 49, epoch, first_seq, last_seq]``, body: CBOR
                  array of ``[seq, time_ns, record]`` (record = the canonical
                  record bytes exactly as in the log).
``REPL_ACK`` (50) head ``[1, 50, epoch, last_seq]``, body ``{}``: the standby
                  durably holds everything up to ``last_seq`` of this epoch's
                  history.

No sockets here; decoding never trusts its input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Sequence

import cbor2

from orbcast import strictcbor
from orbcast.envelope import MAX_BODY_BYTES, MAX_SEQ, VERSION, array_head
from orbcast.errors import FrameTooLarge, RemoteProtocolError

__all__ = ["PEER_HB", "REPL", "REPL_ACK", "PeerHeartbeat", "Repl", "ReplAck",
           "encode_heartbeat", "encode_repl", "encode_ack", "decode_peer"]

PEER_HB = 48
REPL = 49
REPL_ACK = 50

#: Bytes of records per REPL frame: well under the body limit.
MAX_REPL_BYTES = MAX_BODY_BYTES // 2

_U64 = struct.Struct(">BQ")


@dataclass(frozen=True, slots=True)
class PeerHeartbeat:
    epoch: int
    last_seq: int
    node: str
    role: str
    ingress: str | None
    egress: str | None
    in_sync: bool
    epochs: tuple[tuple[int, int], ...]
    time: int


@dataclass(frozen=True, slots=True)
class Repl:
    epoch: int
    first_seq: int
    last_seq: int
    records: list[tuple[int, int, bytes]]


@dataclass(frozen=True, slots=True)
class ReplAck:
    epoch: int
    last_seq: int


def encode_heartbeat(hb: PeerHeartbeat) -> list[bytes]:
    return [cbor2.dumps([VERSION, PEER_HB, hb.epoch, hb.last_seq]),
            cbor2.dumps({"node": hb.node, "role": hb.role, "ingress": hb.ingress,
                         "egress": hb.egress, "in_sync": hb.in_sync,
                         "epochs": [list(e) for e in hb.epochs], "time": hb.time})]


def encode_repl(epoch: int, records: Sequence[tuple[int, int, bytes]]) -> list[bytes]:
    """REPL frames for consecutive records (spliced, no re-encoding of bodies)."""
    parts = [array_head(len(records))]
    for seq, t, body in records:
        n = len(body)
        bh = (bytes((0x40 | n,)) if n < 24 else bytes((0x58, n)) if n < 256
              else b"\x59" + n.to_bytes(2, "big") if n < 65536 else b"\x5a" + n.to_bytes(4, "big"))
        parts.append(b"\x83" + _U64.pack(0x1B, seq) + _U64.pack(0x1B, t) + bh)
        parts.append(body)
    return [cbor2.dumps([VERSION, REPL, epoch, records[0][0], records[-1][0]]), b"".join(parts)]


def encode_ack(epoch: int, last_seq: int) -> list[bytes]:
    return [cbor2.dumps([VERSION, REPL_ACK, epoch, last_seq]), b"\xa0"]


def _uint(v: Any) -> bool:
    return type(v) is int and 0 <= v <= MAX_SEQ


def decode_peer(frames: Sequence[bytes]) -> PeerHeartbeat | Repl | ReplAck:
    """Decode a peer-link message; :class:`RemoteProtocolError` on anything bad."""
    if len(frames) != 2:
        raise RemoteProtocolError("a peer message has exactly 2 frames")
    head_b, body_b = frames
    if len(body_b) > MAX_BODY_BYTES:
        raise FrameTooLarge(len(body_b), MAX_BODY_BYTES, "body")
    try:
        h = strictcbor.loads(head_b)
        body = strictcbor.loads(body_b)
    except Exception as exc:
        raise RemoteProtocolError(f"malformed CBOR on the peer link: {exc}") from exc
    if (type(h) is not list or len(h) < 4 or type(h[0]) is not int or h[0] != VERSION
            or not all(_uint(v) for v in h[2:])):
        raise RemoteProtocolError("bad peer head")
    kind = h[1]
    if kind == PEER_HB and len(h) == 4 and type(body) is dict:
        epochs = body.get("epochs", [])
        ok = (type(body.get("node")) is str and type(body.get("role")) is str
              and type(body.get("in_sync")) is bool and _uint(body.get("time"))
              and type(epochs) is list
              and all(type(e) is list and len(e) == 2 and _uint(e[0]) and _uint(e[1])
                      and e[0] >= 1 and e[1] >= 1 for e in epochs)
              # a history: epochs rising (an epoch may start below the one before it:
              # a node promoted while its log lagged the last epoch it had adopted)
              and all(a[0] < b[0] for a, b in zip(epochs, epochs[1:])))
        for k in ("ingress", "egress"):
            if body.get(k) is not None and type(body[k]) is not str:
                ok = False
        if not ok:
            raise RemoteProtocolError("bad peer heartbeat body")
        return PeerHeartbeat(h[2], h[3], body["node"], body["role"], body.get("ingress"),
                             body.get("egress"), body["in_sync"],
                             tuple((e[0], e[1]) for e in epochs), body["time"])
    if kind == REPL and len(h) == 5 and type(body) is list and body:
        recs = []
        prev = None
        prev_t = 0
        for r in body:
            if (type(r) is not list or len(r) != 3 or not _uint(r[0]) or not _uint(r[1])
                    or type(r[2]) is not bytes or r[0] == 0):
                raise RemoteProtocolError("bad replicated record")
            if prev is not None and r[0] != prev + 1:
                raise RemoteProtocolError("replicated records are not consecutive")
            if r[1] < prev_t:
                raise RemoteProtocolError("replicated record times go backwards")
            prev, prev_t = r[0], r[1]
            recs.append((r[0], r[1], r[2]))
        if recs[0][0] != h[3] or recs[-1][0] != h[4]:
            raise RemoteProtocolError("replicated records do not match the head")
        return Repl(h[2], h[3], h[4], recs)
    if kind == REPL_ACK and len(h) == 4:
        if type(body) is not dict:
            raise RemoteProtocolError("bad peer ack body (an empty map is expected)")
        return ReplAck(h[2], h[3])
    raise RemoteProtocolError(f"unknown peer message kind {kind!r:.20}")
