"""Hot standby (issue 4): real processes, real kill -9.

Every test checks the invariants against the acks the publishers got and
against the log of the node that ends up active.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.invariants import InvariantViolation, check, check_log
from tests.integration.conftest import Node, plant_proc, read_out, wait_for

pytestmark = pytest.mark.timeout(600)


def start_pair(node_factory, tag: str = "", env: dict[str, str] | None = None) -> tuple[Node, Node]:
    env = {"ORBCAST_SEQUENCER_FAULTS": "1", **(env or {})}
    a = node_factory(f"a{tag}", env=dict(env))
    b = node_factory(f"b{tag}", env=dict(env))
    a.pair_with(b, "primary")
    b.pair_with(a, "standby")
    a.start()
    b.start()
    wait_for(lambda: a.status()["role"] == "active" and a.status()["ha"]["standby"] == "in-sync"
             and b.status()["role"] == "standby" and b.status()["ha"]["eligible"] is True,
             20, "the pair to come up in sync (and the standby to know it)")
    return a, b


def acks_of(tmp_path: Path, names: list[str]) -> dict[tuple[str, int], int]:
    acks: dict[tuple[str, int], int] = {}
    for n in names:
        out = read_out(tmp_path / f"{n}.out")
        assert out["F"], f"publisher {n} did not finish"
        for ps, s in out["K"]:
            assert acks.setdefault((n, ps), s) == s, f"{n}#{ps} acked with two seqs"
    return acks


def run_failover_round(tmp_path: Path, procs: list, node_factory, rnd: int, rng: random.Random) -> None:
    a, b = start_pair(node_factory, f"{rnd}")
    n_each = 4000
    pubs = [plant_proc(tmp_path, procs, "publisher", f"p{i}r{rnd}", [a, b], "--count", str(n_each),
                       "--batch", "64", "--rate", "2500") for i in range(2)]
    cons = [plant_proc(tmp_path, procs, "consumer", f"c{i}r{rnd}", [a, b],
                       "--count", str(2 * n_each), "--start", "1") for i in range(2)]
    kill_after = rng.randint(200, 3 * n_each // 2)
    wait_for(lambda: sum(len(read_out(tmp_path / f"p{i}r{rnd}.out")["K"]) for i in range(2)) >= kill_after,
             60, f"{kill_after} acks before the kill")
    a.kill9()
    acked_at_kill = sum(len(read_out(tmp_path / f"p{i}r{rnd}.out")["K"]) for i in range(2))
    assert acked_at_kill < 2 * n_each, "the kill came after the stream ended: nothing to fail over"
    for p in pubs + cons:
        assert p.wait(60) == 0, p.output()[-3000:]
    acks = acks_of(tmp_path, [f"p{i}r{rnd}" for i in range(2)])
    assert len(acks) == 2 * n_each
    deliveries = {f"c{i}": read_out(tmp_path / f"c{i}r{rnd}.out")["D"] for i in range(2)}
    check(deliveries, acks, start=1)                 # identical, gap-free, every ack, once
    st = b.status()
    assert st["role"] == "active" and st["epoch"] > 1, st
    if a.keyring is not None:     # the new leader really sealed: new sessions, its own sender key
        assert st["security"] == "ratchet" and st["counters"]["sender_keys_sent"] >= 2, st
    b.stop()
    where = check_log(b.records(), acks)
    assert len(where) == 2 * n_each                  # nothing sequenced twice
    for name, seq in deliveries.items():             # what was delivered is what the log holds
        log_by_seq = {s: (p, ps) for (p, ps), s in where.items()}
        for s, p, ps in seq:
            if log_by_seq.get(s) != (p, ps):
                raise InvariantViolation(f"{name} delivered seq {s} as {(p, ps)}, "
                                         f"the new leader's log has {log_by_seq.get(s)}")


@pytest.mark.parametrize("rnd", range(10))
def test_failover_under_load(tmp_path: Path, procs: list, node_factory, rnd: int) -> None:
    """2 publishing + 2 consuming plants; the primary is SIGKILLed at a random
    moment: every acked message is delivered exactly once by every consumer,
    no seq is reused, seqs are gap-free across the epoch change."""
    run_failover_round(tmp_path, procs, node_factory, rnd, random.Random(1000 + rnd))


@pytest.mark.parametrize("security", ["ratchet"], indirect=True)
@pytest.mark.parametrize("rnd", range(4))
def test_failover_under_load_with_link_security(tmp_path: Path, procs: list, node_factory, rnd: int,
                                                security: str) -> None:
    """The same invariants with link security on: after the kill every plant
    handshakes with the new active node (never reusing a session), gets its
    new sender key, and the peer link runs over CURVE with the node keys."""
    run_failover_round(tmp_path, procs, node_factory, rnd, random.Random(2000 + rnd))


@pytest.mark.soak
@pytest.mark.parametrize("rnd", range(50))
def test_failover_soak(tmp_path: Path, procs: list, node_factory, rnd: int) -> None:
    run_failover_round(tmp_path, procs, node_factory, rnd, random.Random(rnd))


@pytest.mark.soak
@pytest.mark.parametrize("security", ["ratchet"], indirect=True)
@pytest.mark.parametrize("rnd", range(50))
def test_failover_soak_with_link_security(tmp_path: Path, procs: list, node_factory, rnd: int,
                                          security: str) -> None:
    run_failover_round(tmp_path, procs, node_factory, rnd, random.Random(3000 + rnd))


def test_standby_killed_then_returns(tmp_path: Path, procs: list, node_factory) -> None:
    """The active node goes solo (degraded) after the grace period; the
    standby returns, resyncs, and becomes eligible again."""
    a, b = start_pair(node_factory)
    pub = plant_proc(tmp_path, procs, "publisher", "p", [a, b], "--count", "12000",
                     "--batch", "50", "--rate", "4000")
    wait_for(lambda: len(read_out(tmp_path / "p.out")["K"]) > 1000, 60, "acks")
    b.kill9()
    wait_for(lambda: a.status()["ha"]["standby"] == "solo", 20, "the active node to go solo")
    assert a.status()["ha"]["degraded"] is True
    n_solo = len(read_out(tmp_path / "p.out")["K"])
    wait_for(lambda: len(read_out(tmp_path / "p.out")["K"]) > n_solo + 500, 30, "acks while solo")
    b.start()
    wait_for(lambda: a.status()["ha"]["standby"] == "in-sync", 30, "the standby to resync")
    wait_for(lambda: b.status()["ha"]["eligible"] is True, 10, "the standby to be eligible")
    assert a.status()["ha"]["degraded"] is False
    assert pub.wait(120) == 0
    acks = acks_of(tmp_path, ["p"])
    wait_for(lambda: b.status()["last_seq"] == a.status()["last_seq"], 20, "the standby to catch up")
    a.stop()
    b.stop()
    check_log(a.records(), acks)
    check_log(b.records(), acks)       # the returned standby holds everything


def test_both_nodes_killed_then_restarted(tmp_path: Path, procs: list, node_factory) -> None:
    """kill -9 both nodes mid-stream, restart both: nothing acked is lost."""
    a, b = start_pair(node_factory)
    pubs = [plant_proc(tmp_path, procs, "publisher", f"p{i}", [a, b], "--count", "6000",
                       "--batch", "64") for i in range(2)]
    wait_for(lambda: len(read_out(tmp_path / "p0.out")["K"]) > 1500, 60, "acks before the crash")
    a.kill9()
    b.kill9()
    acked_before = {(f"p{i}", ps): s for i in range(2) for ps, s in read_out(tmp_path / f"p{i}.out")["K"]}
    b.start()
    a.start()
    for p in pubs:
        assert p.wait(180) == 0, p.output()[-3000:]
    acks = acks_of(tmp_path, ["p0", "p1"])
    assert all(acks[k] == v for k, v in acked_before.items())
    active = a if a.status()["role"] == "active" else b
    active.stop()
    (b if active is a else a).stop()
    assert len(check_log(active.records(), acks)) == 12000


def test_partition_between_nodes_does_not_promote(tmp_path: Path, procs: list, node_factory) -> None:
    """Cut the peer link while every plant still reaches the primary: the
    standby does not promote (no plant votes), the primary goes solo and keeps
    serving; no split brain."""
    from orbcast.envelope import Admin
    from orbcast.rpc import request
    a, b = start_pair(node_factory)
    pub = plant_proc(tmp_path, procs, "publisher", "p", [a, b], "--count", "8000",
                     "--batch", "50", "--rate", "2000")
    wait_for(lambda: len(read_out(tmp_path / "p.out")["K"]) > 500, 60, "acks")
    for n in (a, b):
        request(n.ingress, Admin(rid=1, command="fault-cut-peer", arg=1))
    wait_for(lambda: a.status()["ha"]["standby"] == "solo", 20, "the primary to go solo")
    # the standby's promotion window (solo_after) has now closed without a vote
    sb = b.status()
    assert sb["role"] == "standby" and sb["epoch"] == 0 and sb["ha"]["eligible"] is False, sb
    assert a.status()["role"] == "active" and a.status()["epoch"] == 1
    assert pub.wait(120) == 0
    acks = acks_of(tmp_path, ["p"])
    assert {s for s in acks.values()} == set(range(1, 8001))
    for n in (a, b):
        request(n.ingress, Admin(rid=2, command="fault-cut-peer", arg=0))
    wait_for(lambda: a.status()["ha"]["standby"] == "in-sync", 30, "resync after the partition")
    assert b.status()["role"] == "standby"


def test_old_primary_returns_with_unreplicated_tail(tmp_path: Path, procs: list, node_factory) -> None:
    """The primary writes records the standby never gets (peer link cut,
    require_standby so it stalls instead of acking), then dies. The standby
    takes over; the plants' resends are sequenced exactly once by it; the old
    primary comes back, sets its tail aside (never published) and rejoins."""
    from orbcast.envelope import Admin
    from orbcast.rpc import request
    env = {"ORBCAST_SEQUENCER_REQUIRE_STANDBY": "1", "ORBCAST_SEQUENCER_SOLO_AFTER_MS": "8000"}
    a, b = start_pair(node_factory, env=env)
    cons = plant_proc(tmp_path, procs, "consumer", "c", [a, b], "--count", "6000", "--start", "1")
    pub = plant_proc(tmp_path, procs, "publisher", "p", [a, b], "--count", "6000",
                     "--batch", "100", "--rate", "3000")
    wait_for(lambda: len(read_out(tmp_path / "p.out")["K"]) > 600, 60, "acks")
    request(a.ingress, Admin(rid=1, command="fault-cut-peer", arg=1))
    wait_for(lambda: a.status()["log_last_seq"] > b.status()["last_seq"] + 50, 20,
             "records the standby does not have")
    st = a.status()
    unreplicated = st["log_last_seq"] - b.status()["last_seq"]
    assert st["last_seq"] <= b.status()["last_seq"], "the primary published what the standby lacks"
    a.kill9()
    wait_for(lambda: b.status()["role"] == "active", 20, "the standby to take over")
    # require_standby: the new leader stalls (acks nothing) until it has a
    # standby again, so bring the old primary back now
    a.env.pop("ORBCAST_SEQUENCER_FAULTS", None)
    a.start()
    wait_for(lambda: a.status()["role"] == "standby" and b.status()["ha"]["standby"] == "in-sync",
             30, "the old primary to rejoin as standby")
    assert pub.wait(180) == 0, pub.output()[-3000:]
    assert cons.wait(180) == 0, cons.output()[-3000:]
    sa = a.status()
    assert sa["counters"]["tail_records_set_aside"] >= unreplicated > 0
    assert list((a.data / "log" / "aside").glob("*"))
    acks = acks_of(tmp_path, ["p"])
    check({"c": read_out(tmp_path / "c.out")["D"]}, acks, start=1)
    wait_for(lambda: a.status()["last_seq"] == b.status()["last_seq"], 20, "the rejoined node to catch up")
    b.stop()
    a.stop()
    where = check_log(b.records(), acks, accepted=list(acks))
    assert len(where) == 6000
    assert a.records() == b.records()      # the rejoined node holds the new leader's history


def test_site_power_cut_after_a_failover_the_newer_log_leads(tmp_path: Path, procs: list,
                                                               node_factory) -> None:
    """The primary dies, the standby takes over and acks more, then the whole
    site loses power (the new leader is killed too): both nodes remember being
    active. The old primary, back first, must not lead on a plant's vote (its
    log lacks what the new leader acked); once both are up they agree that
    the newer log leads (Appendix A.5: they used to wait for an operator).
    Every ack is in the final log once, and a consumer from seq 1 gets them all."""
    a, b = start_pair(node_factory)
    pub = plant_proc(tmp_path, procs, "publisher", "p", [a, b], "--count", "6000",
                     "--batch", "50", "--rate", "2000")
    wait_for(lambda: len(read_out(tmp_path / "p.out")["K"]) >= 800, 60, "acks before the first kill")
    a.kill9()
    wait_for(lambda: b.status()["role"] == "active", 20, "the standby to take over")
    n_failover = len(read_out(tmp_path / "p.out")["K"])
    wait_for(lambda: len(read_out(tmp_path / "p.out")["K"]) >= n_failover + 800, 60,
             "acks from the new leader")
    b.kill9()
    acked_before = dict(read_out(tmp_path / "p.out")["K"])
    a.start()
    # the publisher votes at a (b is gone): refused, the plant saw b's newer epoch
    wait_for(lambda: "newer than this node's last" in (a.status()["ha"].get("blocked") or ""),
             20, "the old primary to refuse the vote")
    assert a.status()["role"] == "starting"
    b.start()
    wait_for(lambda: b.status()["role"] == "active" and a.status()["role"] == "standby",
             30, "the newer log (b) to lead and a to follow")
    assert b.status()["epoch"] > 2
    cons = plant_proc(tmp_path, procs, "consumer", "c", [a, b], "--count", "6000", "--start", "1")
    assert pub.wait(180) == 0, pub.output()[-3000:]
    assert cons.wait(180) == 0, cons.output()[-3000:]
    acks = acks_of(tmp_path, ["p"])
    assert all(acks[("p", ps)] == s for ps, s in acked_before.items())
    check({"c": read_out(tmp_path / "c.out")["D"]}, acks, start=1)
    wait_for(lambda: a.status()["last_seq"] == b.status()["last_seq"], 20, "a to catch up")
    b.stop()
    a.stop()
    assert len(check_log(b.records(), acks)) == 6000
    assert a.records() == b.records()


def finish_on_the_standby(tmp_path: Path, pub, cons, b: Node) -> None:
    """Publisher ``p`` and consumer ``c`` finish; every ack delivered once, in
    order; ``b`` took over in a new epoch."""
    assert pub.wait(60) == 0, pub.output()[-3000:]
    assert cons.wait(60) == 0, cons.output()[-3000:]
    check({"c": read_out(tmp_path / "c.out")["D"]}, acks_of(tmp_path, ["p"]), start=1)
    st = b.status()
    assert st["role"] == "active" and st["epoch"] > 1, st


@pytest.mark.parametrize("security", ["none", "ratchet"], indirect=True)
def test_plant_starting_after_the_primary_died_finds_the_standby(tmp_path: Path, procs: list,
                                                                 node_factory, security: str) -> None:
    """A plant that starts (or first reaches the cluster) only after the
    primary died has never seen an active node. The standby answers "standby,
    my active is the primary"; the plant must vote there (not go back to the
    dead primary and wait on it forever), so the standby promotes and the
    plant's messages are acked and delivered."""
    a, b = start_pair(node_factory)
    a.kill9()
    pub = plant_proc(tmp_path, procs, "publisher", "p", [a, b], "--count", "300", "--batch", "30")
    cons = plant_proc(tmp_path, procs, "consumer", "c", [a, b], "--count", "300", "--start", "1")
    finish_on_the_standby(tmp_path, pub, cons, b)


def test_failover_when_plants_name_the_nodes_differently_than_the_nodes_do(
        tmp_path: Path, procs: list, node_factory) -> None:
    """Plants configured with ``localhost`` addresses while the nodes announce
    ``127.0.0.1``: each node is then known under two names. When the active
    node dies the first vote may go to its other name; a vote target that does
    not answer must not keep the plant (it used to stay there for ever, and
    the standby, never voted for, never promoted)."""
    from types import SimpleNamespace
    a, b = start_pair(node_factory)
    alias = [SimpleNamespace(ingress=n.ingress.replace("127.0.0.1", "localhost"), keyring=None)
             for n in (a, b)]
    pub = plant_proc(tmp_path, procs, "publisher", "p", alias, "--count", "3000", "--batch", "30",
                     "--rate", "1500")
    cons = plant_proc(tmp_path, procs, "consumer", "c", alias, "--count", "3000", "--start", "1")
    wait_for(lambda: len(read_out(tmp_path / "p.out")["K"]) >= 600, 60, "acks before the kill")
    a.kill9()
    finish_on_the_standby(tmp_path, pub, cons, b)


def test_a_standby_refuses_publishes_and_names_the_active_node(tmp_path: Path, node_factory) -> None:
    """PUBLISH to the standby: ``not-active``, nothing sequenced there, and the
    text says where the active node is -- or, when the peer is not active,
    what it is instead of calling it "the active node"."""
    from orbcast.envelope import Error, Publish
    from orbcast.rpc import request
    a, b = start_pair(node_factory)
    r = request(b.ingress, Publish(rid=7, producer="p", items=((1, "t", b"x"),)))
    assert type(r) is Error and r.code == "not-active" and r.rid == 7, r
    assert r.message.endswith(f"the active node is at {a.ingress}"), r.message
    assert b.status()["last_seq"] == 0
    a.stop()
    b.stop()
    c = node_factory("c")        # a booting primary whose peer is not there: starting
    d = node_factory("d")
    c.pair_with(d, "primary")
    d.pair_with(c, "primary")
    c.start()
    r = request(c.ingress, Publish(rid=8, producer="p", items=((1, "t", b"x"),)))
    assert type(r) is Error and r.code == "not-active", r
    assert "active node" not in r.message, r.message
    assert r.message.endswith("is starting; no peer known"), r.message
    # two fresh nodes both configured primary agree on one (they used to wait for
    # an operator, Appendix A.5): equal empty logs, so the smaller node id leads
    d.start()
    wait_for(lambda: c.status()["role"] == "active" and d.status()["role"] == "standby",
             20, "the two primaries to agree on one leader")
    assert c.data.name < d.data.name


def test_a_plant_claiming_a_huge_epoch_does_not_cut_the_standby_off(
        tmp_path: Path, node_factory) -> None:
    """One well-formed HELLO with epoch 2**63 - 1 sent to the standby (a fuzzing
    pass): the standby used to refuse every REPL of its active node from then
    on, the active went solo and acked messages lived on one node only. The
    standby keeps following, and what is acked after the HELLO is on both."""
    from orbcast.envelope import Ack, Hello, Publish
    from orbcast.rpc import request
    a, b = start_pair(node_factory)
    request(b.ingress, Hello(rid=1, client="fuzz", epoch=2**63 - 1))
    request(b.ingress, Hello(rid=2, client="fuzz", epoch=5))          # plausible: a floor only
    r = request(a.ingress, Publish(rid=3, producer="p", items=((1, "t", b"after"),)))
    assert type(r) is Ack and r.pairs == (1, 1), r
    wait_for(lambda: b.status()["log_last_seq"] == 1, 10, "the standby to hold the acked record")
    assert a.status()["ha"]["standby"] == "in-sync"
    assert b.status()["ha"]["max_epoch"] == a.status()["epoch"]
    a.stop()
    b.stop()
