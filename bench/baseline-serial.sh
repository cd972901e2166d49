#!/usr/bin/env bash
# The baseline of issue 3's benchmark: what an admin's serial script does to prepare
# disks for shared-layout volume directories. Usage: baseline-serial.sh ROOT VOLS DISK...
set -euo pipefail
root=$1 vols=$2; shift 2
for disk in "$@"; do
    sgdisk --zap-all "$disk" >/dev/null 2>&1 || true
    sgdisk -n 1:0:0 -t 1:8300 "$disk" >/dev/null
    partx -a "$disk" 2>/dev/null || partx -u "$disk"
    part="${disk}p1"
    for _ in $(seq 50); do [ -b "$part" ] && break; sleep 0.02; done
    mkfs.xfs -q -f "$part"
    mnt="$root/$(basename "$disk")"
    mkdir -p "$mnt"
    mount -o "${MOUNT_OPTS:-prjquota}" "$part" "$mnt"
    for i in $(seq -w 1 "$vols"); do
        mkdir -p "$mnt/vol-$i"
        chown 107:107 "$mnt/vol-$i"
        chmod 0750 "$mnt/vol-$i"
    done
done
