//! The pure-Rust Opus backend and C libopus understand each other: speech encoded by either
//! decodes with the other (and with itself) to the same sound, in-band FEC made by either is
//! recovered by the other, and each decoder refuses the same garbage. Runs with the `libopus`
//! feature (`cargo test -p koe-voice --features libopus`; CI does).

#![cfg(feature = "libopus")]
#![allow(clippy::unwrap_used)]

use koe_voice::codec::{Backend, DEFAULT_BITRATE, FRAME_SAMPLES, MAX_OPUS_PACKET};
use koe_voice::signal::{best_lag, speechlike};

/// Encodes `speech` with `encoder`'s backend; returns the packets.
fn encode(backend: Backend, speech: &[f32], expected_loss: u8) -> Vec<Vec<u8>> {
    let mut encoder = backend.encoder(DEFAULT_BITRATE).unwrap();
    encoder.set_expected_loss(expected_loss);
    let mut packet = [0u8; MAX_OPUS_PACKET];
    speech
        .chunks_exact(FRAME_SAMPLES)
        .map(|frame| {
            let n = encoder.encode(frame, &mut packet).unwrap();
            packet[..n].to_vec()
        })
        .collect()
}

/// Decodes `packets` with `backend`; every `lose`-th one (if any) is recovered from the FEC in
/// the next packet instead.
fn decode(backend: Backend, packets: &[Vec<u8>], lose: Option<usize>) -> Vec<f32> {
    let mut decoder = backend.decoder().unwrap();
    let mut out = Vec::new();
    let mut frame = vec![0.0; FRAME_SAMPLES];
    for (i, packet) in packets.iter().enumerate() {
        match (lose, packets.get(i + 1)) {
            (Some(n), Some(next)) if i % n == n - 1 => decoder.decode_fec(next, &mut frame).unwrap(),
            _ => decoder.decode(packet, &mut frame).unwrap(),
        }
        out.extend_from_slice(&frame);
    }
    out
}

fn similarity(sent: &[f32], heard: &[f32]) -> f64 {
    let second = 48_000;
    best_lag(&sent[second / 2..second * 3 / 2], &heard[second / 2..], 2_000).1
}

#[test]
fn each_backend_decodes_what_the_other_encodes() {
    let speech = speechlike(3);
    let backends = [Backend::OpusPure, Backend::LibOpus];
    for from in backends {
        let packets = encode(from, &speech, 0);
        for to in backends {
            let heard = decode(to, &packets, None);
            let score = similarity(&speech, &heard);
            eprintln!("{from:?} → {to:?}: correlation {score:.3}");
            assert!(score > 0.8, "{from:?} → {to:?}: correlation {score:.3}");
        }
        // The pure decoder reproduces C libopus's output.
        let (pure, c) = (decode(Backend::OpusPure, &packets, None), decode(Backend::LibOpus, &packets, None));
        let largest = pure.iter().zip(&c).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(largest < 1e-3, "{from:?}: the decoders differ by up to {largest}");
    }
}

#[test]
fn in_band_fec_from_either_is_recovered_by_the_other() {
    let speech = speechlike(3);
    for (from, to) in [(Backend::OpusPure, Backend::LibOpus), (Backend::LibOpus, Backend::OpusPure)] {
        let packets = encode(from, &speech, 20);
        let recovered = decode(to, &packets, Some(5));
        let score = similarity(&speech, &recovered);
        eprintln!("{from:?} → {to:?}, every 5th frame from FEC: correlation {score:.3}");
        assert!(score > 0.8, "{from:?} → {to:?}: correlation {score:.3}");
    }
}

#[test]
fn both_decoders_refuse_garbage_and_conceal_afterwards() {
    let mut frame = vec![0.0; FRAME_SAMPLES];
    for backend in [Backend::OpusPure, Backend::LibOpus] {
        let mut decoder = backend.decoder().unwrap();
        assert!(decoder.decode(&[], &mut frame).is_err(), "{backend:?}: an empty packet");
        // A code-3 packet that claims more frames than it has.
        assert!(decoder.decode(&[0xfb, 0xff], &mut frame).is_err(), "{backend:?}: a truncated packet");
        decoder.conceal(&mut frame).unwrap();
    }
}
