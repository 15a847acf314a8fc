//! Calls whose only path is a relay node (Koe's own, in this process, on loopback): each side
//! offers only relayed candidates, reached over TURN/UDP from its media socket or over a TCP
//! stream to the relay. The callee hears the caller's speech, and both report the path as
//! relayed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use koe_media::driver::{self, CallAudio, CallSummary, MediaControls, Microphone, RelayStreams};
use koe_media::relay::{AllocationState, RelayServer, RelayTransport};
use koe_media::MediaSession;
use str0m::CandidateKind;
use koe_relay::{start_relay, RelayConfig, RelayHandle};
use koe_voice::signal::{speech_match, speechlike};
use koe_voice::Backend;
use tokio::net::{TcpStream, UdpSocket};

async fn relay() -> RelayHandle {
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap());
    config.users = vec![("caller".into(), "caller-password".into()), ("callee".into(), "callee-password".into())];
    start_relay(config).await.unwrap()
}

/// One side whose only candidate is relayed, over `transport`.
async fn relayed_side(relay: &RelayHandle, user: &str, transport: RelayTransport) -> (MediaSession, UdpSocket, RelayStreams) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = socket.local_addr().unwrap();
    // No host candidate: the relay is the only way in or out.
    let mut session = MediaSession::new(Instant::now(), &[]).unwrap();
    let server = RelayServer { transport, address: relay.udp, username: user.into(), password: format!("{user}-password") };
    let mut streams = RelayStreams::default();
    match transport {
        RelayTransport::Udp => {
            session.add_relay(server, local, Instant::now());
        }
        RelayTransport::Tcp | RelayTransport::Tls => {
            let stream = TcpStream::connect(relay.tcp).await.unwrap();
            let index = session.add_relay(server, stream.local_addr().unwrap(), Instant::now());
            streams.add(index, stream);
        }
    }
    driver::gather_relays(&mut session, &socket, &mut streams, Instant::now() + Duration::from_secs(2)).await;
    let states = session.relay_states();
    assert!(matches!(states[0].2, AllocationState::Ready(_)), "{user}'s allocation: {states:?}");
    (session, socket, streams)
}

async fn call(caller_transport: RelayTransport, callee_transport: RelayTransport) -> (CallSummary, CallSummary, Vec<f32>) {
    let relay = relay().await;
    let (mut a, a_socket, a_streams) = relayed_side(&relay, "caller", caller_transport).await;
    let (mut b, b_socket, b_streams) = relayed_side(&relay, "callee", callee_transport).await;
    let (offer, answer) = (a.local_description(), b.local_description());
    assert!(offer.candidates.iter().all(|candidate| candidate.contains("typ relay")), "{:?}", offer.candidates);
    b.start(&offer, false).unwrap();
    a.start(&answer, true).unwrap();
    let speech = speechlike(3);
    let audio = |microphone| CallAudio { backend: Backend::OpusPure, bitrate: 32_000, microphone, speaker: None };
    let length = Duration::from_secs(5);
    let a_task = tokio::spawn(driver::run(a, a_socket, a_streams, audio(Microphone::Samples(speech.clone())), MediaControls::default(), tokio::time::sleep(length)));
    let b_task = tokio::spawn(driver::run(b, b_socket, b_streams, audio(Microphone::Samples(Vec::new())), MediaControls::default(), tokio::time::sleep(length)));
    let (a, b) = (a_task.await.unwrap().unwrap(), b_task.await.unwrap().unwrap());
    let stats = relay.stats();
    assert!(stats.packets_relayed > 200, "the media went through the relay: {stats:?}");
    (a, b, speech)
}

fn assert_heard(caller: &CallSummary, callee: &CallSummary, speech: &[f32]) {
    assert!(caller.failure.is_none() && callee.failure.is_none(), "{:?} {:?}", caller.failure, callee.failure);
    let path = caller.stats.path.expect("the caller knows its path");
    assert_eq!((path.local_kind, path.remote_kind), (CandidateKind::Relayed, CandidateKind::Relayed), "{path}");
    assert!(callee.stats.path.expect("the callee knows its path").is_relayed());
    let similarity = speech_match(speech, &callee.recording).unwrap_or(0.0);
    eprintln!("path {path}; connected after {:?}; speech match {similarity:.3}; {:?}; caller sent {:?}", caller.stats.connected_after, callee.stats.receiver.jitter, caller.stats.sender);
    assert!(similarity > 0.8, "the callee heard the caller through the relay (correlation {similarity:.3}); path {path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_through_a_relay_over_udp_on_both_sides() {
    let (caller, callee, speech) = call(RelayTransport::Udp, RelayTransport::Udp).await;
    assert_heard(&caller, &callee, &speech);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_through_a_relay_reached_over_tcp_by_one_side() {
    let (caller, callee, speech) = call(RelayTransport::Tcp, RelayTransport::Udp).await;
    assert_heard(&caller, &callee, &speech);
}

/// The credentials a supernode issues (TURN REST API, `EXPIRY:USER`) allocate: the client
/// sends the username in the clear (not USERHASH), so the relay can read the expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_credentials_allocate() {
    let secret = koe_relay::RelaySecret::new(b"0123456789abcdef".to_vec());
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap());
    config.secret = Some(secret.clone());
    let relay = start_relay(config).await.unwrap();
    let credentials = secret.issue("carol", Duration::from_secs(3600));
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = socket.local_addr().unwrap();
    let mut session = MediaSession::new(Instant::now(), &[]).unwrap();
    let server = RelayServer { transport: RelayTransport::Udp, address: relay.udp, username: credentials.username, password: credentials.password };
    let mut streams = RelayStreams::default();
    session.add_relay(server, local, Instant::now());
    driver::gather_relays(&mut session, &socket, &mut streams, Instant::now() + Duration::from_secs(2)).await;
    let states = session.relay_states();
    assert!(matches!(states[0].2, AllocationState::Ready(_)), "{states:?}");
    assert_eq!(relay.stats().allocations, 1);
}
