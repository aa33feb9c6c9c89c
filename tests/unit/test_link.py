"""Tests for orbcast.link: a plant <-> node conversation through LinkClient / LinkServer,
every bad input of the crypto profile at the link level, forward secrecy, revocation,
broadcast sender keys, and a Hypothesis fuzz over the two ``open`` calls.

No sockets, no clock, no disk: persistence is an in-memory dict, keys come from a
deterministic counter generator, time is a literal ``now``.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orbcast import envelope as env
from orbcast import link as L
from orbcast import ratchet as r
from orbcast.envelope import Ack, Batch, Heartbeat, Hello, Publish, Welcome
from orbcast.errors import AuthenticationError, LocalProtocolError
from orbcast.keys import AllowEntry, Allowlist, Identity, NodePins

NOW = 1000.0


class CounterKeygen:
    """key k = SHA-256(label || u64 k): deterministic X25519 private keys."""

    def __init__(self, label: bytes) -> None:
        self.label, self.count = label, 0

    def __call__(self) -> bytes:
        self.count += 1
        return hashlib.sha256(self.label + self.count.to_bytes(8, "big")).digest()


def det_rand(label: bytes) -> Callable[[int], bytes]:
    counter = iter(range(10**9))
    return lambda n: hashlib.sha256(label + next(counter).to_bytes(8, "big")).digest()[:n]


class MemStore:
    """persist(session_id, blob) into a dict; records every call in order."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.calls: list[tuple[str, bytes | None]] = []
        self.fail = False

    def __call__(self, name: str, blob: bytes | None) -> None:
        if self.fail:
            raise OSError("disk full")
        self.calls.append((name, blob))
        if blob is None:
            self.blobs.pop(name, None)
        else:
            self.blobs[name] = blob


class World:
    """One node, plants, their stores. ``plant(name)`` makes a linked LinkClient."""

    def __init__(self, label: bytes = b"w", *, defer: bool = False,
                 garage_read: tuple[str, ...] = ("sensors/garage/",)) -> None:
        self.kg = CounterKeygen(label + b"/ids")
        self.node_ident = Identity.generate(self.kg)
        self.idents = {n: Identity.generate(self.kg) for n in ("kitchen", "garage", "evil")}
        self.acl = Allowlist([
            AllowEntry(name="kitchen", key=self.idents["kitchen"].public,
                       publish=("sensors/kitchen/",), read=("",)),
            AllowEntry(name="garage", key=self.idents["garage"].public,
                       publish=("sensors/garage/",), read=garage_read),
        ])
        self.node_store = MemStore()
        self.node_kg = CounterKeygen(label + b"/node")
        self.server = L.LinkServer(self.node_ident, "seq-a", self.acl, persist=self.node_store,
                                   keygen=self.node_kg, defer_persist=defer)
        self.stores: dict[str, MemStore] = {}
        self.defer = defer
        self.made = 0

    def client(self, name: str = "kitchen", *, pins: NodePins | None = None,
               ident: Identity | None = None) -> L.LinkClient:
        store = self.stores.setdefault(name, MemStore())
        self.made += 1
        return L.LinkClient(ident or self.idents[name], name,
                            pins or NodePins.of(self.node_ident.public), persist=store,
                            keygen=CounterKeygen(b"%s/%d" % (name.encode(), self.made)),
                            defer_persist=self.defer)

    def plant(self, name: str = "kitchen") -> L.LinkClient:
        c = self.client(name)
        c.on_keys(self.server.keys_reply(c.hello(rid=1)))
        return c


def hello(rid: int = 2) -> list[bytes]:
    return env.encode(Hello(rid=rid, client="t"))


def welcome(rid: int = 2) -> list[bytes]:
    return env.encode(Welcome(rid=rid, node="seq-a", role="active", epoch=1, first_seq=0,
                              last_seq=0, egress="tcp://127.0.0.1:7401", heartbeat_ms=100))


def publish(rid: int, pseq: int = 1, topic: str = "sensors/kitchen/temp",
            producer: str = "kitchen") -> list[bytes]:
    return env.encode(Publish(rid=rid, producer=producer, items=((pseq, topic, b"21.5"),)))


def ack(rid: int, seq: int = 1) -> list[bytes]:
    return env.encode(Ack(rid=rid, epoch=1, pairs=(1, seq)))


def linked(w: World, name: str = "kitchen") -> tuple[L.LinkClient, L.Peer]:
    """A plant whose handshake has been answered."""
    c = w.plant(name)
    peer, inner = w.server.open(c.seal(hello()))
    assert env.decode(inner) == env.decode(hello())
    node_key, inner = c.open(w.server.seal(peer.sid, welcome()))
    assert node_key == w.node_ident.public and c.answered
    return c, peer


def snap_server(w: World) -> tuple[Any, ...]:
    return (w.server.export_state(), dict(w.node_store.blobs), len(w.node_store.calls),
            w.node_kg.count)


def snap_client(c: L.LinkClient) -> tuple[Any, ...]:
    return (c.export_state(), dict(c._persist.blobs), len(c._persist.calls))  # type: ignore[attr-defined]


def assert_server_rejects(w: World, frames: Any) -> None:
    before = snap_server(w)
    with pytest.raises(AuthenticationError) as info:
        w.server.open(frames)
    assert type(info.value) is AuthenticationError
    assert snap_server(w) == before


def assert_client_rejects(c: L.LinkClient, frames: Any) -> None:
    before = snap_client(c)
    with pytest.raises(AuthenticationError) as info:
        c.open(frames)
    assert type(info.value) is AuthenticationError
    assert snap_client(c) == before


def still_works(w: World, c: L.LinkClient, peer: L.Peer, rid: int = 90) -> None:
    p, inner = w.server.open(c.seal(publish(rid)))
    assert p == peer and env.decode(inner).rid == rid
    _, inner = c.open(w.server.seal(peer.sid, ack(rid)))
    assert env.decode(inner).rid == rid


def flip(b: bytes, i: int, mask: int = 1) -> bytes:
    return b[:i] + bytes([b[i] ^ mask]) + b[i + 1:]


# --- the conversation --------------------------------------------------------------------------


def test_kinds_do_not_collide_with_the_envelope() -> None:
    envelope_kinds = {v for k, v in vars(env.Kind).items() if k.isupper()}
    ours = {L.LINK_HELLO, L.LINK_INIT, L.SEALED_UP, L.KEY_REQUEST, L.LINK_KEYS, L.SEALED_DOWN,
            L.SENDER_KEY, L.SEALED_BATCH, L.SEALED_HEARTBEAT}
    assert len(ours) == 9 and not ours & envelope_kinds
    assert all(1 <= k <= 15 for k in (L.LINK_HELLO, L.LINK_INIT, L.SEALED_UP, L.KEY_REQUEST))
    assert all(16 <= k <= 31 for k in (L.LINK_KEYS, L.SEALED_DOWN, L.SENDER_KEY))
    assert all(32 <= k <= 47 for k in (L.SEALED_BATCH, L.SEALED_HEARTBEAT))


def test_full_conversation_many_frames_both_ways_out_of_order() -> None:
    w = World()
    c = w.plant()
    assert L.outer_kind(c.hello(1)) == L.LINK_HELLO
    # before the node answers, every frame repeats the handshake (LINK_INIT)
    first = [c.seal(publish(rid, rid)) for rid in range(3, 8)]
    assert {L.outer_kind(f) for f in first} == {L.LINK_INIT}
    random.Random(1).shuffle(first)  # the node may see any of them first
    for f in first:
        peer, inner = w.server.open(f)
        assert peer.key == w.idents["kitchen"].public and peer.name == "kitchen"
    assert len(w.server.sessions()) == 1
    assert w.node_store.blobs == {}  # opened, not yet persisted: it persists with the next seal
    assert w.server.pending_persist() == [L.session_name(peer.sid)]
    _, inner = c.open(w.server.seal(peer.sid, ack(3)))
    assert list(w.node_store.blobs) == [L.session_name(peer.sid)]
    assert c.answered and L.outer_kind(c.seal(publish(8, 8))) == L.SEALED_UP
    # many frames both ways, delivered out of order in bursts (DH steps in both directions)
    rng = random.Random(7)
    rid = 100
    for _round in range(6):
        up = []
        for _ in range(rng.randint(1, 12)):
            rid += 1
            up.append((rid, c.seal(publish(rid, rid))))
        rng.shuffle(up)
        for want, frames in up:
            p, inner = w.server.open(frames)
            assert env.decode(inner).rid == want and p.sid == peer.sid
        down = []
        for _ in range(rng.randint(1, 12)):
            rid += 1
            down.append((rid, w.server.seal(peer.sid, ack(rid))))
        rng.shuffle(down)
        for want, frames in down:
            _key, inner = c.open(frames)
            assert env.decode(inner).rid == want
    # the plant's saved state continues the session after a restart of either side
    c2 = w.client()
    c2.restore(w.stores["kitchen"].blobs[L.session_name(peer.sid)])
    w2 = L.LinkServer(w.node_ident, "seq-a", w.acl, persist=MemStore(), keygen=CounterKeygen(b"n2"))
    assert w2.restore(w.node_store.blobs[L.session_name(peer.sid)]) == peer
    p, inner = w2.open(c2.seal(publish(999)))
    assert env.decode(inner).rid == 999
    _, inner = c2.open(w2.seal(p.sid, ack(999)))
    assert env.decode(inner).rid == 999


def test_persist_happens_before_seal_returns_and_a_failed_persist_returns_nothing() -> None:
    w = World()
    c, peer = linked(w)
    store = w.stores["kitchen"]
    n = len(store.calls)
    frames = c.seal(publish(5))
    assert len(store.calls) == n + 1 and store.calls[-1][0] == L.session_name(peer.sid)
    # the saved blob is the state *after* this frame: restoring it cannot reuse its number
    again = w.client()
    again.restore(store.blobs[L.session_name(peer.sid)])
    assert again.export_state()["session"] == c.export_state()["session"]
    w.server.open(frames)
    store.fail = True
    with pytest.raises(OSError):
        c.seal(publish(6))
    assert c.pending_persist() == [L.session_name(peer.sid)]
    store.fail = False
    assert c.flush_persist() == 1 and c.pending_persist() == []
    still_works(w, c, peer)


def test_deferred_persistence_once_per_turn() -> None:
    w = World(defer=True)
    c = w.plant()
    out = c.seal_many([publish(i, i) for i in range(3, 9)])
    assert w.stores["kitchen"].calls == [] and c.pending_persist()
    assert c.flush_persist() == 1 and len(w.stores["kitchen"].calls) == 1
    peers = [w.server.open(f)[0] for f in out]
    replies = w.server.seal_many([(peers[0].sid, ack(i)) for i in range(3, 9)])
    assert w.node_store.calls == []
    assert w.server.pending_persist() == [L.session_name(peers[0].sid)]
    assert w.server.flush_persist() == 1 and len(w.node_store.calls) == 1
    assert [env.decode(c.open(f)[1]).rid for f in replies] == list(range(3, 9))


def test_identity_is_the_key_sessions_are_per_key_and_bounded() -> None:
    w = World()
    a, pa = linked(w, "kitchen")
    b, pb = linked(w, "garage")
    assert pa.key != pb.key and {p.sid for p in w.server.sessions()} == {pa.sid, pb.sid}
    # a second process with the same key gets its own session; the oldest go beyond the bound
    extra = [linked(w, "kitchen") for _ in range(L.MAX_SESSIONS_PER_KEY)]
    assert w.server.peer(pa.sid) is None  # evicted, and its saved state deleted
    assert (L.session_name(pa.sid), None) in w.node_store.calls
    assert_server_rejects(w, a.seal(publish(50)))
    still_works(w, *extra[-1])
    still_works(w, b, pb)


def test_a_busy_session_outlives_one_shot_sessions_of_the_same_key() -> None:
    """Eviction per key is by last use: a plant that keeps talking keeps its
    session however many one-shot sessions (``plant status``) its key opens."""
    w = World()
    daemon, pd = linked(w, "kitchen")
    for i in range(3 * L.MAX_SESSIONS_PER_KEY):
        linked(w, "kitchen")                # a CLI call: one request, never used again
        still_works(w, daemon, pd, rid=100 + i)
    assert w.server.peer(pd.sid) is not None
    assert sum(p.key == pd.key for p in w.server.sessions()) == L.MAX_SESSIONS_PER_KEY


def test_misuse_is_a_local_error() -> None:
    w = World()
    c = w.client()
    with pytest.raises(LocalProtocolError):
        c.seal(hello())  # no LINK_KEYS yet
    c, peer = linked(w)
    with pytest.raises(LocalProtocolError):
        c.seal(welcome())  # a plant may not send a node reply
    with pytest.raises(LocalProtocolError):
        w.server.seal(peer.sid, hello())  # a node may not send a request
    with pytest.raises(LocalProtocolError):
        w.server.seal(12345, ack(1))  # no such session


# --- bad input (profile, last section), at the link level -------------------------------------


def _bad_server_inputs(w: World, c: L.LinkClient, peer: L.Peer) -> dict[str, Any]:
    good = c.seal(publish(40))
    head, body = good
    other_w = World(b"other")
    oc, _ = linked(other_w)
    other = oc.seal(publish(41))
    own = w.server.seal(peer.sid, ack(40))
    c.open(own)
    zero_dh = body[:1] + bytes(32) + body[33:]
    low_order = body[:1] + (1).to_bytes(32, "little") + body[33:]
    cases: dict[str, Any] = {
        "replayed frame": "REPLAY",
        "tampered version byte": [head, flip(body, 0)],
        "tampered dh": [head, flip(body, 5)],
        "tampered pn": [head, flip(body, 36)],
        "tampered n": [head, flip(body, 40)],
        "tampered ciphertext": [head, flip(body, 45)],
        "tampered tag": [head, flip(body, len(body) - 1)],
        "huge n": [head, body[:37] + struct.pack(">I", 0xFFFFFFFF) + body[41:]],
        "huge pn": [head, body[:33] + struct.pack(">I", 0xFFFFFFFF) + body[37:]],
        "all-zero dh": [head, zero_dh],
        "low-order dh": [head, low_order],
        "truncated 0": [head, b""],
        "truncated header": [head, body[:20]],
        "truncated tag": [head, body[:-1]],
        "tampered sid": [cbor2.dumps([1, L.SEALED_UP, peer.sid ^ 1]), body],
        "tampered kind": [cbor2.dumps([1, L.SEALED_DOWN, peer.sid]), body],
        "tampered head version": [cbor2.dumps([2, L.SEALED_UP, peer.sid]), body],
        "garbage head": [b"\xff\x00", body],
        "three frames": [head, body, b""],
        "not bytes": [head, 7],
        "frame from another session": other,
        "frame from another session, our sid": [head, other[1]],
        "own frame reflected": [cbor2.dumps([1, L.SEALED_UP, peer.sid]), own[1]],
        "plant frame reflected as node frame": [cbor2.dumps([1, L.SEALED_DOWN, peer.sid]), body],
    }
    return {"good": good, **cases}


BAD_SERVER = ["replayed frame", "tampered version byte", "tampered dh", "tampered pn",
              "tampered n", "tampered ciphertext", "tampered tag", "huge n", "huge pn",
              "all-zero dh", "low-order dh", "truncated 0", "truncated header", "truncated tag",
              "tampered sid", "tampered kind", "tampered head version", "garbage head",
              "three frames", "not bytes", "frame from another session",
              "frame from another session, our sid", "own frame reflected",
              "plant frame reflected as node frame"]


@pytest.mark.parametrize("case", BAD_SERVER)
def test_server_rejects_bad_input_without_state_change(case: str) -> None:
    w = World()
    c, peer = linked(w)
    cases = _bad_server_inputs(w, c, peer)
    if case == "replayed frame":
        w.server.open(cases["good"])
        frames = cases["good"]
    else:
        frames = cases[case]
    assert_server_rejects(w, frames)
    if case != "replayed frame":
        w.server.open(cases["good"])  # the frame the bad one was made from still opens
    still_works(w, c, peer)


def test_server_rejects_every_truncation_of_a_valid_frame() -> None:
    w = World()
    c, _peer = linked(w)
    head, body = c.seal(publish(7))
    for n in range(len(body)):
        assert_server_rejects(w, [head, body[:n]])
    for n in range(len(head)):
        assert_server_rejects(w, [head[:n], body])
    w.server.open([head, body])


@pytest.mark.parametrize("case", ["replayed", "tampered body", "truncated", "other session",
                                  "reflected", "tampered sid"])
def test_client_rejects_bad_input_without_state_change(case: str) -> None:
    w = World()
    c, peer = linked(w)
    good = w.server.seal(peer.sid, ack(30))
    head, body = good
    mine = c.seal(publish(31))
    w.server.open(mine)
    _oc, op = linked(w, "garage")
    frames = {
        "replayed": good,
        "tampered body": [head, flip(body, 50)],
        "truncated": [head, body[:-5]],
        "other session": w.server.seal(op.sid, ack(30)),
        "reflected": [cbor2.dumps([1, L.SEALED_DOWN, peer.sid]), mine[1]],
        "tampered sid": [cbor2.dumps([1, L.SEALED_DOWN, peer.sid + 1]), body],
    }[case]
    if case == "replayed":
        c.open(good)
    assert_client_rejects(c, frames)
    if case != "replayed":
        c.open(good)
    still_works(w, c, peer)


def test_handshake_from_a_key_not_on_the_allowlist() -> None:
    w = World()
    ok, peer = linked(w)
    evil = w.plant("evil")  # a real key, just not allowlisted
    assert_server_rejects(w, evil.seal(hello()))
    # an allowlisted *public* key used by someone without its private key
    impostor = w.client("kitchen", ident=w.idents["evil"])
    impostor._identity = Identity.generate(CounterKeygen(b"x"))  # what the attacker holds
    impostor._plant_id = "kitchen"
    impostor.on_keys(w.server.keys_reply(impostor.hello(1)))
    forged = impostor.seal(hello())
    m = cbor2.loads(forged[1])
    m["ik"] = w.idents["kitchen"].public  # claim the victim's identity
    sid = L._derive_sid(m["ik"], m["ek"], w.node_ident.public, m["spk"])
    assert_server_rejects(w, [cbor2.dumps([1, L.LINK_INIT, sid]), cbor2.dumps(m)])
    still_works(w, ok, peer)


def test_handshake_with_a_plant_id_other_than_the_allowlisted_name() -> None:
    w = World()
    c = w.client("kitchen")
    c._plant_id = "garage"
    c.on_keys(w.server.keys_reply(c.hello(1)))
    assert_server_rejects(w, c.seal(hello()))


def test_handshake_to_an_unpinned_node_key() -> None:
    w = World()
    rogue = World(b"rogue")  # a node with another identity, same node id
    c = w.client()
    before = snap_client(c)
    with pytest.raises(AuthenticationError):
        c.on_keys(rogue.server.keys_reply(c.hello(1)))
    assert snap_client(c) == before and not c.can_seal
    # a forged LINK_KEYS with the pinned IK_B but the attacker's SPK: the handshake runs,
    # the real node refuses it (unknown SPK), and the attacker cannot derive SK (no IK_B private)
    reply = w.server.keys_reply(c.hello(1))
    m = cbor2.loads(reply[1])
    m["spk"] = rogue.server.spk_public
    c.on_keys([reply[0], cbor2.dumps(m)])
    assert_server_rejects(w, c.seal(hello()))


def test_replayed_handshake_is_refused_after_the_session_is_gone() -> None:
    w = World()
    c = w.plant()
    init = c.seal(hello())
    peer, _ = w.server.open(init)
    assert_server_rejects(w, init)  # same session: the ratchet sees a replay
    w.server.drop(peer.sid)
    assert_server_rejects(w, init)  # session gone: the SPK's handshake set refuses it
    # a restarted node has a fresh SPK: the old handshake names an unknown SPK
    w2 = L.LinkServer(w.node_ident, "seq-a", w.acl, persist=MemStore(), keygen=CounterKeygen(b"r"))
    before = w2.export_state()
    with pytest.raises(AuthenticationError):
        w2.open(init)
    assert w2.export_state() == before


def test_spk_rotation_keeps_the_previous_one() -> None:
    w = World()
    c = w.plant()
    w.server.rotate_spk()
    w.server.open(c.seal(hello()))  # made with the previous SPK: still fine
    d = w.plant()
    assert cbor2.loads(d.seal(hello())[1])["spk"] == w.server.spk_public
    w.server.rotate_spk()
    w.server.rotate_spk()
    stale = w.client()
    stale.on_keys([cbor2.dumps([1, L.LINK_KEYS, 1]),
                   cbor2.dumps({"node": "seq-a", "ik": w.node_ident.public,
                                "spk": cbor2.loads(d.seal(hello())[1])["spk"]})])
    assert_server_rejects(w, stale.seal(hello()))


# --- forward secrecy ----------------------------------------------------------------------------


def test_forward_secrecy_stolen_state_and_identity_do_not_open_earlier_frames() -> None:
    w = World()
    c, peer = linked(w)
    captured_up, captured_down = [], []
    for i in range(5):
        f = c.seal(publish(200 + i))
        captured_up.append(f)
        w.server.open(f)
        g = w.server.seal(peer.sid, ack(200 + i))
        captured_down.append(g)
        c.open(g)
    for i in range(3):  # more traffic after the capture: DH steps
        w.server.open(c.seal(publish(300 + i)))
        c.open(w.server.seal(peer.sid, ack(300 + i)))
    # the thief copies the plant's saved state and its long-term key
    stolen = w.stores["kitchen"].blobs[L.session_name(peer.sid)]
    thief = L.LinkClient(w.idents["kitchen"], "kitchen", NodePins.of(w.node_ident.public),
                         persist=MemStore(), keygen=CounterKeygen(b"thief"))
    thief.restore(stolen)
    for g in captured_down:
        with pytest.raises(AuthenticationError):
            thief.open(g)
    # the plant's own sent frames: no state lets the thief act as the node, and the node's
    # side (rebuilt from the same identity + LINK_KEYS) cannot re-derive SK without EK_A
    for f in captured_up:
        m = cbor2.loads(f[1]) if L.outer_kind(f) == L.LINK_INIT else None
        assert m is None or "ek" in m  # only the public EK_A ever travelled
    stolen_session = r.Session.from_bytes(cbor2.loads(stolen[5:])["session"])
    for f in captured_up:
        body = cbor2.loads(f[1])["frame"] if L.outer_kind(f) == L.LINK_INIT else f[1]
        with pytest.raises(AuthenticationError):
            stolen_session.decrypt(body)


# --- broadcast ----------------------------------------------------------------------------------


def batch(seq: int, epoch: int = 1) -> list[bytes]:
    rec = env.encode_record(seq, epoch, 10**18 + seq, "kitchen", seq, "sensors/kitchen/temp", b"x")
    return env.batch_frames(epoch, seq, seq, [rec])


def heartbeat(last: int) -> list[bytes]:
    return env.encode(Heartbeat(epoch=1, last_seq=last, node="seq-a", role="active", time=5))


class Cast:
    """A node with a broadcast sender and linked plants with receivers."""

    def __init__(self, label: bytes = b"cast") -> None:
        self.w = World(label, garage_read=("",))   # both read everything: both get the key
        self.sender = L.BroadcastSender(key_epoch=7, now=NOW, rand=det_rand(label))
        self.links: dict[str, tuple[L.LinkClient, L.Peer, L.BroadcastReceiver]] = {}
        for name in ("kitchen", "garage"):
            c, peer = linked(self.w, name)
            self.links[name] = (c, peer, L.BroadcastReceiver())
        self.distribute(self.sender.take_distribution())

    def distribute(self, dist: list[bytes] | None, now: float = NOW) -> None:
        assert dist is not None
        for c, peer, rx in self.links.values():
            if self.w.server.peer(peer.sid) is None:
                continue
            entry = self.w.server.allowlist.lookup(peer.key)
            if entry is None or not entry.gets_broadcast_key:
                continue
            node_key, inner = c.open(self.w.server.seal(peer.sid, dist))
            assert L.inner_kind(inner) == L.SENDER_KEY
            rx.install(node_key, inner, now=now)

    def rx(self, name: str = "kitchen") -> L.BroadcastReceiver:
        return self.links[name][2]


def assert_rx_rejects(rx: L.BroadcastReceiver, frames: Any, now: float = NOW) -> None:
    before = rx.export_state()
    with pytest.raises(AuthenticationError) as info:
        rx.open(frames, now=now)
    assert type(info.value) is AuthenticationError
    assert rx.export_state() == before


def test_broadcast_round_trip_out_of_order_and_heartbeats() -> None:
    k = Cast()
    sealed = [k.sender.seal(batch(s), now=NOW) for s in range(1, 6)]
    hb = k.sender.seal(heartbeat(5), now=NOW)
    assert {L.outer_kind(f) for f in sealed} == {L.SEALED_BATCH} and L.outer_kind(hb) == 35
    assert sealed[0][0] == cbor2.dumps([1, L.SEALED_BATCH, 1, 1, 1])  # head stays readable
    for f, s in zip(reversed(sealed), range(5, 0, -1)):
        ev = env.decode(k.rx().open(f, now=NOW))
        assert type(ev) is Batch and ev.first_seq == s
        assert k.rx("garage").open(f, now=NOW) == batch(s)
    assert env.decode(k.rx().open(hb, now=NOW)) == env.decode(heartbeat(5))


def test_broadcast_bad_input() -> None:
    k = Cast()
    good = k.sender.seal(batch(1), now=NOW)
    head, body = good
    rx = k.rx()
    for frames in ([cbor2.dumps([1, L.SEALED_BATCH, 1, 1, 2]), body],  # tampered head = AD
                   [cbor2.dumps([1, L.SEALED_BATCH, 2, 1, 1]), body],  # tampered epoch
                   [cbor2.dumps([1, L.SEALED_HEARTBEAT, 1, 1]), body],
                   [head, flip(body, 2)], [head, flip(body, 20)], [head, flip(body, len(body) - 1)],
                   [head, body[:-1]], [head, body[:8]], [head, b""], [b"", body], [head]):
        assert_rx_rejects(rx, frames)
    rx.open(good, now=NOW)
    assert_rx_rejects(rx, good)  # replayed
    rx.open(k.sender.seal(batch(2), now=NOW), now=NOW)


def test_broadcast_resigned_by_a_plant_is_rejected() -> None:
    """A plant holds the chain key: it can make a frame whose MAC is valid, but not sign it."""
    k = Cast()
    _, _, ck, _ = k.sender._sender.distribution()
    head = cbor2.dumps([1, L.SEALED_BATCH, 1, 1, 1])
    hdr = struct.pack(">BII", 2, k.sender.key_epoch, 0)
    adf = r.ad_full(head, hdr)
    _, mk = r.kdf_ck(ck)
    ct = r.encrypt_sender_key(mk, batch(1)[1] + b"forged", adf)
    sig = Ed25519PrivateKey.from_private_bytes(bytes(32)).sign(adf + ct)
    assert_rx_rejects(k.rx(), [head, hdr + ct + sig])
    k.rx().open(k.sender.seal(batch(1), now=NOW), now=NOW)


def test_old_key_epoch_after_rotation_and_grace() -> None:
    k = Cast()
    old = k.sender.seal(batch(1), now=NOW)
    old2 = k.sender.seal(batch(2), now=NOW)
    k.sender.rotate(now=NOW)
    k.distribute(k.sender.take_distribution())
    assert k.rx().key_epoch == 8
    k.rx().open(old, now=NOW + 1)  # in flight: the previous epoch opens within the grace
    k.rx().expire(NOW + 60)
    assert_rx_rejects(k.rx(), old2, now=NOW + 60)
    assert k.rx().wants_key(old2) is None  # older than ours: nothing to ask for
    k.rx().open(k.sender.seal(batch(3), now=NOW + 60), now=NOW + 60)
    # a stale distribution (the old epoch again) is not installed
    _c, _peer, rx = k.links["kitchen"]
    before = rx.export_state()
    assert rx.install(k.w.node_ident.public, [cbor2.dumps([1, L.SENDER_KEY, 7]), cbor2.dumps(
        {"iteration": 5, "chain_key": bytes(range(32)), "signing_key": bytes(range(32))})],
        now=NOW) is False
    assert rx.export_state() == before


def test_automatic_rotation_by_count_and_time_and_key_request() -> None:
    k = Cast()
    s = L.BroadcastSender(key_epoch=1, now=0.0, rand=det_rand(b"s"), rotate_every=3)
    assert s.take_distribution() is not None and s.take_distribution() is None
    for i in range(3):
        s.seal(batch(i + 1), now=1.0)
    assert s.key_epoch == 1 and s.rotation_due(1.0)
    s.seal(batch(4), now=1.0)
    assert s.key_epoch == 2 and s.take_distribution() is not None
    assert s.maybe_rotate(1.0 + L.ROTATE_AFTER_SECONDS) and s.key_epoch == 3
    # a plant sees a frame of an epoch it has no key for: it asks (rate-limited), the node answers
    k.sender.rotate(now=NOW)
    k.sender.take_distribution()  # lost on the way to the plant
    f = k.sender.seal(batch(9), now=NOW)
    c, _peer, rx = k.links["kitchen"]
    assert_rx_rejects(rx, f)
    assert rx.wants_key(f) == 8
    req = rx.key_request(f, rid=77, now=NOW)
    assert req is not None and rx.key_request(f, rid=78, now=NOW + 0.1) is None
    p, inner = k.w.server.open(c.seal(req))
    assert L.inner_kind(inner) == L.KEY_REQUEST and L.decode_key_request(inner) == 8
    _, dist = c.open(k.w.server.seal(p.sid, k.sender.distribution()))
    assert rx.install(k.w.node_ident.public, dist, now=NOW)
    rx.open(k.sender.seal(batch(10), now=NOW), now=NOW)  # from the distributed iteration on


def test_receiver_too_far_behind_resyncs_from_a_new_distribution() -> None:
    k = Cast()
    rx = k.rx()
    for i in range(r.SENDER_KEY_MAX_SKIP + 2):
        f = k.sender.seal(heartbeat(i), now=NOW)
    assert_rx_rejects(rx, f)
    assert rx.wants_key(f) == k.sender.key_epoch
    c, peer, _ = k.links["kitchen"]
    _, dist = c.open(k.w.server.seal(peer.sid, k.sender.distribution()))
    assert rx.install(k.w.node_ident.public, dist, now=NOW)
    rx.open(k.sender.seal(heartbeat(0), now=NOW), now=NOW)


def test_failover_a_key_from_another_node_replaces_the_ring() -> None:
    k = Cast()
    other = Cast(b"other-node")
    old = k.sender.seal(batch(1), now=NOW)
    rx = k.rx()
    c2, p2 = linked(other.w, "kitchen")
    _, dist = c2.open(other.w.server.seal(p2.sid, other.sender.distribution()))
    assert rx.install(other.w.node_ident.public, dist, now=NOW)
    assert_rx_rejects(rx, old)  # the deposed node's broadcasts stop opening
    rx.open(other.sender.seal(batch(2), now=NOW), now=NOW)


# --- revocation ---------------------------------------------------------------------------------


def test_revocation_rotates_and_locks_the_plant_out() -> None:
    k = Cast()
    w = k.w
    c, peer, rx = k.links["garage"]
    saved_plant = w.stores["garage"].blobs[L.session_name(peer.sid)]
    saved_receiver_ring = rx.export_state()
    k.rx("garage").open(k.sender.seal(batch(1), now=NOW), now=NOW)
    new_acl = Allowlist([e for e in w.acl if e.name != "garage"])
    diff, dropped = w.server.set_allowlist(new_acl)
    assert diff.revoked == {w.idents["garage"].public} and diff.rotate
    assert [p.sid for p in dropped] == [peer.sid]
    assert (L.session_name(peer.sid), None) in w.node_store.calls
    k.sender.rotate(now=NOW)  # before the next publish
    k.distribute(k.sender.take_distribution())
    after = k.sender.seal(batch(2), now=NOW)
    k.rx("kitchen").open(after, now=NOW)
    assert_rx_rejects(rx, after)
    assert saved_receiver_ring["epoch"] == 7
    saved_key = rx._ring._current.to_bytes()  # type: ignore[union-attr]  # what was on its disk
    with pytest.raises(AuthenticationError):
        r.SenderKeyReceiver.from_bytes(saved_key).decrypt(after[1], after[0])
    # its publishes and replay requests are refused: the session is gone...
    assert_server_rejects(w, c.seal(publish(5, topic="sensors/garage/x", producer="garage")))
    # ...its saved state is refused, and a new handshake is refused
    with pytest.raises(AuthenticationError):
        w.server.restore(w.node_store.blobs.get(L.session_name(peer.sid), b"")
                         or L._encode_blob({"role": "node", "sid": peer.sid,
                                            "own": w.node_ident.public, "peer": peer.key,
                                            "name": "garage", "init": None,
                                            "session": b"x"}))
    thief = w.client("garage")
    thief.restore(saved_plant)
    assert_server_rejects(w, thief.seal(env.encode(env.ReplayRequest(rid=9))))
    fresh = w.plant("garage")
    assert_server_rejects(w, fresh.seal(hello()))
    # no broadcast after the rotation opens with the revoked plant's saved key state
    for s in range(3, 8):
        assert_rx_rejects(rx, k.sender.seal(batch(s), now=NOW))
    still_works(w, *k.links["kitchen"][:2])


@pytest.mark.parametrize("read", [(), ("sensors/",)])
def test_plant_losing_read_rights_triggers_rotation(read: tuple[str, ...]) -> None:
    """Losing every read right, or narrowing from everything to some prefixes
    (the group key opens every topic), must both rotate the broadcast key."""
    k = Cast()
    entries = [e if e.name != "garage" else AllowEntry(name="garage", key=e.key, publish=e.publish,
                                                         read=read)
               for e in k.w.acl]
    diff, dropped = k.w.server.set_allowlist(Allowlist(entries))
    assert diff.rotate and not diff.revoked and dropped == []
    assert diff.changed == {k.w.idents["garage"].public}


def test_link_module_is_sans_io() -> None:
    import ast
    from pathlib import Path
    tree = ast.parse(Path(L.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not names & {"zmq", "time", "logging", "socket", "pathlib", "io", "shutil"}
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "open" not in calls and "print" not in calls


# --- ACL helpers ---------------------------------------------------------------------------------


def test_filter_readable_and_publish_refusal() -> None:
    w = World()
    garage = w.acl.lookup(w.idents["garage"].public)
    recs = [env.encode_record(s, 1, 5, "p", s, t, b"v") for s, t in
            enumerate(["sensors/garage/door", "sensors/kitchen/temp", "sensors/garage/light"], 1)]
    assert L.filter_readable(garage, recs) == [recs[0], recs[2]]
    msgs = [env.decode_record(b) for b in recs]
    assert [m.seq for m in L.filter_readable(garage, msgs)] == [1, 3]
    assert L.filter_readable(None, recs) == []
    assert L.publish_refusal(garage, "garage", [(1, "sensors/garage/door", b"")]) is None
    assert "producer" in (L.publish_refusal(garage, "kitchen", [(1, "sensors/garage/x", b"")]) or "")
    assert "topic" in (L.publish_refusal(garage, "garage", [(1, "sensors/kitchen/x", b"")]) or "")
    assert L.publish_refusal(None, "garage", []) is not None


# --- fuzz ------------------------------------------------------------------------------------------

_FUZZ = World(b"fuzz")
_FUZZ_CLIENT, _FUZZ_PEER = linked(_FUZZ)
_FUZZ_SEEDS = [_FUZZ_CLIENT.seal(publish(i)) for i in range(3)] + [
    _FUZZ.plant("garage").seal(hello())]
_CAST = Cast(b"fuzzcast")
_CAST_SEEDS = [_CAST.sender.seal(batch(s), now=NOW) for s in (1, 2)] + [
    _CAST.sender.seal(heartbeat(2), now=NOW)]

frame_lists = st.one_of(
    st.lists(st.binary(max_size=120), max_size=4),
    st.tuples(st.integers(0, 3), st.integers(0, 1), st.lists(
        st.tuples(st.integers(0, 2000), st.integers(1, 255)), min_size=1, max_size=4),
        st.integers(0, 4000)),
)


def _mutate(seeds: list[list[bytes]], arg: Any) -> Any:
    if isinstance(arg, list):
        return arg
    which, part, flips, cut = arg
    frames = list(seeds[which % len(seeds)])
    b = bytearray(frames[part])
    for pos, mask in flips:
        if b:
            b[pos % len(b)] ^= mask
    frames[part] = bytes(b[:cut]) if cut < len(b) else bytes(b)
    return frames


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(frame_lists)
def test_fuzz_server_open(arg: Any) -> None:
    frames = _mutate(_FUZZ_SEEDS, arg)
    before = snap_server(_FUZZ)
    try:
        _FUZZ.server.open(frames)
    except AuthenticationError:
        assert snap_server(_FUZZ) == before
    else:  # only an unmodified, not yet seen frame may open
        assert any(frames == s for s in _FUZZ_SEEDS)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(frame_lists)
def test_fuzz_broadcast_open(arg: Any) -> None:
    frames = _mutate(_CAST_SEEDS, arg)
    rx = _CAST.rx()
    before = rx.export_state()
    try:
        rx.open(frames, now=NOW)
    except AuthenticationError:
        assert rx.export_state() == before
    else:
        assert any(frames == s for s in _CAST_SEEDS)
