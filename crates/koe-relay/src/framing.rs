//! Framing of TURN over a byte stream (TCP or TLS, RFC 8656 §12 and §11.5): splits the stream
//! into STUN messages and ChannelData frames, strips the ChannelData padding a stream carries,
//! and adds it on the way out.
//!
//! turn-server-proto frames streams itself, but it neither strips nor adds that padding (the same
//! defect as the client side in notes/str0m-turn.md), and it buffers bytes it cannot parse without
//! limit. The relay frames every stream here and hands the server only whole frames.
//!
//! Not every client pads: coturn's own client does not unless told to (`-D`), and coturn's
//! server accepts both. So a stream's first ChannelData whose length is not a multiple of four
//! decides which kind of client it is, and the relay answers it in kind.

use std::fmt;

/// STUN's magic cookie (RFC 8489 §5), at bytes 4..8 of every STUN message.
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const STUN_HEADER: usize = 20;
const CHANNEL_HEADER: usize = 4;

/// A byte stream that is not TURN: the connection should be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingError {
    /// The first byte of a frame is neither STUN (top bits 00) nor a channel number (0x4000 to
    /// 0x7FFF: RFC 8656 narrowed the range to 0x4FFF, but RFC 5766 clients such as coturn's use
    /// all of it).
    NotTurn(u8),
    /// A STUN header without the magic cookie, or with a length that is not a multiple of 4.
    BadStunHeader,
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotTurn(byte) => write!(f, "not a STUN message or ChannelData (first byte {byte:#04x})"),
            Self::BadStunHeader => f.write_str("a STUN header without the magic cookie or with a bad length"),
        }
    }
}

impl std::error::Error for FramingError {}

/// One frame taken off a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFrame {
    /// A whole STUN message.
    Stun(Vec<u8>),
    /// A ChannelData message without its stream padding.
    Channel(Vec<u8>),
}

impl StreamFrame {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Self::Stun(bytes) | Self::Channel(bytes) => bytes,
        }
    }
}

/// Collects the bytes of one stream and yields its frames.
///
/// It never holds more than one frame plus one read: the largest frame is 20 + 65,535 bytes.
#[derive(Debug, Default)]
pub struct StreamFramer {
    buffered: Vec<u8>,
    /// Whether this client pads ChannelData (RFC 8656), once a frame has shown it.
    client_pads: Option<bool>,
}

impl StreamFramer {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffered.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed, or an error when the stream
    /// is not TURN (the caller closes it; nothing further is parsed).
    pub fn next_frame(&mut self) -> Result<Option<StreamFrame>, FramingError> {
        let Some(&first) = self.buffered.first() else { return Ok(None) };
        match first {
            0x00..=0x3F => {
                if self.buffered.len() < STUN_HEADER {
                    // Check the cookie as soon as it is here, so garbage is refused early.
                    if self.buffered.len() >= 8 && self.buffered[4..8] != MAGIC_COOKIE {
                        return Err(FramingError::BadStunHeader);
                    }
                    return Ok(None);
                }
                let length = u16::from_be_bytes([self.buffered[2], self.buffered[3]]) as usize;
                if self.buffered[4..8] != MAGIC_COOKIE || !length.is_multiple_of(4) {
                    return Err(FramingError::BadStunHeader);
                }
                let total = STUN_HEADER + length;
                if self.buffered.len() < total {
                    return Ok(None);
                }
                let frame: Vec<u8> = self.buffered.drain(..total).collect();
                Ok(Some(StreamFrame::Stun(frame)))
            }
            0x40..=0x7F => {
                if self.buffered.len() < CHANNEL_HEADER {
                    return Ok(None);
                }
                let length = u16::from_be_bytes([self.buffered[2], self.buffered[3]]) as usize;
                let unpadded = CHANNEL_HEADER + length;
                let padded = CHANNEL_HEADER + length.next_multiple_of(4);
                if padded != unpadded && self.client_pads.is_none() {
                    if self.buffered.len() < unpadded {
                        return Ok(None);
                    }
                    let pads = match next_frame_starts(&self.buffered[unpadded..]) {
                        // Nothing after it (the client wrote exactly this frame), or another
                        // frame right after it: no padding.
                        None | Some(true) => false,
                        Some(false) => true,
                    };
                    self.client_pads = Some(pads);
                }
                let consumed = if self.client_pads == Some(false) { unpadded } else { padded };
                if self.buffered.len() < consumed {
                    return Ok(None);
                }
                let mut frame: Vec<u8> = self.buffered.drain(..consumed).collect();
                frame.truncate(unpadded);
                Ok(Some(StreamFrame::Channel(frame)))
            }
            other => Err(FramingError::NotTurn(other)),
        }
    }

    /// Prepares a frame for this stream: ChannelData is padded to a multiple of 4 bytes unless
    /// the client showed it does not pad; STUN messages (always aligned) pass unchanged.
    pub fn outgoing(&self, frame: Vec<u8>) -> Vec<u8> {
        if self.client_pads == Some(false) {
            frame
        } else {
            pad_for_stream(frame)
        }
    }
}

/// Whether `bytes` begin with a frame: `Some(true)` for a channel number or a STUN header with
/// the magic cookie, `Some(false)` for anything else, `None` when empty (or too short to tell).
fn next_frame_starts(bytes: &[u8]) -> Option<bool> {
    match bytes.first()? {
        0x40..=0x7F => Some(true),
        0x00..=0x3F if bytes.len() >= 8 => Some(bytes[4..8] == MAGIC_COOKIE),
        // Too short to show a cookie: up to 3 zero bytes read as padding, anything else as the
        // start of a STUN message.
        0x00..=0x3F => Some(!(bytes.len() < 4 && bytes.iter().all(|byte| *byte == 0))),
        _ => Some(false),
    }
}

fn pad_for_stream(mut frame: Vec<u8>) -> Vec<u8> {
    if matches!(frame.first(), Some(0x40..=0x7F)) {
        let padded = frame.len().next_multiple_of(4);
        frame.resize(padded, 0);
    }
    frame
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn binding_request() -> Vec<u8> {
        let mut message = vec![0x00, 0x01, 0x00, 0x00];
        message.extend_from_slice(&MAGIC_COOKIE);
        message.extend_from_slice(&[7; 12]);
        message
    }

    #[test]
    fn frames_split_across_reads_and_packed_together_come_out_whole() {
        let mut stream = binding_request();
        stream.extend_from_slice(&[0x40, 0x00, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8]);
        stream.extend_from_slice(&binding_request());
        let mut framer = StreamFramer::default();
        let mut frames = Vec::new();
        for byte in &stream {
            framer.push(&[*byte]);
            while let Some(frame) = framer.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(
            frames,
            vec![
                StreamFrame::Stun(binding_request()),
                StreamFrame::Channel(vec![0x40, 0x00, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8]),
                StreamFrame::Stun(binding_request()),
            ]
        );
    }

    #[test]
    fn garbage_is_refused_not_buffered() {
        let mut framer = StreamFramer::default();
        framer.push(b"\x80hello relay");
        assert_eq!(framer.next_frame(), Err(FramingError::NotTurn(0x80)));

        let mut framer = StreamFramer::default();
        framer.push(&[0x00, 0x01, 0x00, 0x00, 0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(framer.next_frame(), Err(FramingError::BadStunHeader));

        let mut odd_length = binding_request();
        odd_length[3] = 3;
        let mut framer = StreamFramer::default();
        framer.push(&odd_length);
        assert_eq!(framer.next_frame(), Err(FramingError::BadStunHeader));
    }

    #[test]
    fn a_truncated_frame_waits_for_the_rest() {
        let mut framer = StreamFramer::default();
        framer.push(&[0x40, 0x01, 0x00, 0x08, 1, 2]);
        assert_eq!(framer.next_frame(), Ok(None));
        framer.push(&[3, 4, 5, 6, 7, 8]);
        assert_eq!(framer.next_frame(), Ok(Some(StreamFrame::Channel(vec![0x40, 0x01, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8]))));
    }

    #[test]
    fn a_client_that_does_not_pad_is_read_and_answered_without_padding() {
        // coturn's client: 5 bytes of data, then the next ChannelData right away.
        let mut framer = StreamFramer::default();
        framer.push(&[0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0x40, 0x00, 0x00, 0x01, 9]);
        assert_eq!(framer.next_frame(), Ok(Some(StreamFrame::Channel(vec![0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5]))));
        assert_eq!(framer.next_frame(), Ok(Some(StreamFrame::Channel(vec![0x40, 0x00, 0x00, 0x01, 9]))));
        assert_eq!(framer.outgoing(vec![0x40, 0, 0, 1, 9]), vec![0x40, 0, 0, 1, 9]);

        // A client that wrote exactly one unpadded frame, then a STUN message later.
        let mut framer = StreamFramer::default();
        framer.push(&[0x40, 0x00, 0x00, 0x01, 9]);
        assert_eq!(framer.next_frame(), Ok(Some(StreamFrame::Channel(vec![0x40, 0x00, 0x00, 0x01, 9]))));
        framer.push(&binding_request());
        assert_eq!(framer.next_frame(), Ok(Some(StreamFrame::Stun(binding_request()))));
    }

    #[test]
    fn a_padding_client_is_answered_with_padding() {
        let mut framer = StreamFramer::default();
        framer.push(&[0x40, 0x00, 0x00, 0x01, 9, 0, 0, 0, 0x40, 0x00, 0x00, 0x02, 7, 7, 0, 0]);
        assert_eq!(framer.next_frame(), Ok(Some(StreamFrame::Channel(vec![0x40, 0x00, 0x00, 0x01, 9]))));
        assert_eq!(framer.next_frame(), Ok(Some(StreamFrame::Channel(vec![0x40, 0x00, 0x00, 0x02, 7, 7]))));
        assert_eq!(framer.outgoing(vec![0x40, 0, 0, 1, 9]), vec![0x40, 0, 0, 1, 9, 0, 0, 0]);
    }

    #[test]
    fn channel_data_is_padded_for_streams_and_stun_is_left_alone() {
        assert_eq!(pad_for_stream(vec![0x40, 0, 0, 1, 9]), vec![0x40, 0, 0, 1, 9, 0, 0, 0]);
        assert_eq!(pad_for_stream(binding_request()), binding_request());
    }
}
