"""``make demo``: a local orbcast cluster on loopback, end to end.

Starts a primary and a hot-standby sequencer node, two consuming plants
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

#: The demo's nodes use ports BASE..BASE+5 on loopback.
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


def _node(root: Path, name: str, role: str, ports: tuple[int, int, int], peer_port: int,
          env: dict[str, str]) -> subprocess.Popen[str]:
    ing, egr, peer = ports
    return subprocess.Popen(
        [PY, "-m", "sequencer", "run", "--data", str(root / name), "--node-id", name,
         "--role", role, "--ingress", f"tcp://127.0.0.1:{ing}", "--egress", f"tcp://127.0.0.1:{egr}",
         "--peer", f"tcp://127.0.0.1:{peer}", "--peer-connect", f"tcp://127.0.0.1:{peer_port}",
         "--log-level", "warning"], env=env, text=True)


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
    a_ports, b_ports = (BASE, BASE + 1, BASE + 2), (BASE + 3, BASE + 4, BASE + 5)
    A, B = f"tcp://127.0.0.1:{a_ports[0]}", f"tcp://127.0.0.1:{b_ports[0]}"
    seqs = ["--sequencer", A, "--sequencer", B]

    def plant(*args: str, **kw: object) -> subprocess.Popen[str]:
        p = subprocess.Popen([PY, "-m", "plant", *args, *seqs], text=True, env=env, **kw)  # type: ignore[call-overload]
        procs.append(p)
        return p

    try:
        say(f"starting a primary (pi-a, ingress {A}) and a hot standby (pi-b, ingress {B})")
        node_a = _node(root, "pi-a", "primary", a_ports, b_ports[2], env)
        node_b = _node(root, "pi-b", "standby", b_ports, a_ports[2], env)
        procs += [node_a, node_b]
        wait_ready(A, timeout=20)
        wait_ready(B, timeout=20)
        _wait(lambda: _status(A)["role"] == "active" and _status(A)["ha"]["standby"] == "in-sync"
              and _status(B)["ha"]["eligible"], 20, "the pair to be in sync")
        print("  pi-a is active (epoch 1), pi-b is an in-sync standby")

        total = 2 * PER_PUBLISHER
        say(f"two consuming plants tail the stream from seq 1 (they stop after {total})")
        outs: dict[str, list[str]] = {"consumer-A": [], "consumer-B": []}
        threads = []
        for name in outs:
            c = plant("tail", "--from", "1", "--count", str(total), "--data", str(root / name),
                      "--producer-id", name, stdout=subprocess.PIPE)
            t = threading.Thread(target=_pump, args=(c, name, outs[name], 10 if name == "consumer-A" else 0))
            t.start()
            threads.append((c, t))

        say("two publishing plants send sensor readings, one line per message, ~40 a second")
        pubs = []
        for name, topic in (("greenhouse", "sensors/greenhouse/temp"), ("workshop", "sensors/workshop/humidity")):
            p = plant("publish", topic, "--stdin", "--data", str(root / name), "--producer-id", name,
                      "--timeout", "60", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
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
        st = _status(B)
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
                           env=env, text=True, capture_output=True, timeout=60, check=True)
        import json
        recs = [json.loads(line) for line in r.stdout.splitlines()]
        by_epoch: dict[int, list[int]] = {}
        for rec in recs:
            by_epoch.setdefault(rec["epoch"], []).append(rec["seq"])
        for e, ss in sorted(by_epoch.items()):
            print(f"  epoch {e}: seqs {ss[0]}..{ss[-1]} ({len(ss)} records)")
        print(f"  {json.dumps(recs[-1])}")

        say("the old primary comes back: it sees the newer epoch and rejoins as standby")
        node_a = _node(root, "pi-a", "primary", a_ports, b_ports[2], env)
        procs.append(node_a)
        wait_ready(A, timeout=20)
        _wait(lambda: _status(A)["role"] == "standby" and _status(B)["ha"]["standby"] == "in-sync",
              30, "pi-a to rejoin")
        sa, sb = _status(A), _status(B)
        print(f"  pi-a: role {sa['role']}; pi-b: role {sb['role']}, standby {sb['ha']['standby']} "
              "(no automatic fail-back)")
        say("sequencer status of the active node")
        subprocess.run([PY, "-m", "sequencer", "status", "--sequencer", B], env=env, timeout=30)
        say("stopping both nodes (SIGTERM: they commit, snapshot and exit cleanly)")
        for n in (node_a, node_b):
            n.send_signal(signal.SIGTERM)
        codes = [n.wait(timeout=20) for n in (node_a, node_b)]
        print(f"  exit codes {codes}. Data stays in {root} for you to inspect.")
        return 0 if ok and codes == [0, 0] else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


if __name__ == "__main__":
    sys.exit(main())
