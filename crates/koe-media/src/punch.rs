//! Port guessing between a NAT that maps endpoint-independently ("cone": one public port per
//! socket, whatever the destination) and one that maps per destination ("symmetric": a new
//! random port for every address it sends to), as Tailscale does, sans-IO: this plans what to
//! send when; the media driver does the sending.
//!
//! The symmetric side opens [`MAPPING_SOCKETS`] sockets and sends a punch from each to the cone
//! side's public address, so its NAT opens that many random ports towards it. The cone side
//! sends punches from its media socket to [`PROBES`] random ports at the symmetric side's public
//! IP; each opens the cone side's NAT for answers from there. When a probe hits one of the open
//! ports, the symmetric side's socket hears it, and becomes a host candidate: ICE then finds the
//! direct pair through it (the cone side learns it as peer-reflexive). By the birthday paradox
//! a port matches with probability 1 − e^(−256 · 2,500 / 64,512) ≈ 99.995 %, if both sides get
//! to send everything while the other side's mappings are open.
//!
//! Punches are [`PUNCH`]: their first byte is none of STUN's, DTLS's or RTP's (RFC 7983), so
//! ICE and DTLS ignore them.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Sockets the symmetric side opens.
pub const MAPPING_SOCKETS: usize = 256;
/// Ports the cone side tries.
pub const PROBES: usize = 2_500;
/// The cone side sends this many probes every [`TICK`] (1,000 a second, ~40 kbit/s).
const PROBES_PER_TICK: usize = 10;
const TICK: Duration = Duration::from_millis(10);
/// The symmetric side sends from every socket again this often (a punch can be lost).
const MAPPING_RESEND: Duration = Duration::from_millis(500);
/// Guessing stops after this long: the call goes on over whatever path ICE found.
pub const GUESS_FOR: Duration = Duration::from_secs(4);
/// The ports a NAT picks from for sockets on unprivileged ports.
const LOWEST_PORT: u16 = 1024;

/// The payload of every punch.
pub const PUNCH: &[u8] = b"koe-punch";

/// How this side's NAT maps its sockets, found by asking two STUN servers (the parent
/// supernode's responder and a relay node) which address they see one socket at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NatMapping {
    /// No NAT, or not found out.
    #[default]
    Unknown,
    /// Both saw the same address: one public port per socket ("cone").
    EndpointIndependent,
    /// They saw different ports: a new mapping per destination ("symmetric").
    EndpointDependent,
}

impl NatMapping {
    /// From the addresses two servers saw the same socket at.
    pub fn from_reflexive(first: SocketAddr, second: SocketAddr) -> Self {
        if first == second { Self::EndpointIndependent } else { Self::EndpointDependent }
    }
}

/// The part this side plays in guessing, from both sides' NAT mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortGuess {
    /// This side's NAT maps per destination: open many mappings towards the other side's
    /// public address.
    OpenMappings { toward: SocketAddr },
    /// The other side's NAT maps per destination: probe many ports at its public IP.
    ProbePorts { at: IpAddr },
}

impl PortGuess {
    /// The part to play, if guessing can help: one side symmetric, the other a cone, and the
    /// other side's public address known (its server-reflexive candidate).
    pub fn choose(local: NatMapping, remote: NatMapping, remote_public: Option<SocketAddr>) -> Option<Self> {
        let public = remote_public?;
        match (local, remote) {
            (NatMapping::EndpointDependent, NatMapping::EndpointIndependent) => Some(Self::OpenMappings { toward: public }),
            (NatMapping::EndpointIndependent, NatMapping::EndpointDependent) => Some(Self::ProbePorts { at: public.ip() }),
            _ => None,
        }
    }
}

/// Punches to send now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Punches {
    /// One from each of the mapping sockets, to this address.
    FromEveryMappingSocket { to: SocketAddr },
    /// From the media socket, one to each of these.
    FromMediaSocket { to: Vec<SocketAddr> },
}

/// When to send which punches.
#[derive(Debug)]
pub struct PortGuesser {
    pub guess: PortGuess,
    until: Instant,
    next: Instant,
    probed: usize,
}

impl PortGuesser {
    pub fn new(guess: PortGuess, now: Instant) -> Self {
        Self { guess, until: now + GUESS_FOR, next: now, probed: 0 }
    }

    pub fn is_over(&self, now: Instant) -> bool {
        now >= self.until || matches!(self.guess, PortGuess::ProbePorts { .. }) && self.probed >= PROBES
    }

    /// When [`Self::poll`] has something next.
    pub fn next_send(&self) -> Instant {
        self.next
    }

    /// The punches due now; `random` gives the ports to probe.
    pub fn poll(&mut self, now: Instant, mut random: impl FnMut() -> u16) -> Option<Punches> {
        if now < self.next || self.is_over(now) {
            return None;
        }
        match self.guess {
            PortGuess::OpenMappings { toward } => {
                self.next = now + MAPPING_RESEND;
                Some(Punches::FromEveryMappingSocket { to: toward })
            }
            PortGuess::ProbePorts { at } => {
                self.next = now + TICK;
                let count = PROBES_PER_TICK.min(PROBES - self.probed);
                self.probed += count;
                let to = (0..count).map(|_| SocketAddr::new(at, LOWEST_PORT + random() % (u16::MAX - LOWEST_PORT + 1))).collect();
                Some(Punches::FromMediaSocket { to })
            }
        }
    }
}

/// Whether a datagram is a punch.
pub fn is_punch(datagram: &[u8]) -> bool {
    datagram == PUNCH
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> SocketAddr {
        text.parse().unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn only_a_cone_and_a_symmetric_nat_guess_and_each_knows_its_part() {
        let public = Some(address("198.51.100.14:40000"));
        let (cone, symmetric, unknown) = (NatMapping::EndpointIndependent, NatMapping::EndpointDependent, NatMapping::Unknown);
        assert_eq!(PortGuess::choose(symmetric, cone, public), Some(PortGuess::OpenMappings { toward: address("198.51.100.14:40000") }));
        assert_eq!(PortGuess::choose(cone, symmetric, public), Some(PortGuess::ProbePorts { at: "198.51.100.14".parse().unwrap_or_else(|_| unreachable!()) }));
        for (local, remote) in [(cone, cone), (symmetric, symmetric), (unknown, symmetric), (cone, unknown)] {
            assert_eq!(PortGuess::choose(local, remote, public), None, "{local:?} with {remote:?}");
        }
        assert_eq!(PortGuess::choose(cone, symmetric, None), None, "no public address to aim at");
    }

    #[test]
    fn the_cone_side_sends_its_probes_at_a_bounded_rate_and_then_stops() {
        let start = Instant::now();
        let mut guesser = PortGuesser::new(PortGuess::ProbePorts { at: "198.51.100.14".parse().unwrap_or_else(|_| unreachable!()) }, start);
        let mut counter = 0u16;
        let mut random = || {
            counter = counter.wrapping_add(7919);
            counter
        };
        let mut sent = Vec::new();
        let mut now = start;
        while !guesser.is_over(now) {
            if let Some(Punches::FromMediaSocket { to }) = guesser.poll(now, &mut random) {
                assert!(to.len() <= PROBES_PER_TICK);
                sent.extend(to);
            }
            assert!(guesser.poll(now, &mut random).is_none(), "nothing more within the same tick");
            now = guesser.next_send();
        }
        assert_eq!(sent.len(), PROBES);
        assert!(sent.iter().all(|to| to.port() >= LOWEST_PORT));
        assert!(now - start >= TICK * (PROBES / PROBES_PER_TICK - 1) as u32, "{PROBES} probes at most {PROBES_PER_TICK} per {TICK:?}");
    }

    #[test]
    fn the_symmetric_side_punches_from_every_socket_until_guessing_is_over() {
        let start = Instant::now();
        let toward = address("198.51.100.12:5000");
        let mut guesser = PortGuesser::new(PortGuess::OpenMappings { toward }, start);
        let mut rounds = 0;
        let mut now = start;
        while !guesser.is_over(now) {
            if guesser.poll(now, || 0) == Some(Punches::FromEveryMappingSocket { to: toward }) {
                rounds += 1;
            }
            now = guesser.next_send();
        }
        assert_eq!(rounds, (GUESS_FOR.as_millis() / MAPPING_RESEND.as_millis()) as usize);
        assert!(is_punch(PUNCH) && !is_punch(b"\x00\x01"));
        assert!(!matches!(PUNCH[0], 0..=3 | 16..=19 | 20..=63 | 64..=79 | 128..=191), "not STUN, ZRTP, DTLS, TURN or RTP");
    }
}
