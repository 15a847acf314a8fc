//! The voice payload carried in each RTP packet between Koe clients: the frame number, the
//! newest Opus frame, and copies of up to [`MAX_REDUNDANCY`] earlier frames (as Skype sent
//! one to four earlier blocks), so that a lost packet's frame arrives again in a later one.
//!
//! ```text
//! byte 0      version (high 4 bits, = 1) | twin (bit 3) | number of earlier copies (bits 0–2, ≤ 4)
//! bytes 1..5  frame number of the newest frame, u32 big-endian (wraps)
//! per copy    distance back in frames (u8, 1..=8), length (u16 big-endian), Opus bytes
//! rest        the newest frame's Opus bytes (at least one byte)
//! ```
//!
//! A twin is a packet sent a second time, half a frame after the first, with the twin bit set:
//! the receiver takes what it carries but does not count it as an arrival (the loss and the
//! delay it measures are those of the first packets).

use crate::codec::MAX_OPUS_PACKET;

const VERSION: u8 = 1;
const TWIN: u8 = 0x08;
pub const MAX_REDUNDANCY: usize = 4;
/// Copies may reach this far back (the sender keeps the last few frames).
pub const MAX_DISTANCE: u8 = 8;
const HEADER: usize = 5;
/// Nothing valid is larger: a header, five frames, and their small headers.
pub const MAX_PAYLOAD: usize = HEADER + (MAX_REDUNDANCY + 1) * (MAX_OPUS_PACKET + 3);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("voice payload too short")]
    Truncated,
    #[error("voice payload of {0} bytes is larger than any valid one")]
    Oversized(usize),
    #[error("voice payload version {0} is not understood")]
    Version(u8),
    #[error("voice payload claims {0} earlier copies; at most {MAX_REDUNDANCY} are allowed")]
    TooManyCopies(u8),
    #[error("a copy claims to be {0} frames back; 1 to {MAX_DISTANCE} are allowed")]
    Distance(u8),
    #[error("an Opus frame of {0} bytes is impossible")]
    FrameLength(usize),
}

impl PayloadError {
    /// A short label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::Oversized(_) => "oversized",
            Self::Version(_) => "version",
            Self::TooManyCopies(_) | Self::Distance(_) | Self::FrameLength(_) => "malformed",
        }
    }
}

/// A parsed payload borrowing from the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoicePayload<'a> {
    pub frame: u32,
    /// The second sending of a packet (see the module's top).
    pub twin: bool,
    pub opus: &'a [u8],
    /// `(frame number, Opus bytes)` of the earlier copies.
    pub copies: Vec<(u32, &'a [u8])>,
}

impl<'a> VoicePayload<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, PayloadError> {
        if bytes.len() > MAX_PAYLOAD {
            return Err(PayloadError::Oversized(bytes.len()));
        }
        let (&first, rest) = bytes.split_first().ok_or(PayloadError::Truncated)?;
        if first >> 4 != VERSION {
            return Err(PayloadError::Version(first >> 4));
        }
        let (twin, count) = (first & TWIN != 0, first & 0x07);
        if usize::from(count) > MAX_REDUNDANCY {
            return Err(PayloadError::TooManyCopies(count));
        }
        let (number, mut rest) = rest.split_first_chunk::<4>().ok_or(PayloadError::Truncated)?;
        let frame = u32::from_be_bytes(*number);
        let mut copies = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let (&[distance, high, low], after) = rest.split_first_chunk::<3>().ok_or(PayloadError::Truncated)?;
            if distance == 0 || distance > MAX_DISTANCE {
                return Err(PayloadError::Distance(distance));
            }
            let length = usize::from(u16::from_be_bytes([high, low]));
            if length == 0 || length > MAX_OPUS_PACKET {
                return Err(PayloadError::FrameLength(length));
            }
            if after.len() < length {
                return Err(PayloadError::Truncated);
            }
            let (opus, after) = after.split_at(length);
            copies.push((frame.wrapping_sub(u32::from(distance)), opus));
            rest = after;
        }
        if rest.is_empty() {
            return Err(PayloadError::Truncated);
        }
        if rest.len() > MAX_OPUS_PACKET {
            return Err(PayloadError::FrameLength(rest.len()));
        }
        Ok(Self { frame, twin, opus: rest, copies })
    }

    /// Appends the encoding to `out`.
    pub fn write(&self, out: &mut Vec<u8>) -> Result<(), PayloadError> {
        if self.copies.len() > MAX_REDUNDANCY {
            return Err(PayloadError::TooManyCopies(self.copies.len() as u8));
        }
        out.push(VERSION << 4 | if self.twin { TWIN } else { 0 } | self.copies.len() as u8);
        out.extend_from_slice(&self.frame.to_be_bytes());
        for (number, opus) in &self.copies {
            let distance = self.frame.wrapping_sub(*number);
            if distance == 0 || distance > u32::from(MAX_DISTANCE) {
                return Err(PayloadError::Distance(distance.min(255) as u8));
            }
            if opus.is_empty() || opus.len() > MAX_OPUS_PACKET {
                return Err(PayloadError::FrameLength(opus.len()));
            }
            out.push(distance as u8);
            out.extend_from_slice(&(opus.len() as u16).to_be_bytes());
            out.extend_from_slice(opus);
        }
        if self.opus.is_empty() || self.opus.len() > MAX_OPUS_PACKET {
            return Err(PayloadError::FrameLength(self.opus.len()));
        }
        out.extend_from_slice(self.opus);
        Ok(())
    }
}

/// The twin of an encoded payload: the same bytes with the twin bit set.
pub fn twin_of(payload: &[u8]) -> Vec<u8> {
    let mut twin = payload.to_vec();
    if let Some(first) = twin.first_mut() {
        *first |= TWIN;
    }
    twin
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_with_copies() -> Result<(), PayloadError> {
        let payload = VoicePayload { frame: 1, twin: false, opus: &[7, 7, 7], copies: vec![(u32::MAX, &[1][..]), (0, &[2, 2][..])] };
        let mut bytes = Vec::new();
        payload.write(&mut bytes)?;
        assert_eq!(VoicePayload::parse(&bytes)?, payload, "frame numbers wrap around");
        assert_eq!(VoicePayload::parse(&twin_of(&bytes))?, VoicePayload { twin: true, ..payload }, "a twin differs only by its bit");
        Ok(())
    }

    #[test]
    fn malformed_payloads_are_refused_with_a_reason() {
        assert_eq!(VoicePayload::parse(&[]), Err(PayloadError::Truncated));
        assert_eq!(VoicePayload::parse(&[0x10, 0, 0, 0, 1]), Err(PayloadError::Truncated), "no Opus bytes");
        assert_eq!(VoicePayload::parse(&[0x20, 0, 0, 0, 1, 9]), Err(PayloadError::Version(2)));
        assert_eq!(VoicePayload::parse(&[0x15, 0, 0, 0, 1, 9]), Err(PayloadError::TooManyCopies(5)));
        assert_eq!(VoicePayload::parse(&[0x11, 0, 0, 0, 9, 0, 0, 1, 5, 9]), Err(PayloadError::Distance(0)));
        assert_eq!(VoicePayload::parse(&[0x11, 0, 0, 0, 9, 1, 0, 9, 5, 9]), Err(PayloadError::Truncated));
        assert_eq!(VoicePayload::parse(&[0x11, 0, 0, 0, 9, 1, 0x10, 0, 5]), Err(PayloadError::FrameLength(4096)));
        assert_eq!(VoicePayload::parse(&vec![0x10; MAX_PAYLOAD + 1]), Err(PayloadError::Oversized(MAX_PAYLOAD + 1)));
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            if let Ok(parsed) = VoicePayload::parse(&bytes) {
                let mut again = Vec::new();
                parsed.write(&mut again).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(again, bytes);
            }
        }
    }
}
