//! The test and demo phone (`koe_pstn::phone`) called by the gateway's own call driver
//! (`skypeout::run` over `trunk::SipEndpoint`): real SIP over UDP and real RTP on loopback, the
//! SQLite ledger, nothing beyond cargo. The Koe side is played by the test (a tone into the
//! call, a recording out of it). The phone rings, answers in PCMU, says its chime, echoes the
//! caller and hears key presses; a BYE from either side ends the call and its billing, hanging
//! up a ringing phone declines the call, and a second call meanwhile is busy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use koe_media::driver::{pull_sound, push_sound};
use koe_pstn::bridge::{CallFailure, KoeAction, KoeEvent};
use koe_pstn::dtmf::{parse_digits, DtmfDigit};
use koe_pstn::ledger::{BillingId, CallEnd, Credit, CreditKind, LedgerStore, NewCall, SqliteLedger};
use koe_pstn::media::KoeAudio;
use koe_pstn::meter::MeterConfig;
use koe_pstn::money::{Amount, Currency};
use koe_pstn::phone::{voiced_ms, Phone, PhoneCall, PhoneCallEnd, PhoneConfig, PhoneEvent, CHIME_HZ};
use koe_pstn::rates::RateTable;
use koe_pstn::sdp::Codec;
use koe_pstn::skypeout::{self, CallReport, Gateway, KoeInput, KoeSide};
use koe_pstn::trunk::{SipConfig, SipEndpoint};
use tokio::sync::mpsc;

const FRAME_48K: usize = 960;
const TONE_HZ: f32 = 1000.0;
const NUMBER: &str = "+81312345678";

async fn phone(config: impl FnOnce(&mut PhoneConfig)) -> Phone {
    let mut settings = PhoneConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    config(&mut settings);
    Phone::start(settings).await.unwrap()
}

/// A gateway whose one trunk is `phone`, with alice holding ¥100.
struct Setup {
    _dir: tempfile::TempDir,
    ledger: Arc<dyn LedgerStore>,
    gateway: Gateway,
}

impl Setup {
    async fn new(phone: &Phone) -> Self {
        let dir = tempfile::TempDir::new().unwrap();
        let ledger: Arc<dyn LedgerStore> = Arc::new(SqliteLedger::open(&dir.path().join("ledger.db"), Duration::from_secs(5)).await.unwrap());
        let top_up = Credit { key: "top-up".into(), username: "alice".into(), amount: yen("100").micros(), kind: CreditKind::TopUp };
        ledger.credit(&top_up, 0).await.unwrap();
        let config = SipConfig { listen: SocketAddr::from(([127, 0, 0, 1], 0)), external: None, tls_roots: None, transaction_timeout: Duration::from_secs(4) };
        let sip = SipEndpoint::start(config).await.unwrap();
        let gateway = Gateway {
            ledger: Arc::clone(&ledger),
            sip: Arc::new(sip),
            trunks: Arc::new(vec![phone.trunk_uri().parse().unwrap()]),
            meter: MeterConfig::default(),
            rtp_timeout: Duration::from_secs(3),
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
        number: NUMBER.into(),
        rate: RateTable::built_in().lookup("81312345678").cloned().unwrap(),
        currency: Currency::default(),
        gateway: "gw-test".into(),
        max_open_calls: 2,
    }
}

/// The Koe caller: says a tone, records what it hears from the answer on, hangs up `talk`
/// after the answer (or never), and presses `keys` half a second after the answer.
struct Caller {
    talk: Option<Duration>,
    keys: Option<&'static str>,
}

struct Heard {
    actions: Vec<KoeAction>,
    /// 48 kHz, from the answer.
    recording: Vec<f32>,
    report: CallReport,
}

async fn place(gateway: &Gateway, caller: Caller) -> Heard {
    let (inputs_tx, inputs) = mpsc::unbounded_channel();
    let (actions, mut actions_rx) = mpsc::unbounded_channel();
    let audio = KoeAudio::default();
    let side = KoeSide { inputs, actions, audio: audio.clone() };
    let gateway = gateway.clone();
    let mut call = tokio::spawn(async move { skypeout::run(&gateway, call_to_japan(), side).await });
    let mut heard = Vec::new();
    let mut recording = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut frame = vec![0.0f32; FRAME_48K];
    let mut index = 0usize;
    let mut answered: Option<Instant> = None;
    let (mut hung_up, mut pressed) = (false, false);
    let report = loop {
        tokio::select! {
            report = &mut call => break report.unwrap(),
            Some(action) = actions_rx.recv() => {
                if action == KoeAction::Answer {
                    answered = Some(Instant::now());
                }
                heard.push(action);
            }
            _ = ticker.tick() => {
                let tone: Vec<f32> = (0..FRAME_48K)
                    .map(|i| 0.3 * (std::f32::consts::TAU * TONE_HZ * (index * FRAME_48K + i) as f32 / 48_000.0).sin())
                    .collect();
                index += 1;
                push_sound(&audio.to_phone, &tone);
                pull_sound(&audio.from_phone, &mut frame);
                let Some(at) = answered else { continue };
                recording.extend_from_slice(&frame);
                if let (Some(keys), false) = (caller.keys, pressed) {
                    if at.elapsed() >= Duration::from_millis(500) {
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
    };
    while let Ok(action) = actions_rx.try_recv() {
        heard.push(action);
    }
    Heard { actions: heard, recording, report }
}

/// The phone's events up to the end of its next call.
async fn phone_call(phone: &mut Phone) -> (Vec<PhoneEvent>, PhoneCall) {
    let mut events = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), phone.next_event()).await.expect("the phone's call ends").expect("the phone runs");
        if let PhoneEvent::Ended(call) = event {
            return (events, call);
        }
        events.push(event);
    }
}

/// The level of `hz` in `samples` at `rate_hz` (Goertzel), relative to full scale.
fn level_at(samples: &[f32], hz: f32, rate_hz: f32) -> f32 {
    let coefficient = 2.0 * (std::f32::consts::TAU * hz / rate_hz).cos();
    let (mut s1, mut s2) = (0.0f32, 0.0f32);
    for sample in samples {
        let s0 = sample + coefficient * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let power = s1 * s1 + s2 * s2 - coefficient * s1 * s2;
    2.0 * power.sqrt() / samples.len() as f32
}

fn to_f32(samples: &[i16]) -> Vec<f32> {
    samples.iter().map(|&s| f32::from(s) / 32_768.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_calls_the_phone_which_answers_and_echoes_both_ways() {
    let mut phone = phone(|_| {}).await;
    let setup = Setup::new(&phone).await;
    let (heard, (events, call)) = tokio::join!(place(&setup.gateway, Caller { talk: Some(Duration::from_secs(2)), keys: None }), phone_call(&mut phone));

    assert_eq!(events, vec![PhoneEvent::Ringing { number: NUMBER.into() }, PhoneEvent::Answered { number: NUMBER.into(), codec: Codec::Pcmu }]);
    assert!(heard.actions.contains(&KoeAction::Ringing { early_media: false }), "{:?}", heard.actions);
    assert!(heard.actions.contains(&KoeAction::Answer), "{:?}", heard.actions);
    assert_eq!(heard.report.end, CallEnd::CallerHungUp);
    assert_eq!((call.end, call.codec, call.number.as_str()), (PhoneCallEnd::CallerHungUp, Some(Codec::Pcmu), NUMBER));
    assert!(call.talked >= Duration::from_millis(1800), "{:?}", call.talked);

    // Towards the phone: the caller's tone, through the 48 → 8 kHz resampler and G.711.
    let phone_heard = to_f32(&call.heard);
    assert!(voiced_ms(&call.heard) >= 1500, "the phone heard {} ms of sound", voiced_ms(&call.heard));
    let level = level_at(&phone_heard[phone_heard.len() / 4..phone_heard.len() * 3 / 4], TONE_HZ, 8000.0);
    assert!(level > 0.2, "the phone heard the tone at {level} (sent at 0.3)");
    assert!(call.media.packets_received > 80 && call.media.packets_sent > 80, "{:?}", call.media);
    assert_eq!(call.media.packets_refused, 0, "{:?}", call.media);

    // Towards the caller: the chime first, then the caller's own tone echoed.
    let chime = &heard.recording[..heard.recording.len().min(48_000 * 6 / 10)];
    let ding = level_at(chime, CHIME_HZ[0], 48_000.0);
    assert!(ding > 0.03, "the caller heard the chime at {ding}");
    let echoed = &heard.recording[heard.recording.len() / 2..heard.recording.len() * 9 / 10];
    let level = level_at(echoed, TONE_HZ, 48_000.0);
    assert!(level > 0.2, "the tone came back at {level} (sent at 0.3)");
    assert!(level_at(echoed, 1500.0, 48_000.0) < 0.02, "and nothing else");

    // Two seconds at ¥3.60/min, 60/60: one minute.
    assert!(heard.actions.iter().any(|a| matches!(a, KoeAction::Billed { billed_secs: 2..=3, amount } if *amount == yen("3.6"))), "{:?}", heard.actions);
    assert_eq!(setup.balance().await, yen("96.4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phone_hanging_up_ends_the_call_and_its_billing() {
    let mut phone = phone(|config| config.hang_up_after = Some(Duration::from_secs(1))).await;
    let setup = Setup::new(&phone).await;
    let (heard, (_, call)) = tokio::join!(place(&setup.gateway, Caller { talk: None, keys: None }), phone_call(&mut phone));
    assert_eq!(call.end, PhoneCallEnd::PhoneHungUp);
    assert_eq!(heard.report.end, CallEnd::FarEndHungUp);
    assert!(heard.actions.contains(&KoeAction::Hangup(CallFailure::Ended)), "{:?}", heard.actions);
    assert!(heard.actions.iter().any(|a| matches!(a, KoeAction::Billed { billed_secs: 1, .. })), "{:?}", heard.actions);
    assert_eq!(setup.balance().await, yen("96.4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phone_hangs_up_when_told_to() {
    let mut phone = phone(|_| {}).await;
    let setup = Setup::new(&phone).await;
    let hang_up = async {
        let mut events = Vec::new();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(20), phone.next_event()).await.unwrap().unwrap();
            match event {
                PhoneEvent::Answered { .. } => {
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    phone.hang_up();
                }
                PhoneEvent::Ended(call) => return (events, call),
                _ => {}
            }
            events.push(event);
        }
    };
    let (heard, (_, call)) = tokio::join!(place(&setup.gateway, Caller { talk: None, keys: None }), hang_up);
    assert_eq!(call.end, PhoneCallEnd::PhoneHungUp);
    assert_eq!(heard.report.end, CallEnd::FarEndHungUp);
    assert!(!call.heard.is_empty(), "what it heard before it hung up is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_presses_reach_the_phone_as_rfc_4733_events() {
    let mut phone = phone(|_| {}).await;
    let setup = Setup::new(&phone).await;
    let caller = Caller { talk: Some(Duration::from_millis(2500)), keys: Some("12#") };
    let (heard, (events, call)) = tokio::join!(place(&setup.gateway, caller), phone_call(&mut phone));
    assert_eq!(heard.report.end, CallEnd::CallerHungUp);
    let keys: Vec<DtmfDigit> = parse_digits("12#").unwrap();
    assert_eq!(call.digits, keys);
    let reported: Vec<DtmfDigit> = events.iter().filter_map(|e| if let PhoneEvent::Digit(d) = e { Some(*d) } else { None }).collect();
    assert_eq!(reported, keys, "each key is reported as it is pressed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_call_while_the_phone_talks_is_busy() {
    let mut phone = phone(|_| {}).await;
    let setup = Setup::new(&phone).await;
    let first = place(&setup.gateway, Caller { talk: Some(Duration::from_secs(2)), keys: None });
    let second = async {
        tokio::time::sleep(Duration::from_millis(900)).await;
        place(&setup.gateway, Caller { talk: None, keys: None }).await
    };
    let (first, second, (events, call)) = tokio::join!(first, second, phone_call(&mut phone));
    assert_eq!(first.report.end, CallEnd::CallerHungUp);
    assert_eq!(call.end, PhoneCallEnd::CallerHungUp);
    assert_eq!(second.actions.last(), Some(&KoeAction::Reject(CallFailure::Busy)), "{:?}", second.actions);
    assert_eq!(second.report.end, CallEnd::Busy);
    assert!(events.contains(&PhoneEvent::Refused { number: NUMBER.into(), code: 486 }), "{events:?}");
    assert_eq!(setup.balance().await, yen("96.4"), "only the answered call costs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_up_a_ringing_phone_declines_the_call_and_costs_nothing() {
    let mut phone = phone(|config| config.ring = Duration::from_secs(10)).await;
    let setup = Setup::new(&phone).await;
    let decline = async {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), phone.next_event()).await.unwrap().unwrap() {
                PhoneEvent::Ringing { .. } => phone.hang_up(),
                PhoneEvent::Ended(call) => return call,
                other => panic!("a declined call does not {other:?}"),
            }
        }
    };
    let (heard, call) = tokio::join!(place(&setup.gateway, Caller { talk: None, keys: None }), decline);
    assert_eq!((call.end, call.codec), (PhoneCallEnd::Declined, None));
    assert_eq!(heard.report.end, CallEnd::NotAnswered);
    assert!(matches!(heard.actions.last(), Some(KoeAction::Reject(_))), "{:?}", heard.actions);
    assert!(!heard.actions.contains(&KoeAction::Answer));
    assert_eq!(setup.balance().await, yen("100"));
}
