//! The voice engine under loss and jitter, in virtual time: for each network condition, a
//! speech file goes through the sender, a seeded impaired link and the receiver (real Opus,
//! the real jitter buffer), once with Koe's adaptive copies and once with in-band FEC alone.
//! Writes the 16 kHz reference and every received signal as WAV files for PESQ
//! (bench/voice.sh scores them) and prints one JSON line per run.
//!
//!   voice_quality --speech FILE.wav --out DIR [--bitrate 32000] [--seed 1] [--only CONDITION]
//!
//! `--only` runs the conditions whose name contains it. `KOE_LOG_FILTER=koe_voice=debug` prints
//! every change of the playout delay on stderr (the frame numbers are the timeline, 50 a second,
//! counted from 2^32: the buffer unwraps the 32-bit numbers of the wire).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use koe_voice::impairment::{Impairment, LossModel, Stalls};
use koe_voice::simulate::CallSimulation;
use koe_voice::{wav, Transport};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut speech_path = None;
    let mut out = PathBuf::from("voice-bench");
    let mut bitrate = koe_voice::codec::DEFAULT_BITRATE;
    let mut seed = 1;
    let mut only = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--speech" => speech_path = Some(PathBuf::from(value)),
            "--out" => out = PathBuf::from(value),
            "--bitrate" => bitrate = value.parse()?,
            "--seed" => seed = value.parse()?,
            "--only" => only = value,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    let speech_path = speech_path.ok_or("--speech FILE.wav is required")?;
    std::fs::create_dir_all(&out)?;
    let speech = wav::read_mono_48k(&speech_path)?;
    wav::write_mono(&out.join("reference.wav"), &wav::resample(&speech, 48_000, 16_000)?, 16_000)?;

    let ms = Duration::from_millis;
    let random = |p: f64| Impairment { loss: LossModel::Random(p), ..Impairment::CLEAN };
    let conditions: Vec<(String, Impairment)> = vec![
        ("clean".into(), Impairment::CLEAN),
        ("random 5%".into(), random(0.05)),
        ("random 10%".into(), random(0.10)),
        ("random 20%".into(), random(0.20)),
        ("bursty 10% (mean burst 3)".into(), Impairment { loss: LossModel::bursty(0.10, 3.0), ..Impairment::CLEAN }),
        ("bursty 20% (mean burst 3)".into(), Impairment { loss: LossModel::bursty(0.20, 3.0), ..Impairment::CLEAN }),
        ("jitter 0–60 ms".into(), Impairment { delay: ms(20), jitter: ms(60), ..Impairment::CLEAN }),
        ("jitter 0–60 ms + random 10%".into(), Impairment { loss: LossModel::Random(0.10), delay: ms(20), jitter: ms(60), stalls: None }),
        (
            "TCP leg: 140 ms stalls every 2 s".into(),
            Impairment { delay: ms(15), stalls: Some(Stalls { every: ms(2000), hold: ms(140) }), ..Impairment::CLEAN },
        ),
    ];
    if let Ok(filter) = std::env::var("KOE_LOG_FILTER") {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).without_time().init();
    }
    for (index, (name, impairment)) in conditions.iter().enumerate().filter(|(_, (name, _))| name.contains(&only)) {
        for (engine, fixed_redundancy) in [("koe", None), ("fec-only", Some(0))] {
            // A driver tells the receiver when a leg of the path is a byte stream.
            let transport = if impairment.stalls.is_some() { Transport::Stream } else { Transport::Datagram };
            let simulation = CallSimulation { impairment: *impairment, fixed_redundancy, seed, bitrate, transport, ..CallSimulation::default() };
            let started = Instant::now();
            let result = simulation.run(&speech)?;
            let cpu = started.elapsed();
            let file = format!("{index}-{engine}.wav");
            wav::write_mono(&out.join(&file), &wav::resample(&result.played, 48_000, 16_000)?, 16_000)?;
            let jitter = result.receiver.jitter;
            println!(
                "{{\"condition\":\"{name}\",\"engine\":\"{engine}\",\"file\":\"{file}\",\"link_loss\":{:.4},\"loss_after_recovery\":{:.4},\"from_copies\":{},\"from_fec\":{},\"concealed\":{},\"late\":{},\"expanded\":{},\"dropped\":{},\"stretched_longer_ms\":{},\"stretched_shorter_ms\":{},\"target_delay_ms\":{:.1},\"bitrate\":{:.0},\"copies\":{},\"cpu_seconds\":{:.3},\"speech_seconds\":{:.2}}}",
                result.link_loss,
                jitter.loss_after_recovery(),
                jitter.from_copies,
                jitter.from_fec,
                jitter.concealed,
                jitter.late,
                jitter.expanded,
                jitter.dropped,
                result.receiver.stretched_longer.as_millis(),
                result.receiver.stretched_shorter.as_millis(),
                jitter.target_delay.as_secs_f64() * 1000.0,
                result.bits_per_second,
                result.sender.redundancy,
                cpu.as_secs_f64(),
                speech.len() as f64 / 48_000.0,
            );
        }
    }
    Ok(())
}
