"""The invariant checker used by the integration tests.

It compares what every plant *delivered* with every *ack* a publisher got
(and, optionally, with the log itself) and fails with a precise message on:

* a gap or a reordering in a consumer's delivered seqs,
* a duplicate delivery,
* an acked message missing from a consumer, or delivered under another seq,
* one seq carrying two different messages (across consumers or vs the log),
* one ``(producer, producer_seq)`` sequenced twice (exactly-once publish).

``tests/unit/test_invariants.py`` checks that it catches each of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

__all__ = ["Delivered", "InvariantViolation", "check", "check_log"]

#: One delivered message: (seq, producer, producer_seq).
Delivered = tuple[int, str, int]


class InvariantViolation(AssertionError):
    """An orbcast invariant does not hold; the message says which and where."""


@dataclass
class Report:
    consumers: int
    delivered: int
    acks: int
    first_seq: int
    last_seq: int


def _check_stream(name: str, seq: Sequence[Delivered], start: int | None) -> None:
    if not seq:
        return
    expect = seq[0][0] if start is None else start
    seen_pairs: dict[tuple[str, int], int] = {}
    for i, (s, p, ps) in enumerate(seq):
        if s != expect:
            if s < expect:
                kind = "duplicate" if s == expect - 1 or any(x[0] == s for x in seq[:i]) else "reordering"
                raise InvariantViolation(f"{name}: {kind}: delivered seq {s} at position {i}, "
                                         f"expected {expect}")
            raise InvariantViolation(f"{name}: gap: delivered seq {s} at position {i}, "
                                     f"expected {expect} (missing {expect}..{s - 1})")
        other = seen_pairs.get((p, ps))
        if other is not None:
            raise InvariantViolation(f"{name}: message ({p}, {ps}) sequenced twice: "
                                     f"seq {other} and seq {s}")
        seen_pairs[(p, ps)] = s
        expect += 1


def check(deliveries: Mapping[str, Sequence[Delivered]], acks: Mapping[tuple[str, int], int], *,
          start: int | None = 1, complete: bool = True) -> Report:
    """Check the invariants over every consumer's delivered sequence.

    ``acks`` maps ``(producer, producer_seq)`` to the seq its ack carried.
    ``start`` is the seq every consumer must start at (None: any).
    ``complete`` requires every acked message to be delivered by every
    consumer (set False for a consumer stopped early; then acks beyond its
    last delivered seq are not required).
    """
    by_seq: dict[int, tuple[str, int]] = {}
    for name, seq in deliveries.items():
        _check_stream(name, seq, start)
        for s, p, ps in seq:
            prev = by_seq.setdefault(s, (p, ps))
            if prev != (p, ps):
                raise InvariantViolation(f"seq {s} carries two messages: {prev} and {(p, ps)} ({name})")
    seq_of_ack: dict[int, tuple[str, int]] = {}
    for (p, ps), s in acks.items():
        prev = seq_of_ack.setdefault(s, (p, ps))
        if prev != (p, ps):
            raise InvariantViolation(f"two acks carry seq {s}: {prev} and {(p, ps)}")
    for name, seq in deliveries.items():
        got = {s: (p, ps) for s, p, ps in seq}
        last = seq[-1][0] if seq else 0
        for (p, ps), s in acks.items():
            if not complete and s > last:
                continue
            m = got.get(s)
            if m is None:
                raise InvariantViolation(f"{name}: acked message ({p}, {ps}) with seq {s} "
                                         "was never delivered")
            if m != (p, ps):
                raise InvariantViolation(f"{name}: ack says ({p}, {ps}) is seq {s}, "
                                         f"but seq {s} delivered {m}")
    lens = {len(v) for v in deliveries.values()}
    if complete and len(lens) > 1:
        sizes = {k: len(v) for k, v in deliveries.items()}
        raise InvariantViolation(f"consumers delivered different sequences: {sizes}")
    all_seqs = [s for v in deliveries.values() for s, _, _ in v]
    return Report(len(deliveries), sum(len(v) for v in deliveries.values()), len(acks),
                  min(all_seqs, default=0), max(all_seqs, default=0))


def check_log(records: Iterable[Delivered], acks: Mapping[tuple[str, int], int],
              accepted: Iterable[tuple[str, int]] = ()) -> dict[tuple[str, int], int]:
    """Check a log's ``(seq, producer, pseq)`` records: gap-free from 1,
    every message at most once, every ack present with its seq, and every
    ``accepted`` message (published, maybe never acked) present exactly once.
    Returns the log's ``(producer, pseq) -> seq`` map."""
    recs = list(records)
    _check_stream("log", recs, 1)
    where = {(p, ps): s for s, p, ps in recs}
    for (p, ps), s in acks.items():
        if where.get((p, ps)) != s:
            raise InvariantViolation(f"log: acked ({p}, {ps}) seq {s} is "
                                     f"{'missing' if (p, ps) not in where else 'at seq %d' % where[(p, ps)]}")
    for p, ps in accepted:
        if (p, ps) not in where:
            raise InvariantViolation(f"log: accepted message ({p}, {ps}) was never sequenced")
    return where
