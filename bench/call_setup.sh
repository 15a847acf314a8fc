#!/usr/bin/env bash
# Call setup on loopback, between separate processes: a login server, two supernodes, alice
# attached to one and bob to the other (bob's client answers by itself). Alice calls bob
# CALLS times; `koe call` prints when the callee's device rang ("ringing (N ms after
# dialling)": the offer went alice → her supernode → bob's supernode → bob, and bob's ringing
# signal came back the same way, so this is dial → ringing on the callee plus the way back)
# and when it answered. Prints a Markdown table with p50 / p90 / max.
#
#   bench/call_setup.sh [CALLS]        (default 20; release build of koe)
set -euo pipefail
cd "$(dirname "$0")/.."
calls=${1:-20}
cargo build --release --workspace --bins >&2
koe=$PWD/target/release/koe
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

"$koe" network init --dir "$work/net" --name koe-setup --auth-listen "127.0.0.1:$(port)" > /dev/null
"$koe" auth serve --no-rate-limits --network "$work/net/network.toml" --secret-dir "$work/net/secret" > "$work/auth.log" 2>&1 &
pids+=($!)
cp "$work/net/network.toml" "$work/empty.toml"
# Supernode 1 first; supernode 2 joins through it. Alice knows only the first, bob only the
# second, so the call crosses both.
start_node() {
    "$koe" --home "$work/node$1" node --network "$work/net/network.toml" --listen "127.0.0.1:$(port)" > "$work/node$1.out" 2> "$work/node$1.log" &
    pids+=($!)
    for _ in $(seq 100); do [ -s "$work/node$1.out" ] && break; sleep 0.1; done
}
start_node 1
"$koe" network add-bootstrap --network "$work/net/network.toml" "$(head -1 "$work/node1.out")" > /dev/null
cp "$work/net/network.toml" "$work/alice.toml"
start_node 2
cp "$work/empty.toml" "$work/bob.toml"
"$koe" network add-bootstrap --network "$work/bob.toml" "$(head -1 "$work/node2.out")" > /dev/null
sleep 0.5
for name in alice bob; do
    echo "a good password" | "$koe" --home "$work/$name" signup "$name" --network "$work/$name.toml" --password-stdin > /dev/null
done
"$koe" --home "$work/bob" up --auto-answer > "$work/bob.log" 2>&1 &
pids+=($!)
"$koe" --home "$work/alice" up > "$work/alice.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do
    "$koe" --home "$work/alice" lookup bob 2>/dev/null | grep -q "device(s) online" && break
    sleep 0.1
done
for n in $(seq "$calls"); do
    "$koe" --home "$work/alice" call bob --duration 1s > "$work/call$n.out"
done
parent() { "$koe" --home "$work/$1" status | grep -io 'parent.*' | head -1 | grep -o '/tcp/[0-9]*' || echo "?"; }
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $calls calls on loopback; alice's parent supernode $(parent alice), bob's $(parent bob)"
echo
python3 - "$work" "$calls" <<'PY'
import re, sys
work, calls = sys.argv[1], int(sys.argv[2])
ringing, answered = [], []
for n in range(1, calls + 1):
    text = open(f"{work}/call{n}.out").read()
    ringing.append(int(re.search(r"ringing \((\d+) ms after dialling\)", text).group(1)))
    answered.append(int(re.search(r"answered after (\d+) ms", text).group(1)))
def row(name, values):
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]
    print(f"| {name} | {pick(0.5)} ms | {pick(0.9)} ms | {values[-1]} ms |")
print("| from dialling to | p50 | p90 | max |")
print("|---|---|---|---|")
row("the callee's device ringing (its signal back at the caller)", ringing)
row("the answer back at the caller (auto-answer)", answered)
PY
