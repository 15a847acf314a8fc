//! The PostgreSQL ledger, for several gateways sharing one ledger. Each write is one
//! transaction that first takes a transaction-scoped advisory lock on the user, so the hold
//! decisions of all gateways for one user are serialised and can never overspend. One
//! connection per gateway process carries the transactions one at a time; a dropped connection
//! is re-established on the next request.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, GenericClient, NoTls, Row};

use super::{
    charge_entry, credit_entry, decide_hold, posted_amount, recovered_settlement, u64_to_sql, user_account, voucher_key,
    Balance, BillingId, CallFilter, CallRecord, CallRow, Credit, Entry, HoldOutcome, LedgerError, LedgerStore, NewCall,
    Settlement, VoucherCode, VoucherError, CALL_COLUMNS, VOUCHER_ACCOUNT,
};
use crate::money::Amount;

/// Each entry upgrades the schema by one version; never edit one that has shipped.
const MIGRATIONS: &[&str] = &["CREATE TABLE ledger_entries (
        seq BIGSERIAL PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        debit TEXT NOT NULL,
        credit TEXT NOT NULL,
        amount BIGINT NOT NULL CHECK (amount > 0),
        at_ms BIGINT NOT NULL,
        call_id TEXT,
        memo TEXT NOT NULL
    );
    CREATE INDEX ledger_entries_by_debit ON ledger_entries(debit);
    CREATE INDEX ledger_entries_by_credit ON ledger_entries(credit);
    CREATE TABLE pstn_calls (
        call_id TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        number TEXT NOT NULL,
        destination TEXT NOT NULL,
        prefix TEXT NOT NULL,
        price_per_minute BIGINT NOT NULL,
        first_secs BIGINT NOT NULL,
        next_secs BIGINT NOT NULL,
        connection_fee BIGINT NOT NULL,
        currency TEXT NOT NULL,
        billed_unit BIGINT NOT NULL,
        gateway TEXT NOT NULL,
        trunk TEXT,
        started_ms BIGINT NOT NULL,
        answered_ms BIGINT,
        ended_ms BIGINT,
        last_seen_ms BIGINT NOT NULL,
        alive_secs BIGINT NOT NULL DEFAULT 0,
        billed_secs BIGINT,
        amount BIGINT,
        end_reason TEXT
    );
    CREATE INDEX pstn_calls_open ON pstn_calls(username) WHERE end_reason IS NULL;
    CREATE INDEX pstn_calls_by_user ON pstn_calls(username, started_ms);
    CREATE INDEX pstn_calls_by_start ON pstn_calls(started_ms);
    CREATE TABLE ledger_holds (
        call_id TEXT NOT NULL REFERENCES pstn_calls(call_id),
        chunk BIGINT NOT NULL,
        username TEXT NOT NULL,
        amount BIGINT NOT NULL CHECK (amount >= 0),
        released BOOLEAN NOT NULL DEFAULT FALSE,
        at_ms BIGINT NOT NULL,
        PRIMARY KEY (call_id, chunk)
    );
    CREATE INDEX ledger_holds_open ON ledger_holds(username) WHERE NOT released;
    CREATE TABLE vouchers (
        code_hash TEXT PRIMARY KEY,
        amount BIGINT NOT NULL CHECK (amount > 0),
        created_ms BIGINT NOT NULL,
        redeemed_by TEXT,
        redeemed_ms BIGINT
    );"];

/// Any constant works; it only has to be the same for every Koe gateway.
const MIGRATION_LOCK_ID: i64 = 0x6b6f_655f_6c65_6467; // "koe_ledg"

#[derive(Debug)]
pub struct PostgresLedger {
    config: Config,
    client: Mutex<Option<Client>>,
}

fn map_error(error: tokio_postgres::Error) -> LedgerError {
    match error.code() {
        Some(code) if code == &SqlState::READ_ONLY_SQL_TRANSACTION => LedgerError::ReadOnly,
        Some(code) if code == &SqlState::LOCK_NOT_AVAILABLE => LedgerError::Busy,
        Some(code) if code == &SqlState::T_R_SERIALIZATION_FAILURE || code == &SqlState::T_R_DEADLOCK_DETECTED => LedgerError::Busy,
        _ => LedgerError::Unavailable(error.to_string()),
    }
}

impl PostgresLedger {
    /// Connects to `url` (`postgres://user:pass@host:port/db`) and brings the schema up to date.
    pub async fn connect(url: &str) -> Result<Self, LedgerError> {
        let config: Config = url.parse().map_err(|e| LedgerError::Unavailable(format!("invalid PostgreSQL URL: {e}")))?;
        Self::connect_with(config).await
    }

    pub async fn connect_with(config: Config) -> Result<Self, LedgerError> {
        let mut client = open_client(&config).await?;
        migrate(&mut client).await?;
        Ok(Self { config, client: Mutex::new(Some(client)) })
    }

    /// Runs `work` in one transaction, reconnecting first if the connection was lost. A
    /// transaction that fails is rolled back when dropped.
    async fn write<T>(
        &self,
        work: impl for<'t> FnOnce(&'t tokio_postgres::Transaction<'t>) -> futures_util_box::BoxFuture<'t, Result<T, LedgerError>>,
    ) -> Result<T, LedgerError> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = None;
            *slot = Some(open_client(&self.config).await?);
        }
        let client = slot.as_mut().ok_or_else(|| LedgerError::Unavailable("no connection".into()))?;
        let transaction = client.transaction().await.map_err(map_error)?;
        let result = work(&transaction).await?;
        transaction.commit().await.map_err(map_error)?;
        Ok(result)
    }
}

/// A boxed future borrowing the transaction, without a dependency on the `futures` crate.
mod futures_util_box {
    pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
}

async fn open_client(config: &Config) -> Result<Client, LedgerError> {
    let (client, connection) = config.connect(NoTls).await.map_err(map_error)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "PostgreSQL ledger connection lost");
        }
    });
    Ok(client)
}

async fn migrate(client: &mut Client) -> Result<(), LedgerError> {
    let transaction = client.transaction().await.map_err(map_error)?;
    transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_ID]).await.map_err(map_error)?;
    transaction
        .batch_execute("CREATE TABLE IF NOT EXISTS koe_ledger_schema_version (version INTEGER NOT NULL)")
        .await
        .map_err(map_error)?;
    let current: i32 = transaction
        .query_opt("SELECT version FROM koe_ledger_schema_version", &[])
        .await
        .map_err(map_error)?
        .map(|row| row.get(0))
        .unwrap_or(0);
    let known = MIGRATIONS.len();
    let current = match usize::try_from(current) {
        Ok(current) if current <= known => current,
        Ok(_) => return Err(LedgerError::Corrupt(format!("schema version {current} is newer than this Koe knows ({known})"))),
        Err(_) => return Err(LedgerError::Corrupt(format!("schema version {current} is invalid"))),
    };
    for migration in MIGRATIONS.iter().skip(current) {
        transaction.batch_execute(migration).await.map_err(map_error)?;
    }
    let version = i32::try_from(known).unwrap_or(i32::MAX);
    transaction.execute("DELETE FROM koe_ledger_schema_version", &[]).await.map_err(map_error)?;
    transaction.execute("INSERT INTO koe_ledger_schema_version (version) VALUES ($1)", &[&version]).await.map_err(map_error)?;
    transaction.commit().await.map_err(map_error)
}

fn call_row(row: &Row) -> CallRow {
    CallRow {
        call_id: row.get(0),
        username: row.get(1),
        number: row.get(2),
        destination: row.get(3),
        prefix: row.get(4),
        price_per_minute: row.get(5),
        first_secs: row.get(6),
        next_secs: row.get(7),
        connection_fee: row.get(8),
        currency: row.get(9),
        billed_unit: row.get(10),
        gateway: row.get(11),
        trunk: row.get(12),
        started_ms: row.get(13),
        answered_ms: row.get(14),
        ended_ms: row.get(15),
        alive_secs: row.get(16),
        billed_secs: row.get(17),
        amount: row.get(18),
        end_reason: row.get(19),
    }
}

/// Serialises every write that decides on or changes one user's money, across gateways.
async fn lock_user(client: &impl GenericClient, username: &str) -> Result<(), LedgerError> {
    client.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&username]).await.map_err(map_error)?;
    Ok(())
}

async fn find_call(client: &impl GenericClient, call: BillingId, for_update: bool) -> Result<Option<CallRecord>, LedgerError> {
    let lock = if for_update { " FOR UPDATE" } else { "" };
    client
        .query_opt(&format!("SELECT {CALL_COLUMNS} FROM pstn_calls WHERE call_id = $1{lock}"), &[&call.to_sql()])
        .await
        .map_err(map_error)?
        .map(|row| call_row(&row).into_record())
        .transpose()
}

async fn balance_of(client: &impl GenericClient, username: &str) -> Result<Balance, LedgerError> {
    let row = client
        .query_one(
            "SELECT
                (COALESCE((SELECT SUM(amount) FROM ledger_entries WHERE credit = $1), 0)
                  - COALESCE((SELECT SUM(amount) FROM ledger_entries WHERE debit = $1), 0))::BIGINT,
                COALESCE((SELECT SUM(amount) FROM ledger_holds WHERE username = $2 AND NOT released), 0)::BIGINT",
            &[&user_account(username), &username],
        )
        .await
        .map_err(map_error)?;
    Ok(Balance { balance: Amount::from_micros(row.get(0)), held: Amount::from_micros(row.get(1)) })
}

async fn post(client: &impl GenericClient, entry: &Entry) -> Result<bool, LedgerError> {
    let existing = client
        .query_opt("SELECT debit, credit, amount FROM ledger_entries WHERE key = $1", &[&entry.key])
        .await
        .map_err(map_error)?;
    match existing {
        Some(row) => {
            let found: (String, String, i64) = (row.get(0), row.get(1), row.get(2));
            if found == (entry.debit.clone(), entry.credit.clone(), entry.amount.micros()) {
                Ok(false)
            } else {
                Err(LedgerError::KeyReused(entry.key.clone()))
            }
        }
        None => {
            client
                .execute(
                    "INSERT INTO ledger_entries (key, debit, credit, amount, at_ms, call_id, memo) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[&entry.key, &entry.debit, &entry.credit, &entry.amount.micros(), &entry.at_ms, &entry.call.map(BillingId::to_sql), &entry.memo],
                )
                .await
                .map_err(map_error)?;
            Ok(true)
        }
    }
}

async fn existing_hold(client: &impl GenericClient, call: BillingId, chunk: u32) -> Result<Option<Amount>, LedgerError> {
    Ok(client
        .query_opt("SELECT amount FROM ledger_holds WHERE call_id = $1 AND chunk = $2", &[&call.to_sql(), &i64::from(chunk)])
        .await
        .map_err(map_error)?
        .map(|row| Amount::from_micros(row.get(0))))
}

async fn insert_hold(client: &impl GenericClient, call: BillingId, chunk: u32, username: &str, amount: Amount, now_ms: i64) -> Result<(), LedgerError> {
    client
        .execute(
            "INSERT INTO ledger_holds (call_id, chunk, username, amount, at_ms) VALUES ($1, $2, $3, $4, $5)",
            &[&call.to_sql(), &i64::from(chunk), &username, &amount.micros(), &now_ms],
        )
        .await
        .map_err(map_error)?;
    client
        .execute("UPDATE pstn_calls SET last_seen_ms = GREATEST(last_seen_ms, $2) WHERE call_id = $1", &[&call.to_sql(), &now_ms])
        .await
        .map_err(map_error)?;
    Ok(())
}

async fn held_by_call(client: &impl GenericClient, call: BillingId) -> Result<Amount, LedgerError> {
    let row = client
        .query_one("SELECT COALESCE(SUM(amount), 0)::BIGINT FROM ledger_holds WHERE call_id = $1 AND NOT released", &[&call.to_sql()])
        .await
        .map_err(map_error)?;
    Ok(Amount::from_micros(row.get(0)))
}

/// Settles a call whose user is already locked.
async fn settle_in(client: &impl GenericClient, record: CallRecord, settlement: Settlement, now_ms: i64) -> Result<CallRecord, LedgerError> {
    let call = record.id;
    let record = find_call(client, call, true).await?.ok_or(LedgerError::UnknownCall(call))?;
    if !record.is_open() {
        return Ok(record);
    }
    let amount = posted_amount(settlement.amount, held_by_call(client, call).await?);
    if let Some(entry) = charge_entry(&record, amount, now_ms) {
        post(client, &entry).await?;
    }
    client.execute("UPDATE ledger_holds SET released = TRUE WHERE call_id = $1", &[&call.to_sql()]).await.map_err(map_error)?;
    client
        .execute(
            "UPDATE pstn_calls SET ended_ms = $2, last_seen_ms = $2, billed_secs = $3, amount = $4, end_reason = $5 WHERE call_id = $1",
            &[&call.to_sql(), &now_ms, &u64_to_sql(settlement.billed_secs), &amount.micros(), &settlement.end.as_str()],
        )
        .await
        .map_err(map_error)?;
    find_call(client, call, false).await?.ok_or(LedgerError::UnknownCall(call))
}

/// The user of a call, read without a lock: it never changes.
async fn owner(client: &impl GenericClient, call: BillingId) -> Result<CallRecord, LedgerError> {
    find_call(client, call, false).await?.ok_or(LedgerError::UnknownCall(call))
}

#[async_trait]
impl LedgerStore for PostgresLedger {
    async fn open_call(&self, call: &NewCall, want: Amount, at_least: Amount, now_ms: i64) -> Result<HoldOutcome, LedgerError> {
        let call = call.clone();
        self.write(move |tx| {
            Box::pin(async move {
                lock_user(tx, &call.username).await?;
                if let Some(granted) = existing_hold(tx, call.id, 0).await? {
                    return Ok(HoldOutcome::Held { granted });
                }
                let open: i64 = tx
                    .query_one("SELECT COUNT(*) FROM pstn_calls WHERE username = $1 AND end_reason IS NULL", &[&call.username])
                    .await
                    .map_err(map_error)?
                    .get(0);
                let open = u32::try_from(open).unwrap_or(u32::MAX);
                if open >= call.max_open_calls {
                    return Ok(HoldOutcome::TooManyCalls { open });
                }
                let outcome = decide_hold(&balance_of(tx, &call.username).await?, want, at_least);
                if let HoldOutcome::Held { granted } = outcome {
                    tx.execute(
                        "INSERT INTO pstn_calls (call_id, username, number, destination, prefix, price_per_minute, first_secs,
                            next_secs, connection_fee, currency, billed_unit, gateway, started_ms, last_seen_ms)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13)",
                        &[
                            &call.id.to_sql(),
                            &call.username,
                            &call.number,
                            &call.rate.destination,
                            &call.rate.prefix,
                            &call.rate.price_per_minute.micros(),
                            &i64::from(call.rate.increment.first_secs),
                            &i64::from(call.rate.increment.next_secs),
                            &call.rate.connection_fee.micros(),
                            &call.currency.code,
                            &call.currency.billed_unit.micros(),
                            &call.gateway,
                            &now_ms,
                        ],
                    )
                    .await
                    .map_err(map_error)?;
                    insert_hold(tx, call.id, 0, &call.username, granted, now_ms).await?;
                }
                Ok(outcome)
            })
        })
        .await
    }

    async fn hold(&self, call: BillingId, chunk: u32, want: Amount, at_least: Amount, now_ms: i64) -> Result<HoldOutcome, LedgerError> {
        self.write(move |tx| {
            Box::pin(async move {
                let username = owner(tx, call).await?.username;
                lock_user(tx, &username).await?;
                if let Some(granted) = existing_hold(tx, call, chunk).await? {
                    return Ok(HoldOutcome::Held { granted });
                }
                let record = find_call(tx, call, true).await?.ok_or(LedgerError::UnknownCall(call))?;
                if !record.is_open() {
                    return Err(LedgerError::CallClosed(call));
                }
                let outcome = decide_hold(&balance_of(tx, &username).await?, want, at_least);
                if let HoldOutcome::Held { granted } = outcome {
                    insert_hold(tx, call, chunk, &username, granted, now_ms).await?;
                }
                Ok(outcome)
            })
        })
        .await
    }

    async fn record_answer(&self, call: BillingId, trunk: Option<&str>, now_ms: i64) -> Result<(), LedgerError> {
        let trunk = trunk.map(str::to_string);
        self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE pstn_calls SET answered_ms = COALESCE(answered_ms, $2), trunk = COALESCE($3, trunk),
                        last_seen_ms = GREATEST(last_seen_ms, $2)
                     WHERE call_id = $1 AND end_reason IS NULL",
                    &[&call.to_sql(), &now_ms, &trunk],
                )
                .await
                .map_err(map_error)?;
                Ok(())
            })
        })
        .await
    }

    async fn record_progress(&self, call: BillingId, alive_secs: u64, now_ms: i64) -> Result<(), LedgerError> {
        self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE pstn_calls SET alive_secs = GREATEST(alive_secs, $2), last_seen_ms = GREATEST(last_seen_ms, $3)
                     WHERE call_id = $1 AND end_reason IS NULL",
                    &[&call.to_sql(), &u64_to_sql(alive_secs), &now_ms],
                )
                .await
                .map_err(map_error)?;
                Ok(())
            })
        })
        .await
    }

    async fn settle(&self, call: BillingId, settlement: Settlement, now_ms: i64) -> Result<CallRecord, LedgerError> {
        self.write(move |tx| {
            Box::pin(async move {
                let record = owner(tx, call).await?;
                lock_user(tx, &record.username).await?;
                settle_in(tx, record, settlement, now_ms).await
            })
        })
        .await
    }

    async fn recover(&self, gateway: &str, abandoned_after: Duration, now_ms: i64) -> Result<Vec<CallRecord>, LedgerError> {
        let gateway = gateway.to_string();
        let abandoned_before = now_ms.saturating_sub(i64::try_from(abandoned_after.as_millis()).unwrap_or(i64::MAX));
        self.write(move |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        &format!(
                            "SELECT {CALL_COLUMNS} FROM pstn_calls
                             WHERE end_reason IS NULL AND (gateway = $1 OR last_seen_ms < $2) ORDER BY started_ms"
                        ),
                        &[&gateway, &abandoned_before],
                    )
                    .await
                    .map_err(map_error)?;
                let mut settled = Vec::with_capacity(rows.len());
                for row in rows {
                    let record = call_row(&row).into_record()?;
                    lock_user(tx, &record.username).await?;
                    let settlement = recovered_settlement(&record);
                    settled.push(settle_in(tx, record, settlement, now_ms).await?);
                }
                Ok(settled)
            })
        })
        .await
    }

    async fn balance(&self, username: &str) -> Result<Balance, LedgerError> {
        let username = username.to_string();
        self.write(move |tx| Box::pin(async move { balance_of(tx, &username).await })).await
    }

    async fn credit(&self, credit: &Credit, now_ms: i64) -> Result<Balance, LedgerError> {
        let credit = credit.clone();
        self.write(move |tx| {
            Box::pin(async move {
                lock_user(tx, &credit.username).await?;
                post(tx, &credit_entry(&credit, now_ms)).await?;
                balance_of(tx, &credit.username).await
            })
        })
        .await
    }

    async fn create_vouchers(&self, codes: &[VoucherCode], amount: Amount, now_ms: i64) -> Result<(), LedgerError> {
        let hashes: Vec<String> = codes.iter().map(VoucherCode::hash).collect();
        self.write(move |tx| {
            Box::pin(async move {
                for hash in hashes {
                    tx.execute("INSERT INTO vouchers (code_hash, amount, created_ms) VALUES ($1, $2, $3)", &[&hash, &amount.micros(), &now_ms])
                        .await
                        .map_err(map_error)?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn redeem_voucher(&self, username: &str, code: &VoucherCode, now_ms: i64) -> Result<Amount, VoucherError> {
        let username = username.to_string();
        let hash = code.hash();
        // The voucher's outcome travels inside the Ok so that a refusal still commits nothing
        // and is told apart from a database failure.
        let outcome = self
            .write(move |tx| {
                Box::pin(async move {
                    let found = tx
                        .query_opt("SELECT amount, redeemed_by FROM vouchers WHERE code_hash = $1 FOR UPDATE", &[&hash])
                        .await
                        .map_err(map_error)?;
                    let amount = match found.map(|row| (row.get::<_, i64>(0), row.get::<_, Option<String>>(1))) {
                        None => return Ok(Err(VoucherError::Unknown)),
                        Some((_, Some(_))) => return Ok(Err(VoucherError::AlreadyUsed)),
                        Some((amount, None)) => Amount::from_micros(amount),
                    };
                    lock_user(tx, &username).await?;
                    tx.execute("UPDATE vouchers SET redeemed_by = $2, redeemed_ms = $3 WHERE code_hash = $1", &[&hash, &username, &now_ms])
                        .await
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
                    post(tx, &entry).await?;
                    Ok(Ok(amount))
                })
            })
            .await;
        match outcome {
            Ok(result) => result,
            Err(LedgerError::KeyReused(_)) => Err(VoucherError::AlreadyUsed),
            Err(other) => Err(VoucherError::Ledger(other)),
        }
    }

    async fn call(&self, call: BillingId) -> Result<Option<CallRecord>, LedgerError> {
        self.write(move |tx| Box::pin(async move { find_call(tx, call, false).await })).await
    }

    async fn calls(&self, filter: &CallFilter) -> Result<Vec<CallRecord>, LedgerError> {
        let filter = filter.clone();
        self.write(move |tx| {
            Box::pin(async move {
                let limit = filter.limit.map(i64::from);
                let rows = tx
                    .query(
                        &format!(
                            "SELECT {CALL_COLUMNS} FROM pstn_calls
                             WHERE ($1::TEXT IS NULL OR username = $1) AND ($2::BIGINT IS NULL OR started_ms >= $2)
                             ORDER BY started_ms DESC, call_id LIMIT $3"
                        ),
                        &[&filter.username, &filter.since_ms, &limit],
                    )
                    .await
                    .map_err(map_error)?;
                rows.iter().map(|row| call_row(row).into_record()).collect()
            })
        })
        .await
    }

    async fn entries(&self, username: Option<&str>, limit: u32) -> Result<Vec<Entry>, LedgerError> {
        let account = username.map(user_account);
        self.write(move |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT key, debit, credit, amount, at_ms, call_id, memo FROM ledger_entries
                         WHERE $1::TEXT IS NULL OR debit = $1 OR credit = $1 ORDER BY seq DESC LIMIT $2",
                        &[&account, &i64::from(limit)],
                    )
                    .await
                    .map_err(map_error)?;
                rows.iter()
                    .map(|row| {
                        Ok(Entry {
                            key: row.get(0),
                            debit: row.get(1),
                            credit: row.get(2),
                            amount: Amount::from_micros(row.get(3)),
                            at_ms: row.get(4),
                            call: row.get::<_, Option<String>>(5).as_deref().map(BillingId::from_sql).transpose()?,
                            memo: row.get(6),
                        })
                    })
                    .collect()
            })
        })
        .await
    }

    fn describe(&self) -> String {
        let hosts: Vec<String> = self.config.get_hosts().iter().map(|host| format!("{host:?}")).collect();
        format!("PostgreSQL ledger on {}", hosts.join(","))
    }
}
