"""The sequencer driver: sockets, clock, disk and logging around the cores.

One thread, one loop (STYLE.md section 1)::

    poll(ingress, peer, timeout = next deadline)
    drain up to max_drain ingress frames      -> core.publish / replays / control
    drain the peer link                       -> replication, HA heartbeats
    append unwritten records to the log; send them to the standby; fsync
    core.durable(release point)                -> egress batches, then acks
    pump replay chunks (bounded per turn)
    heartbeats, HA timers, dedup snapshot, replay expiry when due

The release point is our own fsync, or with an in-sync standby the lower of
our fsync and the standby's ack (sequencer/ha.py decides which). Bad input
from a peer is answered with an ERROR frame, counted and logged at most once
a second; it never raises out of the loop. A failed durable write
(:class:`~orbcast.errors.DurabilityError`) stops the node loudly: it must
not keep acking what it cannot keep.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from orbcast import envelope as env
from orbcast import strictcbor
from orbcast.config import SequencerConfig
from orbcast.envelope import (Admin, Cancel, Credit, Error, Heartbeat, Hello, Ping, Pong, Publish,
                              ReplayRequest, StatusReply, StatusRequest, Welcome)
from orbcast.errors import (AuthenticationError, DurabilityError, LocalProtocolError, LogCorruptedError,
                            RemoteProtocolError)
from orbcast.fsutil import fsync_dir
from orbcast.sdnotify import Notifier

from . import peer as peerlink
from .core import DedupTable, SequencerCore
from .ha import HaCore, Input, ReplState, Role
from .log import LogStore

if TYPE_CHECKING:    # link security is imported only when it is on: `cryptography`
    from orbcast.link import Peer    # costs a node ~15 MB of RSS, a lot on a Pi
    from .security import NodeSecurity

__all__ = ["SequencerNode", "run"]

log = logging.getLogger("orbcast.sequencer")

#: Hard cap ZeroMQ enforces before we see a frame (it disconnects the peer):
#: far above MAX_BODY_BYTES so ordinary oversized frames still reach us and
#: get a proper "too-large" error reply, but bounded so nobody can make us
#: allocate gigabytes.
ZMQ_MAXMSGSIZE = 8 * env.MAX_BODY_BYTES
#: Replay chunks cut per loop turn, so replays never starve publishing.
REPLAY_CHUNKS_PER_TURN = 8
#: Write the dedup snapshot after this many new records (and at a clean stop).
#: Not by time: at a sensor fleet's rates a timer rewrote megabytes of runs to
#: the SD card every 30 s, while the log records a restart replays into the
#: table are at most this many (well under a second on a Pi 4).
DEDUP_SNAPSHOT_RECORDS = 200_000
#: Ingress receive high-water mark: frames ZeroMQ queues per connection before
#: it stops reading that connection (TCP pushes back on the sender). A plant
#: keeps at most 16 PUBLISH frames (MAX_INFLIGHT_FRAMES) and a few requests in
#: flight; a sender that ignores that -- a buggy client pipelining without acks
#: -- could otherwise park 10,000 frames of up to 1 MiB in the node (measured:
#: 3.4 GB after 15 s). 64 frames bound it to 64 MiB per connection.
INGRESS_HWM = 64
#: Records sent to the standby and not yet acked, at most (bounds what the
#: peer link buffers while a standby catches up).
REPL_WINDOW = 65_536
#: Records per REPL frame.
REPL_CHUNK = 4096
#: If the standby's ack does not move for this long while records are
#: outstanding, resend from its last ack (a frame was lost on the link).
REPL_REWIND_S = 0.5

#: Records sequenced per loop turn at most: a turn must stay short (well
#: under the heartbeat period) so heartbeats, peer traffic and votes are
#: never starved by a flood of publishes, and so memory per turn is bounded.
MAX_TURN_RECORDS = 8192
#: Replication frames a standby appends per loop turn before it fsyncs and acks.
MAX_TURN_REPL_FRAMES = 1
#: Log searches (protocol.md 5.2) one PUBLISH frame may cause; beyond, the frame is
#: refused (too-old) and its plant sends the messages one per frame. Each search
#: reads the retained log: a frame of 2,048 such pairs must not read it 2,048 times.
MAX_SEARCHES_PER_FRAME = 4
#: Retention postponed (records not durable yet): try again after this long.
RETENTION_RETRY_S = 60.0
#: How often the node deletes segments older than retention_days.
RETENTION_EVERY_S = 3600.0

_NS = 1_000_000_000
#: CPython's cyclic GC thresholds for a node process (set by :func:`run`, not
#: by the class, which may share a process). The hot path allocates a few
#: GC-tracked objects per message (decoded items, records in flight) and
#: creates next to no reference cycles, yet the default gen0 threshold of 700
#: ran a collection every few hundred messages: ~10 % of the node's CPU in
#: bench orb-64. Young objects now wait for at most 50,000 allocations.
GC_THRESHOLDS = (50_000, 20, 100)


class SequencerNode:
    """One sequencer node, alone or one of a primary/standby pair.
    ``run()`` blocks until :meth:`stop`."""

    def __init__(self, cfg: SequencerConfig, *, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.data = Path(cfg.data)
        self.data.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self._started_ns = time.time_ns()
        self._frame_searches = 0
        self._stop = False
        self.counters: dict[str, float] = {
            "sequenced": 0, "duplicates": 0, "rejected_frames": 0, "replayed_records": 0,
            "fsyncs": 0, "fsync_seconds": 0.0, "fsync_max_ms": 0.0, "egress_batches": 0,
            "egress_dropped_injected": 0, "acks": 0, "dedup_log_lookups": 0, "dedup_too_old": 0,
            "dedup_snapshot_failures": 0,
            "replicated_records": 0, "repl_acks": 0, "peer_rejected": 0, "role_changes": 0,
            "tail_records_set_aside": 0, "max_turn_ms": 0.0,
        }
        # link security (docs/security.md): None means security = "none"
        self.sec: NodeSecurity | None = None
        if cfg.security == "ratchet":
            from orbcast import link as _link
            from .security import NodeSecurity
            self._L = _link
            self.sec = NodeSecurity(cfg, self.data, self.counters)
        self._out: list[list[bytes]] = []      # sealed ingress frames, sent after the state is durable
        self._peer: Peer | None = None         # who sent the request being handled (sealed)
        self._reload_requested = False
        self._sec_gc_at = 0.0
        self._keys_queued = False              # a SENDER_KEY waits in _out
        self._durability_failed = False
        # retention waits until the dedup table is loaded and snapshotted (_apply_retention)
        self.log = LogStore(self.data / "log", retention_days=cfg.retention_days, fsync=cfg.fsync,
                            retention_at_open=False)
        for p in self.log.torn_tails:
            log.warning("recovered a torn log tail; the cut bytes were kept in %s", p)
        # after a kill -9 the tail (and a new segment's directory entry) may be in
        # the page cache only: make it durable before we ack resends of it as duplicates
        self.log.sync_recovered()
        self._retention_at = time.monotonic() + RETENTION_EVERY_S
        self.state = self._load_state()
        self.dedup = self._load_dedup()
        now = time.monotonic()
        has_peer = bool(cfg.peer_connect)
        if not has_peer:
            role = Role.ACTIVE
        elif self.state.get("role") == "active":
            role = Role.PRIMARY
        elif self.state.get("role") == "standby":
            role = Role.BACKUP
        else:
            role = Role.PRIMARY if cfg.role == "primary" else Role.BACKUP
        self.ha = HaCore(role=role, epoch=self.state["epoch"], parity=1 if cfg.role == "primary" else 0,
                         failover_s=cfg.failover_ms / 1000, solo_after_s=cfg.solo_after_ms / 1000,
                         require_standby=cfg.require_standby, has_peer=has_peer, now=now)
        self.ha.max_epoch = max(self.state["epoch"], self.state.get("max_epoch", 0))
        self.ha.node_id = cfg.node_id
        self.core: SequencerCore | None = None
        if role is Role.ACTIVE:
            self._become_active(now, announce=False)
        self._synced_epoch = 0          # passive: log checked against this active epoch
        self._repl_next = 0             # active: next seq to send to the standby
        self._repl_progress = now
        self._synced_upto = self.log.last_seq
        self._apply_retention(time.time_ns())   # before any socket is bound: nothing to leak
        from .replay import ReplayManager
        # leave room for the chunk's array head and the envelope under MAX_BODY_BYTES
        self.replays = ReplayManager(max_sessions=cfg.max_replays,
                                     chunk_bytes=min(cfg.replay_chunk_bytes, env.MAX_BODY_BYTES - 65536),
                                     idle_s=cfg.replay_idle_s)
        self._ctx = ctx or zmq.Context.instance()
        self.ingress = self._ctx.socket(zmq.ROUTER)
        self.ingress.setsockopt(zmq.LINGER, 0)
        self.ingress.setsockopt(zmq.MAXMSGSIZE, ZMQ_MAXMSGSIZE)
        self.ingress.setsockopt(zmq.RCVHWM, INGRESS_HWM)
        self.egress = self._ctx.socket(zmq.PUB)
        self.egress.setsockopt(zmq.LINGER, 0)
        self.egress.setsockopt(zmq.SNDHWM, cfg.egress_hwm)
        self.ingress.bind(cfg.ingress)
        self.egress.bind(cfg.egress)
        self.peer_in: zmq.Socket | None = None
        self.peer_out: zmq.Socket | None = None
        if has_peer:
            self.peer_in = self._ctx.socket(zmq.ROUTER)
            self.peer_in.setsockopt(zmq.LINGER, 0)
            self.peer_in.setsockopt(zmq.MAXMSGSIZE, ZMQ_MAXMSGSIZE)
            self.peer_out = self._ctx.socket(zmq.DEALER)
            self.peer_out.setsockopt(zmq.LINGER, 0)
            self.peer_out.setsockopt(zmq.IMMEDIATE, 1)
            self.peer_out.setsockopt(zmq.SNDHWM, 64)
            self.peer_out.setsockopt(zmq.RECONNECT_IVL, 50)
            self.peer_out.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
            if self.sec is not None:
                self.sec.secure_peer(self._ctx, self.peer_in, self.peer_out)
            self.peer_in.bind(cfg.peer)
            self.peer_out.connect(cfg.peer_connect)
        self.control: zmq.Socket | None = None
        if cfg.control:
            self.control = self._ctx.socket(zmq.ROUTER)
            self.control.setsockopt(zmq.LINGER, 0)
            self.control.setsockopt(zmq.MAXMSGSIZE, 65536)
            self.control.bind(cfg.control)
        self.fault_cut_peer = False
        self._repl_damage_logged = False   # log a damaged segment once, not per turn
        self._blocked_logged: str | None = None
        self._snap_seq = self.log.last_seq
        self._last_reject_log = 0.0
        self._rng = random.Random()
        self.notifier = Notifier.from_env()
        log.info("node %s up as %s: ingress %s egress %s%s, epoch %d, log %d..%d%s",
                 cfg.node_id, self.ha.role.value, cfg.ingress, cfg.egress,
                 f" peer {cfg.peer} -> {cfg.peer_connect}" if has_peer else "",
                 self.ha.epoch, self.log.first_seq, self.log.last_seq,
                 "" if cfg.fsync else " (fsync OFF)")
        if cfg.security == "none":
            log.warning("link security is OFF (security = \"none\"): loopback only, "
                        "anyone on this host can publish and read")

    # --- persistent node state ------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        p = self.data / "node-state.json"
        if p.exists():
            try:
                st = json.loads(p.read_text())
                st["epoch"] = int(st["epoch"])
                st["epochs"] = [[int(e), int(s)] for e, s in st.get("epochs", [])]
                return st
            except (ValueError, KeyError, TypeError):
                raise DurabilityError(f"{p} is damaged; it holds the leadership epoch "
                                      "and history and must not be guessed") from None
        return {"epoch": 0, "max_epoch": 0, "role": None, "epochs": []}

    def _save_state(self) -> None:
        self.state["epoch"] = self.ha.epoch
        self.state["max_epoch"] = self.ha.max_epoch
        self.state["role"] = "active" if self.ha.role is Role.ACTIVE else (
            "standby" if self.ha.role is Role.PASSIVE else self.state.get("role"))
        _atomic_write(self.data / "node-state.json", json.dumps(self.state).encode())

    def _load_dedup(self) -> DedupTable:
        """Snapshot + the log records after it (no time window, survives restarts)."""
        p = self.data / "dedup.snapshot"
        table, covered = DedupTable(), 0
        legacy = False
        if p.exists():
            try:
                table, covered = DedupTable.restore(p.read_bytes())
            except ValueError as exc:
                log.warning("ignoring dedup snapshot %s (%s); rebuilding from the log", p, exc)
                table, covered = DedupTable(), 0
            if covered > self.log.last_seq:   # log was cut back: rebuild
                table, covered = DedupTable(), 0
            elif table.max_seq() > self.log.last_seq:
                # pairs of records the log does not hold (a snapshot written by an
                # older version after a failed write): not to be trusted
                log.warning("ignoring dedup snapshot %s: it names seq %d, the log ends at %d; "
                            "rebuilding from the log", p, table.max_seq(), self.log.last_seq)
                table, covered = DedupTable(), 0
            elif covered + 1 < self.log.first_seq:
                # retention removed records the snapshot never saw: their pairs would
                # look like holes between the snapshot's runs and the log's, and be
                # sequenced again. The log alone gives a table that knows what it lacks.
                log.warning("ignoring dedup snapshot %s: it covers seqs up to %d, and retention "
                            "removed the log before seq %d; rebuilding from the log (resends of "
                            "older messages will be refused with too-old)", p, covered,
                            self.log.first_seq)
                table, covered = DedupTable(), 0
            elif table.known_from == 0:          # written before the field existed
                table.known_from = max(1, self.log.first_seq)
                legacy = True
        if covered == 0:
            table.known_from = self.log.first_seq    # 0 for an empty log: set at its first record
        start = max(covered + 1, self.log.first_seq or 1)
        n = 0
        if self.log.last_seq >= start:
            for seq, _t, body in self.log.iter_records(start):
                m = env.decode_record(body)
                table.record(m.producer, m.producer_seq, seq)
                n += 1
        if n:
            log.info("dedup table rebuilt from %d log records after seq %d", n, covered)
        if (covered == 0 or legacy) and self.log.first_seq > 1:
            # learned from a log retention had cut: these producers may have older pairs
            table.partial = set(table.producers())
        return table

    def _snapshot_dedup(self) -> int | None:
        """Write the snapshot; return the seq it covers, 0 if not written now (seqs
        assigned but not yet durable: try later), None if the write failed."""
        upto = self.core.durable_seq if self.core else self._synced_upto
        # The table learns a pair when its seq is assigned, before the record is
        # written. Saved while a record is not yet in the fsynced log (after a
        # failed write: the clean stop that follows a full disk), a restart would
        # take the pair for a duplicate of a record that does not exist, and ack a
        # resend with a seq the log then gives to another message.
        assigned = self.core.last_seq if self.core else self.log.last_seq
        if assigned > self._synced_upto:
            log.warning("dedup snapshot not written: seqs up to %d are assigned but only %d "
                        "are durable (the log is rebuilt into the table at start)",
                        assigned, self._synced_upto)
            return 0
        self._snap_seq = upto                 # (on failure too: retried after as many records)
        try:
            _atomic_write(self.data / "dedup.snapshot", self.dedup.snapshot(upto))
        except OSError as exc:
            # Derived data: the node needs it only to start faster. A full disk must
            # not stop a node whose log writes still succeed; keep the old snapshot.
            self.counters["dedup_snapshot_failures"] += 1
            log.warning("dedup snapshot not written (%s); the previous one and the log "
                        "rebuild the table at start", exc)
            (self.data / "dedup.snapshot.tmp").unlink(missing_ok=True)
            return None
        return upto

    def _old_lookup(self, pid: str, pseq: int) -> int | None:
        """The seq of a pair below everything the dedup table remembers of ``pid``,
        ``None`` if it was never sequenced; ``too-old`` if that cannot be known.

        A pair below the producer's floor was evicted from memory and is searched in
        the log's bytes (``LogStore.find``: about a read of the retained log, counted
        in ``dedup_log_lookups``; at most MAX_SEARCHES_PER_FRAME per frame, or the
        frame is refused so its plant sends the messages one per frame). Not found
        there, it was never sequenced if the log starts at seq 1, and otherwise may
        have been, on a day retention removed. At or above the floor the table holds
        every pair the log holds: no search; the pair may be older than the table's
        knowledge only for a producer learned from a cut history (``partial``).
        "May have been sequenced" is refused with ``too-old``: sequencing it again
        could duplicate a message."""
        p = self.dedup.producer(pid)
        if pseq < p.floor:
            self._frame_searches += 1
            if self._frame_searches > MAX_SEARCHES_PER_FRAME:
                raise RemoteProtocolError(
                    f"more than {MAX_SEARCHES_PER_FRAME} producer_seqs of {pid!r} in one frame "
                    f"are older than the dedup table; send them one per frame", code="too-old")
            self.counters["dedup_log_lookups"] += 1
            try:
                for seq, _t, body in self.log.find(env.record_pair_bytes(pid, pseq)):
                    m = env.decode_record(body)
                    if m.producer_seq == pseq and m.producer == pid:
                        return seq
            except LogCorruptedError as exc:
                raise RemoteProtocolError(f"cannot search the log for producer_seq {pseq} of "
                                          f"{pid!r}: {exc}", code="log-corrupted") from exc
            first = self.log.first_seq
            if first <= 1:
                return None
            why = f"not in the log, which starts at seq {first}"
        else:
            # the table holds every pair of the log at or above the floor; what it may
            # lack is older than its knowledge, for producers it learned from a cut
            # history (a producer first seen live is as new as one never seen)
            first = self.dedup.known_from
            if first <= 1 or pid not in self.dedup.partial:
                return None
            why = f"this node knows its records only from seq {first} on"
        raise RemoteProtocolError(
            f"producer_seq {pseq} of {pid!r} is older than anything this node remembers of "
            f"that producer, and {why} (retention): it may have been sequenced before, so it "
            f"is not sequenced again", code="too-old")

    # --- roles -------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.ha.epoch

    @property
    def role(self) -> str:
        r = self.ha.role
        return r.value if r in (Role.ACTIVE, Role.PASSIVE) else "starting"

    def _become_active(self, now: float, *, announce: bool = True) -> None:
        """Start sequencing under a (new) epoch from our last replicated seq + 1."""
        if self.ha.epoch == 0:        # first start of a single node
            self.ha.epoch = self.ha.max_epoch = 1
        epochs = self.state["epochs"]
        if not epochs or epochs[-1][0] != self.ha.epoch:
            epochs.append([self.ha.epoch, self.log.last_seq + 1])
        if self.sec is not None:
            # a node never continues an earlier chain (its own or the other node's)
            from .security import key_epoch_start
            ke = key_epoch_start(int(self.state.get("key_epoch", 0)), time.time())
            self.state["key_epoch"] = ke
            self.sec.start_broadcast(ke, now)
        self._save_state()            # the epoch is durable before anything is stamped with it
        if self.dedup.known_from == 0:            # an empty log: the table sees all from here
            self.dedup.known_from = self.log.last_seq + 1
        self.core = SequencerCore(last_seq=self.log.last_seq, last_time=self.log.last_time,
                                  epoch=self.ha.epoch, dedup=self.dedup)
        self._repl_next = 0
        self._standby_ready = False     # replicate only after the standby told us where it is
        if announce:
            self.counters["role_changes"] += 1
            log.warning("node %s is now ACTIVE, epoch %d, continuing from seq %d",
                        self.cfg.node_id, self.ha.epoch, self.log.last_seq + 1)

    def _become_passive(self, now: float) -> None:
        """Step down / join as standby: stop sequencing; the log is checked
        against the active node's history before we replicate."""
        if self.core is not None and self.core.has_unwritten:
            self.core.take_unwritten()          # never written: nothing to keep
            # ...but the dedup table already knows their pairs: forget them, or a
            # resend of one would be taken as a duplicate
            self.dedup.truncate_after(self.log.last_seq)
        self.core = None
        if self.sec is not None:
            self.sec.stop_broadcast()
        self._synced_epoch = 0
        self._synced_upto = self.log.last_seq
        for route, rid in self.replays.sessions():
            self._reply(route, self.replays.fail(
                route, rid, "not-active", "this node is no longer active; ask the active node"))
        self._save_state()
        self.counters["role_changes"] += 1
        log.warning("node %s is now STANDBY (epoch %d seen)", self.cfg.node_id, self.ha.max_epoch)

    def _apply_role(self, new: Role | None, now: float) -> None:
        if new is None:
            return
        if new is Role.ACTIVE:
            self._become_active(now)
        elif new is Role.PASSIVE:
            self._become_passive(now)

    # --- the loop --------------------------------------------------------------

    def request_reload(self, *_: Any) -> None:
        """SIGHUP: reload the allowlist at the top of the next loop turn."""
        self._reload_requested = True

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish its turn, commit, and return."""
        if not self._stop:
            self.notifier.stopping(f"stopping; role={self.role} last_seq={self.log.last_seq if self.log else 0}")
        self._stop = True

    def _status_line(self) -> str:
        last = self.core.durable_seq if self.core else self._synced_upto
        extra = ""
        if self.ha.has_peer and self.ha.role is Role.ACTIVE:
            extra = f" standby={self.ha.repl.value}"
        return f"role={self.role} epoch={self.ha.epoch} last_seq={last}{extra}"

    def run(self) -> None:
        """Serve until :meth:`stop` (or SIGTERM/SIGINT when run by :func:`run`)."""
        poller = zmq.Poller()
        poller.register(self.ingress, zmq.POLLIN)
        if self.peer_in is not None:
            poller.register(self.peer_in, zmq.POLLIN)
        if self.control is not None:
            poller.register(self.control, zmq.POLLIN)
        zap = self.sec.zap if self.sec is not None else None
        if zap is not None:
            poller.register(zap, zmq.POLLIN)
        hb_period = self.cfg.heartbeat_ms / 1000.0
        next_hb = time.monotonic()
        notifier = self.notifier
        notifier.ready(self._status_line())
        try:
            turn_start = time.monotonic()
            while not self._stop:
                now_m = time.monotonic()
                busy = (now_m - turn_start) * 1000   # the previous turn's length, with its poll wait
                if busy > self.counters["max_turn_ms"] and busy > 0:
                    self.counters["max_turn_ms"] = busy
                if now_m >= next_hb:
                    if self.peer_in is not None:
                        # read the peer first: after a long stall a newer leader
                        # may exist, and the timers below must not see silence
                        # that is only our own, then release under an old epoch
                        self._drain_peer()
                    self._heartbeat()
                    next_hb = now_m + hb_period
                    self._housekeeping(now_m)
                    notifier.tick(now_m, status=self._status_line())   # WATCHDOG=1 from the loop itself
                timeout = 0 if self.replays.ready else max(0.0, next_hb - now_m)
                events = dict(poller.poll(timeout * 1000))
                turn_start = time.monotonic()
                if self.peer_in is not None and self.peer_in in events:
                    self._drain_peer()          # first: a vote must see fresh peer news
                    next_hb = self._heartbeat_if_due(next_hb, hb_period)
                if self.ingress in events:
                    self._drain()
                    next_hb = self._heartbeat_if_due(next_hb, hb_period)
                if self.core is not None:
                    if self.core.has_unwritten:
                        self._commit()
                        next_hb = self._heartbeat_if_due(next_hb, hb_period)
                    elif self.core.has_waiting:
                        self._release()      # acks of pure resends: nothing new to write
                if self.replays.ready:
                    self._pump_replays()
                if zap is not None and zap in events:
                    self._flush_out()
                    self.sec.handle_zap()       # type: ignore[union-attr]
                if self.control is not None and self.control in events:
                    self._flush_out()
                    self._drain_control()
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload()
                self._flush_out()
            if self.core is not None and self.core.has_unwritten:
                self._commit()
        finally:
            self.close()

    def _drain(self) -> None:
        sock = self.ingress
        now_ns = time.time_ns()
        core = self.core
        sec = self.sec
        for _ in range(self.cfg.max_drain):
            if core is not None and core.next_seq - core.durable_seq > MAX_TURN_RECORDS:
                break                       # commit what we have; the rest waits a turn
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            route = frames[0]
            self._peer = None
            try:
                if len(frames) != 3:
                    raise RemoteProtocolError(f"expected [head, body], got {len(frames) - 1} frames")
                if sec is None:
                    ev = env.decode(frames[1:])
                else:
                    ev = self._open(route, frames[1:])
                    if ev is None:
                        continue
                self._handle(route, ev, now_ns)
            except RemoteProtocolError as exc:
                self._reject(route, frames, exc)
        self._peer = None

    def _open(self, route: bytes, frames: list[bytes]) -> Any:
        """Link security on: answer LINK_HELLO, open sealed requests; only a
        PING may come in cleartext (its answer is what egress heads show anyway).
        Returns the request to handle, or None if nothing is left to do."""
        sec = self.sec
        assert sec is not None
        L = self._L
        kind = L.outer_kind(frames)
        if kind == L.LINK_HELLO:
            self._send_clear(route, sec.server.keys_reply(frames))
            return None
        if kind == env.Kind.PING:
            return env.decode(frames)
        if kind not in (L.LINK_INIT, L.SEALED_UP):
            raise AuthenticationError("link security is on: send LINK_HELLO, then sealed requests")
        try:
            peer, inner = sec.server.open(frames)
        except AuthenticationError:
            sec.counters["auth_rejected"] += 1
            raise
        sec.note_route(route, peer)
        self._peer = peer
        key_msg = sec.sender_key_for(peer)          # a new session (or a new key-epoch)
        if L.inner_kind(inner) == L.KEY_REQUEST:
            if key_msg is None:
                sec.keyed.pop(peer.sid, None)        # the plant lost it: hand it again
                key_msg = sec.sender_key_for(peer)
            if key_msg is not None:
                self._out.append([route, *key_msg])
                self._keys_queued = True
            elif self.core is None:                  # a standby has no broadcast key
                self._not_active(route, _inner_rid(inner))
            else:                                    # always an answer: never leave it waiting
                self._send(route, Error(rid=_inner_rid(inner), code="no-key",
                                        message="this plant may not read every topic, so it gets "
                                                "no broadcast key: follow the stream over the link"))
            return None
        if key_msg is not None:
            self._out.append([route, *key_msg])
            self._keys_queued = True
        try:
            return env.decode(inner)
        except RemoteProtocolError as exc:
            exc.rid = _inner_rid(inner)      # type: ignore[attr-defined]  # for the sealed ERROR
            raise

    def _welcome(self, rid: int) -> Welcome:
        p = self.ha.peer
        return Welcome(rid=rid, node=self.cfg.node_id, role=self.role, epoch=self.ha.epoch,
                       first_seq=self.log.first_seq,
                       last_seq=self.core.durable_seq if self.core else self._synced_upto,
                       egress=self.cfg.announced_egress, peer_ingress=p.ingress,
                       peer_egress=p.egress, heartbeat_ms=self.cfg.heartbeat_ms,
                       failover_ms=self.cfg.failover_ms if self.ha.has_peer else 0)

    def _handle(self, route: bytes, ev: Any, now_ns: int) -> None:
        t = type(ev)
        core = self.core
        if t is Publish:
            if core is None:
                self._not_active(route, ev.rid)
                return
            if self._peer is not None:
                why = self.sec.publish_refusal(self._peer, ev.producer, ev.items)  # type: ignore[union-attr]
                if why is not None:
                    self.sec.counters["forbidden"] += 1  # type: ignore[union-attr]
                    self._send(route, Error(rid=ev.rid, code="forbidden", message=why))
                    return
            self._frame_searches = 0
            try:
                core.publish(route, ev.rid, ev.producer, ev.items, now_ns, self._old_lookup)
            except RemoteProtocolError as exc:
                if exc.code not in ("too-old", "log-corrupted"):
                    raise
                # an answer to a well-formed request, not a bad frame (protocol.md 4)
                if exc.code == "too-old":
                    self.counters["dedup_too_old"] += 1
                log.warning("refused a PUBLISH of %r: %s", ev.producer, exc)
                self._send(route, Error(rid=ev.rid, code=exc.code, message=str(exc)))
        elif t is ReplayRequest:
            if core is None:
                self._not_active(route, ev.rid)
                return
            if ev.max_records > self.cfg.replay_chunk_records:
                ev = dataclasses.replace(ev, max_records=self.cfg.replay_chunk_records)
            readable = None
            if self._peer is not None:
                readable = self.sec.readable(self._peer.key)  # type: ignore[union-attr]
            err = self.replays.open(route, ev, self.log, time.monotonic(), readable=readable)
            if err:
                self._reply(route, err)
        elif t is Credit:
            if not self.replays.credit(route, ev.rid, ev.credit, time.monotonic()):
                self._send(route, Error(rid=ev.rid, code="unknown-replay",
                                        message="no such replay (finished or expired)"))
        elif t is Cancel:
            self.replays.cancel(route, ev.rid)
        elif t is Hello:
            if ev.vote and self.ha.role is not Role.ACTIVE:
                now = time.monotonic()
                self._apply_role(self.ha.on_vote(ev.epoch, now), now)
            else:
                self.ha.hint_epoch(ev.epoch)
            self._send(route, self._welcome(ev.rid))
        elif t is Ping:
            self._send(route, self._pong(ev.rid))
        elif t is StatusRequest:
            self._send(route, StatusReply(rid=ev.rid, info=self.status()))
        elif t is Admin:
            if self.sec is not None:
                self._send(route, Error(rid=ev.rid, code="forbidden",
                                        message="with link security on, operator commands go to "
                                                "the control endpoint (sequencer.control)"))
                return
            self._send(route, self._admin(ev))
        else:
            raise RemoteProtocolError(f"{t.__name__} is not a request", code="unexpected")

    def _not_active(self, route: bytes, rid: int) -> None:
        peer = self.ha.peer
        if peer.ingress is None:
            where = "no peer known"
        elif peer.role == "active":
            where = f"the active node is at {peer.ingress}"
        else:                     # say what we know, not what we hope
            where = (f"its peer at {peer.ingress} is not active either"
                     f" ({'it reports ' + repr(peer.role) if peer.role else 'not heard from'})")
        self._send(route, Error(rid=rid, code="not-active",
                                message=f"node {self.cfg.node_id} is {self.role}; {where}"))

    def _admin(self, ev: Admin) -> Any:
        """Run an operator command; returns the reply event."""
        now = time.monotonic()
        cmd = ev.command
        if cmd == "promote":
            self._apply_role(self.ha.feed(Input.PROMOTE, now), now)
        elif cmd == "demote":
            self._apply_role(self.ha.feed(Input.DEMOTE, now), now)
        elif cmd == "fault-stall" and self.cfg.faults:
            log.warning("fault injection: stalling the main loop for %d ms", ev.arg)
            time.sleep(ev.arg / 1000)        # a hung loop: the watchdog pings must stop
        elif cmd == "fault-cut-peer" and self.cfg.faults:
            self.fault_cut_peer = bool(ev.arg)
            log.warning("fault injection: peer link %s", "CUT" if ev.arg else "restored")
        elif cmd == "fault-disk-full" and self.cfg.faults:
            self.log.fault_write_error = (
                OSError(errno.ENOSPC, "No space left on device (fault injection)") if ev.arg else None)
            log.warning("fault injection: log writes %s", "FAIL (disk full)" if ev.arg else "work")
        elif cmd == "reload":
            err = self.reload()
            if err is not None:
                return Error(rid=ev.rid, code="reload-failed", message=err)
        else:
            return Error(rid=ev.rid, code="bad-command",
                         message=f"unknown or disabled admin command {cmd!r}")
        return StatusReply(rid=ev.rid, info=self.status())

    def reload(self) -> str | None:
        """Reload the allowlist (SIGHUP, ``sequencer reload``): revoked plants'
        sessions and replays end now, and if a reader lost its key the broadcast
        key rotates before the next publish. Returns an error text, or None."""
        if self.sec is None:
            return "link security is off: there is no allowlist to reload"
        now = time.monotonic()
        try:
            routes, summary = self.sec.reload(now)
        except (ValueError, OSError) as exc:
            log.error("allowlist reload failed, the old one stays in force: %s", exc)
            return str(exc)
        gone = set(routes)
        for route, rid in self.replays.sessions():
            if route in gone:
                self.replays.cancel(route, rid)
        if gone and self._out:
            # sealed earlier in this turn (SIGHUP lands mid-turn) and not sent yet:
            # from the moment of the reload nothing more leaves for a revoked plant
            self._out[:] = [f for f in self._out if f[0] not in gone]
        log.warning("%s", summary)
        self._distribute(now)         # a rotated key goes only to the remaining readers
        return None

    def _drain_control(self) -> None:
        """Operator commands on the loopback control endpoint (cleartext)."""
        assert self.control is not None
        for _ in range(64):
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            route = frames[0]
            try:
                if len(frames) != 3:
                    raise RemoteProtocolError("expected [head, body]")
                ev = env.decode(frames[1:])
                t = type(ev)
                if t is StatusRequest:
                    rep: Any = StatusReply(rid=ev.rid, info=self.status())
                elif t is Ping:
                    rep = self._pong(ev.rid)
                elif t is Admin:
                    rep = self._admin(ev)
                else:
                    raise RemoteProtocolError(f"{t.__name__} is not a control command", code="unexpected")
            except RemoteProtocolError as exc:
                self.counters["rejected_frames"] += 1
                rep = Error(rid=0, code=exc.code, message=str(exc))
            try:
                self.control.send_multipart([route, *env.encode(rep)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def _pong(self, rid: int) -> Pong:
        return Pong(rid=rid, epoch=self.ha.epoch,
                    last_seq=self.core.durable_seq if self.core else self._synced_upto,
                    role=self.role)

    def _send(self, route: bytes, ev: Any) -> None:
        """Reply to the request being handled (sealed when it came sealed)."""
        if self.sec is not None and self._peer is None:
            self._send_clear(route, env.encode(ev))
        else:
            self._reply(route, env.encode(ev))

    def _send_clear(self, route: bytes, frames: list[bytes]) -> None:
        try:
            self.ingress.send_multipart([route, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:      # peer gone: it will ask again
            pass

    def _reply(self, route: bytes, frames: list[bytes]) -> None:
        """Send ``[head, body]`` to a plant: in cleartext, or sealed under its
        session and queued until the session state is durable (_flush_out)."""
        sec = self.sec
        if sec is None:
            self._send_clear(route, frames)
            return
        sealed = sec.seal(route, frames)
        if sealed is not None:       # no session (revoked, evicted): nobody to tell
            self._out.append([route, *sealed])

    def _flush_out(self) -> None:
        """Persist every advanced session, then send what was sealed under it."""
        out = self._out
        if not out:
            return
        try:
            self.sec.flush()      # type: ignore[union-attr]
        except OSError as exc:
            self._durability_failed = True      # never send what was sealed under it
            raise DurabilityError(f"cannot persist link session state: {exc}") from exc
        send = self.ingress.send_multipart
        for frames in out:
            try:
                send(frames, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        out.clear()
        self._keys_queued = False

    def _reject(self, route: bytes, frames: list[bytes], exc: RemoteProtocolError) -> None:
        self.counters["rejected_frames"] += 1
        rid = getattr(exc, "rid", 0) if self._peer is not None else 0
        if len(frames) >= 2 and self.sec is None:
            try:
                h = env.decode_head(frames[1])
                rid = h[2] if len(h) > 2 else 0
            except RemoteProtocolError:
                pass
        if isinstance(exc, AuthenticationError):
            # name the refused session (LINK_INIT / SEALED_UP heads carry its id), so a
            # plant can tell a late error about an old session from one about its own
            rid = _outer_sid(frames)
            self._peer = None          # never answer a failed authentication under a session
        try:
            self._send(route, Error(rid=rid, code=exc.code, message=str(exc)))
        except zmq.ZMQError:
            pass
        now = time.monotonic()
        if now - self._last_reject_log > 1.0:   # rate-limited: a flood must not flood the log
            self._last_reject_log = now
            log.warning("rejected a frame from peer %s: %s (%d rejected so far)",
                        route.hex()[:16], exc, self.counters["rejected_frames"])

    # --- sequencing and replication (active) -------------------------------------

    def _commit(self) -> None:
        """Group commit: append, replicate, fsync, then publish and ack."""
        core = self.core
        assert core is not None
        recs = core.take_unwritten()
        self.log.append(recs, trusted=True)     # the core's own records: checked at the ends
        self._replicate(recs)
        dt = self.log.sync()
        c = self.counters
        c["fsyncs"] += 1
        c["fsync_seconds"] += dt
        if dt * 1000 > c["fsync_max_ms"]:
            c["fsync_max_ms"] = dt * 1000
        self._synced_upto = recs[-1][0]
        self._release()

    def _release(self) -> None:
        core = self.core
        if core is None:
            return
        gate = self.ha.gate()
        if gate == "stall":
            return
        upto = self._synced_upto
        if gate == "standby":
            upto = min(upto, self.ha.standby_acked)
        if upto < core.durable_seq:
            upto = core.durable_seq
        if upto == core.durable_seq and not core.has_waiting:
            return
        out = core.durable(upto)
        pub = self.egress
        drop = self.cfg.fault_drop_egress
        sec = self.sec
        for first, last, bodies in out.batches:
            if drop and self._rng.random() < drop:
                self.counters["egress_dropped_injected"] += 1
                continue
            frames = env.batch_frames(core.epoch, first, last, bodies)
            if sec is not None:
                frames = self._seal_egress(frames)
            pub.send_multipart(frames)
            self.counters["egress_batches"] += 1
        epoch = core.epoch
        if sec is None:
            send = self.ingress.send_multipart
            for route, rid, pairs in out.acks:
                try:
                    send([route, *env.encode(env.Ack(rid=rid, epoch=epoch, pairs=tuple(pairs)))])
                except zmq.ZMQError:   # peer gone: it will resend and be deduplicated
                    pass
        else:
            for route, rid, pairs in out.acks:
                self._reply(route, env.encode(env.Ack(rid=rid, epoch=epoch, pairs=tuple(pairs))))
        self.counters["acks"] += len(out.acks)

    def _seal_egress(self, frames: list[bytes]) -> list[bytes]:
        """Seal a BATCH / HEARTBEAT under the sender key; hand out a new
        key-epoch first when one is due (rotation by count or time)."""
        sec = self.sec
        assert sec is not None and sec.bcast is not None
        now = time.monotonic()
        if sec.bcast.rotation_due(now) or sec.bcast.key_epoch != self.state.get("key_epoch"):
            self._distribute(now)
        elif self._keys_queued:
            self._flush_out()         # a new session's key goes out before the batch it opens
        return sec.seal_egress(frames, now)

    def _distribute(self, now: float) -> None:
        """Rotate if due, save the key-epoch, and hand the current sender key to
        every authorised session before anything is published under it."""
        sec = self.sec
        assert sec is not None
        if sec.bcast is None:
            return
        sec.distribution_due(now)
        if sec.bcast.key_epoch != self.state.get("key_epoch"):
            self.state["key_epoch"] = sec.bcast.key_epoch
            self._save_state()        # key-epochs never repeat, even across a crash
        for route, frames in sec.distribute():
            self._out.append([route, *frames])
        self._flush_out()

    def _replicate(self, fresh: list[tuple[int, int, bytes]] | None = None) -> None:
        """Send the standby what it lacks, within the window, from the log (so
        live records and catch-up are one path). ``fresh``: records just
        appended; when the standby is caught up to them they are sent as they
        are, instead of being read back from the log (a CRC check and a parse
        per record on the node's hottest path)."""
        if self.core is None or self.peer_out is None or self.fault_cut_peer:
            return
        ha = self.ha
        if not self._standby_ready or ha.peer.role != Role.PASSIVE.value:
            return
        if self._repl_next == 0:
            self._repl_next = ha.standby_acked + 1
        if fresh and self._repl_next == fresh[0][0]:
            self._replicate_fresh(fresh)
        last = self.log.last_seq
        while self._repl_next <= last and self._repl_next - 1 - ha.standby_acked < REPL_WINDOW:
            try:
                recs = self.log.read(self._repl_next, max_records=REPL_CHUNK,
                                     max_bytes=peerlink.MAX_REPL_BYTES)
            except LogCorruptedError as exc:
                # never ship damaged records; the standby stays unsynced (and so
                # never eligible) until an operator repairs this log
                if not self._repl_damage_logged:
                    log.error("cannot replicate to the standby: %s", exc)
                    self._repl_damage_logged = True
                break
            if not recs:
                break
            try:
                self.peer_out.send_multipart(peerlink.encode_repl(self.core.epoch, recs), zmq.NOBLOCK)
            except zmq.Again:
                break
            self._repl_next = recs[-1][0] + 1
            self.counters["replicated_records"] += len(recs)

    def _replicate_fresh(self, fresh: list[tuple[int, int, bytes]]) -> None:
        """The same REPL frames the log path would cut (at most REPL_CHUNK records
        and MAX_REPL_BYTES of bodies each, the first record always), from memory;
        whatever the window or the socket does not take now is read from the log
        later, as before."""
        ha = self.ha
        epoch = self.core.epoch          # type: ignore[union-attr]
        send = self.peer_out.send_multipart    # type: ignore[union-attr]
        i, n = 0, len(fresh)
        while i < n and self._repl_next - 1 - ha.standby_acked < REPL_WINDOW:
            j, size = i, 0
            while j < n and j - i < REPL_CHUNK and (j == i or size + len(fresh[j][2]) <= peerlink.MAX_REPL_BYTES):
                size += len(fresh[j][2])
                j += 1
            chunk = fresh[i:j]
            try:
                send(peerlink.encode_repl(epoch, chunk), zmq.NOBLOCK)
            except zmq.Again:
                return
            self._repl_next = chunk[-1][0] + 1
            self.counters["replicated_records"] += len(chunk)
            i = j

    # --- the peer link -----------------------------------------------------------

    def _drain_peer(self) -> None:
        assert self.peer_in is not None
        now = time.monotonic()
        appended = False
        repl_frames = 0
        for _ in range(1024):
            if repl_frames >= MAX_TURN_REPL_FRAMES:
                break                       # fsync and ack this much; more next turn
            try:
                frames = self.peer_in.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if self.fault_cut_peer:
                continue
            try:
                msg = peerlink.decode_peer(frames[1:])
                if isinstance(msg, peerlink.PeerHeartbeat):
                    self._on_peer_hb(msg, now)
                elif isinstance(msg, peerlink.Repl):
                    repl_frames += 1
                    appended |= self._on_repl(msg, time.monotonic())
                elif isinstance(msg, peerlink.ReplAck):
                    self._on_repl_ack(msg, now)
            except RemoteProtocolError as exc:
                self.counters["peer_rejected"] += 1
                log.warning("bad frame on the peer link: %s", exc)
        if appended:
            self.log.sync()
            self._synced_upto = self.log.last_seq
            self._peer_send(peerlink.encode_ack(self._synced_epoch, self._synced_upto))

    def _on_peer_hb(self, hb: peerlink.PeerHeartbeat, now: float) -> None:
        old_role = self.ha.role
        self.ha.own_last_seq = last = self.log.last_seq
        self.ha.own_log_epoch = log_epoch(self.state["epochs"], last)
        new = self.ha.on_peer_heartbeat(node=hb.node, role=hb.role, epoch=hb.epoch,
                                        last_seq=hb.last_seq, in_sync=hb.in_sync,
                                        ingress=hb.ingress, egress=hb.egress, now=now,
                                        log_epoch=log_epoch(hb.epochs, hb.last_seq))
        self._apply_role(new, now)
        if self.ha.blocked and self.ha.blocked != self._blocked_logged:
            log.error("not becoming active: %s", self.ha.blocked)
        self._blocked_logged = self.ha.blocked
        if self.ha.role is Role.PASSIVE and hb.role == "active" and hb.epoch >= self.ha.max_epoch:
            if self._synced_epoch != hb.epoch:
                self._check_history(hb)
            self._peer_send(peerlink.encode_ack(self._synced_epoch, self._synced_upto))
        if old_role is Role.ACTIVE and self.ha.role is Role.ACTIVE and hb.role == "standby":
            self._release()

    def _check_history(self, hb: peerlink.PeerHeartbeat) -> None:
        """Make our log a prefix of the active node's history: set aside any
        tail we wrote as a leader whose epoch the history does not cover."""
        history = list(hb.epochs)
        last = self.log.last_seq
        if last:
            rec = env.decode_record(self.log.read(last, max_records=1)[0][2])
            e_last = rec.epoch
            cut = None
            starts = {e: s for e, s in history}
            later = [s for e, s in history if e > e_last]
            if e_last in starts:
                nxt = min(later) if later else None
                if nxt is not None and last >= nxt:
                    cut = nxt - 1
            elif later:
                cut = min(later) - 1
            if cut is not None and cut < last:
                removed = last - cut
                aside = self.log.truncate_after(cut)
                self.counters["tail_records_set_aside"] += removed
                log.warning("set aside %d records (seq %d..%d) this node wrote but never "
                            "replicated; kept in %s", removed, cut + 1, last, aside)
                self._forget_dedup_after(cut)
        self.state["epochs"] = [list(e) for e in history]
        self._synced_epoch = hb.epoch
        self._synced_upto = self.log.last_seq
        self._save_state()

    def _forget_dedup_after(self, cut: int) -> None:
        """After the log was cut back to ``cut``: the table forgets the pairs of the
        records set aside (they may be sequenced again) and keeps the rest, which
        may reach back beyond retention; the snapshot is rewritten to match. Were it
        left, it would name records that are gone; were the table rebuilt from the
        log alone, it would forget what retention removed (5.2)."""
        self.dedup.truncate_after(cut)
        if self.log.last_seq == 0:                # all set aside: learn again from the peer,
            self.dedup.known_from = 0             # which may start after a gap in what the
            self.dedup.partial = set(self.dedup.producers())   # table knows
        self._snap_seq = cut
        path = self.data / "dedup.snapshot"
        try:
            _atomic_write(path, self.dedup.snapshot(cut))
        except OSError as exc:
            path.unlink(missing_ok=True)     # the next start rebuilds from the log
            self.counters["dedup_snapshot_failures"] += 1
            log.warning("dedup snapshot not written after the cut (%s); removed", exc)

    def _on_repl(self, r: peerlink.Repl, now: float) -> bool:
        """Append replicated records (passive). Returns True if any were appended."""
        ha = self.ha
        if ha.role is not Role.PASSIVE or r.epoch != self._synced_epoch or r.epoch < ha.max_epoch:
            return False
        ha.peer.heard = now
        last = self.log.last_seq
        recs = [x for x in r.records if x[0] > last]
        if not recs:
            return False
        if last and recs[0][0] != last + 1:
            self._peer_send(peerlink.encode_ack(self._synced_epoch, last))   # rewind, please
            return False
        # Check every body before anything is written: as one array, so the strict
        # decoder runs once per frame, and each body must be exactly the record of
        # its seq (a body with bytes after its record would shift the array).
        ms = env.decode_records(env.array_head(len(recs)) + b"".join(b for _s, _t, b in recs),
                                limit=len(recs))
        if len(ms) != len(recs) or any(m.seq != rec[0] for m, rec in zip(ms, recs)):
            raise RemoteProtocolError("replicated record bodies do not match their seqs")
        try:
            self.log.append(recs)
        except LocalProtocolError as exc:      # refused before anything was written
            raise RemoteProtocolError(f"replicated records refused by the log: {exc}") from exc
        table = self.dedup
        if table.known_from == 0:                 # a standby that started empty
            table.known_from = recs[0][0]
        if table.known_from != 1:
            # copying history from the middle: a producer first seen in a record
            # sequenced before this node started may have pairs from before it
            started = self._started_ns
            for m in ms:
                if m.time < started and m.producer not in table:
                    table.partial.add(m.producer)
        record = table.record
        for m in ms:
            record(m.producer, m.producer_seq, m.seq)
        self.counters["replicated_records"] += len(recs)
        return True

    def _on_repl_ack(self, a: peerlink.ReplAck, now: float) -> None:
        if self.core is None or a.epoch != self.core.epoch:
            return
        self.counters["repl_acks"] += 1
        self._standby_ready = True
        prev = self.ha.standby_acked
        acked = min(a.last_seq, self.log.last_seq)
        self.ha.on_standby_ack(acked, last_seq=self.log.last_seq, now=now)
        if acked != prev:
            self._repl_progress = now
        if self._repl_next == 0 or acked + 1 > self._repl_next or acked < prev:
            self._repl_next = acked + 1
        self._replicate()
        self._release()

    def _peer_send(self, frames: list[bytes]) -> None:
        if self.peer_out is None or self.fault_cut_peer:
            return
        try:
            self.peer_out.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass

    # --- timers ------------------------------------------------------------------

    def _pump_replays(self) -> None:
        if self.core is None:
            return
        chunks = self.replays.pump(self.log, durable_seq=self.core.durable_seq,
                                   epoch=self.core.epoch, now=time.monotonic(),
                                   budget=REPLAY_CHUNKS_PER_TURN)
        if self.replays.corruptions:
            for exc in self.replays.corruptions:
                log.error("replay: %s", exc)     # only that replay fails, others go on
            self.replays.corruptions.clear()
        for route, frames in chunks:
            self._reply(route, frames)

    def _heartbeat_if_due(self, next_hb: float, period: float) -> float:
        """Heartbeats also go out between the stages of a busy turn: on a
        loaded Pi one turn can take a good part of the failover timeout."""
        now = time.monotonic()
        if now >= next_hb:
            self._heartbeat()
            return now + period
        return next_hb

    def _heartbeat(self) -> None:
        last = self.core.durable_seq if self.core else self._synced_upto
        hb = Heartbeat(epoch=self.ha.epoch, last_seq=last, node=self.cfg.node_id,
                       role=self.role, time=time.time_ns(), ingress=self.cfg.announced_ingress)
        frames = env.encode(hb)
        if self.sec is not None and self.sec.bcast is not None:
            frames = self._seal_egress(frames)      # the active node's heartbeats are signed
        self.egress.send_multipart(frames)
        if self.peer_out is not None:
            self._peer_send(peerlink.encode_heartbeat(peerlink.PeerHeartbeat(
                epoch=self.ha.epoch, last_seq=self.log.last_seq, node=self.cfg.node_id,
                role=self.ha.role.value, ingress=self.cfg.announced_ingress,
                egress=self.cfg.announced_egress,
                in_sync=self.ha.repl in (ReplState.IN_SYNC, ReplState.SILENT),
                epochs=tuple((e, s) for e, s in self.state["epochs"]), time=time.time_ns())))

    def _apply_retention(self, now_ns: int) -> bool:
        """Delete the segments retention_days old, after a dedup snapshot that covers
        them: the table remembers their pairs, and a snapshot older than the cut is
        ignored at the next start (_load_dedup). False if postponed: the snapshot
        could not cover them yet (records not yet durable). A snapshot that fails to
        be written (full disk) does not stop retention: that frees the space."""
        gone = self.log.expired_upto(now_ns)
        if gone:
            written = self._snapshot_dedup()
            if written is not None and written < gone:
                log.info("retention postponed: the dedup snapshot covers seq %d, the "
                         "expired segments reach seq %d", written, gone)
                return False
        for path in self.log.apply_retention(now_ns):
            log.info("retention: removed %s", path)
        return True

    def _housekeeping(self, now_m: float) -> None:
        self.replays.expire(now_m)
        if self.sec is not None and now_m >= self._sec_gc_at:
            self._sec_gc_at = now_m + 10.0
            self.sec.forget_dropped()     # bookkeeping of evicted sessions stays bounded
        if now_m >= self._retention_at:
            self._retention_at = now_m + RETENTION_EVERY_S
            if not self._apply_retention(time.time_ns()):
                self._retention_at = now_m + RETENTION_RETRY_S
        ha = self.ha
        if ha.has_peer and ha.role is not Role.ACTIVE:
            self._apply_role(ha.check_vote(now_m), now_m)
        if ha.has_peer:
            before = ha.repl
            ha.tick(now_m, last_seq=self.log.last_seq)
            if ha.repl is not before:
                log.warning("standby link: %s -> %s", before.value, ha.repl.value)
            if self.core is not None:
                if (self._repl_next - 1 > ha.standby_acked
                        and now_m - self._repl_progress > REPL_REWIND_S):
                    self._repl_next = ha.standby_acked + 1      # resend what was lost
                    self._repl_progress = now_m
                self._replicate()
                self._release()
        durable = self.core.durable_seq if self.core else self._synced_upto
        if durable - self._snap_seq >= DEDUP_SNAPSHOT_RECORDS:
            self._snapshot_dedup()

    # --- status ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The map served to ``plant status`` / ``sequencer status``."""
        c = dict(self.counters)
        if self.core is not None:
            c["sequenced"] = self.core.sequenced
            c["duplicates"] = self.core.duplicates
        c.update(self.replays.stats())
        c["fsync_seconds"] = round(c["fsync_seconds"], 6)
        c["fsync_max_ms"] = round(c["fsync_max_ms"], 3)
        c["max_turn_ms"] = round(c["max_turn_ms"], 3)
        ha = self.ha
        out: dict[str, Any] = {
            "node": self.cfg.node_id, "role": self.role, "epoch": ha.epoch,
            "last_seq": self.core.durable_seq if self.core else self._synced_upto,
            "log_last_seq": self.log.last_seq, "first_seq": self.log.first_seq,
            "uptime_s": round(time.time() - self.started, 3), "producers": len(self.dedup),
            "security": self.cfg.security, "fsync": self.cfg.fsync,
            "counters": {k: (round(v, 6) if isinstance(v, float) else int(v)) for k, v in c.items()}}
        if ha.has_peer:
            now = time.monotonic()
            out["ha"] = {
                "peer": ha.peer.node or None, "peer_role": ha.peer.role or None,
                "peer_heard_ms_ago": None if ha.peer.heard < 0 else round((now - ha.peer.heard) * 1000),
                "standby": ha.repl.value if ha.role is Role.ACTIVE else None,
                "standby_acked": ha.standby_acked if ha.role is Role.ACTIVE else None,
                "degraded": ha.degraded if ha.role is Role.ACTIVE else None,
                "in_sync": (ha.repl is ReplState.IN_SYNC) if ha.role is Role.ACTIVE else ha.told_in_sync,
                "eligible": ha.eligible(now) if ha.role is Role.PASSIVE else None,
                "max_epoch": ha.max_epoch, "require_standby": ha.require_standby,
                "blocked": ha.blocked,
                "epochs": self.state["epochs"],
            }
        return out

    def close(self) -> None:
        """Commit what is pending, snapshot dedup, close sockets and the log."""
        if self.log is None:
            return
        try:
            if self.core is not None and self.core.has_unwritten:
                self._commit()
            self._snapshot_dedup()
            if self.sec is not None and not self._durability_failed:
                self._flush_out()
        finally:
            if self.sec is not None:
                self.sec.close()
            for s in (self.ingress, self.egress, self.peer_in, self.peer_out, self.control):
                if s is not None:
                    s.close(0)
            self.notifier.close()
            self.log.close()
            self.log = None  # type: ignore[assignment]
            log.info("node %s stopped", self.cfg.node_id)


def log_epoch(history: Any, last_seq: int) -> int:
    """The epoch of the newest record of a log that ends at ``last_seq`` and whose
    epoch history is ``history`` (``[epoch, first_seq]`` pairs; an epoch that
    began after ``last_seq`` wrote nothing into this log). 0 for an empty log."""
    if not last_seq:
        return 0
    return max((int(e) for e, first in history if first <= last_seq), default=0)


def _inner_rid(inner: list[bytes]) -> int:
    """The request id of an authentic inner message that does not decode, if its
    head shows one (so the sealed ERROR names the request); else 0."""
    try:
        h = strictcbor.loads(inner[0])
    except Exception:               # a malformed head: the error goes out with rid 0
        return 0
    if type(h) is list and len(h) > 2 and type(h[2]) is int and 0 <= h[2] < 2 ** 63:
        return int(h[2])
    return 0


def _outer_sid(frames: list[bytes]) -> int:
    """The session id in a sealed request's cleartext head ``[1, 10|11, sid]``, else 0."""
    try:
        h = strictcbor.loads(frames[1]) if len(frames) > 1 and len(frames[1]) <= 64 else None
    except Exception:
        return 0
    if (type(h) is list and len(h) == 3 and h[1] in (10, 11) and type(h[2]) is int
            and 0 <= h[2] < 2 ** 63):
        return int(h[2])
    return 0


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def run(cfg: SequencerConfig) -> int:
    """Run a node until SIGTERM/SIGINT; returns the process exit code."""
    gc.set_threshold(*GC_THRESHOLDS)      # this process is ours: see GC_THRESHOLDS
    node = SequencerNode(cfg)
    signal.signal(signal.SIGTERM, node.stop)
    signal.signal(signal.SIGINT, node.stop)
    signal.signal(signal.SIGHUP, node.request_reload)
    try:
        node.run()
    except DurabilityError as exc:
        log.critical("durable write failed, stopping: %s", exc)
        return 3
    return 0
