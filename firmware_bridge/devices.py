"""Devices: gpiozero objects behind one small interface, plus the pure decisions.

* :func:`open_device` builds the gpiozero device for a :class:`DeviceSpec`
  (``pin_factory`` passed through, so tests use ``MockFactory``).
* :class:`DS18B20` reads a 1-wire thermometer from the kernel's w1 sysfs
  files, modelled on gpiozero's ``CPUTemperature``.
* :func:`read_value` turns a device's state into the value published;
  :func:`to_output_value` turns a command into what an output accepts.
* :class:`SamplePolicy` decides when a sampled reading is published and
  :class:`FailureTracker` when a failing device is retried and what health
  change to report. Both are pure: they take ``now`` (monotonic seconds).

Nothing here publishes or logs; :mod:`firmware_bridge.bridge` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from orbcast.messages import MessageError, Value

from .config import FLOATING, DeviceSpec

__all__ = [
    "DS18B20",
    "MAX_RETRY_S",
    "FailureTracker",
    "SamplePolicy",
    "SensorReadError",
    "open_device",
    "read_value",
    "to_output_value",
    "values_differ",
]

#: A failing device is retried with exponential backoff up to this period:
#: long enough not to spam the log and health topic, short enough that a
#: re-plugged sensor is back within half a minute.
MAX_RETRY_S = 30.0
#: First retry delay after a failure of a device that has no interval.
FIRST_RETRY_S = 1.0


class SensorReadError(OSError):
    """A sensor answered with something unusable (bad CRC, garbage)."""


class DS18B20:
    """A DS18B20 1-wire thermometer read through the kernel's w1-therm driver.

    ``sensor_id`` is the folder name under ``w1_path`` (``28-0316a279d5ff``).
    ``temperature`` reads ``w1_slave`` (two lines, the first ending in
    ``YES`` when the CRC is good, the second ``t=<millidegrees>``) and
    raises :class:`SensorReadError` on a bad CRC or :class:`OSError` when
    the sensor is gone. A read takes ~750 ms on real hardware (conversion).
    """

    def __init__(self, sensor_id: str, *, w1_path: str = "/sys/bus/w1/devices") -> None:
        self.sensor_id = sensor_id
        self.path = os.path.join(w1_path, sensor_id, "w1_slave")

    @property
    def temperature(self) -> float:
        with open(self.path, encoding="ascii", errors="replace") as fh:
            text = fh.read()
        return parse_w1_slave(text)

    @property
    def value(self) -> float:
        return self.temperature

    def close(self) -> None:
        pass


def parse_w1_slave(text: str) -> float:
    """The temperature (deg C) in a ``w1_slave`` file. Raises :class:`SensorReadError`."""
    lines = text.strip().splitlines()
    if len(lines) < 2 or not lines[0].strip().endswith("YES"):
        raise SensorReadError("DS18B20 CRC check failed (crc=... NO) or short read")
    _, sep, milli = lines[1].rpartition("t=")
    if not sep:
        raise SensorReadError("DS18B20 reading has no t= field")
    try:
        v = int(milli.strip())
    except ValueError:
        raise SensorReadError(f"DS18B20 reading {milli.strip()!r} is not a number") from None
    if v == 85000:          # the power-on reset value: a conversion that never ran
        raise SensorReadError("DS18B20 returned its power-on value 85 C (conversion failed)")
    return v / 1000.0


def _kw(spec: DeviceSpec, *names: str) -> dict[str, Any]:
    """The options gpiozero gets: unset ones left to its defaults, and
    ``pull_up = "floating"`` passed as the ``pull_up=None`` it means."""
    kw = {n: spec.options[n] for n in names if spec.options.get(n) is not None}
    if kw.get("pull_up") == FLOATING:
        kw["pull_up"] = None
    return kw


_SMOOTHED = ("pull_up", "active_state", "queue_len", "sample_rate", "threshold")


def open_device(spec: DeviceSpec, *, pin_factory: Any = None, w1_path: str = "/sys/bus/w1/devices") -> Any:
    """Build the device object for ``spec``. Raises what gpiozero raises
    (``GPIOZeroError`` subclasses, ``OSError``) when the hardware is missing
    or a pin is taken."""
    import gpiozero as gz
    t = spec.type
    o = spec.options
    pf = {"pin_factory": pin_factory}
    if t == "Button":
        return gz.Button(o["pin"], **_kw(spec, "pull_up", "bounce_time", "active_state"), **pf)
    if t == "MotionSensor":
        return gz.MotionSensor(o["pin"], **_kw(spec, *_SMOOTHED), **pf)
    if t == "LineSensor":
        return gz.LineSensor(o["pin"], **_kw(spec, *_SMOOTHED), **pf)
    if t == "LightSensor":
        return gz.LightSensor(o["pin"], **_kw(spec, "queue_len", "charge_time_limit"), **pf)
    if t == "DistanceSensor":
        return gz.DistanceSensor(echo=o["echo"], trigger=o["trigger"],
                                 **_kw(spec, "queue_len", "max_distance"), **pf)
    if t == "MCP3008":
        return gz.MCP3008(channel=o["channel"], **_kw(spec, "differential", "max_voltage", "port", "device",
                                                      "clock_pin", "mosi_pin", "miso_pin", "select_pin"),
                          **pf)
    if t == "CPUTemperature":
        return gz.CPUTemperature(sensor_file=o["sensor_file"], **pf)
    if t == "DS18B20":
        return DS18B20(o["sensor_id"], w1_path=w1_path)
    if t == "LED":
        return gz.LED(o["pin"], active_high=o["active_high"], initial_value=o["initial_value"], **pf)
    if t == "PWMLED":
        return gz.PWMLED(o["pin"], active_high=o["active_high"], initial_value=o["initial_value"],
                         **_kw(spec, "frequency"), **pf)
    if t == "Buzzer":
        return gz.Buzzer(o["pin"], active_high=o["active_high"], initial_value=o["initial_value"], **pf)
    if t == "OutputDevice":
        return gz.OutputDevice(o["pin"], active_high=o["active_high"], initial_value=o["initial_value"], **pf)
    raise ValueError(f"unknown device type {t!r}")   # config.py refuses these first


def read_value(spec: DeviceSpec, dev: Any) -> Value:
    """The value published for ``dev`` now (units in :data:`config.DEVICE_TYPES`).

    Event devices give a bool (pressed / motion / line); LightSensor and
    MCP3008 a fraction 0-1 (MCP3008 volts with ``voltage = true``);
    DistanceSensor metres; the thermometers deg C. Values are rounded to a
    resolution the hardware actually has, so noise below it does not count
    as a change.
    """
    t = spec.type
    if spec.category == "event":
        return bool(dev.is_active)
    if t == "CPUTemperature":
        return round(float(dev.temperature), 3)
    if t == "DS18B20":
        return round(float(dev.temperature), 4)
    if t == "DistanceSensor":
        return round(float(dev.distance), 4)
    if t == "MCP3008":
        if spec.options.get("voltage"):
            return round(float(dev.voltage), 4)
        return round(float(dev.value), 4)
    return round(float(dev.value), 4)


def to_output_value(spec: DeviceSpec, v: Value) -> bool | float:
    """What ``spec``'s output is set to for command value ``v``.

    On/off outputs take a bool or a number (non-zero = on); PWMLED takes a
    number in [0, 1] or a bool. Raises :class:`MessageError` otherwise.
    """
    if spec.type == "PWMLED":
        if isinstance(v, bool):
            return 1.0 if v else 0.0
        if isinstance(v, (int, float)) and 0.0 <= v <= 1.0:
            return float(v)
        raise MessageError(f"PWMLED value must be in [0, 1] or a bool, got {v!r}")
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v != 0
    raise MessageError(f"{spec.type} value must be a bool or a number, got {v!r}")


def values_differ(a: Value, b: Value, delta: float | None) -> bool:
    """True if ``b`` moved away from ``a`` by more than ``delta``."""
    if delta is None:
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(b - a) > delta
    return a != b


@dataclass
class SamplePolicy:
    """When to sample and whether to publish a sampled device's value.

    Publish the first value; then, without ``delta``, every sample; with
    ``delta``, when the value moved by more than ``delta`` from the last
    published one, or when ``max_silence`` seconds passed since then.
    """

    interval: float
    delta: float | None = None
    max_silence: float | None = None
    next_due: float = 0.0
    last_value: Value = None
    last_at: float | None = None

    def sampled(self, value: Value, now: float) -> bool:
        """Record a sample taken at ``now``; True if it should be published."""
        self.next_due = now + self.interval
        pub = (self.last_at is None or values_differ(self.last_value, value, self.delta)
               or (self.max_silence is not None and now - self.last_at >= self.max_silence))
        if pub:
            self.last_value = value
            self.last_at = now
        return pub


@dataclass
class FailureTracker:
    """A device's health: counts failures, paces retries, reports changes.

    ``failed(now, error)`` returns ``(retry_at, changed)``; ``changed`` is
    True on the ok -> failing transition (publish health then, not on every
    retry). ``succeeded()`` returns True on failing -> ok.
    """

    base: float = FIRST_RETRY_S
    failures: int = 0            # consecutive
    total: int = 0               # since start
    error: str = ""

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, now: float, error: str) -> tuple[float, bool]:
        changed = self.failures == 0
        self.failures += 1
        self.total += 1
        self.error = error
        delay = min(self.base * (2 ** min(self.failures - 1, 10)), MAX_RETRY_S)
        return now + delay, changed

    def succeeded(self) -> bool:
        changed = self.failures > 0
        self.failures = 0
        self.error = ""
        return changed
