# shellcheck shell=bash
# Helpers shared by scripts/test, scripts/pg and scripts/worker-image.
# Source it; it defines functions only (plus HODEI_ROOT).

# Errors inside $(...) must fail the caller too (bash does not do this by default).
shopt -s inherit_errexit

HODEI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HODEI_ROOT

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

have() { command -v "$1" >/dev/null 2>&1; }

# True when running under CI (CI=true / CI=1, as GitHub, GitLab and .ci/run set it).
is_ci() {
    case "${CI:-}" in
        true | TRUE | True | 1 | yes) return 0 ;;
        *) return 1 ;;
    esac
}

is_root() { [[ "$(id -u)" == 0 ]]; }

# is_static FILE: true when FILE is a statically linked ELF executable.
is_static() {
    local f="$1" out
    [[ -x "$f" ]] || return 1
    if have file; then
        out="$(file -L "$f" 2>/dev/null || true)"
        case "$out" in
            *"statically linked"* | *"static-pie linked"*) return 0 ;;
            *"dynamically linked"*) return 1 ;;
        esac
    fi
    if have ldd; then
        out="$(ldd "$f" 2>&1 || true)"
        case "$out" in
            *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
        esac
    fi
    return 1
}

# PostgreSQL server binaries: $PG_BINDIR, `pg_config --bindir`,
# /usr/lib/postgresql/*/bin (newest first), or initdb on PATH (symlinks resolved).
# Prints the directory that holds initdb, pg_ctl and postgres.
find_pg_bindir() {
    local d cands=()
    [[ -n "${PG_BINDIR:-}" ]] && cands+=("$PG_BINDIR")
    if have pg_config; then
        d="$(pg_config --bindir 2>/dev/null || true)"
        [[ -n "$d" ]] && cands+=("$d")
    fi
    if compgen -G '/usr/lib/postgresql/*/bin' >/dev/null; then
        while IFS= read -r d; do cands+=("$d"); done < <(
            printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV
        )
    fi
    if have initdb; then
        d="$(readlink -f "$(command -v initdb)")"
        cands+=("$(dirname "$d")")
    fi
    for d in "${cands[@]}"; do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]]; then
            printf '%s\n' "$d"
            return 0
        fi
    done
    return 1
}

# apt_install PKG...: install Debian packages when root with apt-get; runs
# `apt-get update` once per process. Returns non-zero when it cannot.
_HODEI_APT_UPDATED=""
apt_install() {
    (($# > 0)) || return 0
    if ! is_root || ! have apt-get; then
        warn "cannot install $* (needs root and apt-get)"
        return 1
    fi
    local apt=(apt-get -o DPkg::Lock::Timeout=300 -q)
    if [[ -z "$_HODEI_APT_UPDATED" ]]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" update >&2 || warn "apt-get update failed"
        _HODEI_APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "$@" >&2
}

# Seconds to "1m23s".
fmt_duration() {
    local s="$1"
    if ((s >= 60)); then printf '%dm%02ds' $((s / 60)) $((s % 60)); else printf '%ds' "$s"; fi
}

# The target triple of the static agent: $HODEI_WORKER_TARGET, else the host's
# (`rustc -vV`), else x86_64-unknown-linux-gnu. It must be a *-linux-gnu target
# (glibc's static libraries come with libc6-dev).
agent_target() {
    if [[ -n "${HODEI_WORKER_TARGET:-}" ]]; then
        printf '%s\n' "$HODEI_WORKER_TARGET"
        return 0
    fi
    local host
    host="$(rustc -vV 2>/dev/null | sed -n 's/^host: //p' || true)"
    printf '%s\n' "${host:-x86_64-unknown-linux-gnu}"
}

# ensure_rust_components: rustfmt and clippy, added through rustup when missing.
ensure_rust_components() {
    local missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    ((${#missing[@]} == 0)) && return 0
    if have rustup; then
        log "rustup component add ${missing[*]}"
        rustup component add "${missing[@]}" >&2
    else
        warn "missing ${missing[*]} and no rustup to add them"
        return 1
    fi
}
