#!/usr/bin/env bash
# Run the whole test suite: installs what is missing, then runs ruff, mypy and pytest.
# Extra arguments go to pytest (e.g. ./test.sh -k rename -x).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/bootstrap.sh"
# Programs the tests run inside the mount.
NIMBUS_EXTRA_PKGS="git rsync tar" nimbus_bootstrap test
cd "$NIMBUS_ROOT"
# A real PyPI source distribution for the tar/compileall test (fetched once).
if ! ls "$VENV"/testdata/trio-*.tar.gz >/dev/null 2>&1; then
    trio_version="$("$VENV/bin/python" -c 'import trio; print(trio.__version__)')"
    "$VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$VENV/testdata" \
        "trio==$trio_version" >&2
fi
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"   # the package, as [tool.mypy] in pyproject.toml configures it
exec "$VENV/bin/python" -m pytest "$@"
