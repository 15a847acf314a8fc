#!/usr/bin/env python3
"""Scores received speech against the reference with PESQ (ITU-T P.862, wide-band mode at
16 kHz), after removing the constant delay found by cross-correlation.

  pesq_score.py REFERENCE.wav DEGRADED.wav   -> prints "pesq delay_ms"
"""
import sys
import wave

import numpy as np
from pesq import pesq


def read(path):
    with wave.open(path, "rb") as f:
        if f.getframerate() != 16000 or f.getnchannels() != 1 or f.getsampwidth() != 2:
            raise SystemExit(f"{path}: expected 16 kHz mono 16-bit")
        return np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16).astype(np.float64) / 32768.0


def align(reference, degraded, max_lag=8000):
    """The lag (samples) at which degraded best matches reference, 0..max_lag."""
    n = len(reference)
    padded = np.zeros(n + max_lag)
    padded[: min(len(degraded), n + max_lag)] = degraded[: n + max_lag]
    size = 1 << int(np.ceil(np.log2(len(padded) + n)))
    correlation = np.fft.irfft(np.fft.rfft(padded, size) * np.conj(np.fft.rfft(reference, size)), size)
    return int(np.argmax(correlation[: max_lag + 1]))


def score(reference_path, degraded_path):
    reference = read(reference_path)
    degraded = read(degraded_path)
    lag = align(reference, degraded)
    shifted = degraded[lag : lag + len(reference)]
    if len(shifted) < len(reference):
        shifted = np.concatenate([shifted, np.zeros(len(reference) - len(shifted))])
    return pesq(16000, reference, shifted, "wb"), lag / 16.0


if __name__ == "__main__":
    value, delay = score(sys.argv[1], sys.argv[2])
    print(f"{value:.3f} {delay:.1f}")
