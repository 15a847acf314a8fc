//! Where accounts live: one [`AccountStore`] trait, a SQLite store (the default: one file,
//! WAL mode) and a PostgreSQL store (for operators who need more than one machine). Both run
//! the same contract test suite (`tests/store_contract.rs`).
//!
//! Every write is a single atomic statement or transaction, so a crash leaves an account
//! whole or absent. Issued certificates are recorded so that renewal can be refused after a
//! password change or account deletion. Each account has a [`Role`] (a user unless the
//! operator created it as something else), which its certificates carry.

mod postgres;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use koe_types::{DevicePublicKey, Role, UnixTime, Username};
use thiserror::Error;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub username: Username,
    /// argon2id PHC string.
    pub password_hash: String,
    pub created_at: UnixTime,
    pub password_changed_at: UnixTime,
    /// What its certificates say the network trusts it with.
    pub role: Role,
}

/// A certificate the login server issued and may renew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub serial: u64,
    pub username: Username,
    pub device_key: DevicePublicKey,
    pub not_after: UnixTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreError {
    #[error("the username is already taken")]
    UsernameTaken,
    #[error("no such account")]
    UnknownUser,
    #[error("the account database is locked by another process")]
    Busy,
    #[error("the account database is read-only")]
    ReadOnly,
    #[error("the account database is unavailable: {0}")]
    Unavailable(String),
    #[error("the account database is damaged or not a Koe account database: {0}")]
    Corrupt(String),
}

#[async_trait]
pub trait AccountStore: Send + Sync + std::fmt::Debug + 'static {
    /// Creates a user's account; [`StoreError::UsernameTaken`] if the name exists, even when
    /// two sign-ups race.
    async fn create_account(
        &self,
        username: &Username,
        password_hash: &str,
        now: UnixTime,
    ) -> Result<(), StoreError> {
        self.create_account_with_role(username, password_hash, Role::User, now)
            .await
    }

    /// Creates an account with `role` (the operator's service accounts); otherwise as
    /// [`AccountStore::create_account`].
    async fn create_account_with_role(
        &self,
        username: &Username,
        password_hash: &str,
        role: Role,
        now: UnixTime,
    ) -> Result<(), StoreError>;

    async fn find_account(&self, username: &Username) -> Result<Option<Account>, StoreError>;

    /// Replaces the password hash and forgets every certificate issued so far, so none of
    /// them can be renewed.
    async fn set_password(
        &self,
        username: &Username,
        password_hash: &str,
        now: UnixTime,
    ) -> Result<(), StoreError>;

    /// Deletes the account and the record of its certificates.
    async fn delete_account(&self, username: &Username) -> Result<(), StoreError>;

    /// Records an issued certificate; [`StoreError::UnknownUser`] if the account is gone.
    /// Also forgets certificates that expired before `now`.
    async fn record_certificate(
        &self,
        certificate: &IssuedCertificate,
        now: UnixTime,
    ) -> Result<(), StoreError>;

    async fn find_certificate(&self, serial: u64) -> Result<Option<IssuedCertificate>, StoreError>;

    /// A short description for logs, without credentials.
    fn describe(&self) -> String;
}

/// Opens the store a `--db` URL names: `sqlite:PATH` (created if missing) or
/// `postgres://…`.
pub async fn open_store(
    url: &str,
    sqlite_busy_timeout: Duration,
) -> Result<Arc<dyn AccountStore>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        let store = SqliteStore::open(path.as_ref(), sqlite_busy_timeout).await?;
        Ok(Arc::new(store))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect(url).await?))
    } else {
        Err(StoreError::Unavailable(format!(
            "unknown database URL {url:?}: use sqlite:PATH or postgres://…"
        )))
    }
}

/// Serials are random 63-bit numbers so they fit a signed 64-bit column unchanged.
pub fn new_serial() -> u64 {
    let mut bytes = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    u64::from_be_bytes(bytes) >> 1
}

fn serial_to_sql(serial: u64) -> i64 {
    i64::try_from(serial).unwrap_or(i64::MAX)
}

fn time_to_sql(time: UnixTime) -> i64 {
    i64::try_from(time.as_secs()).unwrap_or(i64::MAX)
}

fn time_from_sql(value: i64) -> UnixTime {
    UnixTime(u64::try_from(value).unwrap_or(0))
}

fn username_from_sql(value: &str) -> Result<Username, StoreError> {
    Username::parse_existing(value)
        .map_err(|e| StoreError::Corrupt(format!("stored username {value:?}: {e}")))
}

fn role_from_sql(value: &str) -> Result<Role, StoreError> {
    Role::from_name(value).ok_or_else(|| {
        StoreError::Corrupt(format!("stored role {value:?} is not one this Koe knows"))
    })
}

fn device_key_from_sql(bytes: &[u8]) -> Result<DevicePublicKey, StoreError> {
    <[u8; 32]>::try_from(bytes)
        .ok()
        .and_then(|b| DevicePublicKey::from_bytes(&b).ok())
        .ok_or_else(|| StoreError::Corrupt("stored device key is not an Ed25519 key".into()))
}
