#!/usr/bin/env bash
# Speech quality of the voice engine under loss and jitter, in virtual time (no sockets): the
# alsa-utils voice samples (all but Noise.wav) concatenated and resampled with sox, sent
# through Koe's sender, a seeded impaired link and the receiver
# (crates/koe-voice/examples/voice_quality.rs), once with Koe's adaptive copies and once with
# Opus in-band FEC alone, and scored with PESQ-WB (bench/pesq_score.py). Prints a Markdown table.
#
#   bench/voice.sh [BITRATE]        (default 32000)
#
#   SEEDS="1 2 3 4 5"   one call per seed of the impaired link (default: 1); with more than one,
#                       each cell is "worst / median" over the seeds
#   LOOPS=3             the speech said this many times in a row (default 1: 11.4 s); the start
#                       of a call, before the loss is known, weighs less in longer calls
set -euo pipefail
cd "$(dirname "$0")/.."
bitrate=${1:-32000}
seeds=${SEEDS:-1}
loops=${LOOPS:-1}
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
    -r 48000 -c 1 -b 16 "$work/once.wav"
once=()
for _ in $(seq 1 "$loops"); do once+=("$work/once.wav"); done
sox "${once[@]}" "$work/speech.wav"
for seed in $seeds; do
    mkdir -p "$work/$seed"
    target/release/examples/voice_quality --speech "$work/speech.wav" --out "$work/$seed" --bitrate "$bitrate" --seed "$seed" > "$work/$seed/runs.jsonl"
done
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); speech $(soxi -D "$work/speech.wav") s; Opus $bitrate bit/s; seeds $seeds"
echo
python3 - "$work" $seeds <<'PY'
import json, statistics, subprocess, sys
work, seeds = sys.argv[1], sys.argv[2:]
rows = {}
for seed in seeds:
    for line in open(f"{work}/{seed}/runs.jsonl"):
        r = json.loads(line)
        score, delay = subprocess.run(["python3", "bench/pesq_score.py", f"{work}/{seed}/reference.wav", f"{work}/{seed}/{r['file']}"],
                                      capture_output=True, text=True, check=True).stdout.split()
        r["pesq"], r["delay"] = float(score), float(delay)
        rows.setdefault((r["condition"], r["engine"]), []).append(r)

def cell(values, fmt):
    """One value, or "worst / median" over the seeds (worst: the lowest PESQ, else the highest)."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(values[0])} / {fmt.format(statistics.median(values))}"

many = len(seeds) > 1
print("| network | engine | PESQ-WB" + (" worst / median" if many else "") + " | lost on the link | lost after recovery"
      + (" worst / median" if many else "") + " | from copies / FEC / concealed | jitter-buffer target | engine delay"
      + (" worst / median" if many else "") + " | bitrate | CPU per call |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (condition, engine), runs in rows.items():
    pesq = sorted(r["pesq"] for r in runs)
    residual = sorted((100 * r["loss_after_recovery"] for r in runs), reverse=True)
    delay = sorted((r["delay"] for r in runs), reverse=True)
    link = statistics.mean(100 * r["link_loss"] for r in runs)
    recovered = " / ".join(str(sum(r[k] for r in runs)) for k in ("from_copies", "from_fec", "concealed"))
    target = max(r["target_delay_ms"] for r in runs)
    bitrate = statistics.mean(r["bitrate"] for r in runs)
    # One simulated direction is one encoder and one decoder: what one client spends per call.
    cpu = statistics.mean(100.0 * r["cpu_seconds"] / r["speech_seconds"] for r in runs)
    print(f"| {condition} | {'Koe (copies)' if engine == 'koe' else 'in-band FEC only'} | {cell(pesq, '{:.2f}')} | {link:.1f} % | "
          f"{cell(residual, '{:.2f} %')} | {recovered} | {'≤ ' if many else ''}{target:.0f} ms | {cell(delay, '{:.0f} ms')} | "
          f"{bitrate/1000:.0f} kbit/s | {cpu:.1f} % |")
if many:
    print()
    print("Lost on the link, bitrate and CPU: means over the seeds; copies / FEC / concealed: sums; target: the highest at a call's end.")
PY
