"""The serial link end to end: a fake firmware on pyserial's ``socket://`` port.

(This machine has no /dev/pts, so no pty pair; ``socket://`` goes through the
same pyserial code paths, and its disconnects behave like a USB serial
device that vanishes.) The bridge runs in-process against a real sequencer.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from firmware_bridge import Bridge, SerialLink, loads
from firmware_bridge.bridge import STATE_FILE
from firmware_bridge.serial_link import (
    HELLO,
    PUB,
    SET,
    Dropped,
    FrameDecoder,
    Record,
    cobs_decode,
    cobs_encode,
    encode_frame,
)
from firmware_bridge.testing import SequencerProcess, free_port, wait_for
from orbcast.messages import decode_reading, encode_set
from plant.client import Plant

TIMEOUT = 10.0


class FakeFirmware:
    """The microcontroller end: a TCP listener pyserial's socket:// connects to."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.dec = FrameDecoder()
        self.pending: list[Record] = []
        self.listen()

    def listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(1)
        self.listener = s

    def accept(self, timeout: float = TIMEOUT) -> None:
        assert self.listener is not None
        self.listener.settimeout(timeout)
        self.conn, _ = self.listener.accept()
        self.dec = FrameDecoder()
        self.pending = []

    def send(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(data)

    def recv_record(self, pred=lambda r: True, timeout: float = TIMEOUT) -> Record:  # type: ignore[no-untyped-def]
        assert self.conn is not None
        deadline = time.monotonic() + timeout
        while True:
            while self.pending:
                r = self.pending.pop(0)
                if pred(r):
                    return r
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no matching frame from the bridge")
            self.conn.settimeout(left)
            data = self.conn.recv(4096)
            if not data:
                raise ConnectionError("bridge closed the port")
            self.pending += [ev for ev in self.dec.feed(data) if isinstance(ev, Record)]

    def drop(self, *, stop_listening: bool = False) -> None:
        """The device vanishes: connection closed (and optionally the port gone)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if stop_listening and self.listener is not None:
            self.listener.close()
            self.listener = None

    def close(self) -> None:
        self.drop(stop_listening=True)


@pytest.fixture
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Bridge, FakeFirmware, Plant]]:
    """A bridge with one serial link. Parametrized indirectly with
    ``{"extra": TOML, "state": DOC}`` it gets more config tables and a state
    file written before it starts."""
    opts = getattr(request, "param", {})
    extra = opts.get("extra", "")
    state = opts.get("state")
    if state is not None:
        (tmp_path / "br").mkdir()
        (tmp_path / "br" / STATE_FILE).write_text(json.dumps(state))
    seq = SequencerProcess(tmp_path / "seq").start()
    fw = FakeFirmware(free_port())
    cfg = loads(f'''
[plant]
sequencers = ["{seq.ingress}"]
producer_id = "serial-br"
data = "{tmp_path / 'br'}"
request_timeout_ms = 200
[bridge]
topics = ["sensors/", "actuators/", "health/"]
[[serial]]
name = "esp32"
url = "socket://127.0.0.1:{fw.port}"
topic_prefix = "sensors/esp32/"
forward = ["actuators/esp32/"]
{extra}
''', environ={})
    b = Bridge(cfg, pin_factory=MockFactory())
    p = Plant(sequencers=[seq.ingress], producer_id="serial-cons", data=str(tmp_path / "c"),
              request_timeout_ms=200)
    t = threading.Thread(target=b.run, daemon=True)
    try:
        b.start()
        t.start()
        yield b, fw, p
    finally:
        b.stop()
        t.join(5)
        b.close()
        p.close()
        fw.close()
        seq.stop()


def test_frames_both_ways_corruption_and_reconnect(rig: tuple[Bridge, FakeFirmware, Plant]) -> None:
    b, fw, p = rig
    link = b.links["esp32"]
    fw.accept()
    wait_for(link.connected.is_set, TIMEOUT, "link connected")
    sub = p.subscribe("sensors/esp32/", start=1)

    # firmware -> bridge -> canonical reading
    fw.send(b"\x00" + encode_frame(Record(kind=PUB, topic="temp", value=21.5, unit="C")))
    m = sub.get(TIMEOUT)
    r = decode_reading(m.payload)
    assert (m.topic, r.device, r.value, r.unit) == ("sensors/esp32/temp", "esp32", 21.5, "C")

    # a corrupted frame (bad CRC) is dropped and counted; the next one still arrives
    raw = bytearray(cobs_decode(encode_frame(Record(kind=PUB, topic="temp", value=99.0))[:-1]))
    raw[-5] ^= 0xFF
    fw.send(cobs_encode(bytes(raw)) + b"\x00" +
            encode_frame(Record(kind=PUB, topic="hum", value=40, unit="%")))
    m = sub.get(TIMEOUT)
    assert m.topic == "sensors/esp32/hum" and decode_reading(m.payload).value == 40
    assert link.counters["bad_crc"] == 1 and link.counters["dropped"] == 1
    # a topic that is invalid once prefixed (over 256 bytes) is refused, not published
    fw.send(encode_frame(Record(kind=PUB, topic="x" * 245, value=1)))

    # canonical messages on forwarded topics -> SET frames, in seq order
    p.publish("actuators/esp32/fan", encode_set(True), timeout=TIMEOUT)
    p.publish("actuators/esp32/fan", b"off", timeout=TIMEOUT)
    p.publish("actuators/esp32/led", encode_set(0.5), timeout=TIMEOUT)
    assert fw.recv_record() == Record(kind=SET, topic="actuators/esp32/fan", value=True)
    assert fw.recv_record() == Record(kind=SET, topic="actuators/esp32/fan", value=False)
    assert fw.recv_record() == Record(kind=SET, topic="actuators/esp32/led", value=0.5)

    # the device disappears entirely (port gone), then comes back
    fw.drop(stop_listening=True)
    wait_for(lambda: not link.connected.is_set(), TIMEOUT, "link to notice the loss")
    fails = link.counters["open_failures"]
    wait_for(lambda: link.counters["open_failures"] > fails, TIMEOUT, "reopen attempts")
    fw.listen()
    fw.accept()
    wait_for(link.connected.is_set, TIMEOUT, "link reconnected")
    assert link.counters["reconnects"] == 1
    # after a reconnect the firmware gets the current state of every forwarded topic
    got = {fw.recv_record().topic: None for _ in range(2)}
    assert set(got) == {"actuators/esp32/fan", "actuators/esp32/led"}
    # ... and again when it says HELLO after its own reboot
    fw.send(encode_frame(Record(kind=HELLO, topic="esp32-fw", value="1.0.3")))
    assert fw.recv_record(lambda r: r.topic == "actuators/esp32/fan").value is False
    fw.send(encode_frame(Record(kind=PUB, topic="temp", value=22.0, unit="C")))
    m = sub.get(TIMEOUT)
    assert m.topic == "sensors/esp32/temp" and decode_reading(m.payload).value == 22.0
    assert b.counters["serial_rejected"] == 1
    assert isinstance(FrameDecoder().feed(b"\x05\x00")[0], Dropped)


def frames_until(fw: FakeFirmware, topic: str) -> list[Record]:
    """Every record the firmware gets up to and including the first on ``topic``."""
    got = [fw.recv_record()]
    while got[-1].topic != topic:
        got.append(fw.recv_record())
    return got


def test_a_command_too_long_to_frame_is_refused_and_forwarding_goes_on(
        rig: tuple[Bridge, FakeFirmware, Plant], caplog: pytest.LogCaptureFixture) -> None:
    """A valid command whose SET does not fit a frame (text over ~230 chars)
    is refused for the link, logged and counted, and not saved; the next
    commands still reach the firmware, and so does a resend after HELLO."""
    b, fw, p = rig
    fw.accept()
    wait_for(b.links["esp32"].connected.is_set, TIMEOUT, "link connected")
    p.publish("actuators/esp32/fan", encode_set(True), timeout=TIMEOUT)
    assert fw.recv_record() == Record(kind=SET, topic="actuators/esp32/fan", value=True)
    p.publish("actuators/esp32/msg", encode_set("x" * 250), timeout=TIMEOUT)
    p.publish("actuators/esp32/fan", encode_set(False), timeout=TIMEOUT)
    # (before: the subscription died on the ValueError and this never came)
    assert fw.recv_record() == Record(kind=SET, topic="actuators/esp32/fan", value=False)
    assert b.counters["serial_unframable"] == 1
    assert any("actuators/esp32/msg" in r.getMessage() and "does not fit" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    saved = json.loads((Path(b.cfg.plant.data) / STATE_FILE).read_text())
    assert set(saved["values"]) == {"actuators/esp32/fan"}
    fw.send(encode_frame(Record(kind=HELLO, topic="esp32-fw", value="1.0")))
    assert fw.recv_record() == Record(kind=SET, topic="actuators/esp32/fan", value=False)


@pytest.mark.parametrize("rig", [{"state": {"version": 1, "positions": {},
                                            "values": {"actuators/esp32/msg": [1, "x" * 250],
                                                       "actuators/esp32/fan": [2, True]}}}],
                         indirect=True, ids=["poisoned-state"])
def test_a_saved_value_that_cannot_be_framed_does_not_stop_the_resend(
        rig: tuple[Bridge, FakeFirmware, Plant]) -> None:
    """A state file holding an unframable value (written by an older bridge):
    the resend on connect skips and drops it and sends the SETs after it."""
    b, fw, _p = rig
    fw.accept()
    assert fw.recv_record() == Record(kind=SET, topic="actuators/esp32/fan", value=True)
    assert b.counters["serial_unframable"] == 1
    wait_for(lambda: "actuators/esp32/msg" not in
             json.loads((Path(b.cfg.plant.data) / STATE_FILE).read_text())["values"],
             TIMEOUT, "the unframable value dropped from the state file")


@pytest.mark.parametrize("rig", [{"extra": '[[output]]\ntype = "LED"\npin = 22\ntopic = "actuators/esp32/led"\n'}],
                         indirect=True, ids=["led-output"])
def test_an_output_topic_inside_forward_is_sent_and_applied_once(
        rig: tuple[Bridge, FakeFirmware, Plant]) -> None:
    """A topic that drives an [[output]] and is inside ``forward`` has two
    subscriptions; the firmware still gets each SET once, the output is set once."""
    b, fw, p = rig
    fw.accept()
    link = b.links["esp32"]
    wait_for(link.connected.is_set, TIMEOUT, "link connected")
    p.publish("actuators/esp32/led", encode_set(True), timeout=TIMEOUT)
    wait_for(lambda: b.outputs[0].dev is not None and b.outputs[0].dev.value == 1, TIMEOUT, "the LED on")
    wait_for(lambda: link.counters["frames_out"] >= 1, TIMEOUT, "the SET sent")
    p.publish("actuators/esp32/fan", encode_set(True), timeout=TIMEOUT)     # a marker after it
    got = frames_until(fw, "actuators/esp32/fan")
    assert got == [Record(kind=SET, topic="actuators/esp32/led", value=True),
                   Record(kind=SET, topic="actuators/esp32/fan", value=True)]
    assert b.counters["outputs_applied"] == 1


def test_line_noise_is_logged_at_most_once_a_second_and_all_counted(
        rig: tuple[Bridge, FakeFirmware, Plant], caplog: pytest.LogCaptureFixture) -> None:
    b, fw, p = rig
    link = b.links["esp32"]
    fw.accept()
    wait_for(link.connected.is_set, TIMEOUT, "link connected")
    sub = p.subscribe("sensors/esp32/", start=1)
    bad = bytearray(cobs_decode(encode_frame(Record(kind=PUB, topic="temp", value=1.0))[:-1]))
    bad[-1] ^= 0xFF
    noise = (cobs_encode(bytes(bad)) + b"\x00") * 50 + b"\x07garbage\x00" * 50
    fw.send(noise + encode_frame(Record(kind=PUB, topic="temp", value=2.0)))
    m = sub.get(TIMEOUT)
    assert m is not None and decode_reading(m.payload).value == 2.0
    assert link.counters["dropped"] == 100 and link.counters["bad_crc"] == 50
    lines = [r for r in caplog.records if r.name == "orbcast.bridge.serial" and "dropped" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]    # (before: 100)


def test_open_failures_are_logged_again_when_the_error_changes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A port missing at boot (ENOENT) that then fails differently (EACCES
    once udev made it, here EISDIR) is logged again; the same error is not."""
    caplog.set_level(logging.WARNING, "orbcast.bridge.serial")
    dev = tmp_path / "ttyACM0"
    link = SerialLink("esp32", str(dev), on_record=lambda r: None)
    link.start()
    try:
        def opened() -> list[str]:
            return [r.getMessage() for r in caplog.records if "cannot open" in r.getMessage()]
        wait_for(lambda: link.counters["open_failures"] >= 3, TIMEOUT, "three failed opens")
        assert len(opened()) == 1 and "No such file" in opened()[0]
        n = link.counters["open_failures"]
        dev.mkdir()
        wait_for(lambda: link.counters["open_failures"] >= n + 2, TIMEOUT, "more failed opens")
        assert len(opened()) == 2 and "Is a directory" in opened()[1], opened()
    finally:
        link.stop()


def test_a_write_that_times_out_drops_the_port_and_stop_returns() -> None:
    """A firmware that stops reading: the port's write times out (1 s). The
    sender gets False and the link reconnects; it used to deadlock on its own
    write lock (the failure path took it again), stopping forwarding for good
    and then ``stop()`` (the bridge could not exit on SIGTERM)."""
    fw = FakeFirmware(free_port())
    assert fw.listener is not None
    link = SerialLink("esp32", f"socket://127.0.0.1:{fw.port}", on_record=lambda r: None)
    link.start()
    try:
        fw.accept()
        assert fw.conn is not None
        fw.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # never read: fills fast
        assert link.connected.wait(TIMEOUT)
        frame = encode_frame(Record(kind=SET, topic="actuators/esp32/x", value="v" * 200))
        result: list[bool] = []

        def sender() -> None:
            while link.send_frame(frame):
                pass
            result.append(False)

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "send_frame never returned after the write timed out"
        assert result == [False] and link.counters["frames_out"] > 0
        fw.drop()                                 # the firmware restarts ...
        fw.accept()                               # ... and the link comes back
        wait_for(lambda: link.connected.is_set(), TIMEOUT, "the link to reconnect")
        assert link.counters["reconnects"] >= 1
    finally:
        s = threading.Thread(target=link.stop, args=(1.0,), daemon=True)
        s.start()
        s.join(10)
        fw.close()
    assert not s.is_alive(), "stop() hung"
