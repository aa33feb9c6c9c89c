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
    R.PRIMARY: {I.PEER_BACKUP: R.ACTIVE, I.PEER_PASSIVE: R.ACTIVE, I.PEER_ACTIVE_NEWER: R.PASSIVE,
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
