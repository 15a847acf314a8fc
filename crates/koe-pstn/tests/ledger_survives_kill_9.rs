//! The ledger under crashes: a gateway process carrying many SkypeOut calls at once (real SIP
//! and RTP to sipp, billing on a real SQLite file or PostgreSQL) is killed with SIGKILL at
//! random moments, again and again, and restarted; each start recovers the calls the last run
//! left open. At the end, for every account:
//! - the balance is the credits less the posted charges;
//! - the posted charges are the sum of the call records, one charge at most per call;
//! - every call is settled at no more than its rate's price for the talk it billed;
//! - no hold is left open.
//!
//! The gateway process is this test binary run again with `KOE_CRASH_WORKLOAD` set (the
//! workload below), so the kill lands in the same code the gateway runs. Needs sipp; skips
//! without it unless `KOE_REQUIRE_SIPP=1`. The PostgreSQL run needs `KOE_TEST_POSTGRES_URL`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use koe_pstn::bridge::KoeEvent;
use koe_pstn::ledger::{open_ledger, BillingId, CallEnd, CallFilter, Credit, CreditKind, LedgerStore, NewCall, REVENUE_ACCOUNT};
use koe_pstn::media::KoeAudio;
use koe_pstn::meter::MeterConfig;
use koe_pstn::money::{Amount, Currency};
use koe_pstn::rates::RateTable;
use koe_pstn::skypeout::{self, Gateway, KoeInput, KoeSide};
use koe_pstn::trunk::{SipConfig, SipEndpoint};
use tokio::sync::mpsc;

const GATEWAY: &str = "crash-gw";
const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];
/// Each user's credit: enough for many calls, not for all (some are cut off).
const CREDIT: &str = "60";
/// Times the gateway is killed.
const KILLS: usize = 8;
/// Per-second billing at 3 ¥/min with a fee, so every second and every chunk moves money.
const RATES: &str = "prefix,destination,price_per_minute,increment,connection_fee\n81,Japan,3,1/1,0.5\n";

fn sipp_available() -> bool {
    let found = Command::new("sipp").arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found && std::env::var("KOE_REQUIRE_SIPP").as_deref() == Ok("1") {
        panic!("KOE_REQUIRE_SIPP=1 but sipp is not installed (apt install sip-tester)");
    }
    found
}

fn random_u64() -> u64 {
    BillingId::random().0 as u64
}

/// The workload, when this binary is the gateway: calls for every user, forever, each lasting
/// a random time, until killed.
async fn workload(db: &str, trunk: &str) {
    {
        let ledger = open_ledger(db, Duration::from_secs(10)).await.unwrap();
        // A restarted gateway first settles what it left open.
        ledger.recover(GATEWAY, Duration::from_secs(600), now_ms()).await.unwrap();
        let sip = SipEndpoint::start(SipConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            external: None,
            tls_roots: None,
            transaction_timeout: Duration::from_secs(4),
        })
        .await
        .unwrap();
        // Short chunks and frequent progress: holds are extended and progress recorded many
        // times a call, so a kill can land in any of those writes.
        let meter = MeterConfig {
            chunk_secs: 2,
            extend_before: Duration::from_millis(1500),
            warning_before: Duration::from_secs(1),
            progress_every: Duration::from_millis(300),
            ..MeterConfig::default()
        };
        let gateway = Gateway {
            ledger: Arc::clone(&ledger),
            sip: Arc::new(sip),
            trunks: Arc::new(vec![trunk.parse().unwrap()]),
            meter,
            rtp_timeout: Duration::from_secs(10),
            caller_id: "+81300000000".into(),
        };
        let rates = RateTable::parse(RATES).unwrap();
        let mut tasks = Vec::new();
        for user in USERS {
            let (gateway, rate) = (gateway.clone(), rates.lookup("81312345678").cloned().unwrap());
            tasks.push(tokio::spawn(async move {
                loop {
                    let call = NewCall {
                        id: BillingId::random(),
                        username: user.into(),
                        number: "+81312345678".into(),
                        rate: rate.clone(),
                        currency: Currency::default(),
                        gateway: GATEWAY.into(),
                        max_open_calls: 2,
                    };
                    let (inputs_tx, inputs) = mpsc::unbounded_channel();
                    let (actions, _actions_rx) = mpsc::unbounded_channel();
                    let side = KoeSide { inputs, actions, audio: KoeAudio::default() };
                    let talk = Duration::from_millis(200 + random_u64() % 2800);
                    let hang_up = tokio::spawn(async move {
                        tokio::time::sleep(talk).await;
                        let _ = inputs_tx.send(KoeInput::Event(KoeEvent::HungUp));
                    });
                    let _ = skypeout::run(&gateway, call, side).await;
                    hang_up.abort();
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// sipp answering every call and echoing its audio, for as long as the test runs.
struct Carrier(Child, String);

impl Carrier {
    fn start() -> Self {
        let random = random_u64();
        let ip = format!("127.{}.{}.{}", 1 + random % 250, (random >> 8) % 256, 1 + (random >> 16) % 250);
        let scenario = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sipp/answer.xml");
        let child = Command::new("sipp")
            .args(["-sf", scenario.to_str().unwrap(), "-i", &ip, "-p", "5060", "-mi", &ip, "-mp", "6000"])
            .args(["-rtp_echo", "-nostdin", "-timeout", "600s", "-l", "64"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self(child, format!("sip:{ip}:5060"))
    }
}

impl Drop for Carrier {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the gateway, kills it with SIGKILL at random moments, restarts it; then checks the
/// ledger. `db` is the ledger's URL.
async fn crash_and_check(test: &str, db: &str) {
    let carrier = Carrier::start();
    let ledger = open_ledger(db, Duration::from_secs(10)).await.unwrap();
    for user in USERS {
        let credit = Credit { key: format!("start:{user}"), username: user.into(), amount: CREDIT.parse::<Amount>().unwrap().micros(), kind: CreditKind::TopUp };
        ledger.credit(&credit, now_ms()).await.unwrap();
    }
    let started = Instant::now();
    for kill in 0..KILLS {
        let mut gateway = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture"])
            .env("KOE_CRASH_WORKLOAD", db)
            .env("KOE_CRASH_TRUNK", &carrier.1)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Random moments: early ones hit start-up and recovery, later ones calls in flight.
        let alive = Duration::from_millis(300 + random_u64() % 3500);
        tokio::time::sleep(alive).await;
        assert!(gateway.try_wait().unwrap().is_none(), "the gateway must still be running when killed (run {kill})");
        gateway.kill().unwrap(); // SIGKILL
        gateway.wait().unwrap();
    }
    // The last restart's recovery, as the next start of the gateway would do it.
    ledger.recover(GATEWAY, Duration::from_secs(600), now_ms()).await.unwrap();
    check(ledger.as_ref()).await;
    eprintln!("{test}: {KILLS} kills in {:.1} s", started.elapsed().as_secs_f64());
}

async fn check(ledger: &dyn LedgerStore) {
    let rates = RateTable::parse(RATES).unwrap();
    let rate = rates.lookup("81312345678").unwrap();
    let calls = ledger.calls(&CallFilter::default()).await.unwrap();
    assert!(calls.len() >= KILLS, "calls were carried: {}", calls.len());
    let mut ends: HashMap<&'static str, usize> = HashMap::new();
    for user in USERS {
        let balance = ledger.balance(user).await.unwrap();
        let entries = ledger.entries(Some(user), u32::MAX).await.unwrap();
        let account = format!("user:{user}");
        let credits: i64 = entries.iter().filter(|e| e.credit == account).map(|e| e.amount.micros()).sum();
        let charges: Vec<_> = entries.iter().filter(|e| e.debit == account && e.credit == REVENUE_ACCOUNT).collect();
        let charged: i64 = charges.iter().map(|e| e.amount.micros()).sum();
        assert_eq!(balance.balance.micros(), credits - charged, "{user}: balance = credits − charges");
        assert_eq!(balance.held, Amount::ZERO, "{user}: no hold left open");
        assert!(balance.balance.micros() >= 0, "{user}: never overspent ({:?})", balance.balance);
        let records: Vec<_> = calls.iter().filter(|c| c.username == user).collect();
        let recorded: i64 = records.iter().map(|c| c.amount.expect("every call settled").micros()).sum();
        assert_eq!(charged, recorded, "{user}: posted charges = the sum of the call records");
        let mut charged_calls: Vec<BillingId> = charges.iter().map(|e| e.call.expect("a charge names its call")).collect();
        let count = charged_calls.len();
        charged_calls.sort();
        charged_calls.dedup();
        assert_eq!(charged_calls.len(), count, "{user}: no call charged twice");
        for record in records {
            let end = record.end.expect("every call settled");
            *ends.entry(end.as_str()).or_default() += 1;
            let billed = record.billed_secs.expect("settled");
            let amount = record.amount.expect("settled");
            let price = rate.cost(billed, &Currency::default());
            assert!(amount <= price, "{user}: call {} billed {amount:?} for {billed} s, more than its price {price:?}", record.id);
            if !matches!(end, CallEnd::CutOff | CallEnd::Recovered) {
                assert_eq!(amount, price, "{user}: call {} ({}) billed exactly", record.id, end.as_str());
            }
        }
    }
    eprintln!("call ends: {ends:?}");
    assert!(ends.get("recovered").copied().unwrap_or(0) > 0, "some kills landed in calls: {ends:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_ledger_survives_kill_9() {
    if let (Ok(db), Ok(trunk)) = (std::env::var("KOE_CRASH_WORKLOAD"), std::env::var("KOE_CRASH_TRUNK")) {
        return workload(&db, &trunk).await;
    }
    if !sipp_available() {
        eprintln!("skipped: sipp is not installed (apt install sip-tester)");
        return;
    }
    let dir = tempfile::TempDir::new().unwrap();
    let db = format!("sqlite:{}", dir.path().join("ledger.db").display());
    crash_and_check("sqlite_ledger_survives_kill_9", &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_ledger_survives_kill_9() {
    if let (Ok(db), Ok(trunk)) = (std::env::var("KOE_CRASH_WORKLOAD"), std::env::var("KOE_CRASH_TRUNK")) {
        return workload(&db, &trunk).await;
    }
    if !sipp_available() {
        eprintln!("skipped: sipp is not installed (apt install sip-tester)");
        return;
    }
    let url = match std::env::var("KOE_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => url,
        _ if std::env::var("KOE_REQUIRE_POSTGRES").as_deref() == Ok("1") => panic!("KOE_REQUIRE_POSTGRES=1 but KOE_TEST_POSTGRES_URL is not set"),
        _ => {
            eprintln!("skipped: set KOE_TEST_POSTGRES_URL to run the PostgreSQL crash test");
            return;
        }
    };
    let schema = format!("koe_crash_{:016x}", random_u64());
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    admin.batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
    // The schema travels in the URL: libpq's `options` parameter sets the search path.
    let separator = if url.contains('?') { '&' } else { '?' };
    let db = format!("{url}{separator}options=-csearch_path%3D{schema}");
    crash_and_check("postgres_ledger_survives_kill_9", &db).await;
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}
