#!/usr/bin/env bash
# Benchmarks of `kvstrap apply`, on loop devices this script creates (root, release build).
#
#   small   8 fresh 4 GiB disks, shared xfs layout with volume directories: `kvstrap apply`
#           against bench/baseline-serial.sh (sgdisk + mkfs.xfs + mount + mkdir), same run.
#           Goal: kvstrap <= 0.3x the script's time (issue 3).
#   noop32  no-op re-apply with 32 provisioned disks / 320 volumes. Goal: <= 50 ms.
#   cold60  60 fresh 4 GiB disks, shared xfs, 10 volumes each, against the CPU bound of this
#           machine measured in the same run, on the same kind of fresh disks:
#             bound = (the 60 mkfs.xfs runs one after the other, summed) / cores
#                     + the partitioning (the 60 disks given their GPT at once: sfdisk
#                       --no-reread + partx -a per disk, all started together).
#           mkfs.xfs gets kvstrap's own arguments (-q -f -K -m uuid=... -L ...). Goal:
#           kvstrap <= 1.3x the bound (issue 23).
#   noop60  no-op re-apply and `plan` with those 60 disks / 600 volumes. Goal: <= 60 ms.
#
# Usage: bench/apply.sh [small|noop32|cold60|noop60|all]...   (default: all)
#   KVSTRAP_BIN     the binary measured (default target/release/kvstrap, built if missing)
#   KVSTRAP_BEFORE  another binary (an earlier commit's release build) measured in the same
#                   run, on the same disks, for before/after tables
#   ROUNDS          rounds of the cold benchmarks (default 3; medians are printed)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
need_root
BIN=$(realpath "$(kvstrap_bin)")
BEFORE=${KVSTRAP_BEFORE:+$(realpath "$KVSTRAP_BEFORE")}
ROUNDS=${ROUNDS:-3}
CORES=$(nproc)
export KVSTRAP_LOCK="$BENCH_DIR/lock" KVSTRAP_LOG=warn
SECTIONS=("$@")
[ ${#SECTIONS[@]} -gt 0 ] || SECTIONS=(all)
wants() { [[ " ${SECTIONS[*]} " == *" $1 "* || " ${SECTIONS[*]} " == *" all "* ]]; }

# The binaries measured, labelled: "after" (KVSTRAP_BIN) and, when given, "before".
LABELS=(kvstrap) BINS=("$BIN")
if [ -n "$BEFORE" ]; then LABELS=(after before) BINS=("$BIN" "$BEFORE"); fi

echo "machine: $CORES cores, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2

fresh_disks() {
    bench_cleanup_loops
    make_loops "$1" "$2"
}
bench_cleanup_loops() {
    for dev in "${BENCH_LOOPS[@]}"; do
        awk -v d="$dev" '$1 == d || index($1, d "p") == 1 { print $2 }' /proc/self/mounts
    done | sort -r | while read -r m; do umount "$m"; done
    # Partitions added with BLKPG outlive `losetup -d`: delete them first (like partx -d).
    for dev in "${BENCH_LOOPS[@]}"; do
        partx -d "$dev" 2>/dev/null || true
        losetup -d "$dev"
    done
    BENCH_LOOPS=()
    rm -rf "$BENCH_DIR"/disk*.img "$BENCH_DIR/storage" "$BENCH_DIR/base" "$BENCH_DIR/state"
}
now_ns() { date +%s%N; }
ms_since() { echo $(( ($(now_ns) - $1) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
cold_apply() {
    local bin=$1 t0
    write_policy "$BENCH_DIR/policy.toml" shared xfs "volume_count = $2" "${BENCH_LOOPS[@]}"
    sync
    t0=$(now_ns)
    # Called in $(...), where set -e does not reach: a failed apply ends the benchmark.
    if ! "$bin" --policy "$BENCH_DIR/policy.toml" --state-dir "$BENCH_DIR/state" apply >/dev/null; then
        echo "benchmark stopped: $bin apply failed (see above)" >&2
        kill -TERM $$
        exit 1
    fi
    ms_since "$t0"
}
# hyperfine over `apply` (and `plan`) of every binary on the disks provisioned now;
# prints "label command mean_ms" lines.
noop_means() {
    local json=$BENCH_DIR/noop.json args=() i
    for i in "${!BINS[@]}"; do
        args+=(-n "${LABELS[$i]} apply" "${BINS[$i]} --policy $BENCH_DIR/policy.toml --state-dir $BENCH_DIR/state apply")
    done
    for i in "${!BINS[@]}"; do
        args+=(-n "${LABELS[$i]} plan" "${BINS[$i]} --policy $BENCH_DIR/policy.toml --state-dir $BENCH_DIR/state plan")
    done
    hyperfine -N --warmup 3 --min-runs 30 --export-json "$json" "${args[@]}" >&2
    jq -r '.results[] | "\(.command) \(.mean * 1000 * 10 | round / 10) \(.stddev * 1000 * 10 | round / 10)"' "$json"
}

if wants small; then
    base_times=() kv_times=()
    for ((r = 1; r <= ROUNDS; r++)); do
        fresh_disks 8 4G
        t0=$(now_ns); bench/baseline-serial.sh "$BENCH_DIR/base" 8 "${BENCH_LOOPS[@]}"
        base_times+=("$(ms_since "$t0")")
        fresh_disks 8 4G
        kv_times+=("$(cold_apply "$BIN" 8)")
        echo "round $r: script ${base_times[-1]} ms, kvstrap ${kv_times[-1]} ms" >&2
    done
    base=$(printf '%s\n' "${base_times[@]}" | median)
    kv=$(printf '%s\n' "${kv_times[@]}" | median)
    echo "apply 8 x 4 GiB shared xfs: serial script ${base} ms, kvstrap ${kv} ms, ratio $(ratio "$kv" "$base")x (goal <= 0.30x)"
fi

if wants noop32; then
    fresh_disks 32 1G
    cold_apply "$BIN" 10 >/dev/null
    noop_means | while read -r label cmd mean sd; do
        echo "no-op $cmd, 32 disks / 320 volumes, $label: mean ${mean} ms ± ${sd}$([ "$cmd" = apply ] && echo ' (goal <= 50 ms)')"
    done
fi

# The CPU bound of a cold apply of 60 fresh disks: see the header. Prints "P M" (ms).
cpu_bound_parts() {
    local t0 d m=0 layout=$BENCH_DIR/layout.sfd
    printf 'label: gpt\nstart=2048, type=6b767374-7261-7000-8000-6b7673747261\n' >"$layout"
    sync
    t0=$(now_ns)
    for d in "${BENCH_LOOPS[@]}"; do
        { sfdisk -q --no-reread --no-tell-kernel "$d" <"$layout" >/dev/null && partx -a "$d"; } &
    done
    wait
    local p; p=$(ms_since "$t0")
    for d in "${BENCH_LOOPS[@]}"; do
        [ -b "${d}p1" ] || { echo "no partition node ${d}p1" >&2; exit 1; }
    done
    for d in "${BENCH_LOOPS[@]}"; do
        t0=$(now_ns)
        mkfs.xfs -q -f -K -m "uuid=$(cat /proc/sys/kernel/random/uuid)" -L kvs-1234abcd "${d}p1"
        m=$(( m + $(now_ns) - t0 ))
    done
    echo "$p $(( m / 1000000 ))"
}

if wants cold60 || wants noop60; then
    declare -A cold=()
    bounds=() parts=() mkfss=()
    rounds=$ROUNDS
    wants cold60 || rounds=0
    for ((r = 1; r <= rounds; r++)); do
        fresh_disks 60 4G
        read -r p m < <(cpu_bound_parts)
        bound=$(( m / CORES + p ))
        bounds+=("$bound") parts+=("$p") mkfss+=("$m")
        line="round $r: bound ${bound} ms (mkfs ${m} ms / ${CORES} + partitioning ${p} ms)"
        for i in "${!BINS[@]}"; do
            fresh_disks 60 4G
            t=$(cold_apply "${BINS[$i]}" 10)
            cold[${LABELS[$i]}]+="$t "
            line+=", ${LABELS[$i]} ${t} ms"
        done
        echo "$line" >&2
    done
    if wants cold60; then
        bound=$(printf '%s\n' "${bounds[@]}" | median)
        p=$(printf '%s\n' "${parts[@]}" | median)
        m=$(printf '%s\n' "${mkfss[@]}" | median)
        for label in "${LABELS[@]}"; do
            t=$(printf '%s\n' ${cold[$label]} | median)
            echo "cold apply 60 x 4 GiB shared xfs, 600 volumes, $label: ${t} ms = $(ratio "$t" "$bound")x the CPU bound ${bound} ms (mkfs ${m} ms serial / ${CORES} cores + partitioning ${p} ms) (goal <= 1.3x)"
        done
    else
        fresh_disks 60 4G
        cold_apply "$BIN" 10 >/dev/null
    fi
    if wants noop60; then
        noop_means | while read -r label cmd mean sd; do
            echo "no-op $cmd, 60 disks / 600 volumes, $label: mean ${mean} ms ± ${sd}$([ "$cmd" = apply ] && echo ' (goal <= 60 ms)')"
        done
    fi
fi
