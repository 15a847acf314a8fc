# Sourced by the lab benchmarks (bench/impaired_calls.sh, bench/quality.sh): what every one of
# them needs around its calls. Logging; Python with its modules; a work directory and a cleanup
# that ends every process started (in `pids`) and removes the lab's namespaces, also on failure
# or Ctrl-C; waits; and a private copy of the Koe binary, which may be rebuilt meanwhile.
#
# The caller sets LAB (the namespaces' prefix), NETLAB (bench/lab/netlab.sh) and KOE (the binary,
# which may be missing), then calls `bench_python` and `bench_start`.

log() { echo "[$(date +%T)] $*" >&2; }
die() { log "error: $*"; exit 1; }

# bench_python "MODULE ..." PIP_PACKAGE...: sets PY to the real interpreter (not a pyenv shim)
# and installs the pip packages unless every module already imports.
bench_python() {
    local modules=$1; shift
    PY=$(python3 -c 'import sys; print(sys.executable)')
    if ! "$PY" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-dev >/dev/null
    fi
    if ! "$PY" -c "import ${modules// /, }" 2>/dev/null; then
        "$PY" -m pip --version >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
        # Debian's own python3 refuses plain pip installs (PEP 668): then into its site-packages.
        "$PY" -m pip install -q "$@" || "$PY" -m pip install -q --break-system-packages "$@"
    fi
}

# bench_start PREFIX: the work directory /tmp/PREFIX.XXXXXX, the cleanup, IN_R / IN_A / IN_B
# (commands that run in the router and sites; not functions, so that "$IN_A cmd &" makes $! the
# pid of cmd itself: ip netns exec execs it), and KOE as a copy in the work directory
# (koe_source: where it came from, koe_built: when).
bench_start() {
    work=$(mktemp -d "/tmp/$1.XXXXXX")
    pids=()
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
    IN_R="ip netns exec $LAB-r" IN_A="ip netns exec $LAB-a" IN_B="ip netns exec $LAB-b"
    koe_built="?"
    if [ -x "$KOE" ]; then
        koe_built=$(date -u -r "$KOE" +%FT%TZ)
        koe_source=$KOE
        cp "$KOE" "$work/koe-bin"
        KOE=$work/koe-bin
    fi
}

bench_cleanup() {
    local status=$?
    set +e
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    sleep 0.3
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
    "$NETLAB" down "$LAB"   # also ends whatever still runs inside the namespaces
    if [ "${KEEP:-0}" = 1 ] || [ $status -ne 0 ]; then log "work directory kept: $work"; else rm -rf "$work"; fi
    exit $status
}

# forget PID: it ended, the cleanup need not end it.
forget() { local keep=() p; for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done; pids=("${keep[@]}"); }

# gone PID: it exited (a zombie counts).
gone() { ! kill -0 "$1" 2>/dev/null || [ "$(ps -o stat= -p "$1" | cut -c1)" = Z ]; }

# try_wait SECONDS COMMAND...: until COMMAND succeeds; fails on time-out.
try_wait() {
    local until=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $until ] || return 1
        sleep 0.1
    done
}

# wait_for SECONDS DESCRIPTION COMMAND...: the same, and dies on time-out.
wait_for() {
    local limit=$1 what=$2; shift 2
    try_wait "$limit" "$@" || die "timed out waiting for $what"
}
