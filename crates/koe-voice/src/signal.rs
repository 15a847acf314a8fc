//! Signals and comparisons for tests and benchmarks: a synthetic speech-like sound, and the
//! correlation and lag between what was sent and what was played.

use crate::codec::SAMPLE_RATE;

/// `seconds` of something speech-like at 48 kHz: a voiced sound (170 Hz ± 30 Hz with seven
/// harmonics) in syllables of 175 ms with pauses between them.
pub fn speechlike(seconds: usize) -> Vec<f32> {
    let rate = SAMPLE_RATE as f32;
    (0..seconds * SAMPLE_RATE as usize)
        .map(|i| {
            let t = i as f32 / rate;
            let syllable = (t * 4.0).fract();
            let envelope = if syllable < 0.7 { (syllable / 0.7 * std::f32::consts::PI).sin() } else { 0.0 };
            // The phase of a pitch gliding 110–170 Hz: the integral of 140 + 30·sin(1.3 t).
            let phase = 2.0 * std::f32::consts::PI * (140.0 * t + 30.0 / 1.3 * (1.0 - (t * 1.3).cos()));
            let voice: f32 = (1..8).map(|h| (phase * h as f32).sin() / h as f32).sum();
            0.25 * envelope * voice
        })
        .collect()
}

/// Normalised correlation of the overlapping start of `a` and `b` (1.0: same shape).
pub fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let energy = |x: &[f32]| x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
    dot / (energy(a) * energy(b)).sqrt().max(f64::EPSILON)
}

/// The lag in samples (−`max_lag`..`max_lag`) at which `later` best matches `earlier`, and
/// the correlation there: positive when `later` lags behind. Negative lags go no further than
/// half of `earlier`, so that a few overlapping samples cannot match perfectly by chance.
pub fn best_lag(earlier: &[f32], later: &[f32], max_lag: usize) -> (isize, f64) {
    let at = |lag: isize| {
        if lag >= 0 {
            correlation(earlier, later.get(lag as usize..).unwrap_or(&[]))
        } else {
            correlation(earlier.get(lag.unsigned_abs()..).unwrap_or(&[]), later)
        }
    };
    let window = max_lag as isize;
    let best = |lags: &mut dyn Iterator<Item = isize>| lags.map(|lag| (lag, at(lag))).fold((0, f64::MIN), |b, c| if c.1 > b.1 { c } else { b });
    // Coarsely by half milliseconds, then sample by sample around the best: harmonics are
    // only a few dozen samples apart.
    let earliest = -window.min(earlier.len() as isize / 2);
    let (coarse, _) = best(&mut (earliest..=window).step_by(24));
    best(&mut ((coarse - 24).max(earliest)..=coarse + 24))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delayed_copy_is_found_at_its_delay() {
        let speech = speechlike(1);
        let mut delayed = vec![0.0; 1234];
        delayed.extend_from_slice(&speech);
        let (lag, score) = best_lag(&speech, &delayed, 4800);
        assert_eq!(lag, 1234);
        assert!(score > 0.999);
        assert_eq!(best_lag(&delayed, &speech, 4800).0, -1234);
    }
}
