//! The trunk side's audio: one RTP stream to the carrier in G.711, bridged to the Koe call's
//! 48 kHz audio through two sound queues; RFC 4733 key presses out (`koe dtmf`) and in; the
//! one-minute warning tone towards the Koe caller; and the watch that ends a call whose
//! carrier stopped sending RTP.
//!
//! A task per call sends one packet every 20 ms (silence when the Koe side has nothing) and
//! reads whatever arrives; its state is small and lives in the task.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use koe_media::driver::{pull_sound, push_sound, SoundQueue};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::dtmf::{DtmfDigit, DtmfReceiver, DtmfSender, TelephoneEvent};
use crate::g711::G711Law;
use crate::resample::{to_f32, to_i16, Downsampler, Upsampler, RATIO};
use crate::rtp::{self, RtpSender};
use crate::sdp::{Codec, RemoteAudio};

/// 8 kHz samples in one 20 ms packet.
pub const PACKET_SAMPLES: usize = 160;
const PACKET_INTERVAL: Duration = Duration::from_millis(20);
/// A call whose carrier sends no RTP for this long is over (from when it stopped).
pub const DEFAULT_RTP_TIMEOUT: Duration = Duration::from_secs(30);
/// The warning tone: three short beeps, Skype's "your credit runs out" sound.
const TONE_HZ: f32 = 880.0;
const TONE_BEEP: Duration = Duration::from_millis(150);
const TONE_BEEPS: usize = 3;
const TONE_LEVEL: f32 = 0.2;
const KOE_RATE_HZ: f32 = 48_000.0;

/// The RTP socket of one call, bound before the offer is written (the offer names its port).
#[derive(Debug)]
pub struct RtpPort {
    socket: UdpSocket,
}

impl RtpPort {
    pub async fn bind(ip: IpAddr) -> std::io::Result<Self> {
        Ok(Self { socket: UdpSocket::bind(SocketAddr::new(ip, 0)).await? })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

/// The Koe call's side of the audio, at 48 kHz.
#[derive(Debug, Clone, Default)]
pub struct KoeAudio {
    /// What the phone says, for the Koe caller (the media driver's microphone).
    pub from_phone: SoundQueue,
    /// What the Koe caller says, for the phone (the media driver's speaker).
    pub to_phone: SoundQueue,
}

#[derive(Debug)]
enum Command {
    /// The carrier's media moved (a re-INVITE, or the answer's SDP after early media).
    Remote(RemoteAudio),
    Dtmf(Vec<DtmfDigit>),
    WarningTone,
    /// From now on a silent carrier ends the call (after the answer).
    WatchInactivity,
}

/// What the media task reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaReport {
    /// No RTP from the carrier since `since`.
    Inactive { since: Instant },
    /// The phone's user pressed a key.
    Digit(DtmfDigit),
    /// `koe dtmf` asked for digits but the carrier takes no RFC 4733 events.
    NoDtmf,
}

/// Counts for the call's record and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrunkMediaStats {
    pub packets_sent: u64,
    pub packets_received: u64,
    /// Packets missing by sequence number.
    pub packets_lost: u64,
    /// Packets that arrived out of order or twice (dropped).
    pub packets_late: u64,
    /// Packets that were not RTP, or from elsewhere than the carrier (dropped).
    pub packets_refused: u64,
}

/// The running media of one call.
#[derive(Debug)]
pub struct TrunkMedia {
    commands: mpsc::UnboundedSender<Command>,
    pub reports: mpsc::UnboundedReceiver<MediaReport>,
    task: tokio::task::JoinHandle<TrunkMediaStats>,
}

impl TrunkMedia {
    /// Starts sending to and receiving from `remote` on `port`.
    pub fn start(port: RtpPort, remote: RemoteAudio, audio: KoeAudio, rtp_timeout: Duration) -> Self {
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(Arc::new(port.socket), remote, audio, rtp_timeout, commands_rx, reports_tx));
        Self { commands, reports, task }
    }

    pub fn repoint(&self, remote: RemoteAudio) {
        let _ = self.commands.send(Command::Remote(remote));
    }

    pub fn send_dtmf(&self, digits: Vec<DtmfDigit>) {
        let _ = self.commands.send(Command::Dtmf(digits));
    }

    pub fn warning_tone(&self) {
        let _ = self.commands.send(Command::WarningTone);
    }

    pub fn watch_inactivity(&self) {
        let _ = self.commands.send(Command::WatchInactivity);
    }

    /// Stops the media; its counts.
    pub async fn stop(self) -> TrunkMediaStats {
        drop(self.commands);
        self.task.await.unwrap_or_default()
    }
}

fn law(codec: Codec) -> G711Law {
    match codec {
        Codec::Pcma => G711Law::Alaw,
        // Only G.711 is offered to trunks; Opus answers are refused when negotiating.
        _ => G711Law::Ulaw,
    }
}

/// The beeps as 48 kHz samples.
fn warning_tone() -> VecDeque<f32> {
    let beep = (TONE_BEEP.as_secs_f32() * KOE_RATE_HZ) as usize;
    let mut samples = VecDeque::with_capacity(2 * beep * TONE_BEEPS);
    for _ in 0..TONE_BEEPS {
        samples.extend((0..beep).map(|i| TONE_LEVEL * (std::f32::consts::TAU * TONE_HZ * i as f32 / KOE_RATE_HZ).sin()));
        samples.extend(std::iter::repeat_n(0.0, beep));
    }
    samples
}

async fn run(
    socket: Arc<UdpSocket>,
    mut remote: RemoteAudio,
    audio: KoeAudio,
    rtp_timeout: Duration,
    mut commands: mpsc::UnboundedReceiver<Command>,
    reports: mpsc::UnboundedSender<MediaReport>,
) -> TrunkMediaStats {
    let started = Instant::now();
    let random = crate::ledger::BillingId::random().0;
    let mut sender = RtpSender::new(random as u32, (random >> 32) as u16, (random >> 48) as u32, 8000);
    let mut stats = TrunkMediaStats::default();
    let mut upsampler = Upsampler::default();
    let mut downsampler = Downsampler::default();
    let mut dtmf_out: Option<DtmfSender> = None;
    let mut dtmf_in = DtmfReceiver::new(8000).ok();
    let mut tone: VecDeque<f32> = VecDeque::new();
    let mut watching = false;
    let mut last_heard = Instant::now();
    let mut reported_inactive = false;
    let mut expected_sequence: Option<u16> = None;
    let mut ticker = tokio::time::interval(PACKET_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut buffer = vec![0u8; 2048];
    let mut frame = vec![0.0f32; PACKET_SAMPLES * RATIO];
    let mut narrow = Vec::with_capacity(PACKET_SAMPLES);
    let mut wide = Vec::with_capacity(PACKET_SAMPLES * RATIO);
    let mut pcm = Vec::with_capacity(PACKET_SAMPLES);
    let mut payload = Vec::with_capacity(PACKET_SAMPLES);
    let mut packet = Vec::with_capacity(PACKET_SAMPLES + rtp::HEADER_LEN);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let now = Instant::now();
                let now_ms = now.duration_since(started).as_millis() as u64;
                // Towards the phone: key presses replace the voice while they play.
                pull_sound(&audio.to_phone, &mut frame);
                narrow.clear();
                downsampler.process(&frame, &mut narrow);
                let destination = SocketAddr::new(remote.addr, remote.port);
                packet.clear();
                if let Some(digits) = dtmf_out.as_mut() {
                    let mut sent_any = false;
                    while let Some(event) = digits.poll_packet(now_ms) {
                        let header = sender.next_at(remote.telephone_event_pt.unwrap_or(101), event.marker, event.timestamp);
                        packet.clear();
                        header.write(&event.event.encode(), &mut packet);
                        if socket.send_to(&packet, destination).await.is_ok() {
                            stats.packets_sent += 1;
                        }
                        sent_any = true;
                    }
                    sender.advance(PACKET_SAMPLES as u32);
                    if digits.is_done() {
                        dtmf_out = None;
                    }
                    if sent_any || dtmf_out.is_some() {
                        continue;
                    }
                }
                pcm.clear();
                pcm.extend(narrow.iter().map(|s| to_i16(*s)));
                payload.clear();
                law(remote.codec).encode_into(&pcm, &mut payload);
                let header = sender.next(remote.codec_pt, false, PACKET_SAMPLES as u32);
                header.write(&payload, &mut packet);
                match socket.send_to(&packet, destination).await {
                    Ok(_) => stats.packets_sent += 1,
                    Err(error) => debug!(%error, "an RTP packet to the carrier was not sent"),
                }
                // Towards the Koe caller: the warning tone instead of the phone while it plays.
                if !tone.is_empty() {
                    let take = tone.len().min(PACKET_SAMPLES * RATIO);
                    let beeps: Vec<f32> = tone.drain(..take).collect();
                    push_sound(&audio.from_phone, &beeps);
                }
                if let Some(receiver) = dtmf_in.as_mut() {
                    receiver.handle_timeout(now_ms);
                    while let Some(received) = receiver.poll_digit() {
                        let _ = reports.send(MediaReport::Digit(received.digit));
                    }
                }
                if watching && !reported_inactive && now.duration_since(last_heard) >= rtp_timeout {
                    reported_inactive = true;
                    let _ = reports.send(MediaReport::Inactive { since: last_heard });
                }
            }
            received = socket.recv_from(&mut buffer) => {
                let Ok((length, from)) = received else { continue };
                let bytes = &buffer[..length];
                if from.ip() != remote.addr || rtp::is_rtcp(bytes) {
                    stats.packets_refused += u64::from(from.ip() != remote.addr);
                    continue;
                }
                let Ok((header, body)) = rtp::parse(bytes) else {
                    stats.packets_refused += 1;
                    continue;
                };
                let now = Instant::now();
                last_heard = now;
                stats.packets_received += 1;
                if let Some(expected) = expected_sequence {
                    let ahead = header.sequence.wrapping_sub(expected);
                    if ahead >= 0x8000 {
                        stats.packets_late += 1;
                        continue;
                    }
                    stats.packets_lost += u64::from(ahead);
                }
                expected_sequence = Some(header.sequence.wrapping_add(1));
                if Some(header.payload_type) == remote.telephone_event_pt {
                    if let (Some(receiver), Ok(event)) = (dtmf_in.as_mut(), TelephoneEvent::decode(body)) {
                        receiver.handle_packet(now.duration_since(started).as_millis() as u64, header.timestamp, event);
                        while let Some(received) = receiver.poll_digit() {
                            let _ = reports.send(MediaReport::Digit(received.digit));
                        }
                    }
                } else if header.payload_type == remote.codec_pt && tone.is_empty() {
                    pcm.clear();
                    law(remote.codec).decode_into(body, &mut pcm);
                    let narrow_in: Vec<f32> = pcm.iter().map(|s| to_f32(*s)).collect();
                    wide.clear();
                    upsampler.process(&narrow_in, &mut wide);
                    push_sound(&audio.from_phone, &wide);
                }
            }
            command = commands.recv() => match command {
                None => break,
                Some(Command::Remote(new)) => {
                    if new.addr != remote.addr || new.port != remote.port {
                        expected_sequence = None;
                    }
                    remote = new;
                }
                Some(Command::Dtmf(digits)) => {
                    if remote.telephone_event_pt.is_none() {
                        let _ = reports.send(MediaReport::NoDtmf);
                        continue;
                    }
                    let now_ms = Instant::now().duration_since(started).as_millis() as u64;
                    match DtmfSender::new(digits, 8000, now_ms, sender.timestamp()) {
                        Ok(digits) => dtmf_out = Some(digits),
                        Err(error) => warn!(%error, "key presses not sent"),
                    }
                }
                Some(Command::WarningTone) => tone = warning_tone(),
                Some(Command::WatchInactivity) => {
                    watching = true;
                    last_heard = Instant::now();
                }
            }
        }
    }
    stats
}
