//! The media driver as a call uses it: two drivers in their own tasks on real UDP sockets on
//! loopback, one sending speech as its microphone. The other's recording (everything it played
//! from the moment media connected) is that speech, a mouth-to-ear delay later; a side whose
//! peer vanishes ends by itself and says why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use koe_media::driver::{self, CallAudio, CallSummary};
use koe_media::MediaSession;
use koe_voice::signal::{best_lag, speechlike};
use koe_voice::{Backend, SAMPLE_RATE};
use tokio::net::UdpSocket;

async fn side() -> (MediaSession, UdpSocket) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let session = MediaSession::new(Instant::now(), &[socket.local_addr().unwrap()]).unwrap();
    (session, socket)
}

/// Caller `a` sends `microphone` for `a_for`; callee `b` runs for `b_for`.
async fn call(microphone: Vec<f32>, a_for: Duration, b_for: Duration) -> (CallSummary, CallSummary) {
    let ((mut a, a_socket), (mut b, b_socket)) = (side().await, side().await);
    let (offer, answer) = (a.local_description(), b.local_description());
    b.start(&offer, false).unwrap();
    a.start(&answer, true).unwrap();
    let audio = |microphone| CallAudio { backend: Backend::OpusPure, bitrate: 32_000, microphone };
    let a_task = tokio::spawn(driver::run(a, a_socket, audio(microphone), tokio::time::sleep(a_for)));
    let b_task = tokio::spawn(driver::run(b, b_socket, audio(Vec::new()), tokio::time::sleep(b_for)));
    (a_task.await.unwrap().unwrap(), b_task.await.unwrap().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callee_records_the_callers_speech_a_mouth_to_ear_delay_later() {
    let speech = speechlike(3);
    let (a, b) = call(speech.clone(), Duration::from_secs(4), Duration::from_secs(4)).await;
    assert!(a.failure.is_none() && b.failure.is_none(), "{:?} {:?}", a.failure, b.failure);
    let connected = a.connected_after.expect("connected");
    let jitter = b.receiver.jitter;
    assert_eq!(jitter.concealed, 0, "{jitter:?}");
    assert!(b.recording.len() >= 3 * SAMPLE_RATE as usize, "{} samples recorded", b.recording.len());
    // The first 0.8 s: the jitter buffer settles (drops its initial wait for a copy) only
    // after the first second, and that shifts what follows by a frame.
    let (lag, similarity) = best_lag(&speech[..SAMPLE_RATE as usize * 4 / 5], &b.recording, SAMPLE_RATE as usize / 2);
    let mouth_to_ear = Duration::from_micros(lag.max(0) as u64 * 1_000_000 / u64::from(SAMPLE_RATE));
    eprintln!("connected after {connected:?}; mouth-to-ear on loopback {mouth_to_ear:?}; correlation {similarity:.3}; {jitter:?}");
    assert!(similarity > 0.8, "the recording is the speech (correlation {similarity:.3})");
    assert!(lag > 0, "the recording lags the speech (mouth-to-ear {mouth_to_ear:?})");
    assert_eq!(a.sender.redundancy, 0, "a clean path, once reported, needs no copies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_side_whose_peer_vanishes_ends_by_itself_and_says_why() {
    let started = Instant::now();
    let (a, b) = call(speechlike(1), Duration::from_secs(2), Duration::from_secs(30)).await;
    assert!(a.failure.is_none(), "the caller hung up normally");
    let reason = b.failure.expect("the callee noticed");
    assert!(reason.contains("no audio from the other side"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(10), "noticed after {:?}", started.elapsed());
}
