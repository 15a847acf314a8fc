//! Calls in the daemon: the glue between the call signalling state machine (`koe-call`), the
//! overlay's sealed envelopes that carry its signals, and the media driver (`koe-media`).
//! `koe call` places a call and waits for its end; `koe up --auto-answer` answers every call.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use koe_call::{Call, CallEvent, CallId, CallOutput, CallSignal};
use koe_media::driver::{self, CallAudio, CallSummary};
use koe_media::MediaSession;
use koe_overlay::client::SendOutcome;
use koe_types::{UnixTime, Username};
use koe_voice::{codec::DEFAULT_BITRATE, quality, wav, Backend, SAMPLE_RATE};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::{DaemonState, Payload};

/// Without `--duration` and without a file to play, an answered call lasts this long.
const DEFAULT_TALK: Duration = Duration::from_secs(30);

/// `koe up --auto-answer`.
#[derive(Debug, Clone)]
pub struct AutoAnswer {
    pub play: Option<PathBuf>,
    pub record: Option<PathBuf>,
}

/// What the person decides about a ringing call (`koe answer`, `koe decline`).
#[derive(Debug)]
pub enum Decision {
    /// Answer with these files; the call's log goes to `reply` when it ends.
    Answer { play: Option<PathBuf>, record: Option<PathBuf>, reply: oneshot::Sender<Result<String, String>> },
    Decline,
}

/// The calls of this device, by id: where their signals go, and how to hang them up.
#[derive(Debug, Default)]
pub struct Calls {
    /// Per call: the user on the other end (only their signals count) and where they go.
    signals: Mutex<HashMap<CallId, (Username, mpsc::Sender<CallSignal>)>>,
    hangups: Mutex<HashMap<CallId, oneshot::Sender<()>>>,
    /// Calls ringing here, oldest first, with who calls and where the decision goes.
    ringing: Mutex<Vec<(CallId, Username, mpsc::Sender<Decision>)>>,
    pub auto_answer: Option<AutoAnswer>,
}

impl Calls {
    pub fn new(auto_answer: Option<AutoAnswer>) -> Self {
        Self { auto_answer, ..Self::default() }
    }

    fn busy(&self) -> bool {
        self.signals.lock().is_ok_and(|s| !s.is_empty())
    }

    fn register(&self, id: CallId, peer: &Username) -> (mpsc::Receiver<CallSignal>, oneshot::Receiver<()>) {
        let (signal_tx, signal_rx) = mpsc::channel(16);
        let (hangup_tx, hangup_rx) = oneshot::channel();
        if let Ok(mut signals) = self.signals.lock() {
            signals.insert(id, (peer.clone(), signal_tx));
        }
        if let Ok(mut hangups) = self.hangups.lock() {
            hangups.insert(id, hangup_tx);
        }
        (signal_rx, hangup_rx)
    }

    fn forget(&self, id: CallId) {
        if let Ok(mut signals) = self.signals.lock() {
            signals.remove(&id);
        }
        if let Ok(mut hangups) = self.hangups.lock() {
            hangups.remove(&id);
        }
    }

    /// `koe answer` / `koe decline`: hands the decision to the newest ringing call; says who
    /// was calling.
    pub async fn decide(&self, decision: Decision) -> Result<Username, String> {
        let newest = self.ringing.lock().ok().and_then(|mut ringing| ringing.pop());
        let (_, from, decisions) = newest.ok_or("no call is ringing")?;
        decisions.send(decision).await.map_err(|_| "that call has just ended".to_string())?;
        Ok(from)
    }

    /// `koe hangup`: ends every call of this device.
    pub fn hang_up_all(&self) -> usize {
        let Ok(mut hangups) = self.hangups.lock() else { return 0 };
        let count = hangups.len();
        for (_, hangup) in hangups.drain() {
            let _ = hangup.send(());
        }
        count
    }
}

/// A signal from `from` arrived in an envelope.
pub fn on_signal(state: &Arc<DaemonState>, from: Username, signal: CallSignal) {
    if let CallSignal::Offer { .. } = &signal {
        let busy = state.calls.busy();
        let state = Arc::clone(state);
        tokio::spawn(async move { answer_incoming(state, from, signal, busy).await });
        return;
    }
    let sender = state.calls.signals.lock().ok().and_then(|s| s.get(&signal.call()).cloned());
    match sender {
        Some((peer, sender)) if peer == from => {
            let _ = sender.try_send(signal);
        }
        Some(_) => warn!(%from, "a call signal from someone not in that call was ignored"),
        None => {}
    }
}

/// The address this device's media socket uses: the one on the route to the parent supernode
/// (found without sending anything), else loopback.
async fn local_ip(state: &DaemonState) -> IpAddr {
    let parent_ip = state.client.status().await.ok().and_then(|s| s.parent).and_then(|address| {
        address.split('/').nth(2).and_then(|ip| ip.parse::<IpAddr>().ok())
    });
    let Some(parent_ip) = parent_ip else {
        return IpAddr::V4(Ipv4Addr::LOCALHOST);
    };
    match std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| s.connect((parent_ip, 9)).and_then(|()| s.local_addr())) {
        Ok(address) => address.ip(),
        Err(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

async fn media_socket(state: &DaemonState) -> Result<(UdpSocket, MediaSession), String> {
    let socket = UdpSocket::bind(SocketAddr::new(local_ip(state).await, 0))
        .await
        .map_err(|e| format!("cannot open a socket for the call's audio: {e}"))?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let session = MediaSession::new(Instant::now(), &[local]).map_err(|e| e.to_string())?;
    Ok((socket, session))
}

fn microphone(play: Option<&Path>) -> Result<Vec<f32>, String> {
    play.map_or(Ok(Vec::new()), |path| wav::read_mono_48k(path).map_err(|e| e.to_string()))
}

async fn send(state: &DaemonState, to: &Username, signal: CallSignal) -> SendOutcome {
    state.send(to, &Payload::Call { signal }).await
}

/// Carries out what the call wants: signals to the other user, events into `log`. Returns
/// the answer when there is one.
async fn drain(state: &DaemonState, to: &Username, call: &mut Call, log: &mut String) -> Option<(String, koe_media::MediaDescription)> {
    let mut answered = None;
    while let Some(output) = call.poll_output() {
        match output {
            CallOutput::Send(signal) => {
                if let SendOutcome::Undelivered { reason } = send(state, to, signal).await {
                    warn!(%reason, "a call signal was not delivered");
                }
            }
            CallOutput::Event(CallEvent::Ringing) => log.push_str("ringing\n"),
            CallOutput::Event(CallEvent::Incoming) => {}
            CallOutput::Event(CallEvent::Answered { device, remote_media }) => {
                let _ = writeln!(log, "answered (device {device})");
                answered = Some((device, remote_media));
            }
            CallOutput::Event(CallEvent::Ended(reason)) => {
                let _ = writeln!(log, "ended: {reason}");
            }
        }
    }
    answered
}

/// `koe call USER`: rings every device, waits for the answer, talks, hangs up; returns the log.
pub async fn place(
    state: Arc<DaemonState>,
    to: Username,
    play: Option<PathBuf>,
    record: Option<PathBuf>,
    duration: Option<Duration>,
) -> Result<String, String> {
    if to == state.me {
        return Err("you cannot call yourself".into());
    }
    if state.calls.busy() {
        return Err("you are in a call already: koe hangup first".into());
    }
    let microphone = microphone(play.as_deref())?;
    let devices = state.client.lookup(to.clone()).await?.len();
    if devices == 0 {
        return Err(state.absence(&to).await);
    }
    let (socket, mut session) = media_socket(&state).await?;
    let id = CallId(u128::from(rand_core::RngCore::next_u64(&mut rand_core::OsRng)) << 64 | u128::from(rand_core::RngCore::next_u64(&mut rand_core::OsRng)));
    let (mut signals, hangup) = state.calls.register(id, &to);
    let dialed = Instant::now();
    let mut log = format!("calling {to} ({devices} device(s) online)…\n");
    let mut call = Call::dial(id, state.device.clone(), session.local_description(), devices, dialed, UnixTime::now().as_secs());
    tokio::pin!(hangup);
    let answered = loop {
        if let Some(answer) = drain(&state, &to, &mut call, &mut log).await {
            break Some(answer);
        }
        if call.is_over() {
            break None;
        }
        let timeout = call.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            Some(signal) = signals.recv() => call.handle_signal(signal),
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(timeout)) => call.handle_timeout(Instant::now()),
            _ = &mut hangup => call.hang_up(),
        }
    };
    let result = match answered {
        Some((_, remote_media)) => {
            let _ = writeln!(log, "answered after {} ms", dialed.elapsed().as_millis());
            let talk = duration.unwrap_or_else(|| {
                if microphone.is_empty() { DEFAULT_TALK } else { Duration::from_secs_f64(microphone.len() as f64 / f64::from(SAMPLE_RATE)) + Duration::from_millis(500) }
            });
            talk_until_done(&state, &to, &mut call, session, socket, &remote_media, true, microphone, record.as_deref(), talk, &mut signals, hangup, &mut log).await
        }
        None => Ok(()),
    };
    state.calls.forget(id);
    result.map(|()| log)
}

/// Runs the media of an answered call until a hang-up (either side), the talk time, or a
/// failure; then ends the call, writes the recording and appends the summary to `log`.
#[allow(clippy::too_many_arguments)]
async fn talk_until_done(
    state: &DaemonState,
    to: &Username,
    call: &mut Call,
    mut session: MediaSession,
    socket: UdpSocket,
    remote_media: &koe_media::MediaDescription,
    caller: bool,
    microphone: Vec<f32>,
    record: Option<&Path>,
    talk: Duration,
    signals: &mut mpsc::Receiver<CallSignal>,
    hangup: impl std::future::Future<Output = Result<(), oneshot::error::RecvError>>,
    log: &mut String,
) -> Result<(), String> {
    session.start(remote_media, caller).map_err(|e| format!("the other side's media offer is unusable: {e}"))?;
    let audio = CallAudio { backend: Backend::OpusPure, bitrate: DEFAULT_BITRATE, microphone };
    let (stop_media, media_stopped) = oneshot::channel::<()>();
    let mut media = tokio::spawn(driver::run(session, socket, audio, async move {
        let _ = media_stopped.await;
    }));
    let mut stop_media = Some(stop_media);
    let talk_over = tokio::time::sleep(talk);
    tokio::pin!(talk_over, hangup);
    let summary = loop {
        tokio::select! {
            joined = &mut media => {
                break joined.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            }
            Some(signal) = signals.recv() => call.handle_signal(signal),
            () = &mut talk_over, if stop_media.is_some() => call.hang_up(),
            _ = &mut hangup, if stop_media.is_some() => call.hang_up(),
        }
        drain(state, to, call, log).await;
        if call.is_over() {
            if let Some(stop) = stop_media.take() {
                let _ = stop.send(());
            }
        }
    };
    if let Some(reason) = &summary.failure {
        call.media_failed(reason);
    } else if !call.is_over() {
        call.hang_up();
    }
    drain(state, to, call, log).await;
    if let Some(path) = record {
        wav::write_mono(path, &summary.recording, SAMPLE_RATE).map_err(|e| e.to_string())?;
    }
    log.push_str(&summary_text(&summary, record));
    Ok(())
}

/// An offer arrived: busy, stale, answered at once (`--auto-answer`), or ringing until the
/// person answers or declines (`koe answer`, `koe decline`) or the caller gives up.
async fn answer_incoming(state: Arc<DaemonState>, from: Username, offer: CallSignal, busy: bool) {
    let CallSignal::Offer { call: id, media: remote_media, .. } = &offer else { return };
    let Some(mut call) = Call::incoming(&offer, state.device.clone(), busy, Instant::now(), UnixTime::now().as_secs()) else {
        warn!(%from, "a stale or replayed call offer was ignored");
        return;
    };
    let mut log = format!("call from {from}\n");
    if busy {
        drain(&state, &from, &mut call, &mut log).await;
        info!(%from, "call refused: busy in another call");
        return;
    }
    let (mut signals, hangup) = state.calls.register(*id, &from);
    drain(&state, &from, &mut call, &mut log).await;
    let result = match state.calls.auto_answer.clone() {
        Some(auto) => answer_now(&state, &from, &mut call, remote_media, auto, &mut signals, hangup, &mut log).await,
        None => ring(&state, &from, &mut call, *id, remote_media, &mut signals, hangup, &mut log).await,
    };
    state.calls.forget(*id);
    match result {
        Ok(()) => info!("{}", log.trim_end().replace('\n', "; ")),
        Err(error) => warn!(%from, %error, "the call failed"),
    }
}

/// Rings until a decision, the caller's cancel, or the timeout.
#[allow(clippy::too_many_arguments)]
async fn ring(
    state: &DaemonState,
    from: &Username,
    call: &mut Call,
    id: CallId,
    remote_media: &koe_media::MediaDescription,
    signals: &mut mpsc::Receiver<CallSignal>,
    hangup: oneshot::Receiver<()>,
    log: &mut String,
) -> Result<(), String> {
    info!(%from, "incoming call: koe answer or koe decline");
    let (decisions_tx, mut decisions) = mpsc::channel(1);
    if let Ok(mut ringing) = state.calls.ringing.lock() {
        ringing.push((id, from.clone(), decisions_tx));
    }
    let mut answer = None;
    while !call.is_over() && answer.is_none() {
        let timeout = call.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            Some(signal) = signals.recv() => call.handle_signal(signal),
            Some(decision) = decisions.recv() => match decision {
                Decision::Answer { play, record, reply } => answer = Some((AutoAnswer { play, record }, reply)),
                Decision::Decline => {
                    let _ = call.decline();
                }
            },
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(timeout)) => call.handle_timeout(Instant::now()),
        }
        drain(state, from, call, log).await;
    }
    if let Ok(mut ringing) = state.calls.ringing.lock() {
        ringing.retain(|(ringing_id, _, _)| *ringing_id != id);
    }
    let Some((files, reply)) = answer else {
        return Ok(());
    };
    let result = answer_now(state, from, call, remote_media, files, signals, hangup, log).await;
    let _ = reply.send(result.clone().map(|()| log.clone()));
    result
}

#[allow(clippy::too_many_arguments)]
async fn answer_now(
    state: &DaemonState,
    from: &Username,
    call: &mut Call,
    remote_media: &koe_media::MediaDescription,
    auto: AutoAnswer,
    signals: &mut mpsc::Receiver<CallSignal>,
    hangup: oneshot::Receiver<()>,
    log: &mut String,
) -> Result<(), String> {
    let microphone = microphone(auto.play.as_deref())?;
    let (socket, mut session) = media_socket(state).await?;
    call.answer(session.local_description()).map_err(str::to_string)?;
    drain(state, from, call, log).await;
    // The caller decides how long the call lasts; this is only a bound.
    let talk = Duration::from_secs(4 * 3600);
    talk_until_done(state, from, call, session, socket, remote_media, false, microphone, auto.record.as_deref(), talk, signals, hangup, log).await
}

/// The summary printed after a call and logged by the callee.
fn summary_text(summary: &CallSummary, record: Option<&Path>) -> String {
    let jitter = summary.receiver.jitter;
    let mouth_to_ear = Duration::from_millis(20) + jitter.playout_delay;
    let mut out = String::new();
    let _ = writeln!(out, "talked {:.1} s", summary.talked.as_secs_f64());
    let _ = writeln!(
        out,
        "received {} frames: {:.1} % lost on the way, {:.2} % after recovery ({} from copies, {} from FEC, {} concealed)",
        jitter.frames,
        jitter.loss_before_recovery * 100.0,
        jitter.loss_after_recovery() * 100.0,
        jitter.from_copies,
        jitter.from_fec,
        jitter.concealed
    );
    let _ = writeln!(out, "jitter buffer {} ms; copies sent {}", jitter.target_delay.as_millis(), summary.sender.redundancy);
    let _ = writeln!(out, "MOS (E-model estimate) {:.2}", quality::mos(mouth_to_ear, jitter.loss_after_recovery()));
    if let Some(path) = record {
        let _ = writeln!(out, "recording: {}", path.display());
    }
    out
}
