//! The PSTN gateway's costs, printed as Markdown tables (`bench/gateway.sh` runs it):
//!
//! 1. **Transcoding per call**: what one call's audio costs each 20 ms frame in both
//!    directions — Opus decode, 48 → 8 kHz, G.711 encode towards the phone; G.711 decode,
//!    8 → 48 kHz, Opus encode towards Koe — at several Opus encoder complexities, as a share of
//!    one core and the calls one core carries at that share.
//! 2. **The trunk side under load**: N calls at once through the gateway's own call driver
//!    (`koe_pstn::skypeout`: SIP, RTP, G.711, both resamplers, billing) to sipp answering and
//!    echoing every call; the process's CPU per call and the RTP packets lost or late.
//! 3. **Admissions per second**: the ledger writes of one short call (open with the first
//!    hold, answer, settle) on SQLite and on PostgreSQL, one at a time and four at once.
//! 4. **Call set-up inside the gateway**: from the Koe offer's arrival to the carrier's 180
//!    coming back (admission, the INVITE out, the carrier's answer in), and from the carrier's
//!    200 OK to the bridge telling the Koe side to answer.
//!
//! Run: `cargo run --release -p koe-pstn --example gateway_bench -- [--calls N] [--postgres URL]`.

#![allow(clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use koe_pstn::bridge::KoeEvent;
use koe_pstn::g711::G711Law;
use koe_pstn::ledger::{open_ledger, BillingId, CallEnd, Credit, CreditKind, LedgerStore, NewCall, Settlement};
use koe_pstn::media::KoeAudio;
use koe_pstn::meter::MeterConfig;
use koe_pstn::money::{Amount, Currency};
use koe_pstn::rates::RateTable;
use koe_pstn::resample::{to_f32, to_i16, Downsampler, Upsampler};
use koe_pstn::skypeout::{self, Gateway, KoeInput, KoeSide};
use koe_pstn::trunk::{SipConfig, SipEndpoint};
use opus_pure::{Application, OpusDecoder, OpusEncoder, RateControl};
use tokio::sync::mpsc;

const FRAME_48K: usize = 960;
const FRAME_8K: usize = 160;
const FRAME: Duration = Duration::from_millis(20);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let calls: usize = value("--calls").and_then(|v| v.parse().ok()).unwrap_or(100);
    let postgres = value("--postgres").or_else(|| std::env::var("KOE_TEST_POSTGRES_URL").ok());

    transcoding();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        setup_times().await;
        trunk_side(calls).await;
        admissions(postgres.as_deref()).await;
    });
}

/// 1. Transcoding one call's audio both ways, per frame, at each Opus complexity.
fn transcoding() {
    let speech = koe_voice::signal::speechlike(10);
    println!("### Transcoding one call, both directions (opus-pure, 20 ms frames, {} frames of speech)\n", speech.len() / FRAME_48K);
    println!("| Opus encoder complexity | µs per frame (Koe → phone) | µs per frame (phone → Koe) | share of one core per call | calls per core |");
    println!("|---|---|---|---|---|");
    // What Koe's clients send: Opus at the voice engine's settings, decoded at the gateway.
    let mut client = encoder(9);
    let mut packets = Vec::new();
    for frame in speech.chunks_exact(FRAME_48K) {
        let mut packet = vec![0u8; 1500];
        let length = client.encode(frame, FRAME_48K, &mut packet).expect("encode");
        packet.truncate(length);
        packets.push(packet);
    }
    for complexity in [0, 2, 5, 9] {
        let mut decoder = OpusDecoder::new(48_000, 1).expect("decoder");
        let (mut down, mut up) = (Downsampler::default(), Upsampler::default());
        let mut encoder = encoder(complexity);
        let (mut frame, mut narrow, mut wide, mut pcm, mut law, mut packet) =
            (vec![0.0f32; FRAME_48K], Vec::new(), Vec::new(), Vec::new(), Vec::new(), vec![0u8; 1500]);
        let mut to_phone = Duration::ZERO;
        let mut to_koe = Duration::ZERO;
        for round in 0..3 {
            for opus in &packets {
                let started = Instant::now();
                decoder.decode(opus, FRAME_48K, &mut frame).expect("decode");
                narrow.clear();
                down.process(&frame, &mut narrow);
                pcm.clear();
                pcm.extend(narrow.iter().map(|s| to_i16(*s)));
                law.clear();
                G711Law::Ulaw.encode_into(&pcm, &mut law);
                let middle = Instant::now();
                pcm.clear();
                G711Law::Ulaw.decode_into(&law, &mut pcm);
                let narrow_in: Vec<f32> = pcm.iter().map(|s| to_f32(*s)).collect();
                wide.clear();
                up.process(&narrow_in[..FRAME_8K.min(narrow_in.len())], &mut wide);
                wide.resize(FRAME_48K, 0.0);
                encoder.encode(&wide, FRAME_48K, &mut packet).expect("encode");
                if round > 0 {
                    to_phone += middle - started;
                    to_koe += middle.elapsed();
                }
            }
        }
        let frames = (2 * packets.len()) as f64;
        let (phone_us, koe_us) = (to_phone.as_secs_f64() * 1e6 / frames, to_koe.as_secs_f64() * 1e6 / frames);
        let share = (phone_us + koe_us) / (FRAME.as_secs_f64() * 1e6);
        println!("| {complexity} | {phone_us:.0} | {koe_us:.0} | {:.2} % | {:.0} |", share * 100.0, 1.0 / share);
    }
    println!();
}

fn encoder(complexity: i32) -> OpusEncoder {
    let mut encoder = OpusEncoder::new(48_000, 1, Application::Voip).expect("encoder");
    encoder.bitrate_bps = 32_000;
    encoder.complexity = complexity;
    encoder.rate_control = RateControl::Vbr;
    encoder.use_inband_fec = true;
    encoder
}

fn cpu_time() -> Duration {
    // SAFETY-free: /proc/self/stat fields 14 and 15 are user and system time in clock ticks.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0) + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// 2. `calls` calls at once through the gateway's driver to sipp.
async fn trunk_side(calls: usize) {
    let ip = "127.77.0.1";
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sipp/answer.xml");
    let Ok(mut sipp) = std::process::Command::new("sipp")
        .args(["-sf", scenario, "-i", ip, "-p", "5060", "-mi", ip, "-mp", "6000", "-rtp_echo", "-nostdin", "-l", "10000", "-timeout", "300s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        println!("(sipp is not installed: the trunk-side table needs it)\n");
        return;
    };
    let dir = tempfile::TempDir::new().expect("temp dir");
    let ledger = open_ledger(&format!("sqlite:{}", dir.path().join("ledger.db").display()), Duration::from_secs(10)).await.expect("ledger");
    let sip = SipEndpoint::start(SipConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        external: None,
        tls_roots: None,
        transaction_timeout: Duration::from_secs(8),
    })
    .await
    .expect("sip");
    let gateway = Gateway {
        ledger: Arc::clone(&ledger),
        sip: Arc::new(sip),
        trunks: Arc::new(vec![format!("sip:{ip}:5060").parse().expect("trunk")]),
        meter: MeterConfig::default(),
        rtp_timeout: Duration::from_secs(30),
        caller_id: "+81300000000".into(),
    };
    let rate = RateTable::built_in().lookup("81312345678").cloned().expect("rate");
    let talk = Duration::from_secs(20);
    let cpu_before = cpu_time();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..calls {
        let username = format!("load{i}");
        let top_up = Credit { key: format!("load:{i}"), username: username.clone(), amount: Amount::units(10_000).micros(), kind: CreditKind::TopUp };
        ledger.credit(&top_up, 0).await.expect("credit");
        let call = NewCall { id: BillingId::random(), username, number: "+81312345678".into(), rate: rate.clone(), currency: Currency::default(), gateway: "bench".into(), max_open_calls: 1 };
        let gateway = gateway.clone();
        tasks.push(tokio::spawn(async move {
            let (inputs_tx, inputs) = mpsc::unbounded_channel();
            let (actions, _actions_rx) = mpsc::unbounded_channel();
            let audio = KoeAudio::default();
            // What a Koe media session would play to the phone: speech, 20 ms at a time.
            let feeder = {
                let audio = audio.clone();
                tokio::spawn(async move {
                    let speech = koe_voice::signal::speechlike(2);
                    let mut ticker = tokio::time::interval(FRAME);
                    for frame in speech.chunks_exact(FRAME_48K).cycle() {
                        ticker.tick().await;
                        koe_media::driver::push_sound(&audio.to_phone, frame);
                        let mut heard = vec![0.0; FRAME_48K];
                        koe_media::driver::pull_sound(&audio.from_phone, &mut heard);
                    }
                })
            };
            let hang_up = tokio::spawn(async move {
                tokio::time::sleep(talk).await;
                let _ = inputs_tx.send(KoeInput::Event(KoeEvent::HungUp));
            });
            let report = skypeout::run(&gateway, call, KoeSide { inputs, actions, audio }).await;
            feeder.abort();
            hang_up.abort();
            report
        }));
        // Calls arrive over a second, as they would, not all in one instant.
        tokio::time::sleep(Duration::from_millis(1000 / calls.max(1) as u64)).await;
    }
    let mut answered = 0;
    let (mut sent, mut received, mut lost, mut late) = (0u64, 0u64, 0u64, 0u64);
    for task in tasks {
        if let Ok(report) = task.await {
            answered += usize::from(report.end == CallEnd::CallerHungUp);
            sent += report.media.packets_sent;
            received += report.media.packets_received;
            lost += report.media.packets_lost;
            late += report.media.packets_late;
        }
    }
    let wall = started.elapsed();
    let cpu = cpu_time() - cpu_before;
    let _ = sipp.kill();
    let _ = sipp.wait();
    let share = cpu.as_secs_f64() / wall.as_secs_f64() / calls as f64;
    println!("### The trunk side under load: {calls} calls at once for {} s through `koe_pstn::skypeout` to sipp (echo)\n", talk.as_secs());
    println!("| calls answered | RTP sent / received | lost / late (from the carrier) | gateway CPU | share of one core per call | calls per core (trunk side) |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {answered} of {calls} | {sent} / {received} | {lost} / {late} | {:.1} s in {:.1} s | {:.2} % | {:.0} |\n",
        cpu.as_secs_f64(),
        wall.as_secs_f64(),
        share * 100.0,
        1.0 / share
    );
}

/// 4. Set-up times of 20 calls, one after another, to sipp answering at once.
async fn setup_times() {
    let ip = "127.77.0.2";
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sipp/answer.xml");
    let Ok(mut sipp) = std::process::Command::new("sipp")
        .args(["-sf", scenario, "-i", ip, "-p", "5060", "-mi", ip, "-mp", "6000", "-rtp_echo", "-nostdin", "-timeout", "120s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = tempfile::TempDir::new().expect("temp dir");
    let ledger = open_ledger(&format!("sqlite:{}", dir.path().join("ledger.db").display()), Duration::from_secs(10)).await.expect("ledger");
    let sip = SipEndpoint::start(SipConfig { listen: SocketAddr::from(([127, 0, 0, 1], 0)), external: None, tls_roots: None, transaction_timeout: Duration::from_secs(8) })
        .await
        .expect("sip");
    let gateway = Gateway {
        ledger: Arc::clone(&ledger),
        sip: Arc::new(sip),
        trunks: Arc::new(vec![format!("sip:{ip}:5060").parse().expect("trunk")]),
        meter: MeterConfig::default(),
        rtp_timeout: Duration::from_secs(30),
        caller_id: "+81300000000".into(),
    };
    let rate = RateTable::built_in().lookup("81312345678").cloned().expect("rate");
    let top_up = Credit { key: "setup".into(), username: "setup".into(), amount: Amount::units(10_000).micros(), kind: CreditKind::TopUp };
    ledger.credit(&top_up, 0).await.expect("credit");
    let (mut to_ringing, mut to_answer) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let call = NewCall { id: BillingId::random(), username: "setup".into(), number: "+81312345678".into(), rate: rate.clone(), currency: Currency::default(), gateway: "bench".into(), max_open_calls: 1 };
        let (inputs_tx, inputs) = mpsc::unbounded_channel();
        let (actions, mut actions_rx) = mpsc::unbounded_channel();
        let started = Instant::now();
        let gateway = gateway.clone();
        let task = tokio::spawn(async move { skypeout::run(&gateway, call, KoeSide { inputs, actions, audio: KoeAudio::default() }).await });
        let mut ringing = None;
        while let Some(action) = actions_rx.recv().await {
            match action {
                koe_pstn::bridge::KoeAction::Ringing { .. } => ringing = Some(started.elapsed()),
                koe_pstn::bridge::KoeAction::Answer => {
                    if let Some(ringing) = ringing {
                        to_ringing.push(ringing);
                        to_answer.push(started.elapsed() - ringing);
                    }
                    let _ = inputs_tx.send(KoeInput::Event(KoeEvent::HungUp));
                }
                _ => {}
            }
        }
        let _ = task.await;
    }
    let _ = sipp.kill();
    let _ = sipp.wait();
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    let (ring_median, answer_median) = (median(&mut to_ringing), median(&mut to_answer));
    let (ring_worst, answer_worst) = (to_ringing.last().copied().unwrap_or_default(), to_answer.last().copied().unwrap_or_default());
    println!("### Call set-up inside the gateway: {} calls to sipp answering at once\n", to_ringing.len());
    println!("| step | median | worst |");
    println!("|---|---|---|");
    println!("| Koe offer in → carrier's 180 back (admission write, INVITE, 180) | {:.1} ms | {:.1} ms |", ms(ring_median), ms(ring_worst));
    println!("| carrier's 180 → Koe side told to answer (200 OK, ACK, answer recorded) | {:.1} ms | {:.1} ms |\n", ms(answer_median), ms(answer_worst));
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// 3. The ledger writes of one short call, per second.
async fn admissions(postgres: Option<&str>) {
    println!("### Admissions per second: the ledger writes of one call (open with the first hold, answer, settle)\n");
    println!("| ledger | one at a time | four at once |");
    println!("|---|---|---|");
    let dir = tempfile::TempDir::new().expect("temp dir");
    let sqlite = format!("sqlite:{}", dir.path().join("ledger.db").display());
    let mut ledgers = vec![("SQLite (WAL, synchronous=FULL)", sqlite)];
    if let Some(url) = postgres {
        ledgers.push(("PostgreSQL 15 (local)", url.to_string()));
    }
    for (name, url) in ledgers {
        let Ok(ledger) = open_ledger(&url, Duration::from_secs(10)).await else {
            println!("| {name} | unavailable | unavailable |");
            continue;
        };
        let serial = calls_per_second(&ledger, 1, 300).await;
        let parallel = calls_per_second(&ledger, 4, 300).await;
        println!("| {name} | {serial:.0} calls/s | {parallel:.0} calls/s |");
    }
    println!();
}

async fn calls_per_second(ledger: &Arc<dyn LedgerStore>, tasks: usize, calls_each: usize) -> f64 {
    let rate = RateTable::built_in().lookup("81312345678").cloned().expect("rate");
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (ledger, rate) = (Arc::clone(ledger), rate.clone());
        handles.push(tokio::spawn(async move {
            let username = format!("adm{t}-{:x}", BillingId::random().0 as u32);
            let top_up = Credit { key: format!("adm:{username}"), username: username.clone(), amount: Amount::units(1_000_000).micros(), kind: CreditKind::TopUp };
            ledger.credit(&top_up, 0).await.expect("credit");
            for _ in 0..calls_each {
                let call = NewCall { id: BillingId::random(), username: username.clone(), number: "+81312345678".into(), rate: rate.clone(), currency: Currency::default(), gateway: "bench".into(), max_open_calls: 2 };
                ledger.open_call(&call, Amount::units(63), Amount::units(21), 1).await.expect("open");
                ledger.record_answer(call.id, Some("trunk"), 2).await.expect("answer");
                ledger.settle(call.id, Settlement { billed_secs: 61, amount: Amount::units(42), end: CallEnd::CallerHungUp }, 3).await.expect("settle");
            }
        }));
    }
    for handle in handles {
        handle.await.expect("task");
    }
    (tasks * calls_each) as f64 / started.elapsed().as_secs_f64()
}
