//! A misbehaving peer written for the test speaks the overlay protocol to a real supernode:
//! forged, foreign, expired, oversized, replayed and garbage presence records, attachments
//! with someone else's certificate, garbage envelopes and raw garbage on the listener. Each is
//! refused with a reason and counted, and the supernode keeps serving honest requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{MisbehavingPeer, RunningSupernode, TestNetwork};
use koe_overlay::protocol::{ByteString, OverlayRequest, OverlayResponse};
use koe_overlay::{ParentSupernode, PresenceBody, PresenceRecord, PresenceStatus};
use koe_types::{DeviceKey, UnixTime};
use koe_wire::Codec;
use libp2p::multiaddr::Protocol;
use libp2p::PeerId;
use tokio::io::AsyncWriteExt;

fn refused(response: OverlayResponse) -> String {
    match response {
        OverlayResponse::Refused { reason } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn record(network: &TestNetwork, name: &str, device: &DeviceKey, sequence: u64, lifetime: i64) -> PresenceBody {
    let now = UnixTime::now();
    PresenceBody {
        certificate: network.certificate(name, device),
        status: PresenceStatus::Online,
        envelope_key: [1; 32],
        parent: ParentSupernode { peer_id: vec![0, 1], addresses: vec![] },
        sequence,
        expires_at: UnixTime((now.as_secs() as i64 + lifetime) as u64),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_presence_records_are_refused_and_counted() {
    let network = TestNetwork::new();
    let supernode = RunningSupernode::start(&network, vec![]).await;
    let mut peer = MisbehavingPeer::connect(&DeviceKey::generate(), &supernode.address).await;
    let metrics = &supernode.metrics;
    let alice = DeviceKey::generate();

    let forged = record(&network, "alice", &alice, 1, 60).sign(&DeviceKey::generate());
    assert!(refused(peer.ask(OverlayRequest::Store { record: forged.to_bytes(), under: None }).await).contains("not signed"));
    assert_eq!(metrics.refused_count("presence", "forged"), 1);

    let elsewhere = TestNetwork::new();
    let foreign = record(&elsewhere, "alice", &alice, 1, 60).sign(&alice);
    refused(peer.ask(OverlayRequest::Store { record: foreign.to_bytes(), under: None }).await);
    assert_eq!(metrics.refused_count("presence", "bad_certificate"), 1);

    let expired = record(&network, "alice", &alice, 1, -1).sign(&alice);
    refused(peer.ask(OverlayRequest::Store { record: expired.to_bytes(), under: None }).await);
    let everlasting = record(&network, "alice", &alice, 1, 86_400).sign(&alice);
    refused(peer.ask(OverlayRequest::Store { record: everlasting.to_bytes(), under: None }).await);
    assert_eq!(metrics.refused_count("presence", "expired"), 2);

    refused(peer.ask(OverlayRequest::Store { record: vec![7; 5000], under: None }).await);
    assert_eq!(metrics.refused_count("presence", "oversized"), 1);
    refused(peer.ask(OverlayRequest::Store { record: vec![1, 2, 3, 4, 5, 6], under: None }).await);
    assert_eq!(metrics.refused_count("presence", "malformed"), 1);

    let honest = record(&network, "alice", &alice, 5, 60).sign(&alice);
    assert!(matches!(peer.ask(OverlayRequest::Store { record: honest.to_bytes(), under: None }).await, OverlayResponse::Stored));
    refused(peer.ask(OverlayRequest::Store { record: honest.to_bytes(), under: None }).await);
    let older = record(&network, "alice", &alice, 4, 60).sign(&alice);
    refused(peer.ask(OverlayRequest::Store { record: older.to_bytes(), under: None }).await);
    assert_eq!(metrics.refused_count("presence", "replayed"), 2);

    // Only the honest record is served.
    match peer.ask(OverlayRequest::Fetch { username: "alice".into() }).await {
        OverlayResponse::Presence { records } => {
            assert_eq!(records.len(), 1);
            let served = PresenceRecord::from_bytes(&records[0].0).unwrap();
            assert_eq!(served, honest);
        }
        other => panic!("expected presence, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impostors_and_garbage_are_refused_and_the_supernode_keeps_serving() {
    let network = TestNetwork::new();
    let supernode = RunningSupernode::start(&network, vec![]).await;
    let metrics = &supernode.metrics;
    let mallory = DeviceKey::generate();
    let mut peer = MisbehavingPeer::connect(&mallory, &supernode.address).await;

    // Nothing before attaching.
    let alice = DeviceKey::generate();
    let alices = record(&network, "alice", &alice, 1, 60).sign(&alice);
    assert!(refused(peer.ask(OverlayRequest::Publish { record: alices.to_bytes(), withdrawal: None }).await).contains("attach first"));
    assert!(refused(peer.ask(OverlayRequest::Lookup { username: "alice".into() }).await).contains("attach first"));

    // Attaching with alice's certificate over mallory's connection.
    let stolen = network.certificate("alice", &alice).to_bytes();
    refused(peer.ask(OverlayRequest::Attach { certificate: stolen, supernodes: vec![] }).await);
    assert_eq!(metrics.refused_count("attach", "forged"), 1);
    refused(peer.ask(OverlayRequest::Attach { certificate: vec![9; 40], supernodes: vec![] }).await);
    assert_eq!(metrics.refused_count("attach", "malformed"), 1);

    // Attached as herself, mallory still cannot publish alice's presence.
    let own = network.certificate("mallory", &mallory).to_bytes();
    assert!(matches!(peer.ask(OverlayRequest::Attach { certificate: own, supernodes: vec![] }).await, OverlayResponse::Attached { .. }));
    refused(peer.ask(OverlayRequest::Publish { record: alices.to_bytes(), withdrawal: None }).await);
    assert_eq!(metrics.refused_count("presence", "forged"), 1);

    // The withdrawal handed over with a record must be the publisher's own, offline, and
    // newer: never alice's (her parent would publish it when mallory leaves), never older
    // (it would not replace the record), never "online".
    let offline = |user: &str, device: &DeviceKey, sequence: u64| {
        PresenceBody { status: PresenceStatus::Offline, ..record(&network, user, device, sequence, 60) }.sign(device)
    };
    let mine = record(&network, "mallory", &mallory, 5, 60).sign(&mallory);
    for withdrawal in [offline("alice", &alice, 6), offline("mallory", &mallory, 4), record(&network, "mallory", &mallory, 6, 60).sign(&mallory)] {
        let withdrawal = Some(ByteString(withdrawal.to_bytes()));
        assert!(refused(peer.ask(OverlayRequest::Publish { record: mine.to_bytes(), withdrawal }).await).contains("withdrawal"));
    }
    assert_eq!(metrics.refused_count("presence", "bad_withdrawal"), 3);
    refused(peer.ask(OverlayRequest::Route { envelope: vec![1, 0, 0, 0] }).await);
    refused(peer.ask(OverlayRequest::Route { envelope: vec![0; 70_000] }).await);
    assert_eq!(metrics.refused_count("envelope", "malformed"), 1);
    assert_eq!(metrics.refused_count("envelope", "oversized"), 1);

    // Raw garbage on the listener, then an honest request still works.
    let Some(Protocol::Tcp(port)) = supernode.address.iter().find(|p| matches!(p, Protocol::Tcp(_))) else {
        panic!("no tcp port")
    };
    for garbage in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0xff; 10_000][..], &[0u8; 1][..]] {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let _ = stream.write_all(garbage).await;
    }
    let own = record(&network, "mallory", &mallory, 1, 60).sign(&mallory);
    assert!(matches!(
        peer.ask(OverlayRequest::Publish { record: own.to_bytes(), withdrawal: None }).await,
        OverlayResponse::Published { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supernode_announcements_are_only_taken_for_the_announcers_own_address() {
    let network = TestNetwork::new();
    let supernode = RunningSupernode::start(&network, vec![]).await;
    let metrics = &supernode.metrics;
    let mallory = DeviceKey::generate();
    let mut peer = MisbehavingPeer::connect(&mallory, &supernode.address).await;

    // Planting someone else's address (or garbage) in the routing table is refused.
    let elsewhere = vec!["/ip4/10.9.8.7/tcp/4000".to_string(), "not a multiaddr".to_string()];
    assert!(refused(peer.ask(OverlayRequest::Hello { listen: elsewhere }).await).contains("IP you connect from"));
    assert_eq!(metrics.refused_count("hello", "no_address"), 1);

    // Nor an address on its IP that names another peer.
    let someone_else = PeerId::random();
    let theirs = vec![format!("/ip4/127.0.0.1/tcp/4001/p2p/{someone_else}")];
    refused(peer.ask(OverlayRequest::Hello { listen: theirs }).await);
    assert_eq!(metrics.refused_count("hello", "no_address"), 2);

    // Its own address is taken.
    let own = vec!["/ip4/127.0.0.1/tcp/4000".to_string(), "/ip4/10.9.8.7/tcp/4000".to_string()];
    assert!(matches!(peer.ask(OverlayRequest::Hello { listen: own.clone() }).await, OverlayResponse::Welcome { added: 1, .. }));

    // An attached client is not a supernode.
    let certificate = network.certificate("mallory", &mallory).to_bytes();
    assert!(matches!(peer.ask(OverlayRequest::Attach { certificate, supernodes: vec![] }).await, OverlayResponse::Attached { .. }));
    assert!(refused(peer.ask(OverlayRequest::Hello { listen: own }).await).contains("not a supernode"));
}

/// Offline messages and mailboxes cannot be forged: a client may leave only its own messages
/// and open only its own mailbox, and a replica refuses a message whose signature is not its
/// sender's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_offline_messages_and_mailbox_commands_are_refused() {
    use koe_overlay::mailbox::{CommandBody, MailboxAction, OfflineBody};
    let network = TestNetwork::new();
    let supernode = RunningSupernode::start(&network, vec![]).await;
    let (alice, bob, mallory) = (DeviceKey::generate(), DeviceKey::generate(), DeviceKey::generate());
    let now = UnixTime::now();
    let bob_name = koe_types::Username::parse("bob").unwrap();
    let envelope = |from: &DeviceKey, certificate: &koe_types::Certificate| {
        koe_overlay::Envelope::seal(from, certificate, &bob_name, &bob.public_key(), &koe_overlay::EnvelopeKey::for_device(&bob).public(), b"hi", now)
            .unwrap()
            .to_bytes()
    };
    let alices_certificate = network.certificate("alice", &alice);
    let alices = OfflineBody {
        sender: alices_certificate.clone(),
        recipient: bob_name.clone(),
        id: [1; 16],
        sent_at: now,
        envelopes: vec![envelope(&alice, &alices_certificate)],
    };

    let mut peer = MisbehavingPeer::connect(&mallory, &supernode.address).await;
    let own = network.certificate("mallory", &mallory).to_bytes();
    assert!(matches!(peer.ask(OverlayRequest::Attach { certificate: own, supernodes: vec![] }).await, OverlayResponse::Attached { .. }));
    // alice's message, signed by alice, left by mallory: refused.
    let reason = refused(peer.ask(OverlayRequest::LeaveMessage { message: alices.clone().sign(&alice).to_bytes() }).await);
    assert!(reason.contains("only leave its own"), "{reason}");
    // alice's header signed by mallory's key: forged.
    let reason = refused(peer.ask(OverlayRequest::LeaveMessage { message: alices.sign(&mallory).to_bytes() }).await);
    assert!(reason.contains("not signed"), "{reason}");
    assert_eq!(supernode.metrics.refused_count("offline_message", "forged"), 1);
    // bob's mailbox opened with bob's certificate but mallory's signature: forged.
    let command = CommandBody { certificate: network.certificate("bob", &bob), issued_at: now, action: MailboxAction::Fetch }.sign(&mallory);
    refused(peer.ask(OverlayRequest::Mailbox { command: command.to_bytes() }).await);
    // Honestly signed by bob, but over mallory's connection: not mallory's mailbox.
    let command = CommandBody { certificate: network.certificate("bob", &bob), issued_at: now, action: MailboxAction::Fetch }.sign(&bob);
    assert!(refused(peer.ask(OverlayRequest::Mailbox { command: command.to_bytes() }).await).contains("only open its own mailbox"));
    // An attached client is no replica.
    assert!(refused(peer.ask(OverlayRequest::FetchDevices { username: "bob".into() }).await).contains("not a supernode"));
    assert_eq!(supernode.metrics.offline_messages_held.load(std::sync::atomic::Ordering::Relaxed), 0);
}
