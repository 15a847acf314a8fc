//! SDP offer/answer for the one audio stream of a SIP trunk call, sans-IO: a lenient parser
//! for what carriers send (RFC 8866 syntax), the negotiation that turns a remote description
//! into the one codec, address, port and direction the RTP edge uses (RFC 3264 rules), and the
//! writers for our offer and our answer.
//!
//! Parsing forgives on purpose. Carrier switches and SBCs send odd line endings, unknown line
//! types, vendor attributes and now and then a malformed line; refusing a whole call over a
//! line we would have ignored anyway fails calls that would have worked. So a line we cannot
//! read is skipped, and only "nothing usable" is an error: no audio stream, no address or port
//! for it, or no codec in common.
//!
//! Only plain RTP is spoken (`RTP/AVP`, `RTP/AVPF`). An SRTP audio line (`RTP/SAVP`, ...) is
//! recorded and answered with port 0 but never taken: answering it without keys would set up a
//! call in which the peer discards every packet. Some endpoints offer the same audio twice,
//! SRTP first and plain second, for exactly this case.
//!
//! Telephone events (RFC 4733) share the audio's SSRC and timestamp line, so the
//! `telephone-event` format taken is the one on the chosen codec's clock: 8000 Hz with G.711,
//! 48000 Hz with Opus.

use std::fmt;
use std::net::IpAddr;

/// Larger descriptions are refused before parsing. A one-stream trunk offer is well under
/// 2 KiB; the bound keeps a hostile peer from making us scan megabytes per INVITE.
pub const MAX_SDP_BYTES: usize = 16 * 1024;
/// The `telephone-event` payload type most trunks use, so ours matches theirs when we offer.
pub const DEFAULT_TELEPHONE_EVENT_PT: u8 = 101;
/// The packetisation every trunk accepts for G.711.
pub const DEFAULT_PTIME_MS: u32 = 20;
/// What we offer when told to offer nothing: G.711 is the one thing every trunk must speak.
pub const DEFAULT_CODECS: [Codec; 2] = [Codec::Pcmu, Codec::Pcma];

/// First and last payload type open to `a=rtpmap` assignment (RFC 3551 §3).
const DYNAMIC_PT_FIRST: u8 = 96;
const DYNAMIC_PT_LAST: u8 = 127;
/// Payload types are 7 bits on the wire.
const MAX_PAYLOAD_TYPE: u8 = 127;
/// The payload type browsers and most SBCs give Opus, so ours rarely needs remapping.
const OPUS_PREFERRED_PT: u8 = 111;
/// Where the 48 kHz `telephone-event` that pairs with Opus goes when we offer Opus.
const WIDEBAND_EVENT_PREFERRED_PT: u8 = 110;
/// Events 0-15 are the DTMF keys, 16 is hook flash; trunks expect exactly this range.
const TELEPHONE_EVENT_FMTP: &str = "0-16";
/// In-band FEC lets an Opus receiver rebuild a lost packet from the next one.
const OPUS_FMTP: &str = "useinbandfec=1";
const TELEPHONE_EVENT: &str = "telephone-event";
const G711_CLOCK_RATE_HZ: u32 = 8000;
const OPUS_CLOCK_RATE_HZ: u32 = 48_000;
/// RFC 7587 §7 requires `opus/48000/2` whatever the actual channel count.
const OPUS_RTPMAP_CHANNELS: u32 = 2;

/// Stand-ins written when an offered `m=` line lacks a field, chosen so the rejected line can
/// never read back as a plain-RTP audio stream.
const FALLBACK_MEDIA: &str = "application";
const FALLBACK_PROTO: &str = "UDP";
const FALLBACK_FORMAT: &str = "0";

/// Why a remote description cannot carry the call. Every case is the peer's SDP's doing; the
/// message says which part of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdpError {
    /// The description is larger than [`MAX_SDP_BYTES`].
    TooLarge { len: usize, max: usize },
    /// No `m=audio` line at all.
    NoAudio,
    /// Audio is offered only over a transport we do not speak (SRTP, DTLS, ...).
    UnsupportedTransport { proto: String },
    /// The audio line's port is 0: the stream is disabled (offer) or rejected (answer).
    AudioDisabled,
    /// The audio line's port is not a number from 0 to 65535.
    InvalidPort { value: String },
    /// Neither the audio line nor the session has a `c=` line with an IP address.
    NoConnectionAddress,
    /// None of the audio line's formats is a codec we take. `offered` describes each format
    /// as the peer listed it, `supported` is what we were willing to use.
    NoCommonCodec {
        offered: Vec<String>,
        supported: Vec<Codec>,
    },
}

impl fmt::Display for SdpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SdpError::TooLarge { len, max } => write!(
                f,
                "the peer's SDP is {len} bytes, more than the {max} bytes we accept"
            ),
            SdpError::NoAudio => write!(f, "the peer's SDP has no m=audio line"),
            SdpError::UnsupportedTransport { proto } => write!(
                f,
                "the peer's SDP offers audio only over {proto}; we speak plain RTP \
                 (RTP/AVP or RTP/AVPF)"
            ),
            SdpError::AudioDisabled => write!(
                f,
                "the peer's SDP disables its audio stream (m=audio with port 0)"
            ),
            SdpError::InvalidPort { value } => write!(
                f,
                "the peer's SDP gives m=audio port {value:?}, which is not a number 0-65535"
            ),
            SdpError::NoConnectionAddress => write!(
                f,
                "the peer's SDP has no c= line with an IP address for its audio stream \
                 (missing, or a host name, which we do not resolve)"
            ),
            SdpError::NoCommonCodec { offered, supported } => {
                write!(f, "the peer's SDP lists no audio codec we take: it has [")?;
                write_joined(f, offered)?;
                write!(f, "], we take [")?;
                write_joined(f, supported)?;
                write!(f, "]")
            }
        }
    }
}

impl std::error::Error for SdpError {}

fn write_joined<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            write!(f, ", ")?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

/// An audio codec the gateway can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// G.711 μ-law, static payload type 0.
    Pcmu,
    /// G.711 A-law, static payload type 8.
    Pcma,
    /// Opus, always on a dynamic payload type.
    Opus,
}

impl Codec {
    /// The encoding name as written in `a=rtpmap` (matched without regard to case).
    pub fn encoding_name(self) -> &'static str {
        match self {
            Codec::Pcmu => "PCMU",
            Codec::Pcma => "PCMA",
            Codec::Opus => "opus",
        }
    }

    /// The RTP timestamp clock.
    pub fn clock_rate_hz(self) -> u32 {
        match self {
            Codec::Pcmu | Codec::Pcma => G711_CLOCK_RATE_HZ,
            Codec::Opus => OPUS_CLOCK_RATE_HZ,
        }
    }

    /// The RFC 3551 static payload type, which a peer may use without any `a=rtpmap`.
    pub fn static_payload_type(self) -> Option<u8> {
        match self {
            Codec::Pcmu => Some(0),
            Codec::Pcma => Some(8),
            Codec::Opus => None,
        }
    }

    /// The channel count written in `a=rtpmap`, where the format has one.
    fn rtpmap_channels(self) -> Option<u32> {
        match self {
            Codec::Pcmu | Codec::Pcma => None,
            Codec::Opus => Some(OPUS_RTPMAP_CHANNELS),
        }
    }

    fn from_rtpmap(map: &RtpMap) -> Option<Codec> {
        [Codec::Pcmu, Codec::Pcma, Codec::Opus]
            .into_iter()
            .find(|codec| {
                map.encoding.eq_ignore_ascii_case(codec.encoding_name())
                    && map.clock_rate_hz == codec.clock_rate_hz()
                    // Lenient about an omitted count; a different count is another format.
                    && match (map.channels, codec.rtpmap_channels()) {
                        (None, _) => true,
                        (Some(1), None) => true,
                        (Some(got), Some(want)) => got == want,
                        (Some(_), None) => false,
                    }
            })
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.encoding_name())
    }
}

/// Which way media flows, from the point of view of the side that wrote the description.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Direction {
    /// RFC 3264 §5.1: the default when no direction attribute is present.
    #[default]
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl Direction {
    /// The same flow seen from the other end: what they send, we receive.
    pub fn reverse(self) -> Direction {
        match self {
            Direction::SendOnly => Direction::RecvOnly,
            Direction::RecvOnly => Direction::SendOnly,
            other => other,
        }
    }

    /// Whether the writer of the description sends media.
    pub fn sends(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::SendOnly)
    }

    /// Whether the writer of the description receives media.
    pub fn receives(self) -> bool {
        matches!(self, Direction::SendRecv | Direction::RecvOnly)
    }

    /// Both restrictions at once: what an answer may allow when the peer asks for one flow and
    /// we (say, holding the call ourselves) allow another.
    pub fn intersect(self, other: Direction) -> Direction {
        Direction::from_flags(
            self.sends() && other.sends(),
            self.receives() && other.receives(),
        )
    }

    /// The attribute name, as in `a=sendrecv`.
    pub fn attribute(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }

    fn from_flags(sends: bool, receives: bool) -> Direction {
        match (sends, receives) {
            (true, true) => Direction::SendRecv,
            (true, false) => Direction::SendOnly,
            (false, true) => Direction::RecvOnly,
            (false, false) => Direction::Inactive,
        }
    }

    fn from_attribute(name: &str) -> Option<Direction> {
        [
            Direction::SendRecv,
            Direction::SendOnly,
            Direction::RecvOnly,
            Direction::Inactive,
        ]
        .into_iter()
        .find(|direction| name.eq_ignore_ascii_case(direction.attribute()))
    }
}

/// The `o=` fields that tell one version of a peer's session from the next. Kept as text:
/// they are only ever compared, and some peers exceed 64 bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub username: String,
    pub session_id: String,
    pub session_version: String,
}

/// One `a=rtpmap:<pt> <name>/<clock>[/<channels>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpMap {
    pub payload_type: u8,
    pub encoding: String,
    pub clock_rate_hz: u32,
    pub channels: Option<u32>,
}

/// One `a=fmtp:<pt> <params>`, the parameters kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fmtp {
    pub payload_type: u8,
    pub params: String,
}

/// One `m=` section with the attributes we read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaDescription {
    /// `audio`, `video`, `image`, ... as written.
    pub media: String,
    /// `None` when the port field is not a number; a port count (`49170/2`) is dropped.
    pub port: Option<u16>,
    /// The port field as written, for the error that names it.
    raw_port: String,
    pub proto: String,
    /// Format tokens in the peer's order of preference; payload type numbers for RTP.
    pub formats: Vec<String>,
    /// The media-level `c=` address, which overrides the session's.
    pub connection: Option<IpAddr>,
    /// The media-level direction attribute, which overrides the session's.
    pub direction: Option<Direction>,
    pub ptime_ms: Option<u32>,
    pub rtpmaps: Vec<RtpMap>,
    pub fmtps: Vec<Fmtp>,
}

/// What a payload type stands for in one media section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FormatKind {
    Codec(Codec),
    TelephoneEvent { clock_rate_hz: u32 },
    Other,
}

impl MediaDescription {
    fn new(value: &str) -> MediaDescription {
        let mut tokens = value.split_whitespace();
        let media = tokens.next().unwrap_or_default().to_string();
        let raw_port = tokens.next().unwrap_or_default().to_string();
        // `<port>/<count>` asks for consecutive ports; one audio stream uses the first.
        let port = raw_port
            .split('/')
            .next()
            .and_then(|port| port.parse::<u16>().ok());
        let proto = tokens.next().unwrap_or_default().to_string();
        let formats = tokens.map(str::to_string).collect();
        MediaDescription {
            media,
            port,
            raw_port,
            proto,
            formats,
            connection: None,
            direction: None,
            ptime_ms: None,
            rtpmaps: Vec::new(),
            fmtps: Vec::new(),
        }
    }

    fn is_audio(&self) -> bool {
        self.media.eq_ignore_ascii_case("audio")
    }

    fn is_plain_rtp(&self) -> bool {
        self.proto.eq_ignore_ascii_case("RTP/AVP") || self.proto.eq_ignore_ascii_case("RTP/AVPF")
    }

    /// The `a=rtpmap` for a payload type; the first one wins if a peer repeats itself.
    pub fn rtpmap(&self, payload_type: u8) -> Option<&RtpMap> {
        self.rtpmaps
            .iter()
            .find(|map| map.payload_type == payload_type)
    }

    /// The `a=fmtp` parameters for a payload type.
    pub fn fmtp(&self, payload_type: u8) -> Option<&str> {
        self.fmtps
            .iter()
            .find(|fmtp| fmtp.payload_type == payload_type)
            .map(|fmtp| fmtp.params.as_str())
    }

    /// The formats that are payload type numbers, in the peer's order.
    pub fn payload_types(&self) -> impl Iterator<Item = u8> + '_ {
        self.formats
            .iter()
            .filter_map(|token| parse_payload_type(token))
    }

    fn kind_of(&self, payload_type: u8) -> FormatKind {
        // An explicit mapping beats the static table: it is what the peer says it means.
        if let Some(map) = self.rtpmap(payload_type) {
            if map.encoding.eq_ignore_ascii_case(TELEPHONE_EVENT) {
                return FormatKind::TelephoneEvent {
                    clock_rate_hz: map.clock_rate_hz,
                };
            }
            return Codec::from_rtpmap(map).map_or(FormatKind::Other, FormatKind::Codec);
        }
        [Codec::Pcmu, Codec::Pcma]
            .into_iter()
            .find(|codec| codec.static_payload_type() == Some(payload_type))
            .map_or(FormatKind::Other, FormatKind::Codec)
    }

    fn telephone_event_pt(&self, clock_rate_hz: u32) -> Option<u8> {
        self.payload_types()
            .find(|&pt| self.kind_of(pt) == FormatKind::TelephoneEvent { clock_rate_hz })
    }

    fn describe_formats(&self) -> Vec<String> {
        self.formats
            .iter()
            .map(|token| {
                let Some(pt) = parse_payload_type(token) else {
                    return token.clone();
                };
                match (self.rtpmap(pt), static_format_name(pt)) {
                    (Some(map), _) => match map.channels {
                        Some(channels) => {
                            format!("{pt} {}/{}/{channels}", map.encoding, map.clock_rate_hz)
                        }
                        None => format!("{pt} {}/{}", map.encoding, map.clock_rate_hz),
                    },
                    (None, Some(name)) => format!("{pt} {name}"),
                    (None, None) => token.clone(),
                }
            })
            .collect()
    }
}

/// Names of the static payload types trunks still list, so a "no common codec" error says
/// `18 G729/8000` rather than a bare `18` (RFC 3551 table 4).
fn static_format_name(payload_type: u8) -> Option<&'static str> {
    match payload_type {
        0 => Some("PCMU/8000"),
        3 => Some("GSM/8000"),
        4 => Some("G723/8000"),
        8 => Some("PCMA/8000"),
        9 => Some("G722/8000"),
        13 => Some("CN/8000"),
        18 => Some("G729/8000"),
        _ => None,
    }
}

fn parse_payload_type(token: &str) -> Option<u8> {
    token
        .parse::<u8>()
        .ok()
        .filter(|&pt| pt <= MAX_PAYLOAD_TYPE)
}

/// A parsed description: the session-level fields we read and every `m=` section in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionDescription {
    pub origin: Option<Origin>,
    /// The session-level `c=` address, the default for every media section.
    pub connection: Option<IpAddr>,
    /// The session-level direction attribute, the default for every media section.
    pub direction: Option<Direction>,
    pub media: Vec<MediaDescription>,
}

/// The remote end of the call's audio as negotiated: where to send, in what, and whether to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAudio {
    pub addr: IpAddr,
    pub port: u16,
    pub codec: Codec,
    /// The payload type the peer uses for `codec`, which may not be its static one.
    pub codec_pt: u8,
    /// The payload type of `telephone-event` on the codec's clock, if the peer lists one.
    pub telephone_event_pt: Option<u8>,
    /// The peer's direction, narrowed to what it can actually do: a legacy `0.0.0.0` hold
    /// cannot receive, whatever its attribute says.
    pub direction: Direction,
    pub ptime_ms: Option<u32>,
    /// The peer has put the call on hold (`sendonly`, `inactive` or `c=` 0.0.0.0).
    pub on_hold: bool,
}

/// Our end of the call's audio, from which offers and answers are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAudio {
    pub addr: IpAddr,
    pub port: u16,
    /// The `o=` session id: fixed for the life of the call.
    pub session_id: u64,
    /// The `o=` version: raise it whenever our description changes (RFC 3264 §8), keep it
    /// when re-sending the same one, or the peer renegotiates for nothing.
    pub session_version: u64,
    /// What we offer, most preferred first; an empty list offers [`DEFAULT_CODECS`].
    pub codecs: Vec<Codec>,
    /// The 8 kHz `telephone-event` payload type we offer; a value that is not dynamic or
    /// clashes with a codec is replaced by a free dynamic one.
    pub telephone_event_pt: u8,
    /// Our preferred packetisation; 0 leaves `a=ptime` out.
    pub ptime_ms: u32,
    /// What we allow; anything but `SendRecv` is us holding the call.
    pub direction: Direction,
}

impl LocalAudio {
    /// Our audio at `addr:port` with G.711 both laws, DTMF on 101, 20 ms packets, send and
    /// receive, and version 1 of session `session_id`.
    pub fn new(addr: IpAddr, port: u16, session_id: u64) -> LocalAudio {
        LocalAudio {
            addr,
            port,
            session_id,
            session_version: 1,
            codecs: DEFAULT_CODECS.to_vec(),
            telephone_event_pt: DEFAULT_TELEPHONE_EVENT_PT,
            ptime_ms: DEFAULT_PTIME_MS,
            direction: Direction::SendRecv,
        }
    }
}

/// Reads a description, skipping every line it cannot make sense of. Fails only on size.
pub fn parse(text: &str) -> Result<SessionDescription, SdpError> {
    if text.len() > MAX_SDP_BYTES {
        return Err(SdpError::TooLarge {
            len: text.len(),
            max: MAX_SDP_BYTES,
        });
    }
    let mut session = SessionDescription::default();
    // Splitting on '\n' and trimming takes CRLF, bare LF and stray spaces alike.
    for line in text.split('\n').map(str::trim) {
        let Some((kind, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        match kind {
            "m" => session.media.push(MediaDescription::new(value)),
            "c" => {
                let Some(addr) = parse_connection(value) else {
                    continue;
                };
                let slot = match session.media.last_mut() {
                    Some(media) => &mut media.connection,
                    None => &mut session.connection,
                };
                // One c= per level is the rule; the first is kept if a peer repeats it.
                if slot.is_none() {
                    *slot = Some(addr);
                }
            }
            "o" if session.media.is_empty() && session.origin.is_none() => {
                session.origin = parse_origin(value);
            }
            "a" => parse_attribute(value, &mut session),
            _ => {}
        }
    }
    Ok(session)
}

/// `IN IP4 <addr>` or `IN IP6 <addr>`, with any multicast `/ttl/count` dropped. A host name
/// yields `None`: resolving it would be I/O, and trunks send literals.
fn parse_connection(value: &str) -> Option<IpAddr> {
    let mut tokens = value.split_whitespace();
    let network = tokens.next()?;
    let address_type = tokens.next()?;
    let address = tokens.next()?;
    if !network.eq_ignore_ascii_case("IN")
        || !(address_type.eq_ignore_ascii_case("IP4") || address_type.eq_ignore_ascii_case("IP6"))
    {
        return None;
    }
    address.split('/').next()?.parse().ok()
}

fn parse_origin(value: &str) -> Option<Origin> {
    let mut tokens = value.split_whitespace();
    Some(Origin {
        username: tokens.next()?.to_string(),
        session_id: tokens.next()?.to_string(),
        session_version: tokens.next()?.to_string(),
    })
}

fn parse_attribute(value: &str, session: &mut SessionDescription) {
    let (name, argument) = match value.split_once(':') {
        Some((name, argument)) => (name.trim(), argument.trim()),
        None => (value, ""),
    };
    if let Some(direction) = Direction::from_attribute(name) {
        let slot = match session.media.last_mut() {
            Some(media) => &mut media.direction,
            None => &mut session.direction,
        };
        if slot.is_none() {
            *slot = Some(direction);
        }
        return;
    }
    // The rest only mean something inside a media section.
    let Some(media) = session.media.last_mut() else {
        return;
    };
    if name.eq_ignore_ascii_case("rtpmap") {
        if let Some(map) = parse_rtpmap(argument) {
            media.rtpmaps.push(map);
        }
    } else if name.eq_ignore_ascii_case("fmtp") {
        if let Some(fmtp) = parse_fmtp(argument) {
            media.fmtps.push(fmtp);
        }
    } else if name.eq_ignore_ascii_case("ptime") && media.ptime_ms.is_none() {
        media.ptime_ms = argument.parse::<u32>().ok().filter(|&ms| ms > 0);
    }
}

fn parse_rtpmap(argument: &str) -> Option<RtpMap> {
    let (payload_type, encoding) = argument.split_once(char::is_whitespace)?;
    let mut parts = encoding.trim().split('/');
    let name = parts.next()?.trim();
    let clock_rate_hz = parts.next()?.trim().parse().ok()?;
    let channels = match parts.next() {
        Some(channels) => Some(channels.trim().parse().ok()?),
        None => None,
    };
    if name.is_empty() || parts.next().is_some() {
        return None;
    }
    Some(RtpMap {
        payload_type: parse_payload_type(payload_type)?,
        encoding: name.to_string(),
        clock_rate_hz,
        channels,
    })
}

fn parse_fmtp(argument: &str) -> Option<Fmtp> {
    let (payload_type, params) = match argument.split_once(char::is_whitespace) {
        Some((payload_type, params)) => (payload_type, params.trim()),
        None => (argument, ""),
    };
    Some(Fmtp {
        payload_type: parse_payload_type(payload_type)?,
        params: params.to_string(),
    })
}

impl SessionDescription {
    /// The audio stream we take and its index among the `m=` lines (the answer must answer it
    /// at that position): the first `m=audio` over plain RTP.
    pub fn audio_stream(&self) -> Result<(usize, &MediaDescription), SdpError> {
        let mut first_other_proto = None;
        for (index, media) in self.media.iter().enumerate() {
            if !media.is_audio() {
                continue;
            }
            if media.is_plain_rtp() {
                return Ok((index, media));
            }
            first_other_proto.get_or_insert_with(|| media.proto.clone());
        }
        Err(match first_other_proto {
            Some(proto) => SdpError::UnsupportedTransport { proto },
            None => SdpError::NoAudio,
        })
    }

    /// Negotiates a remote OFFER: the first codec in `preference` (ours) that the offer lists
    /// anywhere, on the offerer's payload type for it.
    pub fn negotiate(&self, preference: &[Codec]) -> Result<RemoteAudio, SdpError> {
        self.negotiate_with(preference, |media| {
            preference.iter().find_map(|&wanted| {
                media
                    .payload_types()
                    .find(|&pt| media.kind_of(pt) == FormatKind::Codec(wanted))
                    .map(|pt| (wanted, pt))
            })
        })
    }

    /// Reads the remote ANSWER to an offer of ours that listed `offered`: the codec the
    /// answerer put first among those, since RFC 3264 §6.1 makes its order the one that counts
    /// and it will send the first one it listed.
    pub fn negotiate_answer(&self, offered: &[Codec]) -> Result<RemoteAudio, SdpError> {
        self.negotiate_with(offered, |media| {
            media
                .payload_types()
                .find_map(|pt| match media.kind_of(pt) {
                    FormatKind::Codec(codec) if offered.contains(&codec) => Some((codec, pt)),
                    _ => None,
                })
        })
    }

    fn negotiate_with(
        &self,
        supported: &[Codec],
        choose: impl Fn(&MediaDescription) -> Option<(Codec, u8)>,
    ) -> Result<RemoteAudio, SdpError> {
        let (_, media) = self.audio_stream()?;
        let port = match media.port {
            Some(0) => return Err(SdpError::AudioDisabled),
            Some(port) => port,
            None => {
                return Err(SdpError::InvalidPort {
                    value: media.raw_port.clone(),
                })
            }
        };
        let addr = media
            .connection
            .or(self.connection)
            .ok_or(SdpError::NoConnectionAddress)?;
        let (codec, codec_pt) = choose(media).ok_or_else(|| SdpError::NoCommonCodec {
            offered: media.describe_formats(),
            supported: supported.to_vec(),
        })?;
        let declared = media
            .direction
            .or(self.direction)
            .unwrap_or(Direction::SendRecv);
        // RFC 2543 hold: "send me nothing" by address rather than by attribute (RFC 3264 §8.4).
        let direction = if addr.is_unspecified() {
            declared.intersect(Direction::SendOnly)
        } else {
            declared
        };
        Ok(RemoteAudio {
            addr,
            port,
            codec,
            codec_pt,
            telephone_event_pt: media.telephone_event_pt(codec.clock_rate_hz()),
            direction,
            ptime_ms: media.ptime_ms,
            on_hold: !direction.receives(),
        })
    }
}

/// The audio section of one description of ours.
struct AudioSection<'a> {
    port: u16,
    proto: &'a str,
    codecs: Vec<(Codec, u8)>,
    /// (payload type, clock) of each `telephone-event` format.
    telephone_events: Vec<(u8, u32)>,
    ptime_ms: u32,
    direction: Direction,
}

/// Our offer of one audio stream.
pub fn offer(params: &LocalAudio) -> String {
    let mut codecs: Vec<Codec> = Vec::new();
    for &codec in &params.codecs {
        if !codecs.contains(&codec) {
            codecs.push(codec);
        }
    }
    if codecs.is_empty() {
        codecs = DEFAULT_CODECS.to_vec();
    }
    let mut used: Vec<u8> = codecs
        .iter()
        .filter_map(|codec| codec.static_payload_type())
        .collect();
    // Events first, so a configured telephone-event PT is honoured before Opus takes a slot.
    let mut telephone_events: Vec<(u8, u32)> = Vec::new();
    for codec in &codecs {
        let clock = codec.clock_rate_hz();
        if telephone_events.iter().any(|&(_, taken)| taken == clock) {
            continue;
        }
        let preferred = if clock == G711_CLOCK_RATE_HZ {
            params.telephone_event_pt
        } else {
            WIDEBAND_EVENT_PREFERRED_PT
        };
        telephone_events.push((allocate_payload_type(&mut used, preferred), clock));
    }
    let codecs = codecs
        .iter()
        .map(|&codec| {
            let pt = codec
                .static_payload_type()
                .unwrap_or_else(|| allocate_payload_type(&mut used, OPUS_PREFERRED_PT));
            (codec, pt)
        })
        .collect();
    let mut out = String::new();
    write_session_header(&mut out, params);
    write_audio_section(
        &mut out,
        &AudioSection {
            port: params.port,
            proto: "RTP/AVP",
            codecs,
            telephone_events,
            ptime_ms: params.ptime_ms,
            direction: params.direction,
        },
    );
    out
}

/// `preferred` if it is dynamic and free, else the lowest free dynamic payload type. At most
/// five of the 32 are ever taken, so one is always free.
fn allocate_payload_type(used: &mut Vec<u8>, preferred: u8) -> u8 {
    let free = |pt: &u8| !used.contains(pt);
    let pt = if (DYNAMIC_PT_FIRST..=DYNAMIC_PT_LAST).contains(&preferred) && free(&preferred) {
        preferred
    } else {
        (DYNAMIC_PT_FIRST..=DYNAMIC_PT_LAST)
            .find(free)
            .unwrap_or(DYNAMIC_PT_LAST)
    };
    used.push(pt);
    pt
}

/// Our answer to `offer`, whose audio was negotiated into `chosen`: every offered `m=` line
/// answered in order, the audio one with the single chosen codec on the offerer's payload
/// type (plus its `telephone-event`, so DTMF survives), every other one rejected with port 0.
pub fn answer(offer: &SessionDescription, chosen: &RemoteAudio, local: &LocalAudio) -> String {
    let audio_index = offer.audio_stream().ok().map(|(index, _)| index);
    let mut out = String::new();
    write_session_header(&mut out, local);
    for (index, media) in offer.media.iter().enumerate() {
        if Some(index) == audio_index {
            write_audio_section(
                &mut out,
                &AudioSection {
                    port: local.port,
                    proto: &media.proto,
                    codecs: vec![(chosen.codec, chosen.codec_pt)],
                    telephone_events: chosen
                        .telephone_event_pt
                        .map(|pt| (pt, chosen.codec.clock_rate_hz()))
                        .into_iter()
                        .collect(),
                    ptime_ms: local.ptime_ms,
                    direction: chosen.direction.reverse().intersect(local.direction),
                },
            );
        } else {
            write_rejected(&mut out, media);
        }
    }
    out
}

fn push_line(out: &mut String, line: &str) {
    out.push_str(line);
    out.push_str("\r\n");
}

fn address_type(addr: IpAddr) -> &'static str {
    match addr {
        IpAddr::V4(_) => "IP4",
        IpAddr::V6(_) => "IP6",
    }
}

fn write_session_header(out: &mut String, local: &LocalAudio) {
    let address_type = address_type(local.addr);
    push_line(out, "v=0");
    push_line(
        out,
        &format!(
            "o=- {} {} IN {address_type} {}",
            local.session_id, local.session_version, local.addr
        ),
    );
    push_line(out, "s=-");
    push_line(out, &format!("c=IN {address_type} {}", local.addr));
    push_line(out, "t=0 0");
}

fn write_audio_section(out: &mut String, section: &AudioSection<'_>) {
    let mut m_line = format!("m=audio {} {}", section.port, section.proto);
    let payload_types = section
        .codecs
        .iter()
        .map(|&(_, pt)| pt)
        .chain(section.telephone_events.iter().map(|&(pt, _)| pt));
    for pt in payload_types {
        m_line.push_str(&format!(" {pt}"));
    }
    push_line(out, &m_line);
    for &(codec, pt) in &section.codecs {
        let name = codec.encoding_name();
        let clock = codec.clock_rate_hz();
        match codec.rtpmap_channels() {
            Some(channels) => push_line(out, &format!("a=rtpmap:{pt} {name}/{clock}/{channels}")),
            None => push_line(out, &format!("a=rtpmap:{pt} {name}/{clock}")),
        }
        if codec == Codec::Opus {
            push_line(out, &format!("a=fmtp:{pt} {OPUS_FMTP}"));
        }
    }
    for &(pt, clock) in &section.telephone_events {
        push_line(out, &format!("a=rtpmap:{pt} {TELEPHONE_EVENT}/{clock}"));
        push_line(out, &format!("a=fmtp:{pt} {TELEPHONE_EVENT_FMTP}"));
    }
    if section.ptime_ms > 0 {
        push_line(out, &format!("a=ptime:{}", section.ptime_ms));
    }
    push_line(out, &format!("a={}", section.direction.attribute()));
}

/// RFC 3264 §6: port 0 rejects the stream; the formats are ignored but at least one must be
/// present, so the offered ones are echoed.
fn write_rejected(out: &mut String, media: &MediaDescription) {
    let media_name = non_empty_or(&media.media, FALLBACK_MEDIA);
    let proto = non_empty_or(&media.proto, FALLBACK_PROTO);
    let formats = if media.formats.is_empty() {
        FALLBACK_FORMAT.to_string()
    } else {
        media.formats.join(" ")
    };
    push_line(out, &format!("m={media_name} 0 {proto} {formats}"));
}

fn non_empty_or<'a>(value: &'a str, fallback: &'a str) -> &'a str {
    if value.is_empty() {
        fallback
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Joins lines with CRLF, as a trunk sends them.
    fn crlf(lines: &[&str]) -> String {
        lines.iter().map(|line| format!("{line}\r\n")).collect()
    }

    fn lf(lines: &[&str]) -> String {
        lines.iter().map(|line| format!("{line}\n")).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse()
            .unwrap_or_else(|_| panic!("bad test address {text}"))
    }

    fn local() -> LocalAudio {
        LocalAudio::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)), 40_000, 4242)
    }

    fn parsed(text: &str) -> SessionDescription {
        parse(text).unwrap_or_else(|error| panic!("parse failed: {error}"))
    }

    fn negotiated(text: &str, preference: &[Codec]) -> RemoteAudio {
        parsed(text)
            .negotiate(preference)
            .unwrap_or_else(|error| panic!("negotiate failed: {error}"))
    }

    fn lines_of(text: &str) -> Vec<&str> {
        text.split("\r\n").filter(|line| !line.is_empty()).collect()
    }

    /// sipp's built-in uac scenario, minus the rtpmap a bare static PT does not need.
    const SIPP_UAC_OFFER: &[&str] = &[
        "v=0",
        "o=user1 53655765 2353687637 IN IP4 127.0.1.1",
        "s=-",
        "c=IN IP4 127.0.1.1",
        "t=0 0",
        "m=audio 6000 RTP/AVP 0",
    ];

    /// A European carrier: A-law first, DTMF on 96, comfort noise, vendor attributes.
    const CARRIER_PCMA_OFFER: &[&str] = &[
        "v=0",
        "o=SBC 1681912245 1681912246 IN IP4 198.51.100.20",
        "s=SBC call",
        "c=IN IP4 198.51.100.20",
        "t=0 0",
        "m=audio 17228 RTP/AVP 8 0 18 96 13",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:18 G729/8000",
        "a=fmtp:18 annexb=no",
        "a=rtpmap:96 telephone-event/8000",
        "a=fmtp:96 0-15",
        "a=rtpmap:13 CN/8000",
        "a=ptime:20",
        "a=maxptime:40",
        "a=sendrecv",
        "a=X-vendor-thing:yes",
    ];

    const OPUS_OFFER: &[&str] = &[
        "v=0",
        "o=- 7 7 IN IP4 192.0.2.9",
        "s=-",
        "c=IN IP4 192.0.2.9",
        "t=0 0",
        "m=audio 30000 RTP/AVP 107 0 98 101",
        "a=rtpmap:107 opus/48000/2",
        "a=fmtp:107 minptime=10;useinbandfec=1",
        "a=rtpmap:98 telephone-event/48000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
    ];

    // --- parsing and negotiating offers ---

    #[test]
    fn sipp_default_offer_negotiates_pcmu_without_rtpmap() {
        let remote = negotiated(&crlf(SIPP_UAC_OFFER), &[Codec::Pcmu, Codec::Pcma]);
        assert_eq!(
            remote,
            RemoteAudio {
                addr: ip("127.0.1.1"),
                port: 6000,
                codec: Codec::Pcmu,
                codec_pt: 0,
                telephone_event_pt: None,
                direction: Direction::SendRecv,
                ptime_ms: None,
                on_hold: false,
            }
        );
    }

    #[test]
    fn our_preference_wins_over_the_offer_order() {
        let offer = crlf(CARRIER_PCMA_OFFER);
        assert_eq!(
            negotiated(&offer, &[Codec::Pcmu, Codec::Pcma]).codec,
            Codec::Pcmu
        );
        assert_eq!(
            negotiated(&offer, &[Codec::Pcma, Codec::Pcmu]).codec,
            Codec::Pcma
        );
    }

    #[test]
    fn telephone_event_is_found_by_rtpmap_on_any_dynamic_pt() {
        let remote = negotiated(&crlf(CARRIER_PCMA_OFFER), &[Codec::Pcma]);
        assert_eq!(remote.telephone_event_pt, Some(96));
        assert_eq!(remote.ptime_ms, Some(20));
        assert_eq!(remote.addr, ip("198.51.100.20"));
        assert_eq!(remote.port, 17228);
    }

    #[test]
    fn opus_is_taken_on_its_dynamic_pt_with_the_48k_telephone_event() {
        let remote = negotiated(&crlf(OPUS_OFFER), &[Codec::Opus, Codec::Pcmu]);
        assert_eq!(remote.codec, Codec::Opus);
        assert_eq!(remote.codec_pt, 107);
        assert_eq!(remote.telephone_event_pt, Some(98));
    }

    #[test]
    fn g711_from_a_mixed_offer_takes_the_8k_telephone_event() {
        let remote = negotiated(&crlf(OPUS_OFFER), &[Codec::Pcmu]);
        assert_eq!((remote.codec, remote.codec_pt), (Codec::Pcmu, 0));
        assert_eq!(remote.telephone_event_pt, Some(101));
    }

    #[test]
    fn opus_without_a_48k_telephone_event_has_no_dtmf_pt() {
        // An 8 kHz event clock on a 48 kHz SSRC would put digits at the wrong time.
        let offer = crlf(&[
            "c=IN IP4 192.0.2.9",
            "m=audio 30000 RTP/AVP 107 101",
            "a=rtpmap:107 opus/48000/2",
            "a=rtpmap:101 telephone-event/8000",
        ]);
        assert_eq!(negotiated(&offer, &[Codec::Opus]).telephone_event_pt, None);
    }

    #[test]
    fn dynamic_pt_without_rtpmap_is_not_a_codec() {
        let offer = crlf(&["c=IN IP4 192.0.2.1", "m=audio 4000 RTP/AVP 111 8"]);
        let remote = negotiated(&offer, &[Codec::Opus, Codec::Pcma]);
        assert_eq!((remote.codec, remote.codec_pt), (Codec::Pcma, 8));
    }

    #[test]
    fn rtpmap_names_match_without_case_and_may_remap_static_codecs() {
        let offer = crlf(&[
            "c=IN IP4 192.0.2.1",
            "m=audio 4000 RTP/AVP 99 100",
            "a=rtpmap:99 pcmu/8000",
            "a=rtpmap:100 TELEPHONE-EVENT/8000",
        ]);
        let remote = negotiated(&offer, &[Codec::Pcmu]);
        assert_eq!((remote.codec, remote.codec_pt), (Codec::Pcmu, 99));
        assert_eq!(remote.telephone_event_pt, Some(100));
    }

    #[test]
    fn rtpmap_with_a_wrong_clock_is_another_format() {
        let offer = crlf(&[
            "c=IN IP4 192.0.2.1",
            "m=audio 4000 RTP/AVP 96 0",
            "a=rtpmap:96 opus/16000/2",
        ]);
        assert_eq!(
            negotiated(&offer, &[Codec::Opus, Codec::Pcmu]).codec,
            Codec::Pcmu
        );
    }

    #[test]
    fn rtpmap_for_a_pt_not_in_the_m_line_is_ignored() {
        let offer = crlf(&[
            "c=IN IP4 192.0.2.1",
            "m=audio 4000 RTP/AVP 0",
            "a=rtpmap:101 telephone-event/8000",
        ]);
        assert_eq!(negotiated(&offer, &[Codec::Pcmu]).telephone_event_pt, None);
    }

    #[test]
    fn media_level_connection_overrides_the_session() {
        let offer = crlf(&[
            "c=IN IP4 192.0.2.1",
            "m=audio 4000 RTP/AVP 0",
            "c=IN IP4 192.0.2.2",
        ]);
        assert_eq!(negotiated(&offer, &[Codec::Pcmu]).addr, ip("192.0.2.2"));
    }

    #[test]
    fn connection_may_be_media_level_only_and_ipv6() {
        let offer = crlf(&["m=audio 4000 RTP/AVP 0", "c=IN IP6 2001:db8::7"]);
        assert_eq!(negotiated(&offer, &[Codec::Pcmu]).addr, ip("2001:db8::7"));
    }

    #[test]
    fn multicast_ttl_and_port_count_suffixes_are_dropped() {
        let offer = crlf(&["c=IN IP4 233.252.0.1/127", "m=audio 4000/2 RTP/AVP 0"]);
        let remote = negotiated(&offer, &[Codec::Pcmu]);
        assert_eq!((remote.addr, remote.port), (ip("233.252.0.1"), 4000));
    }

    #[test]
    fn avpf_audio_is_plain_rtp_enough() {
        let offer = crlf(&["c=IN IP4 192.0.2.1", "m=audio 4000 RTP/AVPF 8"]);
        assert_eq!(negotiated(&offer, &[Codec::Pcma]).codec, Codec::Pcma);
    }

    #[test]
    fn plain_audio_after_an_srtp_duplicate_is_taken() {
        let offer = crlf(&[
            "c=IN IP4 192.0.2.1",
            "m=audio 4000 RTP/SAVP 0",
            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz",
            "m=audio 4002 RTP/AVP 0",
        ]);
        assert_eq!(negotiated(&offer, &[Codec::Pcmu]).port, 4002);
    }

    #[test]
    fn origin_session_id_and_version_are_kept() {
        let session = parsed(&crlf(SIPP_UAC_OFFER));
        assert_eq!(
            session.origin,
            Some(Origin {
                username: "user1".to_string(),
                session_id: "53655765".to_string(),
                session_version: "2353687637".to_string(),
            })
        );
    }

    #[test]
    fn parsed_view_keeps_every_m_line_with_its_formats_and_attributes() {
        let session = parsed(&crlf(&[
            "c=IN IP4 192.0.2.1",
            "m=video 5000 RTP/AVP 31",
            "m=audio 4000 RTP/AVP 0 96",
            "a=rtpmap:96 telephone-event/8000",
            "a=fmtp:96 0-15",
            "m=image 6000 udptl t38",
        ]));
        let kinds: Vec<&str> = session.media.iter().map(|m| m.media.as_str()).collect();
        assert_eq!(kinds, ["video", "audio", "image"]);
        assert_eq!(session.media[2].formats, ["t38"]);
        assert_eq!(session.media[1].fmtp(96), Some("0-15"));
        assert_eq!(
            session.media[1].payload_types().collect::<Vec<_>>(),
            [0, 96]
        );
        assert_eq!(session.media[0].rtpmap(96), None);
    }

    // --- hold and direction ---

    #[test]
    fn sendonly_offer_is_hold_and_answered_recvonly() {
        let offer = crlf(&["c=IN IP4 192.0.2.1", "m=audio 4000 RTP/AVP 0", "a=sendonly"]);
        let session = parsed(&offer);
        let remote = negotiated(&offer, &[Codec::Pcmu]);
        assert!(remote.on_hold);
        assert_eq!(remote.direction, Direction::SendOnly);
        assert!(answer(&session, &remote, &local()).contains("\r\na=recvonly\r\n"));
    }

    #[test]
    fn inactive_offer_is_hold_and_answered_inactive() {
        let offer = crlf(&["c=IN IP4 192.0.2.1", "m=audio 4000 RTP/AVP 0", "a=inactive"]);
        let remote = negotiated(&offer, &[Codec::Pcmu]);
        assert!(remote.on_hold);
        assert!(answer(&parsed(&offer), &remote, &local()).contains("\r\na=inactive\r\n"));
    }

    #[test]
    fn legacy_zero_address_is_hold_and_answered_recvonly() {
        let offer = crlf(&["c=IN IP4 0.0.0.0", "m=audio 4000 RTP/AVP 0", "a=sendrecv"]);
        let remote = negotiated(&offer, &[Codec::Pcmu]);
        assert!(remote.on_hold);
        assert_eq!(remote.direction, Direction::SendOnly);
        assert!(answer(&parsed(&offer), &remote, &local()).contains("\r\na=recvonly\r\n"));
    }

    #[test]
    fn recvonly_offer_is_not_hold_and_answered_sendonly() {
        // The peer asks only to listen (we are the ones holding); it still receives.
        let offer = crlf(&["c=IN IP4 192.0.2.1", "m=audio 4000 RTP/AVP 0", "a=recvonly"]);
        let remote = negotiated(&offer, &[Codec::Pcmu]);
        assert!(!remote.on_hold);
        assert!(answer(&parsed(&offer), &remote, &local()).contains("\r\na=sendonly\r\n"));
    }

    #[test]
    fn resuming_from_hold_is_sendrecv_again() {
        let offer = crlf(&["c=IN IP4 192.0.2.1", "m=audio 4000 RTP/AVP 0", "a=sendrecv"]);
        let remote = negotiated(&offer, &[Codec::Pcmu]);
        assert!(!remote.on_hold);
        assert!(answer(&parsed(&offer), &remote, &local()).contains("\r\na=sendrecv\r\n"));
    }

    #[test]
    fn media_direction_overrides_the_session_direction() {
        let offer = crlf(&[
            "c=IN IP4 192.0.2.1",
            "a=sendonly",
            "m=audio 4000 RTP/AVP 0",
            "a=sendrecv",
        ]);
        assert_eq!(
            negotiated(&offer, &[Codec::Pcmu]).direction,
            Direction::SendRecv
        );
    }

    #[test]
    fn session_direction_applies_when_media_has_none() {
        let offer = crlf(&["c=IN IP4 192.0.2.1", "a=sendonly", "m=audio 4000 RTP/AVP 0"]);
        assert!(negotiated(&offer, &[Codec::Pcmu]).on_hold);
    }

    #[test]
    fn answer_when_we_hold_narrows_the_mirrored_direction() {
        let offer = crlf(SIPP_UAC_OFFER);
        let remote = negotiated(&offer, &[Codec::Pcmu]);
        let mut ours = local();
        ours.direction = Direction::SendOnly;
        assert!(answer(&parsed(&offer), &remote, &ours).contains("\r\na=sendonly\r\n"));
    }

    #[test]
    fn direction_reverse_and_intersect() {
        use Direction::*;
        assert_eq!(SendOnly.reverse(), RecvOnly);
        assert_eq!(RecvOnly.reverse(), SendOnly);
        assert_eq!(SendRecv.reverse(), SendRecv);
        assert_eq!(Inactive.reverse(), Inactive);
        assert_eq!(SendRecv.intersect(SendOnly), SendOnly);
        assert_eq!(RecvOnly.intersect(SendOnly), Inactive);
        assert_eq!(SendRecv.intersect(SendRecv), SendRecv);
        assert_eq!(RecvOnly.intersect(SendRecv), RecvOnly);
    }

    // --- leniency ---

    #[test]
    fn crlf_lf_and_mixed_line_ends_parse_the_same() {
        let with_crlf = parsed(&crlf(CARRIER_PCMA_OFFER));
        let with_lf = parsed(&lf(CARRIER_PCMA_OFFER));
        let mixed: String = CARRIER_PCMA_OFFER
            .iter()
            .enumerate()
            .map(|(i, line)| format!("{line}{}", if i % 2 == 0 { "\r\n" } else { "\n" }))
            .collect();
        assert_eq!(with_crlf, with_lf);
        assert_eq!(with_crlf, parsed(&mixed));
        // No final line end at all.
        assert_eq!(with_crlf, parsed(CARRIER_PCMA_OFFER.join("\r\n").as_str()));
    }

    #[test]
    fn junk_and_malformed_lines_are_skipped() {
        let offer = crlf(&[
            "v=0",
            "this is not sdp",
            "=",
            "x=unknown line type",
            "c=IN IP4 not-an-address",
            "c=IN IP4 192.0.2.1",
            "c=IN IP4 192.0.2.99",
            "k=clear:secret",
            "m=audio 4000 RTP/AVP 0 101 junk",
            "a=rtpmap:xx PCMU/8000",
            "a=rtpmap:101",
            "a=rtpmap:101 telephone-event/notaclock",
            "a=rtpmap:200 PCMU/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:",
            "a=ptime:abc",
            "a=ptime:30",
            "a=",
            "a=sendrecv:extra",
            "  a=recvonly  ",
            "\u{1F4DE}=\u{1F4DE}",
        ]);
        let remote = negotiated(&offer, &[Codec::Pcmu]);
        assert_eq!(remote.addr, ip("192.0.2.1"), "first valid c= kept");
        assert_eq!(remote.telephone_event_pt, Some(101));
        assert_eq!(remote.ptime_ms, Some(30));
        assert_eq!(remote.direction, Direction::SendRecv);
    }

    #[test]
    fn host_name_connection_is_skipped_not_fatal_when_another_exists() {
        let offer = crlf(&[
            "c=IN IP4 192.0.2.1",
            "m=audio 4000 RTP/AVP 0",
            "c=IN IP4 media.example.net",
        ]);
        assert_eq!(negotiated(&offer, &[Codec::Pcmu]).addr, ip("192.0.2.1"));
    }

    // --- errors ---

    #[test]
    fn no_audio_line_is_an_error() {
        let offer = crlf(&["c=IN IP4 192.0.2.1", "m=video 5000 RTP/AVP 31"]);
        assert_eq!(
            parsed(&offer).negotiate(&[Codec::Pcmu]),
            Err(SdpError::NoAudio)
        );
        assert_eq!(parsed("").negotiate(&[Codec::Pcmu]), Err(SdpError::NoAudio));
    }

    #[test]
    fn srtp_only_audio_is_an_unsupported_transport() {
        let offer = crlf(&["c=IN IP4 192.0.2.1", "m=audio 4000 RTP/SAVP 0"]);
        assert_eq!(
            parsed(&offer).negotiate(&[Codec::Pcmu]),
            Err(SdpError::UnsupportedTransport {
                proto: "RTP/SAVP".to_string()
            })
        );
    }

    #[test]
    fn missing_connection_address_is_an_error() {
        let offer = crlf(&["m=audio 4000 RTP/AVP 0"]);
        assert_eq!(
            parsed(&offer).negotiate(&[Codec::Pcmu]),
            Err(SdpError::NoConnectionAddress)
        );
    }

    #[test]
    fn garbage_port_is_an_error_naming_it() {
        for port in ["abc", "70000", "-1", "6000x"] {
            let offer = crlf(&["c=IN IP4 192.0.2.1", &format!("m=audio {port} RTP/AVP 0")]);
            assert_eq!(
                parsed(&offer).negotiate(&[Codec::Pcmu]),
                Err(SdpError::InvalidPort {
                    value: port.to_string()
                })
            );
        }
    }

    #[test]
    fn port_zero_is_a_disabled_stream() {
        let offer = crlf(&["c=IN IP4 192.0.2.1", "m=audio 0 RTP/AVP 0"]);
        assert_eq!(
            parsed(&offer).negotiate(&[Codec::Pcmu]),
            Err(SdpError::AudioDisabled)
        );
    }

    #[test]
    fn no_common_codec_lists_what_was_offered() {
        let offer = crlf(&[
            "c=IN IP4 192.0.2.1",
            "m=audio 4000 RTP/AVP 18 3 96 101 102",
            "a=rtpmap:96 AMR-WB/16000/1",
            "a=rtpmap:101 telephone-event/8000",
        ]);
        let error = parsed(&offer).negotiate(&[Codec::Pcmu, Codec::Pcma]);
        assert_eq!(
            error,
            Err(SdpError::NoCommonCodec {
                offered: vec![
                    "18 G729/8000".to_string(),
                    "3 GSM/8000".to_string(),
                    "96 AMR-WB/16000/1".to_string(),
                    "101 telephone-event/8000".to_string(),
                    "102".to_string(),
                ],
                supported: vec![Codec::Pcmu, Codec::Pcma],
            })
        );
    }

    #[test]
    fn empty_preference_has_no_common_codec() {
        assert!(matches!(
            parsed(&crlf(SIPP_UAC_OFFER)).negotiate(&[]),
            Err(SdpError::NoCommonCodec { .. })
        ));
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let mut text = crlf(SIPP_UAC_OFFER);
        text.push_str(&"a=x\r\n".repeat(MAX_SDP_BYTES / 5));
        assert_eq!(
            parse(&text),
            Err(SdpError::TooLarge {
                len: text.len(),
                max: MAX_SDP_BYTES
            })
        );
        let exactly = "a".repeat(MAX_SDP_BYTES);
        assert!(parse(&exactly).is_ok());
    }

    #[test]
    fn error_messages_blame_the_peer_and_say_what_is_wrong() {
        let cases = [
            (SdpError::NoAudio, "m=audio"),
            (SdpError::AudioDisabled, "port 0"),
            (SdpError::NoConnectionAddress, "c="),
            (
                SdpError::InvalidPort {
                    value: "abc".to_string(),
                },
                "\"abc\"",
            ),
            (
                SdpError::UnsupportedTransport {
                    proto: "RTP/SAVP".to_string(),
                },
                "RTP/SAVP",
            ),
            (
                SdpError::TooLarge {
                    len: 20_000,
                    max: MAX_SDP_BYTES,
                },
                "20000",
            ),
            (
                SdpError::NoCommonCodec {
                    offered: vec!["18 G729/8000".to_string()],
                    supported: vec![Codec::Pcmu, Codec::Pcma],
                },
                "[18 G729/8000], we take [PCMU, PCMA]",
            ),
        ];
        for (error, detail) in cases {
            let message = error.to_string();
            assert!(message.starts_with("the peer's SDP"), "{message}");
            assert!(message.contains(detail), "{message} lacks {detail}");
        }
    }

    // --- answers ---

    #[test]
    fn answer_to_sipp_offer_is_exact() {
        let offer = parsed(&crlf(SIPP_UAC_OFFER));
        let remote = negotiated(&crlf(SIPP_UAC_OFFER), &[Codec::Pcmu, Codec::Pcma]);
        assert_eq!(
            answer(&offer, &remote, &local()),
            crlf(&[
                "v=0",
                "o=- 4242 1 IN IP4 203.0.113.5",
                "s=-",
                "c=IN IP4 203.0.113.5",
                "t=0 0",
                "m=audio 40000 RTP/AVP 0",
                "a=rtpmap:0 PCMU/8000",
                "a=ptime:20",
                "a=sendrecv",
            ])
        );
    }

    #[test]
    fn answer_keeps_the_offerers_telephone_event_pt() {
        let text = crlf(CARRIER_PCMA_OFFER);
        let remote = negotiated(&text, &[Codec::Pcma, Codec::Pcmu]);
        let sdp = answer(&parsed(&text), &remote, &local());
        let lines = lines_of(&sdp);
        assert!(lines.contains(&"m=audio 40000 RTP/AVP 8 96"), "{sdp}");
        assert!(lines.contains(&"a=rtpmap:8 PCMA/8000"), "{sdp}");
        assert!(lines.contains(&"a=rtpmap:96 telephone-event/8000"), "{sdp}");
        assert!(lines.contains(&"a=fmtp:96 0-16"), "{sdp}");
        assert!(!sdp.contains(":101"), "our default PT leaked: {sdp}");
    }

    #[test]
    fn answer_has_no_telephone_event_when_none_was_offered() {
        let text = crlf(SIPP_UAC_OFFER);
        let remote = negotiated(&text, &[Codec::Pcmu]);
        assert!(!answer(&parsed(&text), &remote, &local()).contains("telephone-event"));
    }

    #[test]
    fn answer_to_opus_writes_its_rtpmap_and_fmtp_on_the_offerers_pts() {
        let text = crlf(OPUS_OFFER);
        let remote = negotiated(&text, &[Codec::Opus]);
        let sdp = answer(&parsed(&text), &remote, &local());
        let lines = lines_of(&sdp);
        assert!(lines.contains(&"m=audio 40000 RTP/AVP 107 98"), "{sdp}");
        assert!(lines.contains(&"a=rtpmap:107 opus/48000/2"), "{sdp}");
        assert!(lines.contains(&"a=fmtp:107 useinbandfec=1"), "{sdp}");
        assert!(
            lines.contains(&"a=rtpmap:98 telephone-event/48000"),
            "{sdp}"
        );
    }

    #[test]
    fn answer_rejects_video_and_extra_streams_with_port_zero_in_order() {
        let text = crlf(&[
            "v=0",
            "o=- 1 1 IN IP4 192.0.2.1",
            "s=-",
            "c=IN IP4 192.0.2.1",
            "t=0 0",
            "m=video 5000 RTP/AVP 31 34",
            "a=rtpmap:31 H261/90000",
            "m=audio 4000 RTP/AVP 0",
            "m=audio 4002 RTP/AVP 8",
            "m=image 6000 udptl t38",
        ]);
        let remote = negotiated(&text, &[Codec::Pcmu, Codec::Pcma]);
        assert_eq!(remote.port, 4000);
        let sdp = answer(&parsed(&text), &remote, &local());
        let m_lines: Vec<&str> = lines_of(&sdp)
            .into_iter()
            .filter(|line| line.starts_with("m="))
            .collect();
        assert_eq!(
            m_lines,
            [
                "m=video 0 RTP/AVP 31 34",
                "m=audio 40000 RTP/AVP 0",
                "m=audio 0 RTP/AVP 8",
                "m=image 0 udptl t38",
            ]
        );
        // The rejected lines carry nothing after them but the next m= line.
        let after_audio: Vec<&str> = lines_of(&sdp)
            .into_iter()
            .skip_while(|line| *line != "m=audio 0 RTP/AVP 8")
            .collect();
        assert_eq!(after_audio, ["m=audio 0 RTP/AVP 8", "m=image 0 udptl t38"]);
    }

    #[test]
    fn answer_rejects_the_srtp_duplicate_and_takes_the_plain_line() {
        let text = crlf(&[
            "c=IN IP4 192.0.2.1",
            "m=audio 4000 RTP/SAVP 0",
            "m=audio 4002 RTP/AVP 0",
        ]);
        let remote = negotiated(&text, &[Codec::Pcmu]);
        let sdp = answer(&parsed(&text), &remote, &local());
        assert!(sdp.contains("\r\nm=audio 0 RTP/SAVP 0\r\nm=audio 40000 RTP/AVP 0\r\n"));
    }

    #[test]
    fn answer_lines_are_crlf_and_in_rfc_order() {
        let text = crlf(CARRIER_PCMA_OFFER);
        let remote = negotiated(&text, &[Codec::Pcma]);
        let sdp = answer(&parsed(&text), &remote, &local());
        assert!(sdp.ends_with("\r\n"));
        assert!(!sdp.replace("\r\n", "").contains('\n'));
        let kinds: String = lines_of(&sdp)
            .iter()
            .map(|line| line.chars().next().unwrap_or('?'))
            .collect();
        assert_eq!(kinds, "vosctmaaaaa");
    }

    #[test]
    fn answer_over_ipv6_says_ip6() {
        let text = crlf(SIPP_UAC_OFFER);
        let remote = negotiated(&text, &[Codec::Pcmu]);
        let mut ours = local();
        ours.addr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        let sdp = answer(&parsed(&text), &remote, &ours);
        assert!(sdp.contains("\r\no=- 4242 1 IN IP6 2001:db8::1\r\n"));
        assert!(sdp.contains("\r\nc=IN IP6 2001:db8::1\r\n"));
    }

    // --- offers and reading answers ---

    #[test]
    fn default_offer_is_exact() {
        assert_eq!(
            offer(&local()),
            crlf(&[
                "v=0",
                "o=- 4242 1 IN IP4 203.0.113.5",
                "s=-",
                "c=IN IP4 203.0.113.5",
                "t=0 0",
                "m=audio 40000 RTP/AVP 0 8 101",
                "a=rtpmap:0 PCMU/8000",
                "a=rtpmap:8 PCMA/8000",
                "a=rtpmap:101 telephone-event/8000",
                "a=fmtp:101 0-16",
                "a=ptime:20",
                "a=sendrecv",
            ])
        );
    }

    #[test]
    fn offer_with_opus_adds_its_pt_fmtp_and_a_48k_telephone_event() {
        let mut ours = local();
        ours.codecs = vec![Codec::Opus, Codec::Pcmu];
        let sdp = offer(&ours);
        let lines = lines_of(&sdp);
        assert!(
            lines.contains(&"m=audio 40000 RTP/AVP 111 0 110 101"),
            "{sdp}"
        );
        assert!(lines.contains(&"a=rtpmap:111 opus/48000/2"), "{sdp}");
        assert!(lines.contains(&"a=fmtp:111 useinbandfec=1"), "{sdp}");
        assert!(
            lines.contains(&"a=rtpmap:110 telephone-event/48000"),
            "{sdp}"
        );
        assert!(
            lines.contains(&"a=rtpmap:101 telephone-event/8000"),
            "{sdp}"
        );
    }

    #[test]
    fn offer_moves_a_telephone_event_pt_that_would_clash() {
        let mut ours = local();
        ours.telephone_event_pt = 8;
        assert!(offer(&ours).contains("\r\nm=audio 40000 RTP/AVP 0 8 96\r\n"));
        ours.codecs = vec![Codec::Opus, Codec::Pcmu];
        ours.telephone_event_pt = 111;
        // 111 is Opus's usual slot, but the configured events get it and Opus moves.
        let sdp = offer(&ours);
        assert!(
            sdp.contains("\r\nm=audio 40000 RTP/AVP 96 0 110 111\r\n"),
            "{sdp}"
        );
    }

    #[test]
    fn offer_with_no_codecs_falls_back_to_g711_and_dedups() {
        let mut ours = local();
        ours.codecs = Vec::new();
        assert!(offer(&ours).contains("RTP/AVP 0 8 101\r\n"));
        ours.codecs = vec![Codec::Pcma, Codec::Pcma, Codec::Pcmu];
        assert!(offer(&ours).contains("RTP/AVP 8 0 101\r\n"));
    }

    #[test]
    fn offer_writes_hold_and_omits_zero_ptime() {
        let mut ours = local();
        ours.direction = Direction::SendOnly;
        ours.ptime_ms = 0;
        let sdp = offer(&ours);
        assert!(
            sdp.ends_with("\r\na=fmtp:101 0-16\r\na=sendonly\r\n"),
            "{sdp}"
        );
    }

    #[test]
    fn parsing_our_offer_round_trips_to_the_same_negotiation() {
        let codec_lists: [&[Codec]; 5] = [
            &[Codec::Pcmu, Codec::Pcma],
            &[Codec::Pcma],
            &[Codec::Opus, Codec::Pcmu, Codec::Pcma],
            &[Codec::Pcmu, Codec::Opus],
            &[Codec::Opus],
        ];
        for codecs in codec_lists {
            for addr in [ip("203.0.113.5"), ip("2001:db8::5")] {
                let mut ours = local();
                ours.addr = addr;
                ours.codecs = codecs.to_vec();
                let sdp = offer(&ours);
                let remote = negotiated(&sdp, codecs);
                let expected_te = if codecs[0] == Codec::Opus { 110 } else { 101 };
                let expected_pt = codecs[0].static_payload_type().unwrap_or(111);
                assert_eq!(
                    remote,
                    RemoteAudio {
                        addr,
                        port: 40_000,
                        codec: codecs[0],
                        codec_pt: expected_pt,
                        telephone_event_pt: Some(expected_te),
                        direction: Direction::SendRecv,
                        ptime_ms: Some(20),
                        on_hold: false,
                    },
                    "{sdp}"
                );
                assert_eq!(
                    parsed(&sdp).origin,
                    Some(Origin {
                        username: "-".to_string(),
                        session_id: "4242".to_string(),
                        session_version: "1".to_string(),
                    })
                );
            }
        }
    }

    #[test]
    fn reading_an_answer_takes_the_answerers_first_codec_among_ours() {
        // We offered PCMU then PCMA; the answerer prefers A-law.
        let reply = crlf(&[
            "c=IN IP4 198.51.100.7",
            "m=audio 5004 RTP/AVP 8 0 101",
            "a=rtpmap:101 telephone-event/8000",
        ]);
        let session = parsed(&reply);
        let remote = session
            .negotiate_answer(&[Codec::Pcmu, Codec::Pcma])
            .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!((remote.codec, remote.codec_pt), (Codec::Pcma, 8));
        assert_eq!(remote.telephone_event_pt, Some(101));
        // The offer-side rule would have picked our favourite instead.
        assert_eq!(
            session
                .negotiate(&[Codec::Pcmu, Codec::Pcma])
                .map(|r| r.codec),
            Ok(Codec::Pcmu)
        );
    }

    #[test]
    fn reading_an_answer_skips_codecs_we_never_offered() {
        let reply = crlf(&[
            "c=IN IP4 198.51.100.7",
            "m=audio 5004 RTP/AVP 18 96 0",
            "a=rtpmap:96 opus/48000/2",
        ]);
        let remote = parsed(&reply)
            .negotiate_answer(&[Codec::Pcmu])
            .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(remote.codec, Codec::Pcmu);
    }

    #[test]
    fn reading_a_rejecting_answer_is_audio_disabled() {
        let reply = crlf(&["c=IN IP4 198.51.100.7", "m=audio 0 RTP/AVP 0"]);
        assert_eq!(
            parsed(&reply).negotiate_answer(&[Codec::Pcmu]),
            Err(SdpError::AudioDisabled)
        );
    }

    // --- robustness ---

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

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    /// Fragments that steer mutations toward the parser's branches rather than plain noise.
    const PIECES: &[&str] = &[
        "\r\n",
        "\n",
        "\r",
        " ",
        "=",
        ":",
        "/",
        "0",
        "8",
        "96",
        "101",
        "127",
        "128",
        "255",
        "65535",
        "65536",
        "-1",
        "99999999999999999999999",
        "m=audio ",
        "m=video 0 RTP/AVP 31",
        "m=audio 0 RTP/AVP 0",
        " RTP/AVP ",
        " RTP/SAVP ",
        "c=IN IP4 ",
        "c=IN IP6 ",
        "0.0.0.0",
        "::",
        "192.0.2.1",
        "a=rtpmap:",
        "a=fmtp:",
        "a=ptime:",
        "a=sendonly",
        "a=inactive",
        "a=recvonly",
        "telephone-event/8000",
        "telephone-event/48000",
        "opus/48000/2",
        "PCMU/8000",
        "PCMA/8000/1",
        "o=",
        "\u{e9}",
        "\u{1F4DE}",
        "\0",
    ];

    fn mutate(rng: &mut XorShift, bytes: &mut Vec<u8>) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(5) {
            0 if !bytes.is_empty() => {
                let end = (at + rng.below(16)).min(bytes.len());
                bytes.drain(at.min(end)..end);
            }
            1 => bytes.insert(at, rng.next() as u8),
            2 if at < bytes.len() => bytes[at] = rng.next() as u8,
            3 => {
                let piece = rng.pick(PIECES).as_bytes();
                bytes.splice(at..at, piece.iter().copied());
            }
            _ => {
                // Duplicate a stretch, as a line repeated by a buggy SBC.
                let end = (at + rng.below(40)).min(bytes.len());
                let copy: Vec<u8> = bytes[at..end].to_vec();
                let to = rng.below(bytes.len() + 1);
                bytes.splice(to..to, copy);
            }
        }
    }

    #[test]
    fn fuzzed_descriptions_never_panic_and_our_answers_read_back() {
        let seeds = [
            crlf(SIPP_UAC_OFFER),
            crlf(CARRIER_PCMA_OFFER),
            lf(OPUS_OFFER),
            offer(&local()),
        ];
        let preference = [Codec::Opus, Codec::Pcma, Codec::Pcmu];
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut negotiated_count = 0;
        for round in 0..4000 {
            let mut bytes = rng.pick(&seeds).clone().into_bytes();
            for _ in 0..=rng.below(6) {
                mutate(&mut rng, &mut bytes);
            }
            let text = String::from_utf8_lossy(&bytes);
            let Ok(session) = parse(&text) else {
                continue;
            };
            let Ok(remote) = session.negotiate(&preference) else {
                continue;
            };
            negotiated_count += 1;
            // Whatever we negotiated, our answer must read back to the same stream.
            let sdp = answer(&session, &remote, &local());
            let reread = parsed(&sdp)
                .negotiate_answer(&[remote.codec])
                .unwrap_or_else(|error| panic!("round {round}: {error}\n{text}\n---\n{sdp}"));
            assert_eq!(reread.codec, remote.codec, "round {round}");
            assert_eq!(reread.codec_pt, remote.codec_pt, "round {round}");
            assert_eq!(
                reread.telephone_event_pt, remote.telephone_event_pt,
                "round {round}"
            );
            assert_eq!(
                reread.direction,
                remote.direction.reverse(),
                "round {round}"
            );
            assert_eq!(
                parsed(&sdp).media.len(),
                session.media.len(),
                "round {round}: every m= line answered\n{text}\n---\n{sdp}"
            );
        }
        // Guards against the property being vacuous because every mutation broke the input.
        assert!(negotiated_count > 500, "only {negotiated_count} negotiated");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        for _ in 0..2000 {
            let len = rng.below(300);
            let bytes: Vec<u8> = (0..len)
                .map(|_| match rng.below(4) {
                    0 => *rng.pick(b"=\r\n :/ acmov0123456789"),
                    _ => rng.next() as u8,
                })
                .collect();
            if let Ok(session) = parse(&String::from_utf8_lossy(&bytes)) {
                let _ = session.negotiate(&DEFAULT_CODECS);
                let _ = session.negotiate_answer(&DEFAULT_CODECS);
            }
        }
    }
}
