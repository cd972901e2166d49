# shellcheck shell=bash
# The base VM image of tests/vm/boot-in-vm.sh: a plain Debian 12 system (systemd as PID 1,
# udev, dbus, Debian's own kernel with XFS and ext4 quota support), built once with
# debootstrap from this machine's APT mirror and cached outside the checkout, because
# CI starts from a fresh clone on the same machine and debootstrap takes minutes.
#
# The cache key is a hash of this file: change anything here (packages, configuration)
# and the next run builds a new image. Sourced by boot-in-vm.sh; uses its helpers
# (log, track_mount, untrack_mount, debian_mirror).

IMAGE_SUITE=bookworm
# What a bare-metal node has, minus what a test cannot use (no network, no ssh).
# jq: the guest's checks read kvstrap's JSON. busybox-static: the test's small initramfs
# (tests/vm/boot/initramfs.sh). multipath-tools (with kpartx): SAN LUNs reach a node as
# several paths under dm-multipath (tests/vm/mpath-in-vm.sh); it makes no map of the
# other tests' virtio disks. cryptsetup-bin (with dmsetup and its udev rules) and the
# TSS2 libraries systemd loads for TPM2 sealing: what kvstrap's .deb depends on and
# recommends for encrypted groups (dpkg -i in the installed image fetches nothing).
# tpm2-tools: the guest's checks read and extend PCRs of the software TPM.
# The kernel is installed in a second step, in the chroot, the way an installer does.
IMAGE_PACKAGES=systemd,systemd-sysv,udev,dbus,xfsprogs,e2fsprogs,util-linux,kmod,procps,jq,libblkid1,busybox-static,multipath-tools,kpartx,cryptsetup-bin,libtss2-esys-3.0.2-0,libtss2-rc0,libtss2-mu0,tpm2-tools
IMAGE_KERNEL=linux-image-amd64
IMAGE_SIZE=3G

image_cache_key() {
    sha256sum "${BASH_SOURCE[0]}" | cut -c1-16
}

# Prints the directory that holds root.img and vmlinuz, building them if needed.
cached_base_image() {
    local cache=$1 key dir
    key=$(image_cache_key)
    dir=$cache/base-$key
    mkdir -p "$cache"
    # One builder at a time: two CI runs on this machine would otherwise race.
    exec {lockfd}>"$cache/lock"
    flock "$lockfd"
    if [ ! -f "$dir/complete" ]; then
        local start=$SECONDS
        log "building the base VM image ($IMAGE_SUITE, key $key) from $(debian_mirror); takes minutes once"
        rm -rf "$dir.tmp"
        mkdir -p "$dir.tmp"
        build_base_image "$dir.tmp" >"$cache/build-$key.log" 2>&1 ||
            { tail -n 40 "$cache/build-$key.log" >&2; rm -rf "$dir.tmp"; flock -u "$lockfd"; return 1; }
        touch "$dir.tmp/complete"
        rm -rf "$dir" && mv "$dir.tmp" "$dir"
        # Images of older inputs are useless now; keep the disk free.
        find "$cache" -maxdepth 1 -name 'base-*' ! -name "base-$key" -exec rm -rf {} +
        log "base image built in $((SECONDS - start)) s: $dir"
    fi
    flock -u "$lockfd"
    echo "$dir"
}

build_base_image() {
    local out=$1 mnt=$1/mnt
    set -x
    truncate -s "$IMAGE_SIZE" "$out/root.img"
    mkfs.ext4 -q -F -L vmroot "$out/root.img"
    mkdir -p "$mnt"
    mount -o loop "$out/root.img" "$mnt"
    track_mount "$mnt"
    debootstrap --variant=minbase --include="$IMAGE_PACKAGES" "$IMAGE_SUITE" "$mnt" "$(debian_mirror)"
    configure_base_image "$mnt"
    install_kernel "$mnt"
    cp "$mnt"/boot/vmlinuz-* "$out/vmlinuz"
    # Packages are not needed any more; a smaller image copies faster on every run.
    rm -rf "$mnt"/var/cache/apt/archives/*.deb "$mnt"/var/lib/apt/lists/*
    fstrim "$mnt" 2>/dev/null || true
    umount "$mnt"
    untrack_mount "$mnt"
    rmdir "$mnt"
    e2fsck -fy "$out/root.img" >/dev/null || [ $? -le 1 ]
    set +x
}

configure_base_image() {
    local root=$1
    echo kvs-node >"$root/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 kvs-node\n' >"$root/etc/hosts"
    echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$root/etc/fstab"
    # Volatile journal: faster under emulation, and each boot's journal is its own, which
    # is what the reboot checks look at (the guest saves what the host needs to files).
    mkdir -p "$root/etc/systemd/journald.conf.d"
    printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=64M\n' >"$root/etc/systemd/journald.conf.d/vmtest.conf"
    # Nothing that only costs boot time: no login prompts, no timers, no network waits.
    local unit
    for unit in serial-getty@ttyS0.service serial-getty@ttyS1.service getty@tty1.service \
        apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
        fstrim.timer systemd-timesyncd.service systemd-networkd-wait-online.service; do
        ln -sf /dev/null "$root/etc/systemd/system/$unit"
    done
    # Debian's initrd is not what qemu boots (see initramfs.sh); a small one builds fast.
    mkdir -p "$root/etc/initramfs-tools/conf.d"
    echo 'MODULES=list' >"$root/etc/initramfs-tools/conf.d/vmtest.conf"
    printf '%s\n' virtio_pci virtio_blk ext4 >>"$root/etc/initramfs-tools/modules"
}

# The kernel, installed like an installer does: in the chroot, /proc mounted, no daemons.
install_kernel() {
    local root=$1
    mount -t proc proc "$root/proc"
    track_mount "$root/proc"
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    chroot "$root" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -qq --no-install-recommends "$IMAGE_KERNEL"
    rm -f "$root/usr/sbin/policy-rc.d"
    umount "$root/proc"
    untrack_mount "$root/proc"
}

