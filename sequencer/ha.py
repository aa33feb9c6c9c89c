"""Hot standby: the role state machine and the replication bookkeeping.

Sans-I/O (STYLE.md sections 1-2): literal ``now`` (monotonic seconds) in, a
role and decisions out. No sockets, clock, files or logging here.

Theory of operation
-------------------
Two nodes, each with a configured preference (``primary`` or ``standby``).
A node boots in PRIMARY or BACKUP (a node that was *active* when it stopped
boots as PRIMARY, one that was *passive* as BACKUP, whatever its config says:
there is no automatic fail-back). It becomes ACTIVE or PASSIVE from what it
hears from its peer (HA heartbeats every 100 ms), from plants (a plant that
cannot reach the active node says so: the Binary Star *vote*), or from the
operator (``sequencer promote`` / ``demote``).

``Input`` values and the transition table are below; an input that is not in
the table for a state leaves it unchanged. Guards that depend on time (is the
peer silent, is this standby eligible) are evaluated by :class:`HaCore`
before it feeds the table, so the table itself is a pure lookup.

Safety rules (docs/operations.md explains them for operators):

* **Epochs** are leadership terms. A node that becomes ACTIVE takes the
  smallest epoch above every epoch it has seen whose parity is its own
  (primary-preferring nodes odd, standby-preferring nodes even), so the two
  nodes can never pick the same epoch. Traffic from an older epoch is
  ignored by nodes and plants; an ACTIVE node that sees a newer active epoch
  steps down.
* **Promotion by vote** needs all of: the peer silent for ``failover_s``, a
  plant's vote, this node *eligible*: it was told "in sync" by the active
  node and has been out of contact for less than ``solo_after_s`` (after
  that, the active node may have gone solo and acked records this node does
  not hold, so it must resync before it can ever be promoted).
* **A booting primary alone** leads on a vote only if the voting plant saw no
  epoch newer than the last one this node led: a newer one means the peer
  took over after this node stopped, and its log is the one to continue.
* **Two booting primaries** (both nodes were active when they stopped, e.g.
  a power cut of the whole site after a failover, or both configured
  ``primary``): the node whose log is *newer* leads -- the higher epoch of
  the newest record, then the higher last seq, as in Raft's election rule,
  so the leader holds every record either side ever acked -- and on a full
  tie the node whose id sorts first. Both compute the same answer from each
  other's heartbeats; the other one waits and follows the leader's new epoch.
* **Solo mode**: an active node whose in-sync standby is silent for
  ``solo_after_s`` stops waiting for it (unless ``require_standby``) and is
  *degraded* until the standby has resynced.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Role", "Input", "TRANSITIONS", "next_role", "HaCore", "ReplState", "next_epoch"]


class Role(enum.Enum):
    PRIMARY = "primary"        # booting, prefers to be active
    BACKUP = "backup"          # booting, prefers to be passive
    ACTIVE = "active"          # sequencing
    PASSIVE = "standby"        # replicating from the active node

    @property
    def serving(self) -> bool:
        return self is Role.ACTIVE


class Input(enum.Enum):
    PEER_PRIMARY = "peer-primary"          # peer is booting as primary
    PEER_PRIMARY_BEHIND = "peer-primary-behind"  # ...and its log is behind ours (we lead)
    PEER_BACKUP = "peer-backup"            # peer is booting as backup
    PEER_ACTIVE_NEWER = "peer-active-newer"    # peer is active with a newer epoch than ours
    PEER_ACTIVE_OLDER = "peer-active-older"    # peer claims active with an older/equal epoch
    PEER_PASSIVE = "peer-passive"
    PEER_SILENT = "peer-silent"            # nothing from the peer for failover_s
    VOTE = "vote"                          # a plant says the active node is unreachable (guards passed)
    VOTE_REFUSED = "vote-refused"          # a vote arrived but the guards failed
    PROMOTE = "promote"                    # operator
    DEMOTE = "demote"                      # operator


R, I = Role, Input
#: (state, input) -> next state. Anything not listed: no change.
TRANSITIONS: dict[tuple[Role, Input], Role] = {
    (R.PRIMARY, I.PEER_BACKUP): R.ACTIVE,
    (R.PRIMARY, I.PEER_PRIMARY_BEHIND): R.ACTIVE,   # both booting as primaries: the newer log leads
    (R.PRIMARY, I.PEER_PASSIVE): R.ACTIVE,
    (R.PRIMARY, I.PEER_ACTIVE_NEWER): R.PASSIVE,
    (R.PRIMARY, I.PEER_ACTIVE_OLDER): R.ACTIVE,   # it will see our newer epoch and step down
    (R.PRIMARY, I.VOTE): R.ACTIVE,               # plants are here and the peer is silent
    (R.PRIMARY, I.PROMOTE): R.ACTIVE,
    (R.PRIMARY, I.DEMOTE): R.PASSIVE,
    (R.BACKUP, I.PEER_ACTIVE_NEWER): R.PASSIVE,
    (R.BACKUP, I.PEER_ACTIVE_OLDER): R.PASSIVE,
    (R.BACKUP, I.PROMOTE): R.ACTIVE,
    (R.BACKUP, I.DEMOTE): R.PASSIVE,
    (R.ACTIVE, I.PEER_ACTIVE_NEWER): R.PASSIVE,   # step down: a newer leader exists
    (R.ACTIVE, I.DEMOTE): R.PASSIVE,
    (R.PASSIVE, I.VOTE): R.ACTIVE,               # failover
    (R.PASSIVE, I.PROMOTE): R.ACTIVE,
}


def next_role(state: Role, inp: Input) -> Role:
    """The table lookup: the next role (unchanged if the pair is not listed)."""
    return TRANSITIONS.get((state, inp), state)


#: Epoch hints above this are not plausible (no pair fails over 2**62 times)
#: and would overflow the next epoch: ignored.
MAX_HINTED_EPOCH = 1 << 62


def next_epoch(seen: int, parity: int) -> int:
    """Smallest epoch > ``seen`` with ``epoch % 2 == parity``."""
    e = seen + 1
    return e if e % 2 == parity else e + 1


class ReplState(enum.Enum):
    """The active node's view of its standby."""

    NONE = "none"          # no peer configured: single node
    SYNCING = "syncing"    # standby connected, catching up from our log
    IN_SYNC = "in-sync"    # standby holds everything we acked; acks wait for it
    SILENT = "silent"      # in-sync standby went quiet; waiting out the grace
    SOLO = "solo"          # serving alone (degraded): standby must resync


@dataclass
class PeerView:
    node: str = ""
    role: str = ""
    epoch: int = 0
    last_seq: int = 0
    heard: float = -1.0
    ingress: str | None = None
    egress: str | None = None
    in_sync: bool = False


class HaCore:
    """Role, epoch and replication state of one node of a pair."""

    def __init__(self, *, role: Role, epoch: int, parity: int, failover_s: float,
                 solo_after_s: float, require_standby: bool, has_peer: bool, now: float) -> None:
        self.role = role
        self.epoch = epoch
        self.max_epoch = epoch
        #: The highest epoch plants said they saw (HELLO ``epoch``, votes). Only a
        #: floor for the next epoch this node takes, so plants never find it stale;
        #: never what decides whom a standby follows: a plant's word is not
        #: authenticated, and one HELLO claiming a huge epoch cut a standby off from
        #: its active node (it refused every REPL below it).
        self.hinted_epoch = 0
        self.parity = parity
        self.failover_s = failover_s
        self.solo_after_s = solo_after_s
        self.require_standby = require_standby
        self.has_peer = has_peer
        self.peer = PeerView()
        self.started = now
        self.told_in_sync = False     # passive: the active's last word on us
        self.repl = ReplState.SYNCING if has_peer else ReplState.NONE
        self.standby_acked = 0        # active: standby holds everything <= this
        self.standby_heard_ack = False  # active: the standby acked in this epoch
        self.ack_heard = -1.0           # active: when the standby's last ack arrived
        self.degraded = False
        self.transitions: list[tuple[float, Role, Input, Role]] = []
        #: our log's newest seq (the driver keeps it current)
        self.own_last_seq = 0
        #: the epoch of our log's newest record, 0 for an empty log (the driver sets it)
        self.own_log_epoch = 0
        #: this node's id: breaks a tie between two booting primaries (the driver sets it)
        self.node_id = ""
        #: why a booting node refuses to become active, for status
        self.blocked: str | None = None
        #: a refused vote stays valid until then (see check_vote)
        self.vote_until = 0.0

    # --- time guards -----------------------------------------------------------

    def peer_silent(self, now: float) -> bool:
        ref = self.peer.heard if self.peer.heard >= 0 else self.started
        return now - ref >= self.failover_s

    def eligible(self, now: float) -> bool:
        """May this passive node be promoted by a vote right now?"""
        ref = self.peer.heard if self.peer.heard >= 0 else self.started
        return self.told_in_sync and now - ref < self.solo_after_s

    # --- inputs --------------------------------------------------------------------

    def feed(self, inp: Input, now: float) -> Role | None:
        """Apply an input; returns the new role if it changed."""
        new = next_role(self.role, inp)
        if new is self.role:
            return None
        old = self.role
        self.role = new
        self.transitions.append((now, old, inp, new))
        if new is not Role.PRIMARY:
            self.blocked = None           # no longer booting: nothing is being refused
        if new is Role.ACTIVE:
            self.epoch = next_epoch(max(self.max_epoch, self.hinted_epoch), self.parity)
            self.max_epoch = self.epoch
            self.repl = ReplState.SYNCING if self.has_peer else ReplState.NONE
            self.standby_acked = 0
            self.standby_heard_ack = False
            self.degraded = self.has_peer
        elif new is Role.PASSIVE:
            self.told_in_sync = False
        return new

    def leads_over(self, peer_node: str, peer_log_epoch: int, peer_last_seq: int) -> bool:
        """Between two booting primaries: is our log the one to continue?
        Newer newest-record epoch, then longer log, then the smaller node id.
        A strict order, so exactly one of two nodes with distinct ids says yes."""
        mine = (self.own_log_epoch, self.own_last_seq)
        theirs = (peer_log_epoch, peer_last_seq)
        if mine != theirs:
            return mine > theirs
        return bool(self.node_id) and self.node_id < peer_node

    def on_peer_heartbeat(self, *, node: str, role: str, epoch: int, last_seq: int,
                          in_sync: bool, ingress: str | None, egress: str | None,
                          now: float, log_epoch: int = 0) -> Role | None:
        """An HA heartbeat (or any peer message) arrived. ``log_epoch`` is the
        epoch of the peer's newest record (from the history it sends)."""
        p = self.peer
        p.node, p.role, p.epoch, p.last_seq, p.heard = node, role, epoch, last_seq, now
        p.ingress, p.egress, p.in_sync = ingress, egress, in_sync
        if epoch > self.max_epoch:
            self.max_epoch = epoch
        if role == Role.ACTIVE.value:
            if self.role is Role.PASSIVE:
                self.told_in_sync = in_sync
            newer = epoch > self.epoch or (self.role is not Role.ACTIVE and epoch >= self.epoch)
            return self.feed(Input.PEER_ACTIVE_NEWER if newer else Input.PEER_ACTIVE_OLDER, now)
        # (an active node's view of its standby changes only with its acks:
        # a heartbeat proves the standby is alive, not that it holds our records)
        inp = {Role.PRIMARY.value: Input.PEER_PRIMARY, Role.BACKUP.value: Input.PEER_BACKUP,
               Role.PASSIVE.value: Input.PEER_PASSIVE}.get(role)
        if (inp in (Input.PEER_BACKUP, Input.PEER_PASSIVE) and self.role is Role.PRIMARY
                and last_seq > self.own_last_seq):
            # the peer holds more of the log than we do (our disk was replaced
            # or restored from an old backup): leading now would make it set
            # its records aside. Wait for the operator to promote the peer.
            self.blocked = (f"peer {node} holds seqs up to {last_seq}, this node only "
                            f"{self.own_last_seq}: promote the peer instead")
            return None
        if inp is Input.PEER_PRIMARY and self.role is Role.PRIMARY:
            if self.leads_over(node, log_epoch, last_seq):
                inp = Input.PEER_PRIMARY_BEHIND
            elif node == self.node_id:
                self.blocked = (f"the peer has this node's id {node!r} and the same log: "
                                "give the nodes distinct node_id values")
                return None
        self.blocked = None
        return self.feed(inp, now) if inp else None

    def hint_epoch(self, epoch: int) -> None:
        """A plant says it saw ``epoch`` (see :attr:`hinted_epoch`)."""
        if self.hinted_epoch < epoch <= MAX_HINTED_EPOCH:
            self.hinted_epoch = epoch

    def on_vote(self, epoch_seen: int, now: float) -> Role | None:
        """A plant reports the active node unreachable (it saw ``epoch_seen``)."""
        self.hint_epoch(epoch_seen)
        if self.role is Role.PRIMARY and epoch_seen > self.epoch:
            # The plant saw a leader newer than any this node led: the peer took
            # over after this node stopped and may hold acked records this log
            # lacks. Leading now would make the peer set them aside when it returns.
            self.blocked = (f"a plant saw epoch {epoch_seen}, newer than this node's last "
                            f"({self.epoch}): the peer led since and may hold acked records "
                            "this node lacks; start the peer, or promote this node to accept "
                            "their loss")
            return self.feed(Input.VOTE_REFUSED, now)
        if self.role is Role.PASSIVE:
            ok = self.peer_silent(now) and self.eligible(now)
        elif self.role is Role.PRIMARY:
            ok = self.peer_silent(now)
        else:
            ok = False
        if not ok and self.role in (Role.PASSIVE, Role.PRIMARY):
            # a plant already lost the active node, we have not yet: keep the
            # vote for one failover period instead of making it vote again
            self.vote_until = now + self.failover_s
        return self.feed(Input.VOTE if ok else Input.VOTE_REFUSED, now)

    def check_vote(self, now: float) -> Role | None:
        """Timer: honour a vote that arrived a moment before the peer's
        silence reached ``failover_s`` (all guards are checked again)."""
        if self.vote_until and now <= self.vote_until:
            if self.role is Role.PASSIVE and self.peer_silent(now) and self.eligible(now) \
                    or self.role is Role.PRIMARY and self.peer_silent(now):
                self.vote_until = 0.0
                return self.feed(Input.VOTE, now)
        elif self.vote_until:
            self.vote_until = 0.0
        return None

    def tick(self, now: float, *, last_seq: int) -> None:
        """Timers: the active node's view of its standby."""
        if self.role is not Role.ACTIVE or not self.has_peer:
            return
        # the standby counts as there only while its *acks* arrive: heartbeats
        # alone would hide a link that fails in our direction only (it would
        # hear nothing, ack nothing, and we would wait for it forever)
        ref = self.ack_heard if self.ack_heard >= 0 else self.started
        silent = now - ref >= self.failover_s
        if self.repl is ReplState.IN_SYNC and silent:
            self.repl = ReplState.SILENT
        if self.repl is ReplState.SILENT:
            if not silent:
                self.repl = ReplState.IN_SYNC
            elif now - ref >= self.solo_after_s and not self.require_standby:
                self.repl = ReplState.SOLO
                self.degraded = True
        if (self.repl is ReplState.SYNCING and self.standby_heard_ack
                and self.standby_acked >= last_seq and not silent):
            self.repl = ReplState.IN_SYNC
            self.degraded = False

    def on_standby_ack(self, acked: int, *, last_seq: int, now: float) -> None:
        """The standby durably holds everything up to ``acked``."""
        self.peer.heard = now
        self.ack_heard = now
        self.standby_acked = acked
        self.standby_heard_ack = True
        if self.repl in (ReplState.SILENT,):
            self.repl = ReplState.IN_SYNC
        if self.repl is ReplState.SOLO:
            self.repl = ReplState.SYNCING
        if self.repl is ReplState.SYNCING and acked >= last_seq:
            self.repl = ReplState.IN_SYNC
            self.degraded = False

    def gate(self) -> str:
        """How acks and egress are released: ``"local"`` (after our fsync),
        ``"standby"`` (after our fsync and the standby's ack), or ``"stall"``
        (not at all: ``require_standby`` and no in-sync standby)."""
        if self.repl is ReplState.NONE:
            return "local"
        if self.repl in (ReplState.IN_SYNC, ReplState.SILENT):
            return "standby"
        return "stall" if self.require_standby else "local"
