//! Presence as users see it, with real processes: a `koe up` that stops (Ctrl-C / SIGTERM),
//! is killed, or whose network vanishes (the process frozen: its connection stays open and
//! nothing answers) is offline to other users' lookups within the targets, and a call to it
//! says so at once instead of ringing into nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{fails, network_with, run, stdout, KoeProcess};

/// A client that exits or whose connection closes: offline to lookups within this.
const OFFLINE_AFTER_EXIT: Duration = Duration::from_secs(5);
/// A client whose network vanished without a close: offline within this.
const OFFLINE_AFTER_VANISHING: Duration = Duration::from_secs(60);

fn signal(process: &KoeProcess, name: &str) {
    let status = std::process::Command::new("kill").args([&format!("-{name}"), &process.child.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill -{name}");
}

/// Polls alice's lookup of bob until it says offline; returns how long it took.
fn wait_offline(alice: &std::path::Path, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let output = run(alice, &["lookup", "bob"], "");
        if stdout(&output).contains("bob is offline") {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "bob still shows online after {within:?}: {}", stdout(&output));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn online(alice: &std::path::Path) {
    common::wait_until(Duration::from_secs(10), || stdout(&run(alice, &["lookup", "bob"], "")).contains("1 device(s) online"));
}

#[test]
fn a_client_that_stops_or_is_killed_is_offline_within_seconds() {
    let (_network, _login, _supernodes, homes) = network_with(&["alice", "bob"]);
    let (alice, bob) = (&homes[0], &homes[1]);
    let _alice_up = KoeProcess::up(alice);

    let mut bob_up = KoeProcess::up(bob);
    online(alice);
    signal(&bob_up, "TERM");
    let took = wait_offline(alice, OFFLINE_AFTER_EXIT);
    eprintln!("offline {took:?} after SIGTERM");
    let _ = bob_up.child.wait();
    // A call to someone who left says so at once.
    let started = Instant::now();
    let error = fails(run(alice, &["call", "bob", "--duration", "2s"], ""));
    assert!(error.contains("bob is offline"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "the call took {:?} to fail", started.elapsed());

    let mut bob_up = KoeProcess::up(bob);
    online(alice);
    bob_up.kill();
    let took = wait_offline(alice, OFFLINE_AFTER_EXIT);
    eprintln!("offline {took:?} after SIGKILL");
}

#[test]
fn a_client_whose_network_vanishes_is_offline_within_a_minute() {
    let (_network, _login, _supernodes, homes) = network_with(&["alice", "bob"]);
    let (alice, bob) = (&homes[0], &homes[1]);
    let _alice_up = KoeProcess::up(alice);
    let bob_up = KoeProcess::up(bob);
    online(alice);
    // Frozen: its TCP connection stays open, and neither pings nor requests are answered.
    signal(&bob_up, "STOP");
    let took = wait_offline(alice, OFFLINE_AFTER_VANISHING);
    eprintln!("offline {took:?} after the network vanished");
    signal(&bob_up, "CONT");
}
