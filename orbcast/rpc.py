"""A tiny synchronous request/reply helper for command-line tools and tests.

``request(endpoint, event, timeout)`` opens a DEALER, sends one request and
waits for the reply with the same ``rid``; it never blocks past its timeout.
The long-lived, reliable client is :class:`plant.Plant`; this is for one-off
questions such as ``status`` or "is the node up yet".
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from . import envelope as env
from .errors import OrbcastTimeout, RemoteProtocolError

__all__ = ["request", "wait_ready"]


def request(endpoint: str, ev: Any, *, timeout: float = 5.0,
            ctx: zmq.Context | None = None) -> Any:
    """Send ``ev`` to ``endpoint`` and return the decoded reply.

    Raises :class:`OrbcastTimeout` if nothing arrives in ``timeout`` seconds,
    :class:`RemoteProtocolError` if the reply is malformed; an ``Error`` reply
    is returned as is (the caller decides).
    """
    own = ctx is None
    ctx = ctx or zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(endpoint)
        s.send_multipart(env.encode(ev))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not s.poll(left * 1000):
                raise OrbcastTimeout(f"no answer from {endpoint} within {timeout:g} s")
            rep = env.decode(s.recv_multipart())
            if getattr(rep, "rid", None) == ev.rid:
                return rep
    finally:
        s.close(0)
        if own:
            ctx.term()


def wait_ready(endpoint: str, *, timeout: float = 10.0) -> env.Pong:
    """Block until the node at ``endpoint`` answers a PING (a handshake, not
    a sleep); returns the PONG. Raises :class:`OrbcastTimeout`."""
    deadline = time.monotonic() + timeout
    rid = 1
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise OrbcastTimeout(f"{endpoint} did not become ready within {timeout:g} s")
        try:
            rep = request(endpoint, env.Ping(rid=rid), timeout=min(0.5, left))
            if isinstance(rep, env.Pong):
                return rep
        except (OrbcastTimeout, RemoteProtocolError):
            pass
        rid += 1
