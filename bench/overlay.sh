#!/usr/bin/env bash
# The overlay at scale on this machine: supernodes and clients as real libp2p nodes with real
# TCP sockets on loopback (crates/koe-overlay/examples/overlay_bench.rs): every supernode a real
# `koe node` process (metrics scraped from --metrics), a thousand measuring clients in the
# benchmark process, the other clients in worker processes (a process may hold only 20,000
# descriptors here). Prints Markdown tables.
#
#   bench/overlay.sh [SUPERNODES] [USERS]        (defaults: 100 10000; SUPERNODES=0: only the
#                                                memory-per-client table)
set -euo pipefail
cd "$(dirname "$0")/.."
supernodes=${1:-100}
users=${2:-10000}
cargo build --release --workspace --bins --examples >&2
# Every client connection costs a descriptor on each side; use all this machine allows.
ulimit -n "$(ulimit -Hn)"
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -sr)"
echo
target/release/examples/overlay_bench --supernodes "$supernodes" --users "$users" \
    --lookups 2000 --route-seconds 10 --workers 3 --koe target/release/koe --memory-clients 2000
