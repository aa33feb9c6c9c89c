"""The node's dedup snapshot (docs/protocol.md 7.5) against disk trouble: a real
node object on loopback sockets, a real data directory; the failure injected."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from orbcast.config import SequencerConfig
from sequencer import node as node_mod
from sequencer.core import DedupTable
from tests.integration.conftest import free_port


def make_node(tmp_path: Path) -> node_mod.SequencerNode:
    cfg = SequencerConfig(data=str(tmp_path / "d"), ingress=f"tcp://127.0.0.1:{free_port()}",
                          egress=f"tcp://127.0.0.1:{free_port()}")
    return node_mod.SequencerNode(cfg)


def test_a_snapshot_that_cannot_be_written_is_skipped_not_fatal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The snapshot is derived data: a full disk while writing it must not stop a
    node whose log still takes writes. The old snapshot stays; no temp file is left."""
    n = make_node(tmp_path)
    try:
        n.dedup.record("p", 1, 1)
        n._snapshot_dedup()                                  # a good snapshot first
        good = (n.data / "dedup.snapshot").read_bytes()
        n.dedup.record("p", 2, 2)                            # (as if its record were durable)
        n.log.append([(1, 1, b"\x80"), (2, 2, b"\x80")])
        n.log.sync()
        n._synced_upto = 2
        real = node_mod._atomic_write

        def full_disk(path: Path, data: bytes) -> None:
            path.with_name(path.name + ".tmp").write_bytes(data[:10])   # a partial temp file
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(node_mod, "_atomic_write", full_disk)
        with caplog.at_level(logging.WARNING, logger="orbcast.sequencer"):
            n._snapshot_dedup()
        assert "dedup snapshot not written" in caplog.text
        assert n.counters["dedup_snapshot_failures"] == 1
        assert (n.data / "dedup.snapshot").read_bytes() == good
        assert not (n.data / "dedup.snapshot.tmp").exists()
        monkeypatch.setattr(node_mod, "_atomic_write", real)
    finally:
        n.close()


def test_no_snapshot_while_assigned_seqs_are_not_durable(tmp_path: Path) -> None:
    """Pairs the table learned for records that never reached the log must not be
    saved: after a restart they would make resends of those messages 'duplicates'."""
    n = make_node(tmp_path)
    try:
        assert n.core is not None
        n.core.publish(b"r", 1, "p", [(1, "t", b"x"), (2, "t", b"y")], now=10)   # assigned
        n._snapshot_dedup()
        assert not (n.data / "dedup.snapshot").exists()
        n.core.take_unwritten()                              # the write "failed": never written
    finally:
        n.close()                                            # the clean stop does not save them
    assert not (tmp_path / "d" / "dedup.snapshot").exists()
    again = make_node(tmp_path)
    try:
        assert again.dedup.lookup("p", 1) is None            # a resend is new, not a duplicate
    finally:
        again.close()


def test_a_snapshot_naming_seqs_beyond_the_log_is_ignored(tmp_path: Path) -> None:
    """Such a snapshot (written by an older version after a failed write) is not
    trusted: the table is rebuilt from the log."""
    n = make_node(tmp_path)
    n.close()
    t = DedupTable()
    t.record("p", 1, 1)                                      # the log holds no seq 1
    (tmp_path / "d" / "dedup.snapshot").write_bytes(t.snapshot(0))
    again = make_node(tmp_path)
    try:
        assert again.dedup.lookup("p", 1) is None
    finally:
        again.close()
