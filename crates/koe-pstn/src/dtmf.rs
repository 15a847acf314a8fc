//! DTMF over RTP as RFC 4733 telephone events, sans-IO: the digit alphabet, the 4-byte event
//! payload, a sender that turns a digit string into the packet train a trunk expects, and a
//! receiver that turns a trunk's packet train back into digits.
//!
//! In-band tones do not survive a lossy voice codec and packet loss reliably, so trunks and
//! IVRs expect digits out of band. Neither side touches a socket or a clock:
//! the caller passes virtual milliseconds in and asks when to come back, so the timing is
//! tested exactly, without sleeps, and the same code runs under any driver.
//!
//! The caller owns the RTP header: it puts the packets on the audio stream's SSRC and sequence
//! numbers with the negotiated `telephone-event` payload type, and keeps audio quiet while a
//! digit plays (RFC 4733 §2.5.1.2).

use std::collections::VecDeque;
use std::fmt;

/// Updates of a playing event go out this often (the usual 20 ms voice packetisation).
pub const PACKET_INTERVAL_MS: u64 = 20;
/// How long each digit sounds by default; comfortably above the 40 ms minimum of ITU-T Q.24.
pub const TONE_MS: u64 = 100;
/// Silence between digits by default, so a receiver sees two key presses, not one.
pub const GAP_MS: u64 = 60;
/// The end packet is sent this many times, one interval apart: a lost end leaves the far end
/// playing the tone until its own timeout, long enough to read as a held key (RFC 4733 §2.5.1.4).
pub const END_PACKET_COUNT: usize = 3;
/// The RTP clock of `telephone-event` when it rides with narrowband audio such as G.711.
pub const DEFAULT_CLOCK_RATE_HZ: u32 = 8000;
/// Conventional power level: −10 dBm0, carried without its sign.
pub const DEFAULT_VOLUME_DBM0: u8 = 10;
/// Largest volume the 6-bit field carries (−63 dBm0).
pub const MAX_VOLUME_DBM0: u8 = 63;
/// Digits accepted in one request: more than any dial string, few enough that one request
/// cannot hold a trunk's event channel for long.
pub const MAX_DIGITS: usize = 64;
/// Bytes in one event report (RFC 4733 §2.3).
pub const TELEPHONE_EVENT_PAYLOAD_BYTES: usize = 4;
/// Longest silence a sender may leave between digits; anything longer is a mistake, and the
/// bound keeps the timestamp arithmetic far from overflow.
pub const MAX_GAP_MS: u64 = 60_000;
/// A receiver ends an event it has heard nothing of for this long (its end packets were all
/// lost and no later event came to close it).
pub const RECEIVER_END_TIMEOUT_MS: u64 = 250;
/// Packets of an event at most this much older than the newest one are late arrivals and
/// ignored; a bigger step back means the remote restarted its timestamps.
pub const RECEIVER_REORDER_WINDOW_MS: u64 = 10_000;

const END_BIT: u8 = 0x80;
const RESERVED_BIT: u8 = 0x40;
const VOLUME_MASK: u8 = 0x3F;
const MILLIS_PER_SECOND: u128 = 1000;

/// What went wrong with a DTMF request, payload or configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DtmfError {
    /// A character that is not a DTMF digit; `position` counts characters (not bytes) from 0.
    InvalidCharacter { character: char, position: usize },
    /// The request held no digits at all.
    NoDigits,
    /// The request held more than [`MAX_DIGITS`] digits.
    TooManyDigits { max: usize },
    /// A telephone-event payload shorter than [`TELEPHONE_EVENT_PAYLOAD_BYTES`].
    PayloadTooShort { len: usize },
    /// A sender or receiver configuration that cannot produce valid packets.
    InvalidConfig { reason: &'static str },
}

impl fmt::Display for DtmfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DtmfError::InvalidCharacter {
                character,
                position,
            } => write!(
                f,
                "{character:?} at position {position} is not a DTMF digit (use 0-9, *, #, A-D)"
            ),
            DtmfError::NoDigits => write!(f, "no DTMF digits to send"),
            DtmfError::TooManyDigits { max } => {
                write!(f, "too many DTMF digits: at most {max} per request")
            }
            DtmfError::PayloadTooShort { len } => write!(
                f,
                "telephone-event payload of {len} bytes is shorter than \
                 {TELEPHONE_EVENT_PAYLOAD_BYTES}"
            ),
            DtmfError::InvalidConfig { reason } => {
                write!(f, "invalid DTMF configuration: {reason}")
            }
        }
    }
}

impl std::error::Error for DtmfError {}

/// One DTMF key, with its RFC 4733 §3.2 event code as discriminant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DtmfDigit {
    Zero = 0,
    One = 1,
    Two = 2,
    Three = 3,
    Four = 4,
    Five = 5,
    Six = 6,
    Seven = 7,
    Eight = 8,
    Nine = 9,
    Star = 10,
    Pound = 11,
    A = 12,
    B = 13,
    C = 14,
    D = 15,
}

/// Every digit in event-code order, so code lookups are an index.
const ALL_DIGITS: [DtmfDigit; 16] = [
    DtmfDigit::Zero,
    DtmfDigit::One,
    DtmfDigit::Two,
    DtmfDigit::Three,
    DtmfDigit::Four,
    DtmfDigit::Five,
    DtmfDigit::Six,
    DtmfDigit::Seven,
    DtmfDigit::Eight,
    DtmfDigit::Nine,
    DtmfDigit::Star,
    DtmfDigit::Pound,
    DtmfDigit::A,
    DtmfDigit::B,
    DtmfDigit::C,
    DtmfDigit::D,
];

/// The characters of [`ALL_DIGITS`], same order.
const DIGIT_CHARS: [char; 16] = [
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '*', '#', 'A', 'B', 'C', 'D',
];

impl DtmfDigit {
    /// The RFC 4733 event code (0..=15).
    pub fn event_code(self) -> u8 {
        self as u8
    }

    /// The digit for an event code, or `None` for the non-DTMF events above 15.
    pub fn from_event_code(code: u8) -> Option<DtmfDigit> {
        ALL_DIGITS.get(usize::from(code)).copied()
    }

    /// The digit for a keypad character; `a`-`d` are accepted too, since dial strings are typed
    /// by people.
    pub fn from_char(character: char) -> Option<DtmfDigit> {
        let upper = character.to_ascii_uppercase();
        DIGIT_CHARS
            .iter()
            .position(|&c| c == upper)
            .and_then(|index| ALL_DIGITS.get(index).copied())
    }

    /// The keypad character, letters upper case.
    pub fn as_char(self) -> char {
        DIGIT_CHARS[usize::from(self.event_code())]
    }
}

impl fmt::Display for DtmfDigit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_char())
    }
}

/// Parses a digit request such as `"123#"` or `"555-0100"`. Spaces and dashes are ignored so
/// people can paste numbers grouped the way they write them.
pub fn parse_digits(text: &str) -> Result<Vec<DtmfDigit>, DtmfError> {
    let mut digits = Vec::new();
    for (position, character) in text.chars().enumerate() {
        if character == ' ' || character == '-' {
            continue;
        }
        let digit = DtmfDigit::from_char(character).ok_or(DtmfError::InvalidCharacter {
            character,
            position,
        })?;
        if digits.len() == MAX_DIGITS {
            return Err(DtmfError::TooManyDigits { max: MAX_DIGITS });
        }
        digits.push(digit);
    }
    if digits.is_empty() {
        return Err(DtmfError::NoDigits);
    }
    Ok(digits)
}

/// One RFC 4733 event report, the whole payload of a telephone-event RTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TelephoneEvent {
    /// Event code; 0..=15 are DTMF, higher codes are other tones the gateway only passes by.
    pub event: u8,
    /// Set on the final packet(s) of the event.
    pub end: bool,
    /// Power level in dBm0 without its sign, 0..=63; higher bits are dropped on encode.
    pub volume: u8,
    /// Length of the event so far, in RTP clock units from the event's timestamp.
    pub duration: u16,
}

impl TelephoneEvent {
    /// The wire form. The reserved bit is always sent clear (RFC 4733 §2.3).
    pub fn encode(&self) -> [u8; TELEPHONE_EVENT_PAYLOAD_BYTES] {
        let flags = if self.end { END_BIT } else { 0 } | (self.volume & VOLUME_MASK);
        let [duration_high, duration_low] = self.duration.to_be_bytes();
        [self.event, flags, duration_high, duration_low]
    }

    /// Reads the first report of a payload. The reserved bit is ignored as the RFC asks, and
    /// bytes past the first report are left alone (RFC 2198 redundancy is not unpacked here).
    pub fn decode(payload: &[u8]) -> Result<TelephoneEvent, DtmfError> {
        match payload {
            [event, flags, duration_high, duration_low, ..] => Ok(TelephoneEvent {
                event: *event,
                end: flags & END_BIT != 0,
                volume: flags & !(END_BIT | RESERVED_BIT),
                duration: u16::from_be_bytes([*duration_high, *duration_low]),
            }),
            _ => Err(DtmfError::PayloadTooShort { len: payload.len() }),
        }
    }

    /// The DTMF digit this event is, if it is one.
    pub fn digit(&self) -> Option<DtmfDigit> {
        DtmfDigit::from_event_code(self.event)
    }
}

/// One packet for the caller to wrap in an RTP header and send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtmfPacket {
    /// RTP timestamp: the start of the event, the same in every packet of one digit.
    pub timestamp: u32,
    /// RTP marker bit: set on the first packet of each event.
    pub marker: bool,
    pub event: TelephoneEvent,
}

/// How a [`DtmfSender`] plays its digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtmfSendOptions {
    pub tone_ms: u64,
    /// Silence from the end of one tone to the start of the next; the repeated end packets go
    /// out inside it.
    pub gap_ms: u64,
    pub volume_dbm0: u8,
}

impl Default for DtmfSendOptions {
    fn default() -> Self {
        DtmfSendOptions {
            tone_ms: TONE_MS,
            gap_ms: GAP_MS,
            volume_dbm0: DEFAULT_VOLUME_DBM0,
        }
    }
}

/// Plays one digit string as RFC 4733 packets, driven by the caller's clock.
///
/// Each digit is one event whose timestamp is its start time on the RTP clock: an update every
/// [`PACKET_INTERVAL_MS`] with the duration so far (the first carries the marker), then the end
/// packet [`END_PACKET_COUNT`] times one interval apart, then silence until the next digit.
/// A caller that polls late gets only the newest of several overdue updates, since each
/// update supersedes the last; end packets are never dropped.
#[derive(Debug, Clone)]
pub struct DtmfSender {
    digits: Vec<DtmfDigit>,
    options: DtmfSendOptions,
    clock_rate_hz: u32,
    start_ms: u64,
    start_timestamp: u32,
    /// Digit being played; equal to `digits.len()` when done.
    digit_index: usize,
    /// Next packet of that digit: updates first, then the end packets.
    packet_index: usize,
    /// No packet of the current digit has gone out yet, so the next one carries the marker.
    marker_pending: bool,
}

/// When one packet of a digit is due and what it says, relative to the digit's start.
#[derive(Debug, Clone, Copy)]
struct Slot {
    offset_ms: u64,
    duration_ms: u64,
    end: bool,
}

impl DtmfSender {
    /// A sender with the default tone, gap and volume whose first digit starts at `now_ms`,
    /// at RTP timestamp `start_timestamp` (the audio stream's timestamp for `now_ms`).
    pub fn new(
        digits: Vec<DtmfDigit>,
        clock_rate_hz: u32,
        now_ms: u64,
        start_timestamp: u32,
    ) -> Result<DtmfSender, DtmfError> {
        DtmfSender::with_options(
            digits,
            clock_rate_hz,
            DtmfSendOptions::default(),
            now_ms,
            start_timestamp,
        )
    }

    /// A sender with explicit tone, gap and volume.
    pub fn with_options(
        digits: Vec<DtmfDigit>,
        clock_rate_hz: u32,
        options: DtmfSendOptions,
        now_ms: u64,
        start_timestamp: u32,
    ) -> Result<DtmfSender, DtmfError> {
        if digits.is_empty() {
            return Err(DtmfError::NoDigits);
        }
        if digits.len() > MAX_DIGITS {
            return Err(DtmfError::TooManyDigits { max: MAX_DIGITS });
        }
        if clock_rate_hz == 0 {
            return Err(DtmfError::InvalidConfig {
                reason: "the RTP clock rate must be above zero",
            });
        }
        if options.tone_ms == 0 {
            return Err(DtmfError::InvalidConfig {
                reason: "the tone length must be above zero",
            });
        }
        if units_for_ms(options.tone_ms, clock_rate_hz) > u128::from(u16::MAX) {
            // Longer events need RFC 4733 §2.5.1.3 segments, which no DTMF use calls for.
            return Err(DtmfError::InvalidConfig {
                reason: "the tone is too long for the 16-bit duration field at this clock rate",
            });
        }
        let end_repeats_ms = PACKET_INTERVAL_MS * (END_PACKET_COUNT as u64 - 1);
        if options.gap_ms < end_repeats_ms {
            return Err(DtmfError::InvalidConfig {
                reason: "the gap must leave room for the repeated end packets",
            });
        }
        if options.gap_ms > MAX_GAP_MS {
            return Err(DtmfError::InvalidConfig {
                reason: "the gap between digits is too long",
            });
        }
        if options.volume_dbm0 > MAX_VOLUME_DBM0 {
            return Err(DtmfError::InvalidConfig {
                reason: "the volume must be 0..=63 (dBm0, unsigned)",
            });
        }
        Ok(DtmfSender {
            digits,
            options,
            clock_rate_hz,
            start_ms: now_ms,
            start_timestamp,
            digit_index: 0,
            packet_index: 0,
            marker_pending: true,
        })
    }

    /// The next packet due at or before `now_ms`, or `None` if nothing is due yet (or ever).
    /// Call it until it returns `None`, then wait for [`DtmfSender::next_deadline`].
    pub fn poll_packet(&mut self, now_ms: u64) -> Option<DtmfPacket> {
        loop {
            let digit = *self.digits.get(self.digit_index)?;
            let slot = self.slot(self.packet_index);
            if self.due_ms(slot) > now_ms {
                return None;
            }
            // Updates before the end always have a successor in the same digit.
            if !slot.end && self.due_ms(self.slot(self.packet_index + 1)) <= now_ms {
                self.packet_index += 1;
                continue;
            }
            let packet = DtmfPacket {
                timestamp: self.digit_timestamp(),
                marker: self.marker_pending,
                event: TelephoneEvent {
                    event: digit.event_code(),
                    end: slot.end,
                    volume: self.options.volume_dbm0,
                    duration: self.duration_units(slot.duration_ms),
                },
            };
            self.marker_pending = false;
            self.packet_index += 1;
            if self.packet_index == self.packets_per_digit() {
                self.digit_index += 1;
                self.packet_index = 0;
                self.marker_pending = true;
            }
            return Some(packet);
        }
    }

    /// When the next packet is due, or `None` once every packet has been returned.
    pub fn next_deadline(&self) -> Option<u64> {
        if self.is_done() {
            return None;
        }
        Some(self.due_ms(self.slot(self.packet_index)))
    }

    /// Whether every packet, end repeats included, has been returned.
    pub fn is_done(&self) -> bool {
        self.digit_index >= self.digits.len()
    }

    fn updates_per_digit(&self) -> usize {
        // Updates at every whole interval strictly inside the tone; the end marks the tone's end.
        usize::try_from((self.options.tone_ms - 1) / PACKET_INTERVAL_MS).unwrap_or(usize::MAX)
    }

    fn packets_per_digit(&self) -> usize {
        self.updates_per_digit().saturating_add(END_PACKET_COUNT)
    }

    fn slot(&self, packet_index: usize) -> Slot {
        let updates = self.updates_per_digit();
        if packet_index < updates {
            let elapsed_ms = (packet_index as u64 + 1) * PACKET_INTERVAL_MS;
            Slot {
                offset_ms: elapsed_ms,
                duration_ms: elapsed_ms,
                end: false,
            }
        } else {
            let repeat = (packet_index - updates) as u64;
            Slot {
                offset_ms: self.options.tone_ms + repeat * PACKET_INTERVAL_MS,
                duration_ms: self.options.tone_ms,
                end: true,
            }
        }
    }

    fn digit_offset_ms(&self) -> u64 {
        // Bounded by MAX_DIGITS * (tone + MAX_GAP_MS), far below u64::MAX.
        self.digit_index as u64 * (self.options.tone_ms + self.options.gap_ms)
    }

    fn due_ms(&self, slot: Slot) -> u64 {
        self.start_ms
            .saturating_add(self.digit_offset_ms())
            .saturating_add(slot.offset_ms)
    }

    fn digit_timestamp(&self) -> u32 {
        let units = units_for_ms(self.digit_offset_ms(), self.clock_rate_hz);
        // RTP timestamps live modulo 2^32, so only the low 32 bits of the offset matter.
        let low_bits = u32::try_from(units % (1_u128 << 32)).unwrap_or(0);
        self.start_timestamp.wrapping_add(low_bits)
    }

    fn duration_units(&self, duration_ms: u64) -> u16 {
        // Checked against u16::MAX in the constructor.
        u16::try_from(units_for_ms(duration_ms, self.clock_rate_hz)).unwrap_or(u16::MAX)
    }
}

fn units_for_ms(ms: u64, clock_rate_hz: u32) -> u128 {
    u128::from(ms) * u128::from(clock_rate_hz) / MILLIS_PER_SECOND
}

/// A digit heard from the far end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceivedDigit {
    pub digit: DtmfDigit,
    /// RTP timestamp of the event, which identifies it.
    pub timestamp: u32,
    /// Longest duration reported for it, in RTP clock units.
    pub duration: u16,
    /// Whether an end packet arrived; `false` means the end was inferred from a later event
    /// or from silence.
    pub end_seen: bool,
}

/// The event a receiver heard most recently.
#[derive(Debug, Clone, Copy)]
struct HeardEvent {
    timestamp: u32,
    event: u8,
    duration: u16,
    last_packet_ms: u64,
    finished: bool,
}

/// Turns a trunk's telephone-event packets into digits, each exactly once.
///
/// An event is identified by its RTP timestamp. It is reported at its first end packet, or, if
/// every end packet was lost, when a newer event starts or after [`RECEIVER_END_TIMEOUT_MS`]
/// of silence. Repeated end packets and late packets of older events are ignored; a lost first
/// packet does not matter, since any packet of an event starts it. Use one receiver per remote
/// SSRC, or call [`DtmfReceiver::reset`] when it changes.
#[derive(Debug, Clone)]
pub struct DtmfReceiver {
    reorder_window_units: u32,
    newest: Option<HeardEvent>,
    ready: VecDeque<ReceivedDigit>,
}

impl DtmfReceiver {
    /// A receiver for events on an RTP clock of `clock_rate_hz`.
    pub fn new(clock_rate_hz: u32) -> Result<DtmfReceiver, DtmfError> {
        if clock_rate_hz == 0 {
            return Err(DtmfError::InvalidConfig {
                reason: "the RTP clock rate must be above zero",
            });
        }
        let window = units_for_ms(RECEIVER_REORDER_WINDOW_MS, clock_rate_hz);
        // Past half the timestamp space "older" stops meaning anything.
        let reorder_window_units = u32::try_from(window)
            .unwrap_or(u32::MAX)
            .min(i32::MAX as u32);
        Ok(DtmfReceiver {
            reorder_window_units,
            newest: None,
            ready: VecDeque::new(),
        })
    }

    /// Takes in one received telephone-event packet, arrived at `now_ms`.
    pub fn handle_packet(&mut self, now_ms: u64, timestamp: u32, event: TelephoneEvent) {
        let heard = HeardEvent {
            timestamp,
            event: event.event,
            duration: event.duration,
            last_packet_ms: now_ms,
            finished: false,
        };
        let Some(mut newest) = self.newest else {
            self.start(heard, event.end);
            return;
        };
        if timestamp == newest.timestamp {
            if newest.finished {
                return;
            }
            newest.duration = newest.duration.max(event.duration);
            newest.last_packet_ms = now_ms;
            self.newest = Some(newest);
            if event.end {
                self.finish(true);
            }
            return;
        }
        let behind = newest.timestamp.wrapping_sub(timestamp);
        if behind <= self.reorder_window_units {
            return;
        }
        if !newest.finished
            && event.event == newest.event
            && timestamp == newest.timestamp.wrapping_add(u32::from(newest.duration))
        {
            // A new segment of the same long event (RFC 4733 §2.5.1.3), not a new key press.
            newest.timestamp = timestamp;
            newest.duration = event.duration;
            newest.last_packet_ms = now_ms;
            self.newest = Some(newest);
            if event.end {
                self.finish(true);
            }
            return;
        }
        self.finish(false);
        self.start(heard, event.end);
    }

    /// Ends an event whose end packets were all lost, once it has been quiet long enough.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if let Some(deadline) = self.next_deadline() {
            if now_ms >= deadline {
                self.finish(false);
            }
        }
    }

    /// When [`DtmfReceiver::handle_timeout`] should next be called, if an event is open.
    pub fn next_deadline(&self) -> Option<u64> {
        self.newest.filter(|newest| !newest.finished).map(|newest| {
            newest
                .last_packet_ms
                .saturating_add(RECEIVER_END_TIMEOUT_MS)
        })
    }

    /// The next digit heard, oldest first.
    pub fn poll_digit(&mut self) -> Option<ReceivedDigit> {
        self.ready.pop_front()
    }

    /// Forgets the stream's events (digits already heard stay queued), for a new remote SSRC.
    pub fn reset(&mut self) {
        self.newest = None;
    }

    fn start(&mut self, heard: HeardEvent, end: bool) {
        self.newest = Some(heard);
        if end {
            self.finish(true);
        }
    }

    /// Reports the newest event if it is still open.
    fn finish(&mut self, end_seen: bool) {
        let Some(newest) = self.newest.as_mut() else {
            return;
        };
        if newest.finished {
            return;
        }
        newest.finished = true;
        if let Some(digit) = DtmfDigit::from_event_code(newest.event) {
            self.ready.push_back(ReceivedDigit {
                digit,
                timestamp: newest.timestamp,
                duration: newest.duration,
                end_seen,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(code: u8, end: bool, duration: u16) -> TelephoneEvent {
        TelephoneEvent {
            event: code,
            end,
            volume: DEFAULT_VOLUME_DBM0,
            duration,
        }
    }

    fn packet(timestamp: u32, marker: bool, code: u8, end: bool, duration: u16) -> DtmfPacket {
        DtmfPacket {
            timestamp,
            marker,
            event: event(code, end, duration),
        }
    }

    /// Runs a sender to completion, stepping virtual time from deadline to deadline.
    fn drain(sender: &mut DtmfSender) -> Vec<(u64, DtmfPacket)> {
        let mut sent = Vec::new();
        while let Some(deadline) = sender.next_deadline() {
            while let Some(packet) = sender.poll_packet(deadline) {
                sent.push((deadline, packet));
            }
        }
        assert!(sender.is_done());
        sent
    }

    fn digits_of(receiver: &mut DtmfReceiver) -> Vec<ReceivedDigit> {
        std::iter::from_fn(|| receiver.poll_digit()).collect()
    }

    fn chars_of(received: &[ReceivedDigit]) -> String {
        received.iter().map(|r| r.digit.as_char()).collect()
    }

    #[test]
    fn event_codes_follow_rfc_4733_section_3_2() {
        let expected = "0123456789*#ABCD";
        for (code, character) in expected.chars().enumerate() {
            let digit = DtmfDigit::from_char(character).unwrap();
            assert_eq!(usize::from(digit.event_code()), code);
            assert_eq!(digit.as_char(), character);
            assert_eq!(DtmfDigit::from_event_code(code as u8), Some(digit));
            assert_eq!(digit.to_string(), character.to_string());
        }
        assert_eq!(DtmfDigit::from_event_code(16), None);
        assert_eq!(DtmfDigit::from_event_code(255), None);
        assert_eq!(DtmfDigit::from_char('b'), Some(DtmfDigit::B));
        assert_eq!(DtmfDigit::from_char('E'), None);
    }

    #[test]
    fn parse_digits_accepts_keypad_and_ignores_spaces_and_dashes() {
        let digits = parse_digits("12-34 *#ab CD").unwrap();
        let text: String = digits.iter().map(|d| d.as_char()).collect();
        assert_eq!(text, "1234*#ABCD");
    }

    #[test]
    fn parse_digits_names_the_bad_character_and_its_position() {
        assert_eq!(
            parse_digits("12 3x5"),
            Err(DtmfError::InvalidCharacter {
                character: 'x',
                position: 4
            })
        );
        // Positions count characters, not bytes.
        assert_eq!(
            parse_digits("ü1"),
            Err(DtmfError::InvalidCharacter {
                character: 'ü',
                position: 0
            })
        );
        assert_eq!(
            parse_digits("+15550100"),
            Err(DtmfError::InvalidCharacter {
                character: '+',
                position: 0
            })
        );
        let message = parse_digits("12 3x5").unwrap_err().to_string();
        assert!(
            message.contains("'x'") && message.contains("position 4"),
            "{message}"
        );
    }

    #[test]
    fn parse_digits_limits_the_request() {
        assert_eq!(
            parse_digits(&"1".repeat(MAX_DIGITS)).unwrap().len(),
            MAX_DIGITS
        );
        assert_eq!(
            parse_digits(&"1".repeat(MAX_DIGITS + 1)),
            Err(DtmfError::TooManyDigits { max: MAX_DIGITS })
        );
        // Separators do not count towards the limit.
        let spaced = "1 ".repeat(MAX_DIGITS);
        assert_eq!(parse_digits(&spaced).unwrap().len(), MAX_DIGITS);
        assert_eq!(parse_digits(""), Err(DtmfError::NoDigits));
        assert_eq!(parse_digits(" - "), Err(DtmfError::NoDigits));
    }

    #[test]
    fn payload_layout_matches_rfc_4733_figure_1() {
        let encoded = TelephoneEvent {
            event: 11,
            end: true,
            volume: 10,
            duration: 800,
        }
        .encode();
        assert_eq!(encoded, [11, 0x80 | 10, 0x03, 0x20]);
        let encoded = TelephoneEvent {
            event: 5,
            end: false,
            volume: 63,
            duration: 0xFFFF,
        }
        .encode();
        assert_eq!(encoded, [5, 63, 0xFF, 0xFF]);
    }

    #[test]
    fn decode_inverts_encode_across_sampled_fields() {
        let durations = [
            0_u16, 1, 160, 800, 0x00FF, 0x0100, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF,
        ];
        for code in 0..=255_u8 {
            for end in [false, true] {
                for volume in 0..=MAX_VOLUME_DBM0 {
                    for duration in durations {
                        let original = TelephoneEvent {
                            event: code,
                            end,
                            volume,
                            duration,
                        };
                        assert_eq!(TelephoneEvent::decode(&original.encode()), Ok(original));
                    }
                }
            }
        }
    }

    #[test]
    fn decode_ignores_the_reserved_bit_and_trailing_bytes() {
        let decoded = TelephoneEvent::decode(&[3, 0x80 | 0x40 | 20, 0x01, 0x40, 0xAA]).unwrap();
        assert_eq!(
            decoded,
            TelephoneEvent {
                event: 3,
                end: true,
                volume: 20,
                duration: 320
            }
        );
        assert_eq!(decoded.digit(), Some(DtmfDigit::Three));
    }

    #[test]
    fn events_above_15_decode_but_are_not_digits() {
        let decoded = TelephoneEvent::decode(&[32, 0x0A, 0, 160]).unwrap();
        assert_eq!(decoded.event, 32);
        assert_eq!(decoded.digit(), None);
    }

    #[test]
    fn volume_above_63_cannot_leak_into_the_flag_bits() {
        let encoded = TelephoneEvent {
            event: 1,
            end: false,
            volume: 0xFF,
            duration: 0,
        }
        .encode();
        assert_eq!(encoded[1], 0x3F);
    }

    #[test]
    fn short_or_garbage_payloads_are_errors_not_panics() {
        for len in 0..TELEPHONE_EVENT_PAYLOAD_BYTES {
            let payload = vec![0xFF; len];
            assert_eq!(
                TelephoneEvent::decode(&payload),
                Err(DtmfError::PayloadTooShort { len })
            );
        }
        // Any 4 bytes at all decode, with the volume inside its 6 bits.
        let mut state = 0x2545_f491_u32;
        for _ in 0..10_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let decoded = TelephoneEvent::decode(&state.to_be_bytes()).unwrap();
            assert!(decoded.volume <= MAX_VOLUME_DBM0);
        }
        let message = TelephoneEvent::decode(&[1, 2]).unwrap_err().to_string();
        assert!(message.contains("2 bytes"), "{message}");
    }

    #[test]
    fn sender_plays_1_pound_as_the_exact_packet_train() {
        let digits = parse_digits("1#").unwrap();
        let mut sender = DtmfSender::new(digits, DEFAULT_CLOCK_RATE_HZ, 1_000, 5_000).unwrap();
        let sent = drain(&mut sender);
        // 160 ms per digit (100 tone + 60 gap) is 1280 units at 8 kHz.
        let expected = vec![
            (1_020, packet(5_000, true, 1, false, 160)),
            (1_040, packet(5_000, false, 1, false, 320)),
            (1_060, packet(5_000, false, 1, false, 480)),
            (1_080, packet(5_000, false, 1, false, 640)),
            (1_100, packet(5_000, false, 1, true, 800)),
            (1_120, packet(5_000, false, 1, true, 800)),
            (1_140, packet(5_000, false, 1, true, 800)),
            (1_180, packet(6_280, true, 11, false, 160)),
            (1_200, packet(6_280, false, 11, false, 320)),
            (1_220, packet(6_280, false, 11, false, 480)),
            (1_240, packet(6_280, false, 11, false, 640)),
            (1_260, packet(6_280, false, 11, true, 800)),
            (1_280, packet(6_280, false, 11, true, 800)),
            (1_300, packet(6_280, false, 11, true, 800)),
        ];
        assert_eq!(sent, expected);
        assert_eq!(sender.next_deadline(), None);
        assert_eq!(sender.poll_packet(u64::MAX), None);
    }

    #[test]
    fn sender_sends_nothing_before_its_deadline() {
        let mut sender =
            DtmfSender::new(vec![DtmfDigit::Five], DEFAULT_CLOCK_RATE_HZ, 0, 0).unwrap();
        assert_eq!(sender.next_deadline(), Some(20));
        assert_eq!(sender.poll_packet(0), None);
        assert_eq!(sender.poll_packet(19), None);
        assert!(!sender.is_done());
        let first = sender.poll_packet(20).unwrap();
        assert!(first.marker);
        assert_eq!(sender.poll_packet(20), None);
        assert_eq!(sender.next_deadline(), Some(40));
    }

    #[test]
    fn sender_timestamps_wrap_across_u32_max() {
        let start = u32::MAX - 100;
        let digits = parse_digits("123").unwrap();
        let mut sender = DtmfSender::new(digits, DEFAULT_CLOCK_RATE_HZ, 0, start).unwrap();
        let sent = drain(&mut sender);
        let mut starts: Vec<u32> = sent.iter().map(|(_, p)| p.timestamp).collect();
        starts.dedup();
        assert_eq!(starts, vec![start, 1_179, 2_459]);
        assert_eq!(starts[1], start.wrapping_add(1_280));
    }

    #[test]
    fn sender_scales_durations_to_the_clock_rate() {
        let mut sender =
            DtmfSender::new(vec![DtmfDigit::Zero, DtmfDigit::Zero], 48_000, 0, 0).unwrap();
        let sent = drain(&mut sender);
        assert_eq!(sent[0].1.event.duration, 960);
        assert_eq!(sent[4].1.event.duration, 4_800);
        assert!(sent[4].1.event.end);
        assert_eq!(sent[7].1.timestamp, 160 * 48);
    }

    #[test]
    fn sender_honours_options_including_a_tone_off_the_interval_grid() {
        let options = DtmfSendOptions {
            tone_ms: 90,
            gap_ms: 40,
            volume_dbm0: 20,
        };
        let mut sender =
            DtmfSender::with_options(vec![DtmfDigit::Star, DtmfDigit::D], 8_000, options, 0, 0)
                .unwrap();
        let sent = drain(&mut sender);
        let times: Vec<u64> = sent.iter().map(|(t, _)| *t).collect();
        assert_eq!(
            times,
            vec![20, 40, 60, 80, 90, 110, 130, 150, 170, 190, 210, 220, 240, 260]
        );
        assert!(sent.iter().all(|(_, p)| p.event.volume == 20));
        assert_eq!(
            sent[4].1.event,
            TelephoneEvent {
                event: 10,
                end: true,
                volume: 20,
                duration: 720
            }
        );
        assert_eq!(
            sent[7].1,
            packet(1_040, true, 15, false, 160).with_volume(20)
        );
    }

    #[test]
    fn a_tone_shorter_than_one_interval_is_just_its_end_packets() {
        let options = DtmfSendOptions {
            tone_ms: 20,
            ..DtmfSendOptions::default()
        };
        let mut sender =
            DtmfSender::with_options(vec![DtmfDigit::Nine], 8_000, options, 0, 7).unwrap();
        let sent = drain(&mut sender);
        let expected = vec![
            (20, packet(7, true, 9, true, 160)),
            (40, packet(7, false, 9, true, 160)),
            (60, packet(7, false, 9, true, 160)),
        ];
        assert_eq!(sent, expected);
    }

    #[test]
    fn a_late_poll_skips_superseded_updates_but_keeps_the_marker_and_every_end() {
        let mut sender = DtmfSender::new(
            vec![DtmfDigit::Two, DtmfDigit::Three],
            DEFAULT_CLOCK_RATE_HZ,
            0,
            0,
        )
        .unwrap();
        let first = sender.poll_packet(65).unwrap();
        assert_eq!(first, packet(0, true, 2, false, 480));
        assert_eq!(sender.poll_packet(65), None);
        // Stalled past the whole first digit and into the second.
        let burst: Vec<DtmfPacket> = std::iter::from_fn(|| sender.poll_packet(210)).collect();
        assert_eq!(
            burst,
            vec![
                packet(0, false, 2, true, 800),
                packet(0, false, 2, true, 800),
                packet(0, false, 2, true, 800),
                packet(1_280, true, 3, false, 320),
            ]
        );
    }

    #[test]
    fn sender_rejects_configurations_it_cannot_honour() {
        let one = || vec![DtmfDigit::One];
        assert_eq!(
            DtmfSender::new(Vec::new(), 8_000, 0, 0).unwrap_err(),
            DtmfError::NoDigits
        );
        assert_eq!(
            DtmfSender::new(vec![DtmfDigit::One; MAX_DIGITS + 1], 8_000, 0, 0).unwrap_err(),
            DtmfError::TooManyDigits { max: MAX_DIGITS }
        );
        assert!(DtmfSender::new(vec![DtmfDigit::One; MAX_DIGITS], 8_000, 0, 0).is_ok());
        assert!(DtmfSender::new(one(), 0, 0, 0).is_err());
        let with = |options| DtmfSender::with_options(one(), 8_000, options, 0, 0);
        let defaults = DtmfSendOptions::default();
        assert!(with(DtmfSendOptions {
            tone_ms: 0,
            ..defaults
        })
        .is_err());
        assert!(with(DtmfSendOptions {
            tone_ms: 8_191,
            ..defaults
        })
        .is_ok());
        assert!(with(DtmfSendOptions {
            tone_ms: 8_192,
            ..defaults
        })
        .is_err());
        assert!(with(DtmfSendOptions {
            gap_ms: 39,
            ..defaults
        })
        .is_err());
        assert!(with(DtmfSendOptions {
            gap_ms: MAX_GAP_MS + 1,
            ..defaults
        })
        .is_err());
        assert!(with(DtmfSendOptions {
            volume_dbm0: 64,
            ..defaults
        })
        .is_err());
    }

    #[test]
    fn sender_near_the_end_of_time_does_not_overflow() {
        let mut sender = DtmfSender::new(vec![DtmfDigit::One; 3], 8_000, u64::MAX - 50, 0).unwrap();
        let sent = drain(&mut sender);
        assert_eq!(
            sent.iter().filter(|(_, p)| p.event.end).count(),
            3 * END_PACKET_COUNT
        );
    }

    impl DtmfPacket {
        fn with_volume(mut self, volume: u8) -> DtmfPacket {
            self.event.volume = volume;
            self
        }
    }

    /// The packets of "1#" as sent, with their send times, for feeding receivers.
    fn one_pound_train() -> Vec<(u64, DtmfPacket)> {
        let digits = parse_digits("1#").unwrap();
        let mut sender = DtmfSender::new(digits, DEFAULT_CLOCK_RATE_HZ, 1_000, 5_000).unwrap();
        drain(&mut sender)
    }

    #[test]
    fn receiver_reports_each_digit_once_despite_repeated_ends() {
        let mut receiver = DtmfReceiver::new(DEFAULT_CLOCK_RATE_HZ).unwrap();
        for (now, p) in one_pound_train() {
            receiver.handle_packet(now, p.timestamp, p.event);
            // Extra duplicates on top of the sender's own repeats.
            receiver.handle_packet(now, p.timestamp, p.event);
        }
        let heard = digits_of(&mut receiver);
        assert_eq!(
            heard,
            vec![
                ReceivedDigit {
                    digit: DtmfDigit::One,
                    timestamp: 5_000,
                    duration: 800,
                    end_seen: true
                },
                ReceivedDigit {
                    digit: DtmfDigit::Pound,
                    timestamp: 6_280,
                    duration: 800,
                    end_seen: true
                },
            ]
        );
        assert_eq!(receiver.next_deadline(), None);
    }

    #[test]
    fn receiver_reports_at_the_first_end_packet() {
        let mut receiver = DtmfReceiver::new(DEFAULT_CLOCK_RATE_HZ).unwrap();
        let train = one_pound_train();
        for (now, p) in &train[..4] {
            receiver.handle_packet(*now, p.timestamp, p.event);
        }
        assert_eq!(receiver.poll_digit(), None);
        let (now, p) = train[4];
        receiver.handle_packet(now, p.timestamp, p.event);
        assert_eq!(receiver.poll_digit().map(|r| r.digit), Some(DtmfDigit::One));
        for (now, p) in &train[5..7] {
            receiver.handle_packet(*now, p.timestamp, p.event);
        }
        assert_eq!(receiver.poll_digit(), None);
    }

    #[test]
    fn receiver_copes_with_lost_first_packets() {
        let mut receiver = DtmfReceiver::new(DEFAULT_CLOCK_RATE_HZ).unwrap();
        for (now, p) in one_pound_train().into_iter().filter(|(_, p)| !p.marker) {
            receiver.handle_packet(now, p.timestamp, p.event);
        }
        assert_eq!(chars_of(&digits_of(&mut receiver)), "1#");
    }

    #[test]
    fn receiver_infers_the_end_when_every_end_packet_is_lost() {
        let mut receiver = DtmfReceiver::new(DEFAULT_CLOCK_RATE_HZ).unwrap();
        let mut last_now = 0;
        for (now, p) in one_pound_train().into_iter().filter(|(_, p)| !p.event.end) {
            receiver.handle_packet(now, p.timestamp, p.event);
            last_now = now;
        }
        // The first digit is closed by the second one starting.
        let first = receiver.poll_digit().unwrap();
        assert_eq!(
            first,
            ReceivedDigit {
                digit: DtmfDigit::One,
                timestamp: 5_000,
                duration: 640,
                end_seen: false
            }
        );
        assert_eq!(receiver.poll_digit(), None);
        // The last one only by silence.
        let deadline = receiver.next_deadline().unwrap();
        assert_eq!(deadline, last_now + RECEIVER_END_TIMEOUT_MS);
        receiver.handle_timeout(deadline - 1);
        assert_eq!(receiver.poll_digit(), None);
        receiver.handle_timeout(deadline);
        let last = receiver.poll_digit().unwrap();
        assert_eq!(
            (last.digit, last.end_seen, last.duration),
            (DtmfDigit::Pound, false, 640)
        );
        assert_eq!(receiver.next_deadline(), None);
        receiver.handle_timeout(deadline + 1_000);
        assert_eq!(receiver.poll_digit(), None);
    }

    #[test]
    fn receiver_handles_reordering_within_and_across_events() {
        let train = one_pound_train();
        let mut receiver = DtmfReceiver::new(DEFAULT_CLOCK_RATE_HZ).unwrap();
        // Within an event: updates swapped, an end before the last update. Across events:
        // the first digit's repeated ends arrive after the second digit has started.
        let order = [1, 0, 2, 4, 3, 7, 5, 8, 6, 9, 10, 11, 13, 12];
        for (arrival, index) in order.into_iter().enumerate() {
            let (_, p) = train[index];
            receiver.handle_packet(arrival as u64 * 20, p.timestamp, p.event);
        }
        let heard = digits_of(&mut receiver);
        assert_eq!(chars_of(&heard), "1#");
        assert!(heard.iter().all(|r| r.end_seen && r.duration == 800));
    }

    #[test]
    fn receiver_reports_a_lone_end_packet_once() {
        let mut receiver = DtmfReceiver::new(DEFAULT_CLOCK_RATE_HZ).unwrap();
        receiver.handle_packet(0, 42, event(4, true, 800));
        receiver.handle_packet(1, 42, event(4, true, 800));
        receiver.handle_packet(2, 42, event(4, false, 640));
        assert_eq!(chars_of(&digits_of(&mut receiver)), "4");
        assert_eq!(receiver.next_deadline(), None);
    }

    #[test]
    fn receiver_follows_timestamps_across_the_wrap() {
        let mut receiver = DtmfReceiver::new(DEFAULT_CLOCK_RATE_HZ).unwrap();
        let digits = parse_digits("908").unwrap();
        let mut sender =
            DtmfSender::new(digits, DEFAULT_CLOCK_RATE_HZ, 0, u32::MAX - 1_000).unwrap();
        for (now, p) in drain(&mut sender) {
            receiver.handle_packet(now, p.timestamp, p.event);
        }
        assert_eq!(chars_of(&digits_of(&mut receiver)), "908");
    }

    #[test]
    fn receiver_treats_a_big_step_back_as_a_restarted_stream() {
        let mut receiver = DtmfReceiver::new(DEFAULT_CLOCK_RATE_HZ).unwrap();
        receiver.handle_packet(0, 1_000_000, event(1, true, 800));
        // Within the reorder window: a stray from before, ignored.
        receiver.handle_packet(10, 1_000_000 - 1_280, event(2, true, 800));
        // Far behind: the remote restarted its timestamps.
        receiver.handle_packet(20, 500, event(3, true, 800));
        assert_eq!(chars_of(&digits_of(&mut receiver)), "13");
    }

    #[test]
    fn receiver_ignores_non_dtmf_events_but_lets_them_close_a_digit() {
        let mut receiver = DtmfReceiver::new(DEFAULT_CLOCK_RATE_HZ).unwrap();
        receiver.handle_packet(0, 100, event(6, false, 160));
        receiver.handle_packet(20, 1_380, event(36, true, 800));
        let heard = digits_of(&mut receiver);
        assert_eq!(chars_of(&heard), "6");
        assert!(!heard[0].end_seen);
    }

    #[test]
    fn receiver_joins_segments_of_one_long_event() {
        let mut receiver = DtmfReceiver::new(DEFAULT_CLOCK_RATE_HZ).unwrap();
        receiver.handle_packet(0, 10, event(0, false, 0xFFFF));
        receiver.handle_packet(20, 10 + 0xFFFF, event(0, false, 160));
        receiver.handle_packet(40, 10 + 0xFFFF, event(0, true, 320));
        let heard = digits_of(&mut receiver);
        assert_eq!(chars_of(&heard), "0");
        assert!(heard[0].end_seen);
    }

    #[test]
    fn receiver_reset_forgets_the_old_stream() {
        let mut receiver = DtmfReceiver::new(DEFAULT_CLOCK_RATE_HZ).unwrap();
        receiver.handle_packet(0, 9_000, event(7, true, 800));
        receiver.reset();
        receiver.handle_packet(10, 8_000, event(8, true, 800));
        assert_eq!(chars_of(&digits_of(&mut receiver)), "78");
        assert!(DtmfReceiver::new(0).is_err());
    }

    #[test]
    fn errors_display_clearly() {
        let cases = [
            (DtmfError::NoDigits, "no DTMF digits"),
            (DtmfError::TooManyDigits { max: 64 }, "at most 64"),
            (DtmfError::InvalidConfig { reason: "why" }, "why"),
        ];
        for (error, needle) in cases {
            let text = error.to_string();
            assert!(text.contains(needle), "{text}");
            let _: &dyn std::error::Error = &error;
        }
    }
}
