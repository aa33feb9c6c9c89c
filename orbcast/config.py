"""Configuration objects, loaded from TOML with ``ORBCAST_*`` overrides.

Precedence, lowest first: the dataclass defaults, the TOML file (section
``[sequencer]`` or ``[plant]``), environment variables
``ORBCAST_<SECTION>_<KEY>`` (e.g. ``ORBCAST_SEQUENCER_HEARTBEAT_MS=50``,
``ORBCAST_PLANT_SEQUENCERS=tcp://a:7400,tcp://b:7400``), then explicit
overrides (command-line flags). The file itself may be named by
``ORBCAST_CONFIG``.

Every value is validated when the object is built; a bad value raises
:class:`~orbcast.errors.ConfigError` naming the field and where it came
from. Unknown keys are refused too (a typo should not silently fall back
to a default), and so are unknown top-level sections of the file (only
:data:`KNOWN_SECTIONS`: a ``[plants]`` typo would otherwise leave every
plant setting at its default). A value from the file must already have the
field's TOML type (``fsync = "yes"`` or ``outbox_max_count = "10"`` are
refused); environment variables are text and are converted.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TypeVar

from .errors import ConfigError

__all__ = ["SequencerConfig", "PlantConfig", "load", "endpoint_host", "is_loopback_endpoint",
           "KNOWN_SECTIONS"]

T = TypeVar("T")

#: Top-level sections a config file may have. ``sequencer`` and ``plant`` are
#: read here; ``bridge``, ``input``, ``output`` and ``serial`` belong to the
#: firmware bridge, whose one file also holds the ``[plant]`` section its plant
#: (and ``plant status --config`` on it) reads. Anything else is a typo.
KNOWN_SECTIONS = frozenset({"sequencer", "plant", "bridge", "input", "output", "serial"})
#: Producer ids that cannot be a file name: the outbox and the link session of a
#: plant live in ``<data>/outbox/<producer_id>`` and ``<data>/links/<producer_id>``.
_NOT_A_FILE_NAME = frozenset({".", ".."})


def endpoint_host(ep: str) -> str:
    """Host part of a ZeroMQ endpoint ``tcp://host:port`` (``*`` for any)."""
    if not ep.startswith("tcp://") or ":" not in ep[6:]:
        raise ValueError(f"endpoint must look like tcp://HOST:PORT, got {ep!r}")
    host, _, port = ep[6:].rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in endpoint {ep!r}")
    return host.strip("[]")


def is_loopback_endpoint(ep: str) -> bool:
    """True if the endpoint binds or connects only to loopback."""
    host = endpoint_host(ep)
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_node_id() -> str:
    return socket.gethostname().split(".")[0] or "node"


@dataclass(kw_only=True)
class SequencerConfig:
    """Settings of one sequencer node (TOML section ``[sequencer]``)."""

    #: Directory for the log, dedup snapshot and node state.
    data: str = "./orbcast-data"
    #: Name of this node, shown in status and heartbeats.
    node_id: str = field(default_factory=_default_node_id)
    #: ROUTER endpoint plants connect their DEALER to.
    ingress: str = "tcp://127.0.0.1:7400"
    #: PUB endpoint plants subscribe to.
    egress: str = "tcp://127.0.0.1:7401"
    #: Egress endpoint to announce to plants; defaults to ``egress`` (with
    #: a wildcard host replaced by this host's name).
    advertise_egress: str = ""
    #: Ingress endpoint to announce to plants (after a failover they switch
    #: to it); defaults to ``ingress``.
    advertise_ingress: str = ""
    #: Preferred role: "primary" or "standby". Only the first start uses it;
    #: afterwards a node resumes the role it last had (no automatic fail-back).
    role: str = "primary"
    #: ROUTER endpoint this node binds for its peer (the other node of the pair).
    peer: str = "tcp://127.0.0.1:7402"
    #: The other node's peer endpoint. Empty: a single node, no hot standby.
    peer_connect: str = ""
    #: Silence of the active node after which plants and the standby may fail over.
    failover_ms: int = 500
    #: Silence of an in-sync standby after which the active node serves alone
    #: (degraded). Must exceed 2 x failover_ms: a standby that has been out of
    #: contact this long is no longer eligible for promotion.
    solo_after_ms: int = 2000
    #: Stall (no acks) rather than serve without an in-sync standby.
    require_standby: bool = False
    #: Allow test-only fault injection commands over ingress.
    faults: bool = False
    #: Egress heartbeat period; plants detect tail gaps from heartbeats.
    heartbeat_ms: int = 100
    #: fsync the log before acking (turn off only for throwaway benchmarks).
    fsync: bool = True
    #: Days of log to keep (whole UTC days; the newest segment is kept).
    retention_days: int = 7
    #: Ingress frames drained per loop turn before a group commit.
    max_drain: int = 1024
    #: Records per replay chunk and the byte cap of a chunk.
    replay_chunk_records: int = 4096
    replay_chunk_bytes: int = 1 << 20
    #: Concurrent replays a node serves; more are refused with "busy".
    max_replays: int = 64
    #: A replay with no credit for this long is dropped.
    replay_idle_s: float = 30.0
    #: PUB send high-water mark (messages): what a slow SUB may queue.
    egress_hwm: int = 1_000
    #: "none" (loopback only) or "ratchet" (link security; see docs/security.md).
    security: str = "none"
    #: With security = "ratchet": this node's identity key file (``plant keys
    #: generate --out DIR --name node`` writes one) and the allowlist of plant keys.
    identity: str = ""
    allowlist: str = ""
    #: With security = "ratchet" and a peer: the other node's public key
    #: (``orbcast1:...``); the peer link then runs over CURVE with both identities.
    peer_key: str = ""
    #: Loopback endpoint for operator commands (status, promote, demote,
    #: reload) in cleartext. Empty: none. With link security on, ingress takes
    #: only sealed requests, so ``sequencer status`` and friends use this.
    control: str = ""
    #: Fault injection for tests: fraction of egress batches dropped on purpose.
    fault_drop_egress: float = 0.0

    def __post_init__(self) -> None:
        _check_endpoint(self, "ingress")
        _check_endpoint(self, "egress")
        if self.advertise_egress:
            _check_endpoint(self, "advertise_egress")
        if self.role not in ("primary", "standby"):
            raise ConfigError("role must be 'primary' or 'standby'", field="sequencer.role")
        _check_range(self, "heartbeat_ms", 10, 60_000)
        _check_range(self, "failover_ms", 20, 600_000)
        _check_range(self, "solo_after_ms", 40, 3_600_000)
        if self.failover_ms < 2 * self.heartbeat_ms:
            raise ConfigError(f"failover_ms ({self.failover_ms}) must be at least 2 x heartbeat_ms "
                              f"({self.heartbeat_ms}), or one late heartbeat triggers a failover",
                              field="sequencer.failover_ms")
        if self.solo_after_ms < 2 * self.failover_ms:
            raise ConfigError(f"solo_after_ms ({self.solo_after_ms}) must be at least 2 x failover_ms "
                              f"({self.failover_ms}): the standby's promotion window closes then",
                              field="sequencer.solo_after_ms")
        if self.peer_connect:
            _check_endpoint(self, "peer")
            _check_endpoint(self, "peer_connect")
        if self.advertise_ingress:
            _check_endpoint(self, "advertise_ingress")
        _check_range(self, "retention_days", 1, 36_500)
        _check_range(self, "max_drain", 1, 100_000)
        _check_range(self, "replay_chunk_records", 1, 16384)
        _check_range(self, "replay_chunk_bytes", 4096, 1 << 20)
        _check_range(self, "max_replays", 1, 10_000)
        _check_range(self, "egress_hwm", 1, 10_000_000)
        if not 0.0 <= self.fault_drop_egress < 1.0:
            raise ConfigError("fault_drop_egress must be in [0, 1)", field="sequencer.fault_drop_egress")
        if not (type(self.replay_idle_s) in (int, float) and 0 < self.replay_idle_s < math.inf):
            raise ConfigError("replay_idle_s must be a positive finite number of seconds",
                              field="sequencer.replay_idle_s")
        if self.security not in ("none", "ratchet"):
            raise ConfigError(f"security must be \"none\" or \"ratchet\", not {self.security!r}",
                              field="sequencer.security")
        if self.control:
            _check_endpoint(self, "control")
            if not is_loopback_endpoint(self.control):
                raise ConfigError(f"control endpoint {self.control} must be on loopback: it takes "
                                  "operator commands in cleartext", field="sequencer.control")
        if self.security == "ratchet":
            for name in ("identity", "allowlist"):
                if not getattr(self, name):
                    raise ConfigError(f"security = \"ratchet\" needs sequencer.{name} (a file path)",
                                      field=f"sequencer.{name}")
            if self.peer_connect and not self.peer_key:
                raise ConfigError("security = \"ratchet\" with a peer needs sequencer.peer_key (the "
                                  "other node's public key): the peer link is authenticated with it",
                                  field="sequencer.peer_key")
            if self.peer_key:
                from .keys import parse_public
                try:
                    parse_public(self.peer_key)
                except ValueError as exc:
                    raise ConfigError(f"peer_key: {exc}", field="sequencer.peer_key") from None
        if self.security == "none":
            for name in ("ingress", "egress") + (("peer",) if self.peer_connect else ()):
                if not is_loopback_endpoint(getattr(self, name)):
                    raise ConfigError(
                        f"refusing to bind {getattr(self, name)} without link security: "
                        "with security = \"none\" orbcast binds only to loopback "
                        "(protected mode, see docs/security.md)", field=f"sequencer.{name}")
        if not self.node_id or len(self.node_id) > 64:
            raise ConfigError("node_id must be 1-64 characters", field="sequencer.node_id")

    @property
    def announced_ingress(self) -> str:
        """The ingress endpoint plants are told about."""
        ep = self.advertise_ingress or self.ingress
        host = endpoint_host(ep)
        if host in ("*", "0.0.0.0", "::"):
            ep = ep.replace(host, socket.gethostname(), 1)
        return ep

    @property
    def announced_egress(self) -> str:
        """The egress endpoint plants are told to subscribe to."""
        ep = self.advertise_egress or self.egress
        host = endpoint_host(ep)
        if host in ("*", "0.0.0.0", "::"):
            ep = ep.replace(host, socket.gethostname(), 1)
        return ep


@dataclass(kw_only=True)
class PlantConfig:
    """Settings of a plant (TOML section ``[plant]``)."""

    #: Ingress endpoints of the sequencer nodes (one per node).
    sequencers: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:7400"])
    #: Stable producer id; defaults to the host name. Must be unique per
    #: publishing plant: it keys deduplication.
    producer_id: str = field(default_factory=_default_node_id)
    #: Directory for the outbox and checkpoints.
    data: str = field(default_factory=lambda: str(
        Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "orbcast"))
    #: How long one request waits for its answer before it is retried.
    request_timeout_ms: int = 2000
    #: Outbox bounds.
    outbox_max_count: int = 10_000
    outbox_max_bytes: int = 16 << 20
    #: fsync the outbox before publish() returns.
    fsync: bool = True
    #: Live messages buffered above a gap before they are dropped (and later
    #: fetched by replay).
    gap_buffer: int = 20_000
    #: ... and in bytes (a message reckoned at its wire size plus the ~320 B
    #: of Python objects it decodes into).
    gap_buffer_bytes: int = 16 << 20
    #: Messages waiting for the application per subscription; past that, live
    #: batches are dropped and fetched again by replay once it catches up. The
    #: plant's memory bound for an application that stops taking messages.
    ready_limit: int = 65_536
    #: ... and in bytes (as for gap_buffer_bytes): with large messages this
    #: is the bound that holds (65,536 messages of 256 KiB would be 16 GiB).
    ready_bytes: int = 32 << 20
    #: Replay chunks in flight (flow control credit).
    replay_credit: int = 4
    #: Records per replay chunk requested.
    replay_chunk_records: int = 4096
    #: "none" or "ratchet" (link security; must match the nodes). With
    #: "ratchet": this plant's identity key file and the pins file holding
    #: the nodes' public keys (docs/security.md).
    security: str = "none"
    identity: str = ""
    pins: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.sequencers, str):
            self.sequencers = [s.strip() for s in self.sequencers.split(",") if s.strip()]
        if not self.sequencers:
            raise ConfigError("at least one sequencer endpoint is needed", field="plant.sequencers")
        for ep in self.sequencers:
            try:
                endpoint_host(ep)
            except ValueError as exc:
                raise ConfigError(str(exc), field="plant.sequencers") from None
        from .envelope import check_producer_id
        try:
            check_producer_id(self.producer_id)
        except ValueError as exc:
            raise ConfigError(str(exc), field="plant.producer_id") from None
        if (self.producer_id in _NOT_A_FILE_NAME
                or any(c in self.producer_id for c in ("/", "\\", "\0"))):
            raise ConfigError(f"producer_id {self.producer_id!r} cannot be used as a file name "
                              "(it names this plant's outbox directory): no '/', '\\', NUL, "
                              "and not '.' or '..'", field="plant.producer_id")
        _check_range(self, "request_timeout_ms", 10, 600_000)
        _check_range(self, "outbox_max_count", 1, 10_000_000)
        _check_range(self, "outbox_max_bytes", 1024, 1 << 40)
        _check_range(self, "gap_buffer", 1, 10_000_000)
        _check_range(self, "replay_credit", 1, 64)
        _check_range(self, "replay_chunk_records", 1, 16384)
        _check_range(self, "ready_limit", 2, 10_000_000)
        if self.ready_limit < 2 * self.replay_chunk_records:
            raise ConfigError(f"ready_limit ({self.ready_limit}) must be at least twice "
                              f"replay_chunk_records ({self.replay_chunk_records}), or a replay "
                              "could never hand over a chunk", field="plant.ready_limit")
        _check_range(self, "gap_buffer_bytes", 1 << 20, 1 << 40)
        _check_range(self, "ready_bytes", 1 << 20, 1 << 40)
        from .envelope import chunk_bytes
        need = 2 * chunk_bytes(self.replay_chunk_records)
        if self.ready_bytes < need:
            raise ConfigError(f"ready_bytes ({self.ready_bytes}) must be at least {need}: twice "
                              f"what one replay chunk of replay_chunk_records "
                              f"({self.replay_chunk_records}) may hold, or a replay could never "
                              "hand over a chunk", field="plant.ready_bytes")
        if self.security not in ("none", "ratchet"):
            raise ConfigError(f"security must be \"none\" or \"ratchet\", not {self.security!r}",
                              field="plant.security")
        if self.security == "ratchet":
            for name in ("identity", "pins"):
                if not getattr(self, name):
                    raise ConfigError(f"security = \"ratchet\" needs plant.{name} (a file path)",
                                      field=f"plant.{name}")


def _section(cls: type) -> str:
    return "sequencer" if cls is SequencerConfig else "plant"


def _check_endpoint(obj: Any, name: str) -> None:
    try:
        endpoint_host(getattr(obj, name))
    except (ValueError, AttributeError) as exc:
        raise ConfigError(str(exc), field=f"{_section(type(obj))}.{name}") from None


def _check_range(obj: Any, name: str, lo: int, hi: int) -> None:
    v = getattr(obj, name)
    if type(v) is not int or not lo <= v <= hi:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}",
                          field=f"{_section(type(obj))}.{name}")


_TOML_TYPES = {"bool": "a boolean (true or false)", "int": "an integer", "float": "a number",
               "str": "a string", "list[str]": "a list of strings"}


def _check_toml_type(value: Any, t: str) -> None:
    """Raise ValueError unless a TOML ``value`` already has type ``t``: a file
    says what it means (``fsync = "yes"`` is refused, ``fsync = true`` taken)."""
    ok = {"bool": lambda v: isinstance(v, bool),
          "int": lambda v: type(v) is int,
          "float": lambda v: type(v) in (int, float),
          "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
          }.get(t, lambda v: isinstance(v, str))
    if not ok(value):
        shown = f"{value!r:.60}" if not isinstance(value, (dict, list)) else type(value).__name__
        hint = f' (write ["{value}"])' if t == "list[str]" and isinstance(value, str) else ""
        raise ValueError(f"must be {_TOML_TYPES.get(t, 'a string')}, got {shown}{hint}")


def _coerce(value: Any, ftype: Any, fname: str, source: str, *, from_file: bool = False) -> Any:
    """Coerce a TOML or environment value to the field's type. A TOML value
    (``from_file``) must have the field's type already; environment values are
    text and are converted."""
    t = ftype if isinstance(ftype, str) else getattr(ftype, "__name__", str(ftype))
    try:
        if from_file:
            _check_toml_type(value, t)
        if t == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if t == "int":
            # no bools, and no floats: int(100.9) would silently become 100
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(f"not an integer: {value!r}")
            return int(value)
        if t == "float":
            if isinstance(value, bool):
                raise ValueError(f"not a number: {value!r}")
            return float(value)
        if t == "list[str]":
            if isinstance(value, str):
                return [s.strip() for s in value.split(",") if s.strip()]
            if isinstance(value, list) and all(isinstance(s, str) for s in value):
                return value
            raise ValueError("not a list of strings")
        if not isinstance(value, str):
            raise ValueError("not a string")
        return value
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"bad value: {exc}", field=fname, source=source) from None


def load(cls: type[T], path: str | os.PathLike[str] | None = None, *,
         env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> T:
    """Build a ``cls`` (:class:`SequencerConfig` or :class:`PlantConfig`).

    ``path`` (or ``$ORBCAST_CONFIG``) is a TOML file; only its section for
    ``cls`` is read, but every top-level section must be one of
    :data:`KNOWN_SECTIONS`. ``overrides`` (None values ignored) win over everything.
    Raises :class:`ConfigError` for unreadable files, unknown keys and bad values.
    """
    env = os.environ if env is None else env
    section = _section(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = path or env.get("ORBCAST_CONFIG") or None
    if path:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file: {exc.strerror}", source=str(path)) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}", source=str(path)) from None
        for name, v in doc.items():
            if not isinstance(v, (dict, list)):
                raise ConfigError(f"setting {name!r} is outside any section: put it under "
                                  "[sequencer] or [plant]", source=str(path))
            if name not in KNOWN_SECTIONS:
                raise ConfigError(f"unknown section [{name}] (known: "
                                  f"{', '.join(sorted(KNOWN_SECTIONS))})", source=str(path))
        sect = doc.get(section, {})
        if not isinstance(sect, dict):
            raise ConfigError(f"[{section}] must be a table", source=str(path))
        for k, v in sect.items():
            if k not in fields:
                raise ConfigError(f"unknown setting {k!r}", field=f"{section}.{k}", source=str(path))
            values[k] = _coerce(v, fields[k].type, f"{section}.{k}", str(path), from_file=True)
            sources[k] = str(path)
    prefix = f"ORBCAST_{section.upper()}_"
    for var, v in env.items():
        if var.startswith(prefix):
            k = var[len(prefix):].lower()
            if k not in fields:
                raise ConfigError(f"unknown setting {k!r}", field=f"{section}.{k}", source=var)
            values[k] = _coerce(v, fields[k].type, f"{section}.{k}", var)
            sources[k] = var
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in fields:
            raise ConfigError(f"unknown setting {k!r}", field=f"{section}.{k}", source="command line")
        values[k] = v
        sources[k] = "command line"
    try:
        return cls(**values)
    except ConfigError as exc:
        key = (exc.field or "").split(".")[-1]
        if exc.source is None and key in sources:
            raise ConfigError(str(exc).rsplit(" (", 1)[0], field=exc.field, source=sources[key]) from None
        raise
