"""``python -m bench.run [--quick] [--big] [--only NAMES] [--profile]`` (``make bench``).

Runs every benchmark in one go with real processes on loopback, prints a
table with the ratios orbcast / ceiling and the targets of issues 2 and 3,
and writes ``bench/results/latest.json``. Exits non-zero if any consumer
failed to verify every message once, in order (or a benchmark could not
finish): such a figure is not a result.

Benchmarks (names for ``--only``):

  pushpull     raw pyzmq PUSH -> PULL, 64 B frames, 2 producer processes
  mini-msg     minimal ROUTER -> PUB loop, one frame + one ack per message
  mini-batch   the same loop, batched frames and acks (the ceiling of issue 2)
  mini-lat     the loop's end-to-end latency at 1,000 and 10,000 msg/s
  orb-64       orbcast throughput, 64 B, 2 producers + 2 consumers, fsync on
  orb-1k       the same with 1 KiB payloads
  orb-lat      orbcast latency p50/p99 at 1,000 and 10,000 msg/s (+ disk outbox at 1k)
  replay       a plant replaying 1..N from a pre-filled log
  rss          sequencer peak RSS serving a 1 GB log (64 MB with --quick, unless --big)
  loss         orb-64 with 5 % of egress batches dropped (issue 3)
  outbox       publish throughput with the on-disk outbox vs MemoryOutbox (issue 3)
  ha           issue 4: ha-tput (orb-64 against a primary/standby pair in sync vs a single
               node, interleaved) and ha-failover (SIGKILL of the active node under load:
               kill -> first new-epoch message at every consumer, 20 rounds), bench/ha.py
  bridge       issue 6: bridge-idle (CPU and peak RSS of firmware-bridge with 10 sensors
               at 1 Hz) and bridge-press (mock Button press -> consuming plant), bench/bridge.py
               (each part also runs alone: ha-tput, ha-failover, bridge-idle, bridge-press)
  sec          issue 5: sec-tput (orb-64 with link security vs without, interleaved) and
               sec-replay (a whole-log replay, secured vs not) and sec-handshake
               (LINK_HELLO -> sealed PONG on a fresh connection), bench/security.py
  redis        peer: Redis Streams, appendfsync always, orb-64's workload (pipelined XADD,
               XREAD BLOCK), and redis-replay (a late reader of replay's N from the start)
  nats         peer: NATS JetStream (its default fsync every 2 min; sync_interval always too
               where the server has it), async publish acks, ordered push consumers
  mosquitto    peer: Mosquitto, QoS 1 in and out (acks from memory: no fsync, no replay)
               (the peers: bench/peers.py; redis-tput and redis-replay also run alone)
  nofsync      (not in the default set) orb-64 and latency @ 1,000/s with the node's
               --no-fsync, labelled as such: splits fsync cost from Python cost

``--profile`` adds a py-spy profile of the node, a producer and a consumer
during orb-64, and of the node and the plant during replay.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import bridge as bench_bridge_mod
from . import ha as bench_ha_mod
from . import peers as bench_peers_mod
from . import security as bench_sec_mod
from .proc import PY, BenchFailure, Proc, Procs, free_ports, proc_cpu_s, proc_status_kb, wait_quiet
from .report import LAT_RATES, build_checks, machine_info, render_checks, render_table, source_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"

FULL: dict[str, Any] = {
    "pp_n_per": 500_000, "mini_msg_n_per": 150_000, "mini_batch_n_per": 500_000,
    "mini_batch_frame": 256, "mini_batch_window": 8, "mini_msg_window": 1000,
    "orb_n_per": 100_000, "orb_1k_n_per": 50_000, "lat_s": 5.0,
    "replay_n": 1_000_000, "rss_bytes": 1 << 30, "rss_replay": 100_000,
    "loss_n_per": 100_000, "outbox_n_per": 50_000, "pair_rounds": 2,
    **bench_ha_mod.CFG_FULL, **bench_bridge_mod.CFG_FULL, **bench_peers_mod.CFG_FULL,
}
QUICK: dict[str, Any] = {
    "pp_n_per": 100_000, "mini_msg_n_per": 30_000, "mini_batch_n_per": 100_000,
    "mini_batch_frame": 256, "mini_batch_window": 8, "mini_msg_window": 1000,
    "orb_n_per": 20_000, "orb_1k_n_per": 10_000, "lat_s": 2.0,
    "replay_n": 200_000, "rss_bytes": 64 << 20, "rss_replay": 20_000,
    "loss_n_per": 20_000, "outbox_n_per": 10_000, "pair_rounds": 1,
    **bench_ha_mod.CFG_QUICK, **bench_bridge_mod.CFG_QUICK, **bench_peers_mod.CFG_QUICK,
}
BIG_BYTES = 1 << 30

ALL = ["pushpull", "mini-msg", "mini-batch", "mini-lat", "orb-64", "orb-1k", "orb-lat",
       "replay", "rss", "loss", "outbox", "ha", "bridge", "sec", "redis", "nats", "mosquitto"]


class Ctx:
    """State of one bench run: sizes, temp dir, results, failures."""

    def __init__(self, cfg: dict[str, Any], tmp: Path, profile: bool) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.profile = profile
        self.results: dict[str, Any] = {}
        self.failures: list[str] = []
        self.profiles: dict[str, Any] = {}
        self.busy: dict[str, float] = {}
        self._n = 0

    def dir(self, name: str) -> Path:
        self._n += 1
        d = self.tmp / f"{self._n:02d}-{name}"
        d.mkdir(parents=True)
        return d


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def deadline_for(n_total: int, floor_rate: float = 2000.0) -> float:
    """A generous but bounded wait for ``n_total`` messages."""
    return 60.0 + n_total / floor_rate


def results(procs: list[Proc], timeout: float) -> list[dict[str, Any]]:
    """The RESULT of each worker, all within one shared ``timeout``."""
    end = time.monotonic() + timeout
    return [p.result(max(1.0, end - time.monotonic())) for p in procs]


def check(res: list[dict[str, Any]], what: str) -> None:
    bad = [r for r in res if not r.get("ok")]
    if bad:
        errs = "; ".join(str(e) for r in bad for e in (r.get("errors") or ["not ok"])[:3])
        raise BenchFailure(f"VERIFICATION FAILED in {what}: {errs}")


def check_deliveries(cres: list[dict[str, Any]], what: str, *, total: int, n_per: int,
                     producers: int) -> None:
    """Every consumer got ``total`` messages, ``n_per`` from each producer (the
    workers have already checked order and uniqueness: :func:`check`)."""
    for cr in cres:
        if cr["received"] != total:
            raise BenchFailure(f"VERIFICATION FAILED in {what}: a consumer got "
                               f"{cr['received']} of {total}")
        if sorted(cr["per_producer"].values()) != [n_per] * producers:
            raise BenchFailure(f"VERIFICATION FAILED in {what}: messages per producer "
                               f"{cr['per_producer']}, expected {n_per} from each of {producers}")


# --- a sequencer node ----------------------------------------------------------------


class Node:
    """``python -m sequencer run`` on fresh loopback ports, ready when it answers PING."""

    def __init__(self, ps: Procs, data: Path, name: str, *, fsync: bool = True,
                 env: dict[str, str] | None = None, ready_timeout: float = 60.0) -> None:
        from orbcast.errors import OrbcastTimeout
        from orbcast.rpc import wait_ready
        last = ""
        for _attempt in range(3):
            ing, eg, ctl = free_ports(3)
            self.ingress = f"tcp://127.0.0.1:{ing}"
            self.egress = f"tcp://127.0.0.1:{eg}"
            self.control = f"tcp://127.0.0.1:{ctl}"
            argv = [PY, "-m", "sequencer", "run", "--data", str(data), "--ingress", self.ingress,
                    "--egress", self.egress, "--control", self.control, "--node-id", name,
                    "--log-level", "warning"]
            if not fsync:
                argv.append("--no-fsync")
            self.proc = ps.spawn(name, argv, env=env, stdin=False)
            deadline = time.monotonic() + ready_timeout
            while time.monotonic() < deadline and self.proc.alive():
                try:
                    wait_ready(self.ingress, timeout=1.0)
                    self.pid = self.proc.pid
                    self.cpu0 = proc_cpu_s(self.pid) or 0.0
                    return
                except OrbcastTimeout:
                    continue
            last = self.proc.tail()
            self.proc.kill()
            if time.monotonic() >= deadline:
                break
        raise BenchFailure(f"sequencer node {name} did not start{last}")

    def status(self) -> dict[str, Any]:
        from orbcast.envelope import StatusRequest
        from orbcast.rpc import request
        try:
            rep = request(self.control, StatusRequest(rid=1), timeout=5)
            return dict(getattr(rep, "info", {}) or {})
        except Exception as exc:   # status is informative only
            return {"error": str(exc)}

    def mem_kb(self) -> dict[str, int]:
        return proc_status_kb(self.pid)

    def cpu_s(self) -> float:
        return (proc_cpu_s(self.pid) or 0.0) - self.cpu0

    def stop(self) -> None:
        rc = self.proc.stop(15)
        if rc not in (0, -15, None):
            log(f"warning: node exited with {rc}{self.proc.tail(5)}")


def _profilers(ctx: Ctx, targets: dict[str, int]) -> list[tuple[str, Any]]:
    if not ctx.profile:
        return []
    from .profile import Recorder, find_pyspy
    spy = find_pyspy()
    if spy is None:
        log("py-spy not found (pip install py-spy, or set PYSPY): no profile")
        return []
    out = []
    for name, pid in targets.items():
        out.append((name, Recorder(spy, pid, ctx.tmp / f"profile-{name}.txt")))
    time.sleep(0.5)     # let py-spy attach before the timed part
    return out


def _finish_profiles(ctx: Ctx, recs: list[tuple[str, Any]]) -> None:
    from .profile import summarize
    for name, r in recs:
        r.stop()
        ctx.profiles[name] = summarize(r.out)


# --- ceiling -------------------------------------------------------------------------


def bench_pushpull(ctx: Ctx) -> None:
    n_per = ctx.cfg["pp_n_per"]
    total = 2 * n_per
    (port,) = free_ports(1)
    with Procs(ctx.dir("pushpull")) as ps:
        sink = ps.worker("pp-sink", "pp_sink", {"port": port, "producers": 2, "n_per": n_per})
        sink.expect("READY", 20)
        srcs = [ps.worker(f"pp-src{i}", "pp_src", {"port": port, "idx": i, "n": n_per, "size": 64})
                for i in range(2)]
        for s in srcs:
            s.expect("READY", 20)
        for s in srcs:
            s.send("GO")
        to = deadline_for(total, 20_000)
        sres, (kres,) = results(srcs, to), results([sink], to)
    check(sres + [kres], "pushpull")
    t0 = min(r["t_start_ns"] for r in sres)
    rate = total / ((kres["t_end_ns"] - t0) / 1e9)
    ctx.results["pushpull"] = {"msg_s": rate, "n": total, "size": 64, "sink_cpu_s": kres["cpu_s"],
                               "verified": True}
    log(f"pushpull: {rate:,.0f} msg/s")


def _mini(ctx: Ctx, name: str, *, mode: str, n_per: int, producers: int = 2,
          consumers: int = 2, rate: int | None = None) -> dict[str, Any]:
    ing, eg = free_ports(2)
    d = ctx.dir(name)
    total = producers * n_per
    warm = max(n_per // 10, int((rate or 0) * 0.5)) if rate else 0
    with Procs(d) as ps:
        srv = ps.worker(f"{name}-server", "mini_server",
                        {"ingress": ing, "egress": eg, "file": str(d / "log.bin"), "mode": mode,
                         "size": 64, "fsync": True})
        srv.expect("READY", 20)
        cons = [ps.worker(f"{name}-c{i}", "mini_cons",
                          {"egress": eg, "n_total": total, "size": 64, "latency": bool(rate),
                           "warmup": warm}) for i in range(consumers)]
        for c in cons:
            c.expect("READY", 20)
        pargs = {"ingress": ing, "n": n_per, "size": 64, "mode": mode, "rate": rate,
                 "window": ctx.cfg["mini_msg_window" if mode == "msg" else "mini_batch_window"],
                 "batch": ctx.cfg["mini_batch_frame"]}
        prods = [ps.worker(f"{name}-p{i}", "mini_prod", pargs) for i in range(producers)]
        for p in prods:
            p.expect("READY", 20)
        for p in prods:
            p.send("GO")
        to = deadline_for(total, 5_000) + (n_per / rate if rate else 0)
        end = time.monotonic() + to
        pres = results(prods, end - time.monotonic())
        cres = results(cons, end - time.monotonic())
        srv.p.send_signal(signal.SIGTERM)
        sres = srv.result(15)
    check(pres + cres, name)
    t0 = min(r["t_start_ns"] for r in pres)
    t1 = max(r["t_end_ns"] for r in cres)
    out = {"msg_s": total / ((t1 - t0) / 1e9), "n": total, "size": 64, "verified": True,
           "server": sres, "msgs_per_fsync": round(total / max(1, sres["fsyncs"]), 1)}
    if rate:
        out["latency"] = cres[0]["latency"]
        out["rate"] = rate
    return out


def bench_mini_msg(ctx: Ctx) -> None:
    r = _mini(ctx, "mini-msg", mode="msg", n_per=ctx.cfg["mini_msg_n_per"])
    ctx.results["mini-msg"] = r
    log(f"mini loop, per-message frames+acks: {r['msg_s']:,.0f} msg/s "
        f"({r['msgs_per_fsync']} msgs/fsync)")


def bench_mini_batch(ctx: Ctx) -> None:
    r = _mini(ctx, "mini-batch", mode="batch", n_per=ctx.cfg["mini_batch_n_per"])
    ctx.results["mini-batch"] = r
    log(f"mini loop, batched frames+acks: {r['msg_s']:,.0f} msg/s "
        f"({r['msgs_per_fsync']} msgs/fsync)")


def bench_mini_lat(ctx: Ctx) -> None:
    for rate in LAT_RATES:
        n = int(rate * ctx.cfg["lat_s"])
        r = _mini(ctx, f"mini-lat-{rate}", mode="msg", n_per=n, producers=1, consumers=1, rate=rate)
        ctx.results[f"mini-lat-{rate}"] = r
        lat = r["latency"]
        log(f"mini loop latency at {rate}/s: p50 {lat['p50_us']:.0f} us, "
            f"p99 {lat['p99_us']:.0f} us")


# --- orbcast -------------------------------------------------------------------------


def _orb(ctx: Ctx, name: str, *, size: int, n_per: int, producers: int = 2, consumers: int = 2,
         outbox: bool = False, env: dict[str, str] | None = None, rate: int | None = None,
         profile: bool = False, node_fsync: bool = True,
         switch_interval: float | None = None, keys: Path | None = None,
         make_node: Callable[[Procs, Path, str], Any] | None = None) -> dict[str, Any]:
    """``make_node(ps, dir, name)`` replaces the single :class:`Node` (bench.ha
    passes a primary/standby pair; its ``sequencers`` go to every plant)."""
    d = ctx.dir(name)
    total = producers * n_per
    warm = max(n_per // 10, int(rate * 0.5)) if rate else 0
    with Procs(d) as ps:
        if make_node is not None:
            node = make_node(ps, d, f"{name}-node")
        else:
            node = Node(ps, d / "node", f"{name}-node", env=env, fsync=node_fsync)
        seqs = getattr(node, "sequencers", None)
        pdata = str(d / "plants")
        cons = [ps.worker(f"{name}-c{i}", "orb_cons",
                          {"ingress": node.ingress, "sequencers": seqs,
                           "data": pdata, "idx": i, "n_total": total,
                           "n_per": n_per, "latency": bool(rate), "warmup": warm, "idle_s": 30,
                           "switch_interval": switch_interval, "keys": keys and str(keys)})
                for i in range(consumers)]
        for c in cons:
            c.expect("READY", 30)
        to = deadline_for(total) + (n_per / rate if rate else 0)
        prods = [ps.worker(f"{name}-p{i}", "orb_prod",
                           {"ingress": node.ingress, "sequencers": seqs, "data": pdata,
                            "idx": i, "n": n_per, "size": size, "outbox": outbox, "rate": rate,
                            "timeout": to, "switch_interval": switch_interval,
                            "keys": keys and str(keys)})
                 for i in range(producers)]
        for p in prods:
            p.expect("READY", 30)
        recs = []
        if profile:
            targets = {"node": node.pid, "producer": prods[0].pid}
            if cons:
                targets["consumer"] = cons[0].pid
            recs = _profilers(ctx, targets)
        cpu0 = node.cpu_s()
        for p in prods:
            p.send("GO")
        try:
            end = time.monotonic() + to
            pres = results(prods, end - time.monotonic())
            cres = results(cons, end - time.monotonic())
        finally:
            _finish_profiles(ctx, recs)
        cpu = node.cpu_s() - cpu0
        status = node.status()
        mem = node.mem_kb()
        extra = node.extra_results() if hasattr(node, "extra_results") else {}
        node.stop()
    check(pres + cres, name)
    check_deliveries(cres, name, total=total, n_per=n_per, producers=producers)
    t0 = min(r["t_start_ns"] for r in pres)
    t_pub = max(r["t_flushed_ns"] for r in pres)
    out: dict[str, Any] = {
        "n": total, "size": size, "producers": producers, "consumers": consumers,
        "node_fsync": node_fsync,
        "outbox": "disk" if outbox else "memory", "verified": True,
        "publish_msg_s": total / ((t_pub - t0) / 1e9),
        "node_cpu_s": round(cpu, 3), "node_cpu_us_per_msg": round(cpu / total * 1e6, 2),
        "node_vmhwm_kb": mem.get("VmHWM"),
        "producer_cpu_us_per_msg": round(sum(r["cpu_s"] for r in pres) / total * 1e6, 2),
        "node_counters": status.get("counters", {}),
        # > 0: Plant.flush() returned before every message was acked (an orbcast bug)
        "flush_early_unacked": sum(r["counters"].get("unacked_when_flush_returned", 0)
                                   for r in pres),
    }
    if out["flush_early_unacked"]:
        log(f"{name}: WARNING Plant.flush() returned with {out['flush_early_unacked']} "
            "messages not yet acked (the bench waited for them)")
    if cres:
        t1 = max(r["t_end_ns"] for r in cres)
        out["msg_s"] = total / ((t1 - t0) / 1e9)
        ccpu = sum(r["cpu_s"] for r in cres) / len(cres)
        out["consumer_cpu_us_per_msg"] = round(ccpu / total * 1e6, 2)
        out["consumer_tracker"] = [r["tracker"] for r in cres]
    c = out["node_counters"]
    if c.get("fsyncs"):
        out["msgs_per_fsync"] = round(c.get("sequenced", 0) / c["fsyncs"], 1)
    if c.get("egress_batches"):
        out["msgs_per_egress_batch"] = round(c.get("sequenced", 0) / c["egress_batches"], 1)
    out.update(extra)
    if rate:
        out["rate"] = rate
        out["latency"] = cres[0]["latency"]
        out["latency_to_sequencer"] = cres[0]["latency_to_sequencer"]
        out["latency_from_sequencer"] = cres[0]["latency_from_sequencer"]
    return out


def bench_orb_64(ctx: Ctx) -> None:
    r = _orb(ctx, "orb-64", size=64, n_per=ctx.cfg["orb_n_per"], profile=ctx.profile)
    ctx.results["orb-64"] = r
    log(f"orbcast 64 B: {r['msg_s']:,.0f} msg/s delivered, "
        f"publish {r['publish_msg_s']:,.0f} msg/s, "
        f"node {r['node_cpu_us_per_msg']} us CPU/msg")


def bench_orb_1k(ctx: Ctx) -> None:
    r = _orb(ctx, "orb-1k", size=1024, n_per=ctx.cfg["orb_1k_n_per"])
    ctx.results["orb-1k"] = r
    log(f"orbcast 1 KiB: {r['msg_s']:,.0f} msg/s delivered")


def bench_orb_lat(ctx: Ctx) -> None:
    for rate in LAT_RATES:
        n = int(rate * ctx.cfg["lat_s"])
        r = _orb(ctx, f"orb-lat-{rate}", size=64, n_per=n, producers=1, consumers=1, rate=rate)
        ctx.results[f"orb-lat-{rate}"] = r
        lat = r["latency"]
        log(f"orbcast latency at {rate}/s: p50 {lat['p50_us']:.0f} us, p99 {lat['p99_us']:.0f} us")
    n = int(1000 * ctx.cfg["lat_s"])
    r = _orb(ctx, "orb-lat-1000-outbox", size=64, n_per=n, producers=1, consumers=1, rate=1000,
             outbox=True)
    ctx.results["orb-lat-1000-outbox"] = r
    lat = r["latency"]
    log(f"orbcast latency at 1000/s with the disk outbox: p50 {lat['p50_us']:.0f} us, "
        f"p99 {lat['p99_us']:.0f} us")


def _prefill(ctx: Ctx, d: Path, n: int, size: int, name: str) -> dict[str, Any]:
    """Fill ``d`` (a node data dir) with ``n`` records of ``size`` bytes."""
    with Procs(d.parent) as ps:
        w = ps.worker(f"{name}-prefill", "prefill", {"data": str(d), "n": n, "size": size})
        try:
            r = w.result(deadline_for(n, 20_000))
            r["how"] = "LogStore direct"
            return r
        except BenchFailure as exc:
            log(f"direct prefill failed ({str(exc).splitlines()[0]}); publishing through a node")
    shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    with Procs(d.parent) as ps:
        node = Node(ps, d, f"{name}-fill-node", fsync=False)
        half = n // 2
        prods = [ps.worker(f"{name}-fill-p{i}", "orb_prod",
                           {"ingress": node.ingress, "data": str(d.parent / "fill-plants"),
                            "idx": i, "n": half if i == 0 else n - half, "size": size,
                            "timeout": deadline_for(n)})
                 for i in range(2)]
        for p in prods:
            p.expect("READY", 30)
        for p in prods:
            p.send("GO")
        res = results(prods, deadline_for(n))
        node.stop()
    check(res, f"{name} prefill")
    nbytes = sum(f.stat().st_size for f in (d / "log").glob("*.seg"))
    return {"ok": True, "records": n, "log_bytes": nbytes, "seconds": time.perf_counter() - t0,
            "how": "published through a --no-fsync node"}


def _replay(ctx: Ctx, name: str, d: Path, frm: int, to: int, profile: bool = False,
            bulk: bool = False, env: dict[str, str] | None = None,
            keys: Path | None = None) -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
    with Procs(d.parent) as ps:
        t_start = time.perf_counter()
        node = Node(ps, d, f"{name}-node", ready_timeout=300, env=env)
        start_s = time.perf_counter() - t_start
        cl = ps.worker(f"{name}-client", "replay_client",
                       {"ingress": node.ingress, "data": str(d.parent / "plants"),
                        "from_seq": frm, "to_seq": to, "bulk": bulk, "keys": keys and str(keys)})
        cl.expect("READY", 60)
        recs = (_profilers(ctx, {f"{name}-node": node.pid, f"{name}-plant": cl.pid})
                if profile else [])
        cl.send("GO")
        try:
            r = cl.result(deadline_for(to - frm + 1, 5_000))
        finally:
            _finish_profiles(ctx, recs)
        mem = node.mem_kb()
        status = node.status()
        r["node_cpu_s"] = round(node.cpu_s(), 3)
        r["node_start_s"] = round(start_s, 2)
        node.stop()
    check([r], name)
    return r, mem, status


def bench_replay(ctx: Ctx) -> None:
    n = ctx.cfg["replay_n"]
    d = ctx.dir("replay") / "node"
    fill = _prefill(ctx, d, n, 64, "replay")
    log(f"replay: log of {n:,} x 64 B records ({fill['log_bytes'] / 1e6:.0f} MB) in "
        f"{fill['seconds']:.1f} s ({fill['how']})")
    r, mem, _st = _replay(ctx, "replay", d, 1, n, profile=ctx.profile)
    secs = (r["t_end_ns"] - r["t_start_ns"]) / 1e9
    ctx.results["replay"] = {
        "records_s": n / secs, "n": n, "size": 64, "seconds": round(secs, 3), "verified": True,
        "first_record_ms": round((r["t_first_ns"] - r["t_start_ns"]) / 1e6, 1),
        "plant_cpu_us_per_rec": round(r["cpu_s"] / n * 1e6, 2),
        "node_cpu_us_per_rec": round(r["node_cpu_s"] / n * 1e6, 2),
        "node_start_s": r["node_start_s"], "node_vmhwm_kb": mem.get("VmHWM"), "prefill": fill}
    log(f"replay: {n / secs:,.0f} records/s to one plant")
    # the same log again, the application taking lists (Subscription.get_many)
    r, mem, _st = _replay(ctx, "replay-bulk", d, 1, n, bulk=True)
    secs = (r["t_end_ns"] - r["t_start_ns"]) / 1e9
    ctx.results["replay-bulk"] = {
        "records_s": n / secs, "n": n, "size": 64, "seconds": round(secs, 3), "verified": True,
        "plant_cpu_us_per_rec": round(r["cpu_s"] / n * 1e6, 2),
        "node_cpu_us_per_rec": round(r["node_cpu_s"] / n * 1e6, 2)}
    log(f"replay-bulk: {n / secs:,.0f} records/s to one plant (get_many)")


def bench_rss(ctx: Ctx) -> None:
    size_b = ctx.cfg["rss_bytes"]
    rec = 1024
    n = size_b // (rec + 90)        # ~90 B of CBOR envelope + log header per record
    d = ctx.dir("rss") / "node"
    fill = _prefill(ctx, d, n, rec, "rss")
    log(f"rss: log of {n:,} x 1 KiB records ({fill['log_bytes'] / 1e6:.0f} MB) in "
        f"{fill['seconds']:.1f} s ({fill['how']})")
    k = min(ctx.cfg["rss_replay"], n)
    frm = max(1, n // 2 - k // 2)
    r, mem, st = _replay(ctx, "rss", d, frm, frm + k - 1)
    secs = (r["t_end_ns"] - r["t_start_ns"]) / 1e9
    ctx.results["rss"] = {
        "vmhwm_kb": mem.get("VmHWM"), "vmrss_kb": mem.get("VmRSS"), "log_bytes": fill["log_bytes"],
        "records": n, "replayed": k, "replay_records_s": k / secs, "verified": True,
        "node_start_s": r["node_start_s"], "full_1gb": fill["log_bytes"] >= 0.95 * BIG_BYTES,
        "prefill": fill}
    log(f"rss: node VmHWM {mem.get('VmHWM', 0) / 1024:.1f} MB serving a "
        f"{fill['log_bytes'] / 1e6:.0f} MB log (replayed {k:,} records at {k / secs:,.0f}/s)")


def _pair(ctx: Ctx, names: tuple[str, str], run: Callable[[str, int], dict[str, Any]],
          field: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a (baseline, variant) pair ``pair_rounds`` times interleaved, so slow
    drifts of a shared machine hit both alike; the reported figure is the
    mean of the rounds, every round is kept."""
    rounds = max(1, ctx.cfg.get("pair_rounds", 1))
    runs: dict[str, list[dict[str, Any]]] = {names[0]: [], names[1]: []}
    for i in range(rounds):
        for nm in names:
            runs[nm].append(run(nm, i))
    out = []
    for nm in names:
        rs = runs[nm]
        merged = dict(rs[-1])      # details of the last round, the figure of all rounds
        vals = [r[field] for r in rs]
        merged[field] = sum(vals) / len(vals)
        merged["rounds"] = [round(v) for v in vals]
        out.append(merged)
    return out[0], out[1]


def bench_loss(ctx: Ctx) -> None:
    n_per = ctx.cfg["loss_n_per"]
    lossy_env = {"ORBCAST_SEQUENCER_FAULT_DROP_EGRESS": "0.05"}
    drops: list[tuple[int, int, int]] = []

    def run(nm: str, i: int) -> dict[str, Any]:
        r = _orb(ctx, f"{nm}-{i}", size=64, n_per=n_per,
                 env=lossy_env if nm == "loss-5pct" else None)
        if nm == "loss-5pct":
            d = r["node_counters"].get("egress_dropped_injected", 0)
            rep = sum(t.get("repaired", 0) for t in r["consumer_tracker"])
            if d and not rep:
                raise BenchFailure(f"VERIFICATION FAILED in loss: {d} egress batches were dropped "
                                   "but the consumers report nothing repaired")
            drops.append((d, rep, r["node_counters"].get("egress_batches", 0) + d))
        return r

    free, lossy = _pair(ctx, ("loss-free", "loss-5pct"), run, "msg_s")
    dropped = sum(d[0] for d in drops)
    repaired = sum(d[1] for d in drops)
    lossy["dropped_batches"] = dropped
    lossy["repaired"] = repaired
    lossy["batches_total"] = sum(d[2] for d in drops)
    if not dropped:
        # big group commits make few batches: with ~20 of them, none dropped is likely
        lossy["warning"] = ("no egress batch happened to be dropped: the figure says nothing "
                            "about loss; run with a larger N (no --quick)")
        log("loss: WARNING " + lossy["warning"])
    ctx.results["loss-free"] = free
    ctx.results["loss-5pct"] = lossy
    log(f"loss: {lossy['msg_s']:,.0f} msg/s with 5 % egress batches dropped vs "
        f"{free['msg_s']:,.0f} loss-free ({dropped} batches dropped, {repaired} msgs repaired; "
        f"rounds {lossy['rounds']} vs {free['rounds']})")


def bench_outbox(ctx: Ctx) -> None:
    n_per = ctx.cfg["outbox_n_per"]

    def run(nm: str, i: int) -> dict[str, Any]:
        return _orb(ctx, f"{nm}-{i}", size=64, n_per=n_per, consumers=0,
                    outbox=nm == "outbox-disk")

    mem, disk = _pair(ctx, ("outbox-memory", "outbox-disk"), run, "publish_msg_s")
    ctx.results["outbox-memory"] = mem
    ctx.results["outbox-disk"] = disk
    log(f"outbox: publish {disk['publish_msg_s']:,.0f} msg/s with the disk outbox vs "
        f"{mem['publish_msg_s']:,.0f} without (rounds {disk['rounds']} vs {mem['rounds']})")


def bench_nofsync(ctx: Ctx) -> None:
    """Diagnostics, labelled: the node with --no-fsync, to split fsync from Python cost."""
    r = _orb(ctx, "nofsync-64", size=64, n_per=ctx.cfg["orb_n_per"], node_fsync=False)
    ctx.results["nofsync-64"] = r
    log(f"orbcast 64 B, node --no-fsync: {r['msg_s']:,.0f} msg/s")
    n = int(1000 * ctx.cfg["lat_s"])
    r = _orb(ctx, "nofsync-lat-1000", size=64, n_per=n, producers=1, consumers=1, rate=1000,
             node_fsync=False)
    ctx.results["nofsync-lat-1000"] = r
    lat = r["latency"]
    log(f"orbcast latency at 1000/s, node --no-fsync: p50 {lat['p50_us']:.0f} us, "
        f"p99 {lat['p99_us']:.0f} us")


BENCHES: dict[str, Callable[[Ctx], None]] = {
    "pushpull": bench_pushpull, "mini-msg": bench_mini_msg, "mini-batch": bench_mini_batch,
    "mini-lat": bench_mini_lat, "orb-64": bench_orb_64, "orb-1k": bench_orb_1k,
    "orb-lat": bench_orb_lat, "replay": bench_replay, "rss": bench_rss, "loss": bench_loss,
    "outbox": bench_outbox, "nofsync": bench_nofsync,
    "ha": bench_ha_mod.bench_ha, "ha-tput": bench_ha_mod.bench_ha_tput,
    "ha-failover": bench_ha_mod.bench_ha_failover,
    "bridge": bench_bridge_mod.bench_bridge, "bridge-idle": bench_bridge_mod.bench_bridge_idle,
    "bridge-press": bench_bridge_mod.bench_bridge_press,
    "sec": bench_sec_mod.bench_sec, "sec-tput": bench_sec_mod.bench_sec_tput,
    "sec-handshake": bench_sec_mod.bench_sec_handshake, "sec-replay": bench_sec_mod.bench_sec_replay,
    "redis": bench_peers_mod.bench_redis, "redis-tput": bench_peers_mod.bench_redis_tput,
    "redis-replay": bench_peers_mod.bench_redis_replay, "nats": bench_peers_mod.bench_nats,
    "mosquitto": bench_peers_mod.bench_mosquitto,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a ~1 minute smoke run (smaller N)")
    ap.add_argument("--big", action="store_true",
                    help="1 GB log for the RSS bench also with --quick "
                         "(the full run always uses 1 GB)")
    ap.add_argument("--only", help=f"comma-separated subset of: {','.join(ALL)}, nofsync "
                                   "(\"all,nofsync\": everything)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy profiles of the node, a producer, a consumer and replay")
    ap.add_argument("--tmp", help="directory for logs and data (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (process logs, data)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each benchmark wait up to S seconds for other work on the "
                         "machine to fall below 25%% CPU (a shared machine skews every figure)")
    ap.add_argument("--json", default=str(RESULTS_DIR / "latest.json"),
                    help="where to write the results")
    a = ap.parse_args(argv)
    names = ALL if not a.only else [n.strip() for n in a.only.split(",") if n.strip()]
    if a.only and "all" in names:
        names = ALL + [n for n in names if n != "all" and n not in ALL]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    cfg = dict(QUICK if a.quick else FULL)
    if a.big:
        cfg["rss_bytes"] = BIG_BYTES

    def _term(*_: Any) -> None:     # like Ctrl-C: reap, report what finished, exit 1
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _term)

    base = Path(a.tmp) if a.tmp else None
    if base:
        base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="orbcast-bench-", dir=base))
    ctx = Ctx(cfg, tmp, a.profile)
    started = time.time()
    minfo = machine_info()
    log(f"{'quick' if a.quick else 'full'} run of {', '.join(names)}; work dir {tmp}; "
        f"{minfo['cpus']} CPUs, load {minfo.get('loadavg', ('?',))[0]}")
    try:
        for n in names:
            t0 = time.perf_counter()
            try:
                busy = wait_quiet(a.wait_idle)
                ctx.busy[n] = round(busy, 3)
                if busy > 0.25:
                    log(f"warning: {busy:.0%} of the CPUs are busy with other work before {n}")
                t0 = time.perf_counter()
                BENCHES[n](ctx)
            except BenchFailure as exc:
                ctx.failures.append(f"{n}: {exc}")
                print(f"\n!!!!!!!! {n} FAILED !!!!!!!!\n{exc}\n", file=sys.stderr, flush=True)
            except KeyboardInterrupt:      # the processes of the bench were reaped already
                ctx.failures.append(f"{n}: interrupted")
                break
            log(f"{n} took {time.perf_counter() - t0:.1f} s")
    finally:
        if a.keep or ctx.failures:
            log(f"process logs and data kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    checks = build_checks(ctx.results, a.big)
    elapsed = time.time() - started
    print()
    print(render_table(ctx.results))
    print()
    print(render_checks(checks))
    if ctx.profiles:
        from .profile import render
        print("\nprofiles (py-spy, share of non-idle samples):")
        for k, v in ctx.profiles.items():
            print(render(k, v))
    out = {"mode": "quick" if a.quick else "full", "big": a.big, "started": started,
           "elapsed_s": round(elapsed, 1), "machine": machine_info(), "source": source_info(),
           "config": cfg,
           "results": ctx.results, "checks": checks, "failures": ctx.failures,
           "profiles": ctx.profiles, "load_at_start": minfo.get("loadavg"),
           "other_cpu_busy_before": ctx.busy}
    jp = Path(a.json)
    jp.parent.mkdir(parents=True, exist_ok=True)
    jp.write_text(json.dumps(out, indent=2, default=str) + "\n")
    skewed = [f"{k} {v:.0%}" for k, v in ctx.busy.items() if v > 0.10]
    print(f"\nresults written to {jp} ({elapsed:.0f} s in all)")
    if skewed:
        print("other work was running on this machine before: " + ", ".join(skewed)
              + " of CPU (those figures are skewed; --wait-idle S waits for a quiet machine)")
    if ctx.failures:
        print("\n" + "!" * 72, file=sys.stderr)
        print(f"BENCH FAILED: {len(ctx.failures)} benchmark(s) did not verify or finish:",
              file=sys.stderr)
        for f in ctx.failures:
            print("  - " + f.splitlines()[0], file=sys.stderr)
        print("!" * 72, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
