"""Subscription checkpoints: the last delivered seq of each named subscription.

A plant that restarts resumes a named subscription right after its checkpoint, so an
application sees each canonical message once per subscription even across reboots
(at most the messages delivered since the last checkpoint write are delivered
again). :class:`CheckpointStore` reads and writes the files; :class:`Checkpointer`
decides *when* to write, so an SD card is not written once per message.

This module must never hand back a guess: a checkpoint file that is torn, garbled or
belongs to another name raises :class:`~orbcast.errors.DurabilityError` instead of
silently restarting the subscription from 0. :class:`Checkpointer` reads no clock;
the caller passes ``now``.

On-disk format
==============
One file per subscription, ``<directory>/<name>.ckpt``, two ASCII lines::

    {"name":"kitchen","seq":1234,"v":1}\\n
    crc32=5e1f0c2a\\n

Line 1 is a JSON object with exactly the keys ``v`` (format version, 1), ``name``
(the subscription name, equal to the file name) and ``seq`` (the last delivered seq,
an integer >= 0). Line 2 is ``crc32=`` and the zlib CRC-32 of line 1's bytes
(without its newline) as 8 lowercase hex digits. A reader recomputes the CRC over
line 1 exactly as stored, so the JSON need not be canonical. The whole file is at
most ``MAX_FILE_BYTES``.

A save writes ``.<name>.ckpt.tmp`` in the same directory, fsyncs it, renames it over
``<name>.ckpt`` and fsyncs the directory; the rename is the commit point, so a crash
leaves the old or the new checkpoint, never a mix. A leftover temp file is ignored
by :meth:`CheckpointStore.load` and :meth:`CheckpointStore.names` and overwritten by
the next save.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import zlib
from pathlib import Path
from typing import Final

from orbcast.errors import ConfigError, DurabilityError, LocalProtocolError
from orbcast.fsutil import fsync_dir

__all__ = [
    "DEFAULT_EVERY_RECORDS",
    "DEFAULT_EVERY_SECONDS",
    "CheckpointStore",
    "Checkpointer",
]

#: Format version written into every checkpoint.
FORMAT_VERSION: Final = 1
#: Suffix of checkpoint files.
SUFFIX: Final = ".ckpt"
#: Suffix of temp files (the temp name also starts with "."), never a checkpoint.
TEMP_SUFFIX: Final = ".ckpt.tmp"
#: Safe subscription names: portable file-name characters only, so a name can never
#: climb out of the directory or collide with a temp file.
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: A real checkpoint is under 200 bytes (name <= 64, seq <= 20 digits); anything
#: larger is garbage, and reading stops there instead of loading a huge file.
MAX_FILE_BYTES: Final = 1024
#: Default records between checkpoint writes: at 1000 msg/s that is one small write
#: a second, and a restart redelivers at most 1000 messages.
DEFAULT_EVERY_RECORDS: Final = 1000
#: Default seconds between checkpoint writes while deliveries trickle in: bounds how
#: stale a checkpoint gets (and so the redelivery window) at one write a second.
DEFAULT_EVERY_SECONDS: Final = 1.0

_CRC_PREFIX: Final = b"crc32="


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe subscription name, else raise ``ConfigError``.

    Safe names match ``[A-Za-z0-9._-]{1,64}``.
    """
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise ConfigError(
            f"invalid subscription name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -",
            field="subscription.name",
        )
    return name


def encode_checkpoint(name: str, seq: int) -> bytes:
    """The exact file content for checkpoint ``name`` at ``seq``."""
    line = json.dumps(
        {"name": name, "seq": seq, "v": FORMAT_VERSION}, separators=(",", ":"), sort_keys=True
    ).encode("ascii")
    return line + b"\n" + _CRC_PREFIX + b"%08x" % zlib.crc32(line) + b"\n"


class CheckpointStore:
    """The directory of checkpoint files of one plant.

    ``CheckpointStore(directory)`` creates ``directory`` if needed. Loads and saves
    are independent calls with no state kept between them, so two stores on one
    directory are safe as long as each name is saved by one of them.

    Example::

        store = CheckpointStore("/var/lib/orbcast/checkpoints")
        start = (store.load("kitchen") or 0) + 1
        store.save("kitchen", 1234)

    ``saves`` counts successful :meth:`save` calls (for tests and ``plant status``).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._dir = Path(directory)
        self.saves = 0
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise DurabilityError(f"cannot create checkpoint directory {self._dir}: {exc}") from exc

    @property
    def directory(self) -> Path:
        """The checkpoint directory."""
        return self._dir

    def path(self, name: str) -> Path:
        """The file of checkpoint ``name``. Raises ``ConfigError`` for a bad name."""
        return self._dir / (validate_name(name) + SUFFIX)

    def load(self, name: str) -> int | None:
        """Return the saved seq of ``name``, or None if it was never saved.

        Raises:
            ConfigError: ``name`` is not a safe name.
            DurabilityError: the file exists but is unreadable, torn, fails its CRC,
                has an unknown version, or names another subscription. The message
                names the path; nothing is repaired or deleted.
        """
        path = self.path(name)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DurabilityError(f"cannot read checkpoint {path}: {exc}") from exc
        return _decode(path, name, data)

    def save(self, name: str, seq: int) -> None:
        """Durably replace the checkpoint of ``name`` with ``seq``.

        Atomic: temp file in the same directory, fsync, rename over, fsync the
        directory. When this returns, the new value survives a power cut.

        Raises:
            ConfigError: ``name`` is not a safe name.
            LocalProtocolError: ``seq`` is not an int >= 0.
            DurabilityError: a write, fsync or rename failed. The previous checkpoint
                is then still in place (or, if only the directory fsync failed, the
                new one may be); the temp file is removed (best effort).
        """
        path = self.path(name)
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise LocalProtocolError(f"checkpoint seq must be an int >= 0, got {seq!r}")
        tmp = self._dir / ("." + name + TEMP_SUFFIX)
        data = encode_checkpoint(name, seq)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise DurabilityError(f"cannot save checkpoint {path}: {exc}") from exc
        try:
            fsync_dir(self._dir)
        except OSError as exc:
            raise DurabilityError(f"cannot fsync checkpoint directory {self._dir}: {exc}") from exc
        self.saves += 1

    def names(self) -> list[str]:
        """Names of all saved checkpoints, sorted. Temp files are not listed."""
        try:
            files = os.listdir(self._dir)
        except OSError as exc:
            raise DurabilityError(f"cannot list checkpoints in {self._dir}: {exc}") from exc
        out = []
        for file in files:
            if file.endswith(SUFFIX):
                name = file[: -len(SUFFIX)]
                if NAME_PATTERN.fullmatch(name):
                    out.append(name)
        return sorted(out)


def _decode(path: Path, name: str, data: bytes) -> int:
    def damaged(reason: str) -> DurabilityError:
        return DurabilityError(
            f"checkpoint {path} is damaged: {reason}; refusing to restart the "
            "subscription from 0 (restore the file, or delete it to start over)"
        )

    if len(data) > MAX_FILE_BYTES:
        raise damaged(f"larger than {MAX_FILE_BYTES} bytes")
    lines = data.split(b"\n")
    if len(lines) != 3 or lines[2] != b"":
        raise damaged("not two newline-terminated lines (torn or garbage)")
    line, crc_line = lines[0], lines[1]
    if not crc_line.startswith(_CRC_PREFIX) or len(crc_line) != len(_CRC_PREFIX) + 8:
        raise damaged("missing crc32 line")
    try:
        crc = int(crc_line[len(_CRC_PREFIX) :], 16)
    except ValueError:
        raise damaged("crc32 is not hex") from None
    if zlib.crc32(line) != crc:
        raise damaged("CRC mismatch")
    try:
        obj = json.loads(line)
    except ValueError:
        raise damaged("line 1 is not JSON") from None
    if not isinstance(obj, dict) or set(obj) != {"v", "name", "seq"}:
        raise damaged("JSON object does not have exactly the keys v, name, seq")
    if obj["v"] != FORMAT_VERSION:
        raise damaged(f"unsupported version {obj['v']!r}")
    if obj["name"] != name:
        raise damaged(f"it belongs to subscription {obj['name']!r}")
    seq = obj["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise damaged(f"seq {seq!r} is not an int >= 0")
    return seq


class Checkpointer:
    """Batches checkpoint writes of one subscription.

    Tell it every delivery with :meth:`delivered`; it saves when ``every_records``
    deliveries are unsaved, or when the oldest unsaved delivery is ``every_seconds``
    old. A driver that goes idle re-arms a timer for :attr:`deadline` and calls
    :meth:`flush` when :meth:`due` (and on shutdown), so a checkpoint never lags a
    quiet subscription by more than ``every_seconds``. After a crash, at most the
    deliveries since the last write are delivered again.

    ``now`` is any monotonic clock in seconds, passed in by the caller.

    Attributes:
        position: last seq passed to :meth:`delivered` (starts at ``committed``).
        committed: last seq on disk, loaded from the store at construction.
        writes: saves done by this checkpointer.

    Example::

        cp = Checkpointer(store, "kitchen", every_records=500, every_seconds=2.0)
        resume_after = cp.position  # None: start from the configured default
        for msg in messages:
            app(msg)
            cp.delivered(msg.seq, time.monotonic())
        cp.flush()

    Raises ``ConfigError`` for a bad name or non-positive bounds, ``DurabilityError``
    if the existing checkpoint is damaged.
    """

    def __init__(
        self,
        store: CheckpointStore,
        name: str,
        *,
        every_records: int = DEFAULT_EVERY_RECORDS,
        every_seconds: float = DEFAULT_EVERY_SECONDS,
    ) -> None:
        validate_name(name)
        if every_records < 1:
            raise ConfigError(
                f"every_records must be >= 1, got {every_records}",
                field="checkpoint.every_records",
            )
        if not every_seconds > 0:
            raise ConfigError(
                f"every_seconds must be > 0, got {every_seconds}",
                field="checkpoint.every_seconds",
            )
        self._store = store
        self._name = name
        self._every_records = every_records
        self._every_seconds = float(every_seconds)
        self.committed: int | None = store.load(name)
        self.position: int | None = self.committed
        self.writes = 0
        self._unsaved = 0
        self._since: float | None = None  # `now` of the oldest unsaved delivery

    @property
    def name(self) -> str:
        """The subscription name."""
        return self._name

    @property
    def deadline(self) -> float | None:
        """The ``now`` at which :meth:`due` turns true by time, or None if nothing
        is unsaved."""
        if self._since is None:
            return None
        return self._since + self._every_seconds

    def delivered(self, seq: int, now: float) -> bool:
        """Note that ``seq`` was delivered at ``now``; save if due. True if it saved.

        Raises ``LocalProtocolError`` if ``seq`` is not above :attr:`position`
        (deliveries are in seq order, each once), ``DurabilityError`` if the save
        failed (``position`` has then moved, ``committed`` has not).
        """
        if self.position is not None and seq <= self.position:
            raise LocalProtocolError(
                f"checkpoint {self._name}: delivered seq {seq} is not after {self.position}"
            )
        if seq < 0:
            raise LocalProtocolError(f"checkpoint {self._name}: seq {seq} < 0")
        self.position = seq
        self._unsaved += 1
        if self._since is None:
            self._since = now
        if self.due(now):
            self.flush()
            return True
        return False

    def due(self, now: float) -> bool:
        """True if unsaved deliveries reached ``every_records`` or are
        ``every_seconds`` old at ``now``."""
        if self._since is None:
            return False
        return self._unsaved >= self._every_records or now - self._since >= self._every_seconds

    def flush(self) -> None:
        """Save :attr:`position` now if it differs from :attr:`committed`."""
        if self.position is None or self.position == self.committed:
            self._unsaved = 0
            self._since = None
            return
        self._store.save(self._name, self.position)
        self.committed = self.position
        self.writes += 1
        self._unsaved = 0
        self._since = None
