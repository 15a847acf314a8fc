//! The client's overlay driver (inside `koe up`): attaches to one parent supernode from the
//! host cache, publishes this device's presence through it, looks users up, and sends and
//! receives sealed envelopes. If the parent goes away it attaches to the next supernode and
//! republishes at once; messages in flight are retried through the new parent until their
//! deadline, then reported failed, never dropped silently. When no supernode answers it says
//! so once per round and waits longer between rounds (1 s doubling to 30 s).
//!
//! With every presence record it hands the parent the record's withdrawal, signed in advance
//! (status offline, the next sequence number), which the parent publishes when this client's
//! connection closes: a client that exits or is killed shows offline within moments, one
//! whose network vanishes once the parent's pings fail (about 30 s). Invisible publishes the
//! withdrawal itself, so an invisible device never shows online.
//!
//! The daemon talks to it through [`ClientHandle`] commands and [`ClientEvent`]s.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use koe_types::{Certificate, DeviceKey, NetworkFile, UnixTime, Username};
use koe_wire::Codec;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{ping, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::envelope::{Envelope, EnvelopeKey, OpenedEnvelope, ReplayGuard};
use crate::host_cache::HostCache;
use crate::presence::{ParentSupernode, PresenceBody, PresenceRecord, PresenceStatus};
use crate::protocol::{OverlayRequest, OverlayResponse, RelayOffer};
use crate::swarm::{self, OverlayBehaviour, OverlayBehaviourEvent, SwarmError};

mod offline;

/// Presence is republished this often and lives [`PRESENCE_LIFETIME`].
pub const PRESENCE_REPUBLISH_INTERVAL: Duration = Duration::from_secs(60);
pub const PRESENCE_LIFETIME: Duration = Duration::from_secs(150);
/// How long a message may wait for a parent before it is reported undelivered.
pub const SEND_DEADLINE: Duration = Duration::from_secs(15);
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(500);
const SEND_RETRY_PAUSE: Duration = Duration::from_millis(300);
const REATTACH_JITTER_MS: u64 = 500;
const PUBLISH_RETRY_FIRST: Duration = Duration::from_secs(2);
const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(60);
/// After every supernode known failed to attach, the next round waits this long, doubling.
const ATTACH_ROUND_PAUSE_FIRST: Duration = Duration::from_secs(1);
const ATTACH_ROUND_PAUSE_MAX: Duration = Duration::from_secs(30);
/// How many of the host cache's supernodes an `Attach` tells the parent about.
const SUPERNODES_TOLD_TO_PARENT: usize = 8;
/// "The daemon is not reading client events" is said at most this often.
const DROPPED_EVENT_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// The pause before the `failures`-th retry in a row: `first` doubling up to `max`, each
/// between half and all of that (`random` spreads clients that failed together).
fn retry_pause(first: Duration, max: Duration, failures: u32, random: u64) -> Duration {
    let full = first.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(max);
    full / 2 + Duration::from_millis(random % (full.as_millis() as u64 / 2).max(1))
}

fn publish_retry_pause(failures: u32, random: u64) -> Duration {
    retry_pause(PUBLISH_RETRY_FIRST, PUBLISH_RETRY_MAX, failures, random)
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub network: NetworkFile,
    pub device_key: DeviceKey,
    pub certificate: Certificate,
    /// `None` is invisible: no presence record at all.
    pub status: Option<PresenceStatus>,
    pub host_cache: HostCache,
    /// Users who may not leave offline messages for this user (sent to its mailbox replicas).
    pub blocked: Vec<Username>,
}

/// The outcome of sending to a user: per online device, delivered or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    Delivered { devices: usize },
    /// No device of the user is online (the global index has none), and (when asked to keep
    /// it) none is known to seal it to for later.
    Offline,
    /// Nobody was online; kept, sealed, by this many supernodes until a device comes online.
    Kept { replicas: u32 },
    /// Nobody was online, and the mailbox would not keep it.
    NotKept(crate::mailbox_store::Refusal),
    Undelivered { reason: String },
}

#[derive(Debug, Clone)]
pub struct ClientStatus {
    pub parent: Option<String>,
    /// Set while no supernode could be reached: the last reason.
    pub unreachable: Option<String>,
    pub status: Option<PresenceStatus>,
    pub known_supernodes: Vec<String>,
}

#[derive(Debug)]
pub enum ClientCommand {
    Lookup {
        username: Username,
        reply: oneshot::Sender<Result<Vec<PresenceRecord>, String>>,
    },
    Send {
        to: Username,
        payload: Vec<u8>,
        /// If no device is online, leave it in the user's mailbox.
        keep: bool,
        reply: oneshot::Sender<SendOutcome>,
    },
    /// Users who may not leave offline messages (replaces the list).
    SetBlocked {
        blocked: Vec<Username>,
        reply: oneshot::Sender<()>,
    },
    SetStatus {
        status: Option<PresenceStatus>,
        reply: oneshot::Sender<()>,
    },
    Status {
        reply: oneshot::Sender<ClientStatus>,
    },
    RenewedCertificate(Box<Certificate>),
    /// Asks the parent to dial `address` (this device's would-be supernode) from outside.
    ConfirmReachable {
        address: String,
        reply: oneshot::Sender<Result<bool, String>>,
    },
    /// Asks the parent for relay nodes and credentials.
    RelayCredentials {
        reply: oneshot::Sender<Result<Vec<RelayOffer>, String>>,
    },
}

#[derive(Debug)]
pub enum ClientEvent {
    Attached { parent: String },
    Detached { reason: String },
    /// Every supernode known was tried and none took this client; the next round starts in
    /// `retry_in`. Emitted once per round, and rounds back off.
    Unreachable { reason: String, retry_in: Duration },
    /// An envelope for this device, opened and checked. Answer on `ack` once it is stored;
    /// the sender learns "delivered" only then. One `from_mailbox` waited while this device
    /// was offline: its message id must be checked against the ones taken before (replicas
    /// can offer it again), and `Ok` lets the mailbox drop it.
    Received {
        envelope: Box<OpenedEnvelope>,
        ack: oneshot::Sender<Result<(), String>>,
        from_mailbox: bool,
    },
    HostCacheChanged(HostCache),
}

#[derive(Debug, Clone)]
pub struct ClientHandle {
    commands: mpsc::Sender<ClientCommand>,
}

impl ClientHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> ClientCommand) -> Result<T, String> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| "the client has stopped".to_string())?;
        answer.await.map_err(|_| "the client has stopped".to_string())
    }

    /// The online devices of `username`; of [`gateway_directory`](crate::gateway_directory),
    /// the online PSTN gateways (each record under the gateway's own name).
    pub async fn lookup(&self, username: Username) -> Result<Vec<PresenceRecord>, String> {
        self.ask(|reply| ClientCommand::Lookup { username, reply }).await?
    }

    /// Sends to every online device of `to`; with `keep`, leaves it in their mailbox when
    /// none is online.
    pub async fn send(&self, to: Username, payload: Vec<u8>, keep: bool) -> SendOutcome {
        self.ask(|reply| ClientCommand::Send { to, payload, keep, reply })
            .await
            .unwrap_or_else(|reason| SendOutcome::Undelivered { reason })
    }

    pub async fn set_blocked(&self, blocked: Vec<Username>) -> Result<(), String> {
        self.ask(|reply| ClientCommand::SetBlocked { blocked, reply }).await
    }

    pub async fn set_status(&self, status: Option<PresenceStatus>) -> Result<(), String> {
        self.ask(|reply| ClientCommand::SetStatus { status, reply }).await
    }

    pub async fn status(&self) -> Result<ClientStatus, String> {
        self.ask(|reply| ClientCommand::Status { reply }).await
    }

    /// Whether the parent supernode can connect to `address` (a supernode of this device).
    pub async fn confirm_reachable(&self, address: String) -> Result<bool, String> {
        self.ask(|reply| ClientCommand::ConfirmReachable { address, reply }).await?
    }

    /// Relay nodes (with short-lived credentials) the parent supernode offers this user.
    pub async fn relay_credentials(&self) -> Result<Vec<RelayOffer>, String> {
        self.ask(|reply| ClientCommand::RelayCredentials { reply }).await?
    }

    pub async fn renewed_certificate(&self, certificate: Certificate) {
        let _ = self.commands.send(ClientCommand::RenewedCertificate(Box::new(certificate))).await;
    }
}

#[derive(Debug)]
enum Parent {
    Detached { retry_at: Instant },
    Connecting { peer: PeerId, address: String },
    Attaching { peer: PeerId, address: String },
    Attached { peer: PeerId, address: String, addresses: Vec<String> },
}

/// A message on its way: a lookup of the recipient, then one envelope per device.
#[derive(Debug)]
struct PendingSend {
    to: Username,
    payload: Vec<u8>,
    keep: bool,
    deadline: Instant,
    reply: oneshot::Sender<SendOutcome>,
    /// Set once the lookup answered.
    devices_outstanding: usize,
    delivered: usize,
    last_failure: Option<String>,
    in_flight: bool,
    /// Not before this instant is the send tried again (after a failure).
    retry_at: Instant,
}

#[derive(Debug)]
enum Outstanding {
    Attach,
    Publish,
    Lookup { username: Username, reply: oneshot::Sender<Result<Vec<PresenceRecord>, String>> },
    SendLookup(u64),
    SendRoute(u64),
    DialBack(oneshot::Sender<Result<bool, String>>),
    RelayCredentials(oneshot::Sender<Result<Vec<RelayOffer>, String>>),
    PublishDevice,
    MailboxFetch,
    MailboxCommand,
    /// The device records of a send's recipient, who is offline.
    SendDevices(u64),
    /// A send left in the recipient's mailbox.
    SendKeep(u64),
}

/// The daemon's answer for a message from the mailbox: its id, and whether it may go.
type StoredAckFuture = Pin<Box<dyn Future<Output = (crate::mailbox::MessageId, bool)> + Send>>;

type AckFuture = Pin<Box<dyn Future<Output = (ResponseChannel<OverlayResponse>, Result<(), String>)> + Send>>;

pub struct ClientNode {
    swarm: Swarm<OverlayBehaviour>,
    config: ClientConfig,
    /// Requests to the parent that timed out in a row; two mean the parent is not answering.
    parent_timeouts: u32,
    /// Pings to the parent that failed in a row.
    parent_ping_failures: u32,
    /// The supernodes the client started with (network file and saved host cache): relearned
    /// whenever failures have emptied the host cache, so a client never gives up for good.
    initial_supernodes: Vec<String>,
    envelope_key: EnvelopeKey,
    replay_guard: ReplayGuard,
    parent: Parent,
    /// Supernodes tried in this round of attaching; the round ends when none is left.
    tried: HashSet<String>,
    /// Rounds in a row in which no supernode took this client.
    attach_rounds_failed: u32,
    /// Why the last supernode tried did not take this client.
    last_attach_error: Option<String>,
    /// Set after a failed round, until a supernode takes this client.
    unreachable: Option<String>,
    /// The host cache changed since the daemon last heard (it is told at most twice a second).
    host_cache_changed: bool,
    dropped_events: u64,
    last_dropped_event_warning: Option<Instant>,
    sequence: u64,
    next_publish: Option<Instant>,
    /// Publishes that failed in a row: each doubles the pause before the next try, so an
    /// overloaded overlay is not flooded with retries.
    publish_failures: u32,
    outstanding: HashMap<OutboundRequestId, Outstanding>,
    sends: HashMap<u64, PendingSend>,
    next_send: u64,
    acks: FuturesUnordered<AckFuture>,
    /// The daemon's answers for messages from the mailbox: whether each may go.
    stored_acks: FuturesUnordered<StoredAckFuture>,
    /// Messages from the mailbox handed to the daemon, and when.
    mailbox_in_flight: HashMap<crate::mailbox::MessageId, Instant>,
    /// Taken by the daemon; acknowledged to the replicas at the next housekeeping.
    to_acknowledge: Vec<crate::mailbox::MessageId>,
    /// The block list and its sequence (0: never set).
    blocked: (u64, Vec<Username>),
    /// Lines about peers' bad input, a few a minute.
    log_budget: crate::log_budget::LogBudget,
    commands: mpsc::Receiver<ClientCommand>,
    events: mpsc::Sender<ClientEvent>,
}

impl std::fmt::Debug for ClientNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientNode").field("parent", &self.parent).finish_non_exhaustive()
    }
}

impl ClientNode {
    pub fn new(config: ClientConfig) -> Result<(Self, ClientHandle, mpsc::Receiver<ClientEvent>), SwarmError> {
        let swarm = swarm::build(&config.device_key, false)?;
        let (command_sender, commands) = mpsc::channel(64);
        let (events, event_receiver) = mpsc::channel(256);
        let mut host_cache = config.host_cache.clone();
        for address in &config.network.bootstrap {
            host_cache.learn(address);
        }
        let initial_supernodes = host_cache.candidates().map(|h| h.address.clone()).collect();
        // A list given at start is sent at the first attach.
        let blocked = (if config.blocked.is_empty() { 0 } else { UnixTime::now().as_secs().saturating_mul(1000) }, config.blocked.clone());
        let node = Self {
            swarm,
            parent_timeouts: 0,
            parent_ping_failures: 0,
            initial_supernodes,
            envelope_key: EnvelopeKey::for_device(&config.device_key),
            config: ClientConfig { host_cache, ..config },
            replay_guard: ReplayGuard::default(),
            parent: Parent::Detached { retry_at: Instant::now() },
            tried: HashSet::new(),
            attach_rounds_failed: 0,
            last_attach_error: None,
            unreachable: None,
            host_cache_changed: false,
            dropped_events: 0,
            last_dropped_event_warning: None,
            // Milliseconds since the epoch: strictly increasing across restarts of this device.
            sequence: UnixTime::now().as_secs().saturating_mul(1000),
            next_publish: None,
            publish_failures: 0,
            outstanding: HashMap::new(),
            sends: HashMap::new(),
            next_send: 0,
            acks: FuturesUnordered::new(),
            stored_acks: FuturesUnordered::new(),
            mailbox_in_flight: HashMap::new(),
            to_acknowledge: Vec::new(),
            blocked,
            log_budget: crate::log_budget::LogBudget::default(),
            commands,
            events,
        };
        Ok((node, ClientHandle { commands: command_sender }, event_receiver))
    }

    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        loop {
            let reattach_at = match self.parent {
                Parent::Detached { retry_at } => Some(tokio::time::Instant::from_std(retry_at)),
                _ => None,
            };
            tokio::select! {
                event = self.swarm.select_next_some() => self.handle_swarm_event(event),
                Some(command) = self.commands.recv() => self.handle_command(command),
                () = tokio::time::sleep_until(reattach_at.unwrap_or_else(tokio::time::Instant::now)), if reattach_at.is_some() => {
                    self.try_attach();
                }
                Some((channel, result)) = self.acks.next(), if !self.acks.is_empty() => {
                    let response = match result {
                        Ok(()) => OverlayResponse::Delivered,
                        Err(reason) => OverlayResponse::Undelivered { reason },
                    };
                    let _ = self.swarm.behaviour_mut().overlay.send_response(channel, response);
                }
                Some((id, taken)) = self.stored_acks.next(), if !self.stored_acks.is_empty() => {
                    if taken {
                        self.acknowledge_stored(id);
                    } else {
                        // The daemon could not store it: the next fetch offers it again.
                        self.mailbox_in_flight.remove(&id);
                    }
                }
                _ = housekeeping.tick() => self.housekeeping(),
                () = &mut shutdown => break,
            }
        }
        if let Parent::Attached { peer, .. } = self.parent {
            // Going offline on purpose: withdraw presence quickly instead of letting it linger.
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn emit(&mut self, event: ClientEvent) {
        if self.events.try_send(event).is_ok() {
            return;
        }
        self.dropped_events += 1;
        if self.last_dropped_event_warning.is_none_or(|at| at.elapsed() >= DROPPED_EVENT_WARNING_INTERVAL) {
            warn!(dropped = self.dropped_events, "the daemon is not reading client events; some were dropped");
            self.last_dropped_event_warning = Some(Instant::now());
            self.dropped_events = 0;
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        if let Parent::Detached { retry_at } = self.parent {
            if now >= retry_at {
                self.try_attach();
            }
        }
        if std::mem::take(&mut self.host_cache_changed) {
            self.emit(ClientEvent::HostCacheChanged(self.config.host_cache.clone()));
        }
        self.send_acknowledgements();
        if self.next_publish.is_some_and(|at| now >= at) {
            self.publish();
            // Anything left while a sender thought this device was offline.
            self.mailbox(crate::mailbox::MailboxAction::Fetch);
        }
        let expired: Vec<u64> = self
            .sends
            .iter()
            .filter(|(_, s)| now >= s.deadline && !s.in_flight)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(send) = self.sends.remove(&id) {
                let reason = send.last_failure.unwrap_or_else(|| "no supernode could be reached in time".into());
                let _ = send.reply.send(SendOutcome::Undelivered { reason });
            }
        }
        self.resume_sends();
    }

    fn candidates(&self) -> Vec<String> {
        self.config.host_cache.candidates().map(|h| h.address.clone()).collect()
    }

    /// Dials the best supernode of the host cache not yet tried in this round; when none is
    /// left, the round failed.
    fn try_attach(&mut self) {
        if self.config.host_cache.is_empty() {
            for address in &self.initial_supernodes {
                self.config.host_cache.learn(address);
            }
        }
        let Some(address) = self.candidates().into_iter().find(|a| !self.tried.contains(a)) else {
            return self.attach_round_failed();
        };
        self.tried.insert(address.clone());
        let parsed: Result<Multiaddr, _> = address.parse();
        let peer = parsed.as_ref().ok().and_then(|a| match a.iter().last() {
            Some(Protocol::P2p(peer)) => Some(peer),
            _ => None,
        });
        let (Ok(multiaddr), Some(peer)) = (parsed, peer) else {
            warn!(%address, "host cache entry is not a supernode address with /p2p/…");
            self.config.host_cache.failed(&address);
            self.host_cache_changed = true;
            return self.try_attach();
        };
        debug!(%address, "attaching");
        if self.swarm.is_connected(&peer) {
            self.parent = Parent::Attaching { peer, address };
            self.send_attach(peer);
            return;
        }
        match self.swarm.dial(multiaddr) {
            Ok(()) => self.parent = Parent::Connecting { peer, address },
            Err(error) => {
                debug!(%address, %error, "dial failed");
                self.last_attach_error = Some(error.to_string());
                self.config.host_cache.failed(&address);
                self.host_cache_changed = true;
                self.try_attach();
            }
        }
    }

    /// No supernode known took this client: say so once, and wait longer each round.
    fn attach_round_failed(&mut self) {
        self.tried.clear();
        self.attach_rounds_failed += 1;
        let pause = retry_pause(
            ATTACH_ROUND_PAUSE_FIRST,
            ATTACH_ROUND_PAUSE_MAX,
            self.attach_rounds_failed,
            rand_core::RngCore::next_u64(&mut rand_core::OsRng),
        );
        let reason = match (&self.last_attach_error, self.initial_supernodes.is_empty()) {
            (Some(error), _) => error.clone(),
            (None, true) => "no supernode is known: the network file lists none (the operator adds them with `koe network add-bootstrap`)".into(),
            (None, false) => "no supernode answered".into(),
        };
        debug!(%reason, ?pause, "no supernode took this client");
        self.unreachable = Some(reason.clone());
        self.parent = Parent::Detached { retry_at: Instant::now() + pause };
        self.emit(ClientEvent::Unreachable { reason, retry_in: pause });
    }

    fn send_attach(&mut self, peer: PeerId) {
        let certificate = self.config.certificate.to_bytes();
        let own = peer.to_string();
        let supernodes = self
            .candidates()
            .into_iter()
            .filter(|address| !address.ends_with(&own))
            .take(SUPERNODES_TOLD_TO_PARENT)
            .collect();
        let id = self.swarm.behaviour_mut().overlay.send_request(&peer, OverlayRequest::Attach { certificate, supernodes });
        self.outstanding.insert(id, Outstanding::Attach);
    }

    fn attach_failed(&mut self, reason: &str) {
        let address = match &self.parent {
            Parent::Connecting { address, .. } | Parent::Attaching { address, .. } => address.clone(),
            _ => return,
        };
        debug!(%address, reason, "could not attach");
        self.last_attach_error = Some(reason.to_string());
        self.config.host_cache.failed(&address);
        self.host_cache_changed = true;
        self.try_attach();
    }

    /// Attaches elsewhere after a short random pause: when a supernode dies, all its clients
    /// notice at the same instant, and spreading their handshakes keeps the next supernodes
    /// answering.
    fn detach(&mut self, reason: String) {
        info!(%reason, "lost the parent supernode; attaching to another");
        let jitter = Duration::from_millis(rand_core::RngCore::next_u64(&mut rand_core::OsRng) % REATTACH_JITTER_MS);
        self.parent = Parent::Detached { retry_at: Instant::now() + jitter };
        self.tried.clear();
        self.parent_timeouts = 0;
        self.parent_ping_failures = 0;
        self.next_publish = None;
        self.emit(ClientEvent::Detached { reason });
    }

    /// A parent that keeps its connection but does not answer (overloaded, or dropping
    /// traffic) is as good as gone: demote it in the host cache and attach elsewhere.
    fn abandon_unresponsive_parent(&mut self, peer: PeerId) {
        if let Parent::Attached { address, .. } = &self.parent {
            warn!(parent = %address, "parent supernode stopped answering; switching");
            let address = address.clone();
            self.config.host_cache.failed(&address);
            self.host_cache_changed = true;
        }
        let _ = self.swarm.disconnect_peer_id(peer);
        self.detach("parent supernode stopped answering".into());
    }

    fn parent_peer(&self) -> Option<PeerId> {
        match self.parent {
            Parent::Attached { peer, .. } => Some(peer),
            _ => None,
        }
    }

    fn handle_swarm_event(&mut self, event: SwarmEvent<OverlayBehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                if let Parent::Connecting { peer, address } = &self.parent {
                    if *peer == peer_id {
                        self.parent = Parent::Attaching { peer: *peer, address: address.clone() };
                        self.send_attach(peer_id);
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                let ours = matches!(&self.parent, Parent::Connecting { peer, .. } if Some(*peer) == peer_id);
                if ours {
                    self.attach_failed(&error.to_string());
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, cause, .. } => {
                let lost_parent = match &self.parent {
                    Parent::Attached { peer, address, .. }
                    | Parent::Attaching { peer, address, .. }
                    | Parent::Connecting { peer, address, .. } => (*peer == peer_id).then(|| address.clone()),
                    Parent::Detached { .. } => None,
                };
                if let Some(address) = lost_parent {
                    // Most likely it crashed: try the others before dialling it again.
                    self.config.host_cache.failed(&address);
                    self.host_cache_changed = true;
                    let reason = cause.map_or("connection closed".to_string(), |c| c.to_string());
                    self.detach(format!("parent supernode gone: {reason}"));
                }
            }
            SwarmEvent::Behaviour(OverlayBehaviourEvent::Ping(ping::Event { peer, result, .. })) => match result {
                Ok(rtt) => {
                    self.parent_ping_failures = 0;
                    if let Parent::Attached { peer: parent, address, .. } = &self.parent {
                        if *parent == peer {
                            let address = address.clone();
                            self.config.host_cache.succeeded(&address, Some(rtt), UnixTime::now());
                        }
                    }
                }
                Err(ping::Failure::Unsupported) => {}
                Err(error) => {
                    self.parent_ping_failures += 1;
                    if self.parent_ping_failures >= swarm::PING_FAILURES_BEFORE_DISCONNECT {
                        debug!(%peer, %error, "pings keep failing; disconnecting");
                        self.parent_ping_failures = 0;
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                }
            },
            SwarmEvent::Behaviour(OverlayBehaviourEvent::Overlay(event)) => self.handle_overlay_event(event),
            _ => {}
        }
    }

    fn handle_overlay_event(&mut self, event: request_response::Event<OverlayRequest, OverlayResponse>) {
        match event {
            request_response::Event::Message {
                peer,
                message: request_response::Message::Request { request, channel, .. },
                ..
            } => self.handle_request(peer, request, channel),
            request_response::Event::Message {
                peer,
                message: request_response::Message::Response { request_id, response },
                ..
            } => {
                if Some(peer) == self.parent_peer() {
                    self.parent_timeouts = 0;
                }
                self.handle_response(request_id, Ok(response));
            }
            request_response::Event::OutboundFailure { request_id, error, peer, .. } => {
                // A dial-back may legitimately outlast the request timeout (the parent is
                // waiting on an unreachable address); that says nothing about the parent.
                let dial_back = matches!(self.outstanding.get(&request_id), Some(Outstanding::DialBack(_)));
                let timed_out = matches!(error, request_response::OutboundFailure::Timeout) && !dial_back;
                self.handle_response(request_id, Err(error.to_string()));
                if timed_out && Some(peer) == self.parent_peer() {
                    // One slow answer can be a busy moment; a second in a row is a parent
                    // that has stopped answering. (Switching on every timeout made a busy
                    // network busier: every switch is a handshake and a publish.)
                    self.parent_timeouts += 1;
                    if self.parent_timeouts >= 2 {
                        self.abandon_unresponsive_parent(peer);
                    }
                }
            }
            _ => {}
        }
    }

    fn handle_request(&mut self, peer: PeerId, request: OverlayRequest, channel: ResponseChannel<OverlayResponse>) {
        let refuse = |reason: &str| OverlayResponse::Refused { reason: reason.into() };
        let response = match request {
            OverlayRequest::Deliver { envelope } if Some(peer) == self.parent_peer() => {
                match self.open(&envelope) {
                    Ok(opened) => {
                        let (ack, acked) = oneshot::channel();
                        self.emit(ClientEvent::Received { envelope: Box::new(opened), ack, from_mailbox: false });
                        self.acks.push(Box::pin(async move {
                            let result = acked.await.unwrap_or_else(|_| Err("the client could not store it".into()));
                            (channel, result)
                        }));
                        return;
                    }
                    Err(reason) => OverlayResponse::Undelivered { reason },
                }
            }
            OverlayRequest::Deliver { .. } => refuse("deliveries come only from this device's parent"),
            _ => refuse("clients serve no requests but deliveries"),
        };
        let _ = self.swarm.behaviour_mut().overlay.send_response(channel, response);
    }

    fn open(&mut self, bytes: &[u8]) -> Result<OpenedEnvelope, String> {
        let envelope = Envelope::decode_bounded(bytes).map_err(|e| e.to_string())?;
        envelope
            .open(
                &self.config.device_key.public_key(),
                &self.envelope_key,
                &self.config.network.name,
                &self.config.network.signing_key,
                &mut self.replay_guard,
                UnixTime::now(),
            )
            .map_err(|error| {
                if let Some(suppressed) = self.log_budget.allow(Instant::now()) {
                    warn!(%error, suppressed, "envelope refused");
                }
                error.to_string()
            })
    }

    fn handle_response(&mut self, request_id: OutboundRequestId, response: Result<OverlayResponse, String>) {
        let Some(outstanding) = self.outstanding.remove(&request_id) else {
            return;
        };
        match (outstanding, response) {
            (Outstanding::Attach, Ok(OverlayResponse::Attached { parent_addresses, supernodes })) => {
                let (peer, address) = match &self.parent {
                    Parent::Attaching { peer, address, .. } => (*peer, address.clone()),
                    _ => return,
                };
                for supernode in &supernodes {
                    self.config.host_cache.learn(supernode);
                }
                self.config.host_cache.succeeded(&address, None, UnixTime::now());
                info!(parent = %address, "attached");
                self.parent = Parent::Attached { peer, address: address.clone(), addresses: parent_addresses };
                self.tried.clear();
                self.attach_rounds_failed = 0;
                self.last_attach_error = None;
                self.unreachable = None;
                self.emit(ClientEvent::Attached { parent: address });
                self.host_cache_changed = true;
                self.publish();
                self.publish_device();
                self.publish_blocked();
                self.mailbox(crate::mailbox::MailboxAction::Fetch);
                self.resume_sends();
            }
            (Outstanding::Attach, other) => {
                let reason = match other {
                    Ok(OverlayResponse::Refused { reason }) => reason,
                    Ok(other) => format!("unexpected answer {other:?}"),
                    Err(error) => error,
                };
                self.attach_failed(&reason);
            }
            (Outstanding::Publish, Ok(OverlayResponse::Published { replicas })) => {
                debug!(replicas, "presence published");
                self.publish_failures = 0;
            }
            (Outstanding::Publish, other) => {
                self.publish_failures += 1;
                let pause = publish_retry_pause(self.publish_failures, rand_core::RngCore::next_u64(&mut rand_core::OsRng));
                warn!(?other, ?pause, "presence not published; retrying");
                self.next_publish = Some(Instant::now() + pause);
            }
            (Outstanding::Lookup { username, reply }, response) => {
                // Only what is listed under the name: a user's own records, or in the gateway
                // directory gateways' (never a user a parent slipped in).
                let records = self
                    .presence_from(response)
                    .map(|records| records.into_iter().filter(|r| crate::directory::is_listed_under(&username, r)).collect());
                let _ = reply.send(records);
            }
            (Outstanding::SendLookup(send), response) => {
                let records = self.presence_from(response);
                self.route_send(send, records);
            }
            (Outstanding::SendRoute(send), response) => self.route_answered(send, response),
            (Outstanding::SendDevices(send), response) => self.leave_message(send, response),
            (Outstanding::SendKeep(send), response) => self.message_left(send, response),
            (Outstanding::MailboxFetch, response) => self.mailbox_fetched(response),
            (Outstanding::PublishDevice | Outstanding::MailboxCommand, response) => {
                if !matches!(response, Ok(OverlayResponse::Published { .. } | OverlayResponse::Stored)) {
                    debug!(?response, "a device record or mailbox command was not taken; the next attach sends it again");
                }
            }
            (Outstanding::DialBack(reply), response) => {
                let answer = match response {
                    Ok(OverlayResponse::DialedBack { reachable, detail }) => {
                        debug!(reachable, %detail, "dial-back answered");
                        Ok(reachable)
                    }
                    Ok(OverlayResponse::Refused { reason }) => Err(reason),
                    Ok(other) => Err(format!("unexpected answer {other:?}")),
                    Err(error) => Err(error),
                };
                let _ = reply.send(answer);
            }
            (Outstanding::RelayCredentials(reply), response) => {
                let answer = match response {
                    Ok(OverlayResponse::Relays { relays }) => Ok(relays),
                    Ok(OverlayResponse::Refused { reason }) => Err(reason),
                    Ok(other) => Err(format!("unexpected answer {other:?}")),
                    Err(error) => Err(error),
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// Verifies presence records a parent returned: a parent can hide users, not invent them.
    fn presence_from(&self, response: Result<OverlayResponse, String>) -> Result<Vec<PresenceRecord>, String> {
        match response {
            Ok(OverlayResponse::Presence { records }) => {
                let now = UnixTime::now();
                Ok(records
                    .iter()
                    .filter_map(|bytes| {
                        PresenceRecord::decode_verified(&bytes.0, &self.config.network.name, &self.config.network.signing_key, now).ok()
                    })
                    .filter(PresenceRecord::is_online)
                    .collect())
            }
            Ok(OverlayResponse::Refused { reason }) => Err(reason),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(error) => Err(error),
        }
    }

    fn publish(&mut self) {
        let Parent::Attached { peer, addresses, .. } = &self.parent else {
            return;
        };
        let peer = *peer;
        let now = UnixTime::now();
        // Invisible: the device's withdrawal itself, which replaces any earlier record and
        // shows nothing online.
        let status = self.config.status.unwrap_or(PresenceStatus::Offline);
        let body = PresenceBody {
            certificate: self.config.certificate.clone(),
            status,
            envelope_key: self.envelope_key.public(),
            parent: ParentSupernode { peer_id: peer.to_bytes(), addresses: addresses.clone() },
            sequence: self.sequence + 1,
            expires_at: now.saturating_add(PRESENCE_LIFETIME),
        };
        let withdrawal = (status != PresenceStatus::Offline).then(|| {
            let withdrawal = PresenceBody { status: PresenceStatus::Offline, sequence: body.sequence + 1, ..body.clone() };
            crate::protocol::ByteString(withdrawal.sign(&self.config.device_key).to_bytes())
        });
        // The withdrawal's number is used up too: the next record must outrank it.
        self.sequence += 2;
        let record = body.sign(&self.config.device_key);
        let id = self
            .swarm
            .behaviour_mut()
            .overlay
            .send_request(&peer, OverlayRequest::Publish { record: record.to_bytes(), withdrawal });
        self.outstanding.insert(id, Outstanding::Publish);
        self.next_publish = self.config.status.map(|_| Instant::now() + PRESENCE_REPUBLISH_INTERVAL);
    }

    fn handle_command(&mut self, command: ClientCommand) {
        match command {
            ClientCommand::Lookup { username, reply } => match self.parent_peer() {
                Some(parent) => {
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .overlay
                        .send_request(&parent, OverlayRequest::Lookup { username: username.to_string() });
                    self.outstanding.insert(id, Outstanding::Lookup { username, reply });
                }
                None => {
                    let _ = reply.send(Err("not attached to a supernode yet; try again in a moment".into()));
                }
            },
            ClientCommand::SetBlocked { blocked, reply } => {
                self.set_blocked(blocked);
                let _ = reply.send(());
            }
            ClientCommand::Send { to, payload, keep, reply } => {
                self.next_send += 1;
                let id = self.next_send;
                self.sends.insert(
                    id,
                    PendingSend {
                        to,
                        payload,
                        keep,
                        deadline: Instant::now() + SEND_DEADLINE,
                        reply,
                        devices_outstanding: 0,
                        delivered: 0,
                        last_failure: None,
                        in_flight: false,
                        retry_at: Instant::now(),
                    },
                );
                self.start_send(id);
            }
            ClientCommand::SetStatus { status, reply } => {
                self.config.status = status;
                self.publish();
                let _ = reply.send(());
            }
            ClientCommand::Status { reply } => {
                let parent = match &self.parent {
                    Parent::Attached { address, .. } => Some(address.clone()),
                    _ => None,
                };
                let _ = reply.send(ClientStatus {
                    parent,
                    unreachable: self.unreachable.clone(),
                    status: self.config.status,
                    known_supernodes: self.candidates(),
                });
            }
            ClientCommand::ConfirmReachable { address, reply } => match self.parent_peer() {
                Some(parent) => {
                    let id = self.swarm.behaviour_mut().overlay.send_request(&parent, OverlayRequest::DialBack { address });
                    self.outstanding.insert(id, Outstanding::DialBack(reply));
                }
                None => {
                    let _ = reply.send(Err("not attached to a supernode".into()));
                }
            },
            ClientCommand::RelayCredentials { reply } => match self.parent_peer() {
                Some(parent) => {
                    let id = self.swarm.behaviour_mut().overlay.send_request(&parent, OverlayRequest::RelayCredentials);
                    self.outstanding.insert(id, Outstanding::RelayCredentials(reply));
                }
                None => {
                    let _ = reply.send(Err("not attached to a supernode".into()));
                }
            },
            ClientCommand::RenewedCertificate(certificate) => {
                self.config.certificate = *certificate;
                self.publish();
            }
        }
    }

    /// Looks the recipient up through the parent; if detached, waits for the next parent.
    fn start_send(&mut self, id: u64) {
        let Some(parent) = self.parent_peer() else {
            return;
        };
        let Some(send) = self.sends.get_mut(&id) else {
            return;
        };
        send.in_flight = true;
        let username = send.to.to_string();
        let request = self.swarm.behaviour_mut().overlay.send_request(&parent, OverlayRequest::Lookup { username });
        self.outstanding.insert(request, Outstanding::SendLookup(id));
    }

    /// Starts the sends that wait for a parent or for their retry time.
    fn resume_sends(&mut self) {
        let now = Instant::now();
        let waiting: Vec<u64> = self
            .sends
            .iter()
            .filter(|(_, s)| !s.in_flight && s.retry_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.start_send(id);
        }
    }

    fn route_send(&mut self, id: u64, records: Result<Vec<PresenceRecord>, String>) {
        let Some(parent) = self.parent_peer() else {
            if let Some(send) = self.sends.get_mut(&id) {
                send.in_flight = false;
            }
            return;
        };
        let records = match records {
            Ok(records) => records,
            Err(reason) => return self.retry_or_fail(id, reason),
        };
        let Some(send) = self.sends.get(&id) else {
            return;
        };
        let to = send.to.clone();
        let payload = send.payload.clone();
        let targets: Vec<_> = records.iter().filter(|r| r.username() == &to).collect();
        if targets.is_empty() {
            if send.keep {
                return self.keep_for_later(id);
            }
            return self.finish_send(id, SendOutcome::Offline);
        }
        let now = UnixTime::now();
        let mut sealed = Vec::new();
        for record in targets {
            let body = record.body();
            match Envelope::seal(
                &self.config.device_key,
                &self.config.certificate,
                &to,
                body.certificate.device_key(),
                &body.envelope_key,
                &payload,
                now,
            ) {
                Ok(envelope) => sealed.push(envelope.to_bytes()),
                Err(error) => return self.finish_send(id, SendOutcome::Undelivered { reason: error.to_string() }),
            }
        }
        if let Some(send) = self.sends.get_mut(&id) {
            send.devices_outstanding = sealed.len();
            send.delivered = 0;
        }
        for envelope in sealed {
            let request = self.swarm.behaviour_mut().overlay.send_request(&parent, OverlayRequest::Route { envelope });
            self.outstanding.insert(request, Outstanding::SendRoute(id));
        }
    }

    fn route_answered(&mut self, id: u64, response: Result<OverlayResponse, String>) {
        let Some(send) = self.sends.get_mut(&id) else {
            return;
        };
        send.devices_outstanding = send.devices_outstanding.saturating_sub(1);
        match response {
            Ok(OverlayResponse::Delivered) => send.delivered += 1,
            Ok(OverlayResponse::Undelivered { reason } | OverlayResponse::Refused { reason }) => {
                send.last_failure = Some(reason);
            }
            Ok(other) => send.last_failure = Some(format!("unexpected answer {other:?}")),
            Err(error) => {
                // The parent vanished mid-message: try again through the next parent.
                send.last_failure = Some(error);
                if send.devices_outstanding == 0 && send.delivered == 0 {
                    let reason = send.last_failure.clone().unwrap_or_default();
                    return self.retry_or_fail(id, reason);
                }
            }
        }
        if send.devices_outstanding > 0 {
            return;
        }
        let outcome = if send.delivered > 0 {
            SendOutcome::Delivered { devices: send.delivered }
        } else {
            SendOutcome::Undelivered { reason: send.last_failure.clone().unwrap_or_else(|| "not delivered".into()) }
        };
        self.finish_send(id, outcome);
    }

    /// A lookup or route failed (often: the parent vanished mid-message). The send waits a
    /// moment and goes again, through a new parent if need be, until its deadline.
    fn retry_or_fail(&mut self, id: u64, reason: String) {
        let Some(send) = self.sends.get_mut(&id) else {
            return;
        };
        send.last_failure = Some(reason.clone());
        send.in_flight = false;
        send.retry_at = Instant::now() + SEND_RETRY_PAUSE;
        if send.retry_at >= send.deadline {
            self.finish_send(id, SendOutcome::Undelivered { reason });
        }
    }

    fn finish_send(&mut self, id: u64, outcome: SendOutcome) {
        if let Some(send) = self.sends.remove(&id) {
            let _ = send.reply.send(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_retries_back_off_and_spread() {
        let pause = |failures, random| publish_retry_pause(failures, random).as_millis();
        assert_eq!((pause(1, 0), pause(1, 999)), (1_000, 1_999));
        assert_eq!((pause(2, 0), pause(3, 0), pause(5, 0)), (2_000, 4_000, 16_000));
        assert_eq!((pause(6, 0), pause(40, u64::MAX)), (30_000, 30_000 + u64::MAX as u128 % 30_000));
    }
}
