//! The relay node's sans-IO core: one turn-server-proto server per listening socket, plus what
//! the protocol crate leaves to its user: stream framing, short-lived credentials, quotas
//! (allocations per user and in total, bandwidth per allocation), which peers may be reached,
//! and tidying up allocations whose TCP or TLS connection closed.
//!
//! Binding requests (plain STUN, RFC 8489) are answered here with koe-stun: turn-server-proto
//! 0.7.3 sends its Binding responses to its own listening address instead of the client.
//!
//! The driver feeds it datagrams, stream bytes, closed streams and the time, and carries out the
//! [`RelayOutput`]s it queues: send, open or close a relayed socket, close a stream.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use turn_server_proto::api::{SocketAllocateError, TurnServerApi, TurnServerPollRet};
use turn_server_proto::server::TurnServer;
use turn_types::stun::attribute::{ErrorCode, Username};
use turn_types::stun::message::{Message, MessageClass, MessageWrite, MessageWriteExt, MessageWriteVec};
use turn_types::stun::TransportType;
use turn_types::AddressFamily;

use crate::credentials::{check_short_lived, short_lived_expiry, unix_now, RelaySecret};
use crate::framing::{StreamFrame, StreamFramer};

/// How long a nonce stays valid before the client must fetch a new one (RFC 8656 suggests an
/// hour at most; coturn uses 600 s).
const NONCE_LIFETIME: Duration = Duration::from_secs(600);

/// Allocate requests remembered while their sockets are opened.
const MAX_PENDING_ALLOCATIONS: usize = 4096;

/// Limits a relay node enforces. Zero means "no limit" for the numeric ones.
#[derive(Debug, Clone)]
pub struct RelayPolicy {
    /// Allocations alive at once on this relay node.
    pub max_allocations: usize,
    /// Allocations alive at once for one username.
    pub max_allocations_per_user: usize,
    /// Bytes per second one allocation may relay, both directions together; a burst of one
    /// second is allowed.
    pub bytes_per_second_per_allocation: u64,
    /// Whether peers on loopback addresses may be reached. Off unless the relay itself relays from
    /// a loopback address (a network on one machine), so a public relay never reaches the
    /// services on its own host.
    pub allow_loopback_peers: bool,
}

impl Default for RelayPolicy {
    fn default() -> Self {
        Self {
            max_allocations: 2000,
            max_allocations_per_user: 8,
            // A voice call with redundancy sends ~100 kbit/s each way: leave room for two.
            bytes_per_second_per_allocation: 64_000,
            allow_loopback_peers: false,
        }
    }
}

/// What the driver must do.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayOutput {
    /// Send a datagram from a UDP socket of ours (a listening socket or a relayed one).
    Datagram { from: SocketAddr, to: SocketAddr, data: Vec<u8> },
    /// Write to the stream `client` opened to our stream listener `listen`.
    Stream { listen: SocketAddr, client: SocketAddr, data: Vec<u8> },
    /// Close that stream.
    CloseStream { listen: SocketAddr, client: SocketAddr },
    /// Open a relayed UDP socket, then call [`RelayCore::relayed_socket_opened`].
    OpenRelayedSocket(AllocationRequest),
    /// Close the relayed socket.
    CloseRelayedSocket { relayed: SocketAddr },
}

/// A client's request for a relayed socket, as the protocol crate asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationRequest {
    pub transport: TransportType,
    pub listen: SocketAddr,
    pub client: SocketAddr,
    pub allocation_transport: TransportType,
    pub family: AddressFamily,
}

/// Counters an operator or a benchmark reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub allocations: usize,
    pub allocations_refused_quota: u64,
    pub allocations_refused_capacity: u64,
    pub packets_relayed: u64,
    pub bytes_relayed: u64,
    pub packets_dropped_bandwidth: u64,
    pub packets_dropped_forbidden_peer: u64,
    pub streams_closed_not_turn: u64,
    pub requests_refused_expired: u64,
    /// Frames for TCP and TLS clients dropped because their stream fell behind (the oldest
    /// media first, see [`crate::send_queue`]). Counted by the driver, not this core.
    pub stream_frames_dropped: u64,
}

#[derive(Debug)]
struct Allocation {
    listener: usize,
    user: String,
    /// The stream the allocation was made over; closing the stream ends the allocation.
    stream: Option<(SocketAddr, SocketAddr)>,
    bucket: TokenBucket,
}

/// The relay node's sans-IO state.
#[derive(Debug)]
pub struct RelayCore {
    epoch: Instant,
    realm: String,
    listeners: Vec<(TransportType, TurnServer)>,
    /// When each listener next wants [`TurnServerApi::poll`] (expiries of nonces, permissions,
    /// allocations). Data never changes these, so they are polled only after requests and then.
    listener_wakes: Vec<turn_types::Instant>,
    allocations: HashMap<SocketAddr, Allocation>,
    allocations_per_user: HashMap<String, usize>,
    /// The username of the last Allocate request seen on each 5-tuple (is it a stream, listen,
    /// client), for the quota.
    allocating_user: HashMap<(bool, SocketAddr, SocketAddr), String>,
    streams: HashMap<(SocketAddr, SocketAddr), StreamFramer>,
    secret: Option<RelaySecret>,
    known_short_lived: HashSet<String>,
    /// Every username and password accepted, for listeners added later.
    users: Vec<(String, String)>,
    policy: RelayPolicy,
    output: VecDeque<RelayOutput>,
    stats: RelayStats,
}

impl RelayCore {
    pub fn new(realm: impl Into<String>, policy: RelayPolicy, secret: Option<RelaySecret>, now: Instant) -> Self {
        Self {
            epoch: now,
            realm: realm.into(),
            listeners: Vec::new(),
            listener_wakes: Vec::new(),
            allocations: HashMap::new(),
            allocations_per_user: HashMap::new(),
            allocating_user: HashMap::new(),
            streams: HashMap::new(),
            secret,
            known_short_lived: HashSet::new(),
            users: Vec::new(),
            policy,
            output: VecDeque::new(),
            stats: RelayStats::default(),
        }
    }

    /// Serves TURN on a listening socket: `Udp` for datagrams, `Tcp` for TCP and TLS streams.
    pub fn add_listener(&mut self, transport: TransportType, listen: SocketAddr) {
        let mut server = TurnServer::new(transport, listen, self.realm.clone());
        server.set_nonce_expiry_duration(NONCE_LIFETIME);
        for (username, password) in &self.users {
            server.add_user(username.clone(), password.clone());
        }
        self.listeners.push((transport, server));
        self.listener_wakes.push(turn_types::Instant::ZERO);
    }

    /// Accepts `username`/`password` on every listener (long-term credentials, RFC 8489 §9.2).
    pub fn add_user(&mut self, username: &str, password: &str) {
        for (_, server) in &mut self.listeners {
            server.add_user(username.to_owned(), password.to_owned());
        }
        self.users.push((username.to_owned(), password.to_owned()));
    }

    pub fn stats(&self) -> RelayStats {
        RelayStats { allocations: self.allocations.len(), ..self.stats.clone() }
    }

    pub fn poll_output(&mut self) -> Option<RelayOutput> {
        self.output.pop_front()
    }

    /// When [`Self::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Instant {
        let earliest = self.listener_wakes.iter().min().copied().unwrap_or(turn_types::Instant::ZERO);
        earliest.to_std(self.epoch)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let now_turn = self.turn_now(now);
        for index in 0..self.listeners.len() {
            self.poll_listener(index, now_turn);
        }
    }

    /// A datagram arrived on one of our UDP sockets: a listening socket or a relayed one.
    pub fn recv_datagram(&mut self, local: SocketAddr, from: SocketAddr, data: &[u8], now: Instant) {
        let now_turn = self.turn_now(now);
        if let Some(allocation) = self.allocations.get_mut(&local) {
            // From a peer, towards the client.
            if !allocation.bucket.take(data.len(), now) {
                self.stats.packets_dropped_bandwidth += 1;
                return;
            }
            let listener = allocation.listener;
            let reply = self.listeners[listener].1.recv(turn_server_proto::api::Transmit::new(data, TransportType::Udp, from, local), now_turn);
            if let Some(reply) = reply {
                self.stats.packets_relayed += 1;
                self.stats.bytes_relayed += data.len() as u64;
                let reply = reply.build();
                self.emit(reply.transport, reply.from, reply.to, reply.data, now);
            }
            return;
        }
        let Some(listener) = self.listener_index(TransportType::Udp, local) else { return };
        if let Some(answer) = koe_stun::answer(data, from) {
            self.output.push_back(RelayOutput::Datagram { from: local, to: from, data: answer });
            return;
        }
        if is_stun_request(data) && !self.admit_request(TransportType::Udp, local, from, data) {
            return;
        }
        self.hand_to_server(listener, TransportType::Udp, from, local, data, now);
    }

    /// Bytes arrived on a stream (TCP or decrypted TLS) that `client` opened to `listen`.
    pub fn recv_stream(&mut self, listen: SocketAddr, client: SocketAddr, bytes: &[u8], now: Instant) {
        let Some(listener) = self.listener_index(TransportType::Tcp, listen) else { return };
        let framer = self.streams.entry((listen, client)).or_default();
        framer.push(bytes);
        loop {
            let Some(framer) = self.streams.get_mut(&(listen, client)) else { return };
            match framer.next_frame() {
                Ok(None) => return,
                Ok(Some(frame)) => {
                    if let StreamFrame::Stun(message) = &frame {
                        if let Some(answer) = koe_stun::answer(message, client) {
                            self.output.push_back(RelayOutput::Stream { listen, client, data: answer });
                            continue;
                        }
                        if is_stun_request(message) && !self.admit_request(TransportType::Tcp, listen, client, message) {
                            continue;
                        }
                    }
                    self.hand_to_server(listener, TransportType::Tcp, client, listen, frame.bytes(), now);
                }
                Err(error) => {
                    tracing::info!(%client, %error, "closing a stream that does not speak TURN");
                    self.stats.streams_closed_not_turn += 1;
                    self.output.push_back(RelayOutput::CloseStream { listen, client });
                    self.stream_closed(listen, client, now);
                    return;
                }
            }
        }
    }

    /// The stream `client` opened to `listen` is gone: its allocations end with it (RFC 8656 §3.1).
    pub fn stream_closed(&mut self, listen: SocketAddr, client: SocketAddr, now: Instant) {
        let now_turn = self.turn_now(now);
        self.streams.remove(&(listen, client));
        if let Some(listener) = self.listener_index(TransportType::Tcp, listen) {
            let _ = self.listeners[listener].1.recv(turn_server_proto::api::Transmit::new(&[][..], TransportType::Tcp, client, listen), now_turn);
        }
        let ended: Vec<SocketAddr> = self
            .allocations
            .iter()
            .filter(|(_, allocation)| allocation.stream == Some((listen, client)))
            .map(|(relayed, _)| *relayed)
            .collect();
        for relayed in ended {
            self.end_allocation(relayed);
        }
    }

    /// The driver opened (or failed to open) the relayed socket for `request`.
    pub fn relayed_socket_opened(&mut self, request: AllocationRequest, result: Result<SocketAddr, SocketAllocateError>, now: Instant) {
        let now_turn = self.turn_now(now);
        let Some(listener) = self.listener_index(request.transport, request.listen) else { return };
        let user = self.allocating_user.remove(&(request.transport == TransportType::Tcp, request.listen, request.client)).unwrap_or_default();
        if let Ok(relayed) = result {
            *self.allocations_per_user.entry(user.clone()).or_default() += 1;
            let stream = (request.transport == TransportType::Tcp).then_some((request.listen, request.client));
            let bucket = TokenBucket::new(self.policy.bytes_per_second_per_allocation, now);
            self.allocations.insert(relayed, Allocation { listener, user, stream, bucket });
        }
        self.listeners[listener].1.allocated_socket(
            request.transport,
            request.listen,
            request.client,
            request.allocation_transport,
            request.family,
            result,
            now_turn,
        );
        self.poll_listener(listener, now_turn);
    }

    fn hand_to_server(&mut self, listener: usize, transport: TransportType, from: SocketAddr, to: SocketAddr, data: &[u8], now: Instant) {
        let now_turn = self.turn_now(now);
        let reply = self.listeners[listener].1.recv(turn_server_proto::api::Transmit::new(data, transport, from, to), now_turn);
        if let Some(reply) = reply {
            let reply = reply.build();
            self.emit(reply.transport, reply.from, reply.to, reply.data, now);
        }
        if is_stun_request(data) {
            // A request may have changed what the server wants from us (a socket to open, one to
            // close); data (ChannelData, Send indications) never does.
            self.poll_listener(listener, now_turn);
        } else if transport == TransportType::Udp {
            // Data is answered by `recv` alone. Over TCP the server's poll would also look
            // through every connection's buffer for stored messages, on every packet (a tenth
            // of the relay's CPU with 200 TCP clients), and frames reach it whole: none are.
            self.drain_transmits(listener, now, now_turn);
        }
    }

    /// Decides whether a STUN message from a client reaches the server. Refusals are answered
    /// here: expired short-lived credentials (401) and a user over quota (486).
    fn admit_request(&mut self, transport: TransportType, listen: SocketAddr, client: SocketAddr, data: &[u8]) -> bool {
        let Ok(message) = Message::from_bytes(data) else { return true };
        if !message.has_class(MessageClass::Request) {
            return true;
        }
        let Ok(username) = message.attribute::<Username>() else { return true };
        let username = username.username().to_owned();
        if let Some(secret) = &self.secret {
            if short_lived_expiry(&username).is_some() {
                if let Err(expired) = check_short_lived(&username, unix_now()) {
                    self.stats.requests_refused_expired += 1;
                    self.answer_error(transport, listen, client, &message, ErrorCode::UNAUTHORIZED, &expired.to_string());
                    return false;
                }
                if self.known_short_lived.insert(username.clone()) {
                    // Every listener exists by now: no need to keep it for later ones.
                    let password = secret.password_for(&username);
                    for (_, server) in &mut self.listeners {
                        server.add_user(username.clone(), password.clone());
                    }
                }
            }
        }
        if message.has_method(turn_types::message::ALLOCATE) {
            let quota = self.policy.max_allocations_per_user;
            if quota > 0 && self.allocations_per_user.get(&username).copied().unwrap_or(0) >= quota {
                self.stats.allocations_refused_quota += 1;
                self.answer_error(transport, listen, client, &message, ErrorCode::ALLOCATION_QUOTA_REACHED, "Allocation Quota Reached");
                return false;
            }
            if self.allocating_user.len() >= MAX_PENDING_ALLOCATIONS {
                // Requests that never got as far as a socket (bad credentials) are forgotten.
                self.allocating_user.clear();
            }
            self.allocating_user.insert((transport == TransportType::Tcp, listen, client), username);
        }
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn answer_error(&mut self, transport: TransportType, listen: SocketAddr, client: SocketAddr, request: &Message<'_>, code: u16, reason: &str) {
        let mut response = Message::builder_error(request, MessageWriteVec::new());
        if let Ok(error) = ErrorCode::builder(code).reason(reason).build() {
            let _ = response.add_attribute(&error);
        }
        let data = response.finish();
        match transport {
            TransportType::Udp => self.output.push_back(RelayOutput::Datagram { from: listen, to: client, data }),
            TransportType::Tcp => self.output.push_back(RelayOutput::Stream { listen, client, data }),
        }
    }

    /// Runs the listener's poll loop until it only wants to wait, and notes when it wants to wake.
    fn poll_listener(&mut self, listener: usize, now_turn: turn_types::Instant) {
        let now = now_turn.to_std(self.epoch);
        self.drain_transmits(listener, now, now_turn);
        loop {
            match self.listeners[listener].1.poll(now_turn) {
                TurnServerPollRet::WaitUntil(at) => {
                    self.drain_transmits(listener, now, now_turn);
                    self.listener_wakes[listener] = at;
                    return;
                }
                TurnServerPollRet::AllocateSocket { transport, listen_addr, client_addr, allocation_transport, family } => {
                    let request = AllocationRequest { transport, listen: listen_addr, client: client_addr, allocation_transport, family };
                    if let Some(refusal) = self.refuse_allocation(request) {
                        self.listeners[listener].1.allocated_socket(transport, listen_addr, client_addr, allocation_transport, family, Err(refusal), now_turn);
                    } else {
                        self.output.push_back(RelayOutput::OpenRelayedSocket(request));
                    }
                }
                TurnServerPollRet::TcpConnect { relayed_addr, peer_addr, listen_addr, client_addr } => {
                    // Never reached: TCP allocations are refused in `refuse_allocation`.
                    self.listeners[listener].1.tcp_connected(
                        relayed_addr,
                        peer_addr,
                        listen_addr,
                        client_addr,
                        Err(turn_server_proto::api::TcpConnectError::Forbidden),
                        now_turn,
                    );
                }
                TurnServerPollRet::TcpClose { local_addr, remote_addr } => {
                    if self.streams.contains_key(&(local_addr, remote_addr)) {
                        self.output.push_back(RelayOutput::CloseStream { listen: local_addr, client: remote_addr });
                        self.streams.remove(&(local_addr, remote_addr));
                    }
                }
                TurnServerPollRet::SocketClose { listen_addr, .. } => {
                    self.end_allocation(listen_addr);
                }
            }
        }
    }

    fn refuse_allocation(&mut self, request: AllocationRequest) -> Option<SocketAllocateError> {
        if request.allocation_transport != TransportType::Udp {
            tracing::info!(client = %request.client, "refusing a TCP allocation (RFC 6062 is not offered)");
            self.stats.allocations_refused_capacity += 1;
            return Some(SocketAllocateError::InsufficientCapacity);
        }
        if self.policy.max_allocations > 0 && self.allocations.len() >= self.policy.max_allocations {
            self.stats.allocations_refused_capacity += 1;
            return Some(SocketAllocateError::InsufficientCapacity);
        }
        let listen_is_v4 = request.listen.is_ipv4();
        if (request.family == AddressFamily::IPV4) != listen_is_v4 {
            return Some(SocketAllocateError::AddressFamilyNotSupported);
        }
        None
    }

    fn drain_transmits(&mut self, listener: usize, now: Instant, now_turn: turn_types::Instant) {
        while let Some(transmit) = self.listeners[listener].1.poll_transmit(now_turn) {
            self.emit(transmit.transport, transmit.from, transmit.to, transmit.data, now);
        }
    }

    fn end_allocation(&mut self, relayed: SocketAddr) {
        if let Some(allocation) = self.allocations.remove(&relayed) {
            if let Some(count) = self.allocations_per_user.get_mut(&allocation.user) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.allocations_per_user.remove(&allocation.user);
                }
            }
            self.output.push_back(RelayOutput::CloseRelayedSocket { relayed });
        }
    }

    /// Queues something the server wants sent, after the relay's own checks.
    fn emit(&mut self, transport: TransportType, from: SocketAddr, to: SocketAddr, data: Vec<u8>, now: Instant) {
        if let Some(allocation) = self.allocations.get_mut(&from) {
            // From the client, out of the relayed socket towards a peer.
            if !peer_allowed(to.ip(), self.policy.allow_loopback_peers) {
                self.stats.packets_dropped_forbidden_peer += 1;
                return;
            }
            if !allocation.bucket.take(data.len(), now) {
                self.stats.packets_dropped_bandwidth += 1;
                return;
            }
            self.stats.packets_relayed += 1;
            self.stats.bytes_relayed += data.len() as u64;
            self.output.push_back(RelayOutput::Datagram { from, to, data });
            return;
        }
        match transport {
            TransportType::Udp => self.output.push_back(RelayOutput::Datagram { from, to, data }),
            TransportType::Tcp => {
                if let Some(framer) = self.streams.get(&(from, to)) {
                    let data = framer.outgoing(data);
                    self.output.push_back(RelayOutput::Stream { listen: from, client: to, data });
                }
            }
        }
    }

    fn listener_index(&self, transport: TransportType, listen: SocketAddr) -> Option<usize> {
        self.listeners.iter().position(|(kind, server)| *kind == transport && server.listen_address() == listen)
    }

    fn turn_now(&self, now: Instant) -> turn_types::Instant {
        let elapsed = now.saturating_duration_since(self.epoch);
        turn_types::Instant::from_nanos(i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
    }
}

/// Whether a relayed socket may send to `peer`. Never to unspecified, multicast or broadcast
/// addresses; loopback only where allowed. Other relayed addresses (this relay's own included)
/// are fine: two clients that both need a relay talk relay to relay.
fn peer_allowed(peer: IpAddr, allow_loopback: bool) -> bool {
    if peer.is_unspecified() || peer.is_multicast() {
        return false;
    }
    if let IpAddr::V4(v4) = peer {
        if v4.is_broadcast() {
            return false;
        }
    }
    if peer.is_loopback() {
        return allow_loopback;
    }
    true
}

/// A STUN request (not an indication or a response): the class bits of the message type are 00.
fn is_stun_request(data: &[u8]) -> bool {
    let is_stun = data.len() >= 20 && data[0] < 0x40 && data[4..8] == [0x21, 0x12, 0xA4, 0x42];
    is_stun && u16::from_be_bytes([data[0], data[1]]) & 0x0110 == 0
}

/// A token bucket in bytes: `rate` per second, holding at most one second's worth.
#[derive(Debug)]
struct TokenBucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u64, now: Instant) -> Self {
        Self { rate, tokens: rate as f64, last: now }
    }

    fn take(&mut self, bytes: usize, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate as f64);
        if self.tokens < bytes as f64 {
            return false;
        }
        self.tokens -= bytes as f64;
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_lets_its_rate_through_and_drops_the_rest() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, start);
        let passed = (0..50).filter(|_| bucket.take(100, start)).count();
        assert_eq!(passed, 10, "one second's burst");
        let later = start + Duration::from_millis(500);
        let passed = (0..50).filter(|_| bucket.take(100, later)).count();
        assert_eq!(passed, 5, "half a second refills half");
    }

    #[test]
    fn only_requests_count_as_requests() {
        let message = |kind: u16| {
            let mut bytes = kind.to_be_bytes().to_vec();
            bytes.extend_from_slice(&[0, 0, 0x21, 0x12, 0xA4, 0x42]);
            bytes.extend_from_slice(&[0; 12]);
            bytes
        };
        assert!(is_stun_request(&message(0x0001)), "Binding request");
        assert!(is_stun_request(&message(0x0003)), "Allocate request");
        assert!(!is_stun_request(&message(0x0016)), "Send indication");
        assert!(!is_stun_request(&message(0x0103)), "Allocate success response");
        assert!(!is_stun_request(&message(0x0113)), "Allocate error response");
        assert!(!is_stun_request(&[0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4]), "ChannelData");
    }

    #[test]
    fn peers_that_are_never_reached() {
        for peer in ["0.0.0.0", "224.0.0.1", "255.255.255.255", "::", "ff02::1"] {
            assert!(!peer_allowed(peer.parse().unwrap(), true), "{peer}");
        }
        assert!(!peer_allowed("127.0.0.1".parse().unwrap(), false));
        assert!(peer_allowed("127.0.0.1".parse().unwrap(), true));
        assert!(peer_allowed("198.51.100.7".parse().unwrap(), false));
    }
}
