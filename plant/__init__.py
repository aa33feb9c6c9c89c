"""orbcast plants: the client library and the ``plant`` CLI.

``Plant`` publishes through a durable on-disk outbox and subscribes with gap
repair, late start and checkpoints. See README.md and docs/protocol.md.
"""

from orbcast.envelope import Message

from .client import Plant, Subscription, Ticket, parse_start
from .tracker import Start

__all__ = ["Plant", "Subscription", "Ticket", "Message", "Start", "parse_start"]
