# shellcheck shell=bash
# Helpers of tests/vm/boot-in-vm.sh: logging, results, and the bookkeeping that lets the
# exit trap undo exactly what this script did (its mounts, its loop devices, its qemu),
# and nothing else.

log() { printf '[boot-in-vm %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

PASSED=0
FAILED=0
# result NAME PASS|FAIL DETAIL: one line per check, counted for the summary.
result() {
    local name=$1 verdict=$2
    shift 2
    printf 'boot-in-vm: %-24s %s: %s\n' "$name" "$verdict" "$*"
    if [ "$verdict" = PASS ]; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi
}

# --- what the trap undoes -----------------------------------------------------------
MOUNTS=()   # mount points, unmounted in reverse order
QEMU_PIDS=()
SWTPM_PIDS=() # the software TPMs of the runs (they also end with qemu's connection)
track_mount() { MOUNTS+=("$1"); }
untrack_mount() {
    local i
    for i in "${!MOUNTS[@]}"; do [ "${MOUNTS[$i]}" = "$1" ] && unset 'MOUNTS[i]'; done
    return 0
}
cleanup() {
    local i pid
    for pid in "${QEMU_PIDS[@]}" "${SWTPM_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    # Reverse order: /proc inside a root before the root itself. mount -o loop made the
    # loop devices with autoclear, so unmounting also detaches them.
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        [ -n "${MOUNTS[$i]:-}" ] || continue
        mountpoint -q "${MOUNTS[$i]}" && { umount "${MOUNTS[$i]}" || umount -l "${MOUNTS[$i]}"; }
    done
    MOUNTS=()
}

# The Debian mirror this machine's APT uses (as packaging/test-packages finds it), or
# KVSTRAP_DEBIAN_MIRROR: the only network this test uses.
debian_mirror() {
    local m=${KVSTRAP_DEBIAN_MIRROR:-}
    [ -n "$m" ] && { echo "$m"; return; }
    m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' |
        grep -v security | grep -E '/debian/?$' | head -n1)
    [ -z "$m" ] && m=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
        awk '{print $2}' | grep -v security | grep -E '/debian/?$' | head -n1)
    if [ -z "$m" ]; then
        echo "no Debian mirror in /etc/apt/sources.list(.d); set KVSTRAP_DEBIAN_MIRROR" >&2
        return 1
    fi
    echo "$m"
}

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        --no-install-recommends "$@" >/dev/null
}

# qemu-system-x86 must match the machine's qemu-utils, which comes from
# bookworm-backports: bookworm's own 7.2 would remove it. Backports are added from the
# same mirror when the machine's sources lack them (pinned at 100: nothing else moves).
install_host_tools() {
    local missing=() t
    for t in debootstrap:debootstrap mkfs.xfs:xfsprogs mkfs.ext4:e2fsprogs socat:socat \
        jq:jq cpio:cpio sha256sum:coreutils losetup:mount flock:util-linux \
        cryptsetup:cryptsetup-bin swtpm:swtpm; do
        command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
    done
    [ ${#missing[@]} -eq 0 ] || { apt_install "${missing[@]}" || { apt-get update -qq && apt_install "${missing[@]}"; }; }
    command -v qemu-system-x86_64 >/dev/null 2>&1 && return 0
    local target=()
    if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q bpo12; then
        if ! apt-cache policy | grep -q bookworm-backports; then
            printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
                "$(debian_mirror)" >/etc/apt/sources.list.d/kvstrap-bookworm-backports.sources
        fi
        apt-get -o DPkg::Lock::Timeout=300 update -qq
        target=(-t bookworm-backports)
    fi
    apt_install "${target[@]}" qemu-system-x86 || { apt-get update -qq && apt_install "${target[@]}" qemu-system-x86; }
}
