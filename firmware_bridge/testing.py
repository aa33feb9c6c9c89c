"""Helpers for testing a bridge with no hardware (used by the test suite).

* :class:`MockMCP3008` - the slave side of an MCP3008 on gpiozero's mock
  SPI pins, with settable channel voltages.
* :class:`SequencerProcess` - a real ``python -m sequencer run`` on random
  loopback ports, waited for with a PING handshake and always reaped.
* :class:`NotifySocket` - a datagram socket playing systemd's notify socket.
* :func:`wait_for` - poll a condition with a deadline (never a bare sleep).

Nothing here is imported by the bridge itself.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpiozero.pins.mock import MockSPIDevice

from orbcast.rpc import wait_ready

__all__ = ["MockMCP3008", "NotifySocket", "SequencerProcess", "free_port", "wait_for"]


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition",
             interval: float = 0.01) -> Any:
    """Return ``cond()`` once truthy; raise ``TimeoutError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A loopback TCP port below 32768 (outside Linux's ephemeral range) that is free now."""
    for _ in range(200):
        p = random.randrange(10_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return p
    raise RuntimeError("no free port found")


class MockMCP3008(MockSPIDevice):
    """An MCP3008 on mock SPI pins: set ``channels[i]`` to a voltage (0-vref).

    MCP3008 protocol: the master clocks out ``0000000 1 S CCC`` (start bit,
    single-ended flag, 3 channel bits) and then reads a null bit and 10
    result bits, MSB first.
    """

    def __init__(self, clock_pin: Any = 11, mosi_pin: Any = 10, miso_pin: Any = 9,
                 select_pin: Any = 8, *, vref: float = 3.3, pin_factory: Any = None) -> None:
        super().__init__(clock_pin, mosi_pin, miso_pin, select_pin, pin_factory=pin_factory)
        self.vref = vref
        self.channels = [0.0] * 8
        self._state = "idle"

    def on_start(self) -> None:
        super().on_start()
        self._state = "idle"

    def on_bit(self) -> None:
        if self._state == "idle":
            if self.rx_buf[-1]:
                self._state = "mode"
                self.rx_buf = []
        elif self._state == "mode":
            self._state = "chan"
            self.rx_buf = []
        elif self._state == "chan":
            if len(self.rx_buf) == 3:
                ch = self.rx_word()
                v = max(0.0, min(self.vref, self.channels[ch]))
                raw = min(1023, int(round(v / self.vref * 1023)))
                self.tx_word(raw, 12)      # (sample + null bit) + 10 result bits
                self._state = "result"
        elif self._state == "result":
            if not self.tx_buf:
                self._state = "idle"
                self.rx_buf = []


class SequencerProcess:
    """``python -m sequencer run`` on random loopback ports (context manager).

    ``start()`` waits for a PING answer; ``stop()`` sends SIGTERM and reaps
    (SIGKILL after ``timeout``); ``kill()`` is kill -9. ``env`` adds
    environment variables (e.g. ``NOTIFY_SOCKET``).
    """

    def __init__(self, data: Path, *, env: dict[str, str] | None = None,
                 ingress_port: int | None = None, egress_port: int | None = None) -> None:
        self.data = Path(data)
        self.ingress = f"tcp://127.0.0.1:{ingress_port or free_port()}"
        self.egress = f"tcp://127.0.0.1:{egress_port or free_port()}"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.data.parent / f"{self.data.name}-sequencer.log"

    def start(self, timeout: float = 15.0) -> SequencerProcess:
        env = {**os.environ, **self.env}
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sequencer", "run", "--data", str(self.data),
                 "--ingress", self.ingress, "--egress", self.egress, "--no-fsync",
                 "--log-level", "warning"],
                stdout=subprocess.DEVNULL, stderr=logf, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(f"sequencer did not start; log:\n{self.log.read_text()[-2000:]}")
            try:
                wait_ready(self.ingress, timeout=0.5)   # a PING handshake, retried
                return self
            except Exception:     # OrbcastTimeout: not up yet
                continue

    def stop(self, timeout: float = 10.0) -> int | None:
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.proc = None
        return p.returncode

    def kill(self) -> None:
        p = self.proc
        if p is not None:
            if p.poll() is None:
                p.kill()
            p.wait(5)
        self.proc = None

    def __enter__(self) -> SequencerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NotifySocket:
    """A ``SOCK_DGRAM`` unix socket standing in for systemd's notify socket.

    ``path`` goes into ``NOTIFY_SOCKET``; ``abstract=True`` binds an abstract
    name and gives ``@name``. :meth:`wait` returns the first datagram whose
    fields satisfy a predicate, keeping everything received in ``messages``.
    """

    def __init__(self, directory: Path | None = None, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"orbcast-test-{os.getpid()}-{random.randrange(1 << 30)}"
        if abstract:
            self.sock.bind("\0" + name)
            self.path = "@" + name
        else:
            p = Path(directory or "/tmp") / f"{name}.sock"
            self.sock.bind(str(p))
            self.path = str(p)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def recv(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(max(0.0, timeout))
        try:
            data = self.sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait(self, pred: Callable[[dict[str, str]], bool], timeout: float = 10.0,
             what: str = "notify message") -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {what} within {timeout:g} s; got {[m for _, m in self.messages][-5:]}")
            m = self.recv(left)
            if m is not None and pred(m):
                return m

    def close(self) -> None:
        self.sock.close()
        if not self.path.startswith("@"):
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
