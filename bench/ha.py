"""Hot-standby benchmarks (issue 4): ``--only ha`` (or ``ha-failover``, ``ha-tput``).

* **ha-failover**: a primary + standby pair in sync, 2 plants publishing at a
  steady rate and 2 plants consuming from seq 1, every plant configured with
  both nodes. The active node is SIGKILLed at a random moment; every
  consumer stamps (``time.time_ns()``, same host) the first canonical
  message it delivers from the new epoch. The figure is kill -> that
  delivery, over every consumer of every round (median, p99, max). Each
  round is verified: every consumer got seqs 1..N once, in order, gap-free,
  every (producer, producer_seq) once, and N is everything published.
* **ha-tput**: the orb-64 throughput benchmark (2 producers + 2 consumers,
  64 B, fsync on) against a pair with its standby in sync (fsync on both),
  interleaved with a single node in the same run (``pair_rounds``).

Worker roles (run by :mod:`bench.worker`): ``ha_prod``, ``ha_cons``.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from .proc import PY, BenchFailure, Procs, free_ports, proc_cpu_s, proc_status_kb, run_parts

__all__ = [
    "CFG_FULL",
    "CFG_QUICK",
    "ROLES",
    "Pair",
    "bench_ha",
    "bench_ha_failover",
    "bench_ha_tput",
]

CFG_FULL: dict[str, Any] = {"ha_rounds": 20, "ha_rate": 500, "ha_round_s": 5.0,
                            "ha_tput_n_per": 100_000}
CFG_QUICK: dict[str, Any] = {"ha_rounds": 4, "ha_rate": 500, "ha_round_s": 4.0,
                             "ha_tput_n_per": 20_000}


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _status(ingress: str, timeout: float = 2.0) -> dict[str, Any]:
    from orbcast.envelope import StatusRequest
    from orbcast.rpc import request
    rep = request(ingress, StatusRequest(rid=1), timeout=timeout)
    return dict(getattr(rep, "info", {}) or {})


class HANode:
    """One ``sequencer run --role R --peer ... --peer-connect ...`` process."""

    def __init__(self, name: str, data: Path, role: str, ports: list[int]) -> None:
        ing, eg, peer = ports
        self.name = name
        self.data = data
        self.role = role
        self.ingress = f"tcp://127.0.0.1:{ing}"
        self.egress = f"tcp://127.0.0.1:{eg}"
        self.peer = f"tcp://127.0.0.1:{peer}"
        self.proc: Any = None
        self.pid = 0

    def start(self, ps: Procs, peer_connect: str, env: dict[str, str] | None = None) -> None:
        argv = [PY, "-m", "sequencer", "run", "--data", str(self.data), "--node-id", self.name,
                "--role", self.role, "--ingress", self.ingress, "--egress", self.egress,
                "--peer", self.peer, "--peer-connect", peer_connect, "--log-level", "warning"]
        self.proc = ps.spawn(self.name, argv, env=env, stdin=False)
        self.pid = self.proc.pid

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        return _status(self.ingress, timeout)


class Pair:
    """A primary/standby pair on fresh loopback ports (all below 32768), ready
    when the active node's standby is ``in-sync`` and the standby is
    ``eligible``. Quacks like :class:`bench.run.Node` for ``_orb``: the
    figures (CPU, RSS, status) are the active node's; :meth:`extra_results`
    adds the standby's."""

    def __init__(self, ps: Procs, d: Path, name: str, *, env: dict[str, str] | None = None,
                 ready_timeout: float = 60.0) -> None:
        last = ""
        for _attempt in range(3):
            ports = free_ports(6)
            self.a = HANode(f"{name}-a", d / "a", "primary", ports[:3])
            self.b = HANode(f"{name}-b", d / "b", "standby", ports[3:])
            self.a.start(ps, self.b.peer, env)
            self.b.start(ps, self.a.peer, env)
            self.sequencers = [self.a.ingress, self.b.ingress]
            try:
                self._wait_in_sync(ready_timeout)
                break
            except BenchFailure as exc:
                last = str(exc) + self.a.proc.tail() + self.b.proc.tail()
                self.a.proc.kill()
                self.b.proc.kill()
        else:
            raise BenchFailure(f"the pair {name} did not come up in sync: {last}")
        self.ingress = self.a.ingress
        self.pid = self.a.pid
        self.cpu0 = {n.name: proc_cpu_s(n.pid) or 0.0 for n in (self.a, self.b)}

    def _wait_in_sync(self, timeout: float) -> None:
        from orbcast.errors import OrbcastError
        deadline = time.monotonic() + timeout
        sa: dict[str, Any] = {}
        sb: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if not (self.a.proc.alive() and self.b.proc.alive()):
                raise BenchFailure("a node exited")
            try:
                sa = self.a.status(1.0)
                sb = self.b.status(1.0)
            except (OrbcastError, OSError):
                time.sleep(0.05)
                continue
            if (sa.get("role") == "active" and (sa.get("ha") or {}).get("standby") == "in-sync"
                    and sb.get("role") == "standby" and (sb.get("ha") or {}).get("eligible") is True):
                return
            time.sleep(0.05)
        raise BenchFailure(f"not in sync within {timeout:.0f} s: active {sa.get('ha')}, "
                           f"standby {sb.get('ha')}")

    # --- the Node interface used by bench.run._orb -------------------------------------

    def status(self) -> dict[str, Any]:
        try:
            return self.a.status(5)
        except Exception as exc:     # status is informative only
            return {"error": str(exc)}

    def mem_kb(self) -> dict[str, int]:
        return proc_status_kb(self.a.pid)

    def cpu_s(self) -> float:
        return (proc_cpu_s(self.a.pid) or 0.0) - self.cpu0[self.a.name]

    def extra_results(self) -> dict[str, Any]:
        """The standby's view at the end of a throughput run (it must hold it all)."""
        try:
            sa = self.a.status(5)
            deadline = time.monotonic() + 10
            sb = self.b.status(5)
            while sb.get("last_seq") != sa.get("last_seq") and time.monotonic() < deadline:
                time.sleep(0.05)
                sb = self.b.status(5)
        except Exception as exc:     # noqa: BLE001 - reported, checked by the caller
            return {"standby_error": str(exc)}
        if sa.get("role") != "active" or sb.get("role") != "standby":
            # the standby took over while the primary was alive (a false failover)
            return {"spurious_failover": {
                "a": {"role": sa.get("role"), "epoch": sa.get("epoch"),
                      "set_aside": (sa.get("counters") or {}).get("tail_records_set_aside")},
                "b": {"role": sb.get("role"), "epoch": sb.get("epoch"),
                      "last_seq": sb.get("last_seq")}},
                "active_last_seq": max(sa.get("last_seq") or 0, sb.get("last_seq") or 0)}
        return {"standby": {"role": sb.get("role"), "last_seq": sb.get("last_seq"),
                            "ha": sb.get("ha"), "counters": sb.get("counters"),
                            "vmhwm_kb": proc_status_kb(self.b.pid).get("VmHWM"),
                            "cpu_s": round((proc_cpu_s(self.b.pid) or 0.0)
                                           - self.cpu0[self.b.name], 3)},
                "active_ha": sa.get("ha"), "active_last_seq": sa.get("last_seq")}

    def stop(self) -> None:
        for n in (self.b, self.a):
            if n.proc is not None and n.proc.alive():
                rc = n.proc.stop(15)
                if rc not in (0, -15, None):
                    _log(f"warning: {n.name} exited with {rc}{n.proc.tail(5)}")


# --- workers ---------------------------------------------------------------------------


def ha_prod(a: dict[str, Any]) -> dict[str, Any]:
    """A Plant on both nodes publishing ``n`` 64 B messages at ``rate`` msg/s
    (publish_nowait, open loop), then flush() and wait for every ack."""
    from .worker import _plant, cpu_s, publish_paced, say, wait_go
    p = _plant(a, f"ha-p{a['idx']}")
    errors: list[str] = []
    try:
        p.node_info(timeout=10)
        n, rate = a["n"], a["rate"]
        say("READY")
        wait_go()
        c0 = cpu_s()
        t0 = time.time_ns()
        publish_paced(p.publish_nowait, "bench/ha", n, rate, 64)
        t_sent = time.time_ns()
        p.flush(timeout=a.get("timeout", 120))
        deadline = time.monotonic() + 30
        while p.counters["acked"] < n and time.monotonic() < deadline:
            time.sleep(0.001)
        c = dict(p.counters)
        if c.get("rejected"):
            errors.append(f"{c['rejected']} messages rejected")
        if c.get("acked", 0) < n:
            errors.append(f"only {c.get('acked')} of {n} acked")
        return {"ok": not errors, "errors": errors, "t_start_ns": t0, "t_sent_ns": t_sent,
                "t_flushed_ns": time.time_ns(), "counters": c, "cpu_s": cpu_s() - c0}
    finally:
        p.close()


def ha_cons(a: dict[str, Any]) -> dict[str, Any]:
    """A Plant on both nodes, subscribe("") from seq 1: verifies 1..N once, in
    order, every (producer, producer_seq) once, and stamps the first
    delivery whose epoch is above the first message's epoch."""
    from orbcast.errors import OrbcastTimeout

    from .worker import DeliveryCheck, _plant, cpu_s, say
    p = _plant(a, f"ha-c{a['idx']}")
    errors: list[str] = []
    try:
        sub = p.subscribe("", start=1)
        deadline = time.monotonic() + 10
        while p.counters["heartbeats"] == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("no heartbeat from the node within 10 s")
            time.sleep(0.01)
        say("READY")
        total, n_per, idle = a["n_total"], a["n_per"], a.get("idle_s", 30)
        checker = DeliveryCheck(n_per)
        expect = 1
        epoch0 = None
        t_new = 0
        new_epoch = None
        seq_new = 0
        epochs: dict[int, int] = {}
        c0 = cpu_s()
        while expect <= total:
            try:
                m = sub.get(timeout=idle)
            except OrbcastTimeout:
                errors.append(f"no message for {idle} s at seq {expect} of {total}")
                break
            if m is None:
                errors.append(f"subscription ended at seq {expect}")
                break
            if epoch0 is None:
                epoch0 = m.epoch
            if not t_new and m.epoch > epoch0:
                t_new = time.time_ns()
                new_epoch = m.epoch
                seq_new = m.seq
            epochs[m.epoch] = epochs.get(m.epoch, 0) + 1
            err = checker.check(m, expect)
            if err:
                errors.append(err)
                break
            expect += 1
        return {"ok": not errors and expect == total + 1, "received": expect - 1,
                "errors": errors, "t_new_epoch_ns": t_new, "epoch0": epoch0,
                "new_epoch": new_epoch, "first_new_seq": seq_new,
                "epochs": {str(k): v for k, v in epochs.items()},
                "per_producer": checker.per_producer(),
                "tracker": sub.tracker.stats(), "counters": dict(p.counters),
                "cpu_s": cpu_s() - c0}
    finally:
        p.close()


ROLES = {"ha_prod": ha_prod, "ha_cons": ha_cons}


# --- benchmarks ----------------------------------------------------------------------


def _pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(q * len(s)))]


def _failover_round(ctx: Any, rnd: int, rng: random.Random) -> dict[str, Any]:
    from .run import results
    rate = ctx.cfg["ha_rate"]
    round_s = ctx.cfg["ha_round_s"]
    n_per = int(rate * round_s)
    total = 2 * n_per
    d = ctx.dir(f"ha-failover-{rnd}")
    with Procs(d) as ps:
        pair = Pair(ps, d, f"hafo{rnd}")
        common = {"sequencers": pair.sequencers, "request_timeout_ms": 500,
                  "data": str(d / "plants")}
        cons = [ps.worker(f"hafo{rnd}-c{i}", "ha_cons",
                          {**common, "idx": i, "n_total": total, "n_per": n_per, "idle_s": 30})
                for i in range(2)]
        for c in cons:
            c.expect("READY", 30)
        prods = [ps.worker(f"hafo{rnd}-p{i}", "ha_prod",
                           {**common, "idx": i, "n": n_per, "rate": rate, "timeout": 120})
                 for i in range(2)]
        for p in prods:
            p.expect("READY", 30)
        for p in prods:
            p.send("GO")
        # a random moment well inside the stream (after warm-up, before its end)
        delay = rng.uniform(0.5, max(0.6, round_s - 1.5))
        time.sleep(delay)
        before = pair.a.status(2)
        t_kill = time.time_ns()
        os.kill(pair.a.pid, signal.SIGKILL)
        pair.a.proc.p.wait(10)
        end = time.monotonic() + 120 + round_s
        pres = results(prods, end - time.monotonic())
        cres = results(cons, end - time.monotonic())
        try:
            sb = pair.b.status(5)
        except Exception as exc:     # noqa: BLE001
            sb = {"error": str(exc)}
        pair.stop()
    from .run import check
    check(pres + cres, f"ha-failover round {rnd}")
    for cr in cres:
        if cr["received"] != total:
            raise BenchFailure(f"VERIFICATION FAILED in ha-failover round {rnd}: a consumer got "
                               f"{cr['received']} of {total}")
        if sorted(cr["per_producer"].values()) != [n_per, n_per]:
            raise BenchFailure(f"VERIFICATION FAILED in ha-failover round {rnd}: per producer "
                               f"{cr['per_producer']}, expected {n_per} each")
        if not cr["t_new_epoch_ns"]:
            raise BenchFailure(f"ha-failover round {rnd}: a consumer saw no message of a new "
                               f"epoch (epochs {cr['epochs']}; kill at {before.get('last_seq')} "
                               f"of {total})")
    if sb.get("role") != "active" or not sb.get("epoch", 0) > before.get("epoch", 0):
        raise BenchFailure(f"ha-failover round {rnd}: the standby did not take over: {sb}")
    fo = [(cr["t_new_epoch_ns"] - t_kill) / 1e6 for cr in cres]
    return {"failover_ms": fo, "kill_after_s": round(delay, 3),
            "seq_at_kill": before.get("last_seq"), "epoch_before": before.get("epoch"),
            "epoch_after": sb.get("epoch"), "first_new_seq": [cr["first_new_seq"] for cr in cres],
            "n": total, "resent": sum(r["counters"].get("resent", 0) for r in pres)}


def bench_ha_failover(ctx: Any) -> None:
    rounds = ctx.cfg["ha_rounds"]
    rng = random.Random(4242)
    per: list[dict[str, Any]] = []
    for rnd in range(rounds):
        r = _failover_round(ctx, rnd, rng)
        per.append(r)
        _log(f"ha-failover round {rnd + 1}/{rounds}: killed at seq {r['seq_at_kill']} "
             f"(+{r['kill_after_s']} s), first new-epoch delivery after "
             f"{', '.join(f'{x:.0f}' for x in r['failover_ms'])} ms; {r['n']:,} msgs verified")
    ms = [x for r in per for x in r["failover_ms"]]
    out = {"rounds": rounds, "samples": len(ms), "median_ms": _pct(ms, 0.5),
           "p99_ms": _pct(ms, 0.99), "max_ms": max(ms), "min_ms": min(ms),
           "rate_per_producer": ctx.cfg["ha_rate"], "verified": True, "per_round": per}
    ctx.results["ha-failover"] = out
    _log(f"ha-failover: median {out['median_ms']:.0f} ms, p99 {out['p99_ms']:.0f} ms, "
         f"max {out['max_ms']:.0f} ms over {rounds} rounds x 2 consumers")


def bench_ha_tput(ctx: Any) -> None:
    from .run import _orb, _pair
    n_per = ctx.cfg["ha_tput_n_per"]

    def run(nm: str, i: int) -> dict[str, Any]:
        if nm == "ha-single":
            r = _orb(ctx, f"{nm}-{i}", size=64, n_per=n_per)
            ctx.results.setdefault("ha-single", r)    # shown even if the pair fails
            return r
        r = _orb(ctx, f"{nm}-{i}", size=64, n_per=n_per,
                 make_node=lambda ps, d, name: Pair(ps, d, name))
        sf = r.get("spurious_failover")
        if sf:
            raise BenchFailure(
                f"{nm}: SPURIOUS FAILOVER under load: the standby promoted itself (now "
                f"{sf['b']['role']}, epoch {sf['b']['epoch']}) while the primary was alive (now "
                f"{sf['a']['role']}, set aside {sf['a']['set_aside']} records it had written but "
                f"not replicated); consumers still verified 1..N once, but this is no figure "
                f"for a pair in sync ({r['msg_s']:,.0f} msg/s)")
        sb = r.get("standby") or {}
        if sb.get("last_seq") != r.get("active_last_seq") or sb.get("role") != "standby":
            raise BenchFailure(f"VERIFICATION FAILED in {nm}: the standby holds "
                               f"{sb.get('last_seq')} of {r.get('active_last_seq')} "
                               f"({r.get('standby_error', sb.get('role'))})")
        if (r.get("active_ha") or {}).get("standby") != "in-sync":
            raise BenchFailure(f"{nm}: the standby was not in sync at the end: "
                               f"{r.get('active_ha')}")
        return r

    try:
        single, repl = _pair(ctx, ("ha-single", "ha-repl"), run, "msg_s")
    except BenchFailure as exc:      # shown in the table too, not only in the failure list
        ctx.results["ha-tput-failed"] = {"error": str(exc).splitlines()[0]}
        raise
    ctx.results["ha-single"] = single
    ctx.results["ha-repl"] = repl
    _log(f"ha-tput: {repl['msg_s']:,.0f} msg/s replicated vs {single['msg_s']:,.0f} single node "
         f"({repl['msg_s'] / single['msg_s']:.0%}; rounds {repl['rounds']} vs {single['rounds']})")


def bench_ha(ctx: Any) -> None:
    """Both: the throughput pair first, then the failover rounds."""
    run_parts(ctx, (bench_ha_tput, bench_ha_failover))
