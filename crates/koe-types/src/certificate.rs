//! The certificate: the login server's signed statement that a username owns a device key for a
//! while. Peers check it offline with the network's public key from `network.toml`.
//!
//! Encoding (version 1), all integers big-endian:
//! `version u8 | network len u8 + bytes | username len u8 + bytes | device key [32] |
//!  not_before u64 | not_after u64 | serial u64 | signature [64]`.
//! The signature covers `SIGNING_CONTEXT` followed by everything before the signature, so a
//! certificate signature can never be replayed as a signature over some other Koe message.

use std::time::Duration;

use koe_wire::{put_short_bytes, put_u64, put_u8, Codec, DecodeError, Reader};
use thiserror::Error;

use crate::keys::{DevicePublicKey, NetworkPublicKey, NetworkSigningKey, SIGNATURE_BYTES};
use crate::name::{NameError, NetworkName, Username};
use crate::time::UnixTime;

pub const CERTIFICATE_VERSION: u8 = 1;
/// How far clocks may disagree before a certificate counts as not yet valid or expired.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);
const SIGNING_CONTEXT: &[u8] = b"koe certificate v1\0";

/// What the login server vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateBody {
    pub network: NetworkName,
    pub username: Username,
    pub device_key: DevicePublicKey,
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    pub serial: u64,
}

/// A [`CertificateBody`] with the login server's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    body: CertificateBody,
    signature: [u8; SIGNATURE_BYTES],
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CertificateError {
    #[error("malformed certificate: {0}")]
    Malformed(#[from] DecodeError),
    #[error("certificate is for network {found:?}, not {expected:?}")]
    WrongNetwork { expected: String, found: String },
    #[error("certificate signature is not valid for this network's signing key")]
    BadSignature,
    #[error("certificate is not valid before {not_before}")]
    NotYetValid { not_before: UnixTime },
    #[error("certificate expired at {not_after}")]
    Expired { not_after: UnixTime },
    #[error("certificate validity window is empty")]
    EmptyValidity,
    #[error("certificate username is invalid: {0}")]
    InvalidUsername(#[from] NameError),
}

impl CertificateBody {
    /// Signs this body with the network's key.
    pub fn sign(self, key: &NetworkSigningKey) -> Certificate {
        let signature = key.sign(&self.signed_bytes());
        Certificate {
            body: self,
            signature,
        }
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut message = SIGNING_CONTEXT.to_vec();
        self.encode(&mut message);
        message
    }
}

impl Certificate {
    pub fn body(&self) -> &CertificateBody {
        &self.body
    }

    pub fn username(&self) -> &Username {
        &self.body.username
    }

    pub fn device_key(&self) -> &DevicePublicKey {
        &self.body.device_key
    }

    pub fn not_after(&self) -> UnixTime {
        self.body.not_after
    }

    /// Checks everything a peer must check before trusting this certificate at `now`:
    /// the network, the signature, the validity window (with [`CLOCK_SKEW_ALLOWANCE`]) and the
    /// username rules.
    pub fn verify(
        &self,
        network: &NetworkName,
        network_key: &NetworkPublicKey,
        now: UnixTime,
    ) -> Result<(), CertificateError> {
        let body = &self.body;
        if &body.network != network {
            return Err(CertificateError::WrongNetwork {
                expected: network.to_string(),
                found: body.network.to_string(),
            });
        }
        if !network_key.verify(&body.signed_bytes(), &self.signature) {
            return Err(CertificateError::BadSignature);
        }
        if body.not_after <= body.not_before {
            return Err(CertificateError::EmptyValidity);
        }
        if now.saturating_add(CLOCK_SKEW_ALLOWANCE) < body.not_before {
            return Err(CertificateError::NotYetValid {
                not_before: body.not_before,
            });
        }
        if now.saturating_sub(CLOCK_SKEW_ALLOWANCE) > body.not_after {
            return Err(CertificateError::Expired {
                not_after: body.not_after,
            });
        }
        Username::parse_existing(body.username.as_str())?;
        Ok(())
    }
}

impl Codec for CertificateBody {
    fn encode(&self, out: &mut Vec<u8>) {
        put_u8(out, CERTIFICATE_VERSION);
        put_short_bytes(out, self.network.as_str().as_bytes());
        put_short_bytes(out, self.username.as_str().as_bytes());
        out.extend_from_slice(&self.device_key.to_bytes());
        put_u64(out, self.not_before.as_secs());
        put_u64(out, self.not_after.as_secs());
        put_u64(out, self.serial);
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let version = reader.u8()?;
        if version != CERTIFICATE_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "certificate",
                version,
            });
        }
        let network = canonical_name(reader.short_str("network name")?, "network name", |s| {
            NetworkName::parse(s).map(|n| (n.as_str() == s, n))
        })?;
        let username = canonical_name(reader.short_str("username")?, "username", |s| {
            Username::parse_existing(s).map(|u| (u.as_str() == s, u))
        })?;
        let device_key = DevicePublicKey::from_bytes(&reader.array()?).map_err(|_| {
            DecodeError::Invalid {
                what: "device key",
                reason: "not an Ed25519 public key",
            }
        })?;
        Ok(Self {
            network,
            username,
            device_key,
            not_before: UnixTime(reader.u64()?),
            not_after: UnixTime(reader.u64()?),
            serial: reader.u64()?,
        })
    }
}

/// Parses a name and insists it is already in canonical (case-folded) form, so that decoding
/// and re-encoding give back the signed bytes.
fn canonical_name<T>(
    text: &str,
    what: &'static str,
    parse: impl Fn(&str) -> Result<(bool, T), NameError>,
) -> Result<T, DecodeError> {
    match parse(text) {
        Ok((true, name)) => Ok(name),
        Ok((false, _)) => Err(DecodeError::Invalid {
            what,
            reason: "not in canonical lower case",
        }),
        Err(_) => Err(DecodeError::Invalid {
            what,
            reason: "breaks the naming rules",
        }),
    }
}

impl Codec for Certificate {
    fn encode(&self, out: &mut Vec<u8>) {
        self.body.encode(out);
        out.extend_from_slice(&self.signature);
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            body: CertificateBody::decode(reader)?,
            signature: reader.array()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::DeviceKey;
    use proptest::prelude::*;

    const NOW: UnixTime = UnixTime(1_800_000_000);

    fn network() -> NetworkName {
        NetworkName::parse("koe-test").unwrap_or_else(|e| panic!("{e}"))
    }

    fn body(username: &str) -> CertificateBody {
        CertificateBody {
            network: network(),
            username: Username::parse(username).unwrap_or_else(|e| panic!("{e}")),
            device_key: DeviceKey::generate().public_key(),
            not_before: NOW,
            not_after: NOW.saturating_add(Duration::from_secs(86_400)),
            serial: 42,
        }
    }

    #[test]
    fn a_signed_certificate_verifies_and_round_trips() {
        let key = NetworkSigningKey::generate();
        let certificate = body("alice").sign(&key);
        assert_eq!(certificate.verify(&network(), &key.public_key(), NOW), Ok(()));
        let bytes = certificate.to_bytes();
        assert_eq!(Certificate::from_bytes(&bytes), Ok(certificate));
    }

    #[test]
    fn a_certificate_signed_by_another_network_key_is_refused() {
        let certificate = body("alice").sign(&NetworkSigningKey::generate());
        let other = NetworkSigningKey::generate().public_key();
        assert_eq!(
            certificate.verify(&network(), &other, NOW),
            Err(CertificateError::BadSignature)
        );
    }

    #[test]
    fn a_certificate_for_another_network_name_is_refused() {
        let key = NetworkSigningKey::generate();
        let certificate = body("alice").sign(&key);
        let other = NetworkName::parse("elsewhere").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            certificate.verify(&other, &key.public_key(), NOW),
            Err(CertificateError::WrongNetwork { .. })
        ));
    }

    #[test]
    fn every_tampered_byte_breaks_the_certificate() {
        let key = NetworkSigningKey::generate();
        let bytes = body("alice").sign(&key).to_bytes();
        for index in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[index] ^= 0x01;
            let accepted = Certificate::from_bytes(&tampered)
                .map(|c| c.verify(&network(), &key.public_key(), NOW).is_ok())
                .unwrap_or(false);
            assert!(!accepted, "flipping byte {index} was not noticed");
        }
    }

    #[test]
    fn validity_window_allows_small_clock_skew_only() {
        let key = NetworkSigningKey::generate();
        let certificate = body("alice").sign(&key);
        let verify = |now| certificate.verify(&network(), &key.public_key(), now);
        let skew = CLOCK_SKEW_ALLOWANCE;
        assert_eq!(verify(NOW.saturating_sub(skew)), Ok(()));
        assert!(matches!(
            verify(NOW.saturating_sub(skew + Duration::from_secs(1))),
            Err(CertificateError::NotYetValid { .. })
        ));
        let end = certificate.not_after();
        assert_eq!(verify(end.saturating_add(skew)), Ok(()));
        assert!(matches!(
            verify(end.saturating_add(skew + Duration::from_secs(1))),
            Err(CertificateError::Expired { .. })
        ));
    }

    #[test]
    fn non_canonical_and_truncated_encodings_are_refused() {
        let key = NetworkSigningKey::generate();
        let mut bytes = body("alice").sign(&key).to_bytes();
        for length in 0..bytes.len() {
            assert!(Certificate::from_bytes(&bytes[..length]).is_err());
        }
        // "alice" starts at offset 1 (version) + 1 + 8 ("koe-test") + 1 (length).
        bytes[11] = b'A';
        assert!(matches!(
            Certificate::from_bytes(&bytes),
            Err(DecodeError::Invalid { what: "username", .. })
        ));
        let mut longer = body("alice").sign(&key).to_bytes();
        longer.push(0);
        assert_eq!(
            Certificate::from_bytes(&longer),
            Err(DecodeError::TrailingBytes(1))
        );
        let mut version = body("alice").sign(&key).to_bytes();
        version[0] = 9;
        assert!(matches!(
            Certificate::from_bytes(&version),
            Err(DecodeError::UnsupportedVersion { version: 9, .. })
        ));
    }

    proptest! {
        #[test]
        fn any_valid_certificate_round_trips(
            username in "[a-z][a-z0-9._-]{2,31}",
            not_before in 0u64..u64::MAX / 2,
            lifetime in 1u64..1_000_000,
            serial: u64,
            seed: [u8; 32],
        ) {
            let certificate = CertificateBody {
                network: network(),
                username: Username::parse_existing(&username).unwrap_or_else(|e| panic!("{e}")),
                device_key: DeviceKey::from_seed(seed).public_key(),
                not_before: UnixTime(not_before),
                not_after: UnixTime(not_before + lifetime),
                serial,
            }
            .sign(&NetworkSigningKey::from_seed(seed));
            let bytes = certificate.to_bytes();
            let decoded = Certificate::from_bytes(&bytes)?;
            prop_assert_eq!(&decoded, &certificate);
            prop_assert_eq!(decoded.to_bytes(), bytes);
        }

        #[test]
        fn garbage_never_panics_and_reencodes_exactly(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(certificate) = Certificate::from_bytes(&bytes) {
                prop_assert_eq!(certificate.to_bytes(), bytes);
            }
        }
    }
}
