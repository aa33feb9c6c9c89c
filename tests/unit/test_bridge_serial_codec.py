"""The serial framing codec: COBS, CRC, CBOR records; no I/O."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.serial_link import (
    HELLO,
    MAX_WIRE_FRAME,
    PUB,
    SET,
    Dropped,
    FrameDecoder,
    Record,
    cobs_decode,
    cobs_encode,
    encode_frame,
)

# (record, exact wire bytes) - the example in docs/firmware-serial.md
CASES = [
    (Record(kind=PUB, topic="temp", value=21.5, unit="C"),
     bytes.fromhex("0c84016474656d70fb40358001010101076143d1333cd500")),
]


@pytest.mark.parametrize("rec,wire", CASES)
def test_known_frames_both_ways(rec, wire):
    assert encode_frame(rec) == wire
    assert FrameDecoder().feed(wire) == [rec]


@given(st.binary(max_size=700))
def test_cobs_round_trip_has_no_zero(data):
    enc = cobs_encode(data)
    assert 0 not in enc
    assert cobs_decode(enc) == data


records = st.builds(
    Record, kind=st.sampled_from([PUB, SET, HELLO]), topic=st.text(min_size=1, max_size=40),
    value=st.one_of(st.none(), st.booleans(), st.integers(-2**31, 2**31), st.floats(allow_nan=False,
                    allow_infinity=False), st.text(max_size=20)),
    unit=st.one_of(st.none(), st.text(max_size=16)))


@given(st.lists(records, max_size=5), st.integers(1, 7))
def test_any_chunking_decodes_the_same(recs, step):
    wire = b"".join(encode_frame(r) for r in recs)
    dec = FrameDecoder()
    out = []
    for i in range(0, len(wire), step):
        out += dec.feed(wire[i:i + step])
    assert out == recs and dec.pending == 0


def test_every_prefix_is_incomplete_never_misdecoded():
    wire = encode_frame(Record(kind=SET, topic="actuators/fan", value=True))
    for i in range(len(wire)):
        assert FrameDecoder().feed(wire[:i]) == []


def test_bad_crc_dropped_and_next_frame_survives():
    good = encode_frame(Record(kind=PUB, topic="a", value=1))
    body = bytearray(cobs_decode(good[:-1]))
    body[3] ^= 0x01                                   # flip one bit of the CBOR body
    bad = cobs_encode(bytes(body)) + b"\x00"
    assert FrameDecoder().feed(bad + good) == [Dropped("crc"), Record(kind=PUB, topic="a", value=1)]


@pytest.mark.parametrize("body,reason", [
    (b"\xff\xff", "cbor"),                            # valid CRC over garbage
    (b"\x82\x01\x61a", "shape"),                      # two items
    (b"\x83\x09\x61a\x01", "shape"),                  # unknown kind
    (b"\x83\x01\x60\x01", "shape"),                   # empty topic
])
def test_well_checksummed_nonsense_is_dropped(body, reason):
    frame = cobs_encode(body + zlib.crc32(body).to_bytes(4, "big")) + b"\x00"
    assert FrameDecoder().feed(frame) == [Dropped(reason)]


def test_overlong_frame_dropped_up_to_the_delimiter():
    good = encode_frame(Record(kind=PUB, topic="a", value=2))
    noise = b"\x01" * (MAX_WIRE_FRAME + 10)
    dec = FrameDecoder()
    assert dec.feed(noise) == [Dropped("too-long")]
    assert dec.pending == 0
    assert dec.feed(b"\x01\x02\x00" + good) == [Record(kind=PUB, topic="a", value=2)]


def test_resync_after_starting_mid_frame_and_empty_frames_ignored():
    good = encode_frame(Record(kind=HELLO, topic="fw", value="1.2"))
    dec = FrameDecoder()
    out = dec.feed(good[5:] + b"\x00\x00" + good)
    assert out[-1] == Record(kind=HELLO, topic="fw", value="1.2")
    assert all(isinstance(e, Dropped) for e in out[:-1])


def test_oversized_record_refused_by_encoder():
    with pytest.raises(ValueError):
        encode_frame(Record(kind=PUB, topic="t" * 300, value=1))
