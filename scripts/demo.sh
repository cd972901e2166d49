#!/usr/bin/env bash
# The README's first command: on a fresh Debian 12 machine, as root, install what is
# missing, build kvstrap, create four sparse loop-backed 4 GiB disks, apply the embedded
# demo policy (config/demo.toml) to them and show `kvstrap disks`, `kvstrap volumes` and
# the state directory. `scripts/demo.sh --cleanup` unmounts, deletes the loop devices'
# partitions (BLKPG, like `partx -d`) and detaches all of it.
# Everything lives below /var/lib/kvstrap/demo; no other disk is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "run as root: the demo makes loop devices and mounts" >&2; exit 1; fi
scripts/install-deps.sh
cargo build --release --locked --quiet
exec target/release/kvstrap demo "$@"
