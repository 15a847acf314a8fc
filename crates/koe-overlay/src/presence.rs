//! Presence records: a device's signed statement "I am online with this status, reachable
//! through this parent supernode, until this time". Supernodes store them in the global
//! index under [`index_key`] of the username (a gateway's also under the gateway
//! [`directory`](crate::directory)'s) and validate every one before storing it, so a
//! supernode can drop presence but never forge it.
//!
//! Encoding (version 1): `version u8 | certificate | status u8 | envelope key [32] |
//! parent peer id (u8 len + bytes) | address count u8 + (u8 len + UTF-8) each | sequence u64 |
//! expires_at u64 | signature [64]`, the signature by the certificate's device key over
//! `SIGNING_CONTEXT` and everything before it.

use std::fmt;
use std::time::Duration;

use koe_types::{Certificate, CertificateError, DeviceKey, NetworkName, NetworkPublicKey, Role, UnixTime, Username};
use koe_wire::{put_short_bytes, put_u64, put_u8, Codec, DecodeError, Reader};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::directory::GATEWAY_DIRECTORY;

pub const PRESENCE_VERSION: u8 = 1;
/// A record larger than this is refused before it is even decoded.
pub const MAX_PRESENCE_RECORD_BYTES: usize = 1024;
/// Records claiming to live longer than this are refused: presence must be republished.
pub const MAX_PRESENCE_LIFETIME: Duration = Duration::from_secs(10 * 60);
pub const MAX_PARENT_ADDRESSES: usize = 8;
const SIGNING_CONTEXT: &[u8] = b"koe presence v1\0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PresenceStatus {
    Online,
    Away,
    DoNotDisturb,
    /// Withdrawn: the device is not online (it went away, or is invisible). Such a record
    /// replaces the device's earlier ones in the index until it expires, so a replica cannot
    /// keep showing a device online that has left; lookups never return it as a device.
    Offline,
}

impl PresenceStatus {
    fn to_byte(self) -> u8 {
        match self {
            Self::Online => 1,
            Self::Away => 2,
            Self::DoNotDisturb => 3,
            Self::Offline => 4,
        }
    }

    fn from_byte(byte: u8) -> Result<Self, DecodeError> {
        match byte {
            1 => Ok(Self::Online),
            2 => Ok(Self::Away),
            3 => Ok(Self::DoNotDisturb),
            4 => Ok(Self::Offline),
            _ => Err(DecodeError::Invalid {
                what: "presence status",
                reason: "unknown value",
            }),
        }
    }
}

impl fmt::Display for PresenceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Online => "online",
            Self::Away => "away",
            Self::DoNotDisturb => "do-not-disturb",
            Self::Offline => "offline",
        })
    }
}

/// Where a device is attached: its parent supernode's libp2p peer id and addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentSupernode {
    pub peer_id: Vec<u8>,
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceBody {
    pub certificate: Certificate,
    pub status: PresenceStatus,
    /// X25519 public key that envelopes to this device are sealed to.
    pub envelope_key: [u8; 32],
    pub parent: ParentSupernode,
    /// Strictly increasing per device: a record never replaces a newer one.
    pub sequence: u64,
    pub expires_at: UnixTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceRecord {
    body: PresenceBody,
    signature: [u8; 64],
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PresenceError {
    #[error("presence record of {0} bytes is larger than {MAX_PRESENCE_RECORD_BYTES}")]
    TooLarge(usize),
    #[error("malformed presence record: {0}")]
    Malformed(#[from] DecodeError),
    #[error("presence record carries a bad certificate: {0}")]
    Certificate(#[from] CertificateError),
    #[error("presence record is not signed by the certificate's device key")]
    BadSignature,
    #[error("presence record expired at {0}")]
    Expired(UnixTime),
    #[error("presence record claims to live until {0}, too far ahead")]
    TooLongLived(UnixTime),
    #[error("presence record sequence {offered} is not newer than {held}")]
    Stale { offered: u64, held: u64 },
    /// Under the gateway directory, from a certificate that is not a gateway's.
    #[error("only gateways are listed under {GATEWAY_DIRECTORY:?}; this presence is a {0}'s")]
    NotAGateway(Role),
    /// Under a key that is neither the record's username nor (for a gateway) the directory.
    #[error("presence of {user} is not kept under {key}")]
    ForeignKey { user: Username, key: Username },
}

impl PresenceError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "oversized",
            Self::Malformed(_) => "malformed",
            Self::Certificate(CertificateError::Expired { .. }) => "expired",
            Self::Certificate(_) => "bad_certificate",
            Self::BadSignature => "forged",
            Self::Expired(_) | Self::TooLongLived(_) => "expired",
            Self::Stale { .. } => "replayed",
            Self::NotAGateway(_) => "not_a_gateway",
            Self::ForeignKey { .. } => "foreign_key",
        }
    }
}

/// The global-index key of a username: SHA-256 with a context string, so index keys cannot be
/// confused with any other hash in the DHT.
pub fn index_key(username: &Username) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"koe presence key v1\0");
    hasher.update(username.as_str().as_bytes());
    hasher.finalize().into()
}

impl PresenceBody {
    pub fn sign(self, device_key: &DeviceKey) -> PresenceRecord {
        let signature = device_key.sign(&self.signed_bytes());
        PresenceRecord {
            body: self,
            signature,
        }
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = SIGNING_CONTEXT.to_vec();
        self.encode(&mut bytes);
        bytes
    }
}

impl PresenceRecord {
    pub fn body(&self) -> &PresenceBody {
        &self.body
    }

    pub fn username(&self) -> &Username {
        self.body.certificate.username()
    }

    /// Whether this record shows its device online (in any status but withdrawn).
    pub fn is_online(&self) -> bool {
        self.body.status != PresenceStatus::Offline
    }

    /// Whether `self` is a withdrawal of the device that signed `current`: the same device,
    /// [`PresenceStatus::Offline`], and newer. A client hands its parent one with every
    /// publish, signed in advance, for the parent to publish when the client's connection
    /// closes (only the device can sign its records).
    pub fn withdraws(&self, current: &PresenceRecord) -> bool {
        self.body.status == PresenceStatus::Offline
            && self.body.certificate.device_key() == current.body.certificate.device_key()
            && self.body.sequence > current.body.sequence
    }

    /// Decodes and checks a record received from the network: size, encoding, certificate,
    /// signature and lifetime.
    pub fn decode_verified(
        bytes: &[u8],
        network: &NetworkName,
        network_key: &NetworkPublicKey,
        now: UnixTime,
    ) -> Result<Self, PresenceError> {
        if bytes.len() > MAX_PRESENCE_RECORD_BYTES {
            return Err(PresenceError::TooLarge(bytes.len()));
        }
        let record = Self::from_bytes(bytes)?;
        record.verify(network, network_key, now)?;
        Ok(record)
    }

    pub fn verify(
        &self,
        network: &NetworkName,
        network_key: &NetworkPublicKey,
        now: UnixTime,
    ) -> Result<(), PresenceError> {
        let body = &self.body;
        body.certificate.verify(network, network_key, now)?;
        if !body
            .certificate
            .device_key()
            .verify(&body.signed_bytes(), &self.signature)
        {
            return Err(PresenceError::BadSignature);
        }
        if body.expires_at <= now {
            return Err(PresenceError::Expired(body.expires_at));
        }
        if now.until(body.expires_at) > MAX_PRESENCE_LIFETIME {
            return Err(PresenceError::TooLongLived(body.expires_at));
        }
        Ok(())
    }
}

impl Codec for PresenceBody {
    fn encode(&self, out: &mut Vec<u8>) {
        put_u8(out, PRESENCE_VERSION);
        self.certificate.encode(out);
        put_u8(out, self.status.to_byte());
        out.extend_from_slice(&self.envelope_key);
        put_short_bytes(out, &self.parent.peer_id);
        let addresses = &self.parent.addresses[..self.parent.addresses.len().min(MAX_PARENT_ADDRESSES)];
        put_u8(out, addresses.len() as u8);
        for address in addresses {
            put_short_bytes(out, address.as_bytes());
        }
        put_u64(out, self.sequence);
        put_u64(out, self.expires_at.as_secs());
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let version = reader.u8()?;
        if version != PRESENCE_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "presence record",
                version,
            });
        }
        let certificate = Certificate::decode(reader)?;
        let status = PresenceStatus::from_byte(reader.u8()?)?;
        let envelope_key = reader.array()?;
        let peer_id = reader.short_bytes()?.to_vec();
        let count = reader.u8()? as usize;
        if count > MAX_PARENT_ADDRESSES {
            return Err(DecodeError::Invalid {
                what: "parent addresses",
                reason: "too many",
            });
        }
        let addresses = (0..count)
            .map(|_| reader.short_str("parent address").map(str::to_string))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            certificate,
            status,
            envelope_key,
            parent: ParentSupernode { peer_id, addresses },
            sequence: reader.u64()?,
            expires_at: UnixTime(reader.u64()?),
        })
    }
}

impl Codec for PresenceRecord {
    fn encode(&self, out: &mut Vec<u8>) {
        self.body.encode(out);
        out.extend_from_slice(&self.signature);
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            body: PresenceBody::decode(reader)?,
            signature: reader.array()?,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use koe_types::{CertificateBody, NetworkSigningKey};

    pub const NOW: UnixTime = UnixTime(1_800_000_000);

    pub struct TestNetwork {
        pub name: NetworkName,
        pub key: NetworkSigningKey,
    }

    impl TestNetwork {
        pub fn new() -> Self {
            Self {
                name: NetworkName::parse("koe-test").unwrap_or_else(|e| panic!("{e}")),
                key: NetworkSigningKey::generate(),
            }
        }

        pub fn certificate(&self, username: &str, device: &DeviceKey) -> Certificate {
            Username::parse(username).unwrap_or_else(|e| panic!("{e}"));
            self.certificate_with_role(username, device, Role::User)
        }

        /// A certificate as the login server issues it to a service account: reserved names pass.
        pub fn certificate_with_role(&self, username: &str, device: &DeviceKey, role: Role) -> Certificate {
            CertificateBody {
                network: self.name.clone(),
                username: Username::parse_existing(username).unwrap_or_else(|e| panic!("{e}")),
                device_key: device.public_key(),
                not_before: NOW.saturating_sub(Duration::from_secs(60)),
                not_after: NOW.saturating_add(Duration::from_secs(86_400)),
                serial: 1,
                role,
            }
            .sign(&self.key)
        }

        pub fn record(&self, username: &str, device: &DeviceKey, sequence: u64) -> PresenceRecord {
            Username::parse(username).unwrap_or_else(|e| panic!("{e}"));
            self.record_with_role(username, device, sequence, Role::User)
        }

        pub fn record_with_role(&self, username: &str, device: &DeviceKey, sequence: u64, role: Role) -> PresenceRecord {
            PresenceBody {
                certificate: self.certificate_with_role(username, device, role),
                status: PresenceStatus::Online,
                envelope_key: [9; 32],
                parent: ParentSupernode {
                    peer_id: vec![1, 2, 3],
                    addresses: vec!["/ip4/127.0.0.1/tcp/4001".into()],
                },
                sequence,
                expires_at: NOW.saturating_add(Duration::from_secs(120)),
            }
            .sign(device)
        }

        pub fn verify(&self, bytes: &[u8]) -> Result<PresenceRecord, PresenceError> {
            PresenceRecord::decode_verified(bytes, &self.name, &self.key.public_key(), NOW)
        }
    }

    #[test]
    fn a_signed_record_verifies_and_round_trips() {
        let network = TestNetwork::new();
        let record = network.record("alice", &DeviceKey::generate(), 1);
        let bytes = record.to_bytes();
        assert!(bytes.len() < MAX_PRESENCE_RECORD_BYTES);
        assert_eq!(network.verify(&bytes), Ok(record));
    }

    #[test]
    fn a_record_signed_by_another_device_is_forged() {
        let network = TestNetwork::new();
        let alice = DeviceKey::generate();
        let body = network.record("alice", &alice, 1).body().clone();
        let forged = body.sign(&DeviceKey::generate());
        assert_eq!(network.verify(&forged.to_bytes()), Err(PresenceError::BadSignature));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let network = TestNetwork::new();
        let bytes = network.record("alice", &DeviceKey::generate(), 1).to_bytes();
        for index in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[index] ^= 0x20;
            assert!(network.verify(&tampered).is_err(), "byte {index}");
        }
    }

    #[test]
    fn expired_long_lived_oversized_and_foreign_records_are_refused() {
        let network = TestNetwork::new();
        let device = DeviceKey::generate();
        let mut body = network.record("alice", &device, 1).body().clone();
        body.expires_at = NOW;
        assert!(matches!(
            network.verify(&body.clone().sign(&device).to_bytes()),
            Err(PresenceError::Expired(_))
        ));
        body.expires_at = NOW.saturating_add(Duration::from_secs(3600));
        assert!(matches!(
            network.verify(&body.sign(&device).to_bytes()),
            Err(PresenceError::TooLongLived(_))
        ));
        assert!(matches!(network.verify(&vec![1; 5000]), Err(PresenceError::TooLarge(5000))));
        let other = TestNetwork::new();
        let foreign = other.record("alice", &device, 1);
        assert!(matches!(
            network.verify(&foreign.to_bytes()),
            Err(PresenceError::Certificate(_))
        ));
    }
}
