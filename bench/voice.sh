#!/usr/bin/env bash
# Speech quality of the voice engine under loss and jitter, in virtual time (no sockets): the
# alsa-utils voice samples (all but Noise.wav) concatenated and resampled with sox, sent
# through Koe's sender, a seeded impaired link and the receiver
# (crates/koe-voice/examples/voice_quality.rs), once with Koe's adaptive copies and once with
# Opus in-band FEC alone, and scored with PESQ-WB (bench/pesq_score.py). Prints a Markdown table.
#
#   bench/voice.sh [BITRATE]        (default 32000)
set -euo pipefail
cd "$(dirname "$0")/.."
bitrate=${1:-32000}
need_apt=()
[ -d /usr/share/sounds/alsa ] || need_apt+=(alsa-utils)
command -v sox >/dev/null || need_apt+=(sox)
if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
python3 -c "import numpy, pesq" 2>/dev/null || python3 -m pip install -q numpy pesq
cargo build --release --workspace --examples >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
alsa=/usr/share/sounds/alsa
sox "$alsa"/Front_Center.wav "$alsa"/Front_Left.wav "$alsa"/Front_Right.wav "$alsa"/Rear_Center.wav \
    "$alsa"/Rear_Left.wav "$alsa"/Rear_Right.wav "$alsa"/Side_Left.wav "$alsa"/Side_Right.wav \
    -r 48000 -c 1 -b 16 "$work/speech.wav"
target/release/examples/voice_quality --speech "$work/speech.wav" --out "$work" --bitrate "$bitrate" > "$work/runs.jsonl"
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); speech $(soxi -D "$work/speech.wav") s; Opus $bitrate bit/s"
echo
python3 - "$work" <<'PY'
import json, subprocess, sys
work = sys.argv[1]
runs = [json.loads(line) for line in open(f"{work}/runs.jsonl")]
print("| network | engine | PESQ-WB | lost on the link | lost after recovery | from copies / FEC / concealed | jitter-buffer target | engine delay | bitrate | CPU per call |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in runs:
    score, delay = subprocess.run(["python3", "bench/pesq_score.py", f"{work}/reference.wav", f"{work}/{r['file']}"],
                                  capture_output=True, text=True, check=True).stdout.split()
    # One simulated direction is one encoder and one decoder: what one client spends per call.
    cpu = 100.0 * r["cpu_seconds"] / r["speech_seconds"]
    print(f"| {r['condition']} | {'Koe (copies)' if r['engine'] == 'koe' else 'in-band FEC only'} | {score} | {100*r['link_loss']:.1f} % | "
          f"{100*r['loss_after_recovery']:.2f} % | {r['from_copies']} / {r['from_fec']} / {r['concealed']} | "
          f"{r['target_delay_ms']:.0f} ms | {delay} ms | {r['bitrate']/1000:.0f} kbit/s | {cpu:.1f} % |")
PY
