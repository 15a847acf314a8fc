//! `koe gateway`: the PSTN gateway an operator runs (SkypeOut), and the operator's commands for
//! its money: credit, vouchers and call records.
//!
//! The gateway is a Koe client daemon logged in as a service account with the gateway role:
//! it is in the global index under the gateways' directory key, answers price and credit
//! questions from users, and answers calls whose offer names a phone number by bridging them
//! to its SIP trunks (`koe_pstn::skypeout`). Everything about money lives in the ledger
//! (`--db`), which several gateways may share.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use koe_pstn::ledger::{now_ms, open_ledger, CallFilter, Credit, CreditKind, LedgerStore, VoucherCode};
use koe_pstn::meter::MeterConfig;
use koe_pstn::money::{Amount, Currency};
use koe_pstn::number::E164;
use koe_pstn::rates::{Rate, RateTable};
use koe_pstn::service::{PstnRequest, PstnResponse, Service};
use koe_pstn::skypeout;
use koe_pstn::trunk::{SipConfig, SipEndpoint, SipStack, Trunk, DEFAULT_TRANSACTION_TIMEOUT};
use koe_types::Role;
use tracing::{info, warn};

use crate::cli::{CdrArgs, GatewayCommand, GatewayCreditCommand, GatewayServeArgs, LedgerArgs, VoucherCommand};
use crate::daemon::{self, DaemonOptions};
use crate::profile::{CertificateStatus, Profile};

/// The ledger file in the gateway's home when no `--db` is given.
pub const LEDGER_FILE: &str = "ledger.db";
/// A gateway not heard from this long has died: any gateway settles its open calls.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(120);
/// How often a gateway looks for calls other gateways abandoned.
const RECOVERY_EVERY: Duration = Duration::from_secs(60);
const DEFAULT_TLS_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What a running gateway needs to rate, admit and bridge calls.
#[derive(Debug)]
pub struct GatewayService {
    /// This gateway in the ledger (the account and device): it recovers its own calls.
    pub name: String,
    pub currency: Currency,
    rates: RwLock<Arc<RateTable>>,
    rates_file: Option<PathBuf>,
    pub calls: skypeout::Gateway,
    pub max_calls_per_user: u32,
    blocked_prefixes: Vec<String>,
}

impl GatewayService {
    pub fn ledger(&self) -> &dyn LedgerStore {
        self.calls.ledger.as_ref()
    }

    fn rates(&self) -> Arc<RateTable> {
        self.rates.read().map(|rates| Arc::clone(&rates)).unwrap_or_else(|poisoned| Arc::clone(&poisoned.into_inner()))
    }

    /// Reads the rate file again (SIGHUP); the old table stays if the new one is bad.
    pub fn reload_rates(&self) -> Result<usize> {
        let Some(path) = &self.rates_file else { return Ok(self.rates().len()) };
        let table = load_rates(path)?;
        let count = table.len();
        if let Ok(mut rates) = self.rates.write() {
            *rates = Arc::new(table);
        }
        Ok(count)
    }

    /// A price, a credit view or a redeemed voucher for `username`.
    pub async fn answer(&self, username: &str, request: PstnRequest) -> PstnResponse {
        let rates = self.rates();
        self.service(&rates).answer(username, request, now_ms()).await
    }

    /// Whether `number` may be called, and at what rate (the rule quotes follow too).
    pub fn admit(&self, number: &str) -> Result<(E164, Rate), String> {
        let rates = self.rates();
        self.service(&rates).rate_for(number)
    }

    fn service<'a>(&'a self, rates: &'a RateTable) -> Service<'a> {
        Service { rates, ledger: self.ledger(), currency: &self.currency, blocked_prefixes: &self.blocked_prefixes }
    }
}

fn load_rates(path: &Path) -> Result<RateTable> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the rate file {}", path.display()))?;
    RateTable::parse(&text).with_context(|| format!("rate file {}", path.display()))
}

fn currency(args: &LedgerArgs) -> Result<Currency> {
    Currency::new(&args.currency, &args.billed_unit).context("--currency/--billed-unit")
}

async fn ledger(home: &Path, args: &LedgerArgs) -> Result<Arc<dyn LedgerStore>> {
    let url = args.db.clone().unwrap_or_else(|| format!("sqlite:{}", home.join(LEDGER_FILE).display()));
    open_ledger(&url, args.db_busy_timeout).await.with_context(|| format!("cannot open the ledger {}", redact_url(&url)))
}

/// A database URL without its password, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:…{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

pub async fn run(home: Option<PathBuf>, command: GatewayCommand, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let profile = Profile::locate(home)?;
    match command {
        GatewayCommand::Serve(args) => serve(profile, args, true, shutdown).await,
        GatewayCommand::Credit(command) => credit(&profile, command).await,
        GatewayCommand::Voucher(VoucherCommand::Create { amount, count, ledger: args }) => {
            let amount: Amount = amount.parse()?;
            if !amount.is_positive() {
                bail!("a voucher must be worth more than nothing");
            }
            let currency = currency(&args)?;
            let ledger = ledger(profile.home(), &args).await?;
            let mut rng = rand_core::OsRng;
            let codes: Vec<VoucherCode> = (0..count).map(|_| VoucherCode::generate(&mut rng)).collect();
            ledger.create_vouchers(&codes, amount, now_ms()).await?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{count} voucher(s) of {} each (keep the codes safe: only their hashes are stored):", amount.display(&currency))?;
            for code in codes {
                writeln!(out, "{code}")?;
            }
            Ok(())
        }
        GatewayCommand::Cdr(args) => cdr(&profile, args).await,
    }
}

async fn credit(profile: &Profile, command: GatewayCreditCommand) -> Result<()> {
    match command {
        GatewayCreditCommand::Add { username, amount, ledger: args } => {
            let amount: Amount = amount.parse()?;
            if !amount.is_positive() {
                bail!("a top-up must add more than nothing (a correction is `koe gateway credit adjust`)");
            }
            let currency = currency(&args)?;
            let ledger = ledger(profile.home(), &args).await?;
            let key = format!("top-up:{:032x}", koe_pstn::ledger::BillingId::random().0);
            let balance = ledger.credit(&Credit { key, username: username.clone(), amount: amount.micros(), kind: CreditKind::TopUp }, now_ms()).await?;
            println!("added {} to {username}: balance {}", amount.display(&currency), balance.balance.display(&currency));
        }
        GatewayCreditCommand::Adjust { username, amount, reason, ledger: args } => {
            let (negative, digits) = match amount.strip_prefix('-') {
                Some(digits) => (true, digits),
                None => (false, amount.as_str()),
            };
            let magnitude: Amount = digits.parse()?;
            if !magnitude.is_positive() {
                bail!("a correction must change something");
            }
            if reason.trim().is_empty() {
                bail!("a correction needs its reason (--reason)");
            }
            let currency = currency(&args)?;
            let ledger = ledger(profile.home(), &args).await?;
            let micros = if negative { -magnitude.micros() } else { magnitude.micros() };
            let key = format!("adjust:{:032x}", koe_pstn::ledger::BillingId::random().0);
            let credit = Credit { key, username: username.clone(), amount: micros, kind: CreditKind::Adjustment { reason: reason.clone() } };
            let balance = ledger.credit(&credit, now_ms()).await?;
            println!("{username}: {amount} ({reason}); balance {}", balance.balance.display(&currency));
        }
        GatewayCreditCommand::Show { username, ledger: args } => {
            let currency = currency(&args)?;
            let ledger = ledger(profile.home(), &args).await?;
            let balance = ledger.balance(&username).await?;
            println!("{username}: balance {}, held by calls in progress {}", balance.balance.display(&currency), balance.held.display(&currency));
            for entry in ledger.entries(Some(&username), 20).await? {
                println!("  {}  {} → {}  {}  {}", entry.at_ms / 1000, entry.debit, entry.credit, entry.amount.display(&currency), entry.memo);
            }
        }
    }
    Ok(())
}

/// `koe gateway cdr`: every call record as CSV, oldest first.
async fn cdr(profile: &Profile, args: CdrArgs) -> Result<()> {
    let since_ms = args.since.as_deref().map(parse_since).transpose()?;
    let ledger = ledger(profile.home(), &args.ledger).await?;
    let mut records = ledger.calls(&CallFilter { username: args.user, since_ms, limit: None }).await?;
    records.reverse();
    let mut out = std::io::stdout().lock();
    writeln!(out, "call,user,number,destination,started,answered,ended,billed_seconds,price_per_minute,increment,connection_fee,currency,amount,trunk,gateway,end")?;
    let time = |ms: Option<i64>| ms.map(|ms| koe_types::UnixTime(u64::try_from(ms / 1000).unwrap_or(0)).to_string()).unwrap_or_default();
    for r in records {
        writeln!(
            out,
            "{:032x},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.id.0,
            csv(&r.username),
            r.number,
            csv(&r.destination),
            time(Some(r.started_ms)),
            time(r.answered_ms),
            time(r.ended_ms),
            r.billed_secs.map(|s| s.to_string()).unwrap_or_default(),
            r.price_per_minute,
            r.increment,
            r.connection_fee,
            r.currency,
            r.amount.map(|a| a.to_string()).unwrap_or_default(),
            csv(r.trunk.as_deref().unwrap_or("")),
            csv(&r.gateway),
            r.end.map(|e| e.as_str()).unwrap_or("open"),
        )?;
    }
    Ok(())
}

/// A CSV field, quoted when it holds a comma or a quote.
fn csv(field: &str) -> String {
    if field.contains([',', '"', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

/// `YYYY-MM-DD` (UTC midnight) or Unix seconds, as Unix milliseconds.
fn parse_since(text: &str) -> Result<i64> {
    if let Ok(secs) = text.parse::<i64>() {
        return Ok(secs * 1000);
    }
    let bad = || anyhow::anyhow!("--since {text:?}: use YYYY-MM-DD or Unix seconds");
    let parts: Vec<&str> = text.split('-').collect();
    let [year, month, day] = parts.as_slice() else { return Err(bad()) };
    let (year, month, day): (i64, i64, i64) = (year.parse().map_err(|_| bad())?, month.parse().map_err(|_| bad())?, day.parse().map_err(|_| bad())?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return Err(bad());
    }
    Ok(days_from_civil(year, month, day) * 86_400_000)
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// `koe gateway serve` until `shutdown`, for the CLI and for `koe demo` (which runs a gateway
/// in its own process and keeps its story free of the notices `notices_on_stderr` prints).
pub async fn serve(profile: Profile, args: GatewayServeArgs, notices_on_stderr: bool, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    if let Some(network) = &args.network {
        profile.resolve_network(Some(network))?;
    }
    let certificate = match profile.fresh_certificate(false).await? {
        CertificateStatus::Valid(c) | CertificateStatus::Renewed(c) | CertificateStatus::RenewalFailed(c, _) => c,
        CertificateStatus::NotLoggedIn => bail!(
            "this profile ({}) is not logged in: create the gateway's account with `koe auth add-service-account NAME --role gateway`, then `koe --home {} login NAME`",
            profile.home().display(),
            profile.home().display()
        ),
        CertificateStatus::Expired(c) => bail!("the certificate of {} expired: koe login {}", c.username(), c.username()),
    };
    if certificate.role() != Role::Gateway {
        bail!(
            "{} is not a gateway account (its role is {}): users only accept prices and bills from a certificate with the gateway role; create one with `koe auth add-service-account NAME --role gateway`",
            certificate.username(),
            certificate.role().as_str()
        );
    }
    let currency = currency(&args.ledger)?;
    let trunks: Vec<Trunk> = args.trunks.iter().map(|uri| uri.parse()).collect::<Result<_, _>>()?;
    let rates = match &args.rates {
        Some(path) => load_rates(path)?,
        None => RateTable::built_in(),
    };
    let max_cost = args.max_cost_per_call.as_deref().map(str::parse::<Amount>).transpose().context("--max-cost-per-call")?;
    let blocked_prefixes: Vec<String> = args.blocked_prefixes.iter().map(|p| p.trim_start_matches('+').to_string()).collect();
    if let Some(bad) = blocked_prefixes.iter().find(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        bail!("--block-prefix {bad:?}: digits only");
    }
    let ledger = ledger(profile.home(), &args.ledger).await?;
    let name = format!("{}/{}", certificate.username(), profile.device_key()?.public_key().fingerprint());
    // Calls this gateway left open when it last stopped: posted from what was recorded.
    for settled in ledger.recover(&name, ABANDONED_AFTER, now_ms()).await? {
        warn!(call = %settled.id, user = %settled.username, billed_secs = ?settled.billed_secs, "settled a call left open by the last run");
    }
    let tls_roots = match &args.tls_roots {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?),
        None => std::fs::read(DEFAULT_TLS_ROOTS).ok(),
    };
    let sip: Arc<dyn SipStack> = Arc::new(SipEndpoint::start(SipConfig { listen: args.sip_listen, external: args.sip_external, tls_roots, transaction_timeout: DEFAULT_TRANSACTION_TIMEOUT }).await?);
    info!(sip = %sip.local_addr(), trunks = trunks.len(), rates = rates.len(), ledger = %ledger.describe(), "PSTN gateway");
    let meter = MeterConfig { max_cost, ..MeterConfig::default() };
    let calls = skypeout::Gateway {
        ledger: Arc::clone(&ledger),
        sip: Arc::clone(&sip),
        trunks: Arc::new(trunks),
        meter,
        rtp_timeout: args.rtp_timeout,
        caller_id: args.caller_id.clone(),
    };
    let service = Arc::new(GatewayService {
        name,
        currency,
        rates: RwLock::new(Arc::new(rates)),
        rates_file: args.rates.clone(),
        calls,
        max_calls_per_user: args.max_calls_per_user,
        blocked_prefixes,
    });
    let background = tokio::spawn(keep_up(Arc::clone(&service)));
    let options = DaemonOptions {
        status: Some(koe_overlay::PresenceStatus::Online),
        preferred_supernodes: Vec::new(),
        promotion: None,
        auto_answer: None,
        relay_only: false,
        notices_on_stderr,
        gateway: Some(service),
    };
    let result = daemon::run(profile, options, shutdown).await;
    background.abort();
    sip.shutdown();
    result
}

/// Reloads the rates on SIGHUP and settles calls that dead gateways left open.
async fn keep_up(service: Arc<GatewayService>) {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut recovery = tokio::time::interval(RECOVERY_EVERY);
    loop {
        tokio::select! {
            Some(()) = async { match hangup.as_mut() { Some(signal) => signal.recv().await, None => std::future::pending().await } } => {
                match service.reload_rates() {
                    Ok(count) => info!(rates = count, "rate table reloaded"),
                    Err(error) => warn!("rate table not reloaded, the old one stays: {error:#}"),
                }
            }
            _ = recovery.tick() => {
                match service.ledger().recover(&format!("{}/abandoned", service.name), ABANDONED_AFTER, now_ms()).await {
                    Ok(settled) => for call in settled {
                        warn!(call = %call.id, gateway = %call.gateway, "settled a call its gateway abandoned");
                    },
                    Err(error) => warn!(%error, "could not look for abandoned calls"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords_and_dates_read() {
        assert_eq!(redact_url("postgres://koe:secret@db:5432/koe"), "postgres://koe:…@db:5432/koe");
        assert_eq!(redact_url("sqlite:/tmp/ledger.db"), "sqlite:/tmp/ledger.db");
        assert_eq!(parse_since("2026-12-07").unwrap(), 1_796_601_600_000);
        assert_eq!(parse_since("1700000000").unwrap(), 1_700_000_000_000);
        assert!(parse_since("yesterday").is_err());
        assert_eq!(parse_since("1970-01-01").unwrap(), 0);
        assert_eq!(parse_since("2000-03-01").unwrap(), 951_868_800_000);
        assert_eq!(csv("a,b"), "\"a,b\"");
    }
}
