"""A tiny synchronous request/reply helper for command-line tools and tests.

``request(endpoint, event, timeout)`` opens a DEALER, sends one request and
waits for the reply with the same ``rid``; it never blocks past its timeout.
The long-lived, reliable client is :class:`plant.Plant`; this is for one-off
questions such as ``status`` or "is the node up yet".

With link security, pass a :class:`~orbcast.link.LinkClient` (see
:func:`one_shot_link`): the request runs over a fresh session of its own
(LINK_HELLO, handshake, one sealed request, one sealed reply). Such a
session is used for one request and never resumed, so its state is not
persisted: no frame can ever be sealed twice under the same key.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from . import envelope as env
from .errors import AuthenticationError, OrbcastTimeout, RemoteProtocolError

__all__ = ["request", "wait_ready", "one_shot_link"]


def one_shot_link(cfg: Any) -> Any:
    """A :class:`~orbcast.link.LinkClient` for one request of a command-line
    tool, from a :class:`~orbcast.config.PlantConfig` (None if its security
    is off). Its session is never resumed, so it is not persisted."""
    if getattr(cfg, "security", "none") != "ratchet":
        return None
    from .keys import load_identity, load_pins
    from .link import LinkClient
    return LinkClient(load_identity(cfg.identity), cfg.producer_id, load_pins(cfg.pins),
                      persist=lambda _name, _blob: None)


def request(endpoint: str, ev: Any, *, timeout: float = 5.0,
            ctx: zmq.Context | None = None, link: Any = None) -> Any:
    """Send ``ev`` to ``endpoint`` and return the decoded reply.

    Raises :class:`OrbcastTimeout` if nothing arrives in ``timeout`` seconds,
    :class:`RemoteProtocolError` if the reply is malformed (with ``link``:
    :class:`AuthenticationError` if the node is not pinned or refuses us);
    an ``Error`` reply is returned as is (the caller decides).
    """
    own = ctx is None
    ctx = ctx or zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    deadline = time.monotonic() + timeout

    def recv() -> list[bytes]:
        left = deadline - time.monotonic()
        if left <= 0 or not s.poll(left * 1000):
            raise OrbcastTimeout(f"no answer from {endpoint} within {timeout:g} s")
        return s.recv_multipart()

    try:
        s.connect(endpoint)
        if link is None:
            s.send_multipart(env.encode(ev))
        else:
            from .link import LINK_KEYS, SENDER_KEY, inner_kind, outer_kind
            link.reset()
            s.send_multipart(link.hello(0))
            while True:
                frames = recv()
                kind = outer_kind(frames)
                if kind == LINK_KEYS:
                    link.on_keys(frames)
                    break
                if kind == env.Kind.ERROR:
                    raise AuthenticationError(f"{endpoint} refused the link: {env.decode(frames)}")
            s.send_multipart(link.seal(env.encode(ev)))
        while True:
            frames = recv()
            if link is not None:
                if outer_kind(frames) == env.Kind.ERROR:
                    err = env.decode(frames)
                    raise AuthenticationError(f"{endpoint} refused the request: {err.message}")
                _node, frames = link.open(frames)
                if inner_kind(frames) == SENDER_KEY:
                    continue
            rep = env.decode(frames)
            if getattr(rep, "rid", None) == ev.rid or (isinstance(rep, env.Error) and rep.rid == 0):
                return rep             # rid 0: the node could not read our request at all
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
