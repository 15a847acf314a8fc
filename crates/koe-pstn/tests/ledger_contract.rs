//! The ledger contract: every behaviour billing relies on, run against the SQLite ledger and
//! the PostgreSQL ledger alike, so an operator can switch `--db` (or share one PostgreSQL
//! ledger between gateways) without a yen moving differently.
//!
//! Each behaviour is one generic function in `contract`; `contract_tests!` turns it into
//! `sqlite::<behaviour>` and `postgres::<behaviour>`. PostgreSQL tests need
//! `KOE_TEST_POSTGRES_URL` (CI sets it, with `KOE_REQUIRE_POSTGRES=1` so they cannot skip) and
//! each runs in a schema of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use koe_pstn::ledger::{
    BillingId, CallEnd, CallFilter, Credit, CreditKind, HoldOutcome, LedgerError, LedgerStore, NewCall, PostgresLedger,
    Settlement, SqliteLedger, VoucherCode, VoucherError, REVENUE_ACCOUNT,
};
use koe_pstn::money::{Amount, Currency};
use koe_pstn::rates::RateTable;

/// Generous, so a loaded CI machine never turns the racing test into a `Busy` failure.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls racing for one user's credit in `racing_holds_never_overspend`.
const RACING_CALLS: usize = 16;

/// One database that a test can open any number of ledger handles on (as several gateways
/// would); every open runs the schema migration.
trait TestDatabase {
    async fn open(&self) -> Result<Arc<dyn LedgerStore>>;
}

struct SqliteDatabase {
    dir: tempfile::TempDir,
}

impl SqliteDatabase {
    fn new() -> Result<Self> {
        Ok(Self { dir: tempfile::TempDir::new()? })
    }
}

impl TestDatabase for SqliteDatabase {
    async fn open(&self) -> Result<Arc<dyn LedgerStore>> {
        let path = self.dir.path().join("ledger.db");
        Ok(Arc::new(SqliteLedger::open(&path, SQLITE_BUSY_TIMEOUT).await.with_context(|| format!("opening {}", path.display()))?))
    }
}

/// The PostgreSQL server to test against; without `KOE_TEST_POSTGRES_URL` the tests skip with
/// a note, unless `KOE_REQUIRE_POSTGRES=1`.
fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("KOE_TEST_POSTGRES_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ if std::env::var("KOE_REQUIRE_POSTGRES").as_deref() == Ok("1") => panic!(
            "KOE_REQUIRE_POSTGRES=1 but KOE_TEST_POSTGRES_URL is not set: point it at a PostgreSQL database \
             the tests may create schemas in (.ci/run sets one up)"
        ),
        _ => {
            let _ = writeln!(std::io::stderr(), "postgres::{test}: skipped: set KOE_TEST_POSTGRES_URL to run the PostgreSQL ledger tests");
            None
        }
    }
}

struct PostgresDatabase {
    url: String,
    schema: String,
    config: tokio_postgres::Config,
}

impl PostgresDatabase {
    async fn create(test: &str) -> Result<Option<Self>> {
        let Some(url) = postgres_url(test) else { return Ok(None) };
        let schema = format!("koe_ledger_test_{:016x}", BillingId::random().0 as u64);
        admin_client(&url).await?.batch_execute(&format!("CREATE SCHEMA {schema}")).await?;
        let mut config: tokio_postgres::Config = url.parse().context("KOE_TEST_POSTGRES_URL is not a PostgreSQL URL")?;
        config.options(format!("-csearch_path={schema}"));
        let database = Self { url: url.clone(), schema, config };
        database.open().await?;
        // A search_path that did not take effect would put every test's tables in `public`.
        let tables: i64 = admin_client(&url)
            .await?
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'ledger_entries'",
                &[&database.schema],
            )
            .await?
            .get(0);
        ensure!(tables == 1, "the ledger did not create its tables in the test schema {}", database.schema);
        Ok(Some(database))
    }
}

async fn admin_client(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.context("connecting to KOE_TEST_POSTGRES_URL")?;
    tokio::spawn(connection);
    Ok(client)
}

impl TestDatabase for PostgresDatabase {
    async fn open(&self) -> Result<Arc<dyn LedgerStore>> {
        Ok(Arc::new(PostgresLedger::connect_with(self.config.clone()).await?))
    }
}

impl Drop for PostgresDatabase {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        let dropped = std::thread::spawn(move || -> Result<()> {
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
                admin_client(&url).await?.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await?;
                Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}: {dropped:?}", self.schema);
        }
    }
}

fn yen(text: &str) -> Amount {
    text.parse().expect("a test amount")
}

/// A call to a Japanese mobile (21 ¥/min, 60/60) admitted by `gateway`.
fn mobile_call(username: &str, gateway: &str) -> NewCall {
    let rate = RateTable::built_in().lookup("819012345678").cloned().expect("the built-in table has Japan mobile");
    NewCall {
        id: BillingId::random(),
        username: username.into(),
        number: "+819012345678".into(),
        rate,
        currency: Currency::default(),
        gateway: gateway.into(),
        max_open_calls: 4,
    }
}

async fn top_up(ledger: &dyn LedgerStore, username: &str, amount: &str) -> Result<()> {
    let credit = Credit { key: format!("test-top-up-{:x}", BillingId::random().0), username: username.into(), amount: yen(amount).micros(), kind: CreditKind::TopUp };
    ledger.credit(&credit, 1_000).await?;
    Ok(())
}

fn ended(billed_secs: u64, amount: &str) -> Settlement {
    Settlement { billed_secs, amount: yen(amount), end: CallEnd::CallerHungUp }
}

mod contract {
    use super::*;

    pub async fn a_top_up_is_posted_once_per_key(db: &impl TestDatabase) -> Result<()> {
        let ledger = db.open().await?;
        let credit = Credit { key: "order-17".into(), username: "alice".into(), amount: yen("1000").micros(), kind: CreditKind::TopUp };
        assert_eq!(ledger.credit(&credit, 1_000).await?.balance, yen("1000"));
        assert_eq!(ledger.credit(&credit, 2_000).await?.balance, yen("1000"), "the same key again is a no-op");
        let changed = Credit { amount: yen("5000").micros(), ..credit };
        assert_eq!(ledger.credit(&changed, 3_000).await, Err(LedgerError::KeyReused("order-17".into())));
        assert_eq!(ledger.balance("alice").await?.balance, yen("1000"));
        assert_eq!(ledger.entries(Some("alice"), 10).await?.len(), 1);
        assert_eq!(ledger.balance("bob").await?.balance, Amount::ZERO);
        Ok(())
    }

    pub async fn a_call_holds_then_posts_exactly_and_releases_the_rest(db: &impl TestDatabase) -> Result<()> {
        let ledger = db.open().await?;
        top_up(ledger.as_ref(), "alice", "100").await?;
        let call = mobile_call("alice", "gw1");
        assert_eq!(ledger.open_call(&call, yen("63"), yen("21"), 10_000).await?, HoldOutcome::Held { granted: yen("63") });
        let balance = ledger.balance("alice").await?;
        assert_eq!((balance.balance, balance.held, balance.available()), (yen("100"), yen("63"), yen("37")));
        // Only 37 is left: the extension gets all of it, as it is at least one increment.
        assert_eq!(ledger.hold(call.id, 1, yen("63"), yen("21"), 20_000).await?, HoldOutcome::Held { granted: yen("37") });
        assert_eq!(ledger.hold(call.id, 2, yen("63"), yen("21"), 30_000).await?, HoldOutcome::Insufficient { available: Amount::ZERO });
        ledger.record_answer(call.id, Some("trunk-a"), 11_000).await?;
        let record = ledger.settle(call.id, ended(61, "42"), 72_000).await?;
        assert_eq!((record.billed_secs, record.amount, record.end), (Some(61), Some(yen("42")), Some(CallEnd::CallerHungUp)));
        assert_eq!((record.answered_ms, record.ended_ms, record.trunk.as_deref()), (Some(11_000), Some(72_000), Some("trunk-a")));
        let balance = ledger.balance("alice").await?;
        assert_eq!((balance.balance, balance.held), (yen("58"), Amount::ZERO));
        let charges = ledger.entries(Some("alice"), 10).await?;
        assert_eq!(charges[0].credit, REVENUE_ACCOUNT);
        assert_eq!((charges[0].amount, charges[0].call), (yen("42"), Some(call.id)));
        Ok(())
    }

    pub async fn every_write_is_idempotent(db: &impl TestDatabase) -> Result<()> {
        let ledger = db.open().await?;
        top_up(ledger.as_ref(), "alice", "100").await?;
        let call = mobile_call("alice", "gw1");
        let first = ledger.open_call(&call, yen("42"), yen("21"), 10_000).await?;
        assert_eq!(ledger.open_call(&call, yen("42"), yen("21"), 10_500).await?, first);
        assert_eq!(ledger.hold(call.id, 1, yen("21"), yen("21"), 20_000).await?, HoldOutcome::Held { granted: yen("21") });
        assert_eq!(ledger.hold(call.id, 1, yen("21"), yen("21"), 20_500).await?, HoldOutcome::Held { granted: yen("21") });
        assert_eq!(ledger.balance("alice").await?.held, yen("63"), "each chunk is held once");
        let settled = ledger.settle(call.id, ended(61, "42"), 80_000).await?;
        assert_eq!(ledger.settle(call.id, ended(61, "42"), 81_000).await?, settled);
        assert_eq!(ledger.settle(call.id, ended(200, "84"), 82_000).await?, settled, "a settled call stays as settled");
        assert_eq!(ledger.balance("alice").await?.balance, yen("58"));
        assert_eq!(ledger.entries(Some("alice"), 10).await?.len(), 2, "one top-up and one charge");
        Ok(())
    }

    pub async fn a_settlement_never_posts_more_than_was_held(db: &impl TestDatabase) -> Result<()> {
        let ledger = db.open().await?;
        top_up(ledger.as_ref(), "alice", "100").await?;
        let call = mobile_call("alice", "gw1");
        ledger.open_call(&call, yen("21"), yen("21"), 10_000).await?;
        let record = ledger.settle(call.id, ended(3600, "1260"), 20_000).await?;
        assert_eq!(record.amount, Some(yen("21")));
        assert_eq!(ledger.balance("alice").await?.balance, yen("79"));
        Ok(())
    }

    pub async fn an_unanswered_call_costs_nothing(db: &impl TestDatabase) -> Result<()> {
        let ledger = db.open().await?;
        top_up(ledger.as_ref(), "alice", "100").await?;
        let call = mobile_call("alice", "gw1");
        ledger.open_call(&call, yen("63"), yen("21"), 10_000).await?;
        let record = ledger.settle(call.id, Settlement { billed_secs: 0, amount: Amount::ZERO, end: CallEnd::Busy }, 15_000).await?;
        assert_eq!((record.amount, record.end), (Some(Amount::ZERO), Some(CallEnd::Busy)));
        let balance = ledger.balance("alice").await?;
        assert_eq!((balance.balance, balance.held), (yen("100"), Amount::ZERO));
        assert_eq!(ledger.entries(Some("alice"), 10).await?.len(), 1, "only the top-up");
        Ok(())
    }

    pub async fn racing_holds_never_overspend(db: &impl TestDatabase) -> Result<()> {
        let setup = db.open().await?;
        top_up(setup.as_ref(), "alice", "100").await?;
        // Each call has its own ledger handle, as if each came through another gateway.
        let mut handles = Vec::new();
        for _ in 0..RACING_CALLS {
            handles.push(db.open().await?);
        }
        let outcomes = futures::future::join_all(handles.iter().enumerate().map(|(i, ledger)| {
            let call = NewCall { max_open_calls: 100, ..mobile_call("alice", &format!("gw{i}")) };
            async move { ledger.open_call(&call, yen("21"), yen("21"), 10_000).await }
        }))
        .await;
        let granted: Vec<Amount> = outcomes
            .into_iter()
            .filter_map(|outcome| match outcome {
                Ok(HoldOutcome::Held { granted }) => Some(Ok(granted)),
                Ok(_) => None,
                Err(error) => Some(Err(error)),
            })
            .collect::<Result<_, _>>()?;
        assert_eq!(granted.len(), 4, "100 pays for four minutes at 21: {granted:?}");
        let balance = setup.balance("alice").await?;
        assert_eq!((balance.held, balance.available()), (yen("84"), yen("16")));
        Ok(())
    }

    pub async fn too_many_open_calls_are_refused(db: &impl TestDatabase) -> Result<()> {
        let ledger = db.open().await?;
        top_up(ledger.as_ref(), "alice", "1000").await?;
        let limit = |call: NewCall| NewCall { max_open_calls: 2, ..call };
        let first = limit(mobile_call("alice", "gw1"));
        ledger.open_call(&first, yen("21"), yen("21"), 1).await?;
        ledger.open_call(&limit(mobile_call("alice", "gw1")), yen("21"), yen("21"), 2).await?;
        assert_eq!(ledger.open_call(&limit(mobile_call("alice", "gw1")), yen("21"), yen("21"), 3).await?, HoldOutcome::TooManyCalls { open: 2 });
        ledger.settle(first.id, ended(0, "0"), 4).await?;
        assert!(matches!(ledger.open_call(&limit(mobile_call("alice", "gw1")), yen("21"), yen("21"), 5).await?, HoldOutcome::Held { .. }));
        assert!(matches!(ledger.open_call(&limit(mobile_call("bob", "gw1")), yen("21"), yen("21"), 5).await?, HoldOutcome::Insufficient { .. }));
        Ok(())
    }

    pub async fn a_refused_or_unknown_call_holds_nothing(db: &impl TestDatabase) -> Result<()> {
        let ledger = db.open().await?;
        top_up(ledger.as_ref(), "alice", "20").await?;
        let call = mobile_call("alice", "gw1");
        assert_eq!(ledger.open_call(&call, yen("63"), yen("21"), 1).await?, HoldOutcome::Insufficient { available: yen("20") });
        assert_eq!(ledger.call(call.id).await?, None, "a refused call leaves no record");
        assert_eq!(ledger.hold(call.id, 1, yen("1"), yen("1"), 2).await, Err(LedgerError::UnknownCall(call.id)));
        top_up(ledger.as_ref(), "alice", "100").await?;
        ledger.open_call(&call, yen("21"), yen("21"), 3).await?;
        ledger.settle(call.id, ended(0, "0"), 4).await?;
        assert_eq!(ledger.hold(call.id, 1, yen("1"), yen("1"), 5).await, Err(LedgerError::CallClosed(call.id)));
        assert_eq!(ledger.balance("alice").await?.held, Amount::ZERO);
        Ok(())
    }

    pub async fn recovery_posts_recorded_progress_and_releases_the_rest(db: &impl TestDatabase) -> Result<()> {
        let ledger = db.open().await?;
        top_up(ledger.as_ref(), "alice", "1000").await?;
        let talked = mobile_call("alice", "gw1");
        ledger.open_call(&talked, yen("63"), yen("21"), 10_000).await?;
        ledger.record_answer(talked.id, Some("trunk-a"), 12_000).await?;
        ledger.record_progress(talked.id, 61, 73_000).await?;
        ledger.record_progress(talked.id, 30, 74_000).await?;
        let ringing = mobile_call("alice", "gw1");
        ledger.open_call(&ringing, yen("63"), yen("21"), 20_000).await?;
        let elsewhere = mobile_call("alice", "gw2");
        ledger.open_call(&elsewhere, yen("63"), yen("21"), 30_000).await?;
        ledger.record_answer(elsewhere.id, None, 31_000).await?;
        ledger.record_progress(elsewhere.id, 45, 76_000).await?;

        // gw1 restarts: its two calls are settled, gw2's live call is left alone.
        let recovered = ledger.recover("gw1", Duration::from_secs(60), 80_000).await?;
        let mut ids: Vec<BillingId> = recovered.iter().map(|call| call.id).collect();
        ids.sort();
        let mut expected = vec![talked.id, ringing.id];
        expected.sort();
        assert_eq!(ids, expected);
        let talked_record = ledger.call(talked.id).await?.context("talked")?;
        assert_eq!(
            (talked_record.billed_secs, talked_record.amount, talked_record.end),
            (Some(61), Some(yen("42")), Some(CallEnd::Recovered)),
            "progress never goes back: 61 s, two started minutes"
        );
        assert_eq!(ledger.call(ringing.id).await?.context("ringing")?.amount, Some(Amount::ZERO));
        assert!(ledger.call(elsewhere.id).await?.context("elsewhere")?.is_open());
        assert_eq!(ledger.recover("gw1", Duration::from_secs(60), 81_000).await?, Vec::new(), "recovery is idempotent");

        // gw2 is not heard from for a minute: any gateway settles its call.
        let abandoned = ledger.recover("gw3", Duration::from_secs(60), 76_000 + 61_000).await?;
        assert_eq!(abandoned.iter().map(|call| call.id).collect::<Vec<_>>(), vec![elsewhere.id]);
        assert_eq!(abandoned[0].amount, Some(yen("21")));
        let balance = ledger.balance("alice").await?;
        assert_eq!((balance.balance, balance.held), (yen("937"), Amount::ZERO));
        Ok(())
    }

    pub async fn vouchers_redeem_once(db: &impl TestDatabase) -> Result<()> {
        let ledger = db.open().await?;
        let mut rng = rand_core::OsRng;
        let codes = [VoucherCode::generate(&mut rng), VoucherCode::generate(&mut rng)];
        ledger.create_vouchers(&codes, yen("500"), 1_000).await?;
        assert_eq!(ledger.redeem_voucher("alice", &codes[0], 2_000).await, Ok(yen("500")));
        assert_eq!(ledger.redeem_voucher("alice", &codes[0], 3_000).await, Err(VoucherError::AlreadyUsed));
        assert_eq!(ledger.redeem_voucher("bob", &codes[0], 3_000).await, Err(VoucherError::AlreadyUsed));
        let forged = VoucherCode::generate(&mut rng);
        assert_eq!(ledger.redeem_voucher("bob", &forged, 4_000).await, Err(VoucherError::Unknown));
        assert_eq!(ledger.redeem_voucher("bob", &codes[1], 5_000).await, Ok(yen("500")));
        assert_eq!(ledger.balance("alice").await?.balance, yen("500"));
        assert_eq!(ledger.balance("bob").await?.balance, yen("500"));
        Ok(())
    }

    pub async fn adjustments_correct_without_editing_history(db: &impl TestDatabase) -> Result<()> {
        let ledger = db.open().await?;
        top_up(ledger.as_ref(), "alice", "100").await?;
        let refund = Credit { key: "refund-1".into(), username: "alice".into(), amount: yen("21").micros(), kind: CreditKind::Adjustment { reason: "dropped call".into() } };
        ledger.credit(&refund, 2_000).await?;
        let correction = Credit { key: "fix-1".into(), username: "alice".into(), amount: -yen("50").micros(), kind: CreditKind::Adjustment { reason: "double top-up".into() } };
        assert_eq!(ledger.credit(&correction, 3_000).await?.balance, yen("71"));
        let entries = ledger.entries(Some("alice"), 10).await?;
        assert_eq!(entries.len(), 3, "every correction is an entry of its own");
        assert_eq!(entries[0].memo, "adjustment: double top-up");
        assert_eq!((entries[0].debit.as_str(), entries[0].amount), ("user:alice", yen("50")));
        Ok(())
    }

    pub async fn call_records_list_by_user_and_time(db: &impl TestDatabase) -> Result<()> {
        let ledger = db.open().await?;
        top_up(ledger.as_ref(), "alice", "100").await?;
        top_up(ledger.as_ref(), "bob", "100").await?;
        let mut ids = Vec::new();
        for (i, user) in ["alice", "bob", "alice"].into_iter().enumerate() {
            let call = mobile_call(user, "gw1");
            ledger.open_call(&call, yen("21"), yen("21"), 1_000 * (i as i64 + 1)).await?;
            ledger.settle(call.id, ended(0, "0"), 1_000 * (i as i64 + 1) + 500).await?;
            ids.push(call.id);
        }
        let alices = ledger.calls(&CallFilter { username: Some("alice".into()), ..CallFilter::default() }).await?;
        assert_eq!(alices.iter().map(|c| c.id).collect::<Vec<_>>(), vec![ids[2], ids[0]], "newest first");
        let since = ledger.calls(&CallFilter { since_ms: Some(2_000), ..CallFilter::default() }).await?;
        assert_eq!(since.len(), 2);
        let limited = ledger.calls(&CallFilter { limit: Some(1), ..CallFilter::default() }).await?;
        assert_eq!(limited.iter().map(|c| c.id).collect::<Vec<_>>(), vec![ids[2]]);
        assert_eq!(limited[0].number, "+819012345678");
        assert_eq!(limited[0].destination, "Japan mobile");
        Ok(())
    }

    pub async fn reopening_migrates_idempotently_and_keeps_money(db: &impl TestDatabase) -> Result<()> {
        let first = db.open().await?;
        top_up(first.as_ref(), "alice", "100").await?;
        let call = mobile_call("alice", "gw1");
        first.open_call(&call, yen("21"), yen("21"), 1).await?;
        drop(first);
        let again = db.open().await?;
        let balance = again.balance("alice").await?;
        assert_eq!((balance.balance, balance.held), (yen("100"), yen("21")));
        assert!(again.call(call.id).await?.context("the call")?.is_open());
        Ok(())
    }
}

macro_rules! contract_tests {
    ($($behaviour:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $behaviour() -> Result<()> {
                    contract::$behaviour(&SqliteDatabase::new()?).await
                }
            )*
        }

        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $behaviour() -> Result<()> {
                    let Some(db) = PostgresDatabase::create(stringify!($behaviour)).await? else {
                        return Ok(());
                    };
                    contract::$behaviour(&db).await
                }
            )*
        }
    };
}

contract_tests!(
    a_top_up_is_posted_once_per_key,
    a_call_holds_then_posts_exactly_and_releases_the_rest,
    every_write_is_idempotent,
    a_settlement_never_posts_more_than_was_held,
    an_unanswered_call_costs_nothing,
    racing_holds_never_overspend,
    too_many_open_calls_are_refused,
    a_refused_or_unknown_call_holds_nothing,
    recovery_posts_recorded_progress_and_releases_the_rest,
    vouchers_redeem_once,
    adjustments_correct_without_editing_history,
    call_records_list_by_user_and_time,
    reopening_migrates_idempotently_and_keeps_money,
);

/// A ledger file that cannot be written is refused when opened, not at the first call. Root
/// writes through file modes, so as root the file is made immutable (`chattr +i`) instead.
#[tokio::test]
async fn sqlite_a_read_only_ledger_is_refused_at_open() -> Result<()> {
    let dir = tempfile::TempDir::new()?;
    let path = dir.path().join("ledger.db");
    drop(SqliteLedger::open(&path, SQLITE_BUSY_TIMEOUT).await?);
    let _guard = WriteProtected::new(&path)?;
    assert_eq!(SqliteLedger::open(&path, SQLITE_BUSY_TIMEOUT).await.err(), Some(LedgerError::ReadOnly));
    Ok(())
}

/// Makes a file read-only for everyone, root included, until dropped (even when a test fails,
/// so the temporary directory can be removed).
struct WriteProtected(std::path::PathBuf);

impl WriteProtected {
    fn new(path: &std::path::Path) -> Result<Self> {
        let mut permissions = std::fs::metadata(path)?.permissions();
        permissions.set_readonly(true);
        std::fs::set_permissions(path, permissions)?;
        if running_as_root() {
            let status = std::process::Command::new("chattr").arg("+i").arg(path).status().context("running chattr")?;
            ensure!(status.success(), "chattr +i failed");
        }
        Ok(Self(path.to_path_buf()))
    }
}

impl Drop for WriteProtected {
    fn drop(&mut self) {
        if running_as_root() {
            let _ = std::process::Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// A ledger locked by another process reports `Busy` (after its busy timeout) and changes
/// nothing: the meter refuses the call rather than carry it unbilled.
#[tokio::test]
async fn sqlite_a_locked_ledger_is_busy_and_changes_nothing() -> Result<()> {
    let dir = tempfile::TempDir::new()?;
    let path = dir.path().join("ledger.db");
    let ledger = SqliteLedger::open(&path, Duration::from_millis(200)).await?;
    top_up(&ledger, "alice", "100").await?;
    let locker = rusqlite::Connection::open(&path)?;
    locker.execute_batch("BEGIN EXCLUSIVE")?;
    let call = mobile_call("alice", "gw1");
    assert_eq!(ledger.open_call(&call, yen("21"), yen("21"), 1).await, Err(LedgerError::Busy));
    locker.execute_batch("ROLLBACK")?;
    assert_eq!(ledger.call(call.id).await?, None);
    assert_eq!(ledger.balance("alice").await?.held, Amount::ZERO);
    Ok(())
}
