//! One TURN allocation on a relay node, sans-IO, as a call's media uses it: turn-client-proto
//! does the protocol (401/nonce, refreshes, permissions); this owns the glue to the call.
//!
//! The allocation is always a UDP one on the relay (media is datagrams); the connection to the
//! relay is UDP (from the call's media socket) or a stream (TCP or TLS, which the driver opens,
//! perhaps through an HTTP proxy). Data goes in Send indications, never channels: channel
//! framing on streams is broken in turn-client-proto 0.7.3 (notes/str0m-turn.md), and one
//! code path for both keeps it simple.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::client::TurnClient;
use turn_client_proto::tcp::TurnClientTcp;
use turn_client_proto::udp::TurnClientUdp;
use turn_types::stun::TransportType;
use turn_types::TurnCredentials;

/// How the client reaches a relay node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayTransport {
    Udp,
    Tcp,
    Tls,
}

impl std::fmt::Display for RelayTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
        })
    }
}

/// A relay node to allocate on, with the credentials its supernode issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayServer {
    pub transport: RelayTransport,
    pub address: SocketAddr,
    pub username: String,
    pub password: String,
}

/// What became of an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocationState {
    Allocating,
    /// The relayed address peers send to.
    Ready(SocketAddr),
    Failed(String),
}

/// How often a call checks that its relays answer.
pub const PROBE_EVERY: Duration = Duration::from_millis(400);
/// How long a relay has to answer a check, and how often the check is sent meanwhile (a
/// datagram can be lost). Anything the relay sends counts as an answer: while it relays the
/// other side's voice, it is alive. Ten checks a second: at 20 % loss each way a check and its
/// answer both arrive 64 % of the time, and ten in a row all fail once in 27,000 checks (three
/// in 600 ms failed once in 21, which marked a working relay dead within seconds and dropped
/// calls that had no other path).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
const PROBE_RESEND: Duration = Duration::from_millis(100);

/// How a TURN request is retransmitted over UDP (over TCP: one send, and the sum as timeout).
const TURN_FIRST_RESEND: Duration = Duration::from_millis(100);
const TURN_LONGEST_RESEND: Duration = Duration::from_millis(800);
const TURN_SENDS: u32 = 15;
const TURN_LAST_WAIT: Duration = Duration::from_secs(1);

/// A Binding request out to the relay.
#[derive(Debug)]
struct Probe {
    id: koe_stun::TransactionId,
    first_sent: Instant,
    /// When to send it (again).
    next_send: Instant,
}

/// One allocation and the state of its permissions.
#[derive(Debug)]
pub struct RelayAllocation {
    pub server: RelayServer,
    /// The local end of the connection to the relay (the media socket, or the stream's local address).
    pub local: SocketAddr,
    client: TurnClient,
    epoch: Instant,
    state: AllocationState,
    requested_permissions: HashSet<IpAddr>,
    /// Checking that the relay answers: the check out, if any, and when to send the next.
    probe: Option<Probe>,
    next_probe: Option<Instant>,
    /// When the last check that was answered had been sent.
    answered_probe_sent: Option<Instant>,
    /// The relayed address once allocated, kept after a failure (its candidate must go).
    allocated: Option<SocketAddr>,
}

impl RelayAllocation {
    /// Starts allocating on `server` from `local`.
    pub fn new(server: RelayServer, local: SocketAddr, now: Instant) -> Self {
        let credentials = TurnCredentials::new(&server.username, &server.password);
        let mut config = TurnConfig::new(credentials);
        // Send USERNAME, not USERHASH: a relay checks short-lived credentials by reading the
        // expiry in the username, which a hash hides.
        config.set_anonymous_username(turn_client_proto::stun::auth::Feature::Disabled);
        // Requests (Allocate, CreatePermission, Refresh) resent after 100 ms, doubling to at
        // most 800 ms, 15 sends in all, instead of STUN's 500 ms doubling: at 20 % loss each way
        // an allocation (two transactions) was not ready within the 1.5 s a call gathers
        // candidates one time in four, and a permission (without which the relay drops every
        // check) was still missing after half a second one time in three.
        config.set_request_retransmits(TURN_FIRST_RESEND, TURN_LONGEST_RESEND, TURN_SENDS, TURN_LAST_WAIT);
        let client: TurnClient = match server.transport {
            RelayTransport::Udp => TurnClientUdp::allocate(local, server.address, config).into(),
            RelayTransport::Tcp | RelayTransport::Tls => TurnClientTcp::allocate(local, server.address, config).into(),
        };
        Self {
            server,
            local,
            client,
            epoch: now,
            state: AllocationState::Allocating,
            requested_permissions: HashSet::new(),
            probe: None,
            next_probe: None,
            answered_probe_sent: None,
            allocated: None,
        }
    }

    /// Checks that the relay answers, from now on (a call runs over it); marks the allocation
    /// failed when a check goes unanswered for [`PROBE_TIMEOUT`] while this process was
    /// `listening_since` (an answer that came during a pause of the process is still unread).
    pub fn keep_checking(&mut self, now: Instant, listening_since: Instant) {
        if self.relayed().is_none() {
            return;
        }
        match &self.probe {
            Some(probe) if now.saturating_duration_since(probe.first_sent.max(listening_since)) >= PROBE_TIMEOUT => {
                self.probe = None;
                self.next_probe = None;
                self.state = AllocationState::Failed(format!("the relay stopped answering (nothing for {} ms)", PROBE_TIMEOUT.as_millis()));
            }
            Some(_) => {}
            None if self.next_probe.is_none_or(|next| next <= now) => {
                self.probe = Some(Probe { id: koe_stun::new_transaction_id(), first_sent: now, next_send: now });
            }
            None => {}
        }
    }

    /// Whether the relay answered a check sent at or after `since`.
    pub fn answered_since(&self, since: Instant) -> bool {
        self.answered_probe_sent.is_some_and(|sent| sent >= since)
    }

    /// Notices the answer to the probe in `bytes` from the relay, if it is there.
    fn notice_probe_answer(&mut self, bytes: &[u8]) -> bool {
        let Some(probe) = &self.probe else { return false };
        // On a stream the answer can sit among other messages: find its transaction id
        // (random, 96 bits), preceded by a Binding success header.
        let answered = bytes
            .windows(probe.id.len())
            .enumerate()
            .any(|(at, window)| window == probe.id && at >= 8 && bytes[at - 8..at - 6] == [0x01, 0x01]);
        if answered {
            self.probe_answered();
        }
        answered
    }

    /// The check under way counts as answered: the relay answered it, or sent something else.
    fn probe_answered(&mut self) {
        if let Some(probe) = self.probe.take() {
            self.answered_probe_sent = Some(probe.first_sent);
            self.next_probe = Some(probe.first_sent + PROBE_EVERY);
        }
    }

    pub fn state(&self) -> &AllocationState {
        &self.state
    }

    /// The relayed address this allocation had, even if it has failed since.
    pub fn allocated(&self) -> Option<SocketAddr> {
        self.allocated
    }

    pub fn relayed(&self) -> Option<SocketAddr> {
        match self.state {
            AllocationState::Ready(address) => Some(address),
            _ => None,
        }
    }

    fn now(&self, now: Instant) -> turn_types::Instant {
        let elapsed = now.saturating_duration_since(self.epoch);
        turn_types::Instant::from_nanos(i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
    }

    /// Whether a datagram from `source` to `destination` belongs to this allocation (UDP only).
    pub fn owns_datagram(&self, source: SocketAddr, destination: SocketAddr) -> bool {
        self.server.transport == RelayTransport::Udp && source == self.server.address && destination == self.local
    }

    /// Bytes from the relay (a datagram, or a piece of the stream); returns what peers sent.
    /// An error answer to an Allocate (other than the 401/438 turn-client-proto handles by
    /// asking again) leaves turn-client-proto waiting for ever: take it as the refusal it is.
    fn notice_allocate_refusal(&mut self, bytes: &[u8]) {
        if self.state != AllocationState::Allocating {
            return;
        }
        if let Some(code) = allocate_error_code(bytes).filter(|code| !matches!(code, 401 | 438)) {
            self.state = AllocationState::Failed(format!("the relay refused the allocation ({code}: quota, capacity or policy)"));
        }
    }

    pub fn receive(&mut self, bytes: &[u8], now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        self.notice_allocate_refusal(bytes);
        if self.notice_probe_answer(bytes) {
            if self.server.transport == RelayTransport::Udp {
                // The whole datagram was the answer: not for turn-client-proto.
                return Vec::new();
            }
        } else if !bytes.is_empty() {
            // Whatever the relay sends (the other side's voice, an answer to a refresh) shows
            // it alive as well as an answer to the check would.
            self.probe_answered();
        }
        let at = self.now(now);
        let transport = self.client.transport();
        let transmit = turn_client_proto::api::Transmit::new(bytes, transport, self.server.address, self.local);
        let mut peer_data = Vec::new();
        if let TurnRecvRet::PeerData(data) = self.client.recv(transmit, at) {
            peer_data.push((data.peer, data.data().to_vec()));
        }
        // A stream read may hold more than one message.
        while let Some(data) = self.client.poll_recv(at) {
            peer_data.push((data.peer, data.data().to_vec()));
        }
        self.update();
        peer_data
    }

    /// Wire bytes for the relay that carry `data` to `peer`; asks for a permission first if
    /// none was asked for that peer's IP (the packet is then dropped; ICE retries).
    pub fn send_to(&mut self, peer: SocketAddr, data: &[u8], now: Instant) -> Option<Vec<u8>> {
        let at = self.now(now);
        if !self.client.have_permission(TransportType::Udp, peer.ip()) {
            self.permit(peer.ip(), now);
            return None;
        }
        match self.client.send_to(TransportType::Udp, peer, data, at) {
            Ok(Some(transmit)) => Some(transmit.build().data),
            _ => None,
        }
    }

    /// Asks the relay to let `peer` through (once per IP; refreshed by the client).
    pub fn permit(&mut self, peer: IpAddr, now: Instant) {
        if self.relayed().is_none() || !self.requested_permissions.insert(peer) {
            return;
        }
        let at = self.now(now);
        let _ = self.client.create_permission(TransportType::Udp, peer, at);
    }

    /// Bytes the protocol wants sent to the relay now (requests, refreshes).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        if let Some(probe) = self.probe.as_mut().filter(|probe| probe.next_send <= now) {
            probe.next_send = now + PROBE_RESEND;
            return Some(koe_stun::binding_request(&probe.id));
        }
        let at = self.now(now);
        if let Some(transmit) = self.client.poll_transmit(at) {
            return Some(transmit.data.to_vec());
        }
        // A request queued by the last input (the authenticated Allocate after a 401, a
        // permission) goes out only once the client has been polled.
        let _ = self.client.poll(at);
        self.update();
        let transmit = self.client.poll_transmit(at)?;
        Some(transmit.data.to_vec())
    }

    /// Runs timers; returns when to come back.
    pub fn poll_timeout(&mut self, now: Instant) -> Instant {
        let at = self.now(now);
        let wake = match self.client.poll(at) {
            TurnPollRet::WaitUntil(wake) => wake.to_std(self.epoch),
            TurnPollRet::Closed => {
                if !matches!(self.state, AllocationState::Failed(_)) {
                    self.state = AllocationState::Failed("the relay closed the allocation".into());
                }
                now + Duration::from_secs(60)
            }
            // TCP allocations are never asked for.
            TurnPollRet::AllocateTcpSocket { .. } | TurnPollRet::TcpClose { .. } => now,
        };
        self.update();
        let wake = match (&self.probe, self.next_probe) {
            (Some(probe), _) => wake.min(probe.next_send).min(probe.first_sent + PROBE_TIMEOUT),
            (None, Some(next)) => wake.min(next),
            (None, None) => wake,
        };
        wake.max(now)
    }

    /// Ends the allocation on the relay (a Refresh with lifetime 0), so that it stops counting
    /// against the user's quota there: the wire bytes to send, once. Over TCP and TLS closing
    /// the stream does the same.
    pub fn release(&mut self, now: Instant) -> Option<Vec<u8>> {
        self.relayed()?;
        let at = self.now(now);
        self.client.delete(at).ok()?;
        self.state = AllocationState::Failed("released at the end of the call".into());
        self.client.poll_transmit(at).map(|transmit| transmit.data.to_vec())
    }

    /// The stream to the relay is gone.
    pub fn stream_closed(&mut self) {
        self.client.protocol_error();
        self.state = AllocationState::Failed("the connection to the relay closed".into());
    }

    fn update(&mut self) {
        while let Some(event) = self.client.poll_event() {
            match event {
                TurnEvent::AllocationCreated(_, relayed) => {
                    self.state = AllocationState::Ready(relayed);
                    self.allocated = Some(relayed);
                }
                TurnEvent::AllocationCreateFailed(_) => {
                    self.state = AllocationState::Failed("the relay refused the allocation (credentials or quota)".into())
                }
                TurnEvent::PermissionCreateFailed(_, peer) => {
                    self.requested_permissions.remove(&peer);
                }
                _ => {}
            }
        }
    }
}

/// The error code in `bytes` if they begin with an Allocate error response (RFC 8656: type
/// 0x0113, ERROR-CODE attribute 0x0009).
fn allocate_error_code(bytes: &[u8]) -> Option<u16> {
    if bytes.get(..2)? != [0x01, 0x13] {
        return None;
    }
    let length = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
    let mut attributes = bytes.get(20..20 + length)?;
    while let [t0, t1, l0, l1, rest @ ..] = attributes {
        let (kind, size) = (u16::from_be_bytes([*t0, *t1]), usize::from(u16::from_be_bytes([*l0, *l1])));
        let value = rest.get(..size)?;
        if kind == 0x0009 && size >= 4 {
            return Some(u16::from(value[2] & 0x07) * 100 + u16::from(value[3]));
        }
        attributes = rest.get(size.next_multiple_of(4)..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_response(code: u16) -> Vec<u8> {
        let mut message = vec![0x01, 0x13, 0, 12, 0x21, 0x12, 0xa4, 0x42];
        message.extend_from_slice(&[7; 12]);
        message.extend_from_slice(&[0x00, 0x09, 0, 8, 0, 0, (code / 100) as u8, (code % 100) as u8]);
        message.extend_from_slice(b"Full");
        message
    }

    #[test]
    fn allocate_refusals_are_read_and_nothing_else_is() {
        assert_eq!(allocate_error_code(&error_response(486)), Some(486));
        assert_eq!(allocate_error_code(&error_response(401)), Some(401));
        let mut success = error_response(486);
        success[1] = 0x03;
        assert_eq!(allocate_error_code(&success), None, "an Allocate success");
        assert_eq!(allocate_error_code(&error_response(486)[..22]), None, "truncated");
        assert_eq!(allocate_error_code(&[]), None);
    }
}
