//! Exact money: amounts as integer micro-units of a currency, decimal text in and out, and the
//! one rounding a call's total gets.
//!
//! Floats are the classic billing bug (a 60 s call at 0.05/min billed 0.0498, a fee plus three
//! 0.01 spans totalling 0.174: see `notes/pstn-billing.md`). A micro-unit (10⁻⁶) makes every
//! price with up to six decimals exact, and every per-second share of a per-minute price is
//! computed as a fraction and rounded once, up, to the operator's smallest billed unit.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Micro-units in one unit of a currency.
pub const MICROS_PER_UNIT: i64 = 1_000_000;
/// Decimals a price may have: as many as a micro-unit holds.
pub const MAX_DECIMALS: usize = 6;
/// The largest amount accepted from text: ten thousand million units, far beyond any price or
/// balance, and small enough that sums of many of them stay inside `i64`.
pub const MAX_UNITS: i64 = 10_000_000_000;

/// An amount of money in micro-units of the gateway's currency. Negative only as a balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Amount(i64);

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AmountError {
    #[error("{text:?} is not an amount: write digits with an optional decimal point, like 21 or 3.6")]
    NotANumber { text: String },
    #[error("{text:?} has more than {MAX_DECIMALS} decimals")]
    TooManyDecimals { text: String },
    #[error("{text:?} is negative; an amount here must be zero or more")]
    Negative { text: String },
    #[error("{text:?} is too large (the limit is {MAX_UNITS})")]
    TooLarge { text: String },
}

impl Amount {
    pub const ZERO: Amount = Amount(0);

    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    pub const fn micros(self) -> i64 {
        self.0
    }

    /// Whole units (for tests and built-in tables).
    pub const fn units(units: i64) -> Self {
        Self(units * MICROS_PER_UNIT)
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0.checked_add(other.0).map(Amount)
    }

    pub fn checked_sub(self, other: Amount) -> Option<Amount> {
        self.0.checked_sub(other.0).map(Amount)
    }

    pub fn saturating_sub(self, other: Amount) -> Amount {
        Amount(self.0.saturating_sub(other.0))
    }

    /// Shows the amount with as many decimals as `currency`'s billed unit has (at least that
    /// many, more only where the amount has them), with the currency's sign.
    pub fn display(self, currency: &Currency) -> DisplayAmount<'_> {
        DisplayAmount { amount: self, currency }
    }

    /// The decimal text of this amount with at least `min_decimals` decimals.
    fn decimal(self, min_decimals: usize) -> String {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let units = abs / MICROS_PER_UNIT as u64;
        let micros = abs % MICROS_PER_UNIT as u64;
        let mut fraction = format!("{micros:06}");
        while fraction.len() > min_decimals && fraction.ends_with('0') {
            fraction.pop();
        }
        if fraction.is_empty() {
            format!("{sign}{units}")
        } else {
            format!("{sign}{units}.{fraction}")
        }
    }
}

impl FromStr for Amount {
    type Err = AmountError;

    /// Parses a non-negative decimal: `21`, `3.6`, `0.0498`, `.5`. No signs, exponents or
    /// thousands separators: a rate table or a voucher amount should never be ambiguous.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let err_text = || trimmed.to_string();
        if trimmed.starts_with('-') {
            return Err(AmountError::Negative { text: err_text() });
        }
        let (whole, fraction) = match trimmed.split_once('.') {
            Some((whole, fraction)) => (whole, fraction),
            None => (trimmed, ""),
        };
        let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
            return Err(AmountError::NotANumber { text: err_text() });
        }
        if fraction.len() > MAX_DECIMALS {
            return Err(AmountError::TooManyDecimals { text: err_text() });
        }
        let whole = whole.trim_start_matches('0');
        if whole.len() > 11 {
            return Err(AmountError::TooLarge { text: err_text() });
        }
        let units: i64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| AmountError::TooLarge { text: err_text() })? };
        if units > MAX_UNITS {
            return Err(AmountError::TooLarge { text: err_text() });
        }
        let mut micros: i64 = 0;
        for (i, digit) in fraction.bytes().enumerate() {
            micros += i64::from(digit - b'0') * 10_i64.pow((MAX_DECIMALS - 1 - i) as u32);
        }
        Ok(Self(units * MICROS_PER_UNIT + micros))
    }
}

impl fmt::Display for Amount {
    /// Plain decimal, no currency: for CSV and logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.decimal(0))
    }
}

/// The gateway's currency: its ISO 4217 code and the smallest unit a call's total is rounded
/// up to (the operator's choice; 0.01 by default, even for yen, so that 3.6 ¥/min bills 0.06 ¥
/// a second exactly).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Currency {
    pub code: String,
    pub billed_unit: Amount,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CurrencyError {
    #[error("{0:?} is not a currency code: use three letters such as JPY, USD or EUR")]
    BadCode(String),
    #[error("the billed unit must be more than zero")]
    ZeroUnit,
    #[error("the billed unit {0} must divide one unit of the currency exactly (like 1, 0.1, 0.01, 0.001)")]
    UnitNotDivisor(Amount),
    #[error(transparent)]
    Amount(#[from] AmountError),
}

impl Default for Currency {
    fn default() -> Self {
        Self { code: "JPY".into(), billed_unit: Amount::from_micros(MICROS_PER_UNIT / 100) }
    }
}

impl Currency {
    pub fn new(code: &str, billed_unit: &str) -> Result<Self, CurrencyError> {
        let code = code.trim().to_ascii_uppercase();
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(CurrencyError::BadCode(code));
        }
        let billed_unit: Amount = billed_unit.parse()?;
        if !billed_unit.is_positive() {
            return Err(CurrencyError::ZeroUnit);
        }
        // A unit that does not divide 1 would make "the currency's smallest unit" meaningless
        // and displayed totals inexact.
        if MICROS_PER_UNIT % billed_unit.micros() != 0 {
            return Err(CurrencyError::UnitNotDivisor(billed_unit));
        }
        Ok(Self { code, billed_unit })
    }

    /// Decimals of the billed unit: 2 for 0.01, 0 for 1.
    pub fn decimals(&self) -> usize {
        let mut unit = self.billed_unit.micros();
        let mut decimals = MAX_DECIMALS;
        while decimals > 0 && unit % 10 == 0 {
            unit /= 10;
            decimals -= 1;
        }
        decimals
    }

    /// `numerator / denominator` micro-units, rounded up to a whole number of billed units.
    /// This is the single rounding a call's total gets.
    pub fn round_up(&self, numerator_micros: i128, denominator: i128) -> Amount {
        debug_assert!(denominator > 0 && numerator_micros >= 0);
        let unit = i128::from(self.billed_unit.micros()) * denominator;
        let units = (numerator_micros + unit - 1) / unit;
        let micros = units * i128::from(self.billed_unit.micros());
        Amount(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    fn symbol(&self) -> Option<&'static str> {
        match self.code.as_str() {
            "JPY" => Some("¥"),
            "USD" => Some("$"),
            "EUR" => Some("€"),
            "GBP" => Some("£"),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct DisplayAmount<'a> {
    amount: Amount,
    currency: &'a Currency,
}

impl fmt::Display for DisplayAmount<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.amount.decimal(self.currency.decimals());
        let (sign, digits) = match text.strip_prefix('-') {
            Some(digits) => ("-", digits),
            None => ("", text.as_str()),
        };
        match self.currency.symbol() {
            Some(symbol) => write!(f, "{sign}{symbol}{digits}"),
            None => write!(f, "{sign}{digits} {}", self.currency.code),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amount(text: &str) -> Amount {
        text.parse().unwrap()
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(amount("21").micros(), 21_000_000);
        assert_eq!(amount("3.6").micros(), 3_600_000);
        assert_eq!(amount("0.0498").micros(), 49_800);
        assert_eq!(amount(".5").micros(), 500_000);
        assert_eq!(amount("0.000001").micros(), 1);
        assert_eq!(amount("007").micros(), 7_000_000);
    }

    #[test]
    fn bad_text_is_refused_with_its_reason() {
        assert!(matches!("".parse::<Amount>(), Err(AmountError::NotANumber { .. })));
        assert!(matches!(".".parse::<Amount>(), Err(AmountError::NotANumber { .. })));
        assert!(matches!("1e3".parse::<Amount>(), Err(AmountError::NotANumber { .. })));
        assert!(matches!("1,000".parse::<Amount>(), Err(AmountError::NotANumber { .. })));
        assert!(matches!("+5".parse::<Amount>(), Err(AmountError::NotANumber { .. })));
        assert!(matches!("-5".parse::<Amount>(), Err(AmountError::Negative { .. })));
        assert!(matches!("0.0000001".parse::<Amount>(), Err(AmountError::TooManyDecimals { .. })));
        assert!(matches!("99999999999999999999".parse::<Amount>(), Err(AmountError::TooLarge { .. })));
        assert!(matches!("10000000001".parse::<Amount>(), Err(AmountError::TooLarge { .. })));
    }

    #[test]
    fn text_round_trips() {
        for text in ["0", "21", "3.6", "0.0498", "10000000000", "0.000001"] {
            assert_eq!(amount(text).to_string(), text);
        }
    }

    #[test]
    fn display_shows_the_billed_unit() {
        let yen = Currency::default();
        assert_eq!(amount("21").display(&yen).to_string(), "¥21.00");
        assert_eq!(amount("0.06").display(&yen).to_string(), "¥0.06");
        assert_eq!(amount("0.0498").display(&yen).to_string(), "¥0.0498");
        assert_eq!(Amount::from_micros(-1_500_000).display(&yen).to_string(), "-¥1.50");
        let chf = Currency::new("chf", "0.05").unwrap();
        assert_eq!(amount("2.3").display(&chf).to_string(), "2.30 CHF");
        let whole = Currency::new("KRW", "1").unwrap();
        assert_eq!(amount("320").display(&whole).to_string(), "320 KRW");
    }

    #[test]
    fn a_currency_needs_a_code_and_a_unit_that_divides_one() {
        assert!(matches!(Currency::new("JP", "0.01"), Err(CurrencyError::BadCode(_))));
        assert!(matches!(Currency::new("JPY", "0"), Err(CurrencyError::ZeroUnit)));
        assert!(matches!(Currency::new("JPY", "0.03"), Err(CurrencyError::UnitNotDivisor(_))));
        assert!(Currency::new("JPY", "0.05").is_ok());
    }

    #[test]
    fn rounding_is_up_and_once() {
        let yen = Currency::default();
        // 60 s at 0.05/min: exactly 0.05, not 0.0498.
        assert_eq!(yen.round_up(i128::from(amount("0.05").micros()) * 60, 60), amount("0.05"));
        // 1 s at 3.6/min: 0.06 exactly.
        assert_eq!(yen.round_up(i128::from(amount("3.6").micros()), 60), amount("0.06"));
        // 1 s at 2.3/min: 0.0383… rounds up to 0.04.
        assert_eq!(yen.round_up(i128::from(amount("2.3").micros()), 60), amount("0.04"));
        assert_eq!(yen.round_up(0, 60), Amount::ZERO);
    }
}
