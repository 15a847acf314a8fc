#!/usr/bin/env bash
# PESQ of speech from the phone as the Koe caller hears it through the gateway: G.711 alone
# (the anchor: what the phone network itself delivers) and G.711 then Opus at each encoder
# complexity, against the original. Prints a Markdown table. Needs alsa-utils' speech samples
# and `pip install pesq numpy`.
#   bench/gateway_quality.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
samples=(/usr/share/sounds/alsa/Front_Center.wav /usr/share/sounds/alsa/Front_Left.wav /usr/share/sounds/alsa/Front_Right.wav
         /usr/share/sounds/alsa/Rear_Left.wav /usr/share/sounds/alsa/Rear_Right.wav /usr/share/sounds/alsa/Side_Left.wav)
CARGO_INCREMENTAL=0 cargo build --release --workspace --examples
target/release/examples/gateway_quality "$out" "${samples[@]}"
python3 - "$out" <<'PY'
import sys, wave
import numpy as np
from pesq import pesq

def read(path):
    with wave.open(path, "rb") as f:
        return np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16).astype(np.float64) / 32768.0

def resample(x, rate):
    # 48 kHz → rate by the spectrum: exact band-limiting, fine offline.
    n = len(x) * rate // 48000
    spectrum = np.fft.rfft(x)[: n // 2 + 1]
    return np.fft.irfft(spectrum, n) * n / len(x)

def aligned(reference, degraded, max_lag):
    size = 1 << int(np.ceil(np.log2(len(reference) + len(degraded))))
    c = np.fft.irfft(np.fft.rfft(degraded, size) * np.conj(np.fft.rfft(reference, size)), size)
    lag = int(np.argmax(c[: max_lag + 1]))
    shifted = degraded[lag : lag + len(reference)]
    return np.concatenate([shifted, np.zeros(len(reference) - len(shifted))])

out = sys.argv[1]
reference = read(f"{out}/reference.wav")
rows = [("G.711 μ-law alone (the anchor)", "g711")] + [(f"G.711, then Opus at complexity {c}", f"g711_opus_c{c}") for c in (0, 2, 5, 9)]
print("| what the Koe caller hears | PESQ-NB (8 kHz) | PESQ-WB (16 kHz) |")
print("|---|---|---|")
for label, name in rows:
    degraded = read(f"{out}/{name}.wav")
    scores = []
    for rate, mode in ((8000, "nb"), (16000, "wb")):
        r, d = resample(reference, rate), resample(degraded, rate)
        scores.append(pesq(rate, r, aligned(r, d, rate // 10), mode))
    print(f"| {label} | {scores[0]:.2f} | {scores[1]:.2f} |")
PY
