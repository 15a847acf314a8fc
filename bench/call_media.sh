#!/usr/bin/env bash
# The media path of a call on loopback (crates/koe-media/examples/loopback_call.rs): two media
# drivers with str0m ICE + DTLS-SRTP and the voice engine on real UDP sockets in one process;
# time to connect, mouth-to-ear delay by alignment of the recording with the sent speech,
# frames lost, CPU. Prints a Markdown table.
#
#   bench/call_media.sh [CALLS] [SECONDS]        (defaults: 5 6)
set -euo pipefail
cd "$(dirname "$0")/.."
calls=${1:-5}
seconds=${2:-6}
cargo build --release --workspace --examples >&2
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); speech-like test signal, Opus 32 kbit/s"
echo
target/release/examples/loopback_call --calls "$calls" --seconds "$seconds"
