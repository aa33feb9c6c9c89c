"""What a standby does with bad replication from its peer: real node process,
the test plays the active node on the peer link with its own sockets.

Invariant 6 (DESIGN.md): bad input never kills a process and changes no state;
it is counted (``peer_rejected``) and logged.
"""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest
import zmq

from orbcast.envelope import encode_record
from sequencer import peer as peerlink
from tests.integration.conftest import free_port, wait_for

T = 1767225600123456789
FAKE_INGRESS = "tcp://127.0.0.1:1"


def rec(seq: int, pseq: int | None = None, *, body_seq: int | None = None) -> tuple[int, int, bytes]:
    """The replicated record ``seq``; ``body_seq`` puts another seq inside its body."""
    body = encode_record(body_seq or seq, 1, T + seq, "kitchen", pseq or seq, "sensors/t", b"21.5")
    return (seq, T + seq, body)


@pytest.fixture
def standby_and_fake_active(tmp_path: Path, node_factory):  # type: ignore[no-untyped-def]
    fake_ep = f"tcp://127.0.0.1:{free_port()}"
    b = node_factory("b")
    b.extra += ["--role", "standby", "--peer", b.peer, "--peer-connect", fake_ep]
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.ROUTER)          # the standby's heartbeats and acks arrive here
    inbox.setsockopt(zmq.LINGER, 0)
    inbox.bind(fake_ep)
    b.start()
    out = ctx.socket(zmq.DEALER)            # what "the active node" sends the standby
    out.setsockopt(zmq.LINGER, 0)
    out.connect(b.peer)
    def heard_as(role: str) -> None:
        hb = peerlink.PeerHeartbeat(epoch=1, last_seq=0, node="fake-a", role=role,
                                    ingress=FAKE_INGRESS, egress="tcp://127.0.0.1:2",
                                    in_sync=True, epochs=((1, 1),), time=T)

        def heard() -> bool:
            out.send_multipart(peerlink.encode_heartbeat(hb))
            return b.status()["ha"].get("peer_role") == role

        wait_for(heard, 20, f"the standby to hear its peer as {role}")

    b.heard_as = heard_as
    yield b, out
    out.close(0)
    inbox.close(0)
    ctx.term()


def test_a_standby_refuses_replicated_records_that_are_not_what_they_claim(
        standby_and_fake_active) -> None:  # type: ignore[no-untyped-def]
    b, out = standby_and_fake_active
    b.heard_as("active")
    assert b.status()["role"] == "standby"
    out.send_multipart(peerlink.encode_repl(1, [rec(1), rec(2), rec(3)]))
    wait_for(lambda: b.status()["log_last_seq"] == 3, 20, "records 1-3 to be replicated")
    good4 = rec(4)
    bad = {
        "a body with a byte after its record": [(4, T + 4, good4[2] + b"\x00")],
        "a body holding another seq": [rec(4, body_seq=5)],
        "a body that is not CBOR": [(4, T + 4, b"\xff\xfe")],
        "a body that is two records": [(4, T + 4, good4[2] + rec(5)[2])],
        "a body that is not a record": [(4, T + 4, cbor2.dumps([4, 1, 2]))],
        # the log refuses records whose times go backwards: the node must not die of it
        "times going backwards": [good4, (5, T + 3, rec(5)[2])],
        "a record older than the log's last": [(4, T + 1, good4[2])],
    }
    for what, records in bad.items():
        before = b.status()["counters"]["peer_rejected"]
        out.send_multipart(peerlink.encode_repl(1, records))
        wait_for(lambda before=before: b.status()["counters"]["peer_rejected"] == before + 1, 20,
                 f"the standby to reject {what}")
        st = b.status()
        assert st["log_last_seq"] == 3 and st["role"] == "standby", (what, st)
        assert b.proc is not None and b.proc.alive()
    out.send_multipart(peerlink.encode_repl(1, [good4, rec(5)]))      # and it goes on
    wait_for(lambda: b.status()["log_last_seq"] == 5, 20, "records 4-5 after the bad ones")
    b.stop()
    assert [s for s, _p, _ps in b.records()] == [1, 2, 3, 4, 5]


def test_a_heartbeat_with_an_impossible_history_is_refused(standby_and_fake_active) -> None:  # type: ignore[no-untyped-def]
    """A history whose epoch starts at seq 0 made the standby cut its log below seq 0,
    and the refusal of that ended the node; epochs out of order are as impossible."""
    b, out = standby_and_fake_active
    b.heard_as("active")
    out.send_multipart(peerlink.encode_repl(1, [rec(1), rec(2)]))
    wait_for(lambda: b.status()["log_last_seq"] == 2, 20, "records 1-2 to be replicated")
    for epochs in (((1, 1), (2, 0)), ((2, 3), (1, 1)), ((0, 1),)):
        hb = peerlink.PeerHeartbeat(epoch=2, last_seq=2, node="fake-a", role="active",
                                    ingress=FAKE_INGRESS, egress="tcp://127.0.0.1:2",
                                    in_sync=True, epochs=epochs, time=T)
        before = b.status()["counters"]["peer_rejected"]
        out.send_multipart(peerlink.encode_heartbeat(hb))
        wait_for(lambda before=before: b.status()["counters"]["peer_rejected"] == before + 1, 20,
                 f"the standby to reject the history {epochs}")
        st = b.status()
        assert st["log_last_seq"] == 2 and st["counters"]["tail_records_set_aside"] == 0
        assert b.proc is not None and b.proc.alive()


def test_frames_that_are_not_peer_messages_are_counted_and_ignored(
        standby_and_fake_active) -> None:  # type: ignore[no-untyped-def]
    b, out = standby_and_fake_active
    b.heard_as("active")
    head, body = peerlink.encode_ack(1, 0)
    for frames in ([b"garbage"], [head, body + b"\x00"], [head + b"\x00", body],
                   [cbor2.dumps([True, peerlink.REPL_ACK, 1, 0]), body], [head, b"\x80"]):
        before = b.status()["counters"]["peer_rejected"]
        out.send_multipart(frames)
        wait_for(lambda before=before: b.status()["counters"]["peer_rejected"] == before + 1, 20,
                 f"the standby to reject {frames!r:.60}")
    assert b.status()["role"] == "standby" and b.proc is not None and b.proc.alive()


def test_a_node_that_is_not_active_names_what_its_peer_is(standby_and_fake_active) -> None:  # type: ignore[no-untyped-def]
    """``not-active`` calls the peer the active node only when the peer says so."""
    from orbcast.envelope import Error, Publish
    from orbcast.rpc import request
    b, _out = standby_and_fake_active
    for role, tail in (("primary", f"its peer at {FAKE_INGRESS} is not active either (it reports 'primary')"),
                       ("active", f"the active node is at {FAKE_INGRESS}")):
        b.heard_as(role)
        r = request(b.ingress, Publish(rid=8, producer="p", items=((1, "t", b"x"),)))
        assert type(r) is Error and r.code == "not-active", r
        assert r.message.endswith(tail), r.message
    assert b.status()["log_last_seq"] == 0


def test_a_standby_that_joins_late_knows_which_producers_it_cannot_vouch_for(
        standby_and_fake_active) -> None:  # type: ignore[no-untyped-def]
    """A standby that starts empty while the active node's log begins at seq 101
    (retention ran there) copies history from the middle: its dedup table knows the
    records from 101 on, and the producers of records sequenced before it started may
    have older pairs (partial, protocol.md 5.2). Its snapshot says so."""
    from sequencer.core import DedupTable
    b, out = standby_and_fake_active
    b.heard_as("active")
    out.send_multipart(peerlink.encode_repl(1, [rec(101), rec(102)]))
    wait_for(lambda: b.status()["log_last_seq"] == 102, 20, "records 101-102 to be replicated")
    b.stop()
    table, covered = DedupTable.restore((b.data / "dedup.snapshot").read_bytes())
    assert covered == 102 and table.known_from == 101 and table.partial == {"kitchen"}
    assert table.lookup("kitchen", 101) == 101
