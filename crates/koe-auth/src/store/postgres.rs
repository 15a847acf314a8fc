//! The PostgreSQL account store, for operators who run the login server on several machines.
//! Each write is one SQL statement (CTEs where two tables change), so it is atomic without
//! holding a transaction across awaits, and one client connection serves all requests
//! concurrently (tokio-postgres pipelines them). A dropped connection is re-established on the
//! next request.

use std::sync::Arc;

use async_trait::async_trait;
use koe_types::{Role, UnixTime, Username};
use tokio::sync::Mutex;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

use super::{
    device_key_from_sql, role_from_sql, serial_to_sql, time_from_sql, time_to_sql,
    username_from_sql, Account, AccountStore, IssuedCertificate, StoreError,
};

/// Each entry upgrades the schema by one version; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE accounts (
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
    CREATE INDEX issued_certificates_by_expiry ON issued_certificates(not_after);",
    // Accounts from before roles are users. No CHECK on the names: a newer role should not
    // need a schema change, and reading an unknown one is refused as corrupt.
    "ALTER TABLE accounts ADD COLUMN role TEXT NOT NULL DEFAULT 'user';",
];

/// Any constant works; it only has to be the same for every Koe login server.
const MIGRATION_LOCK_ID: i64 = 0x6b6f_655f_6175_7468; // "koe_auth"

#[derive(Debug)]
pub struct PostgresStore {
    config: Config,
    client: Mutex<Option<Arc<Client>>>,
}

fn map_error(error: tokio_postgres::Error) -> StoreError {
    match error.code() {
        Some(code) if code == &SqlState::UNIQUE_VIOLATION => StoreError::UsernameTaken,
        Some(code) if code == &SqlState::FOREIGN_KEY_VIOLATION => StoreError::UnknownUser,
        Some(code) if code == &SqlState::READ_ONLY_SQL_TRANSACTION => StoreError::ReadOnly,
        Some(code) if code == &SqlState::LOCK_NOT_AVAILABLE => StoreError::Busy,
        _ => StoreError::Unavailable(error.to_string()),
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:pass@host:port/db`) and brings the schema up to date.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let config: Config = url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("invalid PostgreSQL URL: {e}")))?;
        Self::connect_with(config).await
    }

    pub async fn connect_with(config: Config) -> Result<Self, StoreError> {
        let mut client = open_client(&config).await?;
        migrate(&mut client).await?;
        Ok(Self {
            config,
            client: Mutex::new(Some(Arc::new(client))),
        })
    }

    /// The live client, reconnecting if the previous connection was lost.
    async fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(client));
        }
        *slot = None;
        let client = Arc::new(open_client(&self.config).await?);
        *slot = Some(Arc::clone(&client));
        Ok(client)
    }
}

async fn open_client(config: &Config) -> Result<Client, StoreError> {
    let (client, connection) = config.connect(NoTls).await.map_err(map_error)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "PostgreSQL connection lost");
        }
    });
    Ok(client)
}

async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let transaction = client.transaction().await.map_err(map_error)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_ID])
        .await
        .map_err(map_error)?;
    transaction
        .batch_execute("CREATE TABLE IF NOT EXISTS koe_schema_version (version INTEGER NOT NULL)")
        .await
        .map_err(map_error)?;
    let current: i32 = transaction
        .query_opt("SELECT version FROM koe_schema_version", &[])
        .await
        .map_err(map_error)?
        .map(|row| row.get(0))
        .unwrap_or(0);
    let known = MIGRATIONS.len();
    let current = match usize::try_from(current) {
        Ok(current) if current <= known => current,
        Ok(_) => {
            return Err(StoreError::Corrupt(format!(
                "schema version {current} is newer than this Koe knows ({known})"
            )))
        }
        Err(_) => return Err(StoreError::Corrupt(format!("schema version {current} is invalid"))),
    };
    for migration in MIGRATIONS.iter().skip(current) {
        transaction.batch_execute(migration).await.map_err(map_error)?;
    }
    transaction
        .batch_execute(&format!(
            "DELETE FROM koe_schema_version; INSERT INTO koe_schema_version VALUES ({known})"
        ))
        .await
        .map_err(map_error)?;
    transaction.commit().await.map_err(map_error)
}

#[async_trait]
impl AccountStore for PostgresStore {
    async fn create_account_with_role(
        &self,
        username: &Username,
        password_hash: &str,
        role: Role,
        now: UnixTime,
    ) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO accounts
                     (username, password_hash, created_at, password_changed_at, role)
                 VALUES ($1, $2, $3, $3, $4)",
                &[
                    &username.as_str(),
                    &password_hash,
                    &time_to_sql(now),
                    &role.as_str(),
                ],
            )
            .await
            .map(drop)
            .map_err(map_error)
    }

    async fn find_account(&self, username: &Username) -> Result<Option<Account>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT username, password_hash, created_at, password_changed_at, role
                 FROM accounts WHERE username = $1",
                &[&username.as_str()],
            )
            .await
            .map_err(map_error)?;
        row.map(|row| {
            Ok(Account {
                username: username_from_sql(row.get(0))?,
                password_hash: row.get(1),
                created_at: time_from_sql(row.get(2)),
                password_changed_at: time_from_sql(row.get(3)),
                role: role_from_sql(row.get(4))?,
            })
        })
        .transpose()
    }

    async fn set_password(
        &self,
        username: &Username,
        password_hash: &str,
        now: UnixTime,
    ) -> Result<(), StoreError> {
        let row = self
            .client()
            .await?
            .query_one(
                "WITH updated AS (
                     UPDATE accounts SET password_hash = $2, password_changed_at = $3
                     WHERE username = $1 RETURNING username
                 ), forgotten AS (
                     DELETE FROM issued_certificates
                     WHERE username IN (SELECT username FROM updated)
                 )
                 SELECT count(*) FROM updated",
                &[&username.as_str(), &password_hash, &time_to_sql(now)],
            )
            .await
            .map_err(map_error)?;
        match row.get::<_, i64>(0) {
            0 => Err(StoreError::UnknownUser),
            _ => Ok(()),
        }
    }

    async fn delete_account(&self, username: &Username) -> Result<(), StoreError> {
        let deleted = self
            .client()
            .await?
            .execute("DELETE FROM accounts WHERE username = $1", &[&username.as_str()])
            .await
            .map_err(map_error)?;
        match deleted {
            0 => Err(StoreError::UnknownUser),
            _ => Ok(()),
        }
    }

    async fn record_certificate(
        &self,
        certificate: &IssuedCertificate,
        now: UnixTime,
    ) -> Result<(), StoreError> {
        let device_key = certificate.device_key.to_bytes().to_vec();
        self.client()
            .await?
            .execute(
                "WITH expired AS (DELETE FROM issued_certificates WHERE not_after < $5)
                 INSERT INTO issued_certificates (serial, username, device_key, not_after)
                 VALUES ($1, $2, $3, $4)",
                &[
                    &serial_to_sql(certificate.serial),
                    &certificate.username.as_str(),
                    &device_key,
                    &time_to_sql(certificate.not_after),
                    &time_to_sql(now),
                ],
            )
            .await
            .map(drop)
            .map_err(|error| match map_error(error) {
                // A serial collision is astronomically unlikely; say so rather than
                // claiming the name is taken.
                StoreError::UsernameTaken => {
                    StoreError::Unavailable("certificate serial collision".into())
                }
                other => other,
            })
    }

    async fn find_certificate(&self, serial: u64) -> Result<Option<IssuedCertificate>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT username, device_key, not_after FROM issued_certificates
                 WHERE serial = $1",
                &[&serial_to_sql(serial)],
            )
            .await
            .map_err(map_error)?;
        row.map(|row| {
            Ok(IssuedCertificate {
                serial,
                username: username_from_sql(row.get(0))?,
                device_key: device_key_from_sql(row.get(1))?,
                not_after: time_from_sql(row.get(2)),
            })
        })
        .transpose()
    }

    fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|host| match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        format!(
            "postgres://{}/{}",
            hosts.join(","),
            self.config.get_dbname().unwrap_or("")
        )
    }
}
