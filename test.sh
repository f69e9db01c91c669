#!/usr/bin/env bash
# Run the whole test suite: installs what is missing, then runs ruff and pytest.
# Extra arguments go to pytest (e.g. ./test.sh -k rename -x).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/bootstrap.sh"
# Programs the tests run inside the mount.
NIMBUS_EXTRA_PKGS="git rsync tar" nimbus_bootstrap test
cd "$NIMBUS_ROOT"
"$VENV/bin/ruff" check .
exec "$VENV/bin/python" -m pytest "$@"
