"""The ``firmware-bridge`` command.

    firmware-bridge run --config FILE [--log-level info] [--debug]
    firmware-bridge check --config FILE

``run`` starts the bridge in the foreground (systemd runs it as
``orbcast-bridge.service``, ``Type=notify``): READY=1 once devices and the
plant are up, WATCHDOG=1 from the main loop, STATUS= with counts and the last
acked seq, STOPPING=1 on SIGTERM. ``check`` validates the config (the same
checks as ``run``) and prints what it would drive. Pins come from gpiozero's
default pin factory; ``GPIOZERO_PIN_FACTORY=mock`` runs it on a laptop.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any

from orbcast.cliutil import run_main, setup_logging
from orbcast.sdnotify import Notifier

from .config import load

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firmware-bridge",
                                description="orbcast firmware bridge: GPIO and serial devices <-> topics")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the bridge in the foreground")
    r.add_argument("--config", required=True, help="TOML config file")
    r.add_argument("--log-level", default="info", help="debug, info, warning, error")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    c = sub.add_parser("check", help="validate a config file and list its devices")
    c.add_argument("--config", required=True, help="TOML config file")
    c.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _dispatch(a: argparse.Namespace) -> int:
    cfg = load(a.config)
    if a.cmd == "check":
        for d in [*cfg.inputs, *cfg.outputs]:
            opts = ", ".join(f"{k}={v!r}" for k, v in d.options.items() if v is not None)
            print(f"line {d.line}: {d.category:<7} {d.type:<14} {d.name:<16} {d.topic}  ({opts})")
        for s in cfg.serial:
            print(f"line {s.line}: serial  {s.name} {s.url} -> {s.topic_prefix}* "
                  f"<- {', '.join(s.forward) or '-'}")
        print(f"{a.config}: OK")
        return 0
    setup_logging("debug" if a.debug else a.log_level)
    from .bridge import Bridge
    notifier = Notifier.from_env()
    bridge = Bridge(cfg, notifier=notifier)

    def on_term(signum: int, _frame: Any) -> None:
        notifier.stopping("stopping")       # first, even if the loop is busy
        bridge.stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        bridge.start()
        bridge.run()
    finally:
        bridge.close()
        notifier.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_parser(), argv, _dispatch)


if __name__ == "__main__":
    sys.exit(main())
