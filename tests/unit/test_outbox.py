"""Tests of plant.outbox on real files: round trips, bounds, recovery, compaction, faults.

No sleeps. ``os.fsync`` is monkeypatched only to inject a failure. The kill -9 test
runs a real child process.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orbcast.errors import (
    ClosedError,
    ConfigError,
    DurabilityError,
    LocalProtocolError,
    LogCorruptedError,
    OutboxFull,
    OutboxWriteFailed,
)
from plant import outbox as outbox_mod
from plant.outbox import COMPACT_MIN_DEAD_BYTES, FILE_NAME, HEADER, Outbox

REPO = Path(__file__).resolve().parents[2]


def items(n: int, start: int = 0, size: int = 8) -> list[tuple[str, bytes]]:
    return [(f"t/{start + i}", bytes([(start + i) % 256]) * size) for i in range(n)]


def test_append_pending_ack_reopen_round_trip(tmp_path: Path) -> None:
    with Outbox(tmp_path) as box:
        assert (box.count, box.size, box.next_pseq) == (0, 0, 1)
        assert box.append(items(3)) == [1, 2, 3]
        assert box.append([("ä/topic", b"")]) == [4]
        assert box.count == 4
        assert box.size == sum(len(t.encode()) + len(p) for t, p in items(3)) + len(
            "ä/topic".encode()
        )
        assert box.pending() == [
            (1, "t/0", b"\0" * 8),
            (2, "t/1", b"\1" * 8),
            (3, "t/2", b"\2" * 8),
            (4, "ä/topic", b""),
        ]
        assert [p for p, _, _ in box.pending(limit=2)] == [1, 2]
        assert [p for p, _, _ in box.pending(after=2)] == [3, 4]
        assert box.pending(limit=0) == []
        assert box.ack([2, 2, 99, 0]) == 1
        assert box.ack([2]) == 0
        assert [p for p, _, _ in box.pending(after=1, limit=1)] == [3]
        size, count = box.size, box.count
    with Outbox(tmp_path) as box:
        assert [p for p, _, _ in box.pending()] == [1, 3, 4]
        assert (box.size, box.count, box.next_pseq) == (size, count, 5)
        assert box.pending()[2] == (4, "ä/topic", b"")
        assert box.append(items(1)) == [5]


def test_batch_is_one_write_and_one_fsync(tmp_path: Path) -> None:
    with Outbox(tmp_path) as box:
        w, s = box.writes, box.syncs
        pseqs = box.append([("sensors/x", os.urandom(64)) for _ in range(1000)])
        assert pseqs == list(range(1, 1001))
        assert (box.writes - w, box.syncs - s) == (1, 1)
        w, s = box.writes, box.syncs
        assert box.ack(range(1, 1001, 2)) == 500
        assert (box.writes - w, box.syncs - s) == (1, 0)  # acks are not fsynced
        assert box.append([]) == []
        assert (box.writes - w, box.syncs - s) == (1, 0)


def test_pseq_never_repeats_across_reopen_and_compaction_to_empty(tmp_path: Path) -> None:
    with Outbox(tmp_path) as box:
        assert box.append(items(5)) == [1, 2, 3, 4, 5]
        box.ack([1, 2, 3, 4, 5])
        box.compact()
        assert box.count == 0
        assert os.path.getsize(tmp_path / FILE_NAME) == HEADER.size
    with Outbox(tmp_path) as box:
        assert (box.count, box.next_pseq) == (0, 6)
        assert box.append(items(1)) == [6]
        box.ack([6])
    with Outbox(tmp_path) as box:  # acked but not compacted: still continues
        assert box.append(items(1)) == [7]
        box.ack([7])
        box.compact()
    with Outbox(tmp_path) as box:
        assert box.append(items(2)) == [8, 9]


@pytest.mark.parametrize("by", ["count", "bytes"])
def test_outbox_full_writes_nothing(tmp_path: Path, by: str) -> None:
    max_count, max_bytes = (4, 1000) if by == "count" else (100, 40)
    with Outbox(tmp_path, max_count=max_count, max_bytes=max_bytes) as box:
        box.append(items(3, size=6))  # 3 x (3 + 6) = 27 bytes
        file_size, nxt, count, size = (
            os.path.getsize(box.path),
            box.next_pseq,
            box.count,
            box.size,
        )
        extra = items(2, size=6) if by == "count" else [("t/x", b"x" * 11)]  # 27+14 > 40
        with pytest.raises(OutboxFull) as info:
            box.append(extra)
        assert (info.value.count, info.value.size) == (count, size)
        assert os.path.getsize(box.path) == file_size
        assert (box.next_pseq, box.count, box.size) == (nxt, count, size)
        box.ack([1])
        assert box.append(extra) == ([4, 5] if by == "count" else [4])
    with Outbox(tmp_path, max_count=max_count, max_bytes=max_bytes) as box:
        assert [p for p, _, _ in box.pending()] == ([2, 3, 4, 5] if by == "count" else [2, 3, 4])


def test_batch_that_can_never_fit_and_bad_items_are_rejected(tmp_path: Path) -> None:
    with Outbox(tmp_path, max_count=2, max_bytes=100) as box:
        with pytest.raises(LocalProtocolError):
            box.append(items(3))
        with pytest.raises(LocalProtocolError):
            box.append([("t", b"x" * 100)])
        with pytest.raises(LocalProtocolError):
            box.append([(b"t", b"x")])  # type: ignore[list-item]
        with pytest.raises(LocalProtocolError):
            box.append([("t", "x")])  # type: ignore[list-item]
        with pytest.raises(LocalProtocolError):
            box.append([("\udcff", b"x")])
        assert (box.next_pseq, box.count, box.file_size) == (1, 0, HEADER.size)
        assert box.append([("t", bytearray(b"ab"))]) == [1]
        assert box.pending() == [(1, "t", b"ab")]
    with pytest.raises(ConfigError):
        Outbox(tmp_path / "other", max_count=0)


def _write_two_groups(directory: Path) -> tuple[int, int, list[int]]:
    """Outbox with group A (pseqs 1-3) and group B (4-6); return (end of A, end of B,
    record ends inside B)."""
    with Outbox(directory, fsync=False) as box:
        box.append([("a/1", b"one"), ("a/2", b""), ("a/3", b"three" * 3)])
        end_a = box.file_size
        box.append([("b/4", b"four"), ("b/5", b"five" * 5), ("b/6", b"six")])
        end_b = box.file_size
    data = (directory / FILE_NAME).read_bytes()
    ends, pos = [], end_a
    while pos < end_b:
        length = int.from_bytes(data[pos + 4 : pos + 8], "big")
        pos += outbox_mod.RECORD_HEAD.size + length
        ends.append(pos)
    return end_a, end_b, ends


@pytest.mark.parametrize("fill", ["cut", "zeros", "garbage"])
def test_torn_tail_at_every_offset_keeps_whole_entries_only(tmp_path: Path, fill: str) -> None:
    src = tmp_path / "src"
    end_a, end_b, ends = _write_two_groups(src)
    good = (src / FILE_NAME).read_bytes()
    a_items = [(1, "a/1", b"one"), (2, "a/2", b""), (3, "a/3", b"three" * 3)]
    b_items = [(4, "b/4", b"four"), (5, "b/5", b"five" * 5), (6, "b/6", b"six")]
    rng = random.Random(7)
    for cut in range(end_a, end_b):
        if fill == "cut":
            torn = good[:cut]
        elif fill == "zeros":
            torn = good[:cut] + bytes(end_b - cut)
        else:
            torn = good[:cut] + bytes(rng.randrange(256) for _ in range(end_b - cut))
        d = tmp_path / f"{fill}{cut}"
        d.mkdir()
        (d / FILE_NAME).write_bytes(torn)
        kept = sum(1 for e in ends if e <= cut)
        with Outbox(d, fsync=False) as box:
            assert box.pending() == a_items + b_items[:kept], cut
            assert box.next_pseq == 4 + kept
            assert box.file_size == [end_a, *ends][kept]
            assert os.path.getsize(d / FILE_NAME) == box.file_size
            assert box.append([("c", b"c")]) == [4 + kept]
        with Outbox(d, fsync=False) as box:
            assert [p for p, _, _ in box.pending()] == [1, 2, 3, *range(4, 4 + kept), 4 + kept]


def test_torn_tail_is_copied_aside(tmp_path: Path) -> None:
    _, end_b, ends = _write_two_groups(tmp_path)
    path = tmp_path / FILE_NAME
    data = path.read_bytes()
    path.write_bytes(data[: end_b - 2])
    with Outbox(tmp_path, fsync=False) as box:
        assert box.count == 5
    assert path.read_bytes() == data[: ends[1]]
    assert (tmp_path / outbox_mod.TORN_NAME).read_bytes() == data[ends[1] : end_b - 2]


def test_crc_bad_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    _, end_b, ends = _write_two_groups(tmp_path)
    path = tmp_path / FILE_NAME
    data = bytearray(path.read_bytes())
    data[end_b - 1] ^= 0xFF
    path.write_bytes(bytes(data))
    with Outbox(tmp_path, fsync=False) as box:
        assert [p for p, _, _ in box.pending()] == [1, 2, 3, 4, 5]
        assert box.file_size == ends[1]


def test_lost_acks_bring_entries_back_as_pending(tmp_path: Path) -> None:
    with Outbox(tmp_path) as box:
        box.append(items(5))
        before_acks = box.file_size
        assert box.ack([1, 2, 4]) == 3
        assert box.ack([5]) == 1
        assert [p for p, _, _ in box.pending()] == [3]
    os.truncate(tmp_path / FILE_NAME, before_acks)  # power cut: the acks never landed
    with Outbox(tmp_path) as box:
        assert box.pending() == [(i + 1, t, p) for i, (t, p) in enumerate(items(5))]
        assert box.next_pseq == 6


@pytest.mark.parametrize("where", ["crc", "zeros", "length", "header"])
def test_damage_in_the_middle_raises_with_offset(tmp_path: Path, where: str) -> None:
    with Outbox(tmp_path, fsync=False) as box:
        box.append(items(2))
        bad = box.file_size  # first record of the second group
        box.append(items(2, start=2))
        box.append(items(2, start=4))
    path = tmp_path / FILE_NAME
    data = bytearray(path.read_bytes())
    if where == "crc":
        data[bad + outbox_mod.RECORD_HEAD.size + 3] ^= 0x01
    elif where == "zeros":
        data[bad : bad + 30] = bytes(30)
    elif where == "length":
        data[bad + 4 : bad + 8] = (10**6).to_bytes(4, "big")
    else:
        data[12] ^= 0x01  # pseq_floor: header CRC no longer matches
        bad = 0
    path.write_bytes(bytes(data))
    with pytest.raises(DurabilityError) as info:
        Outbox(tmp_path)
    assert str(path) in str(info.value)
    assert f"offset {bad}" in str(info.value)
    cause = info.value.__cause__
    assert isinstance(cause, LogCorruptedError) and cause.offset == bad
    assert path.read_bytes() == bytes(data)  # nothing repaired or truncated
    Outbox(tmp_path / "fresh").close()  # the lock of the failed open was released
    with pytest.raises(DurabilityError):
        Outbox(tmp_path)


def test_compaction_keeps_pending_in_order_and_bounds_the_file(tmp_path: Path) -> None:
    payload = b"p" * 1024
    bound = 2 * COMPACT_MIN_DEAD_BYTES + 256 * 1024
    kept: list[int] = []
    with Outbox(tmp_path) as box:
        for cycle in range(50):
            pseqs = box.append([(f"c/{cycle}", payload)] * 100)
            keep = pseqs[cycle % 7 :: 37]  # a few survivors per cycle, out of order acks
            kept += keep
            box.ack(sorted(set(pseqs) - set(keep), reverse=True))
            if cycle % 10 == 9:
                box.ack(kept[: len(kept) // 2])
                kept = kept[len(kept) // 2 :]
            assert box.file_size == os.path.getsize(box.path) < bound, cycle
            assert [p for p, _, _ in box.pending()] == kept
        assert box.next_pseq == 5001
        assert [p for p, _, _ in box.pending(after=kept[3], limit=2)] == kept[4:6]
    with Outbox(tmp_path) as box:
        assert [p for p, _, _ in box.pending()] == kept
        assert all(t.startswith("c/") and p == payload for _, t, p in box.pending())
        assert box.append(items(1)) == [5001]


def test_fsync_failure_raises_and_leaves_state_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = Outbox(tmp_path)
    box.append(items(2))
    before = (box.count, box.size, box.next_pseq, box.pending(), box.file_size)

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(DurabilityError) as info:
        box.append(items(3, start=2))
    assert isinstance(info.value.__cause__, OSError)
    assert (box.count, box.size, box.next_pseq, box.pending(), box.file_size) == before
    assert os.path.getsize(box.path) == before[4]  # unconfirmed bytes truncated away
    monkeypatch.undo()
    with pytest.raises(DurabilityError):  # broken: no more writes until reopened
        box.append(items(1))
    with pytest.raises(DurabilityError):
        box.ack([1])
    assert box.pending() == before[3]
    box.close()
    with Outbox(tmp_path) as box:
        assert box.pending() == before[3]
        assert box.append(items(1)) == [3]


def test_a_refused_write_keeps_nothing_and_the_outbox_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write() refused (a full SD card), even half-way: the batch is not kept,
    the file is cut back to its last good byte, and -- unlike a failed fsync,
    after which the kernel's view cannot be trusted -- the outbox stays usable,
    so a publisher recovers by itself once there is room."""
    box = Outbox(tmp_path)
    box.append(items(2))
    before = (box.count, box.size, box.next_pseq, box.pending(), box.file_size)
    real_write = os.write

    def half_then_full(fd: int, data: object) -> int:
        monkeypatch.setattr(os, "write", no_space)
        return real_write(fd, memoryview(data)[: len(memoryview(data)) // 2])  # type: ignore[arg-type]

    def no_space(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OutboxWriteFailed) as info:
        box.append(items(3, start=2))
    assert isinstance(info.value.__cause__, OSError)
    monkeypatch.undo()
    assert (box.count, box.size, box.next_pseq, box.pending(), box.file_size) == before
    assert os.path.getsize(box.path) == before[4]          # the half-written batch is gone
    assert box.write_failures == 1
    assert box.append(items(1, start=9)) == [3]            # and the next one goes in
    box.close()
    with Outbox(tmp_path) as box:                          # what is on disk is exactly that
        assert [p for p, _t, _pl in box.pending()] == [1, 2, 3]


def test_close_is_idempotent_and_use_after_close_raises(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.append(items(1))
    box.close()
    box.close()
    assert box.closed and box.count == 1
    for call in (
        lambda: box.append(items(1)),
        lambda: box.pending(),
        lambda: box.ack([1]),
        box.compact,
    ):
        with pytest.raises(ClosedError):
            call()


def test_second_open_of_the_same_directory_is_refused(tmp_path: Path) -> None:
    with Outbox(tmp_path), pytest.raises(ConfigError):
        Outbox(tmp_path)
    Outbox(tmp_path).close()


def test_leftover_compaction_temp_file_is_ignored(tmp_path: Path) -> None:
    with Outbox(tmp_path) as box:
        box.append(items(2))
    (tmp_path / outbox_mod.TEMP_NAME).write_bytes(b"half a compaction")
    with Outbox(tmp_path) as box:
        assert [p for p, _, _ in box.pending()] == [1, 2]
    assert not (tmp_path / outbox_mod.TEMP_NAME).exists()


CHILD = textwrap.dedent(
    """
    import random, sys
    from plant.outbox import Outbox

    box = Outbox(sys.argv[1], max_count=1_000_000, max_bytes=1 << 30)   # never full here
    rng = random.Random(int(sys.argv[2]))
    while True:
        first = box.next_pseq
        n = rng.randrange(1, 30)
        batch = [("kill/%d" % (first + i), b"%d:" % (first + i) * rng.randrange(1, 200))
                 for i in range(n)]
        pseqs = box.append(batch)
        print("A", *pseqs, flush=True)  # accepted: must survive
        if rng.random() < 0.7:
            acked = [p for p in pseqs if rng.random() < 0.9]
            print("W", *acked, flush=True)  # about to ack: may or may not land
            box.ack(acked)
            print("K", *acked, flush=True)  # acked: must stay acked
    """
)
MAX_BATCH = 29


def _expected(pseq: int, payload: bytes) -> bool:
    unit = b"%d:" % pseq
    return len(payload) % len(unit) == 0 and payload == unit * (len(payload) // len(unit))


@pytest.mark.parametrize("seed,kill_after,compacted", [(1, 1500, False), (2, 40000, True)])
def test_kill_9_loses_nothing_accepted(
    tmp_path: Path, seed: int, kill_after: int, compacted: bool
) -> None:
    """SIGKILL a child that appends and acks in a loop, then check the outbox against
    everything the child reported before it died (the pipe keeps its last lines)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(seed)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    lines: list[bytes] = []
    try:
        assert proc.stdout is not None
        seen = 0
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(b"A "):
                seen += len(line.split()) - 1
                if seen >= kill_after:
                    proc.send_signal(signal.SIGKILL)
                    break
        else:
            pytest.fail(f"child exited early with {proc.wait()}")
        proc.wait(timeout=10)
        lines += proc.stdout.read().splitlines(keepends=True)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    sets: dict[bytes, set[int]] = {b"A": set(), b"W": set(), b"K": set()}
    for line in lines:
        if line.endswith(b"\n"):  # the child may die in the middle of a print
            kind, *nums = line.split()
            sets[kind].update(map(int, nums))
    appended, maybe_acked, acked = sets[b"A"], sets[b"W"], sets[b"K"]
    with Outbox(tmp_path, max_count=1_000_000, max_bytes=1 << 30) as box:   # the child's limits
        pending = box.pending()
        pseqs = {p for p, _, _ in pending}
        assert appended - maybe_acked <= pseqs  # nothing accepted was lost
        assert not acked & pseqs  # acks survive kill -9 (page cache)
        unreported = pseqs - appended  # at most the one batch appended but not printed
        assert len(unreported) <= MAX_BATCH and all(p > max(appended) for p in unreported)
        for pseq, topic, payload in pending:  # nothing partial or renumbered
            assert topic == f"kill/{pseq}" and _expected(pseq, payload), pseq
        top = box.next_pseq
        assert top > max(appended | pseqs)
        floor = HEADER.unpack_from((tmp_path / FILE_NAME).read_bytes())[3]
        assert (floor > 1) == compacted  # the seeded run crossed a compaction (or not)
        assert box.append(items(1)) == [top]


def test_entry_records_have_the_documented_layout(tmp_path: Path) -> None:
    """The hot path packs an ENTRY's head in one go; the bytes must be the
    documented start | crc32(start, fixed, topic, payload) | fixed | topic | payload."""
    import zlib

    def by_the_book(pseq: int, topic: bytes, payload: bytes) -> bytes:
        length = outbox_mod.ENTRY_FIXED.size + len(topic) + len(payload)
        start = outbox_mod.RECORD_HEAD_START.pack(outbox_mod.RECORD_MAGIC,
                                                  outbox_mod.KIND_ENTRY, 0, length)
        fixed = outbox_mod.ENTRY_FIXED.pack(pseq, len(topic))
        crc = zlib.crc32(payload, zlib.crc32(topic, zlib.crc32(fixed, zlib.crc32(start))))
        return start + crc.to_bytes(4, "big") + fixed + topic + payload

    entries = [(1, b"t", b""), (2, "ü/x".encode(), b"\x00" * 300), (2**40, b"a" * 70, b"p")]
    out: list[bytes] = []
    n = outbox_mod._encode_entries(entries, out)
    want = b"".join(by_the_book(*e) for e in entries)
    assert b"".join(out) == want and n == len(want)
    with Outbox(tmp_path / "ob") as ob:
        ob.append([("t", b""), ("ü/x", b"\x00" * 300)])
    data = (tmp_path / "ob" / "outbox.dat").read_bytes()
    assert data.endswith(by_the_book(1, b"t", b"") + by_the_book(2, "ü/x".encode(), b"\x00" * 300))
