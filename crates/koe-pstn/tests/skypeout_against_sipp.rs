//! SkypeOut calls from the gateway's call driver to sipp acting as the carrier, on loopback:
//! real SIP over UDP, real RTP, the SQLite ledger. The Koe side is played by the test (a tone
//! into the call, a recording out of it), so what is asserted is the trunk side: answer and
//! echo, busy, failover after a 503, a slow answer, the carrier hanging up, a carrier that
//! sends no RTP, a trunk that is down, digest auth, a re-INVITE never acknowledged, and
//! RFC 4733 key presses.
//!
//! Needs sipp (Debian's `sip-tester`): the tests skip without it, except where
//! `KOE_REQUIRE_SIPP=1` (CI) makes a missing sipp a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use koe_media::driver::{pull_sound, push_sound};
use koe_pstn::bridge::{CallFailure, KoeAction, KoeEvent};
use koe_pstn::dtmf::parse_digits;
use koe_pstn::ledger::{BillingId, CallEnd, Credit, CreditKind, LedgerStore, NewCall, SqliteLedger};
use koe_pstn::media::KoeAudio;
use koe_pstn::meter::MeterConfig;
use koe_pstn::money::{Amount, Currency};
use koe_pstn::rates::RateTable;
use koe_pstn::skypeout::{self, CallReport, Gateway, KoeInput, KoeSide};
use koe_pstn::trunk::{SipConfig, SipEndpoint, Trunk};
use tokio::sync::mpsc;

const FRAME_48K: usize = 960;
const TONE_HZ: f32 = 1000.0;

fn sipp_available() -> bool {
    let found = Command::new("sipp").arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found && std::env::var("KOE_REQUIRE_SIPP").as_deref() == Ok("1") {
        panic!("KOE_REQUIRE_SIPP=1 but sipp is not installed (apt install sip-tester)");
    }
    if !found {
        eprintln!("skipped: sipp is not installed (apt install sip-tester)");
    }
    found
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// sipp as a carrier, killed when dropped.
struct Carrier {
    child: Child,
    sip: SocketAddr,
}

impl Carrier {
    /// Each carrier gets a loopback address of its own (127.x.y.z), so carriers of tests
    /// running at once never race for a port, and sipp's fixed ports can be used.
    fn start(scenario: &str, extra: &[&str]) -> Self {
        let random = BillingId::random().0;
        let ip = std::net::Ipv4Addr::new(127, 1 + (random % 250) as u8, (random >> 8) as u8, 1 + ((random >> 16) % 250) as u8);
        let sip = SocketAddr::from((ip, 5060));
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sipp").join(scenario);
        let mut command = Command::new("sipp");
        // KOE_SIPP_TRACE=DIR keeps each carrier's messages and errors there, for a failure.
        if let Ok(dir) = std::env::var("KOE_SIPP_TRACE") {
            command.args(["-trace_msg", "-trace_err"]).current_dir(dir);
        }
        let child = command
            .args(["-sf", path.to_str().unwrap(), "-i", &ip.to_string(), "-p", "5060"])
            .args(["-mi", &ip.to_string(), "-mp", "6000", "-m", "1", "-nostdin", "-timeout", "120s"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sipp starts");
        // sipp answers nothing until its socket is bound; an INVITE before that is retransmitted.
        Self { child, sip }
    }

    /// Waits for sipp to finish its one call; whether every check of its scenario held.
    fn succeeded(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn trunk(&self, userinfo: &str) -> Trunk {
        format!("sip:{userinfo}{}", self.sip).parse().unwrap()
    }
}

impl Drop for Carrier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway with one user, alice, and `credit` yen.
struct Setup {
    _dir: tempfile::TempDir,
    ledger: Arc<dyn LedgerStore>,
    gateway: Gateway,
}

impl Setup {
    async fn new(trunks: Vec<Trunk>, credit: &str) -> Self {
        let dir = tempfile::TempDir::new().unwrap();
        let ledger: Arc<dyn LedgerStore> = Arc::new(SqliteLedger::open(&dir.path().join("ledger.db"), Duration::from_secs(5)).await.unwrap());
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
            trunks: Arc::new(trunks),
            meter: MeterConfig::default(),
            rtp_timeout: Duration::from_secs(2),
            caller_id: "+81300000000".into(),
        };
        Self { _dir: dir, ledger, gateway }
    }

    async fn balance(&self) -> Amount {
        self.ledger.balance("alice").await.unwrap().balance
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

fn call_to_japan() -> NewCall {
    NewCall {
        id: BillingId::random(),
        username: "alice".into(),
        number: "+81312345678".into(),
        rate: RateTable::built_in().lookup("81312345678").cloned().unwrap(),
        currency: Currency::default(),
        gateway: "gw-test".into(),
        max_open_calls: 2,
    }
}

/// The Koe caller: says a tone, records what it hears, hangs up `talk` after the answer (or
/// never), and presses `keys` a second after the answer.
struct Caller {
    talk: Option<Duration>,
    keys: Option<&'static str>,
}

/// What the caller saw, with the time since the call started.
struct Heard {
    actions: Vec<(Duration, KoeAction)>,
    recording: Vec<f32>,
    report: CallReport,
}

impl Heard {
    fn answered_at(&self) -> Option<Duration> {
        self.actions.iter().find(|(_, a)| *a == KoeAction::Answer).map(|(at, _)| *at)
    }

    fn last(&self) -> Option<&KoeAction> {
        self.actions.iter().rev().find(|(_, a)| !matches!(a, KoeAction::Billed { .. })).map(|(_, a)| a)
    }
}

async fn place(gateway: &Gateway, caller: Caller) -> Heard {
    let (inputs_tx, inputs) = mpsc::unbounded_channel();
    let (actions, mut actions_rx) = mpsc::unbounded_channel();
    let audio = KoeAudio::default();
    let side = KoeSide { inputs, actions, audio: audio.clone() };
    let gateway = gateway.clone();
    let call = tokio::spawn(async move { skypeout::run(&gateway, call_to_japan(), side).await });
    let started = Instant::now();
    let mut heard = Vec::new();
    let mut recording = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut frame = vec![0.0f32; FRAME_48K];
    let mut index = 0usize;
    let mut answered: Option<Instant> = None;
    let mut hung_up = false;
    let mut pressed = false;
    let mut call = call;
    let report = loop {
        tokio::select! {
            report = &mut call => break report.unwrap(),
            Some(action) = actions_rx.recv() => {
                if action == KoeAction::Answer {
                    answered = Some(Instant::now());
                }
                heard.push((started.elapsed(), action));
            }
            _ = ticker.tick() => {
                let tone: Vec<f32> = (0..FRAME_48K)
                    .map(|i| 0.3 * (std::f32::consts::TAU * TONE_HZ * (index * FRAME_48K + i) as f32 / 48_000.0).sin())
                    .collect();
                index += 1;
                push_sound(&audio.to_phone, &tone);
                pull_sound(&audio.from_phone, &mut frame);
                if answered.is_some() {
                    recording.extend_from_slice(&frame);
                }
                if let Some(at) = answered {
                    if let (Some(keys), false) = (caller.keys, pressed) {
                        if at.elapsed() >= Duration::from_secs(1) {
                            pressed = true;
                            let _ = inputs_tx.send(KoeInput::Dtmf(parse_digits(keys).unwrap()));
                        }
                    }
                    if caller.talk.is_some_and(|talk| at.elapsed() >= talk) && !hung_up {
                        hung_up = true;
                        let _ = inputs_tx.send(KoeInput::Event(KoeEvent::HungUp));
                    }
                }
            }
        }
    };
    while let Ok(action) = actions_rx.try_recv() {
        heard.push((started.elapsed(), action));
    }
    Heard { actions: heard, recording, report }
}

/// The level of `hz` in `samples` (Goertzel), relative to full scale.
fn level_at(samples: &[f32], hz: f32) -> f32 {
    let coefficient = 2.0 * (std::f32::consts::TAU * hz / 48_000.0).cos();
    let (mut s1, mut s2) = (0.0f32, 0.0f32);
    for sample in samples {
        let s0 = sample + coefficient * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let power = s1 * s1 + s2 * s2 - coefficient * s1 * s2;
    2.0 * power.sqrt() / samples.len() as f32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_call_carries_audio_both_ways_and_is_billed_from_the_answer() {
    if !sipp_available() {
        return;
    }
    let carrier = Carrier::start("answer.xml", &["-rtp_echo"]);
    let setup = Setup::new(vec![carrier.trunk("")], "100").await;
    let heard = place(&setup.gateway, Caller { talk: Some(Duration::from_secs(3)), keys: None }).await;
    let kinds: Vec<&KoeAction> = heard.actions.iter().map(|(_, a)| a).collect();
    assert!(matches!(kinds.first(), Some(KoeAction::Admitted { .. })), "{kinds:?}");
    assert!(kinds.contains(&&KoeAction::Ringing { early_media: false }), "{kinds:?}");
    assert!(kinds.contains(&&KoeAction::Answer), "{kinds:?}");
    assert_eq!(heard.report.end, CallEnd::CallerHungUp);
    // The echo brings the tone back: G.711, both resamplers and RTP both ways work.
    let echoed = &heard.recording[heard.recording.len() / 4..heard.recording.len() * 3 / 4];
    let level = level_at(echoed, TONE_HZ);
    assert!(level > 0.2, "the tone came back at {level} (sent at 0.3)");
    assert!(level_at(echoed, 1500.0) < 0.02, "and nothing else");
    assert!(heard.report.media.packets_sent > 100 && heard.report.media.packets_received > 100, "{:?}", heard.report.media);
    // Three seconds at 3.6 ¥/min, 60/60: one minute.
    assert!(heard.actions.iter().any(|(_, a)| *a == KoeAction::Billed { billed_secs: 3, amount: yen("3.6") }), "{:?}", heard.actions);
    assert_eq!(setup.balance().await, yen("96.4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_is_said_and_costs_nothing() {
    if !sipp_available() {
        return;
    }
    let carrier = Carrier::start("busy.xml", &[]);
    let spare = Carrier::start("answer.xml", &[]);
    let setup = Setup::new(vec![carrier.trunk(""), spare.trunk("")], "100").await;
    let heard = place(&setup.gateway, Caller { talk: None, keys: None }).await;
    assert_eq!(heard.last(), Some(&KoeAction::Reject(CallFailure::Busy)), "{:?}", heard.actions);
    assert_eq!(heard.report.end, CallEnd::Busy);
    assert_eq!(heard.report.trunk.as_deref(), Some(carrier.trunk("").name().as_str()), "busy never fails over");
    assert_eq!(setup.balance().await, yen("100"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_number_is_said_plainly() {
    if !sipp_available() {
        return;
    }
    let carrier = Carrier::start("not_found.xml", &[]);
    let setup = Setup::new(vec![carrier.trunk("")], "100").await;
    let heard = place(&setup.gateway, Caller { talk: None, keys: None }).await;
    assert_eq!(heard.last(), Some(&KoeAction::Reject(CallFailure::NoSuchNumber)));
    assert_eq!(CallFailure::NoSuchNumber.to_string(), "no such number");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_fails_over_to_the_second_trunk() {
    if !sipp_available() {
        return;
    }
    let down = Carrier::start("unavailable.xml", &[]);
    let up = Carrier::start("answer.xml", &["-rtp_echo"]);
    let setup = Setup::new(vec![down.trunk(""), up.trunk("")], "100").await;
    let heard = place(&setup.gateway, Caller { talk: Some(Duration::from_secs(1)), keys: None }).await;
    assert!(heard.answered_at().is_some(), "{:?}", heard.actions);
    assert_eq!(heard.report.trunk.as_deref(), Some(up.trunk("").name().as_str()));
    assert_eq!(heard.report.end, CallEnd::CallerHungUp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_is_billed_only_from_the_answer() {
    if !sipp_available() {
        return;
    }
    let carrier = Carrier::start("slow_answer.xml", &["-rtp_echo"]);
    let setup = Setup::new(vec![carrier.trunk("")], "100").await;
    let heard = place(&setup.gateway, Caller { talk: Some(Duration::from_secs(1)), keys: None }).await;
    let ringing = heard.actions.iter().find(|(_, a)| matches!(a, KoeAction::Ringing { .. })).map(|(at, _)| *at).unwrap();
    let answered = heard.answered_at().unwrap();
    assert!(answered - ringing >= Duration::from_millis(2400), "rang {ringing:?}, answered {answered:?}");
    assert!(heard.actions.iter().any(|(_, a)| matches!(a, KoeAction::Billed { billed_secs: 1, .. })), "{:?}", heard.actions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_carrier_hanging_up_ends_the_call_and_its_billing() {
    if !sipp_available() {
        return;
    }
    let carrier = Carrier::start("hangs_up.xml", &["-rtp_echo"]);
    let setup = Setup::new(vec![carrier.trunk("")], "100").await;
    let heard = place(&setup.gateway, Caller { talk: None, keys: None }).await;
    assert_eq!(heard.last(), Some(&KoeAction::Hangup(CallFailure::Ended)), "{:?}", heard.actions);
    assert_eq!(heard.report.end, CallEnd::FarEndHungUp);
    assert!(heard.actions.iter().any(|(_, a)| matches!(a, KoeAction::Billed { billed_secs: 3, .. })), "{:?}", heard.actions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_carrier_that_sends_no_rtp_is_hung_up() {
    if !sipp_available() {
        return;
    }
    let carrier = Carrier::start("answer.xml", &[]);
    let setup = Setup::new(vec![carrier.trunk("")], "100").await;
    let heard = place(&setup.gateway, Caller { talk: None, keys: None }).await;
    assert_eq!(heard.last(), Some(&KoeAction::Hangup(CallFailure::Lost)), "{:?}", heard.actions);
    assert_eq!(heard.report.end, CallEnd::Failed);
    assert_eq!(setup.balance().await, yen("100"), "billing stopped when the audio did: at the answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trunk_that_is_down_is_said_plainly() {
    if !sipp_available() {
        return;
    }
    let nobody: Trunk = format!("sip:127.0.0.1:{}", free_port()).parse().unwrap();
    // Nothing listens there (the port was free a moment ago).
    let setup = Setup::new(vec![nobody], "100").await;
    let heard = place(&setup.gateway, Caller { talk: None, keys: None }).await;
    assert_eq!(heard.last(), Some(&KoeAction::Reject(CallFailure::TrunksDown { last_code: None })), "{:?}", heard.actions);
    assert_eq!(setup.balance().await, yen("100"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_auth_answers_the_challenge_and_wrong_credentials_are_refused() {
    if !sipp_available() {
        return;
    }
    let carrier = Carrier::start("auth.xml", &["-rtp_echo"]);
    let setup = Setup::new(vec![carrier.trunk("koe:trunk-secret@")], "100").await;
    let heard = place(&setup.gateway, Caller { talk: Some(Duration::from_secs(1)), keys: None }).await;
    assert!(heard.answered_at().is_some(), "{:?}", heard.actions);
    drop(setup);

    let carrier = Carrier::start("auth.xml", &[]);
    let setup = Setup::new(vec![carrier.trunk("koe:wrong@")], "100").await;
    let heard = place(&setup.gateway, Caller { talk: None, keys: None }).await;
    assert_eq!(heard.last(), Some(&KoeAction::Reject(CallFailure::RefusedByCarrier)), "{:?}", heard.actions);
    assert_eq!(setup.balance().await, yen("100"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reinvite_that_is_never_acknowledged_ends_the_call() {
    if !sipp_available() {
        return;
    }
    let carrier = Carrier::start("reinvite_without_ack.xml", &["-rtp_echo"]);
    let setup = Setup::new(vec![carrier.trunk("")], "100").await;
    let heard = place(&setup.gateway, Caller { talk: None, keys: None }).await;
    assert_eq!(heard.last(), Some(&KoeAction::Hangup(CallFailure::Lost)), "{:?}", heard.actions);
    assert_eq!(heard.report.end, CallEnd::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_presses_go_out_as_rfc_4733_events() {
    if !sipp_available() {
        return;
    }
    // The carrier echoes every RTP packet: the events come back and are read as key presses.
    let carrier = Carrier::start("answer.xml", &["-rtp_echo"]);
    let setup = Setup::new(vec![carrier.trunk("")], "100").await;
    let heard = place(&setup.gateway, Caller { talk: Some(Duration::from_secs(3)), keys: Some("1#9*") }).await;
    let digits: String = heard.report.digits_from_phone.iter().map(|d| d.as_char()).collect();
    assert_eq!(digits, "1#9*");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_unusable_sdp_is_hung_up_at_once_and_costs_nothing() {
    if !sipp_available() {
        return;
    }
    let carrier = Carrier::start("bad_sdp.xml", &[]);
    let setup = Setup::new(vec![carrier.trunk("")], "100").await;
    let heard = place(&setup.gateway, Caller { talk: None, keys: None }).await;
    // The Koe call is never answered: the caller hears that the call was lost.
    assert_eq!(heard.last(), Some(&KoeAction::Reject(CallFailure::Lost)), "{:?}", heard.actions);
    assert!(heard.answered_at().is_none());
    assert_eq!(heard.report.end, CallEnd::Failed);
    assert_eq!(setup.balance().await, yen("100"), "a call nobody could hear is not billed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trunk_over_tcp_carries_the_call() {
    if !sipp_available() {
        return;
    }
    let carrier = Carrier::start("answer.xml", &["-t", "t1", "-rtp_echo"]);
    let trunk: Trunk = format!("sip:{};transport=tcp", carrier.sip).parse().unwrap();
    let setup = Setup::new(vec![trunk], "100").await;
    let heard = place(&setup.gateway, Caller { talk: Some(Duration::from_secs(2)), keys: None }).await;
    assert!(heard.answered_at().is_some(), "{:?}", heard.actions);
    assert_eq!(heard.report.end, CallEnd::CallerHungUp);
    let echoed = &heard.recording[heard.recording.len() / 4..heard.recording.len() * 3 / 4];
    assert!(level_at(echoed, TONE_HZ) > 0.2, "audio flows as over UDP");
    assert_eq!(setup.balance().await, yen("96.4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_carrier_can_hold_and_resume_the_call() {
    if !sipp_available() {
        return;
    }
    let mut carrier = Carrier::start("hold_and_resume.xml", &["-rtp_echo"]);
    let setup = Setup::new(vec![carrier.trunk("")], "100").await;
    let heard = place(&setup.gateway, Caller { talk: Some(Duration::from_secs(3)), keys: None }).await;
    assert!(heard.answered_at().is_some(), "{:?}", heard.actions);
    assert_eq!(heard.report.end, CallEnd::CallerHungUp, "the call outlived the hold");
    assert!(carrier.succeeded(), "the gateway answered the hold with recvonly and the resume with sendrecv");
    assert_eq!(setup.balance().await, yen("96.4"));
}
