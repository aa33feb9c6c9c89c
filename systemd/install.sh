#!/usr/bin/env bash
# Install orbcast as systemd services on a Raspberry Pi (or any systemd host).
#
#   sudo systemd/install.sh [--root DIR] [--enable UNIT]... [--no-venv] [--python PY]
#   sudo systemd/install.sh --uninstall [--root DIR]
#
# What it does (each step is skipped when already done, so running it twice
# changes nothing):
#   * the service user `orbcast` (systemd-sysusers; member of gpio, spi, dialout)
#   * a venv with orbcast in /opt/orbcast/venv (skip with --no-venv)
#   * example configs in /etc/orbcast (an existing file is NEVER overwritten)
#   * the units in /etc/systemd/system, then enables the --enable ones
#     (default: orbcast-bridge.service; a sequencer Pi adds
#     --enable orbcast-sequencer@primary.service)
# --root DIR installs into a staging root (an SD card image, a test):
# nothing outside DIR is touched and no service is started.
# --uninstall disables and removes the units, the venv and the sysusers
# entry; it KEEPS /etc/orbcast (configs, keys) and /var/lib/orbcast (the
# log, outboxes, checkpoints) and the user that owns them.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT=/
UNINSTALL=0
VENV=1
PY=python3
ENABLE=()
UNITS=(orbcast-sequencer@.service orbcast-bridge.service orbcast-archive.service)
CONFIGS=(primary.toml standby.toml bridge.toml archive.toml)

die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --root=*) ROOT="${1#--root=}"; shift ;;
        --enable) ENABLE+=("${2:?--enable needs a unit}"); shift 2 ;;
        --no-venv) VENV=0; shift ;;
        --python) PY="${2:?}"; shift 2 ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[ ${#ENABLE[@]} -gt 0 ] || ENABLE=(orbcast-bridge.service)
ROOT="$(cd "$ROOT" 2>/dev/null && pwd)" || die "--root directory does not exist"
LIVE=0; [ "$ROOT" = / ] && LIVE=1
R="${ROOT%/}"                   # prefix for paths ("" for the live system)
[ "$(id -u)" = 0 ] || [ $LIVE = 0 ] || die "run as root (sudo) to install on this system"

UNITDIR="$R/etc/systemd/system"
CONFDIR="$R/etc/orbcast"
OPT="$R/opt/orbcast"
SYSUSERS="$R/usr/lib/sysusers.d/orbcast.conf"
STATE="$R/var/lib/orbcast"

have_systemctl() { command -v systemctl >/dev/null 2>&1; }
booted() { [ $LIVE = 1 ] && [ -d /run/systemd/system ]; }
# systemctl --root works offline (it only makes the [Install] symlinks)
sctl() { if [ $LIVE = 1 ]; then systemctl "$@"; else systemctl --root="$ROOT" "$@"; fi; }

# install SRC DST MODE: copy only when the content or mode differs
put() {
    local src="$1" dst="$2" mode="$3"
    if [ -f "$dst" ] && cmp -s "$src" "$dst" && [ "$(stat -c %a "$dst")" = "${mode#0}" ]; then
        return 0
    fi
    install -D -m "$mode" "$src" "$dst"
    say "installed $dst"
}

if [ $UNINSTALL = 1 ]; then
    for u in "${UNITS[@]}"; do
        if [ -f "$UNITDIR/$u" ] && have_systemctl; then
            if [[ "$u" == *@.service ]]; then
                for inst in "$UNITDIR"/multi-user.target.wants/"${u%.service}"*.service; do
                    [ -e "$inst" ] || [ -L "$inst" ] || continue
                    booted && systemctl stop "$(basename "$inst")" || true
                    sctl disable "$(basename "$inst")" >/dev/null 2>&1 || rm -f "$inst"
                done
            else
                booted && systemctl stop "$u" || true
                sctl disable "$u" >/dev/null 2>&1 || true
            fi
        fi
        rm -f "$UNITDIR/$u" "$UNITDIR/multi-user.target.wants/${u}"
    done
    rmdir "$UNITDIR/multi-user.target.wants" 2>/dev/null || true
    rm -f "$SYSUSERS"
    rm -rf "$OPT"
    booted && systemctl daemon-reload || true
    say "removed units, venv and sysusers entry; kept $CONFDIR and $STATE"
    exit 0
fi

# 1. the user (sysusers.d file always; created now on the live system)
put "$SRC/systemd/orbcast.sysusers" "$SYSUSERS" 0644
if [ $LIVE = 1 ]; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers "$SYSUSERS"
    elif ! id orbcast >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/orbcast --shell /usr/sbin/nologin orbcast
        for g in gpio spi dialout; do getent group "$g" >/dev/null && usermod -aG "$g" orbcast; done
    fi
fi

# 2. the venv (re-running reinstalls orbcast from this tree; configs are untouched)
if [ $VENV = 1 ]; then
    if [ ! -x "$OPT/venv/bin/python" ]; then
        # --system-site-packages: gpiozero's pin factories on a Pi (lgpio,
        # from Raspberry Pi OS's python3-lgpio) are Debian packages, not wheels
        "$PY" -m venv --system-site-packages "$OPT/venv" || die "python3 -m venv failed (apt-get install python3-venv)"
        say "created $OPT/venv"
    fi
    "$OPT/venv/bin/python" -m pip install -q --upgrade "$SRC[serial]"
fi
install -d -m 0755 "$OPT"
if [ -d "$SRC/docs" ]; then
    for f in "$SRC"/docs/*.md; do [ -e "$f" ] && put "$f" "$OPT/docs/$(basename "$f")" 0644; done
fi

# 3. configs: never overwrite what the operator has
install -d -m 0750 "$CONFDIR"
for c in "${CONFIGS[@]}"; do
    if [ ! -e "$CONFDIR/$c" ]; then
        install -m 0640 "$SRC/systemd/config/$c" "$CONFDIR/$c"
        say "installed $CONFDIR/$c"
    fi
done
if [ $LIVE = 1 ] && id orbcast >/dev/null 2>&1; then
    chown root:orbcast "$CONFDIR" "$CONFDIR"/*.toml
fi
install -d -m 0750 "$STATE"
[ $LIVE = 1 ] && id orbcast >/dev/null 2>&1 && chown orbcast:orbcast "$STATE"

# 4. units, enabled
for u in "${UNITS[@]}"; do
    put "$SRC/systemd/$u" "$UNITDIR/$u" 0644
done
booted && systemctl daemon-reload
if have_systemctl; then
    for u in "${ENABLE[@]}"; do
        sctl is-enabled --quiet "$u" 2>/dev/null || { sctl enable "$u" 2>&1 | sed 's/^/install.sh: /'; }
    done
else
    say "systemctl not found: enable the units yourself"
fi
booted && say "start with: systemctl start ${ENABLE[*]}" || true
say "done (root $ROOT)"
