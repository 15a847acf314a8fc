//! What a gateway answers outside calls (`koe rate`, `koe credit`, `koe credit redeem`),
//! against a real SQLite ledger: prices from the rate table, credit from the ledger, and
//! refusals in words that charge nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use koe_pstn::ledger::{Credit, CreditKind, LedgerStore, SqliteLedger, VoucherCode};
use koe_pstn::money::{Amount, Currency};
use koe_pstn::rates::RateTable;
use koe_pstn::service::{PstnRequest, PstnResponse, Service};

fn yen(text: &str) -> Amount {
    text.parse().unwrap()
}

async fn ledger_with_alice(dir: &tempfile::TempDir, credit: &str) -> SqliteLedger {
    let ledger = SqliteLedger::open(&dir.path().join("ledger.db"), Duration::from_secs(5)).await.unwrap();
    let top_up = Credit { key: "top-up".into(), username: "alice".into(), amount: yen(credit).micros(), kind: CreditKind::TopUp };
    ledger.credit(&top_up, 1_000).await.unwrap();
    ledger
}

#[tokio::test]
async fn a_quote_says_the_price_and_how_long_the_credit_lasts() {
    let dir = tempfile::TempDir::new().unwrap();
    let ledger = ledger_with_alice(&dir, "100").await;
    let (rates, currency) = (RateTable::built_in(), Currency::default());
    let service = Service { rates: &rates, ledger: &ledger, currency: &currency, blocked_prefixes: &[] };
    let PstnResponse::Rate(quote) = service.answer("alice", PstnRequest::Rate { number: "+819012345678".into() }, 2_000).await else {
        panic!("a price")
    };
    assert_eq!((quote.destination.as_str(), quote.price_per_minute, quote.affordable_secs), ("Japan mobile", yen("21"), Some(240)));
    assert_eq!(quote.available, yen("100"));
}

#[tokio::test]
async fn numbers_without_a_rate_emergency_numbers_and_garbage_are_refused_in_words_and_charge_nothing() {
    let dir = tempfile::TempDir::new().unwrap();
    let ledger = ledger_with_alice(&dir, "100").await;
    let (rates, currency) = (RateTable::built_in(), Currency::default());
    let service = Service { rates: &rates, ledger: &ledger, currency: &currency, blocked_prefixes: &[] };
    let refusal = |response: PstnResponse| match response {
        PstnResponse::Refused { reason } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let no_rate = refusal(service.answer("alice", PstnRequest::Rate { number: "+4930123456".into() }, 2_000).await);
    assert!(no_rate.contains("no rate"), "{no_rate}");
    let emergency = refusal(service.answer("alice", PstnRequest::Rate { number: "+81110".into() }, 2_000).await);
    assert!(emergency.to_lowercase().contains("emergency"), "{emergency}");
    let garbage = refusal(service.answer("alice", PstnRequest::Rate { number: "'; DROP TABLE ledger_entries; --".into() }, 2_000).await);
    assert!(!garbage.is_empty());
    let forged = refusal(service.answer("alice", PstnRequest::Redeem { code: VoucherCode::generate(&mut rand_core::OsRng).to_string() }, 2_000).await);
    assert_eq!(forged, "no such voucher: check the code");
    let malformed = refusal(service.answer("alice", PstnRequest::Redeem { code: "free money".into() }, 2_000).await);
    assert!(malformed.contains("not a voucher code"), "{malformed}");
    let balance = ledger.balance("alice").await.unwrap();
    assert_eq!((balance.balance, balance.held), (yen("100"), Amount::ZERO));
    assert_eq!(ledger.entries(Some("alice"), 10).await.unwrap().len(), 1, "only the top-up");
}

#[tokio::test]
async fn credit_lists_money_in_and_out() {
    let dir = tempfile::TempDir::new().unwrap();
    let ledger = ledger_with_alice(&dir, "100").await;
    let code = VoucherCode::generate(&mut rand_core::OsRng);
    ledger.create_vouchers(std::slice::from_ref(&code), yen("500"), 1_500).await.unwrap();
    let (rates, currency) = (RateTable::built_in(), Currency::default());
    let service = Service { rates: &rates, ledger: &ledger, currency: &currency, blocked_prefixes: &[] };
    let redeemed = service.answer("alice", PstnRequest::Redeem { code: code.to_string() }, 2_000).await;
    assert_eq!(redeemed, PstnResponse::Redeemed { amount: yen("500"), balance: yen("600"), currency: currency.clone() });
    let PstnResponse::Credit(view) = service.answer("alice", PstnRequest::Credit, 3_000).await else { panic!("credit") };
    assert_eq!((view.balance, view.held), (yen("600"), Amount::ZERO));
    assert_eq!(view.recent.iter().map(|c| (c.amount, c.memo.as_str())).collect::<Vec<_>>(), [(500_000_000, "voucher"), (100_000_000, "top-up")]);
}

#[tokio::test]
async fn a_blocked_destination_is_refused_for_quotes_and_calls_alike() {
    let dir = tempfile::TempDir::new().unwrap();
    let ledger = ledger_with_alice(&dir, "100").await;
    let (rates, currency, blocked) = (RateTable::built_in(), Currency::default(), vec!["8190".to_string()]);
    let service = Service { rates: &rates, ledger: &ledger, currency: &currency, blocked_prefixes: &blocked };
    let PstnResponse::Refused { reason } = service.answer("alice", PstnRequest::Rate { number: "+819012345678".into() }, 2_000).await else {
        panic!("a refusal")
    };
    assert!(reason.contains("blocked"), "{reason}");
    assert!(service.rate_for("+819012345678").is_err(), "a call to it is refused the same way");
    assert!(service.rate_for("+818012345678").is_ok(), "other mobiles are not");
}
