//! The login server's API from a client's point of view, over real TLS on loopback: the happy
//! paths, and every bad input the issue lists getting a clear error without losing data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{error_code, password, Options, TestServer};
use koe_auth::api::ErrorCode;
use koe_auth::rate_limit::RateLimit;
use koe_auth::server::RateLimits;
use koe_auth::LoginClientError;
use koe_types::{CertificateBody, DeviceKey, NetworkSigningKey, Role, UnixTime, Username};

fn code(result: Result<impl std::fmt::Debug, LoginClientError>) -> ErrorCode {
    match result {
        Err(error) => error
            .code()
            .unwrap_or_else(|| panic!("expected a refusal from the server, got {error}")),
        Ok(value) => panic!("expected a refusal, got {value:?}"),
    }
}

#[tokio::test]
async fn signup_then_login_gives_a_certificate_that_verifies_offline() {
    let server = TestServer::start().await;
    let client = server.client();
    let device = DeviceKey::generate();
    assert_eq!(
        client.signup("Alice", &password("correct horse")).await.unwrap().as_str(),
        "alice",
        "usernames are case-folded"
    );
    let certificate = client
        .login("alice", &password("correct horse"), &device.public_key(), None)
        .await
        .unwrap();
    assert_eq!(certificate.username().as_str(), "alice");
    assert_eq!(certificate.device_key(), &device.public_key());
    certificate
        .verify(&server.network.name, &server.network.signing_key, UnixTime::now())
        .unwrap();
    let lifetime = certificate.body().not_before.until(certificate.not_after());
    assert_eq!(lifetime, Duration::from_secs(24 * 3600), "default lifetime is 24 h");

    let short = client
        .login("ALICE", &password("correct horse"), &device.public_key(), Some(Duration::from_secs(600)))
        .await
        .unwrap();
    assert_eq!(short.body().not_before.until(short.not_after()), Duration::from_secs(600));
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_told_apart_and_change_nothing() {
    let server = TestServer::start().await;
    let client = server.client();
    let device = DeviceKey::generate().public_key();
    client.signup("alice", &password("correct horse")).await.unwrap();
    assert_eq!(
        code(client.login("alice", &password("wrong horse"), &device, None).await),
        ErrorCode::WrongPassword
    );
    assert_eq!(
        code(client.login("nobody", &password("correct horse"), &device, None).await),
        ErrorCode::UnknownUser
    );
    client
        .login("alice", &password("correct horse"), &device, None)
        .await
        .expect("the right password still works after a wrong one");
}

#[tokio::test]
async fn duplicate_signup_is_refused_and_keeps_the_first_password() {
    let server = TestServer::start().await;
    let client = server.client();
    client.signup("alice", &password("first password")).await.unwrap();
    assert_eq!(
        code(client.signup("ALICE", &password("second password")).await),
        ErrorCode::UsernameTaken
    );
    let device = DeviceKey::generate().public_key();
    client.login("alice", &password("first password"), &device, None).await.unwrap();
    assert_eq!(
        code(client.login("alice", &password("second password"), &device, None).await),
        ErrorCode::WrongPassword
    );
}

#[tokio::test]
async fn racing_signups_for_one_name_create_exactly_one_account() {
    let server = TestServer::start().await;
    let attempts = (0..8).map(|i| {
        let client = server.client();
        async move {
            let secret = format!("password number {i}");
            (secret.clone(), client.signup("carol", &password(&secret)).await)
        }
    });
    let results = futures_join_all(attempts).await;
    let winners: Vec<_> = results.iter().filter(|(_, r)| r.is_ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one sign-up wins: {results:?}");
    for (_, result) in results.iter().filter(|(_, r)| r.is_err()) {
        let error = result.as_ref().unwrap_err();
        assert_eq!(error.code(), Some(ErrorCode::UsernameTaken), "{error}");
    }
    let device = DeviceKey::generate().public_key();
    server
        .client()
        .login("carol", &password(&winners[0].0), &device, None)
        .await
        .expect("the winner's password is the one stored");
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.unwrap());
    }
    outputs
}

#[tokio::test]
async fn invalid_usernames_are_refused_with_the_rule_broken() {
    let server = TestServer::start().await;
    let client = server.client();
    for (name, words) in [
        ("al", "at least 3"),
        ("9lives", "start with a letter"),
        ("al ice", "may only contain"),
        ("alicé", "may only contain"),
        ("admin", "reserved"),
        ("echo123", "reserved"),
        (&"x".repeat(33), "at most 32"),
    ] {
        match client.signup(name, &password("correct horse")).await {
            Err(LoginClientError::Rejected { code, message, .. }) => {
                assert_eq!(code, ErrorCode::InvalidUsername, "{name}");
                assert!(message.contains(words), "{name}: {message:?} should say {words:?}");
            }
            other => panic!("{name}: expected a refusal, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn empty_and_huge_passwords_are_refused() {
    let server = TestServer::start().await;
    let client = server.client();
    assert_eq!(code(client.signup("alice", &password("")).await), ErrorCode::PasswordTooShort);
    assert_eq!(code(client.signup("alice", &password("short")).await), ErrorCode::PasswordTooShort);
    assert_eq!(
        code(client.signup("alice", &password(&"x".repeat(1025))).await),
        ErrorCode::PasswordTooLong
    );
    assert_eq!(
        code(client.signup("alice", &password(&"x".repeat(100_000))).await),
        ErrorCode::BodyTooLarge
    );
    // None of these created the account.
    let device = DeviceKey::generate().public_key();
    assert_eq!(
        code(client.login("alice", &password("short"), &device, None).await),
        ErrorCode::UnknownUser
    );
    client.signup("alice", &password("a long enough one")).await.unwrap();
    assert_eq!(
        code(client.change_password("alice", &password("a long enough one"), &password("")).await),
        ErrorCode::PasswordTooShort
    );
    client
        .login("alice", &password("a long enough one"), &device, None)
        .await
        .expect("a refused password change keeps the old password");
}

#[tokio::test]
async fn malformed_requests_get_structured_errors() {
    let server = TestServer::start().await;
    for (body, what) in [
        (&b"\x00\xff\xfe garbage"[..], "garbage bytes"),
        (b"{\"username\": \"alice\"", "truncated JSON"),
        (b"[]", "an array"),
        (b"{\"username\": \"alice\"}", "a missing field"),
        (b"{\"username\": 5, \"password\": \"correct horse\"}", "a wrong type"),
        (b"{\"username\": \"alice\", \"password\": \"correct horse\", \"admin\": true}", "an unknown field"),
        (b"", "an empty body"),
    ] {
        let (status, body) = server.post_raw("/v1/signup", body).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(error_code(&body), "malformed_request", "{what}: {body}");
    }
    let (status, body) = server.post_raw("/v1/nothing-here", b"{}").await;
    assert_eq!((status, error_code(&body).as_str()), (404, "not_found"));
    let (status, body) = server
        .raw(b"GET /v1/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!((status, error_code(&body).as_str()), (405, "method_not_allowed"));
    // The server is still fine.
    server.client().signup("alice", &password("correct horse")).await.unwrap();
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_or_without_a_length() {
    let server = TestServer::start().await;
    let huge = vec![b'{'; 1024 * 1024];
    let (status, body) = server.post_raw("/v1/login", &huge).await;
    assert_eq!((status, error_code(&body).as_str()), (413, "body_too_large"));

    let mut chunked = b"POST /v1/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..64 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b' '; 0x400]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (status, body) = server.raw(&chunked).await;
    assert_eq!((status, error_code(&body).as_str()), (413, "body_too_large"));
}

#[tokio::test]
async fn password_guessing_locks_the_account_but_not_others() {
    let server = TestServer::start_with(Options {
        rate_limits: RateLimits {
            per_address: RateLimit::UNLIMITED,
            signups_per_address: RateLimit::UNLIMITED,
            password_attempts_per_account: RateLimit::per_minute(3, 1),
        },
        ..Options::default()
    })
    .await;
    let client = server.client();
    let device = DeviceKey::generate().public_key();
    client.signup("alice", &password("correct horse")).await.unwrap();
    client.signup("bob", &password("battery staple")).await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            code(client.login("alice", &password("guess"), &device, None).await),
            ErrorCode::WrongPassword
        );
    }
    match client.login("alice", &password("correct horse"), &device, None).await {
        Err(LoginClientError::Rejected { code, retry_after, .. }) => {
            assert_eq!(code, ErrorCode::RateLimited, "even the right password waits");
            assert!(retry_after.is_some_and(|d| d >= Duration::from_secs(1)));
        }
        other => panic!("expected the account to be locked, got {other:?}"),
    }
    client
        .login("bob", &password("battery staple"), &device, None)
        .await
        .expect("other accounts are not affected");
}

#[tokio::test]
async fn one_address_cannot_flood_the_server() {
    let server = TestServer::start_with(Options {
        rate_limits: RateLimits {
            per_address: RateLimit::per_minute(5, 1),
            ..RateLimits::UNLIMITED
        },
        ..Options::default()
    })
    .await;
    let client = server.client();
    let device = DeviceKey::generate().public_key();
    for _ in 0..5 {
        let _ = client.login("alice", &password("guess guess"), &device, None).await;
    }
    assert_eq!(
        code(client.login("alice", &password("guess guess"), &device, None).await),
        ErrorCode::RateLimited
    );
}

#[tokio::test]
async fn renewal_needs_the_device_key_and_a_live_certificate_from_this_network() {
    let server = TestServer::start().await;
    let client = server.client();
    let device = DeviceKey::generate();
    client.signup("alice", &password("correct horse")).await.unwrap();
    let certificate = client
        .login("alice", &password("correct horse"), &device.public_key(), None)
        .await
        .unwrap();

    let renewed = client.renew(&certificate, &device).await.unwrap();
    assert_ne!(renewed.body().serial, certificate.body().serial);
    assert_eq!(renewed.device_key(), &device.public_key());

    // Someone holding a copy of the certificate but not the device key.
    assert_eq!(
        code(client.renew(&certificate, &DeviceKey::generate()).await),
        ErrorCode::InvalidCertificate
    );

    // A certificate signed by another network's key, and an expired one signed by ours.
    let body = |not_before: u64, not_after: u64| CertificateBody {
        network: server.network.name.clone(),
        username: Username::parse("alice").unwrap(),
        device_key: device.public_key(),
        not_before: UnixTime(not_before),
        not_after: UnixTime(not_after),
        serial: certificate.body().serial,
        role: Role::User,
    };
    let now = UnixTime::now().as_secs();
    let foreign = body(now, now + 3600).sign(&NetworkSigningKey::generate());
    assert_eq!(code(client.renew(&foreign, &device).await), ErrorCode::InvalidCertificate);
    let expired = body(now - 7200, now - 3600).sign(&server.signing_key);
    match client.renew(&expired, &device).await {
        Err(LoginClientError::Rejected { code, message, .. }) => {
            assert_eq!(code, ErrorCode::InvalidCertificate);
            assert!(message.contains("expired"), "{message}");
        }
        other => panic!("expected an expired certificate to be refused, got {other:?}"),
    }
}

#[tokio::test]
async fn tampered_certificates_are_refused_for_renewal() {
    let server = TestServer::start().await;
    let device = DeviceKey::generate();
    server.client().signup("alice", &password("correct horse")).await.unwrap();
    let certificate = server
        .client()
        .login("alice", &password("correct horse"), &device.public_key(), None)
        .await
        .unwrap();
    let mut bytes = koe_wire::Codec::to_bytes(&certificate);
    let last = bytes.len() - 70; // inside the serial
    bytes[last] ^= 0x40;
    let body = format!(
        r#"{{"certificate":"{}","timestamp":{},"signature":"{}"}}"#,
        base64_encode(&bytes),
        UnixTime::now().as_secs(),
        base64_encode(&[0u8; 64])
    );
    let (status, response) = server.post_raw("/v1/renew", body.as_bytes()).await;
    assert_eq!((status, error_code(&response).as_str()), (401, "invalid_certificate"));
    let (status, response) = server
        .post_raw("/v1/renew", br#"{"certificate":"AAAA","timestamp":0,"signature":"AAAA"}"#)
        .await;
    assert_eq!((status, error_code(&response).as_str()), (401, "invalid_certificate"));
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn changing_the_password_stops_renewal_of_earlier_certificates() {
    let server = TestServer::start().await;
    let client = server.client();
    let device = DeviceKey::generate();
    client.signup("alice", &password("correct horse")).await.unwrap();
    let before = client
        .login("alice", &password("correct horse"), &device.public_key(), None)
        .await
        .unwrap();
    assert_eq!(
        code(client.change_password("alice", &password("wrong horse"), &password("new password")).await),
        ErrorCode::WrongPassword
    );
    client
        .change_password("alice", &password("correct horse"), &password("new password"))
        .await
        .unwrap();
    assert_eq!(code(client.renew(&before, &device).await), ErrorCode::CertificateRevoked);
    assert_eq!(
        code(client.login("alice", &password("correct horse"), &device.public_key(), None).await),
        ErrorCode::WrongPassword
    );
    let after = client
        .login("alice", &password("new password"), &device.public_key(), None)
        .await
        .unwrap();
    client.renew(&after, &device).await.expect("new certificates renew");
}

#[tokio::test]
async fn deleting_an_account_needs_its_password_and_frees_the_name() {
    let server = TestServer::start().await;
    let client = server.client();
    let device = DeviceKey::generate();
    client.signup("alice", &password("correct horse")).await.unwrap();
    let certificate = client
        .login("alice", &password("correct horse"), &device.public_key(), None)
        .await
        .unwrap();
    assert_eq!(
        code(client.delete_account("alice", &password("wrong horse")).await),
        ErrorCode::WrongPassword
    );
    client.delete_account("alice", &password("correct horse")).await.unwrap();
    assert_eq!(
        code(client.login("alice", &password("correct horse"), &device.public_key(), None).await),
        ErrorCode::UnknownUser
    );
    assert_eq!(code(client.renew(&certificate, &device).await), ErrorCode::CertificateRevoked);
    assert_eq!(
        code(client.delete_account("alice", &password("correct horse")).await),
        ErrorCode::UnknownUser
    );
    client.signup("alice", &password("someone else")).await.unwrap();
    assert_eq!(
        code(client.renew(&certificate, &device).await),
        ErrorCode::CertificateRevoked,
        "the old owner's certificate does not renew into the new account"
    );
}

#[tokio::test]
async fn a_login_server_with_another_tls_certificate_is_not_trusted() {
    let server = TestServer::start().await;
    let mut impostor_view = server.network.clone();
    impostor_view.login_tls_fingerprint = koe_types::network::TlsFingerprint([7; 32]);
    let client = koe_auth::LoginClient::new(impostor_view);
    match client.signup("alice", &password("correct horse")).await {
        Err(LoginClientError::WrongServerCertificate { expected, found, .. }) => {
            assert_eq!(expected.0, [7; 32]);
            assert_eq!(found, server.network.login_tls_fingerprint);
        }
        other => panic!("expected a pinning failure, got {other:?}"),
    }
    // Nothing was sent: the account does not exist.
    let device = DeviceKey::generate().public_key();
    assert_eq!(
        code(server.client().login("alice", &password("correct horse"), &device, None).await),
        ErrorCode::UnknownUser
    );
}

#[tokio::test]
async fn a_locked_database_is_reported_busy_and_loses_nothing() {
    let server = TestServer::start_with(Options {
        busy_timeout: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    let client = server.client();
    client.signup("alice", &password("correct horse")).await.unwrap();

    let locker = rusqlite::Connection::open(&server.database).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    match client.signup("bob", &password("battery staple")).await {
        Err(LoginClientError::Rejected { code, retry_after, .. }) => {
            assert_eq!(code, ErrorCode::StorageBusy);
            assert!(retry_after.is_some());
        }
        other => panic!("expected storage_busy, got {other:?}"),
    }
    locker.execute_batch("COMMIT").unwrap();
    drop(locker);

    client.signup("bob", &password("battery staple")).await.expect("works once unlocked");
    let device = DeviceKey::generate().public_key();
    client.login("alice", &password("correct horse"), &device, None).await.unwrap();
    client.login("bob", &password("battery staple"), &device, None).await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish_then_refuses_new_ones() {
    let mut server = TestServer::start().await;
    let client = server.client();
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.signup("alice", &password("correct horse")).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.stop().await;
    in_flight.await.unwrap().expect("the sign-up in flight completed");
    match client.signup("bob", &password("battery staple")).await {
        Err(LoginClientError::Connect { .. }) => {}
        other => panic!("expected the stopped server to refuse connections, got {other:?}"),
    }
    let store = koe_auth::store::SqliteStore::open(&server.database, Duration::from_secs(1))
        .await
        .unwrap();
    use koe_auth::AccountStore;
    assert!(store.find_account(&Username::parse("alice").unwrap()).await.unwrap().is_some());
}

#[tokio::test]
async fn garbage_and_stalled_connections_do_not_disturb_other_clients() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start().await;
    let address = server.network.login_url.authority();
    // Plain-text HTTP, random bytes, and a connection that says nothing at all.
    let mut plain = tokio::net::TcpStream::connect(&address).await.unwrap();
    plain.write_all(b"POST /v1/signup HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut noise = tokio::net::TcpStream::connect(&address).await.unwrap();
    noise.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3]).await.unwrap();
    noise.write_all(&[0xa5; 4096]).await.unwrap();
    let _silent = tokio::net::TcpStream::connect(&address).await.unwrap();

    let client = server.client();
    client.signup("alice", &password("correct horse")).await.unwrap();
    let device = DeviceKey::generate().public_key();
    client.login("alice", &password("correct horse"), &device, None).await.unwrap();
}

#[tokio::test]
async fn existence_of_accounts_can_be_asked() {
    let server = TestServer::start().await;
    let client = server.client();
    client.signup("alice", &password("correct horse")).await.unwrap();
    assert!(client.user_exists("alice").await.unwrap());
    assert!(client.user_exists("ALICE").await.unwrap());
    assert!(!client.user_exists("nobody").await.unwrap());
    assert_eq!(code(client.user_exists("no body").await), ErrorCode::InvalidUsername);
}
