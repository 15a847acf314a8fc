//! The voice engine end to end in virtual time (real Opus, seeded networks): what arrives
//! matches what was sent on a clean path, redundancy recovers random and bursty loss that
//! FEC alone cannot, and the jitter buffer grows under jitter and reordering, and only then.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use koe_voice::impairment::{Impairment, LossModel};
use koe_voice::signal::{best_lag, speechlike};
use koe_voice::simulate::{CallSimulation, SimulationResult};
use koe_voice::SAMPLE_RATE;

/// The best normalised cross-correlation of `played` against `sent` (played lagging by up to
/// 500 ms), and that lag.
fn alignment(sent: &[f32], played: &[f32]) -> (f64, Duration) {
    let (lag, score) = best_lag(sent, played, SAMPLE_RATE as usize / 2);
    (score, Duration::from_micros(lag.max(0) as u64 * 1_000_000 / u64::from(SAMPLE_RATE)))
}

/// Runs the call; the correlation and lag are measured over the second half, once the
/// buffer has settled (each delay adjustment shifts what follows by a frame).
fn run(impairment: Impairment, fixed_redundancy: Option<usize>) -> (SimulationResult, f64, Duration) {
    let speech = speechlike(6);
    let simulation = CallSimulation { impairment, fixed_redundancy, seed: 42, ..CallSimulation::default() };
    let result = simulation.run(&speech).unwrap();
    let half = speech.len() / 2;
    let (correlation, lag) = alignment(&speech[half..], &result.played[half..]);
    eprintln!(
        "{impairment:?} copies {fixed_redundancy:?}: link loss {:.3}, after recovery {:.4}, correlation {correlation:.3}, lag {lag:?}, {:.0} bit/s, {:?}",
        result.link_loss,
        result.receiver.jitter.loss_after_recovery(),
        result.bits_per_second,
        result.receiver.jitter,
    );
    (result, correlation, lag)
}

#[test]
fn a_clean_path_delivers_the_speech_with_little_delay() {
    let (result, correlation, lag) = run(Impairment::CLEAN, None);
    let jitter = result.receiver.jitter;
    assert!(correlation > 0.8, "the played audio is the sent speech (correlation {correlation:.3})");
    assert_eq!((jitter.concealed, jitter.late, jitter.from_copies, jitter.expanded), (0, 0, 0, 0));
    assert_eq!(result.sender.redundancy, 0, "no copies once the path is known to be clean");
    // Capture (20 ms) + playout phase (3 ms) + target (5 ms) + codec look-ahead.
    assert!(lag <= Duration::from_millis(40), "mouth-to-ear in the engine {lag:?}");
    assert!(result.bits_per_second < 40_000.0, "{} bit/s", result.bits_per_second);
}

#[test]
fn copies_recover_twenty_percent_random_loss_that_fec_alone_cannot() {
    let lossy = Impairment { loss: LossModel::Random(0.20), ..Impairment::CLEAN };
    let (adaptive, adaptive_correlation, lag) = run(lossy, None);
    let (fec_only, fec_correlation, _) = run(lossy, Some(0));
    let recovered = adaptive.receiver.jitter.loss_after_recovery();
    let unrecovered = fec_only.receiver.jitter.loss_after_recovery();
    assert!((0.15..0.25).contains(&adaptive.link_loss));
    assert!(adaptive.sender.redundancy >= 2 && adaptive.sender.twins, "the sender followed the reported loss: {:?}", adaptive.sender);
    assert!(recovered < 0.015, "loss after recovery with copies: {recovered:.3}");
    assert!(recovered < unrecovered, "copies {recovered:.3} vs FEC alone {unrecovered:.3}");
    // FEC rebuilds a lost frame at a fraction of the bitrate; a copy is the frame itself.
    assert!(adaptive_correlation > fec_correlation, "{adaptive_correlation:.3} vs {fec_correlation:.3}");
    // Twins let two copies do what three did: mouth-to-ear stays within 80 ms.
    assert!(lag <= Duration::from_millis(80), "waiting for copies costs at most a few frames: {lag:?}");
}

#[test]
fn bursty_loss_is_recovered_too() {
    let bursty = Impairment { loss: LossModel::bursty(0.10, 2.5), ..Impairment::CLEAN };
    let (result, _, _) = run(bursty, None);
    let (fec_only, _, _) = run(bursty, Some(0));
    let recovered = result.receiver.jitter.loss_after_recovery();
    let unrecovered = fec_only.receiver.jitter.loss_after_recovery();
    assert!(recovered < unrecovered, "copies {recovered:.3} vs FEC alone {unrecovered:.3}");
}

#[test]
fn the_buffer_grows_for_jitter_and_reordering_and_stays_small_without() {
    let jittery = Impairment { delay: Duration::from_millis(30), jitter: Duration::from_millis(60), ..Impairment::CLEAN };
    let (result, correlation, _) = run(jittery, None);
    let jitter = result.receiver.jitter;
    assert!(jitter.target_delay >= Duration::from_millis(40), "{:?}", jitter.target_delay);
    assert!(jitter.target_delay <= Duration::from_millis(100), "{:?}", jitter.target_delay);
    assert!(jitter.late < jitter.frames / 20, "{} of {} frames late", jitter.late, jitter.frames);
    assert!(correlation > 0.6, "{correlation:.3}");
}

#[test]
fn the_same_seed_gives_the_same_call() {
    let lossy = Impairment { loss: LossModel::Random(0.1), jitter: Duration::from_millis(30), ..Impairment::CLEAN };
    let (first, _, _) = run(lossy, None);
    let (second, _, _) = run(lossy, None);
    assert_eq!(first.played, second.played);
}
