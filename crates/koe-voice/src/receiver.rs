//! The receiving half of a call's voice: the jitter buffer and the decoder together. Every
//! 20 ms the playout clock calls [`VoiceReceiver::play`] for the next frame of audio.

use std::time::Instant;

use crate::codec::{CodecError, VoiceDecoder, FRAME_SAMPLES};
use crate::jitter::{JitterBuffer, JitterConfig, JitterStats, LossReport, Playout};
use crate::payload::PayloadError;

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
}

pub struct VoiceReceiver {
    buffer: JitterBuffer,
    decoder: Box<dyn VoiceDecoder>,
    quiet_frames: u32,
    speech_level: f32,
    undecodable: u64,
}

impl std::fmt::Debug for VoiceReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VoiceReceiver").field("buffer", &self.buffer).finish_non_exhaustive()
    }
}

impl VoiceReceiver {
    pub fn new(decoder: Box<dyn VoiceDecoder>, config: JitterConfig) -> Self {
        Self { buffer: JitterBuffer::new(config), decoder, quiet_frames: PAUSE_FRAMES, speech_level: 0.0, undecodable: 0 }
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
        let decoded = match self.buffer.pop(now, self.quiet_frames >= PAUSE_FRAMES) {
            Playout::Waiting => {
                frame.fill(0.0);
                Ok(())
            }
            Playout::Frame { opus, .. } => self.decoder.decode(&opus, frame),
            Playout::Fec { next_opus } => self.decoder.decode_fec(&next_opus, frame),
            Playout::Conceal | Playout::Expand => self.decoder.conceal(frame),
        };
        if decoded.is_err() {
            // A packet that passed the payload checks but not Opus's: conceal instead.
            self.undecodable += 1;
            if self.decoder.conceal(frame).is_err() {
                frame.fill(0.0);
            }
        }
        let rms = (frame.iter().map(|s| s * s).sum::<f32>() / FRAME_SAMPLES as f32).sqrt();
        self.speech_level = rms.max(self.speech_level * SPEECH_LEVEL_DECAY);
        let quiet = rms < QUIET_RMS.max(self.speech_level * QUIET_BELOW_SPEECH);
        self.quiet_frames = if quiet { self.quiet_frames.saturating_add(1) } else { 0 };
        Ok(())
    }

    /// Recent loss before recovery and its burstiness, to report to the sender.
    pub fn loss_report(&self) -> LossReport {
        self.buffer.loss_report()
    }

    pub fn stats(&self) -> ReceiverStats {
        ReceiverStats { jitter: self.buffer.stats(), undecodable: self.undecodable }
    }
}
