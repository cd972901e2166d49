#!/usr/bin/env bash
# Idle RSS of `kvstrap daemon` (release build) serving D-Bus, simulated node with 32 disks
# and 320 volumes; goal: under 15 MiB. Measured after the first apply, after 5 s idle,
# and again after 1000 Status calls and a Volumes call (buffers grown by use).
# Usage: bench/daemon-idle-rss.sh   (root, dbus installed)
source "$(dirname "$0")/daemon-common.sh"
cd "$ROOT"
cargo build --release --quiet
KVSTRAP=$ROOT/target/release/kvstrap
start_bus
start_daemon
sleep 5
idle=$(rss_kib)
for _ in $(seq 1000); do
    call org.kvstrap.Bootstrap1.Status >/dev/null
done
call org.kvstrap.Bootstrap1.Volumes >/dev/null
sleep 2
used=$(rss_kib)
awk -v idle="$idle" -v used="$used" 'BEGIN {
    printf "idle RSS: %d KiB (%.1f MiB); after 1000 Status + Volumes calls: %d KiB (%.1f MiB); goal < 15 MiB\n",
        idle, idle / 1024, used, used / 1024 }'
[ "$used" -lt $((15 * 1024)) ]
