//! The media driver as a call uses it: two drivers in their own tasks on real UDP sockets on
//! loopback, one sending speech as its microphone. The other's recording (everything it played
//! from the moment media connected) is that speech, a mouth-to-ear delay later; a side whose
//! peer vanishes ends by itself and says why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use koe_media::driver::{self, CallAudio, CallSummary, MediaControls, Microphone, RelayStreams};
use koe_media::MediaSession;
use koe_voice::signal::{best_lag, speech_match, speechlike};
use koe_voice::{Backend, SAMPLE_RATE};
use tokio::net::UdpSocket;

async fn side() -> (MediaSession, UdpSocket) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let session = MediaSession::new(Instant::now(), &[socket.local_addr().unwrap()]).unwrap();
    (session, socket)
}

/// Caller `a` sends `microphone` for `a_for`; callee `b` runs for `b_for`.
async fn call(microphone: Vec<f32>, a_for: Duration, b_for: Duration) -> (CallSummary, CallSummary) {
    call_with(Microphone::Samples(microphone), MediaControls::default(), Microphone::Samples(Vec::new()), a_for, b_for).await
}

async fn call_with(
    a_microphone: Microphone,
    a_controls: MediaControls,
    b_microphone: Microphone,
    a_for: Duration,
    b_for: Duration,
) -> (CallSummary, CallSummary) {
    let ((mut a, a_socket), (mut b, b_socket)) = (side().await, side().await);
    let (offer, answer) = (a.local_description(), b.local_description());
    b.start(&offer, false).unwrap();
    a.start(&answer, true).unwrap();
    let audio = |microphone| CallAudio { backend: Backend::OpusPure, bitrate: 32_000, microphone, speaker: None };
    let a_task = tokio::spawn(driver::run(a, a_socket, RelayStreams::default(), audio(a_microphone), a_controls, tokio::time::sleep(a_for)));
    let b_task = tokio::spawn(driver::run(b, b_socket, RelayStreams::default(), audio(b_microphone), MediaControls::default(), tokio::time::sleep(b_for)));
    (a_task.await.unwrap().unwrap(), b_task.await.unwrap().unwrap())
}

fn energy(samples: &[f32]) -> f32 {
    samples.iter().map(|s| s * s).sum::<f32>() / samples.len().max(1) as f32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callee_records_the_callers_speech_a_mouth_to_ear_delay_later() {
    let speech = speechlike(3);
    let (a, b) = call(speech.clone(), Duration::from_secs(4), Duration::from_secs(4)).await;
    assert!(a.failure.is_none() && b.failure.is_none(), "{:?} {:?}", a.failure, b.failure);
    let connected = a.stats.connected_after.expect("connected");
    let jitter = b.stats.receiver.jitter;
    assert_eq!(jitter.concealed, 0, "{jitter:?}");
    assert!(b.recording.len() >= 3 * SAMPLE_RATE as usize, "{} samples recorded", b.recording.len());
    // The first 0.8 s: the jitter buffer settles (drops its initial wait for a copy) only
    // after the first second, and that shifts what follows by a frame.
    let (lag, similarity) = best_lag(&speech[..SAMPLE_RATE as usize * 4 / 5], &b.recording, SAMPLE_RATE as usize / 2);
    let mouth_to_ear = Duration::from_micros(lag.max(0) as u64 * 1_000_000 / u64::from(SAMPLE_RATE));
    eprintln!("connected after {connected:?}; mouth-to-ear on loopback {mouth_to_ear:?}; correlation {similarity:.3}; {jitter:?}");
    assert!(similarity > 0.8, "the recording is the speech (correlation {similarity:.3})");
    assert!(lag > 0, "the recording lags the speech (mouth-to-ear {mouth_to_ear:?})");
    assert_eq!(a.stats.sender.redundancy, 0, "a clean path, once reported, needs no copies");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_muted_side_sends_silence_and_the_path_and_round_trip_are_reported() {
    let controls = MediaControls::default();
    controls.muted.store(true, std::sync::atomic::Ordering::Relaxed);
    let (a, b) = call_with(Microphone::Samples(speechlike(3)), controls.clone(), Microphone::Samples(Vec::new()), Duration::from_secs(3), Duration::from_secs(3)).await;
    assert!(a.failure.is_none() && b.failure.is_none(), "{:?} {:?}", a.failure, b.failure);
    assert!(b.recording.len() > 2 * SAMPLE_RATE as usize);
    assert!(energy(&b.recording) < 1e-6, "the muted caller was heard: energy {}", energy(&b.recording));
    let path = a.stats.path.expect("the path in use is known");
    assert!(!path.is_relayed());
    assert_eq!(path.to_string(), format!("direct (host {} ↔ host {})", path.local, path.remote));
    assert!(a.stats.rtt.is_some(), "a round-trip time was measured");
    assert_eq!(a.stats.rejected_packets + b.stats.rejected_packets, 0);
    let live = controls.live.lock().unwrap().clone();
    assert_eq!(live.sender.frames, a.stats.sender.frames, "the live statistics end as the summary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_test_plays_back_what_it_heard() {
    // The echo test beeps (0.4 s), listens for 2 s, beeps, plays back. The caller speaks
    // 0.6 s to 1.8 s into the call.
    let speech = speechlike(2);
    let mut microphone = vec![0.0; SAMPLE_RATE as usize * 6 / 10];
    microphone.extend_from_slice(&speech[..SAMPLE_RATE as usize * 6 / 5]);
    let echo = Microphone::EchoBack { listen: Duration::from_secs(2) };
    assert_eq!(echo.length(), Duration::from_millis(4800));
    let (a, b) = call_with(Microphone::Samples(microphone), MediaControls::default(), echo, Duration::from_secs(6), Duration::from_secs(6)).await;
    assert!(a.failure.is_none() && b.failure.is_none(), "{:?} {:?}", a.failure, b.failure);
    let second = SAMPLE_RATE as usize;
    assert!(energy(&a.recording[..second / 2]) > 1e-3, "the caller heard the first tone");
    // Played back from 2.8 s on (tone, listening, tone), a mouth-to-ear delay each way later.
    let from = second * 28 / 10;
    // Both jitter buffers settle during the first seconds (each drops the frame it waited
    // for, in a pause), so the echo's delay moves by a frame or two, and a window straddling
    // such a step matches less well: most quarter seconds must match.
    let mut matched = 0;
    for start in (0..second).step_by(second / 8) {
        // 0.2 s of the caller's silence before speaking, plus a mouth-to-ear delay each way.
        let expected_from = from + start + second / 5;
        let (lag, similarity) = best_lag(&speech[start..start + second / 4], &a.recording[expected_from..], second / 8);
        eprintln!("{start} samples into the speech: heard back {} samples after 2.8 s, correlation {similarity:.3}", lag + second as isize / 5);
        if similarity > 0.7 && lag >= 0 {
            matched += 1;
        }
    }
    assert!(matched >= 6, "the caller heard their own speech back in only {matched} of 8 windows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sound_device_queues_carry_the_call() {
    // What a sound card's callbacks do: the microphone's pushes 10 ms at a time, the
    // speaker's pulls 10 ms at a time, each on its own clock.
    let speech = speechlike(3);
    let (microphone, speaker): (driver::SoundQueue, driver::SoundQueue) = Default::default();
    let capture = {
        let (microphone, speech) = (microphone.clone(), speech.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for chunk in speech.chunks(SAMPLE_RATE as usize / 100) {
                tick.tick().await;
                driver::push_sound(&microphone, chunk);
            }
        })
    };
    let playback = {
        let speaker = speaker.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut heard = Vec::new();
            let mut chunk = vec![0.0; SAMPLE_RATE as usize / 100];
            for _ in 0..400 {
                tick.tick().await;
                driver::pull_sound(&speaker, &mut chunk);
                heard.extend_from_slice(&chunk);
            }
            heard
        })
    };
    let ((mut a, a_socket), (mut b, b_socket)) = (side().await, side().await);
    let (offer, answer) = (a.local_description(), b.local_description());
    b.start(&offer, false).unwrap();
    a.start(&answer, true).unwrap();
    let a_audio = CallAudio { backend: Backend::OpusPure, bitrate: 32_000, microphone: Microphone::Device(microphone), speaker: None };
    let b_audio = CallAudio { backend: Backend::OpusPure, bitrate: 32_000, microphone: Microphone::Samples(Vec::new()), speaker: Some(speaker) };
    let stop = || tokio::time::sleep(Duration::from_secs(4));
    let a_task = tokio::spawn(driver::run(a, a_socket, RelayStreams::default(), a_audio, MediaControls::default(), stop()));
    let b_task = tokio::spawn(driver::run(b, b_socket, RelayStreams::default(), b_audio, MediaControls::default(), stop()));
    let (a, b) = (a_task.await.unwrap().unwrap(), b_task.await.unwrap().unwrap());
    capture.await.unwrap();
    let heard = playback.await.unwrap();
    assert!(a.failure.is_none() && b.failure.is_none());
    let second = SAMPLE_RATE as usize;
    // Quarter-second windows: the jitter buffer stretches the voice by a few milliseconds at
    // a time as the two clocks and the scheduler move, which one long window would punish.
    let similarity = speech_match(&speech, &heard).expect("the speaker played the speech");
    let probe = second / 4..second * 3 / 4;
    let (at, _) = best_lag(&speech[probe.clone()], &heard, second);
    let lag = at - probe.start as isize;
    eprintln!("the speaker played the microphone's speech {} ms later (similarity {similarity:.3})", lag * 1000 / second as isize);
    eprintln!("{:?}", b.stats.receiver);
    assert!(similarity > 0.8, "similarity {similarity:.3}");
    assert!((0..second as isize / 4).contains(&lag), "{lag} samples late");
}
