//! The STUN responder and query on real UDP sockets: a client learns the address the
//! responder sees it at; garbage sent to the responder changes nothing; a responder that
//! never answers costs the client a bounded wait.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use koe_stun::{reflexive_address, serve, StunError, QUERY_TIMEOUT};
use tokio::net::UdpSocket;

#[tokio::test]
async fn a_client_learns_the_address_the_responder_sees() {
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server_address = server.local_addr().unwrap();
    let responder = tokio::spawn(serve(server));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Garbage first, from another socket: the responder keeps serving.
    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for garbage in [&b"\x00\x01\x00\x00"[..], &[0xff; 600], b"hello"] {
        attacker.send_to(garbage, server_address).await.unwrap();
    }
    let seen = reflexive_address(&client, server_address).await.unwrap();
    assert_eq!(seen, client.local_addr().unwrap());
    let mut buffer = [0u8; 64];
    let nothing = tokio::time::timeout(Duration::from_millis(100), attacker.recv_from(&mut buffer)).await;
    assert!(nothing.is_err(), "garbage got an answer");
    responder.abort();
}

#[tokio::test]
async fn a_silent_server_costs_a_bounded_wait() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let started = Instant::now();
    let outcome = reflexive_address(&client, silent.local_addr().unwrap()).await;
    assert_eq!(outcome, Err(StunError::Timeout(QUERY_TIMEOUT)));
    assert!(started.elapsed() < QUERY_TIMEOUT + Duration::from_millis(200), "{:?}", started.elapsed());
    let mut buffer = [0u8; 64];
    let (length, _) = silent.recv_from(&mut buffer).await.unwrap();
    assert_eq!(length, 20, "a Binding request without attributes");
}
