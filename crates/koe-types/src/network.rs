//! The network file, `network.toml`: everything a client or node needs to join a Koe network,
//! all of it public. It names the network, says where the login server is and how to
//! recognise it (the SHA-256 fingerprint of its TLS certificate, pinned by clients), carries
//! the key that signs certificates, and lists bootstrap supernodes.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::keys::{KeyError, NetworkPublicKey};
use crate::name::{NameError, NetworkName};

pub const NETWORK_FILE_FORMAT: u32 = 1;

/// What is wrong inside a network file. The messages do not name the file: whoever read it
/// does, once. They carry their cause in the text and not as an error `source`, so that a
/// printed chain (anyhow's `{:#}`) does not say it twice.
#[derive(Debug, Error)]
pub enum NetworkFileError {
    /// Not TOML, or a field missing, unknown or of the wrong type; toml's text says which
    /// line and column.
    #[error("{}", .0.to_string().trim_end())]
    Toml(toml::de::Error),
    #[error("format {0} is not supported (this Koe reads format {NETWORK_FILE_FORMAT})")]
    UnsupportedFormat(u32),
    /// The error says "network name" itself.
    #[error("{0}")]
    Name(NameError),
    #[error("signing_key: {0}")]
    SigningKey(KeyError),
    #[error("login_url {0:?} must look like https://HOST:PORT")]
    LoginUrl(String),
    #[error("login_tls_fingerprint {0:?} must be sha256: followed by 64 hex digits")]
    Fingerprint(String),
}

/// The SHA-256 of a DER certificate, written `sha256:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TlsFingerprint(pub [u8; 32]);

impl TlsFingerprint {
    pub fn parse(text: &str) -> Option<Self> {
        let hex = text.trim().strip_prefix("sha256:")?;
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (index, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * index..2 * index + 2], 16).ok()?;
        }
        Some(Self(bytes))
    }
}

impl fmt::Display for TlsFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for TlsFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Where the login server listens: `https://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginUrl {
    pub host: String,
    pub port: u16,
}

impl LoginUrl {
    pub fn parse(text: &str) -> Option<Self> {
        let authority = text.trim().strip_prefix("https://")?.trim_end_matches('/');
        let (host, port) = authority.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || authority.contains('/') {
            return None;
        }
        Some(Self {
            host: host.to_string(),
            port: port.parse().ok()?,
        })
    }

    /// `HOST:PORT` as a socket address string (IPv6 hosts in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for LoginUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}", self.authority())
    }
}

/// A parsed and checked `network.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkFile {
    pub name: NetworkName,
    pub login_url: LoginUrl,
    pub login_tls_fingerprint: TlsFingerprint,
    pub signing_key: NetworkPublicKey,
    /// Multiaddrs of supernodes to join through; empty until a supernode is added.
    pub bootstrap: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkFileToml {
    format: u32,
    name: String,
    login_url: String,
    login_tls_fingerprint: String,
    signing_key: String,
    #[serde(default)]
    bootstrap: Vec<String>,
}

impl NetworkFile {
    pub fn from_toml(text: &str) -> Result<Self, NetworkFileError> {
        let raw: NetworkFileToml = toml::from_str(text).map_err(NetworkFileError::Toml)?;
        if raw.format != NETWORK_FILE_FORMAT {
            return Err(NetworkFileError::UnsupportedFormat(raw.format));
        }
        Ok(Self {
            name: NetworkName::parse(&raw.name).map_err(NetworkFileError::Name)?,
            login_url: LoginUrl::parse(&raw.login_url)
                .ok_or(NetworkFileError::LoginUrl(raw.login_url))?,
            login_tls_fingerprint: TlsFingerprint::parse(&raw.login_tls_fingerprint)
                .ok_or(NetworkFileError::Fingerprint(raw.login_tls_fingerprint))?,
            signing_key: NetworkPublicKey::parse(&raw.signing_key).map_err(NetworkFileError::SigningKey)?,
            bootstrap: raw.bootstrap,
        })
    }

    pub fn to_toml(&self) -> String {
        let raw = NetworkFileToml {
            format: NETWORK_FILE_FORMAT,
            name: self.name.to_string(),
            login_url: self.login_url.to_string(),
            login_tls_fingerprint: self.login_tls_fingerprint.to_string(),
            signing_key: self.signing_key.to_string(),
            bootstrap: self.bootstrap.clone(),
        };
        let body = toml::to_string(&raw).unwrap_or_else(|e| {
            unreachable!("a flat table of strings always serialises: {e}")
        });
        format!(
            "# Koe network file. It is public: give it to every client and supernode of \"{}\".\n{body}",
            self.name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NetworkSigningKey;

    fn sample() -> NetworkFile {
        NetworkFile {
            name: NetworkName::parse("koe-test").unwrap_or_else(|e| panic!("{e}")),
            login_url: LoginUrl {
                host: "login.example".into(),
                port: 7400,
            },
            login_tls_fingerprint: TlsFingerprint([0xab; 32]),
            signing_key: NetworkSigningKey::generate().public_key(),
            bootstrap: vec![],
        }
    }

    #[test]
    fn network_file_round_trips_through_toml() {
        let file = sample();
        assert_eq!(NetworkFile::from_toml(&file.to_toml()).ok(), Some(file));
    }

    #[test]
    fn broken_network_files_say_what_is_wrong() {
        let text = sample().to_toml();
        let broken = text.replace("https://login.example:7400", "http://x");
        assert!(matches!(
            NetworkFile::from_toml(&broken),
            Err(NetworkFileError::LoginUrl(_))
        ));
        let broken = text.replace("sha256:abab", "sha256:zzab");
        assert!(matches!(
            NetworkFile::from_toml(&broken),
            Err(NetworkFileError::Fingerprint(_))
        ));
        let broken = text.replace("format = 1", "format = 7");
        assert!(matches!(
            NetworkFile::from_toml(&broken),
            Err(NetworkFileError::UnsupportedFormat(7))
        ));
        assert!(matches!(
            NetworkFile::from_toml("\u{0}garbage"),
            Err(NetworkFileError::Toml(_))
        ));
    }

    #[test]
    fn errors_say_the_cause_once_and_leave_naming_the_file_to_the_caller() {
        let text = sample().to_toml();
        let cases = [
            ("garbage = [".to_string(), "invalid array"),
            (text.replace("signing_key = ", "signing_kee = "), "unknown field `signing_kee`"),
            (text.replace("ed25519:", "x25519:"), "expected a key starting with"),
            (text.replace("name = \"koe-test\"", "name = \"Koe Test\""), "network name may only contain"),
        ];
        for (broken, cause) in cases {
            let error = NetworkFile::from_toml(&broken)
                .err()
                .unwrap_or_else(|| panic!("{broken} parsed"));
            let message = error.to_string();
            assert_eq!(message.matches(cause).count(), 1, "{message}");
            assert!(!message.contains("network file"), "{message}");
            // The cause is in the message, so it is not also a source a chain would print again.
            assert!(std::error::Error::source(&error).is_none(), "{message}");
        }
    }

    #[test]
    fn login_urls_parse_hosts_and_ports() {
        assert_eq!(
            LoginUrl::parse("https://[::1]:7400").map(|u| u.authority()),
            Some("[::1]:7400".to_string())
        );
        assert_eq!(LoginUrl::parse("https://host"), None);
        assert_eq!(LoginUrl::parse("https://host:99999"), None);
    }
}
