//! Two media sessions on real UDP sockets on loopback: ICE finds the path, DTLS-SRTP comes
//! up, and speech sent through the voice engine on one side is played out on the other
//! (checked by aligned cross-correlation). A wrong DTLS fingerprint never connects, garbage
//! datagrams change nothing, and a peer that vanishes is noticed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use koe_media::{MediaDescription, MediaOutput, MediaSession};
use koe_voice::signal::{best_lag, correlation, speechlike};
use koe_voice::{Backend, JitterConfig, VoiceReceiver, VoiceSender, FRAME_SAMPLES, SAMPLE_RATE};
use tokio::net::UdpSocket;

struct Side {
    session: MediaSession,
    socket: UdpSocket,
    local: SocketAddr,
    sender: VoiceSender,
    receiver: VoiceReceiver,
    played: Vec<f32>,
    connected: Option<Instant>,
    failed: Option<String>,
    wake: Instant,
    speaking: bool,
    sent: Vec<Vec<u8>>,
    /// Flip a bit in every n-th SRTP packet this side sends (an attacker on the path).
    tamper_every: Option<usize>,
    srtp_sent: usize,
    tampered: u64,
    /// Loss reports received from the other side.
    reports: usize,
}

impl Side {
    async fn new() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = socket.local_addr().unwrap();
        Self {
            session: MediaSession::new(Instant::now(), &[local]).unwrap(),
            socket,
            local,
            sender: VoiceSender::new(Backend::OpusPure.encoder(32_000).unwrap()),
            receiver: VoiceReceiver::new(Backend::OpusPure.decoder().unwrap(), JitterConfig::default()),
            played: Vec::new(),
            connected: None,
            failed: None,
            wake: Instant::now(),
            speaking: true,
            sent: Vec::new(),
            tamper_every: None,
            srtp_sent: 0,
            tampered: 0,
            reports: 0,
        }
    }

    async fn drive(&mut self) {
        loop {
            match self.session.poll(Instant::now()) {
                MediaOutput::Transmit { destination, mut datagram, .. } => {
                    // SRTP (RFC 7983: first byte 128–191), media-sized.
                    // SRTP, not SRTCP (RTCP's packet types are 192–223).
                    if (128..192).contains(&datagram[0]) && !(192..=223).contains(&datagram[1]) && datagram.len() > 60 {
                        self.srtp_sent += 1;
                        if self.tamper_every.is_some_and(|n| self.srtp_sent.is_multiple_of(n)) {
                            let middle = datagram.len() / 2;
                            datagram[middle] ^= 0x10;
                            self.tampered += 1;
                        }
                    }
                    let _ = self.socket.send_to(&datagram, destination).await;
                }
                MediaOutput::Voice { payload, arrived } => {
                    let _ = self.receiver.receive(arrived, &payload);
                }
                MediaOutput::StreamWrite { .. } => unreachable!("these sessions use no relay"),
                MediaOutput::LossReport(report) => {
                    self.sender.on_loss_report(report);
                    self.reports += 1;
                }
                MediaOutput::Connected => self.connected = Some(Instant::now()),
                MediaOutput::PathStats { .. } => {}
                MediaOutput::Failed { reason } => {
                    self.failed = Some(reason);
                    return;
                }
                MediaOutput::WaitUntil(at) => {
                    self.wake = at;
                    return;
                }
            }
        }
    }
}

/// Runs both sides for `duration`: each 20 ms, once connected, `a` sends the next frame of
/// `speech` and `b` plays a frame out.
async fn run(a: &mut Side, b: &mut Side, speech: &[f32], duration: Duration) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut frame = 0usize;
    let (mut buffer_a, mut buffer_b) = (vec![0u8; 2048], vec![0u8; 2048]);
    let mut out = vec![0.0f32; FRAME_SAMPLES];
    while started.elapsed() < duration {
        a.drive().await;
        b.drive().await;
        let wake = tokio::time::Instant::from_std(a.wake.min(b.wake));
        tokio::select! {
            received = a.socket.recv_from(&mut buffer_a) => if let Ok((n, from)) = received {
                a.session.receive(Instant::now(), from, a.local, &buffer_a[..n]);
            },
            received = b.socket.recv_from(&mut buffer_b) => if let Ok((n, from)) = received {
                b.session.receive(Instant::now(), from, b.local, &buffer_b[..n]);
            },
            _ = tick.tick() => {
                let now = Instant::now();
                if a.connected.is_some() && a.speaking {
                    let start = (frame * FRAME_SAMPLES).min(speech.len());
                    let mut input = speech[start..(start + FRAME_SAMPLES).min(speech.len())].to_vec();
                    input.resize(FRAME_SAMPLES, 0.0);
                    let payload = a.sender.encode(&input).unwrap();
                    a.sent.push(payload.clone());
                    a.session.send_voice(now, &payload).unwrap();
                    frame += 1;
                }
                if b.connected.is_some() {
                    b.receiver.play(now, &mut out).unwrap();
                    b.played.extend_from_slice(&out);
                    if b.played.len().is_multiple_of(50 * FRAME_SAMPLES) {
                        // Once a second, as the real driver does.
                        let report = b.receiver.loss_report();
                        b.session.send_loss_report(report);
                    }
                }
            },
            () = tokio::time::sleep_until(wake) => {},
        }
    }
}

async fn connected_pair(spoil_fingerprint: bool) -> (Side, Side) {
    let (mut a, mut b) = (Side::new().await, Side::new().await);
    let offer = a.session.local_description();
    let mut answer: MediaDescription = b.session.local_description();
    if spoil_fingerprint {
        answer.dtls_fingerprint = offer.dtls_fingerprint.clone();
    }
    b.session.start(&offer, false).unwrap();
    a.session.start(&answer, true).unwrap();
    (a, b)
}

#[tokio::test(flavor = "current_thread")]
async fn speech_crosses_a_real_udp_path_encrypted() {
    let (mut a, mut b) = connected_pair(false).await;
    let speech = speechlike(3);
    let started = Instant::now();
    run(&mut a, &mut b, &speech, Duration::from_secs(4)).await;
    let connected = a.connected.expect("the caller connected");
    assert!(b.connected.is_some(), "the callee connected");
    eprintln!("connected after {:?}", connected - started);
    let stats = b.receiver.stats().jitter;
    eprintln!("{stats:?}; played {} samples", b.played.len());
    assert!(stats.frames >= 140, "{stats:?}");
    assert_eq!(stats.concealed, 0, "nothing lost on loopback: {stats:?}");
    assert_eq!(stats.malformed, 0);
    assert!(a.reports >= 2, "the callee's loss reports reached the caller over SRTCP: {}", a.reports);
    assert_eq!(a.sender.stats().redundancy, 0, "a clean path needs no copies once reported");
    // What the callee played is what the caller encoded: every 20 ms block of the caller's
    // frames, decoded directly, is found in the callee's playout (a delay adjustment may
    // shift blocks by a frame, so each is looked up near where it should be).
    let mut decoder = Backend::OpusPure.decoder().unwrap();
    let mut direct = Vec::new();
    let mut out = vec![0.0f32; FRAME_SAMPLES];
    for payload in &a.sent {
        decoder.decode(koe_voice::VoicePayload::parse(payload).unwrap().opus, &mut out).unwrap();
        direct.extend_from_slice(&out);
    }
    let (offset, _) = best_lag(&direct[..FRAME_SAMPLES * 25], &b.played, SAMPLE_RATE as usize / 2);
    let speaking: Vec<usize> = (0..speech.len() / FRAME_SAMPLES)
        .filter(|i| direct[i * FRAME_SAMPLES..(i + 1) * FRAME_SAMPLES].iter().any(|s| s.abs() > 0.05))
        .collect();
    let found = speaking
        .iter()
        .filter(|&&i| {
            let block = &direct[i * FRAME_SAMPLES..(i + 1) * FRAME_SAMPLES];
            // Where it should be, or a frame earlier or later after a delay adjustment.
            [-(FRAME_SAMPLES as isize), 0, FRAME_SAMPLES as isize].iter().any(|shift| {
                let at = (i * FRAME_SAMPLES) as isize + offset + shift;
                at >= 0 && correlation(block, b.played.get(at as usize..).unwrap_or(&[])) > 0.95
            })
        })
        .count();
    assert!(found * 100 >= speaking.len() * 95, "{found} of {} speech blocks arrived intact", speaking.len());
    // And it is the speech: the codec keeps its waveform over the first second and a half.
    let half = speech.len() / 2;
    let (_, similarity) = best_lag(&speech[..half], &direct, SAMPLE_RATE as usize / 2);
    assert!(similarity > 0.8, "correlation with the sent speech {similarity:.3}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_wrong_dtls_fingerprint_never_connects() {
    let (mut a, mut b) = connected_pair(true).await;
    run(&mut a, &mut b, &[], Duration::from_secs(3)).await;
    assert!(a.connected.is_none(), "the caller must not accept a certificate the answer did not name");
    assert!(b.receiver.stats().jitter.frames == 0);
}

#[tokio::test(flavor = "current_thread")]
async fn garbage_datagrams_change_nothing_and_a_vanished_peer_is_noticed() {
    let (mut a, mut b) = connected_pair(false).await;
    let speech = speechlike(2);
    run(&mut a, &mut b, &speech, Duration::from_secs(1)).await;
    assert!(b.connected.is_some());
    // Garbage from a stranger at the callee's socket.
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for garbage in [&[0u8; 1][..], &[0xff; 1200][..], &[0x80, 0x6f, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1][..]] {
        stranger.send_to(garbage, b.local).unwrap();
    }
    run(&mut a, &mut b, &speech, Duration::from_secs(1)).await;
    assert!(b.failed.is_none());
    assert_eq!(b.receiver.stats().jitter.malformed, 0, "garbage never reached the voice engine");
    // The caller vanishes: its socket closes and it sends nothing more.
    let a_local = a.local;
    drop(a);
    let mut ghost = Side::new().await; // never started: a stand-in so `run` has two sides
    ghost.speaking = false;
    let started = Instant::now();
    while b.failed.is_none() && started.elapsed() < Duration::from_secs(10) {
        run(&mut ghost, &mut b, &[], Duration::from_millis(200)).await;
    }
    eprintln!("vanished peer {a_local} noticed after {:?}: {:?}", started.elapsed(), b.failed);
    let reason = b.failed.expect("the callee noticed within 10 s");
    assert!(reason.contains("no audio from the other side"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(6), "noticed in {:?}", started.elapsed());
}

#[tokio::test(flavor = "current_thread")]
async fn tampered_srtp_packets_are_dropped_and_copies_fill_the_gaps() {
    let (mut a, mut b) = connected_pair(false).await;
    a.tamper_every = Some(7);
    let speech = speechlike(3);
    run(&mut a, &mut b, &speech, Duration::from_secs(4)).await;
    let stats = b.receiver.stats().jitter;
    eprintln!("{stats:?}; {} SRTP packets sent, every 7th altered", a.srtp_sent);
    assert!(b.failed.is_none(), "altered packets do not break the call");
    assert_eq!(stats.malformed, 0, "no altered packet reached the voice engine: SRTP authentication dropped them");
    let rejected = b.session.rejected_packets();
    // The last altered packets may still be in flight when the call stops.
    assert!((a.tampered.saturating_sub(2)..=a.tampered).contains(&rejected), "{rejected} counted as rejected, {} altered", a.tampered);
    assert!(stats.loss_before_recovery > 0.08, "about one packet in seven was dropped: {stats:?}");
    assert!(stats.from_copies > 10, "the copies in the next packets filled the gaps: {stats:?}");
    // One packet in seven lost: two copies, or one and each packet twice.
    let sent = a.sender.stats();
    assert!(sent.redundancy >= 2 || (sent.redundancy >= 1 && sent.twins), "the caller's copies followed the reported loss: {sent:?}");
}
