//! Time-stretching of decoded speech, sans-IO: how the jitter buffer changes its delay in the
//! middle of words without being heard (WebRTC NetEq's "accelerate" and "preemptive expand").
//!
//! Voiced speech repeats itself every pitch period (2.5–14 ms). Removing one whole period, or
//! repeating one, makes the sound shorter or longer by that much and leaves its pitch as it was;
//! cross-fading the two periods across the join leaves no click. The period is found where the
//! signal best matches itself one period later (a normalised correlation, searched coarsely on a
//! decimated copy and refined at the full rate). Sound that does not repeat (a hiss, a plosive)
//! is left alone, unless it is so quiet that nothing can be heard either way; the caller asks
//! again on the next frame.

use crate::codec::SAMPLE_RATE;

/// The shortest period searched: 2.5 ms (a 400 Hz voice).
pub const MIN_PERIOD: usize = SAMPLE_RATE as usize / 400;
/// The longest: about 14 ms (a 70 Hz voice).
pub const MAX_PERIOD: usize = SAMPLE_RATE as usize / 70;
/// How much alike two neighbouring periods must be for one to go or be repeated.
const MIN_SIMILARITY: f32 = 0.7;
/// Below this RMS (about −50 dBFS) any stretch is inaudible: it goes ahead without a period.
const SILENT_RMS: f32 = 0.003;
/// The coarse search runs on every `DECIMATION`-th sample of a smoothed copy (12 kHz).
const DECIMATION: usize = 4;

/// Which way to stretch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stretch {
    /// Remove one period: the buffered delay falls by that much.
    Shorter,
    /// Repeat one period: the buffered delay grows by that much.
    Longer,
}

/// Stretches `samples` by whole pitch periods until at least `at_least` samples moved (or no
/// period is left to move), touching nothing before `from` (audio already committed); returns
/// how many samples were removed or added (0: no period worth moving). One stretch of several
/// periods is heard less than as many stretches a frame apart.
pub fn stretch(samples: &mut Vec<f32>, from: usize, way: Stretch, at_least: usize) -> usize {
    let mut moved = 0;
    loop {
        let period = stretch_once(samples, from, way);
        moved += period;
        if period == 0 || moved >= at_least {
            return moved;
        }
    }
}

/// One period removed or repeated at `from`.
fn stretch_once(samples: &mut Vec<f32>, from: usize, way: Stretch) -> usize {
    let Some(tail) = samples.get(from..) else { return 0 };
    let Some(period) = find_period(tail) else { return 0 };
    let (a, b) = (from, from + period);
    match way {
        Stretch::Shorter => {
            // x[..a] · fade(x[a..b] → x[b..b+P]) · x[b+P..]
            let blended: Vec<f32> = cross_fade(&samples[a..b], &samples[b..b + period]);
            samples.splice(a..b + period, blended);
        }
        Stretch::Longer => {
            // x[..b] · fade(x[b..b+P] → x[a..b]) · x[b..]
            let blended: Vec<f32> = cross_fade(&samples[b..b + period], &samples[a..b]);
            samples.splice(b..b, blended);
        }
    }
    period
}

/// `out` fades from `from` to `to` (raised-cosine weights); both have the same length.
fn cross_fade(from: &[f32], to: &[f32]) -> Vec<f32> {
    let n = from.len() as f32;
    from.iter()
        .zip(to)
        .enumerate()
        .map(|(i, (&x, &y))| {
            let w = 0.5 - 0.5 * (std::f32::consts::PI * (i as f32 + 0.5) / n).cos();
            x * (1.0 - w) + y * w
        })
        .collect()
}

/// The period to move at the start of `x`: the lag at which `x` best matches itself, if the
/// match is close enough (or `x` is silent: then the longest lag that fits).
fn find_period(x: &[f32]) -> Option<usize> {
    let longest = (x.len() / 2).min(MAX_PERIOD);
    if longest < MIN_PERIOD {
        return None;
    }
    let rms = (x[..2 * longest].iter().map(|s| s * s).sum::<f32>() / (2 * longest) as f32).sqrt();
    if rms < SILENT_RMS {
        return Some(longest);
    }
    // Coarse: on a smoothed, decimated copy.
    let small: Vec<f32> = x.chunks_exact(DECIMATION).map(|c| c.iter().sum::<f32>() / DECIMATION as f32).collect();
    let coarse = best_lag(&small, MIN_PERIOD / DECIMATION, longest / DECIMATION, true)?.0 * DECIMATION;
    // Fine: around it, at the full rate.
    let low = coarse.saturating_sub(DECIMATION).max(MIN_PERIOD);
    let high = (coarse + DECIMATION).min(longest);
    let (period, similarity) = best_lag(x, low, high, false)?;
    (similarity >= MIN_SIMILARITY).then_some(period)
}

/// The lag in `low..=high` with the highest normalised correlation between `x[..lag]` and
/// `x[lag..2·lag]`, and that correlation. With `shortest`, the first peak nearly as high as
/// the best wins, so that one period is found rather than two.
fn best_lag(x: &[f32], low: usize, high: usize, shortest: bool) -> Option<(usize, f32)> {
    let similarity = |lag: usize| {
        let (a, b) = (&x[..lag], &x[lag..2 * lag]);
        let dot: f32 = a.iter().zip(b).map(|(p, q)| p * q).sum();
        let energy = a.iter().map(|p| p * p).sum::<f32>() * b.iter().map(|q| q * q).sum::<f32>();
        dot / energy.sqrt().max(f32::EPSILON)
    };
    let scores: Vec<(usize, f32)> = (low..=high).filter(|&lag| 2 * lag <= x.len()).map(|lag| (lag, similarity(lag))).collect();
    let best = scores.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1))?;
    if !shortest {
        return Some(best);
    }
    let peak = |i: usize| {
        let score = scores[i].1;
        (i == 0 || scores[i - 1].1 <= score) && scores.get(i + 1).is_none_or(|next| next.1 <= score)
    };
    (0..scores.len()).find(|&i| peak(i) && scores[i].1 >= best.1 - 0.03).map(|i| scores[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::speechlike;

    /// A voice at `pitch` Hz with a few harmonics.
    fn voice(pitch: f32, samples: usize) -> Vec<f32> {
        (0..samples)
            .map(|i| {
                let phase = 2.0 * std::f32::consts::PI * pitch * i as f32 / SAMPLE_RATE as f32;
                0.3 * (1..6).map(|h| (phase * h as f32).sin() / h as f32).sum::<f32>()
            })
            .collect()
    }

    /// The largest step between neighbouring samples.
    fn roughest_step(x: &[f32]) -> f32 {
        x.windows(2).map(|w| (w[1] - w[0]).abs()).fold(0.0, f32::max)
    }

    /// The pitch (Hz) of `x`, from its autocorrelation peak.
    fn pitch_of(x: &[f32]) -> f32 {
        let (lag, _) = best_lag(x, MIN_PERIOD, MAX_PERIOD, true).unwrap_or((1, 0.0));
        SAMPLE_RATE as f32 / lag as f32
    }

    #[test]
    fn a_voice_gets_one_period_shorter_or_longer_with_its_pitch_and_no_click() {
        for pitch in [90.0, 150.0, 220.0] {
            for way in [Stretch::Shorter, Stretch::Longer] {
                let original = voice(pitch, 1920);
                let mut stretched = original.clone();
                let moved = stretch(&mut stretched, 0, way, 1);
                let period = SAMPLE_RATE as f32 / pitch;
                assert!((moved as f32 - period).abs() <= 2.0, "{pitch} Hz {way:?}: moved {moved}, period {period}");
                let expected = if way == Stretch::Shorter { 1920 - moved } else { 1920 + moved };
                assert_eq!(stretched.len(), expected);
                assert!(
                    roughest_step(&stretched) <= roughest_step(&original) * 1.05,
                    "{pitch} Hz {way:?}: a step of {} where the voice has at most {}",
                    roughest_step(&stretched),
                    roughest_step(&original)
                );
                let heard = pitch_of(&stretched);
                assert!((heard - pitch).abs() / pitch < 0.02, "{pitch} Hz became {heard} Hz ({way:?})");
            }
        }
    }

    #[test]
    fn several_periods_move_at_once_when_asked() {
        let original = voice(200.0, 2880);
        for way in [Stretch::Shorter, Stretch::Longer] {
            let mut stretched = original.clone();
            let moved = stretch(&mut stretched, 0, way, 600);
            assert!((600..600 + 240).contains(&moved), "{way:?}: {moved} samples for at least 600");
            assert_eq!(moved % 240, 0, "{way:?}: whole periods of 240 samples");
            assert!(roughest_step(&stretched) <= roughest_step(&original) * 1.05, "{way:?}");
        }
    }

    #[test]
    fn speech_keeps_its_start_and_stays_smooth_where_it_is_stretched() {
        let speech = speechlike(1);
        // In a syllable (speechlike's start in the middle of the first one).
        let from = 2400;
        for way in [Stretch::Shorter, Stretch::Longer] {
            let mut stretched = speech[..from + 1920].to_vec();
            let moved = stretch(&mut stretched, from, way, 1);
            assert!(moved >= MIN_PERIOD, "voiced speech has a period ({way:?})");
            assert_eq!(stretched[..from], speech[..from], "what was committed is untouched");
            let original_step = roughest_step(&speech[..from + 1920]);
            assert!(roughest_step(&stretched) <= original_step * 1.05, "{way:?}: {} vs {original_step}", roughest_step(&stretched));
        }
    }

    #[test]
    fn noise_is_left_alone_and_silence_or_too_little_sound_is_handled() {
        // A deterministic hiss: no period.
        let mut state = 1u32;
        let mut hiss: Vec<f32> = (0..1920)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1 << 24) as f32 * 0.4 - 0.2
            })
            .collect();
        assert_eq!(stretch(&mut hiss, 0, Stretch::Shorter, 1), 0);
        assert_eq!(hiss.len(), 1920);
        let mut silence = vec![0.0; 1920];
        assert_eq!(stretch(&mut silence, 0, Stretch::Longer, 1), MAX_PERIOD);
        assert_eq!(silence.len(), 1920 + MAX_PERIOD);
        let mut short = voice(150.0, MIN_PERIOD);
        assert_eq!(stretch(&mut short, 0, Stretch::Shorter, 1), 0, "less than two periods");
        assert_eq!(stretch(&mut short, 10_000, Stretch::Shorter, 1), 0, "from beyond the end");
    }
}
