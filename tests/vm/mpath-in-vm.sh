#!/usr/bin/env bash
# SAN LUNs through dm-multipath, on Debian 12 with multipathd and Debian's kernel, under
# qemu: one LUN image attached twice, as two SCSI disks of one WWN on a virtio-scsi HBA
# (two paths of one LUN, as a SAN presents it).
#
# What it proves (docs/testing.md, "SAN LUNs through dm-multipath"):
#   run 1, boot 1: kvstrap sees the map as one disk (transport mpath, both paths active)
#     and the paths as its paths; apply provisions the map once, through its partition
#     mappings (mpatha-part1, -part2, as multipath-tools names them) and mounts them by
#     those names; no step and no log line names a path; the kernel has no partition of
#     its own on the paths;
#   run 1, boot 2 (reboot): same partition and filesystem UUIDs, nothing destructive, an
#     empty plan, the marker intact; a path taken offline makes the map degraded (a
#     warning, volumes still published), back online it is healthy again; a path
#     hot-unplugged (device_del on the monitor) leaves the map served and degraded, its
#     volumes writable;
#   run 2, multipathd masked: the two disks of one WWN are refused, each naming the other
#     and multipathd, and the LUN image is byte for byte what run 1 left.
#
# Usage (root): tests/vm/mpath-in-vm.sh [path/to/kvstrap]   (default target/debug/kvstrap)
# Environment: as tests/vm/boot-in-vm.sh (KVSTRAP_VM_CACHE, KVSTRAP_DEBIAN_MIRROR,
#   KVSTRAP_VM_SMP, KVSTRAP_VM_TIMEOUT). Output ends with "mpath-in-vm: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
HERE=$REPO/tests/vm/boot
# shellcheck source=tests/vm/boot/lib.sh
. "$HERE/lib.sh"
# shellcheck source=tests/vm/boot/image.sh
. "$HERE/image.sh"
# shellcheck source=tests/vm/boot/initramfs.sh
. "$HERE/initramfs.sh"

BIN=${1:-target/debug/kvstrap}
CACHE=${KVSTRAP_VM_CACHE:-/var/cache/kvstrap-vm}
SMP=${KVSTRAP_VM_SMP:-2}
VM_TIMEOUT=${KVSTRAP_VM_TIMEOUT:-900}
WORK=$REPO/target/vm-mpath
MNT=$WORK/mnt
GUEST=$REPO/tests/vm/mpath
LUN=$WORK/lun.img
# The LUN's WWN (an NAA name, as a SAN array gives it); multipathd's WWID is 3 + it.
WWN=0x5000c50015ea71ac

log() { printf '[mpath-in-vm %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
result() {
    local name=$1 verdict=$2
    shift 2
    printf 'mpath-in-vm: %-28s %s: %s\n' "$name" "$verdict" "$*"
    if [ "$verdict" = PASS ]; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi
}

# A fresh copy of the base image with kvstrap, the policy, multipath.conf and the runner.
prepare_os_image() {
    local img=$1 phase=$2 base=$3
    cp --sparse=always "$base/root.img" "$img"
    mkdir -p "$MNT"
    mount -o loop "$img" "$MNT"
    track_mount "$MNT"
    [ -f "$WORK/initrd.img" ] || build_initramfs "$MNT" "$WORK/initrd.img"
    strip -o "$MNT/usr/local/bin/kvstrap" "$BIN"
    install -D -m 0644 "$GUEST/policy.toml" "$MNT/etc/kvstrap/policy.toml"
    chroot "$MNT" kvstrap --policy /etc/kvstrap/policy.toml validate >/dev/null
    install -D -m 0644 "$GUEST/multipath.conf" "$MNT/etc/multipath.conf"
    install -D -m 0755 "$GUEST/run" "$MNT/usr/local/lib/vmtest/run"
    install -m 0644 "$HERE/guest/vmtest.service" "$MNT/etc/systemd/system/"
    # The same unit as the full-boot test, without the daemon and kubelet it waits for.
    sed -i 's/^After=.*/After=multi-user.target multipathd.service/' "$MNT/etc/systemd/system/vmtest.service"
    chroot "$MNT" systemctl enable vmtest.service >/dev/null 2>&1
    if [ "$phase" = nompath ]; then
        ln -sf /dev/null "$MNT/etc/systemd/system/multipathd.service"
        ln -sf /dev/null "$MNT/etc/systemd/system/multipathd.socket"
    fi
    mkdir -p "$MNT/etc/vmtest"
    printf 'PHASE=%s\nWWN=%s\nWWID=3%s\n' "$phase" "$WWN" "${WWN#0x}" >"$MNT/etc/vmtest/env"
    umount "$MNT"
    untrack_mount "$MNT"
}

collect_guest_logs() {
    local img=$1 dest=$2
    mkdir -p "$dest" "$MNT"
    mount -o loop,ro,noload "$img" "$MNT"
    track_mount "$MNT"
    cp -r "$MNT/var/log/vmtest/." "$dest/" 2>/dev/null || true
    umount "$MNT"
    untrack_mount "$MNT"
}

monitor() { printf '%s\n' "$2" | socat -t 2 - "UNIX-CONNECT:$1" >/dev/null; }

# run_vm NAME IMAGE BASE: boots until the guest powers off (or the timeout), unplugging the
# second path when the guest asks for it.
run_vm() {
    local name=$1 img=$2 base=$3 run=$WORK/$1
    mkdir -p "$run"
    rm -f "$run/console.log" "$run/vmtest.log" "$run/monitor.sock"
    local path_args=() i
    # Two paths of one LUN: the same file twice (no image locking between them), one WWN
    # and serial, share-rw as for a disk two hosts' HBAs reach.
    for i in 1 2; do
        path_args+=(-drive "file=$LUN,format=raw,if=none,id=lun-p$i,cache=unsafe,file.locking=off"
            -device "scsi-hd,bus=scsi0.0,drive=lun-p$i,id=path$i,wwn=$WWN,serial=KVSLUN1,share-rw=on")
    done
    local start=$SECONDS
    # Software emulation (TCG), as the other VM tests: /dev/kvm on the CI machine is there
    # but qemu aborts on it (nested KVM refuses an MSR of -cpu max).
    timeout --kill-after=10 "$VM_TIMEOUT" qemu-system-x86_64 \
        -accel tcg -cpu max -smp "$SMP" -m 1024 -nodefaults -no-user-config -display none \
        -kernel "$base/vmlinuz" -initrd "$WORK/initrd.img" \
        -append "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=error net.ifnames=0" \
        -drive "file=$img,format=raw,if=none,id=os,cache=unsafe" -device virtio-blk-pci,drive=os \
        -device virtio-scsi-pci,id=scsi0 "${path_args[@]}" \
        -serial "file:$run/console.log" -serial "file:$run/vmtest.log" \
        -monitor "unix:$run/monitor.sock,server,nowait" &
    local pid=$!
    QEMU_PIDS+=("$pid")
    local unplugged=0
    while kill -0 "$pid" 2>/dev/null; do
        if grep -q 'Kernel panic' "$run/console.log" 2>/dev/null; then
            result "$name-kernel" FAIL "kernel panic; see $run/console.log"
            kill "$pid" 2>/dev/null || true
            break
        fi
        if [ "$unplugged" = 0 ] && grep -q 'VMTEST-UNPLUG ready' "$run/vmtest.log" 2>/dev/null; then
            log "$name: hot-unplugging path 2 (device_del path2)"
            monitor "$run/monitor.sock" "device_del path2" && unplugged=1 || unplugged=2
        fi
        sleep 1
    done
    local rc=0
    wait "$pid" || rc=$?
    echo "$((SECONDS - start))" >"$run/wall-seconds"
    log "$name: qemu exited with $rc after $((SECONDS - start)) s wall"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        result "$name-finished" FAIL "qemu killed after the ${VM_TIMEOUT}s timeout; see $run/console.log"
    fi
    return 0
}

# "VMTEST name PASS|FAIL: detail" lines become results; a phase never done failed.
report_guest() {
    local name=$1 line
    shift
    local log=$WORK/$name/vmtest.log
    tr -d '\r' <"$log" >"$log.txt" 2>/dev/null || : >"$log.txt"
    while IFS= read -r line; do
        case "$line" in
        "VMTEST "*" PASS: "* | "VMTEST "*" FAIL: "*)
            line=${line#VMTEST }
            result "${line%% *}" "$(echo "$line" | awk '{print $2}' | tr -d :)" "${line#* * }"
            ;;
        "VMTEST-NOTE "*) printf 'mpath-in-vm: note %s\n' "${line#VMTEST-NOTE }" ;;
        esac
    done <"$log.txt"
    for phase in "$@"; do
        grep -qx "VMTEST-DONE $phase" "$log.txt" ||
            result "$phase-completed" FAIL "the guest never finished phase $phase; see $WORK/$name/console.log and $WORK/logs/"
    done
}

main() {
    [ "$(id -u)" = 0 ] || { echo "mpath-in-vm: needs root (loop mounts, chroot)" >&2; exit 2; }
    [ -x "$BIN" ] || { echo "mpath-in-vm: no kvstrap binary at $BIN (cargo build first)" >&2; exit 2; }
    PASSED=0 FAILED=0
    local t0=$SECONDS base
    trap cleanup EXIT
    install_host_tools
    base=$(cached_base_image "$CACHE")
    log "base image $base ready after $((SECONDS - t0)) s"
    rm -rf "$WORK" && mkdir -p "$WORK/logs"
    truncate -s 1G "$LUN"

    prepare_os_image "$WORK/os1.img" boot1 "$base"
    log "run 1: multipathd, first boot on the blank LUN, reboot, a path offline, a path unplugged"
    run_vm run1 "$WORK/os1.img" "$base"
    collect_guest_logs "$WORK/os1.img" "$WORK/logs/run1"
    report_guest run1 boot1 boot2

    local before after
    before=$(sha256sum "$LUN" | cut -d' ' -f1)
    prepare_os_image "$WORK/os2.img" nompath "$base"
    log "run 2: multipathd masked, the same two paths"
    run_vm run2 "$WORK/os2.img" "$base"
    collect_guest_logs "$WORK/os2.img" "$WORK/logs/run2"
    report_guest run2 nompath
    after=$(sha256sum "$LUN" | cut -d' ' -f1)
    if [ "$before" = "$after" ]; then
        result lun-untouched-without-multipathd PASS "the LUN image has the same sha256 after the boot without multipathd (${after:0:16}...)"
    else
        result lun-untouched-without-multipathd FAIL "the LUN image changed: ${before:0:16}... -> ${after:0:16}..."
    fi

    rm -f "$WORK/os1.img" "$WORK/os2.img" "$LUN"
    log "VM part took $((SECONDS - t0)) s wall (run 1: $(cat "$WORK/run1/wall-seconds") s, run 2: $(cat "$WORK/run2/wall-seconds") s)"
    echo "mpath-in-vm: $PASSED passed, $FAILED failed"
    [ "$FAILED" = 0 ]
}

main "$@"
