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

/// How well `heard` (a recording) carries `speech` (at least 2.5 s of what was sent): the
/// median correlation of quarter-second windows over its first two seconds, each found near
/// where the speech sits in the recording; `None` if the recording holds fewer than five such
/// windows. The two ends of a call start apart (through relays and proxies by up to a second),
/// and the jitter buffer moves the speech by a few milliseconds as it adapts: one correlation
/// over the whole would punish both.
pub fn speech_match(speech: &[f32], heard: &[f32]) -> Option<f64> {
    let second = SAMPLE_RATE as usize;
    let quarter = second / 4;
    let probe = &speech[quarter..quarter + second / 2];
    let (offset, _) = best_lag(probe, heard, 2 * second);
    let offset = offset - quarter as isize;
    let mut similarities: Vec<f64> = (0..2 * second)
        .step_by(quarter)
        .filter_map(|start| {
            let from = (start as isize + offset - quarter as isize).max(0) as usize;
            (from + 3 * quarter <= heard.len()).then(|| best_lag(&speech[start..start + quarter], &heard[from..], 2 * quarter).1)
        })
        .collect();
    if similarities.len() < 5 {
        return None;
    }
    similarities.sort_by(f64::total_cmp);
    Some(similarities[similarities.len() / 2])
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

    #[test]
    fn speech_matches_a_late_copy_and_not_silence_or_another_stretch() {
        let second = SAMPLE_RATE as usize;
        let speech = speechlike(3);
        let mut late = vec![0.0; 40_000];
        late.extend_from_slice(&speech);
        assert!(speech_match(&speech, &late).unwrap() > 0.99);
        let other = speechlike(6)[3 * second..].to_vec();
        assert!(speech_match(&speech, &other).is_none_or(|similarity| similarity < 0.8));
        assert_eq!(speech_match(&speech, &vec![0.0; second / 2]), None);
    }
}
