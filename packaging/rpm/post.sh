# kvstrap %post ($1: 1 install, 2 upgrade). Enables kvstrap.service through presets on
# first install (also offline, in a kickstart %post chroot), never starts it, reloads
# systemd only when it runs. Never touches disks.
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset kvstrap.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
