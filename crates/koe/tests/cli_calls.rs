//! Calls between separate `koe up` processes on loopback, with users on two supernodes: alice
//! calls bob, whose client answers by itself; each records the other's speech. A client that
//! vanishes mid-call is noticed within seconds. Calling yourself, an
//! unknown user or an offline one gets a clear answer. Carol answers a call by hand, then
//! declines one, then misses one that alice gives up on. The echo test plays back what it heard (and is busy for a second caller); `koe mute` silences the caller in
//! the middle of a call; live statistics are printed during a call; every call is in the
//! call history of both sides.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{fails, network_with, ok, run, stdout, wait_until, write_speech, KoeProcess};
use koe_voice::signal::{best_lag, speechlike};
use koe_voice::{wav, SAMPLE_RATE};

#[test]
fn alice_and_bob_on_different_supernodes_hear_each_other() {
    let (network, _login, _supernodes, homes) = network_with(&["alice", "bob", "carol"]);
    let (alice, bob, carol) = (homes[0].clone(), homes[1].clone(), homes[2].clone());
    let dir = network.dir.path();
    let second = SAMPLE_RATE as usize;
    // Two different voices: alice's, and a later stretch of the same kind of signal for bob.
    let alice_speech = speechlike(3);
    let bob_speech = speechlike(6)[3 * second..].to_vec();
    let (alice_file, bob_file) = (write_speech(dir, "alice.wav", &alice_speech), write_speech(dir, "bob.wav", &bob_speech));
    let (bob_heard, alice_heard) = (dir.join("bob-heard.wav"), dir.join("alice-heard.wav"));
    let mut bob_up = KoeProcess::up_with(&bob, &["--auto-answer", "--play", bob_file.to_str().unwrap(), "--record", bob_heard.to_str().unwrap()]);
    let _alice_up = KoeProcess::up(&alice);
    wait_until(Duration::from_secs(10), || stdout(&run(&alice, &["lookup", "bob"], "")).contains("1 device(s) online"));
    let parent = |home: &Path| stdout(&run(home, &["status"], "")).lines().find(|l| l.contains("parent")).unwrap_or_default().to_string();
    assert_ne!(parent(&alice), parent(&bob), "alice and bob are attached to different supernodes");

    let call = ok(run(&alice, &["call", "bob", "--play", alice_file.to_str().unwrap(), "--record", alice_heard.to_str().unwrap(), "--duration", "4s"], ""));
    for step in ["calling bob", "ringing (", "answered", "talked", "MOS", "ended: you hung up"] {
        assert!(call.contains(step), "{step:?} missing from:\n{call}");
    }
    wait_until(Duration::from_secs(10), || bob_heard.exists());
    std::thread::sleep(Duration::from_millis(300));
    for (who, sent, recording) in [("bob", &alice_speech, &bob_heard), ("alice", &bob_speech, &alice_heard)] {
        let heard = wav::read_mono_48k(recording).unwrap();
        assert!(heard.len() >= 3 * second, "{who} recorded {} samples", heard.len());
        let (lag, similarity) = best_lag(&sent[..second * 4 / 5], &heard, second / 2);
        eprintln!("{who} heard the other side {} ms later (correlation {similarity:.3})", lag * 1000 / second as isize);
        assert!(similarity > 0.8, "{who}'s recording is the other side's speech (correlation {similarity:.3})");
    }

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

    // Alice gives up while carol's client rings (Ctrl-C, or the command is killed): the call
    // is cancelled and carol has missed it.
    let mut ringing = common::koe()
        .arg("--home")
        .arg(&alice)
        .args(["call", "carol"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    ringing.kill().unwrap();
    let _ = ringing.wait();
    wait_until(Duration::from_secs(10), || stdout(&run(&carol, &["calls"], "")).trim_end().ends_with("call from alice: missed"));
    // Alice's side is over too once her history has it (carol's can be written first).
    wait_until(Duration::from_secs(10), || stdout(&run(&alice, &["calls"], "")).lines().count() == 4);
    assert!(fails(run(&carol, &["answer"], "")).contains("no call is ringing"));

    // Bob's client vanishes in the middle of a call: alice's ends within seconds and says why.
    let alice_home = alice.clone();
    let caller = std::thread::spawn(move || run(&alice_home, &["call", "bob", "--duration", "30s"], ""));
    // `koe mute off` succeeds once a call is in progress.
    wait_until(Duration::from_secs(10), || run(&alice, &["mute", "off"], "").status.success() || caller.is_finished());
    assert!(!caller.is_finished(), "the call to bob ended before it began: {:?}", caller.join().unwrap());
    std::thread::sleep(Duration::from_secs(1));
    let vanished = std::time::Instant::now();
    bob_up.kill();
    let call = ok(caller.join().unwrap());
    assert!(call.contains("ended: the call failed: no audio from the other side"), "{call}");
    assert!(vanished.elapsed() < Duration::from_secs(8), "noticed after {:?}", vanished.elapsed());

    let history = ok(run(&carol, &["calls"], ""));
    assert!(history.contains("call from alice: talked") && history.contains("the other side hung up"), "{history}");
    assert!(history.contains("call from alice: declined"), "{history}");
    let history = ok(run(&alice, &["calls"], ""));
    assert!(history.contains("call to bob: talked 4 s over direct (host 127.0.0.1:"), "{history}");
    assert!(history.contains("call to carol: you hung up"), "{history}");
    assert!(history.trim_end().ends_with("the call failed: no audio from the other side for 4 s: it or the network went away"), "{history}");
    assert_eq!(history.lines().count(), 5, "calls that never rang are not history:\n{history}");
}

fn energy(samples: &[f32]) -> f32 {
    samples.iter().map(|s| s * s).sum::<f32>() / samples.len().max(1) as f32
}

#[test]
fn echo_test_mute_live_statistics_and_call_history() {
    let (network, _login, _node, homes) = network_with(&["alice", "bob", "echo123"]);
    let (alice, bob, echo) = (&homes[0], &homes[1], &homes[2]);
    let dir = network.dir.path();
    let second = SAMPLE_RATE as usize;

    // The echo test: a tone, 2 s of listening, a tone, then what it heard.
    let _echo_bot = KoeProcess::daemon(echo, &["echo-bot", "--listen", "2s"]);
    let _alice_up = KoeProcess::up(alice);
    let recording = dir.join("bob-heard.wav");
    let _bob_up = KoeProcess::up_with(bob, &["--auto-answer", "--record", recording.to_str().unwrap()]);
    for home in [alice, bob] {
        wait_until(Duration::from_secs(10), || stdout(&run(home, &["lookup", "echo123"], "")).contains("1 device(s) online"));
    }
    let speech = speechlike(2);
    let mut microphone = vec![0.0; second * 6 / 10];
    microphone.extend_from_slice(&speech[..second * 6 / 5]);
    let microphone = write_speech(dir, "hello-echo.wav", &microphone);
    let heard = dir.join("alice-heard-echo.wav");
    let alice_home = alice.clone();
    let (microphone_path, heard_path) = (microphone.to_str().unwrap().to_string(), heard.to_str().unwrap().to_string());
    let caller = std::thread::spawn(move || run(&alice_home, &["call", "echo123", "--play", &microphone_path, "--record", &heard_path, "--duration", "20s"], ""));
    // While alice talks to it, the echo test is busy for bob.
    std::thread::sleep(Duration::from_millis(1500));
    let busy = ok(run(bob, &["call", "echo123"], ""));
    assert!(busy.contains("ended: busy"), "{busy}");
    let call = ok(caller.join().unwrap());
    assert!(call.contains("ended: the other side hung up"), "the echo test hangs up when done:\n{call}");
    let heard = wav::read_mono_48k(&heard).unwrap();
    assert!(energy(&heard[..second / 2]) > 1e-3, "alice heard the first tone");
    let (lag, similarity) = best_lag(&speech[second / 4..second / 2], &heard[second * 28 / 10 + second / 4..], second);
    eprintln!("alice heard herself back {} ms after 2.8 s (correlation {similarity:.3})", lag * 1000 / second as isize);
    assert!(similarity > 0.7, "alice heard her own speech back (correlation {similarity:.3})");

    // Mute in the middle of a call: bob hears a long silence, then alice again.
    wait_until(Duration::from_secs(10), || stdout(&run(alice, &["lookup", "bob"], "")).contains("1 device(s) online"));
    assert!(fails(run(alice, &["mute"], "")).contains("no call in progress"));
    let speech_file = write_speech(dir, "speech.wav", &speechlike(7));
    let alice_home = alice.clone();
    let caller = std::thread::spawn(move || run(&alice_home, &["call", "bob", "--play", speech_file.to_str().unwrap(), "--duration", "7s"], ""));
    wait_until(Duration::from_secs(10), || run(alice, &["mute"], "").status.success());
    std::thread::sleep(Duration::from_secs(2));
    assert!(ok(run(alice, &["mute", "off"], "")).contains("unmuted"));
    let call = ok(caller.join().unwrap());
    // Every 5 s, the statistics of the last second.
    let live = call.lines().find(|line| line.starts_with("0:0") && line.contains(" direct (host")).unwrap_or_else(|| panic!("no live statistics:\n{call}"));
    assert!(live.contains("round trip") && live.contains("MOS"), "{live}");
    let heard = common::recording_when_written(&recording);
    let tenths: Vec<f32> = heard.chunks(second / 10).map(energy).collect();
    let longest_silence = tenths.split(|&e| e > 1e-5).map(<[f32]>::len).max().unwrap_or(0);
    assert!(longest_silence >= 15, "muted for 2 s, bob heard {longest_silence} tenths of a second of silence at most: {tenths:?}");
    assert!(energy(&heard[heard.len() - 2 * second..]) > 1e-3, "after unmuting bob hears alice again");

    let history = ok(run(alice, &["calls"], ""));
    let lines: Vec<&str> = history.lines().collect();
    assert_eq!(lines.len(), 2, "{history}");
    assert!(lines[0].contains("call to echo123: talked") && lines[0].contains("the other side hung up"), "{history}");
    assert!(lines[1].contains("call to bob: talked 7 s over direct (host") && lines[1].contains("MOS"), "{history}");
    let history = ok(run(bob, &["calls"], ""));
    assert!(history.contains("call to echo123: busy") && history.contains("call from alice: talked"), "{history}");
}

/// Two callers ring an auto-answering user at the same moment: exactly one is answered, the
/// other hears "busy" (the busy check and the taking of the call slot were apart, with awaits
/// between them, so both could pass).
#[test]
fn two_callers_at_once_one_is_answered_and_the_other_hears_busy() {
    let (_network, _login, _supernodes, homes) = network_with(&["alice", "bob", "carol"]);
    let (alice, bob, carol) = (homes[0].clone(), homes[1].clone(), homes[2].clone());
    let _bob_up = KoeProcess::up_with(&bob, &["--auto-answer"]);
    let _alice_up = KoeProcess::up(&alice);
    let _carol_up = KoeProcess::up(&carol);
    for caller in [&alice, &carol] {
        wait_until(Duration::from_secs(10), || stdout(&run(caller, &["lookup", "bob"], "")).contains("1 device(s) online"));
    }
    let start = std::sync::Barrier::new(2);
    let outcomes: Vec<std::process::Output> = std::thread::scope(|scope| {
        let calls: Vec<_> = [&alice, &carol]
            .into_iter()
            .map(|caller| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    run(caller, &["call", "bob", "--duration", "3s"], "")
                })
            })
            .collect();
        calls.into_iter().map(|call| call.join().unwrap()).collect()
    });
    // A busy callee ends the call normally (exit 0) with "ended: busy".
    let answered: Vec<_> = outcomes.iter().filter(|o| o.status.success() && stdout(o).contains("answered")).collect();
    let busy: Vec<_> = outcomes.iter().filter(|o| stdout(o).contains("ended: busy")).collect();
    let show = || outcomes.iter().map(|o| format!("{}{}", stdout(o), common::stderr(o))).collect::<Vec<_>>().join("\n---\n");
    assert_eq!((answered.len(), busy.len()), (1, 1), "exactly one answered and one busy:\n{}", show());
}

/// A call lasts until someone hangs up: not when the file it plays ends (unless asked, and
/// then it says so), and not after 30 s. A recording that cannot be written fails before
/// dialling. A build without sound devices says that it sends silence.
#[test]
fn a_call_lasts_until_someone_hangs_up_and_says_what_it_cannot_do() {
    let setup = common::alice_and_answering_bob(&[]);
    let (alice, dir) = (&setup.alice, setup.network.dir.path());
    let second = SAMPLE_RATE as usize;
    let short = write_speech(dir, "short.wav", &speechlike(1)[..second]);

    let error = fails(run(alice, &["call", "bob", "--record", "/nonexistent/dir/heard.wav"], ""));
    assert!(error.contains("cannot record the call to /nonexistent/dir/heard.wav"), "{error}");
    assert!(!stdout(&run(alice, &["calls"], "")).contains("call to bob"), "nothing was dialled");

    // The file ends after 1 s; the call goes on until alice hangs up.
    let alice_home = alice.clone();
    let short_path = short.to_str().unwrap().to_string();
    let caller = std::thread::spawn(move || run(&alice_home, &["call", "bob", "--play", &short_path], ""));
    wait_until(Duration::from_secs(10), || run(alice, &["mute", "off"], "").status.success());
    std::thread::sleep(Duration::from_secs(3));
    assert!(!caller.is_finished(), "the call ended with its file: {}", stdout(&caller.join().unwrap()));
    ok(run(alice, &["hangup"], ""));
    let call = ok(caller.join().unwrap());
    assert!(call.contains("ended: you hung up"), "{call}");

    let call = ok(run(alice, &["call", "bob", "--play", short.to_str().unwrap(), "--hang-up-when-played"], ""));
    assert!(call.contains("ended: the file ended"), "{call}");

    let call = ok(run(alice, &["call", "bob", "--duration", "1s"], ""));
    assert!(call.lines().next().unwrap_or_default().contains("this build has no sound device support: sending silence"), "{call}");
}
