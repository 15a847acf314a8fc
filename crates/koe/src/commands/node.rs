//! `koe node` (a supernode as a process, which watches its network file for new bootstrap
//! supernodes) and `koe network add-bootstrap`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use koe_auth::network_init::load_network_file;
use koe_auth::private_file::{read_private_file, replace_private_file, write_private_file};
use koe_overlay::metrics::SupernodeMetrics;
use koe_overlay::supernode::{Supernode, SupernodeConfig};
use koe_overlay::Multiaddr;
use koe_relay::RelayHandle;
use koe_types::{DeviceKey, NetworkFile};

use crate::cli::{NodeArgs, RelayLimits};
use crate::profile::Profile;

const NODE_KEY_FILE: &str = "node.key";
/// Supernodes this node knew when it last ran, so it can rejoin without the network file's list.
const NODE_HOST_CACHE_FILE: &str = "supernodes.json";
/// The offline messages and device records a supernode keeps for users (SQLite).
const NODE_MAILBOX_FILE: &str = "mailboxes.db";
/// How often a running supernode reads its network file again for new bootstrap supernodes.
const NETWORK_FILE_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The supernode's identity, created once and kept in the profile.
pub fn node_identity(home: &Path) -> Result<DeviceKey> {
    let path = home.join(NODE_KEY_FILE);
    match read_private_file(&path) {
        Ok(text) => DeviceKey::from_secret_text(&text).with_context(|| format!("{} is damaged", path.display())),
        Err(error) if error.is_not_found() => {
            let key = DeviceKey::generate();
            write_private_file(&path, format!("{}\n", key.to_secret_text()).as_bytes())?;
            Ok(key)
        }
        Err(error) => Err(error.into()),
    }
}

pub fn socket_multiaddr(address: SocketAddr) -> Multiaddr {
    let ip = match address.ip() {
        std::net::IpAddr::V4(ip) => format!("/ip4/{ip}"),
        std::net::IpAddr::V6(ip) => format!("/ip6/{ip}"),
    };
    format!("{ip}/tcp/{}", address.port())
        .parse()
        .unwrap_or_else(|e| unreachable!("an IP and port always make a multiaddr: {e}"))
}

fn bootstrap_addresses(network: &NetworkFile, remembered: &[String]) -> Vec<Multiaddr> {
    network.bootstrap.iter().chain(remembered).filter_map(|a| a.parse().ok()).collect()
}

fn remembered_supernodes(home: &Path) -> Vec<String> {
    std::fs::read(home.join(NODE_HOST_CACHE_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// Where a supernode's relay node listens, and its limits.
#[derive(Debug, Clone, Copy)]
pub struct RelayPlacement<'a> {
    /// TURN over UDP and TCP [default: the supernode's port + 1, or any port if that is 0].
    pub listen: Option<SocketAddr>,
    /// TURN over TLS [default: the relay's port + 1].
    pub tls_listen: Option<SocketAddr>,
    pub limits: &'a RelayLimits,
}

/// Starts a supernode on `listen` (TCP), its STUN responder on the UDP port of the same
/// number, and (with `relay`) a relay node whose credentials it hands its clients. Returns
/// the supernode with its dialable address and the services that run beside it.
pub async fn start_supernode(
    network: &NetworkFile,
    identity: DeviceKey,
    listen: SocketAddr,
    remembered: &[String],
    relay: Option<RelayPlacement<'_>>,
    home: Option<&Path>,
) -> Result<(Supernode, Multiaddr, BesideSupernode)> {
    let mut node = Supernode::new(SupernodeConfig {
        network: network.clone(),
        identity,
        listen: socket_multiaddr(listen),
        bootstrap: bootstrap_addresses(network, remembered),
        mailbox_file: home.map(|home| home.join(NODE_MAILBOX_FILE)),
    })?;
    let address = node.listening_address().await;
    let port = tcp_port(&address.to_string()).unwrap_or(listen.port());
    let stun = StunResponder::start(SocketAddr::new(listen.ip(), port)).await;
    let relay = match relay {
        Some(placement) => {
            let (relay, issuer) = super::relay::start_beside_supernode(listen, placement.listen, placement.tls_listen, placement.limits, home).await?;
            node.offer_relays(issuer);
            Some(relay)
        }
        None => None,
    };
    Ok((node, address, BesideSupernode { _stun: stun, relay }))
}

/// What runs beside a supernode: its STUN responder and its relay node, if any.
#[derive(Debug)]
pub struct BesideSupernode {
    _stun: StunResponder,
    pub relay: Option<RelayHandle>,
}

impl BesideSupernode {
    /// Runs `work` (the supernode) with these alive; they stop when `work` ends.
    pub async fn alongside<T>(self, work: impl std::future::Future<Output = T>) -> T {
        let outcome = work.await;
        drop(self);
        outcome
    }
}

/// The TCP port of a multiaddr such as `/ip4/1.2.3.4/tcp/4100/p2p/…`.
pub fn tcp_port(multiaddr: &str) -> Option<u16> {
    let mut parts = multiaddr.split('/');
    parts.find(|part| *part == "tcp")?;
    parts.next()?.parse().ok()
}

/// A supernode's STUN responder, from which clients learn their address as seen from outside
/// (server-reflexive ICE candidates). Stops when dropped.
#[derive(Debug)]
pub struct StunResponder(Option<tokio::task::JoinHandle<()>>);

impl StunResponder {
    /// Answers on UDP `address`; without it (the port is taken) the supernode still works,
    /// and its clients go without server-reflexive candidates.
    pub async fn start(address: SocketAddr) -> Self {
        match tokio::net::UdpSocket::bind(address).await {
            Ok(socket) => Self(Some(tokio::spawn(koe_stun::serve(socket)))),
            Err(error) => {
                tracing::warn!(%address, %error, "no STUN responder: clients behind NATs get no server-reflexive candidates from this supernode");
                Self(None)
            }
        }
    }
}

impl Drop for StunResponder {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

pub async fn run(home: Option<std::path::PathBuf>, args: NodeArgs, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let profile = Profile::locate(home)?;
    let network = load_network_file(&args.network)?;
    let identity = node_identity(profile.home())?;
    let remembered = remembered_supernodes(profile.home());
    let relay = (!args.no_relay).then_some(RelayPlacement { listen: args.relay_listen, tls_listen: args.relay_tls_listen, limits: &args.relay });
    let (node, address, beside) = start_supernode(&network, identity, args.listen, &remembered, relay, Some(profile.home())).await?;
    // The first line on stdout is the address, for scripts and `koe network add-bootstrap`.
    report(&address.to_string());
    if let Some(relay) = &beside.relay {
        report(&super::relay::describe(relay));
    }
    tokio::spawn(watch_network_file(args.network.clone(), network.clone(), node.handle()));
    let metrics = node.metrics();
    if let Some(listen) = args.metrics {
        serve_metrics(listen, Arc::clone(&metrics)).await?;
    }
    let summary_metrics = Arc::clone(&metrics);
    let relay_stats = beside.relay.as_ref().map(|relay| relay.stats_handle());
    let every = args.summary_every;
    let known = node.known_supernodes_handle();
    let cache_path = profile.home().join(NODE_HOST_CACHE_FILE);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            report(&summary_metrics.summary());
            if let Some(stats) = &relay_stats {
                report(&super::relay::summary(&stats.get()));
            }
            let known = known.lock().map(|k| k.clone()).unwrap_or_default();
            if !known.is_empty() {
                if let Ok(bytes) = serde_json::to_vec_pretty(&known) {
                    let _ = replace_private_file(&cache_path, &bytes);
                }
            }
        }
    });
    node.run(shutdown).await;
    Ok(())
}

/// Hands the running supernode every bootstrap supernode added to the network file (as
/// `koe network add-bootstrap` does after the node started), so supernodes started in any
/// order join without restarts. Polls: the file is small, and polling works on every file
/// system and through editors that replace the file.
async fn watch_network_file(path: std::path::PathBuf, started_with: NetworkFile, node: koe_overlay::supernode::SupernodeHandle) {
    let mut last = std::fs::read(&path).ok();
    let mut ticks = tokio::time::interval(NETWORK_FILE_POLL_INTERVAL);
    loop {
        ticks.tick().await;
        let Ok(bytes) = std::fs::read(&path) else { continue };
        if last.as_ref() == Some(&bytes) {
            continue;
        }
        last = Some(bytes);
        match load_network_file(&path) {
            Ok(network) if network.name != started_with.name || network.signing_key != started_with.signing_key => {
                tracing::warn!(file = %path.display(), "the network file now names another network or signing key; this supernode keeps the one it started with until it restarts");
            }
            Ok(network) => node.learn(bootstrap_addresses(&network, &[])),
            Err(error) => tracing::warn!("{error:#}; keeping the supernodes known so far"),
        }
    }
}

/// Prints a line on stdout (for the operator, or a command's answer). A reader that went away
/// (a closed pipe, `koe calls | head`) is no error: `println!` would panic there.
pub fn report(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Serves `GET /metrics` in Prometheus text format.
async fn serve_metrics(listen: SocketAddr, metrics: Arc<SupernodeMetrics>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot serve metrics on {listen}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let metrics = Arc::clone(&metrics);
                    async move {
                        let mut response = if request.uri().path() == "/metrics" {
                            hyper::Response::new(Full::new(Bytes::from(metrics.prometheus())))
                        } else {
                            let mut response = hyper::Response::new(Full::new(Bytes::from_static(b"see /metrics\n")));
                            *response.status_mut() = hyper::StatusCode::NOT_FOUND;
                            response
                        };
                        response.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}

pub fn add_bootstrap(network_path: &Path, address: &str) -> Result<()> {
    let parsed: Multiaddr = address.parse().with_context(|| format!("{address:?} is not a multiaddr"))?;
    if !matches!(parsed.iter().last(), Some(koe_overlay::multiaddr_protocol::P2p(_))) {
        bail!("{address:?} must end in /p2p/PEER_ID, as `koe node` prints it");
    }
    let mut network = load_network_file(network_path)?;
    if network.bootstrap.iter().any(|a| a == address) {
        println!("{address} is already a bootstrap supernode of {:?}", network.name.as_str());
        return Ok(());
    }
    network.bootstrap.push(address.to_string());
    let mode = std::fs::metadata(network_path).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions())).ok();
    replace_private_file(network_path, network.to_toml().as_bytes())?;
    if let Some(mode) = mode {
        let _ = std::fs::set_permissions(network_path, std::os::unix::fs::PermissionsExt::from_mode(mode));
    }
    println!("Added {address} to the bootstrap supernodes of {:?} ({} in all).", network.name.as_str(), network.bootstrap.len());
    Ok(())
}
