"""The systemd units and install.sh.

* ``systemd-analyze verify`` on every unit (ExecStart pointed at this venv,
  since /opt/orbcast does not exist here); any warning fails the test.
* ``install.sh --root DIR``: files, modes, enabled units; a second run
  changes nothing; ``--uninstall`` removes what it added and keeps the
  configs and the data.

Needs ``systemd-analyze`` and ``systemctl`` (Debian package ``systemd``).
When they are missing and the tests run as root, the package is installed
with apt-get; otherwise these tests fail with that instruction.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
INSTALL = UNITS / "install.sh"
APT_PACKAGE = "systemd"


@pytest.fixture(scope="module")
def systemd_tools() -> None:
    if shutil.which("systemd-analyze") and shutil.which("systemctl"):
        return
    if os.geteuid() != 0:
        pytest.fail(f"systemd-analyze/systemctl missing: apt-get install {APT_PACKAGE} (or run the tests as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", APT_PACKAGE],
                   check=True, env=env, timeout=600)
    assert shutil.which("systemd-analyze"), "apt-get install systemd did not provide systemd-analyze"


UNIT_INSTANCES = ["orbcast-sequencer@primary.service", "orbcast-sequencer@standby.service",
                  "orbcast-bridge.service", "orbcast-archive.service"]


@pytest.mark.parametrize("unit", UNIT_INSTANCES)
def test_systemd_analyze_verify(unit: str, tmp_path: Path, systemd_tools: None) -> None:
    venv_bin = Path(sys.executable).parent
    for f in UNITS.glob("*.service"):
        (tmp_path / f.name).write_text(f.read_text().replace("/opt/orbcast/venv/bin", str(venv_bin)))
    for exe in ("sequencer", "firmware-bridge", "plant"):
        assert (venv_bin / exe).exists(), f"console script {exe} not installed in {venv_bin}"
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / unit)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr + r.stdout


@pytest.mark.parametrize("unit", sorted(p.name for p in UNITS.glob("*.service")))
def test_units_have_the_required_settings(unit: str) -> None:
    text = (UNITS / unit).read_text()
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=",
                    "User=orbcast", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                    "PrivateTmp=yes"):
        assert setting in text, f"{unit} lacks {setting}"
    if unit == "orbcast-bridge.service":
        allowed = [ln.split("=", 1)[1].split()[0] for ln in text.splitlines() if ln.startswith("DeviceAllow=")]
        assert "DevicePolicy=closed" in text
        assert set(allowed) == {"char-gpiochip", "char-spi", "char-ttyS", "char-ttyAMA", "char-ttyACM",
                                "char-ttyUSB"}
    else:
        assert "PrivateDevices=yes" in text and "DeviceAllow" not in text


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            what = "-> " + os.readlink(p)
        elif p.is_file():
            what = p.read_bytes().hex()[:64] + str(st.st_size)
        else:
            what = "dir"
        out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), what)
    return out


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--no-venv", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_install_root_twice_and_uninstall(tmp_path: Path, systemd_tools: None) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert stat.S_IMODE(INSTALL.stat().st_mode) & 0o111, "install.sh must be executable"
    install(root, "--enable", "orbcast-bridge.service", "--enable", "orbcast-sequencer@primary.service")
    s = snapshot(root)
    for unit in ("orbcast-sequencer@.service", "orbcast-bridge.service", "orbcast-archive.service"):
        assert s[f"etc/systemd/system/{unit}"][0] == 0o644
        assert (root / "etc/systemd/system" / unit).read_text() == (UNITS / unit).read_text()
    for conf in ("primary.toml", "standby.toml", "bridge.toml", "archive.toml"):
        assert s[f"etc/orbcast/{conf}"][0] == 0o640
    assert s["etc/orbcast"][0] == 0o750 and s["var/lib/orbcast"][0] == 0o750
    assert s["usr/lib/sysusers.d/orbcast.conf"][0] == 0o644
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert os.readlink(wants / "orbcast-bridge.service") == "/etc/systemd/system/orbcast-bridge.service"
    assert os.readlink(wants / "orbcast-sequencer@primary.service").endswith("orbcast-sequencer@.service")
    assert not (wants / "orbcast-archive.service").exists()

    # an operator's config is never overwritten; a second run changes nothing
    (root / "etc/orbcast/bridge.toml").write_text("# mine\n")
    s = snapshot(root)
    r = install(root, "--enable", "orbcast-bridge.service", "--enable", "orbcast-sequencer@primary.service")
    assert snapshot(root) == s, r.stdout
    assert "installed" not in r.stdout

    # data written by the services, then uninstall
    (root / "var/lib/orbcast/primary").mkdir()
    (root / "var/lib/orbcast/primary/log.seg").write_bytes(b"data")
    r = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--uninstall"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    left = snapshot(root)
    assert not any(k.startswith("etc/systemd/system/") and k.endswith(".service") for k in left), left
    assert not (root / "opt/orbcast").exists() and not (root / "usr/lib/sysusers.d/orbcast.conf").exists()
    assert (root / "etc/orbcast/bridge.toml").read_text() == "# mine\n"
    assert (root / "etc/orbcast/primary.toml").exists()
    assert (root / "var/lib/orbcast/primary/log.seg").read_bytes() == b"data"


def test_install_refuses_bad_arguments(tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(INSTALL), "--root", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "does not exist" in r.stderr
    r = subprocess.run(["bash", str(INSTALL), "--bogus"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unknown argument" in r.stderr
