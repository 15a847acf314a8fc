//! The SQLite ledger: one file, WAL mode with full sync, one connection used from the blocking
//! pool. Each write is one `BEGIN IMMEDIATE` transaction, which also serialises gateways that
//! share the file. Schema versions are tracked in `PRAGMA user_version`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};

use super::{
    charge_entry, credit_entry, decide_hold, posted_amount, recovered_settlement, u64_to_sql, user_account, voucher_key,
    Balance, BillingId, CallFilter, CallRecord, CallRow, Credit, Entry, HoldOutcome, LedgerError, LedgerStore, NewCall,
    Settlement, VoucherCode, VoucherError, CALL_COLUMNS, VOUCHER_ACCOUNT,
};
use crate::money::Amount;

/// Each entry upgrades the schema by one version; never edit one that has shipped.
const MIGRATIONS: &[&str] = &["CREATE TABLE ledger_entries (
        seq INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        debit TEXT NOT NULL,
        credit TEXT NOT NULL,
        amount INTEGER NOT NULL CHECK (amount > 0),
        at_ms INTEGER NOT NULL,
        call_id TEXT,
        memo TEXT NOT NULL
    ) STRICT;
    CREATE INDEX ledger_entries_by_debit ON ledger_entries(debit);
    CREATE INDEX ledger_entries_by_credit ON ledger_entries(credit);
    CREATE TABLE pstn_calls (
        call_id TEXT PRIMARY KEY NOT NULL,
        username TEXT NOT NULL,
        number TEXT NOT NULL,
        destination TEXT NOT NULL,
        prefix TEXT NOT NULL,
        price_per_minute INTEGER NOT NULL,
        first_secs INTEGER NOT NULL,
        next_secs INTEGER NOT NULL,
        connection_fee INTEGER NOT NULL,
        currency TEXT NOT NULL,
        billed_unit INTEGER NOT NULL,
        gateway TEXT NOT NULL,
        trunk TEXT,
        started_ms INTEGER NOT NULL,
        answered_ms INTEGER,
        ended_ms INTEGER,
        last_seen_ms INTEGER NOT NULL,
        alive_secs INTEGER NOT NULL DEFAULT 0,
        billed_secs INTEGER,
        amount INTEGER,
        end_reason TEXT
    ) STRICT;
    CREATE INDEX pstn_calls_open ON pstn_calls(username) WHERE end_reason IS NULL;
    CREATE INDEX pstn_calls_by_user ON pstn_calls(username, started_ms);
    CREATE INDEX pstn_calls_by_start ON pstn_calls(started_ms);
    CREATE TABLE ledger_holds (
        call_id TEXT NOT NULL REFERENCES pstn_calls(call_id),
        chunk INTEGER NOT NULL,
        username TEXT NOT NULL,
        amount INTEGER NOT NULL CHECK (amount >= 0),
        released INTEGER NOT NULL DEFAULT 0,
        at_ms INTEGER NOT NULL,
        PRIMARY KEY (call_id, chunk)
    ) STRICT;
    CREATE INDEX ledger_holds_open ON ledger_holds(username) WHERE released = 0;
    CREATE TABLE vouchers (
        code_hash TEXT PRIMARY KEY NOT NULL,
        amount INTEGER NOT NULL CHECK (amount > 0),
        created_ms INTEGER NOT NULL,
        redeemed_by TEXT,
        redeemed_ms INTEGER
    ) STRICT;"];

#[derive(Debug, Clone)]
pub struct SqliteLedger {
    connection: Arc<Mutex<Connection>>,
    path: PathBuf,
}

fn map_error(error: rusqlite::Error) -> LedgerError {
    match &error {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => LedgerError::Busy,
            ErrorCode::ReadOnly => LedgerError::ReadOnly,
            ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt => LedgerError::Corrupt(error.to_string()),
            _ => LedgerError::Unavailable(error.to_string()),
        },
        _ => LedgerError::Unavailable(error.to_string()),
    }
}

impl SqliteLedger {
    /// Opens (creating if missing) the ledger at `path` and brings its schema up to date.
    /// Refuses a read-only file up front: a gateway that cannot write its ledger must not
    /// carry calls.
    pub async fn open(path: &Path, busy_timeout: Duration) -> Result<Self, LedgerError> {
        let path = path.to_path_buf();
        let opened_path = path.clone();
        let connection = tokio::task::spawn_blocking(move || -> Result<Connection, LedgerError> {
            let connection = Connection::open_with_flags(
                &opened_path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(map_error)?;
            connection.busy_timeout(busy_timeout).map_err(map_error)?;
            if connection.is_readonly(rusqlite::DatabaseName::Main).map_err(map_error)? {
                return Err(LedgerError::ReadOnly);
            }
            check_schema_version(&connection)?;
            connection.pragma_update(None, "journal_mode", "WAL").map_err(map_error)?;
            // Every committed charge survives a power cut, not only a process crash.
            connection.pragma_update(None, "synchronous", "FULL").map_err(map_error)?;
            connection.pragma_update(None, "foreign_keys", "ON").map_err(map_error)?;
            migrate(&connection)?;
            Ok(connection)
        })
        .await
        .map_err(|e| LedgerError::Unavailable(e.to_string()))??;
        Ok(Self { connection: Arc::new(Mutex::new(connection)), path })
    }

    /// Runs `work` in one immediate transaction on the blocking pool; commits if it succeeds.
    async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Transaction<'_>) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        self.with_connection(move |connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(map_error)?;
            let result = work(&transaction)?;
            transaction.commit().map_err(map_error)?;
            Ok(result)
        })
        .await
    }

    async fn with_connection<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || {
            let mut connection =
                connection.lock().map_err(|_| LedgerError::Unavailable("a database worker panicked".into()))?;
            work(&mut connection)
        })
        .await
        .map_err(|e| LedgerError::Unavailable(e.to_string()))?
    }
}

fn check_schema_version(connection: &Connection) -> Result<usize, LedgerError> {
    let current: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(map_error)?;
    let known = MIGRATIONS.len();
    match usize::try_from(current) {
        Ok(current) if current <= known => Ok(current),
        Ok(_) => Err(LedgerError::Corrupt(format!("schema version {current} is newer than this Koe knows ({known})"))),
        Err(_) => Err(LedgerError::Corrupt(format!("schema version {current} is invalid"))),
    }
}

fn migrate(connection: &Connection) -> Result<(), LedgerError> {
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

fn call_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<CallRow> {
    Ok(CallRow {
        call_id: row.get(0)?,
        username: row.get(1)?,
        number: row.get(2)?,
        destination: row.get(3)?,
        prefix: row.get(4)?,
        price_per_minute: row.get(5)?,
        first_secs: row.get(6)?,
        next_secs: row.get(7)?,
        connection_fee: row.get(8)?,
        currency: row.get(9)?,
        billed_unit: row.get(10)?,
        gateway: row.get(11)?,
        trunk: row.get(12)?,
        started_ms: row.get(13)?,
        answered_ms: row.get(14)?,
        ended_ms: row.get(15)?,
        alive_secs: row.get(16)?,
        billed_secs: row.get(17)?,
        amount: row.get(18)?,
        end_reason: row.get(19)?,
    })
}

fn find_call(connection: &Connection, call: BillingId) -> Result<Option<CallRecord>, LedgerError> {
    connection
        .query_row(&format!("SELECT {CALL_COLUMNS} FROM pstn_calls WHERE call_id = ?1"), params![call.to_sql()], call_row)
        .optional()
        .map_err(map_error)?
        .map(CallRow::into_record)
        .transpose()
}

fn balance_of(connection: &Connection, username: &str) -> Result<Balance, LedgerError> {
    let (balance, held): (i64, i64) = connection
        .query_row(
            "SELECT
                COALESCE((SELECT SUM(amount) FROM ledger_entries WHERE credit = ?1), 0)
                  - COALESCE((SELECT SUM(amount) FROM ledger_entries WHERE debit = ?1), 0),
                COALESCE((SELECT SUM(amount) FROM ledger_holds WHERE username = ?2 AND released = 0), 0)",
            params![user_account(username), username],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .map_err(map_error)?;
    Ok(Balance { balance: Amount::from_micros(balance), held: Amount::from_micros(held) })
}

/// Posts `entry` unless its key was posted before; a key posted with different contents is an
/// error, never a second posting.
fn post(connection: &Connection, entry: &Entry) -> Result<bool, LedgerError> {
    let existing: Option<(String, String, i64)> = connection
        .query_row("SELECT debit, credit, amount FROM ledger_entries WHERE key = ?1", params![entry.key], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()
        .map_err(map_error)?;
    match existing {
        Some(found) if found == (entry.debit.clone(), entry.credit.clone(), entry.amount.micros()) => Ok(false),
        Some(_) => Err(LedgerError::KeyReused(entry.key.clone())),
        None => {
            connection
                .execute(
                    "INSERT INTO ledger_entries (key, debit, credit, amount, at_ms, call_id, memo) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        entry.key,
                        entry.debit,
                        entry.credit,
                        entry.amount.micros(),
                        entry.at_ms,
                        entry.call.map(BillingId::to_sql),
                        entry.memo
                    ],
                )
                .map_err(map_error)?;
            Ok(true)
        }
    }
}

/// The hold of (call, chunk) already made, if any.
fn existing_hold(connection: &Connection, call: BillingId, chunk: u32) -> Result<Option<Amount>, LedgerError> {
    connection
        .query_row("SELECT amount FROM ledger_holds WHERE call_id = ?1 AND chunk = ?2", params![call.to_sql(), chunk], |row| {
            row.get::<_, i64>(0)
        })
        .optional()
        .map_err(map_error)
        .map(|amount| amount.map(Amount::from_micros))
}

fn insert_hold(connection: &Connection, call: BillingId, chunk: u32, username: &str, amount: Amount, now_ms: i64) -> Result<(), LedgerError> {
    connection
        .execute(
            "INSERT INTO ledger_holds (call_id, chunk, username, amount, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![call.to_sql(), chunk, username, amount.micros(), now_ms],
        )
        .map_err(map_error)?;
    connection
        .execute("UPDATE pstn_calls SET last_seen_ms = MAX(last_seen_ms, ?2) WHERE call_id = ?1", params![call.to_sql(), now_ms])
        .map_err(map_error)?;
    Ok(())
}

fn settle_in(connection: &Connection, call: BillingId, settlement: Settlement, now_ms: i64) -> Result<CallRecord, LedgerError> {
    let record = find_call(connection, call)?.ok_or(LedgerError::UnknownCall(call))?;
    if !record.is_open() {
        return Ok(record);
    }
    let held: i64 = connection
        .query_row("SELECT COALESCE(SUM(amount), 0) FROM ledger_holds WHERE call_id = ?1 AND released = 0", params![call.to_sql()], |row| {
            row.get(0)
        })
        .map_err(map_error)?;
    let amount = posted_amount(settlement.amount, Amount::from_micros(held));
    if let Some(entry) = charge_entry(&record, amount, now_ms) {
        post(connection, &entry)?;
    }
    connection.execute("UPDATE ledger_holds SET released = 1 WHERE call_id = ?1", params![call.to_sql()]).map_err(map_error)?;
    connection
        .execute(
            "UPDATE pstn_calls SET ended_ms = ?2, last_seen_ms = ?2, billed_secs = ?3, amount = ?4, end_reason = ?5 WHERE call_id = ?1",
            params![call.to_sql(), now_ms, u64_to_sql(settlement.billed_secs), amount.micros(), settlement.end.as_str()],
        )
        .map_err(map_error)?;
    find_call(connection, call)?.ok_or(LedgerError::UnknownCall(call))
}

#[async_trait]
impl LedgerStore for SqliteLedger {
    async fn open_call(&self, call: &NewCall, want: Amount, at_least: Amount, now_ms: i64) -> Result<HoldOutcome, LedgerError> {
        let call = call.clone();
        self.write(move |tx| {
            if let Some(granted) = existing_hold(tx, call.id, 0)? {
                return Ok(HoldOutcome::Held { granted });
            }
            let open: u32 = tx
                .query_row("SELECT COUNT(*) FROM pstn_calls WHERE username = ?1 AND end_reason IS NULL", params![call.username], |row| row.get(0))
                .map_err(map_error)?;
            if open >= call.max_open_calls {
                return Ok(HoldOutcome::TooManyCalls { open });
            }
            let outcome = decide_hold(&balance_of(tx, &call.username)?, want, at_least);
            if let HoldOutcome::Held { granted } = outcome {
                tx.execute(
                    "INSERT INTO pstn_calls (call_id, username, number, destination, prefix, price_per_minute, first_secs,
                        next_secs, connection_fee, currency, billed_unit, gateway, started_ms, last_seen_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13)",
                    params![
                        call.id.to_sql(),
                        call.username,
                        call.number,
                        call.rate.destination,
                        call.rate.prefix,
                        call.rate.price_per_minute.micros(),
                        call.rate.increment.first_secs,
                        call.rate.increment.next_secs,
                        call.rate.connection_fee.micros(),
                        call.currency.code,
                        call.currency.billed_unit.micros(),
                        call.gateway,
                        now_ms
                    ],
                )
                .map_err(map_error)?;
                insert_hold(tx, call.id, 0, &call.username, granted, now_ms)?;
            }
            Ok(outcome)
        })
        .await
    }

    async fn hold(&self, call: BillingId, chunk: u32, want: Amount, at_least: Amount, now_ms: i64) -> Result<HoldOutcome, LedgerError> {
        self.write(move |tx| {
            if let Some(granted) = existing_hold(tx, call, chunk)? {
                return Ok(HoldOutcome::Held { granted });
            }
            let record = find_call(tx, call)?.ok_or(LedgerError::UnknownCall(call))?;
            if !record.is_open() {
                return Err(LedgerError::CallClosed(call));
            }
            let outcome = decide_hold(&balance_of(tx, &record.username)?, want, at_least);
            if let HoldOutcome::Held { granted } = outcome {
                insert_hold(tx, call, chunk, &record.username, granted, now_ms)?;
            }
            Ok(outcome)
        })
        .await
    }

    async fn record_answer(&self, call: BillingId, trunk: Option<&str>, now_ms: i64) -> Result<(), LedgerError> {
        let trunk = trunk.map(str::to_string);
        self.write(move |tx| {
            tx.execute(
                "UPDATE pstn_calls SET answered_ms = COALESCE(answered_ms, ?2), trunk = COALESCE(?3, trunk),
                    last_seen_ms = MAX(last_seen_ms, ?2)
                 WHERE call_id = ?1 AND end_reason IS NULL",
                params![call.to_sql(), now_ms, trunk],
            )
            .map_err(map_error)?;
            Ok(())
        })
        .await
    }

    async fn record_progress(&self, call: BillingId, alive_secs: u64, now_ms: i64) -> Result<(), LedgerError> {
        self.write(move |tx| {
            tx.execute(
                "UPDATE pstn_calls SET alive_secs = MAX(alive_secs, ?2), last_seen_ms = MAX(last_seen_ms, ?3)
                 WHERE call_id = ?1 AND end_reason IS NULL",
                params![call.to_sql(), u64_to_sql(alive_secs), now_ms],
            )
            .map_err(map_error)?;
            Ok(())
        })
        .await
    }

    async fn settle(&self, call: BillingId, settlement: Settlement, now_ms: i64) -> Result<CallRecord, LedgerError> {
        self.write(move |tx| settle_in(tx, call, settlement, now_ms)).await
    }

    async fn recover(&self, gateway: &str, abandoned_after: Duration, now_ms: i64) -> Result<Vec<CallRecord>, LedgerError> {
        let gateway = gateway.to_string();
        let abandoned_before = now_ms.saturating_sub(i64::try_from(abandoned_after.as_millis()).unwrap_or(i64::MAX));
        self.write(move |tx| {
            let open: Vec<CallRow> = tx
                .prepare(&format!(
                    "SELECT {CALL_COLUMNS} FROM pstn_calls
                     WHERE end_reason IS NULL AND (gateway = ?1 OR last_seen_ms < ?2) ORDER BY started_ms"
                ))
                .map_err(map_error)?
                .query_map(params![gateway, abandoned_before], call_row)
                .map_err(map_error)?
                .collect::<Result<_, _>>()
                .map_err(map_error)?;
            let mut settled = Vec::with_capacity(open.len());
            for row in open {
                let record = row.into_record()?;
                let settlement = recovered_settlement(&record);
                settled.push(settle_in(tx, record.id, settlement, now_ms)?);
            }
            Ok(settled)
        })
        .await
    }

    async fn balance(&self, username: &str) -> Result<Balance, LedgerError> {
        let username = username.to_string();
        self.with_connection(move |connection| balance_of(connection, &username)).await
    }

    async fn credit(&self, credit: &Credit, now_ms: i64) -> Result<Balance, LedgerError> {
        let credit = credit.clone();
        self.write(move |tx| {
            post(tx, &credit_entry(&credit, now_ms))?;
            balance_of(tx, &credit.username)
        })
        .await
    }

    async fn create_vouchers(&self, codes: &[VoucherCode], amount: Amount, now_ms: i64) -> Result<(), LedgerError> {
        let hashes: Vec<String> = codes.iter().map(VoucherCode::hash).collect();
        self.write(move |tx| {
            for hash in hashes {
                tx.execute("INSERT INTO vouchers (code_hash, amount, created_ms) VALUES (?1, ?2, ?3)", params![hash, amount.micros(), now_ms])
                    .map_err(map_error)?;
            }
            Ok(())
        })
        .await
    }

    async fn redeem_voucher(&self, username: &str, code: &VoucherCode, now_ms: i64) -> Result<Amount, VoucherError> {
        let username = username.to_string();
        let hash = code.hash();
        // The voucher's outcome travels inside the Ok so that a refusal commits nothing and is
        // told apart from a database failure.
        let outcome = self
            .write(move |tx| {
                let found: Option<(i64, Option<String>)> = tx
                    .query_row("SELECT amount, redeemed_by FROM vouchers WHERE code_hash = ?1", params![hash], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
                    .map_err(map_error)?;
                let amount = match found {
                    None => return Ok(Err(VoucherError::Unknown)),
                    Some((_, Some(_))) => return Ok(Err(VoucherError::AlreadyUsed)),
                    Some((amount, None)) => Amount::from_micros(amount),
                };
                tx.execute("UPDATE vouchers SET redeemed_by = ?2, redeemed_ms = ?3 WHERE code_hash = ?1", params![hash, username, now_ms])
                    .map_err(map_error)?;
                let entry = Entry {
                    key: voucher_key(&hash),
                    debit: VOUCHER_ACCOUNT.to_string(),
                    credit: user_account(&username),
                    amount,
                    at_ms: now_ms,
                    call: None,
                    memo: "voucher".into(),
                };
                post(tx, &entry)?;
                Ok(Ok(amount))
            })
            .await;
        match outcome {
            Ok(result) => result,
            Err(LedgerError::KeyReused(_)) => Err(VoucherError::AlreadyUsed),
            Err(other) => Err(VoucherError::Ledger(other)),
        }
    }

    async fn call(&self, call: BillingId) -> Result<Option<CallRecord>, LedgerError> {
        self.with_connection(move |connection| find_call(connection, call)).await
    }

    async fn calls(&self, filter: &CallFilter) -> Result<Vec<CallRecord>, LedgerError> {
        let filter = filter.clone();
        self.with_connection(move |connection| {
            let rows: Vec<CallRow> = connection
                .prepare(&format!(
                    "SELECT {CALL_COLUMNS} FROM pstn_calls
                     WHERE (?1 IS NULL OR username = ?1) AND (?2 IS NULL OR started_ms >= ?2)
                     ORDER BY started_ms DESC, call_id LIMIT ?3"
                ))
                .map_err(map_error)?
                .query_map(params![filter.username, filter.since_ms, filter.limit.map_or(-1, i64::from)], call_row)
                .map_err(map_error)?
                .collect::<Result<_, _>>()
                .map_err(map_error)?;
            rows.into_iter().map(CallRow::into_record).collect()
        })
        .await
    }

    async fn entries(&self, username: Option<&str>, limit: u32) -> Result<Vec<Entry>, LedgerError> {
        let account = username.map(user_account);
        self.with_connection(move |connection| {
            let rows: Vec<(String, String, String, i64, i64, Option<String>, String)> = connection
                .prepare(
                    "SELECT key, debit, credit, amount, at_ms, call_id, memo FROM ledger_entries
                     WHERE ?1 IS NULL OR debit = ?1 OR credit = ?1 ORDER BY seq DESC LIMIT ?2",
                )
                .map_err(map_error)?
                .query_map(params![account, limit], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?, row.get(6)?))
                })
                .map_err(map_error)?
                .collect::<Result<_, _>>()
                .map_err(map_error)?;
            rows.into_iter()
                .map(|(key, debit, credit, amount, at_ms, call, memo)| {
                    Ok(Entry { key, debit, credit, amount: Amount::from_micros(amount), at_ms, call: call.as_deref().map(BillingId::from_sql).transpose()?, memo })
                })
                .collect()
        })
        .await
    }

    fn describe(&self) -> String {
        format!("SQLite ledger {}", self.path.display())
    }
}
