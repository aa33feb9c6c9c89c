"""The bridge's TOML config: devices, topics, serial links - checked before anything opens.

Layout (a full example is systemd/bridge.toml)::

    [plant]                         # the same section every plant reads
    sequencers = ["tcp://10.0.0.2:7400", "tcp://10.0.0.3:7400"]
    producer_id = "pi-kitchen"

    [bridge]
    topics = ["sensors/kitchen/", "actuators/kitchen/", "health/"]  # allowed prefixes
    health_topic = "health/pi-kitchen"

    [[input]]
    type = "Button"
    pin = 17
    topic = "sensors/kitchen/door"
    bounce_time = 0.05

    [[input]]
    type = "DS18B20"
    sensor_id = "28-0316a279d5ff"
    topic = "sensors/kitchen/water"
    interval = 10.0                 # sample every 10 s ...
    delta = 0.2                     # ... publish when it moved by more than 0.2 C
    max_silence = 300.0             # ... or when 5 minutes passed without a publish

    [[output]]
    type = "OutputDevice"
    pin = 27
    topic = "actuators/kitchen/pump"

    [[serial]]
    name = "esp32"
    url = "/dev/ttyUSB0"
    topic_prefix = "sensors/kitchen/esp32/"
    forward = ["actuators/kitchen/fan"]

Every mistake is refused at start by :func:`load` with a
:class:`BridgeConfigError` naming the file and line: an unknown device type
or option, a missing option, a pin used twice, a topic outside
``[bridge] topics``, a topic both read and driven. ``tomllib`` reports
positions only for syntax errors, so :func:`key_line` finds a key's line by
scanning the text itself.

This module opens the config file and nothing else (no GPIO, no sockets).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field
from typing import Any

from orbcast import config as cfgmod
from orbcast import envelope as env
from orbcast.errors import ConfigError

__all__ = [
    "DEVICE_TYPES",
    "FLOATING",
    "INPUT_TYPES",
    "OUTPUT_TYPES",
    "BridgeConfig",
    "BridgeConfigError",
    "DeviceSpec",
    "SerialSpec",
    "key_line",
    "load",
    "loads",
]

#: Fastest sample period: gpiozero's own smoothing threads sample at up to
#: 100 Hz; publishing faster than 20 Hz per sensor would flood a Pi's SD
#: card-backed log for no gain (use delta to publish changes only).
MIN_INTERVAL_S = 0.05
#: Slowest sample period (a day): anything slower is a typo.
MAX_INTERVAL_S = 86_400.0
DEFAULT_W1_PATH = "/sys/bus/w1/devices"
DEFAULT_CPU_TEMP_FILE = "/sys/class/thermal/thermal_zone0/temp"

# option tables: name -> (type, default). ``REQ`` marks a required option.
REQ = object()
#: ``pull_up = "floating"``: no internal pull resistor (gpiozero's
#: ``pull_up=None``, which TOML cannot write). The input is then driven by
#: the circuit alone and gpiozero needs ``active_state`` to know which level
#: means pressed; with a pull-up or pull-down it follows from the pull.
FLOATING = "floating"
_PULL_OR_FLOATING = object()        # option type: true, false or "floating"
_PULL = {"pull_up": (_PULL_OR_FLOATING, None), "active_state": (bool, None)}
_SMOOTH = {"queue_len": (int, None), "sample_rate": (float, None), "threshold": (float, None)}
_SAMPLED = {"interval": (float, 1.0), "delta": (float, None), "max_silence": (float, None)}
_OUT = {"pin": (object, REQ), "active_high": (bool, True)}

#: type -> (category, unit, options). category: "event" (publish on change),
#: "sampled" (publish on interval/delta) or "output".
DEVICE_TYPES: dict[str, tuple[str, str, dict[str, tuple[Any, Any]]]] = {
    "Button": ("event", "", {"pin": (object, REQ), **_PULL, "bounce_time": (float, None)}),
    "MotionSensor": ("event", "", {"pin": (object, REQ), **_PULL, **_SMOOTH}),
    "LineSensor": ("event", "", {"pin": (object, REQ), **_PULL, **_SMOOTH}),
    "LightSensor": ("sampled", "", {"pin": (object, REQ), "queue_len": (int, None),
                                    "charge_time_limit": (float, None), **_SAMPLED}),
    "DistanceSensor": ("sampled", "m", {"echo": (object, REQ), "trigger": (object, REQ),
                                        "queue_len": (int, None), "max_distance": (float, None),
                                        **_SAMPLED}),
    "MCP3008": ("sampled", "", {"channel": (int, REQ), "differential": (bool, None),
                                "max_voltage": (float, 3.3), "voltage": (bool, False),
                                "port": (int, None), "device": (int, None),
                                "clock_pin": (object, None), "mosi_pin": (object, None),
                                "miso_pin": (object, None), "select_pin": (object, None),
                                **_SAMPLED}),
    "CPUTemperature": ("sampled", "C", {"sensor_file": (str, DEFAULT_CPU_TEMP_FILE), **_SAMPLED}),
    "DS18B20": ("sampled", "C", {"sensor_id": (str, REQ), **_SAMPLED}),
    "LED": ("output", "", {**_OUT, "initial_value": (bool, False)}),
    "PWMLED": ("output", "", {**_OUT, "initial_value": (float, 0.0), "frequency": (int, None)}),
    "Buzzer": ("output", "", {**_OUT, "initial_value": (bool, False)}),
    "OutputDevice": ("output", "", {**_OUT, "initial_value": (bool, False)}),
}
INPUT_TYPES = tuple(t for t, v in DEVICE_TYPES.items() if v[0] != "output")
OUTPUT_TYPES = tuple(t for t, v in DEVICE_TYPES.items() if v[0] == "output")
_PIN_KEYS = ("pin", "echo", "trigger", "clock_pin", "mosi_pin", "miso_pin", "select_pin")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class BridgeConfigError(ConfigError):
    """The bridge config is wrong; ``line`` (1-based, or None) says where."""

    def __init__(self, message: str, *, line: int | None, field: str | None = None,
                 source: str | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line else message, field=field, source=source)
        self.line = line


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One ``[[input]]`` or ``[[output]]`` table, validated."""

    type: str
    name: str
    topic: str
    category: str                 # event | sampled | output
    unit: str
    options: dict[str, Any]       # type-specific options (None = gpiozero's default)
    interval: float = 1.0
    delta: float | None = None
    max_silence: float | None = None
    line: int | None = None


@dataclass(frozen=True, kw_only=True)
class SerialSpec:
    """One ``[[serial]]`` table: a firmware on a serial port."""

    name: str
    url: str
    baudrate: int = 115200
    topic_prefix: str
    forward: tuple[str, ...] = ()
    line: int | None = None


@dataclass(kw_only=True)
class BridgeConfig:
    """The whole bridge config (see the module docstring)."""

    plant: cfgmod.PlantConfig
    health_topic: str
    topics: tuple[str, ...] = ()          # allowed prefixes; empty = any valid topic
    w1_path: str = DEFAULT_W1_PATH
    inputs: list[DeviceSpec] = field(default_factory=list)
    outputs: list[DeviceSpec] = field(default_factory=list)
    serial: list[SerialSpec] = field(default_factory=list)
    source: str = "<string>"

    def allowed(self, topic: str) -> bool:
        return not self.topics or any(topic.startswith(p) for p in self.topics)


# --- line finding ----------------------------------------------------------------

_HDR = re.compile(r"^\s*(\[\[?)\s*([^\]\s]+)\s*\]\]?")


def key_line(text: str, table: str | None, index: int | None = None, key: str | None = None) -> int | None:
    """1-based line of ``key`` in ``[table]`` (or the ``index``-th ``[[table]]``).

    ``table=None`` means the top level. Without ``key`` (or if it is not
    found) the table header's line. ``None`` if the table is not in the text.
    """
    current: tuple[str | None, int] = (None, 0)
    counts: dict[str, int] = {}
    header_line = None if table is not None else 1
    kre = re.compile(r'^\s*["\']?' + re.escape(key) + r'["\']?\s*=') if key else None
    for no, raw in enumerate(text.splitlines(), 1):
        m = _HDR.match(raw)
        if m:
            name = m.group(2)
            i = counts.get(name, 0)
            counts[name] = i + 1
            current = (name, i)
            if name == table and (index is None or i == index):
                header_line = no
            continue
        if current[0] == table and (table is None or index is None or current[1] == index):
            if kre is not None and kre.match(raw):
                return no
    return header_line


# --- loading -----------------------------------------------------------------------

def load(path: str, *, environ: dict[str, str] | None = None) -> BridgeConfig:
    """Read and validate ``path``. Raises :class:`BridgeConfigError` / ConfigError."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", source=path) from None
    return _loads(text, source=path, path=path, environ=environ)


def loads(text: str, *, source: str = "<string>", environ: dict[str, str] | None = None) -> BridgeConfig:
    """Validate config ``text`` (``source`` names it in errors)."""
    return _loads(text, source=source, path=None, environ=environ)


def _loads(text: str, *, source: str, path: str | None, environ: dict[str, str] | None) -> BridgeConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=source) from None
    return _Checker(text, source, path, environ).check(doc)


class _Checker:
    def __init__(self, text: str, source: str, path: str | None, environ: dict[str, str] | None) -> None:
        self.text = text
        self.path = path
        self.source = source
        self.environ = environ
        self.pins: dict[str, tuple[str, int | None]] = {}       # pin -> (device, line)
        self.topics_in: dict[str, tuple[str, int | None]] = {}
        self.topics_out: dict[str, tuple[str, int | None]] = {}
        self.names: dict[str, int | None] = {}

    def fail(self, msg: str, table: str | None, index: int | None, key: str | None) -> BridgeConfigError:
        fld = table if table else ""
        if index is not None:
            fld += f"[{index}]"
        if key:
            fld += f".{key}" if fld else key
        return BridgeConfigError(msg, line=key_line(self.text, table, index, key),
                                 field=fld or None, source=self.source)

    def check(self, doc: dict[str, Any]) -> BridgeConfig:
        for k in doc:
            if k not in ("plant", "bridge", "input", "output", "serial"):
                raise self.fail(f"unknown section {k!r}", None, None, k)
        plant = self._plant(doc)
        b = doc.get("bridge", {})
        if not isinstance(b, dict):
            raise self.fail("[bridge] must be a table", None, None, "bridge")
        known = {"topics", "health_topic", "w1_path"}
        for k in b:
            if k not in known:
                raise self.fail(f"unknown setting {k!r} in [bridge]", "bridge", None, k)
        topics = b.get("topics", [])
        if not isinstance(topics, list) or not all(isinstance(t, str) and t for t in topics):
            raise self.fail("topics must be a list of topic prefixes", "bridge", None, "topics")
        self.allowed = tuple(topics)
        health = b.get("health_topic", f"health/{plant.producer_id}")
        self._topic(health, "bridge", None, "health_topic")
        w1 = b.get("w1_path", DEFAULT_W1_PATH)
        if not isinstance(w1, str):
            raise self.fail("w1_path must be a string", "bridge", None, "w1_path")
        cfg = BridgeConfig(plant=plant, health_topic=health, topics=self.allowed, w1_path=w1,
                           source=self.source)
        for kind in ("input", "output"):
            tables = doc.get(kind, [])
            if not isinstance(tables, list):
                raise self.fail(f"use [[{kind}]] (an array of tables)", None, None, kind)
            for i, t in enumerate(tables):
                spec = self._device(kind, i, t)
                (cfg.inputs if kind == "input" else cfg.outputs).append(spec)
        for i, t in enumerate(doc.get("serial", [])):
            cfg.serial.append(self._serial(i, t))
        for topic, (dev, line) in self.topics_in.items():
            if topic in self.topics_out:
                odev, oline = self.topics_out[topic]
                raise BridgeConfigError(
                    f"topic {topic!r} is both published by {dev!r} and drives output {odev!r} "
                    f"(line {oline}): a bridge must not feed its own outputs",
                    line=line, source=self.source)
        return cfg

    def _plant(self, doc: dict[str, Any]) -> cfgmod.PlantConfig:
        env_ = dict(os.environ if self.environ is None else self.environ)
        try:
            # the [plant] section with the usual ORBCAST_PLANT_* overrides
            if self.path is not None:
                return cfgmod.load(cfgmod.PlantConfig, self.path, env=env_)
            with tempfile.NamedTemporaryFile("w", suffix=".toml") as fh:
                fh.write(self.text)
                fh.flush()
                return cfgmod.load(cfgmod.PlantConfig, fh.name, env=env_)
        except ConfigError as exc:
            key = (exc.field or "").split(".")[-1] or None
            raise BridgeConfigError(str(exc).split(" (", 1)[0], field=exc.field,
                                    line=key_line(self.text, "plant", None, key) if key else None,
                                    source=self.source) from None

    def _topic(self, topic: Any, table: str, index: int | None, key: str, *, prefix: bool = False) -> str:
        if not isinstance(topic, str):
            raise self.fail(f"{key} must be a string", table, index, key)
        try:
            env.check_topic(topic)
        except (ValueError, TypeError) as exc:
            raise self.fail(f"bad topic {topic!r}: {exc}", table, index, key) from None
        if self.allowed and not any(topic.startswith(p) for p in self.allowed):
            raise self.fail(f"topic {topic!r} is not allowed: [bridge] topics permits only "
                            f"{', '.join(map(repr, self.allowed))}", table, index, key)
        return topic

    def _device(self, kind: str, i: int, t: Any) -> DeviceSpec:
        if not isinstance(t, dict):
            raise self.fail(f"[[{kind}]] entries must be tables", kind, i, None)
        typ = t.get("type")
        if typ is None:
            raise self.fail("missing 'type'", kind, i, None)
        if typ not in DEVICE_TYPES:
            raise self.fail(f"unknown device type {typ!r}; known: {', '.join(DEVICE_TYPES)}", kind, i, "type")
        cat, unit, opts = DEVICE_TYPES[typ]
        if (cat == "output") != (kind == "output"):
            raise self.fail(f"{typ} is an {'output' if cat == 'output' else 'input'}, "
                            f"not an {kind}", kind, i, "type")
        for k in t:
            if k not in opts and k not in ("type", "name", "topic", "unit"):
                raise self.fail(f"unknown option {k!r} for {typ}; known: "
                                f"{', '.join(sorted(opts))}, name, topic, unit", kind, i, k)
        if "topic" not in t:
            raise self.fail(f"missing 'topic' for {typ}", kind, i, None)
        topic = self._topic(t["topic"], kind, i, "topic")
        name = t.get("name", topic.rstrip("/").rsplit("/", 1)[-1])
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise self.fail(f"name must be 1-64 of A-Z a-z 0-9 _ . -, got {name!r}", kind, i, "name")
        if name in self.names:
            raise self.fail(f"device name {name!r} already used at line {self.names[name]}", kind, i, "name")
        line = key_line(self.text, kind, i, None)
        self.names[name] = line
        if typ == "MCP3008" and t.get("voltage") is True:
            unit = "V"                 # volts instead of the 0-1 fraction
        unit = t.get("unit", unit)
        if not isinstance(unit, str) or len(unit) > 16:
            raise self.fail("unit must be a string of at most 16 characters", kind, i, "unit")
        values: dict[str, Any] = {}
        for k, (typ_, default) in opts.items():
            if k not in t:
                if default is REQ:
                    raise self.fail(f"missing {k!r} for {typ}", kind, i, None)
                values[k] = default
                continue
            values[k] = self._value(t[k], typ_, kind, i, k)
        for k in _PIN_KEYS:
            if values.get(k) is not None:
                pin = _norm_pin(values[k])
                if pin in self.pins:
                    other, oline = self.pins[pin]
                    raise self.fail(f"pin {values[k]!r} is already used by {other!r} (line {oline})",
                                    kind, i, k)
                self.pins[pin] = (name, key_line(self.text, kind, i, k))
        if typ == "MCP3008" and not 0 <= values["channel"] <= 7:
            raise self.fail("channel must be 0-7", kind, i, "channel")
        if "active_state" in opts:
            self._check_pull(typ, values, kind, i)
        if typ == "PWMLED" and not 0.0 <= values["initial_value"] <= 1.0:
            raise self.fail("initial_value must be in [0, 1]", kind, i, "initial_value")
        sampled = {k: values.pop(k) for k in ("interval", "delta", "max_silence") if k in values}
        if cat == "sampled":
            iv = sampled["interval"]
            if not MIN_INTERVAL_S <= iv <= MAX_INTERVAL_S:
                raise self.fail(f"interval must be in [{MIN_INTERVAL_S}, {MAX_INTERVAL_S}] s", kind, i, "interval")
            if sampled["delta"] is not None and sampled["delta"] < 0:
                raise self.fail("delta must be >= 0", kind, i, "delta")
            ms = sampled["max_silence"]
            if ms is not None and ms < iv:
                raise self.fail(f"max_silence ({ms} s) must be >= interval ({iv} s)", kind, i, "max_silence")
        book = self.topics_out if kind == "output" else self.topics_in
        if kind == "input" and topic in book:
            raise self.fail(f"topic {topic!r} already used by input {book[topic][0]!r} "
                            f"(line {book[topic][1]})", kind, i, "topic")
        book.setdefault(topic, (name, key_line(self.text, kind, i, "topic")))
        return DeviceSpec(type=typ, name=name, topic=topic, category=cat, unit=unit, options=values,
                          line=line, **sampled)

    def _value(self, v: Any, typ: Any, table: str, i: int | None, k: str) -> Any:
        if typ is _PULL_OR_FLOATING:
            if isinstance(v, bool) or v == FLOATING:
                return v
            raise self.fail(f'{k} must be true, false or "{FLOATING}" (no pull resistor), got {v!r}',
                            table, i, k)
        if typ is object:            # a pin: int (BCM number) or a gpiozero pin name
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise self.fail(f"{k} must be a GPIO number or a pin name like 'GPIO17'", table, i, k)
            return v
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if typ is bool and not isinstance(v, bool) or typ is not bool and isinstance(v, bool) \
                or not isinstance(v, typ):
            raise self.fail(f"{k} must be {typ.__name__}, got {v!r}", table, i, k)
        if typ is float and (not math.isfinite(v) or v < 0):
            raise self.fail(f"{k} must be a finite number >= 0", table, i, k)
        if typ is int and v < 0:
            raise self.fail(f"{k} must be >= 0", table, i, k)
        return v

    def _check_pull(self, typ: str, values: dict[str, Any], kind: str, i: int) -> None:
        """gpiozero takes ``active_state`` only with no pull resistor, and
        needs it then: refuse the combinations it would refuse at open."""
        pull, active = values.get("pull_up"), values.get("active_state")
        if pull == FLOATING and active is None:
            raise self.fail(f'pull_up = "{FLOATING}" needs active_state: true if the input reads '
                            f"high when active (wired to 3.3 V), false if low", kind, i, "pull_up")
        if active is not None and pull != FLOATING:
            default = "a pull-up" if typ == "Button" else "a pull-down"     # gpiozero's defaults
            how = f"omitted ({default})" if pull is None else f"{str(pull).lower()}"
            raise self.fail(f'active_state is only used with pull_up = "{FLOATING}" (no pull '
                            f"resistor); pull_up is {how}, which already sets the active state "
                            f"(pull-up: active low, pull-down: active high)", kind, i, "active_state")

    def _serial(self, i: int, t: Any) -> SerialSpec:
        if not isinstance(t, dict):
            raise self.fail("[[serial]] entries must be tables", "serial", i, None)
        known = {"name", "url", "baudrate", "topic_prefix", "forward"}
        for k in t:
            if k not in known:
                raise self.fail(f"unknown option {k!r} for a serial link; known: {', '.join(sorted(known))}",
                                "serial", i, k)
        for k in ("name", "url", "topic_prefix"):
            if not isinstance(t.get(k), str) or not t[k]:
                raise self.fail(f"serial link needs {k!r} (a string)", "serial", i, k if k in t else None)
        name = t["name"]
        if not _NAME_RE.match(name) or name in self.names:
            raise self.fail(f"serial name {name!r} is invalid or already used", "serial", i, "name")
        self.names[name] = key_line(self.text, "serial", i, None)
        prefix = self._topic(t["topic_prefix"], "serial", i, "topic_prefix")
        baud = t.get("baudrate", 115200)
        if type(baud) is not int or not 300 <= baud <= 4_000_000:
            raise self.fail("baudrate must be an integer in [300, 4000000]", "serial", i, "baudrate")
        fwd = t.get("forward", [])
        if not isinstance(fwd, list):
            raise self.fail("forward must be a list of topic prefixes", "serial", i, "forward")
        for f in fwd:
            self._topic(f, "serial", i, "forward")
            if f.startswith(prefix) or prefix.startswith(f):
                raise self.fail(f"forward {f!r} overlaps topic_prefix {prefix!r}: the link would "
                                "echo its own readings", "serial", i, "forward")
        return SerialSpec(name=name, url=t["url"], baudrate=baud, topic_prefix=prefix,
                          forward=tuple(fwd), line=key_line(self.text, "serial", i, None))


def _norm_pin(p: int | str) -> str:
    """17, "17", "GPIO17", "BCM17" -> "GPIO17"; other names upper-cased."""
    if isinstance(p, int):
        return f"GPIO{p}"
    s = p.strip().upper()
    for pre in ("GPIO", "BCM"):
        if s.startswith(pre) and s[len(pre):].isdigit():
            return f"GPIO{int(s[len(pre):])}"
    return f"GPIO{int(s)}" if s.isdigit() else s
