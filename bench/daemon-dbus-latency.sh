#!/usr/bin/env bash
# D-Bus Status round trip against `kvstrap daemon` (release build, simulated node with
# 32 disks and 320 volumes), 1000 calls on one connection; goal: p99 under 5 ms.
# Usage: bench/daemon-dbus-latency.sh [CALLS]   (root, dbus-daemon installed)
source "$(dirname "$0")/daemon-common.sh"
cd "$ROOT"
cargo build --release --quiet
cargo bench --quiet --bench daemon_dbus_latency --no-run
KVSTRAP=$ROOT/target/release/kvstrap
start_bus
start_daemon
CALLS=${1:-1000} cargo bench --quiet --bench daemon_dbus_latency
