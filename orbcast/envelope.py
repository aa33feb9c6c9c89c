"""The orbcast envelope: every message kind as a small frozen value, and the
codec that turns it into ZeroMQ frames and back.

Wire shape (the full byte-level description is in docs/protocol.md)
--------------------------------------------------------------------
Every orbcast message is exactly **two ZeroMQ frames**::

    frame 0  head  CBOR array [version, kind, *cleartext fields]
    frame 1  body  CBOR item, shape fixed per kind

The *head* is small, always cleartext, and is what a link-security layer
binds as AEAD associated data; the *body* is what such a layer encrypts. A
security layer therefore wraps frame 1 without changing the envelope.

Canonical records (what the log stores and batches carry) are CBOR arrays::

    [seq, epoch, time_ns, producer_id, producer_seq, topic, payload]

encoded by :func:`encode_record` with fixed-width 64-bit integers so the hot
path can build them with ``struct`` instead of a general encoder. A batch
body is a CBOR array header followed by record encodings back to back, which
lets the sequencer splice records straight out of its log.

This module never touches sockets, clocks or files. Decoding never trusts
its input: every failure is a :class:`~orbcast.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import gc
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import cbor2

from . import strictcbor
from .errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

__all__ = [
    "VERSION", "Kind", "Message", "Hello", "Welcome", "Publish", "Ack", "ReplayRequest",
    "Credit", "Cancel", "ReplayChunk", "StatusRequest", "StatusReply", "Ping", "Pong",
    "Error", "Batch", "Heartbeat", "Admin", "encode", "decode", "encode_record", "decode_record",
    "batch_frames", "decode_records", "encode_records", "publish_body", "publish_body_of",
    "record_pair_bytes",
    "check_topic", "check_payload", "check_producer_id",
    "MAX_BODY_BYTES", "MAX_HEAD_BYTES", "MAX_PAYLOAD_BYTES", "MAX_TOPIC_BYTES",
    "MAX_PRODUCER_ID_BYTES", "MAX_PUBLISH_ITEMS", "MAX_SEQ",
]

#: Envelope version carried as the first element of every head.
VERSION = 1

# --- bounds ---------------------------------------------------------------
#: Largest body a node accepts on ingress or a plant accepts from a node.
#: 1 MiB keeps a Pi's per-frame allocation small while leaving room for a
#: few thousand coalesced readings per publish frame.
MAX_BODY_BYTES = 1 << 20
#: Heads hold a version, a kind and at most a handful of integers.
MAX_HEAD_BYTES = 256
#: One payload must fit comfortably inside one body with its envelope.
MAX_PAYLOAD_BYTES = 256 * 1024
#: Topics are short hierarchical names ("sensors/kitchen/temp").
MAX_TOPIC_BYTES = 256
#: Producer ids are names or key fingerprints, never long strings.
MAX_PRODUCER_ID_BYTES = 64
#: Items in one PUBLISH frame; bounds the ack and the work per frame.
MAX_PUBLISH_ITEMS = 8192
#: Records in one BATCH or REPLAY_CHUNK body.
MAX_BATCH_RECORDS = 16384
#: Sequence numbers, epochs and producer seqs live in unsigned 63-bit space
#: (they are written as u64 on disk; 63 bits keep every language's signed
#: 64-bit integers happy).
MAX_SEQ = (1 << 63) - 1
#: Short strings in control messages (node ids, endpoints, error messages).
MAX_TEXT_BYTES = 1024


class Kind:
    """Kind tags (frame 0, element 1). Ranges: 1-15 plant requests,
    16-31 node replies, 32-47 egress broadcast, 48-63 peer link (reserved)."""

    HELLO = 1
    PUBLISH = 2
    REPLAY = 3
    CREDIT = 4
    CANCEL = 5
    STATUS = 6
    PING = 7
    ADMIN = 8
    WELCOME = 16
    ACK = 17
    REPLAY_CHUNK = 18
    STATUS_REPLY = 19
    PONG = 20
    ERROR = 31
    BATCH = 32
    HEARTBEAT = 33


class Message(NamedTuple):
    """A canonical message as delivered to applications.

    ``time`` is the sequencer's wall clock in ns since the Unix epoch;
    ``payload`` is the producer's bytes, untouched.
    """

    seq: int
    epoch: int
    time: int
    producer: str
    producer_seq: int
    topic: str
    payload: bytes


#: Bytes a decoded :class:`Message` takes in memory beyond its record's wire
#: size (the tuple and its int, str and bytes objects: about 290 measured on
#: CPython 3.11, 64-bit); the plant's memory bounds reckon with it.
MSG_OVERHEAD = 320


def chunk_bytes(chunk_records: int, body_bytes: int = MAX_BODY_BYTES) -> int:
    """The most a replay chunk of at most ``chunk_records`` records takes in
    memory once decoded (its body is at most :data:`MAX_BODY_BYTES`)."""
    return body_bytes + chunk_records * MSG_OVERHEAD


# --- validation helpers ---------------------------------------------------

_INT_ONLY = {int}


def _is_uint(v: Any) -> bool:
    return type(v) is int and 0 <= v <= MAX_SEQ


#: Topics that passed :func:`check_topic` recently. Every message is checked
#: (by its plant and again by the node) and topics repeat, so the answer is
#: remembered; only valid topics are kept, and the set is emptied when full
#: so a stream of unique topics cannot grow it.
_VALID_TOPICS: set[str] = set()
_VALID_TOPICS_MAX = 4096


def check_topic(topic: Any, *, remote: bool = False) -> str:
    """Return ``topic`` if it is a valid topic, else raise.

    Valid: a non-empty ``str`` of at most :data:`MAX_TOPIC_BYTES` UTF-8 bytes
    with no NUL or other C0 control characters.
    """
    if type(topic) is str and topic in _VALID_TOPICS:
        return topic
    err = RemoteProtocolError if remote else LocalProtocolError
    if type(topic) is not str or not topic:
        raise err(f"topic must be a non-empty string, got {topic!r:.60}")
    if len(topic) > MAX_TOPIC_BYTES or len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise err(f"topic longer than {MAX_TOPIC_BYTES} bytes")
    if not topic.isprintable():
        raise err(f"topic contains control characters: {topic!r:.60}")
    if len(_VALID_TOPICS) >= _VALID_TOPICS_MAX:
        _VALID_TOPICS.clear()
    _VALID_TOPICS.add(topic)
    return topic


def check_payload(payload: Any, *, remote: bool = False) -> bytes:
    """Return ``payload`` as ``bytes`` if it is within :data:`MAX_PAYLOAD_BYTES`."""
    err = RemoteProtocolError if remote else LocalProtocolError
    if type(payload) is not bytes:
        if remote or not isinstance(payload, (bytes, bytearray, memoryview)):
            raise err(f"payload must be bytes, got {type(payload).__name__}")
        payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD_BYTES:
        if remote:
            raise FrameTooLarge(len(payload), MAX_PAYLOAD_BYTES, "payload")
        raise LocalProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return payload


def check_producer_id(pid: Any, *, remote: bool = False) -> str:
    """Return ``pid`` if it is a valid producer id: 1-64 printable ASCII chars
    without spaces."""
    err = RemoteProtocolError if remote else LocalProtocolError
    if (type(pid) is not str or not 0 < len(pid) <= MAX_PRODUCER_ID_BYTES
            or not pid.isascii() or not pid.isprintable() or " " in pid):
        raise err(f"producer id must be 1-{MAX_PRODUCER_ID_BYTES} printable ASCII "
                  f"characters without spaces, got {pid!r:.80}")
    return pid


def _text(v: Any, what: str, err: type[Exception], *, optional: bool = False) -> Any:
    if v is None and optional:
        return v
    if type(v) is not str or len(v) > MAX_TEXT_BYTES:
        raise err(f"{what} must be a string of at most {MAX_TEXT_BYTES} chars")
    return v


def _uint(v: Any, what: str, err: type[Exception], *, optional: bool = False) -> Any:
    if v is None and optional:
        return v
    if not _is_uint(v):
        raise err(f"{what} must be an unsigned integer < 2**63, got {v!r:.40}")
    return v


# --- events ---------------------------------------------------------------
# Each event validates itself on construction with LocalProtocolError (we
# built it wrong); the decoder validates raw input with RemoteProtocolError
# before constructing, so a decoded event is always well-formed.

_EV = dict(frozen=True, slots=True, kw_only=True)


@dataclass(**_EV)
class Hello:
    """Plant -> node: introduce yourself; answered by :class:`Welcome`."""

    rid: int
    client: str = ""
    #: The plant cannot reach the active node (the Binary Star vote).
    vote: bool = False
    #: The highest leadership epoch the plant has seen.
    epoch: int = 0

    def __post_init__(self) -> None:
        _uint(self.rid, "rid", LocalProtocolError)
        _text(self.client, "client", LocalProtocolError)
        _uint(self.epoch, "epoch", LocalProtocolError)
        if type(self.vote) is not bool:
            raise LocalProtocolError("vote must be a bool")


@dataclass(**_EV)
class Welcome:
    """Node -> plant: who the node is and where its other sockets are.

    ``egress`` is the node's PUB endpoint; ``peer_ingress`` / ``peer_egress``
    the other node's endpoints when the node knows them (hot standby).
    """

    rid: int
    node: str
    role: str
    epoch: int
    first_seq: int
    last_seq: int
    egress: str
    peer_ingress: str | None = None
    peer_egress: str | None = None
    heartbeat_ms: int = 100
    max_body: int = MAX_BODY_BYTES
    #: With a hot standby: how long the active node may be silent before
    #: plants report it unreachable to the standby (0 = single node).
    failover_ms: int = 0

    def __post_init__(self) -> None:
        e = LocalProtocolError
        for n in ("rid", "epoch", "first_seq", "last_seq", "heartbeat_ms", "max_body", "failover_ms"):
            _uint(getattr(self, n), n, e)
        for n in ("node", "role", "egress"):
            _text(getattr(self, n), n, e)
        _text(self.peer_ingress, "peer_ingress", e, optional=True)
        _text(self.peer_egress, "peer_egress", e, optional=True)


@dataclass(**_EV)
class Publish:
    """Plant -> node: aspiring messages ``(producer_seq, topic, payload)``,
    all from ``producer``. Answered by :class:`Ack` (or :class:`Error`)."""

    rid: int
    producer: str
    items: tuple[tuple[int, str, bytes], ...]

    def __post_init__(self) -> None:
        _uint(self.rid, "rid", LocalProtocolError)
        check_producer_id(self.producer)
        if not 0 < len(self.items) <= MAX_PUBLISH_ITEMS:
            raise LocalProtocolError(f"a publish carries 1-{MAX_PUBLISH_ITEMS} items")


@dataclass(**_EV)
class Ack:
    """Node -> plant: ``pairs`` maps each acked producer_seq to its seq.

    ``pairs`` is a flat tuple ``(pseq0, seq0, pseq1, seq1, ...)``. An ack
    means the record is durable (see docs/protocol.md, "What an ack means").
    """

    rid: int
    epoch: int
    pairs: tuple[int, ...]

    def __post_init__(self) -> None:
        _uint(self.rid, "rid", LocalProtocolError)
        _uint(self.epoch, "epoch", LocalProtocolError)
        if len(self.pairs) % 2:
            raise LocalProtocolError("ack pairs must have even length")


@dataclass(**_EV)
class ReplayRequest:
    """Plant -> node: stream the log from ``from_seq`` (inclusive) up to
    ``to_seq`` (inclusive, ``None`` = the end as of each chunk), optionally
    starting at the first record at or after ``since`` ns and stopping before
    ``until`` ns, keeping only topics starting with ``topic``.

    ``credit`` is how many chunks the node may send before it waits for a
    :class:`Credit`; ``max_records`` caps each chunk.
    """

    rid: int
    from_seq: int = 1
    to_seq: int | None = None
    since: int | None = None
    until: int | None = None
    topic: str = ""
    credit: int = 4
    max_records: int = 4096

    def __post_init__(self) -> None:
        e = LocalProtocolError
        _uint(self.rid, "rid", e)
        _uint(self.from_seq, "from_seq", e)
        for n in ("to_seq", "since", "until"):
            _uint(getattr(self, n), n, e, optional=True)
        if type(self.topic) is not str or len(self.topic) > MAX_TOPIC_BYTES:
            raise e("topic prefix must be a string")
        if not (type(self.credit) is int and 1 <= self.credit <= 64):
            raise e("credit must be 1..64")
        if not (type(self.max_records) is int and 1 <= self.max_records <= MAX_BATCH_RECORDS):
            raise e(f"max_records must be 1..{MAX_BATCH_RECORDS}")


@dataclass(**_EV)
class Credit:
    """Plant -> node: allow ``credit`` more chunks for replay ``rid``."""

    rid: int
    credit: int

    def __post_init__(self) -> None:
        _uint(self.rid, "rid", LocalProtocolError)
        if not (type(self.credit) is int and 1 <= self.credit <= 64):
            raise LocalProtocolError("credit must be 1..64")


@dataclass(**_EV)
class Cancel:
    """Plant -> node: forget replay ``rid``."""

    rid: int

    def __post_init__(self) -> None:
        _uint(self.rid, "rid", LocalProtocolError)


@dataclass(**_EV)
class ReplayChunk:
    """Node -> plant: records of replay ``rid``.

    Every record with ``start_seq <= seq < next_seq`` that matched the filter
    is in ``records`` (the filter may make it empty); the plant's cursor moves
    to ``next_seq``. ``done`` says the request is complete. ``last_seq`` is the
    node's newest seq when the chunk was cut. ``records`` is the raw CBOR
    array body, decoded lazily with :func:`decode_records`.
    """

    rid: int
    epoch: int
    start_seq: int
    next_seq: int
    last_seq: int
    done: bool
    records: bytes = b"\x80"

    def __post_init__(self) -> None:
        for n in ("rid", "epoch", "start_seq", "next_seq", "last_seq"):
            _uint(getattr(self, n), n, LocalProtocolError)
        if type(self.done) is not bool:
            raise LocalProtocolError("done must be a bool")


@dataclass(**_EV)
class StatusRequest:
    """Plant -> node: ask for role, positions and counters."""

    rid: int

    def __post_init__(self) -> None:
        _uint(self.rid, "rid", LocalProtocolError)


@dataclass(**_EV)
class StatusReply:
    """Node -> plant: ``info`` is a map of text keys to ints/strings/maps
    (role, epoch, last_seq, uptime_s, counters ...), see docs/protocol.md."""

    rid: int
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _uint(self.rid, "rid", LocalProtocolError)
        if type(self.info) is not dict:
            raise LocalProtocolError("info must be a dict")


@dataclass(**_EV)
class Ping:
    """Plant -> node: liveness probe, answered by :class:`Pong`."""

    rid: int

    def __post_init__(self) -> None:
        _uint(self.rid, "rid", LocalProtocolError)


@dataclass(**_EV)
class Pong:
    """Node -> plant: answer to :class:`Ping` with the node's position."""

    rid: int
    epoch: int
    last_seq: int
    role: str

    def __post_init__(self) -> None:
        for n in ("rid", "epoch", "last_seq"):
            _uint(getattr(self, n), n, LocalProtocolError)
        _text(self.role, "role", LocalProtocolError)


@dataclass(**_EV)
class Error:
    """Node -> plant: request ``rid`` failed. ``code`` is machine readable
    (see docs/protocol.md), ``message`` is for people. ``first_available``
    accompanies ``code == "gone"``."""

    rid: int
    code: str
    message: str
    first_available: int | None = None

    def __post_init__(self) -> None:
        _uint(self.rid, "rid", LocalProtocolError)
        _text(self.code, "code", LocalProtocolError)
        msg = self.message
        _text(msg[:MAX_TEXT_BYTES] if type(msg) is str else msg, "message", LocalProtocolError)
        _uint(self.first_available, "first_available", LocalProtocolError, optional=True)


@dataclass(**_EV)
class Batch:
    """Egress: canonical records ``first_seq..last_seq`` (contiguous) of
    leadership ``epoch``. ``records`` is the raw CBOR array body."""

    epoch: int
    first_seq: int
    last_seq: int
    records: bytes

    def __post_init__(self) -> None:
        for n in ("epoch", "first_seq", "last_seq"):
            _uint(getattr(self, n), n, LocalProtocolError)
        if self.last_seq < self.first_seq:
            raise LocalProtocolError("batch last_seq < first_seq")


@dataclass(**_EV)
class Heartbeat:
    """Egress: the node is alive; its newest seq is ``last_seq``."""

    epoch: int
    last_seq: int
    node: str
    role: str
    time: int
    #: The node's ingress endpoint, so plants can switch to it after a failover.
    ingress: str | None = None

    def __post_init__(self) -> None:
        for n in ("epoch", "last_seq", "time"):
            _uint(getattr(self, n), n, LocalProtocolError)
        _text(self.node, "node", LocalProtocolError)
        _text(self.role, "role", LocalProtocolError)
        _text(self.ingress, "ingress", LocalProtocolError, optional=True)


@dataclass(**_EV)
class Admin:
    """Operator -> node: ``promote``, ``demote`` (and test-only fault
    injection when the node runs with ``faults = true``). Answered by a
    :class:`StatusReply` or an :class:`Error`."""

    rid: int
    command: str
    arg: int = 0

    def __post_init__(self) -> None:
        _uint(self.rid, "rid", LocalProtocolError)
        _text(self.command, "command", LocalProtocolError)
        _uint(self.arg, "arg", LocalProtocolError)


Event = (Hello | Welcome | Publish | Ack | ReplayRequest | Credit | Cancel | ReplayChunk
         | StatusRequest | StatusReply | Ping | Pong | Error | Batch | Heartbeat | Admin)


# --- canonical records ------------------------------------------------------

_REC_HEAD = struct.Struct(">BBQBQBQ")   # 0x87, 0x1b seq, 0x1b epoch, 0x1b time
_U64 = struct.Struct(">BQ")             # 0x1b pseq
_B8 = struct.Struct(">BB")
_B16 = struct.Struct(">BH")
_B32 = struct.Struct(">BI")


def _str_head(major: int, n: int) -> bytes:
    """CBOR head for a byte/text string of length ``n`` (major 0x40 / 0x60)."""
    if n < 24:
        return bytes((major | n,))
    if n < 256:
        return _B8.pack(major | 24, n)
    if n < 65536:
        return _B16.pack(major | 25, n)
    return _B32.pack(major | 26, n)


def cbor_text(s: str) -> bytes:
    """Encode ``s`` as a CBOR text string (used to cache topic encodings)."""
    b = s.encode("utf-8")
    return _str_head(0x60, len(b)) + b


def array_head(n: int) -> bytes:
    """CBOR head of a definite-length array of ``n`` items."""
    if n < 24:
        return bytes((0x80 | n,))
    if n < 256:
        return _B8.pack(0x98, n)
    if n < 65536:
        return _B16.pack(0x99, n)
    return _B32.pack(0x9A, n)


def encode_record(seq: int, epoch: int, time: int, producer: bytes | str,
                  producer_seq: int, topic: bytes | str, payload: bytes) -> bytes:
    """Encode one canonical record.

    ``producer`` and ``topic`` may be given pre-encoded (the output of
    :func:`cbor_text`) so a hot loop can cache them. Integers are written as
    fixed-width 64-bit CBOR integers; decoders accept any integer encoding.
    """
    if type(producer) is str:
        producer = cbor_text(producer)
    if type(topic) is str:
        topic = cbor_text(topic)
    return b"".join((
        _REC_HEAD.pack(0x87, 0x1B, seq, 0x1B, epoch, 0x1B, time),
        producer,  # type: ignore[arg-type]
        _U64.pack(0x1B, producer_seq),
        topic,  # type: ignore[arg-type]
        _str_head(0x40, len(payload)),
        payload,
    ))


def record_pair_bytes(producer: str, producer_seq: int) -> bytes:
    """The bytes :func:`encode_record` writes for ``producer`` and ``producer_seq``,
    adjacent in every record body: the key the sequencer searches its log for
    (``LogStore.find``) when a resend is older than its dedup table."""
    return cbor_text(producer) + _U64.pack(0x1B, producer_seq)


#: (topic, payload length) -> encoded topic + payload head, cached by
#: :func:`publish_body`; cleared when full so it stays bounded.
_ITEM_TAILS: dict[tuple[str, int], bytes] = {}
_ITEM_TAILS_MAX = 4096


def _new_tail(topic: str, n: int) -> bytes:
    """Encode and cache the ``topic, bstr head`` tail of an item (bounded cache)."""
    if len(_ITEM_TAILS) >= _ITEM_TAILS_MAX:
        _ITEM_TAILS.clear()
    tail = _ITEM_TAILS[(topic, n)] = cbor_text(topic) + _str_head(0x40, n)
    return tail


def publish_body(producer: str, items: Sequence[tuple[int, str, bytes]]) -> bytes:
    """Frame 1 of a PUBLISH: ``[producer, [[pseq, topic, payload], ...]]``.

    The bytes are what ``cbor2.dumps`` gives for the same value (shortest
    integer and length forms), built with ``struct`` and a cache of encoded
    ``(topic, payload length)`` tails: this is every publisher's hot path,
    and a general encoder costs several times more per item. The caller has
    validated the items (a producer_seq is a uint, topics and payloads are
    :func:`check_topic` / :func:`check_payload` clean).
    """
    return publish_body_of(producer, [it[0] for it in items], [it[1:] for it in items])


def publish_body_of(producer: str, pseqs: Sequence[int],
                    entries: Sequence[tuple[str, bytes]]) -> bytes:
    """:func:`publish_body` of items ``(pseqs[i], *entries[i])``: the plant's
    outbox holds ``(topic, payload)`` tuples, so it builds no new tuple per item.

    Each item is one ``struct`` pack (item head, producer_seq, the cached topic
    and payload heads, the payload) with a packer chosen when the topic, the
    payload length or the producer_seq width changes, which in a frame of
    consecutive producer_seqs is rare.
    """
    tails = _ITEM_TAILS
    parts = [b"\x82", cbor_text(producer), array_head(len(pseqs))]
    ap = parts.append
    lt: str | None = None
    ln = -1
    lo = hi = 0                    # producer_seqs in [lo, hi) share the head width
    pack: Any = None
    ai = 0
    tail = b""
    for pseq, (topic, payload) in zip(pseqs, entries):
        n = len(payload)
        if n != ln or topic is not lt or not lo <= pseq < hi:
            tail = tails.get((topic, n)) or _new_tail(topic, n)
            lt, ln = topic, n
            if pseq < 24:                      # a producer's first 23: not cached
                lo = hi = 0
                ap(bytes((0x83, pseq)))
                ap(tail)
                ap(payload)
                continue
            ai, lo, hi, code = _PSEQ_WIDTHS[(pseq >= 0x100) + (pseq >= 0x10000)
                                            + (pseq >= 0x100000000)]
            pack = _packer(f">BB{code}{len(tail)}s{n}s")
        ap(pack(0x83, ai, pseq, tail, payload))
    return b"".join(parts)


#: (CBOR additional info, lowest, highest + 1, struct code) per producer_seq width
_PSEQ_WIDTHS = ((24, 24, 0x100, "B"), (25, 0x100, 0x10000, "H"),
                (26, 0x10000, 0x100000000, "I"), (27, 0x100000000, 1 << 64, "Q"))
#: Compiled struct packers by format for the encoders here; bounded, since
#: formats embed payload lengths.
_PACKERS: dict[str, Any] = {}
_PACKERS_MAX = 1024


def _packer(fmt: str) -> Any:
    pack = _PACKERS.get(fmt)
    if pack is None:
        if len(_PACKERS) >= _PACKERS_MAX:
            _PACKERS.clear()
        pack = _PACKERS[fmt] = struct.Struct(fmt).pack
    return pack


def encode_records(first_seq: int, epoch: int, time: int, producer: bytes,
                   items: Sequence[tuple[int, str, bytes]]) -> list[bytes]:
    """Encode the records ``first_seq, first_seq + 1, ...`` of ``items``
    ``(producer_seq, topic, payload)`` that share ``epoch``, ``time`` and the
    encoded ``producer`` (the output of :func:`cbor_text`): the new items of
    one PUBLISH frame. Each body equals what :func:`encode_record` gives; the
    shared part is packed once per call and each record is one ``struct``
    pack, with a packer chosen when the topic or payload length changes: this
    is the sequencer's per-message encoding cost.
    """
    mid = _REC_HEAD.pack(0x87, 0x1B, 0, 0x1B, epoch, 0x1B, time)[10:] + producer
    m = len(mid)
    tails = _ITEM_TAILS
    out = []
    ap = out.append
    seq = first_seq
    lt: str | None = None
    ln = -1
    pack: Any = None
    tail = b""
    for pseq, topic, payload in items:
        n = len(payload)
        if n != ln or topic is not lt:
            tail = tails.get((topic, n)) or _new_tail(topic, n)
            lt, ln = topic, n
            pack = _packer(f">BBQ{m}sBQ{len(tail)}s{n}s")
        ap(pack(0x87, 0x1B, seq, mid, 0x1B, pseq, tail, payload))
        seq += 1
    return out


def _check_record(r: Any) -> Message:
    if type(r) is not list or len(r) != 7:
        raise RemoteProtocolError("a record must be a 7-element array")
    seq, epoch, t, pid, pseq, topic, payload = r
    if not (_is_uint(seq) and seq > 0 and _is_uint(epoch) and _is_uint(t) and _is_uint(pseq)):
        raise RemoteProtocolError("record integers out of range")
    if type(pid) is not str or type(topic) is not str or type(payload) is not bytes:
        raise RemoteProtocolError("record field of the wrong type")
    return Message(seq, epoch, t, pid, pseq, topic, payload)


def decode_record(body: bytes) -> Message:
    """Decode one record encoding as stored in the log into a :class:`Message`.

    For records this node's log holds (CRC-checked, written by a node): the
    plain cbor2 decoder, without the strict one's per-call cost (about 0.5 us
    against 1.4 us per record here), since a node reads many of them one
    by one (dedup rebuild at start). Records from elsewhere go through
    :func:`decode_records`, which is strict once per array."""
    try:
        v = cbor2.loads(body)
    except RecursionError as exc:
        raise RemoteProtocolError("CBOR nested too deeply") from exc
    except Exception as exc:  # noqa: BLE001 - cbor2 raises many types on garbage
        raise RemoteProtocolError(f"malformed CBOR: {exc}") from exc
    return _check_record(v)


def decode_records(body: bytes, *, limit: int = MAX_BATCH_RECORDS) -> list[Message]:
    """Decode a batch / chunk body (a CBOR array of records).

    Records must be in strictly increasing seq order; raises
    :class:`RemoteProtocolError` otherwise, and for anything that is not an
    array of at most ``limit`` 7-element records with the field types and
    ranges of :func:`decode_record`.

    Hot path of every consumer and of replay (about half of a plant's CPU per
    record): cbor2 builds the lists, then one pass checks them with as few
    Python operations per record as possible (the record type in one C-level
    pass, the arity by unpacking, the four integers' range and sign with one
    ``|`` and one shift) and replaces each list by its :class:`Message` in
    place, so the lists die as the tuples are born and the cyclic GC is not
    triggered by thousands of both being alive at once.
    """
    # The cyclic GC would run several times per chunk (every 700 new containers)
    # and walk thousands of live record lists for nothing: none of them can form a
    # cycle. Paused for this one bounded call (at most MAX_BODY_BYTES of input);
    # the allocations still count, so a collection follows right after if due.
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return _decode_records(body, limit)
    finally:
        if paused:
            gc.enable()


def _decode_records(body: bytes, limit: int) -> list[Message]:
    items = _loads(body)
    if type(items) is not list or len(items) > limit:
        raise RemoteProtocolError("records body must be an array of at most %d records" % limit)
    if not items:
        return []
    if len(set(map(type, items))) != 1 or type(items[0]) is not list:
        raise RemoteProtocolError("a record must be a 7-element array")
    new = tuple.__new__
    prev = 0
    i = 0
    r: list[Any]
    try:
        for r in items:
            seq, epoch, t, pid, pseq, topic, payload = r      # ValueError unless 7 items
            if (type(seq) is not int or type(epoch) is not int or type(t) is not int
                    or type(pseq) is not int or type(pid) is not str or type(topic) is not str
                    or type(payload) is not bytes):
                raise RemoteProtocolError("record field of the wrong type")
            # all four are ints here: a negative one makes the | negative, one of
            # 2**63 or more leaves a bit at 63 or above; either way the shift is not 0
            if (seq | epoch | t | pseq) >> 63 or seq <= prev:
                raise RemoteProtocolError("record integers out of range or not in increasing seq order")
            prev = seq
            items[i] = new(Message, r)
            i += 1
    except RemoteProtocolError:
        raise
    except ValueError:
        raise RemoteProtocolError("a record must be a 7-element array") from None
    return items


def batch_frames(epoch: int, first_seq: int, last_seq: int, record_bodies: Sequence[bytes]) -> list[bytes]:
    """Frames of a BATCH built by splicing pre-encoded records (hot path)."""
    return [
        cbor2.dumps([VERSION, Kind.BATCH, epoch, first_seq, last_seq]),
        array_head(len(record_bodies)) + b"".join(record_bodies),
    ]


def chunk_frames(rid: int, epoch: int, start_seq: int, next_seq: int, last_seq: int,
                 done: bool, record_bodies: Sequence[bytes]) -> list[bytes]:
    """Frames of a REPLAY_CHUNK built by splicing pre-encoded records."""
    return [
        cbor2.dumps([VERSION, Kind.REPLAY_CHUNK, rid, epoch, start_seq, next_seq, last_seq, done]),
        array_head(len(record_bodies)) + b"".join(record_bodies),
    ]


# --- codec ---------------------------------------------------------------

def _loads(b: bytes) -> Any:
    """One strict CBOR item spanning ``b`` (:mod:`orbcast.strictcbor`)."""
    try:
        return strictcbor.loads(b)
    except RecursionError as exc:
        raise RemoteProtocolError("CBOR nested too deeply") from exc
    except Exception as exc:  # ValueError from the strict decoder; anything else too
        raise RemoteProtocolError(f"malformed CBOR: {exc}") from exc


def encode(ev: Event) -> list[bytes]:
    """Encode ``ev`` into its two frames ``[head, body]``."""
    t = type(ev)
    if t is Publish:
        for it in ev.items:          # publish_body trusts its caller: check here
            if not (len(it) == 3 and _is_uint(it[0])):
                raise LocalProtocolError(f"publish item must be (producer_seq, topic, payload),"
                                         f" got {it!r:.60}")
        try:
            return [cbor2.dumps([VERSION, Kind.PUBLISH, ev.rid]),
                    publish_body(ev.producer, ev.items)]
        except Exception as exc:
            raise LocalProtocolError(f"cannot encode Publish: {exc}") from exc
    if t is Ack:
        head = [VERSION, Kind.ACK, ev.rid, ev.epoch]
        body: Any = list(ev.pairs)
    elif t is Batch:
        return [cbor2.dumps([VERSION, Kind.BATCH, ev.epoch, ev.first_seq, ev.last_seq]), ev.records]
    elif t is ReplayChunk:
        return [cbor2.dumps([VERSION, Kind.REPLAY_CHUNK, ev.rid, ev.epoch, ev.start_seq,
                             ev.next_seq, ev.last_seq, ev.done]), ev.records]
    elif t is Heartbeat:
        head = [VERSION, Kind.HEARTBEAT, ev.epoch, ev.last_seq]
        body = {"node": ev.node, "role": ev.role, "time": ev.time}
        if ev.ingress is not None:
            body["ingress"] = ev.ingress
    elif t is Hello:
        head, body = [VERSION, Kind.HELLO, ev.rid], {"client": ev.client}
        if ev.vote or ev.epoch:
            body["vote"] = ev.vote
            body["epoch"] = ev.epoch
    elif t is Admin:
        head, body = [VERSION, Kind.ADMIN, ev.rid], {"command": ev.command, "arg": ev.arg}
    elif t is Welcome:
        head = [VERSION, Kind.WELCOME, ev.rid]
        body = {"node": ev.node, "role": ev.role, "epoch": ev.epoch, "first_seq": ev.first_seq,
                "last_seq": ev.last_seq, "egress": ev.egress, "peer_ingress": ev.peer_ingress,
                "peer_egress": ev.peer_egress, "heartbeat_ms": ev.heartbeat_ms,
                "max_body": ev.max_body}
        if ev.failover_ms:
            body["failover_ms"] = ev.failover_ms
    elif t is ReplayRequest:
        head = [VERSION, Kind.REPLAY, ev.rid]
        body = {"from": ev.from_seq, "to": ev.to_seq, "since": ev.since, "until": ev.until,
                "topic": ev.topic, "credit": ev.credit, "max_records": ev.max_records}
    elif t is Credit:
        head, body = [VERSION, Kind.CREDIT, ev.rid], {"credit": ev.credit}
    elif t is Cancel:
        head, body = [VERSION, Kind.CANCEL, ev.rid], {}
    elif t is StatusRequest:
        head, body = [VERSION, Kind.STATUS, ev.rid], {}
    elif t is StatusReply:
        head, body = [VERSION, Kind.STATUS_REPLY, ev.rid], ev.info
    elif t is Ping:
        head, body = [VERSION, Kind.PING, ev.rid], {}
    elif t is Pong:
        head = [VERSION, Kind.PONG, ev.rid]
        body = {"epoch": ev.epoch, "last_seq": ev.last_seq, "role": ev.role}
    elif t is Error:
        head = [VERSION, Kind.ERROR, ev.rid]
        body = {"code": ev.code, "message": ev.message[:MAX_TEXT_BYTES]}
        if ev.first_available is not None:
            body["first_available"] = ev.first_available
    else:
        raise LocalProtocolError(f"not an orbcast event: {ev!r:.80}")
    try:
        return [cbor2.dumps(head), cbor2.dumps(body)]
    except Exception as exc:
        raise LocalProtocolError(f"cannot encode {t.__name__}: {exc}") from exc


# (kind -> number of head elements after version and kind)
_HEAD_ARITY = {
    Kind.HELLO: 1, Kind.PUBLISH: 1, Kind.REPLAY: 1, Kind.CREDIT: 1, Kind.CANCEL: 1,
    Kind.STATUS: 1, Kind.PING: 1, Kind.ADMIN: 1, Kind.WELCOME: 1, Kind.ACK: 2, Kind.REPLAY_CHUNK: 6,
    Kind.STATUS_REPLY: 1, Kind.PONG: 1, Kind.ERROR: 1, Kind.BATCH: 3, Kind.HEARTBEAT: 2,
}


def decode_head(head: bytes) -> list[Any]:
    """Decode and check frame 0. Returns ``[version, kind, *fields]``."""
    if len(head) > MAX_HEAD_BYTES:
        raise FrameTooLarge(len(head), MAX_HEAD_BYTES, "head")
    h = _loads(head)
    if type(h) is not list or len(h) < 2:
        raise RemoteProtocolError("head must be an array [version, kind, ...]")
    if h[0] != VERSION or type(h[0]) is not int:
        raise RemoteProtocolError(f"unsupported envelope version {h[0]!r:.20}", code="version")
    kind = h[1]
    arity = _HEAD_ARITY.get(kind) if type(kind) is int else None
    if arity is None:
        raise RemoteProtocolError(f"unknown message kind {kind!r:.20}", code="unknown-kind")
    if len(h) != 2 + arity:
        raise RemoteProtocolError(f"kind {kind} head must have {2 + arity} elements")
    ints = h[2:7] if kind == Kind.REPLAY_CHUNK else h[2:]   # a chunk's last field is 'done'
    for v in ints:
        if not _is_uint(v):
            raise RemoteProtocolError("head fields must be unsigned integers")
    if kind == Kind.REPLAY_CHUNK and type(h[7]) is not bool:
        raise RemoteProtocolError("replay chunk 'done' must be a bool")
    return h


def _map(body: Any, keys: dict[str, tuple[Any, bool]]) -> dict[str, Any]:
    """Check a control-message map: known keys with their types; unknown
    keys are ignored (forward compatibility), missing optional keys -> default."""
    if type(body) is not dict:
        raise RemoteProtocolError("body must be a map")
    out = {}
    for k, (kind, required) in keys.items():
        v = body.get(k)
        if v is None:
            if required:
                raise RemoteProtocolError(f"body is missing {k!r}")
            out[k] = None
            continue
        if kind == "uint":
            if not _is_uint(v):
                raise RemoteProtocolError(f"{k} must be an unsigned integer")
        elif kind == "text":
            if type(v) is not str or len(v) > MAX_TEXT_BYTES:
                raise RemoteProtocolError(f"{k} must be a short string")
        elif kind == "map":
            if type(v) is not dict:
                raise RemoteProtocolError(f"{k} must be a map")
        out[k] = v
    return out


def decode(frames: Sequence[bytes]) -> Event:
    """Decode ``[head, body]`` into an event. Raises :class:`RemoteProtocolError`
    (or its subclass :class:`FrameTooLarge`) for anything malformed."""
    if len(frames) != 2:
        raise RemoteProtocolError(f"a message has exactly 2 frames, got {len(frames)}")
    head_b, body_b = frames
    if len(body_b) > MAX_BODY_BYTES:
        raise FrameTooLarge(len(body_b), MAX_BODY_BYTES, "body")
    h = decode_head(head_b)
    kind = h[1]
    if kind == Kind.BATCH:
        if h[4] < h[3]:
            raise RemoteProtocolError("batch last_seq < first_seq")
        return Batch(epoch=h[2], first_seq=h[3], last_seq=h[4], records=bytes(body_b))
    if kind == Kind.REPLAY_CHUNK:
        return ReplayChunk(rid=h[2], epoch=h[3], start_seq=h[4], next_seq=h[5], last_seq=h[6],
                           done=h[7], records=bytes(body_b))
    body = _loads(body_b)
    rid = h[2]
    if kind == Kind.PUBLISH:
        if type(body) is not list or len(body) != 2:
            raise RemoteProtocolError("publish body must be [producer, items]")
        pid, raw = body
        check_producer_id(pid, remote=True)
        if type(raw) is not list or not 0 < len(raw) <= MAX_PUBLISH_ITEMS:
            raise RemoteProtocolError(f"publish must carry 1-{MAX_PUBLISH_ITEMS} items")
        # every message's path into the sequencer: the checks of _is_uint,
        # check_topic (valid topics are cached) and check_payload, inlined
        total = 0
        valid_topics = _VALID_TOPICS
        for it in raw:
            if type(it) is not list or len(it) != 3:
                raise RemoteProtocolError("publish item must be [producer_seq, topic, payload]")
            pseq, topic, payload = it
            if type(pseq) is not int or not 0 <= pseq <= MAX_SEQ:
                raise RemoteProtocolError("producer_seq must be an unsigned integer")
            if type(topic) is not str or topic not in valid_topics:
                check_topic(topic, remote=True)
            if type(payload) is not bytes or len(payload) > MAX_PAYLOAD_BYTES:
                check_payload(payload, remote=True)          # raises
            total += len(payload)
        items = tuple(map(tuple, raw))
        if total > len(body_b):
            # Only CBOR value sharing / string references (tags 28/29, 25/256) can
            # make payloads add up to more than the frame: a 300 KB frame could
            # otherwise expand to 2 GiB of records in the sequencer.
            raise RemoteProtocolError("publish payloads are larger than the frame "
                                      "(shared references are not allowed)")
        return Publish(rid=rid, producer=pid, items=items)
    if kind == Kind.ACK:
        if type(body) is not list or len(body) % 2 or len(body) > 2 * MAX_PUBLISH_ITEMS:
            raise RemoteProtocolError("ack body must be a flat array of pairs")
        # column-wise (C loops): an ACK carries two integers per published message
        if body and not (set(map(type, body)) == _INT_ONLY and min(body) >= 0
                         and max(body) <= MAX_SEQ):
            raise RemoteProtocolError("ack values must be unsigned integers")
        return Ack(rid=rid, epoch=h[3], pairs=tuple(body))
    if kind == Kind.HEARTBEAT:
        m = _map(body, {"node": ("text", True), "role": ("text", True), "time": ("uint", True),
                        "ingress": ("text", False)})
        return Heartbeat(epoch=h[2], last_seq=h[3], node=m["node"], role=m["role"], time=m["time"],
                         ingress=m["ingress"])
    if kind == Kind.HELLO:
        m = _map(body, {"client": ("text", False), "epoch": ("uint", False)})
        vote = body.get("vote")
        if vote is None:                       # absent or null: not a vote
            vote = False
        if type(vote) is not bool:
            raise RemoteProtocolError("vote must be a bool")
        return Hello(rid=rid, client=m["client"] or "", vote=vote, epoch=m["epoch"] or 0)
    if kind == Kind.ADMIN:
        m = _map(body, {"command": ("text", True), "arg": ("uint", False)})
        return Admin(rid=rid, command=m["command"], arg=m["arg"] or 0)
    if kind == Kind.WELCOME:
        m = _map(body, {"node": ("text", True), "role": ("text", True), "epoch": ("uint", True),
                        "first_seq": ("uint", True), "last_seq": ("uint", True),
                        "egress": ("text", True), "peer_ingress": ("text", False),
                        "peer_egress": ("text", False), "heartbeat_ms": ("uint", True),
                        "max_body": ("uint", True), "failover_ms": ("uint", False)})
        return Welcome(rid=rid, node=m["node"], role=m["role"], epoch=m["epoch"],
                       first_seq=m["first_seq"], last_seq=m["last_seq"], egress=m["egress"],
                       peer_ingress=m["peer_ingress"], peer_egress=m["peer_egress"],
                       heartbeat_ms=m["heartbeat_ms"], max_body=m["max_body"],
                       failover_ms=m["failover_ms"] or 0)
    if kind == Kind.REPLAY:
        m = _map(body, {"from": ("uint", False), "to": ("uint", False), "since": ("uint", False),
                        "until": ("uint", False), "topic": ("text", False),
                        "credit": ("uint", False), "max_records": ("uint", False)})
        try:
            return ReplayRequest(rid=rid, from_seq=m["from"] or 1, to_seq=m["to"],
                                 since=m["since"], until=m["until"], topic=m["topic"] or "",
                                 credit=m["credit"] or 4, max_records=m["max_records"] or 4096)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(str(exc)) from None
    if kind == Kind.CREDIT:
        m = _map(body, {"credit": ("uint", True)})
        if not 1 <= m["credit"] <= 64:
            raise RemoteProtocolError("credit must be 1..64")
        return Credit(rid=rid, credit=m["credit"])
    if kind == Kind.CANCEL:
        _map(body, {})
        return Cancel(rid=rid)
    if kind == Kind.STATUS:
        _map(body, {})
        return StatusRequest(rid=rid)
    if kind == Kind.STATUS_REPLY:
        if type(body) is not dict:
            raise RemoteProtocolError("status body must be a map")
        return StatusReply(rid=rid, info=body)
    if kind == Kind.PING:
        _map(body, {})
        return Ping(rid=rid)
    if kind == Kind.PONG:
        m = _map(body, {"epoch": ("uint", True), "last_seq": ("uint", True), "role": ("text", True)})
        return Pong(rid=rid, epoch=m["epoch"], last_seq=m["last_seq"], role=m["role"])
    if kind == Kind.ERROR:
        m = _map(body, {"code": ("text", True), "message": ("text", True),
                        "first_available": ("uint", False)})
        return Error(rid=rid, code=m["code"], message=m["message"],
                     first_available=m["first_available"])
    raise RemoteProtocolError(f"unknown message kind {kind}", code="unknown-kind")  # pragma: no cover


def record_topic(body: bytes) -> str:
    """The topic of a record produced by :func:`encode_record`, read without
    decoding the whole record (replay filtering). Falls back to a full decode
    for any other valid encoding."""
    try:
        if body[0] == 0x87 and body[1] == 0x1B and body[10] == 0x1B and body[19] == 0x1B:
            # producer id at 28, then 0x1B + 8 bytes of producer_seq, then the topic.
            # Heads of text shorter than 256 bytes (every producer id, most topics)
            # are read inline: this runs for every record of a filtered replay.
            h = body[28]
            if 0x60 <= h <= 0x77:
                pos = 29 + (h & 0x1F)
            elif h == 0x78:
                pos = 30 + body[29]
            else:
                pos = _skip_text(body, 28)
            if body[pos] == 0x1B:
                pos += 9
                h = body[pos]
                if 0x60 <= h <= 0x77:
                    return body[pos + 1:pos + 1 + (h & 0x1F)].decode("utf-8")
                if h == 0x78:
                    return body[pos + 2:pos + 2 + body[pos + 1]].decode("utf-8")
                n, pos = _text_len(body, pos)
                if h >> 5 == 3:
                    return body[pos:pos + n].decode("utf-8")
    except (IndexError, UnicodeDecodeError):
        pass
    return decode_record(body).topic


def _text_len(b: bytes, pos: int) -> tuple[int, int]:
    ai = b[pos] & 0x1F
    if ai < 24:
        return ai, pos + 1
    if ai == 24:
        return b[pos + 1], pos + 2
    if ai == 25:
        return int.from_bytes(b[pos + 1:pos + 3], "big"), pos + 3
    if ai == 26:
        return int.from_bytes(b[pos + 1:pos + 5], "big"), pos + 5
    raise IndexError("unsupported length")


def _skip_text(b: bytes, pos: int) -> int:
    n, p = _text_len(b, pos)
    return p + n
