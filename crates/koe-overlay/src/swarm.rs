//! The libp2p stack shared by supernodes and clients: TCP + Noise + Yamux, Kademlia (server
//! mode on supernodes, absent on clients, which leave the DHT to their parent), ping, and
//! request-response for the overlay protocol. There is no identify: its per-connection
//! handler alone cost a supernode ~3.4 KiB per attached client, and the one thing it did
//! here (telling a supernode where another listens) is the overlay's `Hello` (ADR 0003).

use std::time::Duration;

use koe_types::DeviceKey;
use libp2p::kad::store::MemoryStore;
use libp2p::request_response::{self, cbor, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{kad, noise, ping, tcp, yamux, Swarm};

use crate::protocol::{
    OverlayRequest, OverlayResponse, KADEMLIA_PROTOCOL, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES,
    OVERLAY_PROTOCOL,
};

/// How often connections are pinged; a parent that stops answering without closing its
/// connection is noticed within `PING_INTERVAL + PING_TIMEOUT`. (A parent that crashes closes
/// its TCP connections and is noticed at once.)
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Reported ping failures in a row before a connection is given up. libp2p's ping keeps the
/// first failure of a run to itself, so 2 reported are 3 pings lost in a row (about 30 s from
/// a peer's last answer). One lost ping on a busy machine is not a dead peer, and dropping busy
/// peers only makes everyone busier; a peer that crashes closes its TCP connections and is
/// noticed at once anyway.
pub const PING_FAILURES_BEFORE_DISCONNECT: u32 = 2;
/// Client connections to their parent are kept open as long as both live.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(NetworkBehaviour)]
pub(crate) struct OverlayBehaviour {
    pub kad: Toggle<kad::Behaviour<MemoryStore>>,
    pub ping: ping::Behaviour,
    pub overlay: cbor::Behaviour<OverlayRequest, OverlayResponse>,
}

#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("cannot build the libp2p transport: {0}")]
    Transport(String),
}

/// Builds the swarm for `identity`; `supernode` turns on Kademlia in server mode. A client
/// whose process has an HTTP proxy configured (`koe_proxy`) dials through it.
pub(crate) fn build(identity: &DeviceKey, supernode: bool) -> Result<Swarm<OverlayBehaviour>, SwarmError> {
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(identity.seed())
        .map_err(|e| SwarmError::Transport(e.to_string()))?;
    let transport_error = |e: &dyn std::fmt::Display| SwarmError::Transport(e.to_string());
    let behaviour = move |key: &libp2p::identity::Keypair| overlay_behaviour(key, supernode);
    let config = |config: libp2p::swarm::Config| config.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT);
    if !supernode && koe_proxy::configured() {
        use libp2p::core::Transport as _;
        return Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_other_transport(|key| {
                let noise = noise::Config::new(key)?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    crate::proxy_transport::ProxiedTcp
                        .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default()),
                )
            })
            .map_err(|e| transport_error(&e))?
            .with_behaviour(behaviour)
            .map_err(|e| transport_error(&e))?
            .with_swarm_config(config)
            .build());
    }
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| transport_error(&e))?
        .with_behaviour(behaviour)
        .map_err(|e| transport_error(&e))?
        .with_swarm_config(config)
        .build();
    Ok(swarm)
}

fn overlay_behaviour(key: &libp2p::identity::Keypair, supernode: bool) -> OverlayBehaviour {
    let peer_id = key.public().to_peer_id();
    let kad = supernode.then(|| {
        let mut config = kad::Config::new(KADEMLIA_PROTOCOL);
        config.set_query_timeout(Duration::from_secs(10));
        config.set_periodic_bootstrap_interval(Some(Duration::from_secs(60)));
        let mut kad =
            kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), config);
        kad.set_mode(Some(kad::Mode::Server));
        kad
    });
    let codec = cbor::codec::Codec::default()
        .set_request_size_maximum(MAX_REQUEST_BYTES)
        .set_response_size_maximum(MAX_RESPONSE_BYTES);
    OverlayBehaviour {
        kad: kad.into(),
        ping: ping::Behaviour::new(
            ping::Config::new()
                .with_interval(PING_INTERVAL)
                .with_timeout(PING_TIMEOUT),
        ),
        overlay: request_response::Behaviour::with_codec(
            codec,
            [(OVERLAY_PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(REQUEST_TIMEOUT)
                .with_max_concurrent_streams(1024),
        ),
    }
}

