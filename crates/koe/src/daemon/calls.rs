//! Calls in the daemon: the glue between the call signalling state machine (`koe-call`), the
//! overlay's sealed envelopes that carry its signals, and the media driver (`koe-media`).
//! `koe call` places a call and waits for its end, printing what happens as it happens (the
//! control connection streams progress lines: ringing, answered, live statistics every few
//! seconds); `koe up --auto-answer` answers every call; `koe echo-bot` answers with an echo
//! test; `koe mute` silences the microphone of the call in progress. Every call, answered or
//! not, ends up in the call history.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use koe_call::{Call, CallEvent, CallId, CallOutput, CallSignal, EndReason};
use koe_media::driver::{self, CallAudio, CallSummary, MediaControls, MediaStats, Microphone, RelayStreams, SoundQueue};
use koe_media::punch::NatMapping;
use koe_media::relay::{AllocationState, RelayServer, RelayTransport};
use koe_media::MediaSession;
use koe_overlay::RelayOffer;
use koe_types::{UnixTime, Username};
use koe_voice::{codec::DEFAULT_BITRATE, quality, wav, Backend, Transport, SAMPLE_RATE};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::api::{ApiError, Delivery};
use super::history::CallRecord;
use super::{DaemonState, Payload};

/// An automatically answered call (not the echo test) ends after this at the latest: a
/// bound for answering machines, not a length anyone should meet.
const AUTO_ANSWER_BOUND: Duration = Duration::from_secs(4 * 3600);
/// After the file to play ends, a call that hangs up then waits this long for its last audio.
const PLAYED_OUT_MARGIN: Duration = Duration::from_millis(500);

/// When an answered call ends by itself (else: when someone hangs up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TalkLimit {
    /// Until someone hangs up.
    None,
    /// `--duration`: this long after the answer.
    For(Duration),
    /// `--hang-up-when-played`: once the file to play has been sent (a call without one lasts
    /// until someone hangs up).
    UntilPlayed,
}

impl TalkLimit {
    pub fn of(duration: Option<Duration>, hang_up_when_played: bool) -> Self {
        match (duration, hang_up_when_played) {
            (Some(duration), _) => Self::For(duration),
            (None, true) => Self::UntilPlayed,
            (None, false) => Self::None,
        }
    }
}

/// Fails if a recording cannot be written at `path` (checked before a call, not after it).
pub fn check_recording_path(path: &Path) -> Result<(), ApiError> {
    let existed = path.exists();
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|error| ApiError::invalid(format!("cannot record the call to {}: {error}", path.display())))?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
/// How often `koe call` and `koe answer` print live statistics during a call.
const LIVE_EVERY: Duration = Duration::from_secs(5);

/// How calls are answered without a person: `koe up --auto-answer`, `koe echo-bot`.
#[derive(Debug, Clone)]
pub struct AutoAnswer {
    pub play: Option<PathBuf>,
    pub record: Option<PathBuf>,
    /// An echo test instead of `play`: listens this long, then plays it back and hangs up.
    pub echo: Option<Duration>,
}

/// Where a call's lines go as they happen: the control connection of `koe call` or `koe
/// answer`.
pub type ProgressSender = mpsc::UnboundedSender<String>;
/// `None` when nobody watches (a call answered automatically).
pub type Progress = Option<ProgressSender>;

/// What the person decides about a ringing call (`koe answer`, `koe decline`).
#[derive(Debug)]
pub enum Decision {
    /// Answer with these files; lines go to `progress`, the call's log to `reply` at its end.
    Answer { play: Option<PathBuf>, record: Option<PathBuf>, progress: Progress, reply: oneshot::Sender<Result<String, ApiError>> },
    Decline,
}

/// The lines of one call: kept for the end and sent to `progress` as they happen.
pub(super) struct CallLog {
    pub(super) text: String,
    progress: Progress,
    /// When the call began here (dialled, or the offer arrived).
    began: Instant,
    /// Why the call ended, once it has.
    ended: Option<String>,
    /// Why this side hangs up, when it is not the person (the file ended).
    hanging_up_because: Option<&'static str>,
    /// A gateway's bill for a call to a phone number, for the history.
    bill: Option<String>,
}

impl CallLog {
    pub(super) fn new(progress: Progress) -> Self {
        Self { text: String::new(), progress, began: Instant::now(), ended: None, hanging_up_because: None, bill: None }
    }

    pub(super) fn line(&mut self, line: impl Into<String>) {
        let line = line.into();
        self.live(line.clone());
        self.text.push_str(&line);
        self.text.push('\n');
    }

    /// A line only for whoever watches now (live statistics).
    fn live(&mut self, line: String) {
        if let Some(progress) = &self.progress {
            let _ = progress.send(line);
        }
    }
}

/// A call's hold on the device: its signals, and the order to hang up.
pub(super) type CallSlot = (mpsc::Receiver<CallSignal>, oneshot::Receiver<()>);

/// The calls of this device, by id: where their signals go, and how to hang them up.
#[derive(Debug, Default)]
pub struct Calls {
    /// Per call: the user on the other end (only their signals count) and where they go.
    signals: Mutex<HashMap<CallId, (Username, mpsc::Sender<CallSignal>)>>,
    hangups: Mutex<HashMap<CallId, oneshot::Sender<()>>>,
    /// Calls ringing here, oldest first, with who calls and where the decision goes.
    ringing: Mutex<Vec<(CallId, Username, mpsc::Sender<Decision>)>>,
    /// Calls whose media runs, with their mute switch and live statistics.
    talking: Mutex<HashMap<CallId, MediaControls>>,
    /// Answered calls this device placed, with where `koe dtmf`'s key presses go.
    keys: Mutex<HashMap<CallId, mpsc::UnboundedSender<String>>>,
    pub auto_answer: Option<AutoAnswer>,
    /// A gateway carries many calls at once; a person's device one.
    many_at_once: bool,
}

impl Calls {
    pub fn new(auto_answer: Option<AutoAnswer>, many_at_once: bool) -> Self {
        Self { auto_answer, many_at_once, ..Self::default() }
    }

    /// Takes this device's one call slot for call `id` with `peer`, unless another call holds
    /// it (busy: `None`). The check and the taking are one step under one lock: two offers
    /// arriving together, or an offer while a call is being dialled, cannot both pass.
    pub(super) fn reserve(&self, id: CallId, peer: &Username) -> Option<CallSlot> {
        let (signal_tx, signal_rx) = mpsc::channel(16);
        let (hangup_tx, hangup_rx) = oneshot::channel();
        let mut signals = self.signals.lock().ok()?;
        if !signals.is_empty() && !self.many_at_once {
            return None;
        }
        signals.insert(id, (peer.clone(), signal_tx));
        if let Ok(mut hangups) = self.hangups.lock() {
            hangups.insert(id, hangup_tx);
        }
        Some((signal_rx, hangup_rx))
    }

    pub(super) fn forget(&self, id: CallId) {
        if let Ok(mut signals) = self.signals.lock() {
            signals.remove(&id);
        }
        if let Ok(mut hangups) = self.hangups.lock() {
            hangups.remove(&id);
        }
        if let Ok(mut talking) = self.talking.lock() {
            talking.remove(&id);
        }
        if let Ok(mut keys) = self.keys.lock() {
            keys.remove(&id);
        }
    }

    /// `koe dtmf`: key presses for every answered call this device placed; says how many.
    pub fn press(&self, digits: &str) -> usize {
        let Ok(keys) = self.keys.lock() else { return 0 };
        keys.values().filter(|keys| keys.send(digits.to_string()).is_ok()).count()
    }

    /// `koe mute` / `koe mute off`: for every call in progress; says how many there are.
    pub fn mute(&self, on: bool) -> usize {
        let Ok(talking) = self.talking.lock() else { return 0 };
        for controls in talking.values() {
            controls.muted.store(on, Ordering::Relaxed);
        }
        talking.len()
    }

    /// `koe answer` / `koe decline`: hands the decision to the newest ringing call; says who
    /// was calling.
    pub async fn decide(&self, decision: Decision) -> Result<Username, ApiError> {
        let newest = self.ringing.lock().ok().and_then(|mut ringing| ringing.pop());
        let (_, from, decisions) = newest.ok_or(ApiError::NoRingingCall)?;
        decisions.send(decision).await.map_err(|_| ApiError::failed("that call has just ended"))?;
        Ok(from)
    }

    /// `koe hangup`: ends every call of this device.
    pub fn hang_up_all(&self) -> usize {
        let Ok(mut hangups) = self.hangups.lock() else { return 0 };
        let count = hangups.len();
        for (_, hangup) in hangups.drain() {
            let _ = hangup.send(());
        }
        count
    }
}

/// A signal from `from` arrived in an envelope.
pub fn on_signal(state: &Arc<DaemonState>, from: Username, signal: CallSignal) {
    if let CallSignal::Offer { call, dial, .. } = &signal {
        let slot = state.calls.reserve(*call, &from);
        let state = Arc::clone(state);
        match (dial.clone(), state.gateway.clone()) {
            (Some(number), Some(gateway)) => {
                tokio::spawn(async move { super::pstn::answer_skypeout(state, gateway, from, signal, number, slot).await });
            }
            (None, None) => {
                tokio::spawn(async move { answer_incoming(state, from, signal, slot).await });
            }
            (_, gateway) => {
                let reason = if gateway.is_some() { "this is a phone gateway: call a phone number" } else { "this user is not a phone gateway" };
                tokio::spawn(async move { super::pstn::refuse(state, from, signal, slot, reason).await });
            }
        }
        return;
    }
    let sender = state.calls.signals.lock().ok().and_then(|s| s.get(&signal.call()).cloned());
    match sender {
        Some((peer, sender)) if peer == from => {
            let _ = sender.try_send(signal);
        }
        Some(_) => warn!(%from, "a call signal from someone not in that call was ignored"),
        None => {}
    }
}

/// The parent supernode's address (its TCP listener; its STUN responder has the same UDP
/// port), if attached.
async fn parent_address(state: &DaemonState) -> Option<SocketAddr> {
    let parent = state.client.status().await.ok()?.parent?;
    let ip = parent.split('/').nth(2)?.parse::<IpAddr>().ok()?;
    Some(SocketAddr::new(ip, crate::commands::node::tcp_port(&parent)?))
}

/// After a call found UDP blocked, how long the next one's STUN query may take at least
/// (half its usual time-out: an answer comes in a round trip).
const UDP_RECHECK: Duration = Duration::from_millis(150);

/// How long a call waits for its relay allocations before it offers without them.
const RELAY_GATHER: Duration = Duration::from_millis(1500);

/// A call's network side before it starts: the media socket, the session with its candidates,
/// and the streams to relay nodes reached over TCP or TLS.
pub(super) struct CallNetwork {
    pub(super) socket: UdpSocket,
    pub(super) session: MediaSession,
    pub(super) streams: RelayStreams,
}

impl CallNetwork {
    /// Unused after all (nobody to call, the call not answered): its allocations end.
    fn release(&mut self) {
        driver::release_relays(&mut self.session, &self.socket);
    }
}

/// The call's media socket and session: host candidate on the address that routes to the
/// parent supernode (found without sending anything; else loopback), a server-reflexive one if
/// the parent's STUN responder sees this socket at another address (a NAT), and relayed ones
/// on the relay nodes the parent offers: over UDP when UDP works, else over TCP, or TLS through
/// an HTTP proxy. If the responder does not answer at all, UDP is probably blocked here, and
/// `log` says so. Behind a NAT, the relay node is asked too, to learn how the NAT maps (for port
/// guessing). With `--relay-only` only relayed candidates are offered.
pub(super) async fn media_socket(state: &DaemonState, log: &mut CallLog) -> Result<CallNetwork, String> {
    let parent = parent_address(state).await;
    let local_ip = parent
        .and_then(|parent| {
            let probe = std::net::UdpSocket::bind(SocketAddr::new(unspecified(parent.ip()), 0)).ok()?;
            probe.connect(parent).ok()?;
            probe.local_addr().ok()
        })
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |address| address.ip());
    let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0))
        .await
        .map_err(|e| format!("cannot open a socket for the call's audio: {e}"))?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let hosts = if state.relay_only { Vec::new() } else { vec![local] };
    let mut session = MediaSession::new(Instant::now(), &hosts).map_err(|e| e.to_string())?;
    let reflexive = async {
        match parent {
            Some(parent) => Some(koe_stun::reflexive_address(&socket, parent).await),
            None => None,
        }
    };
    let mut streams = RelayStreams::default();
    // UDP blocked on the last call: reach the relays over TCP at once, while the STUN query
    // checks again, instead of after its time-out; it gets only as long as the relays take.
    let udp_was_blocked = state.udp_blocked.load(Ordering::Relaxed);
    // The parent answers at once with its own relay, or within half a second with another
    // supernode's too; a parent that does not answer must not hold the call up.
    let relay_credentials = async {
        tokio::time::timeout(RELAY_GATHER, state.client.relay_credentials())
            .await
            .unwrap_or_else(|_| Err("the parent supernode did not offer relay nodes in time".into()))
    };
    let (reflexive, offers) = if udp_was_blocked {
        let offers = relay_credentials.await;
        let checking_since = Instant::now();
        let reflexive = {
            let mut relays = std::pin::pin!(add_relays(&mut session, &mut streams, local, offers.as_deref().unwrap_or_default(), false));
            let mut reflexive = std::pin::pin!(reflexive);
            tokio::select! {
                answer = &mut reflexive => {
                    relays.await;
                    answer
                }
                () = &mut relays => {
                    let deadline = tokio::time::Instant::from_std(checking_since + UDP_RECHECK);
                    tokio::time::timeout_at(deadline, reflexive).await.unwrap_or_else(|_| Some(Err(koe_stun::StunError::Timeout(checking_since.elapsed()))))
                }
            }
        };
        (reflexive, offers)
    } else {
        tokio::join!(reflexive, relay_credentials)
    };
    let mut udp_works = true;
    let offers = offers.unwrap_or_else(|error| {
        info!(%error, "no relay nodes from the parent supernode");
        Vec::new()
    });
    match reflexive {
        Some(Ok(mapped)) if !state.relay_only => {
            session.add_server_reflexive(mapped, local).map_err(|e| e.to_string())?;
            if mapped != local {
                session.set_nat_mapping(nat_mapping(&socket, mapped, &offers).await);
            }
        }
        Some(Err(koe_stun::StunError::Timeout(after))) => {
            udp_works = false;
            log.line(format!(
                "no answer over UDP from the parent supernode within {} ms: UDP may be blocked on this network; trying relays over TCP",
                after.as_millis()
            ));
        }
        Some(Err(error)) => info!(%error, "no server-reflexive candidate from the parent supernode"),
        _ => {}
    }
    state.udp_blocked.store(!udp_works, Ordering::Relaxed);
    if !udp_was_blocked {
        add_relays(&mut session, &mut streams, local, &offers, udp_works).await;
    }
    driver::gather_relays(&mut session, &socket, &mut streams, Instant::now() + RELAY_GATHER).await;
    let relays = session.relay_states();
    for (transport, server, state) in &relays {
        if let AllocationState::Failed(reason) = state {
            info!(%transport, %server, %reason, "no relayed candidate");
        }
    }
    let relayed = relays.iter().filter(|(_, _, state)| matches!(state, AllocationState::Ready(_))).count();
    if state.relay_only && relayed == 0 {
        return Err(if offers.is_empty() {
            "no relay node was offered by the parent supernode, and this client only calls through relays (--relay-only)".into()
        } else {
            "no relay node could be reached, and this client only calls through relays (--relay-only)".into()
        });
    }
    Ok(CallNetwork { socket, session, streams })
}

/// How the NAT in front of `socket` maps it: the parent supernode's STUN responder saw it at
/// `mapped`; the relay node beside the parent (another port, so another destination to the NAT)
/// is asked too. The same address means one mapping for every destination ("cone"); another
/// port, a mapping per destination ("symmetric"), which port guessing can get through.
async fn nat_mapping(socket: &UdpSocket, mapped: SocketAddr, offers: &[RelayOffer]) -> NatMapping {
    let Some(server) = offers.iter().find_map(|offer| offer.address.parse::<SocketAddr>().ok()) else {
        return NatMapping::Unknown;
    };
    match koe_stun::reflexive_address(socket, server).await {
        Ok(second) => NatMapping::from_reflexive(mapped, second),
        Err(error) => {
            info!(%error, "the relay node did not say where it sees this socket: NAT mapping unknown");
            NatMapping::Unknown
        }
    }
}

/// A relay node reached, ready for its allocation: over UDP (from the media socket), or over
/// a TCP or TLS stream from `local`.
struct ReachedRelay {
    server: RelayServer,
    /// The media socket's address, or the stream's local end.
    local: SocketAddr,
    stream: Option<Box<dyn driver::RelayStreamIo>>,
}

/// Reaches the offered relay nodes at the same time (over TCP or TLS each can take a round trip
/// or three, through a proxy more) and starts an allocation on each.
async fn add_relays(session: &mut MediaSession, streams: &mut RelayStreams, local: SocketAddr, offers: &[RelayOffer], udp_works: bool) {
    let (first, second) = tokio::join!(reach_relay(local, offers.first(), udp_works), reach_relay(local, offers.get(1), udp_works));
    for ReachedRelay { server, local, stream } in [first, second].into_iter().flatten() {
        let index = session.add_relay(server, local, Instant::now());
        if let Some(stream) = stream {
            streams.add(index, stream);
        }
    }
}

/// Reaches one offered relay node (if any): over UDP when UDP works and no proxy stands in the
/// way; else over TCP, or TLS (through the HTTP proxy if one is configured: proxies carry TLS).
async fn reach_relay(local: SocketAddr, offer: Option<&RelayOffer>, udp_works: bool) -> Option<ReachedRelay> {
    let offer = offer?;
    let Ok(address) = offer.address.parse::<SocketAddr>() else {
        info!(address = %offer.address, "a relay offer with an unusable address");
        return None;
    };
    let server = |transport, address| RelayServer { transport, address, username: offer.username.clone(), password: offer.password.clone() };
    let proxied = koe_proxy::for_host(&address.ip().to_string()).is_some();
    if udp_works && !proxied {
        return Some(ReachedRelay { server: server(RelayTransport::Udp, address), local, stream: None });
    }
    if !proxied {
        match tokio::time::timeout(RELAY_GATHER, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                if let Ok(stream_local) = stream.local_addr() {
                    // A slow path's backlog waits in the call's queue, where the oldest voice
                    // goes first, not in the kernel.
                    let _ = koe_relay::send_queue::limit_kernel_send_buffering(&stream);
                    return Some(ReachedRelay { server: server(RelayTransport::Tcp, address), local: stream_local, stream: Some(Box::new(stream)) });
                }
            }
            Ok(Err(error)) => info!(%address, %error, "cannot reach the relay over TCP; trying TLS"),
            Err(_) => info!(%address, "the relay did not accept TCP in time; trying TLS"),
        }
    }
    let (Some(tls_address), Some(fingerprint)) = (offer.tls_address.as_deref(), offer.tls_fingerprint.as_deref()) else { return None };
    match connect_tls(tls_address, fingerprint).await {
        Ok((stream, stream_local, address)) => Some(ReachedRelay { server: server(RelayTransport::Tls, address), local: stream_local, stream: Some(Box::new(stream)) }),
        Err(error) => {
            info!(%tls_address, %error, "cannot reach the relay over TLS");
            None
        }
    }
}

/// TURN over TLS to `address`, through the HTTP proxy if configured, accepting exactly the
/// certificate with `fingerprint` (the supernode that offered the relay vouches for it).
async fn connect_tls(
    address: &str,
    fingerprint: &str,
) -> Result<(tokio_rustls::client::TlsStream<tokio::net::TcpStream>, SocketAddr, SocketAddr), String> {
    let target: SocketAddr = address.parse().map_err(|_| format!("not an address: {address}"))?;
    let fingerprint = koe_types::network::TlsFingerprint::parse(fingerprint).ok_or("a relay offer with a malformed certificate fingerprint")?;
    let tcp = tokio::time::timeout(RELAY_GATHER, koe_proxy::connect(&target.ip().to_string(), target.port()))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = koe_relay::send_queue::limit_kernel_send_buffering(&tcp);
    let local = tcp.local_addr().map_err(|e| e.to_string())?;
    let config = koe_auth::tls::PinnedServerCertificate::new(fingerprint).client_config().map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("koe-relay").map_err(|e| e.to_string())?;
    let stream = tokio::time::timeout(RELAY_GATHER, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| "the TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
    // Through a proxy the local address is the proxy connection's: TURN only needs it to be
    // this stream's, consistently.
    Ok((stream, local, target))
}

fn unspecified(like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

fn microphone(play: Option<&Path>) -> Result<Vec<f32>, String> {
    play.map_or(Ok(Vec::new()), |path| wav::read_mono_48k(path).map_err(|e| e.to_string()))
}

#[cfg(feature = "audio-device")]
type SoundDevices = crate::sound::SoundDevices;
/// Without the `audio-device` feature there are none.
#[cfg(not(feature = "audio-device"))]
type SoundDevices = ();

/// What a call hears from this side and where what it hears goes.
struct Sound {
    microphone: Microphone,
    speaker: Option<SoundQueue>,
    /// Open while the call runs.
    _devices: Option<SoundDevices>,
}

impl Sound {
    /// The file to play if there is one, else the computer's microphone; the speaker plays
    /// the call either way (with the `audio-device` feature; a device that does not open is
    /// named in the call's log, and the call goes on without it).
    fn for_call(play: Option<&Path>, log: &mut CallLog) -> Result<Self, String> {
        let samples = play.map(|path| microphone(Some(path))).transpose()?;
        #[cfg(feature = "audio-device")]
        match crate::sound::SoundDevices::open() {
            Ok(devices) => {
                let microphone = samples.map_or_else(|| Microphone::Device(devices.microphone.clone()), Microphone::Samples);
                return Ok(Self { microphone, speaker: Some(devices.speaker.clone()), _devices: Some(devices) });
            }
            Err(error) => log.line(format!("no sound device ({error}): the call goes on without one")),
        }
        #[cfg(not(feature = "audio-device"))]
        if samples.is_none() {
            log.line("this build has no sound device support: sending silence and playing nothing (--play FILE.wav sends a file, --record FILE.wav keeps what you hear; build with --features koe/audio-device for the microphone and speaker)");
        }
        Ok(Self { microphone: Microphone::Samples(samples.unwrap_or_default()), speaker: None, _devices: None })
    }

    /// The echo test: no devices.
    fn echo(listen: Duration) -> Self {
        Self { microphone: Microphone::EchoBack { listen }, speaker: None, _devices: None }
    }
}

async fn send(state: &DaemonState, to: &Username, signal: CallSignal) -> Delivery {
    state.send(to, &Payload::Call { signal }).await
}

/// Carries out what the call wants: signals to the other user, events into `log`. Returns
/// the answer when there is one.
pub(super) async fn drain(state: &DaemonState, to: &Username, call: &mut Call, log: &mut CallLog) -> Option<(String, koe_media::MediaDescription)> {
    let mut answered = None;
    while let Some(output) = call.poll_output() {
        match output {
            CallOutput::Send(signal) => {
                if let Delivery::Undelivered { why } = send(state, to, signal).await {
                    warn!(%why, "a call signal was not delivered");
                }
            }
            CallOutput::Event(CallEvent::Ringing) => {
                // Dial to the callee's ringing signal back: call setup, plus half a round trip.
                let after = log.began.elapsed();
                log.line(format!("ringing ({} ms after dialling)", after.as_millis()));
            }
            CallOutput::Event(CallEvent::Incoming | CallEvent::Dtmf(_)) => {}
            CallOutput::Event(CallEvent::Notice(text)) => {
                if text.starts_with("billed ") {
                    log.bill = Some(text.clone());
                }
                log.line(text);
            }
            CallOutput::Event(CallEvent::Answered { device, remote_media }) => {
                log.line(format!("answered (device {device})"));
                answered = Some((device, remote_media));
            }
            CallOutput::Event(CallEvent::Ended(reason)) => {
                let reason = match (&reason, log.hanging_up_because.take()) {
                    (EndReason::HungUp, Some(because)) => because.to_string(),
                    _ => reason.to_string(),
                };
                log.line(format!("ended: {reason}"));
                log.ended = Some(reason);
            }
        }
    }
    answered
}

/// Writes the call into the history: who (a user, or the phone number called), when, how
/// long, why it ended (with a gateway's bill), path and quality.
pub(super) fn remember(state: &DaemonState, id: CallId, peer: &str, incoming: bool, started_at: UnixTime, log: &CallLog, media: Option<&MediaStats>) {
    let ended = log.ended.clone().unwrap_or_else(|| "ended".into());
    let record = CallRecord {
        call_id: format!("{:032x}", id.0),
        peer: peer.to_string(),
        incoming,
        started_at,
        talked_ms: media.filter(|m| m.connected_after.is_some()).map(|m| m.talked.as_millis() as u64),
        ended: match &log.bill {
            Some(bill) => format!("{ended}; {bill}"),
            None => ended,
        },
        path: media.and_then(|m| m.path).map(|p| p.to_string()),
        mos: media.filter(|m| m.connected_after.is_some()).map(mos),
    };
    match state.history() {
        Ok(history) => {
            if let Err(error) = history.add_call(&record) {
                warn!(%error, "could not write the call history");
            }
        }
        Err(error) => warn!(%error, "could not write the call history"),
    }
}

/// How long a call to a phone number waits, after its end, for the gateway's bill.
const BILL_WAIT: Duration = Duration::from_secs(5);

/// `koe call USER`: rings every device, waits for the answer, talks, hangs up; returns the log.
/// With `dial`, `to` is a gateway and `dial` the phone number it calls.
#[allow(clippy::too_many_arguments)]
pub async fn place(
    state: Arc<DaemonState>,
    to: Username,
    dial: Option<String>,
    play: Option<PathBuf>,
    record: Option<PathBuf>,
    limit: TalkLimit,
    progress: Progress,
) -> Result<String, ApiError> {
    if to == state.me {
        return Err(ApiError::invalid("you cannot call yourself"));
    }
    let id = CallId(u128::from(rand_core::RngCore::next_u64(&mut rand_core::OsRng)) << 64 | u128::from(rand_core::RngCore::next_u64(&mut rand_core::OsRng)));
    let Some((mut signals, hangup)) = state.calls.reserve(id, &to) else {
        return Err(ApiError::Busy);
    };
    if let Some(path) = &record {
        if let Err(error) = check_recording_path(path) {
            state.calls.forget(id);
            return Err(error);
        }
    }
    let result = dial_call(&state, &to, id, dial, play, record, limit, progress, &mut signals, hangup).await;
    // Free for the next call before the history is written (a redial must not find it busy).
    state.calls.forget(id);
    result
}

/// The call `place` reserved the device for: find the callee, ring, talk.
#[allow(clippy::too_many_arguments)]
async fn dial_call(
    state: &Arc<DaemonState>,
    to: &Username,
    id: CallId,
    number: Option<String>,
    play: Option<PathBuf>,
    record: Option<PathBuf>,
    limit: TalkLimit,
    progress: Progress,
    signals: &mut mpsc::Receiver<CallSignal>,
    hangup: oneshot::Receiver<()>,
) -> Result<String, ApiError> {
    let mut log = CallLog::new(progress);
    let sound = Sound::for_call(play.as_deref(), &mut log)?;
    // Find the callee while the media socket learns its outside address.
    let (devices, media) = tokio::join!(state.client.lookup(to.clone()), media_socket(state, &mut log));
    let mut media = media?;
    let devices = match devices {
        Ok(devices) if !devices.is_empty() => devices.len(),
        outcome => {
            media.release();
            let why = match outcome {
                Err(error) => ApiError::failed(error),
                Ok(_) => state.absence(to).await,
            };
            if matches!(why, ApiError::Offline { .. }) {
                // They see it when they come online, as Skype showed missed calls.
                let missed = Payload::MissedCall { at: UnixTime::now().as_secs() };
                if let Delivery::Undelivered { why } = state.send(to, &missed).await {
                    info!(%why, "no missed call left for the user called");
                }
            }
            return Err(why);
        }
    };
    let CallNetwork { socket, mut session, streams } = media;
    let (dialed, started_at) = (Instant::now(), UnixTime::now());
    match &number {
        Some(number) => log.line(format!("calling {number} through the gateway {to}…")),
        None => log.line(format!("calling {to} ({devices} device(s) online)…")),
    }
    let mut call = Call::dial_number(id, state.device.clone(), session.local_description(), devices, number.clone(), dialed, started_at.as_secs());
    tokio::pin!(hangup);
    let answered = loop {
        if let Some(answer) = drain(state, to, &mut call, &mut log).await {
            break Some(answer);
        }
        if call.is_over() {
            break None;
        }
        let timeout = call.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            Some(signal) = signals.recv() => call.handle_signal(signal),
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(timeout)) => call.handle_timeout(Instant::now()),
            _ = &mut hangup => call.hang_up(),
        }
    };
    let result = match answered {
        Some((_, remote_media)) => {
            log.line(format!("answered after {} ms", log.began.elapsed().as_millis()));
            let talk = match (limit, sound.microphone.length()) {
                (TalkLimit::For(duration), _) => Some((duration, None)),
                (TalkLimit::UntilPlayed, length) if !length.is_zero() => Some((length + PLAYED_OUT_MARGIN, Some("the file ended"))),
                _ => None,
            };
            let media = Media { session, socket, streams, remote: remote_media, caller: true, sound, record: record.clone(), talk };
            let talked = talk_until_done(state, to, id, &mut call, media, signals, hangup, &mut log).await.map(Some).map_err(ApiError::from);
            if number.is_some() {
                wait_for_bill(state, to, &mut call, signals, &mut log).await;
            }
            talked
        }
        None => {
            driver::release_relays(&mut session, &socket);
            Ok(None)
        }
    };
    // Free for the next call before the history is written (a redial must not find it busy).
    state.calls.forget(id);
    let peer = number.unwrap_or_else(|| to.to_string());
    remember(state, id, &peer, false, started_at, &log, result.as_ref().ok().and_then(Option::as_ref));
    result.map(|_| log.text)
}

/// After a call to a phone number: the gateway's bill comes once its ledger has posted it.
async fn wait_for_bill(state: &DaemonState, to: &Username, call: &mut Call, signals: &mut mpsc::Receiver<CallSignal>, log: &mut CallLog) {
    let deadline = tokio::time::Instant::now() + BILL_WAIT;
    while let Ok(Some(signal)) = tokio::time::timeout_at(deadline, signals.recv()).await {
        let bill = matches!(signal, CallSignal::Notice { .. });
        call.handle_signal(signal);
        drain(state, to, call, log).await;
        if bill {
            return;
        }
    }
}

/// The media side of an answered call: what to start it with.
struct Media {
    session: MediaSession,
    socket: UdpSocket,
    streams: RelayStreams,
    remote: koe_media::MediaDescription,
    caller: bool,
    sound: Sound,
    record: Option<PathBuf>,
    /// Hang up after this long, saying why if it is not "you hung up"; `None`: until someone
    /// hangs up.
    talk: Option<(Duration, Option<&'static str>)>,
}

/// Runs the media of an answered call until a hang-up (either side), the talk time, or a
/// failure; then ends the call, writes the recording and appends the summary to `log`.
#[allow(clippy::too_many_arguments)]
async fn talk_until_done(
    state: &DaemonState,
    to: &Username,
    id: CallId,
    call: &mut Call,
    media: Media,
    signals: &mut mpsc::Receiver<CallSignal>,
    hangup: impl std::future::Future<Output = Result<(), oneshot::error::RecvError>>,
    log: &mut CallLog,
) -> Result<MediaStats, String> {
    let Media { mut session, socket, streams, remote, caller, sound, record, talk } = media;
    if let Err(error) = session.start(&remote, caller) {
        driver::release_relays(&mut session, &socket);
        return Err(format!("the other side's media offer is unusable: {error}"));
    }
    let Sound { microphone, speaker, _devices } = sound;
    let audio = CallAudio { backend: Backend::OpusPure, bitrate: DEFAULT_BITRATE, microphone, speaker };
    let controls = MediaControls::default();
    if let Ok(mut talking) = state.calls.talking.lock() {
        talking.insert(id, controls.clone());
    }
    // `koe dtmf` reaches the calls this device placed (a gateway plays the keys to the phone).
    let (keys_tx, mut keys) = mpsc::unbounded_channel::<String>();
    if caller {
        if let Ok(mut all) = state.calls.keys.lock() {
            all.insert(id, keys_tx);
        }
    }
    let (stop_media, media_stopped) = oneshot::channel::<()>();
    let mut media = tokio::spawn(driver::run(session, socket, streams, audio, controls.clone(), async move {
        let _ = media_stopped.await;
    }));
    let mut stop_media = Some(stop_media);
    let talk_over = async {
        match talk {
            Some((after, _)) => tokio::time::sleep(after).await,
            None => std::future::pending().await,
        }
    };
    let mut live = tokio::time::interval_at(tokio::time::Instant::now() + LIVE_EVERY, LIVE_EVERY);
    tokio::pin!(talk_over, hangup);
    let summary = loop {
        tokio::select! {
            joined = &mut media => {
                break joined.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            }
            Some(signal) = signals.recv() => call.handle_signal(signal),
            Some(digits) = keys.recv() => {
                if let Err(error) = call.send_dtmf(digits) {
                    warn!(error, "key presses not sent");
                }
            }
            () = &mut talk_over, if stop_media.is_some() => {
                log.hanging_up_because = talk.and_then(|(_, because)| because);
                call.hang_up();
            }
            _ = &mut hangup, if stop_media.is_some() => call.hang_up(),
            _ = live.tick() => {
                let stats = controls.live.lock().map(|live| live.clone()).unwrap_or_default();
                log.live(live_line(&stats, controls.muted.load(Ordering::Relaxed)));
            }
        }
        drain(state, to, call, log).await;
        if call.is_over() {
            if let Some(stop) = stop_media.take() {
                let _ = stop.send(());
            }
        }
    };
    if let Some(reason) = &summary.failure {
        call.media_failed(reason);
    } else if !call.is_over() {
        call.hang_up();
    }
    drain(state, to, call, log).await;
    if let Some(path) = &record {
        wav::write_mono(path, &summary.recording, SAMPLE_RATE).map_err(|e| e.to_string())?;
    }
    for line in summary_text(&summary, record.as_deref()).lines() {
        log.line(line);
    }
    Ok(summary.stats)
}

/// An offer arrived: busy, stale, answered at once (`--auto-answer`), or ringing until the
/// person answers or declines (`koe answer`, `koe decline`) or the caller gives up.
async fn answer_incoming(state: Arc<DaemonState>, from: Username, offer: CallSignal, slot: Option<CallSlot>) {
    let CallSignal::Offer { call: id, media: remote_media, .. } = &offer else { return };
    let busy = slot.is_none();
    let Some(mut call) = Call::incoming(&offer, state.device.clone(), busy, Instant::now(), UnixTime::now().as_secs()) else {
        warn!(%from, "a stale or replayed call offer was ignored");
        if !busy {
            state.calls.forget(*id);
        }
        return;
    };
    let started_at = UnixTime::now();
    let mut log = CallLog::new(None);
    log.line(format!("call from {from}"));
    if busy {
        drain(&state, &from, &mut call, &mut log).await;
        info!(%from, "call refused: busy in another call");
        log.ended.get_or_insert_with(|| "busy in another call".into());
        remember(&state, *id, from.as_str(), true, started_at, &log, None);
        return;
    }
    let Some((mut signals, hangup)) = slot else { return };
    drain(&state, &from, &mut call, &mut log).await;
    let result = match state.calls.auto_answer.clone() {
        Some(auto) => answer_now(&state, &from, *id, &mut call, remote_media, auto, &mut signals, hangup, &mut log).await.map(Some),
        None => ring(&state, &from, &mut call, *id, remote_media, &mut signals, hangup, &mut log).await,
    };
    state.calls.forget(*id);
    remember(&state, *id, from.as_str(), true, started_at, &log, result.as_ref().ok().and_then(Option::as_ref));
    if log.ended.as_deref() == Some("missed") {
        state.publish(super::api::Event::MissedCall { from: from.to_string(), at: started_at.as_secs() });
    }
    match result {
        Ok(_) => info!("{}", log.text.trim_end().replace('\n', "; ")),
        Err(error) => warn!(%from, %error, "the call failed"),
    }
}

/// Rings until a decision, the caller's cancel, or the timeout; the media's statistics if
/// it was answered.
#[allow(clippy::too_many_arguments)]
async fn ring(
    state: &DaemonState,
    from: &Username,
    call: &mut Call,
    id: CallId,
    remote_media: &koe_media::MediaDescription,
    signals: &mut mpsc::Receiver<CallSignal>,
    hangup: oneshot::Receiver<()>,
    log: &mut CallLog,
) -> Result<Option<MediaStats>, String> {
    info!(%from, "incoming call: koe answer or koe decline");
    state.publish(super::api::Event::IncomingCall { from: from.to_string() });
    let (decisions_tx, mut decisions) = mpsc::channel(1);
    if let Ok(mut ringing) = state.calls.ringing.lock() {
        ringing.push((id, from.clone(), decisions_tx));
    }
    let mut answer = None;
    while !call.is_over() && answer.is_none() {
        let timeout = call.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            Some(signal) = signals.recv() => call.handle_signal(signal),
            Some(decision) = decisions.recv() => match decision {
                Decision::Answer { play, record, progress, reply } => {
                    log.progress = progress;
                    log.line(format!("answering the call from {from}"));
                    answer = Some((AutoAnswer { play, record, echo: None }, reply));
                }
                Decision::Decline => {
                    let _ = call.decline();
                }
            },
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(timeout)) => call.handle_timeout(Instant::now()),
        }
        drain(state, from, call, log).await;
    }
    if let Ok(mut ringing) = state.calls.ringing.lock() {
        ringing.retain(|(ringing_id, _, _)| *ringing_id != id);
    }
    let Some((files, reply)) = answer else {
        return Ok(None);
    };
    let result = answer_now(state, from, id, call, remote_media, files, signals, hangup, log).await;
    let _ = reply.send(result.as_ref().map(|_| String::new()).map_err(ApiError::failed));
    result.map(Some)
}

#[allow(clippy::too_many_arguments)]
async fn answer_now(
    state: &DaemonState,
    from: &Username,
    id: CallId,
    call: &mut Call,
    remote_media: &koe_media::MediaDescription,
    auto: AutoAnswer,
    signals: &mut mpsc::Receiver<CallSignal>,
    hangup: oneshot::Receiver<()>,
    log: &mut CallLog,
) -> Result<MediaStats, String> {
    let (sound, talk) = match auto.echo {
        // The echo test hangs up once it has played back what it heard.
        Some(listen) => {
            let echo = Sound::echo(listen);
            let length = echo.microphone.length();
            (echo, length + PLAYED_OUT_MARGIN)
        }
        // The caller decides how long the call lasts; this is only a bound.
        None => (Sound::for_call(auto.play.as_deref(), log)?, AUTO_ANSWER_BOUND),
    };
    let CallNetwork { socket, mut session, streams } = media_socket(state, log).await?;
    if let Err(error) = call.answer(session.local_description()) {
        driver::release_relays(&mut session, &socket);
        return Err(error.to_string());
    }
    drain(state, from, call, log).await;
    let media = Media { session, socket, streams, remote: remote_media.clone(), caller: false, sound, record: auto.record, talk: Some((talk, None)) };
    talk_until_done(state, from, id, call, media, signals, hangup, log).await
}

/// The E-model estimate of a call: the delay from mouth to ear (one frame, the jitter
/// buffer, half the round trip) and the loss left after recovery.
fn mos(stats: &MediaStats) -> f64 {
    let jitter = stats.receiver.jitter;
    let mouth_to_ear = Duration::from_millis(20) + jitter.playout_delay + stats.rtt.unwrap_or_default() / 2;
    quality::mos(mouth_to_ear, jitter.loss_after_recovery())
}

/// The voice bitrate sent so far (payload, without RTP/UDP headers).
fn kbit_per_s(stats: &MediaStats) -> f64 {
    let seconds = stats.talked.as_secs_f64();
    if seconds > 0.0 { stats.sender.payload_bytes as f64 * 8.0 / seconds / 1000.0 } else { 0.0 }
}

fn path_text(stats: &MediaStats) -> String {
    stats.path.map_or_else(|| "path not yet known".into(), |path| path.to_string())
}

fn rtt_text(stats: &MediaStats) -> String {
    stats.rtt.map_or_else(|| "not yet measured".into(), |rtt| format!("{:.1} ms", rtt.as_secs_f64() * 1000.0))
}

/// One line of live statistics, printed every few seconds during a call.
fn live_line(stats: &MediaStats, muted: bool) -> String {
    if stats.connected_after.is_none() {
        return "connecting the audio (ICE, DTLS)…".into();
    }
    let jitter = stats.receiver.jitter;
    let talked = stats.talked.as_secs();
    format!(
        "{}:{:02} {}; round trip {}; recent loss {:.1} % → {:.2} % after recovery so far; jitter buffer {} ms; sending {:.0} kbit/s; MOS {:.2}{}",
        talked / 60,
        talked % 60,
        path_text(stats),
        rtt_text(stats),
        jitter.loss_before_recovery * 100.0,
        jitter.loss_after_recovery() * 100.0,
        jitter.target_delay.as_millis(),
        kbit_per_s(stats),
        mos(stats),
        if muted { " (muted)" } else { "" }
    )
}

/// The summary printed after a call and logged by the callee.
fn summary_text(summary: &CallSummary, record: Option<&Path>) -> String {
    let stats = &summary.stats;
    let jitter = stats.receiver.jitter;
    let mut out = String::new();
    if stats.connected_after.is_none() {
        out.push_str("no audio: the media never connected\n");
        return out;
    }
    let _ = writeln!(out, "talked {:.1} s over {}; round trip {}", stats.talked.as_secs_f64(), path_text(stats), rtt_text(stats));
    for moved in &stats.path_moves {
        let at = moved.after.as_secs();
        let _ = writeln!(out, "at {}:{:02} the call moved from {} to {}", at / 60, at % 60, moved.from, moved.to);
    }
    let _ = writeln!(
        out,
        "received {} frames: {:.1} % lost on the way, {} late; {:.2} % missing after recovery ({} from copies, {} from FEC, {} concealed, {} too late)",
        jitter.frames,
        jitter.loss_on_the_way() * 100.0,
        jitter.late,
        jitter.loss_after_recovery() * 100.0,
        jitter.from_copies,
        jitter.from_fec,
        jitter.concealed,
        jitter.late_concealed
    );
    let stream = if jitter.transport == Transport::Stream { " for a byte-stream leg (TCP/TLS relay)" } else { "" };
    let _ = writeln!(
        out,
        "jitter buffer {} ms{stream}, moved by stretching the voice (−{} ms, +{} ms) and in pauses ({} frames dropped, {} inserted); waited {} times for audio that had not come",
        jitter.target_delay.as_millis(),
        stats.receiver.stretched_shorter.as_millis(),
        stats.receiver.stretched_longer.as_millis(),
        jitter.dropped,
        jitter.expanded,
        jitter.underruns
    );
    let reach = match stats.sender.reach {
        0 => String::new(),
        frames => format!(", reaching {} ms back", u64::from(frames) * koe_voice::codec::FRAME_MILLIS),
    };
    let twice = if stats.sender.twins { ", each packet sent twice" } else { "" };
    let _ = writeln!(
        out,
        "sent {:.0} kbit/s of voice with {} copies of earlier frames per packet{reach}{twice}",
        kbit_per_s(stats),
        stats.sender.redundancy
    );
    if stats.stream_frames_dropped > 0 {
        let _ = writeln!(out, "{} voice frames dropped before a relay stream that fell behind (the oldest first)", stats.stream_frames_dropped);
    }
    if stats.rejected_packets > 0 {
        let _ = writeln!(out, "{} packets failed SRTP authentication (or were replayed) and were dropped", stats.rejected_packets);
    }
    let _ = writeln!(out, "MOS (E-model estimate) {:.2}", mos(stats));
    if let Some(path) = record {
        let _ = writeln!(out, "recording: {}", path.display());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_has_one_call_slot_taken_atomically() {
        let calls = Calls::new(None, false);
        let (alice, carol) = (Username::parse_existing("alice").unwrap_or_else(|e| panic!("{e}")), Username::parse_existing("carol").unwrap_or_else(|e| panic!("{e}")));
        let first = calls.reserve(CallId(1), &alice);
        assert!(first.is_some());
        assert!(calls.reserve(CallId(2), &carol).is_none(), "a second call finds the device busy");
        calls.forget(CallId(1));
        assert!(calls.reserve(CallId(2), &carol).is_some(), "free again once the first call is over");
    }
}
