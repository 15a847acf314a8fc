//! The prepaid ledger: users' credit, holds on it while calls last, the posted charges, and the
//! call detail records, behind one [`LedgerStore`] trait with a SQLite store (the default) and
//! a PostgreSQL store (several gateways sharing one ledger). Both run the same contract tests.
//!
//! Double entry: every posted amount moves from one account to another ([`Entry`]), and a
//! balance is derived from the entries, never edited in place. A user's credit is the account
//! `user:NAME`; top-ups come from `funding`, vouchers from `vouchers`, charges go to
//! `revenue`, corrections come from or go to `adjustments`.
//!
//! Two-phase charging: a call holds credit in chunks (keyed by call and chunk), the exact cost
//! is posted at the end and every hold released in the same transaction. What may be held is
//! decided by [`decide_hold`] inside the store's transaction, with the user's account locked,
//! so two calls at once can never hold more than the balance. Every write is idempotent. After
//! a crash, [`LedgerStore::recover`] settles each call left open from its last recorded
//! progress ([`recovered_settlement`]): posted from what was recorded, the rest released.

mod postgres;
mod sqlite;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::money::{Amount, Currency};
use crate::rates::{Increment, Rate};

pub use postgres::PostgresLedger;
pub use sqlite::SqliteLedger;

/// The account that funds operator top-ups.
pub const FUNDING_ACCOUNT: &str = "funding";
/// The account that funds redeemed vouchers.
pub const VOUCHER_ACCOUNT: &str = "vouchers";
/// The account that posted call charges go to.
pub const REVENUE_ACCOUNT: &str = "revenue";
/// The account that corrections and refunds come from (or go to).
pub const ADJUSTMENT_ACCOUNT: &str = "adjustments";

/// One call's identity in the ledger, chosen at random by the gateway that admits it (never by
/// the caller, who could otherwise reuse another call's idempotency keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BillingId(pub u128);

impl BillingId {
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        Self(u128::from_be_bytes(bytes))
    }

    pub fn to_sql(self) -> String {
        format!("{:032x}", self.0)
    }

    pub fn from_sql(text: &str) -> Result<Self, LedgerError> {
        u128::from_str_radix(text, 16).map(Self).map_err(|_| LedgerError::Corrupt(format!("bad call id {text:?}")))
    }
}

impl fmt::Display for BillingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", (self.0 >> 96) as u32)
    }
}

/// The account of a user's credit.
pub fn user_account(username: &str) -> String {
    format!("user:{username}")
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LedgerError {
    #[error("the ledger database is locked by another process")]
    Busy,
    #[error("the ledger database is read-only")]
    ReadOnly,
    #[error("the ledger database is unavailable: {0}")]
    Unavailable(String),
    #[error("the ledger database is damaged or not a Koe ledger: {0}")]
    Corrupt(String),
    #[error("no call {0} in the ledger")]
    UnknownCall(BillingId),
    #[error("call {0} is already settled")]
    CallClosed(BillingId),
    #[error("key {0:?} was already used for a different entry")]
    KeyReused(String),
}

/// A user's money at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    /// Credits minus posted charges.
    pub balance: Amount,
    /// Held by calls in progress.
    pub held: Amount,
}

impl Balance {
    /// What a new call may hold.
    pub fn available(&self) -> Amount {
        self.balance.saturating_sub(self.held).max(Amount::ZERO)
    }
}

/// What a hold request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldOutcome {
    Held { granted: Amount },
    /// Less than the least asked for was available; nothing was held.
    Insufficient { available: Amount },
    /// The user already has this many PSTN calls open (a fraud limit); nothing was held.
    TooManyCalls { open: u32 },
}

/// The rule for a hold, the same in every store: all of `want` if available, else all that is
/// available if that is at least `at_least`, else nothing.
pub fn decide_hold(balance: &Balance, want: Amount, at_least: Amount) -> HoldOutcome {
    let available = balance.available();
    if available >= want {
        HoldOutcome::Held { granted: want }
    } else if available >= at_least && available.is_positive() {
        HoldOutcome::Held { granted: available }
    } else {
        HoldOutcome::Insufficient { available }
    }
}

/// How a call ended, as its record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallEnd {
    /// The Koe caller hung up.
    CallerHungUp,
    /// The phone hung up.
    FarEndHungUp,
    /// The credit (or a limit) ran out and the gateway cut the call off.
    CutOff,
    /// The number was busy.
    Busy,
    /// The call was not answered, was refused by the carrier or failed before the answer.
    NotAnswered,
    /// The media or the signalling died mid-call (inactivity, a vanished caller, a lost ACK).
    Failed,
    /// The gateway stopped with the call open; settled from its last recorded progress.
    Recovered,
}

impl CallEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CallerHungUp => "caller_hung_up",
            Self::FarEndHungUp => "far_end_hung_up",
            Self::CutOff => "cut_off",
            Self::Busy => "busy",
            Self::NotAnswered => "not_answered",
            Self::Failed => "failed",
            Self::Recovered => "recovered",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::CallerHungUp,
            Self::FarEndHungUp,
            Self::CutOff,
            Self::Busy,
            Self::NotAnswered,
            Self::Failed,
            Self::Recovered,
        ]
        .into_iter()
        .find(|end| end.as_str() == text)
    }
}

impl fmt::Display for CallEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CallerHungUp => "you hung up",
            Self::FarEndHungUp => "the other side hung up",
            Self::CutOff => "cut off: credit spent",
            Self::Busy => "busy",
            Self::NotAnswered => "not answered",
            Self::Failed => "the call failed",
            Self::Recovered => "the gateway restarted during the call",
        })
    }
}

/// What the gateway knows about a call when it admits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCall {
    pub id: BillingId,
    pub username: String,
    /// E.164 with '+'.
    pub number: String,
    pub rate: Rate,
    pub currency: Currency,
    /// Which gateway admitted it: the one that recovers it after a restart.
    pub gateway: String,
    /// The user may have at most this many PSTN calls open at once.
    pub max_open_calls: u32,
}

/// A call detail record: one PSTN call from admission to settlement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    pub id: BillingId,
    pub username: String,
    pub number: String,
    pub destination: String,
    pub prefix: String,
    pub price_per_minute: Amount,
    pub increment: Increment,
    pub connection_fee: Amount,
    pub currency: String,
    pub billed_unit: Amount,
    pub gateway: String,
    pub trunk: Option<String>,
    pub started_ms: i64,
    pub answered_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    /// Seconds of talk known to have happened (crash recovery bills these).
    pub alive_secs: u64,
    /// Set when settled.
    pub billed_secs: Option<u64>,
    pub amount: Option<Amount>,
    pub end: Option<CallEnd>,
}

impl CallRecord {
    pub fn rate(&self) -> Rate {
        Rate {
            prefix: self.prefix.clone(),
            destination: self.destination.clone(),
            price_per_minute: self.price_per_minute,
            increment: self.increment,
            connection_fee: self.connection_fee,
        }
    }

    pub fn currency(&self) -> Currency {
        Currency { code: self.currency.clone(), billed_unit: self.billed_unit }
    }

    pub fn is_open(&self) -> bool {
        self.end.is_none()
    }
}

/// How a call is settled: `billed_secs` of talk costing `amount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    pub billed_secs: u64,
    pub amount: Amount,
    pub end: CallEnd,
}

/// What is actually posted for a settlement: never more than the holds, which are the hard cap.
pub fn posted_amount(requested: Amount, held: Amount) -> Amount {
    requested.min(held).max(Amount::ZERO)
}

/// How a call left open by a stopped gateway is settled: the talk its last progress record
/// proves, at its rate; nothing if it was never answered. Settling posts no more than the
/// call's holds ([`posted_amount`]), as for every call.
pub fn recovered_settlement(call: &CallRecord) -> Settlement {
    let billed_secs = if call.answered_ms.is_some() { call.alive_secs } else { 0 };
    let amount = call.rate().cost(billed_secs, &call.currency());
    Settlement { billed_secs, amount, end: CallEnd::Recovered }
}

/// One posted transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its idempotency key: the same key is never posted twice.
    pub key: String,
    pub debit: String,
    pub credit: String,
    pub amount: Amount,
    pub at_ms: i64,
    pub call: Option<BillingId>,
    pub memo: String,
}

/// A credit to a user's account: an operator's top-up or correction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credit {
    /// Idempotency key: the same key posts once.
    pub key: String,
    pub username: String,
    /// Positive adds credit; negative (adjustments only) takes it back.
    pub amount: i64,
    pub kind: CreditKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreditKind {
    TopUp,
    Adjustment { reason: String },
}

/// A prepaid voucher code: 80 random bits as 16 Crockford base-32 characters, printed in four
/// groups after `KOE`. Only its SHA-256 is stored, so a copy of the database redeems nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct VoucherCode(String);

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const VOUCHER_CHARS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VoucherError {
    #[error("that is not a voucher code: codes look like KOE-XXXX-XXXX-XXXX-XXXX")]
    Malformed,
    #[error("no such voucher: check the code")]
    Unknown,
    #[error("this voucher was already used")]
    AlreadyUsed,
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl VoucherCode {
    pub fn generate(rng: &mut impl rand_core::RngCore) -> Self {
        let mut bytes = [0u8; 10];
        rng.fill_bytes(&mut bytes);
        let bits = bytes.iter().fold(0u128, |acc, byte| (acc << 8) | u128::from(*byte));
        let code = (0..VOUCHER_CHARS).rev().map(|i| CROCKFORD[((bits >> (i * 5)) & 31) as usize] as char).collect();
        Self(code)
    }

    /// Reads a code as a person types it: any case, with or without `KOE` and dashes or
    /// spaces, and the letters Crockford's alphabet folds (O→0, I and L→1).
    pub fn parse(text: &str) -> Result<Self, VoucherError> {
        let upper: String = text.chars().filter(|c| !matches!(c, '-' | ' ')).collect::<String>().to_ascii_uppercase();
        let body = upper.strip_prefix("KOE").unwrap_or(&upper);
        let folded: String = body
            .chars()
            .map(|c| match c {
                'O' => '0',
                'I' | 'L' => '1',
                c => c,
            })
            .collect();
        if folded.len() != VOUCHER_CHARS || !folded.bytes().all(|b| CROCKFORD.contains(&b)) {
            return Err(VoucherError::Malformed);
        }
        Ok(Self(folded))
    }

    /// What the store keeps.
    pub fn hash(&self) -> String {
        Sha256::digest(self.0.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for VoucherCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups: Vec<&str> = (0..VOUCHER_CHARS).step_by(4).map(|i| &self.0[i..i + 4]).collect();
        write!(f, "KOE-{}", groups.join("-"))
    }
}

impl fmt::Debug for VoucherCode {
    /// Codes are money: never in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VoucherCode(…)")
    }
}

/// Which call records to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallFilter {
    pub username: Option<String>,
    /// Calls started at or after this.
    pub since_ms: Option<i64>,
    pub limit: Option<u32>,
}

/// The ledger's storage. Every write is one transaction and idempotent.
#[async_trait]
pub trait LedgerStore: Send + Sync + fmt::Debug + 'static {
    /// Admits a call: records it and holds its first chunk (chunk 0) by [`decide_hold`], or
    /// records nothing if the hold is refused. Again with the same id: the first outcome.
    async fn open_call(&self, call: &NewCall, want: Amount, at_least: Amount, now_ms: i64) -> Result<HoldOutcome, LedgerError>;

    /// Holds another chunk of an open call. Again with the same chunk: the first outcome.
    async fn hold(&self, call: BillingId, chunk: u32, want: Amount, at_least: Amount, now_ms: i64) -> Result<HoldOutcome, LedgerError>;

    /// Records the answer (billing time starts) and which trunk carried the call.
    async fn record_answer(&self, call: BillingId, trunk: Option<&str>, now_ms: i64) -> Result<(), LedgerError>;

    /// Records that the answered call lasted at least `alive_secs` (never lowers it).
    async fn record_progress(&self, call: BillingId, alive_secs: u64, now_ms: i64) -> Result<(), LedgerError>;

    /// Posts the cost (no more than the holds) and releases the holds, in one transaction.
    /// Again: the settlement already made, unchanged.
    async fn settle(&self, call: BillingId, settlement: Settlement, now_ms: i64) -> Result<CallRecord, LedgerError>;

    /// Settles every call left open by `gateway` (it restarted) and every call of any gateway
    /// not heard from for `abandoned_after` (it died): posted from the recorded progress, the
    /// rest released. Returns the calls it settled.
    async fn recover(&self, gateway: &str, abandoned_after: Duration, now_ms: i64) -> Result<Vec<CallRecord>, LedgerError>;

    async fn balance(&self, username: &str) -> Result<Balance, LedgerError>;

    /// Posts an operator's top-up or correction. Again with the same key: no-op.
    async fn credit(&self, credit: &Credit, now_ms: i64) -> Result<Balance, LedgerError>;

    /// Stores new vouchers worth `amount` each.
    async fn create_vouchers(&self, codes: &[VoucherCode], amount: Amount, now_ms: i64) -> Result<(), LedgerError>;

    /// Credits a voucher to a user, once only.
    async fn redeem_voucher(&self, username: &str, code: &VoucherCode, now_ms: i64) -> Result<Amount, VoucherError>;

    async fn call(&self, call: BillingId) -> Result<Option<CallRecord>, LedgerError>;

    /// Call records, newest first.
    async fn calls(&self, filter: &CallFilter) -> Result<Vec<CallRecord>, LedgerError>;

    /// Posted entries touching a user's account (or all, for `None`), newest first.
    async fn entries(&self, username: Option<&str>, limit: u32) -> Result<Vec<Entry>, LedgerError>;

    /// A short description for logs, without credentials.
    fn describe(&self) -> String;
}

/// Opens the ledger a `--db` URL names: `sqlite:PATH` (created if missing) or `postgres://…`.
pub async fn open_ledger(url: &str, sqlite_busy_timeout: Duration) -> Result<Arc<dyn LedgerStore>, LedgerError> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        Ok(Arc::new(SqliteLedger::open(path.as_ref(), sqlite_busy_timeout).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresLedger::connect(url).await?))
    } else {
        Err(LedgerError::Unavailable(format!("unknown database URL {url:?}: use sqlite:PATH or postgres://…")))
    }
}

/// The columns of a call record, in the order both stores select them.
const CALL_COLUMNS: &str = "call_id, username, number, destination, prefix, price_per_minute, first_secs, \
    next_secs, connection_fee, currency, billed_unit, gateway, trunk, started_ms, answered_ms, ended_ms, \
    alive_secs, billed_secs, amount, end_reason";

/// A call record as both stores read it, before its columns are checked.
#[derive(Debug)]
struct CallRow {
    call_id: String,
    username: String,
    number: String,
    destination: String,
    prefix: String,
    price_per_minute: i64,
    first_secs: i64,
    next_secs: i64,
    connection_fee: i64,
    currency: String,
    billed_unit: i64,
    gateway: String,
    trunk: Option<String>,
    started_ms: i64,
    answered_ms: Option<i64>,
    ended_ms: Option<i64>,
    alive_secs: i64,
    billed_secs: Option<i64>,
    amount: Option<i64>,
    end_reason: Option<String>,
}

impl CallRow {
    fn into_record(self) -> Result<CallRecord, LedgerError> {
        let secs = |value: i64| u32::try_from(value).map_err(|_| LedgerError::Corrupt(format!("bad increment {value}")));
        let end = match self.end_reason.as_deref() {
            None => None,
            Some(text) => Some(CallEnd::parse(text).ok_or_else(|| LedgerError::Corrupt(format!("bad end reason {text:?}")))?),
        };
        Ok(CallRecord {
            id: BillingId::from_sql(&self.call_id)?,
            username: self.username,
            number: self.number,
            destination: self.destination,
            prefix: self.prefix,
            price_per_minute: Amount::from_micros(self.price_per_minute),
            increment: Increment { first_secs: secs(self.first_secs)?, next_secs: secs(self.next_secs)? },
            connection_fee: Amount::from_micros(self.connection_fee),
            currency: self.currency,
            billed_unit: Amount::from_micros(self.billed_unit),
            gateway: self.gateway,
            trunk: self.trunk,
            started_ms: self.started_ms,
            answered_ms: self.answered_ms,
            ended_ms: self.ended_ms,
            alive_secs: u64_from_sql(self.alive_secs),
            billed_secs: self.billed_secs.map(u64_from_sql),
            amount: self.amount.map(Amount::from_micros),
            end,
        })
    }
}

/// The entry a credit posts.
fn credit_entry(credit: &Credit, now_ms: i64) -> Entry {
    let user = user_account(&credit.username);
    let (source, memo) = match &credit.kind {
        CreditKind::TopUp => (FUNDING_ACCOUNT.to_string(), "top-up".to_string()),
        CreditKind::Adjustment { reason } => (ADJUSTMENT_ACCOUNT.to_string(), format!("adjustment: {reason}")),
    };
    let (debit, credit_account) = if credit.amount >= 0 { (source, user) } else { (user, source) };
    Entry {
        key: credit.key.clone(),
        debit,
        credit: credit_account,
        amount: Amount::from_micros(credit.amount.saturating_abs()),
        at_ms: now_ms,
        call: None,
        memo,
    }
}

/// The entry a settled call posts, if it costs anything.
fn charge_entry(call: &CallRecord, amount: Amount, now_ms: i64) -> Option<Entry> {
    amount.is_positive().then(|| Entry {
        key: charge_key(call.id),
        debit: user_account(&call.username),
        credit: REVENUE_ACCOUNT.to_string(),
        amount,
        at_ms: now_ms,
        call: Some(call.id),
        memo: format!("call to {} ({})", call.number, call.destination),
    })
}

/// The ledger's clock: Unix milliseconds, as every `now_ms` of [`LedgerStore`] takes it.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Idempotency keys of the entries a call posts.
fn charge_key(call: BillingId) -> String {
    format!("charge:{}", call.to_sql())
}

fn voucher_key(hash: &str) -> String {
    format!("voucher:{hash}")
}

fn u64_to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn u64_from_sql(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yen(text: &str) -> Amount {
        text.parse().unwrap()
    }

    #[test]
    fn a_hold_takes_what_is_wanted_else_what_is_left_if_enough() {
        let balance = Balance { balance: yen("100"), held: yen("40") };
        assert_eq!(decide_hold(&balance, yen("50"), yen("21")), HoldOutcome::Held { granted: yen("50") });
        assert_eq!(decide_hold(&balance, yen("63"), yen("21")), HoldOutcome::Held { granted: yen("60") });
        assert_eq!(decide_hold(&balance, yen("63"), yen("61")), HoldOutcome::Insufficient { available: yen("60") });
        let overdrawn = Balance { balance: Amount::from_micros(-5_000_000), held: Amount::ZERO };
        assert_eq!(decide_hold(&overdrawn, yen("1"), yen("1")), HoldOutcome::Insufficient { available: Amount::ZERO });
        let empty = Balance { balance: Amount::ZERO, held: Amount::ZERO };
        assert_eq!(decide_hold(&empty, Amount::ZERO, Amount::ZERO), HoldOutcome::Held { granted: Amount::ZERO });
    }

    #[test]
    fn voucher_codes_read_as_typed_and_never_log() {
        let mut rng = rand_core::OsRng;
        let code = VoucherCode::generate(&mut rng);
        let printed = code.to_string();
        assert!(printed.starts_with("KOE-") && printed.len() == 4 + 16 + 3, "{printed}");
        assert_eq!(VoucherCode::parse(&printed).unwrap(), code);
        assert_eq!(VoucherCode::parse(&printed.to_lowercase().replace('-', " ")).unwrap(), code);
        assert_eq!(VoucherCode::parse("koe-0000-1111-1111-3333").unwrap(), VoucherCode::parse("OOOO-IIII-LLLL-3333").unwrap());
        assert_eq!(VoucherCode::parse("KOE-0000-1111-2222-333"), Err(VoucherError::Malformed));
        assert_eq!(VoucherCode::parse("KOE-0000-1111-2222-333U"), Err(VoucherError::Malformed));
        assert_eq!(VoucherCode::parse(""), Err(VoucherError::Malformed));
        assert_eq!(format!("{code:?}"), "VoucherCode(…)");
        assert_ne!(code.hash(), VoucherCode::generate(&mut rng).hash());
    }

    #[test]
    fn call_ends_read_back() {
        for end in [CallEnd::CallerHungUp, CallEnd::FarEndHungUp, CallEnd::CutOff, CallEnd::Busy, CallEnd::NotAnswered, CallEnd::Failed, CallEnd::Recovered] {
            assert_eq!(CallEnd::parse(end.as_str()), Some(end));
        }
        assert_eq!(CallEnd::parse("exploded"), None);
    }
}
