"""Single-node end to end (issue 2): real sequencer and plant processes on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.invariants import check, check_log
from tests.integration.conftest import plant_proc, read_out, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("security", ["none", "ratchet"], indirect=True)
def test_two_publishers_two_consumers_identical_gap_free(tmp_path: Path, procs: list, node_factory,
                                                         security: str) -> None:
    """2 plants publish 20,000 messages each while 2 plants consume: both
    consumers deliver the identical gap-free sequence, matching every ack
    (with link security off, and on: every link ratcheted, egress signed)."""
    node = node_factory().start()
    n_each = 20_000
    consumers = [plant_proc(tmp_path, procs, "consumer", f"c{i}", node, "--count", str(2 * n_each),
                            "--start", "1") for i in range(2)]
    pubs = [plant_proc(tmp_path, procs, "publisher", f"p{i}", node, "--count", str(n_each))
            for i in range(2)]
    for p in pubs:
        assert p.wait(240) == 0, p.output()[-2000:]
    for c in consumers:
        assert c.wait(240) == 0, c.output()[-2000:]
    acks = {}
    for i in range(2):
        out = read_out(tmp_path / f"p{i}.out")
        assert out["F"], f"publisher p{i} did not finish"
        assert len(out["K"]) == n_each
        acks.update({(f"p{i}", ps): s for ps, s in out["K"]})
    deliveries = {f"c{i}": read_out(tmp_path / f"c{i}.out")["D"] for i in range(2)}
    rep = check(deliveries, acks, start=1)
    assert rep.last_seq == 2 * n_each
    assert deliveries["c0"] == deliveries["c1"]
    st = node.status()
    assert st["security"] == security
    if security == "ratchet":     # really sealed: both consumers were handed the sender key
        assert st["counters"]["sender_keys_sent"] >= 2 and st["counters"]["auth_rejected"] == 0
    node.stop()
    check_log(node.records(), acks)


@pytest.mark.parametrize("security", ["none", "ratchet"], indirect=True)
def test_kill9_sequencer_while_publishing(tmp_path: Path, procs: list, node_factory, security: str) -> None:
    """kill -9 the sequencer mid-stream and restart it on the same data dir:
    every acked message is in the log exactly once, seqs continue with no gap,
    and the plants' resends are deduplicated."""
    from tests.integration.conftest import wait_for
    node = node_factory().start()
    n_each = 15_000
    pubs = [plant_proc(tmp_path, procs, "publisher", f"p{i}", node, "--count", str(n_each),
                       "--batch", "128") for i in range(2)]
    wait_for(lambda: len(read_out(tmp_path / "p0.out")["K"]) > 2000, 60, "acks before the kill")
    node.kill9()
    before = {i: len(read_out(tmp_path / f"p{i}.out")["K"]) for i in range(2)}
    node.start()
    for p in pubs:
        assert p.wait(240) == 0, p.output()[-2000:]
    acks = {}
    accepted = []
    for i in range(2):
        out = read_out(tmp_path / f"p{i}.out")
        assert out["F"], f"publisher p{i} did not finish"
        acks.update({(f"p{i}", ps): s for ps, s in out["K"]})
        accepted += [(f"p{i}", ps) for ps in out["A"]]
    assert len(acks) == 2 * n_each
    assert any(before[i] < n_each for i in range(2)), "the kill came after everything was acked"
    node.stop()
    where = check_log(node.records(), acks, accepted)
    assert len(where) == 2 * n_each     # nothing sequenced twice, nothing extra


def test_torn_log_tail_at_random_offsets(tmp_path: Path, procs: list, node_factory) -> None:
    """Truncate the newest segment at many random byte offsets: the sequencer
    opens, keeps every complete record, and serves replay of all of them."""
    import random
    import shutil
    from orbcast.config import PlantConfig
    from plant.client import Plant

    node = node_factory("orig").start()
    out = plant_proc(tmp_path, procs, "publisher", "p0", node, "--count", "600", "--batch", "50")
    assert out.wait(120) == 0
    node.stop()
    seg = sorted((node.data / "log").glob("*.seg"))[-1]
    size = seg.stat().st_size
    full = node.records()
    assert len(full) == 600
    assert len(list((node.data / "log").glob("*.seg"))) == 1, "test assumes one segment (no UTC midnight)"
    rng = random.Random(20261125)
    offsets = sorted(rng.sample(range(17, size), 10)) + [size - 1, 16]
    for k, off in enumerate(offsets):
        n = node_factory(f"cut{k}")
        shutil.copytree(node.data, n.data)
        with open(sorted((n.data / "log").glob("*.seg"))[-1], "r+b") as fh:
            fh.truncate(off)
        # what the cut leaves complete, computed independently from the file
        complete = [s for s, end in record_ends(seg) if end <= off]
        n.start()
        cfg = PlantConfig(sequencers=[n.ingress], producer_id=f"r{k}", data=str(tmp_path / f"r{k}"))
        with Plant(cfg, outbox=False) as p:
            got = [m.seq for m in p.replay(1)]
        assert got == complete, f"offset {off}: replay returned {len(got)} records, expected {len(complete)}"
        assert got == list(range(1, len(got) + 1))
        n.stop()
        assert [r[0] for r in n.records()] == complete
        if off not in {16} | {end for _s, end in record_ends(seg)}:   # cut inside a record
            assert list((n.data / "log" / "aside").glob("*")), "the cut tail was not set aside"


def record_ends(seg: Path) -> list[tuple[int, int]]:
    """(seq, end offset) of every record in a segment, parsed straight from the
    documented byte format (docs/protocol.md), independently of LogStore."""
    import struct
    data = seg.read_bytes()
    pos, out = 16, []
    while pos + 24 <= len(data):
        length, _crc, seq, _t = struct.unpack_from(">IIQQ", data, pos)
        pos += 24 + length
        out.append((seq, pos))
    return out


def test_garbage_and_oversized_frames_get_errors_and_node_keeps_serving(
        tmp_path: Path, procs: list, node_factory) -> None:
    """Garbage and oversized frames on ingress get an ERROR reply each, are
    counted, and the sequencer keeps serving the other plants."""
    import cbor2
    import zmq
    from orbcast import envelope as env
    from orbcast.config import PlantConfig
    from orbcast.rpc import request
    from plant.client import Plant

    node = node_factory().start()
    big = b"\x5a" + (2 << 20).to_bytes(4, "big") + b"x" * (2 << 20)
    bad = [
        ([b"\xff\xfe garbage"], "bad-frame"),
        ([b"a", b"b", b"c"], "bad-frame"),
        ([b"\x83\x01", b"\xa0"], "bad-frame"),                         # truncated head
        ([cbor2.dumps([2, 1, 5]), cbor2.dumps({})], "version"),
        ([cbor2.dumps([1, 99, 5]), cbor2.dumps({})], "unknown-kind"),
        ([cbor2.dumps([1, 2, 7]), b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff"], "bad-frame"),
        ([cbor2.dumps([1, 2, 8]), cbor2.dumps(["p", [[1, 5, b"x"]]])], "bad-frame"),   # topic int
        ([cbor2.dumps([1, 2, 9]), cbor2.dumps(["p", [[1, "t", "str"]]])], "bad-frame"),
        ([cbor2.dumps([1, 2, 10]), cbor2.dumps(["p", [[-1, "t", b"x"]]])], "bad-frame"),
        ([cbor2.dumps([1, 2, 11]), big], "too-large"),
        ([cbor2.dumps([1, 2, 12]), cbor2.dumps(["p", [[1, "t", b"x" * (300 * 1024)]]])], "too-large"),
        ([cbor2.dumps([1, 17, 13, 1]), cbor2.dumps([])], "unexpected"),   # an ACK sent to the node
    ]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(node.ingress)
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="good", data=str(tmp_path / "good"))
    try:
        with Plant(cfg) as good:
            for i, (frames, code) in enumerate(bad):
                s.send_multipart(frames)
                assert s.poll(5000), f"no reply to bad input #{i}"
                reply = env.decode(s.recv_multipart())
                assert isinstance(reply, env.Error), f"#{i}: {reply}"
                assert reply.code == code, f"#{i}: expected {code}, got {reply.code}: {reply.message}"
                assert good.publish("ok/t", f"m{i}".encode(), timeout=10) == i + 1
        st = request(node.ingress, env.StatusRequest(rid=1)).info
        assert st["counters"]["rejected_frames"] == len(bad)
        assert st["last_seq"] == len(bad)
        assert node.proc.alive()
    finally:
        s.close(0)
        ctx.term()


@pytest.mark.parametrize("outbox", [True, False])
def test_flush_returns_only_when_everything_is_acked(tmp_path: Path, procs: list, node_factory,
                                                     outbox: bool) -> None:
    """flush() must not return while the engine holds tickets between its
    queue and the outbox (a race the benchmark found)."""
    from orbcast.config import PlantConfig
    from plant.client import Plant
    node = node_factory().start()
    cfg = PlantConfig(sequencers=[node.ingress], producer_id=f"f{int(outbox)}",
                      data=str(tmp_path / "pl"), outbox_max_count=5000)
    with Plant(cfg, outbox=outbox, on_full="block") as p:
        for rnd in range(3):
            tickets = [p.publish_nowait("t/f", b"x" * 64) for _ in range(12_000)]
            p.flush(60)
            assert all(t.done() for t in tickets), f"round {rnd}: flush returned early"
            assert p.outbox_depth == 0
    seqs = [t.seq for t in tickets]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_get_many_is_the_stream_get_gives(tmp_path: Path, node_factory) -> None:
    """get_many() hands out the same in-order, exactly-once stream as get(), in
    lists of at most max_count, and with a checkpoint and auto_ack the whole
    list counts as processed at the next call."""
    from orbcast.config import PlantConfig
    from plant.client import Plant
    node = node_factory().start()
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="gm", data=str(tmp_path / "pl"))
    n = 5000
    with Plant(cfg, outbox=False) as p:
        tickets = [p.publish_nowait("t/gm", i.to_bytes(4, "big")) for i in range(n)]
        p.flush(60)
        sub = p.subscribe("", start=1, checkpoint="gm", to_seq=n)
        got = []
        while True:
            ms = sub.get_many(700, timeout=30)
            if not ms:
                break
            assert 1 <= len(ms) <= 700
            got += ms
        assert [m.seq for m in got] == list(range(1, n + 1))
        assert [m.payload for m in got] == [i.to_bytes(4, "big") for i in range(n)]
        assert [t.seq for t in tickets] == [m.seq for m in got]
        assert sub.position == n and sub.delivered == n
        with pytest.raises(ValueError):
            sub.get_many(0)
        sub.close()
        sub2 = p.subscribe("", checkpoint="gm", to_seq=n)    # resumes after the last list
        assert sub2.get_many(10, timeout=10) == []


def test_a_wake_between_the_engines_read_and_clear_is_not_lost(tmp_path: Path, node_factory,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The application wakes the engine (an eventfd plus a flag that saves
    redundant writes). A wake landing in the middle of the engine consuming
    the previous one must leave the pair consistent; the fault is injected at
    exactly that point. Had the read swallowed the wake, the flag would stay
    set with nothing to read and every later wake would be skipped for good
    (the engine then only noticed new work on its timer)."""
    import os

    from orbcast.config import PlantConfig
    from plant.client import Plant
    node = node_factory().start()
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="wake", data=str(tmp_path / "pl"))
    with Plant(cfg) as p:
        p.node_info(timeout=20)
        real_read = os.eventfd_read
        raced = []

        def racing_read(fd: int) -> int:
            if fd == p._wake_fd and not raced:
                raced.append(True)
                p._wake()                 # the application thread, at the worst moment
            return real_read(fd)

        monkeypatch.setattr(os, "eventfd_read", racing_read)
        assert p.publish("t/wake", b"1", timeout=20) == 1
        assert raced
        assert p.publish("t/wake", b"2", timeout=20) == 2
        # nothing is queued and nothing woke the engine since: the flag must be
        # clear (or a write pending), else the next wake would be skipped
        assert not p._woken or _readable(p._wake_fd)


def _readable(fd: int) -> bool:
    import select
    return bool(select.select([fd], [], [], 0)[0])


def test_a_subscriber_that_stops_reading_costs_the_node_a_bounded_amount(
        tmp_path: Path, procs: list, node_factory) -> None:
    """A plant that freezes (SIGSTOP, an overloaded Pi) stops reading egress.
    ZeroMQ queues for it until ``egress_hwm`` batches of at most
    ``MAX_EGRESS_BATCH_BYTES``, then drops for it alone (DESIGN.md invariant 5).
    Batches of up to 1 MiB under a 10,000-message limit let such a subscriber
    hold gigabytes: the node grew by ~70 MB/s at 1 KiB messages. A consumer
    that keeps reading still gets every message, in order."""
    import zmq

    from orbcast.config import PlantConfig, SequencerConfig
    from plant.client import Plant
    from sequencer.core import MAX_EGRESS_BATCH_BYTES
    node = node_factory().start()
    ctx = zmq.Context()
    frozen = ctx.socket(zmq.SUB)
    frozen.setsockopt(zmq.LINGER, 0)
    frozen.setsockopt(zmq.RCVHWM, 1)
    frozen.setsockopt(zmq.RCVBUF, 1 << 16)
    frozen.setsockopt(zmq.SUBSCRIBE, b"")
    frozen.connect(node.egress)
    assert frozen.poll(10_000), "no heartbeat on egress"
    frozen.recv()                              # connected; from now on it never reads
    n = 250_000                                # 250 MB of payload through the node
    cons = plant_proc(tmp_path, procs, "consumer", "c", node, "--count", str(n), "--start", "1")
    payload = bytes(1024)
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="p", data=str(tmp_path / "pl"))
    acks = {}
    with Plant(cfg, outbox=False) as p:
        for start in range(0, n, 5000):
            ts = [p.publish_nowait("t/a", payload) for _ in range(5000)]
            p.flush(120)
            acks.update({("p", t.wait_accepted(10)): t.result(10) for t in ts})
    assert cons.wait(120) == 0, cons.output()[-3000:]
    check({"c": read_out(tmp_path / "c.out")["D"]}, acks, start=1)
    hwm_mb = node.mem_kb()["VmHWM"] / 1024
    # what the frozen subscriber may hold, by the defaults: 64 MB; with the node's
    # own ~30 MB and as much again for the live consumer's queue if it lags, 200 MB
    # (with the old limits the node peaked at 298 MB in this test; ~90 MB now)
    assert SequencerConfig().egress_hwm * MAX_EGRESS_BATCH_BYTES <= 64 << 20
    assert hwm_mb < 200, f"node peak RSS {hwm_mb:.0f} MB"
    frozen.close(0)
    ctx.term()


def test_a_sender_that_ignores_acks_is_held_back_not_buffered(tmp_path: Path, node_factory) -> None:
    """A client that pipelines PUBLISH frames without waiting for acks (a buggy
    client; a plant keeps at most 16 frames in flight) is read only as fast as
    the node sequences: ZeroMQ queues at most INGRESS_HWM frames for its
    connection and TCP pushes back on the rest. With 10,000 frames allowed the
    node held 3.4 GB after 15 s of such a flood. Meanwhile a well-behaved plant
    still gets its messages acked."""
    import zmq

    from orbcast.config import PlantConfig
    from orbcast.envelope import Publish, encode
    from plant.client import Plant
    node = node_factory().start()
    ctx = zmq.Context()
    flood = ctx.socket(zmq.DEALER)
    flood.setsockopt(zmq.LINGER, 0)
    flood.setsockopt(zmq.SNDHWM, 0)           # the test process buffers, not the node
    flood.connect(node.ingress)
    payload = bytes(1000)
    frames = 400                              # 200 MB of new messages, as fast as ZeroMQ takes them
    for f in range(frames):
        items = tuple((f * 500 + i + 1, "t/flood", payload) for i in range(500))
        flood.send_multipart(encode(Publish(rid=f + 1, producer="flood", items=items)))
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="good", data=str(tmp_path / "pl"))
    with Plant(cfg, outbox=False) as p:
        seq = p.publish("t/good", b"hello", timeout=60)
    assert seq > 0
    wait_for(lambda: node.status()["last_seq"] >= frames * 500 + 1, 120,
             "the flood to be sequenced")
    hwm_mb = node.mem_kb()["VmHWM"] / 1024
    # 64 frames of 0.5 MB queued, the node's own ~30 MB, a turn's records and batches
    assert hwm_mb < 150, f"node peak RSS {hwm_mb:.0f} MB"
    flood.close(0)
    ctx.term()


def test_a_full_disk_stops_the_node_and_after_a_restart_every_message_is_sequenced_once(
        tmp_path: Path, procs: list, node_factory) -> None:
    """The log write fails (ENOSPC, injected): the node stops (exit 3) with the
    records of that turn assigned but never written. Its clean stop used to
    save those pairs in the dedup snapshot, so after the restart every resend
    was taken for a duplicate of a record that does not exist: never acked,
    and had the acks gone out, they would have named seqs the log then gave to
    other messages. Now every message is in the log once, under the seq its
    ack names."""
    from orbcast.envelope import Admin
    from orbcast.rpc import request
    node = node_factory(env={"ORBCAST_SEQUENCER_FAULTS": "1"}).start()
    pub = plant_proc(tmp_path, procs, "publisher", "p", node, "--count", "6000", "--batch", "200",
                     "--rate", "4000")
    wait_for(lambda: len(read_out(tmp_path / "p.out")["K"]) >= 1000, 60, "acks before the fault")
    request(node.ingress, Admin(rid=1, command="fault-disk-full", arg=1))
    assert node.proc is not None
    assert node.proc.wait(30) == 3, node.proc.output()[-2000:]
    assert "No space left on device" in node.proc.output()
    node.env.pop("ORBCAST_SEQUENCER_FAULTS")
    node.start()
    assert pub.wait(120) == 0, pub.output()[-3000:]
    acks = {("p", ps): s for ps, s in read_out(tmp_path / "p.out")["K"]}
    assert len(acks) == 6000
    node.stop()
    assert len(check_log(node.records(), acks)) == 6000


def test_a_subscription_holds_at_most_ready_limit_messages_for_its_application(
        tmp_path: Path, node_factory) -> None:
    """An application that stops taking messages: the plant keeps about
    ``ready_limit`` of them waiting -- at most one more live batch, here of 500 --
    (the rest is dropped and fetched again by replay), and when the application
    reads again it gets every message, in order."""
    from orbcast.config import PlantConfig
    from plant.client import Plant
    node = node_factory().start()
    n = 6000
    pub_cfg = PlantConfig(sequencers=[node.ingress], producer_id="p", data=str(tmp_path / "p"))
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="c", data=str(tmp_path / "c"),
                      ready_limit=200, replay_chunk_records=100)
    with Plant(cfg, outbox=False) as c, Plant(pub_cfg, outbox=False) as p:
        sub = c.subscribe("", start=1)
        for _ in range(n // 500):
            for i in range(500):
                p.publish_nowait("t/r", b"%d" % i)
            p.flush(60)
        wait_for(lambda: sub.tracker.stats()["known_tail"] >= n, 30, "the plant to see the tail")
        assert len(sub.tracker.ready) <= 200 + 500
        got = [m.seq for m in sub.get_many(n, timeout=30)]
        while len(got) < n:
            ms = sub.get_many(n, timeout=30)
            assert ms, f"stalled at {len(got)}"
            got += [m.seq for m in ms]
            assert len(sub.tracker.ready) <= 200 + 500
        assert got == list(range(1, n + 1))


def test_a_subscription_of_large_messages_is_bounded_in_bytes_not_only_in_count(
        tmp_path: Path, node_factory) -> None:
    """Large messages and an application that stops taking them: a count bound of
    65,536 would hold all 400 messages of 100 KiB here (40 MB; on a Pi with 256 KiB
    payloads, 16 GiB); ``ready_bytes`` keeps what waits to its bound plus one live
    batch and the replay chunks already granted, and the application still gets
    every message, in order, when it reads again."""
    from orbcast.config import PlantConfig
    from orbcast.envelope import MAX_BODY_BYTES, chunk_bytes
    from plant.client import Plant
    node = node_factory().start()
    n, size = 400, 100 * 1024
    bound = 3 << 20
    pub_cfg = PlantConfig(sequencers=[node.ingress], producer_id="p", data=str(tmp_path / "p"))
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="c", data=str(tmp_path / "c"),
                      replay_chunk_records=100, ready_bytes=bound, gap_buffer_bytes=1 << 20)
    # held at most: the bound, one live batch, the granted chunks, the gap buffer
    most = (bound + MAX_BODY_BYTES + cfg.replay_credit * chunk_bytes(100)
            + cfg.gap_buffer_bytes) // size
    assert most < n // 3
    with Plant(cfg, outbox=False) as c, Plant(pub_cfg, outbox=False, on_full="block") as p:
        sub = c.subscribe("", start=1)
        for i in range(n):                 # 40 MB: more than the publisher's outbox holds
            p.publish_nowait("t/big", b"%08d" % i + b"x" * (size - 8))
        p.flush(60)
        wait_for(lambda: sub.tracker.stats()["known_tail"] >= n, 30, "the plant to see the tail")
        assert len(sub.tracker.ready) <= most
        got: list[int] = []
        while len(got) < n:
            ms = sub.get_many(16, timeout=30)
            assert ms, f"stalled at {len(got)}"
            got += [m.seq for m in ms]
            assert all(m.payload[:8] == b"%08d" % (m.seq - 1) for m in ms)
            assert len(sub.tracker.ready) <= most
        assert got == list(range(1, n + 1))
        assert sub.tracker.stats()["dropped_live"] > 0      # the bound did drop live batches


def test_a_resend_retention_may_have_removed_is_refused_and_fails_only_its_message(
        tmp_path: Path, node_factory) -> None:
    """Dedup has no time window, but retention removes records: when the node's table
    was rebuilt from what retention left, a pair older than the table and the log
    cannot be told from a message never sequenced, and sequencing it again could
    duplicate it. The node refuses it (ERROR too-old,
    counted, nothing changed), acks a resend still in its log with the original seq,
    and a plant fails just the refused message (here: a plant whose data directory
    was wiped, so its producer seqs start again at 1) and goes on."""
    import time

    import zmq

    from orbcast import envelope as env
    from orbcast.config import PlantConfig
    from orbcast.errors import RemoteProtocolError
    from orbcast.rpc import request
    from plant.client import Plant
    from sequencer.log import NS_PER_DAY, LogStore

    node = node_factory()
    now = time.time_ns()
    old = now - 30 * NS_PER_DAY                       # retention (7 days) removes this day
    with LogStore(node.data / "log", now_ns=old, fsync=False) as log:
        log.append([(s, old, env.encode_record(s, 1, old, "p", s, "t", b"old"))
                    for s in range(1, 101)])
        log.append([(s, now, env.encode_record(s, 1, now, "p", s, "t", b"new"))
                    for s in range(101, 151)])
    # retention removed the old day while nothing remembered its pairs (a node of an
    # older version, or one whose dedup snapshot was lost): a node now snapshots first
    LogStore(node.data / "log", fsync=False).close()
    node.start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(node.ingress)

    def publish(rid: int, *pseqs: int) -> object:
        s.send_multipart(env.encode(env.Publish(rid=rid, producer="p",
                                                items=tuple((ps, "t", b"x") for ps in pseqs))))
        assert s.poll(10_000), f"no answer to rid {rid}"
        return env.decode(s.recv_multipart())

    try:
        refused = publish(5, 50)
        assert isinstance(refused, env.Error) and (refused.rid, refused.code) == (5, "too-old")
        refused = publish(6, 151, 40)                    # refused as a whole: 151 not taken
        assert isinstance(refused, env.Error) and (refused.rid, refused.code) == (6, "too-old")
        ack = publish(7, 120)                            # still in the log: the original seq
        assert isinstance(ack, env.Ack) and list(ack.pairs) == [120, 120]
        # producer_seqs 1..151 in one frame: refused as a whole, then one per frame
        cfg = PlantConfig(sequencers=[node.ingress], producer_id="p", data=str(tmp_path / "wiped"))
        with Plant(cfg) as p:
            tickets = [p.publish_nowait("t", b"after the wipe %d" % i) for i in range(1, 152)]
            p.flush(60)
            for t in tickets[:100]:                      # may be on the removed day: refused
                assert isinstance(t.error, RemoteProtocolError) and t.error.code == "too-old"
            # 101..150 are in the log: the node takes them for resends (reusing producer
            # seqs is what a plant MUST NOT do, protocol.md 5.2); 151 is new
            assert [t.seq for t in tickets[100:]] == list(range(101, 152))
            assert p.outbox_depth == 0                   # failed, not resent for ever
        st = request(node.ingress, env.StatusRequest(rid=1)).info
        assert st["last_seq"] == 151                     # nothing was sequenced twice
        assert st["counters"]["dedup_too_old"] == 2 + 1 + 100   # the frame, then each alone
        assert st["counters"]["rejected_frames"] == 0
        assert st["counters"]["dedup_log_lookups"] == 0  # answered without reading the log
        assert node.proc is not None and node.proc.alive()
    finally:
        s.close(0)
        ctx.term()
    node.stop()
    assert [r[2] for r in node.records()] == list(range(101, 152))


# --- the plant CLI against a real node (README "CLI reference") --------------------------------


def _plant_cli(tmp_path: Path, *args: str, stdin: bytes | None = None,
               timeout: float = 60):  # type: ignore[no-untyped-def]
    """``python -m plant ARGS`` with a private data dir; the run is bounded by ``timeout``."""
    import os
    import subprocess
    from tests.integration.conftest import PY, ROOT
    cmd, rest = args[0], list(args[1:])
    return subprocess.run([PY, "-m", "plant", cmd, "--data", str(tmp_path / "cli"), *rest],
                          input=stdin, capture_output=True, timeout=timeout, cwd=ROOT, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _publish(node, tmp_path: Path, payloads: list[bytes]) -> list[int]:
    from orbcast.config import PlantConfig
    from plant.client import Plant
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="pub", data=str(tmp_path / "pub"))
    with Plant(cfg, outbox=False) as p:
        return [p.publish("t/cli", b, timeout=30) for b in payloads]   # one batch each


def _jsonl(data: bytes) -> list[dict]:
    import json
    return [json.loads(ln) for ln in data.decode().splitlines()]


def test_cli_replay_output_is_replaced_only_by_a_complete_replay(tmp_path: Path,
                                                                 node_factory) -> None:
    """``replay --output FILE`` used to truncate FILE before connecting: a
    replay that failed left it empty. Now FILE changes only when the replay is
    complete (keeping FILE's permission bits), and no temp file stays behind."""
    from tests.integration.conftest import free_port
    node = node_factory().start()
    assert _publish(node, tmp_path, [b"a", b"b", b"c"]) == [1, 2, 3]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "keep.jsonl"
    out.write_bytes(b'{"seq":7}\n')
    out.chmod(0o640)
    r = _plant_cli(tmp_path, "replay", "--sequencer", f"tcp://127.0.0.1:{free_port()}",
                   "--timeout", "2", "--output", str(out))
    assert r.returncode == 1 and b"did not answer" in r.stderr, r.stderr
    assert out.read_bytes() == b'{"seq":7}\n'
    assert [p.name for p in out_dir.iterdir()] == ["keep.jsonl"]
    r = _plant_cli(tmp_path, "replay", "--sequencer", node.ingress, "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert [d["seq"] for d in _jsonl(out.read_bytes())] == [1, 2, 3]
    assert out.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in out_dir.iterdir()] == ["keep.jsonl"]


def test_cli_time_bounds_copied_from_its_own_output_are_exact(tmp_path: Path,
                                                              node_factory) -> None:
    """A ``time`` from jsonl output given back to --since / --until is an exact
    boundary, to the ns (it used to be cut to the microsecond), also with a
    lower-case t/z or as an offset time."""
    import datetime as dt
    node = node_factory().start()
    _publish(node, tmp_path, [b"m%d" % i for i in range(5)])
    r = _plant_cli(tmp_path, "replay", "--sequencer", node.ingress)
    assert r.returncode == 0, r.stderr
    recs = _jsonl(r.stdout)

    def ns(text: str) -> int:          # "2026-11-25T18:37:17.129491179Z"
        whole = dt.datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
        return int(whole.timestamp()) * 1_000_000_000 + int(text[20:29])

    def text(t: int, offset_h: int = 0) -> str:
        tz = dt.timezone(dt.timedelta(hours=offset_h))
        whole = dt.datetime.fromtimestamp(t // 1_000_000_000, tz).strftime("%Y-%m-%dT%H:%M:%S")
        zone = "Z" if offset_h == 0 else f"+{offset_h:02d}:00"
        return f"{whole}.{t % 1_000_000_000:09d}{zone}"

    times = [(d["seq"], ns(d["time"])) for d in recs]
    assert [text(t) for _s, t in times] == [d["time"] for d in recs]      # the helpers agree
    t3 = times[2][1]
    for option, bound, shown in [("--since", t3, text(t3)),
                                 ("--since", t3 + 1, text(t3 + 1).lower()),
                                 ("--until", t3, text(t3, 2)),
                                 ("--until", t3 + 1, text(t3 + 1))]:
        r = _plant_cli(tmp_path, "replay", "--sequencer", node.ingress, option, shown)
        assert r.returncode == 0, r.stderr
        want = [s for s, t in times if (t >= bound if option == "--since" else t < bound)]
        assert [d["seq"] for d in _jsonl(r.stdout)] == want, (option, shown, times)


def test_cli_publish_stdin_stops_at_a_bad_line_and_says_what_was_published(
        tmp_path: Path, node_factory) -> None:
    """A line that cannot be a message (over the payload limit, not UTF-8): the
    seqs of the lines before it are printed, the error names the line and says
    it and the rest were not published (it used to print only the error)."""
    node = node_factory().start()
    args = ("publish", "--sequencer", node.ingress, "--producer-id", "stdin", "--stdin", "t/in")
    r = _plant_cli(tmp_path, *args, stdin=b"one\ntwo\n" + b"x" * 300_000 + b"\nthree\n")
    assert r.returncode == 1
    assert r.stdout.split() == [b"1", b"2"]
    err = r.stderr.decode()
    assert "input line 3: longer than 262144 bytes" in err, err
    assert "lines 1-2 were published" in err and "line 3 and every line after it were not" in err
    r = _plant_cli(tmp_path, *args, stdin=b"four\n\xff\xfe\nfive\n")
    assert r.returncode == 1 and r.stdout.split() == [b"3"]
    err = r.stderr.decode()
    assert "input line 2: not valid UTF-8 (byte 0xff at offset 0)" in err, err
    r = _plant_cli(tmp_path, "replay", "--sequencer", node.ingress, "--format", "text")
    assert [ln.split()[-1] for ln in r.stdout.decode().splitlines()] == ["one", "two", "four"]


def test_cli_tail_says_when_no_node_answers_and_keeps_waiting(tmp_path: Path, node_factory,
                                                              procs: list) -> None:
    """``plant tail`` at an endpoint where no node answers (none started yet, or
    a node's egress given by mistake) says so on stderr after a few seconds,
    keeps trying, and delivers once the node is there."""
    import functools
    from tests.integration.conftest import PY, Proc
    up = node_factory("up").start()
    later = node_factory("later")                   # its ports are chosen; not started yet

    def tail(name: str, ep: str, *extra: str) -> Proc:
        p = Proc([PY, "-m", "plant", "tail", "--sequencer", ep, "--data", str(tmp_path / name),
                  "--format", "jsonl", *extra], tmp_path / f"{name}.log").start()
        procs.append(p)
        return p

    wrong = tail("wrong", up.egress)
    waiting = tail("waiting", later.ingress, "--from", "1", "--count", "1")
    def noticed(p: Proc, ep: str) -> bool:
        return f"plant: no answer from {ep} yet; still trying" in p.output()

    for p, ep in ((wrong, up.egress), (waiting, later.ingress)):
        wait_for(functools.partial(noticed, p, ep), 30, f"the notice of the tail at {ep}")
        assert p.alive(), p.output()
    later.start()
    assert _publish(later, tmp_path, [b"at last"]) == [1]
    assert waiting.wait(60) == 0, waiting.output()
    out = waiting.output()
    assert '"seq":1' in out and "plant: a node answers now" in out
    assert out.count("no answer from") == 1                     # said once, not every second
    assert wrong.alive()
    wrong.kill9()


def test_cli_status_shows_damaged_checkpoints_and_an_unknown_lag(tmp_path: Path,
                                                                 node_factory) -> None:
    """One damaged checkpoint used to make ``plant status`` print only an
    error; with no node answering every lag was 0. Now the damaged one is
    shown as damaged with the rest, and the lag is unknown without a node."""
    import json
    from plant.checkpoint import CheckpointStore
    from tests.integration.conftest import free_port
    store = CheckpointStore(tmp_path / "cli" / "checkpoints")
    store.save("good", 1)
    (store.directory / "bad.ckpt").write_bytes(b"garbage\n")
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    r = _plant_cli(tmp_path, "status", "--sequencer", nowhere, "--timeout", "1", "--json")
    assert r.returncode == 1, r.stderr
    subs = json.loads(r.stdout)["plant"]["subscriptions"]
    assert subs["good"] == {"position": 1, "lag": None}
    assert "is damaged" in subs["bad"]["damaged"] and b"bad.ckpt is damaged" in r.stderr
    r = _plant_cli(tmp_path, "status", "--sequencer", nowhere, "--timeout", "1")
    assert b"unknown (no node answered)" in r.stdout and b"damaged" in r.stdout
    node = node_factory().start()
    _publish(node, tmp_path, [b"a", b"b", b"c"])
    r = _plant_cli(tmp_path, "status", "--sequencer", node.ingress, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["nodes"][node.ingress]["last_seq"] == 3
    assert st["plant"]["subscriptions"]["good"] == {"position": 1, "lag": 2}
    assert "damaged" in st["plant"]["subscriptions"]["bad"]
