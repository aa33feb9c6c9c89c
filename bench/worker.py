"""Benchmark processes: ``python -m bench.worker ROLE JSON``.

Line protocol (see :mod:`bench.proc`): print ``READY`` once set up, wait
for ``GO`` on stdin where the role has a timed start, print
``RESULT <json>`` when done (or ``ERROR <text>`` and exit 1). All times
that cross processes are ``time.time_ns()`` (same host, same clock).

Roles
-----
Ceiling (written from scratch, no orbcast code):
  ``pp_sink`` / ``pp_src``       raw pyzmq PUSH -> PULL, 64 B frames
  ``mini_server``                minimal ROUTER -> PUB sequencing loop
  ``mini_prod`` / ``mini_cons``  its DEALER producers and SUB consumers
orbcast:
  ``orb_prod`` / ``orb_cons``    a Plant publishing / subscribing
  ``replay_client``              a Plant replaying 1..N
  ``prefill``                    writes a log directly with the LogStore
  ``ha_prod`` / ``ha_cons``      plants on a primary/standby pair (:mod:`bench.ha`)
  ``bridge_press`` / ``bridge_cons``  the firmware bridge on mock pins (:mod:`bench.bridge`)
Peers (Redis Streams, NATS JetStream, Mosquitto): ``redis_*``, ``nats_*``, ``mqtt_*`` (:mod:`bench.peers`)
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

# --- protocol helpers ------------------------------------------------------------


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def wait_go(timeout: float = 300.0) -> None:
    import select
    r, _, _ = select.select([sys.stdin], [], [], timeout)
    if not r:
        raise RuntimeError(f"no GO within {timeout:.0f} s")
    line = sys.stdin.readline()
    if not line.startswith("GO"):
        raise RuntimeError(f"expected GO, got {line!r}")


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def percentiles(values: list[int]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max of ``values`` (ns) in microseconds."""
    if not values:
        return {}
    v = sorted(values)
    n = len(v)

    def q(p: float) -> float:
        return v[min(n - 1, int(p * n))] / 1000.0

    return {"n": n, "p50_us": q(0.50), "p90_us": q(0.90), "p99_us": q(0.99),
            "p999_us": q(0.999), "max_us": v[-1] / 1000.0, "mean_us": sum(v) / n / 1000.0}


_stop = False

#: pyzmq 27 flags are enum.Flag members; ``SNDMORE | flags`` in send_multipart and the
#: RCVMORE getsockopt in recv_multipart cost ~5 us per frame on this machine, so the
#: hot loops below pass plain ints and receive known frame counts with plain recv().
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)


def _on_term(*_: Any) -> None:
    global _stop
    _stop = True


# --- raw PUSH -> PULL ----------------------------------------------------------

_PP = struct.Struct(">II")     # producer index, counter


def pp_sink(a: dict[str, Any]) -> dict[str, Any]:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(f"tcp://127.0.0.1:{a['port']}")
    expect = [0] * a["producers"]
    total = a["producers"] * a["n_per"]
    got = 0
    errors: list[str] = []
    say("READY")
    unpack = _PP.unpack_from
    recv = s.recv
    NB = NOBLOCK
    idle_ms = int(a.get("idle_s", 20) * 1000)
    t_first = 0
    while got < total:
        if not s.poll(idle_ms):
            errors.append(f"idle: got {got} of {total}")
            break
        if not t_first:
            t_first = time.time_ns()
        while got < total:
            try:
                m = recv(NB)
            except zmq.Again:
                break
            i, c = unpack(m)
            if c != expect[i]:
                if len(errors) < 5:
                    errors.append(f"producer {i}: got {c}, expected {expect[i]}")
            expect[i] = c + 1
            got += 1
    t_end = time.time_ns()
    s.close(0)
    ctx.term()
    ok = not errors and got == total
    return {"ok": ok, "received": got, "t_first_ns": t_first, "t_end_ns": t_end,
            "errors": errors, "cpu_s": cpu_s()}


def pp_src(a: dict[str, Any]) -> dict[str, Any]:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 30_000)
    s.connect(f"tcp://127.0.0.1:{a['port']}")
    pad = b"p" * (a["size"] - _PP.size)
    idx, n = a["idx"], a["n"]
    pack = _PP.pack
    send = s.send
    say("READY")
    wait_go()
    t0 = time.time_ns()
    for c in range(n):
        send(pack(idx, c) + pad)
    t1 = time.time_ns()
    s.close()          # linger: everything queued is delivered first
    ctx.term()
    return {"ok": True, "t_start_ns": t0, "t_sent_ns": t1, "cpu_s": cpu_s()}


# --- minimal ROUTER -> PUB sequencing loop --------------------------------------

_REC = struct.Struct(">QQ")      # seq, time_ns: the record header the loop stamps
_PUBH = struct.Struct(">QI")     # first seq, record count (0 = heartbeat)
_FRAME = struct.Struct(">II")    # batched ingress frame: frame id, message count
_ACKB = struct.Struct(">II")     # batched ack: last frame id of this producer, messages
_PSEQ = struct.Struct(">Q")
_LAT = struct.Struct(">Qq")      # pseq, send time_ns


def mini_server(a: dict[str, Any]) -> dict[str, Any]:
    """Drain ingress with NOBLOCK, stamp seqs, write + fsync the drained batch,
    one PUB frame per batch; acks per message ("msg") or per producer per
    batch ("batch")."""
    signal.signal(signal.SIGTERM, _on_term)
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    r.setsockopt(zmq.SNDHWM, 0)       # ROUTER drops at the HWM: acks must never be lost
    r.bind(f"tcp://127.0.0.1:{a['ingress']}")
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 0)     # no drops: these consumers have no gap repair
    pub.bind(f"tcp://127.0.0.1:{a['egress']}")
    fd = os.open(a["file"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    do_fsync = a.get("fsync", True)
    batched = a["mode"] == "batch"
    size = a["size"]
    max_drain = a.get("max_drain", 1024)
    rec_pack = _REC.pack
    pubh = _PUBH.pack
    frame_unpack = _FRAME.unpack_from
    ack_pack = _ACKB.pack
    recv = r.recv
    send = r.send
    NB = NOBLOCK
    MORE = SNDMORE
    seq = 0
    fsyncs = 0
    fsync_s = 0.0
    batches = 0
    say("READY")
    next_hb = 0.0
    while not _stop:
        now = time.monotonic()
        if now >= next_hb:
            pub.send(pubh(seq, 0))
            next_hb = now + 0.05
        if not r.poll(50):
            continue
        t = time.time_ns()
        first = seq + 1
        parts: list[bytes | memoryview] = [b""]
        acks: list[tuple[bytes, bytes]] = []
        last: dict[bytes, list[int]] = {}
        for _ in range(max_drain):
            try:
                route = recv(NB)
            except zmq.Again:
                break
            data = recv(0)          # a DEALER's message is [route, data], delivered whole
            if batched:
                fid, cnt = frame_unpack(data)
                mv = memoryview(data)
                off = _FRAME.size
                for _i in range(cnt):
                    seq += 1
                    parts.append(rec_pack(seq, t))
                    parts.append(mv[off:off + size])
                    off += size
                ent = last.get(route)
                if ent is None:
                    last[route] = [fid, cnt]
                else:
                    ent[0] = fid
                    ent[1] += cnt
            else:
                seq += 1
                parts.append(rec_pack(seq, t))
                parts.append(data)
                acks.append((route, data[:8]))
        n = seq - first + 1
        if n <= 0:
            continue
        parts[0] = pubh(first, n)
        body = b"".join(parts)
        os.write(fd, memoryview(body)[_PUBH.size:])
        if do_fsync:
            t0 = time.perf_counter()
            os.fsync(fd)
            fsync_s += time.perf_counter() - t0
            fsyncs += 1
        pub.send(body)
        batches += 1
        if batched:
            for route, (fid, cnt) in last.items():
                send(route, MORE)
                send(ack_pack(fid, cnt), 0)
        else:
            for route, ack in acks:
                send(route, MORE)
                send(ack, 0)
    os.close(fd)
    r.close(0)
    pub.close(0)
    ctx.term()
    return {"ok": True, "seq": seq, "batches": batches, "fsyncs": fsyncs,
            "fsync_s": round(fsync_s, 4), "cpu_s": cpu_s()}


def mini_prod(a: dict[str, Any]) -> dict[str, Any]:
    """DEALER producer: a window of frames in flight; "msg" = one message per
    frame and per ack, "batch" = ``batch`` messages per frame; with ``rate``
    it sends one message per frame at a fixed rate with its send time."""
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.SNDHWM, 0)
    d.setsockopt(zmq.RCVHWM, 0)
    d.connect(f"tcp://127.0.0.1:{a['ingress']}")
    n, size, mode = a["n"], a["size"], a["mode"]
    window = a["window"]
    batch = a.get("batch", 1)
    rate = a.get("rate")
    idle_ms = int(a.get("idle_s", 20) * 1000)
    say("READY")
    wait_go()
    t0 = time.time_ns()
    sent = acked = inflight = 0
    errors: list[str] = []
    NB = NOBLOCK
    send = d.send
    recv = d.recv
    if rate:                                  # open loop, fixed rate, one message per frame
        pad = b"l" * (size - _LAT.size)
        interval = 1e9 / rate
        start = time.perf_counter_ns()
        for i in range(n):
            due = start + int(i * interval)
            now = time.perf_counter_ns()
            if due > now:
                time.sleep((due - now) / 1e9)
            send(_LAT.pack(i + 1, time.time_ns()) + pad)
            while True:                        # drain acks without blocking
                try:
                    recv(NB)
                    acked += 1
                except zmq.Again:
                    break
        while acked < n:
            if not d.poll(idle_ms):
                errors.append(f"idle: {acked} of {n} acked")
                break
            recv()
            acked += 1
    elif mode == "msg":
        pad = b"m" * (size - 8)
        pk = _PSEQ.pack
        while acked < n:
            while sent < n and inflight < window:
                sent += 1
                send(pk(sent) + pad)
                inflight += 1
            if not d.poll(idle_ms):
                errors.append(f"idle: {acked} of {n} acked")
                break
            while True:
                try:
                    recv(NB)
                except zmq.Again:
                    break
                acked += 1
                inflight -= 1
    else:
        pad = b"b" * (size - 8)
        pk = _PSEQ.pack
        fh = _FRAME.pack
        fid = 0
        pseq = 0
        unack = _ACKB.unpack
        while acked < n:
            while sent < n and inflight < window:
                k = min(batch, n - sent)
                fid += 1
                send(b"".join([fh(fid, k)] + [pk(p) + pad for p in range(pseq + 1, pseq + k + 1)]))
                pseq += k
                sent += k
                inflight += 1
            if not d.poll(idle_ms):
                errors.append(f"idle: {acked} of {n} acked")
                break
            acked_fid = fid - inflight
            while True:
                try:
                    m = recv(NB)
                except zmq.Again:
                    break
                last_fid, cnt = unack(m)
                acked += cnt
                inflight -= last_fid - acked_fid
                acked_fid = last_fid
    t1 = time.time_ns()
    d.close(0)
    ctx.term()
    return {"ok": not errors and acked == n, "acked": acked, "errors": errors,
            "t_start_ns": t0, "t_acked_ns": t1, "cpu_s": cpu_s()}


def mini_cons(a: dict[str, Any]) -> dict[str, Any]:
    """SUB consumer: verifies every record's seq is 1..N once, in order."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(f"tcp://127.0.0.1:{a['egress']}")
    total, size = a["n_total"], a["size"]
    latency = a.get("latency", False)
    warm = a.get("warmup", 0)
    idle_ms = int(a.get("idle_s", 20) * 1000)
    if not s.poll(10_000):
        raise RuntimeError("no heartbeat from the minimal loop within 10 s")
    s.recv()
    say("READY")
    rec = _REC.size + size
    unpack_seq = _PSEQ.unpack_from
    unpack_lat = _LAT.unpack_from
    pubh = _PUBH.unpack_from
    expect = 1
    errors: list[str] = []
    lats: list[int] = []
    t_first = 0
    while expect <= total and not errors:
        if not s.poll(idle_ms):
            errors.append(f"idle: at seq {expect} of {total}")
            break
        while True:
            try:
                f = s.recv(NOBLOCK)
            except zmq.Again:
                break
            now = time.time_ns()
            first, cnt = pubh(f)
            if cnt == 0:
                continue
            if not t_first:
                t_first = now
            if first != expect or len(f) != _PUBH.size + cnt * rec:
                errors.append(f"batch starts at {first} ({cnt} records, {len(f)} B), "
                              f"expected {expect}")
                break
            off = _PUBH.size
            for _i in range(cnt):
                (sq,) = unpack_seq(f, off)
                if sq != expect:
                    errors.append(f"record seq {sq}, expected {expect}")
                    break
                if latency and sq > warm:
                    _ps, ts = unpack_lat(f, off + _REC.size)
                    lats.append(now - ts)
                expect += 1
                off += rec
            if errors or expect > total:
                break
    t_end = time.time_ns()
    s.close(0)
    ctx.term()
    out = {"ok": not errors and expect == total + 1, "received": expect - 1, "errors": errors,
           "t_first_ns": t_first, "t_end_ns": t_end, "cpu_s": cpu_s()}
    if latency:
        out["latency"] = percentiles(lats)
    return out


# --- orbcast ---------------------------------------------------------------------


def _plant(a: dict[str, Any], pid: str, outbox: bool = False) -> Any:
    """A Plant on ``a["ingress"]``, or on every node of ``a["sequencers"]`` (a
    primary/standby pair, :mod:`bench.ha`) with ``a["request_timeout_ms"]``."""
    from plant.client import Plant
    kw: dict[str, Any] = {}
    if a.get("request_timeout_ms"):
        kw["request_timeout_ms"] = a["request_timeout_ms"]
    if a.get("keys"):           # link security on (bench.security made the keys)
        kw.update(security="ratchet", identity=f"{a['keys']}/{pid}.key", pins=f"{a['keys']}/pins.toml")
    return Plant(sequencers=list(a.get("sequencers") or [a["ingress"]]), producer_id=pid,
                 data=a["data"], outbox=outbox, on_full="block", **kw)


def publish_paced(pub: Callable[[str, bytes], Any], topic: str, n: int, rate: float,
                  size: int) -> Any:
    """Open loop: message i goes out at start + i / rate whatever the acks do,
    its first 8 bytes the send time (ns, for latency). Returns the last ticket."""
    pad = b"l" * (size - 8)
    pk = struct.Struct(">q").pack
    interval = 1e9 / rate
    start = time.perf_counter_ns()
    last = None
    for i in range(n):
        due = start + int(i * interval)
        now = time.perf_counter_ns()
        if due > now:
            time.sleep((due - now) / 1e9)
        last = pub(topic, pk(time.time_ns()) + pad)
    return last


def orb_prod(a: dict[str, Any]) -> dict[str, Any]:
    """A Plant publishing ``n`` messages with publish_nowait, then flush();
    with ``rate``: open loop at a fixed rate, send time in the payload."""
    p = _plant(a, f"bench-p{a['idx']}", a.get("outbox", False))
    errors: list[str] = []
    try:
        p.node_info(timeout=10)
        n, size = a["n"], a["size"]
        topic = a.get("topic", "bench/t")
        rate = a.get("rate")
        pub = p.publish_nowait
        say("READY")
        wait_go()
        c0 = cpu_s()
        t0 = time.time_ns()
        last = None
        if rate:
            last = publish_paced(pub, topic, n, rate, size)
        else:
            payload = b"x" * size
            for _i in range(n):
                last = pub(topic, payload)
        t_sent = time.time_ns()
        p.flush(timeout=a.get("timeout", 120))
        # flush() returns only when everything is acked (an early return was a bug,
        # fixed and tested in tests/integration): this wait only catches a regression,
        # which ``early`` then reports
        early = n - p.counters["acked"]
        deadline = time.monotonic() + 30
        while p.counters["acked"] < n and time.monotonic() < deadline:
            time.sleep(0.0005)
        t_flushed = time.time_ns()
        seq = last.result(timeout=10) if last is not None else 0
        c = dict(p.counters)
        c["unacked_when_flush_returned"] = max(0, early)
        if c.get("rejected"):
            errors.append(f"{c['rejected']} messages rejected by the sequencer")
        if c.get("acked", n) < n:
            errors.append(f"only {c.get('acked')} of {n} acked")
        return {"ok": not errors, "errors": errors, "t_start_ns": t0, "t_sent_ns": t_sent,
                "t_flushed_ns": t_flushed, "last_seq": seq, "counters": c,
                "cpu_s": cpu_s() - c0}
    finally:
        p.close()


def orb_cons(a: dict[str, Any]) -> dict[str, Any]:
    """A Plant subscribe("") from seq 1: verifies seqs 1..N exactly once in
    order and every (producer, producer_seq) once; optionally latencies."""
    from orbcast.errors import OrbcastTimeout
    p = _plant(a, f"bench-c{a['idx']}")
    errors: list[str] = []
    try:
        sub = p.subscribe("", start=1)
        deadline = time.monotonic() + 10
        while p.counters["heartbeats"] == 0:      # SUB connected: no slow-joiner window
            if time.monotonic() > deadline:
                raise RuntimeError("no heartbeat from the node within 10 s")
            time.sleep(0.01)
        say("READY")
        total = a["n_total"]
        latency = a.get("latency", False)
        warm = a.get("warmup", 0)
        idle = a.get("idle_s", 20)
        lats: list[int] = []
        to_seq: list[int] = []
        from_seq: list[int] = []
        # (producer, producer_seq) seen: one bitmap per producer (pseqs start at 1)
        n_per = a.get("n_per") or total
        checker = DeliveryCheck(n_per)
        check = checker.check
        expect = 1
        t_first = 0
        get_many = sub.get_many
        unpack = struct.Struct(">q").unpack_from
        c0 = cpu_s()
        while expect <= total and not errors:
            try:
                ms = get_many(4096, timeout=idle)
            except OrbcastTimeout:
                errors.append(f"no message for {idle} s at seq {expect} of {total}")
                break
            if not ms:
                errors.append(f"subscription ended at seq {expect}")
                break
            if not t_first:
                t_first = time.time_ns()
            for m in ms:
                err = check(m, expect)
                if err:
                    errors.append(err)
                    break
                if latency and expect > warm:
                    now = time.time_ns()
                    sent = unpack(m.payload)[0]
                    lats.append(now - sent)
                    to_seq.append(m.time - sent)      # producer -> sequencer stamp (at drain)
                    from_seq.append(now - m.time)     # stamp -> fsync -> egress -> application
                expect += 1
        t_end = time.time_ns()
        out = {"ok": not errors and expect == total + 1, "received": expect - 1,
               "errors": errors, "t_first_ns": t_first, "t_end_ns": t_end,
               "per_producer": checker.per_producer(),
               "tracker": sub.tracker.stats(), "counters": dict(p.counters),
               "cpu_s": cpu_s() - c0}
        if latency:
            out["latency"] = percentiles(lats)
            out["latency_to_sequencer"] = percentiles(to_seq)
            out["latency_from_sequencer"] = percentiles(from_seq)
        return out
    finally:
        p.close()


class DeliveryCheck:
    """Every consumer's verification: seqs 1..N in order, and every
    ``(producer, producer_seq)`` exactly once (a bitmap per producer)."""

    def __init__(self, n_per: int) -> None:
        self.n_per = n_per
        self.seen: dict[str, bytearray] = {}

    def check(self, m: Any, expect: int) -> str | None:
        """None if ``m`` is the expected next message, else what is wrong."""
        if m.seq != expect:
            return (f"got seq {m.seq}, expected {expect} "
                    f"({'duplicate/reorder' if m.seq < expect else 'gap'})")
        bm = self.seen.get(m.producer)
        if bm is None:
            bm = self.seen[m.producer] = bytearray(self.n_per + 1)
        ps = m.producer_seq
        if not 0 < ps <= self.n_per or bm[ps]:
            return f"({m.producer}, {ps}) delivered twice or unexpected (seq {m.seq})"
        bm[ps] = 1
        return None

    def per_producer(self) -> dict[str, int]:
        return {k: sum(v) for k, v in self.seen.items()}


def replay_client(a: dict[str, Any]) -> dict[str, Any]:
    """A Plant replaying ``from_seq..to_seq`` and checking every seq in order."""
    p = _plant(a, "bench-replay")
    errors: list[str] = []
    try:
        info = p.node_info(timeout=30)
        frm, to = a["from_seq"], a["to_seq"]
        if info.last_seq < to:
            raise RuntimeError(f"the node has seqs up to {info.last_seq}, need {to}")
        say("READY")
        wait_go()
        c0 = cpu_s()
        t0 = time.time_ns()
        r = p.replay(frm, to)
        expect = frm
        t_first = 0
        nbytes = 0
        if a.get("bulk"):                   # the application takes lists (get_many)
            while expect <= to and not errors:
                ms = r.get_many(4096)
                if not ms:
                    break
                if not t_first:
                    t_first = time.time_ns()
                for m in ms:
                    if m.seq != expect:
                        errors.append(f"got seq {m.seq}, expected {expect}")
                        break
                    nbytes += len(m.payload)
                    expect += 1
        else:                               # ... or iterates, one message at a time
            for m in r:
                if m.seq != expect:
                    errors.append(f"got seq {m.seq}, expected {expect}")
                    break
                if not t_first:
                    t_first = time.time_ns()
                nbytes += len(m.payload)
                expect += 1
                if expect > to:
                    break
        t_end = time.time_ns()
        if not errors and expect != to + 1:
            errors.append(f"replay ended at {expect - 1}, expected {to}")
        return {"ok": not errors, "errors": errors, "received": expect - frm,
                "payload_bytes": nbytes, "t_start_ns": t0, "t_first_ns": t_first,
                "t_end_ns": t_end, "tracker": r.tracker.stats(), "cpu_s": cpu_s() - c0}
    finally:
        p.close()


def prefill(a: dict[str, Any]) -> dict[str, Any]:
    """Write ``n`` canonical records straight into a node's data directory
    with the LogStore (the node's own format) plus a dedup snapshot, so a
    node started on it serves them. Much faster than publishing them."""
    from orbcast.envelope import cbor_text, encode_record
    from sequencer.core import DedupTable
    from sequencer.log import LogStore
    data = Path(a["data"])
    data.mkdir(parents=True, exist_ok=True)
    n, size = a["n"], a["size"]
    pid = "bench-prefill"
    t0 = time.perf_counter()
    log = LogStore(data / "log", fsync=True)
    if log.last_seq:
        raise RuntimeError(f"{data} already holds a log")
    pid_enc = cbor_text(pid)
    topic = cbor_text(a.get("topic", "bench/replay"))
    payload = b"r" * size
    t = time.time_ns()
    chunk = 8192
    s = 1
    while s <= n:
        e = min(n, s + chunk - 1)
        log.append([(q, t, encode_record(q, 1, t, pid_enc, q, topic, payload))
                    for q in range(s, e + 1)])
        s = e + 1
    log.sync()
    log.close()
    table = DedupTable()
    for q in range(1, n + 1):
        table.record(pid, q, q)
    tmp = data / "dedup.snapshot.tmp"
    tmp.write_bytes(table.snapshot(n))
    os.replace(tmp, data / "dedup.snapshot")
    nbytes = sum(f.stat().st_size for f in (data / "log").glob("*.seg"))
    return {"ok": True, "records": n, "log_bytes": nbytes, "seconds": time.perf_counter() - t0}


ROLES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "pp_sink": pp_sink, "pp_src": pp_src, "mini_server": mini_server, "mini_prod": mini_prod,
    "mini_cons": mini_cons, "orb_prod": orb_prod, "orb_cons": orb_cons,
    "replay_client": replay_client, "prefill": prefill,
}


def main(argv: list[str]) -> int:
    role, args = argv[0], json.loads(argv[1])
    if args.get("switch_interval"):    # diagnostics: the GIL hand-off between plant threads
        sys.setswitchinterval(args["switch_interval"])
    if args.get("cprofile"):
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    fn = ROLES.get(role)
    if fn is None:              # the roles of bench.ha, bench.bridge and bench.peers
        from . import bridge as _bridge
        from . import ha as _ha
        from . import peers as _peers
        fn = {**_ha.ROLES, **_bridge.ROLES, **_peers.ROLES}[role]
    try:
        res = fn(args)
    except Exception as exc:   # reported to the bench, which fails loudly
        import traceback
        traceback.print_exc()
        say(f"ERROR {type(exc).__name__}: {exc}")
        return 1
    finally:
        if args.get("cprofile"):
            prof.disable()
            prof.dump_stats(args["cprofile"])
    say("RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
