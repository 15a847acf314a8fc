//! Koe's overlay: how users find each other and reach each other.
//!
//! Sans-IO cores: signed [`presence`] records and the supernode's share of the global index
//! ([`index`]), with the gateway [`directory`] key under which PSTN gateways are listed,
//! end-to-end [`envelope`]s with replay protection, offline messages and the
//! device records they are sealed to ([`mailbox`], kept on disk by [`mailbox_store`]), the
//! client's [`host_cache`] of supernodes, and the request/response messages of the overlay
//! [`protocol`]. The libp2p
//! drivers that run them are [`supernode`] (`koe node`) and [`client`] (`koe up`).

pub mod client;
pub mod directory;
pub mod envelope;
pub mod host_cache;
pub mod index;
pub mod log_budget;
pub mod mailbox;
pub mod mailbox_store;
pub mod presence;
pub mod metrics;
pub mod protocol;
pub mod supernode;
mod proxy_transport;
mod swarm;

pub use directory::{gateway_directory, GATEWAY_DIRECTORY};
pub use envelope::{Envelope, EnvelopeError, EnvelopeKey, OpenedEnvelope, ReplayGuard};
pub use index::{PresenceIndex, StoreOutcome};
pub use presence::{
    index_key, ParentSupernode, PresenceBody, PresenceError, PresenceRecord, PresenceStatus,
};
pub use libp2p::multiaddr::Protocol as multiaddr_protocol;
pub use libp2p::{Multiaddr, PeerId};
pub use protocol::RelayOffer;
pub use supernode::RelayIssuer;
pub use swarm::SwarmError;
