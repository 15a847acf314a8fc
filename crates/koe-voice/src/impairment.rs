//! A bad network in a box, sans-IO and seeded: random or bursty (Gilbert–Elliott) loss,
//! delay and jitter (and so reordering), or the stalls of a byte stream (TCP retransmissions:
//! nothing lost, everything behind a lost segment held up and then delivered at once). Tests and the voice benchmark push packets through
//! it in virtual time; the same core can sit in a user-space forwarder between real peers.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// A small, fast, seeded generator (SplitMix64): the same seed gives the same network.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0.0..1.0.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossModel {
    None,
    /// Each packet lost independently with this probability.
    Random(f64),
    /// Two states: in "bad", packets are lost with `loss_in_bad`; the chain moves good → bad
    /// with `enter_bad` and bad → good with `leave_bad` per packet. Mean burst length is
    /// 1 / `leave_bad` packets.
    GilbertElliott { enter_bad: f64, leave_bad: f64, loss_in_bad: f64 },
}

impl LossModel {
    /// Gilbert–Elliott with this overall loss rate and mean burst length (packets), all
    /// packets in a burst lost.
    pub fn bursty(loss: f64, mean_burst: f64) -> Self {
        let leave_bad = 1.0 / mean_burst.max(1.0);
        // Stationary share of "bad": enter / (enter + leave) = loss.
        let enter_bad = if loss >= 1.0 { 1.0 } else { loss * leave_bad / (1.0 - loss) };
        Self::GilbertElliott { enter_bad, leave_bad, loss_in_bad: 1.0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    pub loss: LossModel,
    /// One-way delay every packet has.
    pub delay: Duration,
    /// Extra delay, uniform in 0..jitter per packet (packets can overtake each other).
    pub jitter: Duration,
    /// A byte stream's head-of-line blocking, if any: delivery stays in order.
    pub stalls: Option<Stalls>,
}

/// The stalls of a TCP connection: now and then (on average every `every`, at random), a
/// segment is lost and retransmitted after `hold`; whatever was sent meanwhile waits behind it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stalls {
    pub every: Duration,
    pub hold: Duration,
}

impl Impairment {
    pub const CLEAN: Self = Self { loss: LossModel::None, delay: Duration::ZERO, jitter: Duration::ZERO, stalls: None };
}

/// Packets in flight through an [`Impairment`].
#[derive(Debug)]
pub struct ImpairedLink {
    impairment: Impairment,
    rng: SeededRng,
    bad: bool,
    in_flight: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>,
    sent: u64,
    lost: u64,
    /// Until when a stream stall holds everything, and the latest delivery time (streams
    /// deliver in order).
    stalled_until: Option<Instant>,
    last_delivery: Option<Instant>,
}

impl ImpairedLink {
    pub fn new(impairment: Impairment, seed: u64) -> Self {
        Self {
            impairment,
            rng: SeededRng::new(seed),
            bad: false,
            in_flight: BinaryHeap::new(),
            sent: 0,
            lost: 0,
            stalled_until: None,
            last_delivery: None,
        }
    }

    fn lose(&mut self) -> bool {
        match self.impairment.loss {
            LossModel::None => false,
            LossModel::Random(p) => self.rng.unit() < p,
            LossModel::GilbertElliott { enter_bad, leave_bad, loss_in_bad } => {
                let flip = self.rng.unit();
                self.bad = if self.bad { flip >= leave_bad } else { flip < enter_bad };
                self.bad && self.rng.unit() < loss_in_bad
            }
        }
    }

    /// Sends a packet at `now`; it is lost, or comes out of [`Self::deliver`] later.
    pub fn send(&mut self, now: Instant, packet: Vec<u8>) {
        self.sent += 1;
        if self.lose() {
            self.lost += 1;
            return;
        }
        let jitter = self.impairment.jitter.mul_f64(self.rng.unit());
        let mut at = now + self.impairment.delay + jitter;
        if let Some(stalls) = self.impairment.stalls {
            // A stall starts with this packet with the chance that makes one every `every`
            // on average at 50 packets a second.
            let chance = 0.02 / stalls.every.as_secs_f64().max(0.02);
            if self.stalled_until.is_none_or(|until| until <= now) && self.rng.unit() < chance {
                self.stalled_until = Some(now + stalls.hold);
            }
            if let Some(until) = self.stalled_until.filter(|&until| until > now) {
                at = at.max(until + self.impairment.delay);
            }
            at = self.last_delivery.map_or(at, |last| at.max(last));
            self.last_delivery = Some(at);
        }
        self.in_flight.push(Reverse((at, self.sent, packet)));
    }

    /// When the next packet comes out, if any is in flight.
    pub fn next_delivery(&self) -> Option<Instant> {
        self.in_flight.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The next packet due by `now`, with the instant it arrived.
    pub fn deliver(&mut self, now: Instant) -> Option<(Instant, Vec<u8>)> {
        if self.next_delivery()? > now {
            return None;
        }
        self.in_flight.pop().map(|Reverse((at, _, packet))| (at, packet))
    }

    /// Fraction of packets sent so far that were lost.
    pub fn loss_rate(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            self.lost as f64 / self.sent as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_rates_and_bursts_are_what_was_asked() {
        let now = Instant::now();
        for (model, expected, burst) in [
            (LossModel::Random(0.1), 0.1, 1.0..1.3),
            (LossModel::bursty(0.1, 3.0), 0.1, 2.5..3.5),
        ] {
            let mut link = ImpairedLink::new(Impairment { loss: model, ..Impairment::CLEAN }, 7);
            let mut lost_run = 0;
            let mut runs = Vec::new();
            for i in 0..100_000u32 {
                link.send(now, i.to_be_bytes().to_vec());
                if link.deliver(now).is_some() {
                    if lost_run > 0 {
                        runs.push(lost_run);
                    }
                    lost_run = 0;
                } else {
                    lost_run += 1;
                }
            }
            assert!((link.loss_rate() - expected).abs() < 0.01, "{model:?}: {}", link.loss_rate());
            let mean_run = runs.iter().sum::<u32>() as f64 / runs.len() as f64;
            assert!(burst.contains(&mean_run), "{model:?}: mean burst {mean_run}");
        }
    }

    #[test]
    fn jitter_reorders_and_delivery_waits_for_its_time() {
        let start = Instant::now();
        let impairment = Impairment { jitter: Duration::from_millis(60), delay: Duration::from_millis(10), ..Impairment::CLEAN };
        let mut link = ImpairedLink::new(impairment, 1);
        for i in 0..50u32 {
            link.send(start + Duration::from_millis(u64::from(i) * 20), i.to_be_bytes().to_vec());
        }
        assert!(link.deliver(start + Duration::from_millis(9)).is_none(), "nothing before the base delay");
        let mut order = Vec::new();
        let mut last = start;
        while let Some((at, packet)) = link.deliver(start + Duration::from_secs(10)) {
            assert!(at >= last);
            last = at;
            order.push(u32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]));
        }
        assert_eq!(order.len(), 50);
        assert!(order.windows(2).any(|w| w[1] < w[0]), "60 ms of jitter on 20 ms packets reorders some");
    }
}
