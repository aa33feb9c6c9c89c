"""Plants that never miss a message (issue 3): real processes on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.invariants import check, check_log
from tests.integration.conftest import plant_proc, read_out, wait_for

pytestmark = pytest.mark.timeout(400)


def _acks(tmp_path: Path, names: list[str]) -> dict[tuple[str, int], int]:
    acks = {}
    for n in names:
        out = read_out(tmp_path / f"{n}.out")
        assert out["F"], f"publisher {n} did not finish"
        acks.update({(n, ps): s for ps, s in out["K"]})
    return acks


@pytest.mark.parametrize("security", ["none", "ratchet"], indirect=True)
def test_egress_loss_is_repaired(tmp_path: Path, procs: list, node_factory, security: str) -> None:
    """The PUB drops batches (injected 20% loss plus a tiny high-water mark
    with a slow consumer): every consumer still delivers the full sequence in
    order exactly once, and gaps were really repaired."""
    node = node_factory(env={"ORBCAST_SEQUENCER_FAULT_DROP_EGRESS": "0.2",
                             "ORBCAST_SEQUENCER_EGRESS_HWM": "20"}).start()
    total = 2 * 8000
    cons = [plant_proc(tmp_path, procs, "consumer", "fast", node, "--count", str(total)),
            plant_proc(tmp_path, procs, "consumer", "slow", node, "--count", str(total),
                       "--slow", "0.01")]
    pubs = [plant_proc(tmp_path, procs, "publisher", f"p{i}", node, "--count", "8000",
                       "--batch", "64") for i in range(2)]
    for p in pubs + cons:
        assert p.wait(300) == 0, p.output()[-2000:]
    acks = _acks(tmp_path, ["p0", "p1"])
    outs = {c: read_out(tmp_path / f"{c}.out") for c in ("fast", "slow")}
    check({c: o["D"] for c, o in outs.items()}, acks, start=1)
    for c, o in outs.items():
        stats = o["S"][-1]
        assert stats["gaps"] > 0 and stats["repaired"] > 0, f"{c}: no gap was repaired: {stats}"


@pytest.mark.parametrize("security", ["none", "ratchet"], indirect=True)
def test_late_start_catches_up_with_no_seam(tmp_path: Path, procs: list, node_factory, security: str) -> None:
    """A plant started after 100,000 messages were sequenced, while publishing
    continues, delivers 1..N with no gap and no duplicate at the seam."""
    node = node_factory().start()
    first = plant_proc(tmp_path, procs, "publisher", "early", node, "--count", "100000",
                       "--batch", "2048")
    assert first.wait(300) == 0, first.output()[-2000:]
    more = plant_proc(tmp_path, procs, "publisher", "later", node, "--count", "20000",
                      "--batch", "64", "--rate", "8000")
    wait_for(lambda: len(read_out(tmp_path / "later.out")["K"]) > 500, 60, "live traffic")
    late = plant_proc(tmp_path, procs, "consumer", "late", node, "--count", "120000", "--start", "1")
    assert more.wait(300) == 0
    assert late.wait(300) == 0, late.output()[-2000:]
    acks = _acks(tmp_path, ["early", "later"])
    out = read_out(tmp_path / "late.out")
    check({"late": out["D"]}, acks, start=1)
    stats = out["S"][-1]
    assert stats["repaired"] >= 100_000, stats          # the backlog came by replay
    assert out["D"][-1][0] == 120_000


def test_plant_crash_loses_nothing_it_accepted(tmp_path: Path, procs: list, node_factory) -> None:
    """kill -9 a publishing plant mid-stream and restart it with the same
    identity: every message publish() had accepted is sequenced exactly once."""
    node = node_factory().start()
    data = tmp_path / "plant-crashy"
    p = plant_proc(tmp_path, procs, "publisher", "crashy", node, "--count", "30000",
                   "--batch", "500", data=data)
    wait_for(lambda: len(read_out(tmp_path / "crashy.out")["A"]) > 5000, 60, "accepted messages")
    p.kill9()
    accepted_first = read_out(tmp_path / "crashy.out")["A"]
    (tmp_path / "crashy.out").rename(tmp_path / "crashy-1.out")
    p2 = plant_proc(tmp_path, procs, "publisher", "crashy", node, "--count", "100",
                    "--batch", "100", data=data)
    assert p2.wait(120) == 0, p2.output()[-2000:]
    second = read_out(tmp_path / "crashy.out")
    assert second["F"]
    node.stop()
    acked = {("crashy", ps): s for ps, s in read_out(tmp_path / "crashy-1.out")["K"] + second["K"]}
    accepted = [("crashy", ps) for ps in accepted_first + second["A"]]
    where = check_log(node.records(), acked, accepted)
    assert len(where) == len(node.records())
    assert set(accepted) <= set(where)
    # the restarted plant continued numbering after everything the first run used
    assert min(second["A"]) > max(accepted_first)


@pytest.mark.parametrize("security", ["none", "ratchet"], indirect=True)
def test_sequencer_away_then_back(tmp_path: Path, procs: list, node_factory, security: str) -> None:
    """Stop the sequencer while plants keep publishing into their outboxes;
    start it again: everything is delivered, nothing duplicated."""
    node = node_factory().start()
    cons = plant_proc(tmp_path, procs, "consumer", "c", node, "--count", "12000", "--start", "1")
    pubs = [plant_proc(tmp_path, procs, "publisher", f"p{i}", node, "--count", "6000",
                       "--batch", "50", "--rate", "3000") for i in range(2)]
    wait_for(lambda: len(read_out(tmp_path / "p0.out")["K"]) > 500, 60, "acks before the outage")
    assert node.stop() == 0
    n_down = len(read_out(tmp_path / "p0.out")["A"])
    wait_for(lambda: len(read_out(tmp_path / "p0.out")["A"]) > n_down + 300, 60,
             "publishes accepted while the sequencer is away")
    node.start()
    for p in pubs + [cons]:
        assert p.wait(300) == 0, p.output()[-2000:]
    acks = _acks(tmp_path, ["p0", "p1"])
    check({"c": read_out(tmp_path / "c.out")["D"]}, acks, start=1)
    node.stop()
    assert len(check_log(node.records(), acks)) == 12000


def test_checkpoint_resume_after_kill9(tmp_path: Path, procs: list, node_factory) -> None:
    """kill -9 a consuming plant, restart it with the same checkpoint name: it
    resumes right after its checkpoint, with no gap."""
    from plant.checkpoint import CheckpointStore
    node = node_factory().start()
    pub = plant_proc(tmp_path, procs, "publisher", "p", node, "--count", "20000", "--batch", "500")
    assert pub.wait(200) == 0
    data = tmp_path / "plant-cons"
    c1 = plant_proc(tmp_path, procs, "consumer", "cons", node, "--checkpoint", "main",
                    "--start", "1", "--slow", "0.002", data=data)
    wait_for(lambda: len(read_out(tmp_path / "cons.out")["D"]) > 5000, 120, "deliveries")
    c1.kill9()
    first = read_out(tmp_path / "cons.out")["D"]
    saved = CheckpointStore(data / "checkpoints").load("main")
    assert saved is not None and 0 < saved <= first[-1][0]
    (tmp_path / "cons.out").rename(tmp_path / "cons-1.out")
    c2 = plant_proc(tmp_path, procs, "consumer", "cons", node, "--checkpoint", "main",
                    "--stop-at", "20000", "--start", "1", data=data)
    assert c2.wait(200) == 0, c2.output()[-2000:]
    second = read_out(tmp_path / "cons.out")["D"]
    assert second[0][0] == saved + 1, "did not resume right after the checkpoint"
    acks = _acks(tmp_path, ["p"])
    check({"resumed": second}, {k: v for k, v in acks.items() if v > saved}, start=saved + 1)
    # at-least-once across the crash: together the two runs cover 1..20000
    assert {d[0] for d in first} | {d[0] for d in second} == set(range(1, 20001))


def test_a_full_disk_fails_those_publishes_and_the_plant_goes_on(
        tmp_path: Path, node_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The outbox's write is refused (ENOSPC, injected at os.write): those
    messages' tickets fail with OutboxWriteFailed at once, the plant's engine
    keeps running, and the next publish is accepted and acked. It used to stop
    the engine for good, leaving every waiting ticket to time out."""
    import errno

    from orbcast.config import PlantConfig
    from orbcast.errors import OutboxWriteFailed
    from plant import outbox as outbox_mod
    from plant.client import Plant
    node = node_factory().start()
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="full", data=str(tmp_path / "pl"))
    with Plant(cfg, outbox=True) as p:
        assert p.publish("t/a", b"before", timeout=30) == 1
        real_write = outbox_mod.os.write

        def no_space(fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(outbox_mod.os, "write", no_space)
        tickets = [p.publish_nowait("t/a", b"lost %d" % i) for i in range(10)]
        for t in tickets:
            with pytest.raises(OutboxWriteFailed):
                t.wait_accepted(10)
        assert p.counters["outbox_write_failed"] == 10
        monkeypatch.setattr(outbox_mod.os, "write", real_write)
        assert p.publish("t/a", b"after", timeout=30) == 2      # the engine went on
        p.flush(30)
        assert p.outbox_depth == 0
    node.stop()
    assert [(s, ps) for s, _p, ps in node.records()] == [(1, 1), (2, 2)]


def test_when_the_engine_stops_waiting_tickets_learn_it_at_once(
        tmp_path: Path, node_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed fsync stops the outbox (its state on disk is unknown) and with
    it the plant's engine; every ticket still waiting gets that error instead
    of waiting for its timeout."""
    import errno

    from orbcast.config import PlantConfig
    from orbcast.errors import ClosedError, DurabilityError
    from plant import outbox as outbox_mod
    from plant.client import Plant
    node = node_factory().start()
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="io", data=str(tmp_path / "pl"))
    p = Plant(cfg, outbox=True)
    try:
        assert p.publish("t/a", b"before", timeout=30) == 1

        def io_error(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(outbox_mod.os, "fsync", io_error)
        # the engine may stop while we are still submitting (it fails the first
        # append it makes): from then on a submission is refused at once
        tickets = []
        for _ in range(50):
            try:
                tickets.append(p.publish_nowait("t/a", b"x"))
            except ClosedError as exc:
                assert isinstance(exc.__cause__, DurabilityError)
                break
        assert tickets                # the first is always taken: nothing failed before it
        for t in tickets:            # (before: OrbcastTimeout, after 30 s each)
            with pytest.raises(ClosedError, match="Input/output error") as info:
                t.wait_accepted(30)
            assert isinstance(info.value.__cause__, DurabilityError)
        with pytest.raises(ClosedError) as late:
            p.publish_nowait("t/a", b"after the stop")
        assert isinstance(late.value.__cause__, DurabilityError)
        monkeypatch.undo()
    finally:
        p.close()


@pytest.mark.parametrize("outbox", [True, False], ids=["disk-outbox", "memory-outbox"])
def test_a_burst_larger_than_the_outbox_is_published_whole_when_publishers_block(
        tmp_path: Path, node_factory, outbox: bool) -> None:
    """60 messages of 100 KiB queued at once against an outbox of 1 MiB, with
    ``on_full="block"``: the plant takes what fits and waits for acks to make
    room. Every message is sequenced once, in publish order. (A queued batch over
    the byte bound used to stop the engine -- "can never fit" -- with the disk
    outbox, and to block for ever with the memory one.)"""
    from orbcast.config import PlantConfig
    from plant.client import Plant
    node = node_factory().start()
    n, size = 60, 100 * 1024
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="burst", data=str(tmp_path / "pl"),
                      outbox_max_bytes=1 << 20)
    with Plant(cfg, outbox=outbox, on_full="block") as p:
        tickets = [p.publish_nowait("t/big", b"%04d" % i + b"x" * (size - 4)) for i in range(n)]
        p.flush(60)
        seqs = [t.result(10) for t in tickets]
    assert seqs == list(range(1, n + 1))
    node.stop()
    assert [(s, ps) for s, _p, ps in node.records()] == [(s, s) for s in range(1, n + 1)]


def test_a_burst_larger_than_the_outbox_fails_only_what_does_not_fit(
        tmp_path: Path, node_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """``on_full="error"``: of a burst over the outbox's byte bound, what fits is
    kept and sequenced, the rest fails with OutboxFull, and the plant goes on.
    While the rest is refused, what fits is still on its way into the outbox:
    flush() must not count the plant as settled then (it returned early)."""
    from orbcast.config import PlantConfig
    from orbcast.errors import OutboxFull
    from plant.client import Plant
    node = node_factory().start()
    n, size = 30, 100 * 1024
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="burst", data=str(tmp_path / "pl"),
                      outbox_max_bytes=1 << 20)
    kept: list[tuple[int, int]] = []
    settled_at_refusal: list[bool] = []
    refuse = Plant._refuse

    def watched(self: Plant, batch: list, exc: BaseException) -> None:
        refuse(self, batch, exc)
        settled_at_refusal.append(self._settled())      # what flush() would see now

    monkeypatch.setattr(Plant, "_refuse", watched)
    with Plant(cfg, outbox=True, on_full="error") as p:
        tickets = [p.publish_nowait("t/big", b"%04d" % i + b"x" * (size - 4)) for i in range(n)]
        for i, t in enumerate(tickets):
            try:
                kept.append((t.result(30), i))
            except OutboxFull:
                pass
        assert kept and kept == sorted(kept)
        assert not any(settled_at_refusal), settled_at_refusal
        last = p.publish("t/small", b"after", timeout=30)    # the engine went on
    assert last == len(kept) + 1
    node.stop()
    recs = node.records()
    assert [(s, ps) for s, _p, ps in recs] == [(s, s) for s in range(1, len(kept) + 2)]
    assert [s for s, _i in kept] == list(range(1, len(kept) + 1))


@pytest.mark.parametrize("on_full", ["error", "block"])
def test_a_message_larger_than_the_outbox_fails_alone(
        tmp_path: Path, node_factory, on_full: str) -> None:
    """A message over ``outbox_max_bytes`` could never be kept: its ticket fails
    with a clear error at once (it is not waited for, nor does it stop the
    engine) and the messages around it are published."""
    from orbcast.config import PlantConfig
    from orbcast.errors import LocalProtocolError
    from plant.client import Plant
    node = node_factory().start()
    cfg = PlantConfig(sequencers=[node.ingress], producer_id="huge", data=str(tmp_path / "pl"),
                      outbox_max_bytes=1024)
    with Plant(cfg, outbox=True, on_full=on_full) as p:
        a = p.publish_nowait("t/a", b"small 1")
        with pytest.raises(LocalProtocolError, match="can never fit the outbox"):
            p.publish_nowait("t/a", b"x" * 2000)
        b = p.publish_nowait("t/a", b"small 2")
        assert (a.result(30), b.result(30)) == (1, 2)
    node.stop()
    assert [(s, ps) for s, _p, ps in node.records()] == [(1, 1), (2, 2)]
