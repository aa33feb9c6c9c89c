"""The link layer: envelope frames in, sealed frames out, and back (sans-I/O).

This module wraps the two-frame envelope messages of :mod:`orbcast.envelope`
in the cryptography of :mod:`orbcast.ratchet` without changing them: a
driver seals ``[head, body]`` before sending and opens what it receives back
into the very same ``[head, body]``. It opens no socket, reads no clock
(every call that needs time takes ``now``), logs nothing and writes no file:
ratchet state leaves through the injected ``persist(session_id, blob)``
callable, and randomness through the injectable key generator.

* :class:`LinkServer` (sequencer node, handshake responder "B") and
  :class:`LinkClient` (plant, initiator "A"): the pairwise Double Ratchet
  link for everything on ingress (requests, replies, acks, replay chunks,
  sender-key distribution).
* :class:`BroadcastSender` (active node) and :class:`BroadcastReceiver`
  (plant): sender-key epochs for egress BATCH and HEARTBEAT.
* :func:`filter_readable` / :func:`publish_refusal`: the ACL helpers a node
  driver applies to replay chunks and publishes (the allowlist decides).

Errors: every rejection of received bytes raises
:class:`~orbcast.errors.AuthenticationError` (and nothing else) and leaves
the object exactly as it was. Misuse by the caller (sealing without a
session, a frame of the wrong direction) raises
:class:`~orbcast.errors.LocalProtocolError`.

Wire format (envelope version 1; full text in docs/security.md)
----------------------------------------------------------------
New kinds, in ranges :class:`orbcast.envelope.Kind` leaves free::

    9   LINK_HELLO       plant -> node  cleartext  head [1, 9, rid]    body {} (map)
    21  LINK_KEYS        node -> plant  cleartext  head [1, 21, rid]   body {"node": text, "ik": bytes32, "spk": bytes32}
    10  LINK_INIT        plant -> node  handshake  head [1, 10, sid]   body {"ik", "ek", "spk": bytes32,
                                                                             "plant", "node": text, "frame": bytes}
    11  SEALED_UP        plant -> node  sealed     head [1, 11, sid]   body = ratchet frame (raw bytes)
    22  SEALED_DOWN      node -> plant  sealed     head [1, 22, sid]   body = ratchet frame (raw bytes)
    34  SEALED_BATCH     egress         broadcast  head [1, 34, epoch, first_seq, last_seq]  body = sender-key frame
    35  SEALED_HEARTBEAT egress         broadcast  head [1, 35, epoch, last_seq]             body = sender-key frame
    12  KEY_REQUEST      inner only, plant -> node: head [1, 12, rid]        body {"key_epoch": uint}
    23  SENDER_KEY       inner only, node -> plant: head [1, 23, key_epoch]  body {"iteration": uint,
                                                     "chain_key": bytes32, "signing_key": bytes32}

* The plaintext of a pairwise ratchet frame is the inner message,
  ``0x82 || bstr(inner head) || bstr(inner body)`` (a CBOR array of two byte
  strings, definite lengths, nothing after it). The inner head is inside the
  AEAD: tampering with it fails the tag. The ratchet's associated data is
  the handshake AD of the profile; the cleartext outer head carries only
  the direction (kind) and the session id, both checked before any key is
  derived (a frame under another sid is authenticated with that session's
  keys and fails).
* ``sid`` = the first 8 bytes of ``SHA-256("orbcast-link-v1 sid" || IK_A ||
  EK_A || IK_B || SPK_B)`` as a big-endian integer, shifted right by one bit
  (a CBOR uint below 2**63). Public, unique per handshake.
* The plant sends LINK_INIT (the handshake fields plus a ratchet frame) for
  every message until it has opened one SEALED_DOWN frame of the session,
  then SEALED_UP (Signal's rule: repeat the X3DH header until answered).
* Broadcast: the sender-key frame of the profile with ``AD`` = the cleartext
  head bytes exactly as sent; the plaintext is the BATCH / HEARTBEAT body.
  Opening gives back ``[[1, 32 | 33, *same fields], body]``.

Persisted session blob (``persist(session_id, blob)``, ``session_id`` = 16
hex digits of the sid; ``blob=None`` means "delete it")::

    "ORLK" || u8 format (1) || CBOR map {"role": "plant" | "node", "sid": uint,
        "own": bytes32, "peer": bytes32, "name": text, "init": map | null,
        "session": bytes (orbcast.ratchet.Session.to_bytes())}

It holds every secret of the link: write, fsync, rename, mode 0600
(:func:`orbcast.keys.write_private_file`), never back it up, never copy it to
another node.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import cbor2

from orbcast.envelope import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    VERSION,
    Kind,
    Message,
    record_topic,
)
from orbcast import strictcbor
from orbcast.errors import AuthenticationError, LocalProtocolError
from orbcast.keys import AllowEntry, Allowlist, AllowlistDiff, Identity, NodePins
from orbcast.ratchet import (
    HEADER_LEN,
    SENDER_KEY_HEADER_LEN,
    SENDER_KEY_MAX_SKIP,
    KeyGenerator,
    SenderKeyReceiver,
    SenderKeyRing,
    SenderKeySender,
    Session,
    default_keygen,
    initiator_handshake,
    public_from_private,
    responder_handshake,
)

__all__ = [
    "KEY_REQUEST", "LINK_HELLO", "LINK_INIT", "LINK_KEYS", "SEALED_BATCH", "SEALED_DOWN",
    "SEALED_HEARTBEAT", "SEALED_UP", "SENDER_KEY",
    "BroadcastReceiver", "BroadcastSender", "LinkClient", "LinkServer", "Peer", "PersistFn",
    "decode_key_request", "filter_readable", "inner_kind", "outer_kind", "publish_refusal",
    "session_name",
]

# --- kinds (wire format; ranges as in orbcast.envelope.Kind) ------------------------------
LINK_HELLO = 9  # plant -> node, cleartext: "send me IK_B and SPK_B"
LINK_INIT = 10  # plant -> node: handshake fields + a ratchet frame (until the node answers)
SEALED_UP = 11  # plant -> node: a ratchet frame of session sid
KEY_REQUEST = 12  # inner only (inside SEALED_UP): "send me the current sender key"
LINK_KEYS = 21  # node -> plant, cleartext: IK_B, SPK_B and the node id
SEALED_DOWN = 22  # node -> plant: a ratchet frame of session sid
SENDER_KEY = 23  # inner only (inside SEALED_DOWN): a sender-key distribution
SEALED_BATCH = 34  # egress: a BATCH under the sender key
SEALED_HEARTBEAT = 35  # egress: a HEARTBEAT under the sender key
_PLAIN_OF_SEALED = {SEALED_BATCH: Kind.BATCH, SEALED_HEARTBEAT: Kind.HEARTBEAT}
_SEALED_OF_PLAIN = {v: k for k, v in _PLAIN_OF_SEALED.items()}
_EGRESS_ARITY = {SEALED_BATCH: 5, SEALED_HEARTBEAT: 4}  # head elements, version and kind included
_UP_KINDS = range(1, 16)  # inner kinds a plant may send (envelope requests + KEY_REQUEST)
_DOWN_KINDS = range(16, 32)  # inner kinds a node may send (envelope replies + SENDER_KEY)

# --- bounds --------------------------------------------------------------------------------
#: Largest sealed body: an inner message of MAX_HEAD_BYTES + MAX_BODY_BYTES, its CBOR framing
#: (<= 11 bytes), the 41-byte ratchet header, the 16-byte tag and a LINK_INIT map's fields.
MAX_SEALED_BYTES = MAX_BODY_BYTES + MAX_HEAD_BYTES + 1024
#: Sessions a node keeps at once (LRU evicted): bounds memory whatever plants do.
MAX_SESSIONS = 4096
#: Sessions per plant key (a daemon plus a CLI on one Pi, a reconnect in flight); the oldest
#: goes first, so a plant that re-handshakes in a loop cannot crowd out the others.
MAX_SESSIONS_PER_KEY = 4
#: Handshakes remembered per SPK to refuse a replayed LINK_INIT; when full the SPK rotates.
#: 8 bytes each: at most 2 x 512 KiB with the previous SPK.
MAX_HANDSHAKES_PER_SPK = 65_536
#: Egress messages (batches and heartbeats) under one sender key-epoch (profile: 10,000).
ROTATE_EVERY_MESSAGES = 10_000
#: Seconds one sender key-epoch lives (profile: 10 minutes).
ROTATE_AFTER_SECONDS = 600.0
#: A plant asks for a sender key at most this often (seconds), however many frames it cannot open.
KEY_REQUEST_INTERVAL = 1.0
U32_MAX = 0xFFFF_FFFF

BLOB_MAGIC = b"ORLK"
BLOB_FORMAT = 1
_SID_INFO = b"orbcast-link-v1 sid"
_SK_HEADER = struct.Struct(">BII")  # sender-key header: version, key_epoch, iteration

PersistFn = Callable[[str, "bytes | None"], None]
"""``persist(session_id, blob)``: durably store ``blob`` (write, fsync, rename, mode 0600)
under ``session_id``, or delete it when ``blob`` is None. Must raise if it cannot."""

R = TypeVar("R")


def _reject(reason: str) -> AuthenticationError:
    return AuthenticationError(f"link authentication failed: {reason}")


def session_name(sid: int) -> str:
    """The ``session_id`` string a session is persisted under: 16 lowercase hex digits."""
    return f"{sid:016x}"


def _derive_sid(ik_a: bytes, ek_a: bytes, ik_b: bytes, spk_b: bytes) -> int:
    digest = hashlib.sha256(_SID_INFO + ik_a + ek_a + ik_b + spk_b).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# --- small codecs -------------------------------------------------------------------------


def _is_bytes(v: Any) -> bool:
    return isinstance(v, (bytes, bytearray, memoryview))


def _two(frames: Any) -> tuple[bytes, bytes]:
    if not isinstance(frames, (list, tuple)) or len(frames) != 2:
        raise _reject("a message is exactly two frames")
    head, body = frames
    if not (_is_bytes(head) and _is_bytes(body)):
        raise _reject("frames must be bytes")
    if len(head) > MAX_HEAD_BYTES or len(body) > MAX_SEALED_BYTES:
        raise _reject("frame too large")
    return bytes(head), bytes(body)


def _loads(b: bytes) -> Any:
    try:
        return strictcbor.loads(b)
    except Exception:  # noqa: BLE001 - cbor2 raises many types on garbage (and RecursionError)
        raise _reject("malformed CBOR") from None


def _uint(v: Any) -> bool:
    return type(v) is int and 0 <= v < 2**63


def _decode_head(head: bytes) -> list[Any]:
    h = _loads(head)
    if type(h) is not list or len(h) < 2 or h[0] != VERSION or type(h[0]) is not int:
        raise _reject("head is not [1, kind, ...]")
    if not all(_uint(v) for v in h[1:]):
        raise _reject("head fields must be unsigned integers")
    return h


def outer_kind(frames: Sequence[bytes]) -> int:
    """The kind of a received message, read from its cleartext head.

    A driver dispatches on it before opening: LINK_HELLO to
    :meth:`LinkServer.keys_reply`, LINK_INIT / SEALED_UP to
    :meth:`LinkServer.open`, LINK_KEYS to :meth:`LinkClient.on_keys`,
    SEALED_DOWN to :meth:`LinkClient.open`. Raises AuthenticationError if
    the head does not decode (with link security on, that is a link failure).
    """
    head, _ = _two(frames)
    return int(_decode_head(head)[1])


def inner_kind(frames: Sequence[bytes]) -> int:
    """The kind of an opened (inner) message: route KEY_REQUEST / SENDER_KEY, decode the rest
    with :func:`orbcast.envelope.decode`, which validates the rest of the head (inner heads
    may carry more than unsigned integers, e.g. a REPLAY_CHUNK's ``done`` flag). Raises
    AuthenticationError if the head is not a CBOR array starting ``[1, kind]``."""
    head, _ = _two(frames)
    h = _loads(head)
    if type(h) is not list or len(h) < 2 or h[0] != VERSION or not _uint(h[1]):
        raise _reject("inner head is not [1, kind, ...]")
    return int(h[1])


def _pack_inner(head: bytes, body: bytes) -> bytes:
    """``0x82 || bstr(head) || bstr(body)``: CBOR ``[head, body]`` without an encoder pass."""
    return b"".join((b"\x82", _bstr_head(len(head)), head, _bstr_head(len(body)), body))


def _bstr_head(n: int) -> bytes:
    if n < 24:
        return bytes((0x40 | n,))
    if n < 0x100:
        return bytes((0x58, n))
    if n < 0x10000:
        return b"\x59" + n.to_bytes(2, "big")
    return b"\x5a" + n.to_bytes(4, "big")


def _read_bstr(b: bytes, pos: int) -> tuple[bytes, int] | None:
    if pos >= len(b) or b[pos] >> 5 != 2:
        return None
    ai = b[pos] & 0x1F
    if ai < 24:
        n, pos = ai, pos + 1
    elif 24 <= ai <= 26:
        width = 1 << (ai - 24)
        if pos + 1 + width > len(b):
            return None
        n, pos = int.from_bytes(b[pos + 1:pos + 1 + width], "big"), pos + 1 + width
    else:
        return None
    if pos + n > len(b):
        return None
    return b[pos:pos + n], pos + n


def _unpack_inner(pt: bytes, kinds: range) -> list[bytes] | None:
    """Parse an authentic plaintext into ``[head, body]``; None if it is not a well-formed
    inner message whose head names a kind of the expected direction."""
    if not pt or pt[0] != 0x82:
        return None
    first = _read_bstr(pt, 1)
    if first is None:
        return None
    head, pos = first
    second = _read_bstr(pt, pos)
    if second is None or second[1] != len(pt) or len(head) > MAX_HEAD_BYTES:
        return None
    try:
        h = strictcbor.loads(head)
    except Exception:  # noqa: BLE001 - authentic but garbage: the caller rejects it
        return None
    if type(h) is not list or len(h) < 2 or h[0] != VERSION or type(h[1]) is not int \
            or h[1] not in kinds:
        return None
    return [head, second[0]]


def _check_outgoing(frames: Sequence[bytes], kinds: range, who: str) -> tuple[bytes, bytes]:
    if not isinstance(frames, (list, tuple)) or len(frames) != 2 or not all(map(_is_bytes, frames)):
        raise LocalProtocolError("seal() takes one message: [head, body] as bytes")
    head, body = bytes(frames[0]), bytes(frames[1])
    try:
        h = cbor2.loads(head)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is our caller's bug
        raise LocalProtocolError(f"cannot seal: the head is not CBOR ({exc})") from None
    if type(h) is not list or len(h) < 2 or h[0] != VERSION or h[1] not in kinds:
        raise LocalProtocolError(f"a {who} may not send kind {h[1] if type(h) is list and len(h) > 1 else h!r}")
    if len(head) > MAX_HEAD_BYTES or len(body) > MAX_BODY_BYTES:
        raise LocalProtocolError("cannot seal: frame larger than the envelope allows")
    return head, body


def _encode_blob(fields: dict[str, Any]) -> bytes:
    return BLOB_MAGIC + bytes((BLOB_FORMAT,)) + cbor2.dumps(fields)


def _decode_blob(blob: bytes, role: str) -> dict[str, Any]:
    if not _is_bytes(blob) or bytes(blob[:5]) != BLOB_MAGIC + bytes((BLOB_FORMAT,)):
        raise _reject("not a saved link session of this format")
    m = _loads(bytes(blob[5:]))
    if (type(m) is not dict or m.get("role") != role or not _uint(m.get("sid"))
            or not all(type(m.get(k)) is bytes and len(m[k]) == 32 for k in ("own", "peer"))
            or type(m.get("name")) is not str or type(m.get("session")) is not bytes):
        raise _reject(f"saved link session is not a well-formed {role} session")
    return m


# --- public result type --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Peer:
    """Who sent an opened frame: the session id, the peer's long-term public key (its
    identity; look up ACLs by it) and its name (plant id / node id from the handshake)."""

    sid: int
    key: bytes
    name: str


class _Persisting:
    """Shared persistence bookkeeping: dirty sessions and the ``persist`` hook."""

    def __init__(self, persist: PersistFn, defer_persist: bool) -> None:
        self._persist = persist
        self._defer = defer_persist
        self._dirty: dict[int, None] = {}

    def _blob(self, sid: int) -> bytes | None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _mark(self, sid: int) -> None:
        self._dirty[sid] = None

    def _save(self, sid: int) -> None:
        self._persist(session_name(sid), self._blob(sid))  # may raise: stays dirty
        self._dirty.pop(sid, None)

    def _forget(self, sid: int) -> None:
        self._dirty.pop(sid, None)
        self._persist(session_name(sid), None)

    def pending_persist(self) -> list[str]:
        """Session ids whose advanced state is not persisted yet (sealed in deferred mode,
        or opened since the last save). Persist them before sending what was sealed."""
        return [session_name(s) for s in self._dirty]

    def flush_persist(self) -> int:
        """Call ``persist`` for every session in :meth:`pending_persist`; return how many.

        A driver in deferred mode calls this once per loop turn *before* it sends any
        frame sealed in that turn. If ``persist`` raises, the rest stay pending.
        """
        n = 0
        for sid in list(self._dirty):
            self._save(sid)
            n += 1
        return n


# --- the node side --------------------------------------------------------------------------


class _NodeSession:
    __slots__ = ("key", "name", "session")

    def __init__(self, key: bytes, name: str, session: Session) -> None:
        self.key, self.name, self.session = key, name, session


class LinkServer(_Persisting):
    """The sequencer node's end of every plant link (handshake responder).

    Sessions are indexed by session id and belong to a plant *public key*;
    the ZeroMQ routing id plays no part. At most :data:`MAX_SESSIONS` are
    kept (least recently used evicted) and :data:`MAX_SESSIONS_PER_KEY` per
    plant key. Draw a fresh SPK at every start (the default): a node never
    persists its SPK, so a LINK_INIT captured before a restart cannot be
    replayed after it; within one SPK a replayed LINK_INIT is refused by sid.

    ``persist`` is called with the advanced state of a session before
    :meth:`seal` returns (or, with ``defer_persist=True``, by
    :meth:`flush_persist`, which the driver then calls before sending).

    Example (one request, one reply)::

        server = LinkServer(node_identity, "seq-a", allowlist, persist=store.put)
        if outer_kind(frames) == LINK_HELLO:
            send(server.keys_reply(frames))
        else:
            peer, inner = server.open(frames)          # AuthenticationError -> ERROR "auth"
            ...                                        # ACLs by allowlist.lookup(peer.key)
            send(server.seal(peer.sid, reply_frames))  # persisted before it returns
    """

    def __init__(self, identity: Identity, node_id: str, allowlist: Allowlist, *,
                 persist: PersistFn, keygen: KeyGenerator = default_keygen,
                 defer_persist: bool = False, spk: bytes | None = None) -> None:
        super().__init__(persist, defer_persist)
        if not isinstance(node_id, str) or not 0 < len(node_id.encode()) <= 64:
            raise LocalProtocolError("node_id must be 1-64 characters")
        self._identity = identity
        self._node_id = node_id
        self._allowlist = allowlist
        self._keygen = keygen
        spk_priv = spk if spk is not None else keygen()
        # SPK public -> (private, sids of the handshakes seen under it); current is last.
        self._spks: dict[bytes, tuple[bytes, set[int]]] = {
            public_from_private(spk_priv): (spk_priv, set())}
        self._sessions: dict[int, _NodeSession] = {}  # insertion order = least recently used first
        self._by_key: dict[bytes, list[int]] = {}

    # -- properties --------------------------------------------------------------------

    @property
    def public_key(self) -> bytes:
        """IK_B, the node's long-term public key (what plants pin)."""
        return self._identity.public

    @property
    def spk_public(self) -> bytes:
        """The current SPK_B announced in LINK_KEYS."""
        return next(reversed(self._spks))

    @property
    def allowlist(self) -> Allowlist:
        """The allowlist in force."""
        return self._allowlist

    # -- cleartext key exchange ------------------------------------------------------

    def keys_reply(self, frames: Sequence[bytes]) -> list[bytes]:
        """Answer a LINK_HELLO with LINK_KEYS (cleartext; IK_B is public, SPK_B unsigned).

        Changes no state. Raises AuthenticationError if ``frames`` is not a LINK_HELLO.
        """
        head, body = _two(frames)
        h = _decode_head(head)
        if h[1] != LINK_HELLO or len(h) != 3 or len(body) > 1024 or type(_loads(body)) is not dict:
            raise _reject("not a LINK_HELLO")
        return [cbor2.dumps([VERSION, LINK_KEYS, h[2]]),
                cbor2.dumps({"node": self._node_id, "ik": self._identity.public,
                             "spk": self.spk_public})]

    def rotate_spk(self) -> None:
        """Draw a new SPK; the previous one still completes handshakes, the one before
        is forgotten (with its replay set). Call it every few hours; it also happens
        by itself after :data:`MAX_HANDSHAKES_PER_SPK` handshakes."""
        priv = self._keygen()
        self._spks[public_from_private(priv)] = (priv, set())
        while len(self._spks) > 2:
            del self._spks[next(iter(self._spks))]

    # -- receiving -------------------------------------------------------------------------

    def open(self, frames: Sequence[bytes]) -> tuple[Peer, list[bytes]]:
        """Authenticate and decrypt a LINK_INIT or SEALED_UP message.

        Returns ``(peer, [inner_head, inner_body])``; decode the inner message
        with :func:`orbcast.envelope.decode` (or handle KEY_REQUEST). Raises
        AuthenticationError, with no state change at all, for anything else:
        malformed frames, an unknown session, a key not on the allowlist, a
        plant id other than the allowlisted name, an unknown SPK, a replayed
        handshake or frame, a tampered or truncated frame, a reflected one.
        """
        head, body = _two(frames)
        h = _decode_head(head)
        if len(h) != 3 or h[1] not in (LINK_INIT, SEALED_UP):
            raise _reject(f"kind {h[1]} is not a plant-to-node link message")
        sid = h[2]
        if h[1] == SEALED_UP:
            ns = self._sessions.get(sid)
            if ns is None:
                raise _reject("unknown session (handshake again)")
            inner = self._decrypt(ns, body)
        else:
            init = self._decode_init(body)
            if _derive_sid(init["ik"], init["ek"], self._identity.public, init["spk"]) != sid:
                raise _reject("session id does not match the handshake")
            ns = self._sessions.get(sid)
            if ns is not None:  # the plant repeats its handshake until it hears from us
                inner = self._decrypt(ns, init["frame"])
            else:
                ns, inner = self._handshake(sid, init)
        self._sessions[sid] = self._sessions.pop(sid)  # most recently used
        self._mark(sid)
        return Peer(sid=sid, key=ns.key, name=ns.name), inner

    def _decode_init(self, body: bytes) -> dict[str, Any]:
        m = _loads(body)
        if type(m) is not dict or set(m) != {"ik", "ek", "spk", "plant", "node", "frame"}:
            raise _reject("malformed LINK_INIT")
        if not all(type(m[k]) is bytes and len(m[k]) == 32 for k in ("ik", "ek", "spk")):
            raise _reject("LINK_INIT keys must be 32 bytes")
        if type(m["plant"]) is not str or type(m["node"]) is not str or type(m["frame"]) is not bytes:
            raise _reject("malformed LINK_INIT")
        return m

    def _handshake(self, sid: int, init: dict[str, Any]) -> tuple[_NodeSession, list[bytes]]:
        entry = self._allowlist.lookup(init["ik"])
        if entry is None:
            raise _reject("plant key not on the allowlist")
        if init["plant"] != entry.name:
            raise _reject("plant id is not the allowlisted name of this key")
        if init["node"] != self._node_id:
            raise _reject("handshake for another node id")
        spk = self._spks.get(init["spk"])
        if spk is None:
            raise _reject("unknown or expired SPK (fetch LINK_KEYS again)")
        spk_priv, seen = spk
        if sid in seen:
            raise _reject("replayed handshake")
        sk, ad = responder_handshake(self._identity.private, spk_priv, init["ik"], init["ek"],
                                     entry.name.encode(), self._node_id.encode())
        session = Session.responder(sk, ad, spk_priv, keygen=self._keygen)
        inner = _unpack_inner(session.decrypt(init["frame"]), _UP_KINDS)
        if inner is None:
            raise _reject("authentic handshake with a malformed inner message")
        # -- commit --
        seen.add(sid)
        if len(seen) >= MAX_HANDSHAKES_PER_SPK and init["spk"] == self.spk_public:
            self.rotate_spk()
        ns = _NodeSession(entry.key, entry.name, session)
        self._sessions[sid] = ns
        sids = self._by_key.setdefault(entry.key, [])
        sids.append(sid)
        self._trim(sids)
        return ns, inner

    def _decrypt(self, ns: _NodeSession, frame: bytes) -> list[bytes]:
        if len(frame) < HEADER_LEN:
            raise _reject("frame too short")
        snapshot = ns.session.to_bytes()
        inner = _unpack_inner(ns.session.decrypt(frame), _UP_KINDS)
        if inner is None:  # authentic but garbage: undo, so a rejection changes nothing
            ns.session = Session.from_bytes(snapshot, keygen=self._keygen)
            raise _reject("authentic frame with a malformed inner message")
        return inner

    def _trim(self, sids: list[int]) -> None:
        """Enforce the session bounds, evicting the least recently *used* session (of
        this key first): a plant's busy session outlives one-shot sessions that a CLI
        on the same Pi opens with the same key (``plant status``)."""
        while len(sids) > MAX_SESSIONS_PER_KEY:
            mine = set(sids)
            self.drop(next(s for s in self._sessions if s in mine))
        while len(self._sessions) > MAX_SESSIONS:
            self.drop(next(iter(self._sessions)))

    # -- sending ---------------------------------------------------------------------------

    def seal(self, sid: int, frames: Sequence[bytes]) -> list[bytes]:
        """Encrypt one reply ``[head, body]`` (kinds 16-31) for session ``sid``.

        Returns the SEALED_DOWN frames. The advanced state is persisted before
        this returns (deferred mode: by :meth:`flush_persist`). Raises
        LocalProtocolError for an unknown (dropped, revoked, evicted) session
        or a frame a node may not send; if ``persist`` raises, the error
        propagates and the frame must not be sent (its number is burned).
        """
        ns = self._sessions.get(sid)
        if ns is None:
            raise LocalProtocolError(f"no link session {session_name(sid)} (dropped or revoked)")
        head, body = _check_outgoing(frames, _DOWN_KINDS, "node")
        frame = ns.session.encrypt(_pack_inner(head, body))
        self._mark(sid)
        if not self._defer:
            self._save(sid)
        return [cbor2.dumps([VERSION, SEALED_DOWN, sid]), frame]

    def seal_many(self, items: Iterable[tuple[int, Sequence[bytes]]]) -> list[list[bytes]]:
        """Seal several replies, persist each touched session once, then return them all
        (in order). Same errors as :meth:`seal`; on an error nothing is returned."""
        out = []
        touched: dict[int, None] = {}
        for sid, frames in items:
            ns = self._sessions.get(sid)
            if ns is None:
                raise LocalProtocolError(f"no link session {session_name(sid)} (dropped or revoked)")
            head, body = _check_outgoing(frames, _DOWN_KINDS, "node")
            out.append([cbor2.dumps([VERSION, SEALED_DOWN, sid]),
                        ns.session.encrypt(_pack_inner(head, body))])
            self._mark(sid)
            touched[sid] = None
        if not self._defer:
            for sid in touched:
                self._save(sid)
        return out

    # -- sessions and revocation -----------------------------------------------------------

    def _blob(self, sid: int) -> bytes:
        ns = self._sessions[sid]
        return _encode_blob({"role": "node", "sid": sid, "own": self._identity.public,
                             "peer": ns.key, "name": ns.name, "init": None,
                             "session": ns.session.to_bytes()})

    def peer(self, sid: int) -> Peer | None:
        """The peer of session ``sid``, or None if there is no such session."""
        ns = self._sessions.get(sid)
        return None if ns is None else Peer(sid=sid, key=ns.key, name=ns.name)

    def sessions(self) -> list[Peer]:
        """Every live session (e.g. to hand out a new sender key after a rotation)."""
        return [Peer(sid=s, key=ns.key, name=ns.name) for s, ns in self._sessions.items()]

    def drop(self, sid: int) -> None:
        """Forget session ``sid`` and delete its persisted state (``persist(id, None)``)."""
        ns = self._sessions.pop(sid, None)
        if ns is None:
            return
        sids = self._by_key.get(ns.key, [])
        if sid in sids:
            sids.remove(sid)
        if not sids:
            self._by_key.pop(ns.key, None)
        self._forget(sid)

    def set_allowlist(self, new: Allowlist) -> tuple[AllowlistDiff, list[Peer]]:
        """Install a reloaded allowlist (SIGHUP / ``sequencer reload``).

        Drops (and deletes the saved state of) every session whose key was
        revoked or whose allowlisted name changed. Returns the diff and the
        dropped peers: cancel their replays, and if ``diff.rotate``, rotate the
        broadcast sender key *before the next publish* and distribute it to
        :meth:`sessions` whose entry ``gets_broadcast_key``.
        """
        diff = self._allowlist.diff(new)
        self._allowlist = new
        dropped = []
        for sid, ns in list(self._sessions.items()):
            entry = new.lookup(ns.key)
            if entry is None or entry.name != ns.name:
                dropped.append(Peer(sid=sid, key=ns.key, name=ns.name))
                self.drop(sid)
        return diff, dropped

    def restore(self, blob: bytes) -> Peer:
        """Load a session saved by this node (at start-up). Raises AuthenticationError if the
        blob is damaged, belongs to another node identity, or its plant is no longer
        allowlisted under that name (then delete the file)."""
        m = _decode_blob(blob, "node")
        entry = self._allowlist.lookup(m["peer"])
        if m["own"] != self._identity.public:
            raise _reject("saved session belongs to another node identity")
        if entry is None or entry.name != m["name"]:
            raise _reject("saved session of a plant that is no longer allowlisted")
        session = Session.from_bytes(m["session"], keygen=self._keygen)
        sid = m["sid"]
        if sid in self._sessions:
            raise LocalProtocolError(f"session {session_name(sid)} is already loaded")
        self._sessions[sid] = _NodeSession(m["peer"], m["name"], session)
        sids = self._by_key.setdefault(m["peer"], [])
        sids.append(sid)
        self._trim(sids)
        return Peer(sid=sid, key=m["peer"], name=m["name"])

    def export_state(self) -> dict[str, Any]:
        """Test-only: every session's ratchet state (secrets included) and the SPK set."""
        return {"spks": tuple((pub, frozenset(seen)) for pub, (_, seen) in self._spks.items()),
                "sessions": {sid: (ns.key, ns.name, ns.session.export_state())
                             for sid, ns in self._sessions.items()},
                "dirty": tuple(self._dirty)}


# --- the plant side ---------------------------------------------------------------------------


class LinkClient(_Persisting):
    """A plant's end of its link to one sequencer node (handshake initiator).

    Life cycle: :meth:`hello` -> send; feed the LINK_KEYS reply to
    :meth:`on_keys` (checks the node key against the pins); then
    :meth:`seal` / :meth:`open` for everything. The first seal runs the
    handshake. After a failover (another node) or an ``auth`` ERROR, call
    :meth:`reset` and start again with :meth:`hello`: sessions are never
    moved between nodes.

    Example::

        link = LinkClient(identity, "kitchen", pins, persist=store.put)
        send(link.hello(rid=1)); link.on_keys(recv())
        send(link.seal(env.encode(Hello(rid=2))))       # persisted before it returns
        node_key, inner = link.open(recv())             # AuthenticationError: drop, count
        ev = env.decode(inner)
    """

    def __init__(self, identity: Identity, plant_id: str, pins: NodePins, *,
                 persist: PersistFn, keygen: KeyGenerator = default_keygen,
                 defer_persist: bool = False) -> None:
        super().__init__(persist, defer_persist)
        if not isinstance(plant_id, str) or not 0 < len(plant_id.encode()) <= 64:
            raise LocalProtocolError("plant_id must be 1-64 characters")
        self._identity = identity
        self._plant_id = plant_id
        self._pins = pins
        self._keygen = keygen
        self._keys: tuple[bytes, bytes, str] | None = None  # IK_B, SPK_B, node id from LINK_KEYS
        self._sid: int | None = None
        self._session: Session | None = None
        self._node_key: bytes | None = None
        self._node_id = ""
        self._init: dict[str, Any] | None = None  # LINK_INIT fields until the node answers

    @property
    def sid(self) -> int | None:
        """The session id, or None before the handshake."""
        return self._sid

    @property
    def node_key(self) -> bytes | None:
        """IK_B of the node this link talks to (pinned), or None before LINK_KEYS."""
        return self._node_key if self._node_key is not None else (self._keys[0] if self._keys else None)

    @property
    def established(self) -> bool:
        """True once a session exists (the handshake ran, perhaps not yet answered)."""
        return self._session is not None

    @property
    def answered(self) -> bool:
        """True once a frame from the node opened: the node holds this session."""
        return self._session is not None and self._init is None

    @property
    def can_seal(self) -> bool:
        """True if :meth:`seal` will work (a session exists, or LINK_KEYS arrived)."""
        return self._session is not None or self._keys is not None

    def hello(self, rid: int) -> list[bytes]:
        """The cleartext LINK_HELLO asking the node for IK_B and SPK_B."""
        return [cbor2.dumps([VERSION, LINK_HELLO, rid]), b"\xa0"]

    def on_keys(self, frames: Sequence[bytes]) -> None:
        """Take a LINK_KEYS reply. Raises AuthenticationError (state unchanged) if it is
        malformed or IK_B is not pinned. Ignored while a session exists (reset first)."""
        head, body = _two(frames)
        h = _decode_head(head)
        if h[1] != LINK_KEYS or len(h) != 3:
            raise _reject("not a LINK_KEYS message")
        m = _loads(body)
        if (type(m) is not dict or type(m.get("node")) is not str
                or not 0 < len(m["node"].encode()) <= 64
                or not all(type(m.get(k)) is bytes and len(m[k]) == 32 for k in ("ik", "spk"))):
            raise _reject("malformed LINK_KEYS")
        if not self._pins.is_pinned(m["ik"]):
            raise _reject("node key is not pinned")
        if self._session is None:
            self._keys = (m["ik"], m["spk"], m["node"])

    def _start(self) -> None:
        if self._keys is None:
            raise LocalProtocolError("no link yet: send hello() and feed the reply to on_keys()")
        ik_b, spk_b, node_id = self._keys
        ek = self._keygen()
        sk, ad = initiator_handshake(self._identity.private, ek, ik_b, spk_b,
                                     self._plant_id.encode(), node_id.encode())
        session = Session.initiator(sk, ad, spk_b, keygen=self._keygen)
        ek_pub = public_from_private(ek)
        self._sid = _derive_sid(self._identity.public, ek_pub, ik_b, spk_b)
        self._session, self._node_key, self._node_id = session, ik_b, node_id
        self._init = {"ik": self._identity.public, "ek": ek_pub, "spk": spk_b,
                      "plant": self._plant_id, "node": node_id}

    def _seal_one(self, frames: Sequence[bytes]) -> list[bytes]:
        head, body = _check_outgoing(frames, _UP_KINDS, "plant")
        if self._session is None:
            self._start()
        assert self._session is not None and self._sid is not None
        frame = self._session.encrypt(_pack_inner(head, body))
        self._mark(self._sid)
        if self._init is not None:
            return [cbor2.dumps([VERSION, LINK_INIT, self._sid]),
                    cbor2.dumps({**self._init, "frame": frame})]
        return [cbor2.dumps([VERSION, SEALED_UP, self._sid]), frame]

    def seal(self, frames: Sequence[bytes]) -> list[bytes]:
        """Encrypt one request ``[head, body]`` (kinds 1-15); return LINK_INIT or SEALED_UP frames.

        Runs the handshake on first use. The advanced state is persisted before
        this returns (deferred mode: by :meth:`flush_persist`). A retry must
        call seal() again: never resend sealed frames. Raises
        LocalProtocolError before LINK_KEYS or for a kind a plant may not
        send, AuthenticationError if the announced SPK is a bad key.
        """
        out = self._seal_one(frames)
        if not self._defer:
            self._save(self._sid)  # type: ignore[arg-type]
        return out

    def seal_many(self, messages: Iterable[Sequence[bytes]]) -> list[list[bytes]]:
        """Seal several requests and persist once, then return them all (in order)."""
        out = [self._seal_one(f) for f in messages]
        if out and not self._defer:
            self._save(self._sid)  # type: ignore[arg-type]
        return out

    def open(self, frames: Sequence[bytes]) -> tuple[bytes, list[bytes]]:
        """Authenticate and decrypt a SEALED_DOWN message; return ``(node_key, inner frames)``.

        Raises AuthenticationError, state unchanged, for a frame of another
        session, a replay, a reflection, tampering, truncation, garbage.
        """
        head, body = _two(frames)
        h = _decode_head(head)
        if h[1] != SEALED_DOWN or len(h) != 3:
            raise _reject(f"kind {h[1]} is not a node-to-plant link message")
        if self._session is None or h[2] != self._sid:
            raise _reject("frame from another session")
        if len(body) < HEADER_LEN:
            raise _reject("frame too short")
        snapshot = self._session.to_bytes()
        inner = _unpack_inner(self._session.decrypt(body), _DOWN_KINDS)
        if inner is None:
            self._session = Session.from_bytes(snapshot, keygen=self._keygen)
            raise _reject("authentic frame with a malformed inner message")
        self._init = None  # the node holds the session: stop repeating the handshake
        self._mark(h[2])
        assert self._node_key is not None
        return self._node_key, inner

    def reset(self) -> None:
        """Forget the session (deleting its saved state) and the node keys: the next
        link starts with :meth:`hello`. Use after a failover or an ``auth`` ERROR."""
        if self._sid is not None:
            self._forget(self._sid)
        self._sid = self._session = self._node_key = self._init = self._keys = None
        self._node_id = ""

    def _blob(self, sid: int) -> bytes:
        assert self._session is not None and self._node_key is not None
        return _encode_blob({"role": "plant", "sid": sid, "own": self._identity.public,
                             "peer": self._node_key, "name": self._node_id, "init": self._init,
                             "session": self._session.to_bytes()})

    def restore(self, blob: bytes) -> None:
        """Continue a session saved by :meth:`seal` (plant restart). Raises AuthenticationError
        if it is damaged, another identity's, or its node key is no longer pinned."""
        m = _decode_blob(blob, "plant")
        if m["own"] != self._identity.public:
            raise _reject("saved session belongs to another plant identity")
        if not self._pins.is_pinned(m["peer"]):
            raise _reject("saved session with a node key that is no longer pinned")
        init = m.get("init")
        if init is not None and (type(init) is not dict
                                 or set(init) != {"ik", "ek", "spk", "plant", "node"}):
            raise _reject("saved session has a malformed handshake")
        session = Session.from_bytes(m["session"], keygen=self._keygen)
        self._session, self._sid, self._node_key = session, m["sid"], m["peer"]
        self._node_id, self._init, self._keys = m["name"], init, None

    def export_state(self) -> dict[str, Any]:
        """Test-only: the ratchet state (secrets included) and the link bookkeeping."""
        return {"sid": self._sid, "node_key": self._node_key, "keys": self._keys,
                "init": self._init,
                "session": self._session.export_state() if self._session else None,
                "dirty": tuple(self._dirty)}


# --- broadcast --------------------------------------------------------------------------------


class BroadcastSender:
    """The active node's egress encryption: one sender-key epoch at a time.

    :meth:`seal` turns a BATCH or HEARTBEAT ``[head, body]`` into
    SEALED_BATCH / SEALED_HEARTBEAT. Rotation (a new key-epoch with a fresh
    chain key and signing key) happens on :meth:`rotate` (revocation: before
    the next publish; failover and restart: construct a new sender) and by
    itself after :data:`ROTATE_EVERY_MESSAGES` messages or
    :data:`ROTATE_AFTER_SECONDS`. After every rotation :meth:`take_distribution`
    returns the SENDER_KEY message once: seal it to every authorised plant
    session before publishing under the new key.

    ``key_epoch`` must grow across restarts of one node identity (plants
    refuse a key-epoch that is not newer): start it from a persisted counter
    or the wall clock, e.g. ``max(saved + 1, int(time.time()) - 1_700_000_000)``.
    """

    def __init__(self, *, key_epoch: int, now: float, rand: Callable[[int], bytes] = os.urandom,
                 rotate_every: int = ROTATE_EVERY_MESSAGES,
                 rotate_after: float = ROTATE_AFTER_SECONDS) -> None:
        if not 0 <= key_epoch <= U32_MAX:
            raise LocalProtocolError("key_epoch must fit in a u32")
        self._rand = rand
        self._rotate_every, self._rotate_after = rotate_every, rotate_after
        self._sender = SenderKeySender(key_epoch, rand=rand)
        self._started, self._count = now, 0
        self._announce = True

    @property
    def key_epoch(self) -> int:
        """The key-epoch frames are sealed under now."""
        return self._sender.key_epoch

    def rotation_due(self, now: float) -> bool:
        """True when the count or age bound of this key-epoch is reached."""
        return self._count >= self._rotate_every or now - self._started >= self._rotate_after

    def maybe_rotate(self, now: float) -> bool:
        """Rotate if :meth:`rotation_due`; True if it did. Call at the top of an egress turn."""
        if self.rotation_due(now):
            self.rotate(now=now)
            return True
        return False

    def rotate(self, *, now: float) -> int:
        """Start the next key-epoch now (fresh chain key and signing key); return it.
        The old chain is dropped: no plant can be handed its keys any more."""
        nxt = self._sender.key_epoch + 1
        if nxt > U32_MAX:
            raise LocalProtocolError("key_epoch space exhausted; restart with a new node identity")
        self._sender = SenderKeySender(nxt, rand=self._rand)
        self._started, self._count = now, 0
        self._announce = True
        return nxt

    def seal(self, frames: Sequence[bytes], *, now: float) -> list[bytes]:
        """Encrypt and sign one BATCH or HEARTBEAT; return the sealed egress frames.

        Rotates first if due (then :meth:`take_distribution` has the new key).
        Raises LocalProtocolError for anything but a BATCH / HEARTBEAT.
        """
        if not isinstance(frames, (list, tuple)) or len(frames) != 2 or not all(map(_is_bytes, frames)):
            raise LocalProtocolError("seal() takes one message: [head, body] as bytes")
        h = cbor2.loads(frames[0])
        kind = _SEALED_OF_PLAIN.get(h[1]) if type(h) is list and len(h) >= 2 else None
        if kind is None or h[0] != VERSION or len(h) != _EGRESS_ARITY[kind]:
            raise LocalProtocolError("only BATCH and HEARTBEAT are broadcast")
        self.maybe_rotate(now)
        head = cbor2.dumps([VERSION, kind, *h[2:]])
        frame = self._sender.encrypt(bytes(frames[1]), head)
        self._count += 1
        return [head, frame]

    def distribution(self) -> list[bytes]:
        """The inner SENDER_KEY message ``(key_epoch, iteration, CK_iteration, signing key)``
        at the current iteration; seal it with :meth:`LinkServer.seal` for one plant
        (on request, to a newly connected plant, after a rotation). It opens only
        frames from now on."""
        epoch, iteration, ck, sig_pub = self._sender.distribution()
        return [cbor2.dumps([VERSION, SENDER_KEY, epoch]),
                cbor2.dumps({"iteration": iteration, "chain_key": ck, "signing_key": sig_pub})]

    def take_distribution(self) -> list[bytes] | None:
        """After a rotation (or at start): the SENDER_KEY message, once; else None."""
        if not self._announce:
            return None
        self._announce = False
        return self.distribution()

    def export_state(self) -> dict[str, Any]:
        """Test-only state dump (secret chain key included)."""
        return {**self._sender.export_state(), "count": self._count, "started": self._started}


def decode_key_request(frames: Sequence[bytes]) -> int:
    """The key-epoch named by an opened KEY_REQUEST (0: "whatever is current").
    Raises AuthenticationError if it is not one."""
    head, body = _two(frames)
    h = _decode_head(head)
    m = _loads(body)
    if h[1] != KEY_REQUEST or len(h) != 3 or type(m) is not dict or not _uint(m.get("key_epoch", 0)):
        raise _reject("not a KEY_REQUEST")
    return int(m.get("key_epoch", 0))


class BroadcastReceiver:
    """A plant's egress decryption, built on :class:`orbcast.ratchet.SenderKeyRing`.

    Keys come only from the node the plant has a link with
    (:meth:`install`, fed the SENDER_KEY messages :meth:`LinkClient.open`
    returns). A key from another node (after a failover) starts a fresh ring:
    a deposed node's broadcasts stop opening. :meth:`open` verifies the
    signature, then decrypts; on failure nothing changes and the driver asks
    :meth:`key_request` whether to ask the node for a key.
    """

    def __init__(self) -> None:
        self._ring = SenderKeyRing()
        self._node: bytes | None = None
        self._epoch: int | None = None  # current key-epoch
        self._signing: bytes | None = None
        self._next = 0  # lowest iteration of the current epoch not yet opened or passed
        self._request_at = float("-inf")

    @property
    def key_epoch(self) -> int | None:
        """The current key-epoch, or None without a key."""
        return self._epoch

    def install(self, node_key: bytes, frames: Sequence[bytes], *, now: float) -> bool:
        """Install a SENDER_KEY message opened from ``node_key``'s link.

        Returns True if installed, False if it is not newer than what the
        receiver holds (a duplicate or stale distribution; nothing changes).
        A same-epoch key at a later iteration re-synchronises a receiver that
        fell more than :data:`~orbcast.ratchet.SENDER_KEY_MAX_SKIP` behind.
        Raises AuthenticationError for a malformed message.
        """
        head, body = _two(frames)
        h = _decode_head(head)
        m = _loads(body)
        if (h[1] != SENDER_KEY or len(h) != 3 or h[2] > U32_MAX or type(m) is not dict
                or not _uint(m.get("iteration")) or m["iteration"] > U32_MAX
                or not all(type(m.get(k)) is bytes and len(m[k]) == 32
                           for k in ("chain_key", "signing_key"))):
            raise _reject("malformed SENDER_KEY")
        epoch, iteration = h[2], m["iteration"]
        receiver = SenderKeyReceiver(epoch, iteration, m["chain_key"], m["signing_key"])
        if node_key != self._node or self._epoch is None:
            ring = SenderKeyRing()
            ring.install(receiver, now=now)
        elif epoch > self._epoch:
            ring = self._ring
            ring.install(receiver, now=now)
        elif (epoch == self._epoch and m["signing_key"] == self._signing
              and iteration > self._next):
            ring = SenderKeyRing()  # resync: the keys we lack are gone for good (replay fills)
            ring.install(receiver, now=now)
        else:
            return False
        self._ring, self._node, self._epoch = ring, node_key, epoch
        self._signing, self._next = m["signing_key"], iteration
        return True

    def open(self, frames: Sequence[bytes], *, now: float) -> list[bytes]:
        """Verify and decrypt a SEALED_BATCH / SEALED_HEARTBEAT; return the plain
        ``[BATCH or HEARTBEAT head, body]`` for :func:`orbcast.envelope.decode`.

        Raises AuthenticationError, state unchanged, for anything else: an
        unknown, old or expired key-epoch, a bad signature (e.g. a plant
        re-signing a frame), a replayed or too-far-ahead iteration, a bad tag,
        a tampered head (it is the AD), malformed frames.
        """
        head, body = _two(frames)
        h = _decode_head(head)
        plain_kind = _PLAIN_OF_SEALED.get(h[1])
        if plain_kind is None or len(h) != _EGRESS_ARITY[h[1]]:
            raise _reject(f"kind {h[1]} is not a sealed broadcast")
        pt = self._ring.decrypt(body, head, now=now)
        _, epoch, i = _SK_HEADER.unpack_from(body)
        if epoch == self._epoch and i >= self._next:
            self._next = i + 1
        return [cbor2.dumps([VERSION, plain_kind, *h[2:]]), pt]

    def wants_key(self, frames: Sequence[bytes]) -> int | None:
        """For a frame :meth:`open` refused: the key-epoch to ask the node for, if the frame
        names one newer than ours, we have none, or we fell too far behind; else None. Pure."""
        try:
            head, body = _two(frames)
            h = _decode_head(head)
        except AuthenticationError:
            return None
        if h[1] not in _PLAIN_OF_SEALED or len(body) < SENDER_KEY_HEADER_LEN:
            return None
        _, epoch, i = _SK_HEADER.unpack_from(body)
        if self._epoch is None or epoch > self._epoch:
            return epoch
        if epoch == self._epoch and i > self._next + SENDER_KEY_MAX_SKIP:
            return epoch
        return None

    def key_request(self, frames: Sequence[bytes] | None, *, rid: int, now: float) -> list[bytes] | None:
        """The inner KEY_REQUEST to seal and send, rate-limited to one per
        :data:`KEY_REQUEST_INTERVAL`; None if not needed or too soon. ``frames``
        is the refused broadcast (None: ask because we have no key at all)."""
        epoch = (0 if self._epoch is None else None) if frames is None else self.wants_key(frames)
        if epoch is None or now < self._request_at:
            return None
        self._request_at = now + KEY_REQUEST_INTERVAL
        return [cbor2.dumps([VERSION, KEY_REQUEST, rid]), cbor2.dumps({"key_epoch": epoch})]

    def expire(self, now: float) -> None:
        """Drop the previous key-epoch once its grace period is over (call from a timer)."""
        self._ring.expire(now)

    def export_state(self) -> dict[str, Any]:
        """Test-only state dump."""
        return {"ring": self._ring.export_state(), "node": self._node, "epoch": self._epoch,
                "next": self._next}


# --- ACL helpers for the node driver ---------------------------------------------------------


def filter_readable(entry: AllowEntry | None, records: Iterable[R]) -> list[R]:
    """Keep the records ``entry`` may read (for replay chunks). ``records`` are
    :class:`~orbcast.envelope.Message` values or raw encoded records (the log's
    bytes); a revoked plant (``entry`` None) gets nothing."""
    if entry is None or not entry.read:
        return []
    out = []
    for r in records:
        topic = r.topic if isinstance(r, Message) else record_topic(r)  # type: ignore[arg-type]
        if entry.may_read(topic):
            out.append(r)
    return out


def publish_refusal(entry: AllowEntry | None, producer: str,
                    items: Iterable[tuple[int, str, bytes]]) -> str | None:
    """Why a PUBLISH from ``entry`` must be refused, or None if it may go through.

    A plant publishes only under its allowlisted name (its producer id keys
    deduplication: another id would let it shadow a neighbour's messages) and
    only on its ``publish`` prefixes. All-or-nothing, like PUBLISH validation.
    """
    if entry is None:
        return "plant key is not on the allowlist"
    if producer != entry.name:
        return f"plant {entry.name!r} may not publish as producer {producer!r}"
    for _pseq, topic, _payload in items:
        if not entry.may_publish(topic):
            return f"plant {entry.name!r} may not publish on topic {topic!r:.80}"
    return None
