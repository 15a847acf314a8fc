//! Offline messages on loopback: a message for a user with no device online is kept, sealed,
//! by the supernodes responsible for them, and reaches each of their devices once when it comes
//! online, then goes from the mailbox. A message that may not wait (a call signal) says
//! offline instead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{eventually, RunningClient, RunningSupernode, TestNetwork};
use koe_overlay::client::SendOutcome;
use koe_overlay::PresenceStatus;
use koe_types::DeviceKey;

const HELLO: &[u8] = b"while you were out";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_left_for_an_offline_user_reaches_each_device_once() {
    let network = TestNetwork::new();
    let first = RunningSupernode::start(&network, vec![]).await;
    let second = RunningSupernode::start(&network, vec![first.address.clone()]).await;
    eventually("the supernodes connect", Duration::from_secs(10), || first.supernodes() >= 1 && second.supernodes() >= 1).await;
    let (laptop, phone) = (DeviceKey::generate(), DeviceKey::generate());
    let online = Some(PresenceStatus::Online);

    // bob's two devices come online once (publishing their device records), then leave.
    let stored = || [&first, &second].iter().map(|s| s.metrics.device_records_stored.load(std::sync::atomic::Ordering::Relaxed)).sum::<u64>();
    for (published, device) in [&laptop, &phone].into_iter().enumerate() {
        let mut bob = RunningClient::start_device(&network, "bob", std::slice::from_ref(&second.address), device.clone(), online).await;
        bob.wait_attached(Duration::from_secs(10)).await;
        // On both supernodes (the parent and the other replica).
        eventually("the device record is kept", Duration::from_secs(10), || stored() >= 2 * (published as u64 + 1)).await;
        bob.stop();
    }
    let mut alice = RunningClient::start(&network, "alice", std::slice::from_ref(&first.address)).await;
    alice.wait_attached(Duration::from_secs(10)).await;
    let mut outcome = SendOutcome::Offline;
    // Until bob's withdrawals have spread, a send may still find a device "online".
    for _ in 0..50 {
        outcome = alice.handle.send(alice_target(), HELLO.to_vec(), true).await;
        if matches!(outcome, SendOutcome::Kept { .. }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(outcome, SendOutcome::Kept { replicas } if replicas >= 2), "{outcome:?}");
    assert_eq!(alice.handle.send(alice_target(), b"ring".to_vec(), false).await, SendOutcome::Offline, "a call signal does not wait");
    assert!(first.metrics.offline_messages_held.load(std::sync::atomic::Ordering::Relaxed) >= 1);

    // The laptop comes back: the message arrives once, and goes from the laptop's mailbox.
    let mut bob = RunningClient::start_device(&network, "bob", std::slice::from_ref(&first.address), laptop.clone(), online).await;
    bob.wait_attached(Duration::from_secs(10)).await;
    let took = eventually("the laptop gets the message", Duration::from_secs(10), || !bob.received.lock().unwrap().is_empty()).await;
    eprintln!("delivered {took:?} after the laptop attached");
    {
        let received = bob.received.lock().unwrap();
        assert_eq!(received[0].payload, HELLO);
        assert_eq!(received[0].sender.username().as_str(), "alice");
    }
    // The phone, still offline, has its own copy waiting; then it comes back too.
    let mut bob_phone = RunningClient::start_device(&network, "bob", std::slice::from_ref(&second.address), phone.clone(), online).await;
    bob_phone.wait_attached(Duration::from_secs(10)).await;
    eventually("the phone gets the message", Duration::from_secs(10), || !bob_phone.received.lock().unwrap().is_empty()).await;
    // Every device took it: the replicas let it go.
    eventually("the mailboxes empty", Duration::from_secs(10), || {
        [&first, &second].iter().all(|s| s.metrics.offline_messages_held.load(std::sync::atomic::Ordering::Relaxed) == 0)
    })
    .await;
    bob.stop();
    let mut bob = RunningClient::start_device(&network, "bob", std::slice::from_ref(&first.address), laptop, online).await;
    bob.wait_attached(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(bob.received.lock().unwrap().is_empty(), "a message taken is not delivered again");
}

fn alice_target() -> koe_types::Username {
    koe_types::Username::parse("bob").unwrap()
}
