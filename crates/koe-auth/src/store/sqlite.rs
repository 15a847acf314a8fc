//! The SQLite account store: one file, WAL mode, one connection used from the blocking pool.
//! Schema versions are tracked in `PRAGMA user_version` and applied in one transaction.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use koe_types::{Role, UnixTime, Username};
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};

use super::{
    device_key_from_sql, role_from_sql, serial_to_sql, time_from_sql, time_to_sql,
    username_from_sql, Account, AccountStore, IssuedCertificate, StoreError,
};

/// Each entry upgrades the schema by one version; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE accounts (
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
    CREATE INDEX issued_certificates_by_expiry ON issued_certificates(not_after);",
    // Accounts from before roles are users. No CHECK on the names: a newer role should not
    // need a table rebuild, and reading an unknown one is refused as corrupt.
    "ALTER TABLE accounts ADD COLUMN role TEXT NOT NULL DEFAULT 'user';",
];

#[derive(Debug, Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
    path: PathBuf,
}

fn map_error(error: rusqlite::Error) -> StoreError {
    match &error {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => StoreError::Busy,
            ErrorCode::ReadOnly => StoreError::ReadOnly,
            ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt => {
                StoreError::Corrupt(error.to_string())
            }
            _ => StoreError::Unavailable(error.to_string()),
        },
        _ => StoreError::Unavailable(error.to_string()),
    }
}

fn is_constraint(error: &rusqlite::Error, extended: i32) -> bool {
    matches!(error, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == extended)
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `path` and brings its schema up to date.
    /// Refuses a read-only file up front, so the server never starts unable to sign anyone up.
    pub async fn open(path: &Path, busy_timeout: Duration) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        let opened_path = path.clone();
        let connection = tokio::task::spawn_blocking(move || -> Result<Connection, StoreError> {
            let connection = Connection::open_with_flags(
                &opened_path,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(map_error)?;
            connection.busy_timeout(busy_timeout).map_err(map_error)?;
            if connection
                .is_readonly(rusqlite::DatabaseName::Main)
                .map_err(map_error)?
            {
                return Err(StoreError::ReadOnly);
            }
            // Before anything writes (even the journal mode), so that a file this version
            // refuses is left exactly as it was.
            check_schema_version(&connection)?;
            connection
                .pragma_update(None, "journal_mode", "WAL")
                .map_err(map_error)?;
            connection
                .pragma_update(None, "synchronous", "FULL")
                .map_err(map_error)?;
            connection
                .pragma_update(None, "foreign_keys", "ON")
                .map_err(map_error)?;
            migrate(&connection)?;
            Ok(connection)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))??;
        Ok(Self {
            connection: Arc::new(Mutex::new(connection)),
            path,
        })
    }

    async fn with_connection<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || {
            let mut connection = connection
                .lock()
                .map_err(|_| StoreError::Unavailable("a database worker panicked".into()))?;
            work(&mut connection)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }
}

/// The schema version of the file, refusing versions this Koe cannot work with.
fn check_schema_version(connection: &Connection) -> Result<usize, StoreError> {
    let current: i64 = connection
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(map_error)?;
    let known = MIGRATIONS.len();
    match usize::try_from(current) {
        Ok(current) if current <= known => Ok(current),
        Ok(_) => Err(StoreError::Corrupt(format!(
            "schema version {current} is newer than this Koe knows ({known})"
        ))),
        Err(_) => Err(StoreError::Corrupt(format!("schema version {current} is invalid"))),
    }
}

fn migrate(connection: &Connection) -> Result<(), StoreError> {
    let current = check_schema_version(connection)?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(current) {
        let version = index + 1;
        let sql = format!("BEGIN IMMEDIATE; {migration}; PRAGMA user_version = {version}; COMMIT;");
        if let Err(error) = connection.execute_batch(&sql) {
            let _ = connection.execute_batch("ROLLBACK");
            return Err(map_error(error));
        }
    }
    Ok(())
}

type AccountRow = (String, String, i64, i64, String);

fn account_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AccountRow> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
}

#[async_trait]
impl AccountStore for SqliteStore {
    async fn create_account_with_role(
        &self,
        username: &Username,
        password_hash: &str,
        role: Role,
        now: UnixTime,
    ) -> Result<(), StoreError> {
        let (username, hash) = (username.to_string(), password_hash.to_string());
        self.with_connection(move |connection| {
            connection
                .execute(
                    "INSERT INTO accounts
                         (username, password_hash, created_at, password_changed_at, role)
                     VALUES (?1, ?2, ?3, ?3, ?4)",
                    params![username, hash, time_to_sql(now), role.as_str()],
                )
                .map(drop)
                .map_err(|error| {
                    if is_constraint(&error, rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY) {
                        StoreError::UsernameTaken
                    } else {
                        map_error(error)
                    }
                })
        })
        .await
    }

    async fn find_account(&self, username: &Username) -> Result<Option<Account>, StoreError> {
        let username = username.to_string();
        let row = self
            .with_connection(move |connection| {
                connection
                    .query_row(
                        "SELECT username, password_hash, created_at, password_changed_at, role
                         FROM accounts WHERE username = ?1",
                        params![username],
                        account_from_row,
                    )
                    .optional()
                    .map_err(map_error)
            })
            .await?;
        row.map(|(username, password_hash, created, changed, role)| {
            Ok(Account {
                username: username_from_sql(&username)?,
                password_hash,
                created_at: time_from_sql(created),
                password_changed_at: time_from_sql(changed),
                role: role_from_sql(&role)?,
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
        let (username, hash) = (username.to_string(), password_hash.to_string());
        self.with_connection(move |connection| {
            let transaction = connection.transaction().map_err(map_error)?;
            let changed = transaction
                .execute(
                    "UPDATE accounts SET password_hash = ?2, password_changed_at = ?3
                     WHERE username = ?1",
                    params![username, hash, time_to_sql(now)],
                )
                .map_err(map_error)?;
            if changed == 0 {
                return Err(StoreError::UnknownUser);
            }
            transaction
                .execute(
                    "DELETE FROM issued_certificates WHERE username = ?1",
                    params![username],
                )
                .map_err(map_error)?;
            transaction.commit().map_err(map_error)
        })
        .await
    }

    async fn delete_account(&self, username: &Username) -> Result<(), StoreError> {
        let username = username.to_string();
        self.with_connection(move |connection| {
            match connection
                .execute("DELETE FROM accounts WHERE username = ?1", params![username])
                .map_err(map_error)?
            {
                0 => Err(StoreError::UnknownUser),
                _ => Ok(()),
            }
        })
        .await
    }

    async fn record_certificate(
        &self,
        certificate: &IssuedCertificate,
        now: UnixTime,
    ) -> Result<(), StoreError> {
        let certificate = certificate.clone();
        self.with_connection(move |connection| {
            let transaction = connection.transaction().map_err(map_error)?;
            transaction
                .execute(
                    "DELETE FROM issued_certificates WHERE not_after < ?1",
                    params![time_to_sql(now)],
                )
                .map_err(map_error)?;
            transaction
                .execute(
                    "INSERT INTO issued_certificates (serial, username, device_key, not_after)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        serial_to_sql(certificate.serial),
                        certificate.username.as_str(),
                        certificate.device_key.to_bytes().to_vec(),
                        time_to_sql(certificate.not_after)
                    ],
                )
                .map_err(|error| {
                    if is_constraint(&error, rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY) {
                        StoreError::UnknownUser
                    } else {
                        map_error(error)
                    }
                })?;
            transaction.commit().map_err(map_error)
        })
        .await
    }

    async fn find_certificate(&self, serial: u64) -> Result<Option<IssuedCertificate>, StoreError> {
        let row = self
            .with_connection(move |connection| {
                connection
                    .query_row(
                        "SELECT username, device_key, not_after FROM issued_certificates
                         WHERE serial = ?1",
                        params![serial_to_sql(serial)],
                        |row| {
                            Ok((
                                row.get::<_, String>(0)?,
                                row.get::<_, Vec<u8>>(1)?,
                                row.get::<_, i64>(2)?,
                            ))
                        },
                    )
                    .optional()
                    .map_err(map_error)
            })
            .await?;
        row.map(|(username, device_key, not_after)| {
            Ok(IssuedCertificate {
                serial,
                username: username_from_sql(&username)?,
                device_key: device_key_from_sql(&device_key)?,
                not_after: time_from_sql(not_after),
            })
        })
        .transpose()
    }

    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }
}
