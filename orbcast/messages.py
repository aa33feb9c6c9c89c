"""The message layer above the opaque carrier: readings, commands, health.

The sequencer never looks inside a payload. Devices and tools that want to
understand each other use these small CBOR maps (text keys, one ``kind``):

``reading``   ``{"kind": "reading", "device": "kitchen-temp", "value": 21.5,
              "unit": "C", "time": 1764083534123456789}``
              ``value`` is a bool, int, float, text or null; ``unit`` may be
              ``""``; ``time`` is when the value was read (ns since the epoch,
              the bridge's clock - the canonical ``time`` is the sequencer's).
``set``       ``{"kind": "set", "value": true}`` drives an output topic.
``health``    ``{"kind": "health", "device": "water", "state": "failing",
              "failures": 3, "error": "...", "time": ...}`` (``state`` is
              ``ok`` or ``failing``).

Output topics also accept what a person types: ``plant publish
actuators/lamp on`` (``on/off``, ``true/false``, ``1/0``, a number). See
:func:`command_value`.

This module is pure: no I/O, no clock (callers pass ``time``).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Union

import cbor2

__all__ = [
    "MAX_DEVICE_CHARS",
    "MAX_UNIT_CHARS",
    "Health",
    "MessageError",
    "Reading",
    "Value",
    "command_value",
    "decode_payload",
    "decode_reading",
    "encode_health",
    "encode_reading",
    "encode_set",
]

Value = Union[bool, int, float, str, None]

#: A unit is a short symbol ("C", "m", "%", "lux"); a long one is a bug.
MAX_UNIT_CHARS = 16
#: Device names are config keys, shown in status output.
MAX_DEVICE_CHARS = 64
#: Text values (e.g. a firmware's state name) stay small: readings are
#: numbers, and the payload bound of the carrier is far above this.
MAX_TEXT_VALUE_CHARS = 256


class MessageError(ValueError):
    """A payload is not a valid message of the expected kind."""


def _check_value(v: Any) -> Value:
    if v is None or isinstance(v, (bool, int, str)):
        if isinstance(v, str) and len(v) > MAX_TEXT_VALUE_CHARS:
            raise MessageError(f"text value longer than {MAX_TEXT_VALUE_CHARS} characters")
        return v  # type: ignore[no-any-return]
    if isinstance(v, float):
        return v
    raise MessageError(f"value must be a bool, number, text or null, not {type(v).__name__}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    """One value read from one device at one time (ns since the epoch)."""

    device: str
    value: Value
    unit: str
    time: int

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not 0 < len(self.device) <= MAX_DEVICE_CHARS:
            raise MessageError(f"device must be 1-{MAX_DEVICE_CHARS} characters")
        if not isinstance(self.unit, str) or len(self.unit) > MAX_UNIT_CHARS:
            raise MessageError(f"unit must be text of at most {MAX_UNIT_CHARS} characters")
        if type(self.time) is not int or self.time < 0:
            raise MessageError("time must be a non-negative integer (ns)")
        _check_value(self.value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Health:
    """A device's state change: ``ok`` or ``failing`` (with the error)."""

    device: str
    state: str
    failures: int
    error: str
    time: int

    def __post_init__(self) -> None:
        if self.state not in ("ok", "failing"):
            raise MessageError("health state must be 'ok' or 'failing'")


def encode_reading(r: Reading) -> bytes:
    """``Reading`` -> CBOR map bytes (canonical key order)."""
    return cbor2.dumps({"kind": "reading", "device": r.device, "value": r.value,
                        "unit": r.unit, "time": r.time}, canonical=True)


def decode_reading(payload: bytes) -> Reading:
    """CBOR bytes -> ``Reading``. Raises :class:`MessageError`."""
    m = decode_payload(payload)
    if m is None or m.get("kind") != "reading":
        raise MessageError("not a reading")
    try:
        return Reading(device=m["device"], value=m["value"], unit=m.get("unit", ""), time=m["time"])
    except KeyError as exc:
        raise MessageError(f"reading lacks {exc.args[0]!r}") from None


def encode_set(value: Value) -> bytes:
    """A ``set`` command for an output topic."""
    return cbor2.dumps({"kind": "set", "value": _check_value(value)}, canonical=True)


def encode_health(h: Health) -> bytes:
    return cbor2.dumps({"kind": "health", "device": h.device, "state": h.state,
                        "failures": h.failures, "error": h.error, "time": h.time}, canonical=True)


def decode_payload(payload: bytes) -> dict[str, Any] | None:
    """The payload as a dict if it is one whole CBOR map with text keys, else None.

    A CBOR map starts with a byte in 0xa0-0xbf, which never starts valid
    UTF-8 text, so plain-text payloads are never mistaken for one.
    """
    if not payload or not 0xA0 <= payload[0] <= 0xBF:
        return None
    fp = io.BytesIO(payload)
    try:
        v = cbor2.CBORDecoder(fp).decode()
    except Exception:       # cbor2 raises several types on garbage; all mean "not ours"
        return None
    if fp.tell() != len(payload):       # trailing bytes: not one whole map
        return None
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        return None
    return v


_TRUE = {"on", "true", "yes", "high", "1"}
_FALSE = {"off", "false", "no", "low", "0"}


def command_value(payload: bytes) -> Value:
    """What an output should do for a message on its topic.

    Accepts a ``set`` (or ``reading``) map, a bare CBOR bool/number, or
    UTF-8 text ``on``/``off``/``true``/``false``/``1``/``0``/a number.
    Raises :class:`MessageError` for anything else.
    """
    m = decode_payload(payload)
    if m is not None:
        if "value" not in m:
            raise MessageError("map payload has no 'value'")
        v = m["value"]
    else:
        try:
            text = payload.decode("utf-8").strip().lower()
        except UnicodeDecodeError:
            try:
                v = cbor2.loads(payload)
            except Exception:
                raise MessageError("payload is neither text nor CBOR") from None
        else:
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            try:
                v = float(text)
            except ValueError:
                raise MessageError(f"cannot use {text[:40]!r} as an output value") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise MessageError("value must be finite")
    return _check_value(v)
