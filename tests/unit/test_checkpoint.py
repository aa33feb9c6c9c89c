"""Tests of plant.checkpoint on real files. No sleeps: Checkpointer gets literal `now`s;
``os.fsync`` is monkeypatched only to inject a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orbcast.errors import ConfigError, DurabilityError, LocalProtocolError
from plant.checkpoint import Checkpointer, CheckpointStore, encode_checkpoint


def test_save_load_reopen(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    assert store.load("kitchen") is None
    assert store.names() == []
    store.save("kitchen", 41)
    store.save("kitchen", 42)
    store.save("garden.v2_x-1", 0)
    assert store.saves == 3
    again = CheckpointStore(tmp_path / "ckpt")
    assert again.load("kitchen") == 42
    assert again.load("garden.v2_x-1") == 0
    assert again.names() == ["garden.v2_x-1", "kitchen"]
    assert store.path("kitchen").read_bytes() == encode_checkpoint("kitchen", 42)
    assert store.path("kitchen").read_bytes().startswith(b'{"name":"kitchen","seq":42,"v":1}\n')


@pytest.mark.parametrize("name", ["", "a/b", "../x", "x" * 65, "a b", "ä", "a\0"])
def test_unsafe_names_are_rejected(tmp_path: Path, name: str) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(ConfigError):
        store.save(name, 1)
    with pytest.raises(ConfigError):
        store.load(name)
    assert os.listdir(tmp_path) == []


def test_bad_seq_is_rejected(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for seq in (-1, True, 1.5, "3"):
        with pytest.raises(LocalProtocolError):
            store.save("a", seq)  # type: ignore[arg-type]
    assert store.load("a") is None


def test_leftover_temp_file_is_ignored(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save("a", 7)
    # A crash after writing the temp file but before the rename leaves it behind,
    # possibly torn: neither load nor names may look at it.
    (tmp_path / ".a.ckpt.tmp").write_bytes(b'{"name":"a","se')
    (tmp_path / ".b.ckpt.tmp").write_bytes(encode_checkpoint("b", 9))
    assert store.load("a") == 7
    assert store.load("b") is None
    assert store.names() == ["a"]
    store.save("a", 8)
    assert store.load("a") == 8
    assert not (tmp_path / ".a.ckpt.tmp").exists()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\0" * 48,
        encode_checkpoint("a", 1234)[:-1],  # torn: last newline missing
        encode_checkpoint("a", 1234)[:20],
        encode_checkpoint("a", 1234).replace(b"1234", b"1235"),  # CRC mismatch
        encode_checkpoint("b", 5),  # belongs to another subscription
        b"x" * 5000,
        b'{"name":"a","seq":1,"v":1}\ncrc32=zzzzzzzz\n',
    ],
)
def test_damaged_file_raises_naming_the_path(tmp_path: Path, content: bytes) -> None:
    store = CheckpointStore(tmp_path)
    store.path("a").write_bytes(content)
    with pytest.raises(DurabilityError) as info:
        store.load("a")
    assert str(store.path("a")) in str(info.value)
    with pytest.raises(DurabilityError):
        Checkpointer(store, "a")


def test_fsync_failure_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    store.save("a", 1)

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(DurabilityError):
        store.save("a", 2)
    monkeypatch.undo()
    assert store.load("a") == 1
    assert os.listdir(tmp_path) == ["a.ckpt"]


def test_checkpointer_writes_every_records_and_not_before(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    cp = Checkpointer(store, "s", every_records=3, every_seconds=100.0)
    assert (cp.position, cp.committed, cp.deadline) == (None, None, None)
    assert cp.delivered(10, now=0.0) is False
    assert cp.delivered(11, now=1.0) is False
    assert store.load("s") is None and cp.writes == 0
    assert cp.delivered(12, now=2.0) is True
    assert (cp.position, cp.committed, cp.writes, store.load("s")) == (12, 12, 1, 12)
    for seq in (13, 14):
        assert cp.delivered(seq, now=3.0) is False
    assert cp.delivered(20, now=3.0) is True  # gaps are fine (filtered topics)
    assert (cp.writes, store.saves, store.load("s")) == (2, 2, 20)


def test_checkpointer_writes_after_every_seconds_and_not_before(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    cp = Checkpointer(store, "s", every_records=1000, every_seconds=1.0)
    assert cp.due(50.0) is False  # nothing unsaved
    assert cp.delivered(1, now=100.0) is False
    assert cp.deadline == 101.0
    assert cp.delivered(2, now=100.5) is False
    assert cp.due(100.999) is False
    assert not store.path("s").exists() and cp.writes == 0
    assert cp.due(101.0) is True
    assert cp.delivered(3, now=101.0) is True
    assert (cp.committed, cp.writes, store.load("s")) == (3, 1, 3)
    assert cp.deadline is None
    stamp = store.path("s").stat().st_mtime_ns
    # The clock restarts at the next unsaved delivery, not at the last write.
    assert cp.delivered(4, now=105.0) is False
    assert cp.due(105.9) is False and cp.due(106.0) is True
    assert store.path("s").stat().st_mtime_ns == stamp and cp.writes == 1
    cp.flush()  # the driver's timer fired
    assert (cp.committed, cp.writes, store.load("s")) == (4, 2, 4)
    assert cp.due(1e9) is False


def test_flush_and_resume(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    cp = Checkpointer(store, "s", every_records=100, every_seconds=60.0)
    cp.flush()  # nothing delivered: nothing to write
    assert cp.writes == 0 and store.load("s") is None
    cp.delivered(7, now=0.0)
    cp.flush()
    cp.flush()  # position == committed: no second write
    assert (cp.writes, store.saves, store.load("s")) == (1, 1, 7)
    resumed = Checkpointer(CheckpointStore(tmp_path), "s")
    assert (resumed.position, resumed.committed) == (7, 7)
    with pytest.raises(LocalProtocolError):
        resumed.delivered(7, now=1.0)  # already delivered before the restart
    assert resumed.delivered(8, now=1.0) is False
    resumed.flush()
    assert store.load("s") == 8


def test_checkpointer_rejects_bad_bounds(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(ConfigError):
        Checkpointer(store, "s", every_records=0)
    with pytest.raises(ConfigError):
        Checkpointer(store, "s", every_seconds=0.0)
    with pytest.raises(ConfigError):
        Checkpointer(store, "no/slash")
