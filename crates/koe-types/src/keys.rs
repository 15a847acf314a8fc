//! Ed25519 keys with the roles Koe gives them.
//!
//! A [`DeviceKey`] is created once per device and never leaves it; its public half is what a
//! certificate binds to a username. A [`NetworkSigningKey`] belongs to the login server and
//! signs certificates; its public half sits in `network.toml`, so anyone can check a
//! certificate offline. The two roles are distinct types so one cannot be used as the other.
//!
//! Text forms: public keys are `ed25519:<base64>`, secret keys `ed25519-secret:<base64>` (the
//! 32-byte seed), fingerprints `SHA256:<base64>` of the public key as in OpenSSH.

use std::fmt;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use thiserror::Error;

pub const PUBLIC_KEY_BYTES: usize = 32;
pub const SIGNATURE_BYTES: usize = 64;

const PUBLIC_PREFIX: &str = "ed25519:";
const SECRET_PREFIX: &str = "ed25519-secret:";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("expected a key starting with {expected:?}")]
    WrongPrefix { expected: &'static str },
    #[error("key is not valid base64")]
    InvalidBase64,
    #[error("key has {0} bytes, expected 32")]
    WrongLength(usize),
    #[error("not a valid Ed25519 public key")]
    InvalidPoint,
}

fn decode_key_text(text: &str, prefix: &'static str) -> Result<[u8; 32], KeyError> {
    let encoded = text
        .trim()
        .strip_prefix(prefix)
        .ok_or(KeyError::WrongPrefix { expected: prefix })?;
    let bytes = STANDARD
        .decode(encoded)
        .map_err(|_| KeyError::InvalidBase64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::WrongLength(bytes.len()))
}

/// Generates a secret/public key type pair for one role.
macro_rules! ed25519_role {
    ($(#[$secret_doc:meta])* $secret:ident, $(#[$public_doc:meta])* $public:ident) => {
        $(#[$secret_doc])*
        #[derive(Clone)]
        pub struct $secret(SigningKey);

        $(#[$public_doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $public(VerifyingKey);

        impl $secret {
            /// A fresh key from the operating system's random source.
            pub fn generate() -> Self {
                Self(SigningKey::generate(&mut rand_core::OsRng))
            }

            pub fn from_seed(seed: [u8; 32]) -> Self {
                Self(SigningKey::from_bytes(&seed))
            }

            pub fn public_key(&self) -> $public {
                $public(self.0.verifying_key())
            }

            pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_BYTES] {
                self.0.sign(message).to_bytes()
            }

            /// The 32-byte seed, for handing the same identity to libp2p. Handle like the key.
            pub fn seed(&self) -> [u8; 32] {
                self.0.to_bytes()
            }

            /// A 32-byte secret derived from this key for another purpose (e.g. an X25519 key),
            /// separated by `context`, so one stored key serves several roles safely.
            pub fn derive_secret(&self, context: &[u8]) -> [u8; 32] {
                let mut hasher = Sha256::new();
                hasher.update(b"koe derived secret v1\0");
                hasher.update(context);
                hasher.update(self.0.to_bytes());
                hasher.finalize().into()
            }

            /// `ed25519-secret:<base64 seed>`, for a private key file.
            pub fn to_secret_text(&self) -> String {
                format!("{SECRET_PREFIX}{}", STANDARD.encode(self.0.to_bytes()))
            }

            pub fn from_secret_text(text: &str) -> Result<Self, KeyError> {
                decode_key_text(text, SECRET_PREFIX).map(Self::from_seed)
            }
        }

        impl fmt::Debug for $secret {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($secret), self.public_key().fingerprint())
            }
        }

        impl $public {
            pub fn from_bytes(bytes: &[u8; PUBLIC_KEY_BYTES]) -> Result<Self, KeyError> {
                VerifyingKey::from_bytes(bytes)
                    .map(Self)
                    .map_err(|_| KeyError::InvalidPoint)
            }

            pub fn to_bytes(&self) -> [u8; PUBLIC_KEY_BYTES] {
                self.0.to_bytes()
            }

            /// Checks `signature` over `message`, refusing weak keys and malleable signatures.
            pub fn verify(&self, message: &[u8], signature: &[u8; SIGNATURE_BYTES]) -> bool {
                let signature = Signature::from_bytes(signature);
                self.0.verify_strict(message, &signature).is_ok()
                    && self.0.verify(message, &signature).is_ok()
            }

            /// `SHA256:<base64>` of the public key, as people compare keys.
            pub fn fingerprint(&self) -> String {
                let digest = Sha256::digest(self.0.as_bytes());
                format!("SHA256:{}", STANDARD_NO_PAD.encode(digest))
            }

            pub fn parse(text: &str) -> Result<Self, KeyError> {
                Self::from_bytes(&decode_key_text(text, PUBLIC_PREFIX)?)
            }
        }

        impl fmt::Display for $public {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{PUBLIC_PREFIX}{}", STANDARD.encode(self.0.as_bytes()))
            }
        }

        impl fmt::Debug for $public {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($public), self.fingerprint())
            }
        }

        impl std::str::FromStr for $public {
            type Err = KeyError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }
    };
}

ed25519_role!(
    /// A device's own secret key. Created once per device, stored with mode 0600.
    DeviceKey,
    /// The public half of a device key, as certificates carry it.
    DevicePublicKey
);

ed25519_role!(
    /// The login server's secret key that signs certificates.
    NetworkSigningKey,
    /// The network's public signing key, published in `network.toml`.
    NetworkPublicKey
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_round_trip() {
        let key = DeviceKey::generate();
        let again = DeviceKey::from_secret_text(&key.to_secret_text()).map(|k| k.public_key());
        assert_eq!(again, Ok(key.public_key()));
        let public = key.public_key();
        assert_eq!(DevicePublicKey::parse(&public.to_string()), Ok(public));
        assert!(public.fingerprint().starts_with("SHA256:"));
    }

    #[test]
    fn malformed_key_text_is_refused() {
        assert_eq!(
            DevicePublicKey::parse("rsa:AAAA"),
            Err(KeyError::WrongPrefix { expected: "ed25519:" })
        );
        assert_eq!(
            DevicePublicKey::parse("ed25519:!!!"),
            Err(KeyError::InvalidBase64)
        );
        assert_eq!(
            DevicePublicKey::parse("ed25519:AAAA"),
            Err(KeyError::WrongLength(3))
        );
    }

    #[test]
    fn signatures_verify_only_for_the_signed_message_and_key() {
        let key = NetworkSigningKey::generate();
        let signature = key.sign(b"hello");
        assert!(key.public_key().verify(b"hello", &signature));
        assert!(!key.public_key().verify(b"hellO", &signature));
        assert!(!NetworkSigningKey::generate()
            .public_key()
            .verify(b"hello", &signature));
    }
}
