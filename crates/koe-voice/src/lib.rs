//! Koe's voice engine. Everything here is sans-IO: frames of samples and payload bytes go in
//! and out, time is a parameter, and the drivers (calls over str0m, WAV files, sound cards)
//! live elsewhere.
//!
//! - [`codec`]: Opus (48 kHz mono, 20 ms) behind [`codec::VoiceEncoder`] /
//!   [`codec::VoiceDecoder`]; the pure-Rust backend by default.
//! - [`payload`]: the voice payload with copies of earlier frames.
//! - [`sender`]: encoding, and copies that follow the loss the receiver reports;
//!   [`protection`]: which copies that loss calls for, and how long to wait for them.
//! - [`jitter`]: the adaptive jitter buffer; [`stretch`]: time-stretching of speech, which it
//!   changes its delay with; [`receiver`]: both with the decoder.
//! - [`quality`]: the E-model MOS estimate; [`impairment`]: a seeded bad network;
//!   [`simulate`]: one direction of a call in virtual time; [`wav`]: WAV in and out;
//!   [`signal`]: a speech-like test signal and sent-versus-played comparisons.

pub mod codec;
pub mod impairment;
pub mod jitter;
#[cfg(feature = "libopus")]
mod libopus;
pub mod payload;
pub mod protection;
pub mod quality;
pub mod receiver;
pub mod sender;
pub mod signal;
pub mod simulate;
pub mod stretch;
pub mod wav;

pub use codec::{Backend, CodecError, VoiceDecoder, VoiceEncoder, FRAME_SAMPLES, SAMPLE_RATE};
pub use jitter::{JitterBuffer, JitterConfig, JitterStats, Playout, Transport};
pub use payload::{PayloadError, VoicePayload};
pub use receiver::{ReceiverStats, VoiceReceiver};
pub use sender::{SenderStats, VoiceSender};
