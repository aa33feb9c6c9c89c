"""Strict decoding of what peers send (docs/protocol.md 1.6, Appendix A.3).

Every decoder that reads a peer's bytes -- the envelope (requests, replies,
batches, record bodies), the link layer's cleartext heads and the peer link
between nodes -- takes exactly one CBOR item spanning the frame. Trailing
bytes are refused with any cbor2; indefinite lengths, duplicate map keys and
tags are refused where cbor2 has the switches for them (6 and newer), and on
cbor2 5.x decode to what their plain form means, as the module documents.
"""

from __future__ import annotations

import cbor2
import pytest

from orbcast import envelope as env
from orbcast import link as L
from orbcast import strictcbor
from orbcast.envelope import (
    Batch,
    Hello,
    Publish,
    decode,
    decode_records,
    encode,
    encode_record,
)
from orbcast.errors import AuthenticationError, RemoteProtocolError
from sequencer import peer

T = 1767225600123456789
REC = encode_record(41, 1, T, "kitchen", 6, "sensors/kitchen/temp", b"21.4")
VALID = [
    encode(Hello(rid=1, client="c")),
    encode(Publish(rid=2, producer="kitchen", items=((7, "sensors/kitchen/temp", b"21.5"),))),
    encode(Batch(epoch=1, first_seq=41, last_seq=41, records=b"\x81" + REC)),
]


@pytest.mark.parametrize("frames", VALID, ids=["hello", "publish", "batch"])
@pytest.mark.parametrize("which", [0, 1], ids=["head", "body"])
@pytest.mark.parametrize("extra", [b"\x00", b"\xf6", b"\x81\x01", REC])
def test_bytes_after_the_item_are_refused(frames: list[bytes], which: int, extra: bytes) -> None:
    decode(frames)                                   # the frame itself is fine
    bad = list(frames)
    bad[which] = bad[which] + extra
    with pytest.raises(RemoteProtocolError, match="malformed CBOR: .*bytes after") as ei:
        ev = decode(bad)
        if isinstance(ev, Batch):     # records are decoded by who consumes them
            decode_records(ev.records)
    assert ei.value.code == "bad-frame"


def test_a_record_batch_with_trailing_bytes_is_refused() -> None:
    assert [m.seq for m in decode_records(b"\x81" + REC)] == [41]
    with pytest.raises(RemoteProtocolError, match="bytes after"):
        decode_records(b"\x81" + REC + b"\x00")


def test_strict_loads_takes_exactly_one_item() -> None:
    assert strictcbor.loads(b"\x82\x01\x02") == [1, 2]
    for b in (b"", b"\x82\x01", b"\x01\x02", b"\xff", b"\x1b\x00"):
        with pytest.raises(ValueError):
            strictcbor.loads(b)


# Each case: (what, the lenient encoding, the value it means). cbor2 5.x has
# no switches for these: there the strict loader must give exactly that value.
LENIENT = [
    ("indefinite array", bytes.fromhex("9f0102ff"), [1, 2]),
    ("indefinite text", bytes.fromhex("7f61616162ff"), "ab"),
    ("indefinite bytes", bytes.fromhex("5f41014102ff"), b"\x01\x02"),
    ("indefinite map", bytes.fromhex("bf616101ff"), {"a": 1}),
    ("duplicate map key", bytes.fromhex("a2616101616102"), {"a": 2}),
    ("bignum 1", bytes.fromhex("c24101"), 1),
    ("self-described CBOR", bytes.fromhex("d9d9f701"), 1),
]


@pytest.mark.parametrize("what,data,value", LENIENT, ids=[c[0] for c in LENIENT])
def test_lenient_forms_are_refused_where_cbor2_can(what: str, data: bytes, value: object) -> None:
    assert cbor2.loads(data) == value                  # what a lenient decoder makes of it
    if strictcbor.STRICT:
        with pytest.raises(ValueError):
            strictcbor.loads(data)
    else:
        assert strictcbor.loads(data) == value


@pytest.mark.parametrize("tag", [0, 1, 24, 25, 28, 29, 37, 256, 258, 1004, 40000])
def test_every_tag_is_refused(tag: int) -> None:
    data = cbor2.dumps(cbor2.CBORTag(tag, 1))
    try:
        lenient = cbor2.loads(data)
    except Exception:                          # noqa: BLE001 - e.g. tag 0 wants a string
        lenient = None
    # cbor2 5.x refuses only the tags it has no decoder for (and what fails anyway)
    if strictcbor.STRICT or lenient is None or isinstance(lenient, cbor2.CBORTag):
        with pytest.raises(ValueError):
            strictcbor.loads(data)
    else:
        assert strictcbor.loads(data) == lenient


def test_a_publish_with_an_indefinite_item_list_is_refused() -> None:
    head, body = encode(Publish(rid=2, producer="kitchen",
                                items=((7, "sensors/kitchen/temp", b"21.5"),)))
    items = cbor2.loads(body)[1]
    indef = b"\x82" + cbor2.dumps("kitchen") + b"\x9f" + b"".join(map(cbor2.dumps, items)) + b"\xff"
    if strictcbor.STRICT:
        with pytest.raises(RemoteProtocolError, match="indefinite"):
            decode([head, indef])
    else:
        assert decode([head, indef]) == decode([head, body])


def test_a_hello_with_a_bignum_rid_or_a_duplicate_key_is_refused() -> None:
    bignum_rid = bytes.fromhex("8301 01 c24101".replace(" ", ""))     # [1, 1, bignum(1)]
    dup = bytes.fromhex("a2 66636c69656e7461 61 66636c69656e7461 62".replace(" ", ""))
    assert cbor2.loads(dup) == {"client": "b"}                        # cbor2 alone: last wins
    for frames in ([bignum_rid, b"\xa0"], [cbor2.dumps([1, 1, 1]), dup]):
        if strictcbor.STRICT:
            with pytest.raises(RemoteProtocolError):
                env.decode(frames)


def test_link_heads_with_trailing_bytes_fail_authentication() -> None:
    head = cbor2.dumps([1, L.LINK_HELLO, 5])
    assert L.outer_kind([head, b"\xa0"]) == L.LINK_HELLO
    with pytest.raises(AuthenticationError):
        L.outer_kind([head + b"\x00", b"\xa0"])


# --- the peer link between nodes ------------------------------------------------

HB = peer.PeerHeartbeat(epoch=3, last_seq=41, node="seq-a", role="active",
                        ingress="tcp://127.0.0.1:7400", egress="tcp://127.0.0.1:7401",
                        in_sync=True, epochs=((1, 1), (3, 40)), time=T)


def test_peer_messages_round_trip() -> None:
    assert peer.decode_peer(peer.encode_heartbeat(HB)) == HB
    recs = [(41, T, REC), (42, T + 1, REC)]
    r = peer.decode_peer(peer.encode_repl(3, recs))
    assert (r.epoch, r.first_seq, r.last_seq, r.records) == (3, 41, 42, recs)
    assert peer.decode_peer(peer.encode_ack(3, 42)) == peer.ReplAck(3, 42)


def test_a_history_whose_epoch_starts_below_the_one_before_is_a_real_history() -> None:
    """A standby whose log ended at 80, having adopted [[1, 1], [3, 101]], promoted by
    an operator: [4, 81] follows. Its peer must still hear its heartbeats."""
    import dataclasses
    hb = dataclasses.replace(HB, epoch=4, epochs=((1, 1), (3, 101), (4, 81)))
    assert peer.decode_peer(peer.encode_heartbeat(hb)) == hb


@pytest.mark.parametrize("frames", [
    peer.encode_heartbeat(HB), peer.encode_repl(3, [(41, T, REC)]), peer.encode_ack(3, 41)],
    ids=["heartbeat", "repl", "ack"])
def test_every_proper_prefix_and_any_trailing_byte_of_a_peer_message_is_refused(
        frames: list[bytes]) -> None:
    for which in (0, 1):
        for cut in range(len(frames[which])):
            bad = list(frames)
            bad[which] = frames[which][:cut]
            with pytest.raises(RemoteProtocolError):
                peer.decode_peer(bad)
        bad = list(frames)
        bad[which] = frames[which] + b"\xa0"
        with pytest.raises(RemoteProtocolError):
            peer.decode_peer(bad)


def test_the_peer_link_wants_the_integer_version_and_an_ack_body_that_is_a_map() -> None:
    head, body = peer.encode_ack(3, 41)
    with pytest.raises(RemoteProtocolError, match="bad peer head"):
        peer.decode_peer([cbor2.dumps([True, peer.REPL_ACK, 3, 41]), body])
    for not_a_map in (b"\x80", b"\x01", b"\xf6"):
        with pytest.raises(RemoteProtocolError, match="ack body"):
            peer.decode_peer([head, not_a_map])
