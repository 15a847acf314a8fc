//! A test and demo phone: a SIP user agent that answers calls (a UAS), the telephone at the far
//! end of a trunk. `koe demo` dials it through a real gateway, and the tests use it as a carrier
//! that needs nothing beyond cargo (sipp and baresip stand in for real carriers elsewhere).
//!
//! Two parts, as everywhere in this crate:
//! - [`PhoneAudio`], sans-IO: the call's RTP in G.711. It says a greeting when answered,
//!   echoes what it hears (so the caller hears themselves, through every codec and resampler
//!   on the way), records what it hears, and turns RFC 4733 packets into key presses. Packets
//!   in, packets out, milliseconds passed in.
//! - [`Phone`], the driver on rsipstack: one SIP endpoint on one address, one call at a time
//!   (another INVITE meanwhile is busy, 486), ringing for a moment before it answers with an
//!   SDP answer (the offerer's G.711 plus `telephone-event`), and a BYE from either side.
//!   Like [`crate::trunk`], it keeps rsipstack's names to itself: a phone is a [`Phone`] and a
//!   channel of [`PhoneEvent`]s.

use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rsipstack::dialog::dialog::{DialogState, DialogStateReceiver, TerminatedReason};
use rsipstack::dialog::dialog_layer::DialogLayer;
use rsipstack::dialog::invite_dialog::InviteDialog;
use rsipstack::platform::CancellationToken;
use rsipstack::sip::prelude::{HeadersExt, ToTypedHeader};
use rsipstack::sip::{Header, Method, StatusCode, Uri};
use rsipstack::transaction::endpoint::EndpointOption;
use rsipstack::transaction::transaction::Transaction;
use rsipstack::transport::udp::UdpConnection;
use rsipstack::transport::TransportLayer;
use rsipstack::EndpointBuilder;
use thiserror::Error;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::dtmf::{DtmfDigit, DtmfReceiver, TelephoneEvent};
use crate::g711::{G711Law, G711_CLOCK_RATE_HZ};
use crate::rtp::{self, RtpSender};
use crate::sdp::{self, Codec, LocalAudio, RemoteAudio, SessionDescription};

/// What the phone calls itself in SIP.
pub const USER_AGENT: &str = concat!("Koe-phone/", env!("CARGO_PKG_VERSION"));
/// 8 kHz samples in one 20 ms packet.
pub const PACKET_SAMPLES: usize = 160;
/// How often the phone sends a packet.
pub const PACKET_INTERVAL: Duration = Duration::from_millis(20);
/// How long the phone rings before it answers, unless told otherwise.
pub const DEFAULT_RING: Duration = Duration::from_millis(300);
/// The most of what it heard the phone holds back for its echo: a burst of packets is dropped
/// oldest first rather than making the echo lag behind for the rest of the call.
const MAX_ECHO_SAMPLES: usize = PACKET_SAMPLES * 10;
/// What the phone answers in, most preferred first: the telephone network's two codecs.
const ANSWERED_CODECS: [Codec; 2] = [Codec::Pcmu, Codec::Pcma];
/// How long a SIP request waits for its response (and our 200 for its ACK): a phone on
/// loopback or a LAN needs far less than RFC 3261's 32 s, and a test should not wait that long.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(8);
/// A 20 ms frame quieter than this (RMS, of full scale) counts as silence in
/// [`voiced_ms`]: about -40 dBFS, well under speech and above G.711's idle noise.
const VOICED_RMS: f32 = 0.01;

/// Counts of one call's RTP, for its report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PhoneMediaStats {
    pub packets_sent: u64,
    pub packets_received: u64,
    /// Packets missing by sequence number.
    pub packets_lost: u64,
    /// Packets that were not RTP, not for this call's formats, or arrived late (dropped).
    pub packets_refused: u64,
}

/// The phone's side of one call's audio, sans-IO: G.711 at 8 kHz on the payload types the
/// caller offered.
#[derive(Debug)]
pub struct PhoneAudio {
    remote: RemoteAudio,
    law: G711Law,
    sender: RtpSender,
    greeting: VecDeque<i16>,
    /// What it heard and has not yet said back; `None` when the phone does not echo.
    echo: Option<VecDeque<i16>>,
    heard: Vec<i16>,
    dtmf: Option<DtmfReceiver>,
    digits: VecDeque<DtmfDigit>,
    expected_sequence: Option<u16>,
    first_packet: bool,
    stats: PhoneMediaStats,
}

impl PhoneAudio {
    /// The audio of a call negotiated into `remote`: the phone says `greeting` (8 kHz) first,
    /// and echoes what it hears if `echo`. `random` seeds the stream's SSRC, first sequence
    /// number and timestamp (RFC 3550 wants them random; tests pass a fixed one).
    pub fn new(remote: RemoteAudio, greeting: &[i16], echo: bool, random: u64) -> PhoneAudio {
        let law = match remote.codec {
            Codec::Pcma => G711Law::Alaw,
            _ => G711Law::Ulaw,
        };
        PhoneAudio {
            remote,
            law,
            sender: RtpSender::new(random as u32, (random >> 32) as u16, (random >> 48) as u32, G711_CLOCK_RATE_HZ),
            greeting: greeting.iter().copied().collect(),
            echo: echo.then(VecDeque::new),
            heard: Vec::new(),
            dtmf: DtmfReceiver::new(G711_CLOCK_RATE_HZ).ok(),
            digits: VecDeque::new(),
            expected_sequence: None,
            first_packet: true,
            stats: PhoneMediaStats::default(),
        }
    }

    /// Where and how the caller's audio goes now (a re-INVITE moved it).
    pub fn repoint(&mut self, remote: RemoteAudio) {
        if (remote.addr, remote.port) != (self.remote.addr, self.remote.port) {
            self.expected_sequence = None;
            if let Some(dtmf) = self.dtmf.as_mut() {
                dtmf.reset();
            }
        }
        self.remote = remote;
    }

    /// Where the phone sends its packets.
    pub fn destination(&self) -> SocketAddr {
        SocketAddr::new(self.remote.addr, self.remote.port)
    }

    /// One datagram from `from`, arrived at `now_ms` (any clock, in milliseconds). Only the
    /// caller's media address is heard (by IP: a NAT may change the port); anything else is
    /// counted and dropped.
    pub fn handle_packet(&mut self, now_ms: u64, from: SocketAddr, packet: &[u8]) {
        if from.ip() != self.remote.addr {
            self.stats.packets_refused += 1;
            return;
        }
        if rtp::is_rtcp(packet) {
            return;
        }
        let Ok((header, body)) = rtp::parse(packet) else {
            self.stats.packets_refused += 1;
            return;
        };
        self.stats.packets_received += 1;
        if let Some(expected) = self.expected_sequence {
            let ahead = header.sequence.wrapping_sub(expected);
            if ahead >= 0x8000 {
                self.stats.packets_refused += 1;
                return;
            }
            self.stats.packets_lost += u64::from(ahead);
        }
        self.expected_sequence = Some(header.sequence.wrapping_add(1));
        if Some(header.payload_type) == self.remote.telephone_event_pt {
            match (TelephoneEvent::decode(body), self.dtmf.as_mut()) {
                (Ok(event), Some(dtmf)) => {
                    dtmf.handle_packet(now_ms, header.timestamp, event);
                    self.collect_digits();
                }
                _ => self.stats.packets_refused += 1,
            }
        } else if header.payload_type == self.remote.codec_pt {
            let start = self.heard.len();
            self.law.decode_into(body, &mut self.heard);
            if let Some(echo) = self.echo.as_mut() {
                echo.extend(&self.heard[start..]);
                let excess = echo.len().saturating_sub(MAX_ECHO_SAMPLES);
                echo.drain(..excess);
            }
        } else {
            self.stats.packets_refused += 1;
        }
    }

    /// Lets time pass: a key press whose end packets were all lost is reported after a while.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if let Some(dtmf) = self.dtmf.as_mut() {
            dtmf.handle_timeout(now_ms);
        }
        self.collect_digits();
    }

    /// Writes the next 20 ms packet for the caller into `out` (cleared first): the greeting
    /// while it lasts, mixed with the echo of what the phone heard, else silence. `false`, and
    /// nothing written, while the caller holds the call and wants nothing sent.
    pub fn next_packet(&mut self, out: &mut Vec<u8>) -> bool {
        out.clear();
        if !self.remote.direction.receives() {
            return false;
        }
        let mut pcm = [0i16; PACKET_SAMPLES];
        for sample in &mut pcm {
            let said = self.greeting.pop_front().unwrap_or(0);
            let echoed = self.echo.as_mut().and_then(VecDeque::pop_front).unwrap_or(0);
            *sample = said.saturating_add(echoed);
        }
        let mut payload = Vec::with_capacity(PACKET_SAMPLES);
        self.law.encode_into(&pcm, &mut payload);
        // The marker starts the talkspurt (RFC 3551 §4.1).
        let header = self.sender.next(self.remote.codec_pt, self.first_packet, PACKET_SAMPLES as u32);
        self.first_packet = false;
        header.write(&payload, out);
        self.stats.packets_sent += 1;
        true
    }

    /// The next key the caller pressed, oldest first.
    pub fn poll_digit(&mut self) -> Option<DtmfDigit> {
        self.digits.pop_front()
    }

    /// Everything the phone heard, 8 kHz.
    pub fn heard(&self) -> &[i16] {
        &self.heard
    }

    pub fn stats(&self) -> PhoneMediaStats {
        self.stats
    }

    pub fn codec(&self) -> Codec {
        self.remote.codec
    }

    fn collect_digits(&mut self) {
        let Some(dtmf) = self.dtmf.as_mut() else { return };
        while let Some(received) = dtmf.poll_digit() {
            self.digits.push_back(received.digit);
        }
    }
}

/// A two-note chime ("ding-dong"), 8 kHz: what the phone says when it answers, so a caller
/// knows at once that the far end is there, and tests can tell it from their own tone.
pub fn chime() -> Vec<i16> {
    const LEVEL: f32 = 0.25;
    let note = |hz: f32, ms: usize| {
        let length = G711_CLOCK_RATE_HZ as usize * ms / 1000;
        (0..length).map(move |i| {
            // A short fade in and out, so the notes do not click.
            let fade = (i.min(length - i) as f32 / 80.0).min(1.0);
            let phase = std::f32::consts::TAU * hz * i as f32 / G711_CLOCK_RATE_HZ as f32;
            (LEVEL * fade * phase.sin() * f32::from(i16::MAX)) as i16
        })
    };
    note(CHIME_HZ[0], 250).chain(note(CHIME_HZ[1], 400)).collect()
}

/// The chime's two notes.
pub const CHIME_HZ: [f32; 2] = [880.0, 660.0];

/// How much of `samples` (8 kHz) is sound rather than silence, in milliseconds of 20 ms frames.
pub fn voiced_ms(samples: &[i16]) -> u64 {
    let voiced = samples
        .chunks(PACKET_SAMPLES)
        .filter(|frame| {
            let energy: f32 = frame.iter().map(|&s| (f32::from(s) / f32::from(i16::MAX)).powi(2)).sum();
            (energy / frame.len() as f32).sqrt() > VOICED_RMS
        })
        .count();
    voiced as u64 * PACKET_INTERVAL.as_millis() as u64
}

/// How a phone behaves.
#[derive(Debug, Clone)]
pub struct PhoneConfig {
    /// The UDP address of its SIP endpoint; its RTP ports are taken on the same IP. Bind a
    /// concrete IP: it goes into Via, Contact and the SDP.
    pub listen: SocketAddr,
    /// How long it rings (180) before it answers.
    pub ring: Duration,
    /// What it says when it answers, 8 kHz ([`chime`] by default).
    pub greeting: Vec<i16>,
    /// Whether it says back what it hears.
    pub echo: bool,
    /// It hangs up by itself this long after answering.
    pub hang_up_after: Option<Duration>,
}

impl PhoneConfig {
    /// A phone on `listen` that rings briefly, answers with the chime and echoes.
    pub fn new(listen: SocketAddr) -> PhoneConfig {
        PhoneConfig { listen, ring: DEFAULT_RING, greeting: chime(), echo: true, hang_up_after: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PhoneError {
    #[error("the phone cannot listen on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
}

/// How a call the phone took ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhoneCallEnd {
    /// The caller sent BYE.
    CallerHungUp,
    /// The phone sent BYE ([`Phone::hang_up`] or [`PhoneConfig::hang_up_after`]).
    PhoneHungUp,
    /// The caller cancelled while it rang.
    Cancelled,
    /// The phone was hung up while it rang: it declined the call (603).
    Declined,
    /// Our 200 OK never got its ACK.
    NoAck,
    /// The dialog died otherwise.
    Failed,
}

impl fmt::Display for PhoneCallEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CallerHungUp => "the caller hung up",
            Self::PhoneHungUp => "the phone hung up",
            Self::Cancelled => "the caller cancelled while it rang",
            Self::Declined => "the phone declined the call",
            Self::NoAck => "the caller never acknowledged the answer",
            Self::Failed => "the call failed",
        })
    }
}

/// One call the phone took, when it is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhoneCall {
    /// The number dialled (the Request-URI's user part).
    pub number: String,
    /// The codec it answered in; `None` if it never answered.
    pub codec: Option<Codec>,
    pub end: PhoneCallEnd,
    /// From the answer to the end.
    pub talked: Duration,
    /// What it heard, 8 kHz.
    pub heard: Vec<i16>,
    /// Keys the caller pressed (RFC 4733), in order.
    pub digits: Vec<DtmfDigit>,
    pub media: PhoneMediaStats,
}

/// What the phone reports as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhoneEvent {
    /// A call for `number` arrived; the phone rings.
    Ringing { number: String },
    /// The phone answered (sent 200 OK with its SDP answer).
    Answered { number: String, codec: Codec },
    /// The caller pressed a key.
    Digit(DtmfDigit),
    /// A call was refused with `code`: 486 while another is in progress, 488 for an offer it
    /// cannot answer.
    Refused { number: String, code: u16 },
    /// The call is over.
    Ended(PhoneCall),
}

#[derive(Debug, Clone, Copy)]
enum PhoneCommand {
    HangUp,
}

/// A running phone. Dropping it stops it.
#[derive(Debug)]
pub struct Phone {
    local: SocketAddr,
    events: mpsc::UnboundedReceiver<PhoneEvent>,
    commands: mpsc::UnboundedSender<PhoneCommand>,
    cancel: CancellationToken,
}

impl Phone {
    /// Opens the phone's SIP endpoint and starts answering.
    pub async fn start(config: PhoneConfig) -> Result<Phone, PhoneError> {
        let bind_error = |error: &dyn fmt::Display| PhoneError::Bind { addr: config.listen, reason: error.to_string() };
        let cancel = CancellationToken::new();
        let transport_layer = TransportLayer::new(cancel.child_token());
        let udp = UdpConnection::create_connection(config.listen, None, Some(cancel.child_token()))
            .await
            .map_err(|e| bind_error(&e))?;
        let local: SocketAddr = udp.get_addr().get_socketaddr().map_err(|e| bind_error(&e))?;
        transport_layer.add_transport(udp.into());
        let option = EndpointOption { callid_suffix: Some("phone.koe.invalid".into()), t1x64: TRANSACTION_TIMEOUT, ..Default::default() };
        let endpoint = EndpointBuilder::new()
            .with_user_agent(USER_AGENT)
            .with_cancel_token(cancel.clone())
            .with_option(option)
            .with_transport_layer(transport_layer)
            .build();
        let incoming = endpoint.incoming_transactions().map_err(|e| bind_error(&e))?;
        let dialog_layer = Arc::new(DialogLayer::new(endpoint.inner.clone()));
        let inner = endpoint.inner.clone();
        tokio::spawn(async move {
            if let Err(error) = inner.serve().await {
                debug!(%error, "the phone's SIP endpoint stopped");
            }
        });
        let contact = Uri::try_from(format!("sip:phone@{local}").as_str()).map_err(|e| bind_error(&e))?;
        let (events_tx, events) = mpsc::unbounded_channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let driver = Driver { config, dialog_layer, contact, ip: local.ip(), events: events_tx, started: Instant::now(), call: None };
        tokio::spawn(driver.run(incoming, commands_rx, cancel.clone()));
        info!(sip = %local, "phone answering");
        Ok(Phone { local, events, commands, cancel })
    }

    /// Where the phone's SIP endpoint listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The trunk a gateway reaches this phone through (`--trunk`).
    pub fn trunk_uri(&self) -> String {
        format!("sip:{}", self.local)
    }

    /// The next thing that happened; `None` once the phone has stopped.
    pub async fn next_event(&mut self) -> Option<PhoneEvent> {
        self.events.recv().await
    }

    /// Hangs up the call in progress (BYE), or declines it while it rings (603); nothing if
    /// there is none.
    pub fn hang_up(&self) {
        let _ = self.commands.send(PhoneCommand::HangUp);
    }

    /// Stops the phone: its endpoint closes, and a call in progress is left to time out.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Phone {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The call in progress, from its INVITE to its end.
struct ActiveCall {
    dialog: InviteDialog,
    states: DialogStateReceiver,
    number: String,
    offer: SessionDescription,
    local: LocalAudio,
    remote: RemoteAudio,
    socket: Arc<UdpSocket>,
    /// When to answer, while it rings.
    answer_at: Option<Instant>,
    answered_at: Option<Instant>,
    hang_up_at: Option<Instant>,
    /// Started when the caller acknowledges the answer.
    audio: Option<PhoneAudio>,
    next_packet_at: Instant,
    hung_up_here: bool,
    digits: Vec<DtmfDigit>,
}

impl ActiveCall {
    /// Whether the phone sends and receives audio: from the caller's ACK to either side's BYE.
    fn talking(&self) -> bool {
        self.audio.is_some() && !self.hung_up_here
    }
}

/// What woke the driver.
enum Wake {
    // Boxed: a transaction and a dialog state are hundreds of bytes beside the other wakes.
    Transaction(Option<Box<Transaction>>),
    State(Option<Box<DialogState>>),
    /// A datagram's length and sender; `None` for a failed read.
    Rtp(Option<(usize, SocketAddr)>),
    Command(Option<PhoneCommand>),
    Timer,
    Stop,
}

/// The phone's one task: its SIP transactions, its call's dialog states, RTP and timers.
struct Driver {
    config: PhoneConfig,
    dialog_layer: Arc<DialogLayer>,
    contact: Uri,
    ip: IpAddr,
    events: mpsc::UnboundedSender<PhoneEvent>,
    started: Instant,
    call: Option<ActiveCall>,
}

impl Driver {
    async fn run(
        mut self,
        mut incoming: rsipstack::transaction::TransactionReceiver,
        mut commands: mpsc::UnboundedReceiver<PhoneCommand>,
        cancel: CancellationToken,
    ) {
        let mut buffer = vec![0u8; 2048];
        let mut commands_open = true;
        loop {
            let deadline = self.next_deadline();
            let socket = self.call.as_ref().filter(|call| call.talking()).map(|call| Arc::clone(&call.socket));
            let wake = {
                let states = self.call.as_mut().map(|call| &mut call.states);
                let state = async {
                    match states {
                        Some(states) => states.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let rtp = async {
                    match &socket {
                        Some(socket) => socket.recv_from(&mut buffer).await.ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = cancel.cancelled() => Wake::Stop,
                    transaction = incoming.recv() => Wake::Transaction(transaction.map(Box::new)),
                    state = state => Wake::State(state.map(Box::new)),
                    received = rtp => Wake::Rtp(received),
                    command = commands.recv(), if commands_open => Wake::Command(command),
                    () = sleep_until(deadline) => Wake::Timer,
                }
            };
            match wake {
                Wake::Stop | Wake::Transaction(None) => break,
                Wake::Transaction(Some(transaction)) => self.on_transaction(*transaction).await,
                Wake::State(Some(state)) => self.on_state(*state).await,
                // The dialog is gone without a Terminated: as good as failed.
                Wake::State(None) => self.finish(PhoneCallEnd::Failed),
                Wake::Rtp(None) => {}
                Wake::Rtp(Some((length, from))) => {
                    let now_ms = self.now_ms();
                    if let Some(audio) = self.call.as_mut().and_then(|call| call.audio.as_mut()) {
                        audio.handle_packet(now_ms, from, &buffer[..length]);
                    }
                    self.report_digits();
                }
                Wake::Command(Some(PhoneCommand::HangUp)) => self.hang_up(),
                Wake::Command(None) => commands_open = false,
                Wake::Timer => self.on_timeout().await,
            }
        }
        if let Some(call) = self.call.take() {
            self.dialog_layer.remove_dialog(&call.dialog.id());
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn next_deadline(&self) -> Option<Instant> {
        let call = self.call.as_ref()?;
        let packet = call.talking().then_some(call.next_packet_at);
        [call.answer_at, call.hang_up_at, packet].into_iter().flatten().min()
    }

    /// Routes a request: in-dialog ones to their dialog, a new INVITE to the phone.
    async fn on_transaction(&mut self, mut transaction: Transaction) {
        let has_to_tag = transaction.original.to_header().ok().and_then(|to| to.typed().ok()).is_some_and(|to| to.tag().is_some());
        if has_to_tag {
            match self.dialog_layer.match_dialog(&transaction) {
                Some(mut dialog) => {
                    tokio::spawn(async move {
                        if let Err(error) = dialog.handle(&mut transaction).await {
                            debug!(%error, "an in-dialog request to the phone failed");
                        }
                    });
                }
                None if transaction.original.method == Method::Ack => {}
                None => {
                    let _ = transaction.reply(StatusCode::CallTransactionDoesNotExist).await;
                }
            }
            return;
        }
        match transaction.original.method {
            Method::Invite => self.on_invite(transaction).await,
            Method::Options => {
                let _ = transaction.reply(StatusCode::OK).await;
            }
            Method::Ack => {}
            _ => {
                let _ = transaction.reply(StatusCode::MethodNotAllowed).await;
            }
        }
    }

    /// A new call: busy if one is in progress, 488 if its offer has no audio the phone
    /// speaks; else it rings (on the dialog's `Calling`) and answers after a moment.
    async fn on_invite(&mut self, mut transaction: Transaction) {
        let number = transaction.original.uri.auth.as_ref().map(|auth| auth.user.clone()).unwrap_or_default();
        if self.call.is_some() {
            let _ = transaction.reply(StatusCode::BusyHere).await;
            let _ = self.events.send(PhoneEvent::Refused { number, code: 486 });
            return;
        }
        let body = String::from_utf8_lossy(&transaction.original.body).into_owned();
        let negotiated = sdp::parse(&body).and_then(|offer| {
            let remote = offer.negotiate(&ANSWERED_CODECS)?;
            Ok((offer, remote))
        });
        let (offer, remote) = match negotiated {
            Ok(negotiated) => negotiated,
            Err(error) => {
                debug!(%error, "an offer the phone cannot answer");
                let _ = transaction.reply(StatusCode::NotAcceptableHere).await;
                let _ = self.events.send(PhoneEvent::Refused { number, code: 488 });
                return;
            }
        };
        let (rtp_addr, socket) = match UdpSocket::bind(SocketAddr::new(self.ip, 0)).await.and_then(|s| Ok((s.local_addr()?, s))) {
            Ok((addr, socket)) => (addr, Arc::new(socket)),
            Err(error) => {
                debug!(%error, "the phone has no RTP port");
                let _ = transaction.reply(StatusCode::ServerInternalError).await;
                return;
            }
        };
        let (state_sender, states) = self.dialog_layer.new_dialog_state_channel();
        let dialog = match self.dialog_layer.get_or_create_server_invite(&transaction, state_sender, None, Some(self.contact.clone())) {
            Ok(dialog) => dialog,
            Err(error) => {
                debug!(%error, "the phone cannot take the call");
                let _ = transaction.reply(StatusCode::ServerInternalError).await;
                return;
            }
        };
        let random = crate::ledger::BillingId::random().0;
        let local = LocalAudio::new(rtp_addr.ip(), rtp_addr.port(), (random >> 65) as u64);
        let mut handler = dialog.clone();
        tokio::spawn(async move {
            if let Err(error) = handler.handle(&mut transaction).await {
                debug!(%error, "the INVITE to the phone failed");
            }
        });
        self.call = Some(ActiveCall {
            dialog,
            states,
            number,
            offer,
            local,
            remote,
            socket,
            answer_at: None,
            answered_at: None,
            hang_up_at: None,
            audio: None,
            next_packet_at: Instant::now(),
            hung_up_here: false,
            digits: Vec::new(),
        });
    }

    async fn on_state(&mut self, state: DialogState) {
        let Some(call) = self.call.as_mut() else { return };
        match state {
            DialogState::Calling(_) if call.answer_at.is_none() && call.answered_at.is_none() => {
                if let Err(error) = call.dialog.ringing(None, None) {
                    debug!(%error, "the phone could not ring");
                }
                call.answer_at = Some(Instant::now() + self.config.ring);
                let _ = self.events.send(PhoneEvent::Ringing { number: call.number.clone() });
            }
            // The caller acknowledged the answer: the phone starts talking. (A re-INVITE's
            // exchange ends in `Confirmed` again; the audio is running by then.)
            DialogState::Confirmed(..) if call.audio.is_none() && call.answered_at.is_some() => {
                let random = crate::ledger::BillingId::random().0 as u64;
                call.audio = Some(PhoneAudio::new(call.remote, &self.config.greeting, self.config.echo, random));
                call.next_packet_at = Instant::now();
            }
            DialogState::Updated(_, request, handle) if request.method == Method::Invite => {
                let reoffer = String::from_utf8_lossy(&request.body).into_owned();
                let answer = if reoffer.trim().is_empty() {
                    Some(sdp::offer(&call.local))
                } else {
                    sdp::parse(&reoffer).ok().and_then(|offer| {
                        let remote = offer.negotiate(&ANSWERED_CODECS).ok()?;
                        call.remote = remote;
                        if let Some(audio) = call.audio.as_mut() {
                            audio.repoint(remote);
                        }
                        let answer = sdp::answer(&offer, &remote, &call.local);
                        call.offer = offer;
                        Some(answer)
                    })
                };
                match answer {
                    Some(answer) => {
                        let headers = vec![Header::ContentType("application/sdp".into())];
                        let _ = handle.respond(StatusCode::OK, Some(headers), Some(answer.into_bytes())).await;
                    }
                    None => {
                        let _ = handle.reply(StatusCode::NotAcceptableHere).await;
                    }
                }
            }
            DialogState::Updated(_, _, handle)
            | DialogState::Info(_, _, handle)
            | DialogState::Options(_, _, handle)
            | DialogState::Notify(_, _, handle)
            | DialogState::Message(_, _, handle) => {
                let _ = handle.reply(StatusCode::OK).await;
            }
            DialogState::Refer(_, _, handle) | DialogState::Publish(_, _, handle) => {
                let _ = handle.reply(StatusCode::Decline).await;
            }
            DialogState::Terminated(_, reason) => {
                let end = match reason {
                    TerminatedReason::UasDecline => PhoneCallEnd::Declined,
                    _ if call.hung_up_here => PhoneCallEnd::PhoneHungUp,
                    TerminatedReason::UacBye => PhoneCallEnd::CallerHungUp,
                    TerminatedReason::UasBye => PhoneCallEnd::PhoneHungUp,
                    TerminatedReason::UacCancel => PhoneCallEnd::Cancelled,
                    TerminatedReason::Timeout => PhoneCallEnd::NoAck,
                    _ => PhoneCallEnd::Failed,
                };
                self.finish(end);
            }
            _ => {}
        }
    }

    async fn on_timeout(&mut self) {
        let now = Instant::now();
        let now_ms = self.now_ms();
        let Some(call) = self.call.as_mut() else { return };
        if call.answer_at.is_some_and(|at| at <= now) {
            call.answer_at = None;
            // A CANCEL may have won the race; its Terminated is on its way.
            if matches!(call.dialog.state(), DialogState::Calling(_) | DialogState::Early(..)) {
                let answer = sdp::answer(&call.offer, &call.remote, &call.local);
                let headers = vec![Header::ContentType("application/sdp".into())];
                match call.dialog.accept(Some(headers), Some(answer.into_bytes())) {
                    Ok(()) => {
                        call.answered_at = Some(now);
                        call.hang_up_at = self.config.hang_up_after.map(|after| now + after);
                        let _ = self.events.send(PhoneEvent::Answered { number: call.number.clone(), codec: call.remote.codec });
                    }
                    Err(error) => debug!(%error, "the phone could not answer"),
                }
            }
        }
        if call.hang_up_at.is_some_and(|at| at <= now) {
            call.hang_up_at = None;
            self.hang_up();
            return;
        }
        let Some(audio) = call.audio.as_mut().filter(|_| !call.hung_up_here) else { return };
        if call.next_packet_at <= now {
            audio.handle_timeout(now_ms);
            let mut packet = Vec::with_capacity(PACKET_SAMPLES + rtp::HEADER_LEN);
            if audio.next_packet(&mut packet) {
                if let Err(error) = call.socket.send_to(&packet, audio.destination()).await {
                    debug!(%error, "an RTP packet from the phone was not sent");
                }
            }
            call.next_packet_at += PACKET_INTERVAL;
            // Fallen behind (a stalled runtime): skip ahead rather than send a burst.
            if call.next_packet_at + PACKET_INTERVAL < now {
                call.next_packet_at = now + PACKET_INTERVAL;
            }
        }
        self.report_digits();
    }

    /// BYE for an answered call, 603 for a ringing one; the dialog's `Terminated` ends it.
    fn hang_up(&mut self) {
        let Some(call) = self.call.as_mut() else { return };
        if call.hung_up_here {
            return;
        }
        if call.answered_at.is_none() {
            call.answer_at = None;
            if let Err(error) = call.dialog.reject(Some(StatusCode::Decline), None) {
                debug!(%error, "the phone could not decline the call");
            }
            return;
        }
        // The phone falls silent at once (`talking`); the BYE's answer may take a while.
        call.hung_up_here = true;
        let dialog = call.dialog.clone();
        tokio::spawn(async move {
            if let Err(error) = dialog.bye().await {
                debug!(%error, "the phone's BYE failed");
            }
        });
    }

    fn report_digits(&mut self) {
        let Some(call) = self.call.as_mut() else { return };
        let Some(audio) = call.audio.as_mut() else { return };
        while let Some(digit) = audio.poll_digit() {
            call.digits.push(digit);
            let _ = self.events.send(PhoneEvent::Digit(digit));
        }
    }

    fn finish(&mut self, end: PhoneCallEnd) {
        self.report_digits();
        let Some(call) = self.call.take() else { return };
        self.dialog_layer.remove_dialog(&call.dialog.id());
        let (heard, media) = match &call.audio {
            Some(audio) => (audio.heard().to_vec(), audio.stats()),
            None => (Vec::new(), PhoneMediaStats::default()),
        };
        let report = PhoneCall {
            number: call.number,
            codec: call.answered_at.map(|_| call.remote.codec),
            end,
            talked: call.answered_at.map(|at| at.elapsed()).unwrap_or_default(),
            heard,
            digits: call.digits,
            media,
        };
        info!(end = %report.end, talked_ms = report.talked.as_millis() as u64, "phone call over");
        let _ = self.events.send(PhoneEvent::Ended(report));
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtmf::{parse_digits, DtmfSender};
    use crate::sdp::Direction;

    const CALLER: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4000);

    fn caller() -> RemoteAudio {
        RemoteAudio {
            addr: IpAddr::from([127, 0, 0, 1]),
            port: 4000,
            codec: Codec::Pcmu,
            codec_pt: 0,
            telephone_event_pt: Some(101),
            direction: Direction::SendRecv,
            ptime_ms: Some(20),
            on_hold: false,
        }
    }

    /// The caller's packet number `sequence`, of samples all `level`.
    fn voice(sequence: u16, level: i16) -> Vec<u8> {
        let header = rtp::RtpHeader { payload_type: 0, marker: false, sequence, timestamp: u32::from(sequence) * 160, ssrc: 7 };
        let mut payload = Vec::new();
        G711Law::Ulaw.encode_into(&[level; PACKET_SAMPLES], &mut payload);
        let mut packet = Vec::new();
        header.write(&payload, &mut packet);
        packet
    }

    fn samples_of(packet: &[u8]) -> Vec<i16> {
        let (header, body) = rtp::parse(packet).unwrap();
        assert_eq!(header.payload_type, 0);
        let mut pcm = Vec::new();
        G711Law::Ulaw.decode_into(body, &mut pcm);
        pcm
    }

    #[test]
    fn the_greeting_comes_first_then_silence() {
        let greeting = vec![1000i16; PACKET_SAMPLES + 40];
        let mut audio = PhoneAudio::new(caller(), &greeting, false, 42);
        let mut packet = Vec::new();
        assert!(audio.next_packet(&mut packet));
        let (header, _) = rtp::parse(&packet).unwrap();
        assert!(header.marker, "the first packet starts a talkspurt");
        assert!(samples_of(&packet).iter().all(|&s| (s - 1000).abs() < 40));
        assert!(audio.next_packet(&mut packet));
        let second = samples_of(&packet);
        assert!(second[..40].iter().all(|&s| (s - 1000).abs() < 40) && second[40..].iter().all(|&s| s.abs() < 8));
        let (next, _) = rtp::parse(&packet).unwrap();
        assert_eq!((next.sequence, next.timestamp), (header.sequence.wrapping_add(1), header.timestamp.wrapping_add(160)));
        assert!(!next.marker);
        assert_eq!(audio.stats().packets_sent, 2);
    }

    #[test]
    fn it_says_back_what_it_hears_and_keeps_it() {
        let mut audio = PhoneAudio::new(caller(), &[], true, 1);
        audio.handle_packet(0, CALLER, &voice(10, 3000));
        audio.handle_packet(20, CALLER, &voice(11, -2000));
        let mut packet = Vec::new();
        audio.next_packet(&mut packet);
        assert!(samples_of(&packet).iter().all(|&s| (s - 3000).abs() < 100));
        audio.next_packet(&mut packet);
        assert!(samples_of(&packet).iter().all(|&s| (s + 2000).abs() < 100));
        audio.next_packet(&mut packet);
        assert!(samples_of(&packet).iter().all(|&s| s.abs() < 8), "nothing more heard, nothing more said");
        assert_eq!(audio.heard().len(), 2 * PACKET_SAMPLES);
        assert_eq!(voiced_ms(audio.heard()), 40);
    }

    #[test]
    fn a_burst_does_not_make_the_echo_lag_for_the_rest_of_the_call() {
        let mut audio = PhoneAudio::new(caller(), &[], true, 1);
        for sequence in 0..50u16 {
            audio.handle_packet(u64::from(sequence), CALLER, &voice(sequence, 100 + 100 * sequence as i16));
        }
        let mut packet = Vec::new();
        audio.next_packet(&mut packet);
        let first = samples_of(&packet)[0];
        assert!((first - (100 + 100 * 40)).abs() < 200, "the echo starts at the newest 200 ms: {first}");
        assert_eq!(audio.heard().len(), 50 * PACKET_SAMPLES, "the recording keeps everything");
    }

    #[test]
    fn key_presses_are_heard_once_each() {
        let mut audio = PhoneAudio::new(caller(), &[], true, 1);
        let mut sender = DtmfSender::new(parse_digits("1#").unwrap(), 8000, 0, 5000).unwrap();
        let mut stream = RtpSender::new(9, 100, 5000, 8000);
        let mut now_ms = 0;
        while !sender.is_done() {
            while let Some(event) = sender.poll_packet(now_ms) {
                let mut packet = Vec::new();
                stream.next_at(101, event.marker, event.timestamp).write(&event.event.encode(), &mut packet);
                audio.handle_packet(now_ms, CALLER, &packet);
            }
            now_ms += 20;
            audio.handle_timeout(now_ms);
        }
        let digits: Vec<char> = std::iter::from_fn(|| audio.poll_digit()).map(DtmfDigit::as_char).collect();
        assert_eq!(digits, vec!['1', '#']);
        assert!(audio.heard().is_empty(), "key presses are not voice");
        let mut packet = Vec::new();
        audio.next_packet(&mut packet);
        assert!(samples_of(&packet).iter().all(|&s| s.abs() < 8), "nor are they echoed");
    }

    #[test]
    fn garbage_loss_and_late_packets_are_counted_not_played() {
        let mut audio = PhoneAudio::new(caller(), &[], true, 1);
        audio.handle_packet(0, CALLER, b"not rtp at all");
        audio.handle_packet(0, CALLER, &voice(100, 500));
        audio.handle_packet(40, CALLER, &voice(103, 500));
        audio.handle_packet(60, CALLER, &voice(101, 500));
        let mut other = voice(104, 500);
        other[1] = 96; // a payload type nobody negotiated
        audio.handle_packet(80, CALLER, &other);
        audio.handle_packet(100, SocketAddr::from(([192, 0, 2, 1], 4000)), &voice(105, 500));
        let stats = audio.stats();
        assert_eq!((stats.packets_received, stats.packets_lost, stats.packets_refused), (4, 2, 4));
        assert_eq!(audio.heard().len(), 2 * PACKET_SAMPLES);
    }

    #[test]
    fn a_held_call_gets_nothing() {
        let held = RemoteAudio { direction: Direction::SendOnly, on_hold: true, ..caller() };
        let mut audio = PhoneAudio::new(held, &chime(), true, 1);
        let mut packet = vec![1, 2, 3];
        assert!(!audio.next_packet(&mut packet));
        assert!(packet.is_empty());
        audio.repoint(caller());
        assert!(audio.next_packet(&mut packet));
    }

    #[test]
    fn the_chime_is_two_notes_and_sounds() {
        let chime = chime();
        assert_eq!(chime.len(), 8000 * 650 / 1000);
        assert_eq!(voiced_ms(&chime), 660, "every frame is sound, the faded edges too");
        assert_eq!(voiced_ms(&[0; 800]), 0);
    }
}
