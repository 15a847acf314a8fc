//! The billing meter of one SkypeOut call, sans-IO: when to hold credit, when to extend the
//! hold, when to warn and when to cut the call off, and what to post at the end.
//!
//! The meter never touches the ledger itself. It asks for ledger writes ([`LedgerRequest`]),
//! each idempotent by call and chunk, and is told how they went ([`LedgerReply`]). Time is an
//! input. The hard cap on a call comes from what the ledger granted, never from a hang-up that
//! might fail: the call may last exactly as long as its holds pay for (`covered_secs`), and the
//! meter cuts it off there. At the end the exact cost is posted and the rest of the holds
//! released in one write; after a crash the ledger does the same from the last progress the
//! meter recorded (see `ledger`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::money::{Amount, Currency};
use crate::rates::Rate;

/// How the meter holds and extends credit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterConfig {
    /// Seconds of talk each hold pays for (after the first, which covers the same).
    pub chunk_secs: u64,
    /// Extend the hold this long before the covered time runs out; more than
    /// `warning_before` so a final extension still leaves time to warn.
    pub extend_before: Duration,
    /// The caller is warned this long before the credit runs out.
    pub warning_before: Duration,
    /// How often an answered call's progress is recorded, so that a crash loses at most this
    /// much billable time.
    pub progress_every: Duration,
    /// A failed ledger write is retried after this long.
    pub retry_after: Duration,
    /// No call lasts longer than this, whatever the credit.
    pub max_call_secs: u64,
    /// No call costs more than this (a fraud limit), whatever the credit.
    pub max_cost: Option<Amount>,
}

impl Default for MeterConfig {
    fn default() -> Self {
        Self {
            chunk_secs: 180,
            extend_before: Duration::from_secs(90),
            warning_before: Duration::from_secs(60),
            progress_every: Duration::from_secs(5),
            retry_after: Duration::from_secs(2),
            max_call_secs: 4 * 3600,
            max_cost: None,
        }
    }
}

/// A write the meter asks of the ledger. Each is idempotent: the same request again is a no-op
/// that gets the same reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerRequest {
    /// Hold `want` if available, else as much as is available but at least `at_least`, under
    /// the key (call, `chunk`). Chunk 0 opens the call (admission). Replied to with
    /// [`LedgerReply::Held`], [`LedgerReply::Insufficient`] or [`LedgerReply::HoldFailed`].
    Hold { chunk: u32, want: Amount, at_least: Amount },
    /// The call was answered: billing time starts now. A record for crash recovery, not
    /// replied to: a failed one is covered by the next progress record and by the settle.
    Answered,
    /// The answered call is known to have lasted `alive_secs` so far. Not replied to, as
    /// `Answered`.
    Progress { alive_secs: u64 },
    /// Post `amount` for `billed_secs` of talk and release the rest of the holds. Replied to
    /// with [`LedgerReply::Settled`] or [`LedgerReply::SettleFailed`].
    Settle { billed_secs: u64, amount: Amount, reason: SettleReason },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleReason {
    /// Either side hung up or the call failed after admission.
    Ended,
    /// The credit (or a limit) ran out and the meter cut the call off.
    CutOff,
}

/// What the ledger answered to a hold or a settle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerReply {
    Held { chunk: u32, granted: Amount },
    /// Less than `at_least` was available; nothing was held.
    Insufficient { chunk: u32, available: Amount },
    /// The user already has as many PSTN calls open as allowed; nothing was held.
    TooManyCalls { chunk: u32, open: u32 },
    /// The ledger could not be written (locked, read-only, unreachable).
    HoldFailed { chunk: u32, reason: String },
    Settled,
    SettleFailed { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeterEvent {
    /// The call may be placed; the holds pay for `covered_secs` of talk so far.
    Admitted { covered_secs: u64 },
    /// The call may not be placed.
    Refused(Refusal),
    /// The credit runs out in `secs_left`: play the tone, tell the caller.
    Warning { secs_left: u64 },
    /// Hang the call up now: its holds are spent.
    CutOff,
    /// The call's cost is posted.
    Settled { billed_secs: u64, amount: Amount },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not even the first increment is paid for.
    CreditTooLow { available: Amount, first_increment: Amount },
    /// The ledger could not be written, so nothing may be spent.
    LedgerUnavailable { reason: String },
    /// The per-call cost limit is below one increment.
    OverCostLimit { limit: Amount, first_increment: Amount },
    /// The user already has this many PSTN calls open, the most allowed.
    TooManyCalls { open: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeterOutput {
    Ledger(LedgerRequest),
    Event(MeterEvent),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Admission hold asked for, no answer yet from the ledger.
    Admitting,
    /// Admitted; the call is ringing.
    Ringing,
    Answered { at: Instant },
    /// Settle asked for; waiting for the ledger.
    Settling,
    Done,
}

/// The hold asked for and not yet answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HoldInFlight {
    chunk: u32,
    want: Amount,
}

/// The meter of one call. The driver feeds it ledger replies, the answer, the end and the
/// clock, and carries out what `poll_output` returns.
#[derive(Debug)]
pub struct CallMeter {
    rate: Rate,
    currency: Currency,
    config: MeterConfig,
    phase: Phase,
    /// Sum of what every hold granted.
    held: Amount,
    /// Talk the holds pay for.
    covered_secs: u64,
    /// No more holds will be granted: the credit or a limit is reached.
    covered_is_final: bool,
    next_chunk: u32,
    hold_in_flight: Option<HoldInFlight>,
    /// A failed extension is not asked again before this.
    hold_retry_at: Option<Instant>,
    warned: bool,
    /// The settle request, kept to retry it until the ledger takes it.
    settle: Option<LedgerRequest>,
    settle_retry_at: Option<Instant>,
    progress_at: Option<Instant>,
    outputs: VecDeque<MeterOutput>,
}

impl CallMeter {
    /// Starts metering a call to a number that `rate` prices, asking for the admission hold.
    pub fn new(rate: Rate, currency: Currency, config: MeterConfig) -> Self {
        let mut meter = Self {
            rate,
            currency,
            config,
            phase: Phase::Admitting,
            held: Amount::ZERO,
            covered_secs: 0,
            covered_is_final: false,
            next_chunk: 0,
            hold_in_flight: None,
            hold_retry_at: None,
            warned: false,
            settle: None,
            settle_retry_at: None,
            progress_at: None,
            outputs: VecDeque::new(),
        };
        let first_increment = meter.cost_up_to(1);
        match meter.config.max_cost.filter(|limit| *limit < first_increment) {
            Some(limit) => {
                meter.phase = Phase::Done;
                meter.event(MeterEvent::Refused(Refusal::OverCostLimit { limit, first_increment }));
            }
            None => meter.ask_hold(),
        }
        meter
    }

    pub fn covered_secs(&self) -> u64 {
        self.covered_secs
    }

    pub fn held(&self) -> Amount {
        self.held
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The far end answered: billing time starts.
    pub fn handle_answer(&mut self, now: Instant) {
        if self.phase == Phase::Ringing {
            self.phase = Phase::Answered { at: now };
            self.ledger(LedgerRequest::Answered);
            self.progress_at = Some(now + self.config.progress_every);
            self.handle_timeout(now);
        }
    }

    /// The call ended (either side hung up, or it failed). Unanswered calls cost nothing.
    pub fn handle_end(&mut self, now: Instant) {
        self.settle(now, SettleReason::Ended);
    }

    pub fn handle_reply(&mut self, now: Instant, reply: LedgerReply) {
        match reply {
            LedgerReply::Settled if self.phase == Phase::Settling => {
                if let Some(LedgerRequest::Settle { billed_secs, amount, .. }) = self.settle.take() {
                    self.event(MeterEvent::Settled { billed_secs, amount });
                }
                self.phase = Phase::Done;
                self.settle_retry_at = None;
            }
            LedgerReply::SettleFailed { .. } if self.phase == Phase::Settling => {
                self.settle_retry_at = Some(now + self.config.retry_after);
            }
            LedgerReply::Held { chunk, granted } if self.is_in_flight(chunk) => {
                let asked = self.hold_in_flight.take().map_or(Amount::ZERO, |hold| hold.want);
                self.held = self.held.checked_add(granted).unwrap_or(self.held);
                self.covered_secs = self.covered_secs.max(self.rate.secs_affordable(self.held, self.config.max_call_secs, &self.currency).unwrap_or(0));
                if granted < asked || self.limits_reached() {
                    self.covered_is_final = true;
                }
                if self.phase == Phase::Admitting {
                    self.phase = Phase::Ringing;
                    self.event(MeterEvent::Admitted { covered_secs: self.covered_secs });
                } else {
                    // A final grant may already be inside the warning time.
                    self.handle_timeout(now);
                }
            }
            LedgerReply::Insufficient { chunk, available } if self.is_in_flight(chunk) => {
                self.hold_in_flight = None;
                self.covered_is_final = true;
                if self.phase == Phase::Admitting {
                    self.phase = Phase::Done;
                    let first_increment = self.cost_up_to(1);
                    self.event(MeterEvent::Refused(Refusal::CreditTooLow { available, first_increment }));
                } else {
                    self.handle_timeout(now);
                }
            }
            LedgerReply::TooManyCalls { chunk, open } if self.is_in_flight(chunk) => {
                // Only admission counts open calls.
                self.hold_in_flight = None;
                self.phase = Phase::Done;
                self.event(MeterEvent::Refused(Refusal::TooManyCalls { open }));
            }
            LedgerReply::HoldFailed { chunk, reason } if self.is_in_flight(chunk) => {
                self.hold_in_flight = None;
                if self.phase == Phase::Admitting {
                    // The write may have gone through before the failure was seen: settle
                    // at nothing, which releases whatever was held.
                    self.settle(now, SettleReason::Ended);
                    self.event(MeterEvent::Refused(Refusal::LedgerUnavailable { reason }));
                } else {
                    // Asked again (same key, so at most once held) after a pause; if the
                    // ledger stays down, the call ends where its holds end.
                    self.next_chunk = chunk;
                    self.hold_retry_at = Some(now + self.config.retry_after);
                }
            }
            // A reply to a hold that the end of the call overtook: the settle releases it.
            _ => {}
        }
    }

    /// Advances the clock: extensions, warnings, the cut-off, retries and progress records.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase == Phase::Settling && self.settle_retry_at.is_some_and(|due| now >= due) {
            self.settle_retry_at = None;
            if let Some(request) = self.settle.clone() {
                self.ledger(request);
            }
        }
        let Phase::Answered { at } = self.phase else { return };
        let covered_end = at + Duration::from_secs(self.covered_secs);
        if now >= covered_end {
            self.event(MeterEvent::CutOff);
            self.settle(now, SettleReason::CutOff);
            return;
        }
        if self.covered_is_final && !self.warned && now + self.config.warning_before >= covered_end {
            self.warned = true;
            self.event(MeterEvent::Warning { secs_left: covered_end.saturating_duration_since(now).as_secs() });
        }
        if self.progress_at.is_some_and(|due| now >= due) {
            self.ledger(LedgerRequest::Progress { alive_secs: now.saturating_duration_since(at).as_secs() });
            self.progress_at = Some(now + self.config.progress_every);
        }
        if self.extension_due().is_some_and(|due| now >= due) {
            self.hold_retry_at = None;
            self.ask_hold();
        }
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let Phase::Answered { at } = self.phase else {
            return self.settle_retry_at.filter(|_| self.phase == Phase::Settling);
        };
        let covered_end = at + Duration::from_secs(self.covered_secs);
        let warning = (self.covered_is_final && !self.warned)
            .then(|| covered_end.checked_sub(self.config.warning_before).unwrap_or(at));
        [Some(covered_end), warning, self.progress_at, self.extension_due()].into_iter().flatten().min()
    }

    pub fn poll_output(&mut self) -> Option<MeterOutput> {
        self.outputs.pop_front()
    }

    /// When the next hold should be asked for, if one should.
    fn extension_due(&self) -> Option<Instant> {
        let Phase::Answered { at } = self.phase else { return None };
        if self.covered_is_final || self.hold_in_flight.is_some() {
            return None;
        }
        let covered_end = at + Duration::from_secs(self.covered_secs);
        let due = covered_end.checked_sub(self.config.extend_before).unwrap_or(at);
        Some(self.hold_retry_at.map_or(due, |retry| retry.max(due)))
    }

    fn is_in_flight(&self, chunk: u32) -> bool {
        self.hold_in_flight.is_some_and(|hold| hold.chunk == chunk)
    }

    /// The call may not last longer, whatever more credit there is.
    fn limits_reached(&self) -> bool {
        self.covered_secs >= self.config.max_call_secs
            || self.config.max_cost.is_some_and(|limit| self.cost_up_to(self.next_boundary()) > limit)
    }

    fn cost_up_to(&self, secs: u64) -> Amount {
        self.rate.cost(secs, &self.currency)
    }

    /// Asks for the next chunk: enough for `chunk_secs` more talk, at least one more increment.
    fn ask_hold(&mut self) {
        let target_secs = (self.covered_secs + self.config.chunk_secs).min(self.config.max_call_secs);
        let mut target = self.cost_up_to(target_secs);
        if let Some(limit) = self.config.max_cost {
            target = target.min(limit);
        }
        let want = target.saturating_sub(self.held);
        if !want.is_positive() {
            self.covered_is_final = true;
            return;
        }
        let at_least = self.cost_up_to(self.next_boundary()).saturating_sub(self.held).min(want);
        let chunk = self.next_chunk;
        self.next_chunk += 1;
        self.hold_in_flight = Some(HoldInFlight { chunk, want });
        self.ledger(LedgerRequest::Hold { chunk, want, at_least });
    }

    /// The end of the first billing increment that the covered time does not pay for.
    fn next_boundary(&self) -> u64 {
        let increment = self.rate.increment;
        let first = u64::from(increment.first_secs);
        if self.covered_secs < first {
            first
        } else {
            self.covered_secs + u64::from(increment.next_secs)
        }
    }

    fn settle(&mut self, now: Instant, reason: SettleReason) {
        let billed_secs = match self.phase {
            Phase::Answered { at } => now.saturating_duration_since(at).as_secs().min(self.covered_secs),
            Phase::Ringing | Phase::Admitting => 0,
            Phase::Settling | Phase::Done => return,
        };
        let amount = self.cost_up_to(billed_secs).min(self.held);
        let request = LedgerRequest::Settle { billed_secs, amount, reason };
        self.settle = Some(request.clone());
        self.phase = Phase::Settling;
        self.progress_at = None;
        self.ledger(request);
    }

    fn ledger(&mut self, request: LedgerRequest) {
        self.outputs.push_back(MeterOutput::Ledger(request));
    }

    fn event(&mut self, event: MeterEvent) {
        self.outputs.push_back(MeterOutput::Event(event));
    }
}
