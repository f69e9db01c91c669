#!/usr/bin/env bash
# Mount a nimbusfs drive:      ./mount.sh MOUNTPOINT [options]   (see ./mount.sh --help)
# Flush and unmount it:        ./mount.sh -u MOUNTPOINT
# First run installs what is missing (Debian packages, a virtualenv in .venv)
# and links the nimbusfs command into /usr/local/bin (root) or ~/.local/bin.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/bootstrap.sh"

nimbus_bootstrap
nimbus_link_command
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ] || [ $# -eq 0 ]; then
    exec "$VENV/bin/nimbusfs" mount --help
fi
if [ "$1" = "-u" ]; then
    shift
    exec "$VENV/bin/nimbusfs" umount "$@"
fi
exec "$VENV/bin/nimbusfs" mount "$@"
