//! Calls between separate `koe up` processes on loopback: alice calls bob, whose client
//! answers by itself and records; bob's recording is alice's speech. Calling yourself, an
//! unknown user or an offline one gets a clear answer. Carol answers a call by hand, then
//! declines one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{fails, ok, run, stdout, wait_until, KoeProcess, TestNetwork};
use koe_voice::signal::{best_lag, speechlike};
use koe_voice::{wav, SAMPLE_RATE};

#[test]
fn alice_calls_bob_who_answers_and_records_her_speech() {
    let network = TestNetwork::init();
    let _login = network.serve();
    let net = network.network_file();
    let node = KoeProcess::node(&network.home("supernode"), &net);
    ok(common::koe().args(["network", "add-bootstrap", "--network"]).arg(&net).arg(&node.first_line).output().unwrap());
    let (alice, bob, carol) = (network.home("alice"), network.home("bob"), network.home("carol"));
    for (home, name) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        ok(run(home, &["signup", name, "--network", net.to_str().unwrap(), "--password-stdin"], "a good password\n"));
    }
    let speech = speechlike(3);
    let speech_file = network.dir.path().join("speech.wav");
    wav::write_mono(&speech_file, &speech, SAMPLE_RATE).unwrap();
    let recording = network.dir.path().join("bob-heard.wav");
    let _bob_up = KoeProcess::up_with(&bob, &["--auto-answer", "--record", recording.to_str().unwrap()]);
    let _alice_up = KoeProcess::up(&alice);
    wait_until(Duration::from_secs(10), || stdout(&run(&alice, &["lookup", "bob"], "")).contains("1 device(s) online"));

    let call = ok(run(&alice, &["call", "bob", "--play", speech_file.to_str().unwrap(), "--duration", "4s"], ""));
    for step in ["calling bob", "ringing", "answered", "talked", "MOS", "ended: you hung up"] {
        assert!(call.contains(step), "{step:?} missing from:\n{call}");
    }
    wait_until(Duration::from_secs(10), || recording.exists());
    std::thread::sleep(Duration::from_millis(300));
    let heard = wav::read_mono_48k(&recording).unwrap();
    assert!(heard.len() >= 3 * SAMPLE_RATE as usize, "bob recorded {} samples", heard.len());
    let window = SAMPLE_RATE as usize * 4 / 5;
    let (lag, similarity) = best_lag(&speech[..window], &heard, SAMPLE_RATE as usize / 2);
    eprintln!("{call}\nbob heard alice's speech {} ms later (correlation {similarity:.3})", lag * 1000 / SAMPLE_RATE as isize);
    assert!(similarity > 0.8, "bob's recording is alice's speech (correlation {similarity:.3})");

    assert!(fails(run(&alice, &["call", "alice"], "")).contains("cannot call yourself"));
    assert!(fails(run(&alice, &["call", "nobody"], "")).contains("no such user"));
    assert!(fails(run(&alice, &["call", "carol"], "")).contains("carol is offline"));
    assert!(fails(run(&alice, &["hangup"], "")).contains("no call to hang up"));
    assert!(fails(run(&bob, &["answer"], "")).contains("no call is ringing"));

    // Carol answers by hand, then declines the next call.
    let _carol_up = KoeProcess::up(&carol);
    wait_until(Duration::from_secs(10), || stdout(&run(&alice, &["lookup", "carol"], "")).contains("1 device(s) online"));
    let carol_heard = network.dir.path().join("carol-heard.wav");
    let alice_home = alice.clone();
    let caller = std::thread::spawn(move || run(&alice_home, &["call", "carol", "--duration", "2s"], ""));
    let mut answered = String::new();
    wait_until(Duration::from_secs(10), || {
        let output = run(&carol, &["answer", "--record", carol_heard.to_str().unwrap()], "");
        answered = stdout(&output);
        output.status.success()
    });
    let call = ok(caller.join().unwrap());
    assert!(call.contains("answered") && call.contains("ended: you hung up"), "{call}");
    assert!(answered.contains("call from alice") && answered.contains("the other side hung up"), "{answered}");
    assert!(carol_heard.exists());

    let alice_home = alice.clone();
    let caller = std::thread::spawn(move || run(&alice_home, &["call", "carol"], ""));
    wait_until(Duration::from_secs(10), || run(&carol, &["decline"], "").status.success());
    let call = ok(caller.join().unwrap());
    assert!(call.contains("ended: declined"), "{call}");
}
