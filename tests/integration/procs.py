"""Child-process entry points for the integration tests.

Run as ``python -m tests.integration.procs ROLE ...``. Every process writes
what it did to a file, one line per fact, flushed as it goes, so a test can
read it even after a ``kill -9``:

publisher: ``A pseq`` when publish accepted a message into the outbox,
           ``K pseq seq`` when its ack arrived, ``F`` when all were acked,
           ``R n`` at start when an earlier run left n messages in the outbox.
consumer:  ``D seq producer pseq`` per delivered message, and a final
           ``S {json tracker stats}`` line when it stops by itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from orbcast.config import PlantConfig
from orbcast.errors import OrbcastTimeout
from plant.client import Plant


def _debug_dump(p: Plant) -> None:
    """On SIGUSR1 print the plant's internals (a test that times out asks)."""
    import signal

    def dump(*_: object) -> None:
        print("DEBUG", json.dumps({"local": p.local_status(), "current": p._current_ep,
                                    "active": p._active_ep, "known": p._known_eps,
                                    "max_epoch": p._max_epoch, "failover_s": p._failover_s,
                                    "unsent": len(p._unsent), "inflight": len(p._inflight),
                                    "node": str(p._node), "resend_at": p._resend_at,
                                    "now": time.monotonic(), "active_seen": p._active_seen},
                                   default=str), flush=True)
    signal.signal(signal.SIGUSR1, dump)


def _cfg(a: argparse.Namespace) -> PlantConfig:
    sec = {}
    if a.keys:      # link security on: the test's Keyring made these files
        sec = {"security": "ratchet", "identity": f"{a.keys}/{a.producer_id}.key",
               "pins": f"{a.keys}/pins.toml"}
    return PlantConfig(sequencers=a.sequencer, producer_id=a.producer_id, data=a.data,
                       request_timeout_ms=a.request_timeout_ms, **sec)


def publisher(a: argparse.Namespace) -> int:
    """Publish ``count`` messages in groups of ``batch`` (each group is
    waited for until accepted into the outbox, then logged as ``A``); acks
    are logged as ``K`` as they arrive. ``window`` bounds the unacked
    tickets; ``rate`` shapes the load (messages per second)."""
    out = open(a.out, "a", buffering=1 << 16)
    with Plant(_cfg(a), on_full="block") as p:
        _debug_dump(p)
        if p.outbox_depth:
            out.write(f"R {p.outbox_depth}\n")
        unacked: list = []
        i = 0
        while i < a.count:
            group = [p.publish_nowait(a.topic, f"{a.producer_id}:{j}".encode())
                     for j in range(i, min(i + a.batch, a.count))]
            i += len(group)
            for t in group:
                out.write(f"A {t.wait_accepted(120)}\n")
            out.flush()
            unacked.extend(group)
            unacked = _report_acks(out, unacked, block=len(unacked) > a.window)
            if a.rate:
                time.sleep(len(group) / a.rate)   # load shaping, not synchronisation
        p.flush(a.flush_timeout)
        _report_acks(out, unacked, block=True)
        out.write("F\n")
        out.flush()
    out.close()
    return 0


def _report_acks(out, tickets: list, *, block: bool) -> list:  # type: ignore[no-untyped-def]
    """Log ``K`` for acked tickets; with ``block`` wait for all of them."""
    keep = []
    for t in tickets:
        if block or t.done():
            out.write(f"K {t.pseq} {t.result(300)}\n")
        else:
            keep.append(t)
    out.flush()
    return keep


def consumer(a: argparse.Namespace) -> int:
    out = open(a.out, "a", buffering=1 << 16)
    with Plant(_cfg(a)) as p:
        _debug_dump(p)
        start = a.start if not a.start.isdigit() else int(a.start)
        sub = p.subscribe(a.topic, start=start, checkpoint=a.checkpoint)
        n = 0
        while a.count is None or n < a.count:
            try:
                m = sub.get(timeout=a.idle_timeout)
            except OrbcastTimeout:
                break
            if m is None:
                break
            out.write(f"D {m.seq} {m.producer} {m.producer_seq}\n")
            n += 1
            if a.slow and n % 100 == 0:
                time.sleep(a.slow)
            if a.stop_at and m.seq >= a.stop_at:
                break
            if n % 1000 == 0:
                out.flush()
        sub.close()
        out.write("S " + json.dumps({**sub.tracker.stats(), "delivered": n}) + "\n")
        out.flush()
    out.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["publisher", "consumer"])
    ap.add_argument("--sequencer", action="append", required=True)
    ap.add_argument("--producer-id", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--topic", default="t/a")
    ap.add_argument("--count", type=int, default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rate", type=float, default=0)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--flush-timeout", type=float, default=300)
    ap.add_argument("--start", default="1")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--idle-timeout", type=float, default=120)
    ap.add_argument("--slow", type=float, default=0)
    ap.add_argument("--stop-at", type=int, default=0)
    ap.add_argument("--request-timeout-ms", type=int, default=500)
    ap.add_argument("--keys", default=None, help="link security: the test keyring's directory")
    a = ap.parse_args(argv)
    return {"publisher": publisher, "consumer": consumer}[a.role](a)


if __name__ == "__main__":
    sys.exit(main())
