//! One direction of a call in virtual time: a speech signal goes through a
//! [`VoiceSender`], an [`ImpairedLink`] and a [`VoiceReceiver`] whose playout clock ticks
//! every 20 ms, exactly as the real drivers do, but without sockets or waiting. Tests and the
//! voice benchmark use it to measure what the engine alone does under loss and jitter.

use std::time::{Duration, Instant};

use crate::codec::{Backend, CodecError, FRAME_MILLIS, FRAME_SAMPLES, SAMPLE_RATE};
use crate::impairment::{ImpairedLink, Impairment};
use crate::jitter::{JitterConfig, Transport};
use crate::receiver::{ReceiverStats, VoiceReceiver};
use crate::sender::{SenderStats, VoiceSender, TWIN_AFTER};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallSimulation {
    pub backend: Backend,
    pub bitrate: u32,
    pub impairment: Impairment,
    pub seed: u64,
    pub jitter: JitterConfig,
    /// `None`: copies follow the reported loss; `Some(n)`: always `n`.
    pub fixed_redundancy: Option<usize>,
    /// How often the receiver's loss report reaches the sender (the call driver: every 200 ms).
    pub report_every: Duration,
    /// Where in a 20 ms period the playout clock ticks, relative to the sender's.
    pub playout_phase: Duration,
    /// What the receiver is told about the path (a driver knows it from the path in use).
    pub transport: Transport,
}

impl Default for CallSimulation {
    fn default() -> Self {
        Self {
            backend: Backend::OpusPure,
            bitrate: crate::codec::DEFAULT_BITRATE,
            impairment: Impairment::CLEAN,
            seed: 1,
            jitter: JitterConfig::default(),
            fixed_redundancy: None,
            report_every: Duration::from_millis(200),
            playout_phase: Duration::from_millis(3),
            transport: Transport::Datagram,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimulationResult {
    /// What was played, 48 kHz, one frame per playout tick from the first send on.
    pub played: Vec<f32>,
    pub sender: SenderStats,
    /// As the last frame was played.
    pub receiver: ReceiverStats,
    /// Share of packets the link lost.
    pub link_loss: f64,
    /// Mean payload bitrate sent.
    pub bits_per_second: f64,
}

impl CallSimulation {
    /// Sends `speech` (48 kHz mono) and plays it out until everything sent had its chance.
    pub fn run(&self, speech: &[f32]) -> Result<SimulationResult, CodecError> {
        let mut sender = VoiceSender::new(self.backend.encoder(self.bitrate)?);
        sender.fix_redundancy(self.fixed_redundancy);
        let mut receiver = VoiceReceiver::new(self.backend.decoder()?, self.jitter);
        receiver.set_transport(self.transport);
        let mut link = ImpairedLink::new(self.impairment, self.seed);
        let start = Instant::now();
        let frame_time = Duration::from_millis(FRAME_MILLIS);
        let frames = speech.len().div_ceil(FRAME_SAMPLES);
        // Enough ticks to drain the link and the largest jitter buffer.
        let stall = self.impairment.stalls.map_or(Duration::ZERO, |stalls| stalls.hold);
        let tail = (self.impairment.delay + self.impairment.jitter + stall + self.jitter.max_delay).as_millis() as usize
            / FRAME_MILLIS as usize
            + 5;
        let report_ticks = (self.report_every.as_millis() as usize / FRAME_MILLIS as usize).max(1);
        let mut played = Vec::with_capacity((frames + tail) * FRAME_SAMPLES);
        let mut input = vec![0.0f32; FRAME_SAMPLES];
        let mut output = vec![0.0f32; FRAME_SAMPLES];
        // The receiver's statistics once it has played the last frame (after that it waits).
        let mut ended = None;
        for tick in 0..frames + tail {
            // Frame `tick` has been captured by the end of its 20 ms: encode and send it.
            let sent_at = start + frame_time * (tick as u32 + 1);
            if tick < frames {
                let from = tick * FRAME_SAMPLES;
                let available = &speech[from..(from + FRAME_SAMPLES).min(speech.len())];
                input.fill(0.0);
                input[..available.len()].copy_from_slice(available);
                link.send(sent_at, sender.encode(&input)?);
                // As the driver does: no twins into a byte stream, which loses nothing (a twin
                // taken counts as sent).
                if self.transport == Transport::Datagram {
                    if let Some(twin) = sender.take_twin() {
                        link.send(sent_at + TWIN_AFTER, twin);
                    }
                }
            }
            // The playout clock ticks a little later; whatever arrived by then is in.
            let play_at = sent_at + self.playout_phase;
            while let Some((arrived, packet)) = link.deliver(play_at) {
                let _ = receiver.receive(arrived, &packet);
            }
            receiver.play(play_at, &mut output)?;
            played.extend_from_slice(&output);
            if ended.is_none() && tick + 1 >= frames && link.next_delivery().is_none() && receiver.held_frames() == 0 {
                ended = Some(receiver.stats());
            }
            if tick % report_ticks == report_ticks - 1 {
                sender.on_loss_report(receiver.loss_report());
            }
        }
        let sender_stats = sender.stats();
        let seconds = frames as f64 * FRAME_SAMPLES as f64 / f64::from(SAMPLE_RATE);
        Ok(SimulationResult {
            played,
            sender: sender_stats,
            receiver: ended.unwrap_or_else(|| receiver.stats()),
            link_loss: link.loss_rate(),
            bits_per_second: sender_stats.payload_bytes as f64 * 8.0 / seconds.max(f64::EPSILON),
        })
    }
}
