"""The ``sequencer`` command: run a node, ask it for status, check a log.

    sequencer run --data DIR [--config FILE] [--ingress EP] [--egress EP]
    sequencer run --role primary|standby --peer EP --peer-connect EP ...   (hot standby)
    sequencer status [--sequencer EP] [--json]
    sequencer promote|demote|reload [--sequencer EP]
    sequencer check --data DIR

With link security on, ingress takes only sealed requests: point the
operator commands at the node's loopback control endpoint
(``sequencer.control``, e.g. ``--sequencer tcp://127.0.0.1:7403``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from orbcast import config as cfgmod
from orbcast.cliutil import run_main, setup_logging
from orbcast.envelope import Admin, Error, StatusRequest
from orbcast.rpc import request

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sequencer", description="orbcast sequencer node")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a sequencer node in the foreground")
    r.add_argument("--data", help="data directory (log, dedup snapshot, node-state.json)")
    r.add_argument("--config", help="TOML config file ([sequencer] section)")
    r.add_argument("--ingress", help="ROUTER endpoint to bind (default tcp://127.0.0.1:7400)")
    r.add_argument("--egress", help="PUB endpoint to bind (default tcp://127.0.0.1:7401)")
    r.add_argument("--node-id", help="name of this node")
    r.add_argument("--role", choices=("primary", "standby"), help="preferred role of this node")
    r.add_argument("--peer", help="ROUTER endpoint to bind for the other node (default tcp://127.0.0.1:7402)")
    r.add_argument("--peer-connect", metavar="EP", help="the other node's --peer endpoint (enables the hot standby)")
    r.add_argument("--control", metavar="EP", help="loopback endpoint for operator commands (status, "
                   "promote, demote, reload); needed for them when link security is on")
    r.add_argument("--no-fsync", action="store_true", help="do not fsync (benchmarks only!)")
    r.add_argument("--log-level", default="info", help="debug, info, warning, error")
    s = sub.add_parser("status", help="show a node's role, positions and counters")
    s.add_argument("--sequencer", default="tcp://127.0.0.1:7400", help="the node's ingress endpoint")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--timeout", type=float, default=5.0)
    for name, what in (("promote", "make a standby node active now (operator failover)"),
                       ("demote", "make an active node step down to standby"),
                       ("reload", "reload the allowlist (revocations take effect now; same as SIGHUP)")):
        x = sub.add_parser(name, help=what)
        x.add_argument("--sequencer", default="tcp://127.0.0.1:7400", help="the node's ingress endpoint")
        x.add_argument("--timeout", type=float, default=5.0)
    c = sub.add_parser("check", help="verify every log segment (full CRC scan)")
    c.add_argument("--data", required=True,
                   help="the node's data directory (holding log/); an error if it has none")
    return p


def _dispatch(a: argparse.Namespace) -> int:
    if a.cmd == "run":
        setup_logging(a.log_level)
        import faulthandler
        import signal as _signal
        faulthandler.register(_signal.SIGUSR1)   # `kill -USR1 PID` prints every thread's stack
        from .node import run
        cfg = cfgmod.load(cfgmod.SequencerConfig, a.config, overrides={
            "data": a.data, "ingress": a.ingress, "egress": a.egress, "node_id": a.node_id,
            "role": a.role, "peer": a.peer, "peer_connect": a.peer_connect,
            "control": a.control, "fsync": False if a.no_fsync else None})
        return run(cfg)
    if a.cmd == "status":
        rep = request(a.sequencer, StatusRequest(rid=1), timeout=a.timeout)
        if isinstance(rep, Error):
            raise ValueError(_explain(rep))
        print_status(rep.info, as_json=a.json)
        return 0
    if a.cmd in ("promote", "demote", "reload"):
        rep = request(a.sequencer, Admin(rid=1, command=a.cmd), timeout=a.timeout)
        if isinstance(rep, Error):
            raise ValueError(_explain(rep))
        print(f"{rep.info['node']}: role {rep.info['role']}, epoch {rep.info['epoch']}")
        return 0
    if a.cmd == "check":
        from .log import verify_segment
        logdir = Path(a.data, "log")
        if not Path(a.data).is_dir():
            raise ValueError(f"{a.data}: no such directory (give a node's data directory, "
                             "the one holding log/)")
        if not logdir.is_dir():
            raise ValueError(f"{a.data} has no log/ directory: not a node's data directory "
                             "(give the directory holding log/, e.g. /var/lib/orbcast/primary)")
        segs = sorted(logdir.glob("*.seg"))
        total = 0
        for seg in segs:
            n = verify_segment(seg)
            total += n
            print(f"{seg.name}: {n} records OK")
        print(f"{len(segs)} segments, {total} records, no damage found")
        return 0
    return 2


def _explain(rep: Error) -> str:
    msg = f"{rep.code}: {rep.message}"
    if rep.code in ("auth", "forbidden"):
        msg += (" (link security is on at this endpoint: point --sequencer at the node's "
                "control endpoint, sequencer.control, e.g. tcp://127.0.0.1:7403)")
    return msg


def print_status(info: dict, *, as_json: bool = False, out=sys.stdout) -> None:  # type: ignore[no-untyped-def]
    """Print a status map as JSON or as aligned text."""
    if as_json:
        json.dump(info, out, indent=2, sort_keys=True, default=str)
        out.write("\n")
        return

    def emit(d: dict, indent: str = "") -> None:  # type: ignore[type-arg]
        for k in sorted(d):
            v = d[k]
            if isinstance(v, dict):
                print(f"{indent}{k}:", file=out)
                emit(v, indent + "  ")
            elif isinstance(v, list):
                print(f"{indent}{k}:", file=out)
                for i, item in enumerate(v):
                    if isinstance(item, dict):
                        print(f"{indent}  - [{i}]", file=out)
                        emit(item, indent + "    ")
                    else:
                        print(f"{indent}  - {item}", file=out)
            else:
                print(f"{indent}{k:<24} {v}", file=out)
    emit(info)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_parser(), argv, _dispatch)


if __name__ == "__main__":
    sys.exit(main())
