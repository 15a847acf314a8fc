//! Koe's relay node: a standard TURN server (RFC 8656) on UDP, TCP and TLS, built on
//! turn-server-proto, with the credentials, quotas and peer policy a public relay needs.
//!
//! - [`core`]: the sans-IO relay (protocol servers, quotas, framing, credentials checks).
//! - [`driver`]: the tokio sockets around it.
//! - [`credentials`]: short-lived credentials supernodes hand to logged-in users.
//! - [`framing`]: TURN over a byte stream.
//! - [`send_queue`]: what waits to be written to a stream, the oldest voice dropped first when
//!   the path falls behind (the relay's and the client's).

pub mod core;
pub mod credentials;
pub mod driver;
pub mod framing;
pub mod send_queue;

pub use crate::core::{RelayPolicy, RelayStats};
pub use credentials::{RelayCredentials, RelaySecret};
pub use driver::{start_relay, RelayConfig, RelayError, RelayHandle, RelayStatsHandle, RelayTlsIdentity};
