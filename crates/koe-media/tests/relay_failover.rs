//! A relay node dies under a call: both sides offer only relayed candidates, on two relay
//! nodes each (Koe's own, in this process, on loopback), and the relay the caller's path goes
//! through is stopped mid-call — its sockets close, as when its process dies. The call moves to
//! a pair on the other relay and goes on: the callee hears the caller's speech again, and no
//! side ends the call. Over TURN/UDP the death is noticed by unanswered checks; over TCP by the
//! closed stream. The gap the callee heard is printed (docs/BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use koe_media::driver::{self, CallAudio, CallSummary, MediaControls, Microphone, RelayStreams};
use koe_media::relay::{AllocationState, RelayServer, RelayTransport};
use koe_media::{MediaError, MediaSession};
use koe_relay::{start_relay, RelayConfig, RelayHandle};
use koe_voice::signal::{speech_match, speechlike};
use koe_voice::{Backend, SAMPLE_RATE};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// A relay node on its own loopback address, as relay hosts have their own.
async fn relay(ip: &str) -> RelayHandle {
    let mut config = RelayConfig::new(format!("{ip}:0").parse().unwrap());
    config.users = vec![("caller".into(), "caller-password".into()), ("callee".into(), "callee-password".into())];
    start_relay(config).await.unwrap()
}

/// One side allocated on every relay over `transport`, offering nothing else; with the relayed
/// address it got on each.
async fn relayed_side(relays: &[RelayHandle], user: &str, transport: RelayTransport) -> (MediaSession, UdpSocket, RelayStreams, Vec<SocketAddr>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut session = MediaSession::new(Instant::now(), &[]).unwrap();
    let mut streams = RelayStreams::default();
    for relay in relays {
        let server = RelayServer { transport, address: relay.udp, username: user.into(), password: format!("{user}-password") };
        if transport == RelayTransport::Udp {
            session.add_relay(server, socket.local_addr().unwrap(), Instant::now());
        } else {
            let stream = TcpStream::connect(relay.tcp).await.unwrap();
            let index = session.add_relay(server, stream.local_addr().unwrap(), Instant::now());
            streams.add(index, stream);
        }
    }
    driver::gather_relays(&mut session, &socket, &mut streams, Instant::now() + Duration::from_secs(2)).await;
    let relayed = session
        .relay_states()
        .into_iter()
        .map(|(_, _, state)| match state {
            AllocationState::Ready(address) => address,
            other => panic!("{user}'s allocation: {other:?}"),
        })
        .collect();
    (session, socket, streams, relayed)
}

/// The longest run of silence (10 ms windows) in `samples`, in milliseconds.
fn longest_silence_ms(samples: &[f32]) -> usize {
    let window = SAMPLE_RATE as usize / 100;
    let quiet: Vec<bool> = samples.chunks(window).map(|w| w.iter().map(|s| s * s).sum::<f32>() / (w.len() as f32) < 1e-6).collect();
    quiet.split(|&q| !q).map(<[bool]>::len).max().unwrap_or(0) * 10
}

/// One side of a call running on its own task, and its live statistics.
struct RunningSide {
    task: JoinHandle<Result<CallSummary, MediaError>>,
    controls: MediaControls,
    relayed: Vec<SocketAddr>,
}

/// Both sides allocated on every relay over `transport` and connected for a call of `length`:
/// the caller plays `speech`, the callee nothing.
async fn relayed_call(relays: &[RelayHandle], transport: RelayTransport, speech: &[f32], length: Duration) -> (RunningSide, RunningSide) {
    let (mut a, a_socket, a_streams, a_relayed) = relayed_side(relays, "caller", transport).await;
    let (mut b, b_socket, b_streams, b_relayed) = relayed_side(relays, "callee", transport).await;
    let (offer, answer) = (a.local_description(), b.local_description());
    b.start(&offer, false).unwrap();
    a.start(&answer, true).unwrap();
    let audio = |microphone| CallAudio { backend: Backend::OpusPure, bitrate: 32_000, microphone, speaker: None };
    let (a_controls, b_controls) = (MediaControls::default(), MediaControls::default());
    let a_task = tokio::spawn(driver::run(a, a_socket, a_streams, audio(Microphone::Samples(speech.to_vec())), a_controls.clone(), tokio::time::sleep(length)));
    let b_task = tokio::spawn(driver::run(b, b_socket, b_streams, audio(Microphone::Samples(Vec::new())), b_controls.clone(), tokio::time::sleep(length)));
    (
        RunningSide { task: a_task, controls: a_controls, relayed: a_relayed },
        RunningSide { task: b_task, controls: b_controls, relayed: b_relayed },
    )
}

async fn relay_dies_mid_call(transport: RelayTransport) {
    let mut relays = vec![relay("127.0.0.3").await, relay("127.0.0.4").await];
    let second = SAMPLE_RATE as usize;
    let speech = speechlike(12);
    let (a, b) = relayed_call(&relays, transport, &speech, Duration::from_secs(11)).await;

    // Three seconds into the call, the relay the caller's path leaves through dies.
    let path = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let live = a.controls.live.lock().unwrap().clone();
        if let Some(path) = live.path.filter(|_| live.talked >= Duration::from_secs(3)) {
            break path;
        }
    };
    let dying = a.relayed.iter().position(|relayed| *relayed == path.local).unwrap_or_else(|| panic!("the caller's path {path} leaves from one of its relays {:?}", a.relayed));
    let callee_talked = b.controls.live.lock().unwrap().talked;
    drop(relays.remove(dying));
    let (caller, callee) = (a.task.await.unwrap().unwrap(), b.task.await.unwrap().unwrap());

    assert!(caller.failure.is_none() && callee.failure.is_none(), "the call went on: {:?} {:?}", caller.failure, callee.failure);
    let end_path = caller.stats.path.expect("the caller knows its path");
    let dead = [a.relayed[dying], b.relayed[dying]];
    assert!(!dead.contains(&end_path.local) && !dead.contains(&end_path.remote), "the call left the dead relay {dead:?}: {end_path}");
    assert!(!caller.stats.path_moves.is_empty(), "the caller reports the move");

    // What the callee heard from about when the relay died (its live statistics lag by up to a
    // second), and whether the speech came back after it.
    let killed_at = (callee_talked.as_secs_f64() * second as f64) as usize;
    let heard = &callee.recording;
    let gap = longest_silence_ms(&heard[killed_at.saturating_sub(second / 2).min(heard.len())..]);
    let tail_from = (killed_at + 5 * second / 2).min(heard.len());
    let speech_after = speech_match(&speech[tail_from.min(speech.len() - 3 * second)..], &heard[tail_from..]).unwrap_or_else(|| {
        eprintln!("too little speech after the move: {} samples recorded, from {tail_from}", heard.len());
        0.0
    });
    eprintln!("relay over {transport} died under the call: moved {:?}; the callee heard {gap} ms of silence; speech match afterwards {speech_after:.3}", caller.stats.path_moves);
    assert!(speech_after > 0.8, "the callee hears the caller again after the move (speech match {speech_after:.3})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_moves_to_another_relay_when_its_udp_relay_dies() {
    relay_dies_mid_call(RelayTransport::Udp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_moves_to_another_relay_when_its_tcp_relay_dies() {
    relay_dies_mid_call(RelayTransport::Tcp).await;
}

/// The whole machine pauses for 1.5 s mid-call (an overloaded or suspended host; here the
/// single-threaded runtime with both sides and both relays is blocked). When it resumes, the
/// relays' answers and the other side's voice are still unread: no side may take the quiet
/// before the pause for a dead relay or path, drop candidates and move the call.
#[tokio::test]
async fn a_pause_of_the_machine_does_not_move_the_call_off_its_relays() {
    let relays = vec![relay("127.0.0.3").await, relay("127.0.0.4").await];
    let second = SAMPLE_RATE as usize;
    let speech = speechlike(9);
    let (a, b) = relayed_call(&relays, RelayTransport::Udp, &speech, Duration::from_secs(8)).await;

    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if a.controls.live.lock().unwrap().talked >= Duration::from_secs(3) {
            break;
        }
    }
    // Blocks the runtime: nothing in this process runs meanwhile.
    std::thread::sleep(Duration::from_millis(1500));
    let (caller, callee) = (a.task.await.unwrap().unwrap(), b.task.await.unwrap().unwrap());

    assert!(caller.failure.is_none() && callee.failure.is_none(), "the call went on: {:?} {:?}", caller.failure, callee.failure);
    assert!(caller.stats.path_moves.is_empty(), "the caller stayed on its path: {:?}", caller.stats.path_moves);
    assert!(callee.stats.path_moves.is_empty(), "the callee stayed on its path: {:?}", callee.stats.path_moves);
    // The recording runs on the playout clock, which stood still during the pause: from 3.5 s
    // on it is after the pause.
    let heard = &callee.recording;
    let tail_from = (7 * second / 2).min(heard.len());
    let speech_after = speech_match(&speech[tail_from.min(speech.len() - 2 * second)..], &heard[tail_from..]).unwrap_or(0.0);
    assert!(speech_after > 0.8, "the callee hears the caller after the pause (speech match {speech_after:.3})");
}
