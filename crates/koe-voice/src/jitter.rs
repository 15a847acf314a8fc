//! The adaptive jitter buffer, sans-IO: payloads go in as they arrive (`push`), and the playout
//! asks what to play next (`pop`) whenever it needs another 20 ms of audio, saying when that
//! audio will start to play. Time is whatever `Instant` the caller passes, so tests run in
//! virtual time.
//!
//! Each frame's ideal playout time is its send time (frame number × 20 ms) plus the smallest
//! transit time seen recently plus a target delay. The target covers the jitter of recent
//! arrivals and, when packets are being lost, the wait for the copies of a lost frame that
//! later packets carry (20 ms per frame of distance to the farthest copy worth waiting for at
//! the loss rate and burstiness measured, see [`crate::protection`]). On a clean datagram
//! path the jitter is a high quantile of recent transit above the minimum, and the target a
//! few milliseconds. On a byte-stream path (a TCP or TLS relay leg) nothing is lost but
//! arrivals come in bursts after each retransmission, with every frame behind it held up:
//! there the target covers the highest delay peak of the last ten seconds, since one
//! retransmission means more to come.
//!
//! The buffer keeps playout within a band around its target. Outside it, it adjusts in a
//! pause if one comes: it inserts a concealed frame (expand) or drops one, quick and unheard.
//! In speech, after a second without a pause or at once when far off, it asks the caller to
//! stretch the frame by whole pitch periods instead ([`StretchBy`], see [`crate::stretch`]),
//! shorter when playout lags and longer when it runs ahead; whole frames go or come in speech
//! only when stretching cannot keep up (60 ms ahead, 200 ms behind).
//!
//! A frame that has not arrived when its time comes is waited for (an expand that consumes
//! nothing) as long as nothing newer has arrived either: it may be late, the sender may have
//! paused, a stream may be stalled. Once newer frames are there, the time spent waiting is
//! caught up by skipping as many frames (on a byte stream only frames that never came); a
//! missing frame is rebuilt from a copy in a later packet, else from the in-band FEC of the
//! next frame's Opus packet, else concealed. Each outcome is counted, and a primary that turns up after its frame was rebuilt or
//! concealed moves that frame from "lost" to "late": late is not lost.
//!
//! A twin (a packet sent again half a frame after the first, see [`crate::protection`]) fills
//! in frames still missing but counts as no arrival: the loss and the delay measured are those
//! of the first packets.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::codec::FRAME_MILLIS;
use crate::payload::{PayloadError, VoicePayload};
use crate::protection::PathLoss;
use tracing::debug;
pub use crate::stretch::Stretch;

const FRAME_MICROS: i64 = FRAME_MILLIS as i64 * 1000;
/// Arrivals remembered for the jitter and minimum-transit estimates on a datagram path (4 s).
const TRANSIT_WINDOW: usize = 200;
/// ... and on a byte stream, whose delay peaks come seconds apart (10 s).
const STREAM_TRANSIT_WINDOW: usize = 500;
/// Frames remembered for the loss estimate (5 s).
const LOSS_WINDOW: u64 = 250;
/// How many runs of independent loss the burst estimate starts from (see [`mean_burst`]).
const BURST_PRIOR_RUNS: f64 = 4.0;
/// The burst estimate follows the last this many runs of lost frames: a path losing 10 % in
/// runs of three shows only eight runs in the loss window.
const BURST_RUNS: usize = 32;
/// A run of lost frames is counted this many frames (200 ms) behind the newest, when nothing
/// of it is worth waiting for any more.
const SETTLED_AFTER_FRAMES: u64 = 10;
/// A run counts at most this long: an outage says that bursts are long, but not 100 times.
const LONGEST_RUN: u64 = 16;
/// Until this many frames have arrived, the loss rate is not known yet.
const EARLY_FRAMES: usize = 50;
/// A shorter wait for copies only once the loss has stayed low this many frames (5 s): a
/// loss estimate that wavers around a threshold must not shrink and re-grow the delay.
const SHORTER_WAIT_AFTER_FRAMES: u64 = 250;
/// The share of arrivals the target waits for on a datagram path (on a stream: all of them).
const JITTER_QUANTILE: f64 = 0.97;
/// In a pause, a concealed frame is inserted once playout runs this far ahead of its ideal
/// time ...
const EXPAND_IN_PAUSE_BELOW_MICROS: i64 = -5_000;
/// ... and a frame dropped once it lags this far behind (20 ms less never crosses the
/// expansion threshold).
const DROP_IN_PAUSE_ABOVE_MICROS: i64 = 30_000;
/// Outside those bounds in speech, a pause is awaited this long (1 s) before the voice itself
/// is stretched: every change of delay inside a word costs some clarity (PESQ-WB loses about
/// 0.08 per pitch period removed in a word, and 0.04 per 13 ms removed in a pause, measured on
/// the benchmark's speech), so words are stretched only in speech that does not pause.
const PAUSE_AWAITED_FRAMES: u64 = 50;
/// The voice is stretched longer at once from this far ahead (the playout would otherwise miss
/// frames or copies it is waiting for) ...
const LENGTHEN_BELOW_MICROS: i64 = -30_000;
/// ... and a concealed frame inserted all the same from this far (a sudden jump of the
/// target, as when loss starts and copies must be waited for).
const EXPAND_IN_SPEECH_BELOW_MICROS: i64 = -60_000;
/// The voice is stretched shorter at once from this far behind (one pitch period, at most
/// 14 ms, never carries it past the lengthening threshold) ...
const SHORTEN_ABOVE_MICROS: i64 = 60_000;
/// ... and a whole frame dropped in speech from this far, when stretching cannot keep up (a
/// long stall).
const DROP_IN_SPEECH_ABOVE_MICROS: i64 = 200_000;
/// When the smallest transit of this many recent arrivals (1 s) exceeds the remembered
/// minimum by [`BASELINE_SHIFT_MICROS`], the path's delay itself has changed (a paused
/// sender resumed, a route changed): the older transits are forgotten.
const BASELINE_ARRIVALS: usize = 50;
const BASELINE_SHIFT_MICROS: i64 = 120_000;
/// A frame further ahead than this (or 4× as far behind) does not belong to the stream being
/// played: it is a stray, unless the next frames follow it, which means the stream jumped
/// (sender restarted, long outage) and is started over from it.
const RESYNC_AHEAD_FRAMES: u64 = 100;
/// How close after a stray the next frame must be to confirm a jump.
const RESYNC_CONFIRM_FRAMES: u32 = 5;
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

/// How the frames reach this end: what kind of delay to expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Datagrams (UDP, directly or through a relay): packets get lost, and jitter is spread.
    #[default]
    Datagram,
    /// A byte stream on some leg of the path (a TCP or TLS relay connection): nothing is
    /// lost on that leg, but a retransmission holds up every frame behind it.
    Stream,
}

/// How to stretch a frame: which way, and by at least how much (in whole pitch periods, so
/// perhaps a little more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StretchBy {
    pub way: Stretch,
    pub at_least: Duration,
}

/// Where a played frame came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Primary,
    /// A copy carried by a later packet.
    Copy,
}

/// What the playout should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Playout {
    /// Nothing has arrived yet: play silence.
    Waiting,
    /// Decode this Opus packet, and stretch the result if `stretch` says so.
    Frame { opus: Vec<u8>, source: Source, stretch: Option<StretchBy> },
    /// The frame is lost but the next one is here: rebuild it from its in-band FEC.
    Fec { next_opus: Vec<u8> },
    /// The frame is lost: conceal it.
    Conceal,
    /// Conceal a frame without consuming one: to let the buffer grow, or to wait for a frame
    /// that has not arrived while nothing newer has either.
    Expand,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct JitterStats {
    /// Frames of the stream played (not counting `Waiting` and `Expand`).
    pub frames: u64,
    pub from_copies: u64,
    pub from_fec: u64,
    /// Frames lost for good: their packet never came, and no copy or FEC rebuilt them.
    pub concealed: u64,
    /// Frames concealed because their packet came after their time (late, not lost).
    pub late_concealed: u64,
    /// Expansions while waiting for a frame when nothing newer had arrived either (the sender
    /// paused or stopped, a stream stalled, everything is late).
    pub underruns: u64,
    /// Primary frames that came after their time had passed.
    pub late: u64,
    /// Expansions to grow the delay (in pauses, or far ahead in speech).
    pub expanded: u64,
    /// Frames dropped to shrink the delay.
    pub dropped: u64,
    /// Frames the buffer asked to stretch shorter or longer (the receiver counts what moved).
    pub stretched_shorter: u64,
    pub stretched_longer: u64,
    pub malformed: u64,
    pub duplicates: u64,
    /// Frames so far from the stream that they were set aside (see [`RESYNC_AHEAD_FRAMES`]).
    pub strays: u64,
    pub transport: Transport,
    /// Current target delay above the minimum transit.
    pub target_delay: Duration,
    /// How far the last played frame lagged its send time beyond the minimum transit.
    pub playout_delay: Duration,
    /// Fraction of recent frames whose own packet never came (before any recovery; a late
    /// packet came).
    pub loss_before_recovery: f64,
    /// Mean length of the recent runs of lost packets (1.0 for isolated losses).
    pub mean_burst: f64,
}

impl JitterStats {
    /// Fraction of played frames whose own packet never came, over the whole stream (before
    /// recovery from copies or FEC; late packets are not counted);
    /// [`JitterStats::loss_before_recovery`] is the recent window the sender's copies follow.
    pub fn loss_on_the_way(&self) -> f64 {
        if self.frames == 0 {
            0.0
        } else {
            (self.from_copies + self.from_fec + self.concealed) as f64 / self.frames as f64
        }
    }

    /// Fraction of played frames that had to be concealed (loss after recovery), lost or late.
    pub fn loss_after_recovery(&self) -> f64 {
        if self.frames == 0 {
            0.0
        } else {
            (self.concealed + self.late_concealed) as f64 / self.frames as f64
        }
    }
}

/// The receiver's view of the path, sent back to the sender now and then.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossReport {
    /// Fraction of packets lost (before recovery), 0.0–1.0. Packets that came late are not
    /// lost: copies do not help with lateness, only a larger buffer does.
    pub loss: f64,
    /// Mean length of runs of lost packets.
    pub mean_burst: f64,
    /// Whether the reporting end reaches the path over a byte stream (a TCP or TLS relay
    /// connection): what it sends arrives in bursts, and the other end's buffer should expect
    /// them.
    pub stream_leg: bool,
}

#[derive(Debug)]
struct Held {
    opus: Vec<u8>,
    source: Source,
}

/// How a frame was played without its own packet, until the packet turns up late.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missed {
    Copy,
    Fec,
    Concealed,
}

#[derive(Debug)]
pub struct JitterBuffer {
    config: JitterConfig,
    transport: Transport,
    epoch: Option<Instant>,
    frames: BTreeMap<u64, Held>,
    /// The highest frame number seen, unwrapped to 64 bits.
    highest: Option<u64>,
    next_play: Option<u64>,
    /// `(frame, transit µs)` of recent primary arrivals.
    transits: VecDeque<(u64, i64)>,
    /// Primary frames received recently, for the loss estimate.
    received: VecDeque<u64>,
    /// Frames played without their own packet, oldest first (see [`Missed`]).
    missed: VecDeque<(u64, Missed)>,
    /// Frames' worth of waiting since the last frame played: the time skipping catches up.
    waited: u64,
    /// The number of the last stray, which the next frames may confirm as a jump.
    stray: Option<u32>,
    /// The frame since which playout has been off its target in speech, awaiting a pause.
    off_target_since: Option<u64>,
    /// How far back the copies in the newest payload reach, nearest first.
    copy_distances: Vec<u32>,
    /// How many frames the target waits for the copies of a lost frame now.
    frames_waited: u32,
    /// Recent runs of lost frames (lengths), oldest first, and how far they are counted.
    runs: VecDeque<u64>,
    settled_to: Option<u64>,
    /// Frames lost in a row at `settled_to`.
    open_run: u64,
    /// Since which frame a shorter wait would do (see [`SHORTER_WAIT_AFTER_FRAMES`]).
    shorter_wait_since: Option<u64>,
    /// Whether the loss has been measured yet (the early frames' one copy is a guess).
    loss_measured: bool,
    target_micros: i64,
    stats: JitterStats,
}

impl JitterBuffer {
    pub fn new(config: JitterConfig) -> Self {
        Self {
            config,
            transport: Transport::Datagram,
            epoch: None,
            frames: BTreeMap::new(),
            highest: None,
            next_play: None,
            transits: VecDeque::with_capacity(TRANSIT_WINDOW),
            received: VecDeque::new(),
            missed: VecDeque::new(),
            waited: 0,
            stray: None,
            off_target_since: None,
            copy_distances: Vec::new(),
            frames_waited: 0,
            runs: VecDeque::with_capacity(BURST_RUNS),
            settled_to: None,
            open_run: 0,
            shorter_wait_since: None,
            loss_measured: false,
            target_micros: config.margin.as_micros() as i64,
            stats: JitterStats::default(),
        }
    }

    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// How many frames are held now (for tests of what a peer can make it hold).
    pub fn held_frames(&self) -> usize {
        self.frames.len()
    }

    /// Says how the frames travel now (it may change when the call moves to another path).
    pub fn set_transport(&mut self, transport: Transport) {
        self.transport = transport;
        self.stats.transport = transport;
    }

    /// What the sender needs to choose its copies: recent loss before recovery and how
    /// bursty it is.
    pub fn loss_report(&self) -> LossReport {
        LossReport { loss: self.stats.loss_before_recovery, mean_burst: self.stats.mean_burst, stream_leg: false }
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
        if payload.twin {
            self.take_twin(&payload);
            return Ok(());
        }
        let arrival = self.micros_since_epoch(now);
        let frame = self.unwrap(payload.frame);
        if let Some(next) = self.next_play {
            if frame >= next + RESYNC_AHEAD_FRAMES || frame + RESYNC_AHEAD_FRAMES * 4 < next {
                let follows_stray = self.stray.is_some_and(|stray| (1..=RESYNC_CONFIRM_FRAMES).contains(&payload.frame.wrapping_sub(stray)));
                self.stray = Some(payload.frame);
                if !follows_stray {
                    self.stats.strays += 1;
                    return Ok(());
                }
                // The stream jumped: forget the old one.
                self.stray = None;
                self.frames.clear();
                self.transits.clear();
                self.received.clear();
                self.missed.clear();
                self.settled_to = None;
                self.waited = 0;
                self.next_play = None;
                self.highest = None;
                return self.push(now, bytes);
            }
        }
        self.highest = Some(self.highest.map_or(frame, |h| h.max(frame)));
        let transit = arrival - frame as i64 * FRAME_MICROS;
        let window = match self.transport {
            Transport::Datagram => TRANSIT_WINDOW,
            Transport::Stream => STREAM_TRANSIT_WINDOW,
        };
        while self.transits.len() >= window {
            self.transits.pop_front();
        }
        self.transits.push_back((frame, transit));
        self.follow_baseline();
        self.received.push_back(frame);
        while self.received.front().is_some_and(|&f| f + LOSS_WINDOW <= frame) {
            self.received.pop_front();
        }
        if !self.playable(frame) {
            self.stats.late += 1;
            self.reclassify_late(frame);
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
        self.hold_copies(payload.copies.iter().copied());
        self.update_estimates();
        Ok(())
    }

    /// A twin (the same packet again, half a frame later) fills in the frames still missing,
    /// its own among them, but is no arrival: the loss and the delay measured are those of the
    /// first packets, which the copies and the wait for them are chosen for.
    fn take_twin(&mut self, twin: &VoicePayload) {
        let newest = self.unwrap(twin.frame);
        if self.next_play.is_some_and(|next| newest >= next + RESYNC_AHEAD_FRAMES) {
            return;
        }
        // It is news of the stream all the same: its frame is there to be played.
        self.highest = Some(self.highest.map_or(newest, |h| h.max(newest)));
        self.hold_copies(std::iter::once((twin.frame, twin.opus)).chain(twin.copies.iter().copied()));
    }

    /// Whether `frame` is still to be played (none is being played yet, or it is not past).
    fn playable(&self, frame: u64) -> bool {
        self.next_play.is_none_or(|next| frame >= next)
    }

    /// Keeps copies of frames still to be played that are missing, within the bound.
    fn hold_copies<'a>(&mut self, copies: impl Iterator<Item = (u32, &'a [u8])>) {
        for (number, opus) in copies {
            let number = self.unwrap(number);
            if self.playable(number) && !self.frames.contains_key(&number) {
                self.frames.insert(number, Held { opus: opus.to_vec(), source: Source::Copy });
            }
        }
        while self.frames.len() > MAX_HELD_FRAMES {
            self.frames.pop_first();
        }
    }

    /// Forgets older transits once the recent ones all sit well above them: the path's delay
    /// moved for good (or the sender paused), and a stale minimum would make every frame
    /// look late.
    fn follow_baseline(&mut self) {
        if self.transits.len() <= BASELINE_ARRIVALS {
            return;
        }
        let recent = self.transits.len() - BASELINE_ARRIVALS;
        let recent_min = self.transits.range(recent..).map(|(_, t)| *t).min();
        let older_min = self.transits.range(..recent).map(|(_, t)| *t).min();
        if let (Some(recent_min), Some(older_min)) = (recent_min, older_min) {
            if recent_min - older_min > BASELINE_SHIFT_MICROS {
                self.transits.drain(..recent);
            }
        }
    }

    /// A primary came after its frame was played without it: that frame was late, not lost.
    fn reclassify_late(&mut self, frame: u64) {
        let Some(index) = self.missed.iter().position(|(f, _)| *f == frame) else { return };
        let Some((_, how)) = self.missed.remove(index) else { return };
        match how {
            Missed::Copy => self.stats.from_copies -= 1,
            Missed::Fec => self.stats.from_fec -= 1,
            Missed::Concealed => {
                self.stats.concealed -= 1;
                self.stats.late_concealed += 1;
            }
        }
    }

    fn record_missed(&mut self, frame: u64, how: Missed) {
        if self.missed.len() == MAX_HELD_FRAMES {
            self.missed.pop_front();
        }
        self.missed.push_back((frame, how));
        match how {
            Missed::Copy => self.stats.from_copies += 1,
            Missed::Fec => self.stats.from_fec += 1,
            Missed::Concealed => self.stats.concealed += 1,
        }
    }

    /// Counts the runs of lost frames up to [`SETTLED_AFTER_FRAMES`] behind the newest, where
    /// nothing is still coming; `seen` is the window's received frames, sorted.
    fn settle_runs(&mut self, seen: &[u64], highest: u64) {
        let Some(until) = highest.checked_sub(SETTLED_AFTER_FRAMES) else { return };
        let from = match self.settled_to {
            Some(done) if done >= until => return,
            Some(done) if until - done <= LOSS_WINDOW - SETTLED_AFTER_FRAMES => done + 1,
            // The first frames, or a jump past the window: start from what the window knows.
            _ => {
                self.open_run = 0;
                match seen.first() {
                    Some(&first) if first <= until => first,
                    _ => return,
                }
            }
        };
        for frame in from..=until {
            if seen.binary_search(&frame).is_err() {
                self.open_run += 1;
            } else if self.open_run > 0 {
                if self.runs.len() == BURST_RUNS {
                    self.runs.pop_front();
                }
                self.runs.push_back(self.open_run.min(LONGEST_RUN));
                self.open_run = 0;
            }
        }
        self.settled_to = Some(until);
    }

    fn update_estimates(&mut self) {
        // Loss before recovery over the recent window of frame numbers.
        if let (Some(&first), Some(highest)) = (self.received.front(), self.highest) {
            let span = (highest - first + 1) as f64;
            let mut seen: Vec<u64> = self.received.iter().copied().collect();
            seen.sort_unstable();
            seen.dedup();
            self.stats.loss_before_recovery = (1.0 - seen.len() as f64 / span).max(0.0);
            self.settle_runs(&seen, highest);
            self.stats.mean_burst = mean_burst(&self.runs, self.stats.loss_before_recovery);
        }
        let Some(min) = self.min_transit() else {
            return;
        };
        let mut above: Vec<i64> = self.transits.iter().map(|(_, t)| t - min).collect();
        above.sort_unstable();
        let quantile = match self.transport {
            Transport::Datagram => JITTER_QUANTILE,
            // Every delay peak of the window: each is a retransmission, and more will come.
            Transport::Stream => 1.0,
        };
        let index = ((above.len() - 1) as f64 * quantile).round() as usize;
        let jitter = above.get(index).copied().unwrap_or(0);
        // Waiting for a copy means waiting for the packet that carries it, as many frames
        // later as its distance.
        let wanted = if !self.config.wait_for_copies {
            0
        } else if self.received.len() < EARLY_FRAMES {
            // Too early to know the path: wait for the one copy a sender starts with, so
            // that a lossy path needs no expansion in the middle of the first words. (Waiting
            // longer as soon as the first ten frames showed heavy loss followed their noise:
            // lab calls at 5 and 10 % then waited 40-60 ms more than needed, and lost PESQ.)
            self.copy_distances.first().copied().unwrap_or(1)
        } else {
            let path = PathLoss::new(self.stats.loss_before_recovery, self.stats.mean_burst);
            if self.loss_measured {
                path.frames_worth_waiting_after(self.frames_waited, &self.copy_distances)
            } else {
                // The first measurement replaces the early guess.
                path.frames_worth_waiting(&self.copy_distances)
            }
        };
        let waited_before = self.frames_waited;
        let frames_waited = self.settle_frames_waited(wanted);
        if frames_waited != waited_before {
            let (loss, mean_burst) = (self.stats.loss_before_recovery, self.stats.mean_burst);
            debug!(from = waited_before, to = frames_waited, loss, mean_burst, copies = ?self.copy_distances, "playout: frames waited for copies");
        }
        let target = jitter + self.config.margin.as_micros() as i64 + i64::from(frames_waited) * FRAME_MICROS;
        self.target_micros = target.min(self.config.max_delay.as_micros() as i64);
        self.stats.target_delay = Duration::from_micros(self.target_micros.max(0) as u64);
    }

    /// A longer wait at once; a shorter one only after [`SHORTER_WAIT_AFTER_FRAMES`] of
    /// wanting less — except when the first measurement replaces the early frames' guess.
    fn settle_frames_waited(&mut self, wanted: u32) -> u32 {
        let now = self.highest.unwrap_or(0);
        let first_measurement = !self.loss_measured && self.received.len() >= EARLY_FRAMES;
        self.loss_measured |= first_measurement;
        if wanted >= self.frames_waited || !self.loss_measured || first_measurement {
            self.frames_waited = wanted;
            self.shorter_wait_since = None;
        } else {
            let since = *self.shorter_wait_since.get_or_insert(now);
            if now.saturating_sub(since) >= SHORTER_WAIT_AFTER_FRAMES {
                self.frames_waited = wanted;
                self.shorter_wait_since = None;
            }
        }
        self.frames_waited
    }

    fn min_transit(&self) -> Option<i64> {
        self.transits.iter().map(|(_, t)| *t).min()
    }

    /// What to play from `start` on (when the audio asked for now will begin to play).
    /// `quiet` says whether playout is in a pause, so that whole-frame adjustments keep to
    /// pauses.
    pub fn pop(&mut self, start: Instant, quiet: bool) -> Playout {
        let Some(min_transit) = self.min_transit() else {
            return Playout::Waiting;
        };
        let now = self.micros_since_epoch(start);
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
        let mut offset = now - ideal;
        if offset < EXPAND_IN_SPEECH_BELOW_MICROS || (offset < EXPAND_IN_PAUSE_BELOW_MICROS && quiet) {
            debug!(frame = next, ahead_ms = -offset / 1000, target_ms = self.target_micros / 1000, quiet, "playout: a frame inserted");
            self.stats.expanded += 1;
            return Playout::Expand;
        }
        let Some(highest) = self.highest.filter(|&h| h >= next) else {
            // Nothing newer has come (yet): wait for it.
            self.stats.underruns += 1;
            self.waited += 1;
            return Playout::Expand;
        };
        let mut next = next;
        if self.waited > 0 {
            // The time spent waiting is caught up by skipping as many frames, never past the
            // newest. On a datagram path whatever came meanwhile (a late primary, an old copy)
            // is skipped too: played now, it would put the rest late, and each change of delay
            // costs clarity. On a byte stream only frames that never came are skipped: nothing
            // is lost on a stream, the stall is waited out, and the target covers the next.
            let skippable = match self.transport {
                Transport::Datagram => highest - next,
                Transport::Stream => self.frames.range(next..).next().map_or(highest, |(&f, _)| f) - next,
            };
            let skipped = skippable.min(self.waited);
            for frame in next..next + skipped {
                match self.frames.remove(&frame) {
                    Some(held) if held.source == Source::Primary => {
                        self.stats.late += 1;
                        self.stats.late_concealed += 1;
                    }
                    _ => self.record_missed(frame, Missed::Concealed),
                }
            }
            self.stats.frames += skipped;
            next += skipped;
            offset -= skipped as i64 * FRAME_MICROS;
        }
        // What is still waited is now delay above the target: the offset sees it.
        self.waited = 0;
        if offset > DROP_IN_SPEECH_ABOVE_MICROS || (offset > DROP_IN_PAUSE_ABOVE_MICROS && quiet) {
            // Drop one frame, the one due now, if something follows it.
            if highest > next {
                debug!(frame = next, behind_ms = offset / 1000, target_ms = self.target_micros / 1000, quiet, "playout: a frame dropped");
                self.frames.remove(&next);
                self.stats.dropped += 1;
                next += 1;
            }
        }
        self.next_play = Some(next + 1);
        self.stats.frames += 1;
        self.stats.playout_delay = Duration::from_micros((now - next as i64 * FRAME_MICROS - min_transit).max(0) as u64);
        // Everything older is of no use any more.
        while self.frames.first_key_value().is_some_and(|(&f, _)| f < next) {
            self.frames.pop_first();
        }
        if let Some(held) = self.frames.remove(&next) {
            if held.source == Source::Copy {
                self.record_missed(next, Missed::Copy);
            }
            let stretch = self.stretch(next, offset, highest > next);
            return Playout::Frame { opus: held.opus, source: held.source, stretch };
        }
        if let Some(following) = self.frames.get(&(next + 1)) {
            let next_opus = following.opus.clone();
            self.record_missed(next, Missed::Fec);
            return Playout::Fec { next_opus };
        }
        self.record_missed(next, Missed::Concealed);
        Playout::Conceal
    }

    /// Whether the frame `next`, played `offset` µs off its ideal time in speech, is to be
    /// stretched: at once when far off, else once a pause has been awaited long enough.
    /// Shorter only with something queued behind it to catch up on (a sender back from a
    /// pause lags the stale minimum, but has nothing queued).
    fn stretch(&mut self, next: u64, offset: i64, queued_behind: bool) -> Option<StretchBy> {
        let (ahead, behind) = (offset < EXPAND_IN_PAUSE_BELOW_MICROS, offset > DROP_IN_PAUSE_ABOVE_MICROS && queued_behind);
        if !ahead && !behind {
            self.off_target_since = None;
            return None;
        }
        let awaited = next.saturating_sub(*self.off_target_since.get_or_insert(next)) >= PAUSE_AWAITED_FRAMES;
        // In one stretch of as many periods as it takes: longer up to the target (each
        // millisecond above it would be delay kept for nothing; whole periods overshoot a
        // little anyway), shorter down to the middle of the band.
        let by = |micros: i64| Duration::from_micros(micros.unsigned_abs());
        let middle = (EXPAND_IN_PAUSE_BELOW_MICROS + DROP_IN_PAUSE_ABOVE_MICROS) / 2;
        if ahead && (awaited || offset < LENGTHEN_BELOW_MICROS) {
            debug!(frame = next, ahead_ms = -offset / 1000, "playout: the voice stretched longer");
            self.stats.stretched_longer += 1;
            Some(StretchBy { way: Stretch::Longer, at_least: by(-offset) })
        } else if behind && (awaited || offset > SHORTEN_ABOVE_MICROS) {
            debug!(frame = next, behind_ms = offset / 1000, "playout: the voice stretched shorter");
            self.stats.stretched_shorter += 1;
            Some(StretchBy { way: Stretch::Shorter, at_least: by(offset - middle) })
        } else {
            None
        }
    }
}

/// The mean length of the recent runs of lost frames, drawn toward what independent loss at
/// rate `loss` would give by [`BURST_PRIOR_RUNS`] imagined runs: a few runs say little, and a
/// sender that spreads its copies on a chance pair of neighbours costs delay.
fn mean_burst(runs: &VecDeque<u64>, loss: f64) -> f64 {
    if runs.is_empty() {
        return 0.0;
    }
    let independent = 1.0 / (1.0 - loss.clamp(0.0, 0.99));
    (runs.iter().sum::<u64>() as f64 + BURST_PRIOR_RUNS * independent) / (runs.len() as f64 + BURST_PRIOR_RUNS)
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
            twin: false,
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
        let mut shorter = 0;
        for tick in 0..200u32 {
            let now = start + Duration::from_millis(u64::from(tick) * 20);
            buffer.push(now, &payload(tick, &[])).unwrap_or_else(|e| panic!("{e}"));
            if let Playout::Frame { opus, stretch, .. } = buffer.pop(now + Duration::from_millis(3), true) {
                played.push(number(&opus));
                shorter += usize::from(stretch.is_some_and(|s| s.way == Stretch::Shorter));
            }
        }
        let stats = buffer.stats();
        // Until the path is known the buffer waits for one copy (20 ms); on a clean path it
        // then drops one frame (in a pause) to come back down, and that is all: what is left is
        // within the band it keeps, so nothing is stretched.
        assert_eq!((stats.concealed, stats.late, stats.expanded, stats.dropped), (0, 0, 0, 1));
        assert_eq!((shorter, stats.stretched_shorter, stats.stretched_longer), (0, 0, 0), "{stats:?}");
        assert!(played.windows(2).all(|w| w[1] == w[0] + 1 || w[1] == w[0] + 2), "in order: {played:?}");
        assert_eq!(played.len() + 1 + 1, 200, "every frame but the dropped one and the one still due");
        assert!(stats.target_delay <= Duration::from_millis(5), "{:?}", stats.target_delay);
    }

    #[test]
    fn fewer_copies_are_waited_for_only_after_the_loss_stayed_low() {
        let mut buffer = JitterBuffer::new(JitterConfig::default());
        let at = |buffer: &mut JitterBuffer, frame: u64, wanted: u32| {
            buffer.highest = Some(frame);
            buffer.received = (frame.saturating_sub(60)..=frame).collect();
            buffer.settle_frames_waited(wanted)
        };
        // The early frames' guess gives way to the first measurement at once, down as well.
        buffer.received = (0..10).collect();
        assert_eq!(buffer.settle_frames_waited(1), 1);
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
    fn the_burst_estimate_counts_runs_of_lost_frames_and_not_late_ones() {
        let start = Instant::now();
        let mut buffer = JitterBuffer::new(JitterConfig::default());
        let at = |frame: u32| start + Duration::from_millis(u64::from(frame) * 20);
        // Runs of three lost in every 20 frames (15 %); every 10th frame comes 100 ms late.
        let lost = |frame: u32| frame % 20 < 3 && frame >= 20;
        for frame in 0..1000u32 {
            if lost(frame) {
                continue;
            }
            let arrival = if frame % 10 == 5 { at(frame) + Duration::from_millis(100) } else { at(frame) };
            buffer.push(arrival, &payload(frame, &[])).unwrap_or_else(|e| panic!("{e}"));
        }
        let report = buffer.loss_report();
        assert!((report.loss - 0.15).abs() < 0.01, "{report:?}");
        // 32 runs of three, drawn a little toward the 1.18 of independent loss at 15 %.
        let expected = (32.0 * 3.0 + BURST_PRIOR_RUNS / 0.85) / (32.0 + BURST_PRIOR_RUNS);
        assert!((report.mean_burst - expected).abs() < 0.01, "{report:?} against {expected}");
        assert_eq!(buffer.runs.len(), BURST_RUNS);
    }

    #[test]
    fn a_frame_that_comes_after_its_time_is_late_not_lost() {
        let start = Instant::now();
        let mut buffer = JitterBuffer::new(JitterConfig { wait_for_copies: false, ..JitterConfig::default() });
        let at = |tick: u32| start + Duration::from_millis(u64::from(tick) * 20);
        for tick in 0..100u32 {
            // Frames 60 and 61 come 100 ms late, after 62 and 63: waited for, then 60
            // concealed and 61 rebuilt from 62's FEC.
            if tick != 60 && tick != 61 {
                buffer.push(at(tick), &payload(tick, &[])).unwrap_or_else(|e| panic!("{e}"));
            }
            if tick == 65 {
                buffer.push(at(tick), &payload(60, &[])).unwrap_or_else(|e| panic!("{e}"));
                buffer.push(at(tick), &payload(61, &[])).unwrap_or_else(|e| panic!("{e}"));
            }
            buffer.pop(at(tick) + Duration::from_millis(3), false);
        }
        let stats = buffer.stats();
        assert_eq!((stats.late, stats.late_concealed, stats.concealed, stats.from_fec, stats.underruns), (2, 1, 0, 0, 1), "{stats:?}");
        assert_eq!(buffer.loss_report().loss, 0.0, "the sender is not asked for copies");
        assert_eq!(stats.loss_on_the_way(), 0.0);
        assert!(stats.loss_after_recovery() > 0.0, "the listener did miss it: {stats:?}");
    }

    /// Every fifth frame's first packet is lost; in one buffer its twin comes 10 ms later.
    /// The twins fill the frames in, yet the loss and the delay measured are the same: the
    /// copies and the wait are chosen for the first packets.
    #[test]
    fn a_twin_fills_in_its_frame_but_is_no_arrival() {
        let start = Instant::now();
        let at = |tick: u32, ms: u64| start + Duration::from_millis(u64::from(tick) * 20 + ms);
        let run = |twins: bool| {
            let mut buffer = JitterBuffer::new(JitterConfig { wait_for_copies: false, ..JitterConfig::default() });
            let mut sources = Vec::new();
            for tick in 0..150u32 {
                if tick % 5 != 2 {
                    buffer.push(at(tick, 0), &payload(tick, &[])).unwrap_or_else(|e| panic!("{e}"));
                } else if twins {
                    buffer.push(at(tick, 10), &crate::payload::twin_of(&payload(tick, &[]))).unwrap_or_else(|e| panic!("{e}"));
                }
                if let Playout::Frame { opus, source, .. } = buffer.pop(at(tick, 13), false) {
                    sources.push((number(&opus), source));
                }
            }
            (buffer.stats(), buffer.loss_report(), sources)
        };
        let ((with, with_report, played), (without, without_report, _)) = (run(true), run(false));
        assert_eq!(with.loss_before_recovery, without.loss_before_recovery);
        assert!((with_report.loss - 0.2).abs() < 0.01, "{with_report:?}");
        assert_eq!(with_report, without_report);
        assert_eq!(with.target_delay, without.target_delay, "a twin's 10 ms are no jitter");
        assert_eq!((with.concealed, with.from_fec), (0, 0), "{with:?}");
        assert!(without.concealed + without.from_fec >= 25, "{without:?}");
        assert!(played.iter().filter(|(n, _)| n % 5 == 2).all(|(_, source)| *source == Source::Copy), "{played:?}");
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
