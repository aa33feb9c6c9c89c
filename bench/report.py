"""The bench report: the table, the ratios orbcast / ceiling and orbcast / peer
(Redis Streams, NATS JetStream, Mosquitto), the targets of
issues 2, 3, 4 (hot standby) and 6 (firmware bridge), and where the figures came from (commit, machine).

Pure functions of the results dict that :mod:`bench.run` fills; nothing here
starts a process or reads a clock.
"""

from __future__ import annotations

import os
import platform
from typing import Any

__all__ = ["LAT_RATES", "build_checks", "render_table", "render_checks", "source_info",
           "machine_info"]

#: Offered rates of the latency benchmarks (msg/s).
LAT_RATES = (1_000, 10_000)


def _get(res: dict[str, Any], key: str, *path: str) -> Any:
    v: Any = res.get(key)
    for p in path:
        if not isinstance(v, dict):
            return None
        v = v.get(p)
    return v


def build_checks(res: dict[str, Any], big: bool) -> list[dict[str, Any]]:
    """Ratios orbcast / ceiling and the targets of issues 2 and 3."""
    out: list[dict[str, Any]] = []

    def add(label: str, value: float | None, ref: float | None, *, target: float | None = None,
            kind: str = "ratio", unit: str = "", note: str = "") -> None:
        if value is None:
            return
        row: dict[str, Any] = {"check": label, "value": value, "unit": unit, "note": note}
        if kind == "ratio":
            if not ref:
                return
            row["ratio"] = value / ref
            row["reference"] = ref
            if target is not None:
                row["target"] = f">= {target:.0%}"
                row["pass"] = row["ratio"] >= target
        elif kind == "ratio_max":           # lower is better: pass at or under the target
            if not ref:
                return
            row["ratio"] = value / ref
            row["reference"] = ref
            row["target"] = f"<= {target:.0%}"
            row["pass"] = row["ratio"] <= target  # type: ignore[operator]
        elif kind == "min":
            row["target"] = f">= {target:,.0f} {unit}"
            row["pass"] = value >= target  # type: ignore[operator]
        elif kind == "max":
            row["target"] = f"<= {target:,.0f} {unit}"
            row["pass"] = value <= target  # type: ignore[operator]
        out.append(row)

    o64 = _get(res, "orb-64", "msg_s")
    add("orb-64 / mini-batch (issue 2)", o64, _get(res, "mini-batch", "msg_s"), target=0.35,
        unit="msg/s")
    add("orb-64 absolute (issue 2)", o64, None, kind="min", target=150_000, unit="msg/s")
    add("orb-64 / mini-msg", o64, _get(res, "mini-msg", "msg_s"), unit="msg/s")
    add("orb-64 / pushpull", o64, _get(res, "pushpull", "msg_s"), unit="msg/s")
    add("orb-1k / mini-batch (64 B)", _get(res, "orb-1k", "msg_s"),
        _get(res, "mini-batch", "msg_s"),
        unit="msg/s")
    for rate in LAT_RATES:
        p99 = _get(res, f"orb-lat-{rate}", "latency", "p99_us")
        ref = _get(res, f"mini-lat-{rate}", "latency", "p99_us")
        if rate == 1000:
            add(f"orb p99 @ {rate}/s (issue 2)", p99, None, kind="max", target=1000, unit="us")
            # The same target read as a ratio from one run, as the issue asks for its
            # targets: 1 ms where its minimal loop measured a 0.4 ms p99, i.e. 250 %.
            add(f"orb p99 / mini p99 @ {rate}/s (issue 2)", p99, ref, kind="ratio_max",
                target=2.5, unit="us", note="the issue's 1 ms / its minimal loop's 0.4 ms")
        else:
            add(f"orb p99 / mini p99 @ {rate}/s", p99, ref, unit="us", note="lower is better")
    add("orb p99 @ 1000/s, disk outbox", _get(res, "orb-lat-1000-outbox", "latency", "p99_us"),
        None, kind="max", target=1000, unit="us", note="informative")
    add("replay (issues 2, 3)", _get(res, "replay", "records_s"), None, kind="min", target=400_000,
        unit="rec/s")
    add("replay get_many / replay iterating", _get(res, "replay-bulk", "records_s"),
        _get(res, "replay", "records_s"), unit="rec/s", note="informative")
    hwm = _get(res, "rss", "vmhwm_kb")
    if hwm is not None:
        full = _get(res, "rss", "full_1gb")
        add("node peak RSS (issue 2)", hwm / 1024, None, kind="max", target=40, unit="MB",
            note="1 GB log" if full else
            f"{(_get(res, 'rss', 'log_bytes') or 0) / 1e6:.0f} MB log (not 1 GB: run --big)")
    ing = _get(res, "orb-1k", "node_vmhwm_kb")
    if ing is not None:
        add("node peak RSS ingesting 1 KiB at full rate", ing / 1024, None, kind="max", target=40,
            unit="MB", note="informative: the 40 MB target is about serving a 1 GB log")
    if _get(res, "loss-5pct", "warning"):
        add("5% egress loss / loss-free (issue 3)", _get(res, "loss-5pct", "msg_s"),
            _get(res, "loss-free", "msg_s"), unit="msg/s",
            note="INCONCLUSIVE: no batch was dropped in this run")
    else:
        add("5% egress loss / loss-free (issue 3)", _get(res, "loss-5pct", "msg_s"),
            _get(res, "loss-free", "msg_s"), target=0.70, unit="msg/s")
    # issue 4: hot standby
    add("HA failover p99, kill -> new epoch (issue 4)", _get(res, "ha-failover", "p99_ms"), None,
        kind="max", target=1000, unit="ms",
        note=f"{_get(res, 'ha-failover', 'samples')} samples, "
             f"{_get(res, 'ha-failover', 'rounds')} rounds")
    add("HA failover median (issue 4)", _get(res, "ha-failover", "median_ms"), None,
        target=None, unit="ms", kind="info")
    add("replicated / single-node 64 B (issue 4)", _get(res, "ha-repl", "msg_s"),
        _get(res, "ha-single", "msg_s"), target=0.60, unit="msg/s",
        note="single node interleaved in the same bench")
    if _get(res, "orb-64", "msg_s"):
        add("replicated / orb-64", _get(res, "ha-repl", "msg_s"), _get(res, "orb-64", "msg_s"),
            unit="msg/s", note="informative")
    if res.get("ha-tput-failed"):
        out.append({"check": "replicated / single-node 64 B (issue 4)", "value": 0.0,
                    "unit": "msg/s", "target": ">= 60%", "pass": False,
                    "note": "NO FIGURE: " + res["ha-tput-failed"]["error"][:70]})
    # issue 6: firmware bridge
    add("bridge idle CPU, 10 sensors @ 1 Hz (issue 6)", _get(res, "bridge-idle", "cpu_pct"), None,
        kind="max", target=1, unit="%", note="share of one core")
    hwm = _get(res, "bridge-idle", "vmhwm_kb")
    add("bridge peak RSS (issue 6)", hwm / 1024 if hwm else None, None, kind="max", target=50,
        unit="MB")
    add("Button press -> plant p99 (issue 6)", _get(res, "bridge-press", "p99_ms"), None,
        kind="max", target=20, unit="ms", note=f"{_get(res, 'bridge-press', 'n')} presses")
    # issue 5: link security
    add("security on / off, 64 B 2+2 (issue 5)", _get(res, "sec-on", "msg_s"),
        _get(res, "sec-off", "msg_s"), target=0.60, unit="msg/s",
        note="interleaved rounds in the same bench")
    add("replay with / without link security", _get(res, "sec-replay-on", "records_s"),
        _get(res, "sec-replay-off", "records_s"), unit="rec/s", note="informative, same log")
    add("handshake + first message p99 (issue 5)", _get(res, "sec-handshake", "p99_ms"), None,
        kind="max", target=20, unit="ms",
        note=f"cleartext PING on a fresh connection: p99 "
             f"{_get(res, 'sec-handshake', 'clear_p99_ms') or 0:.2f} ms")
    add("disk outbox / memory outbox publish (issue 3)", _get(res, "outbox-disk", "publish_msg_s"),
        _get(res, "outbox-memory", "publish_msg_s"), target=0.70, unit="msg/s")
    # the peers a user would pick instead (DESIGN.md "Performance stance"): no target
    for key, label, note in PEER_RATIOS:
        add(label, o64, _get(res, key, "msg_s"), unit="msg/s", note=note)
    add("orbcast replay / Redis late reader", _get(res, "replay", "records_s"),
        _get(res, "redis-replay", "records_s"), unit="rec/s",
        note="Redis serves it from memory")
    return out


#: orb-64 / peer: (result key, label, note); the peers' durability differs, see notes.
PEER_RATIOS = (
    ("redis", "orb-64 / Redis Streams", "both fsync before the ack"),
    ("nats", "orb-64 / NATS JetStream, default sync", "NATS fsyncs every 2 min"),
    ("nats-sync-always", "orb-64 / NATS JetStream, sync always", "both fsync every write"),
    ("mosquitto", "orb-64 / Mosquitto QoS 1", "Mosquitto: no fsync, no replay"),
)


def render_table(res: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []

    def r(name: str, val: str, note: str = "") -> None:
        rows.append((name, val, note))

    def rate(key: str, label: str, field: str = "msg_s", extra: str = "") -> None:
        v = _get(res, key, field)
        if v is not None:
            r(label, f"{v:>12,.0f} msg/s", extra)

    rate("pushpull", "ceiling: raw pyzmq PUSH->PULL, 64 B, 2 prod", extra="one frame per message")
    for k, lab in (("mini-msg", "ceiling: mini loop, frame+ack per msg"),
                   ("mini-batch", "ceiling: mini loop, batched frames+acks")):
        v = res.get(k)
        if v:
            r(lab + ", 64 B", f"{v['msg_s']:>12,.0f} msg/s",
              f"fsync on, {v['msgs_per_fsync']:g} msgs/fsync, 2 prod + 2 cons verified")
    for rate_ in LAT_RATES:
        v = _get(res, f"mini-lat-{rate_}", "latency")
        if v:
            r(f"ceiling: mini loop latency @ {rate_:,}/s",
              f"p50 {v['p50_us']:,.0f} / p99 {v['p99_us']:,.0f} us",
              f"max {v['max_us']:,.0f} us")
    for k, lab in (("orb-64", "orbcast 64 B, 2 prod + 2 cons"),
                   ("orb-1k", "orbcast 1 KiB, 2 prod + 2 cons"),
                   ("nofsync-64", "NO-FSYNC node: orbcast 64 B, 2 prod + 2 cons"),
                   ("loss-free", "orbcast 64 B loss-free (issue 3 pair)"),
                   ("loss-5pct", "orbcast 64 B, 5% egress batches dropped")):
        v = res.get(k)
        if v:
            extra = (f"publish {v['publish_msg_s']:,.0f}/s, "
                     f"node {v['node_cpu_us_per_msg']} us CPU/msg, "
                     f"{v.get('msgs_per_fsync', '?')} msgs/"
                     f"{'fsync' if v.get('node_fsync', True) else 'commit (no fsync)'}")
            if k in ("orb-64", "orb-1k") and v.get("node_vmhwm_kb"):
                extra += f", node VmHWM {v['node_vmhwm_kb'] / 1024:.1f} MB"
            if v.get("rounds") and len(v["rounds"]) > 1:
                extra += f", mean of rounds {v['rounds']}"
            if k == "loss-5pct":
                extra += (f", {v['dropped_batches']} of {v['batches_total']} batches dropped,"
                          f" {v['repaired']} msgs repaired")
            r(lab, f"{v['msg_s']:>12,.0f} msg/s", extra)
    for k, lab in ((f"orb-lat-{LAT_RATES[0]}", f"orbcast latency @ {LAT_RATES[0]:,}/s"),
                   (f"orb-lat-{LAT_RATES[1]}", f"orbcast latency @ {LAT_RATES[1]:,}/s"),
                   ("orb-lat-1000-outbox", "orbcast latency @ 1,000/s, disk outbox"),
                   ("nofsync-lat-1000", "NO-FSYNC node: orbcast latency @ 1,000/s")):
        v = _get(res, k, "latency")
        if v:
            a_ = _get(res, k, "latency_to_sequencer") or {}
            b_ = _get(res, k, "latency_from_sequencer") or {}
            r(lab, f"p50 {v['p50_us']:,.0f} / p99 {v['p99_us']:,.0f} us",
              f"p99.9 {v['p999_us']:,.0f}, max {v['max_us']:,.0f} us, n={v['n']}; "
              f"send->stamp p50 {a_.get('p50_us', 0):,.0f}/p99 {a_.get('p99_us', 0):,.0f}, "
              f"stamp->app p50 {b_.get('p50_us', 0):,.0f}/p99 {b_.get('p99_us', 0):,.0f} us")
    v = res.get("replay")
    if v:
        r("orbcast replay to one plant, 64 B", f"{v['records_s']:>12,.0f} rec/s",
          f"{v['n']:,} records, plant {v['plant_cpu_us_per_rec']} / "
          f"node {v['node_cpu_us_per_rec']} us CPU/rec")
    v = res.get("replay-bulk")
    if v:
        r("orbcast replay, application get_many()", f"{v['records_s']:>12,.0f} rec/s",
          f"{v['n']:,} records, plant {v['plant_cpu_us_per_rec']} / "
          f"node {v['node_cpu_us_per_rec']} us CPU/rec")
    v = res.get("rss")
    if v:
        r("orbcast node peak RSS (VmHWM)", f"{v['vmhwm_kb'] / 1024:>12.1f} MB",
          f"log {v['log_bytes'] / 1e6:,.0f} MB, replayed {v['replayed']:,} x 1 KiB at "
          f"{v['replay_records_s']:,.0f}/s, node start {v['node_start_s']} s")
    for k, lab in (("outbox-memory", "orbcast publish, memory outbox"),
                   ("outbox-disk", "orbcast publish, disk outbox")):
        v = res.get(k)
        if v:
            extra = f"2 producers, no consumers, producer {v['producer_cpu_us_per_msg']} us CPU/msg"
            if v.get("flush_early_unacked"):
                extra += f", flush() returned {v['flush_early_unacked']} msgs early (bug)"
            if v.get("rounds") and len(v["rounds"]) > 1:
                extra += f", mean of rounds {v['rounds']}"
            r(lab, f"{v['publish_msg_s']:>12,.0f} msg/s", extra)
    for k, lab in (("ha-single", "orbcast 64 B single node (issue 4 pair)"),
                   ("ha-repl", "orbcast 64 B, primary + standby in sync")):
        v = res.get(k)
        if v:
            extra = (f"publish {v['publish_msg_s']:,.0f}/s, active node "
                     f"{v['node_cpu_us_per_msg']} us CPU/msg, "
                     f"{v.get('msgs_per_fsync', '?')} msgs/fsync")
            sb = v.get("standby")
            if sb:
                extra += (f", standby {sb.get('cpu_s', 0) / max(1, v['n']) * 1e6:.1f} us CPU/msg, "
                          f"holds {sb.get('last_seq'):,}")
            if v.get("rounds") and len(v["rounds"]) > 1:
                extra += f", mean of rounds {v['rounds']}"
            r(lab, f"{v['msg_s']:>12,.0f} msg/s", extra)
    if res.get("ha-tput-failed"):
        r("orbcast 64 B, primary + standby in sync", "FAILED",
          res["ha-tput-failed"]["error"][:150])
    v = res.get("ha-failover")
    if v:
        r("HA failover: SIGKILL -> first new-epoch msg",
          f"p50 {v['median_ms']:,.0f} / p99 {v['p99_ms']:,.0f} ms",
          f"max {v['max_ms']:,.0f} ms, {v['rounds']} rounds x 2 consumers, 2 x "
          f"{v['rate_per_producer']} msg/s, every round verified 1..N once")
    v = res.get("bridge-idle")
    if v:
        r("firmware bridge idle CPU, 10 sensors @ 1 Hz", f"{v['cpu_pct']:>10.2f} % core",
          f"{v['cpu_s']} s CPU in {v['wall_s']} s, {v['readings_s']} readings/s sequenced, "
          f"VmHWM {(v['vmhwm_kb'] or 0) / 1024:.1f} MB")
    v = res.get("bridge-press")
    if v:
        r("firmware bridge Button press -> plant",
          f"p50 {v['p50_ms']:,.1f} / p99 {v['p99_ms']:,.1f} ms",
          f"max {v['max_ms']:,.1f} ms, {v['n']} presses; press->reading stamp p99 "
          f"{v['press_to_reading_stamp_p99_ms']:.2f} ms, stamp->delivery p99 "
          f"{v['reading_stamp_to_delivery_p99_ms']:.1f} ms")
    _peer_rows(res, r)
    w0 = max(len(a) for a, _, _ in rows) if rows else 10
    w1 = max(len(b) for _, b, _ in rows) if rows else 10
    lines = [f"{'benchmark':<{w0}}  {'result':>{w1}}  notes", "-" * (w0 + w1 + 40)]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def _peer_rows(res: dict[str, Any], r: Any) -> None:
    """The peers, on orb-64's workload (bench/peers.py), durability in the notes."""
    for k, lab, how in (
            ("redis", "peer: Redis Streams 64 B, 2 prod + 2 cons",
             "appendfsync always (fsync before the reply)"),
            ("nats", "peer: NATS JetStream 64 B, 2 prod + 2 cons",
             "DEFAULT durability: fsync every 2 min, acked before fsync"),
            ("nats-sync-always", "peer: NATS JetStream 64 B, sync always",
             "sync_interval: always (fsync every write)"),
            ("mosquitto", "peer: Mosquitto QoS 1 64 B, 2 prod + 2 cons",
             "no replay, no fsync: acked from memory")):
        v = res.get(k)
        if not v:
            continue
        extra = (f"{how}; publish {v['publish_msg_s']:,.0f}/s, server "
                 f"{v['server_cpu_us_per_msg']} us CPU/msg, {v.get('server', '?')}")
        r(lab, f"{v['msg_s']:>12,.0f} msg/s", extra)
        if k == "nats" and v.get("sync_always"):
            r("peer: NATS JetStream 64 B, sync always", "not measured", v["sync_always"])
    v = res.get("redis-replay")
    if v:
        r("peer: Redis Streams late reader from 0, 64 B", f"{v['records_s']:>12,.0f} rec/s",
          f"{v['n']:,} records, XREAD COUNT {v['count']} (from memory), reader "
          f"{v['reader_cpu_us_per_rec']} / server {v['server_cpu_us_per_rec']} us CPU/rec")


def render_checks(checks: list[dict[str, Any]]) -> str:
    lines = [f"{'ratio / target':<46} {'value':>14} {'ratio':>8} {'target':>18}  verdict",
             "-" * 100]
    for c in checks:
        val = c["value"]
        vs = f"{val:,.0f} {c['unit']}" if val >= 100 else f"{val:.1f} {c['unit']}"
        ratio = f"{c['ratio']:.1%}" if "ratio" in c else ""
        verdict = ("PASS" if c["pass"] else "MISS") if "pass" in c else "info"
        note = f"  ({c['note']})" if c.get("note") else ""
        lines.append(f"{c['check']:<46} {vs:>14} {ratio:>8} {c.get('target', ''):>18}  "
                     f"{verdict}{note}")
    return "\n".join(lines)


def source_info() -> dict[str, Any]:
    """The commit measured, and whether the work tree differs from it (read-only git)."""
    import subprocess

    from .proc import ROOT
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")   # never touch the index
    out: dict[str, Any] = {"root": str(ROOT)}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, env=env,
                                       capture_output=True, text=True, timeout=10).stdout.strip()
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=10).stdout
        out["modified_files"] = [ln[3:] for ln in st.splitlines()]
    except (OSError, subprocess.SubprocessError):
        pass
    if not out.get("commit") and (ROOT / ".commit").exists():
        out["commit"] = (ROOT / ".commit").read_text().strip()
    return out


def machine_info() -> dict[str, Any]:
    import zmq
    info: dict[str, Any] = {"python": platform.python_version(), "pyzmq": zmq.__version__,
                            "libzmq": zmq.zmq_version(), "cpus": os.cpu_count(),
                            "platform": platform.platform()}
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info
