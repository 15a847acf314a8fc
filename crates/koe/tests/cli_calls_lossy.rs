//! A call between separate processes through a lossy path: the whole Koe network (login
//! server, supernode, two clients) runs on the loopback of a network namespace of its own
//! whose firewall drops 10 % of all UDP datagrams at random (`iptables -m statistic`), so
//! media, ICE and STUN lose packets while signalling (TCP) does not. Bob's recording must
//! still be alice's speech, with the copies of earlier frames filling the gaps.
//!
//! A network that blocks the clients' UDP (the relay nodes, "out on the internet", still
//! exchange datagrams): the clients say UDP looks blocked, reach the relays over TCP, and the
//! call carries the speech through them.
//!
//! And a network that drops all UDP, relays' too: the call cannot get its media through, and
//! both the reason and the suspicion (UDP blocked) are said, within seconds, not a hang.
//!
//! The tests re-run themselves inside the namespace (`ip netns exec … <this test binary>`),
//! so every process they start there shares that namespace's loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::netns::{self, Namespace};
use common::{ok, run, stdout};
use koe_voice::signal::{best_lag, speechlike};
use koe_voice::SAMPLE_RATE;

const INSIDE: &str = "KOE_TEST_INSIDE_LOSSY_NAMESPACE";
const LOSS: &str = "0.10";

/// Runs the test `inner` of this binary inside a fresh namespace whose firewall drops UDP
/// datagrams as `drop_rule` says.
fn run_inside(what: &str, inner: &str, drop_rule: &[&str]) {
    run_inside_with(what, inner, &[drop_rule]);
}

/// Like [`run_inside`], with several drop rules (a datagram matching any is dropped).
fn run_inside_with(what: &str, inner: &str, drop_rules: &[&[&str]]) {
    let namespace = Namespace::new(what);
    for drop_rule in drop_rules {
        namespace.run(&[&["iptables", "-A", "INPUT", "-p", "udp"], *drop_rule, &["-j", "DROP"]].concat());
    }
    let test_binary = std::env::current_exe().unwrap();
    let output = namespace
        .command(test_binary.to_str().unwrap())
        .args([inner, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    eprintln!("{out}\n{err}");
    assert!(output.status.success(), "{inner} failed");
    assert!(out.contains("1 passed"), "{inner} did not run");
}

#[test]
fn a_call_through_ten_percent_random_loss_still_carries_the_speech() {
    if std::env::var(INSIDE).is_ok() || !netns::available("lossy call") {
        return;
    }
    run_inside("lossy", "the_call_inside_the_lossy_namespace", &["-m", "statistic", "--mode", "random", "--probability", LOSS]);
}

#[test]
fn with_udp_blocked_a_call_ends_with_the_reason_not_a_hang() {
    if std::env::var(INSIDE).is_ok() || !netns::available("call without UDP") {
        return;
    }
    run_inside("noudp", "the_call_inside_the_namespace_without_udp", &[]);
}

#[test]
fn with_the_clients_udp_blocked_a_call_goes_over_tcp_to_relay_nodes() {
    if std::env::var(INSIDE).is_ok() || !netns::available("call over TCP relays") {
        return;
    }
    // Drop every datagram unless it goes from a relay node to a relay node.
    run_inside_with(
        "tcprelay",
        "the_call_inside_the_namespace_where_clients_have_no_udp",
        &[&["!", "-s", common::RELAY_NET], &["!", "-d", common::RELAY_NET]],
    );
}

/// Runs only inside the namespace made by `with_the_clients_udp_blocked_a_call_goes_over_tcp_to_relay_nodes`.
#[test]
fn the_call_inside_the_namespace_where_clients_have_no_udp() {
    if std::env::var(INSIDE).is_err() {
        return;
    }
    let lab = common::alice_and_answering_bob(&[]);
    let speech = speechlike(3);
    let speech_file = common::write_speech(lab.network.dir.path(), "speech.wav", &speech);
    let call = ok(run(&lab.alice, &["call", "bob", "--play", speech_file.to_str().unwrap(), "--duration", "4s"], ""));
    eprintln!("{call}");
    assert!(call.contains("UDP may be blocked on this network; trying relays over TCP"), "{call}");
    assert!(call.contains("talked") && common::relayed_through_test_relay(&call), "{call}");
    let heard = common::recording_when_written(&lab.bob_heard);
    let second = SAMPLE_RATE as usize;
    let (_, similarity) = best_lag(&speech[..second * 4 / 5], &heard, second / 2);
    assert!(similarity > 0.8, "bob heard alice through relays reached over TCP (correlation {similarity:.3})");
}

/// Runs only inside the namespace made by `with_udp_blocked_a_call_ends_with_the_reason_not_a_hang`.
#[test]
fn the_call_inside_the_namespace_without_udp() {
    if std::env::var(INSIDE).is_err() {
        return;
    }
    let lab = common::alice_and_answering_bob(&[]);
    let (alice, bob) = (&lab.alice, &lab.bob);
    let started = std::time::Instant::now();
    let call = ok(run(alice, &["call", "bob", "--duration", "30s"], ""));
    eprintln!("{call}");
    assert!(call.contains("UDP may be blocked on this network"), "{call}");
    assert!(call.contains("ended: the call failed: no network path to the other side was found"), "{call}");
    assert!(call.contains("no audio: the media never connected"), "{call}");
    assert!(started.elapsed() < Duration::from_secs(20), "gave up after {:?}", started.elapsed());
    let bobs = stdout(&run(bob, &["calls"], ""));
    assert!(bobs.contains("call from alice: ") && bobs.contains("no network path to the other side was found"), "{bobs}");
    assert!(!bobs.contains("talked"), "a call whose audio never connected was not talked in: {bobs}");
}

#[test]
fn a_call_through_twenty_percent_random_loss_is_not_dropped() {
    if std::env::var(INSIDE).is_ok() || !netns::available("very lossy call") {
        return;
    }
    run_inside("verylossy", "the_call_inside_the_very_lossy_namespace", &["-m", "statistic", "--mode", "random", "--probability", "0.20"]);
}

/// Runs only inside the namespace made by `a_call_through_ten_percent_random_loss_still_carries_the_speech`.
#[test]
fn the_call_inside_the_lossy_namespace() {
    if std::env::var(INSIDE).is_err() {
        return;
    }
    lossy_call(4.0);
}

/// Runs only inside the namespace made by `a_call_through_twenty_percent_random_loss_is_not_dropped`:
/// every datagram (ICE, DTLS, SRTP, STUN) has a one-in-five chance of being dropped.
#[test]
fn the_call_inside_the_very_lossy_namespace() {
    if std::env::var(INSIDE).is_err() {
        return;
    }
    lossy_call(12.0);
}

/// Alice calls bob for 16 s through the namespace's loss: the call lasts until she hangs up,
/// on the direct path, bob hears her speech, and alice's receiver saw at least
/// `least_lost_percent` of its packets lost on the way and recovered nearly all.
fn lossy_call(least_lost_percent: f64) {
    let lab = common::alice_and_answering_bob(&[]);
    let (alice, bob) = (&lab.alice, &lab.bob);
    let speech = speechlike(16);
    let speech_file = common::write_speech(lab.network.dir.path(), "speech.wav", &speech);
    let recording = &lab.bob_heard;

    let call = ok(run(alice, &["call", "bob", "--play", speech_file.to_str().unwrap(), "--duration", "16s"], ""));
    eprintln!("{call}");
    assert!(call.contains("ended: you hung up"), "the call was not dropped: {call}");
    assert!(call.contains("over direct (host"), "two clients on one loopback talk directly, and say so: {call}");
    let heard = common::recording_when_written(recording);
    if let Ok(keep) = std::env::var("KOE_TEST_KEEP_RECORDING") {
        std::fs::copy(recording, &keep).unwrap();
        std::fs::copy(&speech_file, format!("{keep}.sent.wav")).unwrap();
    }
    let second = SAMPLE_RATE as usize;
    // Lost STUN checks and DTLS flights delay the start of media by a second or more (DTLS
    // retransmits after 1 s, then 2 s, then 4 s), and the call lasts 16 s from the answer.
    assert!(heard.len() >= 6 * second, "bob recorded {} samples", heard.len());
    // Where the speech starts in the recording: bob records from the moment his side of the
    // media connected, alice speaks from the moment hers did, and a lost DTLS flight can put
    // a second or more between the two.
    let probe = &speech[2 * second..2 * second + second / 2];
    let (offset, found) = best_lag(probe, &heard[2 * second..], 4 * second);
    eprintln!("the speech starts {} ms into bob's recording (correlation {found:.3})", offset * 1000 / second as isize);
    // Quarter-second windows from 1.5 s on (the copies follow bob's first loss report), each
    // found within a quarter second of where the speech sits (the jitter buffer moves it).
    let quarter = second / 4;
    let mut similarities = Vec::new();
    for start in (second * 3 / 2..(heard.len() as isize - offset).clamp(0, 7 * second as isize) as usize - second).step_by(quarter) {
        let from = (start as isize + offset - quarter as isize).max(0) as usize;
        let (lag, similarity) = best_lag(&speech[start..start + quarter], &heard[from..], quarter);
        eprintln!("{start}: lag {lag} correlation {similarity:.3}");
        similarities.push(similarity);
    }
    assert!(similarities.len() >= 8, "only {} windows of speech in bob's recording", similarities.len());
    similarities.sort_by(f64::total_cmp);
    eprintln!("correlation of quarter-second windows with the sent speech: {similarities:.3?}");
    assert!(similarities[similarities.len() / 2] > 0.8, "median correlation {:.3}", similarities[similarities.len() / 2]);
    assert!(similarities[0] > 0.5, "worst window {:.3}", similarities[0]);

    // Alice's receiver lost packets on the way too (bob sends silence) and recovered them.
    let received = call.lines().find(|l| l.starts_with("received")).unwrap();
    let percents: Vec<f64> = received.split(" % ").filter_map(|part| part.rsplit(' ').next()?.parse().ok()).collect();
    let (on_the_way, after_recovery) = (percents[0], percents[1]);
    assert!(on_the_way >= least_lost_percent, "the path really lost packets: {received}");
    assert!(after_recovery < 2.0, "copies of earlier frames filled the gaps: {received}");
    let bobs = stdout(&run(bob, &["calls"], ""));
    assert!(bobs.contains("call from alice: talked"), "{bobs}");
}
