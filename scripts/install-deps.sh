#!/usr/bin/env bash
# Installs what building and testing kvstrap needs on Debian 12, only if missing.
set -euo pipefail
PACKAGES=(xfsprogs e2fsprogs gdisk fdisk util-linux mount libblkid-dev clang libclang-dev
    pkg-config dbus lvm2 cryptsetup-bin jq hyperfine)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then echo "missing packages: ${missing[*]} (run as root to install)"; exit 1; fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt 2>/dev/null || true
