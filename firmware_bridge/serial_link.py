"""The serial link to microcontroller firmware: framing codec + reconnecting driver.

Wire format (both directions; also in docs/firmware-serial.md)
---------------------------------------------------------------
A frame is a *record* protected by a CRC, COBS-encoded, then a ``0x00``
delimiter::

    wire   = COBS(body || crc) || 0x00
    body   = CBOR array [kind, topic, value]            (3 items)
           | CBOR array [kind, topic, value, unit]      (4 items, readings only)
    crc    = CRC-32/ISO-HDLC of body (zlib.crc32, the Ethernet CRC),
             4 bytes big-endian

    kind   = 1  PUB    device -> bridge: a reading. ``topic`` is relative to
                       the link's ``topic_prefix`` ("temp" -> "sensors/esp32/temp").
             2  SET    bridge -> device: the canonical value of a forwarded
                       topic (full topic), sent in seq order, and all of them
                       again after every (re)connect or HELLO.
             3  HELLO  device -> bridge after boot: ``topic`` = firmware name,
                       ``value`` = firmware version; the bridge answers with
                       the current SET of every forwarded topic.
    value  = bool | int | float | text | null
    unit   = text, at most 16 characters ("C", "%", "lux")

COBS (Consistent Overhead Byte Stuffing) removes every zero byte from the
frame, so ``0x00`` only ever marks a frame's end: a receiver that starts in
the middle of a frame (a bridge started after the firmware, a glitch on the
line) resynchronises at the next ``0x00``. Senders may emit a lone ``0x00``
first to flush a half-received frame on the other side.

Example: PUB "temp" 21.5 "C" (cbor2 writes the float as a double; a
firmware may send a half or single float, any width decodes)::

    body  84 01 64 74 65 6d 70 fb 40 35 80 00 00 00 00 00 61 43
    crc   d1 33 3c d5
    wire  0c 84 01 64 74 65 6d 70 fb 40 35 80 01 01 01 01 07 61 43 d1 33 3c d5 00

A frame that fails COBS, CRC, CBOR or shape checks is dropped and counted;
the link keeps going (bad input never kills a process). A frame longer than
:data:`MAX_WIRE_FRAME` is dropped up to the next delimiter.

The codec (:func:`encode_frame`, :class:`FrameDecoder`) does no I/O. The
driver (:class:`SerialLink`) owns the port in one thread, reopens it when it
disappears (USB unplugged, firmware reset) and never blocks the bridge.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cbor2

from orbcast.messages import MAX_UNIT_CHARS, Value

from .ratelimit import LogLimiter, more

__all__ = [
    "HELLO",
    "MAX_BODY",
    "MAX_WIRE_FRAME",
    "PUB",
    "SET",
    "Dropped",
    "FrameDecoder",
    "Record",
    "SerialLink",
    "cobs_decode",
    "cobs_encode",
    "encode_frame",
]

log = logging.getLogger("orbcast.bridge.serial")

PUB = 1
SET = 2
HELLO = 3
KINDS = (PUB, SET, HELLO)

#: Largest CBOR body: an AVR (Arduino Uno) has 2 KiB of RAM in total, so
#: receive buffers stay small; 256 bytes fits a 200-byte topic and a value.
MAX_BODY = 256
_CRC = struct.Struct(">I")
#: Longest encoded frame without its delimiter: body + CRC + COBS overhead
#: (one byte per 254, plus one).
MAX_WIRE_FRAME = MAX_BODY + _CRC.size + (MAX_BODY + _CRC.size) // 254 + 1
#: Reopen attempts back off from the first to the last delay (seconds): a
#: USB serial device re-enumerates within a second or two of a reset.
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 2.0
#: Read timeout of the port: how often the link thread looks at its stop flag.
READ_TIMEOUT_S = 0.1
#: A port that keeps failing to open with the same error is logged again
#: this often (a new error is logged at once): an unplugged board retried
#: every 2 s for a week must not fill the journal, but the log must still
#: say that it is missing.
OPEN_ERROR_REPEAT_S = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """One decoded record (see the module docstring for ``kind``)."""

    kind: int
    topic: str
    value: Value
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown record kind {self.kind!r}")
        if not isinstance(self.topic, str) or not self.topic:
            raise ValueError("topic must be non-empty text")
        v = self.value
        if not (v is None or isinstance(v, (bool, int, str)) or
                (isinstance(v, float) and math.isfinite(v))):
            raise ValueError(f"value must be a bool, number, text or null, not {type(v).__name__}")
        if self.unit is not None and (not isinstance(self.unit, str) or len(self.unit) > MAX_UNIT_CHARS):
            raise ValueError(f"unit must be text of at most {MAX_UNIT_CHARS} characters")


@dataclass(frozen=True, slots=True)
class Dropped:
    """A frame that was dropped, and why (``crc``, ``cobs``, ``cbor``, ``shape``, ``too-long``)."""

    reason: str


def cobs_encode(data: bytes) -> bytes:
    """COBS-encode ``data``: the result contains no zero byte."""
    out = bytearray()
    block = bytearray()
    for b in data:
        if b == 0:
            out.append(len(block) + 1)
            out += block
            block.clear()
        else:
            block.append(b)
            if len(block) == 254:
                out.append(255)
                out += block
                block.clear()
    out.append(len(block) + 1)
    out += block
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of :func:`cobs_encode`. Raises ``ValueError`` on bad input."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise ValueError("zero byte inside a COBS frame")
        end = i + code
        if end > n:
            raise ValueError("COBS block runs past the frame")
        block = data[i + 1:end]
        if 0 in block:
            raise ValueError("zero byte inside a COBS frame")
        out += block
        i = end
        if code != 255 and i < n:
            out.append(0)
    return bytes(out)


def encode_frame(rec: Record) -> bytes:
    """``Record`` -> wire bytes, delimiter included. Raises ``ValueError``
    if the body exceeds :data:`MAX_BODY` (a text value over ~230
    characters, or a topic over ~250 bytes): such a record cannot be sent."""
    items: list[Any] = [rec.kind, rec.topic, rec.value]
    if rec.unit is not None:
        items.append(rec.unit)
    body = cbor2.dumps(items)
    if len(body) > MAX_BODY:
        raise ValueError(f"record body of {len(body)} bytes exceeds {MAX_BODY}")
    return cobs_encode(body + _CRC.pack(zlib.crc32(body))) + b"\x00"


def decode_body(frame: bytes) -> Record | Dropped:
    """One frame (COBS bytes, no delimiter) -> ``Record`` or ``Dropped``."""
    try:
        raw = cobs_decode(frame)
    except ValueError:
        return Dropped("cobs")
    if len(raw) < _CRC.size + 1:
        return Dropped("shape")
    body, crc = raw[:-_CRC.size], raw[-_CRC.size:]
    if _CRC.unpack(crc)[0] != zlib.crc32(body):
        return Dropped("crc")
    if body[0] == 0xFF:     # a top-level break code: cbor2 6.x raises, 5.x returns a private sentinel
        return Dropped("cbor")
    try:
        items = cbor2.loads(body)
    except Exception:       # any cbor2 error: garbage with a matching CRC
        return Dropped("cbor")
    if not isinstance(items, list) or len(items) not in (3, 4):
        return Dropped("shape")
    try:
        return Record(kind=items[0], topic=items[1], value=items[2],
                      unit=items[3] if len(items) == 4 else None)
    except (ValueError, TypeError):
        return Dropped("shape")


class FrameDecoder:
    """Bytes in (any chunking), records out. Pure; keeps at most one frame.

    ``feed(data)`` returns the ``Record`` / ``Dropped`` events completed by
    ``data``; a partial frame waits for more bytes.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False    # inside an over-long frame: drop to the next 0x00

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Record | Dropped]:
        out: list[Record | Dropped] = []
        start = 0
        while start <= len(data):
            z = data.find(b"\x00", start)
            chunk = data[start:] if z < 0 else data[start:z]
            if not self._skipping:
                self._buf += chunk
                if len(self._buf) > MAX_WIRE_FRAME:
                    self._buf.clear()
                    self._skipping = True
                    out.append(Dropped("too-long"))
            if z < 0:
                break
            if self._skipping:
                self._skipping = False
            elif self._buf:
                out.append(decode_body(bytes(self._buf)))
            self._buf.clear()
            start = z + 1
        return out


class SerialLink:
    """Owns one serial port in a background thread; reopens it when it breaks.

    ``url`` is a device path (``/dev/ttyACM0``) or any pyserial URL
    (``socket://host:port``, ``loop://``). ``on_record`` is called from the
    link thread for every good record; ``on_connect`` after every (re)open
    (the bridge resends its SETs there). :meth:`send` is thread-safe and
    returns False while the port is closed (the caller keeps the state to
    resend on connect). ``counters``: frames_in, frames_out, dropped,
    bad_crc, reconnects, open_failures.

    Logging is paced: dropped frames at most one line a second (with the
    number not logged); open failures when the error changes, else every
    :data:`OPEN_ERROR_REPEAT_S`. The counters count every event.
    """

    def __init__(self, name: str, url: str, *, baudrate: int = 115200,
                 on_record: Callable[[Record], None],
                 on_connect: Callable[[], None] | None = None) -> None:
        try:
            import serial  # optional extra: orbcast[serial]
        except ImportError:
            raise RuntimeError("serial links need pyserial: pip install 'orbcast[serial]'") from None
        self._serial = serial
        self.name = name
        self.url = url
        self.baudrate = baudrate
        self.on_record = on_record
        self.on_connect = on_connect
        self.counters = {"frames_in": 0, "frames_out": 0, "dropped": 0, "bad_crc": 0,
                         "reconnects": 0, "open_failures": 0}
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._wlock = threading.Lock()
        self._port: Any = None
        self._opened_once = False
        self._limiter = LogLimiter()            # link thread only
        self._open_error: str | None = None     # last open error logged, None after a connect
        self._open_logged_at = 0.0
        self._open_held = 0
        self._thread = threading.Thread(target=self._run, name=f"orbcast-serial-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (joined with ``timeout``) and close the port."""
        self._stop.set()
        self._thread.join(timeout)
        self._close()

    def send(self, rec: Record) -> bool:
        """Write one record now; False if the port is not open or the write
        failed. Raises ``ValueError`` (from :func:`encode_frame`) if the
        record cannot be framed; nothing is written then."""
        return self.send_frame(encode_frame(rec))

    def send_frame(self, frame: bytes) -> bool:
        """Write one frame made by :func:`encode_frame`; as :meth:`send`."""
        with self._wlock:
            port = self._port
            if port is None:
                return False
            try:
                port.write(frame)
            except (OSError, self._serial.SerialException) as exc:
                failed: BaseException = exc
            else:
                self.counters["frames_out"] += 1
                return True
        # outside the lock: _drop takes it (a write timeout used to deadlock here,
        # the sender and then stop() waiting for ever on the lock it held)
        log.warning("serial %s: write failed: %s", self.name, failed)
        self._drop(port)
        return False

    # --- link thread -------------------------------------------------------------

    def _run(self) -> None:
        delay = RECONNECT_MIN_S
        dec = FrameDecoder()
        while not self._stop.is_set():
            if self._port is None:
                if not self._open():
                    self._stop.wait(delay)           # retry pacing, not synchronisation
                    delay = min(delay * 2, RECONNECT_MAX_S)
                    continue
                delay = RECONNECT_MIN_S
                dec = FrameDecoder()
                if self.on_connect is not None:
                    try:
                        self.on_connect()
                    except Exception:
                        log.exception("serial %s: on_connect failed", self.name)
            port = self._port
            if port is None:
                continue
            try:
                data = port.read(max(1, port.in_waiting))
            except (OSError, self._serial.SerialException, TypeError, AttributeError) as exc:
                # TypeError/AttributeError: pyserial's socket:// handler after a close
                log.warning("serial %s: port lost: %s", self.name, exc)
                self._drop(port)
                continue
            if not data:
                continue
            for ev in dec.feed(data):
                if isinstance(ev, Dropped):
                    self.counters["dropped"] += 1
                    if ev.reason == "crc":
                        self.counters["bad_crc"] += 1
                    ok, held = self._limiter.allow("dropped", time.monotonic())
                    if ok:
                        log.warning("serial %s: dropped a frame (%s)%s; %d dropped in all",
                                    self.name, ev.reason, more(held), self.counters["dropped"])
                    continue
                self.counters["frames_in"] += 1
                try:
                    self.on_record(ev)
                except Exception:
                    log.exception("serial %s: handling a record failed", self.name)

    def _open(self) -> bool:
        try:
            port = self._serial.serial_for_url(self.url, baudrate=self.baudrate,
                                               timeout=READ_TIMEOUT_S, write_timeout=1.0)
        except (OSError, self._serial.SerialException, ValueError) as exc:
            self.counters["open_failures"] += 1
            self._open_failed(str(exc), time.monotonic())
            return False
        self._open_error = None          # the next failure is news again
        self._open_held = 0
        with self._wlock:
            self._port = port
        if self._opened_once:
            self.counters["reconnects"] += 1
        self._opened_once = True
        log.info("serial %s: connected to %s", self.name, self.url)
        self.connected.set()
        return True

    def _open_failed(self, error: str, now: float) -> None:
        """Log an open failure if the error changed (ENOENT -> EACCES after a
        udev rule ran, say) or :data:`OPEN_ERROR_REPEAT_S` passed."""
        if error != self._open_error or now - self._open_logged_at >= OPEN_ERROR_REPEAT_S:
            log.warning("serial %s: cannot open %s: %s (retrying%s)", self.name, self.url, error,
                        f"; failed {self._open_held} more times meanwhile" if self._open_held else "")
            self._open_error = error
            self._open_logged_at = now
            self._open_held = 0
        else:
            self._open_held += 1

    def _drop(self, port: Any) -> None:
        """Close ``port`` after an I/O error on it, unless the link has moved on
        to another one meanwhile (never call with :attr:`_wlock` held)."""
        with self._wlock:
            if self._port is not port:
                return
            self._port = None
            self.connected.clear()
        self._close_port(port)

    def _close(self) -> None:
        with self._wlock:
            port, self._port = self._port, None
        self._close_port(port)

    @staticmethod
    def _close_port(port: Any) -> None:
        if port is not None:
            try:
                port.close()
            except Exception:     # closing a broken port may fail every way; it is gone anyway
                pass
