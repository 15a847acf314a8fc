//! The sending half of a call's voice: encodes each 20 ms frame and builds the payload with
//! copies of earlier frames, as many as the loss the receiver reports calls for.

use std::collections::VecDeque;

use crate::codec::{CodecError, VoiceEncoder, MAX_OPUS_PACKET};
use crate::jitter::LossReport;
use crate::payload::{VoicePayload, MAX_REDUNDANCY};

/// How many earlier frames to repeat for a reported loss fraction (0.0–1.0). A frame is then
/// lost only when its packet and every later packet carrying it are: at 20 % random loss
/// and three copies, 0.2⁴ = 0.16 % of frames.
pub fn redundancy_for_loss(loss: f64) -> usize {
    match loss {
        l if l < 0.005 => 0,
        l if l < 0.04 => 1,
        l if l < 0.12 => 2,
        l if l < 0.25 => 3,
        _ => MAX_REDUNDANCY,
    }
}

const INITIAL_REDUNDANCY: usize = 1;
/// For its first second a call sends at least [`INITIAL_REDUNDANCY`] copies whatever the
/// reports say: the first reports rest on a handful of frames (a path losing 10 % often shows
/// none in the first ten), and the first words of a call are the ones everyone hears.
const CAREFUL_FRAMES: u64 = 50;
/// Frames kept for copies: as far back as the farthest distance.
const HISTORY: usize = 7;

/// How far back copies reach. Isolated losses: the frames just before. Bursts (runs of
/// lost packets two or more long on average): spread out, so that one burst does not take a
/// frame and all its copies.
const CONSECUTIVE: [u32; MAX_REDUNDANCY] = [1, 2, 3, 4];
const SPREAD: [u32; MAX_REDUNDANCY] = [1, 3, 5, 7];
const BURSTY_FROM: f64 = 1.8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SenderStats {
    pub frames: u64,
    pub payload_bytes: u64,
    pub redundancy: usize,
}

pub struct VoiceSender {
    encoder: Box<dyn VoiceEncoder>,
    next_frame: u32,
    /// The last frames sent, newest last, for copies.
    history: VecDeque<(u32, Vec<u8>)>,
    redundancy: usize,
    distances: &'static [u32; MAX_REDUNDANCY],
    /// Fixed by the caller (`None`: follow the reported loss).
    fixed_redundancy: Option<usize>,
    stats: SenderStats,
}

impl std::fmt::Debug for VoiceSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VoiceSender")
            .field("next_frame", &self.next_frame)
            .field("redundancy", &self.redundancy)
            .finish_non_exhaustive()
    }
}

impl VoiceSender {
    pub fn new(encoder: Box<dyn VoiceEncoder>) -> Self {
        Self {
            encoder,
            next_frame: 0,
            history: VecDeque::with_capacity(HISTORY),
            // One copy until the first loss report shows the path is clean: the first
            // second of a call on a lossy path is protected too.
            redundancy: INITIAL_REDUNDANCY,
            distances: &CONSECUTIVE,
            fixed_redundancy: None,
            stats: SenderStats::default(),
        }
    }

    /// Always send `copies` earlier frames, whatever the loss (`None`: adapt again).
    pub fn fix_redundancy(&mut self, copies: Option<usize>) {
        self.fixed_redundancy = copies.map(|c| c.min(MAX_REDUNDANCY));
        if let Some(copies) = self.fixed_redundancy {
            self.redundancy = copies;
        }
    }

    /// The receiver's latest loss report.
    pub fn on_loss_report(&mut self, report: LossReport) {
        let loss = if report.loss.is_finite() { report.loss.clamp(0.0, 1.0) } else { 0.0 };
        self.distances = if report.mean_burst >= BURSTY_FROM { &SPREAD } else { &CONSECUTIVE };
        if self.fixed_redundancy.is_none() {
            self.redundancy = redundancy_for_loss(loss);
            if self.stats.frames < CAREFUL_FRAMES {
                self.redundancy = self.redundancy.max(INITIAL_REDUNDANCY);
            }
        }
        // In-band FEC (and less prediction from earlier frames), paid for in quality, is the
        // tool for light loss; once copies are sent the encoder need only brace itself for
        // what they leave, which is next to nothing.
        let expected = if self.redundancy == 0 { (loss * 100.0).ceil() } else { (loss.powi(self.redundancy as i32 + 1) * 100.0).round() };
        self.encoder.set_expected_loss(expected as u8);
    }

    pub fn set_bitrate(&mut self, bits_per_second: u32) {
        self.encoder.set_bitrate(bits_per_second);
    }

    /// Encodes one 20 ms frame and returns the payload to send.
    pub fn encode(&mut self, frame: &[f32]) -> Result<Vec<u8>, CodecError> {
        let mut opus = vec![0u8; MAX_OPUS_PACKET];
        let length = self.encoder.encode(frame, &mut opus)?;
        opus.truncate(length);
        let number = self.next_frame;
        self.next_frame = self.next_frame.wrapping_add(1);
        let copies: Vec<(u32, &[u8])> = self.distances[..self.redundancy]
            .iter()
            .rev()
            .filter_map(|&distance| {
                let wanted = number.wrapping_sub(distance);
                self.history.iter().find(|(n, _)| *n == wanted).map(|(n, bytes)| (*n, bytes.as_slice()))
            })
            .collect();
        let mut payload = Vec::with_capacity(5 + opus.len() * (copies.len() + 1) + 3 * copies.len());
        VoicePayload { frame: number, opus: &opus, copies }
            .write(&mut payload)
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        self.stats.frames += 1;
        self.stats.payload_bytes += payload.len() as u64;
        self.stats.redundancy = self.redundancy;
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((number, opus));
        Ok(payload)
    }

    pub fn stats(&self) -> SenderStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Backend, DEFAULT_BITRATE, FRAME_SAMPLES};

    #[test]
    fn copies_follow_the_reported_loss() -> Result<(), CodecError> {
        let mut sender = VoiceSender::new(Backend::OpusPure.encoder(DEFAULT_BITRATE)?);
        let frame = vec![0.1f32; FRAME_SAMPLES];
        for (number, copies) in [(0, 0), (1, 1), (2, 1)] {
            let payload = sender.encode(&frame)?;
            let parsed = VoicePayload::parse(&payload).map_err(|e| CodecError::Decode(e.to_string()))?;
            assert_eq!((parsed.frame, parsed.copies.len()), (number, copies), "one copy until a report");
        }
        // A clean early report does not stop the copies of the first second ...
        sender.on_loss_report(LossReport::default());
        let payload = sender.encode(&frame)?;
        assert_eq!(VoicePayload::parse(&payload).map(|p| p.copies.len()), Ok(1));
        sender.on_loss_report(LossReport { loss: 0.20, mean_burst: 1.0, ..LossReport::default() });
        for expected in [3, 3, 3] {
            let payload = sender.encode(&frame)?;
            let parsed = VoicePayload::parse(&payload).map_err(|e| CodecError::Decode(e.to_string()))?;
            assert_eq!(parsed.copies.len(), expected);
            let numbers: Vec<u32> = parsed.copies.iter().map(|(n, _)| *n).collect();
            let wanted: Vec<u32> = (parsed.frame - expected as u32..parsed.frame).collect();
            assert_eq!(numbers, wanted, "the copies are the frames just before");
        }
        // ... a clean report after it does.
        for _ in 0..CAREFUL_FRAMES {
            sender.encode(&frame)?;
        }
        sender.on_loss_report(LossReport::default());
        let payload = sender.encode(&frame)?;
        assert_eq!(VoicePayload::parse(&payload).map(|p| p.copies.len()), Ok(0));
        sender.on_loss_report(LossReport { loss: f64::NAN, mean_burst: f64::NAN, ..LossReport::default() });
        assert_eq!(sender.stats().redundancy, 0);
        // Bursty loss spreads the copies out.
        sender.on_loss_report(LossReport { loss: 0.20, mean_burst: 3.0, ..LossReport::default() });
        for _ in 0..8 {
            sender.encode(&frame)?;
        }
        let payload = sender.encode(&frame)?;
        let parsed = VoicePayload::parse(&payload).map_err(|e| CodecError::Decode(e.to_string()))?;
        let distances: Vec<u32> = parsed.copies.iter().map(|(n, _)| parsed.frame - n).collect();
        assert_eq!(distances, [5, 3, 1], "oldest first");
        Ok(())
    }
}
