//! Koe's overlay: how users find each other and reach each other.
//!
//! Sans-IO cores: signed [`presence`] records and the supernode's share of the global index
//! ([`index`]), end-to-end [`envelope`]s with replay protection, and the client's
//! [`host_cache`] of supernodes.

pub mod envelope;
pub mod host_cache;
pub mod index;
pub mod presence;

pub use envelope::{Envelope, EnvelopeError, EnvelopeKey, OpenedEnvelope, ReplayGuard};
pub use index::{PresenceIndex, StoreOutcome};
pub use presence::{
    index_key, ParentSupernode, PresenceBody, PresenceError, PresenceRecord, PresenceStatus,
};
