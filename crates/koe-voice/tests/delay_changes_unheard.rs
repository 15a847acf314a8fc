//! The jitter buffer changes its delay in the middle of continuous speech by stretching it,
//! never by inserting or dropping whole frames: real Opus, a voice that never pauses, and a
//! path whose delay falls (the buffer must shorten) or whose loss starts (the buffer must wait
//! for copies, so grow). The output keeps the voice's pitch and has no click: no step between
//! neighbouring samples larger than the voice itself makes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use koe_voice::codec::DEFAULT_BITRATE;
use koe_voice::receiver::ReceiverStats;
use koe_voice::{Backend, JitterConfig, VoiceReceiver, VoiceSender, FRAME_SAMPLES, SAMPLE_RATE};

const PITCH: f32 = 150.0;

/// `seconds` of a voice at [`PITCH`] that never pauses (a slow vibrato of ±2 %, as a voice has).
fn continuous_voice(seconds: usize) -> Vec<f32> {
    let rate = SAMPLE_RATE as f32;
    (0..seconds * SAMPLE_RATE as usize)
        .map(|i| {
            let t = i as f32 / rate;
            let phase = 2.0 * std::f32::consts::PI * (PITCH * t + 3.0 / 2.0 * (1.0 - (t * 2.0).cos()) / std::f32::consts::PI);
            0.3 * (1..6).map(|h| (phase * h as f32).sin() / h as f32).sum::<f32>()
        })
        .collect()
}

/// What to do with frame `n`: deliver it after this one-way delay, or lose it.
type Path = dyn Fn(u32) -> Option<Duration>;

/// Sends `speech` with `copies` copies per packet over `path`, plays it out every 20 ms
/// (3 ms after each send), and returns what was played with the receiver's statistics as the
/// last frame was sent (after it, the buffer waits for frames that never come).
fn call(speech: &[f32], copies: usize, path: &Path) -> (Vec<f32>, ReceiverStats) {
    let mut sender = VoiceSender::new(Backend::OpusPure.encoder(DEFAULT_BITRATE).unwrap());
    sender.fix_redundancy(Some(copies));
    let mut receiver = VoiceReceiver::new(Backend::OpusPure.decoder().unwrap(), JitterConfig::default());
    let start = Instant::now();
    let mut in_flight: Vec<(Instant, Vec<u8>)> = Vec::new();
    let mut played = Vec::new();
    let mut out = vec![0.0; FRAME_SAMPLES];
    let mut stats = receiver.stats();
    let frames = speech.len() / FRAME_SAMPLES;
    for n in 0..frames + 20 {
        let sent = start + Duration::from_millis(20 * (n as u64 + 1));
        if n < frames {
            let payload = sender.encode(&speech[n * FRAME_SAMPLES..(n + 1) * FRAME_SAMPLES]).unwrap();
            if let Some(delay) = path(n as u32) {
                in_flight.push((sent + delay, payload));
            }
        }
        let play_at = sent + Duration::from_millis(3);
        in_flight.sort_by_key(|(at, _)| *at);
        while in_flight.first().is_some_and(|(at, _)| *at <= play_at) {
            let (at, payload) = in_flight.remove(0);
            receiver.receive(at, &payload).unwrap();
        }
        receiver.play(play_at, &mut out).unwrap();
        played.extend_from_slice(&out);
        if n + 1 == frames {
            stats = receiver.stats();
        }
    }
    (played, stats)
}

/// The largest step between neighbouring samples.
fn roughest_step(x: &[f32]) -> f32 {
    x.windows(2).map(|w| (w[1] - w[0]).abs()).fold(0.0, f32::max)
}

/// The pitch (Hz) of a window: its first autocorrelation peak between 70 and 400 Hz nearly
/// as high as the highest (the highest alone may be two periods).
fn pitch_of(x: &[f32]) -> f32 {
    let rate = SAMPLE_RATE as usize;
    let similarity = |lag: usize| {
        let (a, b) = (&x[..x.len() - lag], &x[lag..]);
        let dot: f32 = a.iter().zip(b).map(|(p, q)| p * q).sum();
        dot / (a.iter().map(|p| p * p).sum::<f32>() * b.iter().map(|q| q * q).sum::<f32>()).sqrt().max(f32::EPSILON)
    };
    let scores: Vec<f32> = (rate / 400..=rate / 70).map(similarity).collect();
    let best = scores.iter().copied().fold(f32::MIN, f32::max);
    let peak = (1..scores.len() - 1)
        .find(|&i| scores[i] >= scores[i - 1] && scores[i] >= scores[i + 1] && scores[i] >= best - 0.05)
        .unwrap_or(0);
    rate as f32 / (rate / 400 + peak) as f32
}

/// Every 40 ms window from `from` on has the voice's pitch (within the vibrato and 3 %), and
/// no step is larger than twice the voice's own.
fn assert_unheard(speech: &[f32], played: &[f32], from: usize) {
    let window = SAMPLE_RATE as usize / 25;
    for (i, chunk) in played[from..played.len() - 20 * FRAME_SAMPLES].chunks_exact(window).enumerate() {
        let pitch = pitch_of(chunk);
        assert!((pitch - PITCH).abs() / PITCH < 0.05, "window {i}: {pitch:.1} Hz instead of about {PITCH} Hz");
    }
    let limit = 2.0 * roughest_step(speech);
    let step = roughest_step(&played[from..]);
    assert!(step <= limit, "a click: a step of {step:.3} where the voice makes at most {limit:.3}");
}

#[test]
fn a_path_that_gets_faster_is_followed_by_shortening_the_voice() {
    let speech = continuous_voice(12);
    // 80 ms one way for 3 s, then 20 ms: the buffer holds 60 ms more than it needs (once the
    // slow arrivals have left its four-second memory, before which they count as jitter).
    let (played, stats) = call(&speech, 0, &|n| Some(Duration::from_millis(if n < 150 { 80 } else { 20 })));
    let jitter = stats.jitter;
    eprintln!("{stats:?}");
    assert_eq!((jitter.dropped, jitter.expanded, jitter.concealed, jitter.underruns), (0, 0, 0, 0), "no frame dropped or inserted");
    assert!(stats.stretched_shorter >= Duration::from_millis(45), "the delay came down by stretching: {stats:?}");
    // Back within the band the buffer keeps around its target (5 ms): up to 30 ms above.
    assert!(jitter.playout_delay <= Duration::from_millis(35), "and it is down: {:?}", jitter.playout_delay);
    assert_unheard(&speech, &played, SAMPLE_RATE as usize);
}

#[test]
fn loss_that_starts_mid_word_grows_the_buffer_by_lengthening_the_voice() {
    let speech = continuous_voice(8);
    // Clean for 3 s, then every tenth packet lost: the buffer starts waiting for two copies
    // (40 ms more), in the middle of the voice. (21 ms one way: each frame arrives 2 ms
    // before it is due, so the buffer has no slack to begin with.)
    let (played, stats) = call(&speech, 2, &|n| (n < 150 || n % 10 != 3).then_some(Duration::from_millis(21)));
    let jitter = stats.jitter;
    eprintln!("{stats:?}");
    assert_eq!((jitter.dropped, jitter.expanded), (0, 0), "no frame dropped or inserted to grow");
    assert!(jitter.underruns <= 1, "only the first loss was waited for (until its copy came): {jitter:?}");
    assert!(stats.stretched_longer >= Duration::from_millis(5), "the rest of the growth was stretching: {stats:?}");
    assert!(jitter.target_delay >= Duration::from_millis(40), "{:?}", jitter.target_delay);
    assert_eq!(jitter.concealed, 0, "every lost packet was rebuilt from a copy: {jitter:?}");
    assert_unheard(&speech, &played, SAMPLE_RATE as usize);
}
