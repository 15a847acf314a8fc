#!/usr/bin/env python3
"""Plays a WAV file into one JACK input port and records another JACK port, in the same
process cycles, so that sample 0 of the recording is the frame in which sample 0 of the
played file went out: the recording's time origin is the "mouth" of the played speech.

  jack_playrec.py --play SPEECH.wav --to CLIENT:input_1 --from CLIENT:output_1
                  --record OUT.wav --seconds S      (JACK_DEFAULT_SERVER picks the server)

The WAV must be mono 16-bit at the server's sample rate. Used by bench/impaired_calls.sh to
feed baresip's jack source and record baresip's jack player on a dummy-backend JACK server,
which is the real-time clock both run on.
"""
import argparse
import queue
import sys
import threading
import wave

import jack
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--play", required=True)
    ap.add_argument("--to", required=True)
    ap.add_argument("--from", dest="source", required=True)
    ap.add_argument("--record", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    args = ap.parse_args()
    with wave.open(args.play, "rb") as f:
        speech = np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0
        rate = f.getframerate()
    client = jack.Client("koeb_playrec", no_start_server=True)
    if client.samplerate != rate:
        sys.exit(f"{args.play}: {rate} Hz, but the JACK server runs at {client.samplerate} Hz")
    out = client.outports.register("out")
    inp = client.inports.register("in")
    total = int(args.seconds * rate)
    recorded = queue.Queue()
    done = threading.Event()
    armed = threading.Event()
    position = 0

    @client.set_process_callback
    def process(frames):
        nonlocal position
        buf = out.get_array()
        buf.fill(0.0)
        if armed.is_set() and position < total:
            chunk = speech[position:position + frames]
            buf[: len(chunk)] = chunk
            recorded.put(inp.get_array().copy())
            position += frames
            if position >= total:
                done.set()

    with client:
        # Connect first, then start from frame 0: playing and recording begin in the same
        # cycle, once both connections exist.
        client.connect(out, args.to)
        client.connect(args.source, inp)
        armed.set()
        if not done.wait(args.seconds + 30):
            sys.exit("jack_playrec: the JACK server stopped running")
    frames = []
    while not recorded.empty():
        frames.append(recorded.get())
    audio = np.concatenate(frames)[:total]
    with wave.open(args.record, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes())


if __name__ == "__main__":
    main()
