//! Calls through relay nodes between separate processes: every `koe node` runs a relay node
//! beside it and hands its clients short-lived credentials. A client started with
//! `--relay-only` offers only relayed candidates, so its calls (made and taken) go through a
//! relay, the other side hears it, and the path shows in the call's output and the history.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{network_with, ok, run, stdout, wait_until, KoeProcess};
use koe_voice::signal::{best_lag, speechlike};
use koe_voice::{wav, SAMPLE_RATE};

#[test]
fn a_relay_only_client_calls_and_is_called_through_relay_nodes() {
    let (network, _login, _supernodes, homes) = network_with(&["alice", "bob"]);
    let (alice, bob) = (homes[0].clone(), homes[1].clone());
    let dir = network.dir.path();
    let second = SAMPLE_RATE as usize;
    let speech = speechlike(3);
    let speech_file = dir.join("alice.wav");
    wav::write_mono(&speech_file, &speech, SAMPLE_RATE).unwrap();
    let bob_heard = dir.join("bob-heard.wav");
    let _bob_up = KoeProcess::up_with(&bob, &["--auto-answer", "--record", bob_heard.to_str().unwrap()]);
    let _alice_up = KoeProcess::up_with(&alice, &["--relay-only"]);
    wait_until(Duration::from_secs(10), || stdout(&run(&alice, &["lookup", "bob"], "")).contains("1 device(s) online"));

    let call = ok(run(&alice, &["call", "bob", "--play", speech_file.to_str().unwrap(), "--duration", "4s"], ""));
    assert!(call.contains("talked") && call.contains(&format!("over relayed (relay {}:", common::RELAY_IP)), "the call went through a relay:\n{call}");
    wait_until(Duration::from_secs(10), || bob_heard.exists());
    std::thread::sleep(Duration::from_millis(300));
    let heard = wav::read_mono_48k(&bob_heard).unwrap();
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
