"""StopSignal: a stop request a signal handler can make without deadlocking.

The bug it fixes: a SIGTERM handler calling ``threading.Event.set()`` hung the
bridge for good when the signal landed while the main thread held the Event's
lock inside ``Event.wait()`` (the loop's timer). The stress test runs a real
process that waits in a tight loop while being signalled thousands of times;
with ``threading.Event`` in place of ``StopSignal`` it hangs within seconds.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from orbcast.cliutil import StopSignal

REPO = Path(__file__).resolve().parents[2]

# waits in a tight loop (whatever is_set says) whose handler calls set() every
# time; after each turn the loop publishes how many signals it has seen in a
# shared file, and the test sends the next signal only once the loop has seen
# the last one (so handlers never nest, and each lands somewhere in the loop)
CHILD = r"""
import mmap, signal, struct, sys
from orbcast.cliutil import StopSignal as Stop
stop = Stop()
handled = 0
def on_usr1(*_):
    global handled
    handled += 1
    stop.set()
signal.signal(signal.SIGUSR1, on_usr1)
with open(sys.argv[1], "r+b") as f:
    seen = mmap.mmap(f.fileno(), 8)
print("ready", flush=True)
while True:
    stop.wait(0.00001)
    struct.pack_into("<Q", seen, 0, handled)
    if handled >= int(sys.argv[2]):
        break
print(f"done {handled} {stop.is_set()}", flush=True)
"""


def test_set_from_a_signal_handler_never_blocks_the_waiting_main_thread(tmp_path: Path) -> None:
    signals = 3000
    shared = tmp_path / "seen"
    shared.write_bytes(bytes(8))
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(shared), str(signals)], cwd=REPO,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        with open(shared, "rb") as f:
            seen = mmap.mmap(f.fileno(), 8, prot=mmap.PROT_READ)
        for i in range(1, signals + 1):
            os.kill(p.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 20
            while struct.unpack_from("<Q", seen, 0)[0] < i and p.poll() is None:
                assert time.monotonic() < deadline, (
                    f"the waiting loop hung at signal {i} (its handler blocked on a lock "
                    "the main thread held)")
                os.sched_yield()
            if p.poll() is not None:
                break                    # done (or died: the checks below say which)
        assert p.wait(20) == 0
        assert p.stdout.read().split() == ["done", str(signals), "True"]
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_wait_returns_at_once_when_set_and_after_the_timeout_when_not() -> None:
    s = StopSignal()
    try:
        t0 = time.monotonic()
        assert s.wait(0.05) is False
        assert time.monotonic() - t0 >= 0.04
        assert not s.is_set()
        s.set()
        s.set()                          # idempotent: a second byte or a full pipe is fine
        assert s.is_set() and s.wait(None) is True and s.wait(0) is True
    finally:
        s.close()


def test_set_from_another_thread_wakes_a_waiter() -> None:
    s = StopSignal()
    woke = threading.Event()

    def waiter() -> None:
        if s.wait(30):
            woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    s.set()
    t.join(10)
    try:
        assert woke.is_set() and not t.is_alive()
    finally:
        s.close()


def test_set_after_close_sets_the_flag_and_writes_nowhere() -> None:
    s = StopSignal()
    s.close()
    s.close()                            # idempotent
    r, w = os.pipe()                     # likely reuses the closed fds' numbers
    try:
        s.set()
        assert s.is_set() and s.wait(0) is True
        os.set_blocking(r, False)
        try:
            leaked = os.read(r, 1)
        except BlockingIOError:
            leaked = b""
        assert leaked == b"", "set() after close() wrote into a reused fd"
    finally:
        os.close(r)
        os.close(w)
