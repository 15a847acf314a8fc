#!/usr/bin/env bash
# The overlay at scale on this machine: supernodes and clients as real libp2p nodes with real
# TCP sockets on loopback, all in one process (crates/koe-overlay/examples/overlay_bench.rs),
# plus a real `koe node` process for memory per attached client. Prints Markdown tables.
#
#   bench/overlay.sh [SUPERNODES] [USERS]        (defaults: 100 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
supernodes=${1:-100}
users=${2:-10000}
cargo build --release --workspace --bins --examples >&2
# Ten thousand clients in one process need more descriptors than the default 1024.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -sr)"
echo
target/release/examples/overlay_bench --supernodes "$supernodes" --users "$users" \
    --lookups 2000 --route-seconds 10 --koe target/release/koe --memory-clients 2000
