"""Process plumbing for the benchmarks: spawn, talk to, and always reap.

Workers are ``python -m bench.worker ROLE JSON`` processes. They speak a
line protocol on their pipes:

* worker -> bench (stdout): ``READY``, then ``RESULT <json>`` (or
  ``ERROR <text>``) when done;
* bench -> worker (stdin): ``GO`` to start the timed part.

Every wait has a timeout. Every child gets ``PR_SET_PDEATHSIG`` (SIGKILL)
so it dies with the bench even if the bench itself is killed -9, and
:class:`Procs` kills whatever is left in its ``finally``.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Proc", "Procs", "BenchFailure", "free_ports", "proc_status_kb", "proc_cpu_s", "PY",
           "machine_busy", "wait_quiet", "run_parts"]

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent

_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not glibc: children are still reaped by Procs
    _libc = None


def _child_setup() -> None:
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class BenchFailure(Exception):
    """A benchmark could not produce a verified figure."""


_used_ports: set[int] = set()


def free_ports(n: int, lo: int = 20000, hi: int = 32000) -> list[int]:
    """``n`` distinct TCP ports below 32768 that are free on 127.0.0.1 right now."""
    out: list[int] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 5000:
            raise BenchFailure("no free loopback ports found")
        p = random.randrange(lo, hi)
        if p in _used_ports or p in out:
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            s.close()
        out.append(p)
    _used_ports.update(out)
    return out


def proc_status_kb(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS / VmPeak of ``pid`` in kB (empty if it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "VmPeak", "VmSize"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds used by ``pid`` so far."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / tck
    except (OSError, IndexError, ValueError):
        return None


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f[:8]), idle


def machine_busy(window: float = 0.5) -> float:
    """Share of all CPUs busy over ``window`` seconds (0..1); the bench's own
    processes are all reaped between benchmarks, so this is other work."""
    try:
        t0, i0 = _cpu_times()
        time.sleep(window)
        t1, i1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return 0.0
    dt = t1 - t0
    return 0.0 if dt <= 0 else max(0.0, 1.0 - (i1 - i0) / dt)


def wait_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait up to ``max_wait`` s for the machine to be at most ``threshold``
    busy; returns the last busy share measured."""
    deadline = time.monotonic() + max_wait
    busy = machine_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = machine_busy(1.0)
    return busy


class Proc:
    """One child process with its stdout read by a thread into a queue."""

    def __init__(self, name: str, argv: list[str], *, log_path: Path,
                 env: dict[str, str] | None = None, stdin: bool = True) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        self.p = subprocess.Popen(argv, cwd=str(ROOT), env=full_env,
                                  stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=self._log,
                                  preexec_fn=_child_setup)
        self.pid = self.p.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._t = threading.Thread(target=self._reader, name=f"read-{name}", daemon=True)
        self._t.start()

    def _reader(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self.lines.put(None)

    def expect(self, word: str, timeout: float) -> str:
        """Wait for a stdout line starting with ``word``; return the rest of it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchFailure(f"{self.name}: no {word} within {timeout:.0f} s{self.tail()}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.p.wait(5)
                raise BenchFailure(f"{self.name}: exited with {self.p.returncode} before {word}"
                                   f"{self.tail()}")
            if line.startswith("ERROR"):
                raise BenchFailure(f"{self.name}: {line[6:]}{self.tail()}")
            if line.startswith(word):
                return line[len(word):].strip()

    def result(self, timeout: float) -> dict[str, Any]:
        """The worker's ``RESULT`` json."""
        return json.loads(self.expect("RESULT", timeout))  # type: ignore[no-any-return]

    def send(self, line: str) -> None:
        try:
            assert self.p.stdin is not None
            self.p.stdin.write((line + "\n").encode())
            self.p.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise BenchFailure(f"{self.name}: cannot write to it ({exc}){self.tail()}") from None

    def tail(self, n: int = 15) -> str:
        try:
            self._log.flush()
            lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        return ("\n    " + "\n    ".join(lines)) if lines else ""

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait ``timeout``, then SIGKILL. Returns the exit code."""
        if self.p.poll() is None:
            try:
                self.p.send_signal(signal.SIGTERM)
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.p.returncode

    def kill(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.kill()
                self.p.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass

    def close(self) -> None:
        self.kill()
        for f in (self.p.stdin, self.p.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._log.close()


class Procs:
    """The processes of one benchmark; ``with Procs(dir) as ps:`` reaps them all."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.all: list[Proc] = []
        self._n = 0

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.reap()

    def worker(self, name: str, role: str, args: dict[str, Any],
               env: dict[str, str] | None = None) -> Proc:
        return self.spawn(name, [PY, "-m", "bench.worker", role, json.dumps(args)], env=env)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              stdin: bool = True) -> Proc:
        self._n += 1
        p = Proc(name, argv, log_path=self.logdir / f"{self._n:02d}-{name}.log", env=env,
                 stdin=stdin)
        self.all.append(p)
        return p

    def reap(self) -> None:
        for p in self.all:
            if p.alive():
                try:
                    p.p.send_signal(signal.SIGTERM)
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        for p in self.all:
            try:
                p.p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            p.close()
        self.all.clear()


def run_parts(ctx: Any, parts: Sequence[Callable[[Any], None]]) -> None:
    """Run a benchmark's parts in order; a part that fails does not stop the
    others, and the failures are raised together at the end."""
    failures: list[str] = []
    for fn in parts:
        try:
            fn(ctx)
        except BenchFailure as exc:
            failures.append(str(exc))
            print(f"[bench] {fn.__name__} FAILED: {str(exc).splitlines()[0]}", flush=True)
    if failures:
        raise BenchFailure("; ".join(failures))
