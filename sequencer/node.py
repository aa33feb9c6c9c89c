"""The sequencer driver: sockets, clock, disk and logging around the cores.

One thread, one loop (STYLE.md section 1)::

    poll(ingress, timeout = next deadline)
    drain up to max_drain ingress frames      -> core.publish / replays / control
    append unwritten records to the log; fsync (group commit)
    core.durable(last)                         -> egress batches, then acks
    pump replay chunks (bounded per turn)
    heartbeat, dedup snapshot, replay expiry when due

Bad input from a peer is answered with an ERROR frame, counted and logged at
most once a second; it never raises out of the loop. A failed durable write
(:class:`~orbcast.errors.DurabilityError`) stops the node loudly: it must not
keep acking what it cannot keep.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import zmq

from orbcast import envelope as env
from orbcast.config import SequencerConfig
from orbcast.envelope import (Cancel, Credit, Error, Heartbeat, Hello, Ping, Pong, Publish,
                              ReplayRequest, StatusReply, StatusRequest, Welcome)
from orbcast.errors import DurabilityError, LogCorruptedError, RemoteProtocolError

from .core import DedupTable, SequencerCore
from .log import LogStore

__all__ = ["SequencerNode", "run"]

log = logging.getLogger("orbcast.sequencer")

#: Hard cap ZeroMQ enforces before we see a frame (it disconnects the peer):
#: far above MAX_BODY_BYTES so ordinary oversized frames still reach us and
#: get a proper "too-large" error reply, but bounded so nobody can make us
#: allocate gigabytes.
ZMQ_MAXMSGSIZE = 8 * env.MAX_BODY_BYTES
#: Replay chunks cut per loop turn, so replays never starve publishing.
REPLAY_CHUNKS_PER_TURN = 8
#: Write the dedup snapshot after this many new records or seconds.
DEDUP_SNAPSHOT_RECORDS = 200_000
DEDUP_SNAPSHOT_SECONDS = 30.0
#: Ingress receive high-water mark (frames queued per peer in ZeroMQ).
INGRESS_HWM = 10_000

_NS = 1_000_000_000


class SequencerNode:
    """A single sequencer node. ``run()`` blocks until :meth:`stop`."""

    def __init__(self, cfg: SequencerConfig, *, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.data = Path(cfg.data)
        self.data.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self._stop = False
        self.counters: dict[str, float] = {
            "sequenced": 0, "duplicates": 0, "rejected_frames": 0, "replayed_records": 0,
            "fsyncs": 0, "fsync_seconds": 0.0, "fsync_max_ms": 0.0, "egress_batches": 0,
            "egress_dropped_injected": 0, "acks": 0, "dedup_log_lookups": 0,
        }
        self.log = LogStore(self.data / "log", retention_days=cfg.retention_days, fsync=cfg.fsync)
        for p in self.log.torn_tails:
            log.warning("recovered a torn log tail; the cut bytes were kept in %s", p)
        self.epoch = self._load_epoch()
        dedup = self._load_dedup()
        self.core = SequencerCore(last_seq=self.log.last_seq, last_time=self.log.last_time,
                                  epoch=self.epoch, dedup=dedup)
        from .replay import ReplayManager
        self.replays = ReplayManager(max_sessions=cfg.max_replays,
                                     chunk_bytes=cfg.replay_chunk_bytes, idle_s=cfg.replay_idle_s)
        self._ctx = ctx or zmq.Context.instance()
        self.ingress = self._ctx.socket(zmq.ROUTER)
        self.ingress.setsockopt(zmq.LINGER, 0)
        self.ingress.setsockopt(zmq.MAXMSGSIZE, ZMQ_MAXMSGSIZE)
        self.ingress.setsockopt(zmq.RCVHWM, INGRESS_HWM)
        self.ingress.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.egress = self._ctx.socket(zmq.PUB)
        self.egress.setsockopt(zmq.LINGER, 0)
        self.egress.setsockopt(zmq.SNDHWM, cfg.egress_hwm)
        self.ingress.bind(cfg.ingress)
        self.egress.bind(cfg.egress)
        self._snap_seq = self.log.last_seq
        self._snap_time = time.monotonic()
        self._last_reject_log = 0.0
        self._rng = random.Random()
        log.info("node %s serving: ingress %s egress %s, epoch %d, log %d..%d%s",
                 cfg.node_id, cfg.ingress, cfg.egress, self.epoch, self.log.first_seq,
                 self.log.last_seq, "" if cfg.fsync else " (fsync OFF)")
        if cfg.security == "none":
            log.warning("link security is OFF (security = \"none\"): loopback only, "
                        "anyone on this host can publish and read")

    # --- start-up state ------------------------------------------------------

    def _load_epoch(self) -> int:
        p = self.data / "epoch"
        if p.exists():
            try:
                return int(p.read_text().strip())
            except ValueError:
                raise DurabilityError(f"{p} is damaged; it must hold the leadership epoch") from None
        _atomic_write(p, b"1\n")
        return 1

    def _load_dedup(self) -> DedupTable:
        """Snapshot + the log records after it (no time window, survives restarts)."""
        p = self.data / "dedup.snapshot"
        table, covered = DedupTable(), 0
        if p.exists():
            try:
                table, covered = DedupTable.restore(p.read_bytes())
            except ValueError as exc:
                log.warning("ignoring dedup snapshot %s (%s); rebuilding from the log", p, exc)
                table, covered = DedupTable(), 0
            if covered > self.log.last_seq:   # log was cut back (torn tail): rebuild
                table, covered = DedupTable(), 0
        start = max(covered + 1, self.log.first_seq or 1)
        n = 0
        if self.log.last_seq >= start:
            for seq, _t, body in self.log.iter_records(start):
                m = env.decode_record(body)
                table.record(m.producer, m.producer_seq, seq)
                n += 1
        if n:
            log.info("dedup table rebuilt from %d log records after seq %d", n, covered)
        return table

    def _snapshot_dedup(self) -> None:
        _atomic_write(self.data / "dedup.snapshot", self.core.dedup.snapshot(self.core.durable_seq))
        self._snap_seq = self.core.durable_seq
        self._snap_time = time.monotonic()

    def _old_lookup(self, pid: str, pseq: int) -> int | None:
        """Search the log for a pair older than the dedup window (rare)."""
        self.counters["dedup_log_lookups"] += 1
        if self.log.last_seq == 0:
            return None
        for seq, _t, body in self.log.iter_records(self.log.first_seq):
            m = env.decode_record(body)
            if m.producer_seq == pseq and m.producer == pid:
                return seq
        return None

    # --- the loop --------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish its turn, commit, and return."""
        self._stop = True

    def run(self) -> None:
        """Serve until :meth:`stop` (or SIGTERM/SIGINT when run by :func:`run`)."""
        poller = zmq.Poller()
        poller.register(self.ingress, zmq.POLLIN)
        hb_period = self.cfg.heartbeat_ms / 1000.0
        next_hb = time.monotonic()
        try:
            while not self._stop:
                now_m = time.monotonic()
                if now_m >= next_hb:
                    self._heartbeat()
                    next_hb = now_m + hb_period
                    self._housekeeping(now_m)
                timeout = 0 if self.replays.ready else max(0.0, next_hb - now_m)
                if poller.poll(timeout * 1000):
                    self._drain()
                if self.core.has_unwritten:
                    self._commit()
                if self.replays.ready:
                    self._pump_replays()
            if self.core.has_unwritten:
                self._commit()
        finally:
            self.close()

    def _drain(self) -> None:
        sock = self.ingress
        now_ns = time.time_ns()
        for _ in range(self.cfg.max_drain):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            route = frames[0]
            try:
                if len(frames) != 3:
                    raise RemoteProtocolError(f"expected [head, body], got {len(frames) - 1} frames")
                ev = env.decode(frames[1:])
                self._handle(route, ev, now_ns)
            except RemoteProtocolError as exc:
                self._reject(route, frames, exc)

    def _handle(self, route: bytes, ev: Any, now_ns: int) -> None:
        t = type(ev)
        if t is Publish:
            self.core.publish(route, ev.rid, ev.producer, ev.items, now_ns, self._old_lookup)
        elif t is ReplayRequest:
            err = self.replays.open(route, ev, self.log, time.monotonic())
            if err:
                self.ingress.send_multipart([route, *err])
        elif t is Credit:
            if not self.replays.credit(route, ev.rid, ev.credit, time.monotonic()):
                self._send(route, Error(rid=ev.rid, code="unknown-replay",
                                        message="no such replay (finished or expired)"))
        elif t is Cancel:
            self.replays.cancel(route, ev.rid)
        elif t is Hello:
            self._send(route, Welcome(
                rid=ev.rid, node=self.cfg.node_id, role="active", epoch=self.epoch,
                first_seq=self.log.first_seq, last_seq=self.core.durable_seq,
                egress=self.cfg.announced_egress, heartbeat_ms=self.cfg.heartbeat_ms))
        elif t is Ping:
            self._send(route, Pong(rid=ev.rid, epoch=self.epoch, last_seq=self.core.durable_seq,
                                   role="active"))
        elif t is StatusRequest:
            self._send(route, StatusReply(rid=ev.rid, info=self.status()))
        else:
            raise RemoteProtocolError(f"{t.__name__} is not a request", code="unexpected")

    def _send(self, route: bytes, ev: Any) -> None:
        self.ingress.send_multipart([route, *env.encode(ev)])

    def _reject(self, route: bytes, frames: list[bytes], exc: RemoteProtocolError) -> None:
        self.counters["rejected_frames"] += 1
        rid = 0
        if len(frames) >= 2:
            try:
                h = env.decode_head(frames[1])
                rid = h[2] if len(h) > 2 else 0
            except RemoteProtocolError:
                pass
        try:
            self._send(route, Error(rid=rid, code=exc.code, message=str(exc)))
        except zmq.ZMQError:
            pass
        now = time.monotonic()
        if now - self._last_reject_log > 1.0:   # rate-limited: a flood must not flood the log
            self._last_reject_log = now
            log.warning("rejected a frame from peer %s: %s (%d rejected so far)",
                        route.hex()[:16], exc, self.counters["rejected_frames"])

    def _commit(self) -> None:
        """Group commit: append, fsync, then publish and ack."""
        recs = self.core.take_unwritten()
        self.log.append(recs)
        dt = self.log.sync()
        c = self.counters
        c["fsyncs"] += 1
        c["fsync_seconds"] += dt
        if dt * 1000 > c["fsync_max_ms"]:
            c["fsync_max_ms"] = dt * 1000
        self._release(recs[-1][0])

    def _release(self, upto: int) -> None:
        out = self.core.durable(upto)
        pub = self.egress
        drop = self.cfg.fault_drop_egress
        for first, last, bodies in out.batches:
            if drop and self._rng.random() < drop:
                self.counters["egress_dropped_injected"] += 1
                continue
            pub.send_multipart(env.batch_frames(self.epoch, first, last, bodies))
            self.counters["egress_batches"] += 1
        send = self.ingress.send_multipart
        epoch = self.epoch
        for route, rid, pairs in out.acks:
            try:
                send([route, *env.encode(env.Ack(rid=rid, epoch=epoch, pairs=tuple(pairs)))])
            except zmq.ZMQError:   # peer gone: it will resend and be deduplicated
                pass
        self.counters["acks"] += len(out.acks)

    def _pump_replays(self) -> None:
        try:
            chunks = self.replays.pump(self.log, durable_seq=self.core.durable_seq,
                                       epoch=self.epoch, now=time.monotonic(),
                                       budget=REPLAY_CHUNKS_PER_TURN)
        except LogCorruptedError as exc:
            log.error("%s", exc)
            for route, rid in self.replays.sessions():
                self.ingress.send_multipart([route, *self.replays.fail(route, rid, "log-corrupted", str(exc))])
            return
        for route, frames in chunks:
            self.ingress.send_multipart([route, *frames])

    def _heartbeat(self) -> None:
        hb = Heartbeat(epoch=self.epoch, last_seq=self.core.durable_seq, node=self.cfg.node_id,
                       role="active", time=time.time_ns())
        self.egress.send_multipart(env.encode(hb))

    def _housekeeping(self, now_m: float) -> None:
        self.replays.expire(now_m)
        if (self.core.durable_seq - self._snap_seq >= DEDUP_SNAPSHOT_RECORDS
                or (now_m - self._snap_time >= DEDUP_SNAPSHOT_SECONDS
                    and self.core.durable_seq != self._snap_seq)):
            self._snapshot_dedup()

    # --- status ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The map served to ``plant status`` / ``sequencer status``."""
        c = dict(self.counters)
        c["sequenced"] = self.core.sequenced
        c["duplicates"] = self.core.duplicates
        c.update(self.replays.stats())
        c["fsync_seconds"] = round(c["fsync_seconds"], 6)
        c["fsync_max_ms"] = round(c["fsync_max_ms"], 3)
        return {"node": self.cfg.node_id, "role": "active", "epoch": self.epoch,
                "last_seq": self.core.durable_seq, "first_seq": self.log.first_seq,
                "uptime_s": round(time.time() - self.started, 3), "producers": len(self.core.dedup),
                "security": self.cfg.security, "fsync": self.cfg.fsync,
                "counters": {k: (round(v, 6) if isinstance(v, float) else int(v)) for k, v in c.items()}}

    def close(self) -> None:
        """Commit what is pending, snapshot dedup, close sockets and the log."""
        if self.log is None:
            return
        try:
            if self.core.has_unwritten:
                self._commit()
            self._snapshot_dedup()
        finally:
            self.ingress.close(0)
            self.egress.close(0)
            self.log.close()
            self.log = None  # type: ignore[assignment]
            log.info("node %s stopped", self.cfg.node_id)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def run(cfg: SequencerConfig) -> int:
    """Run a node until SIGTERM/SIGINT; returns the process exit code."""
    node = SequencerNode(cfg)
    signal.signal(signal.SIGTERM, node.stop)
    signal.signal(signal.SIGINT, node.stop)
    try:
        node.run()
    except DurabilityError as exc:
        log.critical("durable write failed, stopping: %s", exc)
        return 3
    return 0
