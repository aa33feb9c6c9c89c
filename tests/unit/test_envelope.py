"""Tests of orbcast.envelope: the frame codec and the canonical record encoding.

The table below freezes the wire format: every message kind with its exact frames
written out in hex (checked once by hand against RFC 8949, see the comments), tested
in both directions. Then every strict prefix of every frame, random garbage, random
CBOR values of the wrong shape, and the size limits. Decoding must only ever return a
well-formed event or raise RemoteProtocolError (STYLE.md section 3, DESIGN.md
invariant 6).
"""

from __future__ import annotations

import dataclasses

import cbor2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orbcast import envelope as env
from orbcast.envelope import (
    MAX_BATCH_RECORDS,
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_PUBLISH_ITEMS,
    MAX_SEQ,
    MAX_TEXT_BYTES,
    MAX_TOPIC_BYTES,
    Ack,
    Admin,
    Batch,
    Cancel,
    Credit,
    Error,
    Heartbeat,
    Hello,
    Kind,
    Message,
    Ping,
    Pong,
    Publish,
    ReplayChunk,
    ReplayRequest,
    StatusReply,
    StatusRequest,
    Welcome,
    array_head,
    batch_frames,
    chunk_frames,
    decode,
    decode_head,
    decode_record,
    decode_records,
    encode,
    encode_record,
    record_topic,
)
from orbcast.errors import FrameTooLarge, LocalProtocolError, OrbcastError, RemoteProtocolError

EVENT_TYPES = (Hello, Welcome, Publish, Ack, ReplayRequest, Credit, Cancel, ReplayChunk,
               StatusRequest, StatusReply, Ping, Pong, Error, Batch, Heartbeat, Admin)
#: Kinds whose body is not decoded by decode(): the records are decoded lazily.
LAZY = (Batch, ReplayChunk)

# --- frozen records ------------------------------------------------------------------
# 87                       array(7)
# 1b 0000000000000003      seq 3      (always u64: fixed width, see encode_record)
# 1b 0000000000000001      epoch 1
# 1b 00000000000003e8      time 1000
# 62 7031                  text(2) "p1"
# 1b 0000000000000007      producer_seq 7
# 63 742f61                text(3) "t/a"
# 41 ff                    bytes(1) ff
REC3_HEX = ("87" "1b0000000000000003" "1b0000000000000001" "1b00000000000003e8"
            "627031" "1b0000000000000007" "63742f61" "41ff")
REC3 = bytes.fromhex(REC3_HEX)
MSG3 = Message(3, 1, 1000, "p1", 7, "t/a", b"\xff")
# seq 4, time 1001, pseq 8, topic "ü" (c3 bc, 2 bytes), empty payload (40)
REC4_HEX = ("87" "1b0000000000000004" "1b0000000000000001" "1b00000000000003e9"
            "627031" "1b0000000000000008" "62c3bc" "40")
REC4 = bytes.fromhex(REC4_HEX)
MSG4 = Message(4, 1, 1001, "p1", 8, "ü", b"")

# --- the codec table: (event, head hex, body hex) -------------------------------------
# Heads are CBOR arrays [version=1, kind, *fields]; kinds >= 24 need a one-byte
# argument (18 1f = 31, 18 20 = 32, 18 21 = 33). Map keys keep the encoder's order.
CASES: list[tuple[object, str, str]] = [
    # 83 [1, 1 HELLO, rid 1]; a1 {66 "client": 63 "cli"}
    (Hello(rid=1, client="cli"), "83010101", "a1" "66636c69656e74" "63636c69"),
    # vote and epoch are sent only when set: 64 "vote" f5 true, 65 "epoch" 04
    (Hello(rid=3, vote=True, epoch=4), "83010103",
     "a3" "66636c69656e74" "60" "64766f7465" "f5" "6565706f6368" "04"),
    # 83 [1, 16 WELCOME, rid 2]; a(10) map, peer_* null (f6), heartbeat_ms 18 64 = 100,
    # max_body 1a 00100000 = 1 MiB
    (Welcome(rid=2, node="a", role="active", epoch=3, first_seq=1, last_seq=9, egress="tcp://h:1"),
     "83011002",
     "aa" "646e6f6465" "6161" "64726f6c65" "66616374697665" "6565706f6368" "03"
     "6966697273745f736571" "01" "686c6173745f736571" "09" "66656772657373" "697463703a2f2f683a31"
     "6c706565725f696e6772657373" "f6" "6b706565725f656772657373" "f6"
     "6c6865617274626561745f6d73" "1864" "686d61785f626f6479" "1a00100000"),
    # failover_ms only when non-zero: map(11), 6b "failover_ms" 19 01f4 = 500
    (Welcome(rid=2, node="a", role="active", epoch=3, first_seq=1, last_seq=9, egress="tcp://h:1",
             failover_ms=500),
     "83011002",
     "ab" "646e6f6465" "6161" "64726f6c65" "66616374697665" "6565706f6368" "03"
     "6966697273745f736571" "01" "686c6173745f736571" "09" "66656772657373" "697463703a2f2f683a31"
     "6c706565725f696e6772657373" "f6" "6b706565725f656772657373" "f6"
     "6c6865617274626561745f6d73" "1864" "686d61785f626f6479" "1a00100000"
     "6b6661696c6f7665725f6d73" "1901f4"),
    # 83 [1, 2 PUBLISH, rid 7]; 82 [62 "p1", 82 [83 [1, "t/a", 42 0001], 83 [2, "ü", 40]]]
    (Publish(rid=7, producer="p1", items=((1, "t/a", b"\x00\x01"), (2, "ü", b""))),
     "83010207", "82" "627031" "82" "83" "01" "63742f61" "420001" "83" "02" "62c3bc" "40"),
    # 84 [1, 17 ACK, rid 19 01f4 = 500, epoch 2]; 84 [1, 10, 2, 11]
    (Ack(rid=500, epoch=2, pairs=(1, 10, 2, 11)), "8401111901f402", "84010a020b"),
    # 83 [1, 3 REPLAY, rid 5]; a7 {from 3, to 9, since null, until null, topic "s/",
    # credit 2, max_records 18 64}
    (ReplayRequest(rid=5, from_seq=3, to_seq=9, topic="s/", credit=2, max_records=100),
     "83010305",
     "a7" "6466726f6d" "03" "62746f" "09" "6573696e6365" "f6" "65756e74696c" "f6"
     "65746f706963" "62732f" "66637265646974" "02" "6b6d61785f7265636f726473" "1864"),
    (Credit(rid=5, credit=3), "83010405", "a1" "66637265646974" "03"),
    (Cancel(rid=5), "83010505", "a0"),
    # 88 [1, 18 REPLAY_CHUNK, rid 5, epoch 1, start 3, next 5, last 9, f4 false];
    # body: 82 array(2) + the two frozen records spliced in
    (ReplayChunk(rid=5, epoch=1, start_seq=3, next_seq=5, last_seq=9, done=False,
                 records=bytes.fromhex("82" + REC3_HEX + REC4_HEX)),
     "8801120501030509f4", "82" + REC3_HEX + REC4_HEX),
    (ReplayChunk(rid=6, epoch=2, start_seq=10, next_seq=10, last_seq=9, done=True),
     "88011206020a0a09f5", "80"),   # done = f5 true, no records: 80 empty array
    (StatusRequest(rid=6), "83010606", "a0"),
    (StatusReply(rid=6, info={"role": "active", "n": 9}),
     "83011306", "a2" "64726f6c65" "66616374697665" "616e" "09"),
    (Ping(rid=8), "83010708", "a0"),
    (Pong(rid=8, epoch=1, last_seq=9, role="active"),
     "83011408", "a3" "6565706f6368" "01" "686c6173745f736571" "09" "64726f6c65" "66616374697665"),
    (Error(rid=9, code="gone", message="old", first_available=4),
     "8301181f09",
     "a3" "64636f6465" "64676f6e65" "676d657373616765" "636f6c64" "6f66697273745f617661696c61626c65" "04"),
    # first_available omitted entirely when None; empty text is 60
    (Error(rid=0, code="busy", message=""), "8301181f00",
     "a2" "64636f6465" "6462757379" "676d657373616765" "60"),
    # 85 [1, 32 BATCH, epoch 1, first 3, last 3]; 81 array(1) + frozen record
    (Batch(epoch=1, first_seq=3, last_seq=3, records=bytes.fromhex("81" + REC3_HEX)),
     "85011820010303", "81" + REC3_HEX),
    # 84 [1, 33 HEARTBEAT, epoch 1, last 9]; time 1.7e18 = 0x17979cfe362a0000 (u64, 1b)
    (Heartbeat(epoch=1, last_seq=9, node="n1", role="active", time=1_700_000_000_000_000_000),
     "840118210109",
     "a3" "646e6f6465" "626e31" "64726f6c65" "66616374697665" "6474696d65" "1b17979cfe362a0000"),
    # ingress only when known: 67 "ingress" 69 "tcp://h:2"
    (Heartbeat(epoch=2, last_seq=0, node="n1", role="standby", time=0, ingress="tcp://h:2"),
     "840118210200",
     "a4" "646e6f6465" "626e31" "64726f6c65" "677374616e646279" "6474696d65" "00"
     "67696e6772657373" "697463703a2f2f683a32"),
    # 83 [1, 8 ADMIN, rid 9]; a2 {67 "command": 67 "promote", 63 "arg": 0}
    (Admin(rid=9, command="promote"), "83010809", "a2" "67636f6d6d616e64" "6770726f6d6f7465" "63617267" "00"),
    (Admin(rid=10, command="fault", arg=300), "8301080a",
     "a2" "67636f6d6d616e64" "656661756c74" "63617267" "19012c"),
]
IDS = [f"{i}-{type(ev).__name__}" for i, (ev, _, _) in enumerate(CASES)]


def frames_of(head_hex: str, body_hex: str) -> list[bytes]:
    return [bytes.fromhex(head_hex), bytes.fromhex(body_hex)]


def assert_well_formed(ev: object) -> None:
    """``ev`` is an event whose constructor accepts its own fields (it validates them
    with LocalProtocolError) and which survives a round trip."""
    assert type(ev) in EVENT_TYPES
    dataclasses.replace(ev)  # type: ignore[type-var]  # re-runs __post_init__ validation
    if type(ev) is not StatusReply:  # info may hold NaN, which is not equal to itself
        assert decode(encode(ev)) == ev  # type: ignore[arg-type]


def decode_or_reject(frames: list[bytes]) -> object | None:
    """Decode; a RemoteProtocolError is fine, any other exception fails the test."""
    try:
        ev = decode(frames)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, str) and exc.code
        return None
    assert_well_formed(ev)
    return ev


# --- the table, both ways ----------------------------------------------------------------

def test_table_covers_every_kind() -> None:
    assert {type(ev) for ev, _, _ in CASES} == set(EVENT_TYPES)
    kinds = {v for k, v in vars(Kind).items() if k.isupper()}
    assert {cbor2.loads(bytes.fromhex(h))[1] for _, h, _ in CASES} == kinds


@pytest.mark.parametrize("ev,head,body", CASES, ids=IDS)
def test_encode_gives_frozen_frames(ev: object, head: str, body: str) -> None:
    assert [f.hex() for f in encode(ev)] == [head, body]  # type: ignore[arg-type]


@pytest.mark.parametrize("ev,head,body", CASES, ids=IDS)
def test_decode_frozen_frames_gives_event(ev: object, head: str, body: str) -> None:
    got = decode(frames_of(head, body))
    assert type(got) is type(ev)
    assert got == ev


#: docs/protocol.md section 2: kind numbers and the head fields after [1, kind, ...]
SPEC_KIND = {Hello: 1, Publish: 2, ReplayRequest: 3, Credit: 4, Cancel: 5, StatusRequest: 6, Ping: 7,
             Admin: 8, Welcome: 16, Ack: 17, ReplayChunk: 18, StatusReply: 19, Pong: 20, Error: 31,
             Batch: 32, Heartbeat: 33}
SPEC_HEAD = {Ack: ("rid", "epoch"),
             ReplayChunk: ("rid", "epoch", "start_seq", "next_seq", "last_seq", "done"),
             Batch: ("epoch", "first_seq", "last_seq"), Heartbeat: ("epoch", "last_seq")}


@pytest.mark.parametrize("ev,head,body", CASES, ids=IDS)
def test_frozen_heads_follow_the_documented_layout(ev: object, head: str, body: str) -> None:
    """A generic CBOR decoder reads each frozen head as the layout the protocol documents."""
    fields = SPEC_HEAD.get(type(ev), ("rid",))
    assert cbor2.loads(bytes.fromhex(head)) == [env.VERSION, SPEC_KIND[type(ev)],
                                                *(getattr(ev, f) for f in fields)]


def test_frozen_records() -> None:
    assert encode_record(3, 1, 1000, "p1", 7, "t/a", b"\xff") == REC3
    assert encode_record(4, 1, 1001, env.cbor_text("p1"), 8, env.cbor_text("ü"), b"") == REC4
    assert decode_record(REC3) == MSG3
    assert decode_record(REC4) == MSG4
    assert record_topic(REC3) == "t/a" and record_topic(REC4) == "ü"
    assert decode_records(bytes.fromhex("82" + REC3_HEX + REC4_HEX)) == [MSG3, MSG4]
    # a generic decoder agrees with the fixed-width encoding
    assert cbor2.loads(REC3) == [3, 1, 1000, "p1", 7, "t/a", b"\xff"]


def test_splicing_helpers_match_the_codec() -> None:
    batch = Batch(epoch=1, first_seq=3, last_seq=3, records=b"\x81" + REC3)
    assert batch_frames(1, 3, 3, [REC3]) == encode(batch)
    chunk = ReplayChunk(rid=5, epoch=1, start_seq=3, next_seq=5, last_seq=9, done=False,
                        records=b"\x82" + REC3 + REC4)
    assert chunk_frames(5, 1, 3, 5, 9, False, [REC3, REC4]) == encode(chunk)
    assert decode(chunk_frames(6, 2, 10, 10, 9, True, [])) == \
        ReplayChunk(rid=6, epoch=2, start_seq=10, next_seq=10, last_seq=9, done=True)


@pytest.mark.parametrize("n", [0, 1, 23, 24, 255, 256, 65535, 65536])
def test_array_head_is_standard_cbor(n: int) -> None:
    assert array_head(n) == cbor2.dumps([None] * n)[: len(array_head(n))]
    assert cbor2.loads(array_head(n) + b"\xf6" * n) == [None] * n


# --- every prefix --------------------------------------------------------------------------

@pytest.mark.parametrize("ev,head,body", CASES, ids=IDS)
def test_every_strict_prefix_of_the_head_is_rejected(ev: object, head: str, body: str) -> None:
    # A definite-length CBOR item is prefix-free: no strict prefix is a complete item.
    h, b = frames_of(head, body)
    for i in range(len(h)):
        with pytest.raises(RemoteProtocolError):
            decode([h[:i], b])


@pytest.mark.parametrize("ev,head,body", CASES, ids=IDS)
def test_every_strict_prefix_of_the_body(ev: object, head: str, body: str) -> None:
    h, b = frames_of(head, body)
    for i in range(len(b)):
        if type(ev) in LAZY:
            # BATCH and REPLAY_CHUNK bodies are carried as raw bytes and decoded later
            # by decode_records (the sequencer splices them out of its log), so the
            # envelope legitimately accepts a truncated body. The truncation must then
            # be caught where the records are decoded, and the head is untouched.
            got = decode([h, b[:i]])
            assert got == dataclasses.replace(ev, records=b[:i])  # type: ignore[type-var]
            with pytest.raises(RemoteProtocolError):
                decode_records(b[:i])
        else:
            with pytest.raises(RemoteProtocolError):
                decode([h, b[:i]])


@pytest.mark.parametrize("rec", [REC3, REC4], ids=["rec3", "rec4"])
def test_every_strict_prefix_of_a_record_is_rejected(rec: bytes) -> None:
    for i in range(len(rec)):
        with pytest.raises(RemoteProtocolError):
            decode_record(rec[:i])
        with pytest.raises(RemoteProtocolError):
            decode_records(b"\x81" + rec[:i])


# --- random garbage --------------------------------------------------------------------

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12) | st.binary(max_size=12),
    lambda kids: st.lists(kids, max_size=5)
    | st.dictionaries(st.text(max_size=12) | st.integers(-5, 5), kids, max_size=5),
    max_leaves=10,
)
KINDS = sorted({cbor2.loads(bytes.fromhex(h))[1] for _, h, _ in CASES})
ARITY = {cbor2.loads(bytes.fromhex(h))[1]: len(cbor2.loads(bytes.fromhex(h))) - 2 for _, h, _ in CASES}
uints = st.integers(0, MAX_SEQ)


@settings(max_examples=600)
@given(st.binary(max_size=300), st.binary(max_size=300))
@example(b"", b"")
@example(bytes.fromhex("83010101"), b"\xff")
@example(bytes.fromhex("83010101"), bytes.fromhex("d81ca16161d81d00"))  # a self-referencing map
def test_random_bytes_decode_or_reject(head: bytes, body: bytes) -> None:
    decode_or_reject([head, body])


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=40), max_size=5))
def test_random_frame_counts(frames: list[bytes]) -> None:
    if len(frames) != 2:
        with pytest.raises(RemoteProtocolError):
            decode(frames)
    else:
        decode_or_reject(frames)


def test_wrong_frame_count_with_valid_frames() -> None:
    h, b = frames_of(CASES[0][1], CASES[0][2])
    for frames in ([], [h], [h, b, b], [h, b, b"x", b"y"]):
        with pytest.raises(RemoteProtocolError):
            decode(frames)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_cbor_values_of_the_wrong_shape(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(KINDS) | st.integers(-3, 70))
    if data.draw(st.booleans()):   # mostly plausible heads, so bodies get exercised
        fields = data.draw(st.lists(uints, min_size=ARITY.get(kind, 1), max_size=ARITY.get(kind, 1)))
        if kind == Kind.REPLAY_CHUNK:
            fields[-1] = data.draw(st.booleans())
        if fields and data.draw(st.booleans()):   # one field of the wrong type
            fields[data.draw(st.integers(0, len(fields) - 1))] = data.draw(st.booleans() | cbor_values)
    else:
        fields = data.draw(st.lists(cbor_values | uints, max_size=8))
    version = data.draw(st.just(1) | cbor_values)
    head = cbor2.dumps([version, kind, *fields])
    body = cbor2.dumps(data.draw(cbor_values))
    decode_or_reject([head, body])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_valid_bodies_with_one_field_mutated(data: st.DataObject) -> None:
    ev, head, body = data.draw(st.sampled_from([c for c in CASES if type(c[0]) not in LAZY]))
    value = cbor2.loads(bytes.fromhex(body))
    if isinstance(value, dict):
        key = data.draw(st.sampled_from(sorted(value) + ["extra"]))
        if data.draw(st.booleans()):
            value.pop(key, None)
        else:
            value[key] = data.draw(cbor_values | uints)
    else:  # Publish / Ack bodies are arrays: replace one element somewhere
        path_val = value
        while isinstance(path_val, list) and path_val and data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(path_val) - 1))
            if isinstance(path_val[i], list) and data.draw(st.booleans()):
                path_val = path_val[i]
            else:
                path_val[i] = data.draw(cbor_values | uints)
                break
    got = decode_or_reject([bytes.fromhex(head), cbor2.dumps(value)])
    if got is not None:
        assert type(got) is type(ev)


@settings(max_examples=500)
@given(st.data())
def test_byte_flips_in_valid_frames(data: st.DataObject) -> None:
    _, head, body = data.draw(st.sampled_from(CASES))
    frames = [bytearray(bytes.fromhex(head)), bytearray(bytes.fromhex(body))]
    for _ in range(data.draw(st.integers(1, 4))):
        f = frames[data.draw(st.integers(0, 1))]
        if f:
            f[data.draw(st.integers(0, len(f) - 1))] = data.draw(st.integers(0, 255))
    decode_or_reject([bytes(frames[0]), bytes(frames[1])])


def test_deep_nesting_is_rejected_not_a_crash() -> None:
    deep = b"\x81" * 100_000 + b"\x00"
    with pytest.raises(RemoteProtocolError):
        decode([bytes.fromhex("83011306"), deep])
    with pytest.raises(RemoteProtocolError):
        decode_records(deep)


# --- sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize("ev,head,body", CASES, ids=IDS)
def test_oversized_body_is_frame_too_large(ev: object, head: str, body: str) -> None:
    with pytest.raises(FrameTooLarge) as ei:
        decode([bytes.fromhex(head), b"\x80" + b"\x00" * MAX_BODY_BYTES])
    assert ei.value.code == "too-large"
    assert (ei.value.size, ei.value.limit) == (MAX_BODY_BYTES + 1, MAX_BODY_BYTES)
    assert isinstance(ei.value, RemoteProtocolError)


def test_body_at_the_limit_is_accepted() -> None:
    body = b"\x00" * MAX_BODY_BYTES
    ev = decode([bytes.fromhex("85011820010303"), body])
    assert type(ev) is Batch and len(ev.records) == MAX_BODY_BYTES


def test_head_size_limit() -> None:
    def head_of(total: int) -> bytes:
        for n in range(total):
            h = cbor2.dumps([1, 1, 1, "x" * n])
            if len(h) == total:
                return h
        raise AssertionError(total)

    at_limit = head_of(MAX_HEAD_BYTES)
    with pytest.raises(RemoteProtocolError) as ei:   # wrong arity, but not too large
        decode([at_limit, b"\xa0"])
    assert not isinstance(ei.value, FrameTooLarge) and ei.value.code == "bad-frame"
    with pytest.raises(FrameTooLarge) as ei2:
        decode([head_of(MAX_HEAD_BYTES + 1), b"\xa0"])
    assert ei2.value.size == MAX_HEAD_BYTES + 1 and ei2.value.limit == MAX_HEAD_BYTES


def test_publish_payload_limit() -> None:
    def publish(payload: bytes) -> list[bytes]:
        return [bytes.fromhex("83010207"), cbor2.dumps(["p1", [[1, "t", payload]]])]

    ev = decode(publish(b"\x01" * MAX_PAYLOAD_BYTES))
    assert type(ev) is Publish and len(ev.items[0][2]) == MAX_PAYLOAD_BYTES
    with pytest.raises(FrameTooLarge) as ei:
        decode(publish(b"\x01" * (MAX_PAYLOAD_BYTES + 1)))
    assert ei.value.limit == MAX_PAYLOAD_BYTES and "payload" in str(ei.value)


def test_publish_item_count_limit() -> None:
    head = bytes.fromhex("83010207")
    ok = decode([head, cbor2.dumps(["p1", [[i, "t", b""] for i in range(MAX_PUBLISH_ITEMS)]])])
    assert len(ok.items) == MAX_PUBLISH_ITEMS  # type: ignore[union-attr]
    for n in (0, MAX_PUBLISH_ITEMS + 1):
        with pytest.raises(RemoteProtocolError):
            decode([head, cbor2.dumps(["p1", [[i, "t", b""] for i in range(n)]])])


def test_shared_references_cannot_amplify_a_publish() -> None:
    """CBOR value sharing (tags 28/29) would let a ~300 KB frame name 8192 payloads of
    256 KiB each: 2 GiB for the sequencer to encode. The decoder refuses it."""
    body = bytearray(b"\x82" + cbor2.dumps("p1") + b"\x99" + MAX_PUBLISH_ITEMS.to_bytes(2, "big"))
    body += b"\x83\x01\x61t" + b"\xd8\x1c" + cbor2.dumps(b"x" * MAX_PAYLOAD_BYTES)
    for i in range(2, MAX_PUBLISH_ITEMS + 1):
        body += b"\x83" + cbor2.dumps(i) + b"\x61t" + b"\xd8\x1d\x00"
    assert len(body) < MAX_BODY_BYTES
    with pytest.raises(RemoteProtocolError):
        decode([bytes.fromhex("83010207"), bytes(body)])
    # the same items written out plainly would not fit in a frame at all
    assert MAX_PUBLISH_ITEMS * MAX_PAYLOAD_BYTES > MAX_BODY_BYTES


# --- versions, kinds and head shapes ---------------------------------------------------

@pytest.mark.parametrize("head,code", [
    ([2, 1, 1], "version"),
    ([0, 1, 1], "version"),
    (["1", 1, 1], "version"),
    ([True, 1, 1], "version"),      # True == 1 in Python, but it is not the integer 1
    ([1.0, 1, 1], "version"),
    ([None, 1, 1], "version"),
    ([1, 99, 1], "unknown-kind"),
    ([1, 9, 1], "unknown-kind"),
    ([1, 15, 1], "unknown-kind"),
    ([1, 48, 1], "unknown-kind"),    # peer-link range: not on ingress
    ([1, 63, 1], "unknown-kind"),
    ([1, -1, 1], "unknown-kind"),
    ([1, "1", 1], "unknown-kind"),
    ([1, True, 1], "unknown-kind"),
    ([1, 1.0, 1], "unknown-kind"),
    ([1, None, 1], "unknown-kind"),
    ([1], "bad-frame"),
    ([], "bad-frame"),
    ({"v": 1}, "bad-frame"),
    (1, "bad-frame"),
    ([1, 1], "bad-frame"),           # HELLO head lacks its rid
    ([1, 1, 1, 1], "bad-frame"),     # one field too many
    ([1, 1, -1], "bad-frame"),
    ([1, 1, MAX_SEQ + 1], "bad-frame"),
    ([1, 1, "1"], "bad-frame"),
    ([1, 32, 1, 5, 4], "bad-frame"),  # batch last < first
])
def test_head_errors_carry_the_right_code(head: object, code: str) -> None:
    with pytest.raises(RemoteProtocolError) as ei:
        decode([cbor2.dumps(head), b"\xa0"])
    assert ei.value.code == code


@given(st.integers(-(2**64), 2**64 - 1).filter(lambda v: v != 1))   # CBOR's native ints
def test_any_other_version_is_refused_with_code_version(v: int) -> None:
    with pytest.raises(RemoteProtocolError) as ei:
        decode([cbor2.dumps([v, 1, 1]), b"\xa0"])
    assert ei.value.code == "version"


@given(st.integers(-(2**64), 2**64 - 1).filter(lambda k: k not in ARITY))
def test_any_unknown_kind_is_refused_with_code_unknown_kind(k: int) -> None:
    with pytest.raises(RemoteProtocolError) as ei:
        decode([cbor2.dumps([1, k, 1]), b"\xa0"])
    assert ei.value.code == "unknown-kind"


@pytest.mark.parametrize("head", [
    [1, 18, True, 1, 1, 1, 1, False],   # a bool is only allowed as 'done'
    [1, 18, 1, False, 1, 1, 1, False],
    [1, 18, 1, 1, 1, 1, True, True],
    [1, 18, 1, 1, 1, 1, 1, 1],          # 'done' must be a bool, not 1
    [1, 18, 1, 1, 1, 1, 1, None],
])
def test_replay_chunk_head_types(head: list[object]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode([cbor2.dumps(head), b"\x80"])


def test_decode_head_returns_fields() -> None:
    assert decode_head(bytes.fromhex("8801120501030509f4")) == [1, 18, 5, 1, 3, 5, 9, False]


# --- bodies: defaults, forward compatibility, specific refusals ---------------------------

def test_replay_request_absent_keys_take_defaults() -> None:
    assert decode([bytes.fromhex("83010305"), b"\xa0"]) == ReplayRequest(rid=5)
    assert ReplayRequest(rid=5).from_seq == 1 and ReplayRequest(rid=5).credit == 4


def test_replay_request_zero_means_the_default() -> None:
    """docs/protocol.md 2.5: a 0 for from, credit or max_records means the default;
    a 0 for since/until is a real time and is kept."""
    body = {"from": 0, "credit": 0, "max_records": 0, "since": 0, "until": 0}
    got = decode([bytes.fromhex("83010305"), cbor2.dumps(body)])
    assert got == ReplayRequest(rid=5, from_seq=1, credit=4, max_records=4096, since=0, until=0)
    null_body = {"from": None, "to": None, "topic": None, "credit": None}
    assert decode([bytes.fromhex("83010305"), cbor2.dumps(null_body)]) == ReplayRequest(rid=5)


@pytest.mark.parametrize("body", [{"credit": 65}, {"max_records": MAX_BATCH_RECORDS + 1},
                                  {"topic": "t" * 300},
                                  {"from": -1}, {"from": "1"}, {"since": 1.5}])
def test_replay_request_bad_values_are_refused(body: dict[str, object]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode([bytes.fromhex("83010305"), cbor2.dumps(body)])


@pytest.mark.parametrize("credit", [0, 65, -1, True, "2"])
def test_credit_bad_values_are_refused(credit: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode([bytes.fromhex("83010405"), cbor2.dumps({"credit": credit})])


def test_unknown_body_keys_are_ignored() -> None:
    assert decode([bytes.fromhex("83010101"), cbor2.dumps({"client": "x", "future": [1]})]) \
        == Hello(rid=1, client="x")
    assert decode([bytes.fromhex("83010505"), cbor2.dumps({"why": "bored"})]) == Cancel(rid=5)


@pytest.mark.parametrize("body", [
    ["p1"], ["p1", [], "x"], ["bad id", [[1, "t", b""]]], ["p1", [[1, "t", "text"]]],
    ["p1", [[1, "", b""]]], ["p1", [[1, "a\x00b", b""]]], ["p1", [[1, "t" * 257, b""]]],
    ["p1", [[-1, "t", b""]]], ["p1", [[1, "t"]]], ["p1", [(1, "t", b"")] * 1 + [5]],
    {"producer": "p1"}, ["", [[1, "t", b""]]], ["p" * 65, [[1, "t", b""]]],
])
def test_publish_bad_bodies_are_refused(body: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode([bytes.fromhex("83010207"), cbor2.dumps(body)])


@pytest.mark.parametrize("body", [[1], [1, -2], [1, "2"], {"1": 2}, [1, 2] * (MAX_PUBLISH_ITEMS + 1)])
def test_ack_bad_bodies_are_refused(body: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode([bytes.fromhex("8401111901f402"), cbor2.dumps(body)])


def test_text_fields_are_bounded() -> None:
    long = "x" * (MAX_TEXT_BYTES + 1)
    with pytest.raises(RemoteProtocolError):
        decode([bytes.fromhex("83010101"), cbor2.dumps({"client": long})])
    ok = "x" * MAX_TEXT_BYTES
    assert decode([bytes.fromhex("83010101"), cbor2.dumps({"client": ok})]) == Hello(rid=1, client=ok)


def test_error_message_is_truncated_on_the_wire() -> None:
    ev = Error(rid=1, code="bad-frame", message="m" * (MAX_TEXT_BYTES + 50))
    back = decode(encode(ev))
    assert back == Error(rid=1, code="bad-frame", message="m" * MAX_TEXT_BYTES)


# --- local validation ----------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: Hello(rid=-1),
    lambda: Hello(rid=True),
    lambda: Hello(rid=1, client=None),
    lambda: Hello(rid=1, vote=1),
    lambda: Hello(rid=1, epoch=-1),
    lambda: Admin(rid=1, command=None),
    lambda: Admin(rid=1, command="x", arg=-1),
    lambda: Welcome(rid=1, node="a", role="r", epoch=-1, first_seq=1, last_seq=1, egress="e"),
    lambda: Welcome(rid=1, node=1, role="r", epoch=1, first_seq=1, last_seq=1, egress="e"),
    lambda: Publish(rid=1, producer="p", items=()),
    lambda: Publish(rid=1, producer="has space", items=((1, "t", b""),)),
    lambda: Ack(rid=1, epoch=1, pairs=(1,)),
    lambda: ReplayRequest(rid=1, credit=0),
    lambda: ReplayRequest(rid=1, credit=65),
    lambda: ReplayRequest(rid=1, max_records=0),
    lambda: ReplayRequest(rid=1, to_seq=-1),
    lambda: ReplayRequest(rid=1, topic=None),
    lambda: Credit(rid=1, credit=0),
    lambda: Cancel(rid=MAX_SEQ + 1),
    lambda: ReplayChunk(rid=1, epoch=1, start_seq=1, next_seq=1, last_seq=1, done=1),
    lambda: StatusReply(rid=1, info=[]),
    lambda: Pong(rid=1, epoch=1, last_seq=1, role=None),
    lambda: Error(rid=1, code="x", message=5),
    lambda: Error(rid=1, code="x", message="m", first_available=-1),
    lambda: Batch(epoch=1, first_seq=5, last_seq=4, records=b"\x80"),
    lambda: Heartbeat(epoch=1, last_seq=1, node="n", role="r", time=-1),
])
def test_constructors_validate_with_local_protocol_error(make: object) -> None:
    with pytest.raises(LocalProtocolError):
        make()  # type: ignore[operator]


def test_encode_refuses_non_events() -> None:
    with pytest.raises(LocalProtocolError):
        encode(object())  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):   # info that CBOR cannot carry
        encode(StatusReply(rid=1, info={"x": object()}))


def test_events_are_frozen() -> None:
    ev = Ping(rid=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.rid = 2  # type: ignore[misc]


def test_check_helpers_blame_the_right_side() -> None:
    for bad in ("", "a\nb", "x" * (MAX_TOPIC_BYTES + 1), "é" * 129, 5):
        with pytest.raises(LocalProtocolError):
            env.check_topic(bad)
        with pytest.raises(RemoteProtocolError):
            env.check_topic(bad, remote=True)
    assert env.check_topic("é" * 128) == "é" * 128              # exactly 256 bytes
    assert env.check_payload(bytearray(b"ab")) == b"ab"           # local callers may pass buffers
    with pytest.raises(RemoteProtocolError):
        env.check_payload(bytearray(b"ab"), remote=True)
    with pytest.raises(LocalProtocolError):
        env.check_payload(b"x" * (MAX_PAYLOAD_BYTES + 1))
    for bad_pid in ("", "a b", "ä", "x" * 65, None):
        with pytest.raises(LocalProtocolError):
            env.check_producer_id(bad_pid)
    assert env.check_producer_id("x" * 64) == "x" * 64
    assert issubclass(RemoteProtocolError, OrbcastError) and issubclass(RemoteProtocolError, ValueError)


# --- canonical records ---------------------------------------------------------------------

producer_ids = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=64)
any_topics = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=80)
records = st.tuples(st.integers(1, MAX_SEQ), uints, uints, producer_ids, uints, any_topics,
                    st.binary(max_size=300))


@settings(max_examples=400)
@given(records)
def test_record_round_trip(r: tuple) -> None:
    body = encode_record(*r)
    assert decode_record(body) == Message(*r)
    assert record_topic(body) == r[5]
    assert cbor2.loads(body) == list(r)   # an independent decoder reads the same record


@settings(max_examples=400)
@given(records)
def test_record_topic_agrees_with_decode_record_for_any_encoding(r: tuple) -> None:
    """Records written by another encoder (minimal-width integers) take the slow path."""
    body = cbor2.dumps(list(r))
    assert decode_record(body) == Message(*r)
    assert record_topic(body) == decode_record(body).topic == r[5]


@settings(max_examples=400)
@given(st.binary(max_size=80) | records.map(lambda r: encode_record(*r)).flatmap(
    lambda b: st.integers(0, len(b)).map(lambda i: b[:i] + b"\x00" * (i % 3))))
def test_record_topic_on_garbage(body: bytes) -> None:
    """Never an exception other than RemoteProtocolError; when the whole record decodes,
    the shortcut must agree with it."""
    try:
        full = decode_record(body)
    except RemoteProtocolError:
        full = None
    try:
        topic = record_topic(body)
    except RemoteProtocolError:
        assert full is None
        return
    assert type(topic) is str
    if full is not None:
        assert topic == full.topic


TOPIC_EDGES = ["t", "x" * 23, "x" * 24, "x" * 255, "x" * MAX_TOPIC_BYTES, "é" * 128,
               "€" * 85 + "a", "传感器/厨房/温度", "😀" * 64]
PAYLOAD_EDGES = [0, 1, 23, 24, 255, 256, 65535, 65536, MAX_PAYLOAD_BYTES]


@pytest.mark.parametrize("topic", TOPIC_EDGES)
@pytest.mark.parametrize("size", PAYLOAD_EDGES)
def test_records_at_the_size_limits(topic: str, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    body = encode_record(MAX_SEQ, MAX_SEQ, MAX_SEQ, "x" * 64, MAX_SEQ, topic, payload)
    msg = Message(MAX_SEQ, MAX_SEQ, MAX_SEQ, "x" * 64, MAX_SEQ, topic, payload)
    assert decode_record(body) == msg
    assert record_topic(body) == topic
    assert decode_records(array_head(2) + encode_record(1, 0, 0, "p", 0, topic, b"") + body) \
        == [Message(1, 0, 0, "p", 0, topic, b""), msg]


def test_topic_length_heads() -> None:
    """The text head changes width at 24 and 256 bytes (RFC 8949 section 3)."""
    assert env.cbor_text("x" * 23)[:1] == b"\x77"
    assert env.cbor_text("x" * 24)[:2] == b"\x78\x18"
    assert env.cbor_text("x" * 256)[:3] == b"\x79\x01\x00"
    assert env.cbor_text("é" * 128)[:3] == b"\x79\x01\x00"


@pytest.mark.parametrize("n", [0, 1, 23, 24, 300])
def test_decode_records_round_trip(n: int) -> None:
    msgs = [Message(s, 2, 10 * s, "p", s, f"t/{s % 7}", bytes([s % 256]) * (s % 5)) for s in range(1, n + 1)]
    body = array_head(n) + b"".join(encode_record(*m) for m in msgs)
    assert decode_records(body) == msgs


@pytest.mark.parametrize("bodies", [
    [REC4, REC3],                  # decreasing
    [REC3, REC3],                  # duplicate seq
])
def test_decode_records_requires_increasing_seqs(bodies: list[bytes]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_records(array_head(len(bodies)) + b"".join(bodies))


@pytest.mark.parametrize("value", [
    {}, 5, [[0, 1, 1, "p", 1, "t", b""]], [[1, 1, 1, "p", 1, "t", "s"]], [[1, 1, 1, "p", 1, "t"]],
    [[1, 1, -1, "p", 1, "t", b""]], [[1, 1, 1, b"p", 1, "t", b""]], [[1, 1, 1, "p", 1, 7, b""]],
    [[MAX_SEQ + 1, 1, 1, "p", 1, "t", b""]], [[True, 1, 1, "p", 1, "t", b""]],
])
def test_decode_records_refuses_bad_shapes(value: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_records(cbor2.dumps(value))


def test_decode_records_limit() -> None:
    body = array_head(3) + REC3 + REC4 + encode_record(5, 1, 1, "p", 1, "t", b"")
    assert len(decode_records(body, limit=3)) == 3
    with pytest.raises(RemoteProtocolError):
        decode_records(body, limit=2)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decode_records_garbage(body: bytes) -> None:
    try:
        out = decode_records(body)
    except RemoteProtocolError:
        return
    assert all(type(m) is Message for m in out)


@settings(max_examples=200)
@given(cbor_values)
def test_decode_records_random_cbor(value: object) -> None:
    try:
        decode_records(cbor2.dumps(value))
    except RemoteProtocolError:
        pass


# --- hot-path encoders: the same bytes as the general encoder ---------------------

_PSEQS = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, env.MAX_SEQ]
_LENS = [0, 1, 23, 24, 255, 256, 65535, 65536, env.MAX_PAYLOAD_BYTES]


@pytest.mark.parametrize("pseq", _PSEQS)
@pytest.mark.parametrize("n", _LENS)
def test_publish_body_is_what_cbor2_gives(pseq: int, n: int) -> None:
    items = ((pseq, "t", b"\x01" * n), (1, "ü/" + "x" * 30, b""), (pseq, "t" * 256, b"p"))
    assert env.publish_body("p1", items) == cbor2.dumps(["p1", [list(i) for i in items]])


@given(st.lists(st.tuples(st.integers(0, env.MAX_SEQ),
                          st.text(min_size=1, max_size=20).filter(str.isprintable),
                          st.binary(max_size=300)), min_size=1, max_size=20))
def test_publish_body_matches_cbor2_for_any_items(items: list[tuple[int, str, bytes]]) -> None:
    body = env.publish_body("prod", items)
    assert body == cbor2.dumps(["prod", [list(i) for i in items]])
    ev = decode([cbor2.dumps([1, 2, 9]), body])
    assert ev == Publish(rid=9, producer="prod", items=tuple(items))


def test_encoding_a_bad_publish_is_a_local_error() -> None:
    for items in (((-1, "t", b""),), (("1", "t", b""),), ((2**64, "t", b""),), ((1, 5, b""),),
                  ((True, "t", b""),), ((1.0, "t", b""),), ((1, "t", "str"),), ((1, "t"),)):
        with pytest.raises(LocalProtocolError):
            env.encode(Publish(rid=1, producer="p", items=items))  # type: ignore[arg-type]


@pytest.mark.parametrize("n", _LENS)
def test_encode_records_equals_encode_record(n: int) -> None:
    pid = env.cbor_text("bench-p0")
    items = [(p, "a/b", b"\x02" * n) for p in _PSEQS] + [(7, "ü" * 60, b"")]
    got = env.encode_records(41, 3, 1_700_000_000_000_000_000, pid, items)
    want = [env.encode_record(41 + i, 3, 1_700_000_000_000_000_000, pid, p, t, b)
            for i, (p, t, b) in enumerate(items)]
    assert got == want
    assert [env.decode_record(b) for b in got] == [
        env.Message(41 + i, 3, 1_700_000_000_000_000_000, "bench-p0", p, t, b)
        for i, (p, t, b) in enumerate(items)]


def test_topic_cache_never_admits_an_invalid_topic() -> None:
    assert env.check_topic("a/b") == "a/b"
    assert env.check_topic("a/b", remote=True) == "a/b"     # cached: same answer
    for bad in ("", "a\x00b", "x" * (env.MAX_TOPIC_BYTES + 1), b"a/b", None):
        for remote, err in ((False, LocalProtocolError), (True, RemoteProtocolError)):
            with pytest.raises(err):
                env.check_topic(bad, remote=remote)
    for i in range(env._VALID_TOPICS_MAX + 10):               # bounded
        env.check_topic(f"t/{i}")
    assert len(env._VALID_TOPICS) <= env._VALID_TOPICS_MAX


def test_encoders_switch_packers_inside_one_frame() -> None:
    """Producer_seq widths, topics and payload lengths that change from item to
    item (the encoders pick a packer per run of equal ones)."""
    pseqs = [*range(0, 300), 65535, 65536, 65537, 2**32 - 1, 2**32, 2**32 + 1, 5, 2**40]
    items = [(p, ("a", "bb/ü", "a")[i % 3], b"\x03" * (i % 5 if i % 7 else 300))
             for i, p in enumerate(pseqs)]
    assert env.publish_body("p", items) == cbor2.dumps(["p", [list(i) for i in items]])
    pid = env.cbor_text("p")
    assert env.encode_records(9, 2, 123, pid, items) == [
        env.encode_record(9 + i, 2, 123, pid, p, t, b) for i, (p, t, b) in enumerate(items)]
