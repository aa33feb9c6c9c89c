"""Issue 5 benchmarks: the cost of link security, as ratios from one run.

  sec-tput       orb-64 (64 B, 2 producers + 2 consumers, fsync on) with
                 security = "ratchet" vs the same with security off,
                 interleaved rounds in one run (target: >= 60 %)
  sec-replay     one plant replaying the whole log with link security (every chunk
                 re-encrypted for it, filtered by its read ACL) vs without, same log,
                 same run (informative; issue 3's 400k/s target is for plain replay)
  sec-handshake  LINK_HELLO -> LINK_KEYS -> LINK_INIT carrying a PING -> the
                 sealed PONG, on a fresh connection each time, against a
                 running secured node (target: p99 <= 20 ms); the cleartext
                 PING round trip on a fresh connection is the baseline

Keys are made for the run under its work dir (a node identity, one identity
per bench plant, an allowlist letting every bench plant publish and read
everything, the plants' pins).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from .proc import BenchFailure, Procs, run_parts

#: Handshake round trips measured (each on a fresh DEALER and a fresh session).
HANDSHAKES = 200


def _log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def make_keys(root: Path, plants: list[str]) -> tuple[Path, dict[str, str]]:
    """Node + plant identities, allowlist and pins under ``root``; returns the
    directory and the node's environment for ``security = "ratchet"``."""
    from orbcast.keys import generate_identity_file
    root.mkdir(parents=True, exist_ok=True)
    node, node_key, _ = generate_identity_file(root, "node")
    entries = []
    for name in plants:
        ident, _k, _p = generate_identity_file(root, name)
        entries.append(f'[[plant]]\nname = "{name}"\nkey = "{ident.public_text}"\n'
                       f'publish = [""]\nread = [""]\n')
    (root / "allowlist.toml").write_text("\n".join(entries))
    (root / "pins.toml").write_text(f'[[node]]\nname = "node"\nkey = "{node.public_text}"\n')
    env = {"ORBCAST_SEQUENCER_SECURITY": "ratchet", "ORBCAST_SEQUENCER_IDENTITY": str(node_key),
           "ORBCAST_SEQUENCER_ALLOWLIST": str(root / "allowlist.toml")}
    return root, env


def bench_sec_tput(ctx: Any) -> None:
    from .run import _orb, _pair
    n_per = ctx.cfg["orb_n_per"]
    keys, env = make_keys(ctx.dir("sec-keys"), [f"bench-p{i}" for i in range(2)]
                          + [f"bench-c{i}" for i in range(2)])

    def run(nm: str, i: int) -> dict[str, Any]:
        if nm == "sec-off":
            return _orb(ctx, f"{nm}-{i}", size=64, n_per=n_per)
        r = _orb(ctx, f"{nm}-{i}", size=64, n_per=n_per, env=env, keys=keys)
        c = r.get("node_counters", {})
        if not c.get("sender_keys_sent"):
            raise BenchFailure(f"{nm}: the node handed out no sender key: was security on? {c}")
        return r

    off, on = _pair(ctx, ("sec-off", "sec-on"), run, "msg_s")
    ctx.results["sec-off"] = off
    ctx.results["sec-on"] = on
    _log(f"sec-tput: {on['msg_s']:,.0f} msg/s with link security vs {off['msg_s']:,.0f} without "
         f"({on['msg_s'] / off['msg_s']:.0%})")


def bench_sec_replay(ctx: Any) -> None:
    from .run import _prefill, _replay
    n = ctx.cfg["replay_n"]
    d = ctx.dir("sec-replay") / "node"
    _prefill(ctx, d, n, 64, "sec-replay")
    keys, env = make_keys(ctx.dir("sec-replay-keys"), ["bench-replay"])
    out = {}
    for nm, kw in (("sec-replay-off", {}), ("sec-replay-on", {"env": env, "keys": keys})):
        r, _mem, st = _replay(ctx, nm, d, 1, n, **kw)
        secs = (r["t_end_ns"] - r["t_start_ns"]) / 1e9
        out[nm] = {"records_s": n / secs, "n": n, "verified": True,
                   "plant_cpu_us_per_rec": round(r["cpu_s"] / n * 1e6, 2),
                   "node_cpu_us_per_rec": round(r["node_cpu_s"] / n * 1e6, 2),
                   "security": st.get("security")}
    if out["sec-replay-on"]["security"] != "ratchet":
        raise BenchFailure(f"sec-replay: the node did not run with link security: {out}")
    ctx.results.update(out)
    on, off = out["sec-replay-on"]["records_s"], out["sec-replay-off"]["records_s"]
    _log(f"sec-replay: {on:,.0f} records/s with link security vs {off:,.0f} without ({on / off:.0%})")


def bench_sec_handshake(ctx: Any) -> None:
    import zmq

    from orbcast import envelope as env_
    from orbcast.keys import load_identity, load_pins
    from orbcast.link import LINK_KEYS, SEALED_DOWN, SENDER_KEY, LinkClient, inner_kind, outer_kind

    from .run import Node
    keys, env = make_keys(ctx.dir("sec-hs-keys"), ["bench-hs"])
    ident, pins = load_identity(keys / "bench-hs.key"), load_pins(keys / "pins.toml")
    d = ctx.dir("sec-handshake")
    zctx = zmq.Context()

    def recv(s: Any) -> list[bytes]:
        if not s.poll(5000):
            raise BenchFailure("sec-handshake: no answer within 5 s")
        return s.recv_multipart()

    def fresh(node: Any) -> Any:
        s = zctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(node.ingress)
        return s

    try:
        with Procs(d) as ps:
            node = Node(ps, d / "node", "sec-hs-node", env=env)
            secured, clear = [], []
            for i in range(HANDSHAKES):
                # cleartext PING on a fresh connection: the baseline
                s = fresh(node)
                t0 = time.perf_counter()
                s.send_multipart(env_.encode(env_.Ping(rid=1)))
                rep = env_.decode(recv(s))
                clear.append(time.perf_counter() - t0)
                s.close(0)
                if not isinstance(rep, env_.Pong):
                    raise BenchFailure(f"sec-handshake: cleartext PING got {rep}")
                # a new session: keys, handshake + first sealed request, first sealed reply
                s = fresh(node)
                link = LinkClient(ident, "bench-hs", pins, persist=lambda *_: None)
                t0 = time.perf_counter()
                s.send_multipart(link.hello(i))
                f = recv(s)
                if outer_kind(f) != LINK_KEYS:
                    raise BenchFailure(f"sec-handshake: expected LINK_KEYS, got kind {outer_kind(f)}")
                link.on_keys(f)
                s.send_multipart(link.seal(env_.encode(env_.Ping(rid=2))))
                while True:
                    f = recv(s)
                    if outer_kind(f) != SEALED_DOWN:
                        raise BenchFailure(f"sec-handshake: refused: {env_.decode(f)}")
                    _k, inner = link.open(f)
                    if inner_kind(inner) != SENDER_KEY:
                        break
                secured.append(time.perf_counter() - t0)
                s.close(0)
                if not isinstance(env_.decode(inner), env_.Pong):
                    raise BenchFailure("sec-handshake: the sealed reply was not a PONG")
            node.stop()
    finally:
        zctx.term()

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

    out = {"n": HANDSHAKES, "p50_ms": pct(secured, 0.5), "p99_ms": pct(secured, 0.99),
           "mean_ms": statistics.fmean(secured) * 1000,
           "clear_p50_ms": pct(clear, 0.5), "clear_p99_ms": pct(clear, 0.99), "verified": True}
    ctx.results["sec-handshake"] = out
    _log(f"sec-handshake: p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms "
         f"(cleartext PING on a fresh connection: p50 {out['clear_p50_ms']:.2f} ms, "
         f"p99 {out['clear_p99_ms']:.2f} ms)")


def bench_sec(ctx: Any) -> None:
    run_parts(ctx, (bench_sec_tput, bench_sec_replay, bench_sec_handshake))
