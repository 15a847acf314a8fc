//! Passwords and client addresses never reach the login server's logs, even at debug level
//! and even when requests fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{password, TestServer};
use koe_types::DeviceKey;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn passwords_and_addresses_are_redacted_in_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let server = TestServer::start().await;
    let client = server.client();
    let device = DeviceKey::generate().public_key();
    client.signup("alice", &password("secret-one-1234")).await.unwrap();
    let _ = client.login("alice", &password("secret-two-5678"), &device, None).await;
    client.login("alice", &password("secret-one-1234"), &device, None).await.unwrap();
    let _ = client
        .change_password("alice", &password("secret-one-1234"), &password("secret-three-90"))
        .await;
    let _ = server
        .post_raw("/v1/signup", br#"{"username":"bob","password":"secret-four-xyz"}"#)
        .await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("wrong password"), "the logs are being captured:\n{logs}");
    assert!(logs.contains("peer=<redacted>"), "{logs}");
    for secret in ["secret-one", "secret-two", "secret-three", "secret-four"] {
        assert!(!logs.contains(secret), "{secret} leaked into the logs:\n{logs}");
    }
    for line in logs.lines().filter(|line| line.contains("127.0.0.1")) {
        assert!(
            line.contains("login server listening"),
            "a client address leaked into the logs: {line}"
        );
    }
}
