#!/usr/bin/env bash
# Full-boot VM test: kvstrap's .deb on a plain Debian 12 node, with systemd as PID 1, udev,
# dbus and Debian's own kernel (which has XFS and ext4 project quotas), under qemu.
#
# What it proves, on every run (docs/testing.md, "The full-boot VM test"):
#   first boot on blank virtio disks: one apply, no failed step, every mount there when
#   (a stand-in) kubelet starts, READY=1 before kubelet, a PV manifest for every volume;
#   quotas hold at the published capacity for uid 107 on xfs and ext4; a foreign ext4 disk
#   is reported and left byte for byte; a hot-plugged disk is provisioned (time reported);
#   D-Bus reads open and Apply/Reload denied to uid 65534; the documented journal
#   MESSAGE_IDs; after a reboot the same UUIDs, nothing destructive and an empty plan; after
#   an OS reinstall on the same data disks the disks adopted and data byte-identical.
#   Encryption at rest (docs/encryption.md): key-file groups (directory volumes on xfs with
#   quotas, Block volumes) and a TPM2 group sealed to a software TPM (swtpm) are encrypted,
#   provisioned and published on the first boot; the reboot unlocks them (the TPM2 one with
#   no key on the node) with nothing destructive; a changed PCR 7 and the reinstall's fresh
#   TPM state leave the TPM2 volume locked, reported and intact; a foreign LUKS2 disk stays
#   byte for byte; kills inside and after the LUKS2 format converge; a benchmark compares
#   the cold apply of 4 encrypted and 4 plain disks.
#
# Usage (root): tests/vm/boot-in-vm.sh [path/to/kvstrap_*_amd64.deb]
# Environment: KVSTRAP_VM_CACHE (base image cache, default /var/cache/kvstrap-vm),
#   KVSTRAP_DEBIAN_MIRROR, KVSTRAP_VM_SMP (vCPUs, default 2), KVSTRAP_VM_TIMEOUT (seconds
#   per qemu run, default 900), KVSTRAP_VM_BENCH_ONLY=1 (one short boot with only the
#   benchmark's 9 disks, running only the LUKS2 benchmark: for iterating on its figure;
#   not a test of the rest, and its summary counts that one check).
# Output ends with "boot-in-vm: N passed, M failed"; exits non-zero when M > 0.
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

CACHE=${KVSTRAP_VM_CACHE:-/var/cache/kvstrap-vm}
SMP=${KVSTRAP_VM_SMP:-2}
VM_TIMEOUT=${KVSTRAP_VM_TIMEOUT:-900}
WORK=$REPO/target/vm-boot
DISKS=$WORK/disks
MNT=$WORK/mnt

# Data disks: SERIAL SIZE. Sparse files; at least 300 MiB each for mkfs.xfs.
DATA_DISKS=("KVSXFS1 3G" "KVSEXT4S1 2G" "KVSBLK1 1G" "KVSEXT4Q1 1G" "KVSFOREIGN1 512M"
    "KVSLUKSFS1 1G" "KVSLUKSBLK1 512M" "KVSTPM1 512M" "KVSFORLUKS1 256M")
# Only in the first boot's VM, for the checks that run kvstrap with policies of their own:
# the kills around the LUKS2 format, and the benchmark (4 plain, 4 encrypted disks).
# KVSFLOOR1: no policy's; the benchmark times the encryption of 4 x 64 MiB of zeroes on it
# (what the 4 encrypted mkfs.xfs runs' log zeroing costs under emulation).
BENCH_DISKS=("KVSBP1 1G" "KVSBP2 1G" "KVSBP3 1G" "KVSBP4 1G" "KVSBE1 1G" "KVSBE2 1G" "KVSBE3 1G" "KVSBE4 1G"
    "KVSFLOOR1 512M")
FIRST_BOOT_DISKS=("KVSCRASH1 640M" "${BENCH_DISKS[@]}")
HOT_DISK="KVSHOT1 2G"
FOREIGN=KVSFOREIGN1
FOREIGN_UUID=6b767374-f0e1-4bad-8bad-000000000001
FOREIGN_LUKS=KVSFORLUKS1
TPM_DISK=KVSTPM1

# What the guest must find (it knows the policy only through these). The reinstalled OS
# boots with a fresh TPM state: the TPM2 group's volume stays locked there, one mount less.
guest_env() {
    cat <<EOF
PHASE=$1
EXPECT_MOUNTS_BOOT1=6
EXPECT_MOUNTS_LATER=7
EXPECT_MOUNTS_REINSTALL=6
EXPECT_GROUPS="xfs-shared ext4-separate block ext4-shared luks-xfs luks-block tpm-ext4"
PT_SERIALS="KVSXFS1 KVSEXT4S1 KVSBLK1 KVSEXT4Q1 KVSLUKSFS1 KVSLUKSBLK1 KVSTPM1 ${HOT_DISK% *}"
FS_SERIALS="KVSXFS1 KVSEXT4S1 KVSEXT4Q1 KVSLUKSFS1 KVSTPM1 ${HOT_DISK% *}"
LUKS_SERIALS="KVSLUKSFS1 KVSLUKSBLK1 KVSTPM1"
FOREIGN_SERIAL=$FOREIGN
FOREIGN_LUKS_SERIAL=$FOREIGN_LUKS
HOT_SERIAL=${HOT_DISK% *}
QUOTA_XFS_GROUP=xfs-shared
QUOTA_EXT4_GROUP=ext4-shared
QUOTA_LUKS_GROUP=luks-xfs
MARKER_GROUPS="xfs-shared ext4-separate luks-xfs"
BLOCK_GROUP=block
BLOCK_SERIAL=KVSBLK1
LUKS_BLOCK_GROUP=luks-block
LUKS_BLOCK_SERIAL=KVSLUKSBLK1
TPM_GROUP=tpm-ext4
TPM_SERIAL=$TPM_DISK
KEY_FILE=/etc/kvstrap/keys/vm.key
CRASH_SERIAL=KVSCRASH1
BENCH_PLAIN="KVSBP1 KVSBP2 KVSBP3 KVSBP4"
BENCH_LUKS="KVSBE1 KVSBE2 KVSBE3 KVSBE4"
BENCH_FLOOR=KVSFLOOR1
EOF
}

find_deb() {
    local deb=${1:-}
    # shellcheck disable=SC2012 # newest first; the names are ours
    [ -n "$deb" ] || deb=$(ls -t "$REPO"/target/packages/kvstrap_*_amd64.deb 2>/dev/null | head -n1)
    [ -f "$deb" ] || { echo "no .deb: run packaging/build-packages first, or pass its path" >&2; return 1; }
    echo "$deb"
}

# --- data disks -----------------------------------------------------------------------

make_data_disks() {
    rm -rf "$DISKS" && mkdir -p "$DISKS"
    local d
    for d in "${DATA_DISKS[@]}" "${FIRST_BOOT_DISKS[@]}" "$HOT_DISK"; do truncate -s "${d#* }" "$DISKS/${d% *}.img"; done
    # The foreign disk holds an ext4 with a file on it, made here, before the VM ever runs.
    mkdir -p "$WORK/foreign-content"
    echo "somebody else's data" >"$WORK/foreign-content/precious.txt"
    mkfs.ext4 -q -F -U "$FOREIGN_UUID" -L foreign -d "$WORK/foreign-content" "$DISKS/$FOREIGN.img"
    sha256sum "$DISKS/$FOREIGN.img" | cut -d' ' -f1 >"$WORK/foreign.sha256"
    # Someone else's LUKS2 volume, with a key the node never sees.
    head -c 64 /dev/urandom >"$WORK/theirs.key"
    cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
        --label theirs --key-file "$WORK/theirs.key" "$DISKS/$FOREIGN_LUKS.img"
    sha256sum "$DISKS/$FOREIGN_LUKS.img" | cut -d' ' -f1 >"$WORK/foreign-luks.sha256"
    # The node's key file for the key-file groups (installed in both OS images).
    head -c 64 /dev/urandom >"$WORK/vm.key"
}

# --- the software TPM --------------------------------------------------------------------

# start_swtpm NAME: a TPM 2.0 emulator with its state in $WORK/tpm-NAME (fresh when the
# directory is new), serving qemu on $WORK/tpm-NAME/sock; it ends with qemu's connection.
# Prints qemu's arguments for it, one per line.
start_swtpm() {
    local dir=$WORK/tpm-$1 i
    mkdir -p "$dir"
    rm -f "$dir/sock"
    swtpm socket --tpm2 --tpmstate "dir=$dir" --ctrl "type=unixio,path=$dir/sock" \
        --log "file=$dir/swtpm.log,level=1" --terminate --daemon --pid "file=$dir/swtpm.pid" >&2
    for i in $(seq 50); do [ -S "$dir/sock" ] && break; sleep 0.1; done
    printf -- '-chardev\nsocket,id=chrtpm,path=%s\n-tpmdev\nemulator,id=tpm0,chardev=chrtpm\n-device\ntpm-tis,tpmdev=tpm0\n' "$dir/sock"
}

# -drive/-device pairs for the disks present at boot (serials give /dev/disk/by-id names).
disk_args() {
    local d serial
    for d in "$@"; do
        serial=${d% *}
        printf -- '-drive\nfile=%s,format=raw,if=none,id=%s,cache=unsafe\n-device\nvirtio-blk-pci,drive=%s,serial=%s\n' \
            "$DISKS/$serial.img" "$serial" "$serial" "$serial"
    done
}

# --- the OS image -----------------------------------------------------------------------

# A fresh copy of the base image with the .deb installed the way a PXE install does it
# (dpkg -i in the installer's chroot: /proc mounted, no systemd running, a policy-rc.d
# that refuses starts), the node's policy, the stand-in kubelet and the test runner.
prepare_os_image() {
    local img=$1 phase=$2 base=$3 deb=$4
    cp --sparse=always "$base/root.img" "$img"
    mkdir -p "$MNT"
    mount -o loop "$img" "$MNT"
    track_mount "$MNT"
    install_deb "$MNT" "$deb" "$phase"
    [ -f "$WORK/initrd.img" ] || build_initramfs "$MNT" "$WORK/initrd.img"
    install -D -m 0644 "$HERE/policy.toml" "$MNT/etc/kvstrap/policy.toml"
    # The key file before the policy that names it is validated (root's, 0400).
    install -d -m 0700 "$MNT/etc/kvstrap/keys"
    install -m 0400 -o root -g root "$WORK/vm.key" "$MNT/etc/kvstrap/keys/vm.key"
    chroot "$MNT" kvstrap --policy /etc/kvstrap/policy.toml validate >/dev/null
    install -D -m 0755 "$HERE/guest/run" "$MNT/usr/local/lib/vmtest/run"
    install -D -m 0755 "$HERE/guest/kubelet-standin" "$MNT/usr/local/lib/vmtest/kubelet-standin"
    install -m 0644 "$HERE/guest/kubelet.service" "$HERE/guest/vmtest.service" "$MNT/etc/systemd/system/"
    chroot "$MNT" systemctl enable kubelet.service vmtest.service >/dev/null 2>&1
    mkdir -p "$MNT/etc/vmtest"
    guest_env "$phase" >"$MNT/etc/vmtest/env"
    cp "$WORK/marker" "$MNT/etc/vmtest/marker"
    sha256sum "$WORK/marker" >"$MNT/etc/vmtest/marker.sha256"
    # The reinstalled OS knows what the first one saw only through these.
    [ -f "$WORK/logs/run1/uuids" ] && cp "$WORK/logs/run1/uuids" "$MNT/etc/vmtest/uuids.expected"
    [ -f "$WORK/logs/run1/markers" ] && cp "$WORK/logs/run1/markers" "$MNT/etc/vmtest/markers.expected"
    umount "$MNT"
    untrack_mount "$MNT"
}

install_deb() {
    local root=$1 deb=$2 label=$3 out
    mount -t proc proc "$root/proc"
    track_mount "$root/proc"
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    cp "$deb" "$root/tmp/kvstrap.deb"
    out=$(chroot "$root" dpkg -i /tmp/kvstrap.deb 2>&1) || { echo "$out" >&2; return 1; }
    rm -f "$root/tmp/kvstrap.deb" "$root/usr/sbin/policy-rc.d"
    umount "$root/proc"
    untrack_mount "$root/proc"
    local enabled started=""
    enabled=$(chroot "$root" systemctl is-enabled kvstrap.service 2>&1 || true)
    [ -e "$root/var/lib/kvstrap" ] && started="$started /var/lib/kvstrap"
    [ -e "$root/run/kvstrap" ] && started="$started /run/kvstrap"
    if [ "$enabled" = enabled ] && [ -L "$root/etc/systemd/system/multi-user.target.wants/kvstrap.service" ] &&
        [ -z "$started" ] && [ -f "$root/usr/lib/systemd/system/kubelet.service.d/10-kvstrap.conf" ]; then
        result "install-$label" PASS "dpkg -i in the chroot: kvstrap.service enabled, not started, kubelet drop-in installed"
    else
        result "install-$label" FAIL "is-enabled: $enabled; traces of a start:${started:- none}"
    fi
}

# Copies what the guest saved (/var/log/vmtest) out of a stopped VM's root image.
collect_guest_logs() {
    local img=$1 dest=$2
    mkdir -p "$dest" "$MNT"
    # noload: a VM killed by the timeout leaves a journal to replay; read it as it is.
    mount -o loop,ro,noload "$img" "$MNT"
    track_mount "$MNT"
    cp -r "$MNT/var/log/vmtest/." "$dest/" 2>/dev/null || true
    umount "$MNT"
    untrack_mount "$MNT"
}

# --- qemu ---------------------------------------------------------------------------------

# run_vm NAME IMAGE BASE DISK...: boots until the guest powers off (or the timeout),
# answering its hot-plug request through the monitor.
run_vm() {
    local name=$1 img=$2 base=$3
    shift 3
    local run=$WORK/$name
    mkdir -p "$run"
    rm -f "$run/console.log" "$run/vmtest.log" "$run/monitor.sock"
    # The OS disk's -device comes first, so it is /dev/vda (if=virtio drives would be
    # created after every -device, behind the data disks).
    local args=() tpm=()
    mapfile -t args < <(disk_args "$@")
    mapfile -t tpm < <(start_swtpm "$TPM_STATE")
    [ -f "$WORK/tpm-$TPM_STATE/swtpm.pid" ] && SWTPM_PIDS+=("$(cat "$WORK/tpm-$TPM_STATE/swtpm.pid")")
    local start=$SECONDS
    # Software emulation (TCG): /dev/kvm is not usable on the CI machine.
    timeout --kill-after=10 "$VM_TIMEOUT" qemu-system-x86_64 \
        -accel tcg -cpu max -smp "$SMP" -m 1024 -nodefaults -no-user-config -display none \
        -kernel "$base/vmlinuz" -initrd "$WORK/initrd.img" \
        -append "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=error net.ifnames=0" \
        -drive "file=$img,format=raw,if=none,id=os,cache=unsafe" -device virtio-blk-pci,drive=os \
        "${args[@]}" "${tpm[@]}" \
        -serial "file:$run/console.log" -serial "file:$run/vmtest.log" \
        -monitor "unix:$run/monitor.sock,server,nowait" &
    local pid=$!
    QEMU_PIDS+=("$pid")
    local hotplugged=0
    while kill -0 "$pid" 2>/dev/null; do
        # The guest reboots once on purpose, so qemu may not exit on a reset: a panic would
        # loop until the timeout. Stop at the first one instead.
        if grep -q 'Kernel panic' "$run/console.log" 2>/dev/null; then
            result "$name-kernel" FAIL "kernel panic: $(grep -m1 -B2 'Kernel panic' "$run/console.log" | tr -d '\r' | tr '\n' ' ' | cut -c1-300)"
            kill "$pid" 2>/dev/null || true
            break
        fi
        if [ "$hotplugged" = 0 ] && grep -q 'VMTEST-HOTPLUG ready' "$run/vmtest.log" 2>/dev/null; then
            hotplug_disk "$run/monitor.sock" && hotplugged=1 || hotplugged=2
        fi
        sleep 1
    done
    local rc=0
    wait "$pid" || rc=$?
    log "$name: qemu exited with $rc after $((SECONDS - start)) s wall"
    echo "$((SECONDS - start))" >"$run/wall-seconds"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && result "$name-finished" FAIL "qemu killed after the ${VM_TIMEOUT}s timeout; last console lines in $run/console.log"
    return 0
}

monitor() { printf '%s\n' "$2" | socat -t 2 - "UNIX-CONNECT:$1" >/dev/null; }

hotplug_disk() {
    local sock=$1 serial=${HOT_DISK% *}
    log "hot-plugging $serial through the qemu monitor"
    monitor "$sock" "drive_add 0 file=$DISKS/$serial.img,format=raw,if=none,id=hot-$serial,cache=unsafe" &&
        monitor "$sock" "device_add virtio-blk-pci,drive=hot-$serial,serial=$serial,id=dev-$serial"
}

# "VMTEST name PASS|FAIL: detail" lines of a run become results; a phase that never said
# it was done failed as a whole (crash, hang, or a runner that never started).
report_guest() {
    local name=$1
    shift
    local log=$WORK/$name/vmtest.log line phase
    tr -d '\r' <"$log" >"$log.txt" 2>/dev/null || : >"$log.txt"
    while IFS= read -r line; do
        case "$line" in
        "VMTEST "*" PASS: "* | "VMTEST "*" FAIL: "*)
            line=${line#VMTEST }
            result "${line%% *}" "$(echo "$line" | awk '{print $2}' | tr -d :)" "${line#* * }"
            ;;
        "VMTEST-BENCH "*) printf 'boot-in-vm: bench %s\n' "${line#VMTEST-BENCH }" ;;
        "VMTEST-NOTE "*) printf 'boot-in-vm: note %s\n' "${line#VMTEST-NOTE }" ;;
        esac
    done <"$log.txt"
    for phase in "$@"; do
        grep -qx "VMTEST-DONE $phase" "$log.txt" ||
            result "$phase-completed" FAIL "the guest never finished phase $phase; see $WORK/$name/console.log and $WORK/logs/"
    done
}

check_foreign_bytes() {
    local before after
    before=$(cat "$WORK/foreign.sha256")
    after=$(sha256sum "$DISKS/$FOREIGN.img" | cut -d' ' -f1)
    if [ "$before" = "$after" ]; then
        result foreign-untouched PASS "$FOREIGN's image has the same sha256 after three boots (${after:0:16}...)"
    else
        result foreign-untouched FAIL "$FOREIGN's image changed: sha256 ${before:0:16}... -> ${after:0:16}..."
    fi
    before=$(cat "$WORK/foreign-luks.sha256")
    after=$(sha256sum "$DISKS/$FOREIGN_LUKS.img" | cut -d' ' -f1)
    if [ "$before" = "$after" ] && cryptsetup open --test-passphrase --key-file "$WORK/theirs.key" "$DISKS/$FOREIGN_LUKS.img"; then
        result foreign-luks-untouched PASS "$FOREIGN_LUKS (someone's LUKS2) has the same sha256 after three boots (${after:0:16}...) and its owner's key still opens it"
    else
        result foreign-luks-untouched FAIL "$FOREIGN_LUKS changed: sha256 ${before:0:16}... -> ${after:0:16}..."
    fi
}

# The reinstalled OS met a fresh TPM: the TPM2 group's disk must come out of that boot as
# it went in, byte for byte (locked, reported, never formatted).
check_tpm_disk_intact() {
    local before=$1 after
    after=$(sha256sum "$DISKS/$TPM_DISK.img" | cut -d' ' -f1)
    if [ "$before" = "$after" ]; then
        result tpm-disk-intact PASS "$TPM_DISK's image has the same sha256 before and after the boot with a fresh TPM state (${after:0:16}...)"
    else
        result tpm-disk-intact FAIL "$TPM_DISK's image changed in the boot with a fresh TPM state: ${before:0:16}... -> ${after:0:16}..."
    fi
}

main() {
    [ "$(id -u)" = 0 ] || { echo "boot-in-vm: needs root (loop mounts, chroot)" >&2; exit 2; }
    local t0=$SECONDS deb base
    deb=$(find_deb "${1:-}")
    trap cleanup EXIT
    install_host_tools
    base=$(cached_base_image "$CACHE")
    log "base image $base ready after $((SECONDS - t0)) s; package $(basename "$deb")"
    rm -rf "$WORK" && mkdir -p "$WORK/logs"
    head -c 1M /dev/urandom >"$WORK/marker"
    make_data_disks

    if [ "${KVSTRAP_VM_BENCH_ONLY:-0}" = 1 ]; then
        prepare_os_image "$WORK/os1.img" bench "$base" "$deb"
        log "benchmark only: one boot with the benchmark's disks"
        TPM_STATE=run1 run_vm run1 "$WORK/os1.img" "$base" "${BENCH_DISKS[@]}"
        collect_guest_logs "$WORK/os1.img" "$WORK/logs/run1"
        report_guest run1 bench
        rm -f "$WORK/os1.img"
        log "benchmark-only run took $((SECONDS - t0)) s wall"
        echo "boot-in-vm: $PASSED passed, $FAILED failed"
        [ "$FAILED" = 0 ]
        return
    fi

    # Run 1: first boot on blank disks, hot-plug, then a reboot of the same VM (and of its
    # software TPM, whose state survives the reboot).
    prepare_os_image "$WORK/os1.img" boot1 "$base" "$deb"
    log "run 1: first boot on blank disks, hot-plug, reboot"
    TPM_STATE=run1 run_vm run1 "$WORK/os1.img" "$base" "${DATA_DISKS[@]}" "${FIRST_BOOT_DISKS[@]}"
    collect_guest_logs "$WORK/os1.img" "$WORK/logs/run1"
    report_guest run1 boot1 boot2

    # Run 2: the OS reinstalled (a fresh image, the .deb again) on the same data disks, and
    # a fresh TPM state: what was sealed to the first one stays locked.
    prepare_os_image "$WORK/os2.img" reinstall "$base" "$deb"
    log "run 2: reinstalled OS on the same data disks, fresh TPM"
    local tpm_before
    tpm_before=$(sha256sum "$DISKS/$TPM_DISK.img" | cut -d' ' -f1)
    TPM_STATE=run2 run_vm run2 "$WORK/os2.img" "$base" "${DATA_DISKS[@]}" "$HOT_DISK"
    collect_guest_logs "$WORK/os2.img" "$WORK/logs/run2"
    report_guest run2 reinstall

    check_foreign_bytes
    check_tpm_disk_intact "$tpm_before"
    # The OS images are 3 GiB sparse copies: keep the logs, not them.
    rm -f "$WORK/os1.img" "$WORK/os2.img"
    log "VM part took $((SECONDS - t0)) s wall (run 1: $(cat "$WORK/run1/wall-seconds") s, run 2: $(cat "$WORK/run2/wall-seconds") s)"
    echo "boot-in-vm: $PASSED passed, $FAILED failed"
    [ "$FAILED" = 0 ]
}

main "$@"
exit
