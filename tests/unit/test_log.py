"""Tests of sequencer.log on real files: format, round trips, recovery, index, retention.

No sleeps. Only ``LogStore._fsync`` is monkeypatched, to count or fail fsyncs. Byte
offsets of records are computed here from the documented format with ``struct``,
independently of the module's own parser.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from orbcast.errors import (
    ClosedError,
    ConfigError,
    DurabilityError,
    LocalProtocolError,
    LogCorruptedError,
)
from sequencer.log import NS_PER_DAY, LogStore, Record, verify_segment

S = 1_000_000_000  # one second in ns
DAY1 = 1_702_080_000 * S  # 2023-12-09T00:00:00Z
DAY2 = DAY1 + 86_400 * S  # 2023-12-10T00:00:00Z
SEG1, SEG2, SEG3 = "2023-12-09.seg", "2023-12-10.seg", "2023-12-11.seg"
NOW = DAY1 + 5 * 86_400 * S  # "today" for retention, well inside 7 days of the records


def body(seq: int) -> bytes:
    """A deterministic body of varying length (11..65 bytes)."""
    return (b"%06d|" % seq) * (2 + seq % 10) + b"."


def make(first: int, n: int, t0: int = DAY1, step: int = S) -> list[Record]:
    return [(s, t0 + (s - first) * step, body(s)) for s in range(first, first + n)]


def open_log(path: Path, **kw: object) -> LogStore:
    kw.setdefault("fsync", False)
    kw.setdefault("now_ns", NOW)
    return LogStore(path, **kw)  # type: ignore[arg-type]


def record_offsets(data: bytes) -> list[int]:
    """Start offsets of the records of a segment image, by the documented format."""
    offs, off = [], 16
    while off + 24 <= len(data):
        (length,) = struct.unpack_from(">I", data, off)
        if off + 24 + length > len(data):
            break
        offs.append(off)
        off += 24 + length
    return offs


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


# -- format and round trips -------------------------------------------------------------


def test_byte_format_is_the_documented_one(tmp_path: Path) -> None:
    t = 86_400 * S  # 1970-01-02T00:00:00Z, the docstring's example
    with open_log(tmp_path, now_ns=t) as log:
        log.append([(1, t, b"hi"), (2, t + 5, b"")])
    seg = (tmp_path / "1970-01-02.seg").read_bytes()
    r1 = struct.pack(">IIQQ", 2, zlib.crc32(struct.pack(">QQ", 1, t) + b"hi"), 1, t) + b"hi"
    r2 = struct.pack(">IIQQ", 0, zlib.crc32(struct.pack(">QQ", 2, t + 5)), 2, t + 5)
    assert seg == b"\x89ORBLOG\n" + struct.pack(">II", 1, 0) + r1 + r2
    assert r1.hex() == "00000002" + r1[4:8].hex() + "0000000000000001" "00004e94914f0000" "6869"
    idx = (tmp_path / "1970-01-02.idx").read_bytes()
    assert idx == b"\x89ORBIDX\n" + struct.pack(">II", 1, 1024) + struct.pack(">QQQ", 1, t, 16)


def test_round_trip_across_a_utc_day_boundary(tmp_path: Path) -> None:
    recs = make(1, 8, t0=DAY2 - 4 * S) + make(9, 6, t0=DAY2 + 3600 * S)  # 4 on day 1
    with open_log(tmp_path) as log:
        assert (log.first_seq, log.last_seq, log.last_time) == (0, 0, 0)
        assert log.read(1) == []
        log.append(recs)  # one call touching two segments
        assert sorted(p.name for p in tmp_path.glob("*.seg")) == [SEG1, SEG2]
        assert (log.first_seq, log.last_seq, log.last_time) == (1, 14, recs[-1][1])
        assert log.read(1) == recs
        assert log.read(3, max_records=3) == recs[2:5]  # crosses the day boundary
        assert log.read(6, max_records=2) == recs[5:7]  # middle of the second segment
        assert log.read(-5, max_records=2) == recs[:2]  # before first_seq: from first_seq
        assert log.read(0) == recs
        assert log.read(14) == recs[13:]
        assert log.read(15) == [] and log.read(10**6) == []
        # max_bytes counts bodies; the first record always comes whole
        sizes = [len(r[2]) for r in recs]
        assert log.read(1, max_bytes=sizes[0] + sizes[1]) == recs[:2]
        assert log.read(1, max_bytes=sizes[0] + sizes[1] - 1) == recs[:1]
        assert log.read(4, max_bytes=0) == recs[3:4]
        assert log.read(4, max_bytes=sum(sizes[3:6]), max_records=10) == recs[3:6]
        assert list(log.iter_records()) == recs
        assert list(log.iter_records(12)) == recs[11:]
        with pytest.raises(LocalProtocolError):
            log.read(1, max_records=0)
        with pytest.raises(LocalProtocolError):
            log.read(1, max_bytes=-1)


def test_sequential_and_random_reads_match_a_model(tmp_path: Path) -> None:
    rng = random.Random(7)
    model: list[Record] = []
    t = DAY1
    with open_log(tmp_path, index_every=5) as log:
        for _ in range(60):
            n = rng.randint(1, 30)
            batch: list[Record] = []
            for _ in range(n):
                t += rng.choice([0, 1, 3 * 3600 * S])  # equal times, small steps, day jumps
                seq = len(model) + len(batch) + 1
                batch.append((seq, t, rng.randbytes(rng.choice([0, 1, 40, 300]))))
            log.append(batch)
            model += batch
            for _ in range(3):
                start = rng.randint(-2, len(model) + 2)
                mr, mb = rng.randint(1, 50), rng.choice([0, 100, 5000, 1 << 20])
                got = log.read(start, max_records=mr, max_bytes=mb)
                want = model[max(start, 1) - 1 :][:mr]
                if want:
                    keep, total = 1, len(want[0][2])
                    while keep < len(want) and total + len(want[keep][2]) <= mb:
                        total += len(want[keep][2])
                        keep += 1
                    want = want[:keep]
                assert got == want
        assert len(list(tmp_path.glob("*.seg"))) > 3
    with open_log(tmp_path, now_ns=t, retention_days=10_000) as log:
        assert list(log.iter_records()) == model


def test_large_bodies_and_blocks(tmp_path: Path) -> None:
    recs = [(s, DAY1 + s, bytes([s]) * (200_000 + s)) for s in range(1, 9)]  # > READ_BLOCK_MIN
    with open_log(tmp_path) as log:
        log.append(recs[:3])
        log.append(recs[3:])
        assert log.read(1) == recs[:5]  # stops before exceeding 1 MiB of bodies
        assert log.read(2, max_bytes=1) == recs[1:2]
        assert list(log.iter_records(4)) == recs[3:]
    assert verify_segment(tmp_path / SEG1) == 8


def test_reopen_keeps_everything_and_seqs_continue(tmp_path: Path) -> None:
    recs = make(1, 30, t0=DAY2 - 10 * S)
    with open_log(tmp_path, index_every=4) as log:
        log.append(recs[:20])
        log.append(recs[20:])
    with open_log(tmp_path, index_every=4) as log:
        assert (log.first_seq, log.last_seq, log.last_time) == (1, 30, recs[-1][1])
        assert log.torn_tails == []
        assert log.read(1, max_records=100) == recs
        more = make(31, 5, t0=recs[-1][1])
        log.append(more)
        assert log.read(29) == recs[28:] + more
    with open_log(tmp_path, index_every=1024) as log:  # a different interval: indexes kept
        assert list(log.iter_records()) == recs + more
        assert log.seq_for_time(recs[-1][1]) == 30
    assert not (tmp_path / "aside").exists()


def test_append_rejects_a_bad_batch_and_writes_nothing(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.append(make(1, 3))
        before = snapshot(tmp_path)
        t = log.last_time
        bad_batches: list[list[tuple[int, int, object]]] = [
            [(5, t, b"x")],  # not last_seq + 1
            [(3, t, b"x")],  # a seq already used
            [(4, t, b"x"), (5, t, b"y"), (7, t, b"z")],  # a gap inside the batch
            [(4, t, b"x"), (5, t - 1, b"y")],  # time going backwards
            [(4, t - 1, b"x")],  # before last_time
            [(4, DAY2, b"x"), (5, DAY2, b"y"), (5, DAY2, b"z")],  # would open a new day first
            [(4, t, b"x"), (5, DAY2, "text")],  # not bytes
        ]
        for batch in bad_batches:
            with pytest.raises(LocalProtocolError):
                log.append(batch)  # type: ignore[arg-type]
            assert snapshot(tmp_path) == before
            assert (log.last_seq, log.last_time) == (3, t)
        log.append([])  # nothing to do
        log.append([(4, t, b"ok")])
        assert log.read(4) == [(4, t, b"ok")]
    with open_log(tmp_path) as log:
        with pytest.raises(LocalProtocolError):
            log.append([(2, DAY1, b"x")])  # also after a reopen
        with pytest.raises(LocalProtocolError):
            log.truncate_after(-1)


def test_an_empty_log_starts_at_any_seq_then_stays_gap_free(tmp_path: Path) -> None:
    """A standby seeded from a node whose retention removed the first days
    starts its log at that node's first seq; after that, no gaps."""
    with open_log(tmp_path) as log:
        assert log.seq_for_time(DAY1) == 1
        with pytest.raises(LocalProtocolError):
            log.append([(0, DAY1, b"x")])
        log.append([(500, DAY1, b"x"), (501, DAY1, b"y")])
        with pytest.raises(LocalProtocolError):
            log.append([(503, DAY1, b"z")])
        log.sync()
        assert (log.first_seq, log.last_seq) == (500, 501)
    with open_log(tmp_path) as log:
        assert [r[0] for r in log.read(1)] == [500, 501]


def test_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        open_log(tmp_path, retention_days=-1)
    with pytest.raises(ConfigError):
        open_log(tmp_path, index_every=0)


def test_closed_store_refuses_every_method(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.append(make(1, 2))
    log.close()
    log.close()  # idempotent
    calls: list[Callable[[], object]] = [
        lambda: log.append(make(3, 1)), log.sync, lambda: log.read(1),
        lambda: log.seq_for_time(DAY1), lambda: log.apply_retention(NOW),
        lambda: log.truncate_after(1), lambda: list(log.iter_records())]
    for call in calls:
        with pytest.raises(ClosedError):
            call()


# -- recovery ---------------------------------------------------------------------------


def test_torn_tail_at_many_offsets(tmp_path: Path) -> None:
    src = tmp_path / "src"
    recs = make(1, 60)
    with open_log(src, index_every=8) as log:
        for i in range(0, 60, 7):  # several appends, so index entries are appended too
            log.append(recs[i : i + 7])
    image = (src / SEG1).read_bytes()
    index = (src / SEG1.replace(".seg", ".idx")).read_bytes()
    starts = record_offsets(image)
    assert len(starts) == 60
    bounds = starts + [len(image)]
    rng = random.Random(2024)
    cuts = sorted(set(range(starts[-3], len(image)))  # every offset in the last 3 records
                  | {rng.randrange(len(image)) for _ in range(200)}
                  | {0, 1, 15, 16, 17, 39, 40, 41})  # in the header and the first record
    for n, cut in enumerate(cuts):
        d = tmp_path / f"cut{n}"
        d.mkdir()
        (d / SEG1).write_bytes(image[:cut])
        (d / SEG1.replace(".seg", ".idx")).write_bytes(index)  # may point past the cut
        kept = sum(1 for i in range(60) if bounds[i + 1] <= cut)  # complete records
        start = bounds[kept] if cut >= 16 else 0  # first byte that recovery removes
        with open_log(d, index_every=8) as log:
            assert log.last_seq == kept, cut
            assert log.read(1, max_records=100) == recs[:kept]
            if start < cut:
                aside = d / "aside" / f"{SEG1}.torn-{start}"
                assert log.torn_tails == [str(aside)]
                assert aside.read_bytes() == image[start:cut]
            else:
                assert log.torn_tails == []
            assert (d / SEG1).exists() == (kept > 0)
            if kept:
                assert (d / SEG1).read_bytes() == image[: bounds[kept]]
            nxt = make(kept + 1, 2, t0=recs[kept][1])
            log.append(nxt)
            assert log.read(max(kept - 1, 1), max_records=4) == (
                recs[:kept] + nxt)[max(kept - 2, 0):][:4]
        with open_log(d, index_every=8) as log:  # the repair holds
            assert log.torn_tails == []
            assert list(log.iter_records()) == recs[:kept] + nxt
        shutil.rmtree(d)


def test_torn_newest_segment_header_falls_back_to_the_previous_day(tmp_path: Path) -> None:
    recs = make(1, 5) + make(6, 5, t0=DAY2)
    with open_log(tmp_path, fsync=True) as log:  # recovery with fsync on, too
        log.append(recs)
        log.sync()
    data = (tmp_path / SEG2).read_bytes()
    (tmp_path / SEG2).write_bytes(data[:7])  # crash right after the file was created
    with open_log(tmp_path, fsync=True) as log:
        assert log.last_seq == 5 and not (tmp_path / SEG2).exists()
        assert not (tmp_path / SEG2.replace(".seg", ".idx")).exists()
        assert [Path(p).name for p in log.torn_tails] == [f"{SEG2}.torn-0"]
        assert (tmp_path / "aside" / f"{SEG2}.torn-0").read_bytes() == data[:7]
        log.append(recs[5:])  # the day is created again
        log.sync()
        assert log.read(1) == recs


def test_zero_filled_tail_is_torn(tmp_path: Path) -> None:
    recs = make(1, 10)
    with open_log(tmp_path) as log:
        log.append(recs)
    seg = tmp_path / SEG1
    image = seg.read_bytes()
    # 1. the size grew but the data never reached the disk: zeros past the last record
    seg.write_bytes(image + bytes(4096))
    with open_log(tmp_path, fsync=True) as log:
        assert log.last_seq == 10
        assert Path(log.torn_tails[0]).read_bytes() == bytes(4096)
    assert seg.read_bytes() == image
    # 2. the last two records read back as zeros (whole pages lost)
    start = record_offsets(image)[8]
    seg.write_bytes(image[:start] + bytes(len(image) - start))
    with open_log(tmp_path) as log:
        assert log.last_seq == 8
        assert log.read(1) == recs[:8]
        assert log.torn_tails == [str(tmp_path / "aside" / f"{SEG1}.torn-{start}")]


@pytest.mark.parametrize("field_offset, what", [
    (0, "length, high byte: the record now claims to run past EOF"),
    (3, "length, low byte"),
    (5, "crc"),
    (15, "seq"),
    (23, "time"),
    (30, "body"),
])
def test_damage_in_the_middle_refuses_to_open_and_changes_nothing(
        tmp_path: Path, field_offset: int, what: str) -> None:
    with open_log(tmp_path) as log:
        log.append(make(1, 30))
    seg = tmp_path / SEG1
    bad = record_offsets(seg.read_bytes())[17]  # records 19..30 after it are intact
    flip(seg, bad + field_offset, 0x40)
    before = snapshot(tmp_path)
    with pytest.raises(LogCorruptedError) as err:
        open_log(tmp_path)
    assert (err.value.path, err.value.offset) == (str(seg), bad), what
    assert snapshot(tmp_path) == before
    with pytest.raises(LogCorruptedError) as err2:
        verify_segment(seg)
    assert err2.value.offset == bad and "torn" not in err2.value.reason


def test_damage_in_an_older_segment_is_never_a_torn_tail(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.append(make(1, 5) + make(6, 5, t0=DAY2))
    seg1 = tmp_path / SEG1
    image = seg1.read_bytes()
    seg1.write_bytes(image[:-3])  # would be a torn tail, were it the newest segment
    before = snapshot(tmp_path)
    with pytest.raises(LogCorruptedError) as err:
        open_log(tmp_path)
    assert (err.value.path, err.value.offset) == (str(seg1), record_offsets(image)[-1])
    assert snapshot(tmp_path) == before


def test_a_seq_gap_between_segments_is_corruption(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.append(make(1, 5) + make(6, 5, t0=DAY2))
    seg2 = tmp_path / SEG2
    image = seg2.read_bytes()
    second = record_offsets(image)[1]
    seg2.write_bytes(image[:16] + image[second:])  # day 2 now starts at seq 7
    (tmp_path / SEG2.replace(".seg", ".idx")).unlink()
    with pytest.raises(LogCorruptedError) as err:
        open_log(tmp_path)
    assert (err.value.path, err.value.offset) == (str(seg2), 16)
    assert "seq 7" in err.value.reason


@pytest.mark.parametrize("offset", [2, 11, 15])  # magic, version, flags
def test_bad_segment_header_is_corruption(tmp_path: Path, offset: int) -> None:
    with open_log(tmp_path) as log:
        log.append(make(1, 3))
    flip(tmp_path / SEG1, offset)
    before = snapshot(tmp_path)
    with pytest.raises(LogCorruptedError) as err:
        open_log(tmp_path)
    assert (err.value.path, err.value.offset) == (str(tmp_path / SEG1), 0)
    assert snapshot(tmp_path) == before


def test_a_record_repeated_with_a_good_crc_is_caught_by_its_seq(tmp_path: Path) -> None:
    recs = make(1, 12)
    with open_log(tmp_path) as log:
        log.append(recs)
    seg = tmp_path / SEG1
    image = seg.read_bytes()
    starts = record_offsets(image) + [len(image)]
    # written twice at the end (the second copy runs to EOF): a torn tail, set aside
    seg.write_bytes(image + image[starts[11] :])
    with open_log(tmp_path) as log:
        assert log.last_seq == 12 and log.read(1) == recs
        assert Path(log.torn_tails[0]).read_bytes() == image[starts[11] :]
    # repeated in the middle, with intact records after it: corruption
    seg.write_bytes(image[: starts[5]] + image[starts[4] :])
    with pytest.raises(LogCorruptedError) as err:
        open_log(tmp_path)
    assert err.value.offset == starts[5] and "seq 5" in err.value.reason


@pytest.mark.parametrize("field_offset, reason", [
    (40, "CRC mismatch"), (15, "seq"), (1, "runs past the end"), (3, "CRC mismatch")])
def test_read_checks_every_record_of_an_older_segment(
        tmp_path: Path, field_offset: int, reason: str) -> None:
    recs = make(1, 20) + make(21, 5, t0=DAY2)
    with open_log(tmp_path, index_every=4) as log:
        log.append(recs)
    seg1 = tmp_path / SEG1
    bad = record_offsets(seg1.read_bytes())[2]  # seq 3, before the last index entry (17)
    flip(seg1, bad + field_offset, 0x10)
    with open_log(tmp_path, index_every=4) as log:  # open checks only the tail
        with pytest.raises(LogCorruptedError) as err:
            log.read(1)
        assert (err.value.path, err.value.offset) == (str(seg1), bad)
        assert reason in err.value.reason
        with pytest.raises(LogCorruptedError):
            list(log.iter_records())
        assert log.read(1, max_records=2) == recs[:2]  # reads stop short of it
        assert log.read(5) == recs[4:]  # and resume after it (seek from entry seq 5)
        if field_offset in (15, 1):  # seeking across a broken header is refused too
            with pytest.raises(LogCorruptedError) as err:
                log.read(4)
            assert err.value.offset == bad
    with pytest.raises(LogCorruptedError) as err:
        verify_segment(seg1)
    assert err.value.offset == bad


def test_a_bad_index_over_damaged_data_blames_the_data(tmp_path: Path) -> None:
    recs = make(1, 20) + make(21, 5, t0=DAY2)
    with open_log(tmp_path, index_every=4) as log:
        log.append(recs)
    seg1, idx1 = tmp_path / SEG1, tmp_path / SEG1.replace(".seg", ".idx")
    bad = record_offsets(seg1.read_bytes())[2]
    flip(seg1, bad + 40)
    flip(idx1, 16 + 2 * 24 + 23)  # entry 2 (seq 9) names a wrong offset: rebuild on use
    with open_log(tmp_path, index_every=4) as log:
        with pytest.raises(LogCorruptedError) as err:
            log.read(10)  # the rebuild scans the whole segment and finds the real damage
        assert (err.value.path, err.value.offset) == (str(seg1), bad)


def test_a_segment_cut_under_a_running_store_is_reported(tmp_path: Path) -> None:
    recs = make(1, 20) + make(21, 5, t0=DAY2)
    with open_log(tmp_path) as log:
        log.append(recs)
        seg1 = tmp_path / SEG1
        image = seg1.read_bytes()
        last = record_offsets(image)[-1]
        os.truncate(seg1, last + 5)
        with pytest.raises(LogCorruptedError) as err:
            log.read(1, max_records=100)
        assert err.value.path == str(seg1) and err.value.offset in (last, last + 5)


def test_verify_segment(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.append(make(1, 12))
    seg = tmp_path / SEG1
    assert verify_segment(seg) == 12
    image = seg.read_bytes()
    seg.write_bytes(image[:-5])
    with pytest.raises(LogCorruptedError) as err:
        verify_segment(str(seg))
    assert err.value.offset == record_offsets(image)[-1] and "torn" in err.value.reason


# -- seq_for_time and the index ---------------------------------------------------------


def test_seq_for_time(tmp_path: Path) -> None:
    times = [DAY1 + x * S for x in (10, 20, 20, 20, 30, 31, 50, 50, 70)]
    times += [DAY2 + x * S for x in (0, 0, 5, 90, 90, 100)]
    recs = [(i + 1, t, body(i + 1)) for i, t in enumerate(times)]
    with open_log(tmp_path, index_every=2) as log:
        log.append(recs)

        def model(t: int) -> int:
            return next((s for s, rt, _ in recs if rt >= t), len(recs) + 1)

        assert log.seq_for_time(DAY1 + 20 * S) == 2  # exact hit: the first of equal times
        assert log.seq_for_time(DAY1 + 25 * S) == 5  # between records
        assert log.seq_for_time(0) == 1  # before everything
        assert log.seq_for_time(DAY1 + 71 * S) == 10  # in the gap between the days
        assert log.seq_for_time(DAY2 + 100 * S) == 15
        assert log.seq_for_time(DAY2 + 100 * S + 1) == 16  # after everything
        probes = sorted({t + d for t in times for d in (-1, 0, 1)} | {DAY2 - 1, DAY2 + 1})
        for t in probes:
            assert log.seq_for_time(t) == model(t), t


def test_missing_and_damaged_indexes_are_rebuilt(tmp_path: Path) -> None:
    recs = make(1, 40, t0=DAY1) + make(41, 40, t0=DAY2) + make(81, 40, t0=DAY2 + 86_400 * S)
    with open_log(tmp_path, index_every=4, now_ns=recs[-1][1]) as log:
        log.append(recs)
    idx1, idx2, idx3 = (tmp_path / s.replace(".seg", ".idx") for s in (SEG1, SEG2, SEG3))
    good1, good2, good3 = idx1.read_bytes(), idx2.read_bytes(), idx3.read_bytes()
    idx1.unlink()  # missing
    idx2.write_bytes(b"\x89ORBIDX\n garbage" + good2[16:])  # bad header
    entries = bytearray(good3)
    at = 16 + 5 * 24 + 16  # offset field of entry 5
    struct.pack_into(">Q", entries, at, struct.unpack_from(">Q", good3, at)[0] + 24)
    idx3.write_bytes(bytes(entries))  # entry 5 of day 3 points off its record: found on use
    with open_log(tmp_path, index_every=4, now_ns=recs[-1][1]) as log:
        assert idx1.read_bytes() == good1 and idx2.read_bytes() == good2  # rebuilt at open
        assert idx3.read_bytes() == bytes(entries)  # looks fine until used
        assert log.read(1, max_records=200) == recs
        assert log.read(103, max_records=2) == recs[102:104]  # seeks through entry 5
        assert idx3.read_bytes() == good3  # rebuilt
        assert log.seq_for_time(recs[101][1]) == 102
    swapped = good1[:16] + good1[40:64] + good1[16:40] + good1[64:]
    idx1.write_bytes(swapped)  # entries out of order: refused as a whole, rebuilt
    (tmp_path / "2023-13-45.seg").write_bytes(b"not a day")  # not ours: ignored
    (tmp_path / "notes.txt").write_bytes(b"")
    with open_log(tmp_path, index_every=4, now_ns=recs[-1][1]) as log:
        assert idx1.read_bytes() == good1
        assert log.read(1, max_records=200) == recs
    idx3.write_bytes(good3[:-7])  # a torn entry at the end: tolerated, rewritten
    with open_log(tmp_path, index_every=4, now_ns=recs[-1][1]) as log:
        assert idx3.read_bytes() == good3
        log.append(make(121, 9, t0=recs[-1][1]))
        assert list(log.iter_records(118)) == recs[117:] + make(121, 9, t0=recs[-1][1])


def test_reads_seek_with_the_index(tmp_path: Path) -> None:
    recs = make(1, 5000, step=1000)
    with open_log(tmp_path, index_every=16) as log:
        log.append(recs)
    with open_log(tmp_path, index_every=16) as log:  # fresh: no read cursor
        log._stats.records_scanned = 0
        assert log.read(4000, max_records=1) == [recs[3999]]
        assert log._stats.records_scanned <= 16 + 1  # a full scan would be ~4000
        log._stats.records_scanned = 0
        assert log.seq_for_time(recs[4321][1]) == 4322
        assert log._stats.records_scanned <= 16
        log._stats.records_scanned = 0
        assert log.read(4001, max_records=3) == recs[4000:4003]  # continues: no seek at all
        assert log._stats.records_scanned == 3


# -- removing records -------------------------------------------------------------------


def test_retention_deletes_old_days_but_never_the_newest(tmp_path: Path) -> None:
    recs = [(d + 1, DAY1 + d * NS_PER_DAY, body(d + 1)) for d in range(10)]  # one per day
    with open_log(tmp_path, now_ns=DAY1) as log:
        log.append(recs)
    assert len(list(tmp_path.glob("*.seg"))) == 10
    today = DAY1 + 9 * NS_PER_DAY + 123
    with open_log(tmp_path, retention_days=3, now_ns=today) as log:  # keeps days 6..9
        assert log.first_seq == 7 and log.last_seq == 10
        assert log.read(1) == recs[6:]
        assert log.seq_for_time(0) == 7
        assert len(list(tmp_path.glob("*.seg"))) == 4
        assert len(list(tmp_path.glob("*.idx"))) == 4
        assert log.apply_retention(today) == []
        removed = log.apply_retention(today + 2 * NS_PER_DAY)  # days 6 and 7 go
        assert sorted(Path(p).name for p in removed) == [
            "2023-12-15.idx", "2023-12-15.seg", "2023-12-16.idx", "2023-12-16.seg"]
        log.apply_retention(today + 1000 * NS_PER_DAY)
        assert (log.first_seq, log.last_seq) == (10, 10)
        assert [p.name for p in tmp_path.glob("*.seg")] == ["2023-12-18.seg"]
        log.append([(11, recs[-1][1], b"x")])
        assert log.read(1) == [recs[-1], (11, recs[-1][1], b"x")]
    with open_log(tmp_path, retention_days=0, now_ns=today + 1000 * NS_PER_DAY) as log:
        assert (log.first_seq, log.last_seq) == (10, 11)


def test_truncate_after(tmp_path: Path) -> None:
    recs = make(1, 10, t0=DAY1) + make(11, 10, t0=DAY2) + make(21, 10, t0=DAY2 + NS_PER_DAY)
    with open_log(tmp_path, index_every=3, fsync=True) as log:
        log.append(recs)
        assert log.truncate_after(30) is None and log.truncate_after(99) is None
        image2 = (tmp_path / SEG2).read_bytes()
        image3 = (tmp_path / SEG3).read_bytes()
        cut = record_offsets(image2)[5]  # seq 16
        aside = log.truncate_after(15)
        assert aside == str(tmp_path / "aside" / f"{SEG2}.30.tail")
        assert Path(aside).read_bytes() == image2[cut:]
        assert (tmp_path / "aside" / f"{SEG3}.30.tail").read_bytes() == image3  # whole
        assert not (tmp_path / SEG3).exists()
        assert not (tmp_path / SEG3.replace(".seg", ".idx")).exists()
        assert (tmp_path / SEG2).read_bytes() == image2[:cut]
        assert (log.last_seq, log.last_time) == (15, recs[14][1])
        assert log.read(1, max_records=100) == recs[:15]
        assert log.read(16) == []
        assert log.seq_for_time(recs[20][1]) == 16
        again = [(s, t, b"new %d" % s) for s, t, _ in recs[15:18]]
        log.append(again)
        log.sync()
        assert log.read(14) == recs[13:15] + again
    with open_log(tmp_path, index_every=3) as log:
        assert log.torn_tails == []
        assert list(log.iter_records()) == recs[:15] + again
        # cutting exactly at a segment boundary moves the whole later segment aside
        assert log.truncate_after(10) == str(tmp_path / "aside" / f"{SEG2}.18.tail")
        assert [p.name for p in tmp_path.glob("*.seg")] == [SEG1]
        assert (log.last_seq, log.last_time) == (10, recs[9][1])
        log.append(make(11, 2, t0=recs[9][1]))  # the day-1 segment takes appends again
        assert log.truncate_after(0) == str(tmp_path / "aside" / f"{SEG1}.12.tail")
        assert (log.first_seq, log.last_seq, log.read(1)) == (0, 0, [])
        log.append(make(1, 2))
        log.truncate_after(1)
        log.append(make(2, 1, t0=DAY1 + S))
        again_path = log.truncate_after(1)  # same segment, same old last_seq: a new name
        assert again_path == str(tmp_path / "aside" / f"{SEG1}.2.tail.1")
    with open_log(tmp_path) as log:
        assert list(log.iter_records()) == make(1, 1)


# -- fsync --------------------------------------------------------------------------------


def test_sync_fsyncs_and_failures_are_loud(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    log = open_log(tmp_path, fsync=True)
    fsynced: list[int] = []
    monkeypatch.setattr(log, "_fsync", lambda fd: fsynced.append(fd))
    log.append(make(1, 3))
    assert log.sync() >= 0.0
    assert len(fsynced) == 2  # the segment, then the directory (the segment was new)
    assert log.sync() >= 0.0 and len(fsynced) == 2  # nothing new: nothing to do
    log.append([(4, DAY1 + 10 * S, b"unsynced")])
    log.append(make(5, 1, t0=DAY2))  # rolling to a new day fsyncs the finished segment
    assert len(fsynced) == 3
    log.sync()
    assert len(fsynced) == 5  # the new segment and the directory
    log.append(make(6, 1, t0=DAY2 + 2 * NS_PER_DAY))  # nothing unsynced: no fsync to roll
    assert len(fsynced) == 5

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(log, "_fsync", broken)
    with open_log(tmp_path / "other", fsync=True) as other:
        monkeypatch.setattr(other, "_fsync", broken)
        other.append(make(1, 1))
        with pytest.raises(DurabilityError) as err:
            other.append(make(2, 1, t0=DAY2))  # the roll-over fsync fails
        assert isinstance(err.value.__cause__, OSError)
        assert other.last_seq == 1 and not (tmp_path / "other" / SEG2).exists()
        with pytest.raises(DurabilityError):
            other.append(make(2, 1, t0=DAY1 + S))
    later = DAY2 + 2 * NS_PER_DAY + S
    log.append(make(7, 1, t0=later))
    with pytest.raises(DurabilityError) as err:
        log.sync()
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == 5
    with pytest.raises(DurabilityError):  # the store refuses to carry on
        log.append(make(8, 1, t0=later))
    with pytest.raises(DurabilityError):
        log.sync()
    assert [r[0] for r in log.read(1)] == list(range(1, 8))  # reads still work
    log.close()


def test_sync_recovered_makes_the_previous_runs_writes_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed before its group commit leaves the newest segment's tail
    and a new segment's directory entry unsynced: the next open fsyncs both."""
    with open_log(tmp_path, fsync=False) as log:
        log.append(make(1, 3) + make(4, 2, t0=DAY2))        # never fsynced
    log = open_log(tmp_path, fsync=True)
    synced: list[str] = []
    monkeypatch.setattr(log, "_fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    assert log.sync_recovered() >= 0.0
    assert synced == [str(tmp_path / SEG2), str(tmp_path)]  # the newest segment, the directory
    log.close()
    with open_log(tmp_path / "empty", fsync=True) as empty:
        monkeypatch.setattr(empty, "_fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
        empty.sync_recovered()
        assert synced[2:] == [str(tmp_path / "empty")]
    with open_log(tmp_path / "off", fsync=False) as off:   # fsync off: nothing, as sync()
        monkeypatch.setattr(off, "_fsync", lambda fd: synced.append("x"))
        assert off.sync_recovered() == 0.0 and len(synced) == 3


def test_fsync_off_never_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(fd: int) -> None:
        raise AssertionError("fsync with fsync=False")

    monkeypatch.setattr(LogStore, "_fsync", forbidden)
    with open_log(tmp_path, fsync=False) as log:
        log.append(make(1, 5) + make(6, 2, t0=DAY2))
        assert log.sync() == 0.0
        log.truncate_after(3)


# --- trusted appends (the sequencing core's own records) ----------------------------------


@pytest.mark.parametrize("step", [S, 3 * 3600 * S])      # one day, and batches spanning days
def test_trusted_append_writes_what_a_checked_append_writes(tmp_path: Path, step: int) -> None:
    recs = make(1, 40, step=step)
    with open_log(tmp_path / "a") as a, open_log(tmp_path / "b") as b:
        for lo in range(0, 40, 13):
            a.append(recs[lo:lo + 13])
            b.append(recs[lo:lo + 13], trusted=True)
        a.sync()
        b.sync()
        assert (a.first_seq, a.last_seq, a.last_time) == (b.first_seq, b.last_seq, b.last_time)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with open_log(tmp_path / "b") as b:
        assert [r[0] for r in b.read(1, max_records=100)] == list(range(1, 41))


def test_trusted_append_still_refuses_records_that_do_not_follow(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.append(make(1, 5))
        size = sum(p.stat().st_size for p in tmp_path.glob("*.seg"))
        for bad in (make(7, 3, t0=DAY1 + 10 * S),               # a gap
                    make(6, 3, t0=DAY1),                        # time before the last record
                    make(6, 3, t0=DAY1 + 10 * S)[:2] + make(9, 1, t0=DAY1 + 20 * S)):  # bad end
            with pytest.raises(LocalProtocolError):
                log.append(bad, trusted=True)
        assert log.last_seq == 5
        assert sum(p.stat().st_size for p in tmp_path.glob("*.seg")) == size


# --- find: searching the bytes of the log ------------------------------------------------

def _containing(recs: list[Record], needle: bytes) -> list[int]:
    """Seqs of the records whose on-disk bytes (header and body) contain ``needle``,
    computed from the documented format."""
    out = []
    for s, t, b in recs:
        tail = struct.pack(">QQ", s, t) + b
        rec = struct.pack(">II", len(b), zlib.crc32(tail)) + tail
        if needle in rec:
            out.append(s)
    return out


@pytest.mark.parametrize("scan_block", [32, 97, 1 << 20])
def test_find_returns_every_record_holding_the_needle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scan_block: int) -> None:
    """Across segments and across the scan's block boundaries (small blocks put
    needles astride them): every record whose bytes hold the needle is found, in
    seq order, each once, with its CRC-checked body; at most a record where a match
    straddles it and the next is found besides (the caller checks)."""
    import sequencer.log as log_mod
    monkeypatch.setattr(log_mod, "SCAN_BLOCK", scan_block)
    recs = make(1, 300, t0=DAY1, step=600 * S)             # 300 records over three days
    rng = random.Random(7)
    with open_log(tmp_path, index_every=8) as log:
        log.append(recs)
        assert len(log._segs) >= 3
        needles = [b"|", b"000150|", b"000299|000299|.", b"not there"]
        needles += [b[i:i + rng.randint(2, 12)] for _s, _t, b in rng.sample(recs, 20)
                    for i in [rng.randrange(len(b) - 2)]]
        for needle in needles:
            found = [(s, t, b) for s, t, b in log.find(needle)]
            seqs = [s for s, _t, _b in found]
            exact = _containing(recs, needle)
            assert seqs == sorted(set(seqs)), needle
            assert set(exact) <= set(seqs), needle
            for s, t, b in found:
                assert (s, t, b) == recs[s - 1]
                if s not in exact:                           # only a match astride s and s + 1
                    assert s < 300 and needle in _record_bytes(recs[s - 1]) + _record_bytes(recs[s])
        # bounds
        assert [s for s, _t, _b in log.find(b"|", from_seq=100, to_seq=104)] == [100, 101, 102,
                                                                                 103, 104]
        assert list(log.find(b"|", from_seq=301)) == []
        with pytest.raises(LocalProtocolError):
            list(log.find(b""))


def _record_bytes(r: Record) -> bytes:
    s, t, b = r
    tail = struct.pack(">QQ", s, t) + b
    return struct.pack(">II", len(b), zlib.crc32(tail)) + tail


def test_find_reports_damage_in_a_record_it_found(tmp_path: Path) -> None:
    recs = make(1, 50)
    with open_log(tmp_path, index_every=8) as log:           # open checks only seqs 49-50
        log.append(recs)
    offs = record_offsets((tmp_path / SEG1).read_bytes())
    flip(tmp_path / SEG1, offs[29] + 24 + 12)                # body byte 12 of seq 30: bad CRC
    with open_log(tmp_path, index_every=8) as log:
        assert [s for s, _t, _b in log.find(b"000010|")] == [10]
        with pytest.raises(LogCorruptedError):
            list(log.find(b"000030|"))                       # body bytes 0-6 of seq 30
