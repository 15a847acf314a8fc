#!/usr/bin/env bash
# How fast presence and the overlay heal, between separate processes on loopback: a login
# server, two supernodes, alice attached to one and bob to the other (both `koe up`). Each
# measurement is taken RUNS times; the table gives min / median / max.
#   1. bob's `koe up` gets SIGTERM: time until `koe lookup bob` at alice says "bob is offline"
#   2. the same after SIGKILL (no goodbye; the TCP connection closes)
#   3. the same after SIGSTOP (the network vanishes: the connection stays open, nothing answers)
#   4. three supernodes started alone, then all named in the network file they watch (`koe
#      network add-bootstrap`): time until each one's metrics show koe_supernode_supernodes >= 2
#   5. an offline message: bob is offline, alice's chat waits for him; time from bob's `koe up`
#      starting until the message is in his history (polled every 20 ms)
# Lookups are polled every 100 ms; 1-3 give up after 200 s, 4 after 120 s ("> 200 s").
#
#   cargo build --release --workspace && bench/presence.sh
#   RUNS=5 (default)   KOE=target/release/koe (default; the binary to measure)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
koe=${KOE:-target/release/koe}
if [ ! -x "$koe" ]; then
    echo "presence.sh: no koe binary at $koe: run \`cargo build --release --workspace\` first (or set KOE)" >&2
    exit 1
fi
koe=$(realpath "$koe")
command -v curl > /dev/null || { echo "presence.sh: needs curl" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() {
    trap - EXIT INT TERM
    for pid in ${pids[@]+"${pids[@]}"}; do
        kill -CONT "$pid" 2>/dev/null || true
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
log() { echo "[presence] $*" >&2; }
die() { echo "presence.sh: $*" >&2; exit 1; }
# Stops one process this script started (SIGCONT first, in case it is stopped) and forgets it.
stop() {
    local pid=$1 kept=() p
    kill -CONT "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in ${pids[@]+"${pids[@]}"}; do [ "$p" = "$pid" ] || kept+=("$p"); done
    pids=(${kept[@]+"${kept[@]}"})
}
# wait_for SECONDS COMMAND…: polls COMMAND every 100 ms until it succeeds; fails after SECONDS.
wait_for() {
    local deadline=$(( $(now_ms) + $1 * 1000 ))
    shift
    until "$@"; do
        [ "$(now_ms)" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}
has_line() { [ -s "$1" ]; }
lookup() { timeout 10 "$koe" --home "$work/alice" lookup bob 2>&1 || true; }
bob_online() { lookup | grep -q "device(s) online"; }
bob_offline() { lookup | grep -q "bob is offline"; }
attached() { timeout 10 "$koe" --home "$work/$1" status 2>/dev/null | grep -q "/p2p/"; }
# start_node NAME NETWORK_FILE [EXTRA…]: a supernode on a free port; waits for its address line.
start_node() {
    local name=$1 net=$2
    shift 2
    "$koe" --home "$work/$name" node --network "$net" --listen "127.0.0.1:$(port)" --no-relay "$@" \
        > "$work/$name.out" 2> "$work/$name.log" &
    pids+=($!)
    wait_for 30 has_line "$work/$name.out" || die "supernode $name did not start; see its log:$(tail -5 "$work/$name.log")"
}
address() { head -1 "$work/$1.out"; }

# The network, its login server, two supernodes (the second joins through the first).
"$koe" network init --dir "$work/net" --name koe-presence --auth-listen "127.0.0.1:$(port)" > /dev/null
"$koe" auth serve --no-rate-limits --network "$work/net/network.toml" --secret-dir "$work/net/secret" \
    > "$work/auth.out" 2> "$work/auth.log" &
pids+=($!)
auth_ready() { grep -q "listening on" "$work/auth.out"; }
wait_for 30 auth_ready || die "the login server did not start: $(tail -5 "$work/auth.log")"
cp "$work/net/network.toml" "$work/empty.toml"
start_node node1 "$work/net/network.toml"
"$koe" network add-bootstrap --network "$work/net/network.toml" "$(address node1)" > /dev/null
cp "$work/net/network.toml" "$work/alice.toml"
start_node node2 "$work/net/network.toml"
cp "$work/empty.toml" "$work/bob.toml"
"$koe" network add-bootstrap --network "$work/bob.toml" "$(address node2)" > /dev/null
sleep 0.5
for name in alice bob; do
    echo "a good password" | "$koe" --home "$work/$name" signup "$name" --network "$work/$name.toml" --password-stdin > /dev/null
done
"$koe" --home "$work/alice" up > "$work/alice.log" 2>&1 &
pids+=($!)
wait_for 30 attached alice || die "alice's koe up did not attach: $(tail -5 "$work/alice.log")"

# presence RESULT_FILE SIGNAL: bob online, SIGNAL to his `koe up`, time until alice sees him gone.
presence() {
    local out=$1 signal=$2 bob started ms=timeout
    # In a session of its own: were this script's process group ever orphaned (its parent
    # gone), the kernel would hang up a stopped member, turning the SIGSTOP case into a kill.
    setsid "$koe" --home "$work/bob" up >> "$work/bob.log" 2>&1 &
    bob=$!
    pids+=("$bob")
    wait_for 30 attached bob || die "bob's koe up did not attach: $(tail -5 "$work/bob.log")"
    wait_for 60 bob_online || die "alice does not see bob online; her lookup says: $(lookup)"
    started=$(now_ms)
    kill "-$signal" "$bob" || die "bob's koe up had already exited: $(tail -5 "$work/bob.log")"
    while [ $(( $(now_ms) - started )) -lt 200000 ]; do
        if bob_offline; then ms=$(( $(now_ms) - started )); break; fi
        sleep 0.1
    done
    echo "$ms" >> "$out"
    log "SIG$signal: ${ms} ms"
    if [ "$signal" = TERM ]; then
        # Give the clean exit its time before the next run; kill it only if it hangs.
        local i
        for i in $(seq 100); do kill -0 "$bob" 2>/dev/null || break; sleep 0.1; done
    fi
    stop "$bob"
}

# ring RESULT_FILE RUN: three lone supernodes, then all added to the file they watch.
supernodes_seen() { # METRICS_PORT: koe_supernode_supernodes >= 2 there
    curl -s --max-time 2 "http://127.0.0.1:$1/metrics" 2>/dev/null |
        awk '$1 == "koe_supernode_supernodes" && $2 + 0 >= 2 { found = 1 } END { exit !found }'
}
ring() {
    local out=$1 run=$2 net="$work/ring$2.toml" started ms=timeout i mports=() nodes=() mp
    cp "$work/empty.toml" "$net"
    for i in 1 2 3; do
        mp=$(port)
        start_node "ring$run-$i" "$net" --metrics "127.0.0.1:$mp"
        mports+=("$mp")
        nodes+=("${pids[-1]}")
    done
    for i in 1 2 3; do
        "$koe" network add-bootstrap --network "$net" "$(address "ring$run-$i")" > /dev/null
    done
    started=$(now_ms)
    while [ $(( $(now_ms) - started )) -lt 120000 ]; do
        local all=1
        for mp in "${mports[@]}"; do supernodes_seen "$mp" || { all=0; break; }; done
        if [ "$all" = 1 ]; then ms=$(( $(now_ms) - started )); break; fi
        sleep 0.1
    done
    echo "$ms" >> "$out"
    log "three supernodes in any order: ${ms} ms"
    for i in "${nodes[@]}"; do stop "$i"; done
}

# mailbox RESULT_FILE RUN: bob offline (his device record published earlier), alice's chat
# waits for him; time from his `koe up` starting until the message is in his history.
mailbox() {
    local out=$1 run=$2 bob started ms=timeout text="waiting message $2"
    wait_for 30 bob_offline || die "bob is still online before the offline-message run"
    "$koe" --home "$work/alice" chat bob "$text" | grep -q "waits for them" || die "alice's message to offline bob did not wait"
    started=$(now_ms)
    "$koe" --home "$work/bob" up >> "$work/bob.log" 2>&1 &
    bob=$!
    pids+=("$bob")
    while [ $(( $(now_ms) - started )) -lt 60000 ]; do
        if "$koe" --home "$work/bob" messages alice 2>/dev/null | grep -q "$text"; then ms=$(( $(now_ms) - started )); break; fi
        sleep 0.02
    done
    echo "$ms" >> "$out"
    log "offline message: ${ms} ms"
    "$koe" --home "$work/bob" down > /dev/null 2>&1 || true
    stop "$bob"
}

for run in $(seq "$runs"); do
    log "run $run of $runs"
    presence "$work/term" TERM
    presence "$work/kill" KILL
    presence "$work/stop" STOP
    ring "$work/ring" "$run"
    mailbox "$work/mailbox" "$run"
done

echo "Command: \`RUNS=$runs KOE=${KOE:-target/release/koe} bench/presence.sh\`"
echo
echo "Machine: $(nproc) cores, $(uname -s) $(uname -r); loopback; $runs run(s) each"
echo
python3 - "$work" <<'PY'
import sys
work = sys.argv[1]
rows = [
    ("term", 200, "bob offline at alice after SIGTERM of bob's `koe up` (clean exit)"),
    ("kill", 200, "bob offline at alice after SIGKILL of bob's `koe up`"),
    ("stop", 200, "bob offline at alice after SIGSTOP of bob's `koe up` (network vanishes)"),
    ("ring", 120, "3 supernodes started before add-bootstrap: all see ≥ 2 others"),
    ("mailbox", 60, "a message that waited for bob: in his history after his `koe up` starts"),
]
print("| measurement | runs | min | median | max |")
print("|---|---|---|---|---|")
for name, limit, label in rows:
    values = sorted(float("inf") if v == "timeout" else int(v) / 1000
                    for v in open(f"{work}/{name}").read().split())
    n = len(values)
    median = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
    show = lambda v: f"> {limit} s" if v == float("inf") else f"{v:.2f} s"
    print(f"| {label} | {n} | {show(values[0])} | {show(median)} | {show(values[-1])} |")
PY
