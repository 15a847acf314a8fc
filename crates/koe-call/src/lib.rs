//! Call signalling, sans-IO: the messages two devices exchange inside sealed envelopes to set
//! a call up and tear it down, and the state machine of one call on one device.
//!
//! The envelopes already carry the sender's certificate and signature, are encrypted to the
//! recipient device and replay-protected, so a [`CallSignal`] (and the DTLS fingerprint in its
//! [`MediaDescription`]) is bound to the caller's certificate. A caller's offer goes to every
//! online device of the callee; they all ring; the first to answer wins and the caller tells
//! the others ([`CallSignal::Taken`]), which stop ringing.
//!
//! A call to a phone number goes to a PSTN gateway the same way: the offer names the number
//! ([`CallSignal::Offer`]'s `dial`), the gateway declines with the reason in words when the
//! number cannot be called, and tells the caller what the call costs with
//! [`CallSignal::Notice`] lines (which the caller's daemon accepts only from a certificate with
//! the gateway role).
//!
//! The driver feeds in signals and the clock, and carries out [`CallOutput`]s: sending a
//! signal to the other user, and events for the person.

use std::time::{Duration, Instant};

use koe_media::MediaDescription;
use serde::{Deserialize, Serialize};

/// How long a call rings before it is given up (and recorded as missed).
pub const RING_TIMEOUT: Duration = Duration::from_secs(45);
/// How long a caller waits for the first sign of life (ringing, busy, decline) from any device.
pub const NO_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Offers older than this (by the caller's clock) are not rung: they are stale or replayed.
pub const OFFER_MAX_AGE_SECS: u64 = 60;

/// Identifies one call; chosen at random by the caller. Travels as 32 hex digits (JSON
/// numbers cannot hold 128 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(pub u128);

impl Serialize for CallId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{:032x}", self.0))
    }
}

impl<'de> Deserialize<'de> for CallId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.len() != 32 {
            return Err(serde::de::Error::custom("a call id is 32 hex digits"));
        }
        u128::from_str_radix(&text, 16).map(Self).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for CallId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}", (self.0 >> 96) as u32)
    }
}

/// A device, by the hex of its public key (as in presence records and envelopes).
pub type DeviceName = String;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CallSignal {
    /// Caller → every device of the callee. `dial`: the E.164 number a gateway should call.
    Offer {
        call: CallId,
        media: MediaDescription,
        sent_at_unix: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dial: Option<String>,
    },
    /// A callee device is ringing.
    Ringing { call: CallId, device: DeviceName },
    Answer { call: CallId, device: DeviceName, media: MediaDescription },
    /// `reason`: why, in words, when it is not the person's choice (a gateway: "no such
    /// number", "not enough credit …").
    Decline {
        call: CallId,
        device: DeviceName,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The device is in another call.
    Busy { call: CallId, device: DeviceName },
    /// Caller → callee: gave up before an answer.
    Cancel { call: CallId },
    /// Caller → every device of the callee: `device` answered; the others stop ringing.
    Taken { call: CallId, device: DeviceName },
    /// Either side ends an answered call.
    Hangup { call: CallId, reason: String },
    /// Callee → caller: a line for the person, at any time, even just after the end (a
    /// gateway's price, its warning that the credit runs out, the bill).
    Notice { call: CallId, text: String },
    /// Caller → callee in an answered call: key presses for a gateway to play to the phone
    /// (RFC 4733), so the caller can use an IVR menu.
    Dtmf { call: CallId, digits: String },
}

impl CallSignal {
    pub fn call(&self) -> CallId {
        match self {
            Self::Offer { call, .. }
            | Self::Ringing { call, .. }
            | Self::Answer { call, .. }
            | Self::Decline { call, .. }
            | Self::Busy { call, .. }
            | Self::Cancel { call }
            | Self::Taken { call, .. }
            | Self::Hangup { call, .. }
            | Self::Notice { call, .. }
            | Self::Dtmf { call, .. } => *call,
        }
    }
}

/// Why a call ended, as the person is told and the history records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// This side hung up (or cancelled before an answer).
    HungUp,
    /// The other side hung up.
    RemoteHungUp { reason: String },
    Declined,
    /// The callee refused for a reason it gave (a gateway that cannot call the number).
    Refused { reason: String },
    Busy,
    /// Nobody answered in time (caller side).
    NoAnswer,
    /// Rang and was not answered (callee side).
    Missed,
    /// Another device of this user answered.
    AnsweredElsewhere,
    /// The other side never replied at all.
    Unreachable,
    /// The media path failed or vanished.
    Failed { reason: String },
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::HungUp => f.write_str("you hung up"),
            Self::RemoteHungUp { reason } if reason.is_empty() => f.write_str("the other side hung up"),
            Self::RemoteHungUp { reason } => write!(f, "the other side hung up: {reason}"),
            Self::Declined => f.write_str("declined"),
            Self::Refused { reason } => f.write_str(reason),
            Self::Busy => f.write_str("busy"),
            Self::NoAnswer => f.write_str("no answer"),
            Self::Missed => f.write_str("missed"),
            Self::AnsweredElsewhere => f.write_str("answered on another device"),
            Self::Unreachable => f.write_str("no reply from the other side"),
            Self::Failed { reason } => write!(f, "the call failed: {reason}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEvent {
    /// Callee side: someone is calling.
    Incoming,
    /// Caller side: the first callee device rings.
    Ringing,
    /// The call is answered; start media with the other side's description.
    Answered { device: DeviceName, remote_media: MediaDescription },
    /// The callee said something for the person ([`CallSignal::Notice`]).
    Notice(String),
    /// The caller pressed keys ([`CallSignal::Dtmf`]).
    Dtmf(String),
    Ended(EndReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutput {
    /// Send this to the other user (all of their devices).
    Send(CallSignal),
    Event(CallEvent),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Caller,
    Callee,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Caller: offer sent to `devices` devices.
    Dialing { ringing: bool },
    /// Callee: ringing here.
    Ringing,
    InCall { device: DeviceName },
    Ended(EndReason),
}

/// One call on one device.
#[derive(Debug)]
pub struct Call {
    id: CallId,
    role: Role,
    me: DeviceName,
    state: State,
    started: Instant,
    /// Caller: the devices the offer reached, and those that declined or were busy.
    devices: usize,
    declined: Vec<DeviceName>,
    /// A reason a declining device gave (the last one).
    refused_because: Option<String>,
    busy: Vec<DeviceName>,
    outputs: Vec<CallOutput>,
}

impl Call {
    /// Places a call whose offer reached `devices` devices of the callee.
    pub fn dial(id: CallId, me: DeviceName, media: MediaDescription, devices: usize, now: Instant, now_unix: u64) -> Self {
        Self::dial_number(id, me, media, devices, None, now, now_unix)
    }

    /// Places a call, through a gateway when `dial` names a phone number (E.164).
    pub fn dial_number(
        id: CallId,
        me: DeviceName,
        media: MediaDescription,
        devices: usize,
        dial: Option<String>,
        now: Instant,
        now_unix: u64,
    ) -> Self {
        let mut call = Self::new(id, Role::Caller, me, State::Dialing { ringing: false }, now);
        call.devices = devices.max(1);
        call.outputs.push(CallOutput::Send(CallSignal::Offer { call: id, media, sent_at_unix: now_unix, dial }));
        call
    }

    /// An offer arrived. `busy`: this device is in another call already.
    pub fn incoming(offer: &CallSignal, me: DeviceName, busy: bool, now: Instant, now_unix: u64) -> Option<Self> {
        let CallSignal::Offer { call, sent_at_unix, .. } = offer else {
            return None;
        };
        if now_unix.saturating_sub(*sent_at_unix) > OFFER_MAX_AGE_SECS {
            return None; // stale or replayed: never rings
        }
        let mut this = Self::new(*call, Role::Callee, me.clone(), State::Ringing, now);
        if busy {
            this.outputs.push(CallOutput::Send(CallSignal::Busy { call: *call, device: me }));
            this.end(EndReason::Busy);
        } else {
            this.outputs.push(CallOutput::Send(CallSignal::Ringing { call: *call, device: me }));
            this.outputs.push(CallOutput::Event(CallEvent::Incoming));
        }
        Some(this)
    }

    fn new(id: CallId, role: Role, me: DeviceName, state: State, now: Instant) -> Self {
        Self {
            id,
            role,
            me,
            state,
            started: now,
            devices: 1,
            declined: Vec::new(),
            refused_because: None,
            busy: Vec::new(),
            outputs: Vec::new(),
        }
    }

    pub fn id(&self) -> CallId {
        self.id
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn is_over(&self) -> bool {
        matches!(self.state, State::Ended(_))
    }

    pub fn ended(&self) -> Option<&EndReason> {
        match &self.state {
            State::Ended(reason) => Some(reason),
            _ => None,
        }
    }

    /// What to do now; drains.
    pub fn poll_output(&mut self) -> Option<CallOutput> {
        if self.outputs.is_empty() {
            None
        } else {
            Some(self.outputs.remove(0))
        }
    }

    fn end(&mut self, reason: EndReason) {
        if !self.is_over() {
            self.state = State::Ended(reason.clone());
            self.outputs.push(CallOutput::Event(CallEvent::Ended(reason)));
        }
    }

    fn send(&mut self, signal: CallSignal) {
        self.outputs.push(CallOutput::Send(signal));
    }

    /// A signal from the other user for this call.
    pub fn handle_signal(&mut self, signal: CallSignal) {
        if signal.call() != self.id {
            return;
        }
        // A notice counts even just after the end: the bill comes once the call is over.
        if let (Role::Caller, CallSignal::Notice { text, .. }) = (self.role, &signal) {
            self.outputs.push(CallOutput::Event(CallEvent::Notice(text.clone())));
            return;
        }
        if self.is_over() {
            return;
        }
        match (self.role, &self.state, signal) {
            (Role::Caller, State::Dialing { ringing: false }, CallSignal::Ringing { .. }) => {
                self.state = State::Dialing { ringing: true };
                self.outputs.push(CallOutput::Event(CallEvent::Ringing));
            }
            (Role::Caller, State::Dialing { .. }, CallSignal::Answer { device, media, .. }) => {
                self.state = State::InCall { device: device.clone() };
                self.send(CallSignal::Taken { call: self.id, device: device.clone() });
                self.outputs.push(CallOutput::Event(CallEvent::Answered { device, remote_media: media }));
            }
            (Role::Caller, State::Dialing { .. }, CallSignal::Decline { device, reason, .. }) => {
                if !self.declined.contains(&device) {
                    self.declined.push(device);
                }
                if reason.is_some() {
                    self.refused_because = reason;
                }
                self.end_if_everyone_refused();
            }
            (Role::Caller, State::Dialing { .. }, CallSignal::Busy { device, .. }) => {
                if !self.busy.contains(&device) {
                    self.busy.push(device);
                }
                self.end_if_everyone_refused();
            }
            (Role::Callee, State::Ringing, CallSignal::Cancel { .. }) => self.end(EndReason::Missed),
            (Role::Callee, State::Ringing | State::InCall { .. }, CallSignal::Taken { device, .. }) if device != self.me => {
                self.end(EndReason::AnsweredElsewhere);
            }
            (_, State::InCall { .. }, CallSignal::Hangup { reason, .. }) => self.end(EndReason::RemoteHungUp { reason }),
            (Role::Callee, State::InCall { .. }, CallSignal::Dtmf { digits, .. }) => {
                self.outputs.push(CallOutput::Event(CallEvent::Dtmf(digits)));
            }
            // Late or duplicate answers, ringing after the answer, and everything else that
            // no longer matters.
            _ => {}
        }
    }

    fn end_if_everyone_refused(&mut self) {
        if self.declined.len() + self.busy.len() >= self.devices {
            let reason = match (&self.refused_because, self.declined.is_empty()) {
                (_, true) => EndReason::Busy,
                (Some(reason), false) => EndReason::Refused { reason: reason.clone() },
                (None, false) => EndReason::Declined,
            };
            self.end(reason);
        }
    }

    /// Callee: answer here with this device's media description.
    pub fn answer(&mut self, media: MediaDescription) -> Result<(), &'static str> {
        if self.role != Role::Callee || self.state != State::Ringing {
            return Err("there is no ringing call to answer");
        }
        self.state = State::InCall { device: self.me.clone() };
        self.send(CallSignal::Answer { call: self.id, device: self.me.clone(), media });
        Ok(())
    }

    /// Callee: decline while ringing.
    pub fn decline(&mut self) -> Result<(), &'static str> {
        self.decline_because(None)
    }

    /// Callee: decline while ringing, saying why when it is not the person's choice.
    pub fn decline_because(&mut self, reason: Option<String>) -> Result<(), &'static str> {
        if self.role != Role::Callee || self.state != State::Ringing {
            return Err("there is no ringing call to decline");
        }
        self.send(CallSignal::Decline { call: self.id, device: self.me.clone(), reason: reason.clone() });
        self.end(reason.map_or(EndReason::Declined, |reason| EndReason::Refused { reason }));
        Ok(())
    }

    /// Callee: the caller busy, for a reason that is not this device's other call (a
    /// gateway whose number was busy).
    pub fn busy(&mut self) -> Result<(), &'static str> {
        if self.role != Role::Callee || self.state != State::Ringing {
            return Err("there is no ringing call to refuse as busy");
        }
        self.send(CallSignal::Busy { call: self.id, device: self.me.clone() });
        self.end(EndReason::Busy);
        Ok(())
    }

    /// Caller: key presses for the other side (a gateway plays them to the phone).
    pub fn send_dtmf(&mut self, digits: impl Into<String>) -> Result<(), &'static str> {
        if self.role != Role::Caller || !matches!(self.state, State::InCall { .. }) {
            return Err("there is no answered call to send key presses in");
        }
        self.send(CallSignal::Dtmf { call: self.id, digits: digits.into() });
        Ok(())
    }

    /// Callee: a line for the caller (see [`CallSignal::Notice`]); also after the end.
    pub fn notify(&mut self, text: impl Into<String>) {
        if self.role == Role::Callee {
            self.send(CallSignal::Notice { call: self.id, text: text.into() });
        }
    }

    /// Either side: hang up (a caller still dialing cancels).
    pub fn hang_up(&mut self) {
        match (&self.state, self.role) {
            (State::Dialing { .. }, _) => {
                self.send(CallSignal::Cancel { call: self.id });
                self.end(EndReason::HungUp);
            }
            (State::InCall { .. }, _) => {
                self.send(CallSignal::Hangup { call: self.id, reason: String::new() });
                self.end(EndReason::HungUp);
            }
            (State::Ringing, Role::Callee) => {
                let _ = self.decline();
            }
            _ => {}
        }
    }

    /// The media path failed or the other side vanished: end and tell them why.
    pub fn media_failed(&mut self, reason: &str) {
        if matches!(self.state, State::InCall { .. }) {
            self.send(CallSignal::Hangup { call: self.id, reason: reason.to_string() });
            self.end(EndReason::Failed { reason: reason.to_string() });
        }
    }

    /// The next instant [`Self::handle_timeout`] must run, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Dialing { ringing: false } => Some(self.started + NO_REPLY_TIMEOUT),
            State::Dialing { ringing: true } => Some(self.started + RING_TIMEOUT),
            // The callee gives up a little after the caller would have.
            State::Ringing => Some(self.started + RING_TIMEOUT + Duration::from_secs(5)),
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_none_or(|at| now < at) {
            return;
        }
        match self.state {
            State::Dialing { ringing } => {
                self.send(CallSignal::Cancel { call: self.id });
                self.end(if ringing { EndReason::NoAnswer } else { EndReason::Unreachable });
            }
            State::Ringing => self.end(EndReason::Missed),
            _ => {}
        }
    }
}

/// Both users called each other at once: which call survives. The one with the smaller id;
/// the other is cancelled and the surviving one is answered at once, since both sides
/// plainly want to talk.
pub fn glare_survivor(mine: CallId, theirs: CallId) -> CallId {
    mine.min(theirs)
}
