"""Every device type on gpiozero's MockFactory against a real sequencer process.

Inputs: driving mock pins (or the sysfs files) produces readings on a real
sequencer, read back by a second plant. Outputs: canonical messages drive
the mock output pins; a restarted bridge restores them. A sensor failing at
run time is reported on the health topic and retried while the others go on.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockChargingPin, MockFactory, MockPWMPin, MockTriggerPin

from firmware_bridge import Bridge, loads
from firmware_bridge.bridge import STATE_FILE
from firmware_bridge.testing import MockMCP3008, SequencerProcess, wait_for
from orbcast.messages import Reading, decode_payload, decode_reading, encode_set
from plant.client import Plant

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def seq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SequencerProcess]:
    with SequencerProcess(tmp_path_factory.mktemp("seq") / "data") as s:
        yield s


class Harness:
    def __init__(self, seq: SequencerProcess, tmp: Path) -> None:
        self.seq = seq
        self.tmp = tmp
        self.bridges: list[tuple[Bridge, threading.Thread]] = []
        self.plants: list[Plant] = []
        # producer ids key the sequencer's dedup: unique per test on the shared node
        self.uid = tmp.name.replace("[", "-").replace("]", "")[-40:]

    def config(self, body: str, *, pid: str = "br", bridge: str = "") -> str:
        pid = f"{pid}-{self.uid}"
        return (f'[plant]\nsequencers = ["{self.seq.ingress}"]\nproducer_id = "{pid}"\n'
                f'data = "{self.tmp / pid}"\nrequest_timeout_ms = 200\n'
                f'[bridge]\nhealth_topic = "health/{pid}"\n{bridge}\n{body}')

    def bridge(self, body: str, factory: Any, *, pid: str = "br", bridge: str = "") -> Bridge:
        b = Bridge(loads(self.config(body, pid=pid, bridge=bridge), environ={}), pin_factory=factory)
        b.start()
        t = threading.Thread(target=b.run, daemon=True)
        t.start()
        self.bridges.append((b, t))
        return b

    def stop(self, b: Bridge) -> None:
        for bb, t in list(self.bridges):
            if bb is b:
                b.stop()
                t.join(5)
                b.close()
                self.bridges.remove((bb, t))

    def consumer(self, prefix: str, name: str = "cons"):  # type: ignore[no-untyped-def]
        p = Plant(sequencers=[self.seq.ingress], producer_id=f"{name}-{self.uid}", data=str(self.tmp / name),
                  request_timeout_ms=200)
        self.plants.append(p)
        return p, p.subscribe(prefix, start=1)

    def close(self) -> None:
        for b, _t in list(self.bridges):
            self.stop(b)
        for p in self.plants:
            p.close()


@pytest.fixture
def h(seq: SequencerProcess, tmp_path: Path) -> Iterator[Harness]:
    hh = Harness(seq, tmp_path)
    yield hh
    hh.close()


def next_reading(sub: Any, topic: str | None = None) -> Reading:
    while True:
        m = sub.get(TIMEOUT)
        if topic is None or m.topic == topic:
            return decode_reading(m.payload)


def reading_where(sub: Any, pred: Any) -> Reading:
    while True:
        r = next_reading(sub)
        if pred(r):
            return r


# --- event inputs -------------------------------------------------------------------

def test_button(h: Harness) -> None:
    f = MockFactory()
    _, sub = h.consumer("sensors/btn/")
    h.bridge('[[input]]\ntype = "Button"\npin = 17\ntopic = "sensors/btn/door"\n', f)
    first = next_reading(sub)
    assert (first.device, first.value, first.unit) == ("door", False, "")   # state at start
    f.pin(17).drive_low()                       # pull-up: low = pressed
    assert next_reading(sub).value is True
    f.pin(17).drive_high()
    r = next_reading(sub)
    assert r.value is False and r.time > first.time


def test_button_without_pull_resistor_uses_active_state(h: Harness) -> None:
    """``pull_up = "floating"`` (gpiozero's pull_up=None, which TOML cannot
    write) with ``active_state = true``: a button wired to 3.3 V with an
    external pull-down; high = pressed."""
    f = MockFactory()
    _, sub = h.consumer("sensors/btn/")
    b = h.bridge('[[input]]\ntype = "Button"\npin = 17\ntopic = "sensors/btn/door"\n'
                 'pull_up = "floating"\nactive_state = true\n', f)
    assert next_reading(sub).value is False
    assert b.inputs[0].dev is not None and b.inputs[0].dev.pull_up is None
    f.pin(17).drive_high()
    assert next_reading(sub).value is True
    f.pin(17).drive_low()
    assert next_reading(sub).value is False


def test_motion_sensor(h: Harness) -> None:
    f = MockFactory()
    _, sub = h.consumer("sensors/pir/")
    h.bridge('[[input]]\ntype = "MotionSensor"\npin = 5\ntopic = "sensors/pir/hall"\nsample_rate = 50\n', f)
    assert next_reading(sub).value is False
    f.pin(5).drive_high()
    assert next_reading(sub).value is True
    f.pin(5).drive_low()
    assert next_reading(sub).value is False


def test_motion_sensor_without_pull_resistor_uses_active_state(h: Harness) -> None:
    """A PIR with an open-collector output and an external pull-up: active
    low, no internal resistor (``pull_up = "floating"``, ``active_state = false``)."""
    f = MockFactory()
    f.pin(5).drive_high()                       # idle high (the external pull-up)
    _, sub = h.consumer("sensors/pir/")
    b = h.bridge('[[input]]\ntype = "MotionSensor"\npin = 5\ntopic = "sensors/pir/hall"\n'
                 'sample_rate = 50\npull_up = "floating"\nactive_state = false\n', f)
    dev = b.inputs[0].dev
    assert dev is not None and dev.pull_up is None
    assert next_reading(sub).value is False     # high = no motion
    f.pin(5).drive_low()
    assert next_reading(sub).value is True
    f.pin(5).drive_high()
    assert next_reading(sub).value is False


def test_line_sensor(h: Harness) -> None:
    f = MockFactory()
    _, sub = h.consumer("sensors/line/")
    b = h.bridge('[[input]]\ntype = "LineSensor"\npin = 6\ntopic = "sensors/line/track"\n'
                 'sample_rate = 100\nqueue_len = 2\n', f)
    first = next_reading(sub).value
    f.pin(6).drive_high() if not f.pin(6).state else f.pin(6).drive_low()
    assert next_reading(sub).value is (not first)
    assert b.inputs[0].dev.is_active is (not first)


# --- sampled inputs -----------------------------------------------------------------

def test_light_sensor(h: Harness) -> None:
    f = MockFactory()
    f.pin(4, pin_class=MockChargingPin, charge_time=0.002)
    _, sub = h.consumer("sensors/ldr/")
    h.bridge('[[input]]\ntype = "LightSensor"\npin = 4\ntopic = "sensors/ldr/light"\ninterval = 0.1\n'
             'charge_time_limit = 0.02\n', f)
    r = next_reading(sub)
    assert r.unit == "" and 0.0 <= r.value <= 1.0
    assert next_reading(sub).time > r.time       # no delta: one per interval


def test_distance_sensor(h: Harness) -> None:
    f = MockFactory()
    echo = f.pin(23)
    f.pin(24, pin_class=MockTriggerPin, echo_pin=echo, echo_time=0.004)
    _, sub = h.consumer("sensors/sonar/")
    h.bridge('[[input]]\ntype = "DistanceSensor"\necho = 23\ntrigger = 24\ntopic = "sensors/sonar/d"\n'
             'interval = 0.2\nqueue_len = 3\n', f)
    r = reading_where(sub, lambda r: r.value > 0.3)   # the smoothing queue fills first
    assert r.unit == "m" and r.value == pytest.approx(0.004 * 343.26 / 2, abs=0.25)


def test_mcp3008_channel(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # gpiozero 2.0's software SPI bus builds one Device without our
    # pin_factory, so a default factory must exist; real Pis use hardware SPI
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "mock")
    f = MockFactory()
    adc = MockMCP3008(11, 10, 9, 8, pin_factory=f)
    adc.channels[3] = 1.65
    _, sub = h.consumer("sensors/adc/")
    h.bridge('[[input]]\ntype = "MCP3008"\nchannel = 3\ntopic = "sensors/adc/pot"\ninterval = 0.05\n'
             'delta = 0.1\n', f)
    assert next_reading(sub).value == pytest.approx(0.5, abs=0.01)
    adc.channels[3] = 1.70                      # within delta: not published
    adc.channels[3] = 3.3
    assert next_reading(sub).value == pytest.approx(1.0, abs=0.01)


def test_cpu_temperature(h: Harness, tmp_path: Path) -> None:
    temp = tmp_path / "thermal_temp"
    temp.write_text("45000\n")
    _, sub = h.consumer("sensors/cpu/")
    h.bridge(f'[[input]]\ntype = "CPUTemperature"\nsensor_file = "{temp}"\ntopic = "sensors/cpu/t"\n'
             'interval = 0.05\ndelta = 0.5\n', MockFactory())
    r = next_reading(sub)
    assert (r.value, r.unit, r.device) == (45.0, "C", "t")
    temp.write_text("47500\n")
    assert next_reading(sub).value == 47.5


W1_OK = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t={}\n"


def test_ds18b20_and_a_failing_sensor_is_reported_and_retried(h: Harness, tmp_path: Path) -> None:
    w1 = tmp_path / "w1"
    (w1 / "28-0000abc").mkdir(parents=True)
    slave = w1 / "28-0000abc" / "w1_slave"
    slave.write_text(W1_OK.format(21125))
    f = MockFactory()
    _, sub = h.consumer("sensors/w1/")
    _, health = h.consumer(f"health/br-{h.uid}", name="cons-health")
    b = h.bridge('[[input]]\ntype = "DS18B20"\nsensor_id = "28-0000abc"\ntopic = "sensors/w1/water"\n'
                 'interval = 0.05\ndelta = 0.01\n'
                 '[[input]]\ntype = "Button"\npin = 17\ntopic = "sensors/w1/door"\n', f,
                 bridge=f'w1_path = "{w1}"')
    assert reading_where(sub, lambda r: r.device == "water").value == 21.125
    slave.write_text(W1_OK.format(21125).replace("YES", "NO"))       # bad CRC from now on
    m = decode_payload(health.get(TIMEOUT).payload)
    assert m is not None and (m["kind"], m["device"], m["state"]) == ("health", "water", "failing")
    assert "CRC" in m["error"]
    f.pin(17).drive_low()                                             # the others go on
    assert reading_where(sub, lambda r: r.device == "door" and r.value is True)
    slave.write_text(W1_OK.format(22000))                             # retried, recovered
    m = decode_payload(health.get(TIMEOUT).payload)
    assert m is not None and m["state"] == "ok"
    assert reading_where(sub, lambda r: r.device == "water").value == 22.0
    assert b.counters["sensor_failures"] >= 1 and not b.status()["failing"]


# --- outputs ----------------------------------------------------------------------------

OUTPUTS = ('[[output]]\ntype = "LED"\npin = 18\ntopic = "act/{p}/led"\n'
           '[[output]]\ntype = "PWMLED"\npin = 12\ntopic = "act/{p}/dim"\n'
           '[[output]]\ntype = "Buzzer"\npin = 13\ntopic = "act/{p}/buzz"\n'
           '[[output]]\ntype = "OutputDevice"\npin = 19\ntopic = "act/{p}/relay"\nactive_high = false\n')


def pins(f: MockFactory) -> tuple[Any, ...]:
    return (bool(f.pin(18).state), round(f.pin(12).state, 3), bool(f.pin(13).state), bool(f.pin(19).state))


def test_outputs_follow_canonical_messages_and_restart_restores(h: Harness) -> None:
    f = MockFactory(pin_class=MockPWMPin)
    b = h.bridge(OUTPUTS.format(p="o1"), f)
    assert pins(f) == (False, 0.0, False, True)          # relay active-low: off = high
    pub, _ = h.consumer("nothing/", name="pub")
    for topic, v in (("led", True), ("dim", 0.25), ("buzz", True), ("relay", True),
                     ("buzz", False), ("dim", 0.75)):
        pub.publish_nowait(f"act/o1/{topic}", encode_set(v))
    last = pub.publish("act/o1/led", b"off", timeout=TIMEOUT)   # plain text works too
    wait_for(lambda: pins(f) == (False, 0.75, False, False), TIMEOUT, "outputs to follow")
    wait_for(lambda: b.counters["outputs_applied"] >= 7, TIMEOUT, "every message applied")
    pub.publish("act/o1/led", b"banana", timeout=TIMEOUT)         # ignored, counted
    wait_for(lambda: b.counters["bad_commands"] == 1, TIMEOUT, "bad command counted")
    pub.publish("act/o1/led", b"on", timeout=TIMEOUT)
    wait_for(lambda: pins(f)[0] is True, TIMEOUT, "led on")
    assert last > 0
    h.stop(b)

    # a restart (fresh pins, as after a reboot) restores every output at once
    f2 = MockFactory(pin_class=MockPWMPin)
    b2 = h.bridge(OUTPUTS.format(p="o1"), f2)
    assert pins(f2) == (True, 0.75, False, False)
    # ... and keeps following
    pub.publish("act/o1/relay", encode_set(False), timeout=TIMEOUT)
    wait_for(lambda: pins(f2)[3] is True, TIMEOUT, "relay off after restart")

    # a second Pi with no state at all replays today and agrees
    f3 = MockFactory(pin_class=MockPWMPin)
    h.bridge(OUTPUTS.format(p="o1"), f3, pid="other-pi")
    wait_for(lambda: pins(f3) == pins(f2), TIMEOUT, "the second Pi to agree")
    assert b2.counters["bad_commands"] == 0     # "banana" was before its restored position


@pytest.mark.parametrize("doc,led", [({"version": 1, "positions": [], "values": {}}, "led1"),
                                     ({"version": 1, "positions": {}, "values": []}, "led2")],
                         ids=["positions-list", "values-list"])
def test_a_state_file_of_the_wrong_shape_is_ignored(h: Harness, doc: Any, led: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Valid JSON of the wrong shape costs a replay from the start of today,
    like a file that is not JSON, instead of a crash at every start."""
    data = h.tmp / f"br-{h.uid}"
    data.mkdir()
    (data / STATE_FILE).write_text(json.dumps(doc))
    f = MockFactory()
    b = h.bridge(f'[[output]]\ntype = "LED"\npin = 18\ntopic = "act/shape/{led}"\n', f)
    assert any("ignoring unreadable" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)
    pub, _ = h.consumer("nothing/", name="pub")
    pub.publish(f"act/shape/{led}", encode_set(True), timeout=TIMEOUT)
    wait_for(lambda: bool(f.pin(18).state), TIMEOUT, "the LED to follow its topic")

    def saved() -> bool:
        vals = json.loads((data / STATE_FILE).read_text())["values"]
        return isinstance(vals, dict) and vals.get(f"act/shape/{led}", [0, None])[1] is True
    wait_for(saved, TIMEOUT, "the state file rewritten")
    assert b.counters["outputs_applied"] == 1
