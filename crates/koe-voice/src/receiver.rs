//! The receiving half of a call's voice: the jitter buffer, the decoder and the time-stretcher
//! together. Every 20 ms the playout clock calls [`VoiceReceiver::play`] for the next frame of
//! audio. Decoded audio that a stretch made longer than a frame waits in a short queue of its
//! own; the jitter buffer is told when the next frame it hands out will start to play, so it
//! sees that queue as part of its delay.

use std::time::{Duration, Instant};

use crate::codec::{CodecError, VoiceDecoder, FRAME_SAMPLES, SAMPLE_RATE};
use crate::jitter::{JitterBuffer, JitterConfig, JitterStats, LossReport, Playout, StretchBy, Transport};
use crate::payload::PayloadError;
use crate::stretch::{stretch, Stretch};

/// A frame counts as quiet (a good moment to adjust delay) below this RMS (about −45 dBFS)
/// or 20 dB below the recent speech level, whichever is higher: recordings rarely fall
/// silent between words, but they do fall well below speech.
const QUIET_RMS: f32 = 0.0056;
const QUIET_BELOW_SPEECH: f32 = 0.1;
/// The speech level follows louder frames at once and decays by this factor per frame
/// (halving in about 1.4 s).
const SPEECH_LEVEL_DECAY: f32 = 0.99;
/// A pause: this many quiet frames in a row (a weak syllable inside a word is shorter).
const PAUSE_FRAMES: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ReceiverStats {
    pub jitter: JitterStats,
    /// Packets the decoder refused (concealed instead).
    pub undecodable: u64,
    /// Audio removed and added by time-stretching.
    pub stretched_shorter: Duration,
    pub stretched_longer: Duration,
}

pub struct VoiceReceiver {
    buffer: JitterBuffer,
    decoder: Box<dyn VoiceDecoder>,
    /// Decoded audio not played yet, at most a frame and a stretch.
    pending: Vec<f32>,
    quiet_frames: u32,
    speech_level: f32,
    undecodable: u64,
    /// Samples removed and added by stretching.
    shortened: u64,
    lengthened: u64,
}

impl std::fmt::Debug for VoiceReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VoiceReceiver").field("buffer", &self.buffer).finish_non_exhaustive()
    }
}

impl VoiceReceiver {
    pub fn new(decoder: Box<dyn VoiceDecoder>, config: JitterConfig) -> Self {
        Self {
            buffer: JitterBuffer::new(config),
            decoder,
            pending: Vec::with_capacity(3 * FRAME_SAMPLES),
            quiet_frames: PAUSE_FRAMES,
            speech_level: 0.0,
            undecodable: 0,
            shortened: 0,
            lengthened: 0,
        }
    }

    /// Says how the frames travel now (see [`Transport`]).
    pub fn set_transport(&mut self, transport: Transport) {
        self.buffer.set_transport(transport);
    }

    /// Takes a payload that arrived at `now`.
    pub fn receive(&mut self, now: Instant, payload: &[u8]) -> Result<(), PayloadError> {
        self.buffer.push(now, payload)
    }

    /// Fills `frame` ([`FRAME_SAMPLES`] samples) with the audio to play now.
    pub fn play(&mut self, now: Instant, frame: &mut [f32]) -> Result<(), CodecError> {
        if frame.len() != FRAME_SAMPLES {
            return Err(CodecError::FrameSize(frame.len()));
        }
        while self.pending.len() < FRAME_SAMPLES {
            let queued = Duration::from_micros(self.pending.len() as u64 * 1_000_000 / u64::from(SAMPLE_RATE));
            let from = self.pending.len();
            self.pending.resize(from + FRAME_SAMPLES, 0.0);
            let decoded = &mut self.pending[from..];
            let (result, way) = match self.buffer.pop(now + queued, self.quiet_frames >= PAUSE_FRAMES) {
                Playout::Waiting => (Ok(()), None),
                Playout::Frame { opus, stretch, .. } => (self.decoder.decode(&opus, decoded), stretch),
                Playout::Fec { next_opus } => (self.decoder.decode_fec(&next_opus, decoded), None),
                Playout::Conceal | Playout::Expand => (self.decoder.conceal(decoded), None),
            };
            if result.is_err() {
                // A packet that passed the payload checks but not Opus's: conceal instead.
                self.undecodable += 1;
                if self.decoder.conceal(decoded).is_err() {
                    decoded.fill(0.0);
                }
            }
            // The stretch may reach back into audio decoded before but not played yet.
            if let Some(StretchBy { way, at_least }) = way {
                let at_least = (at_least.as_micros() as u64 * u64::from(SAMPLE_RATE) / 1_000_000) as usize;
                let moved = stretch(&mut self.pending, 0, way, at_least) as u64;
                match way {
                    Stretch::Shorter => self.shortened += moved,
                    Stretch::Longer => self.lengthened += moved,
                }
            }
        }
        frame.copy_from_slice(&self.pending[..FRAME_SAMPLES]);
        self.pending.drain(..FRAME_SAMPLES);
        let rms = (frame.iter().map(|s| s * s).sum::<f32>() / FRAME_SAMPLES as f32).sqrt();
        self.speech_level = rms.max(self.speech_level * SPEECH_LEVEL_DECAY);
        let quiet = rms < QUIET_RMS.max(self.speech_level * QUIET_BELOW_SPEECH);
        self.quiet_frames = if quiet { self.quiet_frames.saturating_add(1) } else { 0 };
        Ok(())
    }

    /// Frames waiting in the jitter buffer.
    pub fn held_frames(&self) -> usize {
        self.buffer.held_frames()
    }

    /// Recent loss before recovery and its burstiness, to report to the sender.
    pub fn loss_report(&self) -> LossReport {
        self.buffer.loss_report()
    }

    pub fn stats(&self) -> ReceiverStats {
        let duration = |samples: u64| Duration::from_micros(samples * 1_000_000 / u64::from(SAMPLE_RATE));
        ReceiverStats {
            jitter: self.buffer.stats(),
            undecodable: self.undecodable,
            stretched_shorter: duration(self.shortened),
            stretched_longer: duration(self.lengthened),
        }
    }
}
