//! What the gateway does to speech from the phone, written as WAV files for PESQ
//! (`bench/gateway_quality.sh` scores them): the original; G.711 alone (48 → 8 kHz, μ-law,
//! 8 → 48 kHz, as the phone network carries it); and G.711 then Opus at each encoder
//! complexity the gateway could use (what the Koe caller hears).
//!
//! Run: `cargo run -p koe-pstn --example gateway_quality -- OUT_DIR SPEECH.wav…`.

#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};

use koe_pstn::g711::G711Law;
use koe_pstn::resample::{to_f32, to_i16, Downsampler, Upsampler};
use opus_pure::{Application, OpusDecoder, OpusEncoder, RateControl};

const FRAME_48K: usize = 960;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (out, inputs) = args.split_first().expect("usage: gateway_quality OUT_DIR SPEECH.wav…");
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).expect("output directory");
    let mut speech = Vec::new();
    for input in inputs {
        speech.extend(koe_voice::wav::read_mono_48k(Path::new(input)).expect("a WAV file"));
        speech.extend(std::iter::repeat_n(0.0, FRAME_48K * 10));
    }
    speech.truncate(speech.len() / FRAME_48K * FRAME_48K);
    write(&out, "reference", &speech);
    let narrowband = through_g711(&speech);
    write(&out, "g711", &narrowband);
    for complexity in [0, 2, 5, 9] {
        write(&out, &format!("g711_opus_c{complexity}"), &through_opus(&narrowband, complexity));
    }
}

fn write(dir: &Path, name: &str, samples: &[f32]) {
    koe_voice::wav::write_mono(&dir.join(format!("{name}.wav")), samples, 48_000).expect("write a WAV file");
}

/// 48 kHz → 8 kHz μ-law → 48 kHz, frame by frame as the gateway's media does.
fn through_g711(speech: &[f32]) -> Vec<f32> {
    let (mut down, mut up) = (Downsampler::default(), Upsampler::default());
    let (mut narrow, mut law, mut pcm, mut out) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for frame in speech.chunks_exact(FRAME_48K) {
        narrow.clear();
        down.process(frame, &mut narrow);
        let samples: Vec<i16> = narrow.iter().map(|s| to_i16(*s)).collect();
        law.clear();
        G711Law::Ulaw.encode_into(&samples, &mut law);
        pcm.clear();
        G711Law::Ulaw.decode_into(&law, &mut pcm);
        let decoded: Vec<f32> = pcm.iter().map(|s| to_f32(*s)).collect();
        up.process(&decoded, &mut out);
    }
    out
}

/// Opus at `complexity` (32 kbit/s, VBR, in-band FEC, as Koe sends) and back.
fn through_opus(audio: &[f32], complexity: i32) -> Vec<f32> {
    let mut encoder = OpusEncoder::new(48_000, 1, Application::Voip).expect("encoder");
    encoder.bitrate_bps = 32_000;
    encoder.complexity = complexity;
    encoder.rate_control = RateControl::Vbr;
    encoder.use_inband_fec = true;
    let mut decoder = OpusDecoder::new(48_000, 1).expect("decoder");
    let (mut packet, mut frame, mut out) = (vec![0u8; 1500], vec![0.0f32; FRAME_48K], Vec::new());
    for chunk in audio.chunks_exact(FRAME_48K) {
        let length = encoder.encode(chunk, FRAME_48K, &mut packet).expect("encode");
        decoder.decode(&packet[..length], FRAME_48K, &mut frame).expect("decode");
        out.extend_from_slice(&frame);
    }
    out
}
