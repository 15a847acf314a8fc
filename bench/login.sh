#!/usr/bin/env bash
# Login server throughput and latency with SQLite and with PostgreSQL, on this machine.
#
#   bench/login.sh [POSTGRES_URL]
#
# POSTGRES_URL defaults to $KOE_BENCH_POSTGRES_URL, then $KOE_TEST_POSTGRES_URL; without one
# only SQLite is measured. The server runs with rate limits off (one address generates all the
# load); each login is a new TCP + TLS connection and one argon2id verification, as when many
# devices log in. Prints a Markdown table for docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

postgres_url=${1:-${KOE_BENCH_POSTGRES_URL:-${KOE_TEST_POSTGRES_URL:-}}}
duration=${KOE_BENCH_SECONDS:-15}
concurrencies=${KOE_BENCH_CONCURRENCY:-"1 2 8 32"}

cargo build --release --workspace --bins --examples >&2
koe=target/release/koe
load=target/release/examples/login_load

work=$(mktemp -d)
server_pid=
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$koe" network init --dir "$work/net" --name koe-bench --auth-listen "127.0.0.1:$port" >/dev/null

start_server() {
    "$koe" auth serve --network "$work/net/network.toml" --secret-dir "$work/net/secret" \
        --db "$1" --no-rate-limits >"$work/server.out" 2>"$work/server.err" &
    server_pid=$!
    for _ in $(seq 100); do
        grep -q "listening on" "$work/server.out" 2>/dev/null && return 0
        sleep 0.1
    done
    cat "$work/server.err" >&2
    echo "login server did not start" >&2
    exit 1
}

stop_server() {
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    server_pid=
}

measure() {
    local label=$1 db=$2
    start_server "$db"
    for concurrency in $concurrencies; do
        "$load" --network "$work/net/network.toml" --label "$label" --users 40 \
            --concurrency "$concurrency" --duration "$duration" 2>>"$work/load.err"
    done
    stop_server
}

echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -sr)"
echo "Password hash: argon2id m=19456 KiB, t=2, p=1 (OWASP): $("$load" --hash-only) ms per hash on one core here."
echo "Each row: $duration s of logins, each a new TCP + TLS connection, load generator on the same machine."
echo
echo "| store | concurrent clients | logins/s | p50 ms | p99 ms | errors |"
echo "|---|---|---|---|---|---|"
measure "SQLite (WAL, synchronous=FULL)" "sqlite:$work/accounts.db"
if [ -n "$postgres_url" ]; then
    measure "PostgreSQL $(psql "$postgres_url" -Atc 'show server_version' 2>/dev/null | cut -d' ' -f1)" "$postgres_url"
else
    echo "| PostgreSQL | - | not measured: pass a URL | | | |"
fi
if [ -s "$work/load.err" ]; then
    echo
    echo "Errors seen by the load generator (first 5):"
    head -5 "$work/load.err"
fi
