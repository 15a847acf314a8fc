//! The login server and everything that talks to it.
//!
//! Owns the login server's JSON API ([`api`]), password hashing ([`password`]), rate limiting
//! against password guessing ([`rate_limit`]), the account stores behind one trait
//! ([`store`]: SQLite by default, PostgreSQL), TLS with certificate pinning ([`tls`]), the
//! HTTPS server ([`server`]), the client ([`client`]), when to renew a certificate
//! ([`renewal`]), and the creation of a new network's keys and files ([`network_init`]).
//! The login server only authenticates: after login, nobody needs it until renewal.

pub mod api;
pub mod client;
pub mod network_init;
pub mod password;
pub mod private_file;
pub mod rate_limit;
pub mod renewal;
pub mod server;
pub mod store;
pub mod tls;

pub use client::{LoginClient, LoginClientError};
pub use network_init::{create_network, LoginServerSecrets, NetworkInitError};
pub use server::{LoginServer, LoginServerConfig};
pub use store::{open_store, AccountStore, StoreError};
