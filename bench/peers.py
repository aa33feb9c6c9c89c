"""The peers a user would pick instead of orbcast (DESIGN.md, "Performance stance"):
``--only redis``, ``nats``, ``mosquitto``.

Each runs orbcast's throughput workload (``orb-64``): 2 producer processes, 2
consumer processes, 64 B payloads, loopback, against a server the bench starts
itself (its own config in the bench's temp dir, a free port below 32768; the
Debian packages' system services are never used or touched), killed at the end.
The figure is messages delivered per second, first producer start to last
consumer done, as for ``orb-64``.

Every payload starts with (producer index, producer seq 1..N). Each producer
counts only what the broker acknowledged; each consumer verifies that it got
every producer's 1..N exactly once and in order, and, where the broker
defines a total order, that it got everything in that order (Redis stream
IDs strictly increasing; JetStream stream seqs 1..N gap-free). Anything else
fails the bench loudly.

* **redis**: redis-server with ``appendonly yes``, ``appendfsync always`` (the
  AOF is fsynced before the replies of an event-loop round are written:
  fsync before the ack, as orbcast), ``save ""``, no AOF rewrite during the
  bench. Producers pipeline XADD, ``redis_pipeline`` per pipeline with
  ``redis_window`` pipelines in flight on one connection (redis-py's
  Connection, hiredis parser); consumers ``XREAD BLOCK ... COUNT`` from ``0``.
  Then **redis-replay**: a stream of ``replay_n`` records (orbcast's
  ``replay`` size) read from ``0`` by a late reader with ``XREAD COUNT``.
* **nats**: nats-server with JetStream (file store in the temp dir), one
  stream on ``bench.>``. Producers ``publish_async`` with ``nats_window``
  acks outstanding; consumers are ordered push consumers from the start.
  This is NATS's DEFAULT durability: the store is fsynced every 2 minutes
  (``sync_interval``), so a JetStream ack is not an fsync. If the server
  accepts ``sync_interval: always`` (nats-server 2.10+), a second run,
  **nats-sync-always**, uses it; if not (Debian bookworm's 2.9.10), that is
  recorded and shown in the report.
* **mosquitto**: QoS 1 from 2 producers (paho-mqtt, ``mqtt_window`` in
  flight), 2 subscribers at QoS 1. Mosquitto acks from memory
  (``persistence false``; its persistence is a periodic snapshot, never an
  fsync per message) and has no replay. ``max_queued_messages 0`` so it
  never drops a QoS 1 message for a subscriber that lags.

Missing server binaries or client libraries fail the bench with what to
install (``make bench`` installs both).

Worker roles (run by :mod:`bench.worker`): ``redis_prod``, ``redis_cons``,
``redis_reader``, ``nats_setup``, ``nats_prod``, ``nats_cons``, ``mqtt_prod``,
``mqtt_cons``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from .proc import BenchFailure, Procs, free_ports, proc_cpu_s, proc_status_kb, run_parts

__all__ = [
    "CFG_FULL",
    "CFG_QUICK",
    "ROLES",
    "bench_mosquitto",
    "bench_nats",
    "bench_redis",
    "bench_redis_replay",
    "bench_redis_tput",
]

#: Sizes: the throughput runs use orb-64's ``orb_n_per`` and redis-replay uses
#: ``replay_n``, so each peer gets exactly orbcast's workload.
CFG_FULL: dict[str, Any] = {"redis_pipeline": 256, "redis_window": 8, "redis_count": 1024,
                            "nats_window": 4096, "mqtt_window": 1000}
CFG_QUICK: dict[str, Any] = dict(CFG_FULL)

STREAM = "bench"
_MSG = struct.Struct(">IQ")      # producer index, producer seq (1..N)
SIZE = 64


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- what must be installed ----------------------------------------------------------

_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_binary(name: str, pkg: str) -> str:
    """The server binary (also in sbin, where Debian puts nats-server and
    mosquitto), or a failure that says what to install."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    found = shutil.which(name, path=path)
    if not found:
        raise BenchFailure(f"{name} not found: install the Debian package {pkg} "
                           f"(apt-get install -y --no-install-recommends {pkg}; "
                           "`make bench` does this)")
    return found


def need_client(module: str, dist: str) -> str:
    """The client library's version in this interpreter, or a failure."""
    if importlib.util.find_spec(module) is None:
        raise BenchFailure(f"Python package {dist} is missing in {sys.executable}: "
                           "install the bench extra (.venv/bin/pip install -e '.[bench]'; "
                           "`make bench` does this)")
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def _version(name: str, argv: list[str]) -> str:
    """``name`` and the first x.y.z the binary prints about itself."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return f"{name} ?"
    m = re.search(r"\d+\.\d+\.\d+", out.stdout + out.stderr)
    return f"{name} {m.group(0) if m else '?'}"


# --- verification, shared by every consumer --------------------------------------------


class PerProducer:
    """Every producer's seqs 1..N exactly once, in order: since each producer
    publishes in order on one connection, the next message of producer ``i``
    must carry exactly ``next[i]`` (lower: a duplicate, higher: a gap)."""

    def __init__(self, producers: int, n_per: int) -> None:
        self.next = [1] * producers
        self.n_per = n_per

    def check(self, data: bytes) -> str | None:
        if len(data) != SIZE:
            return f"payload of {len(data)} B, expected {SIZE}"
        i, ps = _MSG.unpack_from(data)
        if i >= len(self.next):
            return f"unknown producer {i}"
        want = self.next[i]
        if ps != want:
            return (f"producer {i}: got seq {ps}, expected {want} "
                    f"({'duplicate/reorder' if ps < want else 'gap'})")
        self.next[i] = ps + 1
        return None

    def per_producer(self) -> dict[str, int]:
        return {str(i): n - 1 for i, n in enumerate(self.next)}

    def missing(self) -> str | None:
        short = {i: n - 1 for i, n in enumerate(self.next) if n - 1 != self.n_per}
        return f"per producer received {short}, expected {self.n_per} each" if short else None


def _payloads(idx: int, frm: int, to: int) -> list[bytes]:
    pad = b"x" * (SIZE - _MSG.size)
    pk = _MSG.pack
    return [pk(idx, p) + pad for p in range(frm, to + 1)]


# --- worker side: Redis Streams ------------------------------------------------------------


def _redis_conn(a: dict[str, Any]) -> Any:
    import redis
    c = redis.Connection(host="127.0.0.1", port=a["port"], socket_timeout=a.get("idle_s", 30),
                         protocol=2)    # RESP2 replies: lists, the same in every redis-py
    c.connect()
    return c


def redis_prod(a: dict[str, Any]) -> dict[str, Any]:
    """XADD ``n`` messages, ``pipeline`` per pipeline, ``window`` pipelines in
    flight on one connection (so this producer's order is the stream's)."""
    from redis.exceptions import ResponseError

    from .worker import cpu_s, say, wait_go
    conn = _redis_conn(a)
    idx, n, pl, window = a["idx"], a["n"], a["pipeline"], a["window"]
    key = a.get("stream", STREAM)
    pack = conn.pack_commands
    send = conn.send_packed_command
    read = conn.read_response
    errors: list[str] = []
    if not a.get("no_go"):
        say("READY")
        wait_go()
    c0 = cpu_s()
    t0 = time.time_ns()
    inflight: deque[int] = deque()
    sent = acked = 0
    last_id = b""
    while acked < n and not errors:
        while sent < n and len(inflight) < window:
            k = min(pl, n - sent)
            send(pack([("XADD", key, "*", "d", p) for p in _payloads(idx, sent + 1, sent + k)]),
                 check_health=False)
            inflight.append(k)
            sent += k
        for _i in range(inflight.popleft()):
            try:
                r = read()
            except ResponseError as exc:
                if len(errors) < 5:
                    errors.append(f"XADD refused: {exc}")
                continue
            if isinstance(r, bytes) and b"-" in r:
                acked += 1
                last_id = r
            elif len(errors) < 5:
                errors.append(f"XADD answered {r!r}")
    t1 = time.time_ns()
    conn.disconnect()
    return {"ok": not errors and acked == n, "acked": acked, "errors": errors,
            "last_id": last_id.decode(), "t_start_ns": t0, "t_acked_ns": t1,
            "cpu_s": cpu_s() - c0}


def _stream_id(eid: bytes) -> tuple[int, int]:
    ms, _, sq = eid.partition(b"-")
    return int(ms), int(sq)


def _take_entries(entries: list[Any], prev: tuple[int, int],
                  check: Callable[[bytes], str | None]) -> tuple[tuple[int, int], int, str | None]:
    """Verify one XREAD reply's entries: IDs increasing after ``prev`` (the
    stream's total order), each a ``d`` field passing ``check``. Returns the
    last ID, how many entries passed, and the first error (or None)."""
    n = 0
    for eid, fields in entries:
        sid = _stream_id(eid)
        if sid <= prev:
            return prev, n, f"stream ID {eid!r} after {prev}: not increasing"
        prev = sid
        err = check(fields[1]) if fields[0] == b"d" else f"fields {fields!r}"
        if err:
            return prev, n, f"{err} (ID {eid.decode()})"
        n += 1
    return prev, n, None


def _xread_all(conn: Any, key: str, n: int, count: int, check: Any,
               block_ms: int | None = None) -> tuple[int, list[str], int]:
    """XREAD ``n`` entries from the start of ``key``, ``count`` per call (with
    ``block_ms``: waiting that long for more), each checked by :func:`_take_entries`.
    Returns ``(entries taken, errors, time_ns of the first answer)``."""
    send, read = conn.send_command, conn.read_response
    block = ("BLOCK", block_ms) if block_ms is not None else ()
    errors: list[str] = []
    last = b"0-0"
    prev = (0, 0)
    got = 0
    t_first = 0
    while got < n:
        send("XREAD", "COUNT", min(count, n - got), *block, "STREAMS", key, last)
        resp = read()
        if not resp:
            errors.append(f"nothing for {block_ms / 1000:.0f} s after {got} of {n}"
                          if block_ms is not None else f"the stream ended after {got} of {n}")
            break
        if not t_first:
            t_first = time.time_ns()
        entries = resp[0][1]
        prev, ok, err = _take_entries(entries, prev, check)
        got += ok
        if err:
            errors.append(err)
            break
        last = entries[-1][0]
    return got, errors, t_first


def redis_cons(a: dict[str, Any]) -> dict[str, Any]:
    """XREAD BLOCK from ``0``, COUNT ``count``: every entry's ID greater than the
    last (the stream's total order) and every producer's 1..N once, in order."""
    from .worker import cpu_s, say
    conn = _redis_conn(a)
    key = a.get("stream", STREAM)
    total, count = a["n_total"], a["count"]
    idle_ms = int(a.get("idle_s", 30) * 1000)
    conn.send_command("PING")
    conn.read_response()
    say("READY")
    chk = PerProducer(a["producers"], a["n_per"])
    c0 = cpu_s()
    got, errors, t_first = _xread_all(conn, key, total, count, chk.check, block_ms=idle_ms)
    t_end = time.time_ns()
    conn.disconnect()
    if not errors and chk.missing():
        errors.append(chk.missing() or "")
    return {"ok": not errors and got == total, "received": got, "errors": errors,
            "per_producer": chk.per_producer(), "t_first_ns": t_first, "t_end_ns": t_end,
            "cpu_s": cpu_s() - c0}


def redis_reader(a: dict[str, Any]) -> dict[str, Any]:
    """A late reader: ``n`` records from the start of a filled stream with
    XREAD COUNT (no BLOCK), IDs increasing, producer seqs 1..n in order.
    With ``fill`` it first fills the stream itself (untimed)."""
    from .worker import cpu_s, say, wait_go
    fill = None
    if a.get("fill"):
        t = time.perf_counter()
        fill = redis_prod({**a, "idx": 0, "no_go": True, "pipeline": 1000, "window": 8})
        if not fill["ok"]:
            raise RuntimeError(f"filling the stream failed: {fill['errors']}")
        fill["seconds"] = round(time.perf_counter() - t, 2)
    conn = _redis_conn(a)
    key = a.get("stream", STREAM)
    n, count = a["n"], a["count"]
    conn.send_command("XLEN", key)
    have = conn.read_response()
    if have < n:
        raise RuntimeError(f"the stream holds {have} records, need {n}")
    say("READY")
    wait_go()
    chk = PerProducer(1, n)
    c0 = cpu_s()
    t0 = time.time_ns()
    got, errors, t_first = _xread_all(conn, key, n, count, chk.check)
    t_end = time.time_ns()
    conn.disconnect()
    return {"ok": not errors and got == n, "received": got, "errors": errors,
            "t_start_ns": t0, "t_first_ns": t_first, "t_end_ns": t_end,
            "cpu_s": cpu_s() - c0, "fill": fill}


# --- worker side: NATS JetStream -----------------------------------------------------------


async def _nats_connect(a: dict[str, Any]) -> Any:
    import nats
    return await nats.connect(f"nats://127.0.0.1:{a['port']}", connect_timeout=5,
                              max_reconnect_attempts=0, allow_reconnect=False)


def nats_setup(a: dict[str, Any]) -> dict[str, Any]:
    """Create the stream (file storage, every message kept) on ``bench.>``."""
    import asyncio

    async def run() -> dict[str, Any]:
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig
        nc = await _nats_connect(a)
        js = nc.jetstream()
        deadline = time.monotonic() + 30
        while True:      # JetStream may still be starting up
            try:
                info = await js.add_stream(StreamConfig(
                    name="BENCH", subjects=["bench.>"], storage=StorageType.FILE,
                    retention=RetentionPolicy.LIMITS, max_msgs=-1, max_bytes=-1))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        acc = await js.account_info()
        await nc.close()
        return {"ok": True, "stream": info.config.name, "storage": str(info.config.storage),
                "account_store": str(getattr(acc, "limits", ""))[:200]}

    return asyncio.run(run())


def nats_prod(a: dict[str, Any]) -> dict[str, Any]:
    """``publish_async`` ``n`` messages on ``bench.p<idx>`` with ``window`` acks
    outstanding; counts a message only when its JetStream ack came back."""
    import asyncio

    from .worker import cpu_s, say, wait_go

    async def run() -> dict[str, Any]:
        nc = await _nats_connect(a)
        js = nc.jetstream(publish_async_max_pending=a["window"])
        idx, n = a["idx"], a["n"]
        subj = f"bench.p{idx}"
        errors: list[str] = []
        state = {"acked": 0, "last_seq": 0}

        def done(f: Any) -> None:
            if f.cancelled():
                errors.append("ack cancelled")
                return
            exc = f.exception()
            if exc is not None:
                if len(errors) < 5:
                    errors.append(f"publish failed: {type(exc).__name__}: {exc}")
                return
            ack = f.result()
            if ack.stream != "BENCH" or ack.duplicate:
                if len(errors) < 5:
                    errors.append(f"unexpected ack {ack}")
                return
            state["acked"] += 1
            state["last_seq"] = max(state["last_seq"], ack.seq)

        say("READY")
        await asyncio.get_running_loop().run_in_executor(None, wait_go)
        c0 = cpu_s()
        t0 = time.time_ns()
        pub = js.publish_async
        chunk = 4096
        for s in range(0, n, chunk):
            for p in _payloads(idx, s + 1, min(n, s + chunk)):
                fut = await pub(subj, p)    # a wait_stall timeout would flush each message alone
                fut.add_done_callback(done)
        await asyncio.wait_for(js.publish_async_completed(), a.get("timeout", 120))
        await asyncio.sleep(0)           # the last done-callbacks
        t1 = time.time_ns()
        await nc.close()
        return {"ok": not errors and state["acked"] == n, "acked": state["acked"],
                "errors": errors, "last_seq": state["last_seq"], "t_start_ns": t0,
                "t_acked_ns": t1, "cpu_s": cpu_s() - c0}

    return asyncio.run(run())


def _js_stream_seq(reply: str) -> int:
    """The stream seq in a JetStream delivery's reply subject:
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>``
    (v1), or with ``<domain>.<account hash>`` after ``ACK`` (v2)."""
    t = reply.split(".")
    return int(t[5] if len(t) == 9 else t[7])


def nats_cons(a: dict[str, Any]) -> dict[str, Any]:
    """An ordered push consumer on ``bench.>`` from the first message: stream
    seqs 1..N gap-free (the stream's total order), every producer's 1..N once."""
    import asyncio

    from .worker import cpu_s, say

    async def run() -> dict[str, Any]:
        from nats.js.api import DeliverPolicy
        nc = await _nats_connect(a)
        js = nc.jetstream()
        total = a["n_total"]
        chk = PerProducer(a["producers"], a["n_per"])
        check = chk.check
        errors: list[str] = []
        st = {"expect": 1, "t_first": 0}
        finished = asyncio.Event()

        async def on_msg(m: Any) -> None:
            if finished.is_set():
                return
            if not st["t_first"]:
                st["t_first"] = time.time_ns()
            e = st["expect"]
            sseq = _js_stream_seq(m.reply)
            err = (f"stream seq {sseq}, expected {e}" if sseq != e else check(m.data))
            if err:
                errors.append(err)
                finished.set()
                return
            st["expect"] = e + 1
            if e == total:
                st["t_end"] = time.time_ns()
                finished.set()

        sub = await js.subscribe("bench.>", cb=on_msg, ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.ALL)
        say("READY")
        c0 = cpu_s()
        idle = a.get("idle_s", 30)
        while not finished.is_set():
            before = st["expect"]
            try:
                await asyncio.wait_for(finished.wait(), idle)
            except TimeoutError:
                if st["expect"] == before:
                    errors.append(f"nothing for {idle} s at stream seq {before} of {total}")
                    break
        t_end = st.get("t_end") or time.time_ns()
        got = st["expect"] - 1
        with contextlib.suppress(Exception):    # the figures are in: closing is best effort
            await sub.unsubscribe()
            await nc.close()
        if not errors and chk.missing():
            errors.append(chk.missing() or "")
        return {"ok": not errors and got == total, "received": got, "errors": errors,
                "per_producer": chk.per_producer(), "t_first_ns": st["t_first"],
                "t_end_ns": t_end, "cpu_s": cpu_s() - c0}

    return asyncio.run(run())


# --- worker side: MQTT (Mosquitto) ---------------------------------------------------------


def _mqtt_client(cid: str) -> Any:
    import paho.mqtt.client as mqtt
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True,
                       protocol=mqtt.MQTTv311)


def _mqtt_connect(c: Any, port: int) -> None:
    up = threading.Event()
    c.on_connect = lambda cl, ud, flags, rc, props: up.set()
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    if not up.wait(10):
        raise RuntimeError("no CONNACK from mosquitto within 10 s")


def mqtt_prod(a: dict[str, Any]) -> dict[str, Any]:
    """QoS 1 publish of ``n`` messages on ``bench/p<idx>`` with at most ``window``
    unacked; counts a message only on its PUBACK. The window is kept here, not
    by paho (whose own in-flight limit rescans every queued message per ack)."""
    from .worker import cpu_s, say, wait_go
    idx, n, window = a["idx"], a["n"], a["window"]
    c = _mqtt_client(f"bench-p{idx}")
    c.max_inflight_messages_set(0)            # no limit in paho: the window below
    errors: list[str] = []
    acked = [0]
    target = [n + 1]
    room = threading.Event()

    def on_publish(cl: Any, ud: Any, mid: int, rc: Any, props: Any) -> None:
        acked[0] += 1                          # paho calls this once per PUBACK
        if acked[0] >= target[0]:
            room.set()

    c.on_publish = on_publish
    _mqtt_connect(c, a["port"])
    say("READY")
    wait_go()
    c0 = cpu_s()
    t0 = time.time_ns()
    topic = f"bench/p{idx}"
    pub = c.publish
    idle = a.get("idle_s", 30)
    for sent, p in enumerate(_payloads(idx, 1, n)):
        if sent - acked[0] >= window:          # wait until half the window is acked
            room.clear()
            target[0] = sent - window // 2
            if acked[0] < target[0] and not room.wait(idle):
                errors.append(f"no PUBACK for {idle} s: {acked[0]} of {sent} acked")
                break
        info = pub(topic, p, qos=1)
        if info.rc != 0:
            errors.append(f"publish returned {info.rc}")
            break
    if not errors:
        room.clear()
        target[0] = n
        if acked[0] < n and not room.wait(a.get("timeout", 120)):
            errors.append(f"only {acked[0]} of {n} acked")
    t1 = time.time_ns()
    c.disconnect()
    c.loop_stop()
    return {"ok": not errors and acked[0] == n, "acked": acked[0], "errors": errors,
            "t_start_ns": t0, "t_acked_ns": t1, "cpu_s": cpu_s() - c0}


def mqtt_cons(a: dict[str, Any]) -> dict[str, Any]:
    """QoS 1 subscriber on ``bench/#``: every producer's 1..N once, in order
    (MQTT orders per publisher, there is no total order to check)."""
    from .worker import cpu_s, say
    idx, total = a["idx"], a["n_total"]
    c = _mqtt_client(f"bench-c{idx}")
    chk = PerProducer(a["producers"], a["n_per"])
    check = chk.check
    errors: list[str] = []
    st = {"got": 0, "t_first": 0, "t_end": 0}
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(cl: Any, ud: Any, m: Any) -> None:
        if done.is_set():
            return
        if not st["t_first"]:
            st["t_first"] = time.time_ns()
        err = check(m.payload)
        if err:
            errors.append(err + (" (DUP flag set)" if m.dup else ""))
            done.set()
            return
        st["got"] += 1
        if st["got"] == total:
            st["t_end"] = time.time_ns()
            done.set()

    c.on_message = on_message
    c.on_subscribe = lambda cl, ud, mid, rcs, props: subscribed.set()
    _mqtt_connect(c, a["port"])
    c.subscribe("bench/#", qos=1)
    if not subscribed.wait(10):
        raise RuntimeError("no SUBACK within 10 s")
    say("READY")
    c0 = cpu_s()
    idle = a.get("idle_s", 30)
    while not done.is_set():
        before = st["got"]
        if not done.wait(idle) and st["got"] == before:
            errors.append(f"nothing for {idle} s after {before} of {total}")
            break
    t_end = st["t_end"] or time.time_ns()
    c.disconnect()
    c.loop_stop()
    if not errors and chk.missing():
        errors.append(chk.missing() or "")
    return {"ok": not errors and st["got"] == total, "received": st["got"], "errors": errors,
            "per_producer": chk.per_producer(), "t_first_ns": st["t_first"], "t_end_ns": t_end,
            "cpu_s": cpu_s() - c0}


ROLES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "redis_prod": redis_prod, "redis_cons": redis_cons, "redis_reader": redis_reader,
    "nats_setup": nats_setup, "nats_prod": nats_prod, "nats_cons": nats_cons,
    "mqtt_prod": mqtt_prod, "mqtt_cons": mqtt_cons,
}


# --- bench side: the servers ---------------------------------------------------------------


def _probe_redis(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


def _probe_nats(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        return s.recv(4096).startswith(b"INFO ")


def _probe_tcp(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


class Server:
    """A broker started from the bench on a free port with its config in ``d``;
    ready when ``probe(port)`` is true. A few tries, in case the port was taken
    between choosing it and binding it."""

    def __init__(self, ps: Procs, d: Path, name: str,
                 make: Callable[[int, Path], list[str]], probe: Callable[[int], bool],
                 timeout: float = 30.0) -> None:
        last = ""
        for attempt in range(3):
            (self.port,) = free_ports(1)
            wd = d / f"{name}-{attempt}"
            wd.mkdir(parents=True, exist_ok=True)
            self.dir = wd
            self.proc = ps.spawn(name, make(self.port, wd), stdin=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.alive():
                try:
                    if probe(self.port):
                        self.pid = self.proc.pid
                        self.cpu0 = proc_cpu_s(self.pid) or 0.0
                        return
                except OSError:
                    pass
                time.sleep(0.05)
            last = self.proc.tail()
            self.proc.kill()
        raise BenchFailure(f"{name} did not start{last}")

    def cpu_s(self) -> float:
        return (proc_cpu_s(self.pid) or 0.0) - self.cpu0

    def mem_kb(self) -> dict[str, int]:
        return proc_status_kb(self.pid)

    def stop(self) -> None:
        self.proc.stop(10)


def _redis_server(ps: Procs, d: Path) -> Server:
    exe = find_binary("redis-server", "redis-server")

    def make(port: int, wd: Path) -> list[str]:
        conf = wd / "redis.conf"
        conf.write_text(
            f"bind 127.0.0.1\nport {port}\nprotected-mode yes\ndaemonize no\n"
            f'dir {wd}\nlogfile ""\nloglevel warning\n'
            # durability as orbcast: the AOF is fsynced before the replies go out
            "appendonly yes\nappendfsync always\n"
            # no RDB snapshots, and no AOF rewrite (a fork) in the middle of a figure
            'save ""\nauto-aof-rewrite-percentage 0\n')
        return [exe, str(conf)]

    return Server(ps, d, "redis-server", make, _probe_redis)


def _nats_conf(port: int, wd: Path, sync_always: bool) -> Path:
    conf = wd / "nats.conf"
    store = wd / "js"
    conf.write_text(f'listen: "127.0.0.1:{port}"\n'
                    f'jetstream {{\n  store_dir: "{store}"\n'
                    + ("  sync_interval: always\n" if sync_always else "") + "}\n")
    return conf


def nats_sync_always_support(d: Path) -> tuple[bool, str]:
    """Whether this nats-server accepts ``sync_interval: always`` (2.10+): ``-t``
    checks a config without starting."""
    exe = find_binary("nats-server", "nats-server")
    d.mkdir(parents=True, exist_ok=True)
    conf = _nats_conf(4222, d, True)
    r = subprocess.run([exe, "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30,
                       check=False)
    lines = (r.stdout + r.stderr).strip().splitlines()
    return r.returncode == 0, lines[-1].rsplit(": ", 1)[-1] if lines else ""


def _nats_server(ps: Procs, d: Path, sync_always: bool) -> Server:
    exe = find_binary("nats-server", "nats-server")

    def make(port: int, wd: Path) -> list[str]:
        return [exe, "-c", str(_nats_conf(port, wd, sync_always))]

    return Server(ps, d, "nats-server", make, _probe_nats)


def _mosquitto(ps: Procs, d: Path, window: int) -> Server:
    exe = find_binary("mosquitto", "mosquitto")
    user = pwd.getpwuid(os.geteuid()).pw_name      # root stays root: no privilege drop

    def make(port: int, wd: Path) -> list[str]:
        conf = wd / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {user}\n"
            "persistence false\nlog_dest stdout\nlog_type error\nlog_type warning\n"
            # QoS 1 to a subscriber: as many in flight as the producers' window,
            # and never drop a queued message (the default drops past 1000)
            f"max_inflight_messages {window}\nmax_queued_messages 0\nmax_queued_bytes 0\n"
            # as ZeroMQ does: without it Nagle holds back small PUBACKs (40 ms stalls)
            "set_tcp_nodelay true\n")
        return [exe, "-c", str(conf)]

    return Server(ps, d, "mosquitto", make, _probe_tcp)


# --- bench side: the throughput workload ---------------------------------------------------


def _tput(ctx: Any, name: str, start: Callable[[Procs, Path], Server], prod_role: str,
          cons_role: str, extra: dict[str, Any], setup_role: str | None = None,
          producers: int = 2, consumers: int = 2) -> dict[str, Any]:
    """orb-64's workload against one peer: consumers READY first, then the
    producers, GO; msg/s from the first producer start to the last consumer done."""
    from .run import check, check_deliveries, deadline_for, results
    n_per = ctx.cfg["orb_n_per"]
    total = producers * n_per
    d = ctx.dir(name)
    with Procs(d) as ps:
        srv = start(ps, d)
        base = {"port": srv.port, "producers": producers, "n_per": n_per, "n_total": total,
                "idle_s": 30, **extra}
        if setup_role:
            check([ps.worker(f"{name}-setup", setup_role, base).result(60)], f"{name} setup")
        cons = [ps.worker(f"{name}-c{i}", cons_role, {**base, "idx": i})
                for i in range(consumers)]
        for c in cons:
            c.expect("READY", 30)
        to = deadline_for(total)
        prods = [ps.worker(f"{name}-p{i}", prod_role, {**base, "idx": i, "n": n_per, "timeout": to})
                 for i in range(producers)]
        for p in prods:
            p.expect("READY", 30)
        cpu0 = srv.cpu_s()
        for p in prods:
            p.send("GO")
        end = time.monotonic() + to
        pres = results(prods, end - time.monotonic())
        cres = results(cons, end - time.monotonic())
        cpu = srv.cpu_s() - cpu0
        mem = srv.mem_kb()
        srv.stop()
    check(pres + cres, name)
    for pr in pres:
        if pr["acked"] != n_per:
            raise BenchFailure(f"VERIFICATION FAILED in {name}: a producer had {pr['acked']} "
                               f"of {n_per} acked")
    check_deliveries(cres, name, total=total, n_per=n_per, producers=producers)
    t0 = min(r["t_start_ns"] for r in pres)
    t_pub = max(r["t_acked_ns"] for r in pres)
    t1 = max(r["t_end_ns"] for r in cres)
    return {"msg_s": total / ((t1 - t0) / 1e9), "publish_msg_s": total / ((t_pub - t0) / 1e9),
            "n": total, "size": SIZE, "producers": producers, "consumers": consumers,
            "verified": True, "server_cpu_s": round(cpu, 3),
            "server_cpu_us_per_msg": round(cpu / total * 1e6, 2),
            "server_vmhwm_kb": mem.get("VmHWM"),
            "producer_cpu_us_per_msg": round(sum(r["cpu_s"] for r in pres) / total * 1e6, 2),
            "consumer_cpu_us_per_msg": round(sum(r["cpu_s"] for r in cres) / len(cres)
                                             / total * 1e6, 2)}


def bench_redis_tput(ctx: Any) -> None:
    need_client("redis", "redis")
    ver = _version("redis-server", [find_binary("redis-server", "redis-server"), "--version"])
    c = ctx.cfg
    r = _tput(ctx, "redis", _redis_server, "redis_prod", "redis_cons",
              {"pipeline": c["redis_pipeline"], "window": c["redis_window"],
               "count": c["redis_count"]})
    r.update(server=ver, client=f"redis-py {need_client('redis', 'redis')}",
             hiredis=importlib.util.find_spec("hiredis") is not None,
             durability="appendonly yes, appendfsync always (fsync before the reply)",
             pipeline=c["redis_pipeline"], window=c["redis_window"], count=c["redis_count"])
    ctx.results["redis"] = r
    _log(f"Redis Streams 64 B (appendfsync always): {r['msg_s']:,.0f} msg/s delivered, "
         f"publish {r['publish_msg_s']:,.0f} msg/s, server {r['server_cpu_us_per_msg']} us CPU/msg")


def bench_redis_replay(ctx: Any) -> None:
    """A late reader of ``replay_n`` records (orbcast's replay size) from the start."""
    from .run import check, deadline_for
    need_client("redis", "redis")
    n = ctx.cfg["replay_n"]
    d = ctx.dir("redis-replay")
    with Procs(d) as ps:
        srv = _redis_server(ps, d)
        rd = ps.worker("redis-reader", "redis_reader",
                       {"port": srv.port, "n": n, "count": 4096, "fill": True, "idle_s": 60})
        rd.expect("READY", deadline_for(n, 10_000))
        cpu0 = srv.cpu_s()
        rd.send("GO")
        r = rd.result(deadline_for(n, 5_000))
        cpu = srv.cpu_s() - cpu0
        mem = srv.mem_kb()
        srv.stop()
    check([r], "redis-replay")
    secs = (r["t_end_ns"] - r["t_start_ns"]) / 1e9
    fill = r.get("fill") or {}
    ctx.results["redis-replay"] = {
        "records_s": n / secs, "n": n, "size": SIZE, "seconds": round(secs, 3),
        "verified": True, "count": 4096,
        "first_record_ms": round((r["t_first_ns"] - r["t_start_ns"]) / 1e6, 1),
        "reader_cpu_us_per_rec": round(r["cpu_s"] / n * 1e6, 2),
        "server_cpu_us_per_rec": round(cpu / n * 1e6, 2), "server_vmhwm_kb": mem.get("VmHWM"),
        "fill_s": fill.get("seconds")}
    _log(f"Redis Streams late reader: {n / secs:,.0f} records/s from the start "
         f"({n:,} records filled in {fill.get('seconds')} s)")


def bench_redis(ctx: Any) -> None:
    run_parts(ctx, (bench_redis_tput, bench_redis_replay))


def bench_nats(ctx: Any) -> None:
    """Default durability (fsync every 2 minutes), and ``sync_interval: always``
    where the server has it."""
    need_client("nats", "nats-py")
    exe = find_binary("nats-server", "nats-server")
    ver = _version("nats-server", [exe, "--version"])
    supported, why = nats_sync_always_support(ctx.tmp / "nats-probe")
    runs = [("nats", False)] + ([("nats-sync-always", True)] if supported else [])
    for key, always in runs:
        r = _tput(ctx, key, functools.partial(_nats_server, sync_always=always), "nats_prod",
                  "nats_cons", {"window": ctx.cfg["nats_window"]}, setup_role="nats_setup")
        r.update(server=ver, client=f"nats-py {need_client('nats', 'nats-py')}",
                 window=ctx.cfg["nats_window"],
                 durability=("sync_interval: always (fsync every write)" if always else
                             "DEFAULT: fsync every 2 min (sync_interval), ack before fsync"))
        ctx.results[key] = r
        _log(f"NATS JetStream 64 B ({r['durability']}): {r['msg_s']:,.0f} msg/s delivered, "
             f"publish {r['publish_msg_s']:,.0f} msg/s")
    if not supported:
        note = f"{ver} refuses 'sync_interval: always' ({why}), 2.10+ has it"
        ctx.results["nats"]["sync_always"] = note
        _log("NATS JetStream with fsync on every write: not measured: " + note)


def bench_mosquitto(ctx: Any) -> None:
    need_client("paho.mqtt", "paho-mqtt")
    exe = find_binary("mosquitto", "mosquitto")
    ver = _version("mosquitto", [exe, "-h"])
    w = ctx.cfg["mqtt_window"]
    r = _tput(ctx, "mosquitto", lambda ps, d: _mosquitto(ps, d, w), "mqtt_prod", "mqtt_cons",
              {"window": w})
    r.update(server=ver, client=f"paho-mqtt {need_client('paho.mqtt', 'paho-mqtt')}", window=w,
             durability="no fsync, no replay: QoS 1 acked from memory")
    ctx.results["mosquitto"] = r
    _log(f"Mosquitto QoS 1 64 B (no fsync, no replay): {r['msg_s']:,.0f} msg/s delivered, "
         f"publish {r['publish_msg_s']:,.0f} msg/s")
