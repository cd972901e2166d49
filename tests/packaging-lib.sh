# shellcheck shell=bash
# Shared helpers of the packaging test scripts: counters and a `check NAME CMD...` that
# records pass/fail and shows the tail of a failing command's output.

PKG_PASS=${PKG_PASS:-0}
PKG_FAIL=${PKG_FAIL:-0}
PKG_FAILED_NAMES=${PKG_FAILED_NAMES:-}

pkg_pass() { PKG_PASS=$((PKG_PASS + 1)); echo "ok   - $*"; }
pkg_fail() {
    PKG_FAIL=$((PKG_FAIL + 1))
    PKG_FAILED_NAMES="${PKG_FAILED_NAMES}    $*"$'\n'
    echo "FAIL - $*"
}

# check NAME CMD [ARGS...]: runs CMD; its output is shown only when it fails. Returns
# CMD's success, so a check that later ones depend on can stop them: `check ... || return`.
check() {
    local name=$1 out
    shift
    out=$(mktemp)
    if "$@" >"$out" 2>&1; then
        pkg_pass "$name"
        rm -f "$out"
        return 0
    fi
    pkg_fail "$name"
    sed 's/^/    | /' "$out" | tail -n 25
    rm -f "$out"
    return 1
}

# check_fails NAME CMD [ARGS...]: CMD must exit non-zero.
check_fails() {
    local name=$1
    shift
    if "$@" >/dev/null 2>&1; then pkg_fail "$name (unexpectedly succeeded)"; else pkg_pass "$name"; fi
}

# pkg_summary LABEL: the final line; exit status 1 when anything failed.
pkg_summary() {
    if [ "$PKG_FAIL" -ne 0 ]; then
        echo "failed checks:"
        printf '%s' "$PKG_FAILED_NAMES"
    fi
    echo "$1: $PKG_PASS passed, $PKG_FAIL failed"
    [ "$PKG_FAIL" -eq 0 ]
}

# need_tools PKG...: installs Debian packages that are missing (CI runs as root).
need_apt_packages() {
    local missing=()
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "${missing[@]}" >/dev/null ||
        { apt-get -o DPkg::Lock::Timeout=300 update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "${missing[@]}" >/dev/null; }
}
