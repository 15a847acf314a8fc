//! Calls through relay nodes between separate processes: every `koe node` runs a relay node
//! beside it and hands its clients short-lived credentials. A client started with
//! `--relay-only` offers only relayed candidates, so its calls (made and taken) go through a
//! relay, the other side hears it, and the path shows in the call's output and the history.
//! When the relay node under a call dies with its supernode, the call moves to another relay.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::{alice_and_answering_bob, ok, recording_when_written, run, stdout, wait_until, write_speech, KoeProcess};
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
    assert!(call.contains("talked") && common::relayed_through_test_relay(&call), "the call went through a relay:\n{call}");
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
    assert!(history.contains("call to bob: talked") && common::relayed_through_test_relay(&history), "{history}");
    assert!(history.contains("call from bob: talked"), "{history}");
}

/// The relay node a call goes through dies mid-call, with the supernode it runs beside (the
/// `koe node` process is killed): alice (`--relay-only`) allocated on both supernodes' relays,
/// so the call moves to the other relay, says so, and bob hears her again.
#[test]
fn a_call_moves_to_another_relay_when_the_supernode_and_relay_under_it_die() {
    let (network, _login, mut supernodes, homes) = common::network_with(&["alice", "bob"]);
    let (alice, bob) = (homes[0].clone(), homes[1].clone());
    let bob_heard = network.dir.path().join("bob-heard.wav");
    let _bob_up = KoeProcess::up_with(&bob, &["--auto-answer", "--record", bob_heard.to_str().unwrap()]);
    let _alice_up = KoeProcess::up_with(&alice, &["--relay-only"]);
    wait_until(Duration::from_secs(10), || stdout(&run(&alice, &["lookup", "bob"], "")).contains("1 device(s) online"));
    let second = SAMPLE_RATE as usize;
    let speech = speechlike(14);
    let speech_file = write_speech(network.dir.path(), "alice.wav", &speech);

    let mut call = common::koe()
        .arg("--home")
        .arg(&alice)
        .args(["call", "bob", "--play", speech_file.to_str().unwrap(), "--duration", "13s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The first live statistics (5 s in) name the relay the call goes through: its supernode dies.
    let mut lines = BufReader::new(call.stdout.take().unwrap()).lines().map_while(Result::ok);
    let mut output = String::new();
    let live = lines.by_ref().inspect(|line| output.push_str(&format!("{line}\n"))).find(|line| line.starts_with("0:0")).unwrap_or_else(|| panic!("no live statistics:\n{output}"));
    let dying = common::RELAY_IPS.iter().position(|ip| live.contains(&format!("relayed (relay {ip}:"))).unwrap_or_else(|| panic!("not through a test relay: {live}"));
    supernodes[dying].kill();
    for line in lines {
        output.push_str(&format!("{line}\n"));
    }
    assert!(call.wait().unwrap().success(), "{output}");
    eprintln!("{output}");
    let dead = format!("relay {}:", common::RELAY_IPS[dying]);
    let moved = output.lines().rev().find(|line| line.contains("the call moved from")).unwrap_or_else(|| panic!("the call says it moved:\n{output}"));
    assert!(moved.split(" to ").nth(1).is_some_and(|to| !to.contains(&dead)), "moved off the dead relay: {moved}");
    assert!(output.contains("ended: you hung up"), "alice's call went on to its end:\n{output}");

    // Bob hears alice again after the move (his recording starts when the media connected).
    let heard = recording_when_written(&bob_heard);
    let from = 9 * second;
    let similarity = common::speech_match(&speech[from..], &heard[from.min(heard.len())..]);
    assert!(similarity > 0.8, "bob hears alice after the move (speech match {similarity:.3})");
}
