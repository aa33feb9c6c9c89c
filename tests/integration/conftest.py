"""Fixtures for integration tests: real processes on loopback.

Ports are random, below 32768 (a ZeroMQ peer reconnecting to a dead node's
port inside the ephemeral range can end up connected to itself). Every
process started here is reaped at teardown, killed if it has to be. Waiting
is done on conditions with deadlines (a PING handshake, a line in a file, a
process exit), never with a bare sleep.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from orbcast.rpc import wait_ready
from sequencer.log import LogStore

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


_GIVEN: set[int] = set()


def free_port() -> int:
    """A random loopback port in 20000-32000 that is free right now and was not
    handed out before in this run (a node takes four at once: two picks of the
    same free port would collide when the second bind comes)."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        if port in _GIVEN:
            continue
        _GIVEN.add(port)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``cond`` until true or fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A child process whose output goes to a file; always reaped."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> "Proc":
        fh = open(self.log_path, "ab")
        self.p = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                                  cwd=ROOT, start_new_session=True)
        fh.close()
        return self

    @property
    def pid(self) -> int:
        assert self.p is not None
        return self.p.pid

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.p.wait(10)  # type: ignore[union-attr]

    def terminate(self, timeout: float = 15) -> int:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                return self.p.wait(timeout)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self.kill9()
                pytest.fail(f"{self.args[:4]} did not stop within {timeout} s of SIGTERM")
        return self.p.returncode if self.p else 0  # type: ignore[return-value]

    def wait(self, timeout: float) -> int:
        assert self.p is not None
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGUSR1)     # procs.py dumps its state
            try:
                self.p.wait(1)
            except subprocess.TimeoutExpired:
                pass
            self.kill9()
            pytest.fail(f"{' '.join(self.args[2:5])} did not finish within {timeout} s; "
                        f"log:\n{self.output()[-3000:]}")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class Keyring:
    """Keys for a test cluster with link security on: one identity per node
    and per plant, the nodes' allowlist (every plant may publish and read
    everything unless a test narrows it) and the plants' pins file.

    A plant key made after its nodes started is put on their allowlist with
    ``sequencer reload`` over the control endpoint, which answers once the
    reload is done (a handshake, not a sleep)."""

    def __init__(self, root: Path) -> None:
        from orbcast.keys import generate_identity_file
        self._gen = generate_identity_file
        self.dir = root / "keys"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.allowlist = self.dir / "allowlist.toml"
        self.pins = self.dir / "pins.toml"
        self.node_keys: dict[str, str] = {}
        self.plants: dict[str, tuple[str, list[str], list[str]]] = {}
        self.nodes: list["Node"] = []
        self._write()

    def node(self, name: str) -> str:
        """The public key text of node ``name`` (made on first use)."""
        if name not in self.node_keys:
            ident, _k, _p = self._gen(self.dir, f"node-{name}")
            self.node_keys[name] = ident.public_text
            self._write()
        return self.node_keys[name]

    def plant(self, name: str, publish: list[str] | None = None, read: list[str] | None = None) -> Path:
        """Make (or re-scope) plant ``name``'s allowlist entry; returns its key file."""
        key = self.dir / f"{name}.key"
        if name not in self.plants:
            ident, _k, _p = self._gen(self.dir, name)
            pub = ident.public_text
        else:
            pub = self.plants[name][0]
        entry = (pub, [""] if publish is None else publish, [""] if read is None else read)
        if self.plants.get(name) != entry:
            self.plants[name] = entry
            self._write()
            self.reload_nodes()
        return key

    def revoke(self, name: str) -> None:
        del self.plants[name]
        self._write()

    def reload_nodes(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.alive():
                n.admin("reload")

    def _write(self) -> None:
        import json
        lines = []
        for name, (pub, pubs, reads) in self.plants.items():
            lines += ["[[plant]]", f"name = {json.dumps(name)}", f"key = {json.dumps(pub)}",
                      f"publish = {json.dumps(pubs)}", f"read = {json.dumps(reads)}", ""]
        tmp = self.allowlist.with_suffix(".tmp")
        tmp.write_text("\n".join(lines))
        os.replace(tmp, self.allowlist)
        pins = []
        for name, pub in self.node_keys.items():
            pins += ["[[node]]", f"name = {json.dumps(name)}", f"key = {json.dumps(pub)}", ""]
        self.pins.write_text("\n".join(pins))


class Node:
    """A sequencer node process that can be killed and restarted on its data."""

    def __init__(self, tmp: Path, name: str = "seq", env: dict[str, str] | None = None,
                 extra: list[str] | None = None, keyring: Keyring | None = None) -> None:
        self.name = name
        self.data = tmp / name
        self.ingress = f"tcp://127.0.0.1:{free_port()}"
        self.egress = f"tcp://127.0.0.1:{free_port()}"
        self.peer = f"tcp://127.0.0.1:{free_port()}"
        self.control = f"tcp://127.0.0.1:{free_port()}"
        self.env = env or {}
        self.extra = extra or []
        self.log = tmp / f"{name}.log"
        self.proc: Proc | None = None
        self.keyring = keyring
        self.partner: Node | None = None
        self.config = tmp / f"{name}.toml"
        if keyring is not None:
            keyring.node(name)
            keyring.nodes.append(self)

    def pair_with(self, other: "Node", role: str) -> "Node":
        """Make this node one of a primary/standby pair with ``other``."""
        self.extra += ["--role", role, "--peer", self.peer, "--peer-connect", other.peer]
        self.partner = other
        return self

    def admin(self, command: str, timeout: float = 10) -> dict:
        """An operator command over the control endpoint; fails the test on an error reply."""
        from orbcast.envelope import Admin, Error
        from orbcast.rpc import request
        rep = request(self.control, Admin(rid=1, command=command), timeout=timeout)
        if isinstance(rep, Error):
            pytest.fail(f"{command} on {self.name}: {rep.code} {rep.message}")
        return rep.info

    def status(self, timeout: float = 5) -> dict:
        from orbcast.envelope import StatusRequest
        from orbcast.errors import OrbcastTimeout
        from orbcast.rpc import request
        try:
            return request(self.control, StatusRequest(rid=1), timeout=timeout).info
        except OrbcastTimeout:
            if self.proc and self.proc.alive():      # a hung node: get its stacks into the log
                os.kill(self.proc.pid, signal.SIGUSR1)
            raise

    def start(self, timeout: float = 20) -> "Node":
        conf: list[str] = []
        kr = self.keyring
        if kr is not None:
            lines = ["[sequencer]", 'security = "ratchet"',
                     f'identity = "{kr.dir / ("node-" + self.name + ".key")}"',
                     f'allowlist = "{kr.allowlist}"']
            if self.partner is not None:
                lines.append(f'peer_key = "{kr.node(self.partner.name)}"')
            self.config.write_text("\n".join(lines) + "\n")
            conf = ["--config", str(self.config)]
        self.proc = Proc([PY, "-m", "sequencer", "run", "--data", str(self.data),
                          "--ingress", self.ingress, "--egress", self.egress,
                          "--control", self.control,
                          "--node-id", self.data.name, *conf, *self.extra], self.log, self.env).start()
        try:
            wait_ready(self.ingress, timeout=timeout)
        except Exception:
            pytest.fail(f"sequencer did not start:\n{self.proc.output()[-3000:]}")
        return self

    def kill9(self) -> None:
        if self.proc:
            self.proc.kill9()

    def mem_kb(self) -> dict[str, int]:
        """VmRSS, VmHWM, ... of the running node process, in kB (/proc)."""
        assert self.proc is not None
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if v.strip().endswith(" kB"):
                out[k] = int(v.split()[0])
        return out

    def stop(self) -> int:
        return self.proc.terminate() if self.proc else 0

    def records(self) -> list[tuple[int, str, int]]:
        """(seq, producer, producer_seq) of every record in the log (node stopped)."""
        from orbcast.envelope import decode_record
        store = LogStore(self.data / "log")
        try:
            return [(s, m.producer, m.producer_seq)
                    for s, _t, b in store.iter_records(1) for m in [decode_record(b)]]
        finally:
            store.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Proc]]:
    """Collects every Proc/Node started in a test and reaps them at the end."""
    started: list = []
    yield started
    for p in started:
        try:
            if isinstance(p, Node):
                p.kill9()
            else:
                p.kill9()
        except Exception:
            pass


@pytest.fixture
def security(request: pytest.FixtureRequest) -> str:
    """"none" (default) or "ratchet": parametrize a test with
    ``@pytest.mark.parametrize("security", ["none", "ratchet"], indirect=True)``
    to run it unchanged with link security on."""
    return getattr(request, "param", "none")


@pytest.fixture
def keyring(tmp_path: Path, security: str) -> Keyring | None:
    return Keyring(tmp_path) if security == "ratchet" else None


@pytest.fixture
def node_factory(tmp_path: Path, procs: list, keyring: Keyring | None) -> Callable[..., Node]:
    def make(name: str = "seq", **kw: object) -> Node:
        kw.setdefault("keyring", keyring)
        n = Node(tmp_path, name, **kw)  # type: ignore[arg-type]
        procs.append(n)
        return n
    return make


def plant_proc(tmp_path: Path, procs: list, role: str, name: str, node: "Node | list[Node]",
               *args: str, data: Path | None = None) -> Proc:
    """Start ``python -m tests.integration.procs ROLE`` writing to ``<name>.out``."""
    out = tmp_path / f"{name}.out"
    nodes = node if isinstance(node, list) else [node]
    seqs = [x for n in nodes for x in ("--sequencer", n.ingress)]
    kr = nodes[0].keyring
    if kr is not None:
        kr.plant(name)
        seqs += ["--keys", str(kr.dir)]
    p = Proc([PY, "-m", "tests.integration.procs", role, *seqs,
              "--producer-id", name, "--data", str(data or tmp_path / f"plant-{name}"),
              "--out", str(out), *args], tmp_path / f"{name}.log").start()
    procs.append(p)
    return p


def read_out(path: Path) -> dict[str, list]:
    """Parse a procs.py output file: A/K/D/S/F/R lines."""
    res: dict[str, list] = {"A": [], "K": [], "D": [], "S": [], "F": [], "R": []}
    if not path.exists():
        return res
    import json
    # only newline-terminated lines count: a killed process may leave a cut
    # line ("A 12" cut to "A 1") that must not be read as a different fact
    for line in path.read_text().split("\n")[:-1]:
        parts = line.split(" ", 1)
        tag = parts[0]
        if tag not in res or (len(parts) == 1 and tag != "F"):
            continue
        rest = parts[1] if len(parts) > 1 else ""
        try:
            if tag == "A":
                res["A"].append(int(rest))
            elif tag == "K":
                ps, s = rest.split()
                res["K"].append((int(ps), int(s)))
            elif tag == "D":
                s, prod, ps = rest.split()
                res["D"].append((int(s), prod, int(ps)))
            elif tag == "S":
                res["S"].append(json.loads(rest))
            elif tag == "R":
                res["R"].append(int(rest))
            else:
                res["F"].append(True)
        except ValueError:
            continue   # the last line of a killed process may be cut short
    return res
