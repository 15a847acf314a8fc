//! The supernode (`koe node`): a Kademlia server in the overlay, a holder of part of the
//! global index, and the parent of the clients attached to it.
//!
//! For its clients it publishes presence to the supernodes nearest the user's index key (a
//! gateway's also to those nearest the gateway [`directory`](crate::directory)'s), looks
//! users up there, and routes sealed envelopes to the recipient's parent. When a
//! client's connection closes it publishes the withdrawal the client signed in advance, so
//! the user shows offline at once. For other supernodes it stores and serves presence
//! records, validating every one, and delivers forwarded envelopes to its attached clients.
//! It never sees inside an envelope.
//!
//! It finds the other supernodes without restarts: from its bootstrap list (retried while it
//! knows few, and extended at run time through [`SupernodeHandle::learn`], e.g. when the
//! operator adds to the network file), from every supernode it meets (a `Welcome` lists the
//! others that one knows) and from its clients' host caches (sent with `Attach`).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::mpsc;
use koe_types::{Certificate, DeviceKey, DevicePublicKey, NetworkFile, UnixTime, Username};
use koe_wire::Codec;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{kad, ping, Multiaddr, PeerId, Swarm};
use tracing::{debug, info, warn};

use crate::directory;
use crate::envelope::Envelope;
use crate::index::PresenceIndex;
use crate::metrics::SupernodeMetrics;
use crate::presence::{index_key, PresenceRecord};
use crate::protocol::{peer_id_of, ByteString, OverlayRequest, OverlayResponse};
use crate::swarm::{self, OverlayBehaviour, OverlayBehaviourEvent, SwarmError};

mod offline;

fn ip_of(address: &Multiaddr) -> Option<std::net::IpAddr> {
    address.iter().find_map(|protocol| match protocol {
        Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
        _ => None,
    })
}

/// How many supernodes near a key hold each presence record.
pub const REPLICATION: usize = 3;
/// How many supernodes a lookup asks.
const LOOKUP_FANOUT: usize = 4;
const MAX_INDEX_RECORDS: usize = 1_000_000;
const EXPIRY_SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// A parent remembers what its clients looked up this long, to route envelopes without a
/// second lookup.
const LOOKUP_CACHE_TTL: Duration = Duration::from_secs(30);
/// At most this many addresses of one `Hello` are considered.
const MAX_ANNOUNCED_ADDRESSES: usize = 8;
/// How often the bootstrap list is dialled again while this node has fewer than
/// [`ENOUGH_SUPERNODES`] other supernodes connected.
pub const BOOTSTRAP_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Below this many connected supernodes, a node dials the supernodes it hears of (bootstrap
/// list, a `Welcome`'s list, its clients' host caches); above, Kademlia finds the rest.
const ENOUGH_SUPERNODES: usize = 8;
/// At most this many supernodes are taken from one client's `Attach` or one `Welcome`.
const MAX_LEARNED_SUPERNODES: usize = 8;
/// A node alone says so at most this often.
const ALONE_WARNING_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct SupernodeConfig {
    pub network: NetworkFile,
    pub identity: DeviceKey,
    pub listen: Multiaddr,
    /// Supernodes to join through (multiaddrs ending in `/p2p/PEER`).
    pub bootstrap: Vec<Multiaddr>,
    /// Where offline messages and device records are kept (SQLite); `None`: in memory only.
    pub mailbox_file: Option<std::path::PathBuf>,
}

/// A client attached to this supernode.
#[derive(Debug, Clone)]
struct AttachedClient {
    certificate: Certificate,
    /// The client's signed withdrawal of its latest presence, published when it goes.
    withdrawal: Option<Vec<u8>>,
}

/// Who is waiting for a lookup to finish.
#[derive(Debug)]
enum LookupPurpose {
    Client(ResponseChannel<OverlayResponse>),
    Route {
        envelope: Vec<u8>,
        recipient_device: Box<DevicePublicKey>,
        channel: ResponseChannel<OverlayResponse>,
    },
}

#[derive(Debug)]
struct Lookup {
    username: Username,
    found: HashMap<DevicePublicKey, PresenceRecord>,
    outstanding: usize,
    purpose: LookupPurpose,
    started: Instant,
}

#[derive(Debug)]
struct Publish {
    record: Vec<u8>,
    /// The key it goes under when not the record's username (the gateway directory).
    under: Option<String>,
    replicas: u32,
    outstanding: usize,
    /// The client that asked; none for a withdrawal published after the client went.
    channel: Option<ResponseChannel<OverlayResponse>>,
}

#[derive(Debug)]
enum QueryPurpose {
    Publish(u64),
    Lookup(u64),
    /// An offline-message request to ask of every replica.
    Fanout(u64),
}

#[derive(Debug)]
enum Outstanding {
    Store(u64),
    Fetch(u64),
    /// A Forward or Deliver whose answer goes back unchanged to whoever asked.
    Relay(ResponseChannel<OverlayResponse>),
    Hello,
    /// A replica's answer to an offline-message request.
    Fanout(u64),
    /// Another supernode's relay offers, to add to this node's own for a client.
    RelayOffers { own: Vec<crate::protocol::RelayOffer>, channel: ResponseChannel<OverlayResponse>, asked: Instant },
}

/// How many relay offers another supernode may add to a client's (it decides what it offers).
const MAX_OTHER_RELAYS: usize = 2;
/// How long a client's relay offers wait for another supernode's; then they go without.
const OTHER_RELAY_WAIT: Duration = Duration::from_millis(500);

pub struct Supernode {
    swarm: Swarm<OverlayBehaviour>,
    network: NetworkFile,
    index: PresenceIndex,
    attached: HashMap<PeerId, AttachedClient>,
    connected: HashSet<PeerId>,
    queries: HashMap<kad::QueryId, QueryPurpose>,
    outstanding: HashMap<OutboundRequestId, Outstanding>,
    lookups: HashMap<u64, Lookup>,
    publishes: HashMap<u64, Publish>,
    lookup_cache: HashMap<Username, (Instant, Vec<PresenceRecord>)>,
    next_operation: u64,
    metrics: Arc<SupernodeMetrics>,
    listen_addresses: Vec<Multiaddr>,
    /// Other supernodes' addresses, refreshed periodically for the node's host cache file.
    known: Arc<std::sync::Mutex<Vec<String>>>,
    /// Where each connected peer connects from, to keep dial-backs to the asker's own address.
    remote_ips: HashMap<PeerId, std::net::IpAddr>,
    /// Dial-backs in progress, by the peer being dialled.
    dial_backs: HashMap<PeerId, ResponseChannel<OverlayResponse>>,
    /// Pings failed in a row, per peer.
    ping_failures: HashMap<PeerId, u32>,
    /// Hands attached clients relay nodes and credentials for their username.
    relay_issuer: Option<RelayIssuer>,
    /// Supernodes to (re)join through: the configured list plus what [`SupernodeHandle`]
    /// added since.
    bootstrap: Vec<Multiaddr>,
    learned: mpsc::UnboundedReceiver<Vec<Multiaddr>>,
    learn: mpsc::UnboundedSender<Vec<Multiaddr>>,
    /// When this node last said it is alone (none: it is not, or has not said so yet).
    alone_since_warning: Option<Instant>,
    /// This node's share of offline messages and device records.
    mailboxes: crate::mailbox_store::MailboxStore,
    fanouts: HashMap<u64, offline::Fanout>,
    /// Lines about peers' bad input, a few a minute.
    log_budget: std::sync::Mutex<crate::log_budget::LogBudget>,
    /// Supernodes dialled before this node knew where it listens, to greet once it does.
    hello_pending: Vec<PeerId>,
}

/// Tells a running supernode about more supernodes (e.g. the network file changed).
#[derive(Debug, Clone)]
pub struct SupernodeHandle {
    learn: mpsc::UnboundedSender<Vec<Multiaddr>>,
}

impl SupernodeHandle {
    /// Adds `addresses` (with `/p2p/PEER`) to the bootstrap list and dials those not known.
    pub fn learn(&self, addresses: Vec<Multiaddr>) {
        let _ = self.learn.send(addresses);
    }
}

/// Gives the relay nodes (with credentials) a client with this username may use.
pub type RelayIssuer = Box<dyn Fn(&str) -> Vec<crate::protocol::RelayOffer> + Send>;

impl std::fmt::Debug for Supernode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supernode")
            .field("peer_id", self.swarm.local_peer_id())
            .finish_non_exhaustive()
    }
}

impl Supernode {
    /// Builds the node and starts listening; call [`Self::listening_address`] to learn where.
    pub fn new(config: SupernodeConfig) -> Result<Self, SwarmError> {
        let mailboxes = offline::open_store(config.mailbox_file.as_deref())
            .map_err(|e| SwarmError::Transport(format!("cannot open the offline-message store: {e}")))?;
        let mut swarm = swarm::build(&config.identity, true)?;
        let (learn, learned) = mpsc::unbounded_channel();
        swarm
            .listen_on(config.listen.clone())
            .map_err(|e| SwarmError::Transport(format!("cannot listen on {}: {e}", config.listen)))?;
        let mut node = Self {
            swarm,
            network: config.network,
            index: PresenceIndex::new(MAX_INDEX_RECORDS),
            attached: HashMap::new(),
            connected: HashSet::new(),
            queries: HashMap::new(),
            outstanding: HashMap::new(),
            lookups: HashMap::new(),
            publishes: HashMap::new(),
            lookup_cache: HashMap::new(),
            next_operation: 0,
            metrics: Arc::default(),
            listen_addresses: Vec::new(),
            known: Arc::default(),
            remote_ips: HashMap::new(),
            dial_backs: HashMap::new(),
            ping_failures: HashMap::new(),
            relay_issuer: None,
            bootstrap: Vec::new(),
            learned,
            learn,
            alone_since_warning: None,
            mailboxes,
            fanouts: HashMap::new(),
            log_budget: std::sync::Mutex::default(),
            hello_pending: Vec::new(),
        };
        node.update_mailbox_metrics();
        node.learn_bootstrap(config.bootstrap);
        Ok(node)
    }

    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// Offers relay nodes to attached clients that ask (`RelayCredentials`).
    pub fn offer_relays(&mut self, issuer: RelayIssuer) {
        self.relay_issuer = Some(issuer);
    }

    /// A handle to tell the node, while it runs, about more supernodes.
    pub fn handle(&self) -> SupernodeHandle {
        SupernodeHandle { learn: self.learn.clone() }
    }

    pub fn metrics(&self) -> Arc<SupernodeMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Other supernodes this one knows (multiaddrs with `/p2p/`), updated every few seconds,
    /// for the operator's host cache so a restart needs no bootstrap list.
    pub fn known_supernodes_handle(&self) -> Arc<std::sync::Mutex<Vec<String>>> {
        Arc::clone(&self.known)
    }

    /// Drives the swarm until it listens; returns the dialable address with `/p2p/PEER_ID`.
    pub async fn listening_address(&mut self) -> Multiaddr {
        loop {
            if let Some(address) = self.listen_addresses.first() {
                return address.clone().with(Protocol::P2p(self.peer_id()));
            }
            let event = self.swarm.select_next_some().await;
            self.handle_swarm_event(event);
        }
    }

    /// Learns a supernode address (with `/p2p/PEER`) and dials it unless connected.
    pub fn add_supernode(&mut self, address: &Multiaddr) {
        let Some(Protocol::P2p(peer)) = address.iter().last() else {
            warn!(%address, "supernode address lacks /p2p/PEER_ID; ignored");
            return;
        };
        if peer == self.peer_id() {
            return;
        }
        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
            kad.add_address(&peer, address.clone());
        }
        let options = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
            .addresses(vec![address.clone()])
            .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(error) = self.swarm.dial(options) {
            debug!(%address, %error, "not dialling supernode");
        }
    }

    /// Adds `addresses` to the bootstrap list (those new to it) and dials them.
    fn learn_bootstrap(&mut self, addresses: Vec<Multiaddr>) {
        for address in addresses {
            if !self.bootstrap.contains(&address) {
                info!(%address, "bootstrap supernode added");
                self.add_supernode(&address);
                self.bootstrap.push(address);
            }
        }
    }

    /// Dials supernodes heard of from a client or another supernode, while this node knows
    /// too few: how supernodes that were started apart (none in the other's list) meet.
    fn learn_supernodes(&mut self, addresses: &[String]) {
        if self.supernode_count() >= ENOUGH_SUPERNODES {
            return;
        }
        for address in addresses.iter().take(MAX_LEARNED_SUPERNODES) {
            let Ok(address) = address.parse::<Multiaddr>() else { continue };
            match address.iter().last() {
                Some(Protocol::P2p(peer)) if peer != self.peer_id() && !self.connected.contains(&peer) => {
                    debug!(%address, "dialling a supernode heard of");
                    self.add_supernode(&address);
                }
                _ => {}
            }
        }
    }

    /// Other supernodes connected now: peers in the routing table (clients never are).
    fn supernode_count(&mut self) -> usize {
        let connected = &self.connected;
        match self.swarm.behaviour_mut().kad.as_mut() {
            Some(kad) => kad.kbuckets().map(|bucket| bucket.iter().filter(|entry| connected.contains(entry.node.key.preimage())).count()).sum(),
            None => 0,
        }
    }

    fn update_peer_metrics(&mut self) {
        let supernodes = self.supernode_count();
        self.metrics.connected_peers.store(self.connected.len() as u64, Ordering::Relaxed);
        self.metrics.supernodes.store(supernodes as u64, Ordering::Relaxed);
        self.metrics.attached_clients.store(self.attached.len() as u64, Ordering::Relaxed);
        if supernodes > 0 && self.alone_since_warning.take().is_some() {
            info!(supernodes, "joined the overlay");
        }
    }

    /// While few other supernodes are connected, dials the bootstrap list again (one may
    /// have been down, or started later); a node with none says so, once a minute.
    fn retry_bootstrap(&mut self) {
        let supernodes = self.supernode_count();
        if supernodes >= ENOUGH_SUPERNODES {
            return;
        }
        for address in self.bootstrap.clone() {
            self.add_supernode(&address);
        }
        if supernodes == 0 && self.alone_since_warning.is_none_or(|at| at.elapsed() >= ALONE_WARNING_INTERVAL) {
            self.alone_since_warning = Some(Instant::now());
            let others = self.bootstrap.iter().filter(|a| !matches!(a.iter().last(), Some(Protocol::P2p(p)) if p == self.peer_id())).count();
            warn!(
                bootstrap = others,
                "alone: no other supernode is connected, so this node's clients reach only each other; \
                 retrying the bootstrap list every {BOOTSTRAP_RETRY_INTERVAL:?} (add supernodes with `koe network add-bootstrap`)"
            );
        }
    }

    /// Runs until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut sweep = tokio::time::interval(EXPIRY_SWEEP_INTERVAL);
        let mut relay_offers_due = tokio::time::interval(OTHER_RELAY_WAIT / 2);
        let mut bootstrap_retry = tokio::time::interval(BOOTSTRAP_RETRY_INTERVAL);
        let mut bootstrapped = false;
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.handle_swarm_event(event),
                Some(addresses) = self.learned.recv() => self.learn_bootstrap(addresses),
                _ = bootstrap_retry.tick() => self.retry_bootstrap(),
                _ = relay_offers_due.tick() => self.send_overdue_relay_offers(),
                _ = sweep.tick() => {
                    self.index.expire(UnixTime::now());
                    self.expire_mailboxes(UnixTime::now());
                    self.metrics.records_held.store(self.index.records() as u64, Ordering::Relaxed);
                    self.lookup_cache.retain(|_, (at, _)| at.elapsed() < LOOKUP_CACHE_TTL);
                    let known = self.known_supernodes(crate::host_cache::MAX_HOSTS);
                    if let Ok(mut slot) = self.known.lock() {
                        *slot = known;
                    }
                    if !bootstrapped && !self.connected.is_empty() {
                        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
                            bootstrapped = kad.bootstrap().is_ok();
                        }
                    }
                }
                () = &mut shutdown => break,
            }
        }
        info!("supernode stopped");
    }

    fn handle_swarm_event(&mut self, event: SwarmEvent<OverlayBehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.listen_addresses.push(address);
                for peer in std::mem::take(&mut self.hello_pending) {
                    if self.connected.contains(&peer) {
                        self.say_hello(peer);
                    }
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                if let Some(channel) = self.dial_backs.remove(&peer_id) {
                    if endpoint.is_dialer() {
                        self.respond(channel, OverlayResponse::DialedBack { reachable: true, detail: "connected".into() });
                    } else {
                        self.dial_backs.insert(peer_id, channel);
                    }
                }
                if let Some(ip) = ip_of(endpoint.get_remote_address()) {
                    self.remote_ips.insert(peer_id, ip);
                }
                if endpoint.is_dialer() {
                    // Only supernodes are dialled (Kademlia, bootstrap, dial-backs of would-be
                    // supernodes): tell them where to dial back.
                    self.say_hello(peer_id);
                }
                self.connected.insert(peer_id);
                self.update_peer_metrics();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.connected.remove(&peer_id);
                self.remote_ips.remove(&peer_id);
                self.ping_failures.remove(&peer_id);
                if let Some(client) = self.attached.remove(&peer_id) {
                    info!(user = %client.certificate.username(), "client detached");
                    if let Some(withdrawal) = client.withdrawal {
                        self.publish_withdrawal(withdrawal);
                    }
                }
                self.update_peer_metrics();
            }
            SwarmEvent::Behaviour(OverlayBehaviourEvent::Ping(ping::Event {
                peer,
                result: Err(error),
                ..
            })) if !matches!(error, ping::Failure::Unsupported) => {
                let failures = self.ping_failures.entry(peer).or_default();
                *failures += 1;
                if *failures >= swarm::PING_FAILURES_BEFORE_DISCONNECT {
                    debug!(%peer, %error, "pings keep failing; disconnecting");
                    self.ping_failures.remove(&peer);
                    // A client whose network vanished: withdrawn now, not once the close of a
                    // connection nobody answers on has run its course.
                    if let Some(withdrawal) = self.attached.get_mut(&peer).and_then(|client| client.withdrawal.take()) {
                        self.publish_withdrawal(withdrawal);
                    }
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
            SwarmEvent::Behaviour(OverlayBehaviourEvent::Ping(ping::Event { peer, result: Ok(_), .. })) => {
                self.ping_failures.remove(&peer);
            }
            SwarmEvent::Behaviour(OverlayBehaviourEvent::Kad(event)) => self.handle_kad_event(event),
            SwarmEvent::Behaviour(OverlayBehaviourEvent::Overlay(event)) => self.handle_overlay_event(event),
            SwarmEvent::IncomingConnectionError { error, .. } => {
                debug!(%error, "incoming connection failed");
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                if let Some(channel) = self.dial_backs.remove(&peer) {
                    self.respond(channel, OverlayResponse::DialedBack { reachable: false, detail: error.to_string() });
                }
            }
            _ => {}
        }
    }

    fn handle_kad_event(&mut self, event: kad::Event) {
        let kad::Event::OutboundQueryProgressed { id, result, step, stats } = event else {
            return;
        };
        debug!(duration = ?stats.duration(), requests = stats.num_requests(), last = step.last, "kad query progressed");
        let kad::QueryResult::GetClosestPeers(result) = result else {
            return;
        };
        if !step.last {
            return;
        }
        self.metrics.kad_queries.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .kad_query_requests
            .fetch_add(u64::from(stats.num_requests()), Ordering::Relaxed);
        let peers = match result {
            Ok(ok) => ok.peers,
            Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
        };
        let me = self.peer_id();
        let peers: Vec<_> = peers.into_iter().filter(|p| p.peer_id != me).collect();
        match self.queries.remove(&id) {
            Some(QueryPurpose::Publish(operation)) => self.publish_to(operation, peers),
            Some(QueryPurpose::Lookup(operation)) => self.fetch_from(operation, peers),
            Some(QueryPurpose::Fanout(operation)) => self.fanout_to(operation, peers),
            None => {}
        }
    }

    fn new_operation(&mut self) -> u64 {
        self.next_operation += 1;
        self.next_operation
    }

    fn start_closest_query(&mut self, username: &Username, purpose: QueryPurpose) -> bool {
        match self.swarm.behaviour_mut().kad.as_mut() {
            Some(kad) => {
                // Only the few supernodes responsible for the key are needed, not Kademlia's
                // default twenty: fewer hops per lookup and publish.
                let wanted = NonZeroUsize::new(REPLICATION.max(LOOKUP_FANOUT)).unwrap_or(NonZeroUsize::MIN);
                let id = kad.get_n_closest_peers(index_key(username).to_vec(), wanted);
                self.queries.insert(id, purpose);
                true
            }
            None => false,
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
                message: request_response::Message::Response { request_id, response },
                ..
            } => self.handle_response(request_id, Some(response)),
            request_response::Event::OutboundFailure { request_id, error, peer, .. } => {
                debug!(%peer, %error, "overlay request failed");
                self.handle_response(request_id, None);
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound overlay request failed");
                if matches!(error, request_response::InboundFailure::Io(_)) {
                    self.metrics.refused("request", "malformed");
                }
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn respond(&mut self, channel: ResponseChannel<OverlayResponse>, response: OverlayResponse) {
        let _ = self.swarm.behaviour_mut().overlay.send_response(channel, response);
    }

    fn refuse(&mut self, channel: ResponseChannel<OverlayResponse>, reason: impl Into<String>) {
        self.respond(channel, OverlayResponse::Refused { reason: reason.into() });
    }

    fn handle_request(&mut self, peer: PeerId, request: OverlayRequest, channel: ResponseChannel<OverlayResponse>) {
        let now = UnixTime::now();
        match request {
            OverlayRequest::Attach { certificate, supernodes } => {
                self.attach(peer, &certificate, channel, now);
                if self.attached.contains_key(&peer) {
                    self.learn_supernodes(&supernodes);
                }
            }
            OverlayRequest::Publish { record, withdrawal } => {
                self.publish(peer, record, withdrawal.map(|w| w.0), channel, now);
            }
            OverlayRequest::Lookup { username } => {
                if !self.attached.contains_key(&peer) {
                    return self.refuse(channel, "attach first");
                }
                match Username::parse_existing(&username) {
                    Ok(username) => self.lookup(username, LookupPurpose::Client(channel)),
                    Err(error) => self.refuse(channel, format!("no such user: {error}")),
                }
            }
            OverlayRequest::Route { envelope } => self.route(peer, envelope, channel),
            OverlayRequest::Store { record, under } => self.store(&record, under.as_deref(), channel, now),
            OverlayRequest::Fetch { username } => {
                let records = Username::parse_existing(&username)
                    .map(|u| self.index.lookup(&u, now))
                    .unwrap_or_default();
                let records = records.iter().map(|r| ByteString(r.to_bytes())).collect();
                self.respond(channel, OverlayResponse::Presence { records });
            }
            OverlayRequest::Forward { envelope } => match Envelope::decode_bounded(&envelope) {
                Ok(decoded) => {
                    let target = peer_id_of(&decoded.recipient_device);
                    if self.attached.contains_key(&target) {
                        self.deliver(target, envelope, channel);
                    } else {
                        self.undelivered(channel, "the recipient is no longer attached here");
                    }
                }
                Err(error) => {
                    self.metrics.refused("envelope", error.reason());
                    self.refuse(channel, error.to_string());
                }
            },
            OverlayRequest::Deliver { .. } => self.refuse(channel, "supernodes do not take deliveries"),
            OverlayRequest::DialBack { address } => self.dial_back(peer, &address, channel),
            OverlayRequest::Hello { listen } => self.welcome(peer, &listen, channel),
            OverlayRequest::RelayCredentials => match self.attached.get(&peer) {
                Some(client) => {
                    let username = client.certificate.username().to_string();
                    let own = self.relay_issuer.as_ref().map(|issue| issue(&username)).unwrap_or_default();
                    self.add_another_relay(username, own, channel);
                }
                None => self.refuse(channel, "attach first"),
            },
            request @ (OverlayRequest::PublishDevice { .. }
            | OverlayRequest::LookupDevices { .. }
            | OverlayRequest::LeaveMessage { .. }
            | OverlayRequest::Mailbox { .. }) => self.offline_request(peer, request, channel, now),
            request @ (OverlayRequest::StoreDevice { .. }
            | OverlayRequest::FetchDevices { .. }
            | OverlayRequest::KeepMessage { .. }
            | OverlayRequest::MailboxReplica { .. }) => {
                if self.attached.contains_key(&peer) {
                    return self.refuse(channel, "an attached client is not a supernode");
                }
                let answer = self.replica(&request, now);
                self.respond(channel, answer);
            }
            OverlayRequest::RelayCredentialsFor { username } => {
                if self.attached.contains_key(&peer) {
                    return self.refuse(channel, "an attached client is not a supernode");
                }
                match Username::parse_existing(&username) {
                    Ok(username) => {
                        let relays = self.relay_issuer.as_ref().map(|issue| issue(username.as_str())).unwrap_or_default();
                        self.respond(channel, OverlayResponse::Relays { relays });
                    }
                    Err(error) => self.refuse(channel, format!("no such user: {error}")),
                }
            }
        }
    }

    /// Answers a client's `RelayCredentials` with this node's `own` offers and those of one
    /// other connected supernode (one in the routing table: not a client that only connected),
    /// if one answers.
    fn add_another_relay(&mut self, username: String, own: Vec<crate::protocol::RelayOffer>, channel: ResponseChannel<OverlayResponse>) {
        let supernodes: HashSet<PeerId> = match self.swarm.behaviour_mut().kad.as_mut() {
            Some(kad) => kad.kbuckets().flat_map(|bucket| bucket.iter().map(|entry| *entry.node.key.preimage()).collect::<Vec<_>>()).collect(),
            None => HashSet::new(),
        };
        let other = self.connected.iter().copied().find(|peer| supernodes.contains(peer) && !self.attached.contains_key(peer));
        match other {
            Some(other) => {
                debug!(%other, user = %username, "asking another supernode for an offer on its relay node");
                let id = self.swarm.behaviour_mut().overlay.send_request(&other, OverlayRequest::RelayCredentialsFor { username });
                self.outstanding.insert(id, Outstanding::RelayOffers { own, channel, asked: Instant::now() });
            }
            None => {
                debug!(routing_table = supernodes.len(), connected = self.connected.len(), "no other supernode to ask for a relay offer");
                self.respond(channel, OverlayResponse::Relays { relays: own });
            }
        }
    }

    /// Relay offers that waited [`OTHER_RELAY_WAIT`] for another supernode go without its.
    fn send_overdue_relay_offers(&mut self) {
        let overdue: Vec<OutboundRequestId> = self
            .outstanding
            .iter()
            .filter(|(_, outstanding)| matches!(outstanding, Outstanding::RelayOffers { asked, .. } if asked.elapsed() >= OTHER_RELAY_WAIT))
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            if let Some(Outstanding::RelayOffers { own, channel, .. }) = self.outstanding.remove(&id) {
                debug!("another supernode did not offer its relay node in time");
                self.respond(channel, OverlayResponse::Relays { relays: own });
            }
        }
    }

    fn say_hello(&mut self, peer: PeerId) {
        if self.listen_addresses.is_empty() {
            // A node dialling before its listener reported its address would announce nothing
            // (and be refused): it says hello once it knows where it listens.
            self.hello_pending.push(peer);
            return;
        }
        let listen = self.listen_addresses.iter().map(ToString::to_string).collect();
        let id = self.swarm.behaviour_mut().overlay.send_request(&peer, OverlayRequest::Hello { listen });
        self.outstanding.insert(id, Outstanding::Hello);
    }

    /// Adds a supernode that dialled in to the routing table at the addresses it announced,
    /// only those on the IP it connects from, so nobody can plant a third party's address.
    fn welcome(&mut self, peer: PeerId, listen: &[String], channel: ResponseChannel<OverlayResponse>) {
        if self.attached.contains_key(&peer) {
            return self.refuse(channel, "an attached client is not a supernode");
        }
        let remote_ip = self.remote_ips.get(&peer).copied();
        let addresses: Vec<Multiaddr> = listen
            .iter()
            .take(MAX_ANNOUNCED_ADDRESSES)
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .filter(|a| remote_ip.is_some() && ip_of(a) == remote_ip)
            // An address naming another peer is not this one's.
            .filter(|a| !matches!(a.iter().last(), Some(Protocol::P2p(other)) if other != peer))
            .collect();
        if addresses.is_empty() {
            debug!(%peer, ?remote_ip, ?listen, "a Hello announced no address on the IP it connects from");
            self.metrics.refused("hello", "no_address");
            return self.refuse(channel, "no announced address is on the IP you connect from");
        }
        let mut added = 0;
        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
            for address in addresses {
                if !matches!(kad.add_address(&peer, address), kad::RoutingUpdate::Failed) {
                    added += 1;
                }
            }
        }
        let supernodes = self.known_supernodes(MAX_LEARNED_SUPERNODES + 1);
        self.respond(channel, OverlayResponse::Welcome { added, supernodes });
        self.update_peer_metrics();
    }

    /// Checks a presence record from the network, counting refusals by reason.
    fn validate(&self, bytes: &[u8], now: UnixTime) -> Result<PresenceRecord, String> {
        PresenceRecord::decode_verified(bytes, &self.network.name, &self.network.signing_key, now).map_err(|error| {
            self.metrics.refused("presence", error.reason());
            let allowed = self.log_budget.lock().ok().and_then(|mut budget| budget.allow(Instant::now()));
            if let Some(suppressed) = allowed {
                warn!(%error, suppressed, "presence record refused");
            }
            error.to_string()
        })
    }

    fn attach(&mut self, peer: PeerId, certificate: &[u8], channel: ResponseChannel<OverlayResponse>, now: UnixTime) {
        let certificate = match Certificate::from_bytes(certificate) {
            Ok(certificate) => certificate,
            Err(error) => {
                self.metrics.refused("attach", "malformed");
                return self.refuse(channel, format!("malformed certificate: {error}"));
            }
        };
        if let Err(error) = certificate.verify(&self.network.name, &self.network.signing_key, now) {
            self.metrics.refused("attach", "bad_certificate");
            return self.refuse(channel, error.to_string());
        }
        if peer_id_of(certificate.device_key()) != peer {
            self.metrics.refused("attach", "forged");
            return self.refuse(channel, "the certificate is for another device than this connection's");
        }
        info!(user = %certificate.username(), "client attached");
        self.attached.insert(peer, AttachedClient { certificate, withdrawal: None });
        self.metrics.attached_clients.store(self.attached.len() as u64, Ordering::Relaxed);
        let me = self.peer_id();
        let parent_addresses = self
            .listen_addresses
            .iter()
            .map(|a| a.clone().with(Protocol::P2p(me)).to_string())
            .collect();
        let supernodes = self.known_supernodes(50);
        self.respond(channel, OverlayResponse::Attached { parent_addresses, supernodes });
    }

    /// Addresses of supernodes in the routing table, for clients' host caches.
    fn known_supernodes(&mut self, limit: usize) -> Vec<String> {
        let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() else {
            return Vec::new();
        };
        let mut known = Vec::new();
        for bucket in kad.kbuckets() {
            for entry in bucket.iter() {
                let peer = *entry.node.key.preimage();
                let address = entry.node.value.first().clone();
                let address = match address.iter().last() {
                    Some(Protocol::P2p(_)) => address,
                    _ => address.with(Protocol::P2p(peer)),
                };
                known.push(address.to_string());
                if known.len() >= limit {
                    return known;
                }
            }
        }
        known
    }

    fn publish(
        &mut self,
        peer: PeerId,
        bytes: Vec<u8>,
        withdrawal: Option<Vec<u8>>,
        channel: ResponseChannel<OverlayResponse>,
        now: UnixTime,
    ) {
        let Some(client) = self.attached.get(&peer) else {
            return self.refuse(channel, "attach first");
        };
        let client_device = *client.certificate.device_key();
        let record = match self.validate(&bytes, now) {
            Ok(record) => record,
            Err(reason) => return self.refuse(channel, reason),
        };
        if record.body().certificate.device_key() != &client_device {
            self.metrics.refused("presence", "forged");
            return self.refuse(channel, "a client may only publish its own presence");
        }
        if let Some(withdrawal) = &withdrawal {
            match self.validate(withdrawal, now) {
                Ok(offline) if offline.withdraws(&record) => {}
                Ok(_) => {
                    self.metrics.refused("presence", "bad_withdrawal");
                    return self.refuse(channel, "a withdrawal must be the same device's, offline, with a higher sequence");
                }
                Err(reason) => return self.refuse(channel, reason),
            }
        }
        if let Err(error) = self.index.store(record.clone(), now) {
            self.metrics.refused("presence", error.reason());
            return self.refuse(channel, error.to_string());
        }
        if let Some(client) = self.attached.get_mut(&peer) {
            client.withdrawal = withdrawal;
        }
        self.list_in_directory(&record, &bytes, now);
        self.spread(record.username().clone(), &record, bytes, Some(channel));
    }

    /// Publishes the withdrawal a client signed in advance, now that its connection closed.
    /// It is dropped if it no longer holds: expired, or the device has published newer
    /// presence since (through another parent).
    fn publish_withdrawal(&mut self, bytes: Vec<u8>) {
        let now = UnixTime::now();
        let Ok(record) = self.validate(&bytes, now) else { return };
        match self.index.store(record.clone(), now) {
            Ok(_) => {
                debug!(user = %record.username(), "client gone: publishing its withdrawal");
                self.list_in_directory(&record, &bytes, now);
                self.spread(record.username().clone(), &record, bytes, None);
            }
            Err(error) => debug!(%error, "a departed client's withdrawal is out of date"),
        }
    }

    /// A gateway's record (or its withdrawal), just stored here under its username, goes
    /// under the gateway directory too, here and at the supernodes responsible for that key;
    /// nobody waits for the answers. Any other record is left alone.
    fn list_in_directory(&mut self, record: &PresenceRecord, bytes: &[u8], now: UnixTime) {
        let Some(directory) = directory::also_listed_under(record) else {
            return;
        };
        match self.index.store_under(directory.clone(), record.clone(), now) {
            Ok(_) => self.spread(directory, record, bytes.to_vec(), None),
            Err(error) => debug!(%error, gateway = %record.username(), "not listed in the gateway directory"),
        }
    }

    /// Sends a record just stored here under `key` to the other supernodes responsible for
    /// that key.
    fn spread(&mut self, key: Username, record: &PresenceRecord, bytes: Vec<u8>, channel: Option<ResponseChannel<OverlayResponse>>) {
        self.metrics.records_stored.fetch_add(1, Ordering::Relaxed);
        self.metrics.records_held.store(self.index.records() as u64, Ordering::Relaxed);
        self.lookup_cache.remove(&key);
        let under = (&key != record.username()).then(|| key.to_string());
        let operation = self.new_operation();
        self.publishes.insert(operation, Publish { record: bytes, under, replicas: 1, outstanding: 0, channel });
        if !self.start_closest_query(&key, QueryPurpose::Publish(operation)) {
            self.publish_to(operation, Vec::new());
        }
    }

    /// Takes a record another supernode spread: under its username, or under the key named
    /// (which only a gateway's may be under: the index checks the role on the certificate).
    fn store(&mut self, bytes: &[u8], under: Option<&str>, channel: ResponseChannel<OverlayResponse>, now: UnixTime) {
        let record = match self.validate(bytes, now) {
            Ok(record) => record,
            Err(reason) => return self.refuse(channel, reason),
        };
        let key = match under.map(Username::parse_existing) {
            None => record.username().clone(),
            Some(Ok(key)) => key,
            Some(Err(error)) => {
                self.metrics.refused("presence", "malformed");
                return self.refuse(channel, format!("not an index key: {error}"));
            }
        };
        match self.index.store_under(key, record, now) {
            Ok(_) => {
                self.metrics.records_stored.fetch_add(1, Ordering::Relaxed);
                self.metrics.records_held.store(self.index.records() as u64, Ordering::Relaxed);
                self.respond(channel, OverlayResponse::Stored);
            }
            Err(error) => {
                self.metrics.refused("presence", error.reason());
                self.refuse(channel, error.to_string());
            }
        }
    }

    fn publish_to(&mut self, operation: u64, peers: Vec<kad::PeerInfo>) {
        let Some(publish) = self.publishes.get(&operation) else {
            return;
        };
        let (record, under) = (publish.record.clone(), publish.under.clone());
        let mut sent = 0;
        for peer in peers.into_iter().take(REPLICATION) {
            let id = self.swarm.behaviour_mut().overlay.send_request_with_addresses(
                &peer.peer_id,
                OverlayRequest::Store { record: record.clone(), under: under.clone() },
                peer.addrs,
            );
            self.outstanding.insert(id, Outstanding::Store(operation));
            sent += 1;
        }
        if let Some(publish) = self.publishes.get_mut(&operation) {
            publish.outstanding = sent;
        }
        self.finish_publish_if_done(operation);
    }

    fn finish_publish_if_done(&mut self, operation: u64) {
        if self.publishes.get(&operation).is_some_and(|p| p.outstanding == 0) {
            if let Some(Publish { channel: Some(channel), replicas, .. }) = self.publishes.remove(&operation) {
                self.respond(channel, OverlayResponse::Published { replicas });
            }
        }
    }

    fn lookup(&mut self, username: Username, purpose: LookupPurpose) {
        self.metrics.lookups.fetch_add(1, Ordering::Relaxed);
        let now = UnixTime::now();
        let found = self
            .index
            .lookup(&username, now)
            .into_iter()
            .map(|r| (*r.body().certificate.device_key(), r))
            .collect();
        let operation = self.new_operation();
        self.lookups.insert(
            operation,
            Lookup { username: username.clone(), found, outstanding: 0, purpose, started: Instant::now() },
        );
        if !self.start_closest_query(&username, QueryPurpose::Lookup(operation)) {
            self.fetch_from(operation, Vec::new());
        }
    }

    fn fetch_from(&mut self, operation: u64, peers: Vec<kad::PeerInfo>) {
        let Some(lookup) = self.lookups.get(&operation) else {
            return;
        };
        let username = lookup.username.to_string();
        let mut sent = 0;
        for peer in peers.into_iter().take(LOOKUP_FANOUT) {
            let id = self.swarm.behaviour_mut().overlay.send_request_with_addresses(
                &peer.peer_id,
                OverlayRequest::Fetch { username: username.clone() },
                peer.addrs,
            );
            self.outstanding.insert(id, Outstanding::Fetch(operation));
            sent += 1;
        }
        if let Some(lookup) = self.lookups.get_mut(&operation) {
            lookup.outstanding = sent;
        }
        self.finish_lookup_if_done(operation);
    }

    fn handle_response(&mut self, request_id: OutboundRequestId, response: Option<OverlayResponse>) {
        match self.outstanding.remove(&request_id) {
            Some(Outstanding::Store(operation)) => {
                if let Some(publish) = self.publishes.get_mut(&operation) {
                    publish.outstanding = publish.outstanding.saturating_sub(1);
                    if matches!(response, Some(OverlayResponse::Stored)) {
                        publish.replicas += 1;
                    }
                }
                self.finish_publish_if_done(operation);
            }
            Some(Outstanding::Fetch(operation)) => {
                let now = UnixTime::now();
                let records = match response {
                    Some(OverlayResponse::Presence { records }) => records,
                    _ => Vec::new(),
                };
                let mut verified = Vec::new();
                for record in records {
                    // Another supernode's answer is checked like anything else from the network.
                    if let Ok(record) = self.validate(&record.0, now) {
                        verified.push(record);
                    }
                }
                if let Some(lookup) = self.lookups.get_mut(&operation) {
                    lookup.outstanding = lookup.outstanding.saturating_sub(1);
                    for record in verified {
                        // A user's records, or in the gateway directory the gateways'.
                        if !directory::is_listed_under(&lookup.username, &record) {
                            continue;
                        }
                        let device = *record.body().certificate.device_key();
                        let newer = lookup
                            .found
                            .get(&device)
                            .is_none_or(|held| held.body().sequence < record.body().sequence);
                        if newer {
                            lookup.found.insert(device, record);
                        }
                    }
                }
                self.finish_lookup_if_done(operation);
            }
            Some(Outstanding::Relay(channel)) => {
                let response = response.unwrap_or(OverlayResponse::Undelivered {
                    reason: "the recipient's supernode did not answer".into(),
                });
                match &response {
                    OverlayResponse::Delivered => {
                        self.metrics.envelopes_routed.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        self.metrics.envelopes_undelivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                self.respond(channel, response);
            }
            Some(Outstanding::RelayOffers { mut own, channel, .. }) => {
                if let Some(OverlayResponse::Relays { relays }) = response {
                    own.extend(relays.into_iter().take(MAX_OTHER_RELAYS));
                }
                self.respond(channel, OverlayResponse::Relays { relays: own });
            }
            Some(Outstanding::Fanout(operation)) => self.fanout_answered(operation, response),
            Some(Outstanding::Hello) => match response {
                Some(OverlayResponse::Welcome { supernodes, .. }) => self.learn_supernodes(&supernodes),
                // Typically this host sends from another address than the one it listens on
                // (several addresses): the other supernode will not route to this one.
                Some(OverlayResponse::Refused { reason }) => {
                    warn!(%reason, "another supernode refused this one's listen addresses");
                }
                _ => {}
            },
            None => {}
        }
    }

    fn finish_lookup_if_done(&mut self, operation: u64) {
        if self.lookups.get(&operation).is_none_or(|l| l.outstanding != 0) {
            return;
        }
        let Some(lookup) = self.lookups.remove(&operation) else {
            return;
        };
        debug!(user = %lookup.username, devices = lookup.found.len(), elapsed = ?lookup.started.elapsed(), "lookup done");
        // Withdrawals took part in the merge (they outrank the device's older records); the
        // answer is the devices that are online.
        let records: Vec<PresenceRecord> = lookup.found.into_values().filter(PresenceRecord::is_online).collect();
        self.lookup_cache.insert(lookup.username, (Instant::now(), records.clone()));
        match lookup.purpose {
            LookupPurpose::Client(channel) => {
                let records = records.iter().map(|r| ByteString(r.to_bytes())).collect();
                self.respond(channel, OverlayResponse::Presence { records });
            }
            LookupPurpose::Route { envelope, recipient_device, channel } => {
                self.forward(&records, *recipient_device, envelope, channel);
            }
        }
    }

    fn route(&mut self, peer: PeerId, envelope: Vec<u8>, channel: ResponseChannel<OverlayResponse>) {
        if !self.attached.contains_key(&peer) {
            return self.refuse(channel, "attach first");
        }
        let decoded = match Envelope::decode_bounded(&envelope) {
            Ok(decoded) => decoded,
            Err(error) => {
                self.metrics.refused("envelope", error.reason());
                return self.refuse(channel, error.to_string());
            }
        };
        let target = peer_id_of(&decoded.recipient_device);
        if self.attached.contains_key(&target) {
            return self.deliver(target, envelope, channel);
        }
        let cached = self
            .lookup_cache
            .get(&decoded.recipient)
            .filter(|(at, _)| at.elapsed() < LOOKUP_CACHE_TTL)
            .map(|(_, records)| records.clone());
        match cached {
            Some(records) if records.iter().any(|r| r.body().certificate.device_key() == &decoded.recipient_device) => {
                self.forward(&records, decoded.recipient_device, envelope, channel);
            }
            _ => self.lookup(
                decoded.recipient.clone(),
                LookupPurpose::Route {
                    envelope,
                    recipient_device: Box::new(decoded.recipient_device),
                    channel,
                },
            ),
        }
    }

    /// Sends an envelope on to the parent named in the recipient device's presence record.
    fn forward(
        &mut self,
        records: &[PresenceRecord],
        device: DevicePublicKey,
        envelope: Vec<u8>,
        channel: ResponseChannel<OverlayResponse>,
    ) {
        let Some(record) = records.iter().find(|r| r.body().certificate.device_key() == &device) else {
            return self.undelivered(channel, "the recipient device is offline");
        };
        let parent = &record.body().parent;
        let Ok(parent_peer) = PeerId::from_bytes(&parent.peer_id) else {
            return self.undelivered(channel, "the recipient's presence names no valid supernode");
        };
        if parent_peer == self.peer_id() {
            return self.undelivered(channel, "the recipient device is offline");
        }
        let addresses: Vec<Multiaddr> = parent.addresses.iter().filter_map(|a| a.parse().ok()).collect();
        let id = self
            .swarm
            .behaviour_mut()
            .overlay
            .send_request_with_addresses(&parent_peer, OverlayRequest::Forward { envelope }, addresses);
        self.outstanding.insert(id, Outstanding::Relay(channel));
    }

    /// Dials a client's would-be supernode address from here. Only the asker's own IP is
    /// dialled, so supernodes cannot be used to probe anyone else.
    fn dial_back(&mut self, peer: PeerId, address: &str, channel: ResponseChannel<OverlayResponse>) {
        if !self.attached.contains_key(&peer) {
            return self.refuse(channel, "attach first");
        }
        let Ok(address) = address.parse::<Multiaddr>() else {
            return self.refuse(channel, "not a multiaddr");
        };
        let Some(Protocol::P2p(target)) = address.iter().last() else {
            return self.refuse(channel, "the address must end in /p2p/PEER_ID");
        };
        if ip_of(&address).is_none() || ip_of(&address) != self.remote_ips.get(&peer).copied() {
            return self.refuse(channel, "only the address you connect from can be dialled back");
        }
        if self.dial_backs.contains_key(&target) {
            return self.refuse(channel, "a dial-back to that peer is already in progress");
        }
        let options = libp2p::swarm::dial_opts::DialOpts::peer_id(target)
            .addresses(vec![address])
            .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
            .build();
        match self.swarm.dial(options) {
            Ok(()) => {
                self.dial_backs.insert(target, channel);
            }
            Err(error) => self.respond(channel, OverlayResponse::DialedBack { reachable: false, detail: error.to_string() }),
        }
    }

    fn deliver(&mut self, client: PeerId, envelope: Vec<u8>, channel: ResponseChannel<OverlayResponse>) {
        let id = self.swarm.behaviour_mut().overlay.send_request(&client, OverlayRequest::Deliver { envelope });
        self.outstanding.insert(id, Outstanding::Relay(channel));
    }

    fn undelivered(&mut self, channel: ResponseChannel<OverlayResponse>, reason: &str) {
        self.metrics.envelopes_undelivered.fetch_add(1, Ordering::Relaxed);
        self.respond(channel, OverlayResponse::Undelivered { reason: reason.into() });
    }
}
