//! What Koe clients ask a PSTN gateway outside calls, and what it answers: the price of a
//! number (`koe rate`), the user's credit and recent charges (`koe credit`), redeeming a
//! voucher (`koe credit redeem`). The messages travel in sealed envelopes; a client accepts
//! answers only from a certificate with the gateway role.
//!
//! Amounts travel as micro-units with the gateway's currency, so the client shows them in the
//! currency's own form, never from a float.

use serde::{Deserialize, Serialize};

use crate::ledger::{user_account, LedgerStore, VoucherCode, VoucherError};
use crate::money::{Amount, Currency};
use crate::number::{E164, NumberError};
use crate::rates::{Increment, Rate, RateTable};

/// The longest call a quote says the credit pays for (a bound, not a promise).
pub const QUOTE_HORIZON_SECS: u64 = 24 * 3600;
/// Charges `koe credit` lists.
pub const RECENT_CHARGES: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ask", rename_all = "snake_case")]
pub enum PstnRequest {
    /// The price of calling `number` (E.164), and how long the asker's credit lasts at it.
    Rate { number: String },
    Credit,
    Redeem { code: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum PstnResponse {
    Rate(Quote),
    Credit(CreditView),
    Redeemed { amount: Amount, balance: Amount, currency: Currency },
    /// The request cannot be met, in words for the person.
    Refused { reason: String },
}

/// A price, before dialling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    pub number: String,
    pub destination: String,
    pub price_per_minute: Amount,
    pub increment: Increment,
    pub connection_fee: Amount,
    pub currency: Currency,
    /// What the asker may spend now (balance less what calls in progress hold).
    pub available: Amount,
    /// How long a call may last on that credit; `None`: not even the first increment.
    pub affordable_secs: Option<u64>,
}

impl Quote {
    /// `Japan mobile: ¥21.00/min (billed 60/60)`, with the fee if there is one.
    pub fn price_text(&self) -> String {
        let mut text = format!(
            "{}: {}/min (billed {})",
            self.destination,
            self.price_per_minute.display(&self.currency),
            self.increment
        );
        if self.connection_fee.is_positive() {
            text.push_str(&format!(", plus {} to connect", self.connection_fee.display(&self.currency)));
        }
        text
    }

    /// `your credit (¥100.00) lasts 4 min` or why it does not.
    pub fn credit_text(&self) -> String {
        let credit = self.available.display(&self.currency);
        match self.affordable_secs {
            None => format!("your credit ({credit}) is not enough for the first increment"),
            Some(secs) if secs >= QUOTE_HORIZON_SECS => format!("your credit ({credit}) lasts more than a day"),
            Some(secs) => format!("your credit ({credit}) lasts {}", minutes_text(secs)),
        }
    }
}

/// `4 min`, `1 min 30 s`, `45 s`.
pub fn minutes_text(secs: u64) -> String {
    match (secs / 60, secs % 60) {
        (0, s) => format!("{s} s"),
        (m, 0) => format!("{m} min"),
        (m, s) => format!("{m} min {s} s"),
    }
}

/// A user's credit, for `koe credit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditView {
    pub currency: Currency,
    pub balance: Amount,
    pub held: Amount,
    /// Newest first.
    pub recent: Vec<ChargeView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeView {
    pub at_ms: i64,
    /// Negative: money out (a call); positive: money in.
    pub amount: i64,
    pub memo: String,
}

/// What answers a request: the rates, the ledger and the currency of one gateway.
#[derive(Debug)]
pub struct Service<'a> {
    pub rates: &'a RateTable,
    pub ledger: &'a dyn LedgerStore,
    pub currency: &'a Currency,
    /// E.164 digits never called through this gateway (a fraud limit).
    pub blocked_prefixes: &'a [String],
}

impl Service<'_> {
    /// Answers `username`'s request; ledger failures become refusals in words.
    pub async fn answer(&self, username: &str, request: PstnRequest, now_ms: i64) -> PstnResponse {
        let refused = |reason: String| PstnResponse::Refused { reason };
        match request {
            PstnRequest::Rate { number } => match self.quote(username, &number).await {
                Ok(quote) => PstnResponse::Rate(quote),
                Err(reason) => refused(reason),
            },
            PstnRequest::Credit => match self.credit(username).await {
                Ok(view) => PstnResponse::Credit(view),
                Err(reason) => refused(reason),
            },
            PstnRequest::Redeem { code } => {
                let code = match VoucherCode::parse(&code) {
                    Ok(code) => code,
                    Err(error) => return refused(error.to_string()),
                };
                match self.ledger.redeem_voucher(username, &code, now_ms).await {
                    Ok(amount) => match self.ledger.balance(username).await {
                        Ok(balance) => PstnResponse::Redeemed { amount, balance: balance.balance, currency: self.currency.clone() },
                        Err(error) => refused(format!("redeemed, but the balance cannot be read just now: {error}")),
                    },
                    Err(VoucherError::Ledger(error)) => refused(format!("credit is unavailable just now; try again later ({error})")),
                    Err(error) => refused(error.to_string()),
                }
            }
        }
    }

    /// Whether `number` may be called through this gateway, and at what rate: the number is
    /// checked again (the client parsed it, but nothing from the network is trusted), emergency
    /// and blocked numbers are refused, and it needs a rate. Quotes and calls both ask here.
    pub fn rate_for(&self, number: &str) -> Result<(E164, Rate), String> {
        let number = E164::parse_canonical(number).map_err(|error: NumberError| error.to_string())?;
        if self.blocked_prefixes.iter().any(|prefix| number.digits().starts_with(prefix.as_str())) {
            return Err(format!("{number} cannot be called through this gateway (the destination is blocked)"));
        }
        let rate = self.rates.lookup(number.digits()).cloned().ok_or_else(|| format!("{number} cannot be called: this gateway has no rate for it"))?;
        Ok((number, rate))
    }

    /// The price of `number` for `username`.
    pub async fn quote(&self, username: &str, number: &str) -> Result<Quote, String> {
        let (number, rate) = self.rate_for(number)?;
        let balance = self.ledger.balance(username).await.map_err(|error| format!("credit is unavailable just now; try again later ({error})"))?;
        let available = balance.available();
        Ok(Quote {
            number: number.to_string(),
            destination: rate.destination.clone(),
            price_per_minute: rate.price_per_minute,
            increment: rate.increment,
            connection_fee: rate.connection_fee,
            currency: self.currency.clone(),
            available,
            affordable_secs: rate.secs_affordable(available, QUOTE_HORIZON_SECS, self.currency),
        })
    }

    async fn credit(&self, username: &str) -> Result<CreditView, String> {
        let unavailable = |error: crate::ledger::LedgerError| format!("credit is unavailable just now; try again later ({error})");
        let balance = self.ledger.balance(username).await.map_err(unavailable)?;
        let account = user_account(username);
        let recent = self
            .ledger
            .entries(Some(username), RECENT_CHARGES)
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|entry| {
                let sign = if entry.credit == account { 1 } else { -1 };
                ChargeView { at_ms: entry.at_ms, amount: sign * entry.amount.micros(), memo: entry.memo }
            })
            .collect();
        Ok(CreditView { currency: self.currency.clone(), balance: balance.balance, held: balance.held, recent })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_read_as_a_person_would_say_them() {
        let rates = RateTable::built_in();
        let rate = rates.lookup("819012345678").unwrap();
        let quote = Quote {
            number: "+819012345678".into(),
            destination: rate.destination.clone(),
            price_per_minute: rate.price_per_minute,
            increment: rate.increment,
            connection_fee: Amount::ZERO,
            currency: Currency::default(),
            available: "100".parse().unwrap(),
            affordable_secs: Some(240),
        };
        assert_eq!(quote.price_text(), "Japan mobile: ¥21.00/min (billed 60/60)");
        assert_eq!(quote.credit_text(), "your credit (¥100.00) lasts 4 min");
        let broke = Quote { affordable_secs: None, available: "20".parse().unwrap(), ..quote.clone() };
        assert_eq!(broke.credit_text(), "your credit (¥20.00) is not enough for the first increment");
        let fee = Quote { connection_fee: "10".parse().unwrap(), ..quote };
        assert!(fee.price_text().ends_with(", plus ¥10.00 to connect"));
        assert_eq!(minutes_text(90), "1 min 30 s");
        assert_eq!(minutes_text(45), "45 s");
    }
}
