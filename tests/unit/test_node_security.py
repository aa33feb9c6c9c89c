"""The node's link-security glue (sequencer/security.py): bookkeeping stays bounded
and consistent; key-epochs never go back."""

from __future__ import annotations

from pathlib import Path

import pytest

from orbcast.config import SequencerConfig
from orbcast.keys import generate_identity_file
from orbcast.link import Peer
from sequencer import security as S


@pytest.fixture
def sec(tmp_path: Path) -> S.NodeSecurity:
    generate_identity_file(tmp_path / "k", "node")
    (tmp_path / "k" / "allow.toml").write_text("")
    cfg = SequencerConfig(data=str(tmp_path / "d"), security="ratchet",
                          identity=str(tmp_path / "k" / "node.key"),
                          allowlist=str(tmp_path / "k" / "allow.toml"), fsync=False)
    return S.NodeSecurity(cfg, tmp_path / "d", {})


def _peer(sid: int) -> Peer:
    return Peer(sid=sid, key=b"k" * 32, name="p")


def test_a_route_speaks_under_its_latest_session_only(sec: S.NodeSecurity) -> None:
    sec.note_route(b"r1", _peer(1))
    sec.note_route(b"r1", _peer(2))          # the plant handshook again on the same connection
    assert sec.sid_of == {b"r1": 2} and sec.route_of == {2: b"r1"}
    sec.note_route(b"r2", _peer(3))
    assert sec.route_of == {2: b"r1", 3: b"r2"}


def test_route_bookkeeping_is_bounded(sec: S.NodeSecurity, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "MAX_ROUTES", 8)
    for i in range(100):
        sec.note_route(b"r%d" % i, _peer(i))
    assert len(sec.sid_of) == 8 and len(sec.route_of) == 8
    assert set(sec.route_of) == set(range(92, 100))


def test_forget_dropped_prunes_sessions_the_server_no_longer_has(sec: S.NodeSecurity) -> None:
    for i in range(5):
        sec.note_route(b"r%d" % i, _peer(i))
        sec.keyed[i] = 7
    sec.forget_dropped()                     # none of these sids is a live session
    assert sec.sid_of == {} and sec.route_of == {} and sec.keyed == {}


def test_sealing_for_an_unknown_route_drops_the_reply(sec: S.NodeSecurity) -> None:
    from orbcast import envelope as env
    assert sec.seal(b"nobody", env.encode(env.Pong(rid=1, epoch=1, last_seq=0, role="active"))) is None
    sec.note_route(b"r", _peer(42))          # a route whose session is gone (revoked, evicted)
    assert sec.seal(b"r", env.encode(env.Pong(rid=1, epoch=1, last_seq=0, role="active"))) is None


@pytest.mark.parametrize(("saved", "wall", "want"), [
    (0, 1_700_000_100.5, 100),               # first start: from the wall clock
    (500, 1_700_000_100.0, 501),             # rotations ran ahead of the clock: saved + 1
    (99, 1_700_000_100.0, 100),
])
def test_key_epochs_never_repeat(saved: int, wall: float, want: int) -> None:
    assert S.key_epoch_start(saved, wall) == want
    assert S.key_epoch_start(saved, wall) > saved


def test_without_link_security_nothing_loads_cryptography() -> None:
    """`cryptography` costs ~15 MB of RSS (the node's budget serving a 1 GB log is
    40 MB): the drivers import the link layer only when security is on."""
    import subprocess
    import sys
    code = ("import sys, sequencer.node, sequencer.cli, plant.client, firmware_bridge.bridge\n"
            "assert 'cryptography' not in sys.modules, sorted(m for m in sys.modules if 'crypt' in m)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr


def test_a_reload_drops_replies_still_queued_for_revoked_plants() -> None:
    """SIGHUP is handled mid-turn, after replies were sealed and queued (they
    leave only once the session journal is durable). Those for a plant the
    new allowlist revokes must not leave; the others must, in order; the
    revoked plant's replays end."""
    from types import SimpleNamespace

    from sequencer.node import SequencerNode
    from sequencer.replay import ReplayManager
    from orbcast.envelope import ReplayRequest

    class Sec:                    # the allowlist now revokes the plant on route b"rv"
        def reload(self, now: float) -> tuple[list[bytes], str]:
            return [b"rv"], "allowlist reloaded: 1 plants, 1 sessions dropped"

    class Log:
        first_seq = 1

        def seq_for_time(self, t: int) -> int:
            return 1

    replays = ReplayManager(max_sessions=8, chunk_bytes=1 << 20, idle_s=30.0)
    for route in (b"ok", b"rv"):
        replays.open(route, ReplayRequest(rid=1, credit=1, max_records=10), Log(), now=0.0)
    distributed = []
    node = SimpleNamespace(sec=Sec(), replays=replays, _distribute=distributed.append,
                           _out=[[b"ok", b"h1", b"b1"], [b"rv", b"h2", b"b2"], [b"ok", b"h3", b"b3"]])
    assert SequencerNode.reload(node) is None       # type: ignore[arg-type]
    assert node._out == [[b"ok", b"h1", b"b1"], [b"ok", b"h3", b"b3"]]
    assert replays.sessions() == [(b"ok", 1)] and len(distributed) == 1
