#!/bin/bash
# `systemd-analyze verify` on kvstrap.service and the kubelet drop-in, offline (no systemd
# PID 1 needed): a throw-away root holds this machine's unit directory (for
# sysinit.target and friends), a stub kubelet.service, the units under test and the
# binary they run, and verify runs with --root on it. Man pages are checked separately
# (verify would run man(1) outside the root).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/packaging-lib.sh
. "$HERE/packaging-lib.sh"

# verify_units_root UNITS_DIR DROPIN_DIR BINARY ROOT: builds the verification root.
verify_units_root() {
    local units=$1 dropins=$2 binary=$3 root=$4
    mkdir -p "$root/usr/lib/systemd" "$root/usr/bin" "$root/etc"
    cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
    ln -sfn usr/bin "$root/bin"
    cp /bin/kill /bin/true "$root/usr/bin/"
    cp "$binary" "$root/usr/bin/kvstrap"
    cp "$units/kvstrap.service" "$root/usr/lib/systemd/system/"
    mkdir -p "$root/usr/lib/systemd/system/kubelet.service.d"
    cp "$dropins/10-kvstrap.conf" "$root/usr/lib/systemd/system/kubelet.service.d/"
    printf '[Unit]\nDescription=stand-in for kubelet\n[Service]\nExecStart=/bin/true\n' \
        >"$root/usr/lib/systemd/system/kubelet.service"
}

# verify_clean ROOT UNIT...: verify exits 0 on unknown keys and bad values (it only
# logs "ignoring"), so any output at all is a failure.
verify_clean() {
    local root=$1 out
    shift
    out=$(systemd-analyze verify --man=no --root="$root" "$@" 2>&1) || { echo "$out"; return 1; }
    [ -z "$out" ] || { echo "$out"; return 1; }
}

# has_lines FILE LINE...: FILE contains every LINE, whole.
has_lines() {
    local file=$1 line
    shift
    for line in "$@"; do grep -qxF -- "$line" "$file" || { echo "missing: $line"; return 1; }; done
}

# verify_units UNITS_DIR DROPIN_DIR BINARY: the checks on the units.
verify_units() {
    local units=$1 dropins=$2 binary=$3 root
    root=$(mktemp -d /tmp/kvstrap-units.XXXXXX)
    verify_units_root "$units" "$dropins" "$binary" "$root"
    check "units: systemd-analyze verify kvstrap.service kubelet.service (with drop-in)" \
        verify_clean "$root" kvstrap.service kubelet.service
    check "units: kubelet drop-in orders kubelet after kvstrap" \
        grep -qx 'After=kvstrap.service' "$dropins/10-kvstrap.conf"
    check "units: kvstrap.service is Type=notify, before kubelet, started by multi-user" \
        has_lines "$units/kvstrap.service" Type=notify NotifyAccess=main Before=kubelet.service \
        WantedBy=multi-user.target KillMode=mixed StateDirectory=kvstrap RuntimeDirectory=kvstrap
    # Mount namespacing would hide kvstrap's mounts from kubelet and the host.
    check "units: no option that gives kvstrap a private mount namespace" \
        bash -c "! grep -E '^(ProtectSystem|ProtectHome|PrivateTmp|PrivateDevices|PrivateMounts|MountFlags|ReadWritePaths|ReadOnlyPaths|InaccessiblePaths|TemporaryFileSystem|BindPaths|BindReadOnlyPaths|ProtectKernelTunables|ProtectKernelModules|ProtectKernelLogs|ProtectControlGroups|ProtectProc|ProcSubset)=' '$units/kvstrap.service'"
    # cryptsetup waits for udev through SysV semaphores and opens /dev/mapper/control and
    # /dev/tpmrm0: encrypted groups need neither a private IPC namespace nor a device list.
    check "units: nothing that keeps cryptsetup from udev, the mapper or the TPM2" \
        bash -c "! grep -E '^(PrivateIPC|DevicePolicy|DeviceAllow|PrivateDevices|KeyringMode)=' '$units/kvstrap.service'"
    check "units: the system calls cryptsetup makes are allowed (keyring, ipc, memlock)" \
        grep -qx 'SystemCallFilter=@system-service @mount quotactl' "$units/kvstrap.service"
    local exposure
    exposure=$(systemd-analyze security --offline=yes --root="$root" kvstrap.service 2>/dev/null |
        sed -n 's/.*Overall exposure level for kvstrap.service: \([0-9.]*\).*/\1/p')
    echo "     (systemd-analyze security: exposure ${exposure:-unknown} of 10)"
    rm -rf "$root"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    REPO=$(cd "$HERE/.." && pwd)
    BIN=${1:-$REPO/target/debug/kvstrap}
    [ -x "$BIN" ] || { echo "no binary at $BIN (cargo build first, or pass its path)"; exit 1; }
    verify_units "$REPO/systemd" "$REPO/systemd/kubelet.service.d" "$BIN"
    pkg_summary "packaging-verify-units"
fi
