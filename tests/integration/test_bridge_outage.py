"""Readings taken while the sequencer is down arrive exactly once after it returns.

The bridge is a plant: each reading goes into its on-disk outbox first.
Covered: the sequencer killed (-9) and restarted while the bridge runs, and
the bridge itself restarted during the outage (its outbox survives).
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from gpiozero.pins.mock import MockFactory

from firmware_bridge import Bridge, loads
from firmware_bridge.testing import SequencerProcess, wait_for
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
