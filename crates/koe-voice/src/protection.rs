//! How copies of earlier frames protect a call against the loss the receiver reports: which
//! earlier frames each packet repeats (their distances back), and how long the receiver waits
//! for them. The sender and the receiver use one model of the path, a two-state Markov chain
//! (Gilbert) fitted to the measured loss rate and mean burst length. A frame stays lost only
//! when its own packet and every packet carrying one of its copies are lost. On a path that
//! loses packets in bursts, neighbouring packets go together, so the copies reach past the
//! bursts the path shows; on random loss the frames just before are enough and cost least delay.
//!
//! On random loss a sender may also send each packet twice, the twin half a frame after the
//! first ([`Protection::twins`]): a frame and each copy but the farthest then travel in two
//! packets by the time the receiver plays it, so fewer copies, reaching less far back, leave
//! as little lost, for less delay (at 20 % loss, copies of the two frames before and twins
//! leave 0.03 % lost after 40 ms; three copies alone 0.16 % after 60 ms). A twin so close
//! after its first shares a burst with it, so on bursty paths twins count for nothing.

use crate::payload::MAX_DISTANCE;

/// The share of frames that may stay lost after the copies waited for: above it, one more
/// copy (or a farther one) is worth its bandwidth and delay. PESQ set it: at 5 % random loss
/// one copy leaves 0.25 %, about a frame every 20 s, and that cost 0.1–0.2 in 30 s calls.
pub const RESIDUAL_LOSS_GOAL: f64 = 0.002;

/// Runs of lost packets this many times longer than independent loss would give are bursts.
const BURSTY_RUNS: f64 = 1.5;

/// How far a current copy set (or wait for copies) may miss the goal before it is replaced,
/// and how far inside it a cheaper set (or shorter wait) must be to replace it.
const HYSTERESIS: f64 = 1.5;

/// What a sender chooses from, by how far back the copies reach, then by the frames sent per
/// frame. Reach comes first: the receiver waits as many frames as the farthest copy it counts
/// on, and delay is what a caller hears, while a copy or a twin costs only bandwidth.
/// Consecutive sets suit random loss, with twins when it is heavy; spread ones outlast bursts.
const CANDIDATES: &[Protection] = &[
    Protection::copies(&[]),
    Protection::copies(&[1]),
    Protection::twins(&[1]),
    Protection::copies(&[2]),
    Protection::copies(&[1, 2]),
    Protection::twins(&[1, 2]),
    Protection::copies(&[1, 3]),
    Protection::copies(&[1, 2, 3]),
    Protection::twins(&[1, 2, 3]),
    Protection::copies(&[1, 2, 3, 4]),
    Protection::copies(&[2, 5]),
    Protection::copies(&[1, 3, 6]),
    Protection::copies(&[2, 5, 8]),
    Protection::copies(&[1, 3, 5, 8]),
    Protection::copies(&[2, 4, 6, 8]),
];

/// How a sender protects its frames: the earlier frames each packet repeats (their distances
/// back), and whether each packet is sent twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protection {
    pub distances: &'static [u32],
    pub twins: bool,
}

impl Protection {
    pub const NONE: Self = Self::copies(&[]);

    pub const fn copies(distances: &'static [u32]) -> Self {
        Self { distances, twins: false }
    }

    pub const fn twins(distances: &'static [u32]) -> Self {
        Self { distances, twins: true }
    }

    /// What it costs: its reach (the receiver's delay), then the frames sent per frame
    /// (bandwidth; a twin sends them all again).
    pub fn cost(&self) -> (u32, usize) {
        (self.reach(), (self.distances.len() + 1) * if self.twins { 2 } else { 1 })
    }

    /// How many frames back the farthest copy reaches: what the receiver waits for.
    pub fn reach(&self) -> u32 {
        self.distances.iter().copied().max().unwrap_or(0)
    }
}

const _: () = assert!(MAX_DISTANCE == 8, "CANDIDATES reach at most MAX_DISTANCE back");

/// The loss a receiver measured: the share of packets lost and the mean length of a run of
/// lost packets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathLoss {
    pub loss: f64,
    pub mean_burst: f64,
}

impl PathLoss {
    /// Sane values from whatever a report said (NaN, negative, out of range: no loss).
    pub fn new(loss: f64, mean_burst: f64) -> Self {
        let loss = if loss.is_finite() { loss.clamp(0.0, 0.99) } else { 0.0 };
        // Random loss at rate p has mean runs of 1/(1 − p). Losses are taken to be
        // independent unless their runs are clearly longer: a shorter measured mean (few
        // losses, all alone) is no promise that the next two packets are not lost together,
        // and a slightly longer one is most often chance (32 runs at 20 % loss measure
        // 1.25 ± 0.09), which would move the copies, and the delay, for nothing.
        let independent = 1.0 / (1.0 - loss);
        let bursty = mean_burst.is_finite() && mean_burst >= independent * BURSTY_RUNS;
        let mean_burst = if bursty { mean_burst } else { independent };
        Self { loss, mean_burst }
    }

    /// Whether the path loses packets in runs clearly longer than independent loss would.
    pub fn is_bursty(&self) -> bool {
        self.loss > 0.0 && self.mean_burst > 1.0 / (1.0 - self.loss) * (1.0 + 1e-9)
    }

    /// The share of frames still lost under `protection`, the receiver waiting for its
    /// farthest copy: with twins on random loss, each twin but the farthest copy's (which comes
    /// after that wait) is one more independent chance.
    pub fn residual_with(&self, protection: Protection) -> f64 {
        let copies = self.residual(protection.distances);
        if protection.twins && !self.is_bursty() {
            copies * self.loss.powi(protection.distances.len() as i32)
        } else {
            copies
        }
    }

    /// The share of frames still lost when the receiver can use copies at `distances`
    /// (frames back, ascending or not): the chance that the frame's packet and every one of
    /// those later packets are lost.
    pub fn residual(&self, distances: &[u32]) -> f64 {
        let p = self.loss;
        if p <= 0.0 {
            return 0.0;
        }
        // Lost → received with 1/burst; received → lost so that the mean loss is p.
        let recover = 1.0 / self.mean_burst;
        let fall = (p * recover / (1.0 - p)).min(1.0);
        // P(lost at t + k | lost at t) = p + (1 − p)·λᵏ, with λ = 1 − recover − fall.
        let lambda = 1.0 - recover - fall;
        let mut sorted = distances.to_vec();
        sorted.sort_unstable();
        let mut at = 0;
        let mut chance = p;
        for distance in sorted {
            let steps = distance.saturating_sub(at) as i32;
            chance *= (p + (1.0 - p) * lambda.powi(steps)).clamp(0.0, 1.0);
            at = distance;
        }
        chance
    }

    /// The protection to send, given the one sent now. The current one stays while it does
    /// about as well as the goal asks (a change of reach changes the receiver's delay); one
    /// that reaches less far back, or as far for less bandwidth, replaces it only when that one
    /// is well inside the goal. One reaching no farther that leaves less lost replaces it at
    /// once: that changes no delay (lab calls at 5 % random loss kept one copy, 0.25 % lost,
    /// "close enough" to the goal, where twins left 0.01 %, and lost three frames to FEC).
    pub fn protection_after(&self, current: Protection) -> Protection {
        let best = self.protection();
        if !CANDIDATES.contains(&current) {
            return best;
        }
        let keep = self.residual_with(current) < RESIDUAL_LOSS_GOAL * HYSTERESIS;
        let cheaper = best.cost() < current.cost() && self.residual_with(best) < RESIDUAL_LOSS_GOAL / HYSTERESIS;
        let better_as_near = best.reach() <= current.reach() && self.residual_with(best) < self.residual_with(current);
        if keep && !cheaper && !better_as_near {
            current
        } else {
            best
        }
    }

    /// The protection to send: the one reaching least far back (then costing least
    /// bandwidth) that brings the residual loss under the goal; if none does, the most
    /// protective.
    pub fn protection(&self) -> Protection {
        CANDIDATES.iter().copied().find(|&candidate| self.residual_with(candidate) < RESIDUAL_LOSS_GOAL).unwrap_or_else(|| {
            // The cheapest of the most protective: a farther one must do clearly better.
            CANDIDATES.iter().copied().fold(Protection::NONE, |best, candidate| {
                if self.residual_with(candidate) < self.residual_with(best) * (1.0 - 1e-9) {
                    candidate
                } else {
                    best
                }
            })
        })
    }

    /// How many frames the receiver waits for copies of a missing one, given the distances
    /// the sender's packets carry: up to the nearest copy after which the residual loss is
    /// under the goal, else up to the farthest. A sender of no copies still gets one frame:
    /// the next packet's Opus frame carries the missing one's in-band FEC.
    pub fn frames_worth_waiting(&self, distances: &[u32]) -> u32 {
        if self.residual(&[]) < RESIDUAL_LOSS_GOAL {
            return 0;
        }
        let mut sorted = distances.to_vec();
        sorted.sort_unstable();
        let Some(&farthest) = sorted.last() else {
            return 1;
        };
        (1..=sorted.len())
            .find(|&used| self.residual(&sorted[..used]) < RESIDUAL_LOSS_GOAL)
            .map_or(farthest, |used| sorted[used - 1])
    }

    /// Like [`Self::frames_worth_waiting`], from a receiver now waiting `current` frames: it
    /// waits longer only when that clearly misses the goal, and less only when the shorter
    /// wait is well inside it. Each change of the wait is a change of delay the caller hears,
    /// and a loss estimate that wavers around a threshold (10 % random loss measures 8–14 %
    /// over 5 s) made lab calls drop a frame and insert one back a second later. A wait beyond
    /// the farthest copy (or the next packet's FEC) buys nothing, whatever the loss: a sender
    /// that went from three copies to two and twins kept lab calls at 20 % loss waiting 20 ms
    /// for nothing.
    pub fn frames_worth_waiting_after(&self, current: u32, distances: &[u32]) -> u32 {
        let current = current.min(distances.iter().copied().max().unwrap_or(1));
        let wanted = self.frames_worth_waiting(distances);
        let residual_waiting = |frames: u32| {
            if frames >= 1 && distances.is_empty() {
                // The next packet's in-band FEC.
                return self.residual(&[1]);
            }
            let usable: Vec<u32> = distances.iter().copied().filter(|&d| d <= frames).collect();
            self.residual(&usable)
        };
        let clearly_short = residual_waiting(current) >= RESIDUAL_LOSS_GOAL * HYSTERESIS;
        let well_inside = residual_waiting(wanted) < RESIDUAL_LOSS_GOAL / HYSTERESIS;
        if (wanted > current && clearly_short) || (wanted < current && well_inside) {
            wanted
        } else {
            current
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::MAX_REDUNDANCY;

    /// Random loss at rate p: independent packets, whose runs are 1/(1 − p) long.
    fn random(p: f64) -> PathLoss {
        PathLoss::new(p, 1.0 / (1.0 - p))
    }

    #[test]
    fn random_loss_multiplies() {
        for p in [0.05f64, 0.1, 0.2] {
            for distances in [&[1u32][..], &[1, 2], &[2, 5, 8]] {
                let expected = p.powi(distances.len() as i32 + 1);
                let got = random(p).residual(distances);
                assert!((got - expected).abs() < 1e-12, "{p} {distances:?}: {got} against {expected}");
            }
        }
    }

    #[test]
    fn random_loss_gets_the_frames_just_before() {
        assert_eq!(random(0.0).protection(), Protection::NONE);
        assert_eq!(random(0.001).protection(), Protection::NONE);
        assert_eq!(random(0.02).protection(), Protection::copies(&[1]));
        assert_eq!(random(0.04).protection(), Protection::copies(&[1]));
        assert_eq!(random(0.05).protection(), Protection::twins(&[1]), "one copy leaves 0.25 %, twins 0.01 %");
        assert_eq!(random(0.10).protection(), Protection::twins(&[1]));
        assert_eq!(random(0.20).protection(), Protection::twins(&[1, 2]), "0.03 % after 40 ms");
        assert_eq!(random(0.30).protection(), Protection::twins(&[1, 2, 3]));
        assert_eq!(random(0.50).protection(), Protection::twins(&[1, 2, 3]), "the most there is");
        assert!((random(0.20).residual_with(Protection::twins(&[1, 2])) - 0.2f64.powi(5)).abs() < 1e-12);
        assert_eq!(random(0.10).frames_worth_waiting(&[1, 2]), 2);
        assert_eq!(random(0.02).frames_worth_waiting(&[1, 2]), 1, "one copy is enough at 2 %");
        assert_eq!(random(0.001).frames_worth_waiting(&[1]), 0);
        assert_eq!(random(0.05).frames_worth_waiting(&[]), 1, "for the next packet's in-band FEC");
    }

    #[test]
    fn bursts_spread_the_copies_beyond_them() {
        // Mean bursts of three packets: the frame after a lost one is lost two times in three.
        let bursty = PathLoss::new(0.10, 3.0);
        assert!((bursty.residual(&[1]) - 0.1 * 2.0 / 3.0).abs() < 1e-9);
        assert!(bursty.residual(&[1, 2, 3]) > 0.01, "consecutive copies die with the frame");
        let copies = bursty.protection().distances;
        assert_eq!(copies, &[2, 4, 6, 8]);
        assert_eq!(bursty.residual_with(Protection::twins(&[1, 2])), bursty.residual(&[1, 2]), "a twin shares its first's burst");
        assert!(bursty.residual(copies) < 0.005);
        assert_eq!(bursty.frames_worth_waiting(copies), 8);
        let milder = PathLoss::new(0.10, 2.0);
        assert_eq!(milder.protection(), Protection::copies(&[2, 5, 8]));
        assert!(milder.residual(&[2, 5, 8]) < RESIDUAL_LOSS_GOAL);
        // Beyond what four copies can do: the most protective set, waited for in full.
        let worse = PathLoss::new(0.20, 4.0);
        assert_eq!(worse.protection().distances.len(), MAX_REDUNDANCY);
        assert!(!worse.protection().twins);
        assert_eq!(worse.frames_worth_waiting(worse.protection().distances), 8);
    }

    #[test]
    fn a_set_that_still_does_stays() {
        // Runs twice as long as random: three copies spread to 120 ms nearly meet the goal,
        // and are kept rather than changed for a set reaching 160 ms back.
        let path = PathLoss::new(0.1, 2.0);
        let copies = Protection::copies;
        assert_eq!(path.protection(), copies(&[2, 5, 8]));
        assert_eq!(path.protection_after(copies(&[1, 3, 6])), copies(&[1, 3, 6]));
        // Clearly failing: replaced.
        assert_eq!(path.protection_after(copies(&[1, 2, 3])), copies(&[2, 5, 8]));
        assert_eq!(PathLoss::new(0.1, 3.0).protection_after(Protection::twins(&[1, 2, 3])), copies(&[2, 4, 6, 8]));
        // A shorter reach or fewer copies only once they are well inside the goal.
        assert_eq!(random(0.04).protection(), copies(&[1]));
        assert_eq!(random(0.04).protection_after(copies(&[1, 2])), copies(&[1, 2]), "0.16 % is close to the goal");
        assert_eq!(random(0.03).protection_after(copies(&[1, 2])), copies(&[1]));
        assert_eq!(random(0.0).protection_after(copies(&[1, 2])), Protection::NONE);
        assert_eq!(random(0.1).protection_after(copies(&[2, 5, 8])), Protection::twins(&[1]));
        assert_eq!(random(0.04).protection_after(Protection::twins(&[1])), Protection::twins(&[1]), "twins stay as copies do");
        // More protection that reaches no farther changes no delay: taken at once.
        assert_eq!(random(0.05).protection_after(copies(&[1])), Protection::twins(&[1]), "0.25 % is close to the goal, twins leave 0.01 %");
        assert_eq!(random(0.05).protection_after(copies(&[1, 2])), Protection::twins(&[1]), "a shorter reach, well inside the goal");
        assert_eq!(random(0.115).protection_after(Protection::twins(&[1, 2])), Protection::twins(&[1, 2]), "0.15 % is not well inside");
        // A set that is not one of the sender's own is replaced.
        assert_eq!(random(0.1).protection_after(copies(&[3])), Protection::twins(&[1]));
    }

    #[test]
    fn a_wait_near_the_goal_stays_until_the_loss_clearly_moves() {
        let copies = [1, 2, 3];
        // At random loss p, waiting for [1, 2] leaves p³: the goal is met below 12.6 %.
        assert_eq!(random(0.124).frames_worth_waiting(&copies), 2);
        assert_eq!(random(0.124).frames_worth_waiting_after(3, &copies), 3, "12.4 % is not well inside");
        assert_eq!(random(0.132).frames_worth_waiting(&copies), 3);
        assert_eq!(random(0.132).frames_worth_waiting_after(2, &copies), 2, "13.2 % does not clearly miss");
        assert_eq!(random(0.20).frames_worth_waiting_after(2, &copies), 3, "20 % clearly misses");
        assert_eq!(random(0.05).frames_worth_waiting_after(3, &copies), 2, "5 % is well inside");
        assert_eq!(random(0.0).frames_worth_waiting_after(3, &copies), 0, "a clean path waits for nothing");
        // A sender of no copies: one frame, for the next packet's in-band FEC.
        assert_eq!(random(0.10).frames_worth_waiting_after(0, &[]), 1);
        assert_eq!(random(0.10).frames_worth_waiting_after(3, &[]), 1, "no longer than the FEC");
        // Never longer than the farthest copy, even where the copies fall short of the goal.
        assert_eq!(random(0.20).frames_worth_waiting_after(3, &[1, 2]), 2);
    }

    #[test]
    fn a_short_reach_comes_before_few_copies() {
        // 3 % loss in runs of two: four copies reaching 80 ms back rather than two reaching
        // 100 ms; random loss, the frames just before.
        assert_eq!(PathLoss::new(0.03, 2.0).protection(), Protection::copies(&[1, 2, 3, 4]));
        assert_eq!(random(0.15).protection(), Protection::twins(&[1, 2]), "twins rather than a third copy");
        assert_eq!(PathLoss::new(0.02, 3.0).protection(), Protection::copies(&[1, 3, 6]));
        for candidate in CANDIDATES {
            let set = candidate.distances;
            assert!(set.len() <= MAX_REDUNDANCY && set.iter().all(|&d| (1..=u32::from(MAX_DISTANCE)).contains(&d)), "{set:?}");
            assert!(!candidate.twins || !set.is_empty(), "a twin is only waited for with a copy");
        }
        assert!(CANDIDATES.windows(2).all(|w| w[0].cost() <= w[1].cost()), "cheapest first");
    }

    #[test]
    fn nonsense_reports_mean_no_loss() {
        for (loss, burst) in [(f64::NAN, 3.0), (-1.0, 2.0), (f64::INFINITY, 1.0)] {
            let path = PathLoss::new(loss, burst);
            assert_eq!(path.protection(), Protection::NONE, "{loss} {burst}");
        }
        let sure = PathLoss::new(5.0, f64::NAN);
        assert_eq!(sure.loss, 0.99);
        assert!(sure.residual(&[1, 2]).is_finite());
        // Isolated losses so far are not taken as a promise that they stay isolated, nor are
        // runs a little longer than random taken for bursts.
        assert_eq!(PathLoss::new(0.2, 1.0).protection(), Protection::twins(&[1, 2]));
        assert_eq!(PathLoss::new(0.2, 1.4), random(0.2));
        assert_eq!(PathLoss::new(0.2, 1.4).protection(), Protection::twins(&[1, 2]));
    }
}
