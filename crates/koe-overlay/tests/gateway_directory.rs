//! Clients find the PSTN gateways through the global index: every online gateway is listed
//! under the reserved name "pstn" (the gateway directory), found by an ordinary lookup from
//! any supernode, withdrawn from it when its connection closes like from its own name, and a
//! user is never listed there, whatever a peer sends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{eventually, wait_findable, MisbehavingPeer, RunningClient, RunningSupernode, TestNetwork};
use koe_overlay::protocol::{OverlayRequest, OverlayResponse};
use koe_overlay::{
    gateway_directory, ParentSupernode, PresenceBody, PresenceRecord, PresenceStatus, GATEWAY_DIRECTORY,
};
use koe_types::{DeviceKey, Role, UnixTime};
use koe_wire::Codec;

const FOUND_WITHIN: Duration = Duration::from_secs(10);
/// As for a user (`presence_is_true.rs`): gone from lookups within 5 s of the connection closing.
const OFFLINE_WITHIN: Duration = Duration::from_secs(5);

/// `count` supernodes, the others bootstrapped from the first, all connected to each other.
async fn supernodes(network: &TestNetwork, count: usize) -> Vec<RunningSupernode> {
    let first = RunningSupernode::start(network, vec![]).await;
    let bootstrap = vec![first.address.clone()];
    let mut nodes = vec![first];
    for _ in 1..count {
        nodes.push(RunningSupernode::start(network, bootstrap.clone()).await);
    }
    let others = count as u64 - 1;
    eventually("the supernodes connect", Duration::from_secs(10), || nodes.iter().all(|n| n.supernodes() >= others)).await;
    nodes
}

async fn attached(mut client: RunningClient) -> RunningClient {
    client.wait_attached(Duration::from_secs(10)).await;
    client
}

fn lists(records: &[PresenceRecord], client: &RunningClient) -> bool {
    records.iter().any(|r| r.body().certificate.device_key() == &client.device.public_key())
}

/// Polls `from`'s lookup of the directory until every one of `gateways` is listed; returns
/// the last answer.
async fn wait_listed(from: &RunningClient, gateways: &[&RunningClient], timeout: Duration) -> Vec<PresenceRecord> {
    let started = Instant::now();
    loop {
        if let Ok(records) = from.handle.lookup(gateway_directory()).await {
            if gateways.iter().all(|gateway| lists(&records, gateway)) {
                eprintln!("{} gateway(s) listed to {} after {:?}", gateways.len(), from.username, started.elapsed());
                return records;
            }
        }
        assert!(started.elapsed() < timeout, "the directory did not list every gateway to {} within {timeout:?}", from.username);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls a supernode's own share of the directory (a `Fetch`, answered from its index alone)
/// until a record of `gateway`'s device satisfies `accept`.
async fn wait_held(peer: &mut MisbehavingPeer, gateway: &RunningClient, accept: impl Fn(&PresenceRecord) -> bool) {
    let started = Instant::now();
    loop {
        let held = fetch_directory(peer).await;
        if held.iter().any(|r| r.body().certificate.device_key() == &gateway.device.public_key() && accept(r)) {
            return;
        }
        assert!(started.elapsed() < FOUND_WITHIN, "the supernode does not hold {}'s record under the directory: {held:?}", gateway.username);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fetch_directory(peer: &mut MisbehavingPeer) -> Vec<PresenceRecord> {
    match peer.ask(OverlayRequest::Fetch { username: GATEWAY_DIRECTORY.into() }).await {
        OverlayResponse::Presence { records } => records.iter().map(|r| PresenceRecord::from_bytes(&r.0).unwrap()).collect(),
        other => panic!("expected presence, got {other:?}"),
    }
}

fn refused(response: OverlayResponse) -> String {
    match response {
        OverlayResponse::Refused { reason } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A presence record signed by `device`, for a certificate with `role`.
fn signed_record(network: &TestNetwork, name: &str, device: &DeviceKey, role: Role) -> PresenceRecord {
    PresenceBody {
        certificate: network.certificate_with_role(name, device, role),
        status: PresenceStatus::Online,
        envelope_key: [1; 32],
        parent: ParentSupernode { peer_id: vec![0, 1], addresses: vec![] },
        sequence: 1,
        expires_at: UnixTime::now().saturating_add(Duration::from_secs(60)),
    }
    .sign(device)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_is_found_under_the_directory_from_another_supernode() {
    let network = TestNetwork::new();
    let nodes = supernodes(&network, 2).await;
    let gateway = attached(RunningClient::start_gateway(&network, "gw-eu", std::slice::from_ref(&nodes[0].address)).await).await;
    let alice = attached(RunningClient::start(&network, "alice", std::slice::from_ref(&nodes[1].address)).await).await;

    let listed = wait_listed(&alice, &[&gateway], FOUND_WITHIN).await;
    let record = listed.iter().find(|r| lists(std::slice::from_ref(r), &gateway)).unwrap();
    assert_eq!(record.username(), &gateway.username, "listed as itself");
    assert_eq!(record.body().certificate.role(), Role::Gateway);
    // Still found under its own name.
    wait_findable(&alice, &gateway, FOUND_WITHIN).await;
    // The gateway's parent spread the listing: the other supernode holds it in its own index.
    let mut peer = MisbehavingPeer::connect(&DeviceKey::generate(), &nodes[1].address).await;
    wait_held(&mut peer, &gateway, PresenceRecord::is_online).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_is_never_listed_under_the_directory_whatever_a_peer_sends() {
    let network = TestNetwork::new();
    let nodes = supernodes(&network, 2).await;
    let gateway = attached(RunningClient::start_gateway(&network, "gw-eu", std::slice::from_ref(&nodes[0].address)).await).await;
    let alice = attached(RunningClient::start(&network, "alice", std::slice::from_ref(&nodes[0].address)).await).await;
    let bob = attached(RunningClient::start(&network, "bob", std::slice::from_ref(&nodes[1].address)).await).await;
    wait_findable(&bob, &alice, FOUND_WITHIN).await;
    let listed = wait_listed(&bob, &[&gateway], FOUND_WITHIN).await;
    assert!(!lists(&listed, &alice), "a user published as usual is not listed");

    // A peer sends Stores for the directory straight to the other supernode.
    let metrics = &nodes[1].metrics;
    let mut mallory = MisbehavingPeer::connect(&DeviceKey::generate(), &nodes[1].address).await;
    let store = |record: &PresenceRecord, under: Option<&str>| OverlayRequest::Store { record: record.to_bytes(), under: under.map(Into::into) };
    // alice's own, honestly signed record, under the directory.
    let alices = signed_record(&network, "alice", &alice.device, Role::User);
    let reason = refused(mallory.ask(store(&alices, Some(GATEWAY_DIRECTORY))).await);
    assert!(reason.contains("only gateways"), "{reason}");
    assert_eq!(metrics.refused_count("presence", "not_a_gateway"), 1);
    // A user certificate named after the directory, under its own name.
    let impostor = DeviceKey::generate();
    let named_pstn = signed_record(&network, GATEWAY_DIRECTORY, &impostor, Role::User);
    refused(mallory.ask(store(&named_pstn, None)).await);
    assert_eq!(metrics.refused_count("presence", "not_a_gateway"), 2);
    // Under someone else's name, or under what is no name at all.
    refused(mallory.ask(store(&alices, Some("bob"))).await);
    assert_eq!(metrics.refused_count("presence", "foreign_key"), 1);
    refused(mallory.ask(store(&alices, Some("no such key!"))).await);
    assert_eq!(metrics.refused_count("presence", "malformed"), 1);

    let held = fetch_directory(&mut mallory).await;
    assert!(held.iter().all(|r| r.body().certificate.role() == Role::Gateway), "a user is held under the directory: {held:?}");
    assert!(!lists(&held, &alice));
    // Whoever sends it, a gateway's record is taken: the role is what counts.
    let another_gateway = DeviceKey::generate();
    let gateways = signed_record(&network, "gw-us", &another_gateway, Role::Gateway);
    assert!(matches!(mallory.ask(store(&gateways, Some(GATEWAY_DIRECTORY))).await, OverlayResponse::Stored));

    let listed = wait_listed(&bob, &[&gateway], FOUND_WITHIN).await;
    assert!(listed.iter().all(|r| r.body().certificate.role() == Role::Gateway), "a user is listed: {listed:?}");
    assert!(listed.iter().any(|r| r.body().certificate.device_key() == &another_gateway.public_key()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_connection_closes_leaves_the_directory() {
    let network = TestNetwork::new();
    let nodes = supernodes(&network, 2).await;
    let gateway = attached(RunningClient::start_gateway(&network, "gw-eu", std::slice::from_ref(&nodes[0].address)).await).await;
    let alice = attached(RunningClient::start(&network, "alice", std::slice::from_ref(&nodes[1].address)).await).await;
    wait_listed(&alice, &[&gateway], FOUND_WITHIN).await;
    wait_findable(&alice, &gateway, FOUND_WITHIN).await;

    // Killed: the task and its sockets go at once, nothing is sent first.
    gateway.stop();
    let started = Instant::now();
    loop {
        let listed = alice.handle.lookup(gateway_directory()).await.unwrap();
        let found = alice.handle.lookup(gateway.username.clone()).await.unwrap();
        if !lists(&listed, &gateway) && !lists(&found, &gateway) {
            break;
        }
        assert!(started.elapsed() < OFFLINE_WITHIN, "the gateway still shows online after {OFFLINE_WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("the gateway left the directory {:?} after its client went", started.elapsed());
    // Its withdrawal was spread under the directory too, not only kept by its parent.
    let mut peer = MisbehavingPeer::connect(&DeviceKey::generate(), &nodes[1].address).await;
    wait_held(&mut peer, &gateway, |r| !r.is_online()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_different_supernodes_are_both_listed() {
    let network = TestNetwork::new();
    let nodes = supernodes(&network, 3).await;
    // One named after the directory itself (its own key is the directory), one not.
    let pstn = attached(RunningClient::start_gateway(&network, GATEWAY_DIRECTORY, std::slice::from_ref(&nodes[0].address)).await).await;
    let us = attached(RunningClient::start_gateway(&network, "gw-us", std::slice::from_ref(&nodes[1].address)).await).await;
    let alice = attached(RunningClient::start(&network, "alice", std::slice::from_ref(&nodes[2].address)).await).await;
    let listed = wait_listed(&alice, &[&pstn, &us], FOUND_WITHIN).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    wait_findable(&alice, &us, FOUND_WITHIN).await;
}
