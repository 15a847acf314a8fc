//! The RTP fixed header (RFC 3550 §5.1), sans-IO: reading the header of a packet from a trunk,
//! writing ours, telling a muxed RTCP packet apart from audio (RFC 5761 §4), and stamping our
//! outgoing packets with sequence numbers and timestamps.
//!
//! We send the plain 12-byte header and nothing else, but SBCs and media gateways do add
//! contributing sources, header extensions and padding, so the reader skips all three. Every
//! length in a packet comes from the peer, so each is checked against the bytes actually
//! received before it is used: a lying packet is an error, never a panic or an
//! out-of-bounds read.

use std::fmt;

/// The only RTP version in use (RFC 3550 §5.1).
pub const RTP_VERSION: u8 = 2;
/// Bytes in the fixed header, the whole of the header we send.
pub const HEADER_LEN: usize = 12;
/// Payload types are 7 bits; the eighth bit of that byte is the marker.
pub const MAX_PAYLOAD_TYPE: u8 = 0x7F;

const VERSION_SHIFT: u32 = 6;
const PADDING_BIT: u8 = 0x20;
const EXTENSION_BIT: u8 = 0x10;
const CSRC_COUNT_MASK: u8 = 0x0F;
const MARKER_BIT: u8 = 0x80;
const CSRC_LEN: usize = 4;
/// The extension's own header: 16 bits profile-defined, 16 bits length in 32-bit words.
const EXTENSION_HEADER_LEN: usize = 4;
const WORD_LEN: usize = 4;
/// RTCP packet types 192..=223 (PT 64..=95 with the marker set or not) are what RFC 5761 §4
/// keeps RTP from using, so the second byte alone separates the two on a shared port.
const RTCP_SECOND_BYTE_FIRST: u8 = 192;
const RTCP_SECOND_BYTE_LAST: u8 = 223;
const MILLIS_PER_SECOND: u64 = 1000;

/// Why a packet from the peer is not a usable RTP packet. Every case is the sender's doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RtpError {
    /// Shorter than the 12-byte fixed header.
    TooShort { len: usize },
    /// A version other than 2 (often STUN, or garbage on the media port).
    BadVersion { version: u8 },
    /// The CSRC count promises more identifiers than the packet holds.
    TruncatedCsrcList { csrc_count: u8, len: usize },
    /// The X bit is set but the extension header or its announced body is cut short.
    TruncatedExtension { needed: usize, len: usize },
    /// The P bit is set but the padding count is zero or runs back past the header.
    BadPadding { count: u8, available: usize },
}

impl fmt::Display for RtpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RtpError::TooShort { len } => write!(
                f,
                "the peer's RTP packet is {len} bytes, shorter than the {HEADER_LEN}-byte header"
            ),
            RtpError::BadVersion { version } => write!(
                f,
                "the peer's packet has RTP version {version}, not {RTP_VERSION}"
            ),
            RtpError::TruncatedCsrcList { csrc_count, len } => write!(
                f,
                "the peer's RTP packet announces {csrc_count} CSRCs but is only {len} bytes"
            ),
            RtpError::TruncatedExtension { needed, len } => write!(
                f,
                "the peer's RTP packet has a header extension needing {needed} bytes but is \
                 only {len} bytes"
            ),
            RtpError::BadPadding { count, available } => write!(
                f,
                "the peer's RTP packet has padding bit set with a count of {count}, which must \
                 be 1 to {available} (the bytes after the header)"
            ),
        }
    }
}

impl std::error::Error for RtpError {}

/// The fields of the fixed header we act on; version, CSRCs, extension and padding are
/// consumed by [`parse`] and never written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RtpHeader {
    /// 0..=127; [`RtpHeader::write`] drops any higher bit so it cannot forge the marker.
    pub payload_type: u8,
    pub marker: bool,
    pub sequence: u16,
    pub timestamp: u32,
    pub ssrc: u32,
}

impl RtpHeader {
    /// Appends the 12-byte header and `payload` to `out`; appending lets a caller reuse one
    /// buffer per packet.
    pub fn write(&self, payload: &[u8], out: &mut Vec<u8>) {
        out.reserve(HEADER_LEN + payload.len());
        out.push(RTP_VERSION << VERSION_SHIFT);
        let marker = if self.marker { MARKER_BIT } else { 0 };
        out.push(marker | (self.payload_type & MAX_PAYLOAD_TYPE));
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.ssrc.to_be_bytes());
        out.extend_from_slice(payload);
    }
}

/// Reads an RTP packet into its header and payload, the payload borrowed from `packet` with
/// CSRCs, header extension and padding removed.
pub fn parse(packet: &[u8]) -> Result<(RtpHeader, &[u8]), RtpError> {
    let len = packet.len();
    let Some(fixed) = packet.get(..HEADER_LEN) else {
        return Err(RtpError::TooShort { len });
    };
    let version = fixed[0] >> VERSION_SHIFT;
    if version != RTP_VERSION {
        return Err(RtpError::BadVersion { version });
    }
    let header = RtpHeader {
        payload_type: fixed[1] & MAX_PAYLOAD_TYPE,
        marker: fixed[1] & MARKER_BIT != 0,
        sequence: u16::from_be_bytes([fixed[2], fixed[3]]),
        timestamp: u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]),
        ssrc: u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]),
    };

    let csrc_count = fixed[0] & CSRC_COUNT_MASK;
    // At most 15 * 4 bytes, so no overflow.
    let mut start = HEADER_LEN + usize::from(csrc_count) * CSRC_LEN;
    if start > len {
        return Err(RtpError::TruncatedCsrcList { csrc_count, len });
    }

    if fixed[0] & EXTENSION_BIT != 0 {
        let needed = start + EXTENSION_HEADER_LEN;
        let Some(extension) = packet.get(start..needed) else {
            return Err(RtpError::TruncatedExtension { needed, len });
        };
        let words = usize::from(u16::from_be_bytes([extension[2], extension[3]]));
        // At most 65 535 words: far from overflowing usize.
        let needed = needed + words * WORD_LEN;
        if needed > len {
            return Err(RtpError::TruncatedExtension { needed, len });
        }
        start = needed;
    }

    let mut end = len;
    if fixed[0] & PADDING_BIT != 0 {
        // The count byte is itself padding, so it must lie after the headers.
        let available = end - start;
        let count = match packet.get(start..end).and_then(<[u8]>::last) {
            Some(&count) => count,
            None => {
                return Err(RtpError::BadPadding {
                    count: 0,
                    available,
                })
            }
        };
        if count == 0 || usize::from(count) > available {
            return Err(RtpError::BadPadding { count, available });
        }
        end -= usize::from(count);
    }

    match packet.get(start..end) {
        Some(payload) => Ok((header, payload)),
        // Unreachable after the checks above; kept so a future edit cannot turn into a panic.
        None => Err(RtpError::TooShort { len }),
    }
}

/// Whether a packet on a shared RTP/RTCP port is RTCP (RFC 5761 §4): version 2 with a second
/// byte of 192..=223, which covers SR (200), RR (201), SDES, BYE, APP and feedback.
/// Audio must never be decoded from one, and [`parse`] alone would accept it.
pub fn is_rtcp(packet: &[u8]) -> bool {
    match packet {
        [first, second, ..] => {
            first >> VERSION_SHIFT == RTP_VERSION
                && (RTCP_SECOND_BYTE_FIRST..=RTCP_SECOND_BYTE_LAST).contains(second)
        }
        _ => false,
    }
}

/// Stamps one outgoing stream: a fixed SSRC, a sequence number one up per packet, and a
/// timestamp that moves with the samples sent or skipped. Both counters wrap, as RFC 3550
/// expects receivers to handle.
///
/// RFC 3550 asks for random initial values (a random SSRC so two sources do not collide, a
/// random sequence and timestamp against known-plaintext attacks on encryption); the caller
/// supplies them, so this stays deterministic under test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpSender {
    ssrc: u32,
    sequence: u16,
    timestamp: u32,
    clock_rate_hz: u32,
}

impl RtpSender {
    /// A stream whose first packet will carry `sequence` and `timestamp`.
    pub fn new(ssrc: u32, sequence: u16, timestamp: u32, clock_rate_hz: u32) -> RtpSender {
        RtpSender {
            ssrc,
            sequence,
            timestamp,
            clock_rate_hz,
        }
    }

    /// The header for the next packet, which carries `samples` samples per channel; the
    /// timestamp moves past them afterwards, so the packet is stamped with its first sample.
    pub fn next(&mut self, payload_type: u8, marker: bool, samples: u32) -> RtpHeader {
        let header = self.next_at(payload_type, marker, self.timestamp);
        self.timestamp = self.timestamp.wrapping_add(samples);
        header
    }

    /// The header for the next packet with a timestamp of the caller's: RFC 4733 events keep
    /// their start timestamp in every packet, while the sequence number still moves.
    pub fn next_at(&mut self, payload_type: u8, marker: bool, timestamp: u32) -> RtpHeader {
        let header = RtpHeader {
            payload_type,
            marker,
            sequence: self.sequence,
            timestamp,
            ssrc: self.ssrc,
        };
        self.sequence = self.sequence.wrapping_add(1);
        header
    }

    /// Moves the timestamp over samples not sent (silence suppression, a digit playing): the
    /// receiver sees the gap in time while the sequence shows no packet was lost.
    pub fn advance(&mut self, samples: u32) {
        self.timestamp = self.timestamp.wrapping_add(samples);
    }

    /// Samples in `ms` milliseconds at this stream's clock, saturating at `u32::MAX`.
    pub fn samples_for_ms(&self, ms: u64) -> u32 {
        let samples = ms.saturating_mul(u64::from(self.clock_rate_hz)) / MILLIS_PER_SECOND;
        u32::try_from(samples).unwrap_or(u32::MAX)
    }

    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// The sequence number the next packet will carry.
    pub fn sequence(&self) -> u16 {
        self.sequence
    }

    /// The timestamp the next packet will carry; a DTMF sender starts its events here.
    pub fn timestamp(&self) -> u32 {
        self.timestamp
    }

    pub fn clock_rate_hz(&self) -> u32 {
        self.clock_rate_hz
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(payload_type: u8, marker: bool) -> RtpHeader {
        RtpHeader {
            payload_type,
            marker,
            sequence: 0xBEEF,
            timestamp: 0xDEAD_BEEF,
            ssrc: 0x1234_5678,
        }
    }

    fn written(header: &RtpHeader, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        header.write(payload, &mut out);
        out
    }

    fn parsed(packet: &[u8]) -> (RtpHeader, &[u8]) {
        parse(packet).unwrap_or_else(|error| panic!("parse failed: {error}"))
    }

    /// V=2, P, X, CC=2, M, PT=0, then two CSRCs, a one-word extension, a 3-byte payload and
    /// 3 bytes of padding. Payload bytes are all above the lengths left beneath them, so no
    /// truncation of this packet reads as a valid padding count (see the truncation test).
    #[rustfmt::skip]
    const FULL_PACKET: [u8; 34] = [
        0b1011_0010,            // V=2, P=1, X=1, CC=2
        0x80,                   // M=1, PT=0
        0x00, 0x2A,             // sequence 42
        0x00, 0x00, 0x01, 0x40, // timestamp 320
        0xCA, 0xFE, 0xBA, 0xBE, // SSRC
        0x11, 0x11, 0x11, 0x11, // CSRC 1
        0x22, 0x22, 0x22, 0x22, // CSRC 2
        0xBE, 0xDE, 0x00, 0x01, // extension: RFC 8285 one-byte profile, 1 word
        0x10, 0xAA, 0x00, 0x00, // extension body
        0xF1, 0xF2, 0xF3,       // payload
        0x00, 0x00, 0x03,       // padding, count last
    ];

    fn full_packet() -> &'static [u8] {
        &FULL_PACKET
    }

    #[test]
    fn write_then_parse_round_trips() {
        for (payload_type, marker) in [(0, false), (8, true), (101, true), (127, false)] {
            let original = header(payload_type, marker);
            let payload = [0xFF_u8; 160];
            let packet = written(&original, &payload);
            assert_eq!(packet.len(), HEADER_LEN + payload.len());
            assert_eq!(parsed(&packet), (original, &payload[..]));
        }
    }

    #[test]
    fn write_lays_out_the_fixed_header_big_endian() {
        let packet = written(&header(101, true), &[1, 2]);
        assert_eq!(
            packet,
            [
                0x80,
                0x80 | 101,
                0xBE,
                0xEF,
                0xDE,
                0xAD,
                0xBE,
                0xEF,
                0x12,
                0x34,
                0x56,
                0x78,
                1,
                2
            ]
        );
    }

    #[test]
    fn write_appends_to_the_buffer() {
        let mut out = vec![0xAA];
        header(0, false).write(&[], &mut out);
        assert_eq!(out.len(), 1 + HEADER_LEN);
        assert_eq!(out[0], 0xAA);
    }

    #[test]
    fn write_cannot_forge_the_marker_with_a_large_payload_type() {
        let packet = written(&header(0x80 | 8, false), &[]);
        assert_eq!(packet[1], 8);
    }

    #[test]
    fn csrcs_extension_and_padding_are_skipped() {
        let (header, payload) = parsed(full_packet());
        assert_eq!(
            header,
            RtpHeader {
                payload_type: 0,
                marker: true,
                sequence: 42,
                timestamp: 320,
                ssrc: 0xCAFE_BABE,
            }
        );
        assert_eq!(payload, [0xF1, 0xF2, 0xF3]);
    }

    #[test]
    fn header_only_packet_has_an_empty_payload() {
        let packet = written(&header(0, false), &[]);
        assert_eq!(parsed(&packet).1, [] as [u8; 0]);
    }

    #[test]
    fn padding_may_take_every_byte_after_the_header() {
        let mut packet = written(&header(0, false), &[0, 0, 0, 4]);
        packet[0] |= PADDING_BIT;
        assert_eq!(parsed(&packet).1, [] as [u8; 0]);
    }

    #[test]
    fn every_truncation_of_a_full_packet_is_an_error() {
        let packet = full_packet();
        for len in 0..packet.len() {
            assert!(
                parse(&packet[..len]).is_err(),
                "accepted a {len}-byte truncation: {:?}",
                parse(&packet[..len])
            );
        }
    }

    #[test]
    fn truncation_errors_name_the_part_cut_short() {
        let packet = full_packet();
        assert_eq!(parse(&packet[..11]), Err(RtpError::TooShort { len: 11 }));
        assert_eq!(
            parse(&packet[..19]),
            Err(RtpError::TruncatedCsrcList {
                csrc_count: 2,
                len: 19
            })
        );
        assert_eq!(
            parse(&packet[..22]),
            Err(RtpError::TruncatedExtension {
                needed: 24,
                len: 22
            })
        );
        assert_eq!(
            parse(&packet[..26]),
            Err(RtpError::TruncatedExtension {
                needed: 28,
                len: 26
            })
        );
        assert_eq!(
            parse(&packet[..28]),
            Err(RtpError::BadPadding {
                count: 0,
                available: 0
            })
        );
    }

    #[test]
    fn versions_other_than_two_are_refused() {
        for version in [0_u8, 1, 3] {
            let mut packet = written(&header(0, false), &[0; 4]);
            packet[0] = version << VERSION_SHIFT;
            assert_eq!(parse(&packet), Err(RtpError::BadVersion { version }));
        }
    }

    #[test]
    fn padding_count_of_zero_is_refused() {
        let mut packet = written(&header(0, false), &[1, 2, 0]);
        packet[0] |= PADDING_BIT;
        assert_eq!(
            parse(&packet),
            Err(RtpError::BadPadding {
                count: 0,
                available: 3
            })
        );
    }

    #[test]
    fn padding_count_past_the_payload_is_refused() {
        let mut packet = written(&header(0, false), &[1, 2, 4]);
        packet[0] |= PADDING_BIT;
        assert_eq!(
            parse(&packet),
            Err(RtpError::BadPadding {
                count: 4,
                available: 3
            })
        );
    }

    #[test]
    fn extension_length_past_the_end_is_refused() {
        let mut packet = written(&header(0, false), &[0xBE, 0xDE, 0xFF, 0xFF, 0, 0, 0, 0]);
        packet[0] |= EXTENSION_BIT;
        assert_eq!(
            parse(&packet),
            Err(RtpError::TruncatedExtension {
                needed: HEADER_LEN + 4 + 0xFFFF * 4,
                len: packet.len()
            })
        );
    }

    #[test]
    fn maximum_csrc_count_is_read_when_present() {
        let mut packet = written(&header(0, false), &[0x77; 15 * 4 + 2]);
        packet[0] |= CSRC_COUNT_MASK;
        assert_eq!(parsed(&packet).1, [0x77, 0x77]);
    }

    #[test]
    fn error_messages_blame_the_peer() {
        let errors = [
            RtpError::TooShort { len: 3 },
            RtpError::BadVersion { version: 1 },
            RtpError::TruncatedCsrcList {
                csrc_count: 4,
                len: 20,
            },
            RtpError::TruncatedExtension {
                needed: 30,
                len: 20,
            },
            RtpError::BadPadding {
                count: 9,
                available: 2,
            },
        ];
        for error in errors {
            let message = error.to_string();
            assert!(message.starts_with("the peer's"), "{message}");
        }
        assert!(RtpError::BadPadding {
            count: 9,
            available: 2
        }
        .to_string()
        .contains("count of 9"));
    }

    #[test]
    fn rtcp_sender_and_receiver_reports_are_recognised() {
        // SR and RR headers: V=2, RC=0/1, PT 200/201, length.
        assert!(is_rtcp(&[0x80, 200, 0x00, 0x06]));
        assert!(is_rtcp(&[0x81, 201, 0x00, 0x07]));
        assert!(is_rtcp(&[0x81, 192]));
        assert!(is_rtcp(&[0x81, 223]));
    }

    #[test]
    fn audio_payload_types_are_not_rtcp_with_or_without_marker() {
        for payload_type in [0_u8, 8, 101, 111, 127] {
            for marker in [false, true] {
                let packet = written(&header(payload_type, marker), &[0; 4]);
                assert!(!is_rtcp(&packet), "PT {payload_type} marker {marker}");
                assert!(parse(&packet).is_ok());
            }
        }
        assert!(!is_rtcp(&[0x80, 191]));
        assert!(!is_rtcp(&[0x80, 224]));
    }

    #[test]
    fn short_or_non_v2_packets_are_not_rtcp() {
        assert!(!is_rtcp(&[]));
        assert!(!is_rtcp(&[0x80]));
        // A STUN binding request starts 0x00 0x01: version 0.
        assert!(!is_rtcp(&[0x00, 200]));
    }

    #[test]
    fn sender_steps_sequence_by_one_and_timestamp_by_samples() {
        let mut sender = RtpSender::new(7, 100, 1000, 8000);
        let first = sender.next(0, true, 160);
        let second = sender.next(0, false, 160);
        assert_eq!(
            (first.sequence, first.timestamp, first.marker, first.ssrc),
            (100, 1000, true, 7)
        );
        assert_eq!((second.sequence, second.timestamp), (101, 1160));
        assert_eq!((sender.sequence(), sender.timestamp()), (102, 1320));
    }

    #[test]
    fn sender_wraps_sequence_and_timestamp() {
        let mut sender = RtpSender::new(7, u16::MAX, u32::MAX - 100, 8000);
        let last = sender.next(0, false, 160);
        let wrapped = sender.next(0, false, 160);
        assert_eq!((last.sequence, last.timestamp), (u16::MAX, u32::MAX - 100));
        assert_eq!((wrapped.sequence, wrapped.timestamp), (0, 59));
        sender.advance(u32::MAX);
        assert_eq!(sender.timestamp(), 59 + 160 - 1);
    }

    #[test]
    fn advance_skips_time_without_using_a_sequence_number() {
        let mut sender = RtpSender::new(7, 5, 0, 8000);
        sender.next(0, false, 160);
        sender.advance(sender.samples_for_ms(60));
        let after_silence = sender.next(0, true, 160);
        assert_eq!(
            (after_silence.sequence, after_silence.timestamp),
            (6, 160 + 480)
        );
    }

    #[test]
    fn next_at_keeps_the_callers_timestamp_and_leaves_ours() {
        let mut sender = RtpSender::new(7, 5, 8000, 8000);
        let event = sender.next_at(101, true, 4000);
        assert_eq!(
            (event.sequence, event.timestamp, event.payload_type),
            (5, 4000, 101)
        );
        assert_eq!((sender.sequence(), sender.timestamp()), (6, 8000));
    }

    #[test]
    fn samples_for_ms_follows_the_clock() {
        assert_eq!(RtpSender::new(0, 0, 0, 8000).samples_for_ms(20), 160);
        assert_eq!(RtpSender::new(0, 0, 0, 48_000).samples_for_ms(20), 960);
        assert_eq!(
            RtpSender::new(0, 0, 0, 48_000).samples_for_ms(u64::MAX),
            u32::MAX
        );
    }

    /// A tiny xorshift so the fuzz loop is reproducible without a dependency.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_bytes_never_panic_and_accepted_packets_are_consistent() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let len = rng.below(96);
            let mut packet: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Force version 2 on most packets so the fuzzing reaches past the first check.
            if let Some(first) = packet.first_mut() {
                if rng.below(8) != 0 {
                    *first = (*first & 0x3F) | 0x80;
                }
            }
            let Ok((header, payload)) = parse(&packet) else {
                continue;
            };
            accepted += 1;
            // The payload lies inside the packet, after the fixed header.
            let offset = payload.as_ptr() as usize - packet.as_ptr() as usize;
            assert!(offset >= HEADER_LEN && offset + payload.len() <= packet.len());
            // Rewriting without CSRCs, extension and padding reads back the same.
            let rewritten = written(&header, payload);
            assert_eq!(parsed(&rewritten), (header, payload));
        }
        assert!(accepted > 1000, "only {accepted} accepted");
    }

    #[test]
    fn random_mutations_of_a_full_packet_never_panic() {
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        for _ in 0..20_000 {
            let mut packet = full_packet().to_vec();
            for _ in 0..=rng.below(3) {
                let at = rng.below(packet.len());
                packet[at] = rng.next() as u8;
            }
            packet.truncate(rng.below(packet.len() + 1));
            let _ = parse(&packet);
            let _ = is_rtcp(&packet);
        }
    }
}
