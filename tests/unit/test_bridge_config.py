"""Bridge config: good files load; every mistake is refused naming its line."""

from __future__ import annotations

import pytest

from firmware_bridge.config import BridgeConfigError, key_line, loads
from orbcast.errors import ConfigError

BASE = """\
[plant]
sequencers = ["tcp://127.0.0.1:7400"]
producer_id = "pi-test"
data = "/tmp/x"

[bridge]
topics = ["sensors/", "actuators/", "health/"]

[[input]]
type = "Button"
pin = 17
topic = "sensors/door"
bounce_time = 0.05

[[input]]
type = "DS18B20"
sensor_id = "28-000001"
topic = "sensors/water"
interval = 2
delta = 0.5

[[output]]
type = "LED"
pin = 18
topic = "actuators/lamp"
"""


def line_of(text: str, needle: str, nth: int = 1) -> int:
    lines = [i for i, ln in enumerate(text.splitlines(), 1) if needle in ln]
    return lines[nth - 1]


def test_base_loads():
    c = loads(BASE, environ={})
    assert [d.type for d in c.inputs] == ["Button", "DS18B20"]
    assert c.inputs[0].options["pin"] == 17 and c.inputs[0].options["bounce_time"] == 0.05
    assert c.inputs[1].interval == 2.0 and c.inputs[1].delta == 0.5 and c.inputs[1].unit == "C"
    assert c.inputs[0].name == "door" and c.outputs[0].topic == "actuators/lamp"
    assert c.health_topic == "health/pi-test" and c.plant.producer_id == "pi-test"
    assert c.inputs[1].line == line_of(BASE, "[[input]]", 2)


def refused(text: str) -> BridgeConfigError:
    with pytest.raises(BridgeConfigError) as ei:
        loads(text, source="bridge.toml", environ={})
    assert "bridge.toml" in str(ei.value)
    return ei.value


def test_unknown_device_type_names_the_line():
    text = BASE.replace('type = "DS18B20"', 'type = "DS18B2O"')
    e = refused(text)
    assert e.line == line_of(text, "DS18B2O") and "unknown device type 'DS18B2O'" in str(e)
    assert str(e).startswith(f"line {e.line}:")


def test_pin_used_twice_names_both_lines():
    text = BASE + '\n[[output]]\ntype = "Buzzer"\npin = "GPIO17"\ntopic = "actuators/buzz"\n'
    e = refused(text)
    assert e.line == line_of(text, 'pin = "GPIO17"')
    assert f"line {line_of(text, 'pin = 17')}" in str(e) and "'door'" in str(e)


def test_topic_not_allowed_names_the_line():
    text = BASE.replace('topic = "actuators/lamp"', 'topic = "secret/lamp"')
    e = refused(text)
    assert e.line == line_of(text, "secret/lamp") and "not allowed" in str(e)


def test_topic_both_read_and_driven():
    text = BASE.replace('topic = "actuators/lamp"', 'name = "lamp"\ntopic = "sensors/door"')
    e = refused(text)
    assert e.line == line_of(text, 'topic = "sensors/door"', 1) and "own outputs" in str(e)


@pytest.mark.parametrize("edit,needle,words", [
    (('bounce_time = 0.05', 'bounce_tme = 0.05'), "bounce_tme", "unknown option"),
    (('interval = 2', 'interval = "2"'), 'interval = "2"', "must be float"),
    (('interval = 2', 'interval = 0.001'), "interval = 0.001", "interval must be"),
    (('delta = 0.5', 'delta = 0.5\nmax_silence = 1'), "max_silence", "max_silence"),
    (('type = "LED"', 'type = "Pushbutton"'), 'Pushbutton', "unknown device type"),
    (('producer_id = "pi-test"', 'producer_id = "pi-test"\nbogus = 1'), "bogus", "unknown setting"),
    (('topics = [', 'colour = "red"\ntopics = ['), "colour", "unknown setting"),
])
def test_more_mistakes(edit, needle, words):
    text = BASE.replace(*edit)
    e = refused(text)
    assert words in str(e)
    assert e.line == line_of(text, needle)


def test_missing_key_points_at_the_table():
    text = BASE.replace('sensor_id = "28-000001"\n', "")
    e = refused(text)
    assert e.line == line_of(text, "[[input]]", 2) and "'sensor_id'" in str(e)


def test_bad_plant_value_names_the_line():
    text = BASE.replace('["tcp://127.0.0.1:7400"]', '["udp://x"]')
    e = refused(text)
    assert e.line == line_of(text, "udp://x")


def test_syntax_errors_are_config_errors():
    with pytest.raises(ConfigError, match="invalid TOML"):
        loads("[[input]\n", environ={})


def test_serial_section():
    text = BASE + ('\n[[serial]]\nname = "esp"\nurl = "loop://"\ntopic_prefix = "sensors/esp/"\n'
                   'forward = ["actuators/fan"]\n')
    c = loads(text, environ={})
    assert c.serial[0].forward == ("actuators/fan",) and c.serial[0].baudrate == 115200
    e = refused(text.replace('forward = ["actuators/fan"]', 'forward = ["sensors/esp/x"]'))
    assert "echo" in str(e)


def test_key_line_scanner():
    t = 'a = 1\n[x]\nk = 1\n[[y]]\nk = 2\n[[y]]\n  "k" = 3\n'
    assert key_line(t, None, None, "a") == 1
    assert key_line(t, "x", None, "k") == 3
    assert key_line(t, "y", 1, "k") == 7
    assert key_line(t, "y", 1, "missing") == 6
    assert key_line(t, "z", None, "k") is None


def test_mcp3008_unit_follows_what_it_publishes():
    """Readings carry a unit: an MCP3008 publishing volts says "V", one
    publishing the 0-1 fraction says nothing; an explicit unit wins."""
    extra = ('\n[[input]]\ntype = "MCP3008"\nchannel = {ch}\ntopic = "sensors/adc{ch}"\n'
             'voltage = {v}\n{u}')
    text = BASE + "".join(extra.format(ch=ch, v=v, u=u) for ch, v, u in
                          [(0, "true", ""), (1, "false", ""), (2, "true", 'unit = "mV"\n')])
    units = [d.unit for d in loads(text, environ={}).inputs if d.type == "MCP3008"]
    assert units == ["V", "", "mV"]


BUTTON = BASE.replace("bounce_time = 0.05", "bounce_time = 0.05\n{extra}")


@pytest.mark.parametrize("extra,pull,active", [
    ('pull_up = "floating"\nactive_state = true', "floating", True),
    ('pull_up = "floating"\nactive_state = false', "floating", False),
])
def test_button_pull_and_active_state_that_gpiozero_accepts(extra, pull, active):
    opts = loads(BUTTON.format(extra=extra), environ={}).inputs[0].options
    assert (opts["pull_up"], opts["active_state"]) == (pull, active)


@pytest.mark.parametrize("extra,needle,words", [
    # gpiozero takes active_state only with no pull resistor (pull_up=None)
    ("active_state = true", "active_state", 'only used with pull_up = "floating"'),
    ("pull_up = true\nactive_state = false", "active_state", 'only used with pull_up = "floating"'),
    ("pull_up = false\nactive_state = true", "active_state", 'only used with pull_up = "floating"'),
    # ... and needs it then
    ('pull_up = "floating"', "pull_up", "needs active_state"),
    ('pull_up = "none"\nactive_state = true', "pull_up", 'true, false or "floating"'),
])
def test_button_pull_and_active_state_gpiozero_would_refuse(extra, needle, words):
    text = BUTTON.format(extra=extra)
    e = refused(text)
    assert words in str(e)
    assert e.line == line_of(text, needle)


SMOOTHED = BASE + '\n[[input]]\ntype = "{typ}"\npin = 22\ntopic = "sensors/x"\n{extra}\n'


@pytest.mark.parametrize("typ", ["MotionSensor", "LineSensor"])
def test_motion_and_line_sensors_take_floating_and_active_state_like_a_button(typ):
    text = SMOOTHED.format(typ=typ, extra='pull_up = "floating"\nactive_state = false')
    opts = next(d for d in loads(text, environ={}).inputs if d.type == typ).options
    assert (opts["pull_up"], opts["active_state"]) == ("floating", False)
    # the same rules: active_state only without a pull resistor, which then needs it
    text = SMOOTHED.format(typ=typ, extra="active_state = true")
    e = refused(text)
    assert "omitted (a pull-down)" in str(e) and e.line == line_of(text, "active_state")
    text = SMOOTHED.format(typ=typ, extra='pull_up = "floating"')
    e = refused(text)
    assert "needs active_state" in str(e) and e.line == line_of(text, 'pull_up = "floating"')


def test_a_floating_button_opens_on_gpiozero():
    """What ``check`` accepts, gpiozero opens (it refused active_state before)."""
    from gpiozero.pins.mock import MockFactory

    from firmware_bridge.devices import open_device
    spec = loads(BUTTON.format(extra='pull_up = "floating"\nactive_state = true'), environ={}).inputs[0]
    dev = open_device(spec, pin_factory=MockFactory())
    try:
        assert dev.pull_up is None and dev.is_active is False
    finally:
        dev.close()
