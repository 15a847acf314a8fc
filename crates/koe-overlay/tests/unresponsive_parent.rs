//! A parent supernode that accepts a client and then swallows every request (a black hole,
//! written for the test): the client notices when its requests time out, attaches to another
//! supernode from its host cache, and its messages get through there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{raw_overlay_swarm, wait_findable, RunningClient, RunningSupernode, TestNetwork};
use futures::StreamExt;
use koe_overlay::client::SendOutcome;
use koe_overlay::protocol::{OverlayRequest, OverlayResponse};
use koe_types::DeviceKey;
use libp2p::multiaddr::Protocol;
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use libp2p::Multiaddr;

/// Answers `Attach` like a supernode, then never answers anything again.
async fn start_black_hole() -> Multiaddr {
    let identity = DeviceKey::generate();
    let mut swarm = raw_overlay_swarm(&identity, Duration::from_secs(3600));
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap()).unwrap();
    let address = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address.with(Protocol::P2p(*swarm.local_peer_id()));
        }
    };
    let own = address.to_string();
    tokio::spawn(async move {
        let mut swallowed = Vec::new();
        loop {
            if let SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Request { request, channel, .. },
                ..
            }) = swarm.select_next_some().await
            {
                match request {
                    OverlayRequest::Attach { .. } => {
                        let answer = OverlayResponse::Attached { parent_addresses: vec![own.clone()], supernodes: vec![] };
                        let _ = swarm.behaviour_mut().send_response(channel, answer);
                    }
                    _ => swallowed.push(channel),
                }
            }
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_that_swallows_requests_is_abandoned() {
    let network = TestNetwork::new();
    let black_hole = start_black_hole().await;
    let honest = RunningSupernode::start(&network, vec![]).await;
    let mut bob = RunningClient::start(&network, "bob", std::slice::from_ref(&honest.address)).await;
    bob.wait_attached(Duration::from_secs(10)).await;

    // Alice tries the black hole first, the honest supernode second.
    let mut alice = RunningClient::start(&network, "alice", &[black_hole.clone(), honest.address.clone()]).await;
    assert_eq!(alice.wait_attached(Duration::from_secs(10)).await, black_hole.to_string());

    let started = Instant::now();
    let outcome = alice.handle.send(bob.username.clone(), b"are you there?".to_vec(), false).await;
    assert_eq!(outcome, SendOutcome::Delivered { devices: 1 }, "delivered through the honest supernode");
    assert_eq!(alice.parent.borrow().clone(), Some(honest.address.to_string()));
    eprintln!("delivered after {:?}, having abandoned the black hole", started.elapsed());
    wait_findable(&bob, &alice, Duration::from_secs(5)).await;
    assert_eq!(bob.received.lock().unwrap().len(), 1);
    drop(alice.parent.changed());
}
