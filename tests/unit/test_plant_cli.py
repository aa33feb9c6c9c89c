"""The ``plant`` and ``sequencer`` commands' argument checks and time parsing:
what they refuse before any socket is opened, and the times they take.

Commands run in-process through ``main(argv)``; every run gets its own
``--data`` directory and points ``--sequencer`` at a port nothing listens on,
so a check that is missing shows up as a failed assertion (or this module's
timeout), never as a test that talks to a real node.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from plant.cli import main as plant_main
from plant.cli import rfc3339
from plant.client import parse_start, parse_time, start_of_day_ns
from plant.tracker import Start
from sequencer.cli import main as sequencer_main

pytestmark = pytest.mark.timeout(30)

NOWHERE = "tcp://127.0.0.1:9"      # the discard port: no orbcast node answers there


def run_plant(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run ``plant CMD ...`` with a private data dir; (exit code, stderr)."""
    cmd, rest = argv[0], list(argv[1:])
    rc = plant_main([cmd, "--sequencer", NOWHERE, "--data", str(tmp_path / "plant"),
                     "--producer-id", "cli-test", *rest])
    return rc, capsys.readouterr().err


# --- times --------------------------------------------------------------------------------

# none a whole microsecond: those came through the old parser unharmed
NS_CASES = [1, 999_999_999, 1_795_631_837_129_491_179, 1_795_631_837_000_000_001,
            1_795_631_837_100_000_010, 4_102_444_799_999_999_999]


@pytest.mark.parametrize("ns", NS_CASES)
def test_every_time_the_tool_prints_parses_back_to_the_same_ns(ns: int) -> None:
    """A time copied from jsonl output is an exact boundary (it used to lose
    everything below the microsecond)."""
    assert parse_time(rfc3339(ns)) == ns


def test_times_after_2038_print_on_a_32_bit_time_t() -> None:
    """A record's time is any u63 its node stamped; 32-bit Pi OS (armhf) has a
    32-bit time_t, where datetime.fromtimestamp fails after 2038-01-19 (the
    emulated armhf run caught it). Printed by date arithmetic instead."""
    assert rfc3339(2**31 * 10**9) == "2038-01-19T03:14:08.000000000Z"
    assert rfc3339((1 << 63) - 1) == "2262-04-11T23:47:16.854775807Z"
    assert rfc3339(0) == "1970-01-01T00:00:00.000000000Z"


@pytest.mark.parametrize("text", [
    "2026-11-25T18:37:17.129491179Z",
    "2026-11-25t18:37:17.129491179z",              # RFC 3339 5.6: t and z in lower case
    "2026-11-25 18:37:17.129491179Z",              # ... and a space for the T
    "2026-11-25T20:37:17.129491179+02:00",
    "2026-11-25T16:07:17.129491179-02:30",
    "2026-11-25T18:37:17.129491179",               # no zone: UTC
    "2026-11-25T18:37:17,129491179Z",              # ISO 8601 decimal comma
])
def test_rfc3339_forms_with_nanoseconds_and_offsets(text: str) -> None:
    assert parse_time(text) == 1_795_631_837_129_491_179


def test_fractions_shorter_than_ns_and_coarser_forms() -> None:
    base = 1_795_631_837_000_000_000
    assert parse_time("2026-11-25T18:37:17.1Z") == base + 100_000_000
    assert parse_time("2026-11-25T18:37:17.1234567Z") == base + 123_456_700
    assert parse_time("2026-11-25T18:37:17.000001Z") == base + 1_000
    assert parse_time("2026-11-25T18:37Z") == base - 17 * 1_000_000_000
    midnight = int(dt.datetime(2026, 11, 25, tzinfo=dt.UTC).timestamp()) * 1_000_000_000
    assert parse_time("2026-11-25") == midnight


@pytest.mark.parametrize("text,why", [
    ("2026-11-25T18:37:17.1234567891Z", "more than 9 fractional digits"),
    ("2026-13-01T00:00:00Z", "month"),
    ("2026-11-25T23:59:60Z", "second"),
    ("2026-11-25T10:00:00+24:00", "zone offset"),
    ("yesterday", ""),
    ("12345", ""),
    ("now", ""),
    ("2026-11-25T18:37:17.Z", ""),
])
def test_bad_times_say_what_a_time_is_and_nothing_about_seqs(text: str, why: str) -> None:
    with pytest.raises(ValueError) as ei:
        parse_time(text)
    msg = str(ei.value)
    assert msg.startswith("not an RFC 3339 time") and repr(text) in msg and why in msg
    assert "seq" not in msg and "today" not in msg


def test_parse_start_still_takes_now_today_seqs_and_times() -> None:
    now = 1_795_631_837_129_491_179
    assert parse_start("now") == Start.now()
    assert parse_start("today", now_ns=now) == Start.at_time(start_of_day_ns(now))
    assert start_of_day_ns(now) == parse_time("2026-11-25T00:00:00Z")
    assert parse_start("42") == Start.at_seq(42)
    assert parse_start("2026-11-25t18:37:17.129491179z") == Start.at_time(now)
    with pytest.raises(ValueError, match="not a seq, 'now', 'today' or an RFC 3339 time"):
        parse_start("soon")


def test_since_and_until_errors_name_the_option_and_what_it_takes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for opt in ("--since", "--until"):
        rc, err = run_plant(tmp_path, capsys, "replay", opt, "12", "--timeout", "1")
        assert rc == 1
        assert f"{opt} takes an RFC 3339 time or 'today'" in err and "seq" not in err


def test_replay_follow_since_takes_only_times_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--since means the same with --follow: a seq there used to start at that seq."""
    rc, err = run_plant(tmp_path, capsys, "replay", "--follow", "--since", "5")
    assert rc == 1 and "--since takes an RFC 3339 time or 'today'" in err


# --- replay and tail arguments ---------------------------------------------------------------

@pytest.mark.parametrize("args,says", [
    (["--from", "5", "--to", "3"], "--to 3 is before --from 5"),
    (["--from", "0"], "--from must be a seq >= 1"),
    (["--from", "-1"], "--from must be a seq >= 1"),
    (["--to", "0"], "--to 0 is before --from 1"),
    (["--since", "2026-11-25T10:00:00Z", "--until", "2026-11-25T09:00:00Z"],
     "--until 2026-11-25T09:00:00Z is not after --since"),
    (["--checkpoint", "foo", "--to", "3"], "--checkpoint needs --follow"),
])
def test_replay_refuses_ranges_it_could_not_honour(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], says: str) -> None:
    rc, err = run_plant(tmp_path, capsys, "replay", *args, "--timeout", "1")
    assert rc == 1 and says in err, err
    assert err.startswith("plant: error: ")


@pytest.mark.parametrize("count", ["0", "-1"])
def test_tail_refuses_a_count_below_one(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        count: str) -> None:
    """(It used to wait for ever: the count was never reached.)"""
    rc, err = run_plant(tmp_path, capsys, "tail", "--count", count)
    assert rc == 1 and f"--count must be at least 1, got {count}" in err


def test_a_failed_replay_leaves_an_existing_output_file_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keep.jsonl"
    out.write_bytes(b'{"seq":1}\n')
    rc, err = run_plant(tmp_path, capsys, "replay", "--timeout", "1", "--output", str(out))
    assert rc == 1 and "did not answer" in err
    assert out.read_bytes() == b'{"seq":1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.jsonl", "plant"]   # no temp left


# --- producer ids ------------------------------------------------------------------------------

@pytest.mark.parametrize("pid", ["..", ".", "../../escape", "a/b", "a\\b"])
def test_a_producer_id_that_is_not_a_file_name_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], pid: str) -> None:
    data = tmp_path / "d" / "plant"
    data.joinpath("outbox").mkdir(parents=True)
    rc = plant_main(["status", "--sequencer", NOWHERE, "--timeout", "0.5", "--data", str(data),
                     "--producer-id", pid])
    err = capsys.readouterr().err
    assert rc == 1 and "plant.producer_id" in err and "file name" in err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "d", "d/plant", "d/plant/outbox"]


# --- sequencer check -----------------------------------------------------------------------------

def test_sequencer_check_of_a_missing_directory_is_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in the path must not read as a healthy log."""
    assert sequencer_main(["check", "--data", str(tmp_path / "typo")]) == 1
    out = capsys.readouterr()
    assert "no such directory" in out.err and "no damage found" not in out.out


def test_sequencer_check_of_a_directory_without_a_log_is_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "node" / "log").mkdir(parents=True)
    # the log directory itself given instead of the node's data directory
    assert sequencer_main(["check", "--data", str(tmp_path / "node" / "log")]) == 1
    out = capsys.readouterr()
    assert "has no log/ directory" in out.err and "no damage found" not in out.out
    # a node's directory with an empty log is fine: nothing written yet
    assert sequencer_main(["check", "--data", str(tmp_path / "node")]) == 0
    assert "0 segments, 0 records, no damage found" in capsys.readouterr().out


# --- replay --output: the temp file and when it is not used ---------------------------------

def _replaced(path: str, text: str = "new\n") -> None:
    from plant.cli import _ReplacedOnSuccess
    t = _ReplacedOnSuccess(path)
    t.file.write(text)
    t.commit()


def test_output_to_a_pipe_is_written_directly(tmp_path: Path) -> None:
    """/dev/stdout, /dev/fd/N: realpath() of the /proc link names nothing, so the
    temp file beside it could not be made (replay --output /dev/stdout | head)."""
    import os
    r, w = os.pipe()
    try:
        _replaced(f"/dev/fd/{w}", "through the pipe\n")
        assert os.read(r, 100) == b"through the pipe\n"
    finally:
        os.close(r)
        os.close(w)


def test_output_keeps_the_owner_mode_and_hard_links_of_file(tmp_path: Path) -> None:
    import os
    f = tmp_path / "out.jsonl"
    f.write_text("old\n")
    os.chmod(f, 0o640)
    if os.geteuid() == 0:                       # root (sudo): FILE keeps its owner
        os.chown(f, 65534, 65534)
        _replaced(str(f))
        st = os.stat(f)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o640)
    else:                                       # a user: the file stays theirs
        _replaced(str(f))
        assert (os.stat(f).st_uid, os.stat(f).st_mode & 0o777) == (os.geteuid(), 0o640)
    assert f.read_text() == "new\n"
    link = tmp_path / "link.jsonl"
    os.link(f, link)                            # a rename would cut the hard link
    _replaced(str(f), "newer\n")
    assert link.read_text() == "newer\n" and os.stat(f).st_ino == os.stat(link).st_ino


def test_output_names_up_to_255_bytes_and_a_private_temp_file(tmp_path: Path) -> None:
    import os
    import stat

    from plant.cli import _new_temp
    f = tmp_path / ("x" * 250)
    _replaced(str(f))
    assert f.read_text() == "new\n"
    fd, tmp = _new_temp(str(tmp_path), "y" * 255)
    os.close(fd)
    assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o600     # nobody reads it meanwhile
    assert len(os.path.basename(tmp)) <= 255


def test_output_where_no_temp_file_can_be_made_is_written_directly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A writable FILE in a directory we may not write (an admin's /var/log/x):
    written in place, as before the temp file, and stderr says what that means."""
    import errno

    from plant import cli

    def refused(d: str, base: str) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cli, "_new_temp", refused)
    f = tmp_path / "out.jsonl"
    f.write_text("old\n")
    _replaced(str(f))
    assert f.read_text() == "new\n"
    assert "writing it directly" in capsys.readouterr().err
