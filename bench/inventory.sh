#!/usr/bin/env bash
# Benchmark for issue 2: `kvstrap disks` and `kvstrap plan` on 32 loop devices, as a
# ratio to `lsblk -J -O` on the same machine in the same run. Goal: under 5x.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
need_root
BIN=$(kvstrap_bin)
make_loops 32 1G
# A realistic mix: some disks carry filesystems, a GPT, swap.
mkfs.ext4 -q "${BENCH_LOOPS[0]}"; mkswap -q "${BENCH_LOOPS[1]}" >/dev/null
sgdisk -n 1:0:+100M "${BENCH_LOOPS[2]}"
write_policy "$BENCH_DIR/policy.toml" shared ext4 'volume_size = "100M"' "${BENCH_LOOPS[@]}"
hyperfine --warmup 3 --min-runs 20 -N --export-json "$BENCH_DIR/inv.json" \
    -n lsblk "lsblk -J -O" \
    -n disks "$BIN --policy $BENCH_DIR/policy.toml --state-dir $BENCH_DIR/state disks -o json" \
    -n plan "$BIN --policy $BENCH_DIR/policy.toml --state-dir $BENCH_DIR/state plan -o json" >&2
jq -r '.results as $r | $r[0].mean as $base | $r[] |
  "\(.command): mean \(.mean * 1000 * 100 | round / 100) ms = \(.mean / $base * 100 | round / 100)x lsblk -J -O (goal < 5x)"' "$BENCH_DIR/inv.json"
