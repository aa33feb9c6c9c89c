"""sd_notify end to end: the real processes talk to a datagram socket the test owns.

The bridge runs as ``python -m firmware_bridge run`` with ``NOTIFY_SOCKET``
and ``WATCHDOG_USEC`` set as systemd would. Its main loop is stalled for
real: the DS18B20's w1_slave file is swapped for a FIFO that the test holds
open without writing, so the sensor read blocks exactly like a wedged
1-wire bus - and the WATCHDOG=1 pings must stop until it is released.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_bridge.testing import NotifySocket, SequencerProcess, wait_for

REPO = Path(__file__).resolve().parents[2]
WATCHDOG_S = 0.6            # WatchdogSec; pings are due every 0.3 s
SLACK_S = 0.2               # scheduling slack on a loaded test machine
W1_OK = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=20500\n"


@pytest.fixture
def seq(tmp_path: Path) -> Iterator[SequencerProcess]:
    with SequencerProcess(tmp_path / "seq") as s:
        yield s


def reap(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(10)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_bridge_ready_watchdog_status_stall_stopping(seq: SequencerProcess, tmp_path: Path,
                                                      abstract: bool) -> None:
    w1 = tmp_path / "w1" / "28-00000a"
    w1.mkdir(parents=True)
    slave = w1 / "w1_slave"
    slave.write_text(W1_OK)
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(f'''
[plant]
sequencers = ["{seq.ingress}"]
producer_id = "notify-br"
data = "{tmp_path / 'br'}"
[bridge]
w1_path = "{tmp_path / 'w1'}"
[[input]]
type = "DS18B20"
sensor_id = "28-00000a"
topic = "sensors/notify/t"
interval = 0.1
[[input]]
type = "Button"
pin = 17
topic = "sensors/notify/b"
''')
    with NotifySocket(tmp_path, abstract=abstract) as ns:
        env = {**os.environ, "NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
               "GPIOZERO_PIN_FACTORY": "mock"}
        logf = open(tmp_path / "bridge.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "firmware_bridge", "run", "--config", str(cfg),
                              "--log-level", "warning"], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=logf)
        writer = None
        try:
            ready = ns.wait(lambda m: m.get("READY") == "1", 20, "READY=1")
            assert ready["STATUS"].startswith("bridge: 2 inputs, 0 outputs")
            # STATUS follows the acked readings
            ns.wait(lambda m: "last seq" in m.get("STATUS", "") and not m["STATUS"].endswith("last seq 0"),
                    10, "a STATUS with a last seq")
            # WATCHDOG=1 at half the interval
            t = [ns.wait(lambda m: m.get("WATCHDOG") == "1", 5, "WATCHDOG=1")]
            t += [ns.wait(lambda m: m.get("WATCHDOG") == "1", 5, "WATCHDOG=1") for _ in range(4)]
            times = [at for at, m in ns.messages if m.get("WATCHDOG") == "1"][-5:]
            gaps = [b - a for a, b in zip(times, times[1:])]
            # paced at half the interval (timestamps are taken at receipt, so
            # one late receive makes the next gap short): never near expiry
            assert max(gaps) <= WATCHDOG_S / 2 + SLACK_S and min(gaps) >= WATCHDOG_S / 2 - SLACK_S, gaps
            assert abs(sum(gaps) / len(gaps) - WATCHDOG_S / 2) <= 0.05, gaps

            # stall the main loop: the sensor file becomes a FIFO with a silent writer
            fifo = w1 / "fifo"
            os.mkfifo(fifo)
            os.replace(fifo, slave)

            def reader_blocked() -> bool:
                nonlocal writer
                try:
                    writer = os.open(slave, os.O_WRONLY | os.O_NONBLOCK)   # ENXIO until a reader opens
                    return True
                except OSError:
                    return False
            wait_for(reader_blocked, 5, "the bridge to open the FIFO")
            stalled_at = time.monotonic()
            ns.messages.clear()
            while time.monotonic() - stalled_at < 3 * WATCHDOG_S:
                ns.recv(0.1)
            assert not any(m.get("WATCHDOG") for _, m in ns.messages), "a stalled loop kept pinging"
            assert p.poll() is None

            # release it: a good file comes back, the blocked read gets EOF (a
            # failure, counted and retried), the loop and the pings resume
            good = w1 / "good"
            good.write_text(W1_OK)
            os.replace(good, slave)
            os.close(writer)
            writer = None
            ns.wait(lambda m: m.get("WATCHDOG") == "1", 3 * WATCHDOG_S, "WATCHDOG=1 after the stall")

            p.send_signal(signal.SIGTERM)
            stopping = ns.wait(lambda m: m.get("STOPPING") == "1", 10, "STOPPING=1")
            assert stopping.get("STATUS") == "stopping"
            assert p.wait(15) == 0, (tmp_path / "bridge.log").read_text()
            assert "is failing" in (tmp_path / "bridge.log").read_text()
        finally:
            if writer is not None:
                os.close(writer)
            reap(p)
            logf.close()


def test_sequencer_ready_watchdog_stopping(tmp_path: Path) -> None:
    with NotifySocket(tmp_path) as ns:
        s = SequencerProcess(tmp_path / "seq", env={"NOTIFY_SOCKET": ns.path, "ORBCAST_SEQUENCER_FAULTS": "1",
                                                    "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))})
        s.start()
        try:
            ready = ns.wait(lambda m: m.get("READY") == "1", 10, "READY=1")
            assert "role=active" in ready.get("STATUS", "") and "last_seq=0" in ready["STATUS"]
            for _ in range(3):
                ns.wait(lambda m: m.get("WATCHDOG") == "1", WATCHDOG_S / 2 + SLACK_S + 0.1, "WATCHDOG=1")
            from orbcast.config import PlantConfig
            from plant.client import Plant
            with Plant(PlantConfig(sequencers=[s.ingress], producer_id="n", data=str(tmp_path / "pl"))) as p:
                p.publish("t/status", b"x", timeout=10)
            ns.wait(lambda m: "last_seq=1" in m.get("STATUS", ""), 5, "STATUS= with the new last seq")
            # a stalled main loop stops the pings (fault injection stalls it for 3 watchdog periods)
            import threading
            from orbcast.envelope import Admin
            from orbcast.rpc import request
            ns.wait(lambda m: m.get("WATCHDOG") == "1", WATCHDOG_S, "WATCHDOG=1")
            stall_ms = int(WATCHDOG_S * 3000)
            t = threading.Thread(target=request, args=(s.ingress, Admin(rid=9, command="fault-stall", arg=stall_ms)),
                                 kwargs={"timeout": stall_ms / 1000 + 5})
            t0 = time.monotonic()
            t.start()
            pings = [t0]
            while time.monotonic() < t0 + stall_ms / 1000 + 2 * WATCHDOG_S:
                m = ns.recv(0.05)
                if m is not None and m.get("WATCHDOG") == "1":
                    pings.append(time.monotonic())
            t.join(10)
            gaps = [b - a for a, b in zip(pings, pings[1:])]
            assert len(pings) > 2, "the pings did not resume after the stall"
            assert max(gaps) >= WATCHDOG_S * 2, f"pings continued while the loop was stalled: {gaps}"
            assert s.proc is not None
            s.proc.send_signal(signal.SIGTERM)
            ns.wait(lambda m: m.get("STOPPING") == "1", 10, "STOPPING=1")
        finally:
            s.stop()
