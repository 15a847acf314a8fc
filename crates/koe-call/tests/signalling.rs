//! Every signalling branch, deterministically: a caller and the callee's devices exchange
//! signals through a tiny in-memory router (the caller's signals reach every callee device,
//! theirs reach the caller), with a virtual clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use koe_call::{glare_survivor, Call, CallEvent, CallId, CallOutput, CallSignal, EndReason, RING_TIMEOUT};
use koe_media::MediaDescription;

const NOW_UNIX: u64 = 1_800_000_000;

fn media(tag: &str) -> MediaDescription {
    MediaDescription {
        ice_ufrag: tag.into(),
        ice_pwd: "a-password-of-24-chars!!".into(),
        dtls_fingerprint: "sha-256 00".into(),
        candidates: vec![],
        ssrc: 1,
        nat: Default::default(),
    }
}

struct World {
    now: Instant,
    caller: Call,
    callees: Vec<Option<Call>>,
    caller_events: Vec<CallEvent>,
    callee_events: Vec<Vec<CallEvent>>,
    /// Callee devices in another call already.
    busy: Vec<bool>,
}

impl World {
    /// Alice dials bob, whose `devices` devices are online.
    fn dial(devices: usize) -> Self {
        Self::dial_with_busy(vec![false; devices])
    }

    fn dial_with_busy(busy: Vec<bool>) -> Self {
        let now = Instant::now();
        let caller = Call::dial(CallId(42), "alice-laptop".into(), media("alice"), busy.len(), now, NOW_UNIX);
        let mut world = Self {
            now,
            caller,
            callees: (0..busy.len()).map(|_| None).collect(),
            caller_events: Vec::new(),
            callee_events: vec![Vec::new(); busy.len()],
            busy,
        };
        world.settle();
        world
    }

    fn device(i: usize) -> String {
        format!("bob-{i}")
    }

    /// Delivers every pending signal until nothing moves.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            while let Some(output) = self.caller.poll_output() {
                moved = true;
                match output {
                    CallOutput::Event(event) => self.caller_events.push(event),
                    CallOutput::Send(signal) => {
                        for i in 0..self.callees.len() {
                            match &mut self.callees[i] {
                                Some(call) => call.handle_signal(signal.clone()),
                                None => {
                                    self.callees[i] =
                                        Call::incoming(&signal, Self::device(i), self.busy[i], self.now, NOW_UNIX);
                                }
                            }
                        }
                    }
                }
            }
            for i in 0..self.callees.len() {
                let Some(call) = &mut self.callees[i] else { continue };
                while let Some(output) = call.poll_output() {
                    moved = true;
                    match output {
                        CallOutput::Event(event) => self.callee_events[i].push(event),
                        CallOutput::Send(signal) => self.caller.handle_signal(signal),
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.caller.handle_timeout(self.now);
        for call in self.callees.iter_mut().flatten() {
            call.handle_timeout(self.now);
        }
        self.settle();
    }

    fn callee(&mut self, i: usize) -> &mut Call {
        self.callees[i].as_mut().expect("the offer reached this device")
    }
}

#[test]
fn all_devices_ring_and_the_first_answer_wins() {
    let mut world = World::dial(2);
    assert_eq!(world.caller_events, [CallEvent::Ringing], "one ringing event however many devices ring");
    assert_eq!(world.callee_events, [vec![CallEvent::Incoming], vec![CallEvent::Incoming]]);
    world.callee(1).answer(media("bob-1")).unwrap();
    world.settle();
    assert!(matches!(&world.caller_events[1], CallEvent::Answered { device, remote_media } if device == "bob-1" && remote_media.ice_ufrag == "bob-1"));
    assert_eq!(world.callee_events[0].last(), Some(&CallEvent::Ended(EndReason::AnsweredElsewhere)));
    assert!(!world.callee(1).is_over(), "the answering device is in the call");
    // The other device can no longer answer.
    assert!(world.callee(0).answer(media("bob-0")).is_err());
    // Hang-up from the caller ends it on the answering device.
    world.caller.hang_up();
    world.settle();
    assert_eq!(world.caller.ended(), Some(&EndReason::HungUp));
    assert_eq!(world.callee(1).ended(), Some(&EndReason::RemoteHungUp { reason: String::new() }));
}

#[test]
fn two_devices_answering_at_once_leave_one_call() {
    let mut world = World::dial(2);
    world.callee(0).answer(media("bob-0")).unwrap();
    world.callee(1).answer(media("bob-1")).unwrap();
    world.settle();
    let answered: Vec<_> = world.caller_events.iter().filter(|e| matches!(e, CallEvent::Answered { .. })).collect();
    assert_eq!(answered.len(), 1, "the caller takes the first answer only");
    let ended: Vec<bool> = (0..2).map(|i| world.callee(i).is_over()).collect();
    assert_eq!(ended.iter().filter(|&&e| e).count(), 1, "the other device stops: {ended:?}");
}

#[test]
fn declined_by_every_device_ends_as_declined_and_busy_as_busy() {
    let mut world = World::dial(2);
    world.callee(0).decline().unwrap();
    world.settle();
    assert!(!world.caller.is_over(), "the other device still rings");
    world.callee(1).decline().unwrap();
    world.settle();
    assert_eq!(world.caller.ended(), Some(&EndReason::Declined));

    let mut world = World::dial_with_busy(vec![true]);
    assert_eq!(world.caller.ended(), Some(&EndReason::Busy));
    assert_eq!(world.callee(0).ended(), Some(&EndReason::Busy));

    let mut world = World::dial_with_busy(vec![true, false]);
    assert!(!world.caller.is_over(), "one device busy, the other rings");
    world.callee(1).decline().unwrap();
    world.settle();
    assert_eq!(world.caller.ended(), Some(&EndReason::Declined));
}

#[test]
fn cancel_while_ringing_is_a_missed_call_and_unanswered_calls_time_out() {
    let mut world = World::dial(1);
    world.caller.hang_up();
    world.settle();
    assert_eq!(world.caller.ended(), Some(&EndReason::HungUp));
    assert_eq!(world.callee(0).ended(), Some(&EndReason::Missed));

    let mut world = World::dial(1);
    world.advance(RING_TIMEOUT - Duration::from_secs(1));
    assert!(!world.caller.is_over());
    world.advance(Duration::from_secs(2));
    assert_eq!(world.caller.ended(), Some(&EndReason::NoAnswer));
    assert_eq!(world.callee(0).ended(), Some(&EndReason::Missed), "the caller's cancel reached it");
}

#[test]
fn a_callee_that_never_replies_is_unreachable_and_stale_offers_never_ring() {
    let now = Instant::now();
    let mut call = Call::dial(CallId(7), "alice".into(), media("a"), 1, now, NOW_UNIX);
    while call.poll_output().is_some() {}
    call.handle_timeout(now + Duration::from_secs(11));
    assert_eq!(call.ended(), Some(&EndReason::Unreachable));
    assert_eq!(call.poll_output(), Some(CallOutput::Send(CallSignal::Cancel { call: CallId(7) })));

    let offer = CallSignal::Offer { call: CallId(8), media: media("a"), sent_at_unix: NOW_UNIX - 3600, dial: None };
    assert!(Call::incoming(&offer, "bob".into(), false, now, NOW_UNIX).is_none(), "an hour-old (replayed) offer");
    let not_an_offer = CallSignal::Cancel { call: CallId(8) };
    assert!(Call::incoming(&not_an_offer, "bob".into(), false, now, NOW_UNIX).is_none());
}

#[test]
fn a_vanished_peer_ends_the_call_with_the_reason_and_strangers_signals_are_ignored() {
    let mut world = World::dial(1);
    world.callee(0).answer(media("bob-0")).unwrap();
    world.settle();
    // A signal for another call changes nothing.
    world.caller.handle_signal(CallSignal::Hangup { call: CallId(999), reason: "forged".into() });
    assert!(!world.caller.is_over());
    world.callee(0).media_failed("no audio from the other side for 4 s");
    world.settle();
    assert_eq!(world.callee(0).ended(), Some(&EndReason::Failed { reason: "no audio from the other side for 4 s".into() }));
    assert_eq!(
        world.caller.ended(),
        Some(&EndReason::RemoteHungUp { reason: "no audio from the other side for 4 s".into() })
    );
}

#[test]
fn signals_round_trip_as_json_and_glare_keeps_one_call() {
    let signal = CallSignal::Answer { call: CallId(u128::MAX), device: "d".into(), media: media("x") };
    let text = serde_json::to_string(&signal).unwrap();
    assert_eq!(serde_json::from_str::<CallSignal>(&text).unwrap(), signal);
    assert!(text.contains(r#""call":"ffffffffffffffffffffffffffffffff""#), "{text}");
    assert!(serde_json::from_str::<CallSignal>(r#"{"type":"cancel","call":"12"}"#).is_err(), "short ids are refused");
    assert!(serde_json::from_str::<CallSignal>(r#"{"type":"cancel","call":"zz"}"#).is_err());
    let id = r#""0000000000000000000000000000002a""#;
    assert!(serde_json::from_str::<CallSignal>(&format!(r#"{{"type":"offer","call":{id}}}"#)).is_err(), "missing fields are refused");
    assert_eq!(glare_survivor(CallId(5), CallId(9)), CallId(5));
    assert_eq!(glare_survivor(CallId(9), CallId(5)), CallId(5), "both sides pick the same call");
}

#[test]
fn a_gateway_declines_with_its_reason_and_its_notices_reach_the_caller_even_after_the_end() {
    let mut world = World::dial(1);
    world.callee(0).notify("Japan fixed: ¥3.60 a minute");
    world.callee(0).decline_because(Some("no such number".into())).unwrap();
    world.settle();
    assert_eq!(world.caller.ended(), Some(&EndReason::Refused { reason: "no such number".into() }));
    assert_eq!(world.caller.ended().map(ToString::to_string).as_deref(), Some("no such number"));
    world.callee(0).notify("credit left: ¥96.40");
    world.settle();
    let notices: Vec<&CallEvent> = world.caller_events.iter().filter(|e| matches!(e, CallEvent::Notice(_))).collect();
    assert_eq!(
        notices,
        [&CallEvent::Notice("Japan fixed: ¥3.60 a minute".into()), &CallEvent::Notice("credit left: ¥96.40".into())]
    );
}

#[test]
fn a_gateway_reports_a_busy_number_as_busy_and_offers_carry_the_number() {
    let now = Instant::now();
    let mut caller = Call::dial_number(CallId(9), "alice".into(), media("a"), 1, Some("+81312345678".into()), now, NOW_UNIX);
    let Some(CallOutput::Send(offer)) = caller.poll_output() else { panic!("an offer") };
    assert!(matches!(&offer, CallSignal::Offer { dial: Some(number), .. } if number == "+81312345678"));
    let text = serde_json::to_string(&offer).unwrap();
    assert_eq!(serde_json::from_str::<CallSignal>(&text).unwrap(), offer);
    // An offer from a Koe without numbers still reads, as a call to a person.
    let old = r#"{"type":"offer","call":"00000000000000000000000000000009","media":{"ice_ufrag":"a","ice_pwd":"p","dtls_fingerprint":"f","candidates":[],"ssrc":1},"sent_at_unix":1800000000}"#;
    assert!(matches!(serde_json::from_str::<CallSignal>(old), Ok(CallSignal::Offer { dial: None, .. })));
    let mut gateway = Call::incoming(&offer, "gw".into(), false, now, NOW_UNIX).unwrap();
    while let Some(CallOutput::Send(signal)) = gateway.poll_output() {
        caller.handle_signal(signal);
    }
    gateway.busy().unwrap();
    while let Some(output) = gateway.poll_output() {
        if let CallOutput::Send(signal) = output {
            caller.handle_signal(signal);
        }
    }
    assert_eq!(caller.ended(), Some(&EndReason::Busy));
}

#[test]
fn key_presses_reach_the_callee_of_an_answered_call_only() {
    let mut world = World::dial(1);
    assert!(world.caller.send_dtmf("1#").is_err(), "not before the answer");
    world.callee(0).answer(media("gw")).unwrap();
    world.settle();
    world.caller.send_dtmf("1#").unwrap();
    world.settle();
    assert_eq!(world.callee_events[0].last(), Some(&CallEvent::Dtmf("1#".into())));
    assert!(world.callee(0).send_dtmf("2").is_err(), "only the caller presses keys for the phone");
}
