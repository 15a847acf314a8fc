//! The account-store contract: every behaviour the login server relies on, run against the
//! SQLite store and the PostgreSQL store alike, so an operator can switch `--db` without
//! users noticing.
//!
//! Each behaviour is one generic function in `contract`; `contract_tests!` turns it into
//! `sqlite::<behaviour>` and `postgres::<behaviour>`. SQLite tests use a temporary directory.
//! PostgreSQL tests need `KOE_TEST_POSTGRES_URL` (see `postgres_url`) and each run in a fresh
//! schema, so they can run in parallel against one database. `from_version_1` upgrades a
//! database written before accounts had roles.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use koe_auth::store::{
    new_serial, AccountStore, IssuedCertificate, PostgresStore, SqliteStore, StoreError,
};
use koe_types::{DeviceKey, Role, UnixTime, Username};

/// Generous, so a loaded CI machine never turns the racing test into a `Busy` failure.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How many sign-ups for the same name race in `racing_creates_have_exactly_one_winner`.
const RACING_SIGNUPS: usize = 16;

/// One database that a test can open any number of store handles on; every open runs the
/// schema migration, as a restarted (or second) login server would.
trait TestDatabase {
    async fn open(&self) -> Result<Arc<dyn AccountStore>>;

    /// Runs SQL straight on the database, beside the store.
    async fn execute_batch(&self, sql: &str) -> Result<()>;
}

struct SqliteDatabase {
    dir: tempfile::TempDir,
}

impl SqliteDatabase {
    fn new() -> Result<Self> {
        Ok(Self {
            dir: tempfile::TempDir::new()?,
        })
    }
}

impl TestDatabase for SqliteDatabase {
    async fn open(&self) -> Result<Arc<dyn AccountStore>> {
        let path = self.dir.path().join("accounts.db");
        let store = SqliteStore::open(&path, SQLITE_BUSY_TIMEOUT)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Arc::new(store))
    }

    async fn execute_batch(&self, sql: &str) -> Result<()> {
        let connection = rusqlite::Connection::open(self.dir.path().join("accounts.db"))?;
        connection.execute_batch(sql)?;
        Ok(())
    }
}

/// The PostgreSQL server to test against. Without `KOE_TEST_POSTGRES_URL` the PostgreSQL tests
/// skip with a note on stderr, unless `KOE_REQUIRE_POSTGRES=1` (as CI sets), where a silent
/// skip would hide that the PostgreSQL store went untested.
fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("KOE_TEST_POSTGRES_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ if std::env::var("KOE_REQUIRE_POSTGRES").as_deref() == Ok("1") => panic!(
            "KOE_REQUIRE_POSTGRES=1 but KOE_TEST_POSTGRES_URL is not set: point it at a \
             PostgreSQL database the tests may create schemas in, e.g. \
             KOE_TEST_POSTGRES_URL=postgres://koe:koe@127.0.0.1:5432/koe_test \
             (.ci/run sets one up)"
        ),
        _ => {
            // Straight to stderr: the test harness would swallow `eprintln!` from a passing test.
            let _ = writeln!(
                std::io::stderr(),
                "postgres::{test}: skipped: set KOE_TEST_POSTGRES_URL=postgres://USER:PASSWORD@HOST:PORT/DB \
                 to run the PostgreSQL store tests"
            );
            None
        }
    }
}

/// A schema of its own in the test database; dropped (best effort) when the test ends, even
/// when it fails.
struct PostgresDatabase {
    url: String,
    schema: String,
    config: tokio_postgres::Config,
}

impl PostgresDatabase {
    /// `None` when the test should skip (see [`postgres_url`]).
    async fn create(test: &str) -> Result<Option<Self>> {
        let Some(database) = Self::create_empty(test).await? else {
            return Ok(None);
        };
        let admin = admin_client(&database.url).await?;
        database.open().await?;
        // Without this check a search_path that did not take effect would put every test's
        // tables in `public`, and the tests would see each other's accounts.
        let tables = admin
            .query_one(
                "SELECT count(*) FROM information_schema.tables
                 WHERE table_schema = $1 AND table_name IN ('accounts', 'issued_certificates')",
                &[&database.schema],
            )
            .await?
            .get::<_, i64>(0);
        ensure!(
            tables == 2,
            "the store did not create its tables in the test schema {}",
            database.schema
        );
        Ok(Some(database))
    }

    /// A schema with nothing in it yet; the store has not migrated it.
    async fn create_empty(test: &str) -> Result<Option<Self>> {
        let Some(url) = postgres_url(test) else {
            return Ok(None);
        };
        let schema = format!("koe_test_{:016x}", new_serial());
        admin_client(&url)
            .await?
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .with_context(|| format!("creating schema {schema}"))?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .context("KOE_TEST_POSTGRES_URL is not a PostgreSQL URL")?;
        config.options(format!("-csearch_path={schema}"));
        Ok(Some(Self {
            url,
            schema,
            config,
        }))
    }
}

async fn admin_client(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to KOE_TEST_POSTGRES_URL")?;
    tokio::spawn(connection);
    Ok(client)
}

impl TestDatabase for PostgresDatabase {
    async fn open(&self) -> Result<Arc<dyn AccountStore>> {
        let store = PostgresStore::connect_with(self.config.clone())
            .await
            .with_context(|| format!("connecting to schema {}", self.schema))?;
        Ok(Arc::new(store))
    }

    async fn execute_batch(&self, sql: &str) -> Result<()> {
        admin_client(&self.url)
            .await?
            .batch_execute(&format!("SET search_path = {}; {sql}", self.schema))
            .await
            .with_context(|| format!("running SQL in schema {}", self.schema))
    }
}

impl Drop for PostgresDatabase {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be shutting down: use a runtime of
        // our own on a thread of our own.
        let (url, schema) = (self.url.clone(), self.schema.clone());
        let dropped = std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                admin_client(&url)
                    .await?
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .await?;
                Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}: {dropped:?}", self.schema);
        }
    }
}

fn username(name: &str) -> Result<Username> {
    Ok(Username::parse(name)?)
}

/// A name only the operator can give out, as `koe auth add-service-account` does.
fn service_name(name: &str) -> Result<Username> {
    Ok(Username::parse_existing(name)?)
}

fn certificate(serial: u64, username: &Username, not_after: u64) -> IssuedCertificate {
    IssuedCertificate {
        serial,
        username: username.clone(),
        device_key: DeviceKey::generate().public_key(),
        not_after: UnixTime(not_after),
    }
}

mod contract {
    use super::*;

    pub async fn created_account_can_be_found(db: &impl TestDatabase) -> Result<()> {
        let store = db.open().await?;
        let alice = username("alice")?;
        store
            .create_account(&alice, "$argon2id$alice-1", UnixTime(1_000))
            .await?;

        let found = store
            .find_account(&alice)
            .await?
            .context("alice not found")?;
        assert_eq!(found.username, alice);
        assert_eq!(found.password_hash, "$argon2id$alice-1");
        assert_eq!(found.created_at, UnixTime(1_000));
        assert_eq!(found.password_changed_at, UnixTime(1_000));

        assert_eq!(store.find_account(&username("bob")?).await?, None);
        Ok(())
    }

    pub async fn duplicate_signup_is_refused_and_keeps_the_first_password(
        db: &impl TestDatabase,
    ) -> Result<()> {
        let store = db.open().await?;
        let alice = username("alice")?;
        store
            .create_account(&alice, "$argon2id$first", UnixTime(1_000))
            .await?;

        assert_eq!(
            store
                .create_account(&alice, "$argon2id$second", UnixTime(2_000))
                .await,
            Err(StoreError::UsernameTaken)
        );

        let found = store
            .find_account(&alice)
            .await?
            .context("alice not found")?;
        assert_eq!(found.password_hash, "$argon2id$first");
        assert_eq!(found.created_at, UnixTime(1_000));
        assert_eq!(found.password_changed_at, UnixTime(1_000));
        Ok(())
    }

    /// Two people signing up for the same name at the same moment, possibly on different login
    /// servers: exactly one gets it, and the account holds the winner's password.
    pub async fn racing_creates_have_exactly_one_winner(db: &impl TestDatabase) -> Result<()> {
        let mut stores = Vec::with_capacity(RACING_SIGNUPS);
        for _ in 0..RACING_SIGNUPS {
            stores.push(db.open().await?);
        }
        let alice = username("alice")?;
        let start = Arc::new(tokio::sync::Barrier::new(RACING_SIGNUPS));
        let signups: Vec<_> = stores
            .into_iter()
            .enumerate()
            .map(|(index, store)| {
                let (alice, start) = (alice.clone(), Arc::clone(&start));
                let hash = format!("$argon2id$contender-{index}");
                tokio::spawn(async move {
                    start.wait().await;
                    let result = store.create_account(&alice, &hash, UnixTime(1_000)).await;
                    (hash, result)
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut refused = 0;
        for signup in signups {
            match signup.await? {
                (hash, Ok(())) => winners.push(hash),
                (_, Err(StoreError::UsernameTaken)) => refused += 1,
                (hash, Err(other)) => panic!("sign-up with {hash} failed with {other:?}"),
            }
        }

        assert_eq!(winners.len(), 1, "winners: {winners:?}");
        assert_eq!(refused, RACING_SIGNUPS - 1);
        let found = db
            .open()
            .await?
            .find_account(&alice)
            .await?
            .context("alice not found")?;
        assert_eq!(found.password_hash, winners[0]);
        Ok(())
    }

    pub async fn set_password_of_unknown_user_is_refused(db: &impl TestDatabase) -> Result<()> {
        let store = db.open().await?;
        let bob = username("bob")?;

        assert_eq!(
            store
                .set_password(&bob, "$argon2id$bob", UnixTime(1_000))
                .await,
            Err(StoreError::UnknownUser)
        );
        assert_eq!(store.find_account(&bob).await?, None);
        Ok(())
    }

    /// After a password change (say, because the account was stolen) no certificate issued
    /// before it may be renewed; other users' certificates are untouched.
    pub async fn set_password_forgets_issued_certificates(db: &impl TestDatabase) -> Result<()> {
        let store = db.open().await?;
        let (alice, bob) = (username("alice")?, username("bob")?);
        store
            .create_account(&alice, "$argon2id$old", UnixTime(1_000))
            .await?;
        store
            .create_account(&bob, "$argon2id$bob", UnixTime(1_000))
            .await?;
        let alice_laptop = certificate(new_serial(), &alice, 50_000);
        let alice_phone = certificate(new_serial(), &alice, 60_000);
        let bob_phone = certificate(new_serial(), &bob, 50_000);
        for issued in [&alice_laptop, &alice_phone, &bob_phone] {
            store.record_certificate(issued, UnixTime(1_500)).await?;
        }

        store
            .set_password(&alice, "$argon2id$new", UnixTime(2_000))
            .await?;

        assert_eq!(store.find_certificate(alice_laptop.serial).await?, None);
        assert_eq!(store.find_certificate(alice_phone.serial).await?, None);
        assert_eq!(
            store.find_certificate(bob_phone.serial).await?,
            Some(bob_phone)
        );
        let found = store
            .find_account(&alice)
            .await?
            .context("alice not found")?;
        assert_eq!(found.password_hash, "$argon2id$new");
        assert_eq!(found.created_at, UnixTime(1_000));
        assert_eq!(found.password_changed_at, UnixTime(2_000));
        Ok(())
    }

    /// A deleted account is gone with its certificates, and whoever signs up for the name
    /// next cannot renew the previous owner's certificates.
    pub async fn delete_account_removes_it_and_its_certificates(
        db: &impl TestDatabase,
    ) -> Result<()> {
        let store = db.open().await?;
        let (alice, bob) = (username("alice")?, username("bob")?);
        store
            .create_account(&alice, "$argon2id$alice", UnixTime(1_000))
            .await?;
        store
            .create_account(&bob, "$argon2id$bob", UnixTime(1_000))
            .await?;
        let old_alice_certificate = certificate(new_serial(), &alice, 50_000);
        let bob_certificate = certificate(new_serial(), &bob, 50_000);
        store
            .record_certificate(&old_alice_certificate, UnixTime(1_500))
            .await?;
        store
            .record_certificate(&bob_certificate, UnixTime(1_500))
            .await?;

        store.delete_account(&alice).await?;

        assert_eq!(store.find_account(&alice).await?, None);
        assert_eq!(
            store.find_certificate(old_alice_certificate.serial).await?,
            None
        );
        assert_eq!(
            store.delete_account(&alice).await,
            Err(StoreError::UnknownUser)
        );
        assert_eq!(
            store.find_certificate(bob_certificate.serial).await?,
            Some(bob_certificate)
        );
        assert!(store.find_account(&bob).await?.is_some());

        store
            .create_account(&alice, "$argon2id$new-alice", UnixTime(3_000))
            .await?;
        assert_eq!(
            store.find_certificate(old_alice_certificate.serial).await?,
            None
        );
        let found = store
            .find_account(&alice)
            .await?
            .context("alice not found")?;
        assert_eq!(found.password_hash, "$argon2id$new-alice");
        assert_eq!(found.created_at, UnixTime(3_000));
        Ok(())
    }

    pub async fn record_certificate_for_unknown_user_is_refused(
        db: &impl TestDatabase,
    ) -> Result<()> {
        let store = db.open().await?;
        let ghost = certificate(new_serial(), &username("bob")?, 50_000);

        assert_eq!(
            store.record_certificate(&ghost, UnixTime(1_000)).await,
            Err(StoreError::UnknownUser)
        );
        assert_eq!(store.find_certificate(ghost.serial).await?, None);
        Ok(())
    }

    pub async fn recorded_certificate_round_trips(db: &impl TestDatabase) -> Result<()> {
        let store = db.open().await?;
        let alice = username("alice")?;
        store
            .create_account(&alice, "$argon2id$alice", UnixTime(1_000))
            .await?;
        // The largest serial `new_serial` can produce must survive the signed column.
        let largest_serial = u64::MAX >> 1;
        let issued = [
            certificate(new_serial(), &alice, 90_000),
            certificate(largest_serial, &alice, 4_000_000_000),
            certificate(1, &alice, 2_000),
        ];
        for certificate in &issued {
            store
                .record_certificate(certificate, UnixTime(1_500))
                .await?;
        }

        for certificate in &issued {
            assert_eq!(
                store.find_certificate(certificate.serial).await?.as_ref(),
                Some(certificate)
            );
        }
        assert_eq!(store.find_certificate(2).await?, None);
        Ok(())
    }

    /// Recording a certificate forgets those that expired before `now`, so the table does not
    /// grow forever; one that expires exactly now is still valid and kept.
    pub async fn recording_prunes_expired_certificates(db: &impl TestDatabase) -> Result<()> {
        let store = db.open().await?;
        let (alice, bob) = (username("alice")?, username("bob")?);
        store
            .create_account(&alice, "$argon2id$alice", UnixTime(1_000))
            .await?;
        store
            .create_account(&bob, "$argon2id$bob", UnixTime(1_000))
            .await?;
        let expired = certificate(new_serial(), &bob, 1_999);
        let expires_now = certificate(new_serial(), &alice, 2_000);
        let valid = certificate(new_serial(), &alice, 9_000);
        for certificate in [&expired, &expires_now, &valid] {
            store
                .record_certificate(certificate, UnixTime(1_000))
                .await?;
        }
        assert_eq!(
            store.find_certificate(expired.serial).await?.as_ref(),
            Some(&expired)
        );

        let fresh = certificate(new_serial(), &alice, 10_000);
        store.record_certificate(&fresh, UnixTime(2_000)).await?;

        assert_eq!(store.find_certificate(expired.serial).await?, None);
        assert_eq!(
            store.find_certificate(expires_now.serial).await?,
            Some(expires_now)
        );
        assert_eq!(store.find_certificate(valid.serial).await?, Some(valid));
        assert_eq!(store.find_certificate(fresh.serial).await?, Some(fresh));
        Ok(())
    }

    /// Restarting the login server (or running a second one) migrates the same database
    /// again: that must succeed and keep every account and certificate.
    pub async fn reopening_migrates_idempotently_and_keeps_data(
        db: &impl TestDatabase,
    ) -> Result<()> {
        let first = db.open().await?;
        let alice = username("alice")?;
        first
            .create_account(&alice, "$argon2id$alice", UnixTime(1_000))
            .await?;
        let issued = certificate(new_serial(), &alice, 50_000);
        first.record_certificate(&issued, UnixTime(1_000)).await?;

        // Opened while the first handle is still in use, as a second server would.
        let second = db.open().await?;
        let found = second
            .find_account(&alice)
            .await?
            .context("alice not found")?;
        assert_eq!(found.password_hash, "$argon2id$alice");
        assert_eq!(
            second.find_certificate(issued.serial).await?.as_ref(),
            Some(&issued)
        );
        let bob = username("bob")?;
        second
            .create_account(&bob, "$argon2id$bob", UnixTime(2_000))
            .await?;
        assert!(first.find_account(&bob).await?.is_some());
        drop((first, second));

        // And again after every handle is closed, as a restarted server would.
        let third = db.open().await?;
        assert_eq!(third.find_account(&alice).await?, Some(found));
        assert!(third.find_account(&bob).await?.is_some());
        assert_eq!(third.find_certificate(issued.serial).await?, Some(issued));
        Ok(())
    }

    /// Sign-ups are users; the operator's service accounts keep the role they were created
    /// with through password changes, certificates and restarts.
    pub async fn account_roles_round_trip(db: &impl TestDatabase) -> Result<()> {
        let store = db.open().await?;
        let (alice, echo, pstn) = (
            username("alice")?,
            service_name("echo123")?,
            service_name("pstn")?,
        );
        store
            .create_account(&alice, "$argon2id$alice", UnixTime(1_000))
            .await?;
        store
            .create_account_with_role(&echo, "$argon2id$echo", Role::User, UnixTime(1_000))
            .await?;
        store
            .create_account_with_role(&pstn, "$argon2id$pstn", Role::Gateway, UnixTime(1_000))
            .await?;
        let role = |name: &Username| {
            let (store, name) = (Arc::clone(&store), name.clone());
            async move {
                let account = store.find_account(&name).await?;
                Ok::<_, anyhow::Error>(account.context("account not found")?.role)
            }
        };
        assert_eq!(role(&alice).await?, Role::User);
        assert_eq!(role(&echo).await?, Role::User);
        assert_eq!(role(&pstn).await?, Role::Gateway);

        assert_eq!(
            store
                .create_account_with_role(&alice, "$argon2id$other", Role::Gateway, UnixTime(2_000))
                .await,
            Err(StoreError::UsernameTaken),
            "a taken name cannot be claimed again with a role"
        );
        assert_eq!(role(&alice).await?, Role::User);

        let issued = certificate(new_serial(), &pstn, 50_000);
        store.record_certificate(&issued, UnixTime(1_500)).await?;
        store
            .set_password(&pstn, "$argon2id$pstn-2", UnixTime(2_000))
            .await?;
        assert_eq!(role(&pstn).await?, Role::Gateway);

        drop(store);
        let reopened = db.open().await?;
        let found = reopened
            .find_account(&pstn)
            .await?
            .context("pstn not found")?;
        assert_eq!(found.role, Role::Gateway);
        assert_eq!(found.password_hash, "$argon2id$pstn-2");
        Ok(())
    }

    /// A role name this Koe does not know (written by a newer one) is refused as corrupt
    /// rather than read as a user or a gateway.
    pub async fn unknown_stored_role_is_refused_as_corrupt(db: &impl TestDatabase) -> Result<()> {
        let store = db.open().await?;
        let alice = username("alice")?;
        store
            .create_account(&alice, "$argon2id$alice", UnixTime(1_000))
            .await?;
        db.execute_batch("UPDATE accounts SET role = 'overlord' WHERE username = 'alice'")
            .await?;
        match store.find_account(&alice).await {
            Err(StoreError::Corrupt(message)) => {
                assert!(message.contains("overlord"), "{message}")
            }
            other => panic!("expected a corrupt-store error, got {other:?}"),
        }
        Ok(())
    }

    /// A database written before accounts had roles: opening it migrates, and every account
    /// already there is a user.
    pub async fn accounts_from_before_roles_are_users(
        db: &impl TestDatabase,
        version_1: &str,
    ) -> Result<()> {
        db.execute_batch(version_1).await?;
        db.execute_batch("INSERT INTO accounts VALUES ('alice', '$argon2id$alice', 1000, 1500)")
            .await?;
        let store = db.open().await?;
        let alice = username("alice")?;
        let found = store
            .find_account(&alice)
            .await?
            .context("alice lost in the upgrade")?;
        assert_eq!(found.role, Role::User);
        assert_eq!(found.password_hash, "$argon2id$alice");
        assert_eq!(found.password_changed_at, UnixTime(1_500));

        let pstn = service_name("pstn")?;
        store
            .create_account_with_role(&pstn, "$argon2id$pstn", Role::Gateway, UnixTime(2_000))
            .await?;
        let reopened = db.open().await?;
        assert_eq!(
            reopened.find_account(&pstn).await?.map(|a| a.role),
            Some(Role::Gateway)
        );
        assert_eq!(reopened.find_account(&alice).await?, Some(found));
        Ok(())
    }
}

/// The schema version 1 files as Koe shipped them, before accounts had roles.
mod from_version_1 {
    use super::*;

    const SQLITE: &str = "CREATE TABLE accounts (
        username TEXT PRIMARY KEY NOT NULL,
        password_hash TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        password_changed_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE issued_certificates (
        serial INTEGER PRIMARY KEY NOT NULL,
        username TEXT NOT NULL REFERENCES accounts(username) ON DELETE CASCADE,
        device_key BLOB NOT NULL,
        not_after INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX issued_certificates_by_username ON issued_certificates(username);
    CREATE INDEX issued_certificates_by_expiry ON issued_certificates(not_after);
    PRAGMA user_version = 1;";

    const POSTGRES: &str = "CREATE TABLE accounts (
        username TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        password_changed_at BIGINT NOT NULL
    );
    CREATE TABLE issued_certificates (
        serial BIGINT PRIMARY KEY,
        username TEXT NOT NULL REFERENCES accounts(username) ON DELETE CASCADE,
        device_key BYTEA NOT NULL,
        not_after BIGINT NOT NULL
    );
    CREATE INDEX issued_certificates_by_username ON issued_certificates(username);
    CREATE INDEX issued_certificates_by_expiry ON issued_certificates(not_after);
    CREATE TABLE koe_schema_version (version INTEGER NOT NULL);
    INSERT INTO koe_schema_version VALUES (1);";

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite() -> Result<()> {
        contract::accounts_from_before_roles_are_users(&SqliteDatabase::new()?, SQLITE).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() -> Result<()> {
        let Some(db) = PostgresDatabase::create_empty("from_version_1").await? else {
            return Ok(());
        };
        contract::accounts_from_before_roles_are_users(&db, POSTGRES).await
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
    created_account_can_be_found,
    duplicate_signup_is_refused_and_keeps_the_first_password,
    racing_creates_have_exactly_one_winner,
    set_password_of_unknown_user_is_refused,
    set_password_forgets_issued_certificates,
    delete_account_removes_it_and_its_certificates,
    record_certificate_for_unknown_user_is_refused,
    recorded_certificate_round_trips,
    recording_prunes_expired_certificates,
    reopening_migrates_idempotently_and_keeps_data,
    account_roles_round_trip,
    unknown_stored_role_is_refused_as_corrupt,
);
