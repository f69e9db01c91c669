# Sourced by mount.sh, test.sh and nimbusfs: install what is missing, then set $VENV.
# Debian packages: fuse3 (fusermount3, /dev/fuse), libfuse3-dev + pkg-config
# (to build pyfuse3 when no wheel fits), PostgreSQL (the embedded metaserver
# database), python3-venv. The virtualenv lives in .venv beside this file's
# parent and is refreshed when pyproject.toml changes. Each step prints one
# line; what apt and pip say goes to $NIMBUS_LOG, shown (its end) only if the
# step fails.

NIMBUS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$NIMBUS_ROOT/.venv"
NIMBUS_LOG="$NIMBUS_ROOT/.bootstrap.log"

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

# _nimbus_step DESCRIPTION COMMAND...: one line on stderr, the command's output
# in the log (started afresh by the first step of a run); on failure the log's
# path and the end of what the step said, and the calling script exits.
_nimbus_step() {
    local what="$1"
    shift
    echo "nimbusfs: $what" >&2
    if [ -z "${_NIMBUS_LOGGING:-}" ]; then
        : >"$NIMBUS_LOG"
        _NIMBUS_LOGGING=1
    fi
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $what: $*" >>"$NIMBUS_LOG"
    local start
    start=$(wc -l <"$NIMBUS_LOG")
    if ! "$@" >>"$NIMBUS_LOG" 2>&1 </dev/null; then
        echo "nimbusfs: failed: $what; the end of $NIMBUS_LOG:" >&2
        tail -n +$((start + 1)) "$NIMBUS_LOG" | tail -n 15 >&2
        exit 1
    fi
}

_nimbus_apt() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "$@"
}

_nimbus_pip() {
    "$VENV/bin/pip" install -q --upgrade pip && "$VENV/bin/pip" install -q -e "$@"
}

nimbus_bootstrap() {
    local extras="${1:-}" pkgs
    pkgs="$(_nimbus_need_pkgs)"
    if [ -n "$pkgs" ]; then
        # shellcheck disable=SC2086  # one word per package
        _nimbus_step "installing Debian packages: $pkgs" _nimbus_apt $pkgs
    fi
    local stamp="$VENV/.installed${extras:+-$extras}"
    if [ ! -x "$VENV/bin/python" ]; then
        _nimbus_step "creating the virtualenv $VENV" python3 -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ "$NIMBUS_ROOT/pyproject.toml" -nt "$stamp" ]; then
        _nimbus_step "installing Python packages into $VENV" \
            _nimbus_pip "$NIMBUS_ROOT${extras:+[$extras]}"
        touch "$stamp"
    fi
}

# Put the nimbusfs command on the user's PATH, as the README's commands call
# it: a link in $NIMBUSFS_BIN (default /usr/local/bin for root, ~/.local/bin
# otherwise) to this clone's .venv/bin/nimbusfs, announced when made. A file
# there that is not a link is left alone.
nimbus_link_command() {
    local bin target="$VENV/bin/nimbusfs" link
    if [ "$(id -u)" -eq 0 ]; then bin="${NIMBUSFS_BIN:-/usr/local/bin}"; else
        bin="${NIMBUSFS_BIN:-$HOME/.local/bin}"; fi
    link="$bin/nimbusfs"
    [ "$(readlink "$link" 2>/dev/null)" != "$target" ] || return 0
    if [ -e "$link" ] && [ ! -L "$link" ]; then
        echo "nimbusfs: $link is not this clone's command; this one is $target" >&2
        return 0
    fi
    if ! { mkdir -p "$bin" && ln -sfn "$target" "$link"; } 2>/dev/null; then
        echo "nimbusfs: cannot link $link; the nimbusfs command is $target" >&2
        return 0
    fi
    echo "nimbusfs: the nimbusfs command is now $link (nimbusfs status, nimbusfs versions FILE ...)" >&2
    case ":$PATH:" in
        *":$bin:"*) ;;
        *) echo "nimbusfs: $bin is not on your PATH: add it, or run $link" >&2 ;;
    esac
}
