//! Five supernodes and twenty clients on loopback, with real sockets: everyone finds
//! everyone, chat crosses parents, killing a supernode leaves every client findable again,
//! and a message to an offline user is reported undelivered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{wait_findable, wait_findable_where, RunningClient, RunningSupernode, TestNetwork};
use libp2p::multiaddr::Protocol;
use koe_overlay::client::SendOutcome;
use koe_types::Username;

const SUPERNODES: usize = 5;
const CLIENTS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_clients_on_five_supernodes_find_and_reach_each_other() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let network = TestNetwork::new();
    let mut supernodes = vec![RunningSupernode::start(&network, vec![]).await];
    let first = supernodes[0].address.clone();
    for _ in 1..SUPERNODES {
        supernodes.push(RunningSupernode::start(&network, vec![first.clone()]).await);
    }
    let addresses: Vec<_> = supernodes.iter().map(|s| s.address.clone()).collect();

    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        // Each client starts from a different supernode, so parents differ.
        let mut order = addresses.clone();
        order.rotate_left(i % SUPERNODES);
        clients.push(RunningClient::start(&network, &format!("user{i:02}"), &order[..1]).await);
    }
    let started = std::time::Instant::now();
    for client in &mut clients {
        client.wait_attached(Duration::from_secs(10)).await;
    }
    eprintln!("all attached after {:?}", started.elapsed());
    let started = std::time::Instant::now();
    for (i, from) in clients.iter().enumerate() {
        for (j, to) in clients.iter().enumerate() {
            if i != j {
                wait_findable(from, to, Duration::from_secs(10)).await;
            }
        }
    }

    eprintln!("all lookups done after {:?}", started.elapsed());
    // Chat between clients on different parents, delivered end to end.
    let (alice, bob) = (&clients[0], &clients[1]);
    assert_ne!(alice.parent.borrow().clone(), bob.parent.borrow().clone());
    let outcome = alice.handle.send(bob.username.clone(), b"hello across the overlay".to_vec(), false).await;
    assert_eq!(outcome, SendOutcome::Delivered { devices: 1 });
    {
        let received = bob.received.lock().unwrap();
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].payload, b"hello across the overlay");
        assert_eq!(received[0].sender.username(), &alice.username);
    }

    // One user on two devices: both show up, both get the message.
    let laptop = RunningClient::start(&network, "carol", &addresses[..1]).await;
    let phone = RunningClient::start(&network, "carol", &addresses[3..4]).await;
    for device in [&laptop, &phone] {
        wait_findable(alice, device, Duration::from_secs(10)).await;
    }
    assert_eq!(alice.handle.lookup(laptop.username.clone()).await.unwrap().len(), 2);
    let outcome = alice.handle.send(laptop.username.clone(), b"to every device".to_vec(), false).await;
    assert_eq!(outcome, SendOutcome::Delivered { devices: 2 });
    assert_eq!(laptop.received.lock().unwrap().len(), 1);
    assert_eq!(phone.received.lock().unwrap().len(), 1);

    // A user nobody has seen online.
    let outcome = alice.handle.send(Username::parse("nobody").unwrap(), b"hi".to_vec(), false).await;
    assert_eq!(outcome, SendOutcome::Offline);

    // Kill one supernode: its clients attach elsewhere and are findable again.
    let victim = supernodes[2].address.to_string();
    let orphans: Vec<usize> = (0..CLIENTS)
        .filter(|&i| clients[i].parent.borrow().as_deref() == Some(victim.as_str()))
        .collect();
    assert!(!orphans.is_empty());
    // Orphans need somewhere to go: give them the whole list, as the host cache would hold.
    supernodes[2].kill();
    let Some(Protocol::P2p(victim_peer)) = supernodes[2].address.iter().last() else {
        panic!("supernode address without /p2p")
    };
    let observer = &clients[(orphans[0] + 1) % CLIENTS];
    for &i in &orphans {
        // Findable again means: a record naming a live parent, and a message gets there.
        let elapsed = wait_findable_where(observer, &clients[i], Duration::from_secs(5), |record| {
            record.body().parent.peer_id != victim_peer.to_bytes()
        })
        .await;
        eprintln!("{} findable through a new parent after {elapsed:?}", clients[i].username);
        let outcome = observer.handle.send(clients[i].username.clone(), b"still there?".to_vec(), false).await;
        assert_eq!(outcome, SendOutcome::Delivered { devices: 1 }, "{}", clients[i].username);
    }
    let total_refused: u64 = supernodes.iter().map(|s| s.metrics.refused_total()).sum();
    let refusals: Vec<String> = supernodes
        .iter()
        .flat_map(|s| s.metrics.prometheus().lines().filter(|l| l.starts_with("koe_supernode_refused_total{")).map(str::to_string).collect::<Vec<_>>())
        .collect();
    assert_eq!(total_refused, 0, "honest traffic is never refused: {refusals:?}");
}
