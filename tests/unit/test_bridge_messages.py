"""The message layer (orbcast.messages) and the decoded display in plant's format_message."""

from __future__ import annotations

import base64
import json

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orbcast.envelope import Message
from orbcast.messages import (
    Health,
    MessageError,
    Reading,
    command_value,
    decode_payload,
    decode_reading,
    encode_health,
    encode_reading,
    encode_set,
)
from plant.cli import format_message

values = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
                   st.floats(allow_nan=False), st.text(max_size=50))


@given(device=st.text(min_size=1, max_size=64), value=values, unit=st.text(max_size=16),
       time=st.integers(0, 2**63))
def test_reading_round_trip(device, value, unit, time):
    r = Reading(device=device, value=value, unit=unit, time=time)
    assert decode_reading(encode_reading(r)) == r


def test_reading_layout_is_a_plain_cbor_map():
    b = encode_reading(Reading(device="t", value=21.5, unit="C", time=7))
    assert cbor2.loads(b) == {"kind": "reading", "device": "t", "value": 21.5, "unit": "C", "time": 7}


@pytest.mark.parametrize("bad", [dict(device="", value=1, unit="", time=0),
                                 dict(device="d", value=[1], unit="", time=0),
                                 dict(device="d", value=1, unit="x" * 17, time=0),
                                 dict(device="d", value=1, unit="", time=-1)])
def test_reading_rejects(bad):
    with pytest.raises(MessageError):
        Reading(**bad)


@pytest.mark.parametrize("payload,expect", [
    (b"on", True), (b"OFF", False), (b" 1\n", True), (b"0", False), (b"0.25", 0.25),
    (encode_set(True), True), (encode_set(0.5), 0.5), (cbor2.dumps(False), False),
    (encode_reading(Reading(device="d", value=3, unit="", time=0)), 3),
])
def test_command_values(payload, expect):
    assert command_value(payload) == expect


@pytest.mark.parametrize("payload", [b"maybe", b"", cbor2.dumps({"kind": "set"}), b"nan",
                                     cbor2.dumps({"value": [1, 2]})])
def test_command_value_rejects(payload):
    with pytest.raises(MessageError):
        command_value(payload)


def test_decode_payload_only_whole_maps():
    good = encode_set(1)
    assert decode_payload(good) == {"kind": "set", "value": 1}
    assert decode_payload(good + b"\x00") is None          # trailing garbage
    assert decode_payload(good[:-1]) is None               # truncated
    assert decode_payload(b"21.5") is None                 # text is never a map
    assert decode_payload(cbor2.dumps({1: 2})) is None     # non-text keys


def _msg(payload: bytes) -> Message:
    return Message(seq=5, epoch=1, time=1_700_000_000_000_000_000, producer="pi", producer_seq=9,
                   topic="sensors/t", payload=payload)


def test_format_message_decodes_cbor_and_raw_keeps_base64():
    p = encode_health(Health(device="w", state="failing", failures=2, error="gone", time=1))
    d = json.loads(format_message(_msg(p), "jsonl"))
    assert d["data"]["state"] == "failing" and "payload" in d   # jsonl always keeps the raw bytes
    r = json.loads(format_message(_msg(p), "jsonl", raw=True))
    assert base64.b64decode(r["payload"]) == p and "data" not in r
    t = format_message(_msg(p), "text")
    assert '"state":"failing"' in t
    assert format_message(_msg(b"21.5"), "text").endswith("21.5")       # text unchanged
    assert json.loads(format_message(_msg(b"21.5"), "jsonl"))["payload"] == "MjEuNQ=="
