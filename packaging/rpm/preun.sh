# kvstrap %preun ($1: 0 erase, 1 upgrade). On erase: disable, and stop the daemon if
# systemd runs (it finishes the step in flight). Never touches disks.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable kvstrap.service >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        systemctl stop kvstrap.service >/dev/null 2>&1 || :
    fi
fi
