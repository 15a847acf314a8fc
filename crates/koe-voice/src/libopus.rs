//! The C libopus backend (`libopus` feature) through the `opus` crate, configured exactly as
//! the pure-Rust one: VoIP application, complexity 9, VBR, in-band FEC on. The reference
//! implementation, for interoperability tests and for comparing quality.

use opus::{Application, Bitrate, Channels, Decoder, Encoder};

use crate::codec::{check_frame, CodecError, VoiceDecoder, VoiceEncoder, FRAME_SAMPLES, SAMPLE_RATE};

pub(crate) struct LibEncoder(Encoder);

impl std::fmt::Debug for LibEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibEncoder").finish_non_exhaustive()
    }
}

fn encode_error(error: opus::Error) -> CodecError {
    CodecError::Encode(error.to_string())
}

impl LibEncoder {
    pub(crate) fn new(bitrate: u32) -> Result<Self, CodecError> {
        let mut encoder = Encoder::new(SAMPLE_RATE, Channels::Mono, Application::Voip).map_err(encode_error)?;
        encoder.set_bitrate(Bitrate::Bits(bitrate as i32)).map_err(encode_error)?;
        encoder.set_complexity(9).map_err(encode_error)?;
        encoder.set_vbr(true).map_err(encode_error)?;
        encoder.set_inband_fec(true).map_err(encode_error)?;
        Ok(Self(encoder))
    }
}

impl VoiceEncoder for LibEncoder {
    fn encode(&mut self, frame: &[f32], packet: &mut [u8]) -> Result<usize, CodecError> {
        check_frame(frame)?;
        self.0.encode_float(frame, packet).map_err(encode_error)
    }

    fn set_bitrate(&mut self, bits_per_second: u32) {
        let _ = self.0.set_bitrate(Bitrate::Bits(bits_per_second as i32));
    }

    fn set_expected_loss(&mut self, percent: u8) {
        let _ = self.0.set_packet_loss_perc(i32::from(percent.min(100)));
    }

    fn set_complexity(&mut self, complexity: u8) {
        let _ = self.0.set_complexity(i32::from(complexity.min(10)));
    }
}

pub(crate) struct LibDecoder(Decoder);

impl std::fmt::Debug for LibDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibDecoder").finish_non_exhaustive()
    }
}

impl LibDecoder {
    pub(crate) fn new() -> Result<Self, CodecError> {
        Decoder::new(SAMPLE_RATE, Channels::Mono).map(Self).map_err(|e| CodecError::Decode(e.to_string()))
    }

    fn run(&mut self, packet: &[u8], fec: bool, frame: &mut [f32]) -> Result<(), CodecError> {
        check_frame(frame)?;
        match self.0.decode_float(packet, frame, fec) {
            Ok(FRAME_SAMPLES) => Ok(()),
            Ok(other) => Err(CodecError::Decode(format!("{other} samples where {FRAME_SAMPLES} were expected"))),
            Err(error) => Err(CodecError::Decode(error.to_string())),
        }
    }
}

impl VoiceDecoder for LibDecoder {
    fn decode(&mut self, packet: &[u8], frame: &mut [f32]) -> Result<(), CodecError> {
        if packet.is_empty() {
            return Err(CodecError::Decode("an empty packet".into()));
        }
        self.run(packet, false, frame)
    }

    fn decode_fec(&mut self, next_packet: &[u8], frame: &mut [f32]) -> Result<(), CodecError> {
        self.run(next_packet, true, frame)
    }

    fn conceal(&mut self, frame: &mut [f32]) -> Result<(), CodecError> {
        self.run(&[], false, frame)
    }
}
