//! A SkypeOut call through real SIP equipment: Kamailio is the carrier (a registrar and a
//! proxy that wants the gateway's digest credentials), baresip is the phone registered behind
//! it. The gateway's call driver places the call, Kamailio rings baresip, baresip answers by
//! itself, and then recorded speech goes both ways: what the Koe side says is found in
//! baresip's recording of the call, what baresip says (a WAV file) in the Koe side's, each
//! aligned at one place and matched window by window. Key presses from the Koe side arrive at
//! baresip as RFC 4733 events, which it logs. The call ends with the gateway's BYE, routed by
//! Kamailio, and is billed in the SQLite ledger.
//!
//! Needs kamailio and baresip (Debian's `kamailio` and `baresip-core`), and the words that
//! alsa-utils ships (/usr/share/sounds/alsa) as the speech. The test skips without them, except
//! where `KOE_REQUIRE_KAMAILIO=1` or `KOE_REQUIRE_BARESIP=1` (CI) makes that a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use koe_pstn::bridge::{KoeAction, KoeEvent};
use koe_pstn::dtmf::parse_digits;
use koe_pstn::ledger::{BillingId, CallEnd, Credit, CreditKind, LedgerStore, NewCall, SqliteLedger};
use koe_pstn::media::KoeAudio;
use koe_pstn::meter::MeterConfig;
use koe_pstn::money::{Amount, Currency};
use koe_pstn::rates::RateTable;
use koe_pstn::resample::{Downsampler, RATIO};
use koe_pstn::skypeout::{self, CallReport, Gateway, KoeInput, KoeSide};
use koe_pstn::trunk::{SipConfig, SipEndpoint, Trunk};
use tokio::sync::mpsc;

/// The number Kamailio puts through to the phone (tests/kamailio/kamailio.cfg).
const PHONE_NUMBER: &str = "+81312345678";
/// The gateway's account at the carrier (tests/kamailio/kamailio.cfg).
const TRUNK_CREDENTIALS: &str = "koe:trunk-secret";
/// The keys the Koe side presses.
const KEYS: &str = "1#9";
const RATE_48K: usize = 48_000;
const FRAME_48K: usize = 960;
/// How many 20 ms frames the gateway's sound queues hold (koe_media::driver).
const QUEUED_FRAMES: usize = 3;
const RATE_8K: usize = 8_000;
/// The words each side says, from alsa-utils.
const SOUNDS: &str = "/usr/share/sounds/alsa";
const KOE_WORDS: [&str; 3] = ["Front_Center", "Front_Left", "Front_Right"];
const PHONE_WORDS: [&str; 3] = ["Rear_Left", "Rear_Right", "Side_Left"];
/// Silence before each side speaks, from the answer.
const LEAD_IN: Duration = Duration::from_millis(500);
/// The phone's file runs this long (its speech, then silence): baresip hangs up when its
/// file ends, and the Koe side is to hang up first.
const PHONE_FILE: Duration = Duration::from_secs(60);
/// How long baresip may take to register, answer, log or stop.
const PHONE_PATIENCE: Duration = Duration::from_secs(10);
/// The Koe side hangs up this long after the answer at the latest, whatever was heard.
const LONGEST_CALL: Duration = Duration::from_secs(20);
/// How far (in 8 kHz samples) each voiced quarter-second may be found from where the whole
/// speech places it: what the gateway's sound queues hold (60 ms). Only a burst of packets
/// longer than that, on a machine too busy to take it in time, moves what follows.
const ALIGNMENT_SLACK: usize = QUEUED_FRAMES * 160;

/// Whether `program` runs; a missing one skips the test, or fails it where `require` is "1".
fn tool_available(program: &str, probe: &str, require: &str, package: &str) -> bool {
    let found = Command::new(program).arg(probe).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found && std::env::var(require).as_deref() == Ok("1") {
        panic!("{require}=1 but {program} is not installed (apt install {package})");
    }
    if !found {
        eprintln!("skipped: {program} is not installed (apt install {package})");
    }
    found
}

fn speech_available() -> bool {
    let found = Path::new(SOUNDS).join(format!("{}.wav", KOE_WORDS[0])).exists();
    let required = ["KOE_REQUIRE_KAMAILIO", "KOE_REQUIRE_BARESIP"].iter().any(|name| std::env::var(name).as_deref() == Ok("1"));
    if !found && required {
        panic!("the speech samples in {SOUNDS} are missing (apt install alsa-utils)");
    }
    if !found {
        eprintln!("skipped: the speech samples in {SOUNDS} are missing (apt install alsa-utils)");
    }
    found
}

/// What a child process printed, line by line, as it printed it.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    fn collect(&self, stream: impl Read + Send + 'static) {
        let lines = Arc::clone(&self.0);
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }

    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// The first line that `wanted`, waiting up to `patience` for it.
    async fn wait_for(&self, patience: Duration, wanted: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(line) = self.0.lock().unwrap().iter().find(|line| wanted(line)) {
                return Some(line.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A child in a process group of its own (Kamailio forks workers), stopped with SIGTERM and,
/// if it lingers, SIGKILL to the whole group. Its output is shown if the test fails.
struct Daemon {
    name: &'static str,
    child: Child,
    output: Output,
}

impl Daemon {
    fn spawn(name: &'static str, command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|error| panic!("{name} starts: {error}"));
        let output = Output::default();
        output.collect(child.stdout.take().unwrap());
        output.collect(child.stderr.take().unwrap());
        Self { name, child, output }
    }

    /// Asks the process to stop and waits until it has (files it writes are then complete).
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-s", "TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").args(["-s", "KILL", "--", &group]).stderr(Stdio::null()).status();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- {} said:\n{}", self.name, self.output.lines().join("\n"));
        }
    }
}

/// Kamailio as the carrier, on a loopback address of its own (127.x.y.z:5060), so that tests
/// running at once never race for a port.
struct Carrier {
    daemon: Daemon,
    sip: SocketAddr,
}

impl Carrier {
    fn start(run_dir: &Path) -> Self {
        std::fs::create_dir_all(run_dir).unwrap();
        let random = BillingId::random().0;
        let ip = Ipv4Addr::new(127, 1 + (random % 250) as u8, (random >> 8) as u8, 1 + ((random >> 16) % 250) as u8);
        let sip = SocketAddr::from((ip, 5060));
        let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kamailio/kamailio.cfg");
        let daemon = Daemon::spawn(
            "kamailio",
            Command::new("kamailio")
                // In the foreground, logging to stderr; a small shared memory, its own pid file
                // and run directory.
                .args(["-DD", "-E", "-m", "32", "-M", "4"])
                .arg("-f")
                .arg(&config)
                .args(["-l", &format!("udp:{sip}")])
                .arg("-P")
                .arg(run_dir.join("kamailio.pid"))
                .arg("-Y")
                .arg(run_dir)
                .current_dir(run_dir),
        );
        Self { daemon, sip }
    }

    fn trunk(&self) -> Trunk {
        format!("sip:{TRUNK_CREDENTIALS}@{}", self.sip).parse().unwrap()
    }
}

/// baresip as the phone, registered at the carrier, saying `says` when it answers.
struct Phone {
    daemon: Daemon,
    dir: PathBuf,
}

impl Phone {
    fn start(dir: &Path, carrier: SocketAddr, says: &[f32]) -> Self {
        let templates = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/baresip");
        std::fs::create_dir_all(dir.join("recordings")).unwrap();
        std::fs::copy(templates.join("config"), dir.join("config")).unwrap();
        let accounts = std::fs::read_to_string(templates.join("accounts")).unwrap().replace("{carrier}", &carrier.to_string());
        std::fs::write(dir.join("accounts"), accounts).unwrap();
        let mut file = says.to_vec();
        file.resize(PHONE_FILE.as_secs() as usize * RATE_8K, 0.0);
        koe_voice::wav::write_mono(&dir.join("phone_says.wav"), &file, RATE_8K as u32).unwrap();
        let daemon = Daemon::spawn("baresip", Command::new("baresip").arg("-f").arg(dir).current_dir(dir));
        Self { daemon, dir: dir.to_path_buf() }
    }

    /// The keys baresip logged as received RFC 4733 events ("received event: '1' (end=0)"),
    /// once per key press, and the lines that said so.
    fn keys_heard(&self) -> (String, Vec<String>) {
        let lines: Vec<String> = self.daemon.output.lines().into_iter().filter(|line| line.contains("received event:")).collect();
        let keys = lines
            .iter()
            .filter(|line| line.contains("(end=0)"))
            .filter_map(|line| line.split('\'').nth(1).and_then(|key| key.chars().next()))
            .collect();
        (keys, lines)
    }

    /// What the phone heard, as its sndfile filter recorded it (8 kHz); complete once baresip
    /// has stopped.
    fn recording(&self) -> Vec<f32> {
        let dumps: Vec<PathBuf> = std::fs::read_dir(self.dir.join("recordings"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.to_string_lossy().ends_with("-dec.wav"))
            .collect();
        assert_eq!(dumps.len(), 1, "one recording of what the phone heard: {dumps:?}");
        let (samples, rate) = koe_voice::wav::read_mono(&dumps[0]).unwrap();
        assert_eq!(rate as usize, RATE_8K, "the phone recorded the call at PCMU's rate");
        samples
    }
}

/// Joined words from alsa-utils (48 kHz), without the silence before and after each.
fn words(names: &[&str]) -> Vec<f32> {
    let mut speech = Vec::new();
    for name in names {
        let word = koe_voice::wav::read_mono_48k(&Path::new(SOUNDS).join(format!("{name}.wav"))).unwrap();
        let first = word.iter().position(|s| s.abs() > 0.02).unwrap();
        let last = word.iter().rposition(|s| s.abs() > 0.02).unwrap();
        speech.extend_from_slice(&word[first..=last]);
        speech.extend(std::iter::repeat_n(0.0, RATE_48K / 10));
    }
    speech
}

/// 48 kHz → 8 kHz through the gateway's own filter: the telephone band, as the phone hears it
/// at best.
fn narrow(samples: &[f32]) -> Vec<f32> {
    let mut out = Vec::new();
    Downsampler::default().process(samples, &mut out);
    out
}

/// What the Koe side recorded (48 kHz, made by the gateway's upsampler from 8 kHz, so with
/// nothing above the telephone band) back at 8 kHz: every sixth sample.
fn decimate(samples: &[f32]) -> Vec<f32> {
    samples.iter().step_by(RATIO).copied().collect()
}

fn rms(samples: &[f32]) -> f64 {
    (samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum::<f64>() / samples.len().max(1) as f64).sqrt()
}

/// The lag in `lags` at which `heard` best matches `speech`, and the normalised correlation
/// there (1.0: the same shape); `None` if `heard` ends before any of them. Every lag is tried:
/// at 8 kHz a voice's harmonics are only a few samples apart.
fn best_lag(speech: &[f32], heard: &[f32], lags: Range<usize>) -> Option<(usize, f64)> {
    let n = speech.len();
    let speech_energy: f64 = speech.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    // Running sums of squares: the energy of any stretch of `heard` in one subtraction.
    let mut squares = vec![0.0f64; heard.len() + 1];
    for (i, &s) in heard.iter().enumerate() {
        squares[i + 1] = squares[i] + f64::from(s) * f64::from(s);
    }
    lags.filter(|lag| lag + n <= heard.len())
        .map(|lag| {
            let dot: f32 = speech.iter().zip(&heard[lag..lag + n]).map(|(a, b)| a * b).sum();
            let energy = (squares[lag + n] - squares[lag]) * speech_energy;
            (lag, f64::from(dot) / energy.sqrt().max(f64::EPSILON))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

/// Where a recording holds a piece of speech, and how well.
#[derive(Debug)]
struct Found {
    /// Where the speech starts in the recording, in 8 kHz samples.
    at: usize,
    /// For each voiced quarter-second of the speech: how far from where the whole places it it
    /// was found (8 kHz samples), and the correlation there.
    windows: Vec<(isize, f64)>,
    /// The speech's level in the recording relative to what was said (1.0: the same).
    gain: f64,
}

impl Found {
    fn median(&self) -> f64 {
        let mut similarities: Vec<f64> = self.windows.iter().map(|(_, similarity)| *similarity).collect();
        similarities.sort_by(f64::total_cmp);
        similarities.get(similarities.len() / 2).copied().unwrap_or(0.0)
    }

    fn worst(&self) -> f64 {
        self.windows.iter().map(|(_, similarity)| *similarity).fold(f64::MAX, f64::min)
    }

    fn largest_drift(&self) -> isize {
        self.windows.iter().map(|(drift, _)| drift.abs()).max().unwrap_or(0)
    }
}

/// Finds `speech` in `heard` (both 8 kHz), starting within its first `within` samples: its
/// first voiced half-second places the whole, then each voiced quarter-second (the pauses
/// between words carry nothing to compare) is matched near where that puts it. A real call may
/// shift the speech by a packet now and then; one correlation over the whole would punish it.
fn find_speech(speech: &[f32], heard: &[f32], within: usize) -> Found {
    let quarter = RATE_8K / 4;
    let loudest = speech.chunks(quarter).map(rms).fold(0.0, f64::max);
    let voiced: Vec<usize> =
        (0..speech.len().saturating_sub(quarter)).step_by(quarter).filter(|&start| rms(&speech[start..start + quarter]) >= 0.3 * loudest).collect();
    let probe_start = voiced[0];
    let (lag, _) = best_lag(&speech[probe_start..probe_start + 2 * quarter], heard, 0..within + probe_start).unwrap_or_default();
    let at = lag.saturating_sub(probe_start);
    let search = 2 * ALIGNMENT_SLACK;
    let windows = voiced
        .iter()
        .map(|&start| {
            let expected = at + start;
            let from = expected.saturating_sub(search);
            match best_lag(&speech[start..start + quarter], heard, from..expected + search + 1) {
                Some((lag, similarity)) => (lag as isize - expected as isize, similarity),
                // The recording ended before it.
                None => (0, 0.0),
            }
        })
        .collect();
    let span = at..(at + speech.len()).min(heard.len());
    let gain = rms(&heard[span.clone()]) / rms(&speech[..span.len()]);
    Found { at, windows, gain }
}

/// A gateway with one user, alice, and `credit` yen, dialling out through `trunk`.
struct Setup {
    ledger: Arc<dyn LedgerStore>,
    gateway: Gateway,
}

impl Setup {
    async fn new(dir: &Path, trunk: Trunk, credit: &str) -> Self {
        let ledger: Arc<dyn LedgerStore> = Arc::new(SqliteLedger::open(&dir.join("ledger.db"), Duration::from_secs(5)).await.unwrap());
        let top_up = Credit { key: "top-up".into(), username: "alice".into(), amount: yen(credit).micros(), kind: CreditKind::TopUp };
        ledger.credit(&top_up, 0).await.unwrap();
        let config = SipConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            external: None,
            tls_roots: None,
            transaction_timeout: Duration::from_secs(4),
        };
        let sip = SipEndpoint::start(config).await.unwrap();
        let gateway = Gateway {
            ledger: Arc::clone(&ledger),
            sip: Arc::new(sip),
            trunks: Arc::new(vec![trunk]),
            meter: MeterConfig::default(),
            rtp_timeout: Duration::from_secs(2),
            caller_id: "+81300000000".into(),
        };
        Self { ledger, gateway }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.gateway.sip.shutdown();
    }
}

fn yen(text: &str) -> Amount {
    text.parse().unwrap()
}

/// What the Koe side saw.
struct Conversation {
    id: BillingId,
    actions: Vec<KoeAction>,
    /// What it heard from the answer on (48 kHz), as it came.
    recording: Vec<f32>,
    report: CallReport,
}

/// The Koe side of the call: after the answer it says `speech` (48 kHz), then presses
/// [`KEYS`], and hangs up once the phone has logged the keys and `listen` has passed since
/// the answer (or at [`LONGEST_CALL`]).
async fn converse(gateway: &Gateway, speech: &[f32], listen: Duration, phone: &Phone) -> Conversation {
    let id = BillingId::random();
    let call = NewCall {
        id,
        username: "alice".into(),
        number: PHONE_NUMBER.into(),
        rate: RateTable::built_in().lookup(&PHONE_NUMBER[1..]).cloned().unwrap(),
        currency: Currency::default(),
        gateway: "gw-test".into(),
        max_open_calls: 2,
    };
    let (inputs_tx, inputs) = mpsc::unbounded_channel();
    let (actions_tx, mut actions_rx) = mpsc::unbounded_channel();
    let audio = KoeAudio::default();
    let side = KoeSide { inputs, actions: actions_tx, audio: audio.clone() };
    let gateway = gateway.clone();
    let mut call = tokio::spawn(async move { skypeout::run(&gateway, call, side).await });
    let mut actions = Vec::new();
    let mut recording = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut said = 0usize;
    let (mut answered, mut spoken): (Option<Instant>, Option<Instant>) = (None, None);
    let (mut pressed, mut hung_up) = (false, false);
    let report = loop {
        tokio::select! {
            report = &mut call => break report.unwrap(),
            Some(action) = actions_rx.recv() => {
                if action == KoeAction::Answer {
                    answered = Some(Instant::now());
                }
                actions.push(action);
            }
            _ = ticker.tick() => {
                let Some(at) = answered else { continue };
                // Paced by the gateway, not by this clock: the queue towards the phone is kept
                // full (it holds three packets) and the one from it emptied. Two 20 ms clocks
                // never quite in step, or a tick this side that comes late on a busy machine,
                // would otherwise lose a packet or put one of silence into the speech.
                if at.elapsed() >= LEAD_IN && spoken.is_none() {
                    let mut to_phone = audio.to_phone.lock().unwrap();
                    let end = (said + (QUEUED_FRAMES * FRAME_48K).saturating_sub(to_phone.len())).min(speech.len());
                    to_phone.extend(&speech[said..end]);
                    said = end;
                    if said == speech.len() && to_phone.is_empty() {
                        spoken = Some(Instant::now());
                    }
                }
                recording.extend(audio.from_phone.lock().unwrap().drain(..));
                // Key presses replace the voice while they play: a quarter-second after it.
                if !pressed && spoken.is_some_and(|spoken| spoken.elapsed() >= Duration::from_millis(250)) {
                    pressed = true;
                    let _ = inputs_tx.send(KoeInput::Dtmf(parse_digits(KEYS).unwrap()));
                }
                let keys_heard = pressed && phone.keys_heard().0.len() >= KEYS.len();
                if !hung_up && ((keys_heard && at.elapsed() >= listen) || at.elapsed() >= LONGEST_CALL) {
                    hung_up = true;
                    let _ = inputs_tx.send(KoeInput::Event(KoeEvent::HungUp));
                }
            }
        }
    };
    while let Ok(action) = actions_rx.try_recv() {
        actions.push(action);
    }
    Conversation { id, actions, recording, report }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_goes_both_ways_and_keys_reach_a_phone_behind_kamailio() {
    if !tool_available("kamailio", "-v", "KOE_REQUIRE_KAMAILIO", "kamailio")
        || !tool_available("baresip", "-h", "KOE_REQUIRE_BARESIP", "baresip-core")
        || !speech_available()
    {
        return;
    }
    let dir = tempfile::TempDir::new().unwrap();
    let koe_says = words(&KOE_WORDS);
    // What each side's words are in the telephone band: what the other side can hear at best.
    let koe_says_8k = narrow(&koe_says);
    let phone_says_8k = narrow(&words(&PHONE_WORDS));
    let mut phone_file = vec![0.0; LEAD_IN.as_millis() as usize * RATE_8K / 1000];
    phone_file.extend_from_slice(&phone_says_8k);

    let mut carrier = Carrier::start(&dir.path().join("kamailio"));
    let mut phone = Phone::start(&dir.path().join("baresip"), carrier.sip, &phone_file);
    // Registered: "phone@127.x.y.z: {0/UDP/v4} 200 OK (kamailio (5.6.3 (x86_64/linux))) [1 binding]".
    let registered = phone.daemon.output.wait_for(PHONE_PATIENCE, |line| line.starts_with("phone@") && line.contains("200 OK")).await;
    assert!(registered.is_some(), "the phone registers at the carrier");

    let setup = Setup::new(dir.path(), carrier.trunk(), "100").await;
    // The phone's speech plays from the answer; listen until it is over, and a second more.
    let listen = Duration::from_secs_f64(phone_file.len() as f64 / RATE_8K as f64) + Duration::from_secs(1);
    let conversation = converse(&setup.gateway, &koe_says, listen, &phone).await;
    assert!(conversation.actions.contains(&KoeAction::Answer), "{:?}", conversation.actions);
    assert_eq!(conversation.report.end, CallEnd::CallerHungUp, "{:?}", conversation.actions);

    // The carrier took the gateway's credentials, and routed its BYE to the phone, which ended
    // the call: the dialog went through Kamailio from INVITE to BYE.
    let authenticated = carrier.daemon.output.wait_for(Duration::ZERO, |line| line.contains("authenticated INVITE from koe")).await;
    assert!(authenticated.is_some(), "the INVITE answered the carrier's digest challenge");
    let gateway_sip = setup.gateway.sip.local_addr();
    let bye = carrier.daemon.output.wait_for(PHONE_PATIENCE, |line| line.contains(&format!("in-dialog BYE from {gateway_sip}"))).await;
    assert!(bye.is_some(), "the gateway's BYE went through the carrier");
    // "sip:+81312345678@127.x.y.z:5060: Call with sip:+81300000000@… terminated (duration: 6 secs)"
    let closed = phone.daemon.output.wait_for(PHONE_PATIENCE, |line| line.contains("terminated (duration")).await;
    assert!(closed.is_some(), "the phone saw the call end");

    // The keys, in order, each once.
    let (keys, lines) = phone.keys_heard();
    eprintln!("the phone logged: {lines:#?}");
    assert_eq!(keys, KEYS, "the phone logged {lines:#?}");

    // Billed from the answer, 60/60 at 3.6 ¥/min: one minute; nothing left held.
    let billed = conversation.actions.iter().find_map(|action| match action {
        KoeAction::Billed { billed_secs, amount } => Some((*billed_secs, *amount)),
        _ => None,
    });
    let (billed_secs, amount) = billed.unwrap_or_else(|| panic!("no bill: {:?}", conversation.actions));
    assert_eq!(amount, yen("3.6"));
    let record = setup.ledger.call(conversation.id).await.unwrap().unwrap();
    assert_eq!(record.end, Some(CallEnd::CallerHungUp));
    assert_eq!(record.billed_secs, Some(billed_secs));
    assert_eq!(record.amount, Some(yen("3.6")));
    assert_eq!(record.trunk, Some(carrier.trunk().name()));
    let balance = setup.ledger.balance("alice").await.unwrap();
    assert_eq!((balance.balance, balance.held), (yen("96.4"), Amount::ZERO));

    // baresip's recording is complete once it has stopped.
    phone.daemon.stop();
    carrier.daemon.stop();
    let second = RATE_8K;

    // What the Koe side said, in the phone's recording (which starts with the first packet, at
    // about the answer; the speech starts LEAD_IN later): placed once, every voiced stretch of
    // it found where that puts it, like what was said and as loud.
    let phone_heard = phone.recording();
    let koe_found = find_speech(&koe_says_8k, &phone_heard, 3 * second);
    eprintln!("the phone heard the Koe side's words: {koe_found:?}");
    assert_heard(&koe_found, "the phone's recording");
    // The phone's own words are not in it: what the match is worth.
    let other = find_speech(&phone_says_8k, &phone_heard, 3 * second);
    eprintln!("the phone's recording against other words: {other:?}");
    assert!(other.median() < 0.8, "other words match too: {other:?}");

    // What the phone said, in the Koe side's recording (from the answer on).
    let koe_heard = decimate(&conversation.recording);
    let phone_found = find_speech(&phone_says_8k, &koe_heard, 3 * second);
    eprintln!("the Koe side heard the phone's words: {phone_found:?}");
    assert_heard(&phone_found, "the Koe side's recording");
    assert!(conversation.report.media.packets_received > 100, "{:?}", conversation.report.media);
}

/// Speech said LEAD_IN after the answer, as it should be found in a recording of the call.
fn assert_heard(found: &Found, recording: &str) {
    let second = RATE_8K;
    let at_ms = found.at * 1000 / second;
    assert!((second / 4..2 * second).contains(&found.at), "the speech starts {at_ms} ms into {recording}: {found:?}");
    assert!(found.windows.len() >= 6, "too little of the speech is voiced: {found:?}");
    assert!(found.largest_drift() <= ALIGNMENT_SLACK as isize, "a part of the speech is out of place in {recording}: {found:?}");
    assert!(found.median() > 0.99, "the speech in {recording} is not what was said: {found:?}");
    // A packet lost to a queue cuts a window in two, but none may be missing.
    assert!(found.worst() > 0.5, "a part of the speech is missing from {recording}: {found:?}");
    assert!((0.8..1.25).contains(&found.gain), "the speech in {recording} is at {:.2} of its level", found.gain);
}
