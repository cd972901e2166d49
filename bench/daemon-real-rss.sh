#!/usr/bin/env bash
# Idle RSS of `kvstrap daemon` on the real engine: 32 loop disks provisioned with 10
# directory volumes each (320 volumes), a private bus with the project's bus policy.
# Goal: under 15 MiB. Root only; creates and removes its own loop devices.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
need_root
BIN=$(kvstrap_bin)
BIN=$(realpath "$BIN")
make_loops 32 1G
write_policy "$BENCH_DIR/policy.toml" shared xfs "volume_count = 10" "${BENCH_LOOPS[@]}"
export KVSTRAP_LOCK="$BENCH_DIR/lock" KVSTRAP_LOG=warn KVSTRAP_UEVENTS=0
"$BIN" --policy "$BENCH_DIR/policy.toml" --state-dir "$BENCH_DIR/state" apply >/dev/null
sed -e "s|@LISTEN@|unix:path=$BENCH_DIR/bus|" -e "s|@POLICY@|$PWD/packaging/dbus/org.kvstrap.Bootstrap1.conf|" \
    tests/fixtures/dbus/system-bus.conf.in >"$BENCH_DIR/bus.conf"
dbus-daemon --config-file="$BENCH_DIR/bus.conf" --nofork --nopidfile --print-address=1 >"$BENCH_DIR/address" &
BUS_PID=$!
for _ in $(seq 100); do [ -s "$BENCH_DIR/address" ] && break; sleep 0.05; done
export DBUS_SYSTEM_BUS_ADDRESS=$(head -n1 "$BENCH_DIR/address")
"$BIN" --policy "$BENCH_DIR/policy.toml" --state-dir "$BENCH_DIR/state" daemon 2>"$BENCH_DIR/daemon.log" &
DAEMON_PID=$!
trap 'kill $DAEMON_PID $BUS_PID 2>/dev/null || true; wait 2>/dev/null || true; bench_cleanup' EXIT
call() {
    dbus-send --bus="$DBUS_SYSTEM_BUS_ADDRESS" --print-reply --dest=org.kvstrap.Bootstrap1 \
        /org/kvstrap/Bootstrap1 "$@"
}
for _ in $(seq 200); do
    call org.freedesktop.DBus.Properties.Get string:org.kvstrap.Bootstrap1 string:State 2>/dev/null | grep -q '"idle"' && break
    sleep 0.1
done
volumes=$(call org.kvstrap.Bootstrap1.Volumes | grep -o '"name"' | wc -l)
sleep 5
rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$DAEMON_PID/status")
awk -v rss="$rss" -v v="$volumes" 'BEGIN { printf "real engine, 32 disks, %d volumes: idle RSS %d KiB (%.1f MiB); goal < 15 MiB\n", v, rss, rss / 1024 }'
