"""Profiles for ``python -m bench.run --profile``: py-spy on live processes.

py-spy (``pip install py-spy``; found on PATH, in ``$PYSPY``, or next to the
interpreter) records raw collapsed stacks of a running process; this module
starts it, stops it, and turns the stacks into "where the time goes"
tables: self time and inclusive time per function, as a share of the
samples in which the process was not idle.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["find_pyspy", "Recorder", "summarize"]


def find_pyspy() -> str | None:
    cand = [os.environ.get("PYSPY"), shutil.which("py-spy"),
            str(Path(sys.executable).parent / "py-spy"), "/tmp/pyspy/bin/py-spy"]
    for c in cand:
        if c and os.path.exists(c) and os.access(c, os.X_OK):
            return c
    return None


class Recorder:
    """``py-spy record --format raw`` attached to ``pid`` until :meth:`stop`."""

    def __init__(self, pyspy: str, pid: int, out: Path, *, rate: int = 250) -> None:
        self.out = out
        self.log = open(out.with_suffix(".pyspy.log"), "wb")
        self.p = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--rate", str(rate),
                                   "--format", "raw", "--output", str(out), "--threads",
                                   "--nonblocking"],
                                  stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.log.close()


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "func (path/to/file.py:123)"
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    path, _, _line = loc.rpartition(":")
    short = "/".join(Path(path).parts[-2:]) if path else "?"
    return f"{name} ({short})"


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares of the sampled (non-idle) time per function."""
    selfc: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {"samples": 0}
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        k = int(n)
        frames = stack.split(";")
        label = []
        while frames and (frames[0].startswith("thread ") or frames[0].startswith("process ")):
            label.append(frames[0])
            frames = frames[1:]
        if label:
            threads[" ".join(label)] += k
        if not frames:
            continue
        names = [_frame_name(f) for f in frames]
        total += k
        selfc[names[-1]] += k
        for nm in set(names):
            incl[nm] += k

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(nm, round(100.0 * v / total, 1)) for nm, v in c.most_common(top)]

    return {"samples": total, "self": pct(selfc), "inclusive": pct(incl),
            "threads": [(t, round(100.0 * v / max(total, 1), 1))
                        for t, v in threads.most_common(6)]}


def render(name: str, s: dict[str, Any]) -> str:
    if not s.get("samples"):
        return f"  {name}: no samples"
    lines = [f"  {name}: {s['samples']} non-idle samples"]
    lines.append("    self time:")
    lines += [f"      {p:5.1f}%  {nm}" for nm, p in s["self"]]
    lines.append("    inclusive:")
    lines += [f"      {p:5.1f}%  {nm}" for nm, p in s["inclusive"]]
    return "\n".join(lines)
