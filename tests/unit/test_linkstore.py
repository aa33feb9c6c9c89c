"""The link session journal (orbcast/linkstore.py): durable, private, bounded."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from orbcast import linkstore
from orbcast.linkstore import JOURNAL_NAME, SessionStore


def _die(store: SessionStore) -> None:
    """What a kill -9 leaves: the files as they are, the flock released by the kernel."""
    os.close(store._fd)
    os.close(store._lock)


def test_committed_blobs_survive_a_reopen_and_deletes_stick(tmp_path: Path) -> None:
    s = SessionStore(tmp_path / "links")
    s.put("aaaa", b"one")
    s.put("bbbb", b"two")
    assert s.commit() == 2
    s.put("aaaa", b"one-advanced")
    s.put("bbbb", None)
    s.commit()
    s.close()
    again = SessionStore(tmp_path / "links")
    assert again.load() == {"aaaa": b"one-advanced"}
    assert again.damaged_at is None


def test_staged_but_uncommitted_blobs_are_not_durable(tmp_path: Path) -> None:
    s = SessionStore(tmp_path)
    s.put("aaaa", b"committed")
    s.commit()
    s.put("aaaa", b"staged only")       # the process dies here: nothing was sent under it
    assert s.dirty
    _die(s)
    crashed_view = SessionStore(tmp_path)
    assert crashed_view.load() == {"aaaa": b"committed"}


def test_files_are_private(tmp_path: Path) -> None:
    s = SessionStore(tmp_path / "links")
    s.put("aaaa", b"secret")
    s.commit()
    assert stat.S_IMODE(os.stat(tmp_path / "links").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "links" / JOURNAL_NAME).st_mode) == 0o600
    s.compact()
    assert stat.S_IMODE(os.stat(tmp_path / "links" / JOURNAL_NAME).st_mode) == 0o600


def test_a_torn_last_record_is_cut_at_every_offset(tmp_path: Path) -> None:
    s = SessionStore(tmp_path)
    s.put("aaaa", b"x" * 50)
    s.commit()
    s.put("bbbb", b"y" * 50)
    s.commit()
    s.close()
    path = tmp_path / JOURNAL_NAME
    full = path.read_bytes()
    rec_len = 8 + 2 + 4 + 50
    good = len(full) - rec_len
    for cut in range(good, len(full)):
        path.write_bytes(full[:cut])
        r = SessionStore(tmp_path)
        assert r.load() == {"aaaa": b"x" * 50}, cut
        assert r.damaged_at is None, cut
        assert path.stat().st_size == good, cut       # the torn bytes are gone
        r.put("cccc", b"z")
        r.commit()                                    # and appending goes on cleanly
        r.close()
        again = SessionStore(tmp_path)
        assert again.load() == {"aaaa": b"x" * 50, "cccc": b"z"}, cut
        again.close()


def test_damage_in_the_middle_drops_every_session_and_says_where(tmp_path: Path) -> None:
    """A blob before the damage may predate states frames were sealed under:
    restoring it would reuse message keys and nonces, so nothing is restored."""
    s = SessionStore(tmp_path)
    for name in ("aaaa", "bbbb", "cccc"):
        s.put(name, name.encode() * 10)
        s.commit()
    s.close()
    path = tmp_path / JOURNAL_NAME
    data = bytearray(path.read_bytes())
    second = 5 + (8 + 2 + 4 + 40)
    data[second + 8 + 7] ^= 0xFF                       # a byte inside the second payload
    path.write_bytes(bytes(data))
    r = SessionStore(tmp_path)
    assert r.load() == {}
    assert r.damaged_at == second
    r.put("dddd", b"new")                 # and the store works on, from a clean file
    r.commit()
    r.close()
    again = SessionStore(tmp_path)
    assert again.load() == {"dddd": b"new"} and again.damaged_at is None


def test_a_file_that_is_not_a_journal_is_replaced_not_trusted(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_NAME).write_bytes(b"garbage that is no journal")
    r = SessionStore(tmp_path)
    assert r.load() == {} and r.damaged_at == 0
    r.put("aaaa", b"1")
    r.commit()
    r.close()
    assert SessionStore(tmp_path).load() == {"aaaa": b"1"}


def test_the_journal_is_bounded_and_compaction_drops_deleted_secrets(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linkstore, "COMPACT_SLACK_BYTES", 4096)
    s = SessionStore(tmp_path)
    s.put("dead", b"SECRET-OF-A-REVOKED-PLANT")
    s.commit()
    s.put("dead", None)
    s.commit()
    for i in range(2000):
        s.put("live", b"%08d" % i * 8)
        s.commit()
        assert (tmp_path / JOURNAL_NAME).stat().st_size <= 4096 + 1024
    data = (tmp_path / JOURNAL_NAME).read_bytes()
    assert b"SECRET-OF-A-REVOKED-PLANT" not in data
    s.close()
    assert SessionStore(tmp_path).load() == {"live": b"%08d" % 1999 * 8}


@pytest.mark.parametrize("name", ["", "x" * 256, "nön-ascii"])
def test_bad_names_are_refused_without_staging(tmp_path: Path, name: str) -> None:
    s = SessionStore(tmp_path)
    with pytest.raises(ValueError):
        s.put(name, b"1")
    assert not s.dirty


def test_a_failed_append_leaves_no_partial_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC after a short write: the commit fails, the bytes it wrote are cut,
    and a later commit lands right after the last good record."""
    s = SessionStore(tmp_path)
    s.put("aaaa", b"state-1")
    s.commit()
    real_write = os.write
    calls = {"n": 0}

    def short_then_full(fd: int, data: object) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data)[:5])      # type: ignore[call-overload]
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(linkstore.os, "write", short_then_full)
    s.put("aaaa", b"state-2")
    with pytest.raises(OSError):
        s.commit()
    monkeypatch.setattr(linkstore.os, "write", real_write)
    s.commit()                                            # the retry
    s.close()
    r = SessionStore(tmp_path)
    assert r.damaged_at is None and r.load() == {"aaaa": b"state-2"}


def test_one_process_at_a_time(tmp_path: Path) -> None:
    """Two stores on one journal would delete each other's sessions: refused."""
    from orbcast.errors import ConfigError
    a = SessionStore(tmp_path)
    with pytest.raises(ConfigError) as ei:
        SessionStore(tmp_path)
    assert "in use" in str(ei.value)
    a.close()
    SessionStore(tmp_path).close()       # free again once closed
