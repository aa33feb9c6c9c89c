"""The plant's unsent queue stays in producer_seq order when answered frames are put
back (protocol.md 5.2: a node whose dedup table cannot vouch for a producer's oldest
pairs may refuse a message that arrives after a newer one of its producer)."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

from plant.client import Plant


def requeue(unsent: list[int], *frames: list[int]) -> list[int]:
    holder = SimpleNamespace(_unsent=deque(unsent))
    q = holder._unsent
    for f in frames:
        Plant._requeue(holder, f)           # type: ignore[arg-type]
    assert holder._unsent is q              # mutated in place (the engine may hold it)
    return list(q)


def test_frames_answered_in_order_go_back_in_order() -> None:
    # two frames in flight both answered not-active, first one first
    assert requeue([7, 8], [1, 2, 3], [4, 5, 6]) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert requeue([7, 8], [4, 5, 6], [1, 2, 3]) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_the_common_case_is_a_prepend() -> None:
    assert requeue([10, 11], [3, 1, 2]) == [1, 2, 3, 10, 11]
    assert requeue([], [5, 4]) == [4, 5]
