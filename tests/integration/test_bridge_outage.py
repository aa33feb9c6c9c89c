"""Readings taken while the sequencer is down arrive exactly once after it returns.

The bridge is a plant: each reading goes into its on-disk outbox first.
Covered: the sequencer killed (-9) and restarted while the bridge runs, and
the bridge itself restarted during the outage (its outbox survives); an
outbox that is full (refusals counted, logged once a second); a plant whose
engine stops (the bridge stops feeding the watchdog and exits non-zero).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from firmware_bridge import Bridge, loads
from firmware_bridge.cli import main
from firmware_bridge.testing import NotifySocket, SequencerProcess, free_port, wait_for
from orbcast.messages import decode_reading
from plant.client import Plant

PRESSES = 5


def config(seq: SequencerProcess, data: Path) -> str:
    return (f'[plant]\nsequencers = ["{seq.ingress}"]\nproducer_id = "outage-br"\n'
            f'data = "{data}"\nrequest_timeout_ms = 100\n'
            '[[input]]\ntype = "Button"\npin = 17\ntopic = "sensors/outage/door"\n')


def start(cfg: str, f: MockFactory) -> tuple[Bridge, threading.Thread]:
    b = Bridge(loads(cfg, environ={}), pin_factory=f)
    b.start()
    t = threading.Thread(target=b.run, daemon=True)
    t.start()
    return b, t


def stop(b: Bridge, t: threading.Thread) -> None:
    b.stop()
    t.join(5)
    b.close()


def press(f: MockFactory, n: int) -> None:
    for _ in range(n):
        f.pin(17).drive_low()
        f.pin(17).drive_high()


def test_readings_during_an_outage_arrive_exactly_once(tmp_path: Path) -> None:
    seq = SequencerProcess(tmp_path / "seq").start()
    bridges: list[tuple[Bridge, threading.Thread]] = []
    try:
        cfg = config(seq, tmp_path / "bridge")
        f = MockFactory()
        bridges.append(start(cfg, f))
        b = bridges[-1][0]
        wait_for(lambda: b.plant.outbox_depth == 0 and b.last_seq >= 1, 10, "the initial reading acked")

        seq.kill()                                   # kill -9: the node is gone
        press(f, PRESSES)                            # 10 readings into the outbox
        wait_for(lambda: b.plant.outbox_depth == 2 * PRESSES, 5, "readings queued in the outbox")
        stop(*bridges.pop())                         # and the bridge restarts during the outage
        f2 = MockFactory()
        bridges.append(start(cfg, f2))               # publishes its state at start: 1 more
        b2 = bridges[-1][0]
        press(f2, PRESSES)
        assert b2.plant.outbox_depth >= 2 * PRESSES

        seq.start()                                  # same data dir and ports
        wait_for(lambda: b2.plant.outbox_depth == 0, 20, "the outbox to drain")

        with Plant(sequencers=[seq.ingress], producer_id="outage-cons", data=str(tmp_path / "c")) as p:
            msgs = list(p.replay(1, timeout=10))
        mine = [m for m in msgs if m.topic == "sensors/outage/door"]
        expected = 1 + 2 * PRESSES + 1 + 2 * PRESSES
        assert len(mine) == expected
        keys = Counter((m.producer, m.producer_seq) for m in mine)
        assert set(keys.values()) == {1}                           # no duplicates
        assert [m.seq for m in msgs] == list(range(1, len(msgs) + 1))   # no gaps
        values = [decode_reading(m.payload).value for m in mine]
        assert values == [False] + [True, False] * PRESSES + [False] + [True, False] * PRESSES
    finally:
        for b, t in bridges:
            stop(b, t)
        seq.stop()


def test_a_full_outbox_refuses_readings_with_one_warning_a_second(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No sequencer and a 5-message outbox: 100 presses are all counted,
    and logged as a handful of lines, not one per refused reading."""
    cfg = (f'[plant]\nsequencers = ["tcp://127.0.0.1:{free_port()}"]\nproducer_id = "full-br"\n'
           f'data = "{tmp_path / "br"}"\noutbox_max_count = 5\n'
           '[[input]]\ntype = "Button"\npin = 17\ntopic = "sensors/full/door"\n')
    f = MockFactory()
    b, t = start(cfg, f)
    try:
        press(f, 50)
        wait_for(lambda: b.plant.outbox_depth <= 5 and
                 b.counters["publish_failures"] + b.plant.outbox_depth == 101, 10,
                 "every reading accepted or refused")
        assert b.counters["publish_failures"] >= 90
        lines = [r for r in caplog.records if r.name == "orbcast.bridge" and r.levelno == logging.WARNING]
        assert 1 <= len(lines) <= 3, [r.getMessage() for r in lines]     # (before: one per reading)
    finally:
        stop(b, t)


def test_when_the_plant_engine_stops_the_bridge_exits_non_zero(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """A failed outbox fsync stops the plant's engine for good. The bridge
    used to count and log every refused reading and keep pinging the
    watchdog, so systemd never restarted it; now ``firmware-bridge run``
    stops pinging and exits 1 with a clear line (Restart=on-failure)."""
    from plant import outbox as outbox_mod
    temp = tmp_path / "thermal_temp"
    temp.write_text("45000\n")
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(f'[plant]\nsequencers = ["tcp://127.0.0.1:{free_port()}"]\nproducer_id = "dead-br"\n'
                   f'data = "{tmp_path / "br"}"\n'
                   f'[[input]]\ntype = "CPUTemperature"\nsensor_file = "{temp}"\n'
                   'topic = "sensors/dead/cpu"\ninterval = 0.05\n')
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    done = threading.Event()
    with NotifySocket(tmp_path) as ns:
        monkeypatch.setenv("NOTIFY_SOCKET", ns.path)
        monkeypatch.setenv("WATCHDOG_USEC", "400000")
        monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "mock")

        def break_the_disk() -> None:
            try:
                ns.wait(lambda m: m.get("WATCHDOG") == "1", 20, "WATCHDOG=1")   # running

                def io_error(fd: int) -> None:
                    raise OSError(errno.EIO, "Input/output error")
                monkeypatch.setattr(outbox_mod.os, "fsync", io_error)
            finally:
                if not done.wait(20):                   # never hang: stop a bridge that runs on
                    os.kill(os.getpid(), signal.SIGTERM)

        helper = threading.Thread(target=break_the_disk, daemon=True)
        helper.start()
        try:
            rc = main(["run", "--config", str(cfg), "--log-level", "warning"])
            done.set()
            helper.join(30)
        finally:
            done.set()
            for sig, h in handlers.items():
                signal.signal(sig, h)
        assert rc == 1
        assert "firmware-bridge: error: the plant's engine stopped" in capsys.readouterr().err
        assert any("exiting so that systemd restarts the bridge" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.ERROR)
        # the last datagram from the loop says why, and no WATCHDOG=1 came after it
        msgs = [m for _, m in ns.messages]
        while ns.recv(0) is not None:
            msgs = [m for _, m in ns.messages]
        failed = [i for i, m in enumerate(msgs) if m.get("STATUS", "").startswith("failed:")]
        assert failed and not any(m.get("WATCHDOG") for m in msgs[failed[0]:])
