"""Link security end to end (issue 5): a real node process with security = "ratchet",
plants in this process on real loopback sockets, raw sockets for what an attacker sends."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import cbor2
import pytest
import zmq

from orbcast import envelope as env
from orbcast.config import PlantConfig
from orbcast.errors import AuthenticationError, OrbcastTimeout
from orbcast.keys import generate_identity_file, load_identity, load_pins
from orbcast.link import SEALED_BATCH, SEALED_DOWN, LinkClient, outer_kind
from plant.client import Plant
from tests.integration.conftest import PY, ROOT, Keyring, Node, wait_for

pytestmark = [pytest.mark.timeout(180), pytest.mark.parametrize("security", ["ratchet"], indirect=True)]


def plant(kr: Keyring, node: Node | list[Node], tmp: Path, name: str, **kw: object) -> Plant:
    """A secured in-process plant on ``node`` (or on every node of a pair)."""
    nodes = node if isinstance(node, list) else [node]
    key = kr.plant(name, **{k: kw.pop(k) for k in ("publish", "read") if k in kw})  # type: ignore[arg-type]
    cfg = PlantConfig(sequencers=[n.ingress for n in nodes], producer_id=name, data=str(tmp / f"plant-{name}"),
                      security="ratchet", identity=str(key), pins=str(kr.pins), request_timeout_ms=300,
                      **kw)  # type: ignore[arg-type]
    return Plant(cfg)


def publish_mixed(w: Plant, n: int, every: int) -> list[int]:
    """Publish ``n`` messages, each ``every``-th on y/secret, the rest on x/a; returns
    the seqs of the x/a ones once all are acked."""
    tickets = [(i % every != 0, w.publish_nowait("x/a" if i % every else "y/secret", b"%d" % i))
               for i in range(n)]
    w.flush(20)
    return [t.result(10) for keep, t in tickets if keep]


def drain(sub, upto: int, timeout: float = 20) -> list:  # type: ignore[no-untyped-def]
    out = []
    while not out or out[-1].seq < upto:
        out.append(sub.get(timeout=timeout))
    return out


class Sniffer:
    """A raw SUB on egress: what anyone on the network sees."""

    def __init__(self, node: Node) -> None:
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.SUB)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.setsockopt(zmq.SUBSCRIBE, b"")
        self.s.connect(node.egress)
        self.frames: list[list[bytes]] = []
        self.take(lambda f: True, 10)           # connected once a heartbeat arrives

    def take(self, until, timeout: float) -> list[bytes]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.s.poll(left * 1000):
                pytest.fail("no matching egress frame in time")
            f = self.s.recv_multipart()
            self.frames.append(f)
            if until(f):
                return f

    def close(self) -> None:
        self.s.close(0)
        self.ctx.term()


def test_egress_is_sealed_and_plants_read_only_with_keys(tmp_path: Path, node_factory, keyring: Keyring) -> None:
    """Nothing in cleartext on egress: a sniffer sees no topic and no payload;
    an allowlisted reader delivers everything."""
    node = node_factory().start()
    sniff = Sniffer(node)
    with plant(keyring, node, tmp_path, "writer") as w, plant(keyring, node, tmp_path, "reader") as r:
        sub = r.subscribe("", start=1)
        last = 0
        for i in range(50):
            last = w.publish("secret/topic", b"PAYLOAD-%d" % i, timeout=10)
        got = drain(sub, last)
        assert [m.payload for m in got] == [b"PAYLOAD-%d" % i for i in range(50)]
        sniff.take(lambda f: outer_kind(f) == SEALED_BATCH and
                   cbor2.loads(f[0])[4] >= last, 10)
    blob = b"".join(b for f in sniff.frames for b in f)
    assert b"PAYLOAD" not in blob and b"secret/topic" not in blob
    assert all(outer_kind(f) != env.Kind.BATCH for f in sniff.frames)
    sniff.close()


def test_revocation_by_sighup_without_restart(tmp_path: Path, node_factory, keyring: Keyring) -> None:
    """Revoke a reading plant (edit the allowlist, SIGHUP): the broadcast key
    rotates before the next publish, its saved keys open nothing sealed after
    that, and its publishes and replays are refused; the others carry on."""
    node = node_factory().start()
    with plant(keyring, node, tmp_path, "writer") as w, plant(keyring, node, tmp_path, "victim") as v:
        vsub = v.subscribe("", start=1)
        s1 = w.publish("t/a", b"before", timeout=10)
        assert drain(vsub, s1)[-1].payload == b"before"
        key_epoch_before = v._bcast.key_epoch  # type: ignore[union-attr]
        sniff = Sniffer(node)
        keyring.revoke("victim")
        reloads = node.status()["counters"]["allowlist_reloads"]
        os.kill(node.proc.pid, signal.SIGHUP)   # type: ignore[union-attr]
        wait_for(lambda: node.status()["counters"]["allowlist_reloads"] > reloads, 10, "the reload")
        wsub = w.subscribe("", start=s1 + 1)
        s2 = w.publish("t/a", b"after revocation", timeout=10)
        assert drain(wsub, s2)[-1].payload == b"after revocation"      # the others carry on
        sniff.take(lambda f: outer_kind(f) == SEALED_BATCH and cbor2.loads(f[0])[4] >= s2, 10)
        # the victim keeps what it held; it opens nothing sealed after the rotation
        v.close()
        recv = v._bcast
        assert recv is not None and recv.key_epoch == key_epoch_before
        after = [f for f in sniff.frames if outer_kind(f) in (SEALED_BATCH, 35)]
        assert any(outer_kind(f) == SEALED_BATCH for f in after)
        for f in after:
            with pytest.raises(AuthenticationError):
                recv.open(f, now=time.monotonic())
        sniff.close()
    # its publishes and replays are refused: the handshake itself fails now
    st0 = node.status()["counters"]
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="victim", data=str(tmp_path / "plant-victim"),
                      security="ratchet", identity=str(keyring.dir / "victim.key"), pins=str(keyring.pins),
                      request_timeout_ms=300)
    with Plant(cfg) as v2:
        t = v2.publish_nowait("t/a", b"from a revoked plant")
        with pytest.raises(OrbcastTimeout):
            t.result(timeout=2)
        with pytest.raises(OrbcastTimeout):
            v2.replay(1, timeout=2)
    st = node.status()["counters"]
    assert st["auth_rejected"] > st0["auth_rejected"]
    assert node.status()["last_seq"] == s2          # nothing of the revoked plant was sequenced


def test_read_acl_applies_to_replay(tmp_path: Path, node_factory, keyring: Keyring) -> None:
    """A plant allowed to read x/ only gets x/ records from a replay of the
    whole log; a publish outside its publish prefixes is refused (forbidden)."""
    node = node_factory().start()
    with plant(keyring, node, tmp_path, "writer") as w:
        for i in range(20):
            w.publish("x/ok" if i % 2 else "y/private", b"%d" % i, timeout=10)
    with plant(keyring, node, tmp_path, "narrow", publish=["x/"], read=["x/"]) as n:
        got = list(n.replay(1))
        assert [m.topic for m in got] == ["x/ok"] * 10
        with pytest.raises(Exception) as ei:
            n.publish("y/not-mine", b"no", timeout=10)
        assert "may not publish" in str(ei.value)
        assert n.publish("x/mine", b"yes", timeout=10) == 21
    assert node.status()["counters"]["forbidden"] == 1


def test_a_narrow_reader_follows_the_live_stream_over_its_link(tmp_path: Path, node_factory,
                                                               keyring: Keyring) -> None:
    """The broadcast key opens every topic, so a plant allowed to read only x/
    never gets it; it still delivers every x/ message live, in order, once,
    and nothing else: the node filters what it sends over the plant's link."""
    node = node_factory().start()
    with plant(keyring, node, tmp_path, "writer") as w, \
            plant(keyring, node, tmp_path, "narrow", publish=[], read=["x/"]) as n:
        sub = n.subscribe("", start="now")
        first = w.publish("x/a", b"warm-up", timeout=10)
        wait_for(lambda: sub.tracker.next_seq is not None, 10, "the narrow plant to find the tail")
        want = publish_mixed(w, 300, 3)
        got = [m for m in drain(sub, want[-1]) if m.seq > first]
        assert [m.seq for m in got] == want and {m.topic for m in got} == {"x/a"}
        assert n._bcast is not None and n._bcast.key_epoch is None      # no group key
        assert n.counters["sender_keys"] == 0
        assert w._bcast is not None and w._bcast.key_epoch is not None  # the writer reads all


def test_one_forbidden_topic_does_not_fail_the_messages_packed_with_it(tmp_path: Path, node_factory,
                                                                      keyring: Keyring) -> None:
    """Publishes are coalesced into frames and the node refuses a frame as a whole:
    the plant then sends the frame's messages one by one, so only the message
    outside its publish prefixes fails; the others are sequenced, in order."""
    node = node_factory().start()
    with plant(keyring, node, tmp_path, "p", publish=["x/"], read=[]) as p:
        tickets = [p.publish_nowait("y/not-mine" if i == 50 else "x/ok", b"%d" % i) for i in range(100)]
        for i, t in enumerate(tickets):
            if i == 50:
                with pytest.raises(Exception) as ei:
                    t.result(timeout=10)
                assert "may not publish" in str(ei.value)
            else:
                t.result(timeout=10)
        seqs = [t.seq for i, t in enumerate(tickets) if i != 50]
        assert seqs == sorted(seqs) and len(set(seqs)) == 99 and p.outbox_depth == 0
        assert not p._solo                      # bounded: nothing left marked
    assert node.status()["counters"]["sequenced"] == 99


def test_a_reader_narrowed_while_running_keeps_delivering_its_topics(tmp_path: Path, node_factory,
                                                                     keyring: Keyring) -> None:
    """A plant that held the broadcast key is narrowed to x/ by a reload: the key
    rotates away from it, the node answers its KEY_REQUEST with "no-key", and it
    goes on delivering every x/ message (and no other) over its link."""
    node = node_factory().start()
    with plant(keyring, node, tmp_path, "writer") as w, plant(keyring, node, tmp_path, "r") as r:
        sub = r.subscribe("", start=1)
        s1 = w.publish("y/before", b"readable then", timeout=10)
        assert drain(sub, s1)[-1].topic == "y/before"
        keyring.plant("r", read=["x/"])          # reload over the control endpoint
        want_seqs = publish_mixed(w, 60, 2)
        got = drain(sub, want_seqs[-1])
        assert [m.seq for m in got] == want_seqs and {m.topic for m in got} == {"x/a"}
        assert r.counters.get("no_key", 0) >= 1
    assert node.status()["counters"]["key_rotations"] >= 2


def test_a_plant_cut_off_while_the_key_rotates_finds_its_way_back(tmp_path: Path, node_factory,
                                                                   keyring: Keyring) -> None:
    """A plant hears nothing for longer than the failover timeout while the active
    node rotates its broadcast key: it votes at the standby, where it can never
    open the active node's egress again with its old key. It must come back to
    the live active node (a new session, a new key) instead of staying stranded."""
    from tests.integration.test_failover import start_pair
    a, b = start_pair(node_factory)
    keyring.plant("z")                       # another reader, narrowed below to force a rotation
    with plant(keyring, [a, b], tmp_path, "r") as r:
        sub = r.subscribe("", start=1)
        s1 = r.publish("x/a", b"one", timeout=10)
        wait_for(lambda: r._bcast is not None and r._bcast.key_epoch is not None
                 and len(r._known_eps) > 1 and r._failover_s > 0, 10, "the key and the standby")
        cut = {"on": True}                   # fault injection: everything the plant receives is lost
        for name in ("_drain_sub", "_drain_dealer"):
            orig = getattr(r, name)

            def deaf(now: float, orig=orig, name=name) -> None:  # type: ignore[no-untyped-def]
                if not cut["on"]:
                    return orig(now)
                s = r._sub if name == "_drain_sub" else r._dealer
                try:
                    while True:
                        s.recv_multipart(zmq.NOBLOCK)
                except zmq.ZMQError:
                    return
            setattr(r, name, deaf)
        keyring.plants["z"] = (keyring.plants["z"][0], [""], ["x/"])
        keyring._write()
        a.admin("reload")                    # a rotates its key while r hears nothing
        wait_for(lambda: r._current_ep == b.ingress, 10, "the plant to vote at the standby")
        cut["on"] = False
        s2 = r.publish("x/a", b"after", timeout=20)
        assert s2 == s1 + 1
        assert [m.seq for m in drain(sub, s2)] == [s1, s2]
        wait_for(lambda: r._current_ep == a.ingress, 10, "the plant to be back at the active node")
        assert r.counters["sender_keys"] >= 2       # a new session, a new key
    assert a.status()["role"] == "active" and b.status()["role"] == "standby"


def test_bad_input_never_kills_the_node_nor_changes_its_sessions(tmp_path: Path, node_factory,
                                                                 keyring: Keyring) -> None:
    """Cleartext requests, garbage, unknown sessions, an unlisted key, a
    tampered and a replayed sealed frame: each gets ERROR auth and a count;
    the session they aimed at keeps working."""
    node = node_factory().start()
    good_key = keyring.plant("good", read=[])      # publish-only: no sender key in the replies
    stranger = generate_identity_file(tmp_path / "stranger", "id")[0]
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(node.ingress)

    def ask(frames: list[bytes]) -> list[bytes]:
        d.send_multipart(frames)
        assert d.poll(5000), "no answer"
        return d.recv_multipart()

    def auth_error(rep: list[bytes]) -> bool:
        ev = env.decode(rep)
        return isinstance(ev, env.Error) and ev.code == "auth"

    link = LinkClient(load_identity(good_key), "good", load_pins(keyring.pins), persist=lambda *_: None)
    link.on_keys(ask(link.hello(1)))
    rep = ask(link.seal(env.encode(env.Ping(rid=2))))
    assert outer_kind(rep) == SEALED_DOWN
    assert isinstance(env.decode(link.open(rep)[1]), env.Pong)
    sealed = link.seal(env.encode(env.Ping(rid=3)))
    bad: list[list[bytes]] = [
        env.encode(env.Publish(rid=9, producer="good", items=((1, "t", b"x"),))),   # cleartext
        env.encode(env.StatusRequest(rid=9)),
        [b"\xff\x00garbage", b"\x01"],
        [sealed[0][:-1] + bytes([sealed[0][-1] ^ 1]), sealed[1]],                  # another sid
        [sealed[0], sealed[1][:-1] + bytes([sealed[1][-1] ^ 1])],                  # tampered tag
        [sealed[0], sealed[1][:20]],                                               # truncated
    ]
    for frames in bad:
        assert auth_error(ask(frames)), frames
    rep = ask(sealed)                          # the untampered original still opens
    assert isinstance(env.decode(link.open(rep)[1]), env.Pong)
    assert auth_error(ask(sealed))             # ... once: a replay is refused
    unlisted = LinkClient(stranger, "good", load_pins(keyring.pins), persist=lambda *_: None)
    unlisted.on_keys(ask(unlisted.hello(1)))
    assert auth_error(ask(unlisted.seal(env.encode(env.Ping(rid=4)))))
    rep = ask(link.seal(env.encode(env.Ping(rid=5))))             # the real session carries on
    assert isinstance(env.decode(link.open(rep)[1]), env.Pong)
    # an authentic request that does not decode: a sealed ERROR naming its rid
    rep = ask(link.seal([cbor2.dumps([1, env.Kind.PUBLISH, 77]), b"\xff not a publish body"]))
    err = env.decode(link.open(rep)[1])
    assert isinstance(err, env.Error) and err.rid == 77 and err.code == "bad-frame"
    counters = node.status()["counters"]
    assert counters["auth_rejected"] >= 5 and counters["rejected_frames"] >= len(bad) + 2
    assert node.proc is not None and node.proc.alive()
    d.close(0)
    ctx.term()


def test_a_plant_refuses_a_node_it_has_not_pinned(tmp_path: Path, node_factory, keyring: Keyring) -> None:
    node = node_factory().start()
    key = keyring.plant("p")
    other = generate_identity_file(tmp_path / "impostor", "id")[0]
    pins = tmp_path / "wrong-pins.toml"
    pins.write_text(f'[[node]]\nname = "x"\nkey = "{other.public_text}"\n')
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="p", data=str(tmp_path / "plant-p"),
                      security="ratchet", identity=str(key), pins=str(pins), request_timeout_ms=300)
    with Plant(cfg) as p:
        t = p.publish_nowait("t/a", b"never sent to an unpinned node")
        with pytest.raises(OrbcastTimeout):
            t.result(timeout=1.5)
        assert p.counters["auth_failed"] >= 1 and p.counters["sealed_sent"] == 0
        assert p.outbox_depth == 1                  # kept, not lost
    assert node.status()["counters"]["sequenced"] == 0


def test_reload_command_and_a_broken_allowlist_keeps_the_old_one(tmp_path: Path, node_factory,
                                                                  keyring: Keyring) -> None:
    node = node_factory().start()
    with plant(keyring, node, tmp_path, "p") as p:
        assert p.publish("t/a", b"1", timeout=10) == 1
        keyring.allowlist.write_text("[[plant]]\nname = 'p'\nkey = 'not a key'\n")
        r = subprocess.run([PY, "-m", "sequencer", "reload", "--sequencer", node.control],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "reload-failed" in r.stderr and "traceback" not in r.stderr.lower()
        assert p.publish("t/a", b"2", timeout=10) == 2      # the old allowlist is in force
        keyring._write()
        r = subprocess.run([PY, "-m", "sequencer", "reload", "--sequencer", node.control],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert p.publish("t/a", b"3", timeout=10) == 3
    assert node.status()["counters"]["allowlist_reloads"] >= 1
    # operator commands on a secured ingress are refused, with the way out in the message
    r = subprocess.run([PY, "-m", "sequencer", "status", "--sequencer", node.ingress],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "control endpoint" in r.stderr and "Traceback" not in r.stderr


def test_sessions_survive_a_node_restart(tmp_path: Path, node_factory, keyring: Keyring) -> None:
    """The node restores its saved sessions: a plant goes on without a new handshake."""
    node = node_factory().start()
    with plant(keyring, node, tmp_path, "p") as p:
        assert p.publish("t/a", b"1", timeout=10) == 1
        node.kill9()
        node.start()
        assert p.publish("t/a", b"2", timeout=10) == 2
        assert p.counters["relinks"] == 0
    assert node.status()["counters"]["sessions_restored"] >= 1


def test_peer_link_admits_only_the_configured_node_key(tmp_path: Path, node_factory, keyring: Keyring) -> None:
    """CURVE on the peer link: a node whose peer_key names someone else never
    pairs; the refused connection is counted."""
    a = node_factory("a", env={"ORBCAST_SEQUENCER_FAULTS": "1"})
    b = node_factory("b", env={"ORBCAST_SEQUENCER_FAULTS": "1"})
    a.pair_with(b, "primary")
    b.pair_with(a, "standby")
    keyring.node("mallory")
    b.partner = type(a)(tmp_path, "mallory")     # b expects mallory's key, a presents its own
    a.start()
    b.start()
    wait_for(lambda: b.status()["counters"]["peer_auth_rejected"] >= 1, 20, "b to refuse a's key")
    assert b.status()["ha"]["peer"] is None                # b never heard a
    assert a.status()["ha"]["standby"] != "in-sync"
