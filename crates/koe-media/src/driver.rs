//! The thin async driver of one call's media: a UDP socket, the [`MediaSession`], the voice
//! engine and a 20 ms clock. From the moment media connects, it sends the microphone (samples
//! given up front, played in real time; a sound device's queue; or an echo test) and records
//! every frame it plays out, silence included, on the playout clock, so that mouth-to-ear
//! delay can be measured by aligning the recording with what the other side sent; with a
//! speaker queue, what it plays also goes to a sound device. Between a cone and a symmetric
//! NAT it also does the sending and receiving of port guessing ([`crate::punch`]).

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use koe_voice::jitter::LossReport;
use koe_voice::sender::TWIN_AFTER;
use koe_voice::{Backend, JitterConfig, ReceiverStats, SenderStats, Transport, VoiceReceiver, VoiceSender, FRAME_SAMPLES, SAMPLE_RATE};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use crate::punch::{is_punch, PortGuess, PortGuesser, Punches, MAPPING_SOCKETS, PUNCH};
use crate::relay::AllocationState;

use crate::{MediaError, MediaOutput, MediaPath, MediaSession};

const FRAME: Duration = Duration::from_millis(20);
/// Path changes this early after media connected are ICE settling, not moves worth reporting.
const ICE_SETTLING: Duration = Duration::from_secs(1);
/// Loss reports to the other side, and live statistics, every 200 ms: the first report reaches
/// the sender while the call's first words are spoken (until then it sends a copy of each
/// frame), and a report is 21 bytes in SRTCP, a tenth of a voice packet.
const REPORT_EVERY_FRAMES: u64 = 10;
/// The echo test's tone: before it listens and before it plays back.
const ECHO_TONE: Duration = Duration::from_millis(400);
const ECHO_TONE_HZ: f32 = 660.0;

/// The most a sound queue holds: older samples are dropped so the delay stays low.
const SOUND_QUEUE_SAMPLES: usize = 3 * FRAME_SAMPLES;

/// 48 kHz mono samples shared with a sound device: its callback fills the microphone's and
/// drains the speaker's.
pub type SoundQueue = Arc<Mutex<VecDeque<f32>>>;

/// Appends `samples` to `queue`, dropping the oldest beyond [`SOUND_QUEUE_SAMPLES`].
pub fn push_sound(queue: &SoundQueue, samples: &[f32]) {
    if let Ok(mut queue) = queue.lock() {
        queue.extend(samples);
        let excess = queue.len().saturating_sub(SOUND_QUEUE_SAMPLES);
        queue.drain(..excess);
    }
}

/// Fills `out` from the front of `queue`, silence where it runs short.
pub fn pull_sound(queue: &SoundQueue, out: &mut [f32]) {
    out.fill(0.0);
    if let Ok(mut queue) = queue.lock() {
        let n = out.len().min(queue.len());
        for (sample, queued) in out.iter_mut().zip(queue.drain(..n)) {
            *sample = queued;
        }
    }
}

#[derive(Debug, Clone)]
pub struct CallAudio {
    pub backend: Backend,
    pub bitrate: u32,
    pub microphone: Microphone,
    /// Where played frames go besides the recording (a sound device).
    pub speaker: Option<SoundQueue>,
}

/// What this side sends, in real time from the moment media connects.
#[derive(Debug, Clone)]
pub enum Microphone {
    /// These 48 kHz mono samples, then silence.
    Samples(Vec<f32>),
    /// An echo test, like Skype's echo123: a tone, `listen` of silence while the other side
    /// speaks, a tone, then what was heard in that time, played back.
    EchoBack { listen: Duration },
    /// A sound device's capture, as it comes.
    Device(SoundQueue),
}

impl Microphone {
    /// How long it has something to send.
    pub fn length(&self) -> Duration {
        match self {
            Self::Samples(samples) => Duration::from_secs_f64(samples.len() as f64 / f64::from(SAMPLE_RATE)),
            Self::EchoBack { listen } => 2 * ECHO_TONE + 2 * *listen,
            Self::Device(_) => Duration::ZERO,
        }
    }

    /// Fills `frame` with what to send as frame number `index`; `heard` is the recording so far.
    fn fill(&self, index: usize, heard: &[f32], frame: &mut [f32]) {
        frame.fill(0.0);
        let start = index * FRAME_SAMPLES;
        match self {
            Self::Samples(samples) => copy_from(samples, start, frame),
            Self::Device(queue) => pull_sound(queue, frame),
            Self::EchoBack { listen } => {
                let tone = samples_in(ECHO_TONE);
                let listen = samples_in(*listen);
                if start < tone || (tone + listen..2 * tone + listen).contains(&start) {
                    let phase_start = if start < tone { start } else { start - tone - listen };
                    for (i, sample) in frame.iter_mut().enumerate() {
                        let t = (phase_start + i) as f32 / SAMPLE_RATE as f32;
                        *sample = 0.25 * (std::f32::consts::TAU * ECHO_TONE_HZ * t).sin();
                    }
                } else if start >= 2 * tone + listen {
                    copy_from(&heard[..heard.len().min(tone + listen)], start - tone - listen, frame);
                }
            }
        }
    }
}

fn samples_in(duration: Duration) -> usize {
    (duration.as_secs_f64() * f64::from(SAMPLE_RATE)) as usize
}

/// Copies what `source` has from `start` on into `frame` (the rest stays as it is).
fn copy_from(source: &[f32], start: usize, frame: &mut [f32]) {
    let start = start.min(source.len());
    let end = (start + frame.len()).min(source.len());
    frame[..end - start].copy_from_slice(&source[start..end]);
}

/// What the call's owner can change and read while media runs.
#[derive(Debug, Clone, Default)]
pub struct MediaControls {
    /// While set, silence is sent instead of the microphone.
    pub muted: Arc<AtomicBool>,
    /// Updated once a second.
    pub live: Arc<Mutex<MediaStats>>,
    /// The Opus encoder's complexity, 0–10, when not the voice engine's default (9): a PSTN
    /// gateway carrying many calls goes low (docs/BENCHMARKS.md, the gateway's transcoding).
    pub encoder_complexity: Option<u8>,
}

/// Statistics of one call's media, live and at its end.
#[derive(Debug, Clone, Default)]
pub struct MediaStats {
    /// From the start of the driver until ICE and DTLS were up.
    pub connected_after: Option<Duration>,
    /// How long media flowed.
    pub talked: Duration,
    pub path: Option<MediaPath>,
    /// Every time the call moved to another path (a relay on it died, or a better one came up).
    pub path_moves: Vec<PathMove>,
    pub rtt: Option<Duration>,
    pub sender: SenderStats,
    pub receiver: ReceiverStats,
    /// Packets of the other side's stream that failed SRTP authentication (or were replayed
    /// or malformed) and were dropped.
    pub rejected_packets: u64,
    /// Frames this side dropped before they went into a relay stream that fell behind (the
    /// oldest voice first).
    pub stream_frames_dropped: u64,
}

/// The call's media moved from one path to another, this far into the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathMove {
    pub after: Duration,
    pub from: MediaPath,
    pub to: MediaPath,
}

/// How the call went, for the summary and the history.
#[derive(Debug, Clone)]
pub struct CallSummary {
    /// Everything played out from the moment media connected (48 kHz mono).
    pub recording: Vec<f32>,
    pub stats: MediaStats,
    /// Why media ended: `None` when the caller of [`run`] stopped it.
    pub failure: Option<String>,
}

/// A byte stream to a relay node: TCP, or TLS over TCP, perhaps through an HTTP proxy.
pub trait RelayStreamIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> RelayStreamIo for T {}

/// The call's streams to relay nodes, each with a task that reads it and writes to it. What
/// waits to be written is bounded, and the oldest voice goes first when a stream falls behind
/// (the relay node's own queue, [`koe_relay::send_queue`]: voice is worth nothing late).
#[derive(Debug)]
pub struct RelayStreams {
    writers: std::collections::HashMap<usize, koe_relay::send_queue::SendQueueSender>,
    events: mpsc::Receiver<(usize, Option<Vec<u8>>)>,
    events_sender: mpsc::Sender<(usize, Option<Vec<u8>>)>,
    frames_dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for RelayStreams {
    fn default() -> Self {
        let (events_sender, events) = mpsc::channel(1024);
        Self { writers: Default::default(), events, events_sender, frames_dropped: Arc::default() }
    }
}

impl RelayStreams {
    /// Carries relay `relay`'s stream (the index [`MediaSession::add_relay`] gave). The TCP
    /// socket under it should have been through
    /// [`koe_relay::send_queue::limit_kernel_send_buffering`], so that a slow path's backlog
    /// waits in the queue, where the oldest voice can be dropped, not in the kernel.
    pub fn add(&mut self, relay: usize, stream: impl RelayStreamIo) {
        let limits = koe_relay::send_queue::SendQueueLimits::default();
        let (writer, writes) = koe_relay::send_queue::channel(limits, Arc::clone(&self.frames_dropped));
        self.writers.insert(relay, writer);
        let events = self.events_sender.clone();
        tokio::spawn(async move {
            let (mut reader, mut writer) = tokio::io::split(stream);
            let writing = async {
                while let Some(bytes) = writes.recv().await {
                    // Flushed write by write (TLS would buffer), so a slow stream's backlog
                    // waits in the queue, where the oldest voice is dropped.
                    if writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err() {
                        return;
                    }
                }
            };
            let reading = async {
                let mut buffer = vec![0u8; 4096];
                loop {
                    match reader.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if events.send((relay, Some(buffer[..n].to_vec()))).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            };
            tokio::select! {
                () = writing => {}
                () = reading => {}
            }
            let _ = events.send((relay, None)).await;
        });
    }

    fn write(&self, relay: usize, bytes: Vec<u8>) {
        if let Some(writer) = self.writers.get(&relay) {
            writer.send(bytes);
        }
    }

    /// Frames dropped so far because a stream fell behind (the oldest voice first).
    pub fn frames_dropped(&self) -> u64 {
        self.frames_dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The next piece read from a stream (`None` bytes: it closed). Pends forever without streams.
    async fn next(&mut self) -> (usize, Option<Vec<u8>>) {
        match self.events.recv().await {
            Some(event) => event,
            None => std::future::pending().await,
        }
    }
}

/// Port guessing under way ([`crate::punch`]): the mapping sockets of a symmetric side, each
/// read by a task, or a cone side's probes from the media socket; once a mapping socket hears
/// the other side it is the only one kept, and the call's host candidate.
struct PortGuessing {
    guesser: PortGuesser,
    sockets: Vec<Arc<UdpSocket>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    arrivals: mpsc::Receiver<(usize, SocketAddr, Vec<u8>)>,
    /// The mapping socket that reached the other side.
    kept: Option<(SocketAddr, Arc<UdpSocket>)>,
}

impl PortGuessing {
    /// Opens the mapping sockets (symmetric side) on `ip`, the media socket's.
    fn start(guess: PortGuess, ip: std::net::IpAddr) -> Self {
        let (arrivals_sender, arrivals) = mpsc::channel(64);
        let mut guessing = Self { guesser: PortGuesser::new(guess, Instant::now()), sockets: Vec::new(), readers: Vec::new(), arrivals, kept: None };
        if let PortGuess::OpenMappings { .. } = guess {
            for index in 0..MAPPING_SOCKETS {
                let Some(socket) = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))
                    .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
                    .ok()
                    .and_then(|socket| UdpSocket::from_std(socket).ok())
                else {
                    break; // Out of sockets: guess with fewer.
                };
                let socket = Arc::new(socket);
                let (reader_socket, arrivals) = (Arc::clone(&socket), arrivals_sender.clone());
                guessing.readers.push(tokio::spawn(async move {
                    let mut buffer = vec![0u8; 2048];
                    while let Ok((n, from)) = reader_socket.recv_from(&mut buffer).await {
                        if arrivals.send((index, from, buffer[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                }));
                guessing.sockets.push(socket);
            }
        }
        guessing
    }

    /// Sends the punches due now.
    async fn send_due(&mut self, media_socket: &UdpSocket) {
        if self.kept.is_some() {
            return;
        }
        let random = || {
            let mut bytes = [0u8; 2];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
            u16::from_le_bytes(bytes)
        };
        match self.guesser.poll(Instant::now(), random) {
            Some(Punches::FromEveryMappingSocket { to }) => {
                for socket in &self.sockets {
                    let _ = socket.send_to(PUNCH, to).await;
                }
            }
            Some(Punches::FromMediaSocket { to }) => {
                for to in to {
                    let _ = media_socket.send_to(PUNCH, to).await;
                }
            }
            None => {}
        }
        if self.guesser.is_over(Instant::now()) {
            self.stop_unless_kept();
        }
    }

    /// When to send next, while guessing.
    fn wake(&self) -> Option<Instant> {
        (self.kept.is_none() && !self.guesser.is_over(Instant::now())).then(|| self.guesser.next_send())
    }

    /// A datagram on mapping socket `index`: from the other side's public IP, it is the hit.
    /// Returns the socket's address when it becomes the kept one.
    fn arrived(&mut self, index: usize, from: SocketAddr) -> Option<SocketAddr> {
        let PortGuess::OpenMappings { toward } = self.guesser.guess else { return None };
        if self.kept.is_some() || from.ip() != toward.ip() {
            return None;
        }
        let socket = Arc::clone(self.sockets.get(index)?);
        let local = socket.local_addr().ok()?;
        self.kept = Some((local, socket));
        for (other, reader) in self.readers.iter().enumerate() {
            if other != index {
                reader.abort();
            }
        }
        self.sockets.clear();
        Some(local)
    }

    fn stop_unless_kept(&mut self) {
        if self.kept.is_none() {
            for reader in &self.readers {
                reader.abort();
            }
            self.sockets.clear();
        }
    }

    /// The kept socket, if `source` is its address.
    fn socket_for(&self, source: SocketAddr) -> Option<&UdpSocket> {
        self.kept.as_ref().filter(|(local, _)| *local == source).map(|(_, socket)| socket.as_ref())
    }

    async fn next_arrival(guessing: &mut Option<Self>) -> (usize, SocketAddr, Vec<u8>) {
        match guessing.as_mut() {
            Some(guessing) => match guessing.arrivals.recv().await {
                Some(arrival) => arrival,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

impl Drop for PortGuessing {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

/// Feeds a datagram or stream piece to the session.
fn deliver_stream_event(session: &mut MediaSession, (relay, bytes): (usize, Option<Vec<u8>>)) {
    match bytes {
        Some(bytes) => session.receive_stream(Instant::now(), relay, &bytes),
        None => session.stream_closed(relay),
    }
}

/// Lets the session's relay allocations finish (or fail) before its description is sent, so
/// the relayed candidates are in it; gives up on those not ready by `deadline`.
pub async fn gather_relays(session: &mut MediaSession, socket: &UdpSocket, streams: &mut RelayStreams, deadline: Instant) {
    let local = socket.local_addr().ok();
    let mut buffer = vec![0u8; 2048];
    loop {
        let wake = loop {
            match session.poll(Instant::now()) {
                MediaOutput::Transmit { destination, datagram, .. } => {
                    let _ = socket.send_to(&datagram, destination).await;
                }
                MediaOutput::StreamWrite { relay, bytes } => streams.write(relay, bytes),
                MediaOutput::WaitUntil(at) => break at,
                // Nothing else happens before the session starts.
                _ => {}
            }
        };
        let pending = session.relay_states().iter().any(|(_, _, state)| *state == AllocationState::Allocating);
        if !pending || Instant::now() >= deadline {
            return;
        }
        tokio::select! {
            received = socket.recv_from(&mut buffer) => {
                if let (Ok((n, from)), Some(local)) = (received, local) {
                    session.receive(Instant::now(), from, local, &buffer[..n]);
                }
            }
            event = streams.next() => deliver_stream_event(session, event),
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake.min(deadline))) => {}
        }
    }
}

/// Ends the session's allocations on relays reached over UDP (see
/// [`MediaSession::release_relays`]), from `socket`, without waiting.
pub fn release_relays(session: &mut MediaSession, socket: &UdpSocket) {
    for (relay, datagram) in session.release_relays(Instant::now()) {
        let _ = socket.try_send_to(&datagram, relay);
    }
}

/// Runs the media of one call until `stop` completes or the path fails.
pub async fn run(
    mut session: MediaSession,
    socket: UdpSocket,
    mut streams: RelayStreams,
    audio: CallAudio,
    controls: MediaControls,
    stop: impl Future<Output = ()>,
) -> Result<CallSummary, MediaError> {
    let local: SocketAddr = socket.local_addr().map_err(|e| MediaError::Engine(e.to_string()))?;
    let mut encoder = audio.backend.encoder(audio.bitrate).map_err(|e| MediaError::Engine(e.to_string()))?;
    if let Some(complexity) = controls.encoder_complexity {
        encoder.set_complexity(complexity);
    }
    let mut sender = VoiceSender::new(encoder);
    let mut receiver =
        VoiceReceiver::new(audio.backend.decoder().map_err(|e| MediaError::Engine(e.to_string()))?, JitterConfig::default());
    let started = Instant::now();
    let mut connected: Option<Instant> = None;
    let mut failure = None;
    let (mut path, mut rtt) = (None, None);
    let mut path_moves = Vec::new();
    let mut recording = Vec::new();
    let mut frames_sent = 0u64;
    let mut frame = vec![0.0f32; FRAME_SAMPLES];
    let mut played = vec![0.0f32; FRAME_SAMPLES];
    let mut buffer = vec![0u8; 2048];
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut guessing = session.port_guess().map(|guess| PortGuessing::start(guess, local.ip()));
    // The twin of the last voice packet, and when it is due (the sender sends packets twice
    // at the start of a call and on heavy random loss, see `VoiceSender::take_twin`).
    let mut twin: Option<(Instant, Vec<u8>)> = None;
    tokio::pin!(stop);
    'call: loop {
        if let Some(guessing) = guessing.as_mut() {
            guessing.send_due(&socket).await;
        }
        if twin.as_ref().is_some_and(|(due, _)| *due <= Instant::now()) {
            if let Some((_, payload)) = twin.take() {
                session.send_voice_twin(Instant::now(), &payload)?;
            }
        }
        // Carry out everything the session wants now.
        let wake = loop {
            match session.poll(Instant::now()) {
                MediaOutput::Transmit { source, destination, datagram } => {
                    let from = guessing.as_ref().and_then(|guessing| guessing.socket_for(source)).unwrap_or(&socket);
                    let _ = from.send_to(&datagram, destination).await;
                }
                MediaOutput::StreamWrite { relay, bytes } => streams.write(relay, bytes),
                MediaOutput::Voice { payload, arrived } => {
                    let _ = receiver.receive(arrived, &payload);
                }
                MediaOutput::LossReport(report) => {
                    // A byte stream on either side's leg makes what arrives here come in bursts.
                    receiver.set_transport(if report.stream_leg || session.on_stream_leg() { Transport::Stream } else { Transport::Datagram });
                    sender.on_loss_report(report);
                }
                MediaOutput::PathStats { path: now_path, rtt: now_rtt } => {
                    if let (Some(from), Some(to), Some(connected)) = (path, now_path, connected) {
                        // In its first second ICE is still settling on the best pair.
                        if from != to && connected.elapsed() >= ICE_SETTLING {
                            path_moves.push(PathMove { after: connected.elapsed(), from, to });
                        }
                    }
                    path = now_path.or(path);
                    rtt = now_rtt.or(rtt);
                }
                MediaOutput::Connected => connected = Some(Instant::now()),
                MediaOutput::Failed { reason } => {
                    failure = Some(reason);
                    break 'call;
                }
                MediaOutput::WaitUntil(at) => break at,
            }
        };
        let wake = guessing.as_ref().and_then(PortGuessing::wake).map_or(wake, |guess| guess.min(wake));
        let wake = twin.as_ref().map_or(wake, |(due, _)| wake.min(*due));
        tokio::select! {
            received = socket.recv_from(&mut buffer) => {
                if let Ok((n, from)) = received {
                    session.receive(Instant::now(), from, local, &buffer[..n]);
                }
            }
            event = streams.next() => deliver_stream_event(&mut session, event),
            (index, from, datagram) = PortGuessing::next_arrival(&mut guessing) => {
                let Some(guessing) = guessing.as_mut() else { continue };
                if let Some(hit) = guessing.arrived(index, from) {
                    session.add_host_candidate(hit)?;
                }
                if let Some((kept, _)) = guessing.kept.as_ref().filter(|_| !is_punch(&datagram)) {
                    session.receive(Instant::now(), from, *kept, &datagram);
                }
            }
            _ = tick.tick(), if connected.is_some() => {
                let now = Instant::now();
                audio.microphone.fill(frames_sent as usize, &recording, &mut frame);
                if controls.muted.load(Ordering::Relaxed) {
                    frame.fill(0.0);
                }
                let payload = sender.encode(&frame).map_err(|e| MediaError::Engine(e.to_string()))?;
                session.send_voice(now, &payload)?;
                // Nothing is lost on a byte stream: a twin would only queue behind its first.
                twin = if session.on_stream_leg() { None } else { sender.take_twin().map(|payload| (now + TWIN_AFTER, payload)) };
                frames_sent += 1;
                receiver.play(now, &mut played).map_err(|e| MediaError::Engine(e.to_string()))?;
                recording.extend_from_slice(&played);
                if let Some(speaker) = &audio.speaker {
                    push_sound(speaker, &played);
                }
                if frames_sent.is_multiple_of(REPORT_EVERY_FRAMES) {
                    session.send_loss_report(LossReport { stream_leg: session.on_stream_leg(), ..receiver.loss_report() });
                    if let Ok(mut live) = controls.live.lock() {
                        *live = stats(&session, &sender, &receiver, started, connected, path, rtt);
                        live.path_moves.clone_from(&path_moves);
                        live.stream_frames_dropped = streams.frames_dropped();
                    }
                }
            }
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
            () = &mut stop => break 'call,
        }
    }
    release_relays(&mut session, &socket);
    let mut stats = stats(&session, &sender, &receiver, started, connected, path, rtt);
    stats.path_moves = path_moves;
    stats.stream_frames_dropped = streams.frames_dropped();
    if let Ok(mut live) = controls.live.lock() {
        *live = stats.clone();
    }
    Ok(CallSummary { recording, stats, failure })
}

fn stats(
    session: &MediaSession,
    sender: &VoiceSender,
    receiver: &VoiceReceiver,
    started: Instant,
    connected: Option<Instant>,
    path: Option<MediaPath>,
    rtt: Option<Duration>,
) -> MediaStats {
    MediaStats {
        connected_after: connected.map(|at| at - started),
        talked: connected.map_or(Duration::ZERO, |at| at.elapsed()),
        path,
        path_moves: Vec::new(),
        rtt,
        sender: sender.stats(),
        receiver: receiver.stats(),
        rejected_packets: session.rejected_packets(),
        // What the streams dropped: the caller adds it, as the path's moves.
        stream_frames_dropped: 0,
    }
}
