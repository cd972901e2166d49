#!/usr/bin/env bash
# Benchmarks for issue 3, on loop devices this script creates:
#  1. 8 fresh 4 GiB disks, shared xfs layout with volume directories: `kvstrap apply`
#     against bench/baseline-serial.sh (sgdisk + mkfs.xfs + mount + mkdir), same run.
#     Goal: kvstrap <= 0.3x the script's time.
#  2. no-op re-apply with 32 provisioned disks. Goal: under 200 ms.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
need_root
BIN=$(kvstrap_bin)
ROUNDS=${ROUNDS:-3}
VOLS=8
export KVSTRAP_LOCK="$BENCH_DIR/lock" KVSTRAP_LOG=warn

fresh_disks() {
    bench_cleanup_loops
    make_loops "$1" "$2"
}
bench_cleanup_loops() {
    for dev in "${BENCH_LOOPS[@]}"; do
        awk -v d="$dev" '$1 == d || index($1, d "p") == 1 { print $2 }' /proc/self/mounts
    done | sort -r | while read -r m; do umount "$m"; done
    for dev in "${BENCH_LOOPS[@]}"; do losetup -d "$dev"; done
    BENCH_LOOPS=()
    rm -rf "$BENCH_DIR"/disk*.img "$BENCH_DIR/storage" "$BENCH_DIR/base" "$BENCH_DIR/state"
}
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

base_times=() kv_times=()
for ((r = 1; r <= ROUNDS; r++)); do
    fresh_disks 8 4G
    t0=$(now_ms); bench/baseline-serial.sh "$BENCH_DIR/base" "$VOLS" "${BENCH_LOOPS[@]}"; t1=$(now_ms)
    base_times+=($((t1 - t0)))
    fresh_disks 8 4G
    write_policy "$BENCH_DIR/policy.toml" shared xfs "volume_count = $VOLS" "${BENCH_LOOPS[@]}"
    sync
    t0=$(now_ms); "$BIN" --policy "$BENCH_DIR/policy.toml" --state-dir "$BENCH_DIR/state" apply >/dev/null; t1=$(now_ms)
    kv_times+=($((t1 - t0)))
    echo "round $r: script ${base_times[-1]} ms, kvstrap ${kv_times[-1]} ms" >&2
done
base=$(printf '%s\n' "${base_times[@]}" | median)
kv=$(printf '%s\n' "${kv_times[@]}" | median)
echo "apply 8 x 4 GiB shared xfs: serial script ${base} ms, kvstrap ${kv} ms, ratio $(awk -v a="$kv" -v b="$base" 'BEGIN{printf "%.2f", a/b}')x (goal <= 0.30x)"

fresh_disks 32 1G
write_policy "$BENCH_DIR/policy.toml" shared xfs "volume_count = 10" "${BENCH_LOOPS[@]}"
"$BIN" --policy "$BENCH_DIR/policy.toml" --state-dir "$BENCH_DIR/state" apply >/dev/null
hyperfine -N --warmup 2 --min-runs 20 --export-json "$BENCH_DIR/noop.json" \
    "$BIN --policy $BENCH_DIR/policy.toml --state-dir $BENCH_DIR/state apply" >&2
noop=$(jq '.results[0].mean * 1000 | . * 10 | round / 10' "$BENCH_DIR/noop.json")
echo "no-op re-apply, 32 provisioned disks / 320 volumes: mean ${noop} ms (goal < 200 ms)"
