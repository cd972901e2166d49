# Shared helpers for the benchmarks: loop devices made here and removed on exit.
# Every benchmark touches only the sparse files and loop devices it created.

BENCH_DIR=$(mktemp -d /tmp/kvstrap-bench.XXXXXX)
BENCH_LOOPS=()

bench_cleanup() {
    # Unmount anything mounted from our loop devices, deepest first, then detach.
    for dev in "${BENCH_LOOPS[@]}"; do
        awk -v d="$dev" '$1 == d || index($1, d "p") == 1 { print $2 }' /proc/self/mounts
    done | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    for dev in "${BENCH_LOOPS[@]}"; do losetup -d "$dev" 2>/dev/null || true; done
    rm -rf "$BENCH_DIR"
}
trap bench_cleanup EXIT

# make_loops COUNT SIZE: sparse files attached to loop devices; prints nothing.
make_loops() {
    local count=$1 size=$2 i dev
    for ((i = 0; i < count; i++)); do
        truncate -s "$size" "$BENCH_DIR/disk$i.img"
        dev=$(losetup --find --show --partscan "$BENCH_DIR/disk$i.img")
        BENCH_LOOPS+=("$dev")
    done
}

# policy_for GROUPNAME LAYOUT FS VOLUMES DEVICES...: a policy selecting exactly these devices.
write_policy() {
    local file=$1 layout=$2 fs=$3 sizing=$4; shift 4
    local devs
    devs=$(printf '"%s", ' "$@")
    cat >"$file" <<TOML
[node]
name = "bench-node"
storage_root = "$BENCH_DIR/storage"

[[storage_class]]
name = "bench"
fs_type = "$fs"

[[disk_group]]
name = "bench"
storage_class = "bench"
layout = "$layout"
devices = [${devs%, }]
$sizing
allow_loop = true
quota = "$QUOTA"
TOML
}

# Kernels without XFS quotas (this CI machine's) cannot mount with prjquota: both kvstrap
# (quota = "if-supported") and the baseline script then mount without it.
if [ -e /proc/fs/xfs/xqmstat ]; then QUOTA=required MOUNT_OPTS=prjquota; else QUOTA=if-supported MOUNT_OPTS=defaults; fi
export MOUNT_OPTS

need_root() {
    if [ "$(id -u)" != 0 ]; then echo "benchmark needs root (loop devices)" >&2; exit 1; fi
}

kvstrap_bin() {
    local bin=${KVSTRAP_BIN:-target/release/kvstrap}
    [ -x "$bin" ] || cargo build --release --quiet
    echo "$bin"
}
