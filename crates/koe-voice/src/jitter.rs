//! The adaptive jitter buffer, sans-IO: payloads go in as they arrive (`push`), and every
//! 20 ms the playout clock asks what to play (`pop`). Time is whatever `Instant` the caller
//! passes, so tests run in virtual time.
//!
//! Each frame's ideal playout time is its send time (frame number × 20 ms) plus the smallest
//! transit time seen recently plus a target delay. The target covers the jitter of recent
//! arrivals (a high quantile of transit above the minimum) and, when packets are being lost,
//! the wait for the copies of a lost frame that later packets carry (20 ms per copy waited
//! for, only as many as the loss rate makes worthwhile). On a clean path it is a few
//! milliseconds. The buffer follows the target by inserting a concealed frame (expand) when
//! playout runs ahead of it and dropping one (shrink) when it lags, preferably while the
//! caller reports quiet audio, so adjustments fall into pauses rather than words.
//!
//! A missing frame is rebuilt from a copy in a later packet, else from the in-band FEC of the
//! next frame's Opus packet, else concealed; each outcome is counted.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::codec::FRAME_MILLIS;
use crate::payload::{PayloadError, VoicePayload};

const FRAME_MICROS: i64 = FRAME_MILLIS as i64 * 1000;
/// Arrivals remembered for the jitter and minimum-transit estimates (4 s of speech).
const TRANSIT_WINDOW: usize = 200;
/// Frames remembered for the loss estimate (5 s).
const LOSS_WINDOW: u64 = 250;
/// Until this many frames have arrived, the loss rate is not known yet.
const EARLY_FRAMES: usize = 50;
/// Waiting for fewer copies only once the loss has stayed low this many frames (5 s): a
/// loss estimate that wavers around a threshold must not shrink and re-grow the delay (each
/// change shifts the playout by a frame or more).
const FEWER_COPIES_AFTER_FRAMES: u64 = 250;
/// The share of arrivals the target waits for.
const JITTER_QUANTILE: f64 = 0.97;
/// Waiting for copies stops being worth it once fewer frames than this stay lost.
const RESIDUAL_LOSS_GOAL: f64 = 0.005;
/// Playout may run this far ahead of the ideal time before a frame is inserted ...
const EXPAND_BELOW_MICROS: i64 = -5_000;
/// ... even in speech, once this far ahead (until then, a pause is awaited).
const EXPAND_IN_SPEECH_BELOW_MICROS: i64 = -30_000;
/// It may lag this far behind before a frame is dropped (hysteresis: after one adjustment
/// of 20 ms the other threshold is never crossed) ...
const SHRINK_ABOVE_MICROS: i64 = 30_000;
/// ... even in speech, once this far behind.
const SHRINK_IN_SPEECH_ABOVE_MICROS: i64 = 100_000;
/// A frame further ahead than this means the stream jumped (sender restarted, long outage):
/// start over from it.
const RESYNC_AHEAD_FRAMES: u64 = 100;
/// Frames held at most (bounds memory whatever a peer sends).
const MAX_HELD_FRAMES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JitterConfig {
    /// Added to the measured jitter.
    pub margin: Duration,
    /// Never more than this (a path worse than that gets losses instead of delay).
    pub max_delay: Duration,
    /// Whether to wait for copies of lost frames at all.
    pub wait_for_copies: bool,
}

impl Default for JitterConfig {
    fn default() -> Self {
        Self { margin: Duration::from_millis(5), max_delay: Duration::from_millis(400), wait_for_copies: true }
    }
}

/// Where a played frame came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Primary,
    /// A copy carried by a later packet.
    Copy,
}

/// What the playout clock should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Playout {
    /// Nothing has arrived yet: play silence.
    Waiting,
    /// Decode this Opus packet.
    Frame { opus: Vec<u8>, source: Source },
    /// The frame is lost but the next one is here: rebuild it from its in-band FEC.
    Fec { next_opus: Vec<u8> },
    /// The frame is lost: conceal it.
    Conceal,
    /// Insert a concealed frame to let the buffer grow (nothing is consumed).
    Expand,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct JitterStats {
    /// Frames of the stream played (not counting `Waiting`, `Expand` and underruns).
    pub frames: u64,
    pub from_copies: u64,
    pub from_fec: u64,
    /// Frames lost for good: concealed although a later frame had arrived.
    pub concealed: u64,
    /// Frames concealed because nothing newer had arrived at all (the sender paused or
    /// stopped, or everything is late): not counted as loss.
    pub underruns: u64,
    /// Primary frames that came after their time had passed.
    pub late: u64,
    pub expanded: u64,
    /// Frames dropped to shrink the delay.
    pub dropped: u64,
    pub malformed: u64,
    pub duplicates: u64,
    /// Current target delay above the minimum transit.
    pub target_delay: Duration,
    /// How far the last played frame lagged its send time beyond the minimum transit.
    pub playout_delay: Duration,
    /// Fraction of recent frames whose own packet never came (before any recovery).
    pub loss_before_recovery: f64,
    /// Mean length of the recent runs of lost packets (1.0 for isolated losses).
    pub mean_burst: f64,
}

impl JitterStats {
    /// Fraction of played frames whose own packet did not arrive in time, over the whole
    /// stream (before recovery from copies or FEC); [`JitterStats::loss_before_recovery`] is
    /// the recent window the sender's copies follow.
    pub fn loss_on_the_way(&self) -> f64 {
        if self.frames == 0 {
            0.0
        } else {
            (self.from_copies + self.from_fec + self.concealed) as f64 / self.frames as f64
        }
    }

    /// Fraction of played frames that had to be concealed (loss after recovery).
    pub fn loss_after_recovery(&self) -> f64 {
        if self.frames == 0 {
            0.0
        } else {
            self.concealed as f64 / self.frames as f64
        }
    }
}

/// The receiver's view of the path, sent back to the sender now and then.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossReport {
    /// Fraction of packets lost (before recovery), 0.0–1.0.
    pub loss: f64,
    /// Mean length of runs of lost packets.
    pub mean_burst: f64,
}

#[derive(Debug)]
struct Held {
    opus: Vec<u8>,
    source: Source,
}

#[derive(Debug)]
pub struct JitterBuffer {
    config: JitterConfig,
    epoch: Option<Instant>,
    frames: BTreeMap<u64, Held>,
    /// The highest frame number seen, unwrapped to 64 bits.
    highest: Option<u64>,
    next_play: Option<u64>,
    /// `(frame, transit µs)` of recent primary arrivals.
    transits: VecDeque<(u64, i64)>,
    /// Primary frames received recently, for the loss estimate.
    received: VecDeque<u64>,
    /// Frames concealed for want of anything newer, oldest first.
    underrun_frames: VecDeque<u64>,
    /// How far back the copies in the newest payload reach, nearest first.
    copy_distances: Vec<u32>,
    /// How many copies of a lost frame the target waits for now.
    copies_waited: usize,
    /// Since which frame fewer copies would do (see [`FEWER_COPIES_AFTER_FRAMES`]).
    fewer_copies_since: Option<u64>,
    /// Whether the loss has been measured yet (the early frames' one copy is a guess).
    loss_measured: bool,
    target_micros: i64,
    stats: JitterStats,
}

impl JitterBuffer {
    pub fn new(config: JitterConfig) -> Self {
        Self {
            config,
            epoch: None,
            frames: BTreeMap::new(),
            highest: None,
            next_play: None,
            transits: VecDeque::with_capacity(TRANSIT_WINDOW),
            received: VecDeque::new(),
            underrun_frames: VecDeque::new(),
            copy_distances: Vec::new(),
            copies_waited: 0,
            fewer_copies_since: None,
            loss_measured: false,
            target_micros: config.margin.as_micros() as i64,
            stats: JitterStats::default(),
        }
    }

    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// What the sender needs to choose its copies: recent loss before recovery and how
    /// bursty it is.
    pub fn loss_report(&self) -> LossReport {
        LossReport { loss: self.stats.loss_before_recovery, mean_burst: self.stats.mean_burst }
    }

    fn micros_since_epoch(&mut self, now: Instant) -> i64 {
        let epoch = *self.epoch.get_or_insert(now);
        now.saturating_duration_since(epoch).as_micros() as i64 - epoch.saturating_duration_since(now).as_micros() as i64
    }

    /// The 64-bit frame number nearest the highest seen with these low 32 bits.
    fn unwrap(&self, frame: u32) -> u64 {
        let Some(highest) = self.highest else {
            return u64::from(frame) + (1 << 32);
        };
        let candidate = (highest & !0xffff_ffff) | u64::from(frame);
        let options = [candidate.wrapping_sub(1 << 32), candidate, candidate.wrapping_add(1 << 32)];
        options
            .into_iter()
            .min_by_key(|c| c.abs_diff(highest))
            .unwrap_or(candidate)
    }

    /// Takes one arrived payload. Malformed ones are counted and refused.
    pub fn push(&mut self, now: Instant, bytes: &[u8]) -> Result<(), PayloadError> {
        let payload = match VoicePayload::parse(bytes) {
            Ok(payload) => payload,
            Err(error) => {
                self.stats.malformed += 1;
                return Err(error);
            }
        };
        let arrival = self.micros_since_epoch(now);
        let frame = self.unwrap(payload.frame);
        if let Some(next) = self.next_play {
            if frame >= next + RESYNC_AHEAD_FRAMES || frame + RESYNC_AHEAD_FRAMES * 4 < next {
                // The stream jumped: forget the old one.
                self.frames.clear();
                self.transits.clear();
                self.received.clear();
                self.underrun_frames.clear();
                self.next_play = None;
                self.highest = None;
                return self.push(now, bytes);
            }
        }
        self.highest = Some(self.highest.map_or(frame, |h| h.max(frame)));
        while self.underrun_frames.front().is_some_and(|&f| f < frame) {
            self.underrun_frames.pop_front();
            self.stats.underruns -= 1;
            self.stats.concealed += 1;
            self.stats.frames += 1;
        }
        let transit = arrival - frame as i64 * FRAME_MICROS;
        if self.transits.len() == TRANSIT_WINDOW {
            self.transits.pop_front();
        }
        self.transits.push_back((frame, transit));
        self.received.push_back(frame);
        while self.received.front().is_some_and(|&f| f + LOSS_WINDOW <= frame) {
            self.received.pop_front();
        }
        let playable = |f: u64, next: Option<u64>| next.is_none_or(|n| f >= n);
        if !playable(frame, self.next_play) {
            self.stats.late += 1;
        } else {
            match self.frames.get(&frame) {
                Some(held) if held.source == Source::Primary => self.stats.duplicates += 1,
                _ => {
                    self.frames.insert(frame, Held { opus: payload.opus.to_vec(), source: Source::Primary });
                }
            }
        }
        if self.highest == Some(frame) {
            let mut distances: Vec<u32> = payload.copies.iter().map(|(n, _)| payload.frame.wrapping_sub(*n)).collect();
            distances.sort_unstable();
            self.copy_distances = distances;
        }
        for (number, opus) in payload.copies {
            let number = self.unwrap(number);
            if playable(number, self.next_play) && !self.frames.contains_key(&number) {
                self.frames.insert(number, Held { opus: opus.to_vec(), source: Source::Copy });
            }
        }
        while self.frames.len() > MAX_HELD_FRAMES {
            self.frames.pop_first();
        }
        self.update_estimates();
        Ok(())
    }

    fn update_estimates(&mut self) {
        // Loss before recovery over the recent window of frame numbers.
        if let (Some(&first), Some(highest)) = (self.received.front(), self.highest) {
            let span = (highest - first + 1) as f64;
            let mut seen: Vec<u64> = self.received.iter().copied().collect();
            seen.sort_unstable();
            seen.dedup();
            self.stats.loss_before_recovery = (1.0 - seen.len() as f64 / span).max(0.0);
            let gaps: Vec<u64> = seen.windows(2).map(|w| w[1] - w[0] - 1).filter(|&g| g > 0).collect();
            self.stats.mean_burst =
                if gaps.is_empty() { 0.0 } else { gaps.iter().sum::<u64>() as f64 / gaps.len() as f64 };
        }
        let Some(min) = self.transits.iter().map(|(_, t)| *t).min() else {
            return;
        };
        let mut above: Vec<i64> = self.transits.iter().map(|(_, t)| t - min).collect();
        above.sort_unstable();
        let index = ((above.len() - 1) as f64 * JITTER_QUANTILE).round() as usize;
        let jitter = above.get(index).copied().unwrap_or(0);
        let wanted = if !self.config.wait_for_copies {
            0
        } else if self.received.len() < EARLY_FRAMES {
            // Too early to know the path: wait for the one copy a sender starts with, so
            // that a lossy path needs no expansion in the middle of the first words.
            1
        } else {
            copies_worth_waiting(self.stats.loss_before_recovery)
        };
        let copies_waited = self.settle_copies_waited(wanted);
        // Waiting for the n-th copy means waiting for the packet that carries it, as many
        // frames later as its distance.
        let frames_waited = if copies_waited == 0 {
            0
        } else {
            self.copy_distances.get(copies_waited - 1).copied().unwrap_or(copies_waited as u32)
        };
        let target = jitter + self.config.margin.as_micros() as i64 + i64::from(frames_waited) * FRAME_MICROS;
        self.target_micros = target.min(self.config.max_delay.as_micros() as i64);
        self.stats.target_delay = Duration::from_micros(self.target_micros.max(0) as u64);
    }

    /// More copies at once; fewer only after [`FEWER_COPIES_AFTER_FRAMES`] of wanting fewer
    /// — except when the first measurement replaces the early frames' guess.
    fn settle_copies_waited(&mut self, wanted: usize) -> usize {
        let now = self.highest.unwrap_or(0);
        let first_measurement = !self.loss_measured && self.received.len() >= EARLY_FRAMES;
        self.loss_measured |= first_measurement;
        if wanted >= self.copies_waited || !self.loss_measured || first_measurement {
            self.copies_waited = wanted;
            self.fewer_copies_since = None;
        } else {
            let since = *self.fewer_copies_since.get_or_insert(now);
            if now.saturating_sub(since) >= FEWER_COPIES_AFTER_FRAMES {
                self.copies_waited = wanted;
                self.fewer_copies_since = None;
            }
        }
        self.copies_waited
    }

    fn min_transit(&self) -> Option<i64> {
        self.transits.iter().map(|(_, t)| *t).min()
    }

    /// What to play now. `quiet` says whether playout is in a pause, so that delay
    /// adjustments prefer pauses.
    pub fn pop(&mut self, now: Instant, quiet: bool) -> Playout {
        let Some(min_transit) = self.min_transit() else {
            return Playout::Waiting;
        };
        let now = self.micros_since_epoch(now);
        let next = match self.next_play {
            Some(next) => next,
            None => {
                // Start with the earliest frame held, once its ideal time has come.
                let Some((&first, _)) = self.frames.first_key_value() else {
                    return Playout::Waiting;
                };
                if now < first as i64 * FRAME_MICROS + min_transit + self.target_micros {
                    return Playout::Waiting;
                }
                self.next_play = Some(first);
                first
            }
        };
        let ideal = next as i64 * FRAME_MICROS + min_transit + self.target_micros;
        let offset = now - ideal;
        if offset < EXPAND_IN_SPEECH_BELOW_MICROS || (offset < EXPAND_BELOW_MICROS && quiet) {
            self.stats.expanded += 1;
            return Playout::Expand;
        }
        let mut next = next;
        if offset > SHRINK_IN_SPEECH_ABOVE_MICROS || (offset > SHRINK_ABOVE_MICROS && quiet) {
            // Drop one frame, the one due now, if something follows it.
            if self.highest.is_some_and(|h| h > next) {
                self.frames.remove(&next);
                self.stats.dropped += 1;
                next += 1;
            }
        }
        self.next_play = Some(next + 1);
        if self.highest.is_none_or(|h| next > h) {
            // Nothing newer has come (yet): an underrun, which becomes a loss if a later
            // frame does arrive.
            self.stats.underruns += 1;
            if self.underrun_frames.len() == MAX_HELD_FRAMES {
                self.underrun_frames.pop_front();
            }
            self.underrun_frames.push_back(next);
            return Playout::Conceal;
        }
        self.stats.frames += 1;
        self.stats.playout_delay = Duration::from_micros((now - next as i64 * FRAME_MICROS - min_transit).max(0) as u64);
        // Everything older is of no use any more.
        while self.frames.first_key_value().is_some_and(|(&f, _)| f < next) {
            self.frames.pop_first();
        }
        if let Some(held) = self.frames.remove(&next) {
            if held.source == Source::Copy {
                self.stats.from_copies += 1;
            }
            return Playout::Frame { opus: held.opus, source: held.source };
        }
        if let Some(following) = self.frames.get(&(next + 1)) {
            self.stats.from_fec += 1;
            return Playout::Fec { next_opus: following.opus.clone() };
        }
        self.stats.concealed += 1;
        Playout::Conceal
    }
}

/// How many copies of a lost frame are worth waiting for (20 ms each) at this loss rate:
/// the fewest after which fewer than [`RESIDUAL_LOSS_GOAL`] of frames stay lost.
pub fn copies_worth_waiting(loss: f64) -> usize {
    if loss.is_nan() || loss <= 0.0 {
        return 0;
    }
    let limit = crate::sender::redundancy_for_loss(loss).max(1);
    (0..=limit).find(|&copies| loss.powi(copies as i32 + 1) < RESIDUAL_LOSS_GOAL).unwrap_or(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload whose "Opus" bytes are the frame number, so tests can see what is played.
    pub(crate) fn payload(frame: u32, copies: &[u32]) -> Vec<u8> {
        let opus = frame.to_be_bytes();
        let copy_bytes: Vec<[u8; 4]> = copies.iter().map(|c| c.to_be_bytes()).collect();
        let mut out = Vec::new();
        VoicePayload {
            frame,
            opus: &opus,
            copies: copies.iter().zip(&copy_bytes).map(|(c, b)| (*c, &b[..])).collect(),
        }
        .write(&mut out)
        .unwrap_or_else(|e| panic!("{e}"));
        out
    }

    pub(crate) fn number(opus: &[u8]) -> u32 {
        u32::from_be_bytes(opus.try_into().unwrap_or_else(|_| panic!("not a test frame: {opus:?}")))
    }

    #[test]
    fn a_clean_path_plays_every_frame_in_order_and_the_delay_settles_low() {
        let start = Instant::now();
        let mut buffer = JitterBuffer::new(JitterConfig::default());
        let mut played = Vec::new();
        for tick in 0..200u32 {
            let now = start + Duration::from_millis(u64::from(tick) * 20);
            buffer.push(now, &payload(tick, &[])).unwrap_or_else(|e| panic!("{e}"));
            if let Playout::Frame { opus, .. } = buffer.pop(now + Duration::from_millis(3), true) {
                played.push(number(&opus));
            }
        }
        let stats = buffer.stats();
        // Until the path is known the buffer waits for one copy (20 ms); on a clean path it
        // then drops one frame (in a pause) to come back down.
        assert_eq!((stats.concealed, stats.late, stats.expanded, stats.dropped), (0, 0, 0, 1));
        assert!(played.windows(2).all(|w| w[1] == w[0] + 1 || w[1] == w[0] + 2), "in order: {played:?}");
        assert_eq!(played.len() + 1 + 1, 200, "every frame but the dropped one and the one still due");
        assert!(stats.target_delay <= Duration::from_millis(5), "{:?}", stats.target_delay);
    }

    #[test]
    fn fewer_copies_are_waited_for_only_after_the_loss_stayed_low() {
        let mut buffer = JitterBuffer::new(JitterConfig::default());
        let at = |buffer: &mut JitterBuffer, frame: u64, wanted: usize| {
            buffer.highest = Some(frame);
            buffer.received = (frame.saturating_sub(60)..=frame).collect();
            buffer.settle_copies_waited(wanted)
        };
        // The early frames' guess gives way to the first measurement at once, down as well.
        buffer.received = (0..10).collect();
        assert_eq!(buffer.settle_copies_waited(1), 1);
        assert_eq!(at(&mut buffer, 60, 0), 0, "a clean path stops waiting at once");
        // More copies at once; fewer only after 250 frames of wanting fewer.
        assert_eq!(at(&mut buffer, 100, 3), 3);
        assert_eq!(at(&mut buffer, 150, 2), 3);
        assert_eq!(at(&mut buffer, 300, 3), 3, "the loss came back: the timer starts over");
        assert_eq!(at(&mut buffer, 310, 2), 3);
        assert_eq!(at(&mut buffer, 559, 2), 3);
        assert_eq!(at(&mut buffer, 560, 2), 2);
        assert_eq!(at(&mut buffer, 561, 4), 4);
    }

    #[test]
    fn copies_waited_for_grow_with_loss() {
        assert_eq!(copies_worth_waiting(0.0), 0);
        assert_eq!(copies_worth_waiting(f64::NAN), 0);
        assert_eq!(copies_worth_waiting(0.05), 1);
        assert_eq!(copies_worth_waiting(0.10), 2);
        assert_eq!(copies_worth_waiting(0.20), 3);
    }

    #[test]
    fn garbage_is_counted_and_changes_nothing() {
        let mut buffer = JitterBuffer::new(JitterConfig::default());
        let now = Instant::now();
        assert!(buffer.push(now, &[0xff, 1, 2]).is_err());
        assert!(buffer.push(now, &[]).is_err());
        assert_eq!(buffer.stats().malformed, 2);
        assert_eq!(buffer.pop(now, true), Playout::Waiting);
    }
}
