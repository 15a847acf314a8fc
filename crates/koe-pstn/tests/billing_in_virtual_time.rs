//! The billing of SkypeOut calls in virtual time: the meter of each call driven against a real
//! SQLite ledger, the clock jumping from deadline to deadline. Asserts on what the caller is
//! told (admitted, warned, cut off) and on the money: what is posted, what is held, and that
//! nothing is ever overspent or charged twice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use koe_pstn::billing;
use koe_pstn::ledger::{BillingId, CallEnd, Credit, CreditKind, LedgerStore, NewCall, SqliteLedger};
use koe_pstn::meter::{CallMeter, LedgerReply, LedgerRequest, MeterConfig, MeterEvent, MeterOutput, Refusal};
use koe_pstn::money::{Amount, Currency};
use koe_pstn::rates::{Rate, RateTable};

const GATEWAY: &str = "gw-test";
/// The ledger's clock at the world's start.
const START_MS: i64 = 1_700_000_000_000;

fn yen(text: &str) -> Amount {
    text.parse().expect("a test amount")
}

fn japan_mobile() -> Rate {
    RateTable::built_in().lookup("819012345678").cloned().expect("Japan mobile is built in")
}

struct Call {
    id: BillingId,
    username: String,
    rate: Rate,
    meter: CallMeter,
    /// Events with the virtual time since the world started.
    events: Vec<(u64, MeterEvent)>,
    /// How the driver would end it: set when it hangs up.
    end: CallEnd,
}

/// Meters and a real ledger under one virtual clock.
struct World {
    _dir: tempfile::TempDir,
    ledger: Arc<dyn LedgerStore>,
    start: Instant,
    now: Instant,
    config: MeterConfig,
    calls: Vec<Call>,
    /// While set, every ledger write fails as if the database were unreachable.
    ledger_down: bool,
}

impl World {
    async fn new(credit: &str) -> Result<Self> {
        let dir = tempfile::TempDir::new()?;
        let ledger: Arc<dyn LedgerStore> = Arc::new(SqliteLedger::open(&dir.path().join("ledger.db"), Duration::from_secs(5)).await?);
        let start = Instant::now();
        let mut world = Self { _dir: dir, ledger, start, now: start, config: MeterConfig::default(), calls: Vec::new(), ledger_down: false };
        world.top_up("alice", credit).await?;
        Ok(world)
    }

    async fn top_up(&mut self, username: &str, amount: &str) -> Result<()> {
        let key = format!("top-up-{:x}", BillingId::random().0);
        self.ledger.credit(&Credit { key, username: username.into(), amount: yen(amount).micros(), kind: CreditKind::TopUp }, self.now_ms()).await?;
        Ok(())
    }

    fn now_ms(&self) -> i64 {
        START_MS + self.now.duration_since(self.start).as_millis() as i64
    }

    fn secs(&self) -> u64 {
        self.now.duration_since(self.start).as_secs()
    }

    async fn place(&mut self, username: &str, rate: Rate) -> Result<usize> {
        let meter = CallMeter::new(rate.clone(), Currency::default(), self.config.clone());
        self.calls.push(Call { id: BillingId::random(), username: username.into(), rate, meter, events: Vec::new(), end: CallEnd::CallerHungUp });
        let index = self.calls.len() - 1;
        self.pump(index).await?;
        Ok(index)
    }

    async fn answer(&mut self, index: usize) -> Result<()> {
        let now = self.now;
        self.calls[index].meter.handle_answer(now);
        self.pump(index).await
    }

    async fn hang_up(&mut self, index: usize, end: CallEnd) -> Result<()> {
        let now = self.now;
        self.calls[index].end = end;
        self.calls[index].meter.handle_end(now);
        self.pump(index).await
    }

    /// Carries out a meter's outputs the way the gateway's driver does, until it has none.
    async fn pump(&mut self, index: usize) -> Result<()> {
        while let Some(output) = self.calls[index].meter.poll_output() {
            let secs = self.secs();
            let call = &mut self.calls[index];
            let request = match output {
                MeterOutput::Event(event) => {
                    if event == MeterEvent::CutOff {
                        call.end = CallEnd::CutOff;
                    }
                    call.events.push((secs, event));
                    continue;
                }
                MeterOutput::Ledger(request) => request,
            };
            let reply = self.execute(index, request).await?;
            if let Some(reply) = reply {
                let now = self.now;
                self.calls[index].meter.handle_reply(now, reply);
            }
        }
        Ok(())
    }

    async fn execute(&self, index: usize, request: LedgerRequest) -> Result<Option<LedgerReply>> {
        let call = &self.calls[index];
        let down = || "the ledger is down".to_string();
        Ok(match request {
            LedgerRequest::Hold { chunk, .. } if self.ledger_down => Some(LedgerReply::HoldFailed { chunk, reason: down() }),
            LedgerRequest::Settle { .. } if self.ledger_down => Some(LedgerReply::SettleFailed { reason: down() }),
            LedgerRequest::Answered | LedgerRequest::Progress { .. } if self.ledger_down => None,
            request => {
                let new_call = NewCall {
                    id: call.id,
                    username: call.username.clone(),
                    number: "+819012345678".into(),
                    rate: call.rate.clone(),
                    currency: Currency::default(),
                    gateway: GATEWAY.into(),
                    max_open_calls: 2,
                };
                billing::carry_out(self.ledger.as_ref(), &new_call, Some("trunk-a"), request, call.end, self.now_ms()).await
            }
        })
    }

    /// Moves the clock to `secs` after the start, waking every meter at each of its deadlines
    /// on the way.
    async fn advance_to(&mut self, secs: u64) -> Result<()> {
        let target = self.start + Duration::from_secs(secs);
        loop {
            let next = self
                .calls
                .iter()
                .enumerate()
                .filter_map(|(i, call)| call.meter.poll_timeout().map(|at| (at, i)))
                .filter(|(at, _)| *at <= target)
                .min();
            let Some((at, index)) = next else { break };
            self.now = self.now.max(at);
            let now = self.now;
            self.calls[index].meter.handle_timeout(now);
            self.pump(index).await?;
        }
        self.now = target;
        Ok(())
    }

    fn events(&self, index: usize) -> &[(u64, MeterEvent)] {
        &self.calls[index].events
    }

    fn settled(&self, index: usize) -> Option<(u64, Amount)> {
        self.calls[index].events.iter().find_map(|(_, event)| match event {
            MeterEvent::Settled { billed_secs, amount } => Some((*billed_secs, *amount)),
            _ => None,
        })
    }

    async fn balance(&self) -> Result<(Amount, Amount)> {
        let balance = self.ledger.balance("alice").await?;
        Ok((balance.balance, balance.held))
    }
}

#[tokio::test]
async fn a_call_is_billed_for_its_started_minutes() -> Result<()> {
    let mut world = World::new("1000").await?;
    let call = world.place("alice", japan_mobile()).await?;
    assert_eq!(world.events(call), [(0, MeterEvent::Admitted { covered_secs: 180 })]);
    world.advance_to(5).await?;
    world.answer(call).await?;
    world.advance_to(66).await?;
    world.hang_up(call, CallEnd::CallerHungUp).await?;
    assert_eq!(world.settled(call), Some((61, yen("42"))), "61 s is two started minutes at 21");
    assert_eq!(world.balance().await?, (yen("958"), Amount::ZERO));
    let record = world.ledger.call(world.calls[call].id).await?.expect("the call record");
    assert_eq!((record.billed_secs, record.amount, record.end), (Some(61), Some(yen("42")), Some(CallEnd::CallerHungUp)));
    Ok(())
}

#[tokio::test]
async fn the_credit_runs_out_with_a_warning_a_minute_before() -> Result<()> {
    let mut world = World::new("100").await?;
    let call = world.place("alice", japan_mobile()).await?;
    world.answer(call).await?;
    world.advance_to(3600).await?;
    // 100 pays for four minutes at 21 (84); the fifth would cost 105.
    assert_eq!(
        world.events(call),
        [
            (0, MeterEvent::Admitted { covered_secs: 180 }),
            (180, MeterEvent::Warning { secs_left: 60 }),
            (240, MeterEvent::CutOff),
            (240, MeterEvent::Settled { billed_secs: 240, amount: yen("84") }),
        ]
    );
    assert_eq!(world.balance().await?, (yen("16"), Amount::ZERO));
    assert_eq!(world.ledger.call(world.calls[call].id).await?.and_then(|r| r.end), Some(CallEnd::CutOff));
    Ok(())
}

#[tokio::test]
async fn a_long_call_is_extended_chunk_by_chunk_and_holds_at_most_one_chunk_ahead() -> Result<()> {
    let mut world = World::new("10000").await?;
    let call = world.place("alice", japan_mobile()).await?;
    world.answer(call).await?;
    for minute in 1..=30 {
        world.advance_to(minute * 60).await?;
        let (_, held) = world.balance().await?;
        // Never more than the talk so far plus one chunk (180 s) plus the extension's lead.
        assert!(held <= japan_mobile().cost(minute * 60 + 180 + 90, &Currency::default()), "at {minute} min {held:?} is held");
    }
    world.advance_to(30 * 60 + 10).await?;
    world.hang_up(call, CallEnd::FarEndHungUp).await?;
    assert_eq!(world.settled(call), Some((1810, yen("651"))), "31 started minutes at 21");
    assert_eq!(world.balance().await?, (yen("9349"), Amount::ZERO));
    assert!(!world.events(call).iter().any(|(_, e)| matches!(e, MeterEvent::Warning { .. })), "plenty of credit: no warning");
    Ok(())
}

#[tokio::test]
async fn two_calls_at_once_never_overspend() -> Result<()> {
    let mut world = World::new("100").await?;
    let first = world.place("alice", japan_mobile()).await?;
    let second = world.place("alice", japan_mobile()).await?;
    // The first holds three minutes (63); the second gets what is left, one minute and more.
    assert_eq!(world.events(first), [(0, MeterEvent::Admitted { covered_secs: 180 })]);
    assert_eq!(world.events(second), [(0, MeterEvent::Admitted { covered_secs: 60 })]);
    world.answer(first).await?;
    world.answer(second).await?;
    world.advance_to(3600).await?;
    let (first_secs, first_amount) = world.settled(first).expect("first settled");
    let (second_secs, second_amount) = world.settled(second).expect("second settled");
    assert_eq!((first_secs, second_secs), (180, 60));
    assert_eq!(first_amount.checked_add(second_amount), Some(yen("84")));
    assert_eq!(world.balance().await?, (yen("16"), Amount::ZERO), "never below zero, nothing left held");
    assert!(world.events(second).iter().any(|(at, e)| *at == 0 && *e == MeterEvent::Warning { secs_left: 60 }));
    Ok(())
}

#[tokio::test]
async fn too_little_credit_for_one_increment_is_refused_and_records_nothing() -> Result<()> {
    let mut world = World::new("20.99").await?;
    let call = world.place("alice", japan_mobile()).await?;
    assert_eq!(
        world.events(call),
        [(0, MeterEvent::Refused(Refusal::CreditTooLow { available: yen("20.99"), first_increment: yen("21") }))]
    );
    assert!(world.calls[call].meter.is_done());
    assert_eq!(world.ledger.call(world.calls[call].id).await?, None);
    assert_eq!(world.balance().await?, (yen("20.99"), Amount::ZERO));
    Ok(())
}

#[tokio::test]
async fn an_unanswered_call_costs_nothing() -> Result<()> {
    let mut world = World::new("100").await?;
    let call = world.place("alice", japan_mobile()).await?;
    world.advance_to(40).await?;
    world.hang_up(call, CallEnd::NotAnswered).await?;
    assert_eq!(world.settled(call), Some((0, Amount::ZERO)));
    assert_eq!(world.balance().await?, (yen("100"), Amount::ZERO));
    Ok(())
}

#[tokio::test]
async fn a_ledger_outage_mid_call_ends_it_where_its_holds_end_and_settles_once_back() -> Result<()> {
    let mut world = World::new("1000").await?;
    let call = world.place("alice", japan_mobile()).await?;
    world.answer(call).await?;
    world.advance_to(60).await?;
    world.ledger_down = true;
    world.advance_to(200).await?;
    assert!(world.events(call).contains(&(180, MeterEvent::CutOff)), "{:?}", world.events(call));
    assert_eq!(world.settled(call), None, "the settle waits for the ledger");
    world.ledger_down = false;
    world.advance_to(210).await?;
    assert_eq!(world.settled(call), Some((180, yen("63"))));
    assert_eq!(world.balance().await?, (yen("937"), Amount::ZERO));
    assert_eq!(world.ledger.entries(Some("alice"), 10).await?.len(), 2, "one top-up, one charge");
    Ok(())
}

#[tokio::test]
async fn a_ledger_that_is_down_at_admission_refuses_the_call() -> Result<()> {
    let mut world = World::new("1000").await?;
    world.ledger_down = true;
    let call = world.place("alice", japan_mobile()).await?;
    assert!(matches!(world.events(call), [(0, MeterEvent::Refused(Refusal::LedgerUnavailable { .. }))]), "{:?}", world.events(call));
    world.ledger_down = false;
    world.advance_to(5).await?;
    assert_eq!(world.settled(call), Some((0, Amount::ZERO)), "anything the failed write held is released");
    assert_eq!(world.balance().await?, (yen("1000"), Amount::ZERO));
    Ok(())
}

#[tokio::test]
async fn the_per_call_cost_limit_cuts_the_call_off() -> Result<()> {
    let mut world = World::new("10000").await?;
    world.config.max_cost = Some(yen("50"));
    let call = world.place("alice", japan_mobile()).await?;
    world.answer(call).await?;
    world.advance_to(3600).await?;
    assert_eq!(
        world.events(call),
        [
            (0, MeterEvent::Admitted { covered_secs: 120 }),
            (60, MeterEvent::Warning { secs_left: 60 }),
            (120, MeterEvent::CutOff),
            (120, MeterEvent::Settled { billed_secs: 120, amount: yen("42") }),
        ]
    );
    world.config.max_cost = Some(yen("20"));
    let refused = world.place("alice", japan_mobile()).await?;
    assert!(matches!(world.events(refused), [(_, MeterEvent::Refused(Refusal::OverCostLimit { .. }))]));
    Ok(())
}

#[tokio::test]
async fn a_third_call_at_once_is_refused() -> Result<()> {
    let mut world = World::new("1000").await?;
    world.place("alice", japan_mobile()).await?;
    world.place("alice", japan_mobile()).await?;
    let third = world.place("alice", japan_mobile()).await?;
    assert_eq!(world.events(third), [(0, MeterEvent::Refused(Refusal::TooManyCalls { open: 2 }))]);
    assert_eq!(world.balance().await?, (yen("1000"), yen("126")), "the two calls hold three minutes each");
    Ok(())
}

#[tokio::test]
async fn a_crash_bills_the_talk_its_last_progress_record_proves() -> Result<()> {
    let mut world = World::new("1000").await?;
    let call = world.place("alice", japan_mobile()).await?;
    world.answer(call).await?;
    world.advance_to(63).await?;
    // The gateway dies: its meter is gone. On restart it recovers its open calls.
    let id = world.calls[call].id;
    world.calls.clear();
    let recovered = world.ledger.recover(GATEWAY, Duration::from_secs(60), world.now_ms()).await?;
    assert_eq!(recovered.len(), 1);
    // Progress is recorded every 5 s: the last record said 60 s, one started minute.
    assert_eq!((recovered[0].id, recovered[0].billed_secs, recovered[0].amount), (id, Some(60), Some(yen("21"))));
    assert_eq!(world.balance().await?, (yen("979"), Amount::ZERO));
    Ok(())
}

#[tokio::test]
async fn per_second_billing_with_a_connection_fee_is_exact() -> Result<()> {
    let mut world = World::new("100").await?;
    let rate = Rate { increment: "1/1".parse().expect("increment"), connection_fee: yen("10"), ..japan_mobile() };
    let call = world.place("alice", rate).await?;
    world.answer(call).await?;
    world.advance_to(61).await?;
    world.hang_up(call, CallEnd::CallerHungUp).await?;
    // 10 + 61 × 0.35 = 31.35 exactly.
    assert_eq!(world.settled(call), Some((61, yen("31.35"))));
    assert_eq!(world.balance().await?, (yen("68.65"), Amount::ZERO));
    Ok(())
}
