//! The SQLite store faced with files it cannot use: one another process holds locked, one
//! that is not a database, one written by a newer Koe. Each must give an error that says
//! which, promptly, and must never damage what is there.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use koe_auth::store::{AccountStore, SqliteStore, StoreError};
use koe_types::{UnixTime, Username};
use tempfile::TempDir;

/// Short, so the test is quick; what matters is that the store waits this long and no longer.
const BUSY_TIMEOUT: Duration = Duration::from_millis(200);

/// Slack for a loaded machine on top of `BUSY_TIMEOUT`; a hang would take far longer.
const BUSY_SLACK: Duration = Duration::from_secs(3);

fn username(name: &str) -> Result<Username> {
    Ok(Username::parse(name)?)
}

fn database_path(dir: &TempDir) -> std::path::PathBuf {
    dir.path().join("accounts.db")
}

/// A backup tool or an operator's `sqlite3` shell holding the write lock makes sign-ups fail
/// with `Busy` after the busy timeout (not hang, not "unavailable"), logins keep working, and
/// once the lock is gone everything carries on with no data lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_database_reports_busy_within_the_busy_timeout() -> Result<()> {
    let dir = TempDir::new()?;
    let path = database_path(&dir);
    let store = SqliteStore::open(&path, BUSY_TIMEOUT).await?;
    let (alice, bob) = (username("alice")?, username("bob")?);
    store
        .create_account(&alice, "$argon2id$alice", UnixTime(1_000))
        .await?;

    let locker = rusqlite::Connection::open(&path)?;
    locker.execute_batch("BEGIN EXCLUSIVE")?;

    let started = Instant::now();
    let result = store
        .create_account(&bob, "$argon2id$bob", UnixTime(2_000))
        .await;
    let waited = started.elapsed();
    assert_eq!(result, Err(StoreError::Busy));
    assert!(
        waited >= BUSY_TIMEOUT / 2,
        "gave up after {waited:?} without waiting for the {BUSY_TIMEOUT:?} busy timeout"
    );
    assert!(
        waited < BUSY_TIMEOUT + BUSY_SLACK,
        "took {waited:?} to report Busy with a {BUSY_TIMEOUT:?} busy timeout"
    );
    let during_lock = store.find_account(&alice).await?;
    assert_eq!(
        during_lock.map(|account| account.password_hash).as_deref(),
        Some("$argon2id$alice"),
        "logins must keep working while another process holds the write lock"
    );

    locker.execute_batch("COMMIT")?;
    drop(locker);

    store
        .create_account(&bob, "$argon2id$bob", UnixTime(3_000))
        .await?;
    let found_alice = store.find_account(&alice).await?.context("alice lost")?;
    assert_eq!(found_alice.password_hash, "$argon2id$alice");
    assert_eq!(found_alice.created_at, UnixTime(1_000));
    let found_bob = store.find_account(&bob).await?.context("bob not created")?;
    assert_eq!(found_bob.password_hash, "$argon2id$bob");
    assert_eq!(found_bob.created_at, UnixTime(3_000));
    Ok(())
}

/// `--db sqlite:` pointed at the wrong file (a config file, a truncated download): the store
/// refuses it as corrupt at open and leaves every byte of it alone.
#[tokio::test]
async fn file_that_is_not_a_database_is_refused_and_left_untouched() -> Result<()> {
    let binary_junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let text_file = b"[network]\nname = \"koe.example\"\nlogin = \"https://login.koe.example\"\n";
    for (what, contents) in [
        ("binary junk", binary_junk.as_slice()),
        ("a text file", text_file.as_slice()),
    ] {
        let dir = TempDir::new()?;
        let path = database_path(&dir);
        std::fs::write(&path, contents)?;

        let result = SqliteStore::open(&path, BUSY_TIMEOUT).await;

        match result {
            Err(StoreError::Corrupt(message)) => {
                assert!(!message.is_empty(), "{what}: empty error message")
            }
            other => panic!("{what}: expected StoreError::Corrupt, got {other:?}"),
        }
        assert_eq!(
            std::fs::read(&path)?,
            contents,
            "{what}: the store modified a file it refused"
        );
    }
    Ok(())
}

/// A database a newer Koe migrated (an operator rolled back the binary): refused as corrupt
/// with the version in the message, and not modified, so the newer Koe can still use it.
#[tokio::test]
async fn database_from_a_newer_version_is_refused_and_not_modified() -> Result<()> {
    let dir = TempDir::new()?;
    let path = database_path(&dir);
    let alice = username("alice")?;
    {
        let store = SqliteStore::open(&path, BUSY_TIMEOUT).await?;
        store
            .create_account(&alice, "$argon2id$alice", UnixTime(1_000))
            .await?;
    }
    set_user_version(&path, 99)?;
    let before = std::fs::read(&path)?;

    let result = SqliteStore::open(&path, BUSY_TIMEOUT).await;

    match result {
        Err(StoreError::Corrupt(message)) => assert!(
            message.contains("99"),
            "the error should name the schema version it found: {message:?}"
        ),
        other => panic!("expected StoreError::Corrupt, got {other:?}"),
    }
    assert!(
        std::fs::read(&path)? == before,
        "the store modified a database it refused"
    );
    let connection = rusqlite::Connection::open(&path)?;
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    assert_eq!(version, 99);
    let hash: String = connection.query_row(
        "SELECT password_hash FROM accounts WHERE username = 'alice'",
        [],
        |row| row.get(0),
    )?;
    assert_eq!(hash, "$argon2id$alice");
    Ok(())
}

/// The same refusal for a newer database that is not in WAL mode (e.g. restored from a
/// `VACUUM INTO` backup, which writes a rollback-journal file): the version check must come
/// before anything that writes, such as switching the journal mode.
#[tokio::test]
async fn database_from_a_newer_version_in_rollback_journal_mode_is_not_modified() -> Result<()> {
    let dir = TempDir::new()?;
    let path = database_path(&dir);
    {
        let connection = rusqlite::Connection::open(&path)?;
        connection.execute_batch(
            "PRAGMA journal_mode = DELETE;
             CREATE TABLE accounts (username TEXT PRIMARY KEY NOT NULL) STRICT;
             INSERT INTO accounts VALUES ('alice');
             PRAGMA user_version = 99;",
        )?;
    }
    let before = std::fs::read(&path)?;

    let result = SqliteStore::open(&path, BUSY_TIMEOUT).await;

    assert!(
        matches!(result, Err(StoreError::Corrupt(_))),
        "expected StoreError::Corrupt, got {result:?}"
    );
    assert!(
        std::fs::read(&path)? == before,
        "the store modified a database it refused (journal mode now {:?})",
        rusqlite::Connection::open(&path)?
            .pragma_query_value(None, "journal_mode", |row| row.get::<_, String>(0))?
    );
    Ok(())
}

/// What a newer Koe's migration would leave behind: a higher `user_version`, committed and
/// checkpointed into the main file.
fn set_user_version(path: &Path, version: i64) -> Result<()> {
    let connection = rusqlite::Connection::open(path)?;
    connection.pragma_update(None, "user_version", version)?;
    connection
        .close()
        .map_err(|(_, error)| error)
        .context("closing")?;
    Ok(())
}
