"""The plant client: publish with an on-disk outbox, subscribe with gap
repair, late start and checkpoints.

Threads: the application calls :class:`Plant` from any thread; one engine
thread owns every ZeroMQ socket (a DEALER to the active node's ingress, a SUB
to each node's egress) and the outbox. Application calls hand work to the
engine through a deque and wake it with an eventfd; the engine resolves
futures and fills each subscription's ready queue.

Example::

    with Plant(sequencers=["tcp://127.0.0.1:7400"], producer_id="kitchen") as p:
        seq = p.publish("sensors/kitchen/temp", b"21.5")
        for msg in p.subscribe("sensors/", start="today"):
            print(msg.seq, msg.topic, msg.payload)
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import cbor2
import zmq

from orbcast import envelope as env
from orbcast.config import PlantConfig, endpoint_host
from orbcast.envelope import (Ack, Batch, Error, Heartbeat, Message, Ping, Pong,
                              ReplayChunk, StatusReply, StatusRequest, Welcome, Hello)
from orbcast.errors import (AuthenticationError, ClosedError, LocalProtocolError, OrbcastTimeout,
                            OutboxFull, OutboxWriteFailed, RemoteProtocolError, ReplayRejected)

from .checkpoint import Checkpointer, CheckpointStore
from .outbox import Outbox
from .tracker import Start, Tracker

if TYPE_CHECKING:    # link security is imported only when it is on: `cryptography` costs
    from orbcast.link import BroadcastReceiver, LinkClient    # ~15 MB of RSS on a Pi

__all__ = ["Plant", "Subscription", "Ticket", "MemoryOutbox", "parse_start"]

log = logging.getLogger("orbcast.plant")

#: Publish frames in flight to the node at once (each up to MAX_FRAME_ITEMS).
MAX_INFLIGHT_FRAMES = 16
#: Node endpoints learned from announcements (WELCOME, HEARTBEAT) kept beyond
#: the configured ones: a pair needs two; a peer announcing new ones without
#: end must not grow the plant's lists and connections.
MAX_LEARNED_ENDPOINTS = 4
#: The reply each kind of request waits for (an ERROR answers any of them).
_ANSWERS: dict[type, type] = {Hello: Welcome, Ping: Pong, StatusRequest: StatusReply}
#: Messages coalesced into one PUBLISH frame.
MAX_FRAME_ITEMS = 2048
#: Bytes of payload coalesced into one PUBLISH frame (under MAX_BODY_BYTES).
MAX_FRAME_BYTES = 512 * 1024
#: Submissions queued between the application and the engine before
#: publish_nowait() blocks the caller (back-pressure, bounded memory).
MAX_SUBMIT_QUEUE = 65_536
#: Ceiling of the exponential resend backoff.
MAX_RESEND_BACKOFF_S = 10.0
#: ERROR codes by which a node refuses a PUBLISH for good (protocol.md 4): the
#: messages are failed and dropped from the outbox, never resent unchanged.
#: ``too-old``: a resend older than anything the node can deduplicate (its record
#: may have been removed by retention); sequencing it again could duplicate it.
_REFUSALS = frozenset({"bad-frame", "too-large", "forbidden", "too-old"})
#: Link security, a plant that follows the live stream over its link (no broadcast
#: key): one PING per this many heartbeat periods. Each PING costs an fsync of the
#: session on both ends, so not every heartbeat: 2 x 100 ms adds at most 200 ms.
FOLLOW_HEARTBEATS = 2
#: After the node said "no-key", the plant does not ask for a key again for this long.
NO_KEY_RETRY_S = 60.0
#: Engine poll ceiling: timers are checked at least this often.
ENGINE_TICK_S = 0.05
#: The engine's timer period when nothing is pending (no unacked frame, no request,
#: no handshake): an idle plant on a Pi wakes for heartbeats, not for a clock. The
#: active node's silence (failover vote) has its own exact deadline.
IDLE_TICK_S = 0.5
#: pyzmq 27's flags are enum.Flag members: combining them in send_multipart
#: costs microseconds per call on the hot path, plain ints do not.
_NOBLOCK = int(zmq.NOBLOCK)


class MemoryOutbox:
    """A non-durable outbox with the :class:`~plant.outbox.Outbox` interface.

    For benchmarks and throwaway tools only: messages accepted into it are
    lost if the process dies before they are acked.
    """

    def __init__(self, *, max_count: int = 10_000, max_bytes: int = 16 << 20, start_pseq: int = 1) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.next_pseq = start_pseq
        self._p: dict[int, tuple[str, bytes]] = {}
        self.size = 0

    @property
    def count(self) -> int:
        return len(self._p)

    @staticmethod
    def cost(topic: str, payload: bytes) -> int:
        """What one message adds to :attr:`size`."""
        return len(topic) + len(payload)

    def append(self, items: list[tuple[str, bytes]]) -> list[int]:
        add = sum(map(len, itertools.chain.from_iterable(items)))
        if len(self._p) + len(items) > self.max_count or self.size + add > self.max_bytes:
            raise OutboxFull(len(self._p), self.size, self.max_count, self.max_bytes)
        out = list(range(self.next_pseq, self.next_pseq + len(items)))
        self._p.update(zip(out, items))
        self.next_pseq += len(items)
        self.size += add
        return out

    def get(self, pseq: int) -> tuple[str, bytes] | None:
        return self._p.get(pseq)

    def pending(self, limit: int | None = None, *, after: int = 0) -> list[tuple[int, str, bytes]]:
        out = [(k, t, p) for k, (t, p) in self._p.items() if k > after]
        return out[:limit] if limit is not None else out

    def ack(self, pseqs: Any) -> int:
        n = 0
        size = 0
        pop = self._p.pop
        for k in pseqs:
            it = pop(k, None)
            if it is not None:
                size += len(it[0]) + len(it[1])
                n += 1
        self.size -= size
        return n

    def close(self) -> None:
        pass


class Ticket:
    """Handle of a non-blocking publish.

    :meth:`wait_accepted` returns the producer_seq once the message is
    durable in the outbox (or raises :class:`OutboxFull`); :meth:`result`
    returns the canonical seq once the sequencer acked it. Tickets are
    plain slotted objects completed by the plant's engine thread (no Future
    per message: this is the hot path of every publisher).
    """

    __slots__ = ("item", "pseq", "seq", "error", "_cond", "_callbacks")

    def __init__(self, topic: str, payload: bytes, cond: threading.Condition) -> None:
        #: ``(topic, payload)``: the very tuple the outbox keeps and the engine
        #: sends, so no further per-message tuple is built on the way out
        self.item = (topic, payload)
        #: producer_seq once accepted into the outbox
        self.pseq: int | None = None
        #: canonical seq once acked
        self.seq: int | None = None
        #: why it can never be acked (OutboxFull, a rejection by the node)
        self.error: BaseException | None = None
        self._cond = cond
        self._callbacks: list[Callable[["Ticket"], Any]] | None = None

    @property
    def topic(self) -> str:
        return self.item[0]

    @property
    def payload(self) -> bytes:
        return self.item[1]

    def _wait(self, ready: Callable[[], bool], timeout: float | None, what: str) -> None:
        if ready():
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not ready():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise OrbcastTimeout(what)
                self._cond.wait(0.5 if left is None else min(left, 0.5))

    def wait_accepted(self, timeout: float | None = None) -> int:
        """Block until durable in the outbox; returns the producer_seq."""
        self._wait(lambda: self.pseq is not None or self.error is not None, timeout,
                   "message not accepted into the outbox in time")
        if self.pseq is None:
            raise self.error  # type: ignore[misc]
        return self.pseq

    def result(self, timeout: float | None = None) -> int:
        """Block until acked; returns the seq. Raises :class:`OrbcastTimeout`
        (the message stays in the outbox and will still be sent)."""
        self._wait(self.done, timeout,
                   "no ack within the timeout (the message stays in the outbox)")
        if self.seq is None:
            raise self.error  # type: ignore[misc]
        return self.seq

    def done(self) -> bool:
        """True once acked or failed."""
        return self.seq is not None or self.error is not None

    def exception(self) -> BaseException | None:
        """The failure, if it failed (does not wait)."""
        return self.error

    def add_done_callback(self, fn: Callable[["Ticket"], Any]) -> None:
        """Call ``fn(ticket)`` once it is acked or failed (from the engine
        thread, or at once if already done). Keep ``fn`` short."""
        if self.done():
            fn(self)
        else:
            if self._callbacks is None:
                self._callbacks = []
            self._callbacks.append(fn)

    # engine side
    def _finish(self) -> None:
        cbs, self._callbacks = self._callbacks, None
        for fn in cbs or ():
            try:
                fn(self)
            except Exception:
                log.exception("publish callback raised")


def start_of_day_ns(now_ns: int | None = None) -> int:
    """ns since the epoch of the start (00:00 UTC) of the UTC day holding
    ``now_ns`` (default: now): what ``today`` means to every option."""
    ns = time.time_ns() if now_ns is None else now_ns
    return ns - ns % (86_400 * 1_000_000_000)


def parse_start(spec: str | int | None, *, now_ns: int | None = None) -> Start:
    """Parse ``now``, ``today``, a seq (``1234``) or an RFC 3339 time (see
    :func:`parse_time`).

    ``today`` is the start of the current UTC day. Raises ``ValueError``
    naming what is accepted.
    """
    if spec is None or spec == "now":
        return Start.now()
    if isinstance(spec, int):
        return Start.at_seq(spec)
    s = spec.strip()
    if s == "today":
        return Start.at_time(start_of_day_ns(now_ns))
    if s.isdigit():
        return Start.at_seq(int(s))
    try:
        ns = parse_time(s)
    except ValueError:
        raise ValueError(f"not a seq, 'now', 'today' or an RFC 3339 time: {s!r}") from None
    return Start.at_time(ns)


#: What :func:`parse_time` takes: RFC 3339 (its ``T`` and ``Z`` in either case,
#: or a space for the ``T``, RFC 3339 5.6), seconds and the zone optional, a
#: fraction of up to 9 digits (ns, the resolution of a record's time), or a bare
#: date (its midnight). The fraction may be longer in RFC 3339; it is refused
#: rather than rounded, so a boundary is never silently moved.
_RFC3339 = (r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})"
            r"(?:[Tt ](?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:[.,](?P<frac>\d+))?)?"
            r"(?P<zone>[Zz]|[+-]\d{2}:?\d{2})?)?")
#: Fraction digits a time is kept to: nanoseconds.
_MAX_FRACTION_DIGITS = 9


def parse_time(s: str) -> int:
    """An RFC 3339 time -> ns since the epoch, exactly (no float in between).

    ``2026-11-25T18:37:17.129491179Z``, ``2026-11-25t20:37:17+02:00``,
    ``2026-11-25 18:37``, ``2026-11-25`` (its midnight); no zone means UTC.
    Every time the CLI prints (``rfc3339``) parses back to the same ns.
    Raises ``ValueError`` saying what is accepted.
    """
    import re

    def bad(why: str = "") -> ValueError:
        return ValueError(f"not an RFC 3339 time{f' ({why})' if why else ''}: {s!r} (e.g. "
                          "2026-11-25T08:00:00Z or 2026-11-25T10:00:00.123456789+02:00; "
                          "no zone means UTC)")

    m = re.fullmatch(_RFC3339, s.strip(), re.ASCII)
    if m is None:
        raise bad()
    frac = m["frac"] or ""
    if len(frac) > _MAX_FRACTION_DIGITS:
        raise bad(f"more than {_MAX_FRACTION_DIGITS} fractional digits: times are kept to the ns")
    offset = 0
    zone = m["zone"] or "Z"
    if zone not in "Zz":
        hh, mm = int(zone[1:3]), int(zone[-2:])
        if hh > 23 or mm > 59:
            raise bad(f"zone offset {zone} out of range")
        offset = (hh * 60 + mm) * 60 * (1 if zone[0] == "+" else -1)
    try:
        t = _dt.datetime(int(m["y"]), int(m["mo"]), int(m["d"]), int(m["h"] or 0),
                         int(m["mi"] or 0), int(m["s"] or 0))
    except ValueError as exc:            # month 13, 25:00, a leap second 23:59:60, ...
        raise bad(str(exc)) from None
    secs = (t - _dt.datetime(1970, 1, 1)) // _dt.timedelta(seconds=1) - offset
    return secs * 1_000_000_000 + int(frac.ljust(_MAX_FRACTION_DIGITS, "0"))


class Subscription:
    """Canonical messages in seq order; iterate it, or pass a callback.

    With a ``checkpoint`` name the position is saved (batched) and a restart
    resumes right after it. Delivery is at-least-once across a crash between
    processing and the checkpoint write: use ``seq`` as the idempotency key.
    By default a message counts as processed when the iterator is asked for
    the next one; with ``auto_ack=False`` call :meth:`ack` yourself.
    """

    def __init__(self, plant: "Plant", tracker: Tracker, checkpointer: Checkpointer | None,
                 auto_ack: bool) -> None:
        self._plant = plant
        self.tracker = tracker
        self._cp = checkpointer
        self._auto = auto_ack
        self._last: int | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.delivered = 0

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        if self._cp is None:
            # fast path (no checkpoint to advance between messages): what get() does
            # when a message is ready, without its call and its checks
            tr = self.tracker
            try:
                ready = tr.ready.popleft()
            except IndexError:
                pass
            else:
                if tr._owed and len(tr.ready) < tr.ready_limit // 2 and ready.seq >= tr.resume_seq:
                    self._plant._wake()
                self._last = ready.seq
                self.delivered += 1
                return ready
        m = self.get()
        if m is None:
            raise StopIteration
        return m

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, or ``None`` when the subscription is finished or
        closed. Raises :class:`OrbcastTimeout` if ``timeout`` passes first."""
        if self._cp is not None and self._auto and self._last is not None:
            self.ack(self._last)
        ready = self.tracker.ready
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = self._plant._cond
        while True:
            try:
                m = ready.popleft()
            except IndexError:
                if self._closed or self.tracker.finished or self._plant._closed:
                    if self._cp:
                        self._cp.flush()
                    return None
                if self._cp is not None and self._cp.due(time.monotonic()):
                    self._cp.flush()          # idle: do not sit on an unsaved position
                with cond:
                    if not ready and not self.tracker.finished and not self._closed:
                        wait = ENGINE_TICK_S * 4
                        if deadline is not None:
                            left = deadline - time.monotonic()
                            if left <= 0:
                                raise OrbcastTimeout("no message within the timeout") from None
                            wait = min(wait, left)
                        cond.wait(wait)
                continue
            tr = self.tracker
            if tr._owed and len(ready) < tr.ready_limit // 2 and m.seq >= tr.resume_seq:
                self._plant._wake()
            self._last = m.seq
            self.delivered += 1
            return m

    def get_many(self, max_count: int = 1024, timeout: float | None = None) -> list[Message]:
        """The next messages, at least one and at most ``max_count``, in seq
        order: waits like :meth:`get` for the first, then takes what is ready
        without waiting. An empty list means the subscription is finished or
        closed. Raises :class:`OrbcastTimeout` if ``timeout`` passes first.

        The same stream as calling :meth:`get` repeatedly, for a fraction of
        the cost per message; with ``auto_ack`` the whole list counts as
        processed at the next call.
        """
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        m = self.get(timeout)
        if m is None:
            return []
        ready = self.tracker.ready
        pop = ready.popleft                 # only the application pops: len() only grows
        out = [m]
        out += [pop() for _ in range(min(max_count - 1, len(ready)))]
        if len(out) > 1:
            self._last = out[-1].seq
            self.delivered += len(out) - 1
            tr = self.tracker
            if tr._owed and len(ready) < tr.ready_limit // 2 and out[-1].seq >= tr.resume_seq:
                self._plant._wake()
        return out

    def ack(self, seq: int | None = None) -> None:
        """Mark everything up to ``seq`` (default: the last message returned)
        processed; the checkpoint is written in batches (see :meth:`flush`)."""
        seq = self._last if seq is None else seq
        cp = self._cp
        if seq is not None and cp is not None and (cp.position is None or seq > cp.position):
            cp.delivered(seq, time.monotonic())

    def flush(self) -> None:
        """Write the checkpoint now."""
        if self._cp is not None:
            self._cp.flush()

    @property
    def position(self) -> int | None:
        """Seq of the last message returned to the application."""
        return self._last

    def close(self) -> None:
        """Stop the subscription (flushes its checkpoint)."""
        if self._closed:
            return
        self._closed = True
        self._plant._unsubscribe(self)
        if self._cp is not None:
            if self._auto and self._last is not None:
                self.ack(self._last)
            self._cp.flush()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run_callback(self, fn: Callable[[Message], Any]) -> None:
        try:
            for m in self:
                fn(m)
        except Exception:   # the callback's own failure: log, stop this subscription
            log.exception("subscription callback raised; subscription stopped")
            self._closed = True


class Plant:
    """A connection to an orbcast cluster. Thread-safe; use as a context manager.

    ``outbox=False`` keeps unacked messages in memory only (benchmarks);
    ``on_full`` is ``"error"`` (raise :class:`OutboxFull`) or ``"block"``.
    """

    def __init__(self, config: PlantConfig | None = None, *, outbox: bool = True,
                 on_full: str = "error", client: str = "orbcast-plant", **overrides: Any) -> None:
        cfg = config or PlantConfig(**overrides)
        if config is not None and overrides:
            cfg = PlantConfig(**{**config.__dict__, **overrides})
        if on_full not in ("error", "block"):
            raise LocalProtocolError("on_full must be 'error' or 'block'")
        self.cfg = cfg
        self.on_full = on_full
        self.client = client
        self._data = Path(cfg.data)
        self._closed = False
        self._cond = threading.Condition()
        self._submit: deque[Ticket] = deque()
        self._cmds: deque[tuple[str, Any]] = deque()
        self._rids = itertools.count(1)
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._woken = False
        self._inflight_tickets: dict[int, Ticket] = {}
        self._blocked: deque[Ticket] = deque()   # waiting for outbox space (on_full="block")
        self._accepting = False                  # the engine holds tickets between queue and outbox
        self._out_box: Outbox | MemoryOutbox
        if outbox:
            self._out_box = Outbox(self._data / "outbox" / cfg.producer_id,
                                   max_count=cfg.outbox_max_count, max_bytes=cfg.outbox_max_bytes,
                                   fsync=cfg.fsync)
        else:
            self._out_box = MemoryOutbox(max_count=cfg.outbox_max_count, max_bytes=cfg.outbox_max_bytes)
        self._unsent: deque[int] = deque(p for p, _t, _b in self._out_box.pending())
        self._inflight: dict[int, tuple[list[int], float, int]] = {}   # rid -> (pseqs, deadline, tries)
        self._resend_at = 0.0
        self._backoff = cfg.request_timeout_ms / 1000
        self._requests: dict[int, tuple[Future[Any], float, Any, bool]] = {}
        self._subs: list[Subscription] = []
        self._node: Welcome | None = None
        self._hello_rid: int | None = None
        self._hello_at = 0.0
        self._last_heard = 0.0
        self._egress_connected: dict[str, None] = {}   # in the order connected
        # failover (hot standby): what the plant knows of the nodes
        self._current_ep = cfg.sequencers[0]
        self._known_eps: list[str] = list(cfg.sequencers)   # ingress endpoints
        self._max_epoch = 0
        self._active_seen = 0.0            # last heartbeat of the active node
        self._failover_s = 0.0             # 0: single node, never vote
        self._next_vote = 0.0
        self._active_ep: str | None = None   # ingress of the node last seen active
        self._rehello_at = 0.0               # ask the node for its peer's endpoints again
        self._unsent_actions: list[Any] = []  # tracker requests a fresh connection refused
        self._unsent_hello: Hello | None = None
        self.counters = {"published": 0, "acked": 0, "resent": 0, "rejected": 0,
                         "bad_frames": 0, "batches": 0, "heartbeats": 0, "outbox_write_failed": 0}
        # link security (docs/security.md): one ratchet session with the node we
        # talk to, the broadcast keys of the active node
        self._link: LinkClient | None = None
        self._bcast: BroadcastReceiver | None = None
        self._txq: list[list[bytes]] = []      # sealed frames, sent once the session state is durable
        self._solo: set[int] = set()            # pseqs sent one per frame (their frame was refused)
        self._link_hello_at = 0.0
        self._link_backoff = cfg.request_timeout_ms / 1000
        self._ping_at = 0.0
        self._persist_at = 0.0
        self._egress_ok_at = 0.0               # last time a sealed broadcast opened
        self._switched_at = 0.0                # last _switch to another node
        self._no_key_until = 0.0               # the node said "no-key": do not ask before
        self._auth_log_at = 0.0
        if cfg.security == "ratchet":
            self._setup_link(cfg)
        self._ctx = zmq.Context()
        self._engine = threading.Thread(target=self._run, name="orbcast-plant", daemon=True)
        self._ready = threading.Event()
        self._engine_error: BaseException | None = None
        self._engine.start()
        self._ready.wait(10)

    def _setup_link(self, cfg: PlantConfig) -> None:
        """Load the identity and pins (errors surface here, in the caller's
        thread) and restore a saved session."""
        from orbcast import link as _link
        from orbcast.keys import load_identity, load_pins
        from orbcast.linkstore import SessionStore
        self._L = _link
        LinkClient, BroadcastReceiver = _link.LinkClient, _link.BroadcastReceiver
        identity = load_identity(cfg.identity)
        pins = load_pins(cfg.pins)
        self._store = SessionStore(self._data / "links" / cfg.producer_id, fsync=cfg.fsync)
        self._link = LinkClient(identity, cfg.producer_id, pins, persist=self._store.put,
                                defer_persist=True)
        self._bcast = BroadcastReceiver()
        for n in ("sealed_sent", "auth_failed", "relinks", "sender_keys", "undecryptable",
                  "key_requests", "cleartext_ignored"):
            self.counters[n] = 0
        restored = False
        for name, blob in self._store.load().items():
            if not restored:
                try:
                    self._link.restore(blob)
                    restored = True
                    continue
                except AuthenticationError as exc:
                    log.info("not resuming saved link session %s: %s", name, exc)
            self._store.put(name, None)
        self._store.commit()

    # --- public API ------------------------------------------------------------

    @property
    def producer_id(self) -> str:
        return self.cfg.producer_id

    def publish(self, topic: str, payload: bytes | str, *, timeout: float | None = None) -> int:
        """Publish one message and wait for its ack; returns its seq.

        The message is durable in the outbox before anything is sent. On
        :class:`OrbcastTimeout` it stays in the outbox and is still delivered
        (now or after a restart); resending is always safe.
        Raises :class:`OutboxFull` (``on_full="error"``), :class:`OrbcastTimeout`.
        """
        t = self.publish_nowait(topic, payload)
        t.wait_accepted(timeout)
        return t.result(timeout)

    def publish_nowait(self, topic: str, payload: bytes | str) -> Ticket:
        """Queue a message and return a :class:`Ticket` at once.

        Messages queued together are written to the outbox with one fsync and
        coalesced into one frame. Blocks only while more than
        :data:`MAX_SUBMIT_QUEUE` submissions are waiting for the engine.
        """
        if self._closed or self._engine_error is not None:
            self._check_open()
        if type(payload) is not bytes:
            if isinstance(payload, str):
                payload = payload.encode("utf-8")
            env.check_topic(topic)
            payload = env.check_payload(payload)
        else:
            env.check_topic(topic)
            if len(payload) > env.MAX_PAYLOAD_BYTES:
                env.check_payload(payload)        # raises
        box = self._out_box
        if len(payload) + 4 * len(topic) > box.max_bytes and box.cost(topic, payload) > box.max_bytes:
            raise LocalProtocolError(
                f"a message of {box.cost(topic, payload)} bytes can never fit the outbox, bounded "
                f"by {box.max_bytes} bytes (plant outbox_max_bytes)")
        t = Ticket(topic, payload, self._cond)
        submit = self._submit
        if len(submit) >= MAX_SUBMIT_QUEUE:
            with self._cond:
                while len(submit) >= MAX_SUBMIT_QUEUE and not self._closed:
                    self._cond.wait(0.1)
            self._check_open()
        submit.append(t)
        if not self._woken:
            self._wake()
        return t

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every message accepted so far is acked.
        Raises :class:`OrbcastTimeout` (the rest stays in the outbox)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._settled():
                self._check_open()
                if deadline is not None and time.monotonic() >= deadline:
                    raise OrbcastTimeout(f"{self.outbox_depth} messages not yet acked")
                self._cond.wait(0.05)

    def _settled(self) -> bool:
        """Nothing accepted is waiting for its ack, nor on its way into the outbox."""
        return not (self._submit or self._blocked or self._accepting or self._out_box.count)

    @property
    def silent_for(self) -> float | None:
        """Seconds since this plant last heard from a node (an answer, or the
        active node's heartbeat, every 100 ms by default); None if it never
        has. Nothing is sent to find out."""
        t = max(self._last_heard, self._active_seen)
        return None if t == 0.0 else time.monotonic() - t

    @property
    def engine_error(self) -> BaseException | None:
        """Why this plant's engine stopped (a failed outbox fsync, ...), or None
        while it runs (or after a normal :meth:`close`). Once it has stopped,
        every call raises :class:`ClosedError` from it: a long-running program
        should exit and be restarted (its outbox keeps what was accepted)."""
        if self._engine_error is None and not self._closed and not self._engine.is_alive():
            return ClosedError("the plant's engine thread is gone")
        return self._engine_error

    @property
    def outbox_depth(self) -> int:
        """Messages accepted and not yet acked (including queued ones)."""
        return self._out_box.count + len(self._submit) + len(self._blocked)

    def subscribe(self, prefix: str = "", *, start: str | int | Start | None = None,
                  checkpoint: str | None = None, callback: Callable[[Message], Any] | None = None,
                  to_seq: int | None = None, until: int | None = None,
                  auto_ack: bool = True) -> Subscription:
        """Subscribe to topics starting with ``prefix``.

        ``start``: ``"now"`` (default), ``"today"``, a seq, an RFC 3339 time,
        or a :class:`Start`. With ``checkpoint=NAME`` a saved position wins
        over ``start``. ``to_seq`` makes a bounded subscription that ends
        after that seq. With ``callback`` a thread calls it for each message.
        """
        self._check_open()
        cp = None
        if checkpoint is not None:
            store = CheckpointStore(self._data / "checkpoints")
            saved = store.load(checkpoint)
            cp = Checkpointer(store, checkpoint)
            if saved is not None:
                start = Start.at_seq(saved + 1)
        st = start if isinstance(start, Start) else parse_start(start)
        tr = Tracker(start=st, prefix=prefix, new_rid=self._rid, buffer_limit=self.cfg.gap_buffer,
                     ready_limit=self.cfg.ready_limit, ready_bytes=self.cfg.ready_bytes,
                     buffer_bytes=self.cfg.gap_buffer_bytes,
                     credit=self.cfg.replay_credit, chunk_records=self.cfg.replay_chunk_records,
                     request_timeout=self.cfg.request_timeout_ms / 1000, to_seq=to_seq)
        sub = Subscription(self, tr, cp, auto_ack)
        self._call("subscribe", sub)
        if callback is not None:
            sub._thread = threading.Thread(target=sub._run_callback, args=(callback,),
                                           name=f"orbcast-sub-{prefix}", daemon=True)
            sub._thread.start()
        return sub

    def replay(self, from_seq: int = 1, to_seq: int | None = None, *, since: int | None = None,
               until: int | None = None, topic: str = "", timeout: float = 30.0) -> Subscription:
        """A bounded subscription over the log: from ``max(from_seq, first seq
        at or after since)`` up to ``min(to_seq, the node's newest seq now,
        last seq before until)``; times are ns since the epoch. Iterate it; it
        ends by itself. Seqs deleted by retention are skipped and counted in
        ``tracker.lost_to_retention``."""
        last = self.node_info(timeout=timeout).last_seq
        to = last if to_seq is None else min(to_seq, last)
        if until is not None:
            to = min(to, self._seq_for_time(until, timeout) - 1)
        start = max(from_seq, 1)
        if since is not None:
            start = max(start, self._seq_for_time(since, timeout))
        return self.subscribe(topic, start=Start.at_seq(start), to_seq=max(to, start - 1))

    def node_info(self, timeout: float = 10.0) -> Welcome:
        """The active node's WELCOME (node id, role, epoch, positions)."""
        f: Future[Any] = self._request(Hello(rid=0, client=self.client), timeout)
        return f.result()  # type: ignore[no-any-return]

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The node's status map plus this plant's outbox and subscriptions."""
        rep: StatusReply = self._request(StatusRequest(rid=0), timeout).result()
        out = dict(rep.info)
        out["plant"] = self.local_status()
        return out

    def local_status(self) -> dict[str, Any]:
        """This plant's own view: outbox depth, subscription positions and lag."""
        subs = []
        for s in list(self._subs):
            st = s.tracker.stats()
            tail = st["known_tail"]
            pos = s.position or (st["next_seq"] - 1 if st["next_seq"] else 0)
            subs.append({"prefix": s.tracker.prefix, "position": pos,
                         "checkpoint": s._cp.name if s._cp else None,
                         "lag": max(0, tail - pos), **st})
        return {"producer_id": self.cfg.producer_id, "outbox_depth": self.outbox_depth,
                "next_producer_seq": self._out_box.next_pseq, "subscriptions": subs,
                "counters": dict(self.counters),
                "node": self._node.node if self._node else None}

    def ping(self, timeout: float = 5.0) -> Pong:
        """Round trip to the active node."""
        return self._request(Ping(rid=0), timeout).result()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the engine, flush checkpoints, close sockets and the outbox.
        Unacked messages stay in the outbox for the next run."""
        if self._closed:
            return
        for s in list(self._subs):
            s.close()
        self._closed = True
        self._wake()
        self._engine.join(10)
        with self._cond:
            self._cond.notify_all()
        os.close(self._wake_fd)

    def __enter__(self) -> "Plant":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- app-thread helpers --------------------------------------------------------

    def _check_open(self) -> None:
        if self._engine_error is not None:
            raise ClosedError("the plant's engine stopped") from self._engine_error
        if self._closed:
            raise ClosedError("plant is closed")

    def _rid(self) -> int:
        return next(self._rids)

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass

    def _call(self, cmd: str, arg: Any) -> None:
        self._cmds.append((cmd, arg))
        self._wake()

    def _unsubscribe(self, sub: Subscription) -> None:
        if not self._closed:
            self._call("unsubscribe", sub)

    def _request(self, ev: Any, timeout: float) -> "_Waiter":
        self._check_open()
        f: Future[Any] = Future()
        self._call("request", (ev, f, time.monotonic() + timeout))
        return _Waiter(f, timeout)

    def _seq_for_time(self, ns: int, timeout: float) -> int:
        """First seq at or after ``ns``: an empty time-started replay (to_seq 0)
        whose first chunk says where that time falls in the log."""
        sub = self.subscribe("", start=Start.at_time(ns), to_seq=0)
        try:
            deadline = time.monotonic() + timeout
            while sub.tracker.resolved_start is None:
                self._check_open()
                if time.monotonic() > deadline:
                    raise OrbcastTimeout("the node did not answer the time lookup")
                with self._cond:
                    self._cond.wait(0.05)
            return sub.tracker.resolved_start
        finally:
            sub.close()

    # --- engine (one thread owns every socket) ---------------------------------------

    def _run(self) -> None:
        try:
            self._setup()
            self._ready.set()
            self._loop()
        except BaseException as exc:   # surface to callers instead of dying silently
            self._engine_error = exc
            log.exception("plant engine stopped")
            self._fail_pending(exc)
            self._ready.set()
        finally:
            self._teardown()
            with self._cond:
                self._cond.notify_all()

    def _fail_pending(self, exc: BaseException) -> None:
        """The engine stopped: every ticket still waiting learns why at once
        (instead of at its timeout). Accepted ones stay in the outbox on disk and
        go out when the plant runs again; this Ticket can no longer see that."""
        err = ClosedError(f"the plant's engine stopped: {exc}")
        err.__cause__ = exc
        pending = list(self._submit) + list(self._blocked) + list(self._inflight_tickets.values())
        for t in pending:
            if t.seq is None and t.error is None:
                t.error = err
                t._finish()

    def _setup(self) -> None:
        self._dealer: zmq.Socket | None = None
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 10_000)
        self._sub.setsockopt(zmq.MAXMSGSIZE, 8 * env.MAX_BODY_BYTES)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._poller = zmq.Poller()
        self._poller.register(self._sub, zmq.POLLIN)
        self._poller.register(self._wake_fd, zmq.POLLIN)
        self._connect(self._current_ep)

    def _connect(self, ep: str) -> None:
        if self._dealer is not None:
            self._poller.unregister(self._dealer)
            self._dealer.close(0)
        d = self._ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.IMMEDIATE, 1)
        d.setsockopt(zmq.SNDHWM, 1000)
        d.setsockopt(zmq.MAXMSGSIZE, 8 * env.MAX_BODY_BYTES)
        d.setsockopt(zmq.RECONNECT_IVL, 100)
        d.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        try:
            d.connect(ep)
        except zmq.ZMQError as exc:           # _switch checked its form; libzmq may still refuse
            self._bad_endpoint(ep, exc)       # it: stay unconnected, the failover moves on
            d.close(0)
            d = self._ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
        self._dealer = d
        self._poller.register(d, zmq.POLLIN)
        self._hello_rid = None
        self._hello_at = 0.0

    def _teardown(self) -> None:
        for s in list(self._subs):
            if s._cp is not None:
                try:
                    s._cp.flush()
                except Exception:
                    log.exception("checkpoint flush failed")
        try:
            if self._dealer is not None:
                self._dealer.close(0)
            self._sub.close(0)
        except Exception:
            pass
        self._ctx.term()
        self._out_box.close()
        if self._link is not None:
            try:
                self._link.flush_persist()
                self._store.close()
            except Exception:
                log.exception("could not save the link session")

    def _loop(self) -> None:
        poll = self._poller.poll
        while not self._closed:
            now = time.monotonic()
            timeout = self._next_deadline(now) - now
            events = dict(poll(max(0.0, timeout) * 1000))
            if self._wake_fd in events:
                # read first, then clear: cleared first, a wake between the two
                # would be swallowed by the read and leave _woken set with nothing
                # to read, and every later _wake() would be skipped for good
                # (what it queued is seen below: callers queue before they wake)
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
                self._woken = False
            now = time.monotonic()
            self._do_commands(now)
            self._accept_submissions()
            if self._dealer in events:
                self._drain_dealer(now)
            if self._sub in events:
                self._drain_sub(now)
            self._timers(now)
            self._send_publishes(now)
            self._send_tracker_actions()
            if self._link is not None:
                self._flush_tx()
            if any(s.tracker.ready for s in self._subs):
                with self._cond:
                    self._cond.notify_all()

    def _quiet(self, now: float) -> bool:
        """Nothing waits on a timer but the failover vote, the trackers and the
        link's persist and following deadlines (which :meth:`_next_deadline`
        takes exactly)."""
        if (self._node is None or self._inflight or self._unsent or self._requests
                or self._rehello_at or any(s.tracker._rid is not None for s in self._subs)):
            return False
        link = self._link
        return link is None or (link.answered and not self._txq and not self._following(now))

    def _next_deadline(self, now: float) -> float:
        if self._quiet(now):
            d = now + IDLE_TICK_S
            if self._failover_s and len(self._known_eps) > 1:
                # the vote is due the moment the active node has been silent too long
                d = min(d, max(self._active_seen + self._failover_s, self._next_vote) + 0.001)
            if self._link is not None:
                # egress that stops opening (a stale key) makes us follow over the link
                hb = (self._node.heartbeat_ms if self._node is not None else 100) / 1000
                d = min(d, self._egress_ok_at + max(3 * hb, 0.3) + 0.001)
                if self._link.pending_persist():
                    d = min(d, max(self._persist_at, now))
        else:
            d = now + ENGINE_TICK_S
        if self._unsent_actions or self._unsent_hello is not None:
            d = now + 0.005                   # waiting for a new connection to come up
        box = self._out_box
        # submissions wait for outbox room (on_full="block"): acks make room and
        # wake us through the DEALER, so do not spin on poll(0) meanwhile (that
        # spin took a few messages per turn and cost more CPU than the messages)
        if (self._submit and not self._blocked
                and (self.on_full != "block" or box.count < box.max_count)) or self._cmds:
            return now
        if self._blocked and self._blocked_fits():
            return now                        # acks made room (handled after we accepted)
        if self._unsent and len(self._inflight) < MAX_INFLIGHT_FRAMES and now >= self._resend_at:
            if self._link is None or self._link.can_seal:
                return now
            d = min(d, max(now + 0.005, self._link_hello_at))   # waiting for LINK_KEYS
        for s in self._subs:
            t = s.tracker.deadline()
            if t is not None and t < d:
                d = t
        return d

    def _do_commands(self, now: float) -> None:
        while self._cmds:
            cmd, arg = self._cmds.popleft()
            if cmd == "subscribe":
                self._subs.append(arg)
                # a start at a seq or time may begin its replay now; a "now"
                # start waits for the first live heartbeat or batch
                if (arg.tracker.next_seq is not None and self._node is not None
                        and self._node.last_seq):
                    arg.tracker.on_heartbeat(self._node.last_seq, now)
                arg.tracker.tick(now)
            elif cmd == "unsubscribe":
                if arg in self._subs:
                    self._subs.remove(arg)
                    for a in arg.tracker.actions():
                        self._send(a)
                    if arg.tracker._rid is not None:
                        self._send(env.Cancel(rid=arg.tracker._rid))
            elif cmd == "request":
                ev, fut, deadline = arg
                rid = self._rid()
                ev = type(ev)(**{**{k: getattr(ev, k) for k in ev.__dataclass_fields__}, "rid": rid})
                self._requests[rid] = (fut, deadline, ev, self._send(ev))

    def _send(self, ev: Any) -> bool:
        return self._tx(env.encode(ev))

    def _tx(self, frames: list[bytes]) -> bool:
        """Send one request ``[head, body]``; False if it cannot go now (no
        connection yet, or with link security no session keys yet).

        With link security the frames are sealed here (a retry is sealed
        anew, never resent as is) and queued until :meth:`_flush_tx` has
        made the advanced session state durable."""
        d = self._dealer
        if d is None:
            return False
        link = self._link
        if link is None:
            try:
                d.send_multipart(frames, _NOBLOCK)
                return True
            except zmq.Again:
                return False
        if not link.can_seal:
            self._link_hello(time.monotonic())
            return False
        if not d.getsockopt(zmq.EVENTS) & zmq.POLLOUT:
            return False                  # not connected (IMMEDIATE) or at the high-water mark
        self._txq.append(link.seal(frames))
        return True

    def _flush_tx(self, *, force: bool = False) -> None:
        """Persist the link session (one fsync), then send what was sealed.

        State advanced only by *received* frames is saved with the next send
        (or by the engine's timer, or at close): nothing left the process
        under it, so no key can be used twice after a crash, and an engine
        turn that only took acks costs no fsync."""
        link = self._link
        assert link is not None
        if not self._txq and not force:
            return
        if link.flush_persist() or self._store.dirty:
            self._store.commit()
        if not self._txq:
            return
        d = self._dealer
        for frames in self._txq:
            try:
                d.send_multipart(frames, zmq.NOBLOCK)  # type: ignore[union-attr]
            except zmq.Again:
                pass                     # lost like a dropped packet: timers resend (sealed anew)
        self.counters["sealed_sent"] += len(self._txq)
        self._txq.clear()

    def _link_hello(self, now: float) -> None:
        """Ask the node for its keys (cleartext LINK_HELLO), at most once per backoff."""
        if now < self._link_hello_at or self._dealer is None or self._link is None:
            return
        try:
            self._dealer.send_multipart(self._link.hello(self._rid()), zmq.NOBLOCK)
            self._link_hello_at = now + self._link_backoff
        except zmq.Again:
            self._link_hello_at = now + 0.02     # the connection is not up yet

    def _relink(self, now: float, why: str) -> None:
        """Drop the session and handshake again (the node lost it, refused it,
        or we talk to another node now): what was in flight is resent under
        the new session."""
        link = self._link
        assert link is not None
        self.counters["relinks"] += 1
        link.reset()
        self._txq.clear()
        if now - self._auth_log_at > 5.0:
            self._auth_log_at = now
            log.warning("link to %s reset (%s); handshaking again", self._current_ep, why)
        self._requeue([p for r in self._inflight.values() for p in r[0]])
        self._inflight.clear()
        for rid, (fut, deadline, ev, _sent) in list(self._requests.items()):
            self._requests[rid] = (fut, deadline, ev, False)
        self._link_hello_at = max(self._link_hello_at, now)
        self._link_hello(now)
        self._link_backoff = min(self._link_backoff * 2, MAX_RESEND_BACKOFF_S)
        for s in self._subs:
            s.tracker.restart_replay(now)

    def _accept_submissions(self) -> None:
        """Write queued submissions to the outbox (one fsync), then queue them to send.

        What does not fit waits in ``_blocked`` (``on_full="block"``; nothing
        new is taken before it) or fails with :class:`OutboxFull`; a message
        that could never fit (larger than ``outbox_max_bytes``) fails with
        :class:`LocalProtocolError` either way."""
        box = self._out_box
        blocked = self._blocked
        if blocked:
            if not self._blocked_fits():
                return                         # acks will make room
            self._submit.extendleft(reversed(blocked))
            blocked.clear()
        if not self._submit:
            return
        room = MAX_FRAME_ITEMS * 4
        if self.on_full == "block":
            # take only what fits: retrying a whole batch against a full outbox
            # wastes the engine's time and starves the sender
            room = min(room, box.max_count - box.count)
            if room <= 0:
                return
        self._accepting = True                   # before popping: flush() must not miss them
        pop = self._submit.popleft          # only this thread pops: len() only grows
        batch: list[Ticket] = [pop() for _ in range(min(room, len(self._submit)))]
        try:
            try:
                pseqs = box.append([t.item for t in batch])
            except (OutboxFull, LocalProtocolError):
                # more than there is room for (by count or bytes), or more than
                # could ever fit: append what fits now, one call still
                batch = self._fit(batch)
                pseqs = box.append([t.item for t in batch]) if batch else []
        except OutboxWriteFailed as exc:
            # a full disk: these messages were not kept; say so to their publishers
            # and go on (the next batch is tried afresh, and works once there is room)
            self.counters["outbox_write_failed"] += len(batch)
            log.warning("%s", exc)
            self._accepting = False
            self._refuse(batch, exc)
            return
        except LocalProtocolError as exc:    # not for want of room: these cannot be kept
            self._accepting = False
            self._refuse(batch, exc)
            return
        except BaseException:
            self._submit.extendleft(reversed(batch))   # the engine stops: _run fails them all
            self._accepting = False
            raise
        if not batch:
            self._accepting = False
            return
        self._inflight_tickets.update(zip(pseqs, batch))
        for ps, t in zip(pseqs, batch):
            t.pseq = ps
        self._accepting = False
        with self._cond:
            self._cond.notify_all()
        self._unsent.extend(pseqs)
        self.counters["published"] += len(pseqs)

    def _fit(self, batch: list[Ticket]) -> list[Ticket]:
        """The leading tickets of ``batch`` that fit the outbox now. The rest
        wait in ``_blocked`` (on_full="block") or fail with OutboxFull; one
        larger than the outbox's byte bound fails at once, whatever the mode."""
        box = self._out_box
        cost = box.cost
        room_n = box.max_count - box.count
        room_b = box.max_bytes - box.size
        fits: list[Ticket] = []
        never: list[Ticket] = []
        rest: list[Ticket] = []
        for t in batch:
            c = cost(*t.item)
            if c > box.max_bytes:
                never.append(t)                # at once, wherever it is in the batch
            elif not rest and len(fits) < room_n and c <= room_b:
                fits.append(t)
                room_b -= c
            else:
                rest.append(t)                 # and everything after it, in order
        if never:
            self._refuse(never, LocalProtocolError(
                f"a message of {cost(*never[0].item)} bytes can never fit the outbox, bounded "
                f"by {box.max_bytes} bytes (plant outbox_max_bytes)"))
        if rest:
            if self.on_full == "block":
                self._blocked.extend(rest)
            else:
                self._refuse(rest, OutboxFull(box.count, box.size, box.max_count, box.max_bytes))
        return fits

    def _blocked_fits(self) -> bool:
        """The first blocked submission fits the outbox now (or never will,
        so it is to be refused now)."""
        box = self._out_box
        c = box.cost(*self._blocked[0].item)
        return (box.count < box.max_count and box.size + c <= box.max_bytes) or c > box.max_bytes

    def _refuse(self, batch: list[Ticket], exc: BaseException) -> None:
        """None of ``batch`` was accepted: each ticket fails with ``exc``.
        (``_accepting`` is the caller's: the rest of its batch may still be
        on its way into the outbox, which flush() must wait for.)"""
        for t in batch:
            t.error = exc
            t._finish()
        with self._cond:
            self._cond.notify_all()

    def _send_publishes(self, now: float) -> None:
        if now < self._resend_at:
            return
        get = self._out_box.get
        unsent = self._unsent
        popleft = unsent.popleft
        while unsent and len(self._inflight) < MAX_INFLIGHT_FRAMES:
            entries = []              # (topic, payload) as the outbox holds them
            pseqs = []
            size = 0
            solo = self._solo
            while unsent and len(pseqs) < MAX_FRAME_ITEMS and size < MAX_FRAME_BYTES:
                ps = popleft()
                ent = get(ps)
                if ent is None:      # acked meanwhile (a late ack of a resend)
                    solo.discard(ps)
                    continue
                if solo and ps in solo:
                    if pseqs:        # it goes in a frame of its own, next
                        unsent.appendleft(ps)
                        break
                    entries.append(ent)
                    pseqs.append(ps)
                    break
                entries.append(ent)
                pseqs.append(ps)
                size += len(ent[1]) + len(ent[0])
            if not pseqs:
                break
            rid = self._rid()
            frames = [cbor2.dumps([env.VERSION, env.Kind.PUBLISH, rid]),
                      env.publish_body_of(self.cfg.producer_id, pseqs, entries)]
            if self._link is not None and not self._link.can_seal:
                unsent.extendleft(reversed(pseqs))
                self._link_hello(now)   # no backoff: they go as soon as the keys arrive
                return
            if not self._tx(frames):  # no connection: retry after the backoff
                unsent.extendleft(reversed(pseqs))
                self._resend_at = now + min(self._backoff, MAX_RESEND_BACKOFF_S)
                self._backoff = min(self._backoff * 2, MAX_RESEND_BACKOFF_S)
                return
            self._inflight[rid] = (pseqs, now + self._backoff, 0)

    def _timers(self, now: float) -> None:
        # publish frames whose ack did not come: resend (dedup makes it safe)
        if self._inflight:
            late = [rid for rid, (_p, dl, _n) in self._inflight.items() if now >= dl]
            if late:
                again: list[int] = []
                for rid in late:
                    pseqs, _dl, _n = self._inflight.pop(rid)
                    again.extend(pseqs)
                self.counters["resent"] += len(again)
                self._requeue(again)
                self._backoff = min(self._backoff * 2, MAX_RESEND_BACKOFF_S)
                self._resend_at = now
                self._maybe_failover(now)
        # hello / node discovery
        if self._unsent_hello is not None and self._send(self._unsent_hello):
            self._unsent_hello = None         # the new connection is up now
        if self._rehello_at and now >= self._rehello_at:
            self._rehello_at = 0.0
            self._hello(Hello(rid=self._rid(), client=self.client, epoch=self._max_epoch))
        if self._node is None and now >= self._hello_at and not self._failover_due(now):
            if self._hello_rid is not None:
                self._maybe_failover(now)
            self._hello(Hello(rid=self._rid(), client=self.client, epoch=self._max_epoch))
            self._hello_at = now + self._backoff
        # the active node went silent: tell another node (the Binary Star vote)
        if (self._failover_s and now - self._active_seen > self._failover_s
                and now >= self._next_vote and len(self._known_eps) > 1):
            self._switch(self._vote_target(), now)
            self._hello(Hello(rid=self._rid(), client=self.client, vote=True,
                              epoch=self._max_epoch))
            self._next_vote = now + self._failover_s / 2   # the standby keeps a vote for a while
        # requests: send those the socket refused earlier; fail them at their deadline
        for rid, (fut, deadline, ev, sent) in list(self._requests.items()):
            if now >= deadline:
                del self._requests[rid]
                if not fut.done():
                    fut.set_exception(OrbcastTimeout("the sequencer did not answer in time"))
            elif not sent and self._send(ev):
                self._requests[rid] = (fut, deadline, ev, True)
        for s in self._subs:
            # credit withheld while the application's queue was full is granted once
            # it has drained (Subscription.get wakes us for that)
            s.tracker.consumed(now)
            s.tracker.tick(now)
        if self._bcast is not None:
            self._bcast.expire(now)
            if self._link is not None and self._link.pending_persist() and now >= self._persist_at:
                self._persist_at = now + 1.0      # received-only state: saved at most once a second
                self._flush_tx(force=True)
            # Without the broadcast key (a plant whose read prefixes are narrower
            # than everything, or publish-only) egress does not open. A reader then
            # follows the stream over its link: a PING per heartbeat period gives the
            # tail, and the trackers replay what they lack (filtered by the node to
            # its read prefixes). A publish-only plant pings only to keep the active
            # node's liveness for failover.
            node = self._node
            if (node is not None and self._link is not None and self._link.answered
                    and now >= self._ping_at and self._following(now)):
                period = 0.0
                if self._subs:
                    period = FOLLOW_HEARTBEATS * max(node.heartbeat_ms, 10) / 1000
                elif self._failover_s and now - self._active_seen > self._failover_s / 3:
                    period = self._failover_s / 3
                if period:
                    self._ping_at = now + period
                    self._send(Ping(rid=self._rid()))

    def _vote_target(self) -> str:
        """Where to vote: a known node other than the one last seen active.
        With no active node known (we started after it died) go round the
        known nodes from the current one: never stay on, or go back to, one
        that does not answer."""
        cands = [e for e in self._known_eps if e != self._active_ep] or self._known_eps
        cur = self._current_ep
        if cur not in cands:
            return cands[0]
        if self._active_ep is not None and self._last_heard >= self._switched_at:
            return cur                    # voting at a live node that is not the silent one
        # no answer here since we came (e.g. the silent node under another name:
        # the address configured and the one it announces can differ): move on
        return cands[(cands.index(cur) + 1) % len(cands)]

    def _maybe_failover(self, now: float, force: bool = False) -> None:
        """No answer from the current node: try the next known one."""
        if len(self._known_eps) > 1 and (force or now - self._last_heard > self._backoff):
            i = self._known_eps.index(self._current_ep) if self._current_ep in self._known_eps else -1
            self._switch(self._known_eps[(i + 1) % len(self._known_eps)], now)

    def _hello(self, ev: Hello) -> None:
        """Send a HELLO; a fresh connection may refuse it (IMMEDIATE): keep it
        and send it as soon as the connection is up."""
        self._hello_rid = ev.rid
        self._unsent_hello = None if self._send(ev) else ev

    def _switch(self, ep: str, now: float) -> None:
        """Point the DEALER at another node: resend what was in flight (dedup
        keeps it exactly once) and restart replays there."""
        if ep == self._current_ep or not self._usable_ep(ep):
            return
        log.info("switching to sequencer node %s", ep)
        self._current_ep = ep
        self._switched_at = now
        self._learn(ep, None)                 # (bounded like every learned endpoint)
        self._node = None
        self._unsent_actions.clear()          # addressed to the old node's sessions
        self._connect(ep)
        if self._link is not None:            # never reuse a session with another node
            self._link.reset()
            self._txq.clear()
            self._link_hello_at = 0.0
            self._link_backoff = self.cfg.request_timeout_ms / 1000
        self._requeue([p for r in self._inflight.values() for p in r[0]])
        self._inflight.clear()
        self._backoff = self.cfg.request_timeout_ms / 1000
        self._resend_at = 0.0
        for s in self._subs:
            s.tracker.restart_replay(now)

    def _learn(self, ingress: str | None, egress: str | None) -> None:
        """Endpoints a node announced (its own, its peer's). Checked first: one a
        peer got wrong must not stop the engine; and bounded: at most
        :data:`MAX_LEARNED_ENDPOINTS` beyond the configured ones are kept (the
        oldest learned is forgotten), so announcements cannot grow the plant."""
        if ingress and ingress not in self._known_eps and self._usable_ep(ingress):
            self._known_eps.append(ingress)
            learned = [e for e in self._known_eps
                       if e not in self.cfg.sequencers and e != self._current_ep]
            if len(learned) > MAX_LEARNED_ENDPOINTS:
                self._known_eps.remove(learned[0])
        if egress and egress in self._egress_connected:     # heard again: the most recent
            self._egress_connected[egress] = self._egress_connected.pop(egress)
        elif egress and self._usable_ep(egress):
            try:
                self._sub.connect(egress)
            except zmq.ZMQError as exc:
                self._bad_endpoint(egress, exc)
                return
            self._egress_connected[egress] = None
            if len(self._egress_connected) > MAX_LEARNED_ENDPOINTS + len(self.cfg.sequencers):
                old = next(iter(self._egress_connected))
                del self._egress_connected[old]
                try:
                    self._sub.disconnect(old)
                except zmq.ZMQError:
                    pass

    def _usable_ep(self, ep: str) -> bool:
        try:
            endpoint_host(ep)
        except ValueError as exc:
            self._bad_endpoint(ep, exc)
            return False
        return True

    def _bad_endpoint(self, ep: str, exc: BaseException) -> None:
        self.counters["bad_endpoints"] = self.counters.get("bad_endpoints", 0) + 1
        log.warning("a node announced an endpoint we cannot use (%r): %s; ignored", ep[:80], exc)

    def _send_tracker_actions(self) -> None:
        # a fresh connection (after a switch) refuses sends until it is up
        # (IMMEDIATE): keep refused requests and send them as soon as it is,
        # instead of letting the tracker wait out its request timeout
        pending = self._unsent_actions
        while pending and self._send(pending[0]):
            pending.pop(0)
        for s in self._subs:
            for a in s.tracker.actions():
                if pending or not self._send(a):
                    pending.append(a)
        del pending[:-256]                    # bounded: trackers re-ask on timeout anyway

    def _drain_dealer(self, now: float) -> None:
        d = self._dealer
        for _ in range(10_000):
            if self._dealer is not d:
                break                 # a reply made us switch nodes: that socket is closed
            try:
                frames = d.recv_multipart(zmq.NOBLOCK)  # type: ignore[union-attr]
            except zmq.Again:
                break
            try:
                if self._link is None:
                    ev = env.decode(frames)
                else:
                    ev = self._open_reply(frames, now)
                    if ev is None:
                        continue
                self._last_heard = now
                self._on_reply(ev, now)
            except AuthenticationError as exc:
                self.counters["auth_failed"] += 1
                if now - self._auth_log_at > 5.0:
                    self._auth_log_at = now
                    log.warning("dropped a frame from %s that failed authentication: %s",
                                self._current_ep, exc)
            except RemoteProtocolError as exc:
                self.counters["bad_frames"] += 1
                log.warning("bad frame from the sequencer: %s", exc)

    def _open_reply(self, frames: list[bytes], now: float) -> Any:
        """Link security: take LINK_KEYS, open SEALED_DOWN (installing sender
        keys), act on a cleartext ``auth`` ERROR; None if nothing is left to
        handle. Raises AuthenticationError for anything that does not open."""
        link = self._link
        assert link is not None and self._bcast is not None
        L = self._L
        kind = L.outer_kind(frames)
        if kind == L.SEALED_DOWN:
            node_key, inner = link.open(frames)
            if L.inner_kind(inner) == L.SENDER_KEY:
                if self._bcast.install(node_key, inner, now=now):
                    self.counters["sender_keys"] += 1
                    self._egress_ok_at = now
                    self._no_key_until = 0.0
                return None
            ev = env.decode(inner)
            self._link_backoff = self.cfg.request_timeout_ms / 1000
            return ev
        if kind == L.LINK_KEYS:
            try:
                link.on_keys(frames)          # refuses a node key that is not pinned
            except AuthenticationError as exc:
                log.error("sequencer at %s is not a pinned node: %s", self._current_ep, exc)
                raise
            self._link_hello_at = 0.0
            return None
        if kind == env.Kind.ERROR:
            ev = env.decode(frames)
            if ev.code == "auth":            # cleartext: only a hint that our session is gone
                self.counters["auth_failed"] += 1
                # the node names the refused session in rid: a late error about a
                # session we already replaced must not kill the new one
                if (link.answered or link.established) and ev.rid in (0, link.sid):
                    self._relink(now, ev.message)
                return None
        self.counters["cleartext_ignored"] += 1
        return None

    def _on_reply(self, ev: Any, now: float) -> None:
        t = type(ev)
        if t is Ack:
            self._on_ack(ev)
        elif t is ReplayChunk:
            if ev.epoch < self._max_epoch:       # a deposed leader's log may hold a dead tail
                self.counters["stale_epoch"] = self.counters.get("stale_epoch", 0) + 1
                return
            msgs = env.decode_records(ev.records)
            for s in self._subs:
                s.tracker.on_chunk(ev.rid, ev.start_seq, ev.next_seq, ev.last_seq, ev.done, msgs, now,
                                   len(ev.records))
            # Pipelining: the credit this chunk earned goes out now, not at the end of
            # the turn (after every queued chunk is decoded), so the node cuts the next
            # chunk while we decode; and the application starts on this one at once.
            self._send_tracker_actions()
            with self._cond:
                self._cond.notify_all()
        elif t is Welcome:
            self._on_welcome(ev, now)
        elif t is Pong:
            if ev.role == "active" and ev.epoch >= self._max_epoch and self._link is not None:
                self._active_seen = now        # link liveness while egress does not open
                if self._following(now):
                    for s in self._subs:       # the tail, as a heartbeat would tell it
                        s.tracker.on_heartbeat(ev.last_seq, now)
            self._answer(ev.rid, ev)
        elif t is Error:
            self._on_error(ev, now)
        else:
            rid = getattr(ev, "rid", None)
            if rid is None:                   # a BATCH or HEARTBEAT here: not a reply
                self.counters["bad_frames"] += 1
                return
            self._answer(rid, ev)

    def _answer(self, rid: int, reply: Any) -> None:
        """Resolve request ``rid`` with ``reply`` if it answers that request; a
        reply of another kind under its rid is counted and the request waits on
        (it would reach the application as the wrong type)."""
        req = self._requests.get(rid)
        if req is None:
            return
        if type(reply) is not _ANSWERS.get(type(req[2])):
            self.counters["bad_frames"] += 1
            return
        del self._requests[rid]
        if not req[0].done():
            req[0].set_result(reply)

    def _on_ack(self, ev: Ack) -> None:
        if ev.epoch < self._max_epoch:
            # from a deposed leader: its record may be set aside when it rejoins;
            # keep the message and let the resend reach the current leader
            self.counters["stale_epoch"] = self.counters.get("stale_epoch", 0) + 1
            return
        if ev.epoch > self._max_epoch:
            self._max_epoch = ev.epoch
        fl = self._inflight.pop(ev.rid, None)
        pairs = ev.pairs
        acked = pairs[0::2]
        # tickets first, outbox second: flush() returns once the outbox is
        # empty, and by then every ticket must already say it is acked
        pop = self._inflight_tickets.pop
        for ps, seq in zip(acked, pairs[1::2]):
            t = pop(ps, None)
            if t is not None and t.seq is None:
                t.seq = seq
                if t._callbacks:
                    t._finish()
        self._out_box.ack(acked)
        if self._solo:
            self._solo.difference_update(acked)
        self.counters["acked"] += len(acked)
        if fl is not None:
            self._backoff = self.cfg.request_timeout_ms / 1000
            self._resend_at = 0.0
        with self._cond:
            self._cond.notify_all()

    def _on_welcome(self, ev: Welcome, now: float) -> None:
        self._answer(ev.rid, ev)
        if ev.epoch > self._max_epoch:
            self._max_epoch = ev.epoch
        self._learn(None, ev.egress)
        self._learn(ev.peer_ingress, ev.peer_egress)
        if ev.failover_ms:
            self._failover_s = ev.failover_ms / 1000
            if not ev.peer_egress:
                # the node did not know its standby yet: ask again soon, so our
                # SUB is already connected to both nodes when a failover comes
                self._rehello_at = now + 0.5
        if ev.role != "active":
            # a standby (or a node still starting): publish to the active one --
            # unless we came here to vote because the active one went silent. A
            # standby that has not promoted within a few failover timeouts of our
            # vote still hears its active node, so it is alive: go back and see
            # (with link security a stale broadcast key can make a live node look
            # silent to us; a fresh session there gets a fresh key)
            if ev.peer_ingress and ev.peer_ingress != self._current_ep:
                if self._active_ep is None:
                    # we never saw an active node: the standby names the one it
                    # follows, so a vote (if it is due) stays here, not there
                    self._active_ep = ev.peer_ingress
                if not self._failover_due(now):
                    self._switch(ev.peer_ingress, now)
                elif now - self._switched_at > self._probe_back_s():
                    self._active_seen = now    # give it one failover timeout to answer
                    self._switch(ev.peer_ingress, now)
            return
        if ev.epoch < self._max_epoch:
            return
        fresh = self._node is None
        self._node = ev
        self._active_seen = now
        self._active_ep = self._current_ep
        if fresh:
            # replays that failed while no node was active (a standby answers
            # "not-active") wait out a backoff: ask again now, here
            for sub in self._subs:
                if sub.tracker._rid is None:
                    sub.tracker.restart_replay(now)
        # a (new) active node answered: resend now, not after the backoff a
        # standby's "not-active" answers built up during the failover
        self._resend_at = 0.0
        self._backoff = self.cfg.request_timeout_ms / 1000
        for s in self._subs:
            if s.tracker.next_seq is not None:
                s.tracker.on_heartbeat(ev.last_seq, now)

    def _failover_due(self, now: float) -> bool:
        return bool(self._failover_s) and now - self._active_seen > self._failover_s

    def _probe_back_s(self) -> float:
        """How long a vote at a standby may stay unanswered by a promotion."""
        return max(3 * self._failover_s, 1.0)

    def _following(self, now: float) -> bool:
        """Link security: True while egress does not open for us (no broadcast key,
        none to be had, or none that opened lately): take the tail and liveness
        from the link (PING) instead, so a stale key never leaves us deaf."""
        b = self._bcast
        if b is None:
            return False
        if b.key_epoch is None:
            return True
        hb = (self._node.heartbeat_ms if self._node is not None else 100) / 1000
        return now - self._egress_ok_at > max(3 * hb, 0.3)

    def _requeue(self, pseqs: list[int]) -> None:
        """Put an answered frame's messages back to be sent first, keeping the unsent
        queue in producer_seq order: frames answered one after the other (two
        not-active, say) would otherwise go out in reverse order, and a node whose
        dedup table cannot vouch for a producer's oldest pairs may refuse a message
        that arrives after a newer one of its producer was sequenced (too-old)."""
        u = self._unsent
        if u and pseqs and max(pseqs) > u[0]:
            merged = sorted(set(u).union(pseqs))
            u.clear()
            u.extend(merged)
        else:
            u.extendleft(sorted(pseqs, reverse=True))

    def _on_error(self, ev: Error, now: float) -> None:
        if ev.code == "no-key" and self._link is not None:
            # the node will not hand us the broadcast key (our read ACL is narrower
            # than everything): forget a stale one, stop asking for a while, follow
            # the stream over the link
            self._bcast = self._L.BroadcastReceiver()
            self._no_key_until = now + NO_KEY_RETRY_S
            self.counters["no_key"] = self.counters.get("no_key", 0) + 1
            return
        if ev.code == "not-active":
            # the node we talk to is a standby: retry on the other node
            self._node = None
            if ev.rid in self._inflight:
                pseqs, _dl, _n = self._inflight.pop(ev.rid)
                self._requeue(pseqs)
                self._resend_at = now + self._backoff      # no resend storm at a standby
                self._backoff = min(self._backoff * 2, MAX_RESEND_BACKOFF_S)
            if not self._failover_due(now):
                self._maybe_failover(now, force=True)
            for s in self._subs:
                s.tracker.on_error(ev.rid, ev.code, None, now)
            return
        if ev.rid in self._inflight:
            pseqs, _dl, _n = self._inflight.pop(ev.rid)
            if ev.code in _REFUSALS and len(pseqs) > 1:
                # the node refuses a frame as a whole: one message it will never
                # take (a topic outside our publish ACL, a resend older than what it
                # can deduplicate) must not fail the others packed with it. Send
                # each alone; fail only what is refused so.
                self._solo.update(pseqs)
                self._requeue(pseqs)
                return
            if ev.code in _REFUSALS:
                # the node will never take these: fail them instead of looping
                self._solo.difference_update(pseqs)
                self.counters["rejected"] += len(pseqs)
                exc = RemoteProtocolError(f"sequencer rejected the message: {ev.message}", code=ev.code)
                for p in pseqs:
                    t = self._inflight_tickets.pop(p, None)
                    if t is not None:
                        t.error = exc
                        t._finish()
                self._out_box.ack(pseqs)      # after the tickets (see _on_ack)
                log.error("sequencer rejected %d messages: %s %s", len(pseqs), ev.code, ev.message)
            else:
                self._requeue(pseqs)
                self._resend_at = now + self._backoff
            return
        req = self._requests.pop(ev.rid, None)
        if req is not None and not req[0].done():
            req[0].set_exception(ReplayRejected(ev.message, code=ev.code,
                                                first_available=ev.first_available))
            return
        for s in self._subs:
            s.tracker.on_error(ev.rid, ev.code, ev.first_available, now)

    def _drain_sub(self, now: float) -> None:
        sub = self._sub
        subs = self._subs
        bcast = self._bcast
        L = getattr(self, "_L", None)
        for _ in range(10_000):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                if bcast is not None:
                    kind = L.outer_kind(frames)
                    if kind not in (L.SEALED_BATCH, L.SEALED_HEARTBEAT):
                        self.counters["cleartext_ignored"] += 1    # e.g. a standby's heartbeat
                        continue
                    if kind == L.SEALED_BATCH and not subs:
                        self.counters["batches"] += 1    # nobody reads them here: do not open
                        continue
                    if now < self._no_key_until:
                        continue                   # the node said we get no key
                    try:
                        frames = bcast.open(frames, now=now)
                    except AuthenticationError:
                        self.counters["undecryptable"] += 1   # a gap: replay repairs it
                        req = bcast.key_request(frames, rid=self._rid(), now=now)
                        if req is not None and self._tx(req):
                            self.counters["key_requests"] += 1
                        continue
                    self._egress_ok_at = now
                ev = env.decode(frames)
                if type(ev) is Batch:
                    self.counters["batches"] += 1
                    if ev.epoch < self._max_epoch:
                        self.counters["stale_epoch"] = self.counters.get("stale_epoch", 0) + 1
                        continue                  # a deposed leader: ignore
                    self._max_epoch = ev.epoch
                    if subs:
                        first, last = ev.first_seq, ev.last_seq
                        if last - first >= env.MAX_BATCH_RECORDS:
                            raise RemoteProtocolError("batch head spans more records than a batch holds")
                        # decode only for the subscriptions that will use it: one that
                        # holds these seqs already, or would drop them (buffer full),
                        # is told the tail without the cost of decoding the records
                        nbytes = len(ev.records)
                        takers = [s for s in subs if s.tracker.admits(first, last, now, nbytes)]
                        if takers:
                            msgs = env.decode_records(ev.records)
                            if len(msgs) != last - first + 1 or msgs[0].seq != first or msgs[-1].seq != last:
                                raise RemoteProtocolError("batch records do not match its head")
                            for s in takers:
                                s.tracker.take(first, last, msgs, now, nbytes)
                elif type(ev) is Heartbeat:
                    self.counters["heartbeats"] += 1
                    if ev.epoch < self._max_epoch or ev.role != "active":
                        continue                  # only the active node's position counts
                    self._max_epoch = ev.epoch
                    self._active_seen = now
                    if ev.ingress:
                        self._active_ep = ev.ingress
                        if ev.ingress != self._current_ep:
                            self._switch(ev.ingress, now)   # a new active node announced itself
                        elif self._node is None:
                            self._hello_at = 0.0          # our node just became active: greet it now
                    for s in subs:
                        s.tracker.on_heartbeat(ev.last_seq, now)
            except RemoteProtocolError as exc:
                self.counters["bad_frames"] += 1
                log.warning("bad frame on egress: %s", exc)


class _Waiter:
    def __init__(self, fut: Future[Any], timeout: float) -> None:
        self.fut = fut
        self.timeout = timeout

    def result(self) -> Any:
        try:
            return self.fut.result(self.timeout + 1)
        except FutureTimeout:
            raise OrbcastTimeout("the sequencer did not answer in time") from None
