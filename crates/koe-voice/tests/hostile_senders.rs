//! Senders that misbehave, by accident or on purpose: absurd frame numbers among good ones, a
//! sender that restarts its numbering, one that pauses for seconds, and clocks that run 1 %
//! fast or slow. Whatever they send, the jitter buffer holds a bounded number of frames, and
//! it neither stalls nor drifts: the good frames keep playing and the delay stays small.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use koe_voice::impairment::SeededRng;
use koe_voice::{JitterBuffer, JitterConfig, Playout, VoicePayload};

fn payload(frame: u32) -> Vec<u8> {
    let opus = frame.to_be_bytes();
    let mut out = Vec::new();
    VoicePayload { frame, twin: false, opus: &opus, copies: Vec::new() }.write(&mut out).unwrap();
    out
}

/// What a run of the playout clock saw.
struct Run {
    /// Per tick: whether a frame of the stream was played.
    played: Vec<bool>,
    most_held: usize,
    buffer: JitterBuffer,
}

/// Plays out every 20 ms for `seconds`, delivering what `sends` says arrives in each tick
/// (frame numbers, each arriving `offset` into the tick); pauses every half second.
fn run(seconds: u64, mut sends: impl FnMut(u64) -> Vec<(u32, Duration)>) -> Run {
    let start = Instant::now();
    let mut buffer = JitterBuffer::new(JitterConfig::default());
    let (mut played, mut most_held) = (Vec::new(), 0);
    for tick in 0..seconds * 50 {
        let at = start + Duration::from_millis(20 * tick);
        for (frame, offset) in sends(tick) {
            buffer.push(at + offset, &payload(frame)).unwrap();
        }
        most_held = most_held.max(buffer.held_frames());
        let quiet = tick % 25 < 4;
        played.push(matches!(buffer.pop(at + Duration::from_millis(19), quiet), Playout::Frame { .. }));
    }
    Run { played, most_held, buffer }
}

/// The share of ticks in `from..to` (seconds) that played a frame.
fn playing(run: &Run, from: u64, to: u64) -> f64 {
    let ticks = &run.played[(from * 50) as usize..(to * 50) as usize];
    ticks.iter().filter(|&&p| p).count() as f64 / ticks.len() as f64
}

const ON_TIME: Duration = Duration::from_millis(5);

#[test]
fn absurd_frame_numbers_among_good_ones_are_set_aside() {
    let mut rng = SeededRng::new(3);
    let result = run(20, |tick| {
        let mut sends = vec![(tick as u32 + 7, ON_TIME)];
        if tick % 5 == 0 {
            sends.push((rng.next_u64() as u32, ON_TIME));
        }
        sends
    });
    assert!(playing(&result, 1, 20) > 0.98, "the good stream plays on: {}", playing(&result, 1, 20));
    assert!(result.most_held <= 8, "held at most {}", result.most_held);
    let stats = result.buffer.stats();
    assert!(stats.strays >= 150, "{stats:?}");
    assert!(stats.playout_delay <= Duration::from_millis(40), "{stats:?}");
}

#[test]
fn a_sender_that_restarts_its_numbering_is_followed_within_frames() {
    let result = run(10, |tick| {
        let frame = if tick < 250 { 1000 + tick as u32 } else { 4_000_000_000u32.wrapping_add(tick as u32) };
        vec![(frame, ON_TIME)]
    });
    assert!(playing(&result, 1, 5) > 0.98);
    let after: &[bool] = &result.played[250..];
    let resumed = after.iter().position(|&p| p).unwrap();
    assert!(resumed <= 5, "played again {resumed} ticks after the jump");
    assert!(playing(&result, 6, 10) > 0.98, "{}", playing(&result, 6, 10));
}

#[test]
fn a_sender_that_pauses_for_seconds_is_heard_again_at_once_and_without_lag() {
    // 3 s of sending, a 3 s pause (the process was stopped), then on with the next numbers.
    let result = run(15, |tick| match tick {
        0..150 => vec![(tick as u32, ON_TIME)],
        150..300 => Vec::new(),
        _ => vec![(tick as u32 - 150, ON_TIME)],
    });
    let after: &[bool] = &result.played[300..];
    let resumed = after.iter().position(|&p| p).unwrap();
    assert!(resumed <= 2, "played again {resumed} ticks after the sender came back");
    assert!(playing(&result, 7, 15) > 0.97, "{}", playing(&result, 7, 15));
    let stats = result.buffer.stats();
    assert!(stats.playout_delay <= Duration::from_millis(40), "the pause left no lag behind: {stats:?}");
    assert!(result.most_held <= 8, "held at most {}", result.most_held);
}

#[test]
fn a_clock_running_one_percent_fast_or_slow_neither_fills_nor_starves_the_buffer() {
    for (name, per_frame_micros) in [("fast", 19_800u64), ("slow", 20_200u64)] {
        // Frame n is sent at n × 19.8 ms (or 20.2 ms) of the receiver's time.
        let mut next = 0u64;
        let result = run(60, |tick| {
            let tick_end = (tick + 1) * 20_000;
            let mut sends = Vec::new();
            while next * per_frame_micros < tick_end {
                let into_tick = (next * per_frame_micros).saturating_sub(tick * 20_000);
                sends.push((next as u32, Duration::from_micros(into_tick)));
                next += 1;
            }
            sends
        });
        let stats = result.buffer.stats();
        eprintln!("{name}: {stats:?}, held at most {}", result.most_held);
        assert!(result.most_held <= 8, "{name}: held at most {}", result.most_held);
        assert!(playing(&result, 2, 60) > 0.97, "{name}: {}", playing(&result, 2, 60));
        // A clock 1 % off drifts 40 ms over the buffer's four seconds of memory, which it
        // reads as jitter: the delay is that, bounded, and no more.
        assert!(stats.playout_delay <= Duration::from_millis(80), "{name}: {stats:?}");
    }
}
