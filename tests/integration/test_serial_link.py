"""The serial link end to end: a fake firmware on pyserial's ``socket://`` port.

(This machine has no /dev/pts, so no pty pair; ``socket://`` goes through the
same pyserial code paths, and its disconnects behave like a USB serial
device that vanishes.) The bridge runs in-process against a real sequencer.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from firmware_bridge import Bridge, loads
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
def rig(tmp_path: Path) -> Iterator[tuple[Bridge, FakeFirmware, Plant]]:
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
