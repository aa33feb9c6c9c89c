"""Link security for the sequencer driver: keys, sessions, broadcast, peer CURVE.

The cryptography lives in the sans-I/O :mod:`orbcast.link`; this module is
the node's glue around it and owns what needs files or sockets:

* the node identity and the allowlist (reloaded on SIGHUP / ``sequencer
  reload`` without a restart; a file that does not parse leaves the old
  allowlist in force);
* a :class:`~orbcast.link.LinkServer` whose session state goes to a
  :class:`~orbcast.linkstore.SessionStore` journal under ``DATA/links``
  (restored at start, so plants keep their sessions across a node restart);
* the mapping between ZeroMQ routes and session ids. The route is only an
  address for replies: who a peer *is* comes from its session's key;
* the broadcast :class:`~orbcast.link.BroadcastSender` while the node is
  active (a new one, under a new key-epoch, at every start and promotion:
  a node never continues its own earlier chain or another node's) and the
  sender-key distribution to every authorised session;
* the peer link between the two nodes, which the crypto profile does not
  cover: ZeroMQ CURVE with the two node identity keys (X25519 keys are
  Curve25519 keys) and a ZAP handler that admits only the configured peer.

What it must never do: seal a reply for a route under a session that does
not belong to it, send a frame sealed under state that is not on disk yet
(drivers call :meth:`NodeSecurity.flush` before sending), or hand a sender
key to a plant whose allowlist entry has no ``read`` prefix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from orbcast.config import SequencerConfig
from orbcast.errors import AuthenticationError, LocalProtocolError
from orbcast.keys import Allowlist, fingerprint, load_allowlist, load_identity, parse_public
from orbcast.link import BroadcastSender, LinkServer, Peer, publish_refusal
from orbcast.linkstore import SessionStore

__all__ = ["NodeSecurity", "key_epoch_start", "KEY_EPOCH_BASE"]

log = logging.getLogger("orbcast.sequencer")

#: Key-epochs start from the wall clock in seconds minus this, so they grow
#: across restarts even if node-state.json was restored from a backup.
KEY_EPOCH_BASE = 1_700_000_000
#: Routes remembered for replies (one per connected plant DEALER); the
#: oldest are forgotten first. A forgotten route only means a plant gets
#: its next sender key when it next sends something.
MAX_ROUTES = 8192
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"orbcast-peer"


def key_epoch_start(saved: int, now_wall: float) -> int:
    """The first key-epoch of a new broadcast sender: newer than any used before."""
    return max(saved + 1, int(now_wall) - KEY_EPOCH_BASE)


class NodeSecurity:
    """Everything a node needs for ``security = "ratchet"``."""

    def __init__(self, cfg: SequencerConfig, data: Path, counters: dict[str, float]) -> None:
        self.cfg = cfg
        self.counters = counters
        for k in ("auth_rejected", "forbidden", "sessions_restored", "sender_keys_sent",
                  "key_rotations", "allowlist_reloads", "peer_auth_rejected"):
            counters.setdefault(k, 0)
        self.identity = load_identity(cfg.identity)
        self.allowlist_path = cfg.allowlist
        allow = load_allowlist(cfg.allowlist)
        self.store = SessionStore(data / "links", fsync=cfg.fsync)
        if self.store.damaged_at is not None:
            log.warning("link session journal damaged at byte %d; sessions after it are gone "
                        "(those plants handshake again)", self.store.damaged_at)
        self.server = LinkServer(self.identity, cfg.node_id, allow, persist=self.store.put,
                                 defer_persist=True)
        for name, blob in self.store.load().items():
            try:
                self.server.restore(blob)
                counters["sessions_restored"] += 1
            except (AuthenticationError, LocalProtocolError) as exc:
                log.info("dropping saved link session %s: %s", name, exc)
                self.store.put(name, None)
        self.store.commit()
        self.sid_of: dict[bytes, int] = {}      # route -> the session it last spoke under
        self.route_of: dict[int, bytes] = {}    # sid -> the route to reply to
        self.keyed: dict[int, int] = {}         # sid -> key-epoch last handed to it
        self.bcast: BroadcastSender | None = None
        self.peer_key = parse_public(cfg.peer_key) if cfg.peer_key else None
        self.zap: zmq.Socket | None = None
        log.info("link security ON: node key %s (%s), %d allowlisted plants, %d saved sessions",
                 self.identity.public_text, fingerprint(self.identity.public), len(allow),
                 counters["sessions_restored"])

    # -- pairwise links ---------------------------------------------------------------

    def note_route(self, route: bytes, peer: Peer) -> None:
        """Remember that ``route`` speaks under session ``peer.sid`` (after an open)."""
        old = self.sid_of.pop(route, None)
        if old is not None and old != peer.sid and self.route_of.get(old) == route:
            del self.route_of[old]
        self.sid_of[route] = peer.sid
        self.route_of[peer.sid] = route
        while len(self.sid_of) > MAX_ROUTES:
            r = next(iter(self.sid_of))
            sid = self.sid_of.pop(r)
            if self.route_of.get(sid) == r:
                del self.route_of[sid]

    def seal(self, route: bytes, frames: list[bytes]) -> list[bytes] | None:
        """Seal a reply for ``route``; None if it has no live session (revoked,
        evicted, never opened): the reply is dropped."""
        sid = self.sid_of.get(route)
        if sid is None:
            return None
        try:
            return self.server.seal(sid, frames)
        except LocalProtocolError:
            return None

    def flush(self) -> None:
        """Make every advanced session state durable: call before sending sealed frames."""
        self.server.flush_persist()
        self.store.commit()

    def entry(self, key: bytes) -> Any:
        return self.server.allowlist.lookup(key)

    def publish_refusal(self, peer: Peer, producer: str, items: Any) -> str | None:
        return publish_refusal(self.entry(peer.key), producer, items)

    def readable(self, key: bytes) -> Callable[[str], bool]:
        """A topic filter for a replay, checked against the allowlist in force
        each time a chunk is cut (a revocation stops a running replay)."""
        server = self.server

        def may_read(topic: str) -> bool:
            e = server.allowlist.lookup(key)
            return e is not None and e.may_read(topic)
        return may_read

    # -- broadcast --------------------------------------------------------------------

    def start_broadcast(self, key_epoch: int, now: float) -> None:
        """A fresh sender (active role): new chain, new signing key."""
        self.bcast = BroadcastSender(key_epoch=key_epoch, now=now)
        self.keyed.clear()
        self.counters["key_rotations"] += 1

    def stop_broadcast(self) -> None:
        self.bcast = None
        self.keyed.clear()

    def sender_key_for(self, peer: Peer) -> list[bytes] | None:
        """The sealed SENDER_KEY for ``peer`` if it should get one now (it may
        read, and has not been handed the current key-epoch yet)."""
        b = self.bcast
        if b is None or self.keyed.get(peer.sid) == b.key_epoch:
            return None
        e = self.entry(peer.key)
        if e is None or not e.gets_broadcast_key:
            return None
        try:
            frames = self.server.seal(peer.sid, b.distribution())
        except LocalProtocolError:
            return None
        self.keyed[peer.sid] = b.key_epoch
        self.counters["sender_keys_sent"] += 1
        return frames

    def distribution_due(self, now: float) -> bool:
        """Rotate if due; True if a new key-epoch must be handed out before the next publish."""
        b = self.bcast
        if b is None:
            return False
        if b.maybe_rotate(now):
            self.counters["key_rotations"] += 1
        return b.take_distribution() is not None

    def distribute(self) -> list[tuple[bytes, list[bytes]]]:
        """Sealed SENDER_KEY messages for every authorised session with a known route."""
        out = []
        for peer in self.server.sessions():
            route = self.route_of.get(peer.sid)
            if route is None:
                continue
            frames = self.sender_key_for(peer)
            if frames is not None:
                out.append((route, frames))
        return out

    def seal_egress(self, frames: list[bytes], now: float) -> list[bytes]:
        assert self.bcast is not None
        return self.bcast.seal(frames, now=now)

    # -- revocation ------------------------------------------------------------------

    def reload(self, now: float) -> tuple[list[bytes], str]:
        """Reload the allowlist file. Returns (routes of dropped sessions, summary).
        Raises ValueError / OSError (old allowlist kept) if the file is bad."""
        new: Allowlist = load_allowlist(self.allowlist_path)
        diff, dropped = self.server.set_allowlist(new)
        routes = []
        for p in dropped:
            self.keyed.pop(p.sid, None)
            r = self.route_of.pop(p.sid, None)
            if r is not None:
                self.sid_of.pop(r, None)
                routes.append(r)
        if diff.rotate and self.bcast is not None:
            self.bcast.rotate(now=now)          # before the next publish
            self.keyed.clear()
            self.counters["key_rotations"] += 1
        self.counters["allowlist_reloads"] += 1
        summary = (f"allowlist reloaded: {len(new)} plants, {len(dropped)} sessions dropped"
                   + (", broadcast key rotated" if diff.rotate and self.bcast else ""))
        return routes, summary

    def forget_dropped(self) -> None:
        """Prune route and key bookkeeping of sessions the server no longer has."""
        live = {p.sid for p in self.server.sessions()}
        for sid in [s for s in self.route_of if s not in live]:
            r = self.route_of.pop(sid)
            if self.sid_of.get(r) == sid:
                del self.sid_of[r]
        for sid in [s for s in self.keyed if s not in live]:
            del self.keyed[sid]

    # -- the peer link (CURVE) ---------------------------------------------------------

    def secure_peer(self, ctx: zmq.Context, server: zmq.Socket, client: zmq.Socket) -> None:
        """Turn on CURVE for the peer sockets (call before bind/connect) and
        start the ZAP handler that admits only ``peer_key``."""
        assert self.peer_key is not None
        self.zap = ctx.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)
        server.setsockopt(zmq.CURVE_SERVER, 1)
        server.setsockopt(zmq.CURVE_SECRETKEY, self.identity.private)
        server.setsockopt(zmq.CURVE_PUBLICKEY, self.identity.public)
        server.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        client.setsockopt(zmq.CURVE_SERVERKEY, self.peer_key)
        client.setsockopt(zmq.CURVE_PUBLICKEY, self.identity.public)
        client.setsockopt(zmq.CURVE_SECRETKEY, self.identity.private)

    def handle_zap(self) -> None:
        """Answer pending ZAP requests: 200 for the peer's key over CURVE, else 400."""
        assert self.zap is not None
        for _ in range(64):
            try:
                req = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            ok = (len(req) >= 7 and req[0] == b"1.0" and req[5] == b"CURVE"
                  and req[6] == self.peer_key)
            if not ok:
                self.counters["peer_auth_rejected"] += 1
                log.warning("refused a peer-link connection from %s (key %s)",
                            req[3].decode(errors="replace") if len(req) > 3 else "?",
                            fingerprint(req[6]) if len(req) > 6 else "?")
            rid = req[1] if len(req) > 1 else b""
            self.zap.send_multipart([b"1.0", rid, b"200" if ok else b"400",
                                     b"OK" if ok else b"not the configured peer key",
                                     b"peer" if ok else b"", b""])

    def close(self) -> None:
        try:
            self.store.close()
        finally:
            if self.zap is not None:
                self.zap.close(0)

