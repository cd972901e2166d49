# Sourced by bench/daemon-*.sh: a private bus with the project's bus policy and
# `kvstrap daemon` on the simulated engine (32 disks, 320 volumes), both killed on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUS_POLICY=${BUS_POLICY:-$ROOT/packaging/dbus/org.kvstrap.Bootstrap1.conf}
WORK=$(mktemp -d)
chmod 755 "$WORK"
cleanup() {
    [ -n "${DAEMON_PID:-}" ] && kill "$DAEMON_PID" 2>/dev/null || true
    [ -n "${BUS_PID:-}" ] && kill "$BUS_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

start_bus() {
    sed -e "s|@LISTEN@|unix:path=$WORK/bus|" -e "s|@POLICY@|$BUS_POLICY|" \
        "$ROOT/tests/fixtures/dbus/system-bus.conf.in" >"$WORK/bus.conf"
    dbus-daemon --config-file="$WORK/bus.conf" --nofork --nopidfile --print-address=1 >"$WORK/address" &
    BUS_PID=$!
    for _ in $(seq 100); do [ -s "$WORK/address" ] && break; sleep 0.05; done
    export DBUS_SYSTEM_BUS_ADDRESS=$(head -n1 "$WORK/address")
}

start_daemon() {
    printf 'disks = 32\nvolumes = 320\nsteps = 8\n' >"$WORK/sim.toml"
    KVSTRAP_SIM="$WORK/sim.toml" KVSTRAP_LOCK="$WORK/lock" KVSTRAP_STATE_DIR="$WORK/state" \
        KVSTRAP_UEVENTS=0 KVSTRAP_LOG=warn "$KVSTRAP" daemon 2>"$WORK/daemon.log" &
    DAEMON_PID=$!
    for _ in $(seq 200); do
        call org.freedesktop.DBus.Properties.Get string:org.kvstrap.Bootstrap1 string:State 2>/dev/null |
            grep -q '"idle"' && return 0
        sleep 0.05
    done
    echo "the daemon did not become idle:" >&2
    cat "$WORK/daemon.log" >&2
    exit 1
}

# One call to the daemon's object with dbus-send (package dbus-bin, part of dbus).
call() {
    dbus-send --bus="$DBUS_SYSTEM_BUS_ADDRESS" --print-reply --dest=org.kvstrap.Bootstrap1 \
        /org/kvstrap/Bootstrap1 "$@"
}

rss_kib() {
    awk '/^VmRSS:/ {print $2}' "/proc/$DAEMON_PID/status"
}
