"""Pure device decisions: sampling policy, failure/retry, w1 parsing, output values."""

from __future__ import annotations

import pytest

from firmware_bridge.config import loads
from firmware_bridge.devices import (
    MAX_RETRY_S,
    FailureTracker,
    SamplePolicy,
    SensorReadError,
    parse_w1_slave,
    to_output_value,
    values_differ,
)
from orbcast.messages import MessageError


def test_policy_publishes_every_sample_without_delta():
    p = SamplePolicy(interval=1.0)
    assert p.sampled(1.0, 0.0) and p.next_due == 1.0
    assert p.sampled(1.0, 1.0)


def test_policy_with_delta_and_max_silence():
    p = SamplePolicy(interval=1.0, delta=0.5, max_silence=10.0)
    assert p.sampled(20.0, 0.0)            # first value always
    assert not p.sampled(20.4, 1.0)        # within delta
    assert not p.sampled(20.5, 2.0)        # exactly delta is not "more than"
    assert p.sampled(20.6, 3.0)            # moved by 0.6 from the last published 20.0
    assert not p.sampled(20.6, 12.9)
    assert p.sampled(20.6, 13.0)           # 10 s of silence
    assert p.last_at == 13.0


def test_values_differ_non_numbers():
    assert values_differ(True, False, 0.5) and not values_differ("a", "a", 0.1)


def test_failure_tracker_backoff_and_transitions():
    f = FailureTracker(base=1.0)
    at, changed = f.failed(100.0, "gone")
    assert (at, changed) == (101.0, True) and f.failing
    at, changed = f.failed(101.0, "gone")
    assert (at, changed) == (103.0, False)
    for _ in range(20):
        at, _ = f.failed(200.0, "gone")
    assert at == 200.0 + MAX_RETRY_S and f.total == 22
    assert f.succeeded() and not f.failing and not f.succeeded()


def test_w1_slave_parsing():
    ok = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"
    assert parse_w1_slave(ok) == 23.125
    assert parse_w1_slave(ok.replace("t=23125", "t=-1250")) == -1.25
    for bad in (ok.replace("YES", "NO"), "", ok.replace("t=23125", "t=85000"), ok.replace("t=", "x=")):
        with pytest.raises(SensorReadError):
            parse_w1_slave(bad)


CFG = """
[plant]
producer_id = "p"
[[output]]
type = "PWMLED"
pin = 12
topic = "a/dim"
[[output]]
type = "OutputDevice"
pin = 13
topic = "a/relay"
"""


def test_output_values():
    c = loads(CFG, environ={})
    pwm, relay = c.outputs
    assert to_output_value(pwm, 0.25) == 0.25 and to_output_value(pwm, True) == 1.0
    assert to_output_value(relay, 1) is True and to_output_value(relay, 0.0) is False
    for spec, v in ((pwm, 1.5), (pwm, "x"), (relay, "on"), (relay, None)):
        with pytest.raises(MessageError):
            to_output_value(spec, v)
