//! Calls through relay nodes between separate processes: every `koe node` runs a relay node
//! beside it and hands its clients short-lived credentials. A client started with
//! `--relay-only` offers only relayed candidates, so its calls (made and taken) go through a
//! relay, the other side hears it, and the path shows in the call's output and the history.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{alice_and_answering_bob, ok, recording_when_written, run, stdout, wait_until, write_speech};
use koe_voice::signal::{best_lag, speechlike};
use koe_voice::SAMPLE_RATE;

#[test]
fn a_relay_only_client_calls_and_is_called_through_relay_nodes() {
    let lab = alice_and_answering_bob(&["--relay-only"]);
    let (alice, bob) = (lab.alice.clone(), lab.bob.clone());
    let second = SAMPLE_RATE as usize;
    let speech = speechlike(3);
    let speech_file = write_speech(lab.network.dir.path(), "alice.wav", &speech);

    let call = ok(run(&alice, &["call", "bob", "--play", speech_file.to_str().unwrap(), "--duration", "4s"], ""));
    assert!(call.contains("talked") && call.contains(&format!("over relayed (relay {}:", common::RELAY_IP)), "the call went through a relay:\n{call}");
    let heard = recording_when_written(&lab.bob_heard);
    let (_, similarity) = best_lag(&speech[..second * 4 / 5], &heard, second / 2);
    assert!(similarity > 0.8, "bob heard alice through the relay (correlation {similarity:.3})");

    // Taking a call: bob calls alice, whose client answers by hand; still relayed.
    let bob_home = bob.clone();
    let caller = std::thread::spawn(move || run(&bob_home, &["call", "alice", "--duration", "2s"], ""));
    let mut answered = String::new();
    wait_until(Duration::from_secs(10), || {
        let output = run(&alice, &["answer"], "");
        answered = stdout(&output);
        output.status.success()
    });
    ok(caller.join().unwrap());
    assert!(answered.contains("over relayed ("), "the answered call went through a relay:\n{answered}");

    let history = ok(run(&alice, &["calls"], ""));
    assert!(history.contains("call to bob: talked") && history.contains(&format!("over relayed (relay {}:", common::RELAY_IP)), "{history}");
    assert!(history.contains("call from bob: talked"), "{history}");
}
