//! The Opus codec behind a trait, so that the pure-Rust backend (the default) and C libopus
//! (the `libopus` cargo feature) are interchangeable. Koe speaks Opus at 48 kHz, mono, in 20 ms
//! frames of [`FRAME_SAMPLES`] samples.

use opus_pure::{Application, OpusDecoder, OpusEncoder, RateControl};

pub const SAMPLE_RATE: u32 = 48_000;
/// One 20 ms frame at 48 kHz, mono.
pub const FRAME_SAMPLES: usize = 960;
pub const FRAME_MILLIS: u64 = 20;
/// No Opus packet of ours is larger (RFC 6716 allows 1275 bytes per frame).
pub const MAX_OPUS_PACKET: usize = 1275;
/// Speech bitrate by default: where the pure-Rust encoder reaches PESQ-WB ≈ 4.3 on clean
/// paths (../shared/notes/opus-backends.md and docs/BENCHMARKS.md).
pub const DEFAULT_BITRATE: u32 = 32_000;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("the Opus encoder failed: {0}")]
    Encode(String),
    #[error("an Opus packet could not be decoded: {0}")]
    Decode(String),
    #[error("a frame must have {FRAME_SAMPLES} samples, not {0}")]
    FrameSize(usize),
}

/// Encodes 20 ms frames of mono 48 kHz speech.
pub trait VoiceEncoder: Send {
    /// Encodes one frame of [`FRAME_SAMPLES`] samples into `packet`, returning its length.
    fn encode(&mut self, frame: &[f32], packet: &mut [u8]) -> Result<usize, CodecError>;
    fn set_bitrate(&mut self, bits_per_second: u32);
    /// The loss the encoder should expect, 0–100 %: makes frames less dependent on earlier
    /// ones and gates in-band FEC.
    fn set_expected_loss(&mut self, percent: u8);
    /// How hard the encoder works, 0–10 (9 by default): lower is cheaper for the CPU and a
    /// little worse for the sound. A PSTN gateway, whose audio is narrowband anyway, goes low.
    fn set_complexity(&mut self, complexity: u8);
}

/// Decodes what a [`VoiceEncoder`] made, recovers from in-band FEC, and conceals losses.
pub trait VoiceDecoder: Send {
    /// Decodes one packet into exactly [`FRAME_SAMPLES`] samples.
    fn decode(&mut self, packet: &[u8], frame: &mut [f32]) -> Result<(), CodecError>;
    /// Rebuilds the frame *before* `next_packet` from the in-band FEC it carries (or
    /// conceals it if it carries none).
    fn decode_fec(&mut self, next_packet: &[u8], frame: &mut [f32]) -> Result<(), CodecError>;
    /// Invents a plausible frame for one that never arrived.
    fn conceal(&mut self, frame: &mut [f32]) -> Result<(), CodecError>;
}

/// Which Opus implementation encodes and decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// `opus-pure`: pure Rust, no build dependencies, decoder bit-exact with C.
    #[default]
    OpusPure,
    /// C libopus, the reference implementation (`libopus` feature).
    #[cfg(feature = "libopus")]
    LibOpus,
}

impl Backend {
    pub fn encoder(self, bitrate: u32) -> Result<Box<dyn VoiceEncoder>, CodecError> {
        match self {
            Self::OpusPure => Ok(Box::new(PureEncoder::new(bitrate)?)),
            #[cfg(feature = "libopus")]
            Self::LibOpus => Ok(Box::new(crate::libopus::LibEncoder::new(bitrate)?)),
        }
    }

    pub fn decoder(self) -> Result<Box<dyn VoiceDecoder>, CodecError> {
        match self {
            Self::OpusPure => Ok(Box::new(PureDecoder::new()?)),
            #[cfg(feature = "libopus")]
            Self::LibOpus => Ok(Box::new(crate::libopus::LibDecoder::new()?)),
        }
    }
}

pub(crate) fn check_frame(frame: &[f32]) -> Result<(), CodecError> {
    if frame.len() == FRAME_SAMPLES {
        Ok(())
    } else {
        Err(CodecError::FrameSize(frame.len()))
    }
}

struct PureEncoder(OpusEncoder);

impl std::fmt::Debug for PureEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PureEncoder").field("bitrate", &self.0.bitrate_bps).finish_non_exhaustive()
    }
}

impl PureEncoder {
    fn new(bitrate: u32) -> Result<Self, CodecError> {
        let mut encoder = OpusEncoder::new(SAMPLE_RATE as i32, 1, Application::Voip)
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        encoder.bitrate_bps = bitrate as i32;
        encoder.complexity = 9;
        encoder.rate_control = RateControl::Vbr;
        encoder.use_inband_fec = true;
        Ok(Self(encoder))
    }
}

impl VoiceEncoder for PureEncoder {
    fn encode(&mut self, frame: &[f32], packet: &mut [u8]) -> Result<usize, CodecError> {
        check_frame(frame)?;
        self.0.encode(frame, FRAME_SAMPLES, packet).map_err(|e| CodecError::Encode(e.to_string()))
    }

    fn set_bitrate(&mut self, bits_per_second: u32) {
        self.0.bitrate_bps = bits_per_second as i32;
    }

    fn set_expected_loss(&mut self, percent: u8) {
        self.0.packet_loss_perc = i32::from(percent.min(100));
    }

    fn set_complexity(&mut self, complexity: u8) {
        self.0.complexity = i32::from(complexity.min(10));
    }
}

struct PureDecoder(OpusDecoder);

impl std::fmt::Debug for PureDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PureDecoder").finish_non_exhaustive()
    }
}

impl PureDecoder {
    fn new() -> Result<Self, CodecError> {
        OpusDecoder::new(SAMPLE_RATE as i32, 1).map(Self).map_err(|e| CodecError::Decode(e.to_string()))
    }

    fn run(
        &mut self,
        frame: &mut [f32],
        decode: impl FnOnce(&mut OpusDecoder, &mut [f32]) -> opus_pure::Result<usize>,
    ) -> Result<(), CodecError> {
        check_frame(frame)?;
        match decode(&mut self.0, frame) {
            Ok(FRAME_SAMPLES) => Ok(()),
            Ok(other) => Err(CodecError::Decode(format!("{other} samples where {FRAME_SAMPLES} were expected"))),
            Err(error) => Err(CodecError::Decode(error.to_string())),
        }
    }
}

impl VoiceDecoder for PureDecoder {
    fn decode(&mut self, packet: &[u8], frame: &mut [f32]) -> Result<(), CodecError> {
        if packet.is_empty() {
            return Err(CodecError::Decode("an empty packet".into()));
        }
        self.run(frame, |d, out| d.decode(packet, FRAME_SAMPLES, out))
    }

    fn decode_fec(&mut self, next_packet: &[u8], frame: &mut [f32]) -> Result<(), CodecError> {
        self.run(frame, |d, out| d.decode_fec(next_packet, FRAME_SAMPLES, out))
    }

    fn conceal(&mut self, frame: &mut [f32]) -> Result<(), CodecError> {
        self.run(frame, |d, out| d.decode(&[], FRAME_SAMPLES, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(frame: usize) -> Vec<f32> {
        (0..FRAME_SAMPLES)
            .map(|i| {
                let t = (frame * FRAME_SAMPLES + i) as f32 / SAMPLE_RATE as f32;
                0.3 * (2.0 * std::f32::consts::PI * 440.0 * t).sin()
            })
            .collect()
    }

    #[test]
    fn a_tone_survives_encoding_and_garbage_is_an_error() -> Result<(), CodecError> {
        let mut encoder = Backend::OpusPure.encoder(DEFAULT_BITRATE)?;
        let mut decoder = Backend::OpusPure.decoder()?;
        let mut packet = [0u8; MAX_OPUS_PACKET];
        let mut out = vec![0.0; FRAME_SAMPLES];
        let mut energy = 0.0;
        for i in 0..20 {
            let n = encoder.encode(&tone(i), &mut packet)?;
            assert!(n > 0 && n < 200, "{n} bytes for 20 ms at 32 kbit/s");
            decoder.decode(&packet[..n], &mut out)?;
            energy = out.iter().map(|s| s * s).sum::<f32>() / FRAME_SAMPLES as f32;
        }
        assert!(energy > 0.02, "the tone came back (mean square {energy})");
        assert!(matches!(encoder.encode(&[0.0; 100], &mut packet), Err(CodecError::FrameSize(100))));
        assert!(decoder.decode(&[], &mut out).is_err());
        // Whatever the bytes, decoding never panics; concealment always works afterwards.
        for garbage in [&[0xff, 0xff, 0xff][..], &[0x03][..], &[0u8; 1300][..]] {
            let _ = decoder.decode(garbage, &mut out);
        }
        decoder.conceal(&mut out)?;
        Ok(())
    }

    #[test]
    fn the_cheapest_complexity_still_carries_a_tone() -> Result<(), CodecError> {
        let mut encoder = Backend::OpusPure.encoder(DEFAULT_BITRATE)?;
        encoder.set_complexity(0);
        let mut decoder = Backend::OpusPure.decoder()?;
        let mut packet = [0u8; MAX_OPUS_PACKET];
        let mut out = vec![0.0; FRAME_SAMPLES];
        let mut energy = 0.0;
        for i in 0..20 {
            let n = encoder.encode(&tone(i), &mut packet)?;
            decoder.decode(&packet[..n], &mut out)?;
            energy = out.iter().map(|s| s * s).sum::<f32>() / FRAME_SAMPLES as f32;
        }
        assert!((energy - 0.045).abs() < 0.01, "the tone came back at its level (mean square {energy}, sent 0.045)");
        Ok(())
    }
}
