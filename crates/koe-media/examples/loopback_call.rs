//! The media path of one call on loopback, measured: two media drivers (str0m ICE + DTLS-SRTP,
//! the voice engine, 20 ms clocks) in one process on real UDP sockets; one sends speech as its
//! microphone for a few seconds, the other records what it plays. Prints a Markdown table:
//! time to connect, mouth-to-ear delay (alignment of the recording with the speech), frames
//! lost, and CPU. Run several times with `--calls N`.
//!
//!   loopback_call [--speech FILE.wav] [--seconds 6] [--calls 5]

use std::time::{Duration, Instant};

use koe_media::driver::{self, CallAudio, MediaControls, Microphone, RelayStreams};
use koe_media::MediaSession;
use koe_voice::signal::{best_lag, speechlike};
use koe_voice::{wav, Backend, SAMPLE_RATE};
use tokio::net::UdpSocket;

fn cpu_seconds() -> f64 {
    // utime + stime of this process, from /proc (clock ticks of 1/100 s here).
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let fields: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            Some((fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut speech_path, mut seconds, mut calls) = (None, 6u64, 5usize);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--speech" => speech_path = Some(value),
            "--seconds" => seconds = value.parse()?,
            "--calls" => calls = value.parse()?,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    let speech = match &speech_path {
        Some(path) => wav::read_mono_48k(std::path::Path::new(path))?,
        None => speechlike(seconds as usize),
    };
    println!("| call | connected after | mouth-to-ear, first second / after 2 s | correlation | frames played | concealed | CPU (both sides) |");
    println!("|---|---|---|---|---|---|---|");
    for call in 1..=calls {
        let a_socket = UdpSocket::bind("127.0.0.1:0").await?;
        let b_socket = UdpSocket::bind("127.0.0.1:0").await?;
        let mut a = MediaSession::new(Instant::now(), &[a_socket.local_addr()?])?;
        let mut b = MediaSession::new(Instant::now(), &[b_socket.local_addr()?])?;
        let (offer, answer) = (a.local_description(), b.local_description());
        b.start(&offer, false)?;
        a.start(&answer, true)?;
        let audio = |samples| CallAudio { backend: Backend::OpusPure, bitrate: 32_000, microphone: Microphone::Samples(samples), speaker: None };
        let length = Duration::from_secs(seconds);
        let cpu_before = cpu_seconds();
        let (a, b) = tokio::join!(
            driver::run(a, a_socket, RelayStreams::default(), audio(speech.clone()), MediaControls::default(), tokio::time::sleep(length)),
            driver::run(b, b_socket, RelayStreams::default(), audio(Vec::new()), MediaControls::default(), tokio::time::sleep(length)),
        );
        let cpu = cpu_seconds() - cpu_before;
        let (a, b) = (a?, b?);
        // The first 0.8 s, before the jitter buffer's first adjustment.
        let window = (SAMPLE_RATE as usize * 4 / 5).min(speech.len());
        let (lag, similarity) = best_lag(&speech[..window], &b.recording, SAMPLE_RATE as usize / 2);
        // And once settled: 0.8 s from the 2nd second on, found near where it should be.
        let settled = (2 * SAMPLE_RATE as usize).min(speech.len().saturating_sub(window));
        let (settled_lag, _) = best_lag(&speech[settled..settled + window], &b.recording[settled.min(b.recording.len())..], SAMPLE_RATE as usize / 2);
        let jitter = b.stats.receiver.jitter;
        println!(
            "| {call} | {:.1} ms | {:.1} / {:.1} ms | {similarity:.3} | {} | {} | {:.1} % of a core |",
            a.stats.connected_after.unwrap_or_default().as_secs_f64() * 1000.0,
            lag as f64 * 1000.0 / f64::from(SAMPLE_RATE),
            settled_lag as f64 * 1000.0 / f64::from(SAMPLE_RATE),
            jitter.frames,
            jitter.concealed,
            100.0 * cpu / length.as_secs_f64(),
        );
    }
    Ok(())
}
