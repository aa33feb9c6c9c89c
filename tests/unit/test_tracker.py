"""Tests of plant.tracker: in-order delivery, gap repair, tail gaps from heartbeats,
bounded buffering, replay retry with backoff, credit flow control, late start by seq
and by time, bounded subscriptions, retention ("gone") and prefix filtering.

Sans-I/O: literal ``now`` values; the "node" is a few lines of test code that serves
replays from a Python list. The last test is a seeded simulation with loss, reordering
and slow consumers that must deliver exactly the filtered log, in order, once.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from typing import Any

import pytest

from orbcast.envelope import MSG_OVERHEAD, Cancel, Credit, Message, ReplayRequest, chunk_bytes
from orbcast.errors import RemoteProtocolError
from plant.tracker import MAX_RETRY_BACKOFF_S, Start, Tracker, wire_size


def msg(seq: int, topic: str = "t") -> Message:
    return Message(seq, 1, 1000 * seq, "p", seq, topic, bytes([seq % 256]))


def msgs(first: int, last: int, topic: str = "t") -> list[Message]:
    return [msg(s, topic) for s in range(first, last + 1)]


def tracker(start: Start | None = None, **kw: Any) -> Tracker:
    rids = itertools.count(1)
    return Tracker(start=start or Start.now(), new_rid=lambda: next(rids), **kw)


def batch(tr: Tracker, first: int, last: int, now: float = 0.0) -> None:
    tr.on_batch(first, last, msgs(first, last), now)


def chunk(tr: Tracker, rid: int, start: int, nxt: int, *, last_seq: int = 0, done: bool = False,
          now: float = 0.0, records: list[Message] | None = None) -> None:
    tr.on_chunk(rid, start, nxt, last_seq or nxt - 1,  done,
                msgs(start, nxt - 1) if records is None else records, now)


def seqs(tr: Tracker) -> list[int]:
    return [m.seq for m in tr.ready]


def req(rid: int, from_seq: int, to_seq: int | None, **kw: Any) -> ReplayRequest:
    return ReplayRequest(rid=rid, from_seq=from_seq, to_seq=to_seq, **kw)


# --- live delivery --------------------------------------------------------------------------

def test_in_order_live_delivery() -> None:
    tr = tracker()
    batch(tr, 5, 7)
    batch(tr, 8, 8)
    batch(tr, 9, 12)
    assert seqs(tr) == list(range(5, 13))
    assert tr.actions() == [] and tr.next_seq == 13 and tr.live_delivered == 8
    assert tr.deadline() is None
    batch(tr, 6, 9)                                      # old: ignored
    assert seqs(tr) == list(range(5, 13))


def test_start_now_with_an_idle_stream_starts_after_the_heartbeat() -> None:
    tr = tracker()
    tr.on_heartbeat(10, 0.0)
    assert tr.next_seq == 11 and tr.actions() == []
    batch(tr, 11, 12)
    assert seqs(tr) == [11, 12]


def test_overlapping_live_batch_delivers_only_the_new_part() -> None:
    tr = tracker()
    batch(tr, 1, 5)
    batch(tr, 4, 8)
    assert seqs(tr) == list(range(1, 9))


# --- gaps ---------------------------------------------------------------------------------

def test_a_gap_requests_exactly_the_missing_range_once() -> None:
    tr = tracker()
    batch(tr, 1, 3, now=1.0)
    batch(tr, 7, 9, now=1.0)
    assert tr.actions() == [req(1, 4, 6, credit=4, max_records=4096)]
    batch(tr, 10, 12, now=1.1)
    tr.on_heartbeat(12, 1.2)
    tr.tick(1.5)
    assert tr.actions() == []                            # one replay in flight at a time
    assert seqs(tr) == [1, 2, 3] and tr.gaps == 1
    chunk(tr, 1, 4, 7, last_seq=12, done=True, now=1.6)
    assert seqs(tr) == list(range(1, 13))                # buffer drained after the fill
    assert tr.actions() == [] and tr.next_seq == 13 and tr.repaired == 3
    assert tr.deadline() is None


def test_gap_repair_over_several_chunks_with_credit() -> None:
    tr = tracker(credit=2, chunk_records=2)
    batch(tr, 1, 1)
    batch(tr, 8, 9)
    assert tr.actions() == [req(1, 2, 7, credit=2, max_records=2)]
    chunk(tr, 1, 2, 4)
    assert tr.actions() == [Credit(rid=1, credit=1)]     # one chunk in, one more allowed
    chunk(tr, 1, 4, 6)
    assert tr.actions() == [Credit(rid=1, credit=1)]
    chunk(tr, 1, 6, 8, done=True)
    assert tr.actions() == []                            # no credit after the last chunk
    assert seqs(tr) == list(range(1, 10))


def test_a_chunk_overlapping_the_buffer_gives_no_duplicates() -> None:
    tr = tracker()
    batch(tr, 1, 2)
    batch(tr, 6, 8)
    batch(tr, 9, 10)
    (r,) = tr.actions()
    chunk(tr, r.rid, 3, 10, done=True)                   # the node sent more than asked
    assert seqs(tr) == list(range(1, 11))


def test_a_chunk_past_what_was_asked_cannot_make_the_cursor_skip() -> None:
    """A chunk claiming to cover 4..39 when 4..6 was asked for (a node that
    lies, or is broken): only 4..6 is taken; what lies beyond is not skipped."""
    tr = tracker()
    batch(tr, 1, 3)
    batch(tr, 7, 8)
    (r,) = tr.actions()
    assert (r.from_seq, r.to_seq) == (4, 6)
    chunk(tr, r.rid, 4, 40, done=True, records=msgs(4, 5) + msgs(20, 21))
    assert seqs(tr) == [1, 2, 3, 4, 5, 7, 8] and tr.next_seq == 9   # 6: "filtered"
    (r2,) = tr.actions()
    assert (r2.from_seq, r2.to_seq) == (9, 39)           # the rest is asked for, not skipped


def test_a_second_gap_behind_the_first_is_requested_after_it() -> None:
    tr = tracker()
    batch(tr, 1, 1)
    batch(tr, 5, 5)
    batch(tr, 9, 9)
    assert tr.actions() == [req(1, 2, 4)]
    chunk(tr, 1, 2, 5, done=True)
    assert seqs(tr) == [1, 2, 3, 4, 5]
    assert tr.actions() == [req(2, 6, 8)]
    chunk(tr, 2, 6, 9, done=True)
    assert seqs(tr) == list(range(1, 10)) and tr.gaps == 2


def test_late_or_reordered_live_batch_fills_the_gap_first() -> None:
    tr = tracker()
    batch(tr, 1, 1)
    batch(tr, 4, 5)
    (r,) = tr.actions()
    batch(tr, 2, 3)                                       # arrives late after all
    assert seqs(tr) == [1, 2, 3, 4, 5]
    chunk(tr, r.rid, 2, 4, done=True)                    # the replay brings nothing new
    assert seqs(tr) == [1, 2, 3, 4, 5] and tr.actions() == []


def test_a_tail_replay_is_bounded_so_live_batches_meanwhile_are_not_fetched_twice() -> None:
    tr = tracker()
    batch(tr, 1, 3)
    tr.on_heartbeat(5, 0.0)                   # batch 4..5 was lost
    assert tr.actions() == [req(1, 4, 5)]     # not open-ended: the node would chase its tail
    batch(tr, 6, 9, 0.1)                      # live goes on while the replay is served
    chunk(tr, 1, 4, 6, done=True, now=0.2)
    assert seqs(tr) == list(range(1, 10)) and tr.repaired == 2 and tr.actions() == []


def test_a_tail_the_node_overstated_is_asked_for_once_not_for_ever() -> None:
    """One heartbeat (or WELCOME) claiming seq 2**63 - 1: the replay of that "tail"
    ends at the node's real last seq, and the tracker believes the log (it asked
    again at once, thousands of times a second, for ever)."""
    tr = tracker()
    batch(tr, 1, 3)
    tr.on_heartbeat(2**63 - 1, 0.0)
    (r,) = tr.actions()
    assert (r.from_seq, r.to_seq) == (4, 2**63 - 1)
    chunk(tr, r.rid, 4, 6, last_seq=5, done=True, now=0.1)   # the log ends at 5
    assert seqs(tr) == [1, 2, 3, 4, 5] and tr.known_tail == 5
    tr.tick(0.2)
    assert tr.actions() == [] and tr.deadline() is None
    batch(tr, 6, 6, now=0.3)                                  # and the stream goes on
    assert seqs(tr)[-1] == 6 and tr.actions() == []


def test_a_chunk_cut_before_a_newer_heartbeat_keeps_the_tail_it_announced() -> None:
    """The overstated-tail correction applies only when the node's log ends before
    what was asked for: a replay of 1..10 cut while the node was at 20 says nothing
    against a heartbeat at 25 that came meanwhile (batch 21..25 was lost)."""
    tr = tracker(start=Start.at_seq(1))
    batch(tr, 11, 20)
    (r,) = tr.actions()
    assert (r.from_seq, r.to_seq) == (1, 10)
    tr.on_heartbeat(25, 0.01)
    chunk(tr, r.rid, 1, 11, last_seq=20, done=True, now=0.02)
    assert tr.known_tail == 25
    (r2,) = tr.actions()
    assert (r2.from_seq, r2.to_seq) == (21, 25)


def test_heartbeat_ahead_requests_the_tail() -> None:
    tr = tracker()
    batch(tr, 1, 3)
    tr.on_heartbeat(3, 0.0)
    assert tr.actions() == []
    tr.on_heartbeat(5, 0.5)
    assert tr.actions() == [req(1, 4, 5)]
    assert tr.known_tail == 5
    chunk(tr, 1, 4, 6, done=True, now=0.6)
    assert seqs(tr) == [1, 2, 3, 4, 5] and tr.actions() == []


def test_buffer_bound_drops_and_replay_recovers() -> None:
    tr = tracker(buffer_limit=5)
    batch(tr, 1, 3)
    batch(tr, 10, 12)                                    # 3 buffered
    batch(tr, 13, 15)                                    # 6 > 5: dropped
    batch(tr, 16, 16)                                    # 4 + 1 <= 5: buffered
    assert tr.dropped_live == 1 and tr.buffer_hwm == 4
    assert tr.actions() == [req(1, 4, 9)]
    chunk(tr, 1, 4, 10, done=True)
    assert seqs(tr) == list(range(1, 13))
    # 13..15 were dropped: the buffered 16 is a new gap
    assert tr.actions() == [req(2, 13, 15)]
    chunk(tr, 2, 13, 16, done=True)
    assert seqs(tr) == list(range(1, 17)) and len(set(seqs(tr))) == 16


# --- timeouts and stale chunks ------------------------------------------------------------

def test_replay_timeout_cancels_and_retries_with_backoff() -> None:
    tr = tracker(request_timeout=2.0)
    batch(tr, 1, 1, now=10.0)
    batch(tr, 5, 5, now=10.0)
    assert tr.actions() == [req(1, 2, 4)]
    assert tr.deadline() == 12.0
    tr.tick(11.9)
    assert tr.actions() == []
    tr.tick(12.0)
    assert tr.actions() == [Cancel(rid=1)] and tr.retries == 1
    assert tr.deadline() == 14.0                         # wait one backoff (2 s)
    tr.tick(13.9)
    assert tr.actions() == []
    tr.tick(14.0)
    assert tr.actions() == [req(2, 2, 4)]
    tr.tick(16.0)
    assert tr.actions() == [Cancel(rid=2)]
    assert tr.deadline() == 20.0                         # backoff doubled to 4 s
    tr.tick(20.0)
    assert tr.actions() == [req(3, 2, 4)]
    tr.tick(22.0)
    assert tr.actions() == [Cancel(rid=3)]
    assert tr.deadline() == 22.0 + MAX_RETRY_BACKOFF_S   # 8 s capped at 5 s
    tr.tick(27.0)
    assert tr.actions() == [req(4, 2, 4)]
    tr.tick(29.0)
    tr.tick(34.0)
    assert tr.actions() == [Cancel(rid=4), req(5, 2, 4)]  # stays at the cap
    assert tr.retries == 4


def test_a_chunk_resets_the_timeout_and_the_backoff() -> None:
    tr = tracker(request_timeout=2.0, chunk_records=1)
    batch(tr, 1, 1, now=0.0)
    batch(tr, 9, 9, now=0.0)
    tr.actions()
    tr.tick(2.0)                                          # timeout 1: backoff becomes 4
    tr.tick(4.0)
    assert tr.actions() == [Cancel(rid=1), req(2, 2, 8, max_records=1)]
    chunk(tr, 2, 2, 3, now=5.0)
    assert tr.deadline() == 7.0                          # now + request_timeout
    tr.tick(7.0)
    assert tr.actions()[-1] == Cancel(rid=2)
    assert tr.deadline() == 9.0                          # backoff is back to 2 s
    tr.tick(9.0)
    assert tr.actions() == [req(3, 3, 8, max_records=1)]


def test_stale_chunks_and_errors_are_ignored() -> None:
    tr = tracker(request_timeout=2.0)
    batch(tr, 1, 1, now=0.0)
    batch(tr, 5, 5, now=0.0)
    tr.tick(2.0)
    tr.tick(4.0)
    assert tr.actions() == [req(1, 2, 4), Cancel(rid=1), req(2, 2, 4)]
    chunk(tr, 1, 2, 5, done=True, now=4.1)               # from the cancelled request
    tr.on_error(1, "gone", 3, 4.1)
    chunk(tr, 99, 2, 5, done=True, now=4.1)              # never requested
    assert seqs(tr) == [1] and tr.actions() == [] and tr.next_seq == 2
    chunk(tr, 2, 2, 5, done=True, now=4.2)
    assert seqs(tr) == [1, 2, 3, 4, 5]


def test_a_lost_chunk_restarts_the_replay() -> None:
    tr = tracker(request_timeout=2.0)
    batch(tr, 1, 1)
    batch(tr, 20, 20)
    tr.actions()
    chunk(tr, 1, 2, 5, now=1.0)
    tr.actions()
    chunk(tr, 1, 8, 11, now=1.5)                         # 5..7 never arrived
    assert seqs(tr) == [1, 2, 3, 4] and tr.next_seq == 5
    assert tr.actions() == [Cancel(rid=1)]
    tr.tick(1.5 + 2.0)
    assert tr.actions() == [req(2, 5, 19)]


@pytest.mark.parametrize("start,nxt,records", [
    (1, 5, msgs(1, 5)),          # a record at next_seq: it would come again in the next chunk
    (3, 6, msgs(2, 5)),          # a record before start_seq
    (1, 5, msgs(1, 3) + msgs(7, 7)),
    (5, 4, []),                  # the cursor would move backwards
])
def test_a_chunk_with_records_outside_its_range_is_rejected_and_changes_nothing(
        start: int, nxt: int, records: list[Message]) -> None:
    tr = tracker(start=Start.at_seq(1))
    tr.on_heartbeat(9, 0.0)
    assert tr.actions() == [req(1, 1, 9)]
    chunk(tr, 1, 1, 3)
    before = (seqs(tr), tr.next_seq, tr.stats(), tr.deadline(), tr._outstanding)
    tr.actions()
    with pytest.raises(RemoteProtocolError):
        tr.on_chunk(1, start, nxt, 9, False, records, 0.5)
    assert (seqs(tr), tr.next_seq, tr.stats(), tr.deadline(), tr._outstanding) == before
    assert tr.actions() == []
    chunk(tr, 1, 3, 10, done=True, now=0.6)              # the honest chunk still works
    assert seqs(tr) == list(range(1, 10))


# --- flow control -------------------------------------------------------------------------

def test_credit_is_withheld_while_ready_is_full_and_granted_by_consumed() -> None:
    """Credit only for chunks the ready queue can hold, counting those granted
    and not yet received."""
    tr = tracker(start=Start.at_seq(1), credit=2, chunk_records=10, ready_limit=25)
    tr.on_heartbeat(100, 0.0)
    assert tr.actions() == [req(1, 1, 100, credit=2, max_records=10)]   # 2 x 10 <= 25
    chunk(tr, 1, 1, 11)
    assert tr.actions() == []           # 10 held + 10 on the way + 10 > 25: withheld
    chunk(tr, 1, 11, 21)
    assert tr.actions() == []                            # 20 + 10 > 25: withheld
    tr.consumed(0.1)
    assert tr.actions() == []                            # still 20 >= 25 // 2
    for _ in range(9):
        tr.ready.popleft()
    tr.consumed(0.2)                                     # 11 < 12: room for one chunk
    assert tr.actions() == [Credit(rid=1, credit=1)] and tr._owed == 1
    chunk(tr, 1, 21, 31)
    assert seqs(tr) == list(range(10, 31))


def test_credit_never_lets_the_chunks_on_their_way_overflow_the_byte_bound() -> None:
    """A large replay credit (replay_credit may be 64) is cut to what the ready
    queue's byte bound has room for: the queue holds at most its bound plus one
    chunk, however much credit is configured (it used to take credit x chunk)."""
    body = 2 * BIG - 2 * MSG_OVERHEAD                     # two big() messages a chunk
    tr = tracker(start=Start.at_seq(1), credit=64, chunk_records=2, ready_bytes=10 * BIG,
                 chunk_body_bytes=body)
    tr.on_heartbeat(1000, 0.0)
    (r,) = tr.actions()
    assert r.credit == 5                                  # 5 chunks of 2 x BIG fill 10 x BIG
    s = 1
    for _ in range(5):                                    # the node sends what it may
        tr.on_chunk(1, s, s + 2, 1000, False, big(s, s + 1), 0.1)
        s += 2
    assert tr.actions() == [] and len(tr.ready) == 10 and tr._outstanding == 0
    for _ in range(6):
        tr.ready.popleft()
    tr.consumed(0.2)                                      # 4 x BIG <= half: room for 3 chunks
    assert tr.actions() == [Credit(rid=1, credit=3)]


def test_a_replay_paused_by_a_full_ready_queue_does_not_time_out() -> None:
    """While we withhold all credit the node is silent because of us: no retry, no
    deadline; once the application drains, credit goes out and the timeout runs again."""
    tr = tracker(start=Start.at_seq(1), credit=1, chunk_records=10, ready_limit=15,
                 request_timeout=2.0)
    tr.on_heartbeat(100, 0.0)
    assert tr.actions() == [req(1, 1, 100, credit=1, max_records=10)]
    chunk(tr, 1, 1, 11, now=0.5)                          # 10 + 10 > 15: withheld
    assert tr.actions() == [] and tr.deadline() is None
    tr.tick(60.0)                                        # long past the request timeout
    assert tr.actions() == [] and tr.retries == 0
    for _ in range(5):
        tr.ready.popleft()
    tr.consumed(61.0)                                    # 5 < 15 // 2
    assert tr.actions() == [Credit(rid=1, credit=1)]
    assert tr.deadline() == 63.0
    tr.tick(62.9)
    assert tr.actions() == [] and tr.retries == 0
    tr.tick(63.0)                                        # the node owes us a chunk now
    assert tr.retries == 1 and tr.actions() == [Cancel(rid=1)]


def test_live_batches_are_dropped_while_ready_is_full_then_replayed() -> None:
    tr = tracker(ready_limit=5)
    batch(tr, 1, 5)
    batch(tr, 6, 8)
    assert tr.dropped_live == 1 and seqs(tr) == [1, 2, 3, 4, 5]
    tr.on_heartbeat(8, 0.0)
    assert tr.actions() == [] and tr.deadline() is None   # no replay into a full queue
    tr.ready.clear()
    tr.consumed(0.5)
    assert tr.actions() == [req(1, 6, 8, credit=1)]      # no room for a whole chunk: one
    chunk(tr, 1, 6, 9, done=True)
    assert seqs(tr) == [6, 7, 8]


def big(first: int, last: int, size: int = 10_000) -> list[Message]:
    return [Message(s, 1, 1000 * s, "p", s, "t", b"x" * size) for s in range(first, last + 1)]


#: What tracker() reckons for one big() message (its wire size plus the objects)
BIG = wire_size(big(1, 1)) + MSG_OVERHEAD


def test_live_batches_are_dropped_while_ready_is_full_in_bytes_then_replayed() -> None:
    """Few messages but large ones: the byte bound stops the ready queue where
    the count bound would not."""
    tr = tracker(ready_bytes=3 * BIG)
    for s in range(1, 4):
        tr.on_batch(s, s, big(s, s), 0.0)
    assert tr.ready_bytes() == 3 * BIG and tr.stats()["ready_bytes"] == 3 * BIG
    tr.on_batch(4, 5, big(4, 5), 0.0)                    # 3 x BIG is not below the bound
    assert tr.dropped_live == 1 and seqs(tr) == [1, 2, 3]
    tr.on_heartbeat(5, 0.1)
    assert tr.actions() == [] and tr.deadline() is None  # no replay into a full queue
    tr.ready.popleft()                                   # the application takes one
    assert tr.ready_bytes() == 2 * BIG                   # seq 1's bytes are forgotten
    tr.consumed(0.2)
    assert tr.actions() == [req(1, 4, 5, credit=1)]
    tr.on_chunk(1, 4, 6, 5, True, big(4, 5), 0.3)
    assert seqs(tr) == [2, 3, 4, 5] and tr.ready_bytes() == 4 * BIG
    tr.ready.clear()
    assert tr.ready_bytes() == 0


def test_ready_bytes_counts_what_a_batch_brought_until_all_of_it_is_popped() -> None:
    """The messages delivered together are one group, forgotten when the next
    message to pop lies beyond it (the engine never sees the pops themselves)."""
    tr = tracker()
    tr.on_batch(1, 3, big(1, 3), 0.0, nbytes=3000)
    tr.on_batch(4, 4, big(4, 4), 0.0, nbytes=1000)
    assert tr.ready_bytes() == 4000 + 4 * MSG_OVERHEAD
    tr.ready.popleft()
    tr.ready.popleft()
    assert tr.ready_bytes() == 4000 + 4 * MSG_OVERHEAD   # 3 is still waiting
    tr.ready.popleft()
    assert tr.ready_bytes() == 1000 + MSG_OVERHEAD
    tr.on_batch(5, 6, big(5, 6), 0.0, nbytes=500)        # an overlap: only 6 is new
    assert seqs(tr) == [4, 5, 6]
    tr.on_batch(5, 8, big(5, 8), 0.0, nbytes=4000)
    assert seqs(tr) == [4, 5, 6, 7, 8]                   # 7, 8: half the batch
    assert tr.ready_bytes() == 1000 + 500 + 2000 + 5 * MSG_OVERHEAD


def test_credit_is_withheld_while_ready_holds_too_many_bytes() -> None:
    """A replay of large messages: credit waits until the application has taken
    enough of them, and the tracker names the seq whose pop should wake the
    engine (so Subscription.get does not wake it for every message)."""
    cb = chunk_bytes(2, 2 * BIG - 2 * MSG_OVERHEAD)       # two big() messages a chunk
    assert cb == 2 * BIG
    tr = tracker(start=Start.at_seq(1), credit=1, chunk_records=2, ready_bytes=5 * BIG,
                 chunk_body_bytes=2 * BIG - 2 * MSG_OVERHEAD)
    tr.on_heartbeat(100, 0.0)
    assert tr.actions() == [req(1, 1, 100, credit=1, max_records=2)]
    tr.on_chunk(1, 1, 3, 100, False, big(1, 2), 0.1)
    assert tr.actions() == [Credit(rid=1, credit=1)]     # 2 + 2 <= 5 big messages
    tr.on_chunk(1, 3, 5, 100, False, big(3, 4), 0.2)
    assert tr.actions() == []                            # 4 + 2 > 5: withheld
    assert tr.resume_seq == 2      # once 1..2 are popped, 2 x BIG <= half of 5 x BIG
    tr.ready.popleft()
    tr.consumed(0.3)
    assert tr.actions() == [] and tr.resume_seq == 2
    tr.ready.popleft()
    tr.consumed(0.4)
    assert tr.actions() == [Credit(rid=1, credit=1)]
    tr.on_chunk(1, 5, 7, 100, False, big(5, 6), 0.5)
    assert seqs(tr) == [3, 4, 5, 6]


def test_a_credit_withheld_for_the_count_alone_wakes_at_any_seq() -> None:
    tr = tracker(start=Start.at_seq(1), credit=2, chunk_records=10, ready_limit=25)
    tr.on_heartbeat(100, 0.0)
    tr.actions()
    chunk(tr, 1, 1, 11)
    chunk(tr, 1, 11, 21)
    assert tr._owed and tr.resume_seq == 0


def test_gap_buffer_bound_in_bytes_drops_and_replay_recovers() -> None:
    tr = tracker(buffer_bytes=2 * BIG)
    tr.on_batch(1, 1, big(1, 1), 0.0)
    tr.on_batch(5, 5, big(5, 5), 0.0)                    # buffered: BIG
    tr.on_batch(6, 7, big(6, 7), 0.0)                    # 3 x BIG > 2 x BIG: dropped
    tr.on_batch(8, 8, big(8, 8), 0.0)                    # 2 x BIG: buffered
    assert tr.dropped_live == 1 and tr._buf_bytes == 2 * BIG
    assert tr.actions() == [req(1, 2, 4)]
    tr.on_chunk(1, 2, 5, 8, True, big(2, 4), 0.1)
    assert seqs(tr) == [1, 2, 3, 4, 5] and tr._buf_bytes == BIG
    assert tr.actions() == [req(2, 6, 7)]
    tr.on_chunk(2, 6, 8, 8, True, big(6, 7), 0.2)
    assert seqs(tr) == list(range(1, 9)) and tr._buf_bytes == 0


# --- late start ---------------------------------------------------------------------------

def test_late_start_at_a_seq_has_no_gap_and_no_duplicate_at_the_seam() -> None:
    tr = tracker(start=Start.at_seq(5))
    batch(tr, 21, 22)                                    # live first: buffered
    assert seqs(tr) == []
    assert tr.actions() == [req(1, 5, 20)]
    batch(tr, 23, 23)
    chunk(tr, 1, 5, 15)
    chunk(tr, 1, 15, 22, done=True)                      # overlaps the buffered 21
    assert seqs(tr) == list(range(5, 24))


def test_late_start_at_a_seq_from_a_heartbeat() -> None:
    tr = tracker(start=Start.at_seq(5))
    assert tr.actions() == [] and tr.deadline() is None  # nothing known yet
    tr.on_heartbeat(20, 0.0)
    assert tr.actions() == [req(1, 5, 20)]


@pytest.mark.parametrize("chunk_end", [30, 32])
def test_late_start_by_time(chunk_end: int) -> None:
    tr = tracker(start=Start.at_time(11_500), prefix="")
    tr.tick(0.0)
    # credit 1: the first chunk names the start, nothing may overtake it
    assert tr.actions() == [ReplayRequest(rid=1, from_seq=1, since=11_500, credit=1)]
    batch(tr, 30, 31, now=0.1)                           # buffered while the node resolves
    assert tr.resolved_start is None and seqs(tr) == []
    chunk(tr, 1, 12, 20, now=0.2)                        # the node's answer: seq 12 (stamped 12,000)
    assert tr.resolved_start == 12 and tr.next_seq == 20
    assert tr.actions() == [Credit(rid=1, credit=4)]     # now the full pipeline
    chunk(tr, 1, 20, chunk_end, done=True, now=0.3)
    assert seqs(tr) == list(range(12, max(32, chunk_end)))


def test_start_by_time_survives_a_lost_first_chunk() -> None:
    """Were the node allowed a second chunk before the first arrived, losing the first
    would make the second look like the start and silently skip its records."""
    tr = tracker(start=Start.at_time(5000), request_timeout=2.0)
    tr.tick(0.0)
    (r,) = tr.actions()
    assert r.credit == 1
    # the first chunk (start 5) is lost; with credit 1 the node cannot send another
    tr.tick(2.0)
    assert tr.actions() == [Cancel(rid=1)] and tr.resolved_start is None
    tr.tick(4.0)
    (r2,) = tr.actions()
    assert r2.since == 5000 and r2.credit == 1
    chunk(tr, r2.rid, 5, 9, now=4.1)
    assert tr.resolved_start == 5 and seqs(tr) == [5, 6, 7, 8]


def test_start_by_time_after_everything() -> None:
    """A start time ahead of the node's clock: what is sequenced meanwhile is
    stamped before it and is not delivered (seq by seq the tracker still follows
    the stream); from the first record at or after the time, everything is."""
    tr = tracker(start=Start.at_time(60_000))            # msg(s) is stamped 1000 * s
    tr.tick(0.0)
    (r,) = tr.actions()
    chunk(tr, r.rid, 51, 51, done=True, records=[])      # empty: nothing that late yet
    assert tr.resolved_start == 51
    batch(tr, 51, 52)
    assert seqs(tr) == [] and tr.next_seq == 53 and tr.actions() == []
    tr.on_batch(53, 62, msgs(53, 62), 0.1, nbytes=1000)
    assert seqs(tr) == list(range(60, 63)) and tr.ready_bytes() == 300 + 3 * MSG_OVERHEAD
    batch(tr, 63, 63)
    assert seqs(tr) == list(range(60, 64))


def test_start_by_time_is_not_cleared_by_a_record_before_the_cursor() -> None:
    """Record times need not grow with seqs (a failover to a node whose clock is
    behind). A batch that straddles the cursor may hold an already-passed record
    stamped after the start time: it is skipped, so it must not end the time
    filter for the earlier-stamped records after it."""
    tr = tracker(start=Start.at_time(60_000))
    tr.tick(0.0)
    (r,) = tr.actions()
    chunk(tr, r.rid, 51, 51, done=True, records=[])      # resolved: seq 51, nothing yet
    assert tr.resolved_start == 51
    late = [Message(50, 1, 70_000, "p", 50, "t", b"x")]  # before the cursor, stamped after
    tr.on_batch(50, 53, late + msgs(51, 53), 0.1, nbytes=400)
    assert seqs(tr) == [] and tr.next_seq == 54
    tr.on_batch(54, 55, [msg(54), Message(55, 1, 61_000, "p", 55, "t", b"y")], 0.2)
    assert seqs(tr) == [55]


@pytest.mark.parametrize("make", [lambda: Start.at_seq(0), lambda: Start.at_seq(2**63),
                                  lambda: Start.at_time(-1), lambda: Start.at_time(2**63)])
def test_start_validation(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


# --- bounded subscriptions ----------------------------------------------------------------

def test_bounded_subscription_finishes_at_to_seq() -> None:
    tr = tracker(start=Start.at_seq(3), to_seq=6)
    tr.on_heartbeat(10, 0.0)
    assert tr.actions() == [req(1, 3, 6)]
    chunk(tr, 1, 3, 7, done=True)
    assert seqs(tr) == [3, 4, 5, 6] and tr.finished
    batch(tr, 11, 12)
    tr.on_heartbeat(20, 1.0)
    tr.tick(100.0)
    assert seqs(tr) == [3, 4, 5, 6] and tr.actions() == [] and tr.deadline() is None


def test_bounded_subscription_ends_inside_a_live_batch() -> None:
    tr = tracker(to_seq=5)
    batch(tr, 1, 3)
    batch(tr, 4, 8)
    assert seqs(tr) == [1, 2, 3, 4, 5] and tr.finished


def test_bounded_subscription_with_a_gap_asks_no_further_than_to_seq() -> None:
    tr = tracker(start=Start.at_seq(1), to_seq=4)
    batch(tr, 10, 12)
    assert tr.actions() == [req(1, 1, 4)]
    chunk(tr, 1, 1, 5, done=True, records=msgs(1, 4))
    assert seqs(tr) == [1, 2, 3, 4] and tr.finished and tr.actions() == []


def test_bounded_subscription_that_is_empty() -> None:
    tr = tracker(start=Start.at_seq(7), to_seq=6)
    assert tr.finished
    tr.on_heartbeat(10, 0.0)
    assert tr.actions() == [] and seqs(tr) == []


# --- errors from the node -----------------------------------------------------------------

def test_gone_jumps_to_first_available_and_counts_the_loss() -> None:
    tr = tracker(start=Start.at_seq(1))
    tr.on_heartbeat(100, 5.0)
    assert tr.actions() == [req(1, 1, 100)]
    tr.on_error(1, "gone", 40, 5.1)
    assert tr.next_seq == 40 and tr.lost_to_retention == 39
    assert tr.actions() == [req(2, 40, 100)]             # at once, no backoff
    chunk(tr, 2, 40, 101, done=True, now=5.2)
    assert seqs(tr) == list(range(40, 101))


def test_gone_keeps_what_the_live_buffer_holds() -> None:
    tr = tracker(start=Start.at_seq(1))
    batch(tr, 50, 52)
    assert tr.actions() == [req(1, 1, 49)]
    tr.on_error(1, "gone", 51, 0.1)                      # even the buffered 50 is gone from the log
    assert seqs(tr) == [50, 51, 52]                      # but we hold it: deliver, do not stall
    assert tr.lost_to_retention == 49 and tr.next_seq == 53
    batch(tr, 53, 53, now=0.2)
    assert seqs(tr) == [50, 51, 52, 53] and tr.actions() == []


def test_gone_exactly_at_the_first_buffered_batch() -> None:
    tr = tracker(start=Start.at_seq(1))
    batch(tr, 50, 52)
    tr.actions()
    tr.on_error(1, "gone", 50, 0.1)
    assert seqs(tr) == [50, 51, 52] and tr.lost_to_retention == 49
    assert tr.deadline() is None


def test_other_errors_retry_after_the_backoff() -> None:
    tr = tracker(start=Start.at_seq(1), request_timeout=2.0)
    tr.on_heartbeat(10, 3.0)
    tr.actions()
    tr.on_error(1, "busy", None, 3.5)
    assert tr.actions() == [] and tr.deadline() == 5.5
    tr.tick(5.5)
    assert tr.actions() == [req(2, 1, 10)] and tr.lost_to_retention == 0


# --- prefix filtering -------------------------------------------------------------------------

def test_prefix_filter_keeps_seq_continuity() -> None:
    tr = tracker(prefix="a/")
    topics = {s: ("a/x" if s % 3 else "b/y") for s in range(1, 30)}

    def live(first: int, last: int) -> None:
        tr.on_batch(first, last, [msg(s, topics[s]) for s in range(first, last + 1)], 0.0)

    live(1, 4)
    live(9, 12)                                          # gap 5..8
    assert tr.actions() == [req(1, 5, 8, topic="a/")]
    # the node filters: 6 is "b/y" and is left out, but next_seq covers it
    chunk(tr, 1, 5, 9, done=True, records=[msg(s, topics[s]) for s in (5, 7, 8)])
    live(13, 15)
    assert seqs(tr) == [s for s in range(1, 16) if topics[s] == "a/x"]
    assert tr.actions() == [] and tr.next_seq == 16


def test_prefix_filter_with_an_empty_chunk() -> None:
    tr = tracker(prefix="zz")
    batch(tr, 1, 1)
    batch(tr, 10, 10)
    (r,) = tr.actions()
    chunk(tr, r.rid, 2, 10, done=True, records=[])
    assert tr.next_seq == 11 and seqs(tr) == [] and tr.actions() == []


def test_stats() -> None:
    tr = tracker()
    batch(tr, 1, 1)
    batch(tr, 3, 3)
    st = tr.stats()
    assert st["next_seq"] == 2 and st["known_tail"] == 3 and st["gaps"] == 1 and st["ready"] == 1


# --- simulation -----------------------------------------------------------------------------

class FakeNode:
    """Serves replays from ``log`` following docs/protocol.md 2.5-2.8 (written for the
    test, independently of sequencer.replay)."""

    def __init__(self, log: list[Message], first_seq: int, p_busy: float, rnd: random.Random) -> None:
        self.log = log
        self.first_seq = first_seq                      # retention removed everything before
        self.p_busy = p_busy
        self.rnd = rnd
        self.sessions: dict[int, dict[str, Any]] = {}
        self.errors: list[tuple] = []
        self.requests: list[object] = []                # every action the tracker sent

    def seq_for_time(self, t: int, tail: int) -> int:
        return next((m.seq for m in self.log[self.first_seq - 1:tail] if m.time >= t), tail + 1)

    def handle(self, actions: list[object], tail: int) -> None:
        self.requests.extend(actions)
        for a in actions:
            if type(a) is ReplayRequest:
                if a.since is None:                     # a gap: exactly what is missing,
                    assert a.to_seq is not None and a.from_seq <= a.to_seq <= tail  # never open-ended
                start = max(a.from_seq, 1)
                if a.since is not None:
                    start = max(start, self.seq_for_time(a.since, tail))
                if self.rnd.random() < self.p_busy:
                    self.errors.append(("error", a.rid, "busy", None))
                elif self.first_seq > 1 and start < self.first_seq:
                    self.errors.append(("error", a.rid, "gone", self.first_seq))
                else:
                    self.sessions[a.rid] = dict(next=start, to=a.to_seq, topic=a.topic,
                                                credit=a.credit, max=a.max_records)
            elif type(a) is Credit:
                if a.rid in self.sessions:
                    s = self.sessions[a.rid]
                    s["credit"] = min(64, s["credit"] + a.credit)
            elif type(a) is Cancel:
                self.sessions.pop(a.rid, None)
            else:
                raise AssertionError(a)

    def serve(self, tail: int) -> list[tuple]:
        out = []
        for rid, s in list(self.sessions.items()):
            while s["credit"] > 0:
                limit = tail if s["to"] is None else min(s["to"], tail)
                start = s["next"]
                nxt = min(start + s["max"] - 1, limit) + 1 if start <= limit else start
                recs = [m for m in self.log[start - 1:nxt - 1] if m.topic.startswith(s["topic"])]
                done = nxt > limit
                s["next"] = nxt
                s["credit"] -= 1
                out.append(("chunk", rid, start, nxt, tail, done, recs))
                if done:
                    del self.sessions[rid]
                    break
        return out


def simulate(seed: int, gate: bool = False) -> dict[str, Any]:
    """``gate``: ask :meth:`Tracker.admits` before each live batch and hand it to
    :meth:`Tracker.take` only if admitted, as the plant's engine does (it skips
    decoding the rest); otherwise :meth:`Tracker.on_batch` does both."""
    rnd = random.Random(seed)
    n = rnd.randint(1, 400)
    log = [Message(s, 1, 1000 * s, "p", s, rnd.choice(["a/1", "b/2", "a/3"]), bytes([s % 256]))
           for s in range(1, n + 1)]
    prefix = rnd.choice(["", "a/", "b/"])
    tail = rnd.randint(0, n)                             # published before we subscribe
    first_seq = rnd.randint(1, tail + 1) if rnd.random() < 0.3 else 1   # retention
    kind = rnd.choice(["seq", "time", "now"])
    expect_start: int | None
    if kind == "seq":
        expect_start = rnd.randint(1, n)
        start = Start.at_seq(expect_start)
    elif kind == "time":
        t = rnd.randint(1000 * (first_seq - 1), 1000 * max(tail, first_seq - 1))
        expect_start = max(first_seq, -(-t // 1000))     # first retained record at or after t
        start = Start.at_time(t)
    else:
        expect_start = None
        start = Start.now()
    ready_limit = rnd.choice([16, 200, 65_536])
    rids = itertools.count(1)
    chunk_records = rnd.choice([1, 3, 8])
    # byte bounds: none, or near the least that works (twice a chunk's worth), or a
    # gap buffer too small for most batches
    per = wire_size(log[:1]) + MSG_OVERHEAD             # every message has the same size
    body = chunk_records * wire_size(log[:1])
    cb = chunk_bytes(chunk_records, body)
    tr = Tracker(start=start, prefix=prefix, new_rid=lambda: next(rids),
                 buffer_limit=rnd.choice([2, 20, 20_000]), ready_limit=ready_limit,
                 credit=rnd.randint(1, 4), chunk_records=chunk_records,
                 request_timeout=1.0, ready_bytes=rnd.choice([1 << 62, 2 * cb, 5 * cb]),
                 buffer_bytes=rnd.choice([1 << 62, 500, 5000]), chunk_body_bytes=body)
    node = FakeNode(log, first_seq, rnd.choice([0.0, 0.0, 0.2]), rnd)
    p_drop_live = rnd.choice([0.0, 0.1, 0.5])
    p_drop_chunk = rnd.choice([0.0, 0.02, 0.1])
    reorder = rnd.choice([0, 0, 3])
    live_q: list[tuple[int, int, int]] = []
    chunk_q: deque[tuple[int, tuple]] = deque()
    delivered: list[Message] = []
    consume_p = rnd.choice([0.1, 0.5, 1.0])

    def feed(step: int) -> None:
        node.handle(tr.actions(), tail)
        assert len(node.sessions) <= 1, "more than one replay in flight"
        replies, node.errors = node.errors + node.serve(tail), []
        for c in replies:
            if rnd.random() >= p_drop_chunk:
                at = max(step + rnd.randint(0, 2), chunk_q[-1][0] if chunk_q else 0)  # in order
                chunk_q.append((at, c))

    tr.tick(0.0)
    if expect_start is None and tail and rnd.random() < 0.5:
        tr.on_heartbeat(tail, 0.0)
        expect_start = tail + 1
    for step in range(60_000):
        now = step * 0.1
        if tail < n and rnd.random() < 0.5:              # the node publishes a batch
            first, tail = tail + 1, min(n, tail + rnd.randint(1, 6))
            if rnd.random() >= p_drop_live:
                live_q.append((step + rnd.randint(0, reorder), first, tail))
        due = [b for b in live_q if b[0] <= step]
        rnd.shuffle(due)
        for b in due:
            live_q.remove(b)
            if expect_start is None and tr.next_seq is None:
                expect_start = b[1]
            if not gate:
                tr.on_batch(b[1], b[2], log[b[1] - 1:b[2]], now)
            elif tr.admits(b[1], b[2], now, wire_size(log[b[1] - 1:b[2]])):  # the engine
                tr.take(b[1], b[2], log[b[1] - 1:b[2]], now)           # decodes only then
        if step % 5 == 0 and rnd.random() < 0.8:         # heartbeats (some lost too)
            if expect_start is None and tr.next_seq is None:
                expect_start = tail + 1
            tr.on_heartbeat(tail, now)
        feed(step)
        while chunk_q and chunk_q[0][0] <= step:
            what, *args = chunk_q.popleft()[1]
            if what == "chunk":
                tr.on_chunk(*args, now)
            else:
                tr.on_error(*args, now)
        tr.tick(now)
        # the byte bounds hold: the gap buffer's, and the ready queue's but for one
        # live batch (at most 6 records), one chunk (a request gets credit 1 even
        # when less than a chunk is free), and what the gap buffer held when the
        # gap was filled
        held = len(tr.ready) + sum(len(m) for _f, _l, m, _b in tr._buf)
        buf = min(tr.buffer_bytes_limit, tr.buffer_limit * per)
        assert held * per <= tr.ready_bytes_limit + buf + cb + 6 * per
        assert tr._buf_bytes <= tr.buffer_bytes_limit
        if tr.ready and rnd.random() < consume_p:
            for _ in range(rnd.randint(1, len(tr.ready))):
                delivered.append(tr.ready.popleft())
            tr.consumed(now)
        feed(step)
        if tail == n and tr.next_seq == n + 1 and not live_q and not chunk_q:
            break
    delivered.extend(tr.ready)
    assert expect_start is not None
    if kind == "time":
        assert tr.resolved_start == expect_start
    if kind == "seq":
        assert tr.lost_to_retention == max(0, first_seq - expect_start)
        expect_start = max(expect_start, first_seq)
    else:
        assert tr.lost_to_retention == 0
    expect = [m for m in log[expect_start - 1:] if m.topic.startswith(prefix)]
    assert [m.seq for m in delivered] == [m.seq for m in expect]
    assert delivered == expect
    assert tr.next_seq == n + 1
    return {**tr.stats(), "steps": step, "requests": node.requests}


@pytest.mark.parametrize("seed", range(60))
def test_simulation_delivers_exactly_the_filtered_log(seed: int) -> None:
    simulate(seed)


@pytest.mark.parametrize("seed", range(60))
def test_admits_gate_changes_nothing_but_the_decoding(seed: int) -> None:
    """The engine skips decoding a live batch that :meth:`Tracker.admits`
    refuses. Same seed, gated or not: the same deliveries (asserted inside),
    the same drops, gaps, replays and requests, step for step."""
    assert simulate(seed, gate=True) == simulate(seed)
