//! Koe's identity types, shared by every role and free of IO.
//!
//! Owns usernames and network names with their rules, Ed25519 device and network keys, the
//! certificate the login server signs to bind a username to a device key (and the [`Role`] the
//! network trusts it with), the public network file (`network.toml`), Unix time as the
//! protocols see it, and the [`Pii`] wrapper that keeps secrets and personal data out of logs.

pub mod certificate;
pub mod keys;
pub mod name;
pub mod network;
pub mod pii;
pub mod time;

pub use certificate::{
    Certificate, CertificateBody, CertificateError, Role, CERTIFICATE_VERSION,
    CERTIFICATE_VERSION_WITH_ROLE,
};
pub use keys::{DeviceKey, DevicePublicKey, KeyError, NetworkPublicKey, NetworkSigningKey};
pub use name::{NameError, NetworkName, Username};
pub use network::{NetworkFile, NetworkFileError};
pub use pii::Pii;
pub use time::UnixTime;
