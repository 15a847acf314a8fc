//! The rate table: what a number costs per minute, in which increments, and what a call of a
//! given length costs in total.
//!
//! A table is CSV with the header `prefix,destination,price_per_minute,increment,connection_fee`,
//! looked up by the longest prefix of a number's E.164 digits. Increments are `first/next`
//! seconds (60/60 per started minute, 30/6, 1/1). The connection fee is charged once, with the
//! first increment; a call's total is rounded up once, to the currency's billed unit. The table
//! built into the gateway holds the original SkypeOut prices.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::money::{Amount, AmountError, Currency};

/// The header every rate file starts with.
pub const RATE_FILE_HEADER: &str = "prefix,destination,price_per_minute,increment,connection_fee";
/// Digits of the longest prefix (E.164 numbers have at most 15).
pub const MAX_PREFIX_DIGITS: usize = 15;
/// Largest accepted rate file: a full international table is ~60 000 rows of ~50 bytes.
pub const MAX_RATE_FILE_BYTES: usize = 16 * 1024 * 1024;
/// Longest increment: one hour.
pub const MAX_INCREMENT_SECS: u32 = 3600;

/// The rates from the original SkypeOut price list, billed 60/60 without a connection fee.
pub const BUILT_IN_RATES: &str = "\
prefix,destination,price_per_minute,increment,connection_fee
81,Japan fixed,3.6,60/60,0
8170,Japan mobile,21,60/60,0
8180,Japan mobile,21,60/60,0
8190,Japan mobile,21,60/60,0
1,US/Canada,2.3,60/60,0
44,United Kingdom,2.3,60/60,0
86,China,3.0,60/60,0
82,South Korea,3.2,60/60,0
";

/// Billing increments: the first `first_secs` are charged as soon as a call is answered and
/// lasts a second, then every started `next_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Increment {
    pub first_secs: u32,
    pub next_secs: u32,
}

impl Increment {
    /// Seconds billed for a call that lasted `secs` (answered to hang-up, whole seconds).
    pub fn billed_secs(&self, secs: u64) -> u64 {
        let first = u64::from(self.first_secs);
        let next = u64::from(self.next_secs);
        if secs == 0 {
            0
        } else if secs <= first {
            first
        } else {
            first + (secs - first).div_ceil(next) * next
        }
    }
}

impl fmt::Display for Increment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.first_secs, self.next_secs)
    }
}

impl FromStr for Increment {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("increment {text:?} is not first/next seconds like 60/60, 30/6 or 1/1");
        let (first, next) = text.trim().split_once('/').ok_or_else(bad)?;
        let parse = |part: &str| -> Result<u32, String> {
            let secs: u32 = part.trim().parse().map_err(|_| bad())?;
            if secs == 0 || secs > MAX_INCREMENT_SECS {
                return Err(format!("increment {text:?}: each part must be 1 to {MAX_INCREMENT_SECS} seconds"));
            }
            Ok(secs)
        };
        Ok(Self { first_secs: parse(first)?, next_secs: parse(next)? })
    }
}

/// One row of a rate table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    /// E.164 digits without '+'.
    pub prefix: String,
    pub destination: String,
    pub price_per_minute: Amount,
    pub increment: Increment,
    pub connection_fee: Amount,
}

impl Rate {
    /// What a call that lasted `secs` (answered to hang-up) costs: nothing for 0 s, else the
    /// connection fee plus the billed seconds at the per-minute price, rounded up once.
    pub fn cost(&self, secs: u64, currency: &Currency) -> Amount {
        let billed = self.increment.billed_secs(secs);
        if billed == 0 {
            return Amount::ZERO;
        }
        let numerator = i128::from(self.connection_fee.micros()) * 60
            + i128::from(self.price_per_minute.micros()) * i128::from(billed);
        currency.round_up(numerator, 60)
    }

    /// The longest call, in whole seconds, that costs no more than `budget`, up to `limit`
    /// seconds; `None` if not even the first increment fits.
    pub fn secs_affordable(&self, budget: Amount, limit: u64, currency: &Currency) -> Option<u64> {
        if self.cost(1, currency) > budget {
            return None;
        }
        // cost() is a step function that only rises at increment boundaries: find the last
        // boundary that fits by binary search over whole increments after the first.
        let first = u64::from(self.increment.first_secs);
        let next = u64::from(self.increment.next_secs);
        if limit <= first {
            return Some(limit);
        }
        let (mut fits, mut too_many) = (0_u64, (limit - first).div_ceil(next) + 1);
        while too_many - fits > 1 {
            let middle = fits + (too_many - fits) / 2;
            if self.cost(first + middle * next, currency) <= budget {
                fits = middle;
            } else {
                too_many = middle;
            }
        }
        Some((first + fits * next).min(limit))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RateTableError {
    #[error("the rate file is larger than {MAX_RATE_FILE_BYTES} bytes")]
    TooLarge,
    #[error("the rate file must start with the header line {RATE_FILE_HEADER:?}")]
    BadHeader,
    #[error("the rate file has no rates")]
    Empty,
    #[error("line {line}: {reason}")]
    BadLine { line: usize, reason: String },
    #[error("line {line}: prefix {prefix} is already on line {first_line}")]
    DuplicatePrefix { line: usize, prefix: String, first_line: usize },
}

/// Rates by prefix, looked up by the longest prefix of a number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateTable {
    rates: BTreeMap<String, Rate>,
}

impl RateTable {
    pub fn built_in() -> Self {
        // The built-in table is a constant checked by a test; parsing it cannot fail.
        Self::parse(BUILT_IN_RATES).unwrap_or(Self { rates: BTreeMap::new() })
    }

    pub fn parse(text: &str) -> Result<Self, RateTableError> {
        if text.len() > MAX_RATE_FILE_BYTES {
            return Err(RateTableError::TooLarge);
        }
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut lines = text.lines().enumerate().map(|(i, line)| (i + 1, line.trim_end_matches('\r')));
        let header = lines.by_ref().find(|(_, line)| !line.trim().is_empty()).map(|(_, line)| line);
        let header_fields: Option<Vec<String>> =
            header.and_then(|line| split_csv(line).ok()).map(|fields| fields.iter().map(|f| f.trim().to_ascii_lowercase()).collect());
        if header_fields.as_deref().map(|f| f.join(",")) != Some(RATE_FILE_HEADER.to_string()) {
            return Err(RateTableError::BadHeader);
        }
        let mut rates = BTreeMap::new();
        let mut first_lines: BTreeMap<String, usize> = BTreeMap::new();
        for (line_number, line) in lines {
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let bad = |reason: String| RateTableError::BadLine { line: line_number, reason };
            let rate = parse_row(line).map_err(bad)?;
            if let Some(&first_line) = first_lines.get(&rate.prefix) {
                return Err(RateTableError::DuplicatePrefix { line: line_number, prefix: rate.prefix, first_line });
            }
            first_lines.insert(rate.prefix.clone(), line_number);
            rates.insert(rate.prefix.clone(), rate);
        }
        if rates.is_empty() {
            return Err(RateTableError::Empty);
        }
        Ok(Self { rates })
    }

    /// The rate for E.164 `digits` (without '+'): the row with the longest matching prefix.
    pub fn lookup(&self, digits: &str) -> Option<&Rate> {
        (1..=digits.len().min(MAX_PREFIX_DIGITS)).rev().find_map(|len| self.rates.get(&digits[..len]))
    }

    pub fn len(&self) -> usize {
        self.rates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rates.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Rate> {
        self.rates.values()
    }
}

fn parse_row(line: &str) -> Result<Rate, String> {
    let fields = split_csv(line)?;
    let [prefix, destination, price, increment, fee] = <[String; 5]>::try_from(fields)
        .map_err(|fields| format!("expected 5 fields, found {}", fields.len()))?;
    let prefix = prefix.trim().trim_start_matches('+').to_string();
    if prefix.is_empty() || prefix.len() > MAX_PREFIX_DIGITS || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("prefix {prefix:?} must be 1 to {MAX_PREFIX_DIGITS} digits"));
    }
    let destination = destination.trim().to_string();
    if destination.is_empty() {
        return Err("the destination is empty".into());
    }
    let price_per_minute = price.parse().map_err(|e: AmountError| format!("price_per_minute: {e}"))?;
    let increment = increment.parse()?;
    let connection_fee = if fee.trim().is_empty() { Amount::ZERO } else { fee.parse().map_err(|e: AmountError| format!("connection_fee: {e}"))? };
    Ok(Rate { prefix, destination, price_per_minute, increment, connection_fee })
}

/// Splits one CSV line: commas, and double quotes around a field that holds commas ("" is a
/// quote inside one).
fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (false, ',') => fields.push(std::mem::take(&mut field)),
            (false, '"') if field.trim().is_empty() => {
                field.clear();
                quoted = true;
            }
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (_, c) => field.push(c),
        }
    }
    if quoted {
        return Err("a quoted field is not closed".into());
    }
    fields.push(field);
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(price: &str, increment: &str, fee: &str) -> Rate {
        Rate {
            prefix: "81".into(),
            destination: "Test".into(),
            price_per_minute: price.parse().unwrap(),
            increment: increment.parse().unwrap(),
            connection_fee: fee.parse().unwrap(),
        }
    }

    fn yen(text: &str) -> Amount {
        text.parse().unwrap()
    }

    #[test]
    fn the_built_in_table_is_skypeouts() {
        let table = RateTable::built_in();
        assert_eq!(table.len(), 8);
        let japan_mobile = table.lookup("819012345678").unwrap();
        assert_eq!((japan_mobile.destination.as_str(), japan_mobile.price_per_minute), ("Japan mobile", yen("21")));
        let japan_fixed = table.lookup("81312345678").unwrap();
        assert_eq!((japan_fixed.destination.as_str(), japan_fixed.price_per_minute), ("Japan fixed", yen("3.6")));
        assert_eq!(table.lookup("12125550100").unwrap().price_per_minute, yen("2.3"));
        assert_eq!(table.lookup("442079460000").unwrap().price_per_minute, yen("2.3"));
        assert_eq!(table.lookup("861012345678").unwrap().price_per_minute, yen("3.0"));
        assert_eq!(table.lookup("82212345678").unwrap().price_per_minute, yen("3.2"));
        assert!(table.lookup("4930123456").is_none(), "Germany has no rate in the built-in table");
        assert!(table.iter().all(|r| r.increment.to_string() == "60/60" && r.connection_fee == Amount::ZERO));
    }

    #[test]
    fn the_longest_prefix_wins() {
        let table = RateTable::parse(
            "prefix,destination,price_per_minute,increment,connection_fee\n\
             8,Anywhere 8,9,60/60,0\n81,Japan,3.6,60/60,0\n8190,Japan mobile,21,60/60,0\n819012,Special,1,1/1,0\n",
        )
        .unwrap();
        assert_eq!(table.lookup("8190123456").unwrap().destination, "Special");
        assert_eq!(table.lookup("8190999999").unwrap().destination, "Japan mobile");
        assert_eq!(table.lookup("8131234567").unwrap().destination, "Japan");
        assert_eq!(table.lookup("8612345678").unwrap().destination, "Anywhere 8");
        assert!(table.lookup("4412345678").is_none());
    }

    #[test]
    fn billed_seconds_follow_the_increment_at_its_boundaries() {
        let cases = [
            ("60/60", [(0, 0), (1, 60), (59, 60), (60, 60), (61, 120), (120, 120), (121, 180)]),
            ("30/6", [(0, 0), (1, 30), (29, 30), (30, 30), (31, 36), (60, 60), (61, 66)]),
            ("1/1", [(0, 0), (1, 1), (59, 59), (60, 60), (61, 61), (120, 120), (121, 121)]),
        ];
        for (increment, expected) in cases {
            let increment: Increment = increment.parse().unwrap();
            for (secs, billed) in expected {
                assert_eq!(increment.billed_secs(secs), billed, "{increment} at {secs} s");
            }
        }
    }

    #[test]
    fn every_increment_costs_exactly_with_and_without_a_connection_fee() {
        let yen_currency = Currency::default();
        // (increment, fee, [(secs, total)]) at 3.6/min = 0.06/s.
        let cases = [
            ("60/60", "0", [(0, "0"), (1, "3.6"), (60, "3.6"), (61, "7.2")]),
            ("60/60", "10", [(0, "0"), (1, "13.6"), (60, "13.6"), (61, "17.2")]),
            ("30/6", "0", [(0, "0"), (1, "1.8"), (60, "3.6"), (61, "3.96")]),
            ("30/6", "10", [(0, "0"), (1, "11.8"), (60, "13.6"), (61, "13.96")]),
            ("1/1", "0", [(0, "0"), (1, "0.06"), (60, "3.6"), (61, "3.66")]),
            ("1/1", "10", [(0, "0"), (1, "10.06"), (60, "13.6"), (61, "13.66")]),
        ];
        for (increment, fee, expected) in cases {
            let rate = rate("3.6", increment, fee);
            for (secs, total) in expected {
                assert_eq!(rate.cost(secs, &yen_currency), yen(total), "{increment} fee {fee} at {secs} s");
            }
        }
    }

    #[test]
    fn a_total_is_rounded_up_once_not_per_increment() {
        let yen_currency = Currency::default();
        // 2.3/min per second is 0.03833…: rounding each second up would bill 61 × 0.04 = 2.44.
        let per_second = rate("2.3", "1/1", "0");
        assert_eq!(per_second.cost(61, &yen_currency), yen("2.34"));
        // The float bug of the anchors: 60 s at 0.05/min is 0.05, not 0.0498.
        assert_eq!(rate("0.05", "1/1", "0").cost(60, &yen_currency), yen("0.05"));
        // A fee plus three 0.01 spans: exact.
        assert_eq!(rate("0.6", "1/1", "0.144").cost(3, &yen_currency), yen("0.18"));
    }

    #[test]
    fn affordable_seconds_stop_at_the_last_whole_increment() {
        let yen_currency = Currency::default();
        let per_minute = rate("21", "60/60", "0");
        assert_eq!(per_minute.secs_affordable(yen("20.99"), 7200, &yen_currency), None);
        assert_eq!(per_minute.secs_affordable(yen("21"), 7200, &yen_currency), Some(60));
        assert_eq!(per_minute.secs_affordable(yen("62.99"), 7200, &yen_currency), Some(120));
        assert_eq!(per_minute.secs_affordable(yen("1000000"), 7200, &yen_currency), Some(7200));
        let per_second = rate("3.6", "1/1", "0");
        assert_eq!(per_second.secs_affordable(yen("1"), 7200, &yen_currency), Some(16));
        let fee = rate("3.6", "30/6", "10");
        assert_eq!(fee.secs_affordable(yen("11.79"), 7200, &yen_currency), None);
        assert_eq!(fee.secs_affordable(yen("12.16"), 7200, &yen_currency), Some(36));
        // Whatever it says fits does fit, and one increment more does not.
        for budget in (0..3000).map(|i| Amount::from_micros(i * 7_919)) {
            if let Some(secs) = fee.secs_affordable(budget, 7200, &yen_currency) {
                assert!(fee.cost(secs, &yen_currency) <= budget);
                assert!(fee.cost(secs + 1, &yen_currency) > budget);
            }
        }
    }

    #[test]
    fn bad_rate_files_say_which_line_and_why() {
        let header = RATE_FILE_HEADER;
        let parse = |body: &str| RateTable::parse(&format!("{header}\n{body}"));
        assert_eq!(RateTable::parse("prefix,price\n81,1\n"), Err(RateTableError::BadHeader));
        assert_eq!(RateTable::parse(""), Err(RateTableError::BadHeader));
        assert_eq!(parse(""), Err(RateTableError::Empty));
        let line_error = |body: &str| match parse(body) {
            Err(RateTableError::BadLine { line, reason }) => (line, reason),
            other => panic!("{body:?} gave {other:?}"),
        };
        assert!(line_error("81,Japan,3.6,60/60\n").1.contains("5 fields"));
        assert!(line_error("8a,Japan,3.6,60/60,0\n").1.contains("prefix"));
        assert!(line_error("81,Japan,3.6,60/60,0\n1234567890123456,Long,1,60/60,0\n").0 == 3);
        assert!(line_error("81,,3.6,60/60,0\n").1.contains("destination"));
        assert!(line_error("81,Japan,3,6,60/60\n").1.contains("increment"));
        assert!(line_error("81,Japan,-3.6,60/60,0\n").1.contains("negative"));
        assert!(line_error("81,Japan,0.1234567,60/60,0\n").1.contains("decimals"));
        assert!(line_error("81,Japan,3.6,60/0,0\n").1.contains("1 to 3600"));
        assert!(line_error("81,Japan,3.6,60,0\n").1.contains("first/next"));
        assert!(line_error("81,\"Japan,3.6,60/60,0\n").1.contains("quoted"));
        assert_eq!(
            parse("81,Japan,3.6,60/60,0\n81,Again,1,60/60,0\n"),
            Err(RateTableError::DuplicatePrefix { line: 3, prefix: "81".into(), first_line: 2 })
        );
        assert_eq!(RateTable::parse(&"x".repeat(MAX_RATE_FILE_BYTES + 1)), Err(RateTableError::TooLarge));
    }

    #[test]
    fn quotes_comments_blank_lines_and_a_bom_are_fine() {
        let table = RateTable::parse(&format!(
            "\u{feff}{RATE_FILE_HEADER}\r\n# comment\r\n\r\n+82,\"Korea, South\",3.2,60/60,\r\n44,\"The \"\"UK\"\"\",2.3,1/1,0.5\r\n"
        ))
        .unwrap();
        assert_eq!(table.lookup("82212345678").unwrap().destination, "Korea, South");
        assert_eq!(table.lookup("82212345678").unwrap().connection_fee, Amount::ZERO);
        assert_eq!(table.lookup("442079460000").unwrap().destination, "The \"UK\"");
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2000 {
            let mut text = format!("{RATE_FILE_HEADER}\n");
            for _ in 0..(state % 40) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let alphabet = b"0123456789,./\"+-#\n aZ";
                text.push(alphabet[(state % alphabet.len() as u64) as usize] as char);
            }
            let _ = RateTable::parse(&text);
        }
    }
}
