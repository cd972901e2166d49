#!/bin/bash
# The D-Bus policy packaging/dbus/org.kvstrap.Bootstrap1.conf, loaded into a private
# dbus-daemon whose default policy is the system bus's: only root owns the name and calls
# Apply/Reload; anyone reads. A stand-in service (dbus-test-tool echo) answers every call,
# so what is tested is the bus policy alone. Needs root (to call as another uid) and the
# dbus, dbus-tests and util-linux (setpriv) packages.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/packaging-lib.sh
. "$HERE/packaging-lib.sh"

NAME=org.kvstrap.Bootstrap1
OBJ=/org/kvstrap/Bootstrap1

# dbus_policy_config POLICY SOCKET: a bus config like /usr/share/dbus-1/system.conf.
dbus_policy_config() {
    cat <<XML
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=$2</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>$1</include>
</busconfig>
XML
}

AS_NOBODY=(setpriv --reuid=65534 --regid=65534 --clear-groups)
CALL=(dbus-send --system --print-reply --reply-timeout=2000 "--dest=$NAME" "$OBJ")

call() { "${CALL[@]}" "$@"; }
# nobody_calls METHOD [ARGS...]: the call made as uid and gid 65534.
nobody_calls() { "${AS_NOBODY[@]}" "${CALL[@]}" "$@"; }

# denied CMD...: the call is refused by the bus with AccessDenied.
access_denied() { local out; out=$("$@" 2>&1) && return 1; grep -q 'org.freedesktop.DBus.Error.AccessDenied' <<<"$out"; }

# dbus-test-tool exits 1 with this message when RequestName is refused; had the bus let
# nobody have the name, it would keep serving until `timeout` stops it (status 124).
nobody_cannot_own() {
    local out
    out=$(timeout 3 "${AS_NOBODY[@]}" dbus-test-tool echo --system --name=$NAME 2>&1) && return 1
    grep -q 'failed to take bus name' <<<"$out"
}

test_dbus_policy() {
    local policy=$1 dir bus_pid echo_pid
    dir=$(mktemp -d /tmp/kvstrap-dbus.XXXXXX)
    chmod 755 "$dir"
    dbus_policy_config "$policy" "$dir/bus" >"$dir/bus.conf"
    check "dbus: policy file is accepted by dbus-daemon" \
        dbus-daemon --config-file="$dir/bus.conf" --print-address --fork --print-pid=3 3>"$dir/pid"
    bus_pid=$(cat "$dir/pid" 2>/dev/null)
    export DBUS_SYSTEM_BUS_ADDRESS="unix:path=$dir/bus"

    check "dbus: nobody may not own $NAME" nobody_cannot_own
    dbus-test-tool echo --system --name=$NAME >/dev/null 2>&1 &
    echo_pid=$!
    # Wait for root's stand-in to hold the name.
    for _ in $(seq 50); do
        dbus-send --system --print-reply --dest=org.freedesktop.DBus / \
            org.freedesktop.DBus.NameHasOwner string:$NAME 2>/dev/null | grep -q 'boolean true' && break
        sleep 0.1
    done
    check "dbus: root owns $NAME" kill -0 "$echo_pid"

    for m in Status Disks Volumes Plan; do
        check "dbus: nobody may call $m" nobody_calls $NAME.$m
    done
    check "dbus: nobody may introspect" nobody_calls org.freedesktop.DBus.Introspectable.Introspect
    check "dbus: nobody may read a property" \
        nobody_calls org.freedesktop.DBus.Properties.Get string:$NAME string:State
    check "dbus: nobody may read all properties" \
        nobody_calls org.freedesktop.DBus.Properties.GetAll string:$NAME
    check "dbus: nobody may ping (Peer)" nobody_calls org.freedesktop.DBus.Peer.Ping
    for m in Apply Reload Drain Undrain; do
        check "dbus: nobody is denied $m" access_denied nobody_calls $NAME.$m
        check "dbus: root may call $m" call $NAME.$m
    done
    check "dbus: nobody is denied Properties.Set" access_denied nobody_calls \
        org.freedesktop.DBus.Properties.Set string:$NAME string:State variant:string:x
    check "dbus: nobody is denied unknown methods" access_denied nobody_calls $NAME.Format

    kill "$echo_pid" 2>/dev/null
    [ -n "$bus_pid" ] && kill "$bus_pid" 2>/dev/null
    wait "$echo_pid" 2>/dev/null
    unset DBUS_SYSTEM_BUS_ADDRESS
    rm -rf "$dir"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    [ "$(id -u)" -eq 0 ] || { echo "packaging-dbus-policy: needs root (skipped)"; exit 0; }
    need_apt_packages dbus dbus-tests util-linux
    test_dbus_policy "$(cd "$HERE/.." && pwd)/packaging/dbus/org.kvstrap.Bootstrap1.conf"
    pkg_summary "packaging-dbus-policy"
fi
