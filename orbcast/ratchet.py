"""Link cryptography: the X3DH-style handshake, the Double Ratchet, sender keys.

This module implements /work/shared/crypto-profile.md ("the profile") on the
``cryptography`` package: Signal's Double Ratchet (rev. 1, section 3, with the
section 5.2 recommended primitives re-pinned by the profile) for pairwise
links, a triple-DH handshake to start one, and signed sender-key chains for
the egress broadcast. Every constant below is wire format: changing one is a
protocol version bump.

It is sans-I/O and must stay that way: it imports no ``zmq``, no ``time``, no
``logging`` and opens no files. Bytes go in, bytes come out; randomness comes
from an injectable key generator; time comes in as a ``now`` argument. The
driver persists :meth:`Session.to_bytes` (write, fsync, rename, mode 0600)
*before* a frame from :meth:`Session.encrypt` leaves the process.

Errors
------
Every rejection raises :class:`~orbcast.errors.AuthenticationError` and
nothing else: a frame that is malformed, truncated, tampered, replayed,
reflected, too far ahead, from another session or another key-epoch; a
public key that is all-zero, low-order or the wrong length; a serialized
state that does not parse. A rejected frame leaves the object exactly as it
was: no skipped keys stored, no DH step, no key drawn from the generator.
:class:`~orbcast.errors.LocalProtocolError` is raised only for misuse no peer
can cause (encrypting on a session with no sending chain yet, exhausting a
32-bit counter, a key generator returning something that is not 32 bytes).

Wire layouts (``u32`` is big-endian)
------------------------------------
Pairwise frame:  ``0x01 || dh(32) || u32 pn || u32 n || ct`` (41-byte header,
ct ends in a 16-byte Poly1305 tag). Broadcast frame: ``0x02 || u32 key_epoch
|| u32 i || ct || sig(64)``. Both AEADs authenticate
``ad_full = u32(len(AD)) || AD || header``; the broadcast signature covers
``ad_full || ct``.

Test seams (public on purpose, documented here so nobody removes them)
-----------------------------------------------------------------------
* Pure functions :func:`kdf_rk`, :func:`kdf_ck` (returns ``(ck_next, mk)``),
  :func:`encode_header`, :func:`decode_header`, :func:`ad_full`,
  :func:`encrypt_pairwise` / :func:`decrypt_pairwise`,
  :func:`encrypt_sender_key` / :func:`decrypt_sender_key`, so tests can check
  known answers computed independently with raw primitives.
* :func:`initiator_handshake` / :func:`responder_handshake` (one call per side).
* ``keygen=`` on :class:`Session`, ``rand=`` on :class:`SenderKeySender`, so
  two implementations fed the same generator reach the same state.
* ``export_state()`` on every stateful class: a dict of the whole state
  *including secrets*, for tests only. Never log it, never send it.

Example::

    sk, ad = initiator_handshake(ik_a, ek_a, ik_b_pub, spk_b_pub, b"plant-7", b"seq-1")
    alice = Session.initiator(sk, ad, spk_b_pub)
    frame = alice.encrypt(b"hello")          # persist alice.to_bytes(), then send
    sk, ad = responder_handshake(ik_b, spk_b, ik_a_pub, ek_a_pub, b"plant-7", b"seq-1")
    bob = Session.responder(sk, ad, spk_b)
    assert bob.decrypt(frame) == b"hello"
"""

from __future__ import annotations

import hmac as _std_hmac
import os
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from orbcast.errors import AuthenticationError, LocalProtocolError

__all__ = [
    "MAX_SKIP",
    "MAX_SKIPPED_KEYS",
    "SENDER_KEY_MAX_SKIP",
    "SKIPPED_KEY_MAX_STEPS",
    "Header",
    "KeyGenerator",
    "SenderKeyReceiver",
    "SenderKeyRing",
    "SenderKeySender",
    "Session",
    "ad_full",
    "decode_header",
    "decrypt_pairwise",
    "decrypt_sender_key",
    "default_keygen",
    "encode_header",
    "encrypt_pairwise",
    "encrypt_sender_key",
    "generate_identity",
    "handshake_ad",
    "initiator_handshake",
    "kdf_ck",
    "kdf_rk",
    "public_from_private",
    "responder_handshake",
]

# --- sizes ---------------------------------------------------------------------
KEY_LEN = 32  # X25519 keys, DH outputs, root/chain/message keys: all 32 bytes.
AEAD_KEY_LEN = 32  # ChaCha20-Poly1305 key (RFC 8439).
AEAD_NONCE_LEN = 12  # ChaCha20-Poly1305 nonce (RFC 8439).
AEAD_TAG_LEN = 16  # Poly1305 tag; the shortest valid ciphertext is just the tag.
ENCRYPT_OKM_LEN = AEAD_KEY_LEN + AEAD_NONCE_LEN  # 44: ENCRYPT's HKDF output, key || nonce.
KDF_RK_OKM_LEN = 2 * KEY_LEN  # 64: KDF_RK's HKDF output, rk' || ck.
SIGNATURE_LEN = 64  # Ed25519 signature.
U32_MAX = 0xFFFF_FFFF  # Largest counter / epoch a u32BE field can carry.
ZERO_KEY = bytes(KEY_LEN)  # The all-zero public key / DH output, always rejected.

# --- domain separation (wire format) -------------------------------------------
X3DH_SALT = bytes(32)  # Profile: HKDF salt of the handshake is 32 x 0x00.
X3DH_PREFIX = b"\xff" * 32  # Profile: 32 x 0xFF before DH1||DH2||DH3 (X3DH's F for X25519).
X3DH_INFO = b"orbcast-x3dh-v1"  # Profile: HKDF info of the handshake.
AD_PREFIX = b"orbcast/1"  # Profile: first bytes of the handshake AD.
KDF_RK_INFO = b"orbcast-dr-v1 KDF_RK"  # Profile: HKDF info of KDF_RK.
KDF_CK_MK_INPUT = b"\x01"  # Profile: mk = HMAC(ck, 0x01).
KDF_CK_CK_INPUT = b"\x02"  # Profile: ck' = HMAC(ck, 0x02).
ENCRYPT_SALT = bytes(32)  # Profile: HKDF salt of ENCRYPT is 32 x 0x00.
PAIRWISE_ENCRYPT_INFO = b"orbcast-dr-v1 ENCRYPT chacha20poly1305"  # Profile: pairwise ENCRYPT info.
SENDER_KEY_ENCRYPT_INFO = b"orbcast-senderkey-v1 ENCRYPT chacha20poly1305"  # Profile: broadcast.

# --- frame layouts (wire format) -----------------------------------------------
PAIRWISE_VERSION = 0x01  # First byte of every pairwise ratchet header.
SENDER_KEY_VERSION = 0x02  # First byte of every broadcast sender-key header.
_PAIRWISE_HEADER = struct.Struct(">B32sII")  # version, dh, pn, n
HEADER_LEN = _PAIRWISE_HEADER.size  # 41
_SENDER_KEY_HEADER = struct.Struct(">BII")  # version, key_epoch, iteration
SENDER_KEY_HEADER_LEN = _SENDER_KEY_HEADER.size  # 9
_U32 = struct.Struct(">I")

# --- bounds --------------------------------------------------------------------
MAX_SKIP = 1000  # Profile: most keys one frame may make us derive per chain (CPU DoS bound).
MAX_SKIPPED_KEYS = 2000  # Profile: skipped keys kept per session, oldest evicted (memory bound);
#                          two full MAX_SKIP jumps (old chain via pn + new chain via n) fit.
SKIPPED_KEY_MAX_STEPS = 4  # Profile: a receiving chain's skipped keys die 4 DH steps later.
SENDER_KEY_MAX_SKIP = 1000  # Profile: broadcast skip-ahead bound; a larger jump is a replay gap.
SENDER_KEY_MAX_SKIPPED_KEYS = 2000  # Broadcast skipped keys kept per key-epoch, oldest evicted;
#                                     same memory budget as a pairwise session.
SENDER_KEY_GRACE_SECONDS = 5.0  # How long the previous key-epoch still decrypts after a
#                                 rotation: ample for batches in flight on a LAN PUB socket.

# --- persistence (see Session.to_bytes / SenderKeyReceiver.to_bytes) ---------------
SESSION_MAGIC = b"ORDR"  # Marks a serialized pairwise Session.
SESSION_FORMAT = 1  # Bump on any change of the layout below.
_SESSION_FIXED = struct.Struct(">4sBBQQQQII32s32s32s32s32s")
#   magic, format, flags, u64 Ns, u64 Nr, u64 PN, u64 steps, u32 n_skipped, u32 len(AD),
#   RK, DHs private, CKs, CKr, DHr (an absent optional key is 32 zero bytes)
#   then AD, then n_skipped x (dh 32 || u32 n || u32 step || mk 32), oldest first.
_SESSION_SKIPPED = struct.Struct(">32sII32s")
_FLAG_CKS, _FLAG_CKR, _FLAG_DHR = 0x01, 0x02, 0x04  # Which optional keys are present.
SENDER_KEY_MAGIC = b"ORSK"  # Marks a serialized SenderKeyReceiver.
SENDER_KEY_FORMAT = 1  # Bump on any change of the layout below.
_SENDER_KEY_FIXED = struct.Struct(">4sBIQI32s32s")
#   magic, format, u32 key_epoch, u64 iteration, u32 n_skipped, chain key, signing public key
#   then n_skipped x (u32 i || mk 32), oldest first.
_SENDER_KEY_SKIPPED = struct.Struct(">I32s")

KeyGenerator = Callable[[], bytes]
"""A callable returning a fresh 32-byte X25519 private key."""


def _reject(reason: str) -> AuthenticationError:
    return AuthenticationError(f"link authentication failed: {reason}")


def _require_key(value: Any, what: str) -> bytes:
    """Return ``value`` as bytes if it is exactly 32 bytes, else reject it."""
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != KEY_LEN:
        raise _reject(f"{what} must be {KEY_LEN} bytes")
    return bytes(value)


def _as_bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(f"{what} must be bytes, not {type(value).__name__}")
    return bytes(value)


# --- keys ----------------------------------------------------------------------


def default_keygen() -> bytes:
    """Return a fresh X25519 private key: 32 bytes from ``os.urandom``."""
    return os.urandom(KEY_LEN)


def public_from_private(priv: bytes) -> bytes:
    """Return the 32-byte X25519 public key of a 32-byte private key.

    Raises AuthenticationError if ``priv`` is not 32 bytes.
    """
    key = X25519PrivateKey.from_private_bytes(_require_key(priv, "private key"))
    return key.public_key().public_bytes_raw()


def generate_identity() -> tuple[bytes, bytes]:
    """Return a new long-term X25519 identity key pair ``(private, public)``, raw bytes."""
    priv = default_keygen()
    return priv, public_from_private(priv)


def _dh(priv: bytes, pub: bytes) -> bytes:
    """X25519(priv, pub); reject all-zero / low-order / malformed public keys."""
    pub = _require_key(pub, "public key")
    if pub == ZERO_KEY:
        raise _reject("all-zero public key")
    try:
        out = X25519PrivateKey.from_private_bytes(_require_key(priv, "private key")).exchange(
            X25519PublicKey.from_public_bytes(pub)
        )
    except ValueError:  # cryptography refuses an all-zero shared secret (low-order point)
        raise _reject("low-order public key") from None
    if _std_hmac.compare_digest(out, ZERO_KEY):  # belt and braces: never use a zero secret
        raise _reject("low-order public key")
    return out


# --- KDFs and AEAD ---------------------------------------------------------------


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _hmac(key: bytes, data: bytes) -> bytes:
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


def kdf_rk(rk: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    """Root KDF: ``HKDF(salt=rk, ikm=dh_out, info="orbcast-dr-v1 KDF_RK", L=64)``.

    Returns ``(rk_next, ck)`` = ``(okm[0:32], okm[32:64])``.
    """
    okm = _hkdf(rk, dh_out, KDF_RK_INFO, KDF_RK_OKM_LEN)
    return okm[:KEY_LEN], okm[KEY_LEN:]


def kdf_ck(ck: bytes) -> tuple[bytes, bytes]:
    """Chain KDF. Returns ``(ck_next, mk)``: ``ck_next = HMAC(ck, 0x02)``, ``mk = HMAC(ck, 0x01)``.

    Note the order: the next chain key comes first, the message key second.
    """
    return _hmac(ck, KDF_CK_CK_INPUT), _hmac(ck, KDF_CK_MK_INPUT)


def _aead(mk: bytes, info: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    okm = _hkdf(ENCRYPT_SALT, mk, info, ENCRYPT_OKM_LEN)
    return ChaCha20Poly1305(okm[:AEAD_KEY_LEN]), okm[AEAD_KEY_LEN:]


def _seal(info: bytes, mk: bytes, plaintext: bytes, adf: bytes) -> bytes:
    aead, nonce = _aead(mk, info)
    return aead.encrypt(nonce, plaintext, adf)


def _open(info: bytes, mk: bytes, ct: bytes, adf: bytes) -> bytes:
    aead, nonce = _aead(mk, info)
    try:
        return aead.decrypt(nonce, ct, adf)  # constant-time tag check inside
    except InvalidTag:
        raise _reject("bad tag") from None


def encrypt_pairwise(mk: bytes, plaintext: bytes, ad_full: bytes) -> bytes:
    """Profile ENCRYPT with the pairwise info string; returns ciphertext || 16-byte tag."""
    return _seal(PAIRWISE_ENCRYPT_INFO, mk, plaintext, ad_full)


def decrypt_pairwise(mk: bytes, ciphertext: bytes, ad_full: bytes) -> bytes:
    """Inverse of :func:`encrypt_pairwise`. Raises AuthenticationError on a bad tag."""
    return _open(PAIRWISE_ENCRYPT_INFO, mk, ciphertext, ad_full)


def encrypt_sender_key(mk: bytes, plaintext: bytes, ad_full: bytes) -> bytes:
    """Profile ENCRYPT with the sender-key info string; returns ciphertext || tag."""
    return _seal(SENDER_KEY_ENCRYPT_INFO, mk, plaintext, ad_full)


def decrypt_sender_key(mk: bytes, ciphertext: bytes, ad_full: bytes) -> bytes:
    """Inverse of :func:`encrypt_sender_key`. Raises AuthenticationError on a bad tag."""
    return _open(SENDER_KEY_ENCRYPT_INFO, mk, ciphertext, ad_full)


def ad_full(ad: bytes, header: bytes) -> bytes:
    """Return ``u32BE(len(ad)) || ad || header``, the AEAD associated data of a frame."""
    if len(ad) > U32_MAX:
        raise LocalProtocolError("associated data longer than 2**32 - 1 bytes")
    return _U32.pack(len(ad)) + ad + header


# --- pairwise header ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    """A decoded pairwise ratchet header: sender's ratchet key ``dh``, previous
    chain length ``pn`` and message number ``n``."""

    dh: bytes
    pn: int
    n: int

    def __post_init__(self) -> None:
        if len(self.dh) != KEY_LEN:
            raise LocalProtocolError("header dh must be 32 bytes")
        if not (0 <= self.pn <= U32_MAX and 0 <= self.n <= U32_MAX):
            raise LocalProtocolError("header pn / n must fit in a u32")


def encode_header(dh_pub: bytes, pn: int, n: int) -> bytes:
    """Return the 41-byte header ``0x01 || dh_pub || u32BE(pn) || u32BE(n)``.

    Raises LocalProtocolError if ``dh_pub`` is not 32 bytes or a counter does not fit.
    """
    h = Header(dh=_as_bytes(dh_pub, "dh_pub"), pn=pn, n=n)
    return _PAIRWISE_HEADER.pack(PAIRWISE_VERSION, h.dh, h.pn, h.n)


def decode_header(b: bytes) -> Header:
    """Parse exactly 41 header bytes. Raises AuthenticationError on a wrong length,
    a version byte other than 0x01, or an all-zero ``dh``."""
    if len(b) != HEADER_LEN:
        raise _reject("header must be 41 bytes")
    version, dh, pn, n = _PAIRWISE_HEADER.unpack(b)
    if version != PAIRWISE_VERSION:
        raise _reject("unknown header version")
    if dh == ZERO_KEY:
        raise _reject("all-zero ratchet key")
    return Header(dh=dh, pn=pn, n=n)


# --- handshake -------------------------------------------------------------------


def handshake_ad(ik_a_pub: bytes, ik_b_pub: bytes, plant_id: bytes, node_id: bytes) -> bytes:
    """Return the session AD: ``"orbcast/1" || IK_A || IK_B || u32(len plant_id) || plant_id
    || u32(len node_id) || node_id``. Raises AuthenticationError for a key of the wrong length."""
    plant_id, node_id = _as_bytes(plant_id, "plant_id"), _as_bytes(node_id, "node_id")
    return (AD_PREFIX + _require_key(ik_a_pub, "IK_A") + _require_key(ik_b_pub, "IK_B")
            + _U32.pack(len(plant_id)) + plant_id + _U32.pack(len(node_id)) + node_id)


def _x3dh_sk(dh1: bytes, dh2: bytes, dh3: bytes) -> bytes:
    return _hkdf(X3DH_SALT, X3DH_PREFIX + dh1 + dh2 + dh3, X3DH_INFO, KEY_LEN)


def initiator_handshake(ik_a_priv: bytes, ek_a_priv: bytes, ik_b_pub: bytes, spk_b_pub: bytes,
                        plant_id: bytes, node_id: bytes) -> tuple[bytes, bytes]:
    """The plant's (A's) half of the handshake. Returns ``(SK, AD)``.

    ``ik_b_pub`` must be the node key the plant has *pinned*: a node holding
    another key derives another SK, and the first frame fails to authenticate.
    ``ek_a_priv`` is fresh per handshake and discarded afterwards. Raises
    AuthenticationError for a key of the wrong length or a low-order key.
    """
    dh1 = _dh(ik_a_priv, spk_b_pub)  # DH(IK_A, SPK_B)
    dh2 = _dh(ek_a_priv, ik_b_pub)  # DH(EK_A, IK_B)
    dh3 = _dh(ek_a_priv, spk_b_pub)  # DH(EK_A, SPK_B)
    return _x3dh_sk(dh1, dh2, dh3), handshake_ad(public_from_private(ik_a_priv), ik_b_pub,
                                                 plant_id, node_id)


def responder_handshake(ik_b_priv: bytes, spk_b_priv: bytes, ik_a_pub: bytes, ek_a_pub: bytes,
                        plant_id: bytes, node_id: bytes, *,
                        allowlist: Collection[bytes] | None = None) -> tuple[bytes, bytes]:
    """The sequencer node's (B's) half of the handshake. Returns ``(SK, AD)``.

    If ``allowlist`` is given, ``ik_a_pub`` must be in it (else AuthenticationError,
    before any DH). Raises AuthenticationError for wrong-length or low-order keys.
    """
    if allowlist is not None and _require_key(ik_a_pub, "IK_A") not in allowlist:
        raise _reject("initiator identity key not on the allowlist")
    dh1 = _dh(spk_b_priv, ik_a_pub)  # DH(IK_A, SPK_B)
    dh2 = _dh(ik_b_priv, ek_a_pub)  # DH(EK_A, IK_B)
    dh3 = _dh(spk_b_priv, ek_a_pub)  # DH(EK_A, SPK_B)
    return _x3dh_sk(dh1, dh2, dh3), handshake_ad(ik_a_pub, public_from_private(ik_b_priv),
                                                 plant_id, node_id)


# --- pairwise session ----------------------------------------------------------------


class Session:
    """One side of a Double Ratchet link (spec section 3, profile section "Double Ratchet").

    Build it with :meth:`initiator` (the plant, "Alice") or :meth:`responder`
    (the node, "Bob"), or restore it with :meth:`from_bytes`. The responder can
    only :meth:`encrypt` after it has decrypted the initiator's first frame.

    Skipped message keys are kept per ``(dh, n)``, at most :data:`MAX_SKIPPED_KEYS`
    (oldest evicted), and are deleted :data:`SKIPPED_KEY_MAX_STEPS` receiving
    DH ratchet steps after the step that opened their chain.
    """

    __slots__ = (
        "_ad",
        "_ckr",
        "_cks",
        "_dhr",
        "_dhs_priv",
        "_dhs_pub",
        "_keygen",
        "_nr",
        "_ns",
        "_pn",
        "_rk",
        "_skipped",
        "_steps",
    )

    def __init__(self, ad: bytes, keygen: KeyGenerator, rk: bytes, dhs_priv: bytes, *,
                 dhr: bytes | None = None, cks: bytes | None = None, ckr: bytes | None = None,
                 ns: int = 0, nr: int = 0, pn: int = 0, steps: int = 0,
                 skipped: dict[tuple[bytes, int], tuple[bytes, int]] | None = None) -> None:
        """Internal; use :meth:`initiator`, :meth:`responder` or :meth:`from_bytes`."""
        self._ad = ad
        self._keygen = keygen
        self._rk = rk
        self._dhs_priv = dhs_priv
        self._dhs_pub = public_from_private(dhs_priv)
        self._dhr = dhr
        self._cks = cks
        self._ckr = ckr
        self._ns, self._nr, self._pn, self._steps = ns, nr, pn, steps
        # (dh, n) -> (mk, index of the receiving chain it belongs to); insertion order = age.
        self._skipped: dict[tuple[bytes, int], tuple[bytes, int]] = skipped or {}

    @classmethod
    def initiator(cls, sk: bytes, ad: bytes, peer_ratchet_pub: bytes, *,
                  keygen: KeyGenerator = default_keygen) -> Session:
        """Alice (spec 3.3): draw DHs from ``keygen`` now, ``RK, CKs = KDF_RK(SK, DH(DHs, SPK_B))``.

        ``peer_ratchet_pub`` is ``SPK_B``. Raises AuthenticationError for a
        wrong-length ``sk`` or a bad ``peer_ratchet_pub``.
        """
        sk = _require_key(sk, "SK")
        peer = _require_key(peer_ratchet_pub, "peer ratchet key")
        dhs = _draw(keygen)
        rk, cks = kdf_rk(sk, _dh(dhs, peer))
        return cls(_as_bytes(ad, "ad"), keygen, rk, dhs, dhr=peer, cks=cks)

    @classmethod
    def responder(cls, sk: bytes, ad: bytes, own_ratchet_priv: bytes, *,
                  keygen: KeyGenerator = default_keygen) -> Session:
        """Bob (spec 3.3): ``DHs = SPK_B``, ``RK = SK``, no chains yet."""
        return cls(_as_bytes(ad, "ad"), keygen, _require_key(sk, "SK"),
                   _require_key(own_ratchet_priv, "own ratchet key"))

    # -- sending -----------------------------------------------------------------

    def encrypt(self, plaintext: bytes) -> bytes:
        """Encrypt one message; return the frame ``header || ct``.

        Advances the sending chain: persist :meth:`to_bytes` before the frame
        leaves the process. A retry must call this again (new ``n``), never
        resend a frame. Raises LocalProtocolError if there is no sending
        chain yet (a responder that has not received) or ``Ns`` is exhausted.
        """
        if self._cks is None:
            raise LocalProtocolError("no sending chain yet: the responder must receive first")
        if self._ns > U32_MAX:
            raise LocalProtocolError("sending chain exhausted; start a new session")
        header = encode_header(self._dhs_pub, self._pn, self._ns)
        cks, mk = kdf_ck(self._cks)
        ct = encrypt_pairwise(mk, _as_bytes(plaintext, "plaintext"), ad_full(self._ad, header))
        self._cks, self._ns = cks, self._ns + 1
        return header + ct

    # -- receiving ---------------------------------------------------------------

    def decrypt(self, frame: bytes) -> bytes:
        """Authenticate and decrypt one frame; return the plaintext.

        All-or-nothing (spec 3.5 on a copy): keys are derived into locals and
        the state is committed only after the AEAD tag checks out. On a new
        ratchet key the next sending key pair is drawn from ``keygen`` at that
        point, never before. Raises AuthenticationError for anything not a
        fresh, authentic frame of this session; the session is then unchanged.
        """
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise _reject("frame must be bytes")
        frame = bytes(frame)
        if len(frame) < HEADER_LEN + AEAD_TAG_LEN:
            raise _reject("frame too short")
        raw_header, ct = frame[:HEADER_LEN], frame[HEADER_LEN:]
        h = decode_header(raw_header)
        adf = ad_full(self._ad, raw_header)
        stored = self._skipped.get((h.dh, h.n))
        if stored is not None:
            plaintext = decrypt_pairwise(stored[0], ct, adf)
            del self._skipped[(h.dh, h.n)]  # a key opens exactly one frame
            return plaintext
        if h.dh == self._dhr:
            return self._decrypt_current_chain(h, ct, adf)
        return self._decrypt_new_chain(h, ct, adf)

    def _decrypt_current_chain(self, h: Header, ct: bytes, adf: bytes) -> bytes:
        if self._ckr is None:  # the initiator's DHr = SPK_B never sends
            raise _reject("no receiving chain for this ratchet key")
        if h.n < self._nr:
            raise _reject("replayed or expired message number")
        if self._nr + MAX_SKIP < h.n:
            raise _reject("message number too far ahead")
        ckr, skipped = _walk(self._ckr, self._nr, h.n)
        ckr, mk = kdf_ck(ckr)
        plaintext = decrypt_pairwise(mk, ct, adf)
        # -- commit --
        self._ckr, self._nr = ckr, h.n + 1
        self._store_skipped(h.dh, skipped, self._steps)
        return plaintext

    def _decrypt_new_chain(self, h: Header, ct: bytes, adf: bytes) -> bytes:
        if h.dh == self._dhs_pub:
            raise _reject("own ratchet key reflected back")
        # MAX_SKIP on both chains before deriving any key.
        if self._nr + MAX_SKIP < h.pn or h.n > MAX_SKIP:  # Nr is 0 on the new chain
            raise _reject("message number too far ahead")
        rk, ckr = kdf_rk(self._rk, _dh(self._dhs_priv, h.dh))
        ckr, new_skipped = _walk(ckr, 0, h.n)
        ckr, mk = kdf_ck(ckr)
        plaintext = decrypt_pairwise(mk, ct, adf)
        # -- point of no return: authentic. Finish the DH step (spec DHRatchet). --
        old_skipped: list[tuple[int, bytes]] = []
        if self._ckr is not None and self._dhr is not None:
            _, old_skipped = _walk(self._ckr, self._nr, h.pn)
        dhs = _draw(self._keygen)
        rk, cks = kdf_rk(rk, _dh(dhs, h.dh))
        old_dhr, old_step = self._dhr, self._steps
        self._pn, self._ns, self._nr = self._ns, 0, h.n + 1
        self._dhr, self._rk, self._ckr, self._cks = h.dh, rk, ckr, cks
        self._dhs_priv, self._dhs_pub = dhs, public_from_private(dhs)
        self._steps = old_step + 1
        if old_dhr is not None:
            self._store_skipped(old_dhr, old_skipped, old_step)
        self._store_skipped(h.dh, new_skipped, self._steps)
        oldest_alive = self._steps - SKIPPED_KEY_MAX_STEPS + 1
        for key in [k for k, (_, step) in self._skipped.items() if step < oldest_alive]:
            del self._skipped[key]
        return plaintext

    def _store_skipped(self, dh: bytes, keys: list[tuple[int, bytes]], step: int) -> None:
        for n, mk in keys:
            self._skipped[(dh, n)] = (mk, step)
        excess = len(self._skipped) - MAX_SKIPPED_KEYS
        for key in list(self._skipped)[:max(excess, 0)]:  # oldest first
            del self._skipped[key]

    # -- test seam and persistence ----------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """Return the whole state, secrets included. **Test-only**: never log or send it.

        Keys: ``RK, CKs, CKr, DHs`` (public), ``DHr`` (bytes or None), ``Ns, Nr, PN``,
        ``steps`` (receiving DH ratchet steps so far) and ``skipped``: a sorted
        tuple of ``(dh, n, mk, step)``.
        """
        return {
            "RK": self._rk, "CKs": self._cks, "CKr": self._ckr,
            "DHs": self._dhs_pub, "DHr": self._dhr,
            "Ns": self._ns, "Nr": self._nr, "PN": self._pn, "steps": self._steps,
            "skipped": tuple(sorted((dh, n, mk, step)
                                    for (dh, n), (mk, step) in self._skipped.items())),
        }

    def to_bytes(self) -> bytes:
        """Serialize the session (format :data:`SESSION_FORMAT`, layout at ``_SESSION_FIXED``).

        The result holds every secret of the link: store it with mode 0600,
        never back it up, never copy it to another node.
        """
        flags = ((_FLAG_CKS if self._cks is not None else 0)
                 | (_FLAG_CKR if self._ckr is not None else 0)
                 | (_FLAG_DHR if self._dhr is not None else 0))
        parts = [_SESSION_FIXED.pack(
            SESSION_MAGIC, SESSION_FORMAT, flags, self._ns, self._nr, self._pn, self._steps,
            len(self._skipped), len(self._ad), self._rk, self._dhs_priv,
            self._cks or ZERO_KEY, self._ckr or ZERO_KEY, self._dhr or ZERO_KEY), self._ad]
        parts += [_SESSION_SKIPPED.pack(dh, n, step, mk)
                  for (dh, n), (mk, step) in self._skipped.items()]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, b: bytes, *, keygen: KeyGenerator = default_keygen) -> Session:
        """Restore a session written by :meth:`to_bytes`. Raises AuthenticationError
        if ``b`` is not exactly one well-formed serialized session."""
        b = bytes(b)
        if len(b) < _SESSION_FIXED.size:
            raise _reject("serialized session truncated")
        (magic, fmt, flags, ns, nr, pn, steps, count, ad_len,
         rk, dhs, cks, ckr, dhr) = _SESSION_FIXED.unpack_from(b)
        if magic != SESSION_MAGIC or fmt != SESSION_FORMAT or flags & ~0x07:
            raise _reject("not a serialized session of this format")
        absent_nonzero = any(not flags & flag and key != ZERO_KEY for flag, key in
                             ((_FLAG_CKS, cks), (_FLAG_CKR, ckr), (_FLAG_DHR, dhr)))
        if (count > MAX_SKIPPED_KEYS or absent_nonzero
                or (flags & _FLAG_CKR and not flags & _FLAG_DHR)):
            raise _reject("inconsistent serialized session")
        end = _SESSION_FIXED.size + ad_len
        if len(b) != end + count * _SESSION_SKIPPED.size:
            raise _reject("serialized session has the wrong length")
        skipped: dict[tuple[bytes, int], tuple[bytes, int]] = {}
        for off in range(end, len(b), _SESSION_SKIPPED.size):
            s_dh, s_n, s_step, s_mk = _SESSION_SKIPPED.unpack_from(b, off)
            skipped[(s_dh, s_n)] = (s_mk, s_step)
        if len(skipped) != count:
            raise _reject("duplicate skipped key in serialized session")
        return cls(b[_SESSION_FIXED.size:end], keygen, rk, dhs,
                   dhr=dhr if flags & _FLAG_DHR else None,
                   cks=cks if flags & _FLAG_CKS else None,
                   ckr=ckr if flags & _FLAG_CKR else None,
                   ns=ns, nr=nr, pn=pn, steps=steps, skipped=skipped)


def _draw(keygen: KeyGenerator) -> bytes:
    key = keygen()
    if not isinstance(key, bytes) or len(key) != KEY_LEN:
        raise LocalProtocolError("keygen must return 32 bytes")
    return key


def _walk(ck: bytes, start: int, until: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Advance ``ck`` from message ``start`` to ``until``; return it and the keys passed."""
    keys: list[tuple[int, bytes]] = []
    for n in range(start, until):
        ck, mk = kdf_ck(ck)
        keys.append((n, mk))
    return ck, keys


# --- broadcast sender keys -------------------------------------------------------------


class SenderKeySender:
    """The active node's sending half of one broadcast key-epoch.

    Draws ``CK_0`` then the Ed25519 seed from ``rand`` (in that order) unless
    given. Deliberately not serializable: after a restart or failover a node
    starts a new key-epoch and never continues a chain.
    """

    __slots__ = ("_ck", "_iteration", "_key_epoch", "_signing_key", "_signing_public")

    def __init__(self, key_epoch: int, *, chain_key: bytes | None = None,
                 signing_key: Ed25519PrivateKey | None = None,
                 rand: Callable[[int], bytes] = os.urandom) -> None:
        if not 0 <= key_epoch <= U32_MAX:
            raise LocalProtocolError("key_epoch must fit in a u32")
        self._key_epoch = key_epoch
        self._iteration = 0
        self._ck = _require_key(chain_key if chain_key is not None else rand(KEY_LEN), "chain key")
        if signing_key is None:
            signing_key = Ed25519PrivateKey.from_private_bytes(
                _require_key(rand(KEY_LEN), "signing seed"))
        self._signing_key = signing_key
        self._signing_public = signing_key.public_key().public_bytes_raw()

    @property
    def key_epoch(self) -> int:
        """The key-epoch this sender encrypts under."""
        return self._key_epoch

    @property
    def iteration(self) -> int:
        """Index ``i`` of the next frame (0-based); rotate long before 2**32."""
        return self._iteration

    def encrypt(self, plaintext: bytes, ad: bytes) -> bytes:
        """Encrypt and sign one batch; return ``header || ct || sig``.

        ``ad`` is the cleartext carrier header of the batch. Raises
        LocalProtocolError once the chain is exhausted (rotate first).
        """
        if self._iteration > U32_MAX:
            raise LocalProtocolError("sender-key chain exhausted; rotate the key-epoch")
        header = _SENDER_KEY_HEADER.pack(SENDER_KEY_VERSION, self._key_epoch, self._iteration)
        adf = ad_full(_as_bytes(ad, "ad"), header)
        ck, mk = kdf_ck(self._ck)
        ct = encrypt_sender_key(mk, _as_bytes(plaintext, "plaintext"), adf)
        sig = self._signing_key.sign(adf + ct)
        self._ck, self._iteration = ck, self._iteration + 1
        return header + ct + sig

    def distribution(self) -> tuple[int, int, bytes, bytes]:
        """Return ``(key_epoch, iteration, CK_iteration, signing_public_key)`` to hand
        to an authorised plant over its pairwise link: ``SenderKeyReceiver(*dist)``."""
        return self._key_epoch, self._iteration, self._ck, self._signing_public

    def export_state(self) -> dict[str, Any]:
        """Test-only state dump (secret chain key included)."""
        return {"key_epoch": self._key_epoch, "iteration": self._iteration,
                "chain_key": self._ck, "signing_public": self._signing_public}


class SenderKeyReceiver:
    """A plant's receiving half of one broadcast key-epoch.

    Built from a sender's :meth:`SenderKeySender.distribution`. Frames may
    arrive out of order: keys passed over are kept (at most
    :data:`SENDER_KEY_MAX_SKIPPED_KEYS`, oldest evicted) and deleted on use.
    """

    __slots__ = ("_ck", "_iteration", "_key_epoch", "_signing_public", "_skipped", "_verifier")

    def __init__(self, key_epoch: int, iteration: int, chain_key: bytes,
                 signing_public: bytes) -> None:
        """Raises AuthenticationError for wrong-length keys or out-of-range counters."""
        if not (0 <= key_epoch <= U32_MAX and 0 <= iteration <= U32_MAX + 1):
            raise _reject("sender-key epoch / iteration out of range")
        self._key_epoch = key_epoch
        self._iteration = iteration
        self._ck = _require_key(chain_key, "sender chain key")
        self._signing_public = _require_key(signing_public, "signing public key")
        try:
            self._verifier = Ed25519PublicKey.from_public_bytes(self._signing_public)
        except ValueError:
            raise _reject("malformed signing public key") from None
        self._skipped: dict[int, bytes] = {}  # iteration -> mk; insertion order = age

    @property
    def key_epoch(self) -> int:
        """The key-epoch this receiver decrypts."""
        return self._key_epoch

    def decrypt(self, frame: bytes, ad: bytes) -> bytes:
        """Verify the signature, then decrypt one broadcast frame; return the plaintext.

        Rejects (AuthenticationError, state unchanged) a frame of another
        key-epoch, a bad signature, an iteration already used or behind the
        chain, a jump of more than :data:`SENDER_KEY_MAX_SKIP`, or a bad tag.
        """
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise _reject("frame must be bytes")
        frame = bytes(frame)
        if len(frame) < SENDER_KEY_HEADER_LEN + AEAD_TAG_LEN + SIGNATURE_LEN:
            raise _reject("broadcast frame too short")
        version, key_epoch, i = _SENDER_KEY_HEADER.unpack_from(frame)
        if version != SENDER_KEY_VERSION or key_epoch != self._key_epoch:
            raise _reject("unknown broadcast version or key-epoch")
        ct, sig = frame[SENDER_KEY_HEADER_LEN:-SIGNATURE_LEN], frame[-SIGNATURE_LEN:]
        adf = ad_full(_as_bytes(ad, "ad"), frame[:SENDER_KEY_HEADER_LEN])
        try:
            self._verifier.verify(sig, adf + ct)
        except InvalidSignature:
            raise _reject("bad broadcast signature") from None
        mk = self._skipped.get(i)
        if mk is not None:
            plaintext = decrypt_sender_key(mk, ct, adf)
            del self._skipped[i]
            return plaintext
        if i < self._iteration:
            raise _reject("replayed or expired broadcast iteration")
        if self._iteration + SENDER_KEY_MAX_SKIP < i:
            raise _reject("broadcast iteration too far ahead")
        ck, passed = _walk(self._ck, self._iteration, i)
        ck, mk = kdf_ck(ck)
        plaintext = decrypt_sender_key(mk, ct, adf)
        # -- commit --
        self._ck, self._iteration = ck, i + 1
        self._skipped.update(passed)
        excess = len(self._skipped) - SENDER_KEY_MAX_SKIPPED_KEYS
        for key in list(self._skipped)[:max(excess, 0)]:
            del self._skipped[key]
        return plaintext

    def export_state(self) -> dict[str, Any]:
        """Test-only state dump; ``skipped`` is a sorted tuple of ``(i, mk)``."""
        return {"key_epoch": self._key_epoch, "iteration": self._iteration,
                "chain_key": self._ck, "signing_public": self._signing_public,
                "skipped": tuple(sorted(self._skipped.items()))}

    def to_bytes(self) -> bytes:
        """Serialize (format :data:`SENDER_KEY_FORMAT`, layout at ``_SENDER_KEY_FIXED``)."""
        return _SENDER_KEY_FIXED.pack(
            SENDER_KEY_MAGIC, SENDER_KEY_FORMAT, self._key_epoch, self._iteration,
            len(self._skipped), self._ck, self._signing_public,
        ) + b"".join(_SENDER_KEY_SKIPPED.pack(i, mk) for i, mk in self._skipped.items())

    @classmethod
    def from_bytes(cls, b: bytes) -> SenderKeyReceiver:
        """Restore from :meth:`to_bytes`. Raises AuthenticationError on malformed input."""
        b = bytes(b)
        if len(b) < _SENDER_KEY_FIXED.size:
            raise _reject("serialized sender key truncated")
        magic, fmt, key_epoch, iteration, count, ck, pub = _SENDER_KEY_FIXED.unpack_from(b)
        if magic != SENDER_KEY_MAGIC or fmt != SENDER_KEY_FORMAT:
            raise _reject("not a serialized sender key of this format")
        if (count > SENDER_KEY_MAX_SKIPPED_KEYS
                or len(b) != _SENDER_KEY_FIXED.size + count * _SENDER_KEY_SKIPPED.size):
            raise _reject("serialized sender key has the wrong length")
        skipped = dict(_SENDER_KEY_SKIPPED.iter_unpack(b[_SENDER_KEY_FIXED.size:]))
        if len(skipped) != count:
            raise _reject("duplicate skipped key in serialized sender key")
        receiver = cls(key_epoch, iteration, ck, pub)
        receiver._skipped = skipped
        return receiver


class SenderKeyRing:
    """A plant's broadcast receivers: the current key-epoch and at most one previous one.

    After :meth:`install` of a new key-epoch the previous one still decrypts
    until ``now + grace`` (seconds, on the caller's clock); the one before is
    dropped. The ring reads no clock: every call that needs time takes ``now``.
    """

    __slots__ = ("_current", "_previous", "_previous_until")

    def __init__(self) -> None:
        self._current: SenderKeyReceiver | None = None
        self._previous: SenderKeyReceiver | None = None
        self._previous_until = 0.0

    def install(self, receiver: SenderKeyReceiver, *, now: float,
                grace: float = SENDER_KEY_GRACE_SECONDS) -> None:
        """Make ``receiver`` current. Raises AuthenticationError (ring unchanged)
        unless its key-epoch is newer than the current one: epochs never go back."""
        if self._current is not None and receiver.key_epoch <= self._current.key_epoch:
            raise _reject("sender-key epoch is not newer than the current one")
        self._previous, self._previous_until = self._current, now + grace
        self._current = receiver

    def expire(self, now: float) -> None:
        """Drop the previous key-epoch once its grace has run out (call from the timer)."""
        if self._previous is not None and now >= self._previous_until:
            self._previous = None

    def decrypt(self, frame: bytes, ad: bytes, *, now: float) -> bytes:
        """Dispatch by the header's key-epoch to the current or (within grace) the
        previous receiver. Raises AuthenticationError for any other key-epoch."""
        if (not isinstance(frame, (bytes, bytearray, memoryview))
                or len(frame) < SENDER_KEY_HEADER_LEN):
            raise _reject("broadcast frame too short")
        _, key_epoch, _ = _SENDER_KEY_HEADER.unpack_from(bytes(frame))
        if self._current is not None and key_epoch == self._current.key_epoch:
            return self._current.decrypt(frame, ad)
        if (self._previous is not None and key_epoch == self._previous.key_epoch
                and now < self._previous_until):
            return self._previous.decrypt(frame, ad)
        raise _reject("unknown or expired sender-key epoch")

    def export_state(self) -> dict[str, Any]:
        """Test-only state dump of both receivers and the grace deadline."""
        return {
            "current": self._current.export_state() if self._current else None,
            "previous": self._previous.export_state() if self._previous else None,
            "previous_until": self._previous_until if self._previous else None,
        }
