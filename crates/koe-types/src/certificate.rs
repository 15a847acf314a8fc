//! The certificate: the login server's signed statement that a username owns a device key for a
//! while. Peers check it offline with the network's public key from `network.toml`.
//!
//! It also carries the identity's [`Role`]: almost everyone is a [`Role::User`]; an
//! operator's service account may hold another role (a PSTN gateway), and clients believe
//! prices, balances and bills only from a certificate with the gateway role of their network.
//!
//! Encoding, all integers big-endian. Version 1, for [`Role::User`] (byte for byte what Koe
//! wrote before roles existed, so older peers and certificates keep working):
//! `version u8 = 1 | network len u8 + bytes | username len u8 + bytes | device key [32] |
//!  not_before u64 | not_after u64 | serial u64 | signature [64]`.
//! Version 2, for every other role: version 1 with a role byte after the version:
//! `version u8 = 2 | role u8 | network len u8 + bytes | … | signature [64]`,
//! role 1 = gateway. Role 0 (user) is never written as version 2, and decoding refuses it,
//! so each certificate has exactly one encoding.
//! The signature covers `SIGNING_CONTEXT` followed by everything before the signature (the
//! version and role byte included), so a certificate signature can never be replayed as a
//! signature over some other Koe message, nor over the same body with another role.

use std::time::Duration;

use koe_wire::{put_short_bytes, put_u64, put_u8, Codec, DecodeError, Reader};
use thiserror::Error;

use crate::keys::{DevicePublicKey, NetworkPublicKey, NetworkSigningKey, SIGNATURE_BYTES};
use crate::name::{NameError, NetworkName, Username};
use crate::time::UnixTime;

/// The encoding of a [`Role::User`] certificate (the only one before roles existed).
pub const CERTIFICATE_VERSION: u8 = 1;
/// The encoding of a certificate with any other role: version 1 plus a role byte.
pub const CERTIFICATE_VERSION_WITH_ROLE: u8 = 2;
/// How far clocks may disagree before a certificate counts as not yet valid or expired.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);
const SIGNING_CONTEXT: &[u8] = b"koe certificate v1\0";

/// What the network trusts an identity with, beyond being someone to call. The login server
/// writes each account's role into its certificates.
///
/// A new role needs a wire code here (never reuse one) and a name; certificates with it are
/// version 2, which older peers refuse as malformed rather than mistake for a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// A person (or a service such as echo123 that needs no special trust).
    #[default]
    User,
    /// An operator's PSTN gateway: its prices, balances and bills are believed.
    Gateway,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::User, Role::Gateway];

    /// The name used in the account database and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Gateway => "gateway",
        }
    }

    /// The inverse of [`Role::as_str`].
    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == name)
    }

    /// The role byte of a version 2 certificate.
    fn wire_code(self) -> u8 {
        match self {
            Role::User => 0,
            Role::Gateway => 1,
        }
    }

    fn from_wire_code(code: u8) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.wire_code() == code)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the login server vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateBody {
    pub network: NetworkName,
    pub username: Username,
    pub device_key: DevicePublicKey,
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    pub serial: u64,
    /// Covered by the signature like every other field.
    pub role: Role,
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

    /// What the network trusts this identity with; check [`Certificate::verify`] first.
    pub fn role(&self) -> Role {
        self.body.role
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
        match self.role {
            Role::User => put_u8(out, CERTIFICATE_VERSION),
            role => {
                put_u8(out, CERTIFICATE_VERSION_WITH_ROLE);
                put_u8(out, role.wire_code());
            }
        }
        put_short_bytes(out, self.network.as_str().as_bytes());
        put_short_bytes(out, self.username.as_str().as_bytes());
        out.extend_from_slice(&self.device_key.to_bytes());
        put_u64(out, self.not_before.as_secs());
        put_u64(out, self.not_after.as_secs());
        put_u64(out, self.serial);
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let role = match reader.u8()? {
            CERTIFICATE_VERSION => Role::User,
            CERTIFICATE_VERSION_WITH_ROLE => match Role::from_wire_code(reader.u8()?) {
                Some(Role::User) => {
                    return Err(DecodeError::Invalid {
                        what: "certificate role",
                        reason: "the user role is encoded as version 1, never 2",
                    })
                }
                Some(role) => role,
                None => {
                    return Err(DecodeError::Invalid {
                        what: "certificate role",
                        reason: "unknown role",
                    })
                }
            },
            version => {
                return Err(DecodeError::UnsupportedVersion {
                    what: "certificate",
                    version,
                })
            }
        };
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
            role,
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
            role: Role::User,
        }
    }

    /// Gateways have names users cannot sign up with, such as "pstn".
    fn gateway_body(username: &str) -> CertificateBody {
        CertificateBody {
            role: Role::Gateway,
            username: Username::parse_existing(username).unwrap_or_else(|e| panic!("{e}")),
            ..body("alice")
        }
    }

    /// `body` with another role but `certificate`'s signature, as a forger would try.
    fn with_role(certificate: &Certificate, role: Role) -> Certificate {
        Certificate {
            body: CertificateBody {
                role,
                ..certificate.body().clone()
            },
            signature: certificate.signature,
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
        for role in Role::ALL {
            let bytes = CertificateBody {
                role,
                ..body("alice")
            }
            .sign(&key)
            .to_bytes();
            for index in 0..bytes.len() {
                let mut tampered = bytes.clone();
                tampered[index] ^= 0x01;
                let accepted = Certificate::from_bytes(&tampered)
                    .map(|c| c.verify(&network(), &key.public_key(), NOW).is_ok())
                    .unwrap_or(false);
                assert!(
                    !accepted,
                    "flipping byte {index} of a {role} certificate was not noticed"
                );
            }
        }
    }

    #[test]
    fn a_gateway_certificate_is_version_2_and_round_trips() {
        let key = NetworkSigningKey::generate();
        let certificate = gateway_body("pstn").sign(&key);
        assert_eq!(certificate.role(), Role::Gateway);
        assert_eq!(certificate.verify(&network(), &key.public_key(), NOW), Ok(()));
        let bytes = certificate.to_bytes();
        assert_eq!(bytes[..2], [CERTIFICATE_VERSION_WITH_ROLE, 1]);
        // One byte longer than the same body as a user's certificate, and otherwise the same.
        let user = with_role(&certificate, Role::User).to_bytes();
        assert_eq!(bytes.len(), user.len() + 1);
        assert_eq!(bytes[2..], user[1..]);
        assert_eq!(Certificate::from_bytes(&bytes), Ok(certificate));
    }

    #[test]
    fn a_user_certificate_is_still_version_1() {
        let key = NetworkSigningKey::generate();
        let certificate = body("alice").sign(&key);
        assert_eq!(certificate.role(), Role::User);
        assert_eq!(certificate.to_bytes()[0], CERTIFICATE_VERSION);
    }

    /// Built by hand from the version 1 layout, as a login server wrote it before roles: it
    /// still decodes (as a user), verifies and re-encodes to the same bytes.
    #[test]
    fn a_version_1_certificate_from_before_roles_decodes_as_a_user() {
        let key = NetworkSigningKey::from_seed([7; 32]);
        let device_key = DeviceKey::from_seed([9; 32]).public_key();
        let mut body = vec![1, 8];
        body.extend_from_slice(b"koe-test");
        body.push(5);
        body.extend_from_slice(b"alice");
        body.extend_from_slice(&device_key.to_bytes());
        body.extend_from_slice(&NOW.as_secs().to_be_bytes());
        body.extend_from_slice(&(NOW.as_secs() + 3600).to_be_bytes());
        body.extend_from_slice(&42u64.to_be_bytes());
        let mut signed = b"koe certificate v1\0".to_vec();
        signed.extend_from_slice(&body);
        let mut bytes = body;
        bytes.extend_from_slice(&key.sign(&signed));

        let certificate = Certificate::from_bytes(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(certificate.role(), Role::User);
        assert_eq!(certificate.username().as_str(), "alice");
        assert_eq!(certificate.device_key(), &device_key);
        assert_eq!(certificate.verify(&network(), &key.public_key(), NOW), Ok(()));
        assert_eq!(certificate.to_bytes(), bytes);
    }

    /// A user cannot present their certificate as a gateway's, nor a gateway's be passed off
    /// as another role: the role is signed.
    #[test]
    fn changing_the_role_breaks_the_signature() {
        let key = NetworkSigningKey::generate();
        for (signed, forged) in [(Role::User, Role::Gateway), (Role::Gateway, Role::User)] {
            let certificate = CertificateBody {
                role: signed,
                ..body("alice")
            }
            .sign(&key);
            let forgery = with_role(&certificate, forged);
            let decoded = Certificate::from_bytes(&forgery.to_bytes())
                .unwrap_or_else(|e| panic!("the forgery is well-formed: {e}"));
            assert_eq!(decoded.role(), forged);
            assert_eq!(
                decoded.verify(&network(), &key.public_key(), NOW),
                Err(CertificateError::BadSignature),
                "a {signed} certificate presented as {forged}"
            );
        }
    }

    #[test]
    fn every_other_role_byte_is_refused() {
        let bytes = gateway_body("pstn")
            .sign(&NetworkSigningKey::generate())
            .to_bytes();
        for code in (0..=u8::MAX).filter(|&code| code != Role::Gateway.wire_code()) {
            let mut tampered = bytes.clone();
            tampered[1] = code;
            let reason = if code == 0 {
                "the user role is encoded as version 1, never 2"
            } else {
                "unknown role"
            };
            let refusal = DecodeError::Invalid {
                what: "certificate role",
                reason,
            };
            assert_eq!(
                Certificate::from_bytes(&tampered),
                Err(refusal.clone()),
                "role byte {code}"
            );
            // What a login server or peer would report.
            let message = CertificateError::Malformed(refusal).to_string();
            assert!(message.contains(reason), "{message}");
        }
    }

    #[test]
    fn role_names_round_trip() {
        for role in Role::ALL {
            assert_eq!(Role::from_name(role.as_str()), Some(role));
            assert_eq!(Role::from_wire_code(role.wire_code()), Some(role));
        }
        assert_eq!(Role::from_name("Gateway"), None);
        assert_eq!(Role::from_name("admin"), None);
        assert_eq!(Role::default(), Role::User);
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
            role in any_role(),
        ) {
            let certificate = CertificateBody {
                network: network(),
                username: Username::parse_existing(&username).unwrap_or_else(|e| panic!("{e}")),
                device_key: DeviceKey::from_seed(seed).public_key(),
                not_before: UnixTime(not_before),
                not_after: UnixTime(not_before + lifetime),
                serial,
                role,
            }
            .sign(&NetworkSigningKey::from_seed(seed));
            let bytes = certificate.to_bytes();
            let decoded = Certificate::from_bytes(&bytes)?;
            prop_assert_eq!(&decoded, &certificate);
            prop_assert_eq!(decoded.role(), role);
            prop_assert_eq!(decoded.to_bytes(), bytes);
        }

        #[test]
        fn garbage_never_panics_and_reencodes_exactly(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(certificate) = Certificate::from_bytes(&bytes) {
                prop_assert_eq!(certificate.to_bytes(), bytes);
            }
        }

        /// Random garbage almost never gets past the version byte; damaged real certificates
        /// of both versions reach every field of the parser.
        #[test]
        fn damaged_certificates_never_panic_and_reencode_exactly(
            role in any_role(),
            seed: [u8; 32],
            damage in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            version in proptest::option::of(any::<u8>()),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let mut bytes = CertificateBody {
                role,
                device_key: DeviceKey::from_seed(seed).public_key(),
                ..body("alice")
            }
            .sign(&NetworkSigningKey::from_seed(seed))
            .to_bytes();
            for (index, value) in damage {
                let index = index.index(bytes.len());
                bytes[index] = value;
            }
            if let Some(version) = version {
                bytes[0] = version;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len()));
            }
            if let Ok(certificate) = Certificate::from_bytes(&bytes) {
                prop_assert_eq!(certificate.to_bytes(), bytes);
            }
        }
    }

    fn any_role() -> impl Strategy<Value = Role> {
        proptest::sample::select(Role::ALL.to_vec())
    }
}
