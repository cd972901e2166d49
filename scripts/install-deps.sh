#!/usr/bin/env bash
# Installs what building and testing kvstrap needs on Debian 12, only if missing.
set -euo pipefail
PACKAGES=(xfsprogs e2fsprogs gdisk fdisk util-linux mount libblkid-dev clang libclang-dev
    pkg-config dbus lvm2 cryptsetup-bin jq hyperfine
    # The real control plane of tests/kube_real.rs: Debian's etcd beside the kube-apiserver
    # and kube-controller-manager of ../shared/kube-control-plane (xz-compressed, TLS
    # material made with openssl, readiness and /metrics read with curl).
    etcd-server openssl curl xz-utils
    # Disk health (smartctl --json) and the metrics checks (promtool check metrics/rules).
    smartmontools prometheus
    # The real kubelet of tests/kubelet_real.rs (tests/support/kubelet.rs), beside the
    # kubelet and kube-scheduler of ../shared/kube-control-plane: Debian's containerd (with
    # ctr and the runc shim) and runc run its pods; gcc -static (libc6-dev has libc.a)
    # builds the sandbox image's pause, busybox-static fills the workload image.
    containerd runc gcc libc6-dev busybox-static
    # tests/noop_root.rs counts the processes a no-op apply starts (strace -f).
    strace
    # The full-boot VM test (tests/vm/boot-in-vm.sh): the software TPM 2.0 its encrypted
    # TPM2 group is sealed to (qemu -tpmdev emulator), and cryptsetup (above) to make the
    # foreign LUKS2 disk on the host.
    swtpm)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then echo "missing packages: ${missing[*]} (run as root to install)"; exit 1; fi
    apt-get update -qq -o DPkg::Lock::Timeout=300
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null
fi
# etcd-server enables a system etcd on 127.0.0.1:2379. The tests start their own on free
# ports, so it does not matter; where systemd runs, stop it all the same (it only costs
# memory). Without systemd as PID 1 (containers, CI) it was never started.
if [ -d /run/systemd/system ] && systemctl is-enabled --quiet etcd 2>/dev/null; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
fi
# Likewise containerd.service: the kubelet tests start their own containerd (own root, state
# and socket in a temp dir).
if [ -d /run/systemd/system ] && systemctl is-enabled --quiet containerd 2>/dev/null; then
    systemctl disable --now containerd >/dev/null 2>&1 || true
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt 2>/dev/null || true
