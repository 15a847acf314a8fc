//! The bridge of one SkypeOut call, sans-IO: a Koe call on one side, a SIP dialog towards a
//! trunk on the other, and the billing meter between them (a back-to-back user agent).
//!
//! It decides what happens when: the call is admitted by the meter before any trunk is
//! dialled; trunks are tried in order, the next only after a 408, a 5xx or no response at all,
//! and never once the phone may have rung (a 18x) or on busy/decline; billing starts at the
//! trunk's 200 OK and stops the moment either side hangs up, the trunk's media goes quiet, the
//! Koe caller vanishes, or the credit runs out. SIP messages, RTP and the Koe call are the
//! driver's; it feeds their events in and carries out [`BridgeOutput`]s.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::ledger::CallEnd;
use crate::meter::{CallMeter, LedgerReply, LedgerRequest, MeterEvent, MeterOutput, Refusal};
use crate::money::Amount;

/// How long a call may ring at the far end before it is given up.
pub const RING_TIMEOUT: Duration = Duration::from_secs(90);

/// What the trunk side reports (the driver turns SIP responses and RTP into these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SipEvent {
    /// A provisional response: 180 Ringing or 183 Session Progress; `early_media` when it
    /// carries SDP, so the carrier's ringback or announcement flows before the answer.
    Provisional { code: u16, early_media: bool },
    /// 200 OK to the INVITE (the stack has sent the ACK).
    Answered,
    /// A final non-2xx response to the INVITE.
    Rejected { code: u16 },
    /// No response at all (timer B) or the trunk could not be reached.
    NoResponse,
    /// The far end hung up (BYE).
    RemoteBye,
    /// No RTP from the trunk since `since`: the call is dead from that moment.
    MediaInactive { since: Instant },
    /// The dialog died otherwise (a re-INVITE's ACK never came, the transport broke).
    DialogFailed,
}

/// What the Koe side reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KoeEvent {
    /// The caller hung up (or cancelled while it rang).
    HungUp,
    /// The caller's media vanished at `since` (no audio, path lost): billing stops there.
    Vanished { since: Instant },
}

/// Orders for the trunk side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SipAction {
    /// INVITE the number through trunk `trunk` (an index into the gateway's trunk list).
    Invite { trunk: usize },
    /// CANCEL the INVITE in progress.
    Cancel,
    /// BYE the established dialog.
    Bye,
}

/// Orders for the Koe call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KoeAction {
    /// The call is admitted: credit pays for at least `covered_secs`.
    Admitted { covered_secs: u64 },
    /// The phone rings; with `early_media`, start the media now so the caller hears it.
    Ringing { early_media: bool },
    /// The phone answered: answer the Koe call (media may already flow).
    Answer,
    /// Refuse the Koe call before it was answered, saying why.
    Reject(CallFailure),
    /// End the answered Koe call, saying why.
    Hangup(CallFailure),
    /// The credit runs out in `secs_left`: play the tone and tell the caller.
    CreditWarning { secs_left: u64 },
    /// The call's bill, once posted.
    Billed { billed_secs: u64, amount: Amount },
}

/// Orders for the media bridge (RTP ↔ Koe media, with transcoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaAction {
    /// Start carrying media both ways (early media or the answer).
    Connect,
    /// Stop carrying media.
    Disconnect,
    /// Play the one-minute warning tone to the Koe caller.
    WarningTone,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgeOutput {
    Ledger(LedgerRequest),
    Sip(SipAction),
    Koe(KoeAction),
    Media(MediaAction),
    /// The bridge is finished: the call is over and its bill settled. `end` is for the record.
    Finished { end: CallEnd },
}

/// Why a call did not happen or ended, in words for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFailure {
    /// The call ended normally (a hang-up on either side).
    Ended,
    NoSuchNumber,
    Busy,
    Unavailable,
    RefusedByCarrier,
    NoAnswer,
    /// Every trunk failed; the last code, if any.
    TrunksDown { last_code: Option<u16> },
    /// Another final response.
    CarrierError { code: u16 },
    CreditSpent,
    Refused(Refusal),
    /// The media or the dialog died mid-call.
    Lost,
}

impl CallFailure {
    /// The words for a final response code. Codes that may fail over never get here unless no
    /// trunk is left.
    pub fn from_code(code: u16) -> Self {
        match code {
            404 | 484 | 410 | 604 => Self::NoSuchNumber,
            486 | 600 => Self::Busy,
            480 => Self::Unavailable,
            403 | 603 => Self::RefusedByCarrier,
            408 | 500..=599 => Self::TrunksDown { last_code: Some(code) },
            code => Self::CarrierError { code },
        }
    }

    fn call_end(&self) -> CallEnd {
        match self {
            Self::Busy => CallEnd::Busy,
            Self::Lost => CallEnd::Failed,
            Self::CreditSpent => CallEnd::CutOff,
            _ => CallEnd::NotAnswered,
        }
    }
}

impl fmt::Display for CallFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ended => f.write_str("the call ended"),
            Self::NoSuchNumber => f.write_str("no such number"),
            Self::Busy => f.write_str("busy"),
            Self::Unavailable => f.write_str("unavailable"),
            Self::RefusedByCarrier => f.write_str("refused by the carrier"),
            Self::NoAnswer => f.write_str("no answer"),
            Self::TrunksDown { last_code: Some(code) } => write!(f, "the phone network is unreachable just now (SIP {code}); try again later"),
            Self::TrunksDown { last_code: None } => f.write_str("the phone network is unreachable just now; try again later"),
            Self::CarrierError { code } => write!(f, "the carrier refused the call (SIP {code})"),
            Self::CreditSpent => f.write_str("your credit is spent"),
            // The amounts go to the caller as numbers, shown in their currency by the client.
            Self::Refused(Refusal::CreditTooLow { .. }) => f.write_str("not enough credit for the first increment of this call"),
            Self::Refused(Refusal::LedgerUnavailable { .. }) => f.write_str("billing is unavailable just now; try again later"),
            Self::Refused(Refusal::OverCostLimit { .. }) => f.write_str("this destination costs more per call than your limit allows"),
            Self::Refused(Refusal::TooManyCalls { open }) => write!(f, "you already have {open} phone calls in progress"),
            Self::Lost => f.write_str("the call was lost"),
        }
    }
}

/// May a failed INVITE be retried on the next trunk? Only when the carrier never reached the
/// phone: a timeout, a server error or no response. Busy and decline are the person's answer.
pub fn fails_over(code: Option<u16>) -> bool {
    match code {
        None => true,
        Some(code) => code == 408 || (500..=599).contains(&code),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the meter's admission.
    Admitting,
    /// An INVITE is out on `trunk`. `rang`: a provisional response came, so the phone may
    /// have rung and no other trunk may be tried.
    Inviting { trunk: usize, rang: bool, early_media: bool },
    /// CANCEL sent; waiting for the INVITE's final response.
    Cancelling,
    InCall,
    /// The call is over; waiting for the meter to settle.
    Settling,
    Finished,
}

/// One SkypeOut call's bridge. Create it once the number is parsed and rated; it asks the
/// meter for admission at once.
#[derive(Debug)]
pub struct Bridge {
    trunks: usize,
    meter: CallMeter,
    state: State,
    ring_deadline: Option<Instant>,
    /// How the call ended, for the record.
    end: CallEnd,
    outputs: VecDeque<BridgeOutput>,
}

impl Bridge {
    /// `trunks` is how many trunks may be tried, in order.
    pub fn new(meter: CallMeter, trunks: usize) -> Self {
        let mut bridge = Self {
            trunks,
            meter,
            state: State::Admitting,
            ring_deadline: None,
            end: CallEnd::NotAnswered,
            outputs: VecDeque::new(),
        };
        bridge.drain_meter(None);
        bridge
    }

    /// How the call ended (so far), for its record.
    pub fn end(&self) -> CallEnd {
        self.end
    }

    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    pub fn handle_ledger_reply(&mut self, now: Instant, reply: LedgerReply) {
        self.meter.handle_reply(now, reply);
        self.drain_meter(Some(now));
    }

    pub fn handle_sip(&mut self, now: Instant, event: SipEvent) {
        match (self.state, event) {
            (State::Inviting { trunk, rang, early_media }, SipEvent::Provisional { early_media: with_media, .. }) => {
                self.state = State::Inviting { trunk, rang: true, early_media: early_media || with_media };
                if !rang || (with_media && !early_media) {
                    self.koe(KoeAction::Ringing { early_media: with_media });
                }
                if with_media && !early_media {
                    self.media(MediaAction::Connect);
                }
            }
            (State::Inviting { early_media, .. }, SipEvent::Answered) => {
                self.state = State::InCall;
                self.ring_deadline = None;
                self.meter.handle_answer(now);
                self.koe(KoeAction::Answer);
                if !early_media {
                    self.media(MediaAction::Connect);
                }
                self.drain_meter(Some(now));
            }
            (State::Inviting { trunk, rang, .. }, SipEvent::Rejected { code }) => self.invite_failed(now, trunk, rang, Some(code)),
            (State::Inviting { trunk, rang, .. }, SipEvent::NoResponse) => self.invite_failed(now, trunk, rang, None),
            (State::Inviting { .. }, SipEvent::RemoteBye | SipEvent::DialogFailed | SipEvent::MediaInactive { .. }) => {
                self.fail_before_answer(now, CallFailure::Lost);
            }
            // The CANCEL lost the race with the answer: hang up at once (nothing was billed),
            // even when the bill is already settled.
            (State::Cancelling | State::Settling | State::Finished, SipEvent::Answered) => {
                self.sip(SipAction::Bye);
                self.finish_call(now);
            }
            (State::Cancelling, SipEvent::Rejected { .. } | SipEvent::NoResponse | SipEvent::RemoteBye | SipEvent::DialogFailed) => {
                self.finish_call(now);
            }
            (State::InCall, SipEvent::RemoteBye) => {
                self.end = CallEnd::FarEndHungUp;
                self.hang_up_koe(now, CallFailure::Ended);
            }
            (State::InCall, SipEvent::MediaInactive { since }) => {
                self.end = CallEnd::Failed;
                self.sip(SipAction::Bye);
                self.hang_up_koe(since, CallFailure::Lost);
            }
            (State::InCall, SipEvent::DialogFailed) => {
                self.end = CallEnd::Failed;
                self.sip(SipAction::Bye);
                self.hang_up_koe(now, CallFailure::Lost);
            }
            _ => {}
        }
    }

    pub fn handle_koe(&mut self, now: Instant, event: KoeEvent) {
        let (at, end) = match event {
            KoeEvent::HungUp => (now, CallEnd::CallerHungUp),
            KoeEvent::Vanished { since } => (since.min(now), CallEnd::Failed),
        };
        match self.state {
            State::Admitting => {
                self.end = end;
                self.state = State::Settling;
                self.meter.handle_end(at);
                self.drain_meter(Some(now));
            }
            State::Inviting { .. } => {
                self.end = if end == CallEnd::CallerHungUp { CallEnd::NotAnswered } else { end };
                self.media(MediaAction::Disconnect);
                self.sip(SipAction::Cancel);
                self.state = State::Cancelling;
                self.ring_deadline = None;
                self.meter.handle_end(at);
                self.drain_meter(Some(now));
            }
            State::InCall => {
                self.end = end;
                self.media(MediaAction::Disconnect);
                self.sip(SipAction::Bye);
                self.state = State::Settling;
                self.meter.handle_end(at);
                self.drain_meter(Some(now));
            }
            State::Cancelling | State::Settling | State::Finished => {}
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ring_deadline.is_some_and(|deadline| now >= deadline) {
            self.ring_deadline = None;
            if matches!(self.state, State::Inviting { .. }) {
                self.sip(SipAction::Cancel);
                self.fail_before_answer(now, CallFailure::NoAnswer);
                self.state = State::Cancelling;
            }
        }
        self.meter.handle_timeout(now);
        self.drain_meter(Some(now));
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.ring_deadline, self.meter.poll_timeout()].into_iter().flatten().min()
    }

    pub fn poll_output(&mut self) -> Option<BridgeOutput> {
        self.outputs.pop_front()
    }

    fn invite_failed(&mut self, now: Instant, trunk: usize, rang: bool, code: Option<u16>) {
        if !rang && fails_over(code) && trunk + 1 < self.trunks {
            self.state = State::Inviting { trunk: trunk + 1, rang: false, early_media: false };
            self.sip(SipAction::Invite { trunk: trunk + 1 });
            return;
        }
        let failure = match code {
            Some(code) => CallFailure::from_code(code),
            None => CallFailure::TrunksDown { last_code: None },
        };
        self.fail_before_answer(now, failure);
    }

    /// The call never got answered: refuse the Koe call and release the holds.
    fn fail_before_answer(&mut self, now: Instant, failure: CallFailure) {
        self.end = failure.call_end();
        self.media(MediaAction::Disconnect);
        self.koe(KoeAction::Reject(failure.clone()));
        self.ring_deadline = None;
        self.finish_call(now);
    }

    fn hang_up_koe(&mut self, at: Instant, failure: CallFailure) {
        self.media(MediaAction::Disconnect);
        self.koe(KoeAction::Hangup(failure.clone()));
        self.state = State::Settling;
        self.meter.handle_end(at);
        self.drain_meter(Some(at));
    }

    fn finish_call(&mut self, now: Instant) {
        if self.state == State::Finished {
            return;
        }
        self.state = State::Settling;
        self.meter.handle_end(now);
        self.drain_meter(Some(now));
    }

    /// Turns the meter's outputs into the bridge's.
    fn drain_meter(&mut self, now: Option<Instant>) {
        while let Some(output) = self.meter.poll_output() {
            match output {
                MeterOutput::Ledger(request) => self.outputs.push_back(BridgeOutput::Ledger(request)),
                MeterOutput::Event(event) => self.meter_event(now, event),
            }
        }
    }

    fn meter_event(&mut self, now: Option<Instant>, event: MeterEvent) {
        match event {
            MeterEvent::Admitted { covered_secs } => {
                if self.state == State::Admitting {
                    self.koe(KoeAction::Admitted { covered_secs });
                    if self.trunks == 0 {
                        let failure = CallFailure::TrunksDown { last_code: None };
                        self.end = failure.call_end();
                        self.koe(KoeAction::Reject(failure.clone()));
                        self.state = State::Settling;
                        if let Some(now) = now {
                            self.meter.handle_end(now);
                        }
                        return;
                    }
                    self.state = State::Inviting { trunk: 0, rang: false, early_media: false };
                    self.ring_deadline = now.map(|now| now + RING_TIMEOUT);
                    self.sip(SipAction::Invite { trunk: 0 });
                }
            }
            MeterEvent::Refused(refusal) => {
                if self.state == State::Admitting {
                    let failure = CallFailure::Refused(refusal);
                    self.koe(KoeAction::Reject(failure.clone()));
                    // A refused admission may still settle (releasing a hold whose write
                    // failed ambiguously); otherwise it is finished now.
                    self.state = State::Settling;
                    if self.meter.is_done() {
                        self.finish(CallEnd::NotAnswered);
                    }
                }
            }
            MeterEvent::Warning { secs_left } => {
                self.media(MediaAction::WarningTone);
                self.koe(KoeAction::CreditWarning { secs_left });
            }
            MeterEvent::CutOff => {
                if self.state == State::InCall {
                    self.end = CallEnd::CutOff;
                    self.media(MediaAction::Disconnect);
                    self.sip(SipAction::Bye);
                    self.koe(KoeAction::Hangup(CallFailure::CreditSpent));
                    self.state = State::Settling;
                }
            }
            MeterEvent::Settled { billed_secs, amount } => {
                if billed_secs > 0 {
                    self.koe(KoeAction::Billed { billed_secs, amount });
                }
                let end = self.end;
                self.finish(end);
            }
        }
    }

    fn finish(&mut self, end: CallEnd) {
        if self.state != State::Finished {
            self.state = State::Finished;
            self.outputs.push_back(BridgeOutput::Finished { end });
        }
    }

    fn sip(&mut self, action: SipAction) {
        self.outputs.push_back(BridgeOutput::Sip(action));
    }

    fn koe(&mut self, action: KoeAction) {
        self.outputs.push_back(BridgeOutput::Koe(action));
    }

    fn media(&mut self, action: MediaAction) {
        self.outputs.push_back(BridgeOutput::Media(action));
    }
}
