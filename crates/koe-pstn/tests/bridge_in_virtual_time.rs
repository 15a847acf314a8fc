//! One SkypeOut call's bridge in virtual time: trunk responses scripted, the Koe caller's
//! actions injected, the billing meter writing to a real SQLite ledger. Asserts on what the
//! caller is told, what goes to the trunks (failover, CANCEL, BYE) and what is billed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use koe_pstn::billing;
use koe_pstn::bridge::{Bridge, BridgeOutput, CallFailure, KoeAction, KoeEvent, MediaAction, SipAction, SipEvent, RING_TIMEOUT};
use koe_pstn::ledger::{BillingId, CallEnd, Credit, CreditKind, LedgerStore, NewCall, SqliteLedger};
use koe_pstn::meter::{CallMeter, MeterConfig, Refusal};
use koe_pstn::money::{Amount, Currency};
use koe_pstn::rates::RateTable;

const START_MS: i64 = 1_700_000_000_000;

fn yen(text: &str) -> Amount {
    text.parse().unwrap()
}

/// One bridge, its ledger and everything it said, under a virtual clock.
struct World {
    _dir: tempfile::TempDir,
    ledger: Arc<dyn LedgerStore>,
    call: NewCall,
    start: Instant,
    now: Instant,
    bridge: Bridge,
    /// Outputs other than ledger requests, with the second they came at.
    said: Vec<(u64, BridgeOutput)>,
}

impl World {
    async fn new(credit: &str, trunks: usize) -> Result<Self> {
        let dir = tempfile::TempDir::new()?;
        let ledger: Arc<dyn LedgerStore> = Arc::new(SqliteLedger::open(&dir.path().join("ledger.db"), Duration::from_secs(5)).await?);
        let top_up = Credit { key: "top-up".into(), username: "alice".into(), amount: yen(credit).micros(), kind: CreditKind::TopUp };
        ledger.credit(&top_up, START_MS).await?;
        let rate = RateTable::built_in().lookup("819012345678").cloned().unwrap();
        let call = NewCall {
            id: BillingId::random(),
            username: "alice".into(),
            number: "+819012345678".into(),
            rate: rate.clone(),
            currency: Currency::default(),
            gateway: "gw".into(),
            max_open_calls: 2,
        };
        let bridge = Bridge::new(CallMeter::new(rate, Currency::default(), MeterConfig::default()), trunks);
        let start = Instant::now();
        let mut world = Self { _dir: dir, ledger, call, start, now: start, bridge, said: Vec::new() };
        world.pump().await;
        Ok(world)
    }

    fn secs(&self) -> u64 {
        self.now.duration_since(self.start).as_secs()
    }

    fn at(&self, secs: u64) -> Instant {
        self.start + Duration::from_secs(secs)
    }

    async fn pump(&mut self) {
        while let Some(output) = self.bridge.poll_output() {
            match output {
                BridgeOutput::Ledger(request) => {
                    let now_ms = START_MS + self.now.duration_since(self.start).as_millis() as i64;
                    let reply = billing::carry_out(self.ledger.as_ref(), &self.call, Some("trunk"), request, CallEnd::CallerHungUp, now_ms).await;
                    if let Some(reply) = reply {
                        self.bridge.handle_ledger_reply(self.now, reply);
                    }
                }
                other => self.said.push((self.secs(), other)),
            }
        }
    }

    async fn sip(&mut self, secs: u64, event: SipEvent) {
        self.advance_to(secs).await;
        self.bridge.handle_sip(self.now, event);
        self.pump().await;
    }

    async fn koe(&mut self, secs: u64, event: KoeEvent) {
        self.advance_to(secs).await;
        self.bridge.handle_koe(self.now, event);
        self.pump().await;
    }

    async fn advance_to(&mut self, secs: u64) {
        let target = self.at(secs);
        while let Some(deadline) = self.bridge.poll_timeout().filter(|deadline| *deadline <= target) {
            self.now = self.now.max(deadline);
            self.bridge.handle_timeout(self.now);
            self.pump().await;
        }
        self.now = self.now.max(target);
    }

    /// What went to the trunks, in order.
    fn sip_actions(&self) -> Vec<SipAction> {
        self.said.iter().filter_map(|(_, o)| if let BridgeOutput::Sip(a) = o { Some(*a) } else { None }).collect()
    }

    fn koe_actions(&self) -> Vec<(u64, KoeAction)> {
        self.said.iter().filter_map(|(at, o)| if let BridgeOutput::Koe(a) = o { Some((*at, a.clone())) } else { None }).collect()
    }

    fn media_actions(&self) -> Vec<(u64, MediaAction)> {
        self.said.iter().filter_map(|(at, o)| if let BridgeOutput::Media(a) = o { Some((*at, *a)) } else { None }).collect()
    }

    fn finished(&self) -> Option<CallEnd> {
        self.said.iter().find_map(|(_, o)| if let BridgeOutput::Finished { end } = o { Some(*end) } else { None })
    }

    async fn balance(&self) -> (Amount, Amount) {
        let balance = self.ledger.balance("alice").await.unwrap();
        (balance.balance, balance.held)
    }
}

#[tokio::test]
async fn an_answered_call_is_billed_from_the_answer_to_the_far_ends_bye() -> Result<()> {
    let mut world = World::new("1000", 2).await?;
    assert_eq!(world.sip_actions(), [SipAction::Invite { trunk: 0 }], "admitted before any trunk is dialled");
    world.sip(1, SipEvent::Provisional { code: 180, early_media: false }).await;
    world.sip(10, SipEvent::Answered).await;
    world.sip(71, SipEvent::RemoteBye).await;
    assert_eq!(
        world.koe_actions(),
        [
            (0, KoeAction::Admitted { covered_secs: 180 }),
            (1, KoeAction::Ringing { early_media: false }),
            (10, KoeAction::Answer),
            (71, KoeAction::Hangup(CallFailure::Ended)),
            (71, KoeAction::Billed { billed_secs: 61, amount: yen("42") }),
        ]
    );
    assert_eq!(world.media_actions(), [(10, MediaAction::Connect), (71, MediaAction::Disconnect)]);
    assert_eq!(world.finished(), Some(CallEnd::FarEndHungUp));
    assert_eq!(world.balance().await, (yen("958"), Amount::ZERO));
    Ok(())
}

#[tokio::test]
async fn a_503_fails_over_to_the_next_trunk_which_answers() -> Result<()> {
    let mut world = World::new("1000", 3).await?;
    world.sip(1, SipEvent::Rejected { code: 503 }).await;
    world.sip(2, SipEvent::NoResponse).await;
    world.sip(3, SipEvent::Answered).await;
    world.koe(33, KoeEvent::HungUp).await;
    assert_eq!(
        world.sip_actions(),
        [SipAction::Invite { trunk: 0 }, SipAction::Invite { trunk: 1 }, SipAction::Invite { trunk: 2 }, SipAction::Bye]
    );
    assert_eq!(world.finished(), Some(CallEnd::CallerHungUp));
    assert_eq!(world.balance().await, (yen("979"), Amount::ZERO));
    Ok(())
}

#[tokio::test]
async fn busy_and_decline_never_fail_over_and_say_why() -> Result<()> {
    for (code, failure, end) in [
        (486, CallFailure::Busy, CallEnd::Busy),
        (603, CallFailure::RefusedByCarrier, CallEnd::NotAnswered),
        (404, CallFailure::NoSuchNumber, CallEnd::NotAnswered),
        (480, CallFailure::Unavailable, CallEnd::NotAnswered),
        (403, CallFailure::RefusedByCarrier, CallEnd::NotAnswered),
    ] {
        let mut world = World::new("1000", 2).await?;
        world.sip(1, SipEvent::Rejected { code }).await;
        assert_eq!(world.sip_actions(), [SipAction::Invite { trunk: 0 }], "{code} is the person's answer");
        assert_eq!(world.koe_actions().last(), Some(&(1, KoeAction::Reject(failure.clone()))), "{code}");
        assert_eq!(world.finished(), Some(end), "{code}");
        assert_eq!(world.balance().await, (yen("1000"), Amount::ZERO), "{code} costs nothing");
    }
    assert_eq!(CallFailure::Busy.to_string(), "busy");
    assert_eq!(CallFailure::NoSuchNumber.to_string(), "no such number");
    assert_eq!(CallFailure::Unavailable.to_string(), "unavailable");
    assert_eq!(CallFailure::RefusedByCarrier.to_string(), "refused by the carrier");
    Ok(())
}

#[tokio::test]
async fn no_failover_once_the_phone_may_have_rung() -> Result<()> {
    let mut world = World::new("1000", 2).await?;
    world.sip(1, SipEvent::Provisional { code: 183, early_media: true }).await;
    world.sip(5, SipEvent::Rejected { code: 503 }).await;
    assert_eq!(world.sip_actions(), [SipAction::Invite { trunk: 0 }]);
    assert!(matches!(world.koe_actions().last(), Some((5, KoeAction::Reject(CallFailure::TrunksDown { last_code: Some(503) })))));
    Ok(())
}

#[tokio::test]
async fn every_trunk_down_is_said_plainly() -> Result<()> {
    let mut world = World::new("1000", 2).await?;
    world.sip(32, SipEvent::NoResponse).await;
    world.sip(64, SipEvent::NoResponse).await;
    assert_eq!(world.sip_actions(), [SipAction::Invite { trunk: 0 }, SipAction::Invite { trunk: 1 }]);
    let last = world.koe_actions().last().cloned();
    assert_eq!(last, Some((64, KoeAction::Reject(CallFailure::TrunksDown { last_code: None }))));
    assert!(CallFailure::TrunksDown { last_code: None }.to_string().contains("try again later"));
    assert_eq!(world.balance().await, (yen("1000"), Amount::ZERO));
    Ok(())
}

#[tokio::test]
async fn early_media_flows_before_the_answer_but_billing_starts_at_the_answer() -> Result<()> {
    let mut world = World::new("1000", 1).await?;
    world.sip(1, SipEvent::Provisional { code: 183, early_media: true }).await;
    world.sip(20, SipEvent::Answered).await;
    world.koe(80, KoeEvent::HungUp).await;
    assert_eq!(world.media_actions(), [(1, MediaAction::Connect), (80, MediaAction::Disconnect)]);
    assert!(world.koe_actions().contains(&(1, KoeAction::Ringing { early_media: true })));
    assert!(world.koe_actions().contains(&(80, KoeAction::Billed { billed_secs: 60, amount: yen("21") })), "{:?}", world.koe_actions());
    Ok(())
}

#[tokio::test]
async fn a_caller_who_hangs_up_while_it_rings_cancels_and_pays_nothing() -> Result<()> {
    let mut world = World::new("1000", 1).await?;
    world.sip(1, SipEvent::Provisional { code: 180, early_media: false }).await;
    world.koe(8, KoeEvent::HungUp).await;
    world.sip(9, SipEvent::Rejected { code: 487 }).await;
    assert_eq!(world.sip_actions(), [SipAction::Invite { trunk: 0 }, SipAction::Cancel]);
    assert_eq!(world.finished(), Some(CallEnd::NotAnswered));
    assert_eq!(world.balance().await, (yen("1000"), Amount::ZERO));
    Ok(())
}

#[tokio::test]
async fn an_answer_that_crosses_the_cancel_is_hung_up_at_once_unbilled() -> Result<()> {
    let mut world = World::new("1000", 1).await?;
    world.koe(8, KoeEvent::HungUp).await;
    world.sip(9, SipEvent::Answered).await;
    assert_eq!(world.sip_actions(), [SipAction::Invite { trunk: 0 }, SipAction::Cancel, SipAction::Bye]);
    assert!(!world.koe_actions().iter().any(|(_, a)| *a == KoeAction::Answer));
    assert_eq!(world.balance().await, (yen("1000"), Amount::ZERO));
    Ok(())
}

#[tokio::test]
async fn a_phone_nobody_answers_is_given_up_after_the_ring_timeout() -> Result<()> {
    let mut world = World::new("1000", 1).await?;
    world.sip(1, SipEvent::Provisional { code: 180, early_media: false }).await;
    world.advance_to(RING_TIMEOUT.as_secs() + 1).await;
    assert_eq!(world.sip_actions(), [SipAction::Invite { trunk: 0 }, SipAction::Cancel]);
    assert_eq!(world.koe_actions().last(), Some(&(RING_TIMEOUT.as_secs(), KoeAction::Reject(CallFailure::NoAnswer))));
    assert_eq!(world.finished(), Some(CallEnd::NotAnswered));
    Ok(())
}

#[tokio::test]
async fn spent_credit_warns_with_a_tone_then_hangs_up_both_sides() -> Result<()> {
    let mut world = World::new("100", 1).await?;
    world.sip(2, SipEvent::Answered).await;
    world.advance_to(1000).await;
    // 100 pays four minutes at 21: warned at 3, cut at 4 minutes after the answer.
    assert!(world.media_actions().contains(&(182, MediaAction::WarningTone)), "{:?}", world.media_actions());
    assert!(world.koe_actions().contains(&(182, KoeAction::CreditWarning { secs_left: 60 })));
    assert!(world.koe_actions().contains(&(242, KoeAction::Hangup(CallFailure::CreditSpent))));
    assert_eq!(world.sip_actions(), [SipAction::Invite { trunk: 0 }, SipAction::Bye]);
    assert_eq!(world.finished(), Some(CallEnd::CutOff));
    assert_eq!(world.balance().await, (yen("16"), Amount::ZERO));
    Ok(())
}

#[tokio::test]
async fn silent_trunk_media_ends_the_call_and_billing_stops_when_it_went_quiet() -> Result<()> {
    let mut world = World::new("1000", 1).await?;
    world.sip(0, SipEvent::Answered).await;
    let quiet_since = world.at(50);
    world.sip(80, SipEvent::MediaInactive { since: quiet_since }).await;
    assert_eq!(world.sip_actions(), [SipAction::Invite { trunk: 0 }, SipAction::Bye]);
    assert!(world.koe_actions().contains(&(80, KoeAction::Hangup(CallFailure::Lost))));
    assert_eq!(world.finished(), Some(CallEnd::Failed));
    assert_eq!(world.balance().await, (yen("979"), Amount::ZERO), "50 s billed, not 80");
    Ok(())
}

#[tokio::test]
async fn a_koe_caller_who_vanishes_stops_billing_at_that_moment() -> Result<()> {
    let mut world = World::new("1000", 1).await?;
    world.sip(0, SipEvent::Answered).await;
    let gone = world.at(55);
    world.koe(60, KoeEvent::Vanished { since: gone }).await;
    assert_eq!(world.sip_actions(), [SipAction::Invite { trunk: 0 }, SipAction::Bye]);
    assert_eq!(world.finished(), Some(CallEnd::Failed));
    assert_eq!(world.balance().await, (yen("979"), Amount::ZERO));
    Ok(())
}

#[tokio::test]
async fn a_refused_admission_never_dials() -> Result<()> {
    let world = World::new("10", 2).await?;
    assert_eq!(world.sip_actions(), []);
    assert!(matches!(world.koe_actions().as_slice(), [(0, KoeAction::Reject(CallFailure::Refused(Refusal::CreditTooLow { .. })))]));
    assert_eq!(world.finished(), Some(CallEnd::NotAnswered));
    assert_eq!(world.balance().await, (yen("10"), Amount::ZERO));
    Ok(())
}
