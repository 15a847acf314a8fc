//! An overlay on loopback for tests: supernodes and clients as tokio tasks with real sockets,
//! certificates signed by a test network key (the login server is tested on its own).

#![allow(dead_code, missing_debug_implementations, clippy::unwrap_used, clippy::expect_used, clippy::new_without_default)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use koe_overlay::client::{ClientConfig, ClientEvent, ClientHandle, ClientNode};
use koe_overlay::host_cache::HostCache;
use koe_overlay::metrics::SupernodeMetrics;
use koe_overlay::supernode::{Supernode, SupernodeConfig, SupernodeHandle};
use koe_overlay::{OpenedEnvelope, PresenceStatus};
use koe_types::network::{LoginUrl, TlsFingerprint};
use koe_types::{
    Certificate, CertificateBody, DeviceKey, NetworkFile, NetworkName, NetworkSigningKey, Role,
    UnixTime, Username,
};
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use libp2p::Multiaddr;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub struct TestNetwork {
    pub file: NetworkFile,
    pub key: NetworkSigningKey,
}

impl TestNetwork {
    pub fn new() -> Self {
        let key = NetworkSigningKey::generate();
        Self {
            file: NetworkFile {
                name: NetworkName::parse("koe-test").unwrap(),
                login_url: LoginUrl { host: "127.0.0.1".into(), port: 9 },
                login_tls_fingerprint: TlsFingerprint([0; 32]),
                signing_key: key.public_key(),
                bootstrap: Vec::new(),
            },
            key,
        }
    }

    pub fn certificate(&self, username: &str, device: &DeviceKey) -> Certificate {
        self.certificate_with_role(username, device, Role::User)
    }

    /// A certificate as the login server issues it to an account with this role.
    pub fn certificate_with_role(&self, username: &str, device: &DeviceKey, role: Role) -> Certificate {
        let now = UnixTime::now();
        CertificateBody {
            network: self.file.name.clone(),
            username: Username::parse_existing(username).unwrap(),
            device_key: device.public_key(),
            not_before: now,
            not_after: now.saturating_add(Duration::from_secs(3600)),
            serial: 1,
            role,
        }
        .sign(&self.key)
    }
}

pub struct RunningSupernode {
    pub address: Multiaddr,
    pub metrics: Arc<SupernodeMetrics>,
    pub handle: SupernodeHandle,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningSupernode {
    pub async fn start(network: &TestNetwork, bootstrap: Vec<Multiaddr>) -> Self {
        Self::start_as(network, &DeviceKey::generate(), "/ip4/127.0.0.1/tcp/0".parse().unwrap(), bootstrap).await
    }

    /// A supernode with this identity on `listen` (its address is known before it starts).
    pub async fn start_as(network: &TestNetwork, identity: &DeviceKey, listen: Multiaddr, bootstrap: Vec<Multiaddr>) -> Self {
        let mut node = Supernode::new(SupernodeConfig {
            network: network.file.clone(),
            identity: identity.clone(),
            listen,
            bootstrap,
            mailbox_file: None,
        })
        .unwrap();
        let address = node.listening_address().await;
        let metrics = node.metrics();
        let handle = node.handle();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(node.run(async {
            let _ = stopped.await;
        }));
        Self { address, metrics, handle, stop: Some(stop), task }
    }

    /// Ends the supernode abruptly: its task and every connection go at once.
    pub fn kill(&mut self) {
        self.task.abort();
    }

    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Other supernodes connected and in its routing table.
    pub fn supernodes(&self) -> u64 {
        self.metrics.supernodes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Polls `condition` every 20 ms until it holds; panics naming `what` after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

pub struct RunningClient {
    pub username: Username,
    pub device: DeviceKey,
    pub handle: ClientHandle,
    pub parent: watch::Receiver<Option<String>>,
    pub received: Arc<Mutex<Vec<OpenedEnvelope>>>,
    task: JoinHandle<()>,
}

impl RunningClient {
    /// A client that knows `supernodes`; the first is where it was attached last time, so it
    /// is tried first (the others in the host cache's own order).
    pub async fn start(network: &TestNetwork, username: &str, supernodes: &[Multiaddr]) -> Self {
        Self::start_with_status(network, username, supernodes, Some(PresenceStatus::Online)).await
    }

    /// A client starting with `status` (`None`: invisible).
    pub async fn start_with_status(
        network: &TestNetwork,
        username: &str,
        supernodes: &[Multiaddr],
        status: Option<PresenceStatus>,
    ) -> Self {
        Self::start_device(network, username, supernodes, DeviceKey::generate(), status).await
    }

    /// A client for this device (a device that comes back keeps its key).
    pub async fn start_device(
        network: &TestNetwork,
        username: &str,
        supernodes: &[Multiaddr],
        device: DeviceKey,
        status: Option<PresenceStatus>,
    ) -> Self {
        Self::start_with_role(network, username, supernodes, device, status, Role::User).await
    }

    /// An online PSTN gateway: a client whose certificate says [`Role::Gateway`].
    pub async fn start_gateway(network: &TestNetwork, username: &str, supernodes: &[Multiaddr]) -> Self {
        Self::start_with_role(network, username, supernodes, DeviceKey::generate(), Some(PresenceStatus::Online), Role::Gateway)
            .await
    }

    pub async fn start_with_role(
        network: &TestNetwork,
        username: &str,
        supernodes: &[Multiaddr],
        device: DeviceKey,
        status: Option<PresenceStatus>,
        role: Role,
    ) -> Self {
        let mut host_cache = HostCache::default();
        for address in supernodes {
            host_cache.learn(&address.to_string());
        }
        if let Some(first) = supernodes.first() {
            host_cache.succeeded(&first.to_string(), None, koe_types::UnixTime::now());
        }
        let (node, handle, mut events) = ClientNode::new(ClientConfig {
            network: network.file.clone(),
            certificate: network.certificate_with_role(username, &device, role),
            device_key: device.clone(),
            status,
            host_cache,
            blocked: Vec::new(),
        })
        .unwrap();
        let task = tokio::spawn(node.run(std::future::pending()));
        let (parent_sender, parent) = watch::channel(None);
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    ClientEvent::Attached { parent } => {
                        let _ = parent_sender.send(Some(parent));
                    }
                    ClientEvent::Detached { .. } => {
                        let _ = parent_sender.send(None);
                    }
                    ClientEvent::Received { envelope, ack, .. } => {
                        sink.lock().unwrap().push(*envelope);
                        let _ = ack.send(Ok(()));
                    }
                    ClientEvent::HostCacheChanged(_) | ClientEvent::Unreachable { .. } => {}
                }
            }
        });
        Self { username: Username::parse_existing(username).unwrap(), device, handle, parent, received, task }
    }

    pub async fn wait_attached(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(parent) = self.parent.borrow().clone() {
                return parent;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{} did not attach within {timeout:?}", self.username);
            let _ = tokio::time::timeout(left, self.parent.changed()).await;
        }
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

/// Polls `lookup` until `target`'s device shows up, returning how long it took.
pub async fn wait_findable(from: &RunningClient, target: &RunningClient, timeout: Duration) -> Duration {
    wait_findable_where(from, target, timeout, |_| true).await
}

/// Polls `lookup` until `target`'s device shows up with a record that satisfies `accept`.
pub async fn wait_findable_where(
    from: &RunningClient,
    target: &RunningClient,
    timeout: Duration,
    accept: impl Fn(&koe_overlay::PresenceRecord) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(records) = from.handle.lookup(target.username.clone()).await {
            if records
                .iter()
                .any(|r| r.body().certificate.device_key() == &target.device.public_key() && accept(r))
            {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < timeout,
            "{} could not find {} within {timeout:?}",
            from.username,
            target.username
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The bare overlay protocol, for peers written for a test to misbehave.
pub type RawBehaviour =
    libp2p::request_response::cbor::Behaviour<koe_overlay::protocol::OverlayRequest, koe_overlay::protocol::OverlayResponse>;

/// A libp2p swarm that speaks only the overlay protocol, with `identity` as its key; requests
/// and idle connections last `patience`.
pub fn raw_overlay_swarm(identity: &DeviceKey, patience: Duration) -> libp2p::Swarm<RawBehaviour> {
    use libp2p::request_response::{self, ProtocolSupport};
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(identity.seed()).unwrap();
    libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(libp2p::tcp::Config::default(), libp2p::noise::Config::new, libp2p::yamux::Config::default)
        .unwrap()
        .with_behaviour(|_| {
            RawBehaviour::new(
                [(koe_overlay::protocol::OVERLAY_PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(patience),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(patience))
        .build()
}

/// A peer that sends whatever the test tells it to.
pub struct MisbehavingPeer {
    swarm: libp2p::Swarm<RawBehaviour>,
    target: libp2p::PeerId,
}

impl MisbehavingPeer {
    pub async fn connect(identity: &DeviceKey, supernode: &Multiaddr) -> Self {
        let mut swarm = raw_overlay_swarm(identity, Duration::from_secs(60));
        let Some(Protocol::P2p(target)) = supernode.iter().last() else { panic!("no /p2p in {supernode}") };
        swarm.dial(supernode.clone()).unwrap();
        loop {
            if let SwarmEvent::ConnectionEstablished { peer_id, .. } = swarm.select_next_some().await {
                if peer_id == target {
                    break;
                }
            }
        }
        Self { swarm, target }
    }

    pub async fn ask(&mut self, request: koe_overlay::protocol::OverlayRequest) -> koe_overlay::protocol::OverlayResponse {
        let id = self.swarm.behaviour_mut().send_request(&self.target, request);
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match self.swarm.select_next_some().await {
                    SwarmEvent::Behaviour(request_response::Event::Message {
                        message: request_response::Message::Response { request_id, response },
                        ..
                    }) if request_id == id => return response,
                    SwarmEvent::Behaviour(request_response::Event::OutboundFailure { request_id, error, .. })
                        if request_id == id =>
                    {
                        panic!("request failed: {error}")
                    }
                    _ => {}
                }
            }
        });
        answer.await.expect("the supernode answered in time")
    }
}
