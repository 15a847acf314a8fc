//! One call's media path, sans-IO: str0m's ICE, DTLS-SRTP and RTP/RTCP carrying Koe voice
//! payloads (`koe_voice::payload`) as one Opus RTP stream each way.
//!
//! Each side makes a [`MediaSession`], puts its [`MediaDescription`] (ICE credentials, DTLS
//! fingerprint, candidates, SSRC) into the signed call offer or answer, and gives the other
//! side's to [`MediaSession::start`]. The driver then feeds datagrams in
//! ([`MediaSession::receive`]), sends what [`MediaSession::poll`] says, wakes it at the
//! deadline it names, and writes one voice payload every 20 ms with
//! [`MediaSession::send_voice`]. Every 200 ms each side sends the other its
//! receiver's [`LossReport`] ([`MediaSession::send_loss_report`]) inside SRTCP, so each sender's
//! copies follow what the other end sees. Candidates: host ones at creation, server-reflexive
//! ones learned from a supernode's STUN responder ([`MediaSession::add_server_reflexive`]);
//! relayed ones from allocations on relay nodes ([`MediaSession::add_relay`], [`relay`]): data
//! str0m sends from a relayed address goes to that relay, wrapped, and what the relay
//! delivers from peers comes back to str0m as if it had arrived at the relayed address.
//!
//! The session also keeps a call going when a relay node on its path dies: ICE has checked
//! every pair all along, so once the candidates on the dead relay are dropped it moves to the
//! best other pair. Its own relays are checked while the call runs ([`relay`]); one that died
//! takes with it its local candidate and the other side's relayed candidates at the same IP
//! (the same relay host). When voice stops arriving ([`PATH_QUIET`]) while this side's end of
//! the path still answers, the other side's relayed candidate it came from is dropped.
//!
//! Under loss, checks and handshakes are resent quickly: ICE after 100 ms, a DTLS flight after
//! 150 ms ([`dtls`]), a relay's liveness check every 100 ms ([`relay`]).

pub mod driver;
pub mod dtls;
pub mod punch;
pub mod relay;
pub mod virtual_call;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use koe_voice::jitter::LossReport;
use punch::{NatMapping, PortGuess};
use relay::{AllocationState, RelayAllocation, RelayServer, RelayTransport};
use serde::{Deserialize, Serialize};
use str0m::change::DirectApi;
use str0m::media::{Frequency, MediaKind, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::Ssrc;
use str0m::{Candidate, CandidateKind, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};

/// The one audio stream of a call.
const MID: &str = "0";
/// Marks Koe's loss report inside an RTCP application feedback message.
const LOSS_REPORT_TAG: &[u8; 4] = b"koeL";
/// ICE's first retransmission of an unanswered check, and its longest gap between checks
/// (also how often a working pair is re-checked).
const ICE_FIRST_RESEND: Duration = Duration::from_millis(100);
const ICE_LONGEST_RESEND: Duration = Duration::from_millis(1500);
/// How long ICE may take to find a path before the call is given up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Koe clients send a frame every 20 ms for the whole call (silence and mute included), so
/// this long without one means the other side or the path is gone.
pub const VOICE_TIMEOUT: Duration = Duration::from_secs(4);
/// Voice arrives every 20 ms: a path this long without any is suspected of having lost a relay.
pub const PATH_QUIET: Duration = Duration::from_millis(700);
/// The session is polled at least every 20 ms during a call; a longer pause means this process
/// did not run (an overloaded machine), and the quiet before it is no evidence about the path.
const POLL_STALL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("the other side's media description is invalid: {0}")]
    BadDescription(String),
    #[error("the media engine failed: {0}")]
    Engine(String),
    #[error("no audio stream: the call's media was not set up")]
    NoStream,
}

/// What one side tells the other about its media, inside the signed call offer or answer
/// (so the DTLS fingerprint is bound to the caller's certificate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaDescription {
    pub ice_ufrag: String,
    pub ice_pwd: String,
    /// `sha-256 AB:CD:…`
    pub dtls_fingerprint: String,
    /// ICE candidates in SDP form (`candidate:…`).
    pub candidates: Vec<String>,
    pub ssrc: u32,
    /// How this side's NAT maps sockets, for port guessing between a cone and a symmetric NAT.
    #[serde(default)]
    pub nat: NatMapping,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum MediaOutput {
    /// Send this datagram from `source` (one of the local candidates) to `destination`.
    Transmit { source: SocketAddr, destination: SocketAddr, datagram: Vec<u8> },
    /// Write these bytes to the stream (TCP or TLS) to relay `relay` (an index from
    /// [`MediaSession::add_relay`]).
    StreamWrite { relay: usize, bytes: Vec<u8> },
    /// A voice payload from the other side.
    Voice { payload: Vec<u8>, arrived: Instant },
    /// The other side's receiver says how it hears us: for our sender's copies.
    LossReport(LossReport),
    /// ICE and DTLS are up: voice can flow.
    Connected,
    /// The path is gone (ICE disconnected for good) or never came up.
    Failed { reason: String },
    /// About once a second: the path in use and the round-trip time on it.
    PathStats { path: Option<MediaPath>, rtt: Option<Duration> },
    /// Nothing more until this instant (or a datagram).
    WaitUntil(Instant),
}

/// The network path a call's media takes: the nominated ICE pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaPath {
    pub local: SocketAddr,
    pub local_kind: CandidateKind,
    pub remote: SocketAddr,
    pub remote_kind: CandidateKind,
}

impl MediaPath {
    /// Whether the media goes through a relay node rather than straight to the other side.
    pub fn is_relayed(&self) -> bool {
        self.local_kind == CandidateKind::Relayed || self.remote_kind == CandidateKind::Relayed
    }
}

impl std::fmt::Display for MediaPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.is_relayed() { "relayed" } else { "direct" };
        write!(f, "{how} ({} {} ↔ {} {})", kind_name(self.local_kind), self.local, kind_name(self.remote_kind), self.remote)
    }
}

/// The names SDP gives candidate kinds.
fn kind_name(kind: CandidateKind) -> &'static str {
    match kind {
        CandidateKind::Host => "host",
        CandidateKind::PeerReflexive => "prflx",
        CandidateKind::ServerReflexive => "srflx",
        CandidateKind::Relayed => "relay",
    }
}

pub struct MediaSession {
    rtc: Rtc,
    local_candidates: Vec<Candidate>,
    remote_candidates: Vec<Candidate>,
    mid: Mid,
    pt: Option<Pt>,
    ssrc: Ssrc,
    remote_ssrc: Option<Ssrc>,
    started_at: Instant,
    /// When voice last arrived (or the session connected).
    last_voice: Option<Instant>,
    connected: bool,
    failed: bool,
    media_time: u64,
    /// RTP packets of the other side's stream that arrived, and those str0m delivered: the
    /// difference failed SRTP authentication or replay protection, or was malformed.
    rtp_arrived: u64,
    rtp_delivered: u64,
    relays: Vec<RelayAllocation>,
    /// The other side's candidates are known and not yet permitted on every relay.
    permissions_pending: bool,
    /// Where the other side's voice last came from, and to which of the local candidates.
    receiving: Option<(SocketAddr, SocketAddr)>,
    /// The pair (local, remote) this side's voice goes out on, and whether it changed since
    /// the driver last heard.
    sending: Option<(SocketAddr, SocketAddr)>,
    path_moved: bool,
    /// When [`Self::poll`] last ran, and since when the quiet on the path counts (not across a
    /// pause of this process: the voice that arrived meanwhile is still in the socket).
    last_polled: Instant,
    listening_since: Instant,
    /// Candidates (local and remote, by address) dropped because a relay on them died.
    dropped: Vec<SocketAddr>,
    nat: NatMapping,
    /// This side's part in port guessing, once both descriptions are known ([`punch`]).
    port_guess: Option<PortGuess>,
    /// This side is the DTLS client and waits for ICE to connect before it says hello.
    hello_pending: bool,
}

impl std::fmt::Debug for MediaSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaSession").field("connected", &self.connected).finish_non_exhaustive()
    }
}


impl MediaSession {
    /// A session whose host candidates are `local` (the addresses of its UDP sockets); with none,
    /// only relayed candidates (added later) are offered, and every path goes through a relay.
    pub fn new(now: Instant, local: &[SocketAddr]) -> Result<Self, MediaError> {
        dtls::install();
        let mut config = RtcConfig::new()
            // Emit every packet at once: Koe's own jitter buffer does the reordering.
            .set_reordering_size_audio(0)
            // Path and round-trip time for the call's statistics.
            .set_stats_interval(Some(Duration::from_secs(1)))
            .clone();
        // Lost checks are resent sooner than str0m's 250 ms (then 500 ms, 1 s, …), so that a
        // lossy path connects within a second, and a working pair is re-checked every 1.5 s
        // rather than 3 s, so that one that dies is noticed sooner (at 20 % loss each way, nine
        // checks in a row all go unanswered about once in ten thousand intervals).
        config.set_initial_stun_rto(ICE_FIRST_RESEND);
        config.set_max_stun_rto(ICE_LONGEST_RESEND);
        let mut rtc = config.build(now);
        let mut local_candidates = Vec::new();
        for address in local {
            let candidate = Candidate::host(*address, "udp").map_err(|e| MediaError::Engine(e.to_string()))?;
            rtc.add_local_candidate(candidate.clone());
            local_candidates.push(candidate);
        }
        let mid = Mid::from(MID);
        let ssrc = {
            let mut api = rtc.direct_api();
            api.declare_media(mid, MediaKind::Audio);
            let ssrc = api.new_ssrc();
            api.declare_stream_tx(ssrc, None, mid, None);
            ssrc
        };
        let pt = rtc.codec_config().find(|p| p.spec().codec == str0m::format::Codec::Opus).map(|p| p.pt());
        Ok(Self {
            rtc,
            local_candidates,
            remote_candidates: Vec::new(),
            mid,
            pt,
            ssrc,
            remote_ssrc: None,
            started_at: now,
            last_voice: None,
            connected: false,
            failed: false,
            media_time: 0,
            rtp_arrived: 0,
            rtp_delivered: 0,
            relays: Vec::new(),
            permissions_pending: false,
            receiving: None,
            sending: None,
            path_moved: false,
            last_polled: now,
            listening_since: now,
            dropped: Vec::new(),
            nat: NatMapping::Unknown,
            port_guess: None,
            hello_pending: false,
        })
    }

    /// Starts an allocation on a relay node, reached from `local` (the media socket for UDP,
    /// the stream's local address for TCP and TLS). Returns its index; once it is ready
    /// ([`Self::relay_states`]) its relayed address is a local candidate.
    pub fn add_relay(&mut self, server: RelayServer, local: SocketAddr, now: Instant) -> usize {
        self.relays.push(RelayAllocation::new(server, local, now));
        self.relays.len() - 1
    }

    /// Whether this side's end of the path the voice arrives on is a byte stream: an
    /// allocation on a relay reached over TCP or TLS.
    pub fn on_stream_leg(&self) -> bool {
        let Some((_, local)) = self.receiving else { return false };
        self.relays
            .iter()
            .any(|relay| relay.allocated() == Some(local) && relay.server.transport != RelayTransport::Udp)
    }

    /// Each relay's transport, server and state, in [`Self::add_relay`] order.
    pub fn relay_states(&self) -> Vec<(RelayTransport, SocketAddr, AllocationState)> {
        self.relays.iter().map(|relay| (relay.server.transport, relay.server.address, relay.state().clone())).collect()
    }

    /// Bytes read from the stream to relay `relay`.
    pub fn receive_stream(&mut self, now: Instant, relay: usize, bytes: &[u8]) {
        let Some(allocation) = self.relays.get_mut(relay) else { return };
        let delivered = allocation.receive(bytes, now);
        self.after_relay_input(relay, now);
        for (peer, data) in delivered {
            self.receive_relayed(now, relay, peer, &data);
        }
    }

    /// The stream to relay `relay` closed.
    pub fn stream_closed(&mut self, relay: usize) {
        if let Some(allocation) = self.relays.get_mut(relay) {
            allocation.stream_closed();
        }
    }

    fn receive_relayed(&mut self, now: Instant, relay: usize, peer: SocketAddr, data: &[u8]) {
        let Some(relayed) = self.relays[relay].relayed() else { return };
        self.receive_at(now, peer, relayed, data);
    }

    /// After the relay took input: adopt a newly allocated address as a candidate, and let the
    /// other side's candidates (if known) through it.
    fn after_relay_input(&mut self, relay: usize, now: Instant) {
        let Some(relayed) = self.relays[relay].relayed() else { return };
        if self.local_candidates.iter().any(|candidate| candidate.addr() == relayed) {
            return;
        }
        let local = self.relays[relay].local;
        if let Ok(candidate) = Candidate::relayed(relayed, local, "udp") {
            self.rtc.add_local_candidate(candidate.clone());
            self.local_candidates.push(candidate);
        }
        self.permit_remote_candidates(relay, now);
    }

    fn permit_remote_candidates(&mut self, relay: usize, now: Instant) {
        let peers: Vec<std::net::IpAddr> = self.remote_candidates.iter().map(|candidate| candidate.addr().ip()).collect();
        for peer in peers {
            self.relays[relay].permit(peer, now);
        }
    }

    /// Adds a candidate found later (server-reflexive from a supernode, relayed from a relay).
    pub fn add_local_candidate(&mut self, candidate: Candidate) {
        self.rtc.add_local_candidate(candidate.clone());
        self.local_candidates.push(candidate);
    }

    /// Adds the address a STUN server saw the local socket `base` at, when it differs (the
    /// socket is behind a NAT).
    pub fn add_server_reflexive(&mut self, mapped: SocketAddr, base: SocketAddr) -> Result<(), MediaError> {
        if mapped == base {
            return Ok(());
        }
        let candidate = Candidate::server_reflexive(mapped, base, "udp").map_err(|e| MediaError::Engine(e.to_string()))?;
        self.add_local_candidate(candidate);
        Ok(())
    }

    /// How this side's NAT maps sockets (told to the other side in the description).
    pub fn set_nat_mapping(&mut self, nat: NatMapping) {
        self.nat = nat;
    }

    /// This side's part in port guessing, if the two NATs call for it (after [`Self::start`]).
    pub fn port_guess(&self) -> Option<PortGuess> {
        self.port_guess
    }

    /// A socket found later that reaches the other side (port guessing): a host candidate.
    pub fn add_host_candidate(&mut self, address: SocketAddr) -> Result<(), MediaError> {
        let candidate = Candidate::host(address, "udp").map_err(|e| MediaError::Engine(e.to_string()))?;
        self.add_local_candidate(candidate);
        Ok(())
    }

    pub fn local_description(&mut self) -> MediaDescription {
        let candidates = self.local_candidates.iter().map(Candidate::to_sdp_string).collect();
        let api = self.rtc.direct_api();
        let creds = api.local_ice_credentials();
        MediaDescription {
            ice_ufrag: creds.ufrag,
            ice_pwd: creds.pass,
            dtls_fingerprint: api.local_dtls_fingerprint().to_string(),
            candidates,
            ssrc: *self.ssrc,
            nat: self.nat,
        }
    }

    /// Starts ICE and DTLS towards the other side. The caller controls ICE and is the DTLS
    /// client: it says hello once ICE has connected, so that its first flight's resend timer
    /// (150 ms, see [`dtls`]) does not run out while ICE is still finding the path.
    pub fn start(&mut self, remote: &MediaDescription, caller: bool) -> Result<(), MediaError> {
        let bad = |what: &str, error: String| MediaError::BadDescription(format!("{what}: {error}"));
        let fingerprint = remote
            .dtls_fingerprint
            .parse()
            .map_err(|e| bad("DTLS fingerprint", format!("{e:?}")))?;
        let mut candidates = Vec::new();
        for text in remote.candidates.iter().take(32) {
            candidates.push(Candidate::from_sdp_string(text).map_err(|e| bad("candidate", e.to_string()))?);
        }
        if candidates.is_empty() {
            return Err(MediaError::BadDescription("no candidates".into()));
        }
        if remote.ice_ufrag.is_empty() || remote.ice_pwd.len() < 22 {
            return Err(MediaError::BadDescription("ICE credentials too short".into()));
        }
        for candidate in &candidates {
            self.rtc.add_remote_candidate(candidate.clone());
        }
        let remote_public = candidates.iter().find(|c| c.kind() == CandidateKind::ServerReflexive).map(Candidate::addr);
        self.port_guess = PortGuess::choose(self.nat, remote.nat, remote_public);
        self.remote_candidates = candidates;
        // The next poll lets the other side's candidates through every relay allocated on.
        self.permissions_pending = true;
        let mid = self.mid;
        let mut api: DirectApi = self.rtc.direct_api();
        api.set_remote_fingerprint(fingerprint);
        api.set_remote_ice_credentials(str0m::IceCreds { ufrag: remote.ice_ufrag.clone(), pass: remote.ice_pwd.clone() });
        api.set_ice_controlling(caller);
        api.expect_stream_rx(Ssrc::from(remote.ssrc), None, mid, None);
        self.remote_ssrc = Some(Ssrc::from(remote.ssrc));
        self.hello_pending = caller;
        if caller {
            Ok(())
        } else {
            self.start_dtls(false)
        }
    }

    fn start_dtls(&mut self, client: bool) -> Result<(), MediaError> {
        self.rtc.direct_api().start_dtls(client).map_err(|e| MediaError::Engine(e.to_string()))
    }

    /// A datagram that arrived on the local socket `destination` from `source`.
    pub fn receive(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr, datagram: &[u8]) {
        if let Some(relay) = self.relays.iter().position(|relay| relay.owns_datagram(source, destination)) {
            let delivered = self.relays[relay].receive(datagram, now);
            self.after_relay_input(relay, now);
            for (peer, data) in delivered {
                self.receive_relayed(now, relay, peer, &data);
            }
            return;
        }
        self.receive_at(now, source, destination, datagram);
    }

    fn receive_at(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr, datagram: &[u8]) {
        let Ok(contents) = datagram.try_into() else {
            return; // Not STUN, DTLS or RTP: ignore.
        };
        if self.remote_ssrc.is_some_and(|ssrc| rtp_ssrc(datagram) == Some(*ssrc)) {
            self.rtp_arrived += 1;
            self.receiving = Some((source, destination));
        }
        let input = Input::Receive(now, Receive { proto: Protocol::Udp, source, destination, contents });
        if self.rtc.accepts(&input) {
            let _ = self.rtc.handle_input(input);
        }
    }

    /// Sends one voice payload (20 ms of audio).
    pub fn send_voice(&mut self, now: Instant, payload: &[u8]) -> Result<(), MediaError> {
        self.media_time += 960;
        self.write_voice(now, self.media_time - 960, payload)
    }

    /// Sends the twin of the last voice payload (its second sending, half a frame later), in a
    /// packet of its own, stamped half a frame after the first.
    pub fn send_voice_twin(&mut self, now: Instant, payload: &[u8]) -> Result<(), MediaError> {
        self.write_voice(now, self.media_time.saturating_sub(480), payload)
    }

    fn write_voice(&mut self, now: Instant, rtp_time: u64, payload: &[u8]) -> Result<(), MediaError> {
        let pt = self.pt.ok_or(MediaError::NoStream)?;
        let time = MediaTime::new(rtp_time, Frequency::FORTY_EIGHT_KHZ);
        let writer = self.rtc.writer(self.mid).ok_or(MediaError::NoStream)?;
        writer.write(pt, now, time, payload.to_vec()).map_err(|e| MediaError::Engine(e.to_string()))
    }

    /// Tells the other side how its audio arrives here (sent inside SRTCP).
    pub fn send_loss_report(&mut self, report: LossReport) {
        let Some(remote) = self.remote_ssrc else {
            return;
        };
        let mut payload = LOSS_REPORT_TAG.to_vec();
        payload.extend_from_slice(&(report.loss as f32).to_be_bytes());
        payload.extend_from_slice(&(report.mean_burst as f32).to_be_bytes());
        payload.push(u8::from(report.stream_leg));
        let ssrc = self.ssrc;
        self.rtc.direct_api().send_app_specific_feedback(ssrc, remote, payload);
    }

    /// What to do next; call until it returns [`MediaOutput::WaitUntil`].
    pub fn poll(&mut self, now: Instant) -> MediaOutput {
        if !self.connected && !self.failed && now.saturating_duration_since(self.started_at) > CONNECT_TIMEOUT {
            self.failed = true;
            return MediaOutput::Failed { reason: "no network path to the other side was found".into() };
        }
        if self.connected && !self.failed && self.last_voice.is_some_and(|at| now.saturating_duration_since(at) > VOICE_TIMEOUT) {
            self.failed = true;
            return MediaOutput::Failed {
                reason: format!("no audio from the other side for {} s: it or the network went away", VOICE_TIMEOUT.as_secs()),
            };
        }
        self.watch_path(now);
        if std::mem::take(&mut self.path_moved) {
            let path = self.sending.map(|(local, remote)| self.path(local, remote));
            return MediaOutput::PathStats { path, rtt: None };
        }
        if let Some(output) = self.poll_relays(now) {
            return output;
        }
        loop {
            let output = match self.rtc.poll_output() {
                Ok(output) => output,
                Err(error) => {
                    self.failed = true;
                    return MediaOutput::Failed { reason: error.to_string() };
                }
            };
            match output {
                Output::Timeout(at) => {
                    if at <= now {
                        let _ = self.rtc.handle_input(Input::Timeout(now));
                        continue;
                    }
                    let relays_wake = self.relays.iter_mut().map(|relay| relay.poll_timeout(now)).min();
                    let at = relays_wake.map_or(at, |wake| wake.min(at));
                    return MediaOutput::WaitUntil(at.min(now + Duration::from_millis(100)));
                }
                Output::Transmit(transmit) => {
                    if is_rtp_or_rtcp(&transmit.contents) && self.sending != Some((transmit.source, transmit.destination)) {
                        self.sending = Some((transmit.source, transmit.destination));
                        self.path_moved = true;
                    }
                    if let Some(relay) = self.relays.iter().position(|relay| relay.relayed() == Some(transmit.source)) {
                        let Some(wire) = self.relays[relay].send_to(transmit.destination, &transmit.contents, now) else {
                            continue;
                        };
                        if let Some(output) = self.to_relay(relay, wire) {
                            return output;
                        }
                        continue;
                    }
                    return MediaOutput::Transmit {
                        source: transmit.source,
                        destination: transmit.destination,
                        datagram: transmit.contents.to_vec(),
                    };
                }
                Output::Event(Event::Connected) => {
                    self.connected = true;
                    self.last_voice = Some(now);
                    return MediaOutput::Connected;
                }
                Output::Event(Event::MediaData(data)) => {
                    self.rtp_delivered += 1;
                    self.last_voice = Some(now.max(data.network_time));
                    return MediaOutput::Voice { payload: data.data.to_vec(), arrived: data.network_time };
                }
                Output::Event(Event::AppSpecificFeedback(feedback)) => {
                    if let Some(report) = parse_loss_report(&feedback.payload) {
                        return MediaOutput::LossReport(report);
                    }
                }
                Output::Event(Event::PeerStats(stats)) => {
                    let pair = stats.selected_candidate_pair;
                    // The pair voice goes out on, else the one ICE reports (it can lag a move).
                    let path = self.sending.or(pair.as_ref().map(|pair| (pair.local.addr, pair.remote.addr))).map(|(local, remote)| self.path(local, remote));
                    // From RTCP receiver reports, else from ICE's consent checks on the path.
                    let rtt = stats.rtt.or_else(|| pair.and_then(|pair| pair.current_round_trip_time));
                    return MediaOutput::PathStats { path, rtt };
                }
                Output::Event(Event::IceConnectionStateChange(IceConnectionState::Connected | IceConnectionState::Completed))
                    if self.hello_pending =>
                {
                    self.hello_pending = false;
                    if let Err(error) = self.start_dtls(true) {
                        self.failed = true;
                        return MediaOutput::Failed { reason: error.to_string() };
                    }
                }
                // ICE without a usable pair for now (a relay under the call died, candidates were
                // dropped, and the other side has not nominated the next pair yet) recovers when
                // it has one: the call ends only after VOICE_TIMEOUT without voice.
                Output::Event(_) => continue,
            }
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    fn path(&self, local: SocketAddr, remote: SocketAddr) -> MediaPath {
        let relay_hosts: Vec<IpAddr> = self
            .relays
            .iter()
            .flat_map(|relay| [Some(relay.server.address.ip()), relay.allocated().map(|a| a.ip())])
            .flatten()
            .collect();
        MediaPath {
            local,
            local_kind: candidate_kind(&self.local_candidates, local),
            remote,
            remote_kind: remote_kind(&self.remote_candidates, &relay_hosts, remote),
        }
    }


    /// Drops the candidates of relays that died, so that ICE moves the call to another pair:
    /// a relay of this side that died (its stream closed, it closed the allocation, or it
    /// stopped answering checks) takes its local candidate and the other side's relayed ones at
    /// its IP; after [`PATH_QUIET`] without voice (while this process ran: see [`POLL_STALL`]),
    /// while this side's end of the path answers, the other side's relayed candidate the voice
    /// came from goes. The last candidate on either side is kept: a path that is only quiet for
    /// a while may come back.
    fn watch_path(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_polled) > POLL_STALL {
            self.listening_since = now;
        }
        self.last_polled = now;
        let running = self.connected && !self.failed;
        if running {
            for relay in &mut self.relays {
                relay.keep_checking(now, self.listening_since);
            }
        }
        let dead: Vec<SocketAddr> = self
            .relays
            .iter()
            .filter(|relay| matches!(relay.state(), AllocationState::Failed(_)))
            .filter_map(RelayAllocation::allocated)
            .filter(|relayed| !self.dropped.contains(relayed))
            .collect();
        for relayed in dead {
            self.drop_candidate(relayed, true);
            let same_host: Vec<SocketAddr> = self
                .remote_candidates
                .iter()
                .filter(|c| c.kind() == CandidateKind::Relayed && c.addr().ip() == relayed.ip())
                .map(Candidate::addr)
                .collect();
            for remote in same_host {
                self.drop_candidate(remote, false);
            }
        }
        let Some((source, destination)) = self.receiving.filter(|_| running) else { return };
        let quiet_since = self.last_voice.unwrap_or(self.started_at).max(self.listening_since);
        if now.saturating_duration_since(quiet_since) < PATH_QUIET {
            return;
        }
        if let Some(relay) = self.relays.iter().find(|relay| relay.allocated() == Some(destination)) {
            // This end is the dead one (dropped above), or not yet known to be alive.
            if matches!(relay.state(), AllocationState::Failed(_)) || !relay.answered_since(quiet_since) {
                return;
            }
        }
        if self.remote_candidates.iter().any(|c| c.addr() == source && c.kind() == CandidateKind::Relayed) {
            self.drop_candidate(source, false);
        }
    }

    /// Drops a local or remote candidate from ICE, unless it is the last one on its side.
    fn drop_candidate(&mut self, address: SocketAddr, local: bool) {
        if self.dropped.contains(&address) {
            return;
        }
        let candidates = if local { &self.local_candidates } else { &self.remote_candidates };
        let others = candidates.iter().filter(|c| c.addr() != address && !self.dropped.contains(&c.addr())).count();
        let Some(candidate) = candidates.iter().find(|c| c.addr() == address).cloned() else { return };
        if others == 0 {
            return;
        }
        self.dropped.push(address);
        self.rtc.direct_api().invalidate_candidate(&candidate);
    }

    /// Ends the allocations on relays reached over UDP (at the end of the call, answered or
    /// not), so they stop counting against the user's quota: the datagrams to send. Those
    /// over TCP and TLS end when their streams close.
    pub fn release_relays(&mut self, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        self.relays
            .iter_mut()
            .filter(|relay| relay.server.transport == RelayTransport::Udp)
            .filter_map(|relay| Some((relay.server.address, relay.release(now)?)))
            .collect()
    }

    /// Protocol messages the relays want sent (allocation, refreshes, permissions).
    fn poll_relays(&mut self, now: Instant) -> Option<MediaOutput> {
        if self.permissions_pending {
            for relay in 0..self.relays.len() {
                self.permit_remote_candidates(relay, now);
            }
            self.permissions_pending = self.relays.iter().any(|relay| *relay.state() == AllocationState::Allocating);
        }
        for relay in 0..self.relays.len() {
            if let Some(wire) = self.relays[relay].poll_transmit(now) {
                self.after_relay_input(relay, now);
                return self.to_relay(relay, wire);
            }
            self.after_relay_input(relay, now);
        }
        None
    }

    /// How bytes for relay `relay` leave: a datagram from the media socket, or a stream write.
    fn to_relay(&self, relay: usize, wire: Vec<u8>) -> Option<MediaOutput> {
        let allocation = &self.relays[relay];
        Some(match allocation.server.transport {
            RelayTransport::Udp => MediaOutput::Transmit { source: allocation.local, destination: allocation.server.address, datagram: wire },
            RelayTransport::Tcp | RelayTransport::Tls => MediaOutput::StreamWrite { relay, bytes: wire },
        })
    }

    /// RTP packets of the other side's stream that were dropped unread: they failed SRTP
    /// authentication or replay protection, or were malformed.
    pub fn rejected_packets(&self) -> u64 {
        self.rtp_arrived.saturating_sub(self.rtp_delivered)
    }
}

/// The kind of the candidate with this address; one ICE learned on the way is peer-reflexive.
fn candidate_kind(candidates: &[Candidate], address: SocketAddr) -> CandidateKind {
    candidates.iter().find(|c| c.addr() == address).map_or(CandidateKind::PeerReflexive, Candidate::kind)
}

/// The kind of the other side's end of a path. A relayed address of the other side that ICE
/// learned from a check (an allocation made after the candidates were sent, a relay that
/// relays from another port) is peer-reflexive to ICE, yet the path goes through a relay node
/// all the same: one at the IP of a relayed candidate of the other side, or of a relay node
/// this side uses (`relay_hosts`).
fn remote_kind(candidates: &[Candidate], relay_hosts: &[IpAddr], address: SocketAddr) -> CandidateKind {
    let kind = candidate_kind(candidates, address);
    let relay_host = relay_hosts.contains(&address.ip())
        || candidates.iter().any(|c| c.kind() == CandidateKind::Relayed && c.addr().ip() == address.ip());
    if kind == CandidateKind::PeerReflexive && relay_host {
        CandidateKind::Relayed
    } else {
        kind
    }
}

/// Whether a datagram is SRTP or SRTCP (RFC 7983: first byte 128–191), not STUN or DTLS.
fn is_rtp_or_rtcp(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|first| (128..=191).contains(first))
}

/// The SSRC of an RTP packet (not RTCP: payload types 192–223 are RTCP's).
fn rtp_ssrc(datagram: &[u8]) -> Option<u32> {
    let header = datagram.get(..12)?;
    let is_rtp = header[0] >> 6 == 2 && !(192..=223).contains(&header[1]);
    is_rtp.then(|| u32::from_be_bytes([header[8], header[9], header[10], header[11]]))
}

/// A loss report from the other side, if the feedback is one and its numbers make sense:
/// the loss and mean burst (two f32), then a flags byte (bit 0: the other side's leg is a
/// byte stream), which older reports lack.
fn parse_loss_report(payload: &[u8]) -> Option<LossReport> {
    let rest = payload.strip_prefix(LOSS_REPORT_TAG.as_slice())?;
    let (loss, rest) = rest.split_first_chunk::<4>()?;
    let (burst, flags) = rest.split_first_chunk::<4>()?;
    let (loss, mean_burst) = (f64::from(f32::from_be_bytes(*loss)), f64::from(f32::from_be_bytes(*burst)));
    let stream_leg = flags.first().is_some_and(|flags| flags & 1 == 1);
    ((0.0..=1.0).contains(&loss) && (0.0..=1000.0).contains(&mean_burst)).then_some(LossReport { loss, mean_burst, stream_leg })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_reflexive_address_on_a_relay_host_is_a_relayed_path() {
        let address = |text: &str| text.parse::<SocketAddr>().unwrap_or_else(|e| panic!("{e}"));
        let host = Candidate::host(address("203.0.113.11:4000"), "udp").unwrap_or_else(|e| panic!("{e}"));
        let relayed = Candidate::relayed(address("203.0.113.103:50000"), address("203.0.113.11:4000"), "udp").unwrap_or_else(|e| panic!("{e}"));
        let candidates = [host, relayed];
        let ours = [address("198.51.100.2:3478").ip()];
        let kind = |text: &str| remote_kind(&candidates, &ours, address(text));
        assert_eq!(kind("203.0.113.11:4000"), CandidateKind::Host);
        assert_eq!(kind("203.0.113.103:50000"), CandidateKind::Relayed);
        assert_eq!(kind("203.0.113.103:50002"), CandidateKind::Relayed, "another port of the other side's relay");
        assert_eq!(kind("198.51.100.2:49999"), CandidateKind::Relayed, "our relay node");
        assert_eq!(kind("203.0.113.11:4001"), CandidateKind::PeerReflexive, "a NAT's other port");
    }

    #[test]
    fn loss_reports_are_read_only_when_well_formed() {
        let mut good = LOSS_REPORT_TAG.to_vec();
        good.extend_from_slice(&0.25f32.to_be_bytes());
        good.extend_from_slice(&3.0f32.to_be_bytes());
        assert_eq!(parse_loss_report(&good), Some(LossReport { loss: 0.25, mean_burst: 3.0, stream_leg: false }), "an older report");
        good.push(1);
        assert_eq!(parse_loss_report(&good), Some(LossReport { loss: 0.25, mean_burst: 3.0, stream_leg: true }));
        assert_eq!(parse_loss_report(&good[..10]), None, "truncated");
        assert_eq!(parse_loss_report(b"xxxx\0\0\0\0\0\0\0\0"), None, "another application's feedback");
        let mut nonsense = LOSS_REPORT_TAG.to_vec();
        nonsense.extend_from_slice(&f32::NAN.to_be_bytes());
        nonsense.extend_from_slice(&1.0f32.to_be_bytes());
        assert_eq!(parse_loss_report(&nonsense), None, "NaN loss");
    }
}
