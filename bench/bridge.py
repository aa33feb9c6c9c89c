"""Firmware bridge benchmarks (issue 6): ``--only bridge`` (or ``bridge-idle``, ``bridge-press``).

* **bridge-idle**: ``python -m firmware_bridge run --config FILE`` with
  ``GPIOZERO_PIN_FACTORY=mock`` and 10 sampled sensors at 1 Hz (5 DS18B20
  thermometers on w1 files in a temp dir, 5 CPUTemperature on fake sysfs
  files), publishing to a real single node (fsync on). After a settle, the
  bridge's CPU seconds (/proc/PID/stat) over ``bridge_idle_s`` of wall time
  (share of one core), and its peak RSS (VmHWM) at the end. Verified: the
  node sequenced ~10 readings per second from it during the window.
* **bridge-press**: a worker runs :class:`firmware_bridge.Bridge` in-process
  on gpiozero's MockFactory with one Button and drives the mock pin low/high
  at random intervals, stamping ``time.time_ns()`` just before each
  ``drive_low()``; a separate consumer plant stamps each delivery. Presses
  are matched by counting edges: the k-th ``True`` reading delivered is the
  k-th press (nothing is put in payloads the bridge does not write).
  Verified: every press and release arrives once, in order.

Worker roles (run by :mod:`bench.worker`): ``bridge_press``, ``bridge_cons``.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

from .proc import PY, BenchFailure, Procs, proc_cpu_s, proc_status_kb, run_parts

__all__ = [
    "CFG_FULL",
    "CFG_QUICK",
    "ROLES",
    "bench_bridge",
    "bench_bridge_idle",
    "bench_bridge_press",
]

CFG_FULL: dict[str, Any] = {"bridge_idle_s": 20.0, "bridge_presses": 200}
CFG_QUICK: dict[str, Any] = {"bridge_idle_s": 10.0, "bridge_presses": 60}

W1_OK = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t={}\n"
MOCK_ENV = {"GPIOZERO_PIN_FACTORY": "mock"}


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _plant_toml(ingress: str, pid: str, data: Path) -> str:
    return (f'[plant]\nsequencers = ["{ingress}"]\nproducer_id = "{pid}"\n'
            f'data = "{data}"\nrequest_timeout_ms = 500\n')


# --- workers ---------------------------------------------------------------------------


def bridge_press(a: dict[str, Any]) -> dict[str, Any]:
    """The Bridge in this process on a MockFactory, one Button on pin 17;
    after GO, ``presses`` press/release cycles at random intervals."""
    from gpiozero.pins.mock import MockFactory

    from firmware_bridge import Bridge, loads

    from .worker import cpu_s, say, wait_go
    f = MockFactory()
    text = (_plant_toml(a["ingress"], "bench-bridge-press", Path(a["data"]))
            + '[bridge]\nhealth_topic = "health/bench-bridge-press"\n'
            + f'[[input]]\ntype = "Button"\npin = 17\ntopic = "{a["topic"]}"\n')
    b = Bridge(loads(text, environ={}), pin_factory=f)
    b.start()
    t = threading.Thread(target=b.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while b.last_seq == 0:              # the state at start is acked: the plant is up
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bridge's first reading was not acked: {b.status()}")
            time.sleep(0.01)
        pin = f.pin(17)
        rng = random.Random(a.get("seed", 6))
        say("READY")
        wait_go()
        c0 = cpu_s()
        presses: list[int] = []
        for _k in range(a["presses"]):
            time.sleep(rng.uniform(a.get("gap_lo", 0.02), a.get("gap_hi", 0.06)))
            presses.append(time.time_ns())
            pin.drive_low()                     # pull-up: low = pressed
            time.sleep(rng.uniform(a.get("hold_lo", 0.01), a.get("hold_hi", 0.04)))
            pin.drive_high()
        assert b.plant is not None
        b.plant.flush(timeout=60)
        return {"ok": True, "presses": presses, "counters": dict(b.counters),
                "status": b.status(), "cpu_s": cpu_s() - c0}
    finally:
        b.stop()
        t.join(5)
        b.close()


def bridge_cons(a: dict[str, Any]) -> dict[str, Any]:
    """A Plant subscribed to ``topic`` from seq 1: decodes every reading and
    stamps its delivery; returns [value, reading time, delivery time] each."""
    from orbcast.errors import OrbcastTimeout
    from orbcast.messages import decode_reading

    from .worker import _plant, cpu_s, say
    p = _plant(a, "bench-bridge-cons")
    errors: list[str] = []
    try:
        sub = p.subscribe(a["topic"], start=1)
        deadline = time.monotonic() + 10
        while p.counters["heartbeats"] == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("no heartbeat from the node within 10 s")
            time.sleep(0.01)
        say("READY")
        want = a["n_expected"]
        got: list[list[Any]] = []
        last_seq = 0
        c0 = cpu_s()
        while len(got) < want:
            try:
                m = sub.get(timeout=a.get("idle_s", 30))
            except OrbcastTimeout:
                errors.append(f"no reading for {a.get('idle_s', 30)} s after {len(got)} of {want}")
                break
            now = time.time_ns()
            if m is None:
                errors.append(f"subscription ended after {len(got)}")
                break
            if m.seq <= last_seq:
                errors.append(f"seq {m.seq} after {last_seq}")
                break
            last_seq = m.seq
            r = decode_reading(m.payload)
            got.append([r.value, r.time, now])
        return {"ok": not errors, "errors": errors, "readings": got, "cpu_s": cpu_s() - c0}
    finally:
        p.close()


ROLES = {"bridge_press": bridge_press, "bridge_cons": bridge_cons}


# --- benchmarks ----------------------------------------------------------------------


def _pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(q * len(s)))]


def bench_bridge_idle(ctx: Any) -> None:
    from .run import Node
    window = ctx.cfg["bridge_idle_s"]
    d = ctx.dir("bridge-idle")
    w1 = d / "w1"
    inputs = []
    for i in range(5):
        sid = f"28-00000bench{i:02d}"
        (w1 / sid).mkdir(parents=True)
        (w1 / sid / "w1_slave").write_text(W1_OK.format(21000 + 125 * i))
        inputs.append(f'[[input]]\ntype = "DS18B20"\nsensor_id = "{sid}"\n'
                      f'topic = "sensors/bench/w1-{i}"\ninterval = 1.0\n')
    for i in range(5):
        tf = d / f"thermal_zone{i}_temp"
        tf.write_text(f"{45000 + 500 * i}\n")
        inputs.append(f'[[input]]\ntype = "CPUTemperature"\nsensor_file = "{tf}"\n'
                      f'topic = "sensors/bench/cpu-{i}"\ninterval = 1.0\n')
    with Procs(d) as ps:
        node = Node(ps, d / "node", "bridge-idle-node")
        cfg = d / "bridge.toml"
        cfg.write_text(_plant_toml(node.ingress, "bench-bridge-idle", d / "bridge-data")
                       + f'[bridge]\nhealth_topic = "health/bench-bridge-idle"\nw1_path = "{w1}"\n'
                       + "".join(inputs))
        br = ps.spawn("bridge", [PY, "-m", "firmware_bridge", "run", "--config", str(cfg),
                                 "--log-level", "warning"], env=MOCK_ENV, stdin=False)

        def sequenced() -> int:
            return int((node.status().get("counters") or {}).get("sequenced", 0))

        deadline = time.monotonic() + 30
        while sequenced() < 10:
            if not br.alive() or time.monotonic() > deadline:
                raise BenchFailure(f"the bridge published nothing within 30 s{br.tail()}")
            time.sleep(0.1)
        time.sleep(2.0)                          # settle: imports, first fsyncs, plant start
        s0, c0, t0 = sequenced(), proc_cpu_s(br.pid), time.monotonic()
        time.sleep(window)
        s1, c1, t1 = sequenced(), proc_cpu_s(br.pid), time.monotonic()
        mem = proc_status_kb(br.pid)
        if c0 is None or c1 is None:
            raise BenchFailure(f"the bridge exited during the window{br.tail()}")
        rc = br.stop(15)
        node.stop()
    wall = t1 - t0
    pubs = s1 - s0
    if pubs < 0.8 * 10 * wall:
        raise BenchFailure(f"VERIFICATION FAILED in bridge-idle: {pubs} readings sequenced in "
                           f"{wall:.1f} s, expected ~{10 * wall:.0f} (10 sensors at 1 Hz)")
    if rc not in (0, None):
        _log(f"warning: the bridge exited with {rc} on SIGTERM")
    cpu = (c1 - c0) / wall
    out = {"cpu_share": cpu, "cpu_pct": cpu * 100, "cpu_s": round(c1 - c0, 3),
           "wall_s": round(wall, 2), "vmhwm_kb": mem.get("VmHWM"), "vmrss_kb": mem.get("VmRSS"),
           "sensors": 10, "readings_in_window": pubs, "readings_s": round(pubs / wall, 2),
           "exit_code": rc, "verified": True}
    ctx.results["bridge-idle"] = out
    _log(f"bridge-idle: {cpu:.2%} of one core over {wall:.1f} s ({pubs} readings), "
         f"VmHWM {(mem.get('VmHWM') or 0) / 1024:.1f} MB")


def bench_bridge_press(ctx: Any) -> None:
    from .run import Node, check, results
    presses = ctx.cfg["bridge_presses"]
    topic = "sensors/bench/btn"
    d = ctx.dir("bridge-press")
    with Procs(d) as ps:
        node = Node(ps, d / "node", "bridge-press-node")
        cons = ps.worker("bridge-cons", "bridge_cons",
                         {"ingress": node.ingress, "data": str(d / "cons"), "topic": topic,
                          "n_expected": 1 + 2 * presses})
        cons.expect("READY", 30)
        pr = ps.worker("bridge-press", "bridge_press",
                       {"ingress": node.ingress, "data": str(d / "bridge-data"), "topic": topic,
                        "presses": presses}, env=MOCK_ENV)
        pr.expect("READY", 60)
        pr.send("GO")
        to = 60 + presses * 0.2
        pres, cres = results([pr], to)[0], results([cons], to)[0]
        node.stop()
    check([pres, cres], "bridge-press")
    rd = cres["readings"]
    vals = [v for v, _t, _d in rd]
    want = [False] + [True, False] * presses
    if vals != want:
        bad = next(i for i, (x, y) in enumerate(zip(vals + [None] * len(want), want)) if x != y)
        raise BenchFailure(f"VERIFICATION FAILED in bridge-press: reading {bad} is "
                           f"{vals[bad] if bad < len(vals) else 'missing'}, expected {want[bad]} "
                           f"({len(vals)} readings for {presses} presses)")
    trues = [r for r in rd if r[0] is True]
    lat = [(r[2] - t) / 1e6 for r, t in zip(trues, pres["presses"])]
    stamp = [(r[1] - t) / 1e6 for r, t in zip(trues, pres["presses"])]
    rel = [(r[2] - r[1]) / 1e6 for r in rd[1:]]
    out = {"presses": presses, "n": len(lat), "p50_ms": _pct(lat, 0.5), "p90_ms": _pct(lat, 0.9),
           "p99_ms": _pct(lat, 0.99), "max_ms": max(lat), "mean_ms": sum(lat) / len(lat),
           "press_to_reading_stamp_p99_ms": _pct(stamp, 0.99),
           "reading_stamp_to_delivery_p99_ms": _pct(rel, 0.99),
           "bridge_counters": pres["counters"], "verified": True}
    ctx.results["bridge-press"] = out
    _log(f"bridge-press: press -> delivery p50 {out['p50_ms']:.1f} ms, p99 {out['p99_ms']:.1f} ms, "
         f"max {out['max_ms']:.1f} ms over {presses} presses")


def bench_bridge(ctx: Any) -> None:
    run_parts(ctx, (bench_bridge_idle, bench_bridge_press))
