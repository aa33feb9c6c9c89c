"""The HA role machine (sequencer/ha.py): every (state, input) pair, and
scenarios with literal ``now`` values."""

from __future__ import annotations

import itertools

import pytest

from sequencer.ha import HaCore, Input, ReplState, Role, TRANSITIONS, next_epoch, next_role

R, I = Role, Input

# The expected table, written out independently of ha.TRANSITIONS: for each
# state, the inputs that change it (every other input leaves it unchanged).
EXPECTED = {
    R.PRIMARY: {I.PEER_BACKUP: R.ACTIVE, I.PEER_PASSIVE: R.ACTIVE, I.PEER_PRIMARY_BEHIND: R.ACTIVE,
                I.PEER_ACTIVE_NEWER: R.PASSIVE,
                I.PEER_ACTIVE_OLDER: R.ACTIVE, I.VOTE: R.ACTIVE, I.PROMOTE: R.ACTIVE,
                I.DEMOTE: R.PASSIVE},
    R.BACKUP: {I.PEER_ACTIVE_NEWER: R.PASSIVE, I.PEER_ACTIVE_OLDER: R.PASSIVE,
               I.PROMOTE: R.ACTIVE, I.DEMOTE: R.PASSIVE},
    R.ACTIVE: {I.PEER_ACTIVE_NEWER: R.PASSIVE, I.DEMOTE: R.PASSIVE},
    R.PASSIVE: {I.VOTE: R.ACTIVE, I.PROMOTE: R.ACTIVE},
}


@pytest.mark.parametrize("state,inp", list(itertools.product(Role, Input)))
def test_every_state_input_pair(state: Role, inp: Input) -> None:
    assert next_role(state, inp) is EXPECTED[state].get(inp, state)


def test_table_has_no_entries_beyond_the_expected_ones() -> None:
    assert {(s, i): r for s, m in EXPECTED.items() for i, r in m.items()} == TRANSITIONS


def test_epochs_have_the_node_parity_and_grow() -> None:
    assert [next_epoch(0, 1), next_epoch(1, 1), next_epoch(1, 0), next_epoch(4, 0)] == [1, 3, 2, 6]
    for seen, parity in itertools.product(range(20), (0, 1)):
        e = next_epoch(seen, parity)
        assert e > seen and e % 2 == parity and e - seen <= 2


def core(role: Role = R.PASSIVE, **kw) -> HaCore:  # type: ignore[no-untyped-def]
    args = dict(role=role, epoch=0, parity=0, failover_s=0.5, solo_after_s=2.0,
                require_standby=False, has_peer=True, now=100.0)
    args.update(kw)
    return HaCore(**args)  # type: ignore[arg-type]


def hb(c: HaCore, role: str, epoch: int, now: float, *, last_seq: int = 0, in_sync: bool = True):  # type: ignore[no-untyped-def]
    return c.on_peer_heartbeat(node="peer", role=role, epoch=epoch, last_seq=last_seq,
                               in_sync=in_sync, ingress=None, egress=None, now=now)


def test_standby_promotes_on_vote_only_when_silent_in_sync_and_within_the_window() -> None:
    c = core()
    hb(c, "active", 1, 100.0)
    assert c.on_vote(1, 100.3) is None                  # active not silent yet
    assert c.role is R.PASSIVE
    assert c.on_vote(1, 100.6) is R.ACTIVE              # silent 0.6 s, told in sync, < 2 s
    assert c.epoch == 2 and c.epoch % 2 == 0            # standby parity


def test_standby_never_told_in_sync_is_not_eligible() -> None:
    c = core()
    hb(c, "active", 1, 100.0, in_sync=False)
    assert c.on_vote(1, 101.0) is None and c.role is R.PASSIVE


def test_standby_out_of_contact_past_solo_after_is_not_eligible() -> None:
    """After solo_after the active may have acked alone: promotion would lose data."""
    c = core()
    hb(c, "active", 1, 100.0)
    assert not c.eligible(102.0)
    assert c.on_vote(1, 102.0) is None and c.role is R.PASSIVE
    assert c.feed(I.PROMOTE, 102.1) is R.ACTIVE         # the operator may still decide


def test_active_steps_down_for_a_newer_epoch_and_ignores_an_older_one() -> None:
    c = core(R.ACTIVE, epoch=3, parity=1)
    assert hb(c, "active", 1, 100.0) is None and c.role is R.ACTIVE
    assert hb(c, "active", 4, 100.1) is R.PASSIVE


def test_booting_primary_goes_active_when_the_peer_is_a_standby() -> None:
    c = core(R.PRIMARY, parity=1, epoch=1)
    c.max_epoch = 1
    assert hb(c, "standby", 1, 100.0) is R.ACTIVE
    assert c.epoch == 3


def test_booting_primary_with_a_shorter_log_refuses_to_lead() -> None:
    c = core(R.PRIMARY, parity=1)
    c.own_last_seq = 10
    assert hb(c, "standby", 1, 100.0, last_seq=500) is None
    assert c.role is R.PRIMARY and c.blocked and "500" in c.blocked


def test_booting_primary_becomes_passive_under_a_newer_leader() -> None:
    c = core(R.PRIMARY, parity=1, epoch=1)
    assert hb(c, "active", 2, 100.0) is R.PASSIVE


def booting_primary(node_id: str, log_epoch: int, last_seq: int, parity: int = 1) -> HaCore:
    c = core(R.PRIMARY, parity=parity, epoch=log_epoch)
    c.max_epoch = log_epoch
    c.node_id, c.own_log_epoch, c.own_last_seq = node_id, log_epoch, last_seq
    return c


def heartbeat_of(c: HaCore) -> dict:  # type: ignore[type-arg]
    """What ``c``'s node says in its HA heartbeat, as the driver passes it on."""
    role = {R.PRIMARY: "primary", R.BACKUP: "backup", R.ACTIVE: "active",
            R.PASSIVE: "standby"}[c.role]
    return dict(node=c.node_id, role=role, epoch=c.epoch, last_seq=c.own_last_seq,
                in_sync=False, ingress=None, egress=None, log_epoch=c.own_log_epoch)


def hear(c: HaCore, other: HaCore | dict, now: float) -> Role | None:  # type: ignore[type-arg]
    """``c`` gets ``other``'s heartbeat (or one sent earlier)."""
    h = other if isinstance(other, dict) else heartbeat_of(other)
    return c.on_peer_heartbeat(now=now, **h)


def cross(a: HaCore, b: HaCore, now: float) -> None:
    """Heartbeats that crossed on the wire: each hears what the other said before."""
    ha, hb_ = heartbeat_of(a), heartbeat_of(b)
    hear(a, hb_, now)
    hear(b, ha, now)


@pytest.mark.parametrize("a_log,b_log,leader", [
    ((2, 900), (1, 950), "a-node"),     # newer epoch wins over a longer log of an older one
    ((1, 950), (2, 900), "b-node"),
    ((3, 950), (3, 900), "a-node"),     # same epoch: the longer log
    ((0, 0), (0, 0), "a-node"),         # two fresh nodes both configured primary: the id
    ((4, 10), (4, 10), "a-node"),       # full tie: the id
])
def test_two_booting_primaries_agree_that_the_newer_log_leads(
        a_log: tuple[int, int], b_log: tuple[int, int], leader: str) -> None:
    """Appendix A.5: both nodes were active when they stopped (or both are
    configured primary). They used to wait for an operator for ever."""
    a = booting_primary("a-node", *a_log)
    b = booting_primary("b-node", *b_log, parity=0)
    cross(a, b, 100.0)
    win, lose = (a, b) if leader == "a-node" else (b, a)
    assert win.role is R.ACTIVE and lose.role is R.PRIMARY, (a.role, b.role)
    assert win.epoch > max(a_log[0], b_log[0]) and win.epoch % 2 == win.parity
    assert hear(lose, win, 100.1) is R.PASSIVE        # and then follows its new epoch
    assert hear(win, lose, 100.2) is None and win.role is R.ACTIVE


def test_exactly_one_of_two_booting_primaries_leads_whatever_their_logs() -> None:
    logs = [(e, s) for e in (0, 1, 2, 5) for s in (0, 7, 8)]
    for (ea, sa), (eb, sb) in itertools.product(logs, logs):
        for ida, idb in (("n1", "n2"), ("n2", "n1")):
            a, b = booting_primary(ida, ea, sa), booting_primary(idb, eb, sb)
            assert a.leads_over(b.node_id, eb, sb) != b.leads_over(a.node_id, ea, sa)
            cross(a, b, 100.0)
            assert [a.role, b.role].count(R.ACTIVE) == 1
            newer = (ea, sa) > (eb, sb) or ((ea, sa) == (eb, sb) and ida < idb)
            assert (a.role is R.ACTIVE) == newer


def test_two_booting_primaries_with_the_same_id_wait_and_say_why() -> None:
    a, b = booting_primary("same", 1, 5), booting_primary("same", 1, 5)
    cross(a, b, 100.0)
    assert a.role is b.role is R.PRIMARY
    assert a.blocked and "node_id" in a.blocked


def test_log_epoch_is_the_epoch_of_the_newest_record() -> None:
    from sequencer.node import log_epoch
    history = [[1, 1], [3, 501], [4, 701]]
    assert [log_epoch(history, s) for s in (0, 1, 500, 501, 700, 701, 9000)] == [0, 1, 1, 3, 3, 4, 4]
    assert log_epoch([], 10) == 0
    assert log_epoch([(2, 1)], 0) == 0


def test_booting_primary_alone_refuses_a_vote_from_a_plant_that_saw_a_newer_leader() -> None:
    """The peer took over (epoch 2) after this node (epoch 1) stopped, acked
    records, then stopped too: leading on this node's older log would make
    the peer set those acked records aside when it returns."""
    c = core(R.PRIMARY, parity=1, epoch=1)
    assert c.on_vote(2, 101.0) is None and c.role is R.PRIMARY
    assert c.blocked and "epoch 2" in c.blocked
    assert c.check_vote(101.1) is None and c.role is R.PRIMARY    # not kept for later either
    assert c.on_vote(1, 101.2) is R.ACTIVE                       # a plant that saw only ours
    assert c.epoch == 3 and c.blocked is None


def test_booting_primary_alone_needs_a_vote() -> None:
    c = core(R.PRIMARY, parity=1)
    assert c.on_vote(0, 100.2) is None                  # peer not silent long enough yet
    assert c.on_vote(0, 100.6) is R.ACTIVE


def test_active_view_of_its_standby_syncing_in_sync_silent_solo() -> None:
    c = core(R.ACTIVE, parity=1, epoch=1)
    assert c.repl is ReplState.SYNCING and c.gate() == "local"
    hb(c, "standby", 0, 100.0)
    c.on_standby_ack(40, last_seq=50, now=100.0)
    c.tick(100.05, last_seq=50)
    assert c.repl is ReplState.SYNCING                  # not caught up yet
    c.on_standby_ack(50, last_seq=50, now=100.1)
    assert c.repl is ReplState.IN_SYNC and c.gate() == "standby" and not c.degraded
    c.tick(100.7, last_seq=60)                          # silent for 0.6 s
    assert c.repl is ReplState.SILENT and c.gate() == "standby"   # grace: still waiting
    c.tick(102.2, last_seq=60)                          # silent past solo_after
    assert c.repl is ReplState.SOLO and c.gate() == "local" and c.degraded
    c.on_standby_ack(55, last_seq=60, now=103.0)        # it is back: resync first
    assert c.repl is ReplState.SYNCING and c.degraded
    c.on_standby_ack(60, last_seq=60, now=103.1)
    assert c.repl is ReplState.IN_SYNC and not c.degraded


def test_require_standby_stalls_instead_of_going_solo() -> None:
    c = core(R.ACTIVE, parity=1, epoch=1, require_standby=True)
    assert c.gate() == "stall"
    hb(c, "standby", 0, 100.0)
    c.on_standby_ack(0, last_seq=0, now=100.0)
    assert c.gate() == "standby"
    c.tick(105.0, last_seq=0)
    assert c.repl is ReplState.SILENT and c.gate() == "standby"   # never solo


def test_single_node_is_always_local() -> None:
    c = core(R.ACTIVE, has_peer=False, epoch=1)
    c.tick(1000.0, last_seq=5)
    assert c.repl is ReplState.NONE and c.gate() == "local"


def test_standby_heartbeats_without_acks_do_not_keep_it_in_sync() -> None:
    """A link that fails only towards the standby: it still sends heartbeats
    but hears nothing and acks nothing. The active node must treat it as
    gone (and go solo after the grace), not wait for it forever."""
    c = core(R.ACTIVE, parity=1, epoch=1)
    hb(c, "standby", 0, 100.0)
    c.on_standby_ack(10, last_seq=10, now=100.0)
    assert c.repl is ReplState.IN_SYNC
    for k in range(1, 30):                 # heartbeats keep coming, acks do not
        hb(c, "standby", 0, 100.0 + k * 0.1)
        c.tick(100.0 + k * 0.1, last_seq=20)
    assert c.repl is ReplState.SOLO and c.gate() == "local"


def test_a_vote_slightly_early_is_kept_for_one_failover_period() -> None:
    """A plant may notice the silence a moment before the standby does: the
    vote is remembered and honoured once the standby's own guards pass."""
    c = core()
    hb(c, "active", 1, 100.0)
    assert c.on_vote(1, 100.45) is None                 # not silent for 0.5 s yet
    assert c.check_vote(100.48) is None                 # still not
    assert c.check_vote(100.55) is R.ACTIVE             # now it is: promote
    d = core()
    hb(d, "active", 1, 100.0)
    d.on_vote(1, 100.45)
    hb(d, "active", 1, 100.5)                           # the active node was only slow
    assert d.check_vote(100.9) is None and d.role is R.PASSIVE
    assert d.check_vote(101.2) is None and d.vote_until == 0.0   # the vote expired


def test_an_epoch_a_plant_claims_never_decides_whom_the_standby_follows() -> None:
    """A HELLO claiming epoch 2**63 - 1 (a fuzzing pass sent one to a standby) used
    to raise the standby's highest-seen epoch, and it refused every REPL of its
    active node below it: replication stopped and the active went solo. A plant's
    epoch is now only a floor for the next epoch this node takes (so plants never
    find it stale), and an implausible one is ignored."""
    c = core()
    hb(c, "active", 1, 100.0)
    c.hint_epoch(2**63 - 1)
    assert c.max_epoch == 1 and c.hinted_epoch == 0        # implausible: ignored
    c.hint_epoch(7)                                        # a leader this node never saw
    assert c.max_epoch == 1 and c.hinted_epoch == 7
    assert hb(c, "active", 1, 100.1) is None and c.role is R.PASSIVE   # still follows it
    assert c.on_vote(1, 100.6) is R.ACTIVE
    assert c.epoch == 8                                    # above what plants saw, even parity
