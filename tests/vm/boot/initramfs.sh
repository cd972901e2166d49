# shellcheck shell=bash
# The initramfs the test VMs boot, built from the OS image's own busybox and modules
# (cheap, so made on every run rather than cached with the base image).
# The initramfs qemu boots: busybox, the modules that reach the root disk (virtio, ext4)
# and an init that mounts /dev/vda and hands over to systemd. Debian's own initrd (in
# /boot, unused) runs udev and waits for it to settle, which under software emulation on
# a busy 2-core machine took minutes; everything after switch_root is the plain system.
build_initramfs() {
    local root=$1 out=$2 kver dir m
    kver=$(ls "$root/usr/lib/modules")
    dir=$(dirname "$out")/initramfs
    rm -rf "$dir" && mkdir -p "$dir"/{bin,dev,proc,sys,root,mod}
    cp "$root/bin/busybox" "$dir/bin/busybox"
    for m in sh mount umount insmod switch_root sleep cat; do ln -s busybox "$dir/bin/$m"; done
    : >"$dir/mod/order"
    for m in $(module_load_order "$root/usr/lib/modules/$kver" kernel/crypto/crc32c_generic.ko \
        kernel/drivers/virtio/virtio_pci.ko kernel/drivers/block/virtio_blk.ko kernel/fs/ext4/ext4.ko | awk '!seen[$0]++'); do
        cp "$root/usr/lib/modules/$kver/$m" "$dir/mod/"
        basename "$m" >>"$dir/mod/order"
    done
    cat >"$dir/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mod/order); do insmod /mod/$m; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 /dev/vda /root || { echo "initramfs: cannot mount /dev/vda"; sleep 5; exit 1; }
mount --move /dev /root/dev; umount /proc /sys
exec switch_root /root /sbin/init
INIT
    chmod 755 "$dir/init"
    (cd "$dir" && find . | cpio -o -H newc --quiet | gzip -1) >"$out"
    rm -rf "$dir"
}

# Modules in dependency order: each one's needs (modules.dep) before it.
module_load_order() {
    local moddir=$1 m deps
    shift
    for m in "$@"; do
        deps=$(awk -F': ' -v m="$m" '$1 == m {print $2}' "$moddir/modules.dep")
        # shellcheck disable=SC2086 # a list of paths
        [ -z "$deps" ] || module_load_order "$moddir" $deps
        echo "$m"
    done
}
