//! Call quality as a number: the ITU-T G.107 E-model's MOS estimate from mouth-to-ear delay
//! and the loss left after recovery. It is the narrow-band scale (at most ≈ 4.4); Opus is
//! counted as impairment-free when nothing is lost (Ie = 0) and as robust to loss as G.711
//! with concealment (Bpl = 25.1): a conservative estimate, for the call summary.

use std::time::Duration;

/// The E-model rating R for a one-way delay and a share of frames lost after recovery.
pub fn r_factor(mouth_to_ear: Duration, loss_after_recovery: f64) -> f64 {
    const IE: f64 = 0.0;
    const BPL: f64 = 25.1;
    let ta = mouth_to_ear.as_secs_f64() * 1000.0;
    let id = 0.024 * ta + if ta > 177.3 { 0.11 * (ta - 177.3) } else { 0.0 };
    let ppl = (loss_after_recovery.clamp(0.0, 1.0)) * 100.0;
    let ie_eff = IE + (95.0 - IE) * ppl / (ppl + BPL);
    93.2 - id - ie_eff
}

/// The mean opinion score (1.0–4.5) the E-model predicts.
pub fn mos(mouth_to_ear: Duration, loss_after_recovery: f64) -> f64 {
    let r = r_factor(mouth_to_ear, loss_after_recovery);
    if r <= 0.0 {
        1.0
    } else if r >= 100.0 {
        4.5
    } else {
        1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7e-6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_and_loss_lower_the_score() {
        let clean = mos(Duration::from_millis(60), 0.0);
        assert!((4.3..4.5).contains(&clean), "{clean}");
        assert!(mos(Duration::from_millis(300), 0.0) < clean - 0.3);
        assert!(mos(Duration::from_millis(60), 0.05) < clean - 0.5);
        assert!(mos(Duration::from_secs(5), 1.0) >= 1.0);
    }
}
