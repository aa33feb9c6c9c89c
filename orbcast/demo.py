"""``make demo``: a local orbcast cluster on loopback, end to end, with link security on.

Makes identity keys for two nodes and five plants, an allowlist (who may
publish and read which topics) and the plants' pins; starts a primary and a
hot-standby sequencer node, two consuming plants
(``plant tail``) and two publishing plants (``plant publish --stdin``),
shows canonical messages flowing, kills the primary with SIGKILL mid-stream
and shows the plants carrying on with the standby, checks that both
consumers saw the identical gap-free sequence, replays the log, and brings
the old primary back as the new standby. Everything
runs as real processes, exactly as a user would run them; state goes to
``./demo-data`` (wiped at start).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from orbcast.rpc import wait_ready

#: The demo's nodes use ports BASE..BASE+7 on loopback.
BASE = int(os.environ.get("ORBCAST_DEMO_PORT", "7450"))
PER_PUBLISHER = 60
PY = sys.executable


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def _pump(proc: subprocess.Popen[str], label: str, sink: list[str], show: int) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sink.append(line.rstrip("\n"))
        if len(sink) <= show:
            print(f"  [{label}] {line.rstrip()}", flush=True)


#: Plants of the demo and their allowlist entries: (publish prefixes, read prefixes).
PLANTS = {"greenhouse": (["sensors/greenhouse/"], []), "workshop": (["sensors/workshop/"], []),
          "consumer-A": ([], ["sensors/"]), "consumer-B": ([], ["sensors/"]), "cli": ([], [""])}


def _keys(root: Path) -> dict[str, str]:
    """Identities, allowlist and pins under ``root/keys``; returns node key texts."""
    import json
    from orbcast.keys import generate_identity_file
    kd = root / "keys"
    nodes = {n: generate_identity_file(kd, n)[0].public_text for n in ("pi-a", "pi-b")}
    lines = []
    for name, (pub, read) in PLANTS.items():
        ident = generate_identity_file(kd, name)[0]
        lines += ["[[plant]]", f"name = {json.dumps(name)}", f"key = {json.dumps(ident.public_text)}",
                  f"publish = {json.dumps(pub)}", f"read = {json.dumps(read)}", ""]
    (kd / "allowlist.toml").write_text("\n".join(lines))
    (kd / "pins.toml").write_text("".join(f'[[node]]\nname = "{n}"\nkey = "{k}"\n' for n, k in nodes.items()))
    return nodes


def _node(root: Path, name: str, role: str, ports: tuple[int, int, int, int], peer_port: int,
          env: dict[str, str], peer_key: str) -> subprocess.Popen[str]:
    ing, egr, peer, ctl = ports
    kd = root / "keys"
    env = {**env, "ORBCAST_SEQUENCER_SECURITY": "ratchet",
           "ORBCAST_SEQUENCER_IDENTITY": str(kd / f"{name}.key"),
           "ORBCAST_SEQUENCER_ALLOWLIST": str(kd / "allowlist.toml"),
           "ORBCAST_SEQUENCER_PEER_KEY": peer_key}
    return subprocess.Popen(
        [PY, "-m", "sequencer", "run", "--data", str(root / name), "--node-id", name,
         "--role", role, "--ingress", f"tcp://127.0.0.1:{ing}", "--egress", f"tcp://127.0.0.1:{egr}",
         "--peer", f"tcp://127.0.0.1:{peer}", "--peer-connect", f"tcp://127.0.0.1:{peer_port}",
         "--control", f"tcp://127.0.0.1:{ctl}", "--log-level", "warning"], env=env, text=True)


def _status(ep: str) -> dict:
    from orbcast.envelope import StatusRequest
    from orbcast.rpc import request
    return request(ep, StatusRequest(rid=1), timeout=5).info


def _wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    import time
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.05)


def main() -> int:
    import time
    root = Path.cwd() / "demo-data"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[str]] = []
    a_ports, b_ports = (BASE, BASE + 1, BASE + 2, BASE + 6), (BASE + 3, BASE + 4, BASE + 5, BASE + 7)
    A, B = f"tcp://127.0.0.1:{a_ports[0]}", f"tcp://127.0.0.1:{b_ports[0]}"
    CA, CB = f"tcp://127.0.0.1:{a_ports[3]}", f"tcp://127.0.0.1:{b_ports[3]}"   # control endpoints
    seqs = ["--sequencer", A, "--sequencer", B]
    kd = root / "keys"

    def plant_env(name: str) -> dict[str, str]:
        return {**env, "ORBCAST_PLANT_SECURITY": "ratchet", "ORBCAST_PLANT_PINS": str(kd / "pins.toml"),
                "ORBCAST_PLANT_IDENTITY": str(kd / f"{name}.key")}

    def plant(name: str, *args: str, **kw: object) -> subprocess.Popen[str]:
        p = subprocess.Popen([PY, "-m", "plant", *args, *seqs, "--data", str(root / name),
                              "--producer-id", name], text=True, env=plant_env(name), **kw)  # type: ignore[call-overload]
        procs.append(p)
        return p

    try:
        say("link security: identity keys for 2 nodes and 5 plants, an allowlist, pins")
        node_keys = _keys(root)
        for n, k in node_keys.items():
            print(f"  {n}: {k}")
        print(f"  allowlist: greenhouse may publish sensors/greenhouse/, workshop sensors/workshop/;"
              f" the consumers may read sensors/ ({kd / 'allowlist.toml'})")
        say(f"starting a primary (pi-a, ingress {A}) and a hot standby (pi-b, ingress {B})")
        node_a = _node(root, "pi-a", "primary", a_ports, b_ports[2], env, node_keys["pi-b"])
        node_b = _node(root, "pi-b", "standby", b_ports, a_ports[2], env, node_keys["pi-a"])
        procs += [node_a, node_b]
        wait_ready(A, timeout=20)
        wait_ready(B, timeout=20)
        _wait(lambda: _status(CA)["role"] == "active" and _status(CA)["ha"]["standby"] == "in-sync"
              and _status(CB)["ha"]["eligible"], 20, "the pair to be in sync")
        print("  pi-a is active (epoch 1), pi-b is an in-sync standby; the peer link runs over CURVE")

        total = 2 * PER_PUBLISHER
        say(f"two consuming plants tail the stream from seq 1 (they stop after {total})")
        outs: dict[str, list[str]] = {"consumer-A": [], "consumer-B": []}
        threads = []
        for name in outs:
            c = plant(name, "tail", "--from", "1", "--count", str(total), stdout=subprocess.PIPE)
            t = threading.Thread(target=_pump, args=(c, name, outs[name], 10 if name == "consumer-A" else 0))
            t.start()
            threads.append((c, t))

        say("two publishing plants send sensor readings, one line per message, ~40 a second")
        pubs = []
        for name, topic in (("greenhouse", "sensors/greenhouse/temp"), ("workshop", "sensors/workshop/humidity")):
            p = plant(name, "publish", topic, "--stdin", "--timeout", "60",
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            pubs.append((name, p))
        for i in range(PER_PUBLISHER):
            for k, (_name, p) in enumerate(pubs):
                assert p.stdin is not None
                p.stdin.write(f"{(21.0 if k == 0 else 40.0) + (i % 7) * 0.5:.1f}\n")
                p.stdin.flush()
            if i == PER_PUBLISHER // 2:
                say("kill -9 the primary (pi-a) in the middle of the stream")
                node_a.kill()
                node_a.wait()
            time.sleep(0.05)
        for name, p in pubs:
            out, _ = p.communicate(timeout=120)
            got = out.split()
            print(f"  {name}: {len(got)} messages acked, the last seqs {', '.join(got[-4:])}")
            if p.returncode != 0:
                raise SystemExit(f"publisher {name} failed")
        st = _status(CB)
        print(f"  pi-b took over: role {st['role']}, epoch {st['epoch']}, last seq {st['last_seq']}; "
              f"the plants resent what pi-a had not acked and dedup kept it exactly once")
        for c, t in threads:
            c.wait(timeout=120)
            t.join(10)
        a, b = outs["consumer-A"], outs["consumer-B"]
        print(f"  ... consumer-A printed {len(a)} messages; consumer-B printed {len(b)}")
        seqs_seen = [int(line.split()[0]) for line in a]
        ok = a == b and seqs_seen == list(range(1, total + 1))
        print(f"  both consumers delivered the identical, gap-free sequence 1..{total} across the "
              f"failover: {'yes' if ok else 'NO'}")

        say("replay of the log from the new active node: epochs change, seqs do not skip")
        r = subprocess.run([PY, "-m", "plant", "replay", "--from", "1", "--format", "jsonl", *seqs,
                            "--data", str(root / "cli"), "--producer-id", "cli"],
                           env=plant_env("cli"), text=True, capture_output=True, timeout=60, check=True)
        import json
        recs = [json.loads(line) for line in r.stdout.splitlines()]
        by_epoch: dict[int, list[int]] = {}
        for rec in recs:
            by_epoch.setdefault(rec["epoch"], []).append(rec["seq"])
        for e, ss in sorted(by_epoch.items()):
            print(f"  epoch {e}: seqs {ss[0]}..{ss[-1]} ({len(ss)} records)")
        print(f"  {json.dumps(recs[-1])}")

        say("a plant without an allowlisted key tries to publish: refused")
        before = _status(CB)["counters"]["rejected_frames"]
        r = subprocess.run([PY, "-m", "plant", "publish", "sensors/greenhouse/temp", "99", "--sequencer", B,
                            "--data", str(root / "intruder"), "--producer-id", "greenhouse",
                            "--timeout", "2"], env=env, text=True, capture_output=True, timeout=60)
        print(f"  exit code {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1][:110]}")
        refused = _status(CB)["counters"]["rejected_frames"] - before
        print(f"  pi-b rejected {refused} frames that were not sealed by an allowlisted key; "
              f"nothing was sequenced")

        say("the old primary comes back: it sees the newer epoch and rejoins as standby")
        node_a = _node(root, "pi-a", "primary", a_ports, b_ports[2], env, node_keys["pi-b"])
        procs.append(node_a)
        wait_ready(A, timeout=20)
        _wait(lambda: _status(CA)["role"] == "standby" and _status(CB)["ha"]["standby"] == "in-sync",
              30, "pi-a to rejoin")
        sa, sb = _status(CA), _status(CB)
        print(f"  pi-a: role {sa['role']}; pi-b: role {sb['role']}, standby {sb['ha']['standby']} "
              "(no automatic fail-back)")
        say("sequencer status of the active node")
        subprocess.run([PY, "-m", "sequencer", "status", "--sequencer", CB], env=env, timeout=30)
        say("stopping both nodes (SIGTERM: they commit, snapshot and exit cleanly)")
        for n in (node_a, node_b):
            n.send_signal(signal.SIGTERM)
        codes = [n.wait(timeout=20) for n in (node_a, node_b)]
        print(f"  exit codes {codes}. Data stays in {root} for you to inspect.")
        return 0 if ok and codes == [0, 0] and r.returncode != 0 else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


if __name__ == "__main__":
    sys.exit(main())
