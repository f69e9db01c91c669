# Sourced by mount.sh and test.sh: install what is missing, then set $VENV.
# Debian packages: fuse3 (fusermount3, /dev/fuse), libfuse3-dev + pkg-config
# (to build pyfuse3 when no wheel fits), PostgreSQL (the embedded metaserver
# database), python3-venv. The virtualenv lives in .venv beside this file's
# parent and is refreshed when pyproject.toml changes.

NIMBUS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$NIMBUS_ROOT/.venv"

_nimbus_need_pkgs() {
    local missing=()
    command -v fusermount3 >/dev/null || missing+=(fuse3)
    pkg-config --exists fuse3 2>/dev/null || missing+=(libfuse3-dev pkg-config)
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
    python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    for p in ${NIMBUS_EXTRA_PKGS:-}; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    echo "${missing[@]}"
}

nimbus_bootstrap() {
    local extras="${1:-}" pkgs sudo=""
    pkgs="$(_nimbus_need_pkgs)"
    if [ -n "$pkgs" ]; then
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        echo "nimbusfs: installing Debian packages: $pkgs" >&2
        $sudo apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $pkgs >&2
    fi
    local stamp="$VENV/.installed${extras:+-$extras}"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV" >&2
    fi
    if [ ! -f "$stamp" ] || [ "$NIMBUS_ROOT/pyproject.toml" -nt "$stamp" ]; then
        echo "nimbusfs: installing Python packages into $VENV" >&2
        "$VENV/bin/pip" install -q --upgrade pip >&2
        "$VENV/bin/pip" install -q -e "$NIMBUS_ROOT${extras:+[$extras]}" >&2
        touch "$stamp"
    fi
}
