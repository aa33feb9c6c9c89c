"""Long-term identity keys, the node's plant allowlist and the plant's node pins.

What this module is for
-----------------------
* **Identity files.** Every plant and every sequencer node has one long-term
  X25519 key pair. The private half lives in a small text file written
  atomically with mode 0600 (:func:`generate_identity_file`,
  :func:`write_private_file`); :func:`load_identity` refuses a file that is
  group- or world-accessible and says which ``chmod`` fixes it.
* **The public key as text.** ``orbcast1:`` followed by the 32 raw key bytes
  in unpadded base64url (43 characters), e.g.
  ``orbcast1:yEhd8dQbEu4bIyXrLa1Ad2Y5bdNGR9PAAUnGZAPGi1E``. It survives
  copy-paste through terminals, TOML and chat. :func:`parse_public` also
  accepts 64 hex digits. :func:`fingerprint` is a short form for logs.
* **The allowlist** (node side, TOML, one ``[[plant]]`` table per plant:
  ``name``, ``key``, ``publish`` and ``read`` topic-prefix lists) loaded by
  :func:`load_allowlist` into a pure :class:`Allowlist` that answers
  :meth:`~Allowlist.may_publish`, :meth:`~Allowlist.may_read`,
  :meth:`~Allowlist.lookup` and diffs against a reloaded copy
  (:meth:`~Allowlist.diff`, for SIGHUP / ``sequencer reload``).
* **Pins** (plant side, TOML, one ``[[node]]`` table per node: ``name``,
  ``key``): the node keys a plant accepts (:func:`load_pins`, :class:`NodePins`).

What it must never do: log or print a private key, write one with a mode
other than 0600, or accept a key file that other users can read. It does
file I/O (this is the key store), but no sockets and no clock.

File formats
------------
Private key file (``identity.key``), ASCII, exactly two lines::

    orbcast-identity-v1
    <43 characters: base64url of the 32-byte X25519 private key, no padding>

Public key file (``identity.pub``), one line: the ``orbcast1:`` form.

Allowlist (``allowlist.toml``)::

    [[plant]]
    name = "kitchen"                  # the plant's producer_id (1-64 printable ASCII)
    key = "orbcast1:..."              # `plant keys show` on that plant
    publish = ["sensors/kitchen/"]    # topic prefixes it may publish ("" = any)
    read = ["commands/kitchen/"]      # topic prefixes it may read ("" = any)

Pins (``pins.toml`` on a plant)::

    [[node]]
    name = "seq-a"
    key = "orbcast1:..."
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orbcast.errors import ConfigError
from orbcast.fsutil import fsync_dir
from orbcast.ratchet import KeyGenerator, default_keygen, public_from_private

__all__ = [
    "PRIVATE_HEADER",
    "PUBLIC_PREFIX",
    "AllowEntry",
    "Allowlist",
    "AllowlistDiff",
    "Identity",
    "NodePin",
    "NodePins",
    "fingerprint",
    "format_public",
    "generate_identity_file",
    "load_allowlist",
    "load_identity",
    "load_pins",
    "parse_allowlist",
    "parse_pins",
    "parse_public",
    "read_private_file",
    "write_private_file",
]

#: Text prefix of a public key; the ``1`` is the format version.
PUBLIC_PREFIX = "orbcast1:"
#: First line of a private key file; the ``v1`` is the format version.
PRIVATE_HEADER = "orbcast-identity-v1"
KEY_LEN = 32  # X25519 keys are 32 bytes.
#: Permission bits that must be clear on a private file: anything for group or others.
FORBIDDEN_MODE_BITS = 0o077
#: A private key file is two short lines; anything larger is not one (and is not read whole).
MAX_PRIVATE_FILE_BYTES = 4096
#: Allowlist / pins files: generous for a fleet of thousands, small enough to parse at SIGHUP.
MAX_LIST_FILE_BYTES = 4 << 20
#: Topic prefixes per entry and list: bounds the per-frame ACL check.
MAX_PREFIXES = 256
#: Longest topic prefix, the envelope's topic bound.
MAX_PREFIX_BYTES = 256
_NAME_RE = re.compile(r"^[!-~]{1,64}$")  # printable ASCII, no space: the envelope's producer id rule


# --- public key text form ---------------------------------------------------------------


def format_public(pub: bytes) -> str:
    """Return the copy-pasteable text form ``orbcast1:<base64url>`` of a 32-byte public key."""
    if not isinstance(pub, bytes) or len(pub) != KEY_LEN:
        raise ValueError("a public key is 32 bytes")
    return PUBLIC_PREFIX + base64.urlsafe_b64encode(pub).rstrip(b"=").decode("ascii")


def parse_public(text: str) -> bytes:
    """Parse ``orbcast1:<base64url>`` (or 64 hex digits) into 32 key bytes.

    Raises ValueError naming what is wrong. Surrounding whitespace is ignored.
    """
    if not isinstance(text, str):
        raise TypeError(f"a public key must be a string, not {type(text).__name__}")
    s = text.strip()
    if s.startswith(PUBLIC_PREFIX):
        b64 = s[len(PUBLIC_PREFIX):]
        if not re.fullmatch(r"[A-Za-z0-9_-]{43}", b64):
            raise ValueError(f"public key {s[:60]!r} is not {PUBLIC_PREFIX} followed by "
                             "43 base64url characters")
        raw = base64.urlsafe_b64decode(b64 + "=")
        if format_public(raw) != s:  # non-canonical trailing bits
            raise ValueError(f"public key {s[:60]!r} is not canonical base64url")
        return raw
    if re.fullmatch(r"[0-9a-fA-F]{64}", s):
        return bytes.fromhex(s)
    raise ValueError(f"public key {s[:60]!r} must look like {PUBLIC_PREFIX}<43 base64url "
                     "characters> (see `plant keys show`) or be 64 hex digits")


def fingerprint(pub: bytes) -> str:
    """A short, log-friendly name of a public key: 16 hex digits of its SHA-256."""
    return hashlib.sha256(pub).hexdigest()[:16]


# --- private files ----------------------------------------------------------------------


def write_private_file(path: str | os.PathLike[str], data: bytes, *,
                       overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600.

    Writes a temporary file in the same directory (created 0600, never
    wider), fsyncs it, renames it over ``path`` and fsyncs the directory: a
    crash leaves the old file or the new one, never a mix. With
    ``overwrite=False`` an existing ``path`` is refused (FileExistsError)
    and nothing is written. Drivers use this for persisted ratchet state.
    """
    p = Path(path)
    if not overwrite and p.exists():
        raise FileExistsError(f"{p} already exists; refusing to overwrite it")
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a umask can only narrow it, but be explicit
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        if not overwrite:
            os.link(tmp, p)  # fails if p appeared meanwhile; never clobbers
            tmp.unlink()
        else:
            os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


def read_private_file(path: str | os.PathLike[str], *, limit: int = MAX_PRIVATE_FILE_BYTES) -> bytes:
    """Read a private file, refusing one that group or others may access.

    Raises PermissionError naming the path, its mode and the ``chmod 600``
    fix; FileNotFoundError if it is missing; ValueError if it is larger than
    ``limit`` bytes or not a regular file.
    """
    p = Path(path)
    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    try:
        st = os.fstat(fd)  # check the file we opened, not a name that may change
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{p} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & FORBIDDEN_MODE_BITS:
            raise PermissionError(
                f"{p} has mode {mode:04o}: a private key must not be group- or world-accessible; "
                f"fix it with `chmod 600 {p}` (and consider the key exposed if others could read it)")
        if st.st_size > limit:
            raise ValueError(f"{p} is {st.st_size} bytes, larger than a private file may be ({limit})")
        chunks = []
        while chunk := os.read(fd, limit + 1):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# --- identities -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """A long-term X25519 key pair. ``repr`` never shows the private half."""

    private: bytes = field(repr=False)
    public: bytes

    def __post_init__(self) -> None:
        if len(self.private) != KEY_LEN or public_from_private(self.private) != self.public:
            raise ValueError("identity private and public keys do not match")

    @classmethod
    def from_private(cls, private: bytes) -> Identity:
        """Build the pair from the 32-byte private key."""
        if not isinstance(private, bytes) or len(private) != KEY_LEN:
            raise ValueError("a private key is 32 bytes")
        return cls(private, public_from_private(private))

    @classmethod
    def generate(cls, keygen: KeyGenerator = default_keygen) -> Identity:
        """A fresh key pair from ``keygen`` (default: ``os.urandom``)."""
        return cls.from_private(keygen())

    @property
    def public_text(self) -> str:
        """The ``orbcast1:`` form of the public key."""
        return format_public(self.public)


def _encode_private(private: bytes) -> bytes:
    b64 = base64.urlsafe_b64encode(private).rstrip(b"=")
    return PRIVATE_HEADER.encode("ascii") + b"\n" + b64 + b"\n"


def generate_identity_file(directory: str | os.PathLike[str], name: str = "identity", *,
                           keygen: KeyGenerator = default_keygen) -> tuple[Identity, Path, Path]:
    """Create ``DIR/NAME.key`` (mode 0600) and ``DIR/NAME.pub``; return ``(identity, key, pub)``.

    The directory is created with mode 0700 if missing. An existing key file
    is never overwritten (FileExistsError): replacing an identity means
    re-enrolling the device on every node's allowlist, so it must be a
    deliberate ``rm`` first.
    """
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path, pub_path = d / f"{name}.key", d / f"{name}.pub"
    if key_path.exists():
        raise FileExistsError(f"{key_path} already exists; remove it first if you really want a "
                              "new identity (every allowlist holding the old key must be updated)")
    ident = Identity.generate(keygen)
    write_private_file(key_path, _encode_private(ident.private), overwrite=False)
    tmp = pub_path.with_name(f".{pub_path.name}.tmp")
    tmp.write_text(ident.public_text + "\n", encoding="ascii")
    os.chmod(tmp, 0o644)
    os.replace(tmp, pub_path)
    return ident, key_path, pub_path


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Load a private key file written by :func:`generate_identity_file`.

    Raises PermissionError (group/world-accessible: names the ``chmod`` fix),
    FileNotFoundError, or ValueError naming the path for a malformed file.
    """
    raw = read_private_file(path)
    try:
        lines = raw.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not an orbcast private key file (not ASCII)") from None
    if len(lines) != 2 or lines[0] != PRIVATE_HEADER or not re.fullmatch(r"[A-Za-z0-9_-]{43}", lines[1]):
        raise ValueError(f"{path} is not an orbcast private key file (expected the line "
                         f"{PRIVATE_HEADER!r} and one line of 43 base64url characters)")
    try:
        private = base64.urlsafe_b64decode(lines[1] + "=")
    except binascii.Error:  # pragma: no cover - the regex admits only valid base64url
        raise ValueError(f"{path}: malformed base64url key") from None
    return Identity.from_private(private)


# --- topic prefixes ---------------------------------------------------------------------


def _prefix_matches(prefixes: tuple[str, ...], topic: str) -> bool:
    for p in prefixes:
        if topic.startswith(p):
            return True
    return False


# --- allowlist ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AllowEntry:
    """One allowlisted plant.

    ``name`` is the plant's producer id (a node refuses a PUBLISH under
    another producer id and a handshake naming another plant id);
    ``publish`` / ``read`` are topic prefixes, ``""`` matching every topic.
    """

    name: str
    key: bytes
    publish: tuple[str, ...] = ()
    read: tuple[str, ...] = ()

    def may_publish(self, topic: str) -> bool:
        """True if ``topic`` starts with one of the ``publish`` prefixes."""
        return _prefix_matches(self.publish, topic)

    def may_read(self, topic: str) -> bool:
        """True if ``topic`` starts with one of the ``read`` prefixes."""
        return _prefix_matches(self.read, topic)

    @property
    def gets_broadcast_key(self) -> bool:
        """True if the node hands this plant the egress sender key: only to plants
        that may read *every* topic (``""`` among ``read``). The live broadcast is one
        stream under one group key, so a key would open every topic; a plant with
        narrower ``read`` prefixes follows the live stream over its own pairwise link
        instead (PING for the tail, replay filtered by its prefixes)."""
        return "" in self.read


@dataclass(frozen=True, slots=True, kw_only=True)
class AllowlistDiff:
    """What changed between two allowlists (old -> new).

    ``revoked``: keys no longer present. ``added``: new keys. ``changed``:
    keys present in both whose name or prefixes differ. ``lost_broadcast``:
    keys that had the broadcast key and must not get the next one (revoked,
    or their ``read`` list became empty). ``rotate`` is true when the
    broadcast sender key must be rotated before the next publish.
    """

    revoked: frozenset[bytes]
    added: frozenset[bytes]
    changed: frozenset[bytes]
    lost_broadcast: frozenset[bytes]

    @property
    def rotate(self) -> bool:
        """True if a key that held the broadcast key lost it: rotate before publishing."""
        return bool(self.lost_broadcast)

    @property
    def empty(self) -> bool:
        """True if nothing changed."""
        return not (self.revoked or self.added or self.changed)


class Allowlist:
    """The plants a node accepts, by public key. Pure: no I/O, immutable.

    Example::

        acl = load_allowlist("/etc/orbcast/allowlist.toml")
        if acl.may_publish(peer_key, "sensors/kitchen/temp"): ...
        diff = acl.diff(load_allowlist(path))   # on SIGHUP
    """

    __slots__ = ("_by_key", "source")

    def __init__(self, entries: Iterable[AllowEntry] = (), *, source: str = "<allowlist>") -> None:
        """Raises ConfigError on a duplicate key or name."""
        self.source = source
        self._by_key: dict[bytes, AllowEntry] = {}
        names: set[str] = set()
        for e in entries:
            if e.key in self._by_key:
                raise ConfigError(f"plant {e.name!r} has the same key as plant "
                                  f"{self._by_key[e.key].name!r}", field="plant.key", source=source)
            if e.name in names:
                raise ConfigError(f"two plants are named {e.name!r}", field="plant.name", source=source)
            names.add(e.name)
            self._by_key[e.key] = e

    def lookup(self, pub: bytes) -> AllowEntry | None:
        """The entry of public key ``pub``, or None if it is not allowlisted."""
        return self._by_key.get(pub)

    def __contains__(self, pub: object) -> bool:
        return pub in self._by_key

    def __iter__(self) -> Iterator[AllowEntry]:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)

    def keys(self) -> frozenset[bytes]:
        """Every allowlisted public key."""
        return frozenset(self._by_key)

    def may_publish(self, pub: bytes, topic: str) -> bool:
        """True if ``pub`` is allowlisted and may publish on ``topic``."""
        e = self._by_key.get(pub)
        return e is not None and e.may_publish(topic)

    def may_read(self, pub: bytes, topic: str) -> bool:
        """True if ``pub`` is allowlisted and may read ``topic`` (replay, live)."""
        e = self._by_key.get(pub)
        return e is not None and e.may_read(topic)

    def diff(self, new: Allowlist) -> AllowlistDiff:
        """Compare this (old) allowlist with ``new`` (e.g. reloaded on SIGHUP)."""
        old_keys, new_keys = self.keys(), new.keys()
        revoked = old_keys - new_keys
        changed = frozenset(k for k in old_keys & new_keys if self._by_key[k] != new._by_key[k])
        lost = frozenset(k for k in old_keys if self._by_key[k].gets_broadcast_key
                         and (k not in new_keys or not new._by_key[k].gets_broadcast_key))
        return AllowlistDiff(revoked=revoked, added=new_keys - old_keys, changed=changed,
                             lost_broadcast=lost)


def _table_lines(text: str, header: str) -> list[int]:
    """1-based line numbers of each ``[[header]]`` line (for error messages)."""
    pat = re.compile(r"^\s*\[\[\s*" + re.escape(header) + r"\s*\]\]")
    return [i + 1 for i, line in enumerate(text.splitlines()) if pat.match(line)]


def _load_toml(text: str, source: str, header: str) -> tuple[list[Any], list[int]]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=source) from None
    extra = set(doc) - {header}
    if extra:
        raise ConfigError(f"unknown top-level key(s) {sorted(extra)}; only [[{header}]] tables "
                          "are allowed", source=source)
    tables = doc.get(header, [])
    if not isinstance(tables, list):
        raise ConfigError(f"{header} must be an array of tables: write [[{header}]]", source=source)
    return tables, _table_lines(text, header)


def _where(kind: str, i: int, lines: list[int], name: Any = None) -> str:
    line = f" (line {lines[i]})" if i < len(lines) else ""
    named = f" {name!r}" if isinstance(name, str) else ""
    return f"{kind} #{i + 1}{named}{line}"


def _prefixes(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_PREFIXES:
        raise ValueError(f"{what} must be a list of at most {MAX_PREFIXES} topic prefixes")
    out = []
    for p in value:
        if not isinstance(p, str):
            raise TypeError(f"{what} holds {p!r}, which is not a string")
        if len(p.encode("utf-8", "surrogatepass")) > MAX_PREFIX_BYTES or not p.isprintable():
            raise ValueError(f"{what} prefix {p[:40]!r} is longer than {MAX_PREFIX_BYTES} bytes "
                             "or has control characters")
        out.append(p)
    return tuple(dict.fromkeys(out))


def parse_allowlist(text: str, *, source: str = "<allowlist>") -> Allowlist:
    """Parse allowlist TOML (format in the module docstring).

    Raises ConfigError naming the file, the entry (number, name and line) and
    the problem: unknown or missing keys, a malformed key, a bad prefix, a
    duplicate key or name.
    """
    tables, lines = _load_toml(text, source, "plant")
    entries: list[AllowEntry] = []
    seen_keys: dict[bytes, str] = {}
    seen_names: dict[str, str] = {}
    for i, t in enumerate(tables):
        where = _where("plant", i, lines, t.get("name") if isinstance(t, dict) else None)
        try:
            if not isinstance(t, dict):
                raise TypeError("must be a table")
            unknown = set(t) - {"name", "key", "publish", "read"}
            if unknown:
                raise ValueError(f"unknown key(s) {sorted(unknown)} (allowed: name, key, publish, read)")
            missing = {"name", "key"} - set(t)
            if missing:
                raise ValueError(f"missing {sorted(missing)}")
            name = t["name"]
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise ValueError("name must be the plant's producer id: 1-64 printable ASCII "
                                 "characters without spaces")
            key = parse_public(t["key"])
            if key in seen_keys:
                raise ValueError(f"has the same key as {seen_keys[key]}")
            if name in seen_names:
                raise ValueError(f"has the same name as {seen_names[name]}")
            seen_keys[key] = seen_names[name] = where
            entries.append(AllowEntry(name=name, key=key,
                                      publish=_prefixes(t.get("publish", []), "publish"),
                                      read=_prefixes(t.get("read", []), "read")))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}", source=source) from None
    return Allowlist(entries, source=source)


def _read_list_file(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_LIST_FILE_BYTES:
        raise ConfigError(f"file is {size} bytes, more than {MAX_LIST_FILE_BYTES}", source=str(p))
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError("file is not UTF-8", source=str(p)) from None


def load_allowlist(path: str | os.PathLike[str]) -> Allowlist:
    """Read and parse an allowlist file. Raises ConfigError / OSError naming the path."""
    return parse_allowlist(_read_list_file(path), source=str(path))


# --- pins (plant side) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NodePin:
    """A sequencer node key a plant accepts; ``name`` is for messages."""

    name: str
    key: bytes


class NodePins:
    """The node public keys a plant accepts in a handshake. Pure, immutable."""

    __slots__ = ("_by_key", "source")

    def __init__(self, pins: Iterable[NodePin] = (), *, source: str = "<pins>") -> None:
        self.source = source
        self._by_key: dict[bytes, NodePin] = {}
        for p in pins:
            if p.key in self._by_key:
                raise ConfigError(f"node {p.name!r} is pinned twice", field="node.key", source=source)
            self._by_key[p.key] = p

    @classmethod
    def of(cls, *keys: bytes) -> NodePins:
        """Pins from raw keys (names ``node-1``, ``node-2``, ...): handy in tests and tools."""
        return cls(NodePin(name=f"node-{i + 1}", key=k) for i, k in enumerate(keys))

    def is_pinned(self, pub: bytes) -> bool:
        """True if ``pub`` is one of the pinned node keys."""
        return pub in self._by_key

    def __contains__(self, pub: object) -> bool:
        return pub in self._by_key

    def lookup(self, pub: bytes) -> NodePin | None:
        """The pin of ``pub``, or None."""
        return self._by_key.get(pub)

    def keys(self) -> frozenset[bytes]:
        """Every pinned key."""
        return frozenset(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)


def parse_pins(text: str, *, source: str = "<pins>") -> NodePins:
    """Parse pins TOML (``[[node]]`` tables with ``name`` and ``key``). Raises ConfigError."""
    tables, lines = _load_toml(text, source, "node")
    pins = []
    for i, t in enumerate(tables):
        where = _where("node", i, lines, t.get("name") if isinstance(t, dict) else None)
        try:
            if not isinstance(t, dict):
                raise TypeError("must be a table")
            if set(t) != {"name", "key"}:
                raise ValueError(f"needs exactly the keys name and key, got {sorted(t)}")
            if not isinstance(t["name"], str) or not 0 < len(t["name"]) <= 64:
                raise ValueError("name must be a string of 1-64 characters")
            pins.append(NodePin(name=t["name"], key=parse_public(t["key"])))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}", source=source) from None
    if not pins:
        raise ConfigError("no [[node]] pinned: a plant with link security needs the public key "
                          "of every sequencer node it may talk to", source=source)
    return NodePins(pins, source=source)


def load_pins(path: str | os.PathLike[str]) -> NodePins:
    """Read and parse a pins file. Raises ConfigError / OSError naming the path."""
    return parse_pins(_read_list_file(path), source=str(path))
