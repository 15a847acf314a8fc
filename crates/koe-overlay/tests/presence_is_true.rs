//! Presence tells the truth: a client that goes (its connection closes) is offline to lookups
//! within moments, through the withdrawal it handed its parent in advance, and an invisible
//! client never shows online, not even for a moment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{eventually, wait_findable, RunningClient, RunningSupernode, TestNetwork};
use koe_overlay::PresenceStatus;

/// The target a user expects: offline to lookups within 5 s of the connection closing.
const OFFLINE_WITHIN: Duration = Duration::from_secs(5);

async fn two_supernodes(network: &TestNetwork) -> (RunningSupernode, RunningSupernode) {
    let first = RunningSupernode::start(network, vec![]).await;
    let second = RunningSupernode::start(network, vec![first.address.clone()]).await;
    eventually("the supernodes connect", Duration::from_secs(10), || first.supernodes() >= 1 && second.supernodes() >= 1).await;
    (first, second)
}

/// Polls `from`'s lookup of `target` until no device of it is online.
async fn wait_offline(from: &RunningClient, target: &RunningClient, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if from.handle.lookup(target.username.clone()).await.is_ok_and(|records| records.is_empty()) {
            return started.elapsed();
        }
        assert!(started.elapsed() < timeout, "{} still shows online after {timeout:?}", target.username);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_connection_closes_is_offline_at_once() {
    let network = TestNetwork::new();
    let (first, second) = two_supernodes(&network).await;
    let mut alice = RunningClient::start(&network, "alice", std::slice::from_ref(&first.address)).await;
    let mut bob = RunningClient::start(&network, "bob", std::slice::from_ref(&second.address)).await;
    alice.wait_attached(Duration::from_secs(10)).await;
    bob.wait_attached(Duration::from_secs(10)).await;
    wait_findable(&alice, &bob, Duration::from_secs(10)).await;
    // Killed: the task and its sockets go at once, nothing is sent first.
    bob.stop();
    let took = wait_offline(&alice, &bob, OFFLINE_WITHIN).await;
    eprintln!("bob offline to alice {took:?} after his client went");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invisible_client_never_shows_online() {
    let network = TestNetwork::new();
    let (first, second) = two_supernodes(&network).await;
    let mut alice = RunningClient::start(&network, "alice", std::slice::from_ref(&first.address)).await;
    alice.wait_attached(Duration::from_secs(10)).await;
    let mut bob = RunningClient::start_with_status(&network, "bob", std::slice::from_ref(&second.address), None).await;
    bob.wait_attached(Duration::from_secs(10)).await;
    // A client starting invisible publishes its withdrawal only: nothing to find, ever.
    let watch_for = |bob: &RunningClient, alice: &RunningClient, how_long: Duration| {
        let (username, lookup) = (bob.username.clone(), alice.handle.clone());
        async move {
            let until = Instant::now() + how_long;
            while Instant::now() < until {
                let records = lookup.lookup(username.clone()).await.unwrap();
                assert!(records.is_empty(), "an invisible user showed online: {records:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    watch_for(&bob, &alice, Duration::from_secs(3)).await;

    // Online, then invisible again: offline at once, and it stays so (the old "invisible"
    // was an online record that lived 2 s).
    bob.handle.set_status(Some(PresenceStatus::Online)).await.unwrap();
    wait_findable(&alice, &bob, Duration::from_secs(5)).await;
    bob.handle.set_status(None).await.unwrap();
    wait_offline(&alice, &bob, Duration::from_secs(1)).await;
    watch_for(&bob, &alice, Duration::from_secs(3)).await;
}
