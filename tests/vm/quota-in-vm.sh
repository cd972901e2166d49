#!/usr/bin/env bash
# Proves on a kernel with project quotas that a directory volume cannot outgrow its
# published capacity, on xfs and on ext4. The CI machine's own kernel is built without
# CONFIG_XFS_QUOTA and CONFIG_QFMT_V2, so this boots Debian's kernel under qemu with an
# initramfs that holds kvstrap, mkfs and setpriv, and two blank virtual disks made here.
# It also proves wipe = "force" end to end on a disk named by serial, which loop devices
# (no serial, no WWN) cannot be. Prints "quota-in-vm: N passed, M failed"; exits
# non-zero on any failure.
# It also proves that a dynamic volume (a claim's directory on a pool, made by the same
# code the daemon runs: examples/dynamic_volume.rs) holds its size, and that the IO probe
# tells disks apart by measured speed: qemu throttles one disk to 200 IOPS and one to
# 800, a third runs free; three measurements in a row must class them slow, standard and
# fast, and a group with io_class = "fast" must take only the fast one, its PVs labelled.
# Usage (root): tests/vm/quota-in-vm.sh [path/to/kvstrap] [path/to/dynamic_volume]
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/debug/kvstrap}
DYN=${2:-target/debug/examples/dynamic_volume}
WORK=target/vm
mkdir -p "$WORK"

need() { command -v "$1" >/dev/null 2>&1; }
# qemu comes the way the full-boot test installs it (from bookworm-backports where the
# machine's qemu-utils does: bookworm's own qemu would remove it).
# shellcheck source=tests/vm/boot/lib.sh
. tests/vm/boot/lib.sh
need qemu-system-x86_64 || install_host_tools
if ! need busybox || ! need depmod || ! need cpio; then
    apt_install busybox-static kmod cpio || { apt-get -o DPkg::Lock::Timeout=300 update -qq && apt_install busybox-static kmod cpio; }
fi

# Debian's current kernel, unpacked (no install hooks), modules indexed with depmod.
kernel_package() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'; }
PKG=$(kernel_package)
if [ -z "$PKG" ]; then apt-get -o DPkg::Lock::Timeout=300 update -qq; PKG=$(kernel_package); fi
KVER=${PKG#linux-image-}
KROOT=$WORK/kernel-$KVER
if [ ! -e "$KROOT/boot/vmlinuz-$KVER" ]; then
    rm -rf "$KROOT" && mkdir -p "$KROOT"
    (cd "$WORK" && apt-get download "$PKG" 2>/dev/null)
    dpkg-deb -x "$WORK/${PKG}"_*.deb "$KROOT"
    rm -f "$WORK/${PKG}"_*.deb
    depmod -b "$KROOT" "$KVER"
fi
MODDIR=$KROOT/lib/modules/$KVER

# The initramfs: busybox, kvstrap and the programs it runs, their libraries, the modules.
INITRD=$WORK/initramfs
rm -rf "$INITRD" && mkdir -p "$INITRD"/{bin,dev,proc,sys,tmp,run,etc,mod}
cp "$(command -v busybox)" "$INITRD/bin/busybox"
for applet in $(busybox --list | grep -vx busybox); do ln -sf busybox "$INITRD/bin/$applet"; done
copy_with_libs() {
    local src=$1 dst=$2
    mkdir -p "$(dirname "$INITRD$dst")"
    cp "$src" "$INITRD$dst"
    # Scripts (xfs_admin) have no libraries of their own.
    head -c 4 "$src" | grep -q ELF || return 0
    ldd "$src" | grep -o '/[^ ]*' | while read -r lib; do
        mkdir -p "$(dirname "$INITRD$lib")"
        cp -L "$lib" "$INITRD$lib"
    done
}
strip -o "$WORK/kvstrap" "$BIN"
copy_with_libs "$WORK/kvstrap" /bin/kvstrap
strip -o "$WORK/dynamic_volume" "$DYN"
copy_with_libs "$WORK/dynamic_volume" /bin/dynamic_volume
# xfs_db (what the xfs_admin script runs) and e2label write the label that marks mkfs complete.
for prog in mkfs.xfs mkfs.ext4 setpriv xfs_admin xfs_db e2label; do copy_with_libs "$(command -v "$prog")" "/usr/sbin/$prog"; done
# Modules in dependency order (modules.dep lists each module's needs).
load_order() {
    local m
    for m in "$@"; do
        local deps
        deps=$(awk -F': ' -v m="$m" '$1 == m {print $2}' "$MODDIR/modules.dep")
        [ -n "$deps" ] && load_order $deps
        echo "$m"
    done
}
mods=$(cd "$MODDIR" && ls kernel/crypto/crc32c_generic.ko kernel/fs/quota/quota_v2.ko kernel/fs/xfs/xfs.ko \
    kernel/fs/ext4/ext4.ko kernel/drivers/virtio/virtio_pci.ko kernel/drivers/block/virtio_blk.ko)
: >"$INITRD/mod/order"
for m in $(load_order $mods | awk '!seen[$0]++'); do
    cp "$MODDIR/$m" "$INITRD/mod/"
    basename "$m" >>"$INITRD/mod/order"
done

cat >"$INITRD/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp; mount -t tmpfs run /run
for m in $(cat /mod/order); do insmod /mod/$m; done
for i in $(seq 50); do [ -b /dev/vdg ] && break; sleep 0.1; done
export KVSTRAP_LOCK=/run/lock KVSTRAP_LOG=warn PATH=/bin:/usr/sbin
passed=0 failed=0
check() { # fs serial: disks are named by serial, PCI order decides /dev/vdX
    fs=$1 serial=$2 root=/tmp/storage-$1
    cat >/tmp/$fs.toml <<POLICY
[node]
name = "vm"
storage_root = "$root"
[[storage_class]]
name = "c"
fs_type = "$fs"
[[disk_group]]
name = "g"
storage_class = "c"
layout = "shared"
match = { serial = "$serial" }
volume_size = "32000001"
POLICY
    k="kvstrap --policy /tmp/$fs.toml --state-dir /tmp/state-$fs"
    # Killed between a volume's project id and its limit (the host has no kernel quotas:
    # this is where tests/apply_root.rs leaves this kill point); the next apply finishes.
    KVSTRAP_FAILPOINT=quota_project_set $k apply >/tmp/crash.log 2>&1
    crashed=$?
    if [ "$crashed" != 137 ]; then
        echo "VMTEST $fs FAIL: not killed at quota_project_set (exit $crashed)"; cat /tmp/crash.log
        failed=$((failed + 1)); return
    fi
    if ! KVSTRAP_LOG=info $k apply >/tmp/apply.log 2>&1; then
        echo "VMTEST $fs FAIL: apply failed"; cat /tmp/apply.log; failed=$((failed + 1)); return
    fi
    vol=$($k volumes -o json | grep -o '"path": *"[^"]*"' | head -n 1 | cut -d'"' -f4)
    steps=$($k plan -o json | grep -c '"steps": \[\]')
    /usr/sbin/setpriv --reuid=107 --regid=107 --clear-groups dd if=/dev/zero of="$vol/fill" bs=1M count=64 conv=fsync 2>/tmp/dd.log
    rc=$?
    size=$(stat -c %s "$vol/fill")
    # 32000001 bytes is no multiple of the 4 KiB block: xfs keeps the limit rounded up
    # (32002048), and the next plan must still be empty.
    if [ "$rc" != 0 ] && [ "$size" -le 32002048 ] && [ "$steps" = 1 ]; then
        echo "VMTEST $fs PASS: killed between project id and limit, then applied; writing 64 MiB into a 32000001-byte volume stopped at $size bytes ($(grep -o 'No space left on device\|Disk quota exceeded' /tmp/dd.log | head -n 1)); plan empty"
        passed=$((passed + 1))
    else
        echo "VMTEST $fs FAIL: dd exit $rc, $size bytes written, converged=$steps"; cat /tmp/dd.log
        cat /tmp/apply.log; grep storage /proc/mounts; $k plan
        failed=$((failed + 1))
    fi
}
check_wipe() { # a disk with ext4 on it, named by serial (virtio disks have one)
    old=6b767374-dead-4bad-8bad-000000000001
    for wipe in never force; do
        cat >/tmp/wipe-$wipe.toml <<POLICY
[node]
name = "vm"
storage_root = "/tmp/storage-wipe"
[[storage_class]]
name = "w"
fs_type = "ext4"
[[disk_group]]
name = "w"
storage_class = "w"
layout = "separate"
match = { serial = "KVSWIPE1" }
volume_count = 2
wipe = "$wipe"
POLICY
    done
    k="kvstrap --state-dir /tmp/state-wipe --policy"
    refused=$($k /tmp/wipe-never.toml plan -o json | grep -c 'not empty: ext4')
    # Killed right after the ext4 signature was erased, before the kernel's partitions
    # were dropped; the next apply finishes the wipe and provisions the disk.
    KVSTRAP_LOG=info KVSTRAP_FAILPOINT=wipe_signature_erased $k /tmp/wipe-force.toml apply >/tmp/wipe.log 2>&1
    killed=$?
    KVSTRAP_LOG=info $k /tmp/wipe-force.toml apply >>/tmp/wipe.log 2>&1
    rc=$?
    gone=$($k /tmp/wipe-force.toml disks -o json | grep -c "$old")
    steps=$($k /tmp/wipe-force.toml plan -o json | grep -c '"steps": \[\]')
    logged=$(grep -c "$old" /tmp/wipe.log)
    if [ "$refused" -ge 1 ] && [ "$killed" = 137 ] && [ "$rc" = 0 ] && [ "$gone" = 0 ] && [ "$steps" = 1 ] && [ "$logged" -ge 1 ]; then
        echo "VMTEST wipe PASS: refused without wipe = force; wiped (and logged) with it, killed mid-wipe then finished; converged"
        passed=$((passed + 1))
    else
        echo "VMTEST wipe FAIL: refused=$refused killed=$killed apply=$rc old-uuid-seen=$gone converged=$steps logged=$logged"
        cat /tmp/wipe.log
        failed=$((failed + 1))
    fi
}
check_dynamic() { # a pool of a dynamic group; one claim's volume of 20000001 bytes
    cat >/tmp/dyn.toml <<POLICY
[node]
name = "vm"
storage_root = "/tmp/storage-dyn"
[[storage_class]]
name = "d"
fs_type = "xfs"
[[disk_group]]
name = "d"
storage_class = "d"
layout = "shared"
provisioning = "dynamic"
match = { serial = "KVSDYN1" }
POLICY
    k="kvstrap --policy /tmp/dyn.toml --state-dir /tmp/state-dyn"
    if ! KVSTRAP_LOG=info $k apply >/tmp/dyn.log 2>&1; then
        echo "VMTEST dynamic FAIL: apply failed"; cat /tmp/dyn.log; failed=$((failed + 1)); return
    fi
    uid=0b6b4c1e-8f0a-4c3e-9d55-3c1f0e8d2a11
    vol=$(dynamic_volume /tmp/dyn.toml /tmp/state-dyn $uid 20000001 2>>/tmp/dyn.log)
    again=$(dynamic_volume /tmp/dyn.toml /tmp/state-dyn $uid 20000001 2>>/tmp/dyn.log)
    steps=$($k plan -o json | grep -c '"steps": \[\]')
    /usr/sbin/setpriv --reuid=107 --regid=107 --clear-groups dd if=/dev/zero of="$vol/fill" bs=1M count=64 conv=fsync 2>/tmp/dd.log
    rc=$?
    size=$(stat -c %s "$vol/fill" 2>/dev/null || echo none)
    # 20000001 bytes round up to 20004864 (whole 4 KiB blocks): the quota holds that.
    if [ -n "$vol" ] && [ "$vol" = "$again" ] && [ "$rc" != 0 ] && [ "$size" -le 20004864 ] && [ "$steps" = 1 ]; then
        echo "VMTEST dynamic PASS: the volume of claim $uid ($vol, asked for 20000001 bytes, made twice: same directory) stopped a 64 MiB write at $size bytes ($(grep -o 'No space left on device\|Disk quota exceeded' /tmp/dd.log | head -n 1)); plan empty"
        passed=$((passed + 1))
    else
        echo "VMTEST dynamic FAIL: volume '$vol' (again '$again'), dd exit $rc, $size bytes written, converged=$steps"
        cat /tmp/dd.log /tmp/dyn.log; $k plan
        failed=$((failed + 1))
    fi
}
check_io() { # three blank disks of one size; qemu makes them fast, standard and slow
    cat >/tmp/io.toml <<POLICY
[node]
name = "vm"
storage_root = "/tmp/storage-io"
# Under software emulation a free virtio disk reads a few thousand 4 KiB blocks a second,
# not the hundred thousand of an NVMe drive: thresholds for this machine.
[io_class]
fast_min_random_read_iops = 1600
standard_min_random_read_iops = 400
[[storage_class]]
name = "f"
fs_type = "xfs"
[[disk_group]]
name = "f"
storage_class = "f"
layout = "shared"
volume_count = 2
match = { serial = "KVSIO*", io_class = "fast" }
POLICY
    k="kvstrap --policy /tmp/io.toml --state-dir /tmp/state-io"
    runs_right=0 figures=""
    for run in 1 2 3; do
        out=$($k disks --probe /dev/disk-fast /dev/disk-std /dev/disk-slow -o json 2>>/tmp/io.log)
        echo "$out" >>/tmp/io.log
        flat=$(echo "$out" | tr -d ' \n')
        right=0
        for want in fast:fast std:standard slow:slow; do
            dev=$(readlink -f "/dev/disk-${want%%:*}")
            obj=$(echo "$flat" | grep -o "\"disk\":\"$dev\",\"io\":{[^}]*}")
            class=$(echo "$obj" | grep -o '"class":"[a-z]*"' | cut -d'"' -f4)
            iops=$(echo "$obj" | grep -o '"random_read_iops":[0-9]*' | cut -d: -f2)
            figures="$figures ${want%%:*}=$class/$iops"
            [ "$class" = "${want#*:}" ] && right=$((right + 1))
        done
        figures="$figures;"
        [ "$right" = 3 ] && runs_right=$((runs_right + 1))
    done
    # A fresh state directory: apply measures the three itself (first sight) and takes
    # only the fast one.
    k="kvstrap --policy /tmp/io.toml --state-dir /tmp/state-io2"
    KVSTRAP_LOG=info $k apply >>/tmp/io.log 2>&1
    rc=$?
    taken=$($k volumes -o json | grep -o '"disk": *"[^"]*"' | sort -u | tr -d ' \n')
    labelled=$(grep -l 'kvstrap.io/io-class: fast' /tmp/state-io2/manifests/* 2>/dev/null | wc -l)
    slow_reason=$($k disks -o json | grep -c 'measured [0-9]* random reads/s.*(slow)')
    if [ "$runs_right" = 3 ] && [ "$rc" = 0 ] && [ "$taken" = "\"disk\":\"$(readlink -f /dev/disk-fast)\"" ] && [ "$labelled" = 2 ] && [ "$slow_reason" -ge 1 ]; then
        echo "VMTEST io PASS: classed right in $runs_right of 3 runs ($figures); apply measured them itself and took only the fast disk; its 2 PVs labelled kvstrap.io/io-class=fast"
        passed=$((passed + 1))
    else
        echo "VMTEST io FAIL: right in $runs_right of 3 ($figures); apply=$rc taken=$taken labelled=$labelled slow-reason=$slow_reason"
        cat /tmp/io.log; $k disks
        failed=$((failed + 1))
    fi
}
check xfs KVSXFS
check ext4 KVSEXT4
check_wipe
check_dynamic
# Names by serial (PCI order decides /dev/vdX), as udev's by-id links would be.
for d in /sys/block/vd*; do
    case "$(cat "$d/serial" 2>/dev/null)" in
    KVSIOFAST) ln -s "/dev/${d##*/}" /dev/disk-fast ;;
    KVSIOSTD) ln -s "/dev/${d##*/}" /dev/disk-std ;;
    KVSIOSLOW) ln -s "/dev/${d##*/}" /dev/disk-slow ;;
    esac
done
check_io
echo "VMTEST done: $passed passed, $failed failed"
poweroff -f
INIT
chmod +x "$INITRD/init"
(cd "$INITRD" && find . | cpio -o -H newc --quiet | gzip -1) >"$WORK/initrd.gz"

rm -f "$WORK/xfs.img" "$WORK/ext4.img" "$WORK/wipe.img" "$WORK/dyn.img" "$WORK"/io-*.img
truncate -s 512M "$WORK/xfs.img" "$WORK/ext4.img" "$WORK/dyn.img" "$WORK/io-fast.img" "$WORK/io-std.img" "$WORK/io-slow.img"
truncate -s 256M "$WORK/wipe.img"
mkfs.ext4 -q -F -U 6b767374-dead-4bad-8bad-000000000001 "$WORK/wipe.img"
# Software emulation: nested KVM hangs on some hosts (this CI machine's among them), and
# the whole test takes well under a minute without it.
timeout 600 qemu-system-x86_64 -accel tcg -cpu max -m 1024 -smp 2 -nographic -no-reboot \
    -kernel "$KROOT/boot/vmlinuz-$KVER" -initrd "$WORK/initrd.gz" \
    -append "console=ttyS0 panic=-1 quiet" \
    -drive file="$WORK/xfs.img",format=raw,if=none,id=xfs -device virtio-blk-pci,drive=xfs,serial=KVSXFS \
    -drive file="$WORK/ext4.img",format=raw,if=none,id=ext4 -device virtio-blk-pci,drive=ext4,serial=KVSEXT4 \
    -drive file="$WORK/wipe.img",format=raw,if=none,id=wipe -device virtio-blk-pci,drive=wipe,serial=KVSWIPE1 \
    -drive file="$WORK/dyn.img",format=raw,if=none,id=dyn -device virtio-blk-pci,drive=dyn,serial=KVSDYN1 \
    -drive file="$WORK/io-fast.img",format=raw,if=none,id=iofast -device virtio-blk-pci,drive=iofast,serial=KVSIOFAST \
    -drive file="$WORK/io-std.img",format=raw,if=none,id=iostd,throttling.iops-total=800 -device virtio-blk-pci,drive=iostd,serial=KVSIOSTD \
    -drive file="$WORK/io-slow.img",format=raw,if=none,id=ioslow,throttling.iops-total=200 -device virtio-blk-pci,drive=ioslow,serial=KVSIOSLOW \
    >"$WORK/console.log" 2>&1 || true
grep VMTEST "$WORK/console.log" || { tail -n 40 "$WORK/console.log"; }
rm -f "$WORK/xfs.img" "$WORK/ext4.img" "$WORK/wipe.img" "$WORK/dyn.img" "$WORK"/io-*.img
passed=$(grep -c 'VMTEST .* PASS' "$WORK/console.log" || true)
failed=$((5 - passed))
echo "quota-in-vm: $passed passed, $failed failed"
[ "$failed" = 0 ]
