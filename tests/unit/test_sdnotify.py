"""sd_notify: pacing with literal ``now`` values, datagrams to a socket the test owns."""

from __future__ import annotations

import os
import socket

import pytest

from orbcast.sdnotify import (
    STATUS_MIN_INTERVAL_S,
    Notifier,
    WatchdogPacer,
    notify,
    parse_watchdog_usec,
)


@pytest.fixture
def sock(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.settimeout(2)
    yield s, str(tmp_path / "notify")
    s.close()


def fields(s: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in s.recv(4096).decode().splitlines())


def nothing_waiting(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        s.recv(4096)
        return False
    except BlockingIOError:
        return True
    finally:
        s.settimeout(2)


@pytest.mark.parametrize("env,expect", [
    ({}, None), ({"WATCHDOG_USEC": "0"}, None), ({"WATCHDOG_USEC": "x"}, None),
    ({"WATCHDOG_USEC": "2000000"}, 2.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),          # another process's
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
])
def test_parse_watchdog_usec(env, expect):
    assert parse_watchdog_usec(env) == expect


def test_pacer_half_interval():
    p = WatchdogPacer(10.0)
    assert p.due(0.0) and p.deadline(0.0) == 0.0
    p.sent(100.0)
    assert not p.due(104.9) and p.due(105.0) and p.deadline(101.0) == 105.0
    with pytest.raises(ValueError):
        WatchdogPacer(0)


def test_no_socket_is_a_noop():
    n = Notifier.from_env({})
    assert not n.enabled and not n.ready("x") and not n.tick(0.0, "s") and not n.stopping()
    assert n.next_deadline(5.0) == float("inf")


def test_ready_status_watchdog_stopping(sock):
    s, path = sock
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert n.watchdog_s == 4.0
    n.ready("role=primary last_seq=0")
    assert fields(s) == {"READY": "1", "STATUS": "role=primary last_seq=0", "WATCHDOG": "1"}
    # tick pacing: literal monotonic values far in the future of ready()
    t0 = 1e9
    assert n.tick(t0, "a")
    assert fields(s) == {"WATCHDOG": "1", "STATUS": "a"}
    assert not n.tick(t0 + 1.9, "a")                 # not due, status unchanged
    assert nothing_waiting(s)
    assert n.tick(t0 + 2.0)
    assert fields(s) == {"WATCHDOG": "1"}
    assert n.next_deadline(t0 + 2.5) == t0 + 4.0
    # status changes are rate limited, then sent with the next tick
    assert n.tick(t0 + 2.1, "b")
    assert fields(s) == {"STATUS": "b"}
    assert not n.tick(t0 + 2.1 + STATUS_MIN_INTERVAL_S / 2, "c")
    assert n.tick(t0 + 2.1 + STATUS_MIN_INTERVAL_S, "c")
    assert fields(s) == {"STATUS": "c"}
    n.status("multi\nline  text")
    assert fields(s) == {"STATUS": "multi line text"}
    n.stopping("bye")
    assert fields(s) == {"STOPPING": "1", "STATUS": "bye"}
    n.close()


def test_abstract_socket_and_one_shot():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"orbcast-unit-{os.getpid()}"
    s.bind("\0" + name)
    s.settimeout(2)
    try:
        assert notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert fields(s) == {"READY": "1"}
    finally:
        s.close()


def test_vanished_socket_never_raises(tmp_path):
    n = Notifier(str(tmp_path / "gone"), 1.0)
    assert not n.ready() and not n.tick(0.0) and not n.stopping()
