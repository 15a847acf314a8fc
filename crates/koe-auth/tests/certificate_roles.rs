//! The role in a certificate is the account's: a gateway service account logs in and renews
//! as a gateway, everyone who signs up is a user, and neither a password change nor renewal
//! changes that.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{password, TestServer};
use koe_auth::store::SqliteStore;
use koe_auth::AccountStore;
use koe_types::{DeviceKey, Role, UnixTime, Username};

/// Creates a service account beside the running server, as `koe auth add-service-account`
/// does.
async fn add_service_account(server: &TestServer, name: &str, secret: &str, role: Role) {
    let store = SqliteStore::open(&server.database, Duration::from_secs(5))
        .await
        .unwrap();
    let hash = koe_auth::password::hash_password(&password(secret));
    store
        .create_account_with_role(
            &Username::parse_existing(name).unwrap(),
            &hash,
            role,
            UnixTime::now(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_gateway_account_logs_in_and_renews_as_a_gateway() {
    let server = TestServer::start().await;
    add_service_account(&server, "pstn", "gateway password", Role::Gateway).await;
    let client = server.client();
    let device = DeviceKey::generate();

    let certificate = client
        .login(
            "pstn",
            &password("gateway password"),
            &device.public_key(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(certificate.role(), Role::Gateway);
    certificate
        .verify(
            &server.network.name,
            &server.network.signing_key,
            UnixTime::now(),
        )
        .unwrap();

    let renewed = client.renew(&certificate, &device).await.unwrap();
    assert_eq!(renewed.role(), Role::Gateway, "renewal keeps the role");
    assert_ne!(renewed.body().serial, certificate.body().serial);
    let again = client.renew(&renewed, &device).await.unwrap();
    assert_eq!(again.role(), Role::Gateway);

    client
        .change_password(
            "pstn",
            &password("gateway password"),
            &password("new gateway password"),
        )
        .await
        .unwrap();
    let after_change = client
        .login(
            "pstn",
            &password("new gateway password"),
            &device.public_key(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        after_change.role(),
        Role::Gateway,
        "a password change keeps the role"
    );
}

#[tokio::test]
async fn users_and_plain_service_accounts_get_user_certificates() {
    let server = TestServer::start().await;
    add_service_account(&server, "echo123", "echo password", Role::User).await;
    let client = server.client();
    client
        .signup("alice", &password("correct horse"))
        .await
        .unwrap();
    let device = DeviceKey::generate();

    for (name, secret) in [("alice", "correct horse"), ("echo123", "echo password")] {
        let certificate = client
            .login(name, &password(secret), &device.public_key(), None)
            .await
            .unwrap();
        assert_eq!(certificate.role(), Role::User, "{name}");
        assert_eq!(
            koe_wire::Codec::to_bytes(&certificate)[0],
            koe_types::CERTIFICATE_VERSION,
            "{name}"
        );
        let renewed = client.renew(&certificate, &device).await.unwrap();
        assert_eq!(renewed.role(), Role::User, "{name}");
    }
}
