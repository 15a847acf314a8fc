//! The thin async driver of one call's media: a UDP socket, the [`MediaSession`], the voice
//! engine and a 20 ms clock. From the moment media connects, it sends the microphone (here:
//! samples given up front, played in real time, silence after them) and records every frame
//! it plays out, silence included, on the playout clock, so that mouth-to-ear delay can be
//! measured by aligning the recording with what the other side sent.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use koe_voice::{Backend, JitterConfig, ReceiverStats, SenderStats, VoiceReceiver, VoiceSender, FRAME_SAMPLES};
use tokio::net::UdpSocket;
use tokio::time::MissedTickBehavior;

use crate::{MediaError, MediaOutput, MediaSession};

const FRAME: Duration = Duration::from_millis(20);
/// Loss reports to the other side, and live statistics, once a second.
const REPORT_EVERY_FRAMES: u64 = 50;

#[derive(Debug, Clone)]
pub struct CallAudio {
    pub backend: Backend,
    pub bitrate: u32,
    /// 48 kHz mono samples sent as the microphone, in real time from the moment media connects.
    pub microphone: Vec<f32>,
}

/// How the call went, for the summary and the history.
#[derive(Debug, Clone)]
pub struct CallSummary {
    /// Everything played out from the moment media connected (48 kHz mono).
    pub recording: Vec<f32>,
    /// From the start of the driver until ICE and DTLS were up.
    pub connected_after: Option<Duration>,
    /// How long media flowed.
    pub talked: Duration,
    pub sender: SenderStats,
    pub receiver: ReceiverStats,
    /// Why media ended: `None` when the caller of [`run`] stopped it.
    pub failure: Option<String>,
}

/// Runs the media of one call until `stop` completes or the path fails.
pub async fn run(
    mut session: MediaSession,
    socket: UdpSocket,
    audio: CallAudio,
    stop: impl Future<Output = ()>,
) -> Result<CallSummary, MediaError> {
    let local: SocketAddr = socket.local_addr().map_err(|e| MediaError::Engine(e.to_string()))?;
    let mut sender = VoiceSender::new(audio.backend.encoder(audio.bitrate).map_err(|e| MediaError::Engine(e.to_string()))?);
    let mut receiver =
        VoiceReceiver::new(audio.backend.decoder().map_err(|e| MediaError::Engine(e.to_string()))?, JitterConfig::default());
    let started = Instant::now();
    let mut connected: Option<Instant> = None;
    let mut failure = None;
    let mut recording = Vec::new();
    let mut frames_sent = 0u64;
    let mut frame = vec![0.0f32; FRAME_SAMPLES];
    let mut played = vec![0.0f32; FRAME_SAMPLES];
    let mut buffer = vec![0u8; 2048];
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(stop);
    'call: loop {
        // Carry out everything the session wants now.
        let wake = loop {
            match session.poll(Instant::now()) {
                MediaOutput::Transmit { destination, datagram, .. } => {
                    let _ = socket.send_to(&datagram, destination).await;
                }
                MediaOutput::Voice { payload, arrived } => {
                    let _ = receiver.receive(arrived, &payload);
                }
                MediaOutput::LossReport(report) => sender.on_loss_report(report),
                MediaOutput::Connected => connected = Some(Instant::now()),
                MediaOutput::Failed { reason } => {
                    failure = Some(reason);
                    break 'call;
                }
                MediaOutput::WaitUntil(at) => break at,
            }
        };
        tokio::select! {
            received = socket.recv_from(&mut buffer) => {
                if let Ok((n, from)) = received {
                    session.receive(Instant::now(), from, local, &buffer[..n]);
                }
            }
            _ = tick.tick(), if connected.is_some() => {
                let now = Instant::now();
                let start = (frames_sent as usize * FRAME_SAMPLES).min(audio.microphone.len());
                let end = (start + FRAME_SAMPLES).min(audio.microphone.len());
                frame.fill(0.0);
                frame[..end - start].copy_from_slice(&audio.microphone[start..end]);
                let payload = sender.encode(&frame).map_err(|e| MediaError::Engine(e.to_string()))?;
                session.send_voice(now, &payload)?;
                frames_sent += 1;
                receiver.play(now, &mut played).map_err(|e| MediaError::Engine(e.to_string()))?;
                recording.extend_from_slice(&played);
                if frames_sent.is_multiple_of(REPORT_EVERY_FRAMES) {
                    session.send_loss_report(receiver.loss_report());
                }
            }
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
            () = &mut stop => break 'call,
        }
    }
    Ok(CallSummary {
        recording,
        connected_after: connected.map(|at| at - started),
        talked: connected.map_or(Duration::ZERO, |at| at.elapsed()),
        sender: sender.stats(),
        receiver: receiver.stats(),
        failure,
    })
}
