//! The DTLS handshake of a call, as str0m's aws-lc-rs backend makes it (dimpl), but quicker to
//! resend a lost flight: dimpl waits 1 s before its first retransmission and doubles from there,
//! so at 20 % loss each way a handshake of two round trips took about two seconds on average,
//! and media started late. Here a flight is first resent after 150 ms (dimpl's own resends then
//! double, up to 10 times, beside the steady ones below), and the handshake gives up after 10 s
//! (the call's own connect timeout).
//!
//! dimpl reads the clock only in `handle_timeout`, and str0m calls that only when dimpl's own
//! deadline is due. A flight begun on a received packet was timed from whenever the clock was
//! last read, often a whole resend interval before, so its first resend fell due at once. The
//! flight went out twice; the peer answered the copy with a resend of its own (the other side
//! once discarded that as out of order) and, rate-limiting duplicates, ignored the next real
//! retransmission: media started a second late on a clean TCP relay path. Until the handshake
//! is done, this wrapper asks to be woken every [`CLOCK_READ_EVERY`], so that str0m hands dimpl
//! the time before it sends a flight. (The caller's hello waits for ICE to connect, for the
//! same reason: see `MediaSession::start`.)
//!
//! dimpl doubles the wait before each resend (150, 300, 600 ms, …), so at 20 % loss each way one
//! call in six took over a second to start media and one in a hundred never did within 10 s
//! (`examples/media_start.rs`). Until the handshake is done this wrapper sends the last flight
//! again itself every [`FLAT_RESEND`], the same datagrams: a flight the peer never got is new to
//! it, and one it did get makes it send its answer again. A server whose last flight was lost
//! sends it again on each retransmission of the client's (dimpl only answers after a doubling
//! pause). The datagrams are small: at most a few hundred bytes every 150 ms for a second or two.
//!
//! Everything else is dimpl's, delegated unchanged; [`install`] puts this provider in place of
//! the default one for the whole process.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::crypto::dtls::{DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion};
use str0m::crypto::CryptoError;

/// The first retransmission of an unanswered flight (then doubled, ±25 % jitter).
pub const FLIGHT_FIRST_RESEND: Duration = Duration::from_millis(150);
/// Retransmissions of one flight before the handshake fails.
const FLIGHT_RESENDS: usize = 10;
/// The whole handshake at most.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How stale dimpl's clock may be while the handshake runs: a small part of a flight's first
/// resend.
const CLOCK_READ_EVERY: Duration = Duration::from_millis(10);
/// While the handshake runs, the last flight is sent again this long after it last went out.
pub const FLAT_RESEND: Duration = FLIGHT_FIRST_RESEND;

/// Installs the crypto of str0m's enabled backend, with this DTLS, as the process default.
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    static DTLS: QuickDtls = QuickDtls;
    ONCE.call_once(|| {
        let mut provider = str0m::crypto::from_feature_flags();
        provider.dtls_provider = &DTLS;
        provider.install_process_default();
    });
}

#[derive(Debug)]
struct QuickDtls;

impl DtlsProvider for QuickDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        dimpl::certificate::generate_self_signed_certificate().ok()
    }

    fn new_dtls(&self, cert: &DtlsCert, now: Instant, version: DtlsVersion, mtu: Option<usize>) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        // ICE has already checked that the other side answers at this address: no cookie.
        let mut builder = dimpl::Config::builder()
            .use_server_cookie(false)
            .flight_start_rto(FLIGHT_FIRST_RESEND)
            .flight_retries(FLIGHT_RESENDS)
            .handshake_timeout(HANDSHAKE_TIMEOUT);
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        let config = Arc::new(builder.build().map_err(|e| CryptoError::Other(format!("DTLS configuration: {e}")))?);
        let dtls = match version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert.clone(), now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert.clone(), now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert.clone(), now),
            other => return Err(CryptoError::Other(format!("unsupported DTLS version: {other}"))),
        };
        Ok(Box::new(Quick {
            dtls,
            clock: now,
            connected: false,
            flight: Vec::new(),
            flight_closed: true,
            resend_at: None,
            again: VecDeque::new(),
        }))
    }
}

struct Quick {
    dtls: dimpl::Dtls,
    /// The time dimpl last read.
    clock: Instant,
    /// The handshake is done: dimpl's timers no longer matter.
    connected: bool,
    /// The datagrams dimpl sent last (a flight, or its resend) ...
    flight: Vec<Vec<u8>>,
    /// ... complete: the next datagram from dimpl begins another.
    flight_closed: bool,
    /// When the flight goes out again, while the handshake runs.
    resend_at: Option<Instant>,
    /// Datagrams of the flight to send again.
    again: VecDeque<Vec<u8>>,
}

impl Quick {
    fn send_flight_again(&mut self) {
        self.again.extend(self.flight.iter().cloned());
    }
}

/// A plaintext handshake record (content type 22, epoch 0): the peer's flight, not its
/// encrypted Finished.
fn is_plaintext_handshake(packet: &[u8]) -> bool {
    packet.first() == Some(&22) && packet.get(3..5) == Some(&[0, 0])
}

impl std::fmt::Debug for Quick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quick").finish_non_exhaustive()
    }
}

impl DtlsInstance for Quick {
    fn set_active(&mut self, active: bool) {
        self.dtls.set_active(active);
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.flight_closed = true;
        // A server that is done, getting the client's flight again: its last flight was lost.
        if self.connected && !self.dtls.is_active() && is_plaintext_handshake(packet) {
            self.send_flight_again();
        }
        self.dtls.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        if let Some(datagram) = self.again.pop_front() {
            let Some(out) = buf.get_mut(..datagram.len()) else {
                let needed = datagram.len();
                self.again.push_front(datagram);
                return DtlsOutput::BufferTooSmall { needed };
            };
            out.copy_from_slice(&datagram);
            return DtlsOutput::Packet(out);
        }
        match self.dtls.poll_output(buf) {
            DtlsOutput::Packet(datagram) => {
                if std::mem::take(&mut self.flight_closed) {
                    self.flight.clear();
                }
                self.flight.push(datagram.to_vec());
                self.resend_at = (!self.connected).then_some(self.clock + FLAT_RESEND);
                DtlsOutput::Packet(datagram)
            }
            DtlsOutput::Connected => {
                self.connected = true;
                self.resend_at = None;
                DtlsOutput::Connected
            }
            DtlsOutput::Timeout(due) if !self.connected => DtlsOutput::Timeout(due.min(self.clock + CLOCK_READ_EVERY)),
            output => output,
        }
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.clock = self.clock.max(now);
        self.flight_closed = true;
        if self.resend_at.is_some_and(|at| at <= now) {
            self.resend_at = Some(now + FLAT_RESEND);
            self.send_flight_again();
        }
        self.dtls.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.dtls.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.dtls.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.dtls.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.dtls.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.dtls.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.dtls.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One end of a handshake driven as str0m drives it: the clock reaches dimpl only through
    /// `handle_timeout`, called when the deadline dimpl last named is due.
    struct End {
        dtls: Box<dyn DtlsInstance>,
        due: Instant,
        connected: bool,
    }

    impl End {
        fn new(active: bool, now: Instant) -> Self {
            let cert = QuickDtls.generate_certificate().unwrap_or_else(|| panic!("a certificate"));
            let mut dtls = QuickDtls.new_dtls(&cert, now, DtlsVersion::Dtls12, None).unwrap_or_else(|e| panic!("{e}"));
            dtls.set_active(active);
            dtls.handle_timeout(now).unwrap_or_else(|e| panic!("{e}"));
            if active {
                let _ = dtls.handle_packet(&[]);
            }
            Self { dtls, due: now, connected: false }
        }

        /// What this end sends at `now`, as str0m's poll loop would collect it.
        fn poll(&mut self, now: Instant) -> Vec<Vec<u8>> {
            if self.due <= now {
                self.dtls.handle_timeout(now).unwrap_or_else(|e| panic!("{e}"));
            }
            let mut sent = Vec::new();
            let mut buf = vec![0; 2048];
            loop {
                match self.dtls.poll_output(&mut buf) {
                    DtlsOutput::Packet(packet) => sent.push(packet.to_vec()),
                    DtlsOutput::Timeout(due) => {
                        self.due = due;
                        return sent;
                    }
                    DtlsOutput::Connected => self.connected = true,
                    _ => {}
                }
            }
        }
    }

    /// A client and a server wired to each other with no delay.
    struct Wire {
        client: End,
        server: End,
        to_client: Vec<Vec<u8>>,
        to_server: Vec<Vec<u8>>,
    }

    impl Wire {
        /// Delivers what is on the wire, then takes what each end sends at `now`, unless
        /// `lost` says the batch is lost; returns how many datagrams the server sent.
        fn step(&mut self, now: Instant, lost: &mut impl FnMut(&[Vec<u8>]) -> bool) -> usize {
            for packet in self.to_server.drain(..) {
                self.server.dtls.handle_packet(&packet).unwrap_or_else(|e| panic!("{e}"));
            }
            for packet in self.to_client.drain(..) {
                self.client.dtls.handle_packet(&packet).unwrap_or_else(|e| panic!("{e}"));
            }
            let (from_client, from_server) = (self.client.poll(now), self.server.poll(now));
            let sent = from_server.len();
            if !lost(&from_client) {
                self.to_server = from_client;
            }
            if !lost(&from_server) {
                self.to_client = from_server;
            }
            sent
        }

        fn connected(&self) -> bool {
            self.client.connected && self.server.connected
        }
    }

    #[test]
    fn a_flight_begun_long_after_the_clock_was_last_read_is_not_resent_at_once() {
        // The server starts DTLS when the call is answered; the client says hello most of a
        // second later, once ICE has found the path.
        let start = Instant::now();
        let mut server = End::new(false, start);
        assert!(server.poll(start).is_empty());
        let mut now = start + Duration::from_millis(800);
        let client = End::new(true, now);
        let mut wire = Wire { client, server, to_client: Vec::new(), to_server: Vec::new() };
        let mut from_server = 0;
        while now < start + Duration::from_millis(800 + 120) {
            from_server += wire.step(now, &mut |_| false);
            now += Duration::from_millis(1);
        }
        assert!(wire.connected(), "a clean path completes the handshake at once");
        // The server's hello flight and its last flight, each sent once.
        assert_eq!(from_server, 2, "a flight was resent before its time");
    }

    /// Which flight of a DTLS 1.2 handshake a datagram starts with, by its first record.
    fn flight(datagram: &[u8]) -> Option<u8> {
        match (datagram.first(), datagram.get(13)) {
            (Some(22), Some(1)) => Some(1),   // ClientHello
            (Some(22), Some(2)) => Some(4),   // ServerHello …
            (Some(22), Some(11)) => Some(5),  // the client's Certificate …
            (Some(20), _) => Some(6),         // ChangeCipherSpec, Finished
            _ => None,
        }
    }

    /// A clean handshake except that `lost` loses the first `times` sendings of one flight:
    /// how long it takes, on a path of no delay.
    fn handshake_losing(lost: u8, times: usize) -> Duration {
        let start = Instant::now();
        let mut wire = Wire { client: End::new(true, start), server: End::new(false, start), to_client: Vec::new(), to_server: Vec::new() };
        let mut dropped = 0;
        let mut now = start;
        while !wire.connected() {
            assert!(now < start + Duration::from_secs(10), "flight {lost} lost {times} times: no handshake in 10 s");
            wire.step(now, &mut |sent: &[Vec<u8>]| {
                let lose = sent.first().is_some_and(|first| flight(first) == Some(lost)) && dropped < times;
                dropped += usize::from(lose);
                lose
            });
            now += Duration::from_millis(1);
        }
        now - start
    }

    #[test]
    fn a_flight_lost_again_and_again_is_sent_again_every_150_ms() {
        for lost in [1, 4, 5, 6] {
            // dimpl alone waits 150, then 300, then 600 ms: over a second for three losses.
            let took = handshake_losing(lost, 3);
            assert!(took < 3 * FLAT_RESEND + Duration::from_millis(100), "flight {lost} lost 3 times: handshake took {took:?}");
        }
    }
}
