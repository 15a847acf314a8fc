//! Offline messages with real processes: a chat, a contact request and a missed call for a
//! user who is offline wait for them (the sender goes offline too), arrive when they come
//! online, and the sender's history turns "delivered"; messages survive the supernode under
//! them dying, and every supernode restarting; a blocked user's messages never arrive and
//! never fill the mailbox; a sender over the quota is told.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{fails, network_with, ok, run, stdout, wait_until, KoeProcess, RELAY_IPS};

fn offline(from: &Path, user: &str) {
    wait_until(Duration::from_secs(10), || stdout(&run(from, &["lookup", user], "")).contains(&format!("{user} is offline")));
}

fn online(from: &Path, user: &str) {
    wait_until(Duration::from_secs(10), || stdout(&run(from, &["lookup", user], "")).contains("device(s) online"));
}

/// Brings `home`'s client up, lets it publish its device record, and stops it.
fn online_once(home: &Path, watcher: &Path, user: &str) {
    let _up = KoeProcess::up(home);
    online(watcher, user);
    ok(run(home, &["down"], ""));
    offline(watcher, user);
}

/// Polls `koe messages` of `home` until it contains `text`; returns how long it took.
fn wait_for_message(home: &Path, text: &str) -> Duration {
    let started = Instant::now();
    wait_until(Duration::from_secs(20), || stdout(&run(home, &["messages"], "")).contains(text));
    started.elapsed()
}

#[test]
fn what_was_sent_to_someone_offline_waits_and_both_histories_agree() {
    let (_network, _login, _supernodes, homes) = network_with(&["alice", "bob"]);
    let (alice, bob) = (&homes[0], &homes[1]);
    let mut alice_up = KoeProcess::up(alice);
    online_once(bob, alice, "bob");

    let said = ok(run(alice, &["chat", "bob", "left while you were away"], ""));
    assert!(said.contains("bob is offline: it waits for them"), "{said}");
    assert!(ok(run(alice, &["messages", "bob"], "")).contains("left while you were away [waiting]"));
    assert!(ok(run(alice, &["contacts", "add", "bob"], "")).contains("bob is offline: it waits for them"));
    assert!(fails(run(alice, &["call", "bob", "--duration", "1s"], "")).contains("bob is offline"));
    // The sender goes offline too.
    ok(run(alice, &["down"], ""));
    let _ = alice_up.child.wait();

    let started = Instant::now();
    let _bob_up = KoeProcess::up(bob);
    let took = wait_for_message(bob, "alice → bob: left while you were away");
    eprintln!("the message arrived {:?} after bob's koe up started ({took:?} after he was online)", started.elapsed());
    assert!(ok(run(bob, &["contacts", "list"], "")).contains("wants to be your contact"));
    wait_until(Duration::from_secs(10), || stdout(&run(bob, &["calls"], "")).contains("call from alice: missed (you were offline)"));

    // alice back: bob's receipt waited for her; her history now says delivered.
    let _alice_up = KoeProcess::up(alice);
    wait_until(Duration::from_secs(20), || stdout(&run(alice, &["messages", "bob"], "")).contains("left while you were away [delivered]"));
    // Exactly one copy on each side.
    assert_eq!(ok(run(bob, &["messages", "alice"], "")).matches("left while you were away").count(), 1);
}

#[test]
fn offline_messages_survive_a_dying_supernode_and_every_supernode_restarting() {
    let (network, _login, mut supernodes, homes) = network_with(&["alice", "bob"]);
    let (alice, bob) = (&homes[0], &homes[1]);
    let port = |node: &KoeProcess| node.first_line.split("/tcp/").nth(1).and_then(|rest| rest.split('/').next()).unwrap().parse::<u16>().unwrap();
    let ports = [port(&supernodes[0]), port(&supernodes[1])];
    let _alice_up = KoeProcess::up(alice);
    online_once(bob, alice, "bob");

    ok(run(alice, &["chat", "bob", "kept by two"], ""));
    // The first supernode dies; the other one still has the message.
    supernodes[0].kill();
    {
        let _bob_up = KoeProcess::up(bob);
        wait_for_message(bob, "kept by two");
        ok(run(bob, &["down"], ""));
    }
    offline(alice, "bob");
    ok(run(alice, &["chat", "bob", "kept across restarts"], ""));
    // Every supernode restarts (same identity and address): the message was on disk.
    supernodes[1].kill();
    let net = network.network_file();
    supernodes[0] = KoeProcess::node_at(&network.home("supernode1"), &net, RELAY_IPS[0], ports[0]);
    supernodes[1] = KoeProcess::node_at(&network.home("supernode2"), &net, RELAY_IPS[1], ports[1]);
    let _bob_up = KoeProcess::up(bob);
    wait_for_message(bob, "kept across restarts");
}

#[test]
fn a_blocked_user_never_reaches_you_and_a_sender_over_the_quota_is_told() {
    let (_network, _login, _supernodes, homes) = network_with(&["alice", "bob", "carol"]);
    let (alice, bob, carol) = (&homes[0], &homes[1], &homes[2]);
    let _alice_up = KoeProcess::up(alice);
    let _carol_up = KoeProcess::up(carol);
    let _bob_up = KoeProcess::up(bob);
    online(carol, "bob");
    assert!(ok(run(bob, &["block", "carol"], "")).contains("blocked carol"));
    assert!(ok(run(bob, &["blocked"], "")).contains("carol"));
    let error = fails(run(carol, &["chat", "bob", "let me in"], ""));
    assert!(error.contains("not delivered to bob: not accepted"), "{error}");
    // Nor do their calls: bob's client never rings, and the call ends unanswered.
    let call = run(carol, &["call", "bob", "--duration", "1s"], "");
    assert!(!stdout(&call).contains("answered") && !stdout(&call).contains("ringing"), "{}", stdout(&call));
    assert!(!ok(run(bob, &["calls"], "")).contains("carol"), "a blocked caller is in bob's history");
    ok(run(bob, &["down"], ""));
    offline(carol, "bob");
    let error = fails(run(carol, &["chat", "bob", "let me in later"], ""));
    assert!(error.contains("they do not take messages from you"), "{error}");

    // One sender may leave 25 messages for a user; the 26th is refused, and alice is told.
    for n in 0..25 {
        let said = ok(run(alice, &["chat", "bob", &format!("message {n}")], ""));
        assert!(said.contains("waits for them"), "{said}");
    }
    let error = fails(run(alice, &["chat", "bob", "one too many"], ""));
    assert!(error.contains("as many messages as one sender may"), "{error}");
    assert!(ok(run(alice, &["messages", "bob"], "")).contains("one too many [undelivered]"));

    let _bob_up = KoeProcess::up(bob);
    wait_for_message(bob, "alice → bob: message 24");
    let history = ok(run(bob, &["messages"], ""));
    assert!(!history.contains("let me in"), "a blocked user's message arrived:\n{history}");
    assert_eq!(history.matches("alice → bob: message").count(), 25, "{history}");
}
