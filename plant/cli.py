"""The ``plant`` command: publish, tail, replay, status.

    plant publish TOPIC [PAYLOAD] | --stdin   [--timeout S]
    plant tail [--topic PREFIX] [--from now|today|SEQ|TIME|checkpoint:NAME] [--count N]
    plant replay --from SEQ [--to SEQ] [--since TIME|today] [--until TIME|today] [--topic PREFIX]
                 [--format jsonl|text] [--output FILE] [--follow [--checkpoint NAME]]
    plant status
    plant keys generate [--out DIR] | plant keys show [--key FILE]

Every command but ``keys`` takes ``--sequencer EP`` (repeatable; a node's ingress
endpoint), ``--config FILE`` and the ``ORBCAST_PLANT_*`` environment, like
the library.

``replay --output FILE`` (without ``--follow``) writes a temp file next to
FILE and renames it over FILE only when the replay is complete: a failed
replay leaves an existing FILE as it was. ``--follow --output`` appends (an
archive; see :func:`archive_resume`).
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import json
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Self, Sequence

from orbcast import config as cfgmod
from orbcast.cliutil import StopSignal, run_main, setup_logging
from orbcast.envelope import MAX_PAYLOAD_BYTES, Error, Message, StatusRequest, check_topic
from orbcast.errors import LocalProtocolError, OrbcastError, OrbcastTimeout, RemoteProtocolError
from orbcast.fsutil import fsync_dir
from orbcast.rpc import one_shot_link, request

from .checkpoint import CheckpointStore
from .client import Plant, Subscription, parse_start, parse_time, start_of_day_ns
from .tracker import Start

__all__ = ["main", "format_message", "rfc3339"]

#: Print replay progress to stderr at most this often, once a replay has
#: been running at least this long.
PROGRESS_EVERY_S = 1.0
#: ``replay --follow --output FILE``: how often the file is fsynced (and only
#: then the checkpoint may move past what it holds).
ARCHIVE_SYNC_EVERY_S = 1.0
#: A command that waits for a node (tail, publish, replay --follow) says so on
#: stderr after this long without an answer, and keeps waiting (a node may be
#: restarting): long enough not to fire during a failover or a node's start,
#: short enough that a wrong endpoint does not look like a quiet stream.
NO_ANSWER_NOTICE_S = 5.0
#: ``publish --stdin`` reads a line at most this long (a payload and its newline);
#: a longer line is refused without reading it whole into memory.
MAX_STDIN_LINE = MAX_PAYLOAD_BYTES + 1


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


def rfc3339(ns: int) -> str:
    """ns since the epoch -> ``2026-11-25T15:12:14.123456789Z``.

    By date arithmetic, not ``fromtimestamp``: on 32-bit Raspberry Pi OS
    (Bookworm armhf, a 32-bit ``time_t``) that raises for any time after
    2038-01-19, and a record's time is whatever its node's clock said."""
    s, frac = divmod(ns, 1_000_000_000)
    base = (_EPOCH + _dt.timedelta(seconds=s)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{frac:09d}Z"


def format_message(m: Message, fmt: str, *, raw: bool = False) -> str:
    """One output line for ``m`` (``jsonl`` or ``text``), without newline.

    A payload that is one CBOR map (the message layer of
    :mod:`orbcast.messages`: readings, set commands, health) is shown
    decoded: as ``"data": {...}`` in jsonl (instead of the base64
    ``"payload"``, which jsonl always carries), as compact JSON in text. ``raw=True`` (the ``--raw``
    flag) keeps the payload bytes as they are: base64 in jsonl, text or hex.
    """
    from orbcast.messages import decode_payload

    def _json_default(v: Any) -> Any:      # CBOR values JSON lacks
        if isinstance(v, (bytes, bytearray)):
            return base64.b64encode(v).decode("ascii")
        return repr(v)

    data = None if raw else decode_payload(m.payload)
    if fmt == "jsonl":
        d: dict[str, Any] = {"seq": m.seq, "epoch": m.epoch, "time": rfc3339(m.time),
                             "topic": m.topic, "producer": m.producer,
                             "producer_seq": m.producer_seq}
        d["payload"] = base64.b64encode(m.payload).decode("ascii")   # always: the raw bytes
        if data is not None:
            d["data"] = data
        return json.dumps(d, separators=(",", ":"), default=_json_default)
    if data is not None:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    else:
        try:
            text = m.payload.decode("utf-8")
            if not text.isprintable():
                text = json.dumps(text)
        except UnicodeDecodeError:
            text = "hex:" + m.payload.hex()
    return f"{m.seq:>8}  {rfc3339(m.time)}  {m.topic}  {m.producer}#{m.producer_seq}  {text}"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sequencer", action="append", metavar="EP",
                   help="a node's ingress endpoint (repeat for each node)")
    p.add_argument("--config", help="TOML config file ([plant] section)")
    p.add_argument("--producer-id", help="stable producer id (default: host name)")
    p.add_argument("--data", help="plant state directory (outbox, checkpoints)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plant", description="orbcast plant: publish, tail, replay, status")
    sub = p.add_subparsers(dest="cmd", required=True)

    pub = sub.add_parser("publish", help="publish messages; prints each assigned seq")
    _common(pub)
    pub.add_argument("topic")
    pub.add_argument("payload", nargs="?", help="the payload (UTF-8); omit with --stdin")
    pub.add_argument("--stdin", action="store_true", help="publish one message per input line")
    pub.add_argument("--timeout", type=float, default=None,
                     help="give up after S seconds; unacked messages stay in the outbox")

    tail = sub.add_parser("tail", help="print messages as they are sequenced")
    _common(tail)
    tail.add_argument("--topic", default="", help="topic prefix")
    tail.add_argument("--from", dest="start", default="now",
                      help="now, today, a SEQ, an RFC 3339 TIME, or checkpoint:NAME")
    tail.add_argument("--format", choices=("text", "jsonl"), default="text")
    tail.add_argument("--count", type=int, default=None, help="exit after N messages (N >= 1)")
    tail.add_argument("--raw", action="store_true",
                      help="show payloads as stored (base64 in jsonl), not decoded CBOR")

    rep = sub.add_parser("replay", help="print a range of the log (the CLI replay tool)")
    _common(rep)
    rep.add_argument("--from", dest="from_seq", type=int, default=1, help="first seq (default 1)")
    rep.add_argument("--to", dest="to_seq", type=int, default=None, help="last seq (inclusive)")
    rep.add_argument("--since", default=None,
                     help="first record at or after this RFC 3339 time (or 'today': 00:00 UTC)")
    rep.add_argument("--until", default=None,
                     help="stop before this RFC 3339 time (or 'today': 00:00 UTC)")
    rep.add_argument("--topic", default="", help="topic prefix")
    rep.add_argument("--format", choices=("text", "jsonl"), default="jsonl")
    rep.add_argument("--output", help="write to FILE instead of stdout (replaced only when the "
                     "replay is complete; with --follow: appended to)")
    rep.add_argument("--follow", action="store_true",
                     help="after the replay continue with live messages (no seam)")
    rep.add_argument("--checkpoint", default=None,
                     help="with --follow: resume from / save to this named checkpoint")
    rep.add_argument("--timeout", type=float, default=30.0)
    rep.add_argument("--raw", action="store_true",
                     help="show payloads as stored (base64 in jsonl), not decoded CBOR")

    st = sub.add_parser("status", help="the node's role, positions and counters, and this plant's")
    _common(st)
    st.add_argument("--json", action="store_true")
    st.add_argument("--timeout", type=float, default=5.0)

    _keys_parsers(sub)
    return p


# --- plant keys (link security identities; see docs/security.md) -----------------------------


def _default_key_dir() -> Path:
    import os
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "orbcast"


def _keys_parsers(sub: Any) -> None:
    keys = sub.add_parser("keys", help="long-term identity keys for link security")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    gen = ksub.add_parser("generate", help="write a new X25519 identity (private file mode 0600)")
    gen.add_argument("--out", default=None, metavar="DIR",
                     help="directory for identity.key and identity.pub "
                          "(default: $XDG_CONFIG_HOME/orbcast or ~/.config/orbcast)")
    gen.add_argument("--debug", action="store_true", help="show tracebacks")
    show = ksub.add_parser("show", help="print the public key in copy-pasteable form")
    show.add_argument("--key", default=None, metavar="FILE",
                      help="private key file (default: identity.key in the default directory)")
    show.add_argument("--debug", action="store_true", help="show tracebacks")


def _keys(a: argparse.Namespace) -> int:
    from orbcast.keys import fingerprint, generate_identity_file, load_identity
    if a.keys_cmd == "generate":
        ident, key_path, pub_path = generate_identity_file(Path(a.out) if a.out else _default_key_dir())
        print(ident.public_text)
        print(f"wrote {key_path} (private, mode 0600) and {pub_path}; fingerprint "
              f"{fingerprint(ident.public)}. Add the public key to each sequencer node's allowlist.",
              file=sys.stderr)
        return 0
    path = Path(a.key) if a.key else _default_key_dir() / "identity.key"
    ident = load_identity(path)
    print(ident.public_text)
    print(f"{path}: fingerprint {fingerprint(ident.public)}", file=sys.stderr)
    return 0


def _config(a: argparse.Namespace) -> cfgmod.PlantConfig:
    return cfgmod.load(cfgmod.PlantConfig, a.config, overrides={
        "sequencers": a.sequencer, "producer_id": a.producer_id, "data": a.data})


def _dispatch(a: argparse.Namespace) -> int:
    setup_logging("debug" if a.debug else "warning")
    if a.cmd == "keys":
        return _keys(a)
    cfg = _config(a)
    if a.cmd == "publish":
        return _publish(a, cfg)
    if a.cmd == "tail":
        return _tail(a, cfg)
    if a.cmd == "replay":
        return _replay(a, cfg)
    if a.cmd == "status":
        return _status(a, cfg)
    return 2


def _publish(a: argparse.Namespace, cfg: cfgmod.PlantConfig) -> int:
    if a.stdin == (a.payload is not None):
        raise ValueError("give a PAYLOAD or --stdin (one message per line), not both")
    check_topic(a.topic)          # before any input is read: a bad topic is no line's fault
    deadline = None if a.timeout is None else time.monotonic() + a.timeout
    with (Plant(cfg, client="plant-cli") as p,
          _NoAnswerNotice(p, cfg.sequencers, only_while_publishing=True)):
        if p.outbox_depth:
            print(f"resending {p.outbox_depth} messages left in the outbox by an earlier run",
                  file=sys.stderr)
        if a.stdin:
            _publish_lines(p, a.topic, sys.stdin.buffer, deadline)
        else:
            _print_seqs([p.publish_nowait(a.topic, a.payload.encode("utf-8"))], deadline)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        p.flush(left)   # also the earlier runs' leftovers
    return 0


class _LineRefused(Exception):
    def __init__(self, lineno: int, why: str) -> None:
        super().__init__(why)
        self.lineno = lineno


def _publish_lines(p: Plant, topic: str, src: IO[bytes], deadline: float | None) -> None:
    """``publish --stdin``: one message per line (its bytes without the
    newline), each seq printed in input order. A line that cannot be a message
    (not UTF-8, longer than the payload limit) stops the input there: the seqs
    of every line before it are printed, then a ValueError names the line and
    says that it and the rest were not published."""
    tickets = []
    lineno = 0
    try:
        while True:
            raw = src.readline(MAX_STDIN_LINE)
            if not raw:
                break
            lineno += 1
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            elif len(raw) == MAX_STDIN_LINE:
                raise _LineRefused(lineno, f"longer than {MAX_PAYLOAD_BYTES} bytes, the payload limit")
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _LineRefused(lineno, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at "
                                           f"offset {exc.start})") from None
            try:
                tickets.append(p.publish_nowait(topic, raw))
            except LocalProtocolError as exc:
                raise _LineRefused(lineno, str(exc)) from None
            if len(tickets) >= 1024:   # print as we go for long inputs
                _print_seqs(tickets[:512], deadline)
                del tickets[:512]
    except _LineRefused as exc:
        _print_seqs(tickets, deadline)      # what went before is published: say where
        n = exc.lineno
        rest = "nothing of the input was published" if n == 1 else (
            f"lines 1-{n - 1} were published (their seqs are printed above); line {n} and "
            "every line after it were not published")
        raise ValueError(f"input line {n}: {exc}; {rest}") from None
    _print_seqs(tickets, deadline)


def _print_seqs(tickets: list, deadline: float | None) -> None:  # type: ignore[type-arg]
    for t in tickets:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            print(t.result(left), flush=False)
        except OrbcastTimeout:
            raise OrbcastTimeout("timed out waiting for acks; unacked messages stay in the "
                                 "outbox and are sent by the next run with this producer id") from None
    sys.stdout.flush()


class _NoAnswerNotice:
    """While a command waits on the nodes: after :data:`NO_ANSWER_NOTICE_S`
    in which the plant heard nothing from a node (no answer, no heartbeat:
    :attr:`Plant.silent_for`) say so on stderr, once per silence (and once
    when a node is heard again). Nothing is sent for it (a request every few
    seconds would cost a secured pair a state write each, for the life of an
    archive). The command itself keeps waiting: a tail or an archive outlives
    a node's restart."""

    def __init__(self, p: Plant, endpoints: Sequence[str], *,
                 only_while_publishing: bool = False) -> None:
        # publish: between messages (an idle --stdin) a plant may hear nothing and
        # need nothing (a secured plant that may not read gets no heartbeats)
        self._only_publishing = only_while_publishing
        self._p = p
        self._eps = ", ".join(endpoints)
        self._stop = threading.Event()
        self._silent = False
        self._thread = threading.Thread(target=self._run, name="plant-cli-notice", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        if self._silent and not self._thread.is_alive():
            quiet = self._p.silent_for     # the command may end before the next look
            if quiet is not None and quiet < NO_ANSWER_NOTICE_S:
                print("plant: a node answers now", file=sys.stderr, flush=True)

    def _say(self, text: str) -> None:
        if not self._stop.is_set():
            print(f"plant: {text}", file=sys.stderr, flush=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(0.5):
            quiet = self._p.silent_for
            never = quiet is None
            if never:
                quiet = time.monotonic() - started
            elif self._only_publishing and not self._p.outbox_depth:
                quiet = 0.0                    # nothing to wait for: no silence to report
            if quiet >= NO_ANSWER_NOTICE_S and not self._silent:
                self._silent = True
                self._say(f"no answer from {self._eps} "
                          + ("yet" if never else f"for {NO_ANSWER_NOTICE_S:g} s")
                          + "; still trying (is a node running there, and is that its "
                            "ingress endpoint?)")
            elif quiet < NO_ANSWER_NOTICE_S and self._silent:
                self._silent = False
                self._say("a node answers now")


def _start_and_checkpoint(spec: str) -> tuple[Any, str | None]:
    if spec.startswith("checkpoint:"):
        name = spec.split(":", 1)[1]
        return "today", name     # first run of a checkpoint starts at today's start
    return parse_start(spec), None


def _emit(sub: Subscription, out: IO[str], fmt: str, count: int | None = None,
          progress_total: int | None = None, *, raw: bool = False, notifier: Any = None,
          durable: bool = False, stop: StopSignal | None = None) -> int:
    """Write messages until the subscription ends (or ``count``, or ``stop``).
    With a systemd ``notifier`` or a ``stop`` event the loop wakes at least once
    a second (to ping the watchdog, to notice the stop) even when no message
    arrives. ``durable`` (an archive file; the subscription has ``auto_ack``
    off): the file is fsynced every :data:`ARCHIVE_SYNC_EVERY_S` and at the end,
    and only then is the position acknowledged, so the checkpoint never gets
    ahead of what the file holds."""
    n = 0
    t0 = time.monotonic()
    last = last_sync = t0
    unsynced: int | None = None              # seq of the last line written, not yet fsynced
    wake = notifier is not None or stop is not None

    def sync() -> None:
        nonlocal unsynced, last_sync
        out.flush()
        if durable and unsynced is not None:
            os.fsync(out.fileno())
            sub.ack(unsynced)
            unsynced = None
        last_sync = time.monotonic()

    try:
        while stop is None or not stop.is_set():
            if notifier is not None:
                notifier.tick(time.monotonic(),
                              status=f"archived {n} messages, at seq {sub.position or 0}")
            if wake:
                try:
                    m = sub.get(timeout=1.0)
                except OrbcastTimeout:
                    sync()
                    continue
            else:
                m = sub.get()
            if m is None:
                break
            out.write(format_message(m, fmt, raw=raw))
            out.write("\n")
            n += 1
            if durable:
                unsynced = m.seq
                if time.monotonic() - last_sync >= ARCHIVE_SYNC_EVERY_S:
                    sync()
            if count is not None and n >= count:
                break
            if progress_total is not None and n % 4096 == 0:
                now = time.monotonic()
                if now - last >= PROGRESS_EVERY_S:
                    last = now
                    print(f"replay: {n} records ({n / (now - t0):,.0f}/s), at seq {m.seq}"
                          + (f" of {progress_total}" if progress_total else ""), file=sys.stderr)
                    out.flush()
    finally:
        sync()
    return n


def archive_resume(path: str, fmt: str) -> int | None:
    """The seq of the last complete line of archive file ``path`` (None if it
    is empty or absent), after cutting away a torn last line (a crash or power
    cut in the middle of a write). ``replay --follow --output`` resumes after
    it: the file, not the checkpoint, says what it holds, so a restart at any
    moment leaves no gap and no duplicate.

    Raises ValueError if the last line is not a record of format ``fmt``."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return None
    with f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return None
        f.seek(end - 1)
        if f.read(1) != b"\n":
            cut = _rfind_newline(f, end) + 1
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
            print(f"replay: {path}: cut a torn last line ({end - cut} bytes) left by a crash",
                  file=sys.stderr)
            end = cut
            if end == 0:
                return None
        start = _rfind_newline(f, end - 1) + 1
        f.seek(start)
        line = f.read(end - 1 - start).decode("utf-8", "replace")
    try:
        seq = json.loads(line)["seq"] if fmt == "jsonl" else int(line.split(None, 1)[0])
        if type(seq) is not int or seq < 1:
            raise ValueError
    except (ValueError, KeyError, TypeError, IndexError):
        raise ValueError(f"{path}: its last line is not a {fmt} record ({line[:80]!r}); "
                         "move the file aside or use the format it was written in") from None
    return seq


def _rfind_newline(f: Any, before: int, block: int = 65536) -> int:
    """Offset of the last b"\\n" in ``f`` before offset ``before``, or -1."""
    pos = before
    while pos > 0:
        lo = max(0, pos - block)
        f.seek(lo)
        i = f.read(pos - lo).rfind(b"\n")
        if i >= 0:
            return lo + i
        pos = lo
    return -1


def _tail(a: argparse.Namespace, cfg: cfgmod.PlantConfig) -> int:
    if a.count is not None and a.count < 1:
        raise ValueError(f"--count must be at least 1, got {a.count}")
    start, cp = _start_and_checkpoint(a.start)
    with Plant(cfg, client="plant-cli") as p, _NoAnswerNotice(p, cfg.sequencers):
        sub = p.subscribe(a.topic, start=start, checkpoint=cp)
        try:
            _emit(sub, sys.stdout, a.format, a.count, raw=a.raw)
        finally:
            sub.close()
    return 0


def _option_time(option: str, value: str | None) -> int | None:
    """``--since`` / ``--until``: an RFC 3339 time or ``today`` -> ns (None if absent)."""
    if value is None:
        return None
    if value.strip() == "today":
        return start_of_day_ns()
    try:
        return parse_time(value)
    except ValueError as exc:
        raise ValueError(f"{option} takes an RFC 3339 time or 'today'; {exc}") from None


def _check_replay_args(a: argparse.Namespace, since: int | None, until: int | None) -> None:
    """Refuse a replay that could only print nothing, or ignore an option."""
    if a.from_seq < 1:
        raise ValueError(f"--from must be a seq >= 1 (the log starts at seq 1), got {a.from_seq}")
    if a.to_seq is not None and a.to_seq < a.from_seq:
        raise ValueError(f"--to {a.to_seq} is before --from {a.from_seq}: an empty range")
    if since is not None and until is not None and until <= since:
        raise ValueError(f"--until {a.until} is not after --since {a.since}: an empty range")
    if a.follow and (a.to_seq is not None or until is not None):
        raise ValueError("--follow cannot be combined with --to or --until")
    if a.checkpoint is not None and not a.follow:
        raise ValueError("--checkpoint needs --follow: a replay of a fixed range neither resumes "
                         "from a checkpoint nor saves one")


class _ReplacedOnSuccess:
    """``replay --output FILE``: a temp file beside FILE (same directory, so the
    rename is atomic) that :meth:`commit` fsyncs and renames over FILE, and
    :meth:`discard` removes. FILE keeps its permission bits and (when we may
    set it) its owner; a new one gets the umask's. A symlink is followed: its
    target is replaced. Written directly, as before: what is not a regular
    file (``/dev/stdout``, a pipe), a file with other hard links (replacing it
    would cut them off), and a FILE in a directory where no temp file can be
    made (then a failed replay leaves it partial, and stderr says so)."""

    def __init__(self, path: str) -> None:
        self.tmp: str | None = None
        self.path = path
        try:
            st: os.stat_result | None = os.stat(path)   # follows links: /dev/stdout too
        except FileNotFoundError:
            st = None
        if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_nlink > 1):
            self.file: IO[str] = open(path, "w", encoding="utf-8")  # noqa: SIM115
            return
        real = os.path.realpath(path)
        d, base = os.path.split(real)
        try:
            fd, tmp = _new_temp(d, base)
        except OSError as exc:                # a directory we may not write, a read-only fs
            print(f"replay: cannot make a temp file beside {path} ({exc.strerror}): writing "
                  "it directly, so a replay that fails leaves it partial", file=sys.stderr)
            self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115
            return
        self.path, self.tmp = real, tmp
        try:
            if st is not None:
                if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                    try:
                        os.fchown(fd, st.st_uid, st.st_gid)
                    except PermissionError:
                        pass                  # not ours to keep: the file becomes ours
                mode = st.st_mode & 0o7777
            else:
                umask = os.umask(0)           # as open(FILE, "w") would create FILE
                os.umask(umask)
                mode = 0o666 & ~umask
            os.fchmod(fd, mode)               # (made 0600: nobody else reads it meanwhile)
            self.file = open(fd, "w", encoding="utf-8")  # noqa: SIM115 (closed by commit/discard)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise

    def commit(self) -> None:
        """Make FILE the complete output. Raises OSError: before the rename FILE
        is then unchanged and the temp file removed; only the directory's fsync
        comes after it."""
        renamed = False
        try:
            self.file.flush()
            if self.tmp is not None:
                os.fsync(self.file.fileno())
            self.file.close()
            if self.tmp is not None:
                os.replace(self.tmp, self.path)
                self.tmp = None
                renamed = True
        except BaseException:
            self.discard()
            raise
        if renamed:
            fsync_dir(os.path.dirname(self.path) or ".")

    def discard(self) -> None:
        """Drop the partial output: FILE stays as it was."""
        try:
            self.file.close()
        except OSError:
            pass
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def _new_temp(d: str, base: str) -> tuple[int, str]:
    """A new file ``.BASE.XXXXXXXX.tmp`` in ``d``, mode 0600; (fd, path). BASE
    is cut to 200 bytes: FILE's own name may be up to 255."""
    stem = base.encode()[:200].decode(errors="ignore")
    while True:
        tmp = os.path.join(d, f".{stem}.{os.urandom(4).hex()}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue


def _is_regular_or_absent(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True


def _exit_on_term(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)        # unwinds: a partial --output is removed


def _replay(a: argparse.Namespace, cfg: cfgmod.PlantConfig) -> int:
    since = _option_time("--since", a.since)
    until = _option_time("--until", a.until)
    _check_replay_args(a, since, until)
    # an archive: a file to fsync and resume from (a pipe or a terminal is just written)
    archive = bool(a.follow and a.output and _is_regular_or_absent(a.output))
    in_file = archive_resume(a.output, a.format) if archive else None
    target: _ReplacedOnSuccess | None = None
    out: IO[str] = sys.stdout
    if a.output and a.follow:
        out = open(a.output, "a", encoding="utf-8")  # noqa: SIM115 (closed below)
    elif a.output:
        target = _ReplacedOnSuccess(a.output)
        out = target.file
    stop: StopSignal | None = None
    if a.follow:
        # SIGTERM (systemctl stop / restart) ends the loop; the file is then
        # fsynced and the checkpoint saved (they were lost or got apart before)
        stop = StopSignal()             # set from the handler: takes no lock
        old_term = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    else:
        old_term = signal.signal(signal.SIGTERM, _exit_on_term)
    done = False
    try:
        with Plant(cfg, client="plant-cli") as p, _NoAnswerNotice(p, cfg.sequencers):
            if a.follow:
                start = Start.at_time(since) if since is not None else Start.at_seq(a.from_seq)
                store = CheckpointStore(Path(cfg.data) / "checkpoints")
                if in_file is not None:
                    # the file says what it holds: resume right after its last line
                    # (a checkpoint may lag it by a second, or be gone)
                    start = Start.at_seq(in_file + 1)
                    if a.checkpoint:
                        store.save(a.checkpoint, in_file)
                elif archive and a.checkpoint and store.load(a.checkpoint):
                    print(f"replay: {a.output} holds no record yet: resuming after checkpoint "
                          f"{a.checkpoint!r} (seq {store.load(a.checkpoint)}); the lines up to it "
                          "are in the file this one replaced (rotated?)", file=sys.stderr)
                sub = p.subscribe(a.topic, start=start, checkpoint=a.checkpoint,
                                  auto_ack=not archive)
                total = None
            else:
                sub = p.replay(a.from_seq, a.to_seq, since=since, until=until, topic=a.topic,
                               timeout=a.timeout)
                total = sub.tracker.to_seq
            notifier = None
            if a.follow:
                from orbcast.sdnotify import Notifier
                notifier = Notifier.from_env()
                notifier.ready(f"archiving from seq {sub.tracker.next_seq or 'now'}")
            try:
                n = _emit(sub, out, a.format, progress_total=total or 0, raw=a.raw, notifier=notifier,
                          durable=archive, stop=stop)
            finally:
                sub.close()
            lost = sub.tracker.lost_to_retention
            if lost:
                print(f"replay: warning: {lost} records before seq {sub.tracker.next_seq} "
                      "were already removed by retention", file=sys.stderr)
            if total and n > 10_000:
                print(f"replay: {n} records", file=sys.stderr)
        done = True
    finally:
        if target is not None:
            if done:
                target.commit()
            else:
                target.discard()
        elif out is not sys.stdout:
            out.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if stop is not None:
            stop.close()
    return 0


def _status(a: argparse.Namespace, cfg: cfgmod.PlantConfig) -> int:
    """Each node's status, this plant's outbox and checkpoints. A checkpoint's
    lag needs a node's last seq: with no node answering it is unknown (null
    in --json). A damaged checkpoint is shown as such (and named on stderr);
    the rest is still shown. Exit 1 if no node answered."""
    from sequencer.cli import print_status
    info: dict[str, Any] = {}
    for ep in cfg.sequencers:
        try:
            rep = request(ep, StatusRequest(rid=1), timeout=a.timeout, link=one_shot_link(cfg))
            info[ep] = rep.info if not isinstance(rep, Error) else {"error": rep.message}
        except (OrbcastTimeout, RemoteProtocolError) as exc:
            info[ep] = {"error": str(exc)}
    local: dict[str, Any] = {"producer_id": cfg.producer_id}
    data = Path(cfg.data)
    ob = data / "outbox" / cfg.producer_id
    if ob.exists():
        from orbcast.errors import ConfigError
        from .outbox import Outbox
        try:
            box = Outbox(ob, max_count=cfg.outbox_max_count, max_bytes=cfg.outbox_max_bytes)
        except ConfigError:
            local["outbox_depth"] = "in use by a running plant with this producer id"
        except OrbcastError as exc:
            local["outbox_depth"] = f"unreadable: {exc}"
            print(f"plant: warning: outbox {ob}: {exc}", file=sys.stderr)
        else:
            local["outbox_depth"] = box.count
            local["next_producer_seq"] = box.next_pseq
            box.close()
    else:
        local["outbox_depth"] = 0
    lasts = [v["last_seq"] for v in info.values()
             if "error" not in v and isinstance(v.get("last_seq"), int)]
    last = max(lasts) if lasts else None
    cps: dict[str, Any] = {}
    cpdir = data / "checkpoints"
    if cpdir.exists():
        store = CheckpointStore(cpdir)
        for name in store.names():
            try:
                pos = store.load(name) or 0
            except OrbcastError as exc:
                cps[name] = {"damaged": str(exc)}
                print(f"plant: warning: {exc}", file=sys.stderr)
                continue
            if last is not None:
                lag: Any = max(0, last - pos)
            else:
                lag = None if a.json else "unknown (no node answered)"
            cps[name] = {"position": pos, "lag": lag}
    local["subscriptions"] = cps
    result = {"nodes": info, "plant": local}
    print_status(result, as_json=a.json)
    reachable = any("error" not in v for v in info.values())
    return 0 if reachable else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_parser(), argv, _dispatch)


if __name__ == "__main__":
    sys.exit(main())
