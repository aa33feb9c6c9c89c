"""The invariant checker must catch every violation it claims to catch."""

from __future__ import annotations

import pytest

from tests.invariants import InvariantViolation, check, check_log


def _good(n: int = 10) -> tuple[list[tuple[int, str, int]], dict[tuple[str, int], int]]:
    seq = [(i, "p" if i % 2 else "q", (i + 1) // 2) for i in range(1, n + 1)]
    acks = {(p, ps): s for s, p, ps in seq}
    return seq, acks


def test_accepts_a_correct_run() -> None:
    seq, acks = _good()
    rep = check({"a": seq, "b": list(seq)}, acks)
    assert (rep.first_seq, rep.last_seq, rep.delivered) == (1, 10, 20)
    check_log(seq, acks, accepted=list(acks))


def test_catches_a_planted_gap() -> None:
    seq, acks = _good()
    with pytest.raises(InvariantViolation, match="gap"):
        check({"a": seq[:4] + seq[5:]}, {})


def test_catches_a_planted_duplicate() -> None:
    seq, acks = _good()
    with pytest.raises(InvariantViolation, match="duplicate"):
        check({"a": seq[:5] + [seq[4]] + seq[5:]}, acks)


def test_catches_a_planted_reordering() -> None:
    seq, acks = _good()
    swapped = seq[:3] + [seq[4], seq[3]] + seq[5:]
    with pytest.raises(InvariantViolation, match="gap|reordering"):
        check({"a": swapped}, acks)


def test_catches_a_missing_acked_message() -> None:
    seq, acks = _good()
    acks[("p", 99)] = 11
    with pytest.raises(InvariantViolation, match="never delivered"):
        check({"a": seq}, acks)


def test_catches_an_ack_with_the_wrong_seq() -> None:
    seq, acks = _good()
    acks[("p", 1)] = 3
    with pytest.raises(InvariantViolation):
        check({"a": seq}, acks)


def test_catches_consumers_that_disagree() -> None:
    seq, acks = _good()
    other = list(seq)
    other[6] = (7, "z", 1)
    with pytest.raises(InvariantViolation, match="two messages"):
        check({"a": seq, "b": other}, {})


def test_catches_a_message_sequenced_twice() -> None:
    seq, _ = _good()
    seq[5] = (6, "p", 1)          # (p, 1) already at seq 1
    with pytest.raises(InvariantViolation, match="sequenced twice"):
        check({"a": seq}, {})


def test_log_check_catches_an_accepted_message_never_sequenced() -> None:
    seq, acks = _good()
    with pytest.raises(InvariantViolation, match="never sequenced"):
        check_log(seq, acks, accepted=[("p", 42)])


def test_log_check_catches_a_log_gap() -> None:
    seq, acks = _good()
    with pytest.raises(InvariantViolation, match="gap"):
        check_log(seq[1:], {})
