"""``make demo``: a local orbcast cluster on loopback, end to end.

Starts a sequencer node, two consuming plants (``plant tail``) and two
publishing plants (``plant publish --stdin``), shows canonical messages
flowing, checks that both consumers saw the identical sequence, and ends
with a replay of the log (``plant replay``) and ``plant status``. Everything
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

INGRESS = os.environ.get("ORBCAST_DEMO_INGRESS", "tcp://127.0.0.1:7450")
EGRESS = os.environ.get("ORBCAST_DEMO_EGRESS", "tcp://127.0.0.1:7451")
PER_PUBLISHER = 25
PY = sys.executable


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def _pump(proc: subprocess.Popen[str], label: str, sink: list[str], show: int) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sink.append(line.rstrip("\n"))
        if len(sink) <= show:
            print(f"  [{label}] {line.rstrip()}", flush=True)


def main() -> int:
    root = Path.cwd() / "demo-data"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[str]] = []

    def plant(*args: str, **kw: object) -> subprocess.Popen[str]:
        p = subprocess.Popen([PY, "-m", "plant", *args, "--sequencer", INGRESS], text=True,
                             env=env, **kw)  # type: ignore[call-overload]
        procs.append(p)
        return p

    try:
        say(f"starting a sequencer node (ingress {INGRESS}, egress {EGRESS}, data {root}/node)")
        node = subprocess.Popen([PY, "-m", "sequencer", "run", "--data", str(root / "node"),
                                 "--ingress", INGRESS, "--egress", EGRESS, "--node-id", "demo-node",
                                 "--log-level", "warning"], env=env, text=True)
        procs.append(node)
        wait_ready(INGRESS, timeout=20)
        print("  node is up (answered a PING)")

        total = 2 * PER_PUBLISHER
        say(f"two consuming plants tail the stream from seq 1 (they will stop after {total})")
        outs: dict[str, list[str]] = {"consumer-A": [], "consumer-B": []}
        threads = []
        for name in outs:
            c = plant("tail", "--from", "1", "--count", str(total), "--data", str(root / name),
                      "--producer-id", name, stdout=subprocess.PIPE)
            t = threading.Thread(target=_pump, args=(c, name, outs[name], 12 if name == "consumer-A" else 0))
            t.start()
            threads.append((c, t))

        say("two publishing plants send sensor readings (each line is one message)")
        pubs = []
        for name, topic, base in (("greenhouse", "sensors/greenhouse/temp", 21.0),
                                  ("workshop", "sensors/workshop/humidity", 40.0)):
            lines = "".join(f"{base + (i % 7) * 0.5:.1f}\n" for i in range(PER_PUBLISHER))
            p = plant("publish", topic, "--stdin", "--data", str(root / name), "--producer-id", name,
                      "--timeout", "60", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            pubs.append((name, p, lines))
        for name, p, lines in pubs:
            out, _ = p.communicate(lines, timeout=120)
            seqs = out.split()
            print(f"  {name}: {len(seqs)} messages acked, seqs {', '.join(seqs[:6])} ...")
            if p.returncode != 0:
                raise SystemExit(f"publisher {name} failed")

        for c, t in threads:
            c.wait(timeout=120)
            t.join(10)
        a, b = outs["consumer-A"], outs["consumer-B"]
        print(f"  ... consumer-A printed {len(a)} messages; consumer-B printed {len(b)}")
        seqs = [int(line.split()[0]) for line in a]
        ok = a == b and seqs == list(range(1, total + 1))
        print(f"  both consumers delivered the identical, gap-free sequence 1..{total}: "
              f"{'yes' if ok else 'NO'}")

        say("replay of the log (plant replay --from 1 --format text), first and last lines")
        r = subprocess.run([PY, "-m", "plant", "replay", "--from", "1", "--format", "text",
                            "--sequencer", INGRESS, "--data", str(root / "cli"), "--producer-id", "cli"],
                           env=env, text=True, capture_output=True, timeout=60, check=True)
        lines = r.stdout.splitlines()
        for line in lines[:4] + ["  ..."] + lines[-3:]:
            print(f"  {line}")
        say("the same record as JSON lines (plant replay --from 3 --to 3)")
        r = subprocess.run([PY, "-m", "plant", "replay", "--from", "3", "--to", "3",
                            "--sequencer", INGRESS, "--data", str(root / "cli"), "--producer-id", "cli"],
                           env=env, text=True, capture_output=True, timeout=60, check=True)
        print(f"  {r.stdout.strip()}")
        say("plant status (the node's view and this plant's)")
        subprocess.run([PY, "-m", "plant", "status", "--sequencer", INGRESS,
                        "--data", str(root / "greenhouse"), "--producer-id", "greenhouse"],
                       env=env, timeout=30)
        say("stopping the node (SIGTERM: it commits, snapshots and exits cleanly)")
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=20)
        print(f"  exit code {node.returncode}. Data stays in {root} for you to inspect.")
        return 0 if ok and node.returncode == 0 else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


if __name__ == "__main__":
    sys.exit(main())
