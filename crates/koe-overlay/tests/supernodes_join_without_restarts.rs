//! Supernodes started apart, in any order, form one overlay without restarts: when told of
//! another at run time (the network file changed), when a client that knows both attaches,
//! and when a bootstrap supernode that was down comes up. Users on either then find each other.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{eventually, wait_findable, RunningClient, RunningSupernode, TestNetwork};
use koe_overlay::supernode::BOOTSTRAP_RETRY_INTERVAL;
use koe_types::DeviceKey;

/// Both supernodes see each other; then a user on each finds the other.
async fn one_overlay(network: &TestNetwork, first: &RunningSupernode, second: &RunningSupernode) {
    let joined = eventually("the supernodes connect", Duration::from_secs(10), || first.supernodes() >= 1 && second.supernodes() >= 1).await;
    eprintln!("one overlay after {joined:?}");
    let mut alice = RunningClient::start(network, "alice", std::slice::from_ref(&first.address)).await;
    let mut bob = RunningClient::start(network, "bob", std::slice::from_ref(&second.address)).await;
    alice.wait_attached(Duration::from_secs(10)).await;
    bob.wait_attached(Duration::from_secs(10)).await;
    wait_findable(&alice, &bob, Duration::from_secs(10)).await;
    wait_findable(&bob, &alice, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supernode_told_of_another_at_run_time_joins_it() {
    let network = TestNetwork::new();
    let first = RunningSupernode::start(&network, vec![]).await;
    let second = RunningSupernode::start(&network, vec![]).await;
    assert!(first.metrics.summary().starts_with("ALONE"), "{}", first.metrics.summary());
    // What `koe node` does when `koe network add-bootstrap` adds to its network file.
    first.handle.learn(vec![first.address.clone(), second.address.clone()]);
    one_overlay(&network, &first, &second).await;
    assert!(first.metrics.summary().starts_with("supernodes 1 | clients 1"), "{}", first.metrics.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_knows_two_lone_supernodes_introduces_them() {
    let network = TestNetwork::new();
    let first = RunningSupernode::start(&network, vec![]).await;
    let second = RunningSupernode::start(&network, vec![]).await;
    // Carol's host cache lists both; she attaches to the first and tells it of the second.
    let mut carol = RunningClient::start(&network, "carol", &[first.address.clone(), second.address.clone()]).await;
    carol.wait_attached(Duration::from_secs(10)).await;
    one_overlay(&network, &first, &second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_supernode_that_was_down_is_dialled_again() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let network = TestNetwork::new();
    let identity = DeviceKey::generate();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen: libp2p::Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
    let peer = libp2p::identity::Keypair::ed25519_from_bytes(identity.seed()).unwrap().public().to_peer_id();
    let later_address = listen.clone().with(libp2p::multiaddr::Protocol::P2p(peer));
    // The first supernode's bootstrap list names one that is not running yet.
    let first = RunningSupernode::start(&network, vec![later_address]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = RunningSupernode::start_as(&network, &identity, listen, vec![]).await;
    let joined = eventually("the retried bootstrap supernode joins", BOOTSTRAP_RETRY_INTERVAL * 3, || first.supernodes() >= 1).await;
    eprintln!("joined {joined:?} after the bootstrap supernode came up");
    one_overlay(&network, &first, &second).await;
}
