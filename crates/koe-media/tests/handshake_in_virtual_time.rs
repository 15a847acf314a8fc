//! The handshake of a call's media, two sessions wired to each other in virtual time (no
//! sockets, no sleeps): on a clean path each DTLS flight goes out once and media connects
//! within a few round trips, however long after the sessions were made the call is answered.
//! A flight sent twice at once made the other side answer the copy and then ignore the real
//! retransmission as a duplicate: media started a second late on a clean TCP relay path.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use koe_media::{MediaOutput, MediaSession};

/// A DTLS record (RFC 7983: first byte 20–63).
fn is_dtls(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|first| (20..=63).contains(first))
}

struct Side {
    session: MediaSession,
    address: SocketAddr,
    dtls_sent: usize,
    connected_at: Option<Instant>,
}

impl Side {
    fn new(now: Instant, address: &str) -> Self {
        let address = address.parse().unwrap();
        Self { session: MediaSession::new(now, &[address]).unwrap(), address, dtls_sent: 0, connected_at: None }
    }

    /// Everything the session sends at `now`, as (from, to, datagram).
    fn poll(&mut self, now: Instant) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
        let mut sent = Vec::new();
        loop {
            match self.session.poll(now) {
                MediaOutput::Transmit { source, destination, datagram } => {
                    self.dtls_sent += usize::from(is_dtls(&datagram));
                    sent.push((source, destination, datagram));
                }
                MediaOutput::Connected => self.connected_at = Some(now),
                MediaOutput::Failed { reason } => panic!("{reason}"),
                MediaOutput::WaitUntil(_) => return sent,
                _ => {}
            }
        }
    }
}

/// Runs a call answered `answered_after` the sessions were made, on a clean path with `one_way`
/// delay, for `run_for` after the answer: (caller, callee).
fn handshake(answered_after: Duration, one_way: Duration, run_for: Duration) -> (Side, Side) {
    let made = Instant::now();
    let (mut caller, mut callee) = (Side::new(made, "10.0.0.1:4000"), Side::new(made, "10.0.0.2:4000"));
    let (offer, answer) = (caller.session.local_description(), callee.session.local_description());
    // Before the answer, both sides are polled now and then, as the driver does while ringing.
    let answered = made + answered_after;
    let _ = (caller.poll(made), callee.poll(made));
    callee.session.start(&offer, false).unwrap();
    caller.session.start(&answer, true).unwrap();
    let mut in_flight: Vec<(Instant, SocketAddr, SocketAddr, Vec<u8>)> = Vec::new();
    let step = Duration::from_millis(1);
    let mut now = answered;
    while now < answered + run_for {
        let (due, later): (Vec<_>, Vec<_>) = in_flight.into_iter().partition(|(at, ..)| *at <= now);
        in_flight = later;
        for (_, source, destination, datagram) in due {
            let side = if destination == caller.address { &mut caller } else { &mut callee };
            side.session.receive(now, source, destination, &datagram);
        }
        for side in [&mut caller, &mut callee] {
            in_flight.extend(side.poll(now).into_iter().map(|(from, to, datagram)| (now + one_way, from, to, datagram)));
        }
        now += step;
    }
    (caller, callee)
}

#[test]
fn each_dtls_flight_goes_out_once_on_a_clean_path_answered_late() {
    let one_way = Duration::from_millis(40);
    for answered_after in [Duration::ZERO, Duration::from_millis(800), Duration::from_secs(5)] {
        // Long enough for the handshake, short of the first resend (150 ms) after it.
        let (caller, callee) = handshake(answered_after, one_way, Duration::from_millis(600));
        let connected = |side: &Side| side.connected_at.is_some();
        assert!(connected(&caller) && connected(&callee), "answered after {answered_after:?}: media did not connect");
        // The client's hello and its key flight; the server's hello flight and its last one.
        assert_eq!((caller.dtls_sent, callee.dtls_sent), (2, 2), "answered after {answered_after:?}: DTLS datagrams sent");
    }
}
