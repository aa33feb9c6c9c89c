"""Strict CBOR decoding for every byte string that arrives from a peer.

``cbor2.loads`` is lenient in ways a wire protocol must not be: it decodes
the first item of its input and ignores whatever follows, and it accepts
indefinite-length items, duplicate map keys and semantic tags (a bignum
``c2 41 01`` is the integer 1; ``d9 d9 f7`` wraps any item invisibly;
string references make a small frame decode to repeated strings). Each of
those lets two encoders that disagree both look correct against this node,
and hides framing bugs. :func:`loads` refuses them (docs/protocol.md 1.6):

* bytes after the item: always (the decoder reports how much it read);
* indefinite lengths, duplicate map keys, map keys other than text or byte
  strings, and every tag: with cbor2 6 or newer, whose decoder has the
  switches for them. cbor2 5.x (the pure-Python wheel that 32-bit Pi OS
  installs) lacks them; there only unknown tags are refused and the rest of
  the checks is what each message's own type checks catch (see
  :data:`STRICT`).

It raises :class:`ValueError` (``RecursionError`` passes through for the
callers that report nesting separately); callers turn it into their own
protocol error. The cost is about 1 us per call: it runs once per frame,
never per record.
"""

from __future__ import annotations

import io
from typing import Any, NoReturn

import cbor2

__all__ = ["STRICT", "loads"]


def _no_tag(*_: Any) -> NoReturn:
    raise ValueError("CBOR tags are not allowed")


#: Every tag cbor2 decodes by itself is below 300 except the self-described
#: CBOR marker; any other tag reaches ``tag_hook``, which refuses it too.
_TAGS = {t: _no_tag for t in [*range(300), 55799, 55800, 55801]}

try:
    cbor2.loads(b"\x80", allow_indefinite=False)
except TypeError:        # cbor2 5.x: no strictness switches
    STRICT = False
    _OPTIONS: dict[str, Any] = {"tag_hook": _no_tag}
else:
    #: True when indefinite lengths, duplicate or non-string map keys and all
    #: tags are refused (cbor2 >= 6); trailing bytes are refused either way.
    STRICT = True
    _OPTIONS = {"allow_indefinite": False, "allow_duplicate_keys": False,
                "strict_hashable_types": True, "tag_hook": _no_tag, "semantic_decoders": _TAGS}

_Decoder = cbor2.CBORDecoder
_BytesIO = io.BytesIO
#: cbor2 5.x decodes a lone "break" byte (0xff) to a marker object (its C and
#: pure-Python decoders each have their own); 6.x raises instead.
_BREAK_TYPES = frozenset({"BreakMarkerType", "break_marker_type"})


def loads(b: bytes) -> Any:
    """Decode exactly one well-formed CBOR item that spans all of ``b``.

    Raises ``ValueError`` for anything else (malformed, truncated, trailing
    bytes, a refused feature), ``RecursionError`` for too deep nesting.
    """
    fp = _BytesIO(b)
    try:
        v = _Decoder(fp, **_OPTIONS).decode()
    except RecursionError:
        raise
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - cbor2 raises many types on garbage
        raise ValueError(str(exc)) from None
    if type(v).__name__ in _BREAK_TYPES:
        raise ValueError("a break code where a data item was expected")
    if fp.tell() != len(b):
        raise ValueError(f"{len(b) - fp.tell()} bytes after the CBOR item")
    return v
