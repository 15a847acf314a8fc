#![allow(clippy::unwrap_used, clippy::expect_used)]

//! A real login server for tests: a fresh network in a temporary directory, SQLite accounts,
//! TLS on a loopback port, and a raw HTTPS helper for sending bytes no well-behaved client
//! would send.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use koe_auth::network_init::{load_network_file, NETWORK_FILE_NAME, SECRET_DIR_NAME};
use koe_auth::server::RateLimits;
use koe_auth::store::SqliteStore;
use koe_auth::tls::PinnedServerCertificate;
use koe_auth::{create_network, LoginClient, LoginServer, LoginServerConfig, LoginServerSecrets};
use koe_types::network::LoginUrl;
use koe_types::{NetworkFile, NetworkName, NetworkSigningKey, Pii};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub network: NetworkFile,
    pub signing_key: NetworkSigningKey,
    pub database: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

pub struct Options {
    pub rate_limits: RateLimits,
    pub busy_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            rate_limits: RateLimits::UNLIMITED,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let port = listener.local_addr().expect("local address").port();
        let network_dir = dir.path().join("network");
        create_network(
            &network_dir,
            NetworkName::parse("koe-test").expect("network name"),
            LoginUrl {
                host: "127.0.0.1".into(),
                port,
            },
        )
        .expect("create network");
        let network =
            load_network_file(&network_dir.join(NETWORK_FILE_NAME)).expect("network file");
        let secrets = LoginServerSecrets::load(&network_dir.join(SECRET_DIR_NAME), &network)
            .expect("secrets");
        let database = dir.path().join("accounts.db");
        let store = SqliteStore::open(&database, options.busy_timeout)
            .await
            .expect("open store");
        let signing_key = secrets.signing_key.clone();
        let mut config =
            LoginServerConfig::new(network.name.clone(), secrets.signing_key, secrets.tls);
        config.rate_limits = options.rate_limits;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(LoginServer::new(config, Arc::new(store)).run(listener, async {
            let _ = stopped.await;
        }));
        Self {
            dir,
            network,
            signing_key,
            database,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn client(&self) -> LoginClient {
        LoginClient::new(self.network.clone())
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server run");
        }
    }

    /// Sends `request` as raw bytes over TLS and returns (status, body).
    pub async fn raw(&self, request: &[u8]) -> (u16, String) {
        let pinned = PinnedServerCertificate::new(self.network.login_tls_fingerprint);
        let connector = tokio_rustls::TlsConnector::from(pinned.client_config().expect("tls"));
        let tcp = TcpStream::connect(self.network.login_url.authority())
            .await
            .expect("connect");
        let mut tls = connector
            .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
            .await
            .expect("handshake");
        tls.write_all(request).await.expect("write");
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response).await;
        let text = String::from_utf8_lossy(&response).to_string();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }

    /// A POST with `body` and a correct Content-Length, closing the connection after.
    pub async fn post_raw(&self, path: &str, body: &[u8]) -> (u16, String) {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        self.raw(&request).await
    }
}

pub fn password(text: &str) -> Pii<String> {
    Pii::new(text.to_string())
}

/// The JSON error code in an error body.
pub fn error_code(body: &str) -> String {
    let value: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("error body {body:?} is not JSON: {e}"));
    value["error"].as_str().unwrap_or_default().to_string()
}
