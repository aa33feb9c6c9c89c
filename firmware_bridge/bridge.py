"""The bridge driver: devices -> topics, topics -> outputs, serial firmware, health.

Threads and who does what:

* the **main loop** (:meth:`Bridge.run`) samples the sampled sensors when
  due, retries failed devices, and feeds the systemd watchdog; it sleeps
  until the next deadline. A sensor read that hangs (a wedged 1-wire bus)
  hangs this loop on purpose: the watchdog pings stop and systemd restarts
  the bridge. It also watches the plant: once the plant's engine has
  stopped (its outbox cannot be written) :meth:`Bridge.run` raises, the
  pings stop and ``firmware-bridge run`` exits 1, so systemd restarts it.
* gpiozero's threads call the event devices' callbacks, which only queue a
  publish (:meth:`plant.Plant.publish_nowait` never blocks on the network).
* one subscription thread per followed topic applies canonical messages to
  outputs in seq order; serial links each have their own thread.

The bridge is a plant: every reading goes through the plant's on-disk
outbox, so readings taken while the sequencer is down (or before a reboot)
are delivered exactly once when it is back.

Outputs are restored at start from a small state file (last applied seq and
value per topic, written atomically on change; outputs change rarely, so
the SD card is spared) and then follow the log from the seq after it, or
from the start of today when there is no state yet.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orbcast import envelope as env
from orbcast.cliutil import StopSignal
from orbcast.envelope import Message
from orbcast.errors import BrokenError, ClosedError, OrbcastError
from orbcast.messages import (
    Health,
    MessageError,
    Reading,
    Value,
    command_value,
    encode_health,
    encode_reading,
)
from orbcast.sdnotify import Notifier
from plant.client import Plant, Subscription
from plant.tracker import Start

from .config import BridgeConfig, DeviceSpec, SerialSpec
from .devices import (
    FailureTracker,
    SamplePolicy,
    open_device,
    read_value,
    to_output_value,
)
from .ratelimit import LogLimiter, more
from .serial_link import HELLO, MAX_BODY, PUB, SET, Record, SerialLink, encode_frame

__all__ = ["STATE_FILE", "STATUS_EVERY_S", "Bridge"]

log = logging.getLogger("orbcast.bridge")

#: Name of the output state file inside the plant's data directory.
STATE_FILE = "bridge-outputs.json"
#: The main loop wakes at least this often to refresh STATUS= (systemd
#: shows it) even when no sensor is due.
STATUS_EVERY_S = 1.0
#: Longest wait for the subscription threads and serial links at close.
JOIN_TIMEOUT_S = 5.0


class _Input:
    __slots__ = ("dev", "health", "policy", "retry_at", "spec")

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        self.dev: Any = None
        self.policy = SamplePolicy(spec.interval, spec.delta, spec.max_silence)
        self.health = FailureTracker(base=min(spec.interval, 1.0) if spec.category == "sampled" else 1.0)
        self.retry_at = 0.0


class _Output:
    __slots__ = ("dev", "health", "retry_at", "spec", "value")

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        self.dev: Any = None
        self.health = FailureTracker()
        self.retry_at = 0.0
        self.value: Value = None       # last commanded value (applied again after a reopen)


class Bridge:
    """GPIO and serial devices <-> an orbcast cluster, as described in the module doc.

    Usage::

        b = Bridge(load("bridge.toml"), pin_factory=MockFactory())
        b.start()                      # plant, devices, restored outputs, links
        threading.Thread(target=b.run).start()
        ...
        b.stop(); b.close()

    ``start`` raises what :class:`plant.Plant` raises for an unusable data
    directory; device failures never raise (they are reported on the
    health topic and retried).
    """

    def __init__(self, cfg: BridgeConfig, *, pin_factory: Any = None,
                 notifier: Notifier | None = None, clock: Callable[[], int] = time.time_ns) -> None:
        self.cfg = cfg
        self.pin_factory = pin_factory
        self.notifier = notifier or Notifier(None)
        self.clock = clock
        self.inputs = [_Input(s) for s in cfg.inputs]
        self.outputs = [_Output(s) for s in cfg.outputs]
        self.links: dict[str, SerialLink] = {}
        self.counters = {"readings": 0, "publish_failures": 0, "sensor_failures": 0,
                         "bad_commands": 0, "outputs_applied": 0, "serial_rejected": 0,
                         "serial_unframable": 0}
        self.last_seq = 0
        self.plant: Plant | None = None
        self._subs: list[Subscription] = []
        self._lock = threading.RLock()      # state file + outputs
        self._stop = StopSignal()           # set by the SIGTERM handler: takes no lock
        self._closing = False
        self._state_path = Path(cfg.plant.data) / STATE_FILE
        self._positions: dict[str, int] = {}
        self._values: dict[str, tuple[int, Value]] = {}
        self._limiter = LogLimiter()
        self._limiter_lock = threading.Lock()   # gpiozero, engine and link threads all log

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        Path(self.cfg.plant.data).mkdir(parents=True, exist_ok=True)
        self.plant = Plant(self.cfg.plant, client="firmware-bridge")
        self._load_state()
        now = time.monotonic()
        for o in self.outputs:
            self._open_output(o, now)
        for i in self.inputs:
            self._open_input(i, now)
        self._follow()
        for s in self.cfg.serial:
            self._start_link(s)

    def run(self) -> None:
        """The main loop; returns after :meth:`stop`. Sends READY=1 first.

        Raises :class:`BrokenError` (``__cause__`` = the engine's error) if
        the plant's engine stops: no reading could be accepted any more, so
        the bridge stops feeding the watchdog and leaves, and systemd
        (``Restart=on-failure``) starts it again with a fresh plant.
        """
        n = self.notifier
        n.ready(self.status_text())
        while not self._stop.is_set():
            dead = self._plant_error()
            if dead is not None:
                log.error("the plant's engine stopped (%s): no reading can be published; "
                          "exiting so that systemd restarts the bridge", dead)
                n.status(f"failed: the plant's engine stopped: {dead}")
                raise BrokenError(f"the plant's engine stopped: {dead}") from dead
            now = time.monotonic()
            nxt = self._turn(now)
            now = time.monotonic()
            n.tick(now, self.status_text())
            nxt = min(nxt, n.next_deadline(now), now + STATUS_EVERY_S)
            self._stop.wait(max(0.0, nxt - time.monotonic()))   # the loop's one timer

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from other threads and from a
        signal handler: :class:`~orbcast.cliutil.StopSignal` takes no lock)."""
        self._stop.set()

    def _plant_error(self) -> BaseException | None:
        """Why the plant's engine stopped, or None while it runs."""
        p = self.plant
        if p is None or self._closing:
            return None
        return p.engine_error

    def _warn_limited(self, kind: str, msg: str, *args: Any) -> None:
        """``log.warning`` at most once a second per ``kind`` (the line says
        how many were not logged)."""
        with self._limiter_lock:
            ok, held = self._limiter.allow(kind, time.monotonic())
        if ok:
            log.warning(msg + "%s", *args, more(held))

    def close(self) -> None:
        """Stop links and subscriptions, close devices and the plant (the
        outbox keeps unacked readings for the next start)."""
        self._closing = True
        self._stop.set()
        for link in self.links.values():
            link.stop(JOIN_TIMEOUT_S)
        for s in self._subs:
            s.close()
        if self.plant is not None:
            self.plant.close()
        for d in self._devices():
            if d.dev is not None:
                try:
                    d.dev.close()
                except Exception:      # closing a broken device: nothing more to do
                    log.debug("closing %s failed", d.spec.name, exc_info=True)
                d.dev = None
        self._stop.close()

    def __enter__(self) -> Bridge:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _devices(self) -> list[_Input | _Output]:
        return [*self.inputs, *self.outputs]

    # --- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Counters, failing devices, outbox depth, last acked seq, links."""
        failing = {d.spec.name: {"failures": d.health.failures, "error": d.health.error}
                   for d in self._devices() if d.health.failing}
        return {"counters": dict(self.counters), "failing": failing, "last_seq": self.last_seq,
                "outbox_depth": self.plant.outbox_depth if self.plant else 0,
                "serial": {n: {"connected": link.connected.is_set(), **link.counters}
                           for n, link in self.links.items()}}

    def status_text(self) -> str:
        failing = sum(1 for d in self._devices() if d.health.failing)
        depth = self.plant.outbox_depth if self.plant else 0
        return (f"bridge: {len(self.inputs)} inputs, {len(self.outputs)} outputs, "
                f"{failing} failing, outbox {depth}, last seq {self.last_seq}")

    # --- inputs ------------------------------------------------------------------------

    def _open_input(self, i: _Input, now: float) -> None:
        try:
            dev = open_device(i.spec, pin_factory=self.pin_factory, w1_path=self.cfg.w1_path)
        except Exception as exc:   # any hardware/driver error: report, retry later
            self._failed(i, now, f"cannot open: {exc}")
            return
        i.dev = dev
        if i.spec.category == "event":
            dev.when_activated = lambda: self._event(i, True)
            dev.when_deactivated = lambda: self._event(i, False)
            self._event(i, bool(dev.is_active))     # the state at start
            self._ok(i)
        else:
            i.policy.next_due = now

    def _event(self, i: _Input, value: bool) -> None:
        self._publish_reading(i.spec, value)

    def _turn(self, now: float) -> float:
        """Sample what is due, retry what failed; returns the next deadline."""
        nxt = now + STATUS_EVERY_S
        for i in self.inputs:
            if i.dev is None:
                if now >= i.retry_at:
                    self._open_input(i, now)
                if i.dev is None:
                    nxt = min(nxt, i.retry_at)
                    continue
            if i.spec.category != "sampled":
                continue
            due = i.retry_at if i.health.failing else i.policy.next_due
            if now >= due:
                self._sample(i, now)
                due = i.retry_at if i.health.failing else i.policy.next_due
            nxt = min(nxt, due)
        for o in self.outputs:
            if o.dev is None:
                if now >= o.retry_at:
                    self._open_output(o, now)
                if o.dev is None:
                    nxt = min(nxt, o.retry_at)
        return nxt

    def _sample(self, i: _Input, now: float) -> None:
        try:
            v = read_value(i.spec, i.dev)
        except Exception as exc:   # a sensor failing at run time must not stop the others
            self._failed(i, now, f"read failed: {exc}")
            return
        self._ok(i)
        if i.policy.sampled(v, now):
            self._publish_reading(i.spec, v)

    def _failed(self, d: _Input | _Output, now: float, error: str) -> None:
        d.retry_at, changed = d.health.failed(now, error)
        self.counters["sensor_failures"] += 1
        if changed:
            log.warning("%s %r (%s) is failing: %s; retrying", "output" if isinstance(d, _Output) else "input",
                        d.spec.name, d.spec.type, error)
            self._publish_health(d.spec.name, "failing", d.health)
        else:
            log.debug("%s still failing (%d): %s", d.spec.name, d.health.failures, error)

    def _ok(self, d: _Input | _Output) -> None:
        if d.health.succeeded():
            log.info("%s %r is working again", d.spec.type, d.spec.name)
            self._publish_health(d.spec.name, "ok", d.health)

    # --- publishing --------------------------------------------------------------------

    def _publish_reading(self, spec: DeviceSpec, value: Value) -> None:
        self._publish(spec.topic, encode_reading(
            Reading(device=spec.name, value=value, unit=spec.unit, time=self.clock())))
        self.counters["readings"] += 1

    def _publish_health(self, device: str, state: str, h: FailureTracker) -> None:
        self._publish(self.cfg.health_topic, encode_health(Health(
            device=device, state=state, failures=h.total, error=h.error[:200], time=self.clock())))

    def _publish(self, topic: str, payload: bytes) -> None:
        if self.plant is None or self._closing:
            return
        try:
            t = self.plant.publish_nowait(topic, payload)
        except (ClosedError, OrbcastError) as exc:
            self.counters["publish_failures"] += 1
            self._warn_limited("publish", "publish on %s failed: %s", topic, exc)
            return
        t.add_done_callback(self._on_acked)

    def _on_acked(self, fut: Any) -> None:
        exc = fut.exception()
        if exc is not None:
            self.counters["publish_failures"] += 1
            self._warn_limited("not-accepted", "a reading was not accepted: %s", exc)
            return
        seq = fut.result()
        self.last_seq = max(self.last_seq, seq)

    # --- outputs -----------------------------------------------------------------------

    def _open_output(self, o: _Output, now: float) -> None:
        try:
            o.dev = open_device(o.spec, pin_factory=self.pin_factory)
        except Exception as exc:   # report and retry; the other devices go on
            self._failed(o, now, f"cannot open: {exc}")
            return
        self._ok(o)
        saved = self._values.get(o.spec.topic)
        if saved is not None:
            self._apply(o, saved[1], saved[0])
        elif o.value is not None:
            self._apply(o, o.value, 0)

    def _apply(self, o: _Output, value: Value, seq: int) -> None:
        try:
            v = to_output_value(o.spec, value)
        except MessageError as exc:
            self.counters["bad_commands"] += 1
            log.warning("output %r: ignoring seq %d: %s", o.spec.name, seq, exc)
            return
        o.value = value
        if o.dev is None:
            return
        try:
            o.dev.value = v
        except Exception as exc:   # a broken output: reopen later, value re-applied then
            self._failed(o, time.monotonic(), f"set failed: {exc}")
            try:
                o.dev.close()
            except Exception:
                pass
            o.dev = None
            return
        self.counters["outputs_applied"] += 1

    def _follow(self) -> None:
        """One subscription per followed topic (outputs) or prefix (serial forwards).

        A topic can be followed by several of them (an output's topic inside
        a ``forward`` prefix, overlapping prefixes): the ``out:`` one drives
        the outputs, and each link gets a message from exactly one ``serial:``
        one (:meth:`_forwarded_by`), so nothing is applied or sent twice.
        """
        if self.plant is None:
            raise ClosedError("start() the bridge first")
        keys: dict[str, tuple[str, bool]] = {}
        for o in self.outputs:
            keys[f"out:{o.spec.topic}"] = (o.spec.topic, True)
        for s in self.cfg.serial:
            for f in s.forward:
                keys[f"serial:{f}"] = (f, False)
        for key, (prefix, exact) in keys.items():
            pos = self._positions.get(key)
            start: Any = Start.at_seq(pos + 1) if pos else "today"
            sub = self.plant.subscribe(prefix, start=start,
                                       callback=lambda m, k=key, p=prefix, e=exact: self._on_canonical(k, p, e, m))
            self._subs.append(sub)

    def _on_canonical(self, key: str, prefix: str, exact: bool, m: Message) -> None:
        if exact and m.topic != prefix:
            return
        links = [] if exact else [s for s in self.cfg.serial if self._forwarded_by(s, m.topic) == prefix]
        frame: bytes | None = None
        with self._lock:
            if m.seq <= self._positions.get(key, 0):
                return                      # already applied before a restart
            self._positions[key] = m.seq
            try:
                value = command_value(m.payload)
            except MessageError as exc:
                self.counters["bad_commands"] += 1
                self._warn_limited("bad-command", "seq %d on %s is not a usable value: %s",
                                   m.seq, m.topic, exc)
                return
            driven = [o for o in self.outputs if o.spec.topic == m.topic]
            if links:
                frame = self._set_frame(m.topic, value)
                if frame is None:
                    # refused for the serial side only: not saved (a resend
                    # would fail on it too), not sent; outputs still follow it
                    self.counters["serial_unframable"] += 1
                    self._warn_limited("unframable", "seq %d on %s: not forwarded to serial %s: a SET "
                                       "of this value does not fit in a %d-byte frame body",
                                       m.seq, m.topic, ", ".join(s.name for s in links), MAX_BODY)
            if frame is not None or driven:
                old = self._values.get(m.topic)
                if old is None or old[0] < m.seq:     # a lagging subscription never moves it back
                    self._values[m.topic] = (m.seq, value)
            if exact:
                for o in driven:
                    self._apply(o, value, m.seq)
            self._save_state()
        if frame is None:
            return
        for s in links:
            link = self.links.get(s.name)
            if link is not None:
                link.send_frame(frame)

    @staticmethod
    def _forwarded_by(s: SerialSpec, topic: str) -> str | None:
        """The one ``forward`` prefix of ``s`` whose subscription sends ``topic`` to it."""
        return next((f for f in s.forward if topic.startswith(f)), None)

    @staticmethod
    def _set_frame(topic: str, value: Value) -> bytes | None:
        """The SET frame for ``topic`` = ``value``, or None if it cannot be framed."""
        try:
            return encode_frame(Record(kind=SET, topic=topic, value=value))
        except ValueError:
            return None

    def _load_state(self) -> None:
        try:
            text = self._state_path.read_text()
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:     # ValueError: not UTF-8
            log.warning("ignoring unreadable %s: %s", self._state_path, exc)
            return
        try:
            self._positions, self._values = _parse_state(json.loads(text))
        except (ValueError, TypeError) as exc:
            # a damaged state file only costs a replay from the start of today
            log.warning("ignoring unreadable %s: %s", self._state_path, exc)
            self._positions, self._values = {}, {}

    def _save_state(self) -> None:
        """Atomic replace, no fsync: after a power cut the old file is
        still whole, and replay re-applies what came after it."""
        tmp = self._state_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"version": 1, "positions": self._positions,
                                       "values": {k: list(v) for k, v in self._values.items()}}))
            os.replace(tmp, self._state_path)
        except OSError as exc:
            log.warning("cannot save output state: %s", exc)

    # --- serial links ---------------------------------------------------------------------

    def _start_link(self, s: SerialSpec) -> None:
        link = SerialLink(s.name, s.url, baudrate=s.baudrate,
                          on_record=lambda r, s=s: self._on_serial(s, r),
                          on_connect=lambda s=s: self._resend_sets(s))
        self.links[s.name] = link
        link.start()

    def _resend_sets(self, s: SerialSpec) -> None:
        link = self.links.get(s.name)
        if link is None:
            return
        frames: list[bytes] = []
        with self._lock:
            for t, (seq, v) in sorted(self._values.items(), key=lambda kv: kv[1][0]):
                if not any(t.startswith(f) for f in s.forward):
                    continue
                frame = self._set_frame(t, v)
                if frame is None:
                    # saved by an older bridge, or for an output: the firmware cannot get it
                    self.counters["serial_unframable"] += 1
                    self._warn_limited("unframable", "seq %d on %s: not resent to serial %s: a SET of "
                                       "this value does not fit in a %d-byte frame body",
                                       seq, t, s.name, MAX_BODY)
                    if not any(o.spec.topic == t for o in self.outputs):
                        del self._values[t]
                        self._save_state()
                    continue
                frames.append(frame)
        for frame in frames:
            link.send_frame(frame)

    def _on_serial(self, s: SerialSpec, r: Record) -> None:
        if r.kind == HELLO:
            log.info("serial %s: firmware %r version %r", s.name, r.topic, r.value)
            self._resend_sets(s)
            return
        if r.kind != PUB:
            self.counters["serial_rejected"] += 1
            return
        topic = s.topic_prefix + r.topic
        try:
            env.check_topic(topic)
        except (ValueError, TypeError):
            self.counters["serial_rejected"] += 1
            log.warning("serial %s: bad topic %r", s.name, r.topic)
            return
        if not self.cfg.allowed(topic):
            self.counters["serial_rejected"] += 1
            log.warning("serial %s: topic %r is not allowed", s.name, topic)
            return
        self._publish(topic, encode_reading(Reading(device=s.name, value=r.value, unit=r.unit or "",
                                                    time=self.clock())))
        self.counters["readings"] += 1


def _parse_state(doc: Any) -> tuple[dict[str, int], dict[str, tuple[int, Value]]]:
    """The state file's ``{"positions": {key: seq}, "values": {topic: [seq,
    value]}}`` -> (positions, values). Raises ``ValueError`` / ``TypeError`` on any other
    shape (a file from elsewhere, or damaged in a way that is still JSON)."""
    if not isinstance(doc, dict):
        raise TypeError(f"expected a JSON object, got {type(doc).__name__}")
    pos, vals = doc.get("positions"), doc.get("values")
    if not isinstance(pos, dict) or not isinstance(vals, dict):
        raise TypeError("'positions' and 'values' must be JSON objects")
    positions: dict[str, int] = {}
    for k, v in pos.items():
        if type(v) is not int or v < 0:
            raise ValueError(f"position of {k!r} is not a seq: {v!r}")
        positions[k] = v
    values: dict[str, tuple[int, Value]] = {}
    for k, v in vals.items():
        if not (isinstance(v, list) and len(v) == 2 and type(v[0]) is int and v[0] >= 0):
            raise ValueError(f"value of {k!r} is not [seq, value]: {v!r}")
        x = v[1]
        if not (x is None or isinstance(x, (bool, int, str)) or (isinstance(x, float) and math.isfinite(x))):
            raise ValueError(f"value of {k!r} is not a bool, number, text or null: {x!r}")
        values[k] = (v[0], x)
    return positions, values
