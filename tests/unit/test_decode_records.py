"""decode_records (the plant's hot path for BATCH and REPLAY_CHUNK bodies) against a
plain reference decoder: every valid list of records is decoded exactly, and every
list with a defect anywhere (not only in the first record) is rejected with
RemoteProtocolError, never mis-decoded. Fixtures and strategies come from
test_envelope."""

from __future__ import annotations

import gc

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orbcast.envelope import (
    MAX_BATCH_RECORDS,
    MAX_SEQ,
    Message,
    array_head,
    decode_records,
    encode_record,
)
from orbcast.errors import RemoteProtocolError
from tests.unit.test_envelope import MSG3, MSG4, REC3, REC4, cbor_values, records, uints

# --- decode_records against a plain reference ------------------------------------------

_FIELD_TYPES = [int, int, int, str, int, str, bytes]


def reference_decode_records(body: bytes) -> list[Message] | None:
    """What decode_records must do, written the obvious way; None means "reject"."""
    try:
        items = cbor2.loads(body)
    except Exception:  # noqa: BLE001 - cbor2 raises many types on garbage: all mean "reject"
        return None
    if type(items) is not list or len(items) > MAX_BATCH_RECORDS:
        return None
    out, prev = [], 0
    for r in items:
        if type(r) is not list or len(r) != 7 or [type(x) for x in r] != _FIELD_TYPES:
            return None
        if not all(0 <= r[k] <= MAX_SEQ for k in (0, 1, 2, 4)) or r[0] <= prev:
            return None
        prev = r[0]
        out.append(Message(*r))
    return out


def _mutate(data: st.DataObject, recs: list[list]) -> object:
    """One plausible defect in a list of valid records (or none)."""
    how = data.draw(st.sampled_from(["none", "field", "int-edge", "shape", "order", "container"]))
    if not recs or how == "none":
        return recs
    i = data.draw(st.integers(0, len(recs) - 1))
    if how == "field":
        recs[i][data.draw(st.integers(0, 6))] = data.draw(st.booleans() | cbor_values | uints)
    elif how == "int-edge":
        recs[i][data.draw(st.sampled_from([0, 1, 2, 4]))] = data.draw(st.sampled_from(
            [-1, 0, 1, True, False, MAX_SEQ, MAX_SEQ + 1, 2**64 - 1, 2**64, -(2**63), 1.0]))
    elif how == "shape":
        recs[i] = recs[i][:data.draw(st.integers(0, 6))] if data.draw(st.booleans()) \
            else recs[i] + [data.draw(cbor_values)]
    elif how == "order":
        j = data.draw(st.integers(0, len(recs) - 1))
        recs[i][0] = recs[j][0] + data.draw(st.integers(-1, 1))
    else:   # a record that is a map, a 7-character string, a 7-byte string, a tagged array
        r = recs[i]
        keyed = dict(zip(r, range(7))) if all(isinstance(x, (int, str, bytes)) for x in r) else {}
        recs[i] = [keyed, "abcdefg", b"abcdefg", cbor2.CBORTag(4000, r)][data.draw(st.integers(0, 3))]
    return recs


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_decode_records_agrees_with_the_reference(data: st.DataObject) -> None:
    """Valid lists of records with at most one defect, encoded by a generic encoder
    (minimal-width integers) or spliced from encode_record: decode_records returns
    exactly what the reference returns, or rejects exactly when it rejects."""
    rs = data.draw(st.lists(records, max_size=6))
    rs = sorted({r[0]: r for r in rs}.values())               # distinct, increasing seqs
    value = _mutate(data, [list(r) for r in rs])
    if value == [list(r) for r in rs] and data.draw(st.booleans()):
        body = array_head(len(rs)) + b"".join(encode_record(*r) for r in rs)
    else:
        body = cbor2.dumps(value)
    want = reference_decode_records(body)
    try:
        got = decode_records(body)
    except RemoteProtocolError:
        assert want is None, want
        return
    assert got == want
    assert all(type(m) is Message for m in got)
    assert [type(x) for m in got for x in m] == _FIELD_TYPES * len(got)


def test_every_prefix_of_a_multi_record_chunk_is_rejected() -> None:
    """A chunk body cut anywhere (also between records) is rejected, never read as
    fewer records."""
    body = array_head(3) + REC3 + REC4 + encode_record(5, 1, 1, "p", 1, "t", b"\x00" * 30)
    assert len(decode_records(body)) == 3
    for i in range(len(body)):
        with pytest.raises(RemoteProtocolError):
            decode_records(body[:i])


@pytest.mark.parametrize("value", [
    [[1, 1, 1, "p", 1, "t", b""], [2, 1, 1, "p", 1, "t"]],           # second record short
    [[1, 1, 1, "p", 1, "t", b""], {2: 0, 1: 1, 3: 2, "p": 3, 4: 4, "t": 5, b"": 6}],
    [[1, 1, 1, "p", 1, "t", b""], "abcdefg"],
    [[1, 1, 1, "p", 1, "t", b""], [2, -1, 1, "p", 1, "t", b""]],      # negative epoch
    [[1, 1, 1, "p", 1, "t", b""], [2, 1, 1, "p", MAX_SEQ + 1, "t", b""]],
    [[1, 1, 1, "p", 1, "t", b""], [2, 1, 2**64 - 1, "p", 1, "t", b""]],
    [[1, 1, 1, "p", 1, "t", b""], [2, 1, 1, "p", False, "t", b""]],   # a bool is not an int
    [[2, 1, 1, "p", 1, "t", b""], [2, 1, 1, "p", 1, "t", b""]],       # repeated seq
])
def test_decode_records_refuses_a_bad_record_after_a_good_one(value: object) -> None:
    """The record-type check runs over the whole array, the others per record: a
    defect in any record (not only the first) rejects the whole body."""
    body = cbor2.dumps(value)
    assert reference_decode_records(body) is None
    with pytest.raises(RemoteProtocolError):
        decode_records(body)


@pytest.mark.parametrize("enabled", [True, False])
def test_decode_records_leaves_the_gc_as_it_found_it(enabled: bool) -> None:
    """decode_records pauses the cyclic GC for its own call only: enabled or
    disabled before, the same after, on success and on rejection."""
    good = array_head(2) + REC3 + REC4
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        assert decode_records(good) == [MSG3, MSG4]
        assert gc.isenabled() is enabled
        with pytest.raises(RemoteProtocolError):
            decode_records(good[:-1])
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


# --- record_topic (replay filtering) against its straightforward form ---------------------

def reference_record_topic(body: bytes) -> str | None:
    """The topic by generic CBOR head parsing (the previous implementation); None
    where record_topic must fall back to a full decode."""
    from orbcast.envelope import _skip_text, _text_len
    try:
        if body[0] == 0x87 and body[1] == 0x1B and body[10] == 0x1B and body[19] == 0x1B:
            pos = _skip_text(body, 28)
            if body[pos] == 0x1B:
                pos += 9
                b0 = body[pos]
                n, pos = _text_len(body, pos)
                if b0 >> 5 == 3:
                    return body[pos:pos + n].decode("utf-8")
    except (IndexError, UnicodeDecodeError):
        pass
    return None


_record_bodies = records.map(lambda r: encode_record(*r))


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_record_topic_matches_the_generic_head_parser(data: st.DataObject) -> None:
    """Valid records (every head width of producer id and topic), and the same with a
    byte changed or cut short: the inline fast path returns what the generic parser
    returns, and falls back (full decode, or RemoteProtocolError) where it did."""
    from orbcast.envelope import decode_record, record_topic
    body = bytearray(data.draw(_record_bodies))
    how = data.draw(st.sampled_from(["as is", "flip", "cut"]))
    if how == "flip":
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    elif how == "cut":
        del body[data.draw(st.integers(0, len(body))):]
    b = bytes(body)
    want = reference_record_topic(b)
    if want is None:
        try:
            want = decode_record(b).topic
        except RemoteProtocolError:
            with pytest.raises(RemoteProtocolError):
                record_topic(b)
            return
    assert record_topic(b) == want


@pytest.mark.parametrize("pid_len", [1, 23, 24, 64])
@pytest.mark.parametrize("topic", ["t", "x" * 23, "x" * 24, "x" * 255, "x" * 256, "é" * 128])
def test_record_topic_at_every_head_width(pid_len: int, topic: str) -> None:
    from orbcast.envelope import record_topic
    body = encode_record(5, 1, 2, "p" * pid_len, 3, topic, b"payload")
    assert record_topic(body) == topic == reference_record_topic(body)
