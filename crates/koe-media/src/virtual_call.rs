//! Two media sessions wired to each other in virtual time, through an impaired path each way
//! (`koe_voice::impairment`): no sockets, no sleeps. It runs a call's set-up (ICE and DTLS) as
//! the driver would, for the tests of the handshake and for the benchmark of how soon media
//! starts under loss (`examples/media_start.rs`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use koe_voice::impairment::{ImpairedLink, Impairment};

use crate::{MediaOutput, MediaSession};

/// One side's view of a call's set-up.
#[derive(Debug, Clone, Default)]
pub struct SetUp {
    /// DTLS datagrams this side sent ...
    pub dtls_sent: usize,
    /// ... the first of them this long after the answer (the caller's, once ICE is up).
    pub first_dtls_after: Option<Duration>,
    /// When media could flow (ICE and DTLS up), counted from the answer.
    pub connected_after: Option<Duration>,
    /// Why this side gave up, if it did.
    pub failure: Option<String>,
}

/// A DTLS record (RFC 7983: first byte 20–63).
fn is_dtls(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|first| (20..=63).contains(first))
}

struct Side {
    session: MediaSession,
    address: SocketAddr,
    set_up: SetUp,
    wake: Instant,
}

impl Side {
    /// Polls the session at `now`: what it sends goes into `link`.
    fn poll(&mut self, now: Instant, answered: Instant, link: &mut ImpairedLink) {
        loop {
            match self.session.poll(now) {
                MediaOutput::Transmit { datagram, .. } => {
                    if is_dtls(&datagram) {
                        self.set_up.dtls_sent += 1;
                        self.set_up.first_dtls_after.get_or_insert(now.saturating_duration_since(answered));
                    }
                    link.send(now, datagram);
                }
                MediaOutput::Connected => self.set_up.connected_after = Some(now - answered),
                MediaOutput::Failed { reason } => {
                    self.set_up.failure = Some(reason);
                    return;
                }
                MediaOutput::WaitUntil(at) => {
                    self.wake = at;
                    return;
                }
                _ => {}
            }
        }
    }
}

/// Runs a call answered `answered_after` the sessions were made, through `path` each way
/// (seeded with `seed` and `seed + 1`), until both sides are connected or `give_up` has passed
/// since the answer, or one gives up: (caller, callee). Errors are a session that could not
/// be made or started.
pub fn set_up(path: Impairment, seed: u64, answered_after: Duration, give_up: Duration) -> Result<(SetUp, SetUp), String> {
    let made = Instant::now();
    let side = |address: &str| -> Result<Side, String> {
        let address: SocketAddr = address.parse().map_err(|e| format!("{e}"))?;
        let session = MediaSession::new(made, &[address]).map_err(|e| e.to_string())?;
        Ok(Side { session, address, set_up: SetUp::default(), wake: made })
    };
    let (mut caller, mut callee) = (side("10.0.0.1:4000")?, side("10.0.0.2:4000")?);
    let (mut to_callee, mut to_caller) = (ImpairedLink::new(path, seed), ImpairedLink::new(path, seed + 1));
    let (offer, answer) = (caller.session.local_description(), callee.session.local_description());
    // While it rings, the driver polls each session now and then.
    caller.poll(made, made, &mut to_callee);
    callee.poll(made, made, &mut to_caller);
    let answered = made + answered_after;
    callee.session.start(&offer, false).map_err(|e| e.to_string())?;
    caller.session.start(&answer, true).map_err(|e| e.to_string())?;
    let (caller_address, callee_address) = (caller.address, callee.address);
    let mut now = answered;
    caller.wake = now;
    callee.wake = now;
    let done = |side: &Side| side.set_up.connected_after.is_some() || side.set_up.failure.is_some();
    while now < answered + give_up && !(done(&caller) && done(&callee)) {
        while let Some((_, datagram)) = to_callee.deliver(now) {
            callee.session.receive(now, caller_address, callee_address, &datagram);
            callee.wake = now;
        }
        while let Some((_, datagram)) = to_caller.deliver(now) {
            caller.session.receive(now, callee_address, caller_address, &datagram);
            caller.wake = now;
        }
        if caller.wake <= now {
            caller.poll(now, answered, &mut to_callee);
        }
        if callee.wake <= now {
            callee.poll(now, answered, &mut to_caller);
        }
        let next = [Some(caller.wake), Some(callee.wake), to_callee.next_delivery(), to_caller.next_delivery()];
        now = next.into_iter().flatten().min().unwrap_or(now).max(now + Duration::from_micros(100));
    }
    Ok((caller.set_up, callee.set_up))
}
