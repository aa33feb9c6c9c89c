"""The archive (``plant replay --follow --output FILE --checkpoint NAME``, what
systemd/orbcast-archive.service runs): stopped, restarted and killed at any
moment, its file ends up with every record exactly once, in order. Real
processes: a node, the archive CLI, kill -9 and SIGTERM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orbcast.config import PlantConfig
from plant.cli import archive_resume
from plant.client import Plant
from tests.integration.conftest import PY, Proc, wait_for

pytestmark = pytest.mark.timeout(300)


def _lines(path: Path) -> list[int]:
    """Seqs of the complete lines of the archive file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(ln)["seq"] for ln in data.split(b"\n")[:-1]]


def test_archive_restarted_and_killed_at_any_moment_has_no_gap_and_no_duplicate(
        tmp_path: Path, node_factory) -> None:
    """Rounds of publishing; after each, the archive is stopped (SIGTERM, as
    ``systemctl restart`` does) or killed (-9, a crash), sometimes with a torn
    half line left at the end of the file (a power cut in a write), and started
    again. The file must hold 1..N once each, in order: the checkpoint may never
    get ahead of what the file holds, and a restart resumes after the file's last
    line. (SIGTERM used to lose the unflushed lines while the checkpoint had
    moved past them: a gap for ever.)"""
    node = node_factory().start()
    out = tmp_path / "stream.jsonl"
    args = [PY, "-m", "plant", "replay", "--follow", "--sequencer", node.ingress,
            "--data", str(tmp_path / "arch"), "--checkpoint", "archive", "--format", "jsonl",
            "--raw", "--output", str(out)]
    log = tmp_path / "archive.log"
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="pub", data=str(tmp_path / "pub"))
    total = 0
    with Plant(cfg, outbox=False, on_full="block") as p:
        for rnd, how in enumerate(["term", "kill", "kill-torn", "term", "kill", "term"]):
            arch = Proc(args, log).start()
            for i in range(300):
                p.publish_nowait("t/a", b"round %d message %d" % (rnd, i))
            p.flush(30)
            total += 300
            # stop it while it is still writing this round: once part of it is in the file
            wait_for(lambda: len(_lines(out)) > total - 300 or not arch.alive(), 30,
                     "the archive to write part of the round")
            assert arch.alive(), arch.output()[-2000:]
            if how == "term":
                assert arch.terminate() == 0, arch.output()[-2000:]
            else:
                arch.kill9()
                if how == "kill-torn":
                    with open(out, "ab") as f:
                        f.write(b'{"seq":99999,"epoch":1,"ti')
        arch = Proc(args, log).start()
        try:
            p.publish("t/a", b"last", timeout=30)     # written only by this last run
            total += 1
            wait_for(lambda: len(_lines(out)) >= total, 60, "the archive to catch up")
            assert arch.terminate() == 0
        finally:
            arch.kill9()
    assert _lines(out) == list(range(1, total + 1)), arch.output()[-2000:]
    assert out.read_bytes().endswith(b"\n")
    assert "cut a torn last line" in arch.output()
    # rotation as operations.md says: stopped, moved away, started again: the new file
    # goes on right after the old one's last line, and the archive says why it is empty
    out.rename(tmp_path / "stream-old.jsonl")
    arch = Proc(args, log).start()
    try:
        cfg2 = PlantConfig(sequencers=[node.ingress], producer_id="pub2", data=str(tmp_path / "pub2"))
        with Plant(cfg2, outbox=False) as p:          # (a new memory outbox: a new producer)
            assert p.publish("t/a", b"after rotation", timeout=30) == total + 1
        wait_for(lambda: len(_lines(out)) >= 1, 60, "the archive to write the new file")
        assert arch.terminate() == 0
    finally:
        arch.kill9()
    assert _lines(out) == [total + 1]
    assert "holds no record yet: resuming after checkpoint 'archive'" in arch.output()


def test_archive_resume_reads_the_last_line_and_cuts_a_torn_one(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    assert archive_resume(str(f), "jsonl") is None            # no file yet
    f.write_bytes(b"")
    assert archive_resume(str(f), "jsonl") is None
    big = "x" * 200_000                                       # lines longer than a read block
    f.write_text(json.dumps({"seq": 7, "p": big}) + "\n" + json.dumps({"seq": 9, "p": big}) + "\n")
    assert archive_resume(str(f), "jsonl") == 9
    whole = f.read_bytes()
    f.write_bytes(whole + b'{"seq": 10, "p": "xx')
    assert archive_resume(str(f), "jsonl") == 9 and f.read_bytes() == whole
    f.write_bytes(b'{"seq": 1')                               # nothing complete at all
    assert archive_resume(str(f), "jsonl") is None and f.read_bytes() == b""
    f.write_text("      12  2026-12-03T00:00:00.000000000Z  t/a  p#3  hello\n")
    assert archive_resume(str(f), "text") == 12
    with pytest.raises(ValueError, match="last line is not a jsonl record"):
        archive_resume(str(f), "jsonl")


def test_a_replay_stopped_by_sigterm_leaves_its_output_file_and_no_temp_file(
        tmp_path: Path) -> None:
    """``timeout``, ``systemctl stop``: a plain ``replay --output FILE`` ended by
    SIGTERM removes its temp file (one as large as the partial replay used to
    stay behind each time) and leaves FILE as it was."""
    from tests.integration.conftest import free_port
    out = tmp_path / "keep.jsonl"
    out.write_text("kept\n")
    p = Proc([PY, "-m", "plant", "replay", "--sequencer", f"tcp://127.0.0.1:{free_port()}",
              "--data", str(tmp_path / "pl"), "--timeout", "60", "--output", str(out)],
             tmp_path / "replay.log").start()
    try:
        wait_for(lambda: list(tmp_path.glob(".keep.jsonl.*.tmp")), 30, "the temp file")
        assert p.terminate() == 128 + 15, p.output()
    finally:
        p.kill9()
    assert out.read_text() == "kept\n"
    assert not list(tmp_path.glob(".keep.jsonl.*.tmp"))


def test_replay_follow_to_a_pipe_streams_without_an_archive(tmp_path: Path, node_factory) -> None:
    """``replay --follow --output /dev/stdout | ...``: not a file to fsync or resume
    from (it failed with 'not seekable'), just written."""
    import os
    import subprocess
    node = node_factory().start()
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="pub", data=str(tmp_path / "pub"))
    with Plant(cfg, outbox=False) as p:
        p.publish("t/a", b"one", timeout=30)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([PY, "-m", "plant", "replay", "--follow", "--sequencer", node.ingress,
                             "--data", str(tmp_path / "pl"), "--output", "/dev/stdout"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        line = proc.stdout.readline()                 # type: ignore[union-attr]
        assert json.loads(line)["seq"] == 1, proc.stderr.read() if not line else line  # type: ignore[union-attr]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
