# kvstrap %postun ($1: 0 erase, 1 upgrade). On upgrade, restart the daemon only if it
# was running (try-restart). /var/lib/kvstrap is never removed: it holds the mount points
# of provisioned volumes. Never touches disks.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart kvstrap.service >/dev/null 2>&1 || :
    fi
fi
# cargo-generate-rpm cannot mark directories as owned: remove kvstrap's own directories
# when they are empty (an operator's file in them keeps them).
if [ "$1" -eq 0 ]; then
    rmdir /usr/lib/kvstrap/policy.d /usr/lib/kvstrap /usr/share/doc/kvstrap 2>/dev/null || :
fi
