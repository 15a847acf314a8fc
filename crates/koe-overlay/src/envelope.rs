//! Sealed envelopes: end-to-end messages between devices, routed by supernodes that can
//! neither read nor forge them.
//!
//! The sender signs the inner message with its device key and attaches its certificate, then
//! seals it to the recipient device's X25519 envelope key (from its presence record) with an
//! ephemeral key: X25519 → HKDF-SHA256 → ChaCha20-Poly1305. The recipient checks the
//! certificate, the signature (which also covers the intended recipient, so an envelope cannot
//! be re-addressed), the timestamp window, and that the message id is new ([`ReplayGuard`]).
//!
//! Outer encoding: `version u8 | recipient username (u8 len) | recipient device [32] |
//! ephemeral key [32] | ciphertext (u32 len)`. Inner: `sender certificate | message id [16] |
//! timestamp u64 | payload (u32 len) | signature [64]`.

use std::collections::HashMap;
use std::time::Duration;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use koe_types::{
    Certificate, CertificateError, DeviceKey, DevicePublicKey, NetworkName, NetworkPublicKey,
    UnixTime, Username,
};
use koe_wire::{put_short_bytes, put_u32, put_u64, put_u8, Codec, DecodeError, Reader};
use rand_core::{OsRng, RngCore};
use sha2::Sha256;
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};

pub const ENVELOPE_VERSION: u8 = 1;
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;
pub const MAX_PAYLOAD_BYTES: usize = 60 * 1024;
/// How far an envelope's timestamp may be from the recipient's clock.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(5 * 60);
const SIGNING_CONTEXT: &[u8] = b"koe envelope v1\0";
const KEY_DERIVATION_INFO: &[u8] = b"koe envelope key v1";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnvelopeError {
    #[error("envelope of {0} bytes is larger than {MAX_ENVELOPE_BYTES}")]
    TooLarge(usize),
    #[error("malformed envelope: {0}")]
    Malformed(#[from] DecodeError),
    #[error("envelope is for another device")]
    WrongRecipient,
    #[error("envelope does not decrypt: tampered with or not for this key")]
    Undecryptable,
    #[error("sender certificate is not valid: {0}")]
    Certificate(#[from] CertificateError),
    #[error("envelope is not signed by the sender's device key")]
    BadSignature,
    #[error("envelope timestamp {0} is outside the replay window")]
    OutsideWindow(UnixTime),
    #[error("envelope was already received (replay)")]
    Replayed,
}

impl EnvelopeError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "oversized",
            Self::Malformed(_) => "malformed",
            Self::WrongRecipient | Self::Undecryptable => "undecryptable",
            Self::Certificate(_) => "bad_certificate",
            Self::BadSignature => "forged",
            Self::OutsideWindow(_) | Self::Replayed => "replayed",
        }
    }
}

/// A device's X25519 key for receiving envelopes, derived from its device key so there is
/// nothing more to store.
#[derive(Clone)]
pub struct EnvelopeKey(StaticSecret);

impl std::fmt::Debug for EnvelopeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnvelopeKey(<secret>)")
    }
}

impl EnvelopeKey {
    pub fn for_device(device: &DeviceKey) -> Self {
        Self(StaticSecret::from(device.derive_secret(b"koe envelope x25519 v1")))
    }

    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.0).to_bytes()
    }
}

/// What travels through the overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub recipient: Username,
    pub recipient_device: DevicePublicKey,
    ephemeral_key: [u8; 32],
    ciphertext: Vec<u8>,
}

/// A checked envelope's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedEnvelope {
    pub sender: Certificate,
    pub message_id: [u8; 16],
    pub timestamp: UnixTime,
    pub payload: Vec<u8>,
}

fn derive_cipher(shared: &[u8; 32], ephemeral: &[u8; 32], recipient_key: &[u8; 32]) -> ChaCha20Poly1305 {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral);
    salt[32..].copy_from_slice(recipient_key);
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(&salt), shared)
        .expand(KEY_DERIVATION_INFO, &mut key)
        .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 output length"));
    ChaCha20Poly1305::new(Key::from_slice(&key))
}

fn associated_data(recipient: &Username, device: &DevicePublicKey, ephemeral: &[u8; 32]) -> Vec<u8> {
    let mut aad = Vec::new();
    put_short_bytes(&mut aad, recipient.as_str().as_bytes());
    aad.extend_from_slice(&device.to_bytes());
    aad.extend_from_slice(ephemeral);
    aad
}

fn signed_bytes(recipient: &Username, device: &DevicePublicKey, inner_unsigned: &[u8]) -> Vec<u8> {
    let mut bytes = SIGNING_CONTEXT.to_vec();
    put_short_bytes(&mut bytes, recipient.as_str().as_bytes());
    bytes.extend_from_slice(&device.to_bytes());
    bytes.extend_from_slice(inner_unsigned);
    bytes
}

impl Envelope {
    /// Seals `payload` from the sender's device to one recipient device.
    pub fn seal(
        sender_key: &DeviceKey,
        sender_certificate: &Certificate,
        recipient: &Username,
        recipient_device: &DevicePublicKey,
        recipient_envelope_key: &[u8; 32],
        payload: &[u8],
        now: UnixTime,
    ) -> Result<Self, EnvelopeError> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(EnvelopeError::TooLarge(payload.len()));
        }
        let mut message_id = [0u8; 16];
        OsRng.fill_bytes(&mut message_id);
        let mut inner = Vec::with_capacity(payload.len() + 400);
        sender_certificate.encode(&mut inner);
        inner.extend_from_slice(&message_id);
        put_u64(&mut inner, now.as_secs());
        put_u32(&mut inner, payload.len() as u32);
        inner.extend_from_slice(payload);
        let signature = sender_key.sign(&signed_bytes(recipient, recipient_device, &inner));
        inner.extend_from_slice(&signature);

        let ephemeral = StaticSecret::random_from_rng(OsRng);
        let ephemeral_key = PublicKey::from(&ephemeral).to_bytes();
        let shared = ephemeral.diffie_hellman(&PublicKey::from(*recipient_envelope_key));
        let aad = associated_data(recipient, recipient_device, &ephemeral_key);
        let ciphertext = derive_cipher(shared.as_bytes(), &ephemeral_key, recipient_envelope_key)
            .encrypt(Nonce::from_slice(&[0; 12]), Payload { msg: &inner, aad: &aad })
            .map_err(|_| EnvelopeError::Undecryptable)?;
        Ok(Self {
            recipient: recipient.clone(),
            recipient_device: *recipient_device,
            ephemeral_key,
            ciphertext,
        })
    }

    /// Decodes an envelope received from the network, refusing oversized input unread.
    pub fn decode_bounded(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge(bytes.len()));
        }
        Ok(Self::from_bytes(bytes)?)
    }

    /// Decrypts and checks an envelope addressed to this device.
    pub fn open(
        &self,
        device: &DevicePublicKey,
        envelope_key: &EnvelopeKey,
        network: &NetworkName,
        network_key: &NetworkPublicKey,
        replay_guard: &mut ReplayGuard,
        now: UnixTime,
    ) -> Result<OpenedEnvelope, EnvelopeError> {
        let opened = self.open_unchecked_time(device, envelope_key, network, network_key, now)?;
        replay_guard.check(opened.message_id, opened.timestamp, now)?;
        Ok(opened)
    }

    /// Decrypts and checks an envelope that waited in a mailbox: the sender's certificate is
    /// checked at the time the envelope was sealed (it may have expired since), and the
    /// timestamp must not be in the future. Replays are the caller's to refuse: it keeps the
    /// message ids it has taken for as long as mailboxes keep messages.
    pub fn open_stored(
        &self,
        device: &DevicePublicKey,
        envelope_key: &EnvelopeKey,
        network: &NetworkName,
        network_key: &NetworkPublicKey,
        now: UnixTime,
    ) -> Result<OpenedEnvelope, EnvelopeError> {
        let opened = self.open_unchecked_time(device, envelope_key, network, network_key, None)?;
        if now.until(opened.timestamp) > REPLAY_WINDOW {
            return Err(EnvelopeError::OutsideWindow(opened.timestamp));
        }
        Ok(opened)
    }

    /// Decrypts and checks everything but freshness; the certificate is checked at
    /// `certificate_time`, or at the envelope's own timestamp when `None`.
    fn open_unchecked_time(
        &self,
        device: &DevicePublicKey,
        envelope_key: &EnvelopeKey,
        network: &NetworkName,
        network_key: &NetworkPublicKey,
        certificate_time: impl Into<Option<UnixTime>>,
    ) -> Result<OpenedEnvelope, EnvelopeError> {
        if &self.recipient_device != device {
            return Err(EnvelopeError::WrongRecipient);
        }
        let shared = envelope_key
            .0
            .diffie_hellman(&PublicKey::from(self.ephemeral_key));
        let aad = associated_data(&self.recipient, &self.recipient_device, &self.ephemeral_key);
        let inner = derive_cipher(shared.as_bytes(), &self.ephemeral_key, &envelope_key.public())
            .decrypt(Nonce::from_slice(&[0; 12]), Payload { msg: &self.ciphertext, aad: &aad })
            .map_err(|_| EnvelopeError::Undecryptable)?;

        let mut reader = Reader::new(&inner);
        let sender = Certificate::decode(&mut reader)?;
        let message_id: [u8; 16] = reader.array()?;
        let timestamp = UnixTime(reader.u64()?);
        let length = reader.u32()? as usize;
        if length > MAX_PAYLOAD_BYTES {
            return Err(EnvelopeError::TooLarge(length));
        }
        let payload = reader.take(length)?.to_vec();
        let unsigned = reader.consumed();
        let signature: [u8; 64] = reader.array()?;
        reader.expect_end()?;

        sender.verify(network, network_key, certificate_time.into().unwrap_or(timestamp))?;
        if !sender
            .device_key()
            .verify(&signed_bytes(&self.recipient, &self.recipient_device, unsigned), &signature)
        {
            return Err(EnvelopeError::BadSignature);
        }
        Ok(OpenedEnvelope {
            sender,
            message_id,
            timestamp,
            payload,
        })
    }
}

impl Codec for Envelope {
    fn encode(&self, out: &mut Vec<u8>) {
        put_u8(out, ENVELOPE_VERSION);
        put_short_bytes(out, self.recipient.as_str().as_bytes());
        out.extend_from_slice(&self.recipient_device.to_bytes());
        out.extend_from_slice(&self.ephemeral_key);
        put_u32(out, self.ciphertext.len() as u32);
        out.extend_from_slice(&self.ciphertext);
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let version = reader.u8()?;
        if version != ENVELOPE_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "envelope",
                version,
            });
        }
        let recipient = reader.short_str("recipient")?;
        let recipient = Username::parse_existing(recipient)
            .ok()
            .filter(|u| u.as_str() == recipient)
            .ok_or(DecodeError::Invalid {
                what: "recipient",
                reason: "not a canonical username",
            })?;
        let recipient_device = DevicePublicKey::from_bytes(&reader.array()?).map_err(|_| {
            DecodeError::Invalid {
                what: "recipient device",
                reason: "not an Ed25519 key",
            }
        })?;
        let ephemeral_key = reader.array()?;
        let length = reader.u32()? as usize;
        if length > MAX_ENVELOPE_BYTES {
            return Err(DecodeError::Invalid {
                what: "ciphertext",
                reason: "too long",
            });
        }
        Ok(Self {
            recipient,
            recipient_device,
            ephemeral_key,
            ciphertext: reader.take(length)?.to_vec(),
        })
    }
}

/// Remembers message ids seen within the replay window. Envelopes older than the window are
/// refused outright, so ids only need keeping for twice the window; the table is bounded.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: HashMap<[u8; 16], UnixTime>,
}

const MAX_REMEMBERED_IDS: usize = 100_000;

impl ReplayGuard {
    pub fn check(
        &mut self,
        message_id: [u8; 16],
        timestamp: UnixTime,
        now: UnixTime,
    ) -> Result<(), EnvelopeError> {
        if now.until(timestamp) > REPLAY_WINDOW || timestamp.until(now) > REPLAY_WINDOW {
            return Err(EnvelopeError::OutsideWindow(timestamp));
        }
        if self.seen.contains_key(&message_id) {
            return Err(EnvelopeError::Replayed);
        }
        if self.seen.len() >= MAX_REMEMBERED_IDS {
            let horizon = now.saturating_sub(REPLAY_WINDOW * 2);
            self.seen.retain(|_, seen| *seen > horizon);
        }
        if self.seen.len() >= MAX_REMEMBERED_IDS {
            // Still full of recent ids: a flood. Refusing is safer than forgetting.
            return Err(EnvelopeError::Replayed);
        }
        self.seen.insert(message_id, now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::tests::{TestNetwork, NOW};

    struct Party {
        device: DeviceKey,
        certificate: Certificate,
        envelope_key: EnvelopeKey,
    }

    fn party(network: &TestNetwork, name: &str) -> Party {
        let device = DeviceKey::generate();
        Party {
            certificate: network.certificate(name, &device),
            envelope_key: EnvelopeKey::for_device(&device),
            device,
        }
    }

    fn seal(from: &Party, to: &Party, payload: &[u8], now: UnixTime) -> Envelope {
        Envelope::seal(
            &from.device,
            &from.certificate,
            to.certificate.username(),
            &to.device.public_key(),
            &to.envelope_key.public(),
            payload,
            now,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn open(network: &TestNetwork, to: &Party, envelope: &Envelope, guard: &mut ReplayGuard) -> Result<OpenedEnvelope, EnvelopeError> {
        envelope.open(&to.device.public_key(), &to.envelope_key, &network.name, &network.key.public_key(), guard, NOW)
    }

    #[test]
    fn sealed_envelopes_open_once_for_their_recipient_only() {
        let network = TestNetwork::new();
        let (alice, bob, eve) = (party(&network, "alice"), party(&network, "bob"), party(&network, "eve"));
        let envelope = seal(&alice, &bob, b"hello bob", NOW);
        let bytes = envelope.to_bytes();
        assert!(!bytes.windows(9).any(|w| w == b"hello bob"), "the payload is encrypted");
        let mut guard = ReplayGuard::default();
        let opened = open(&network, &bob, &Envelope::decode_bounded(&bytes).unwrap_or_else(|e| panic!("{e}")), &mut guard)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(opened.payload, b"hello bob");
        assert_eq!(opened.sender.username().as_str(), "alice");
        assert_eq!(open(&network, &bob, &envelope, &mut guard), Err(EnvelopeError::Replayed));
        assert_eq!(open(&network, &eve, &envelope, &mut ReplayGuard::default()), Err(EnvelopeError::WrongRecipient));
    }

    #[test]
    fn tampering_anywhere_is_detected() {
        let network = TestNetwork::new();
        let (alice, bob) = (party(&network, "alice"), party(&network, "bob"));
        let bytes = seal(&alice, &bob, b"hello bob", NOW).to_bytes();
        for index in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[index] ^= 0x01;
            let accepted = Envelope::decode_bounded(&tampered)
                .map(|e| open(&network, &bob, &e, &mut ReplayGuard::default()).is_ok())
                .unwrap_or(false);
            assert!(!accepted, "flipping byte {index} went unnoticed");
        }
    }

    #[test]
    fn old_future_and_foreign_senders_are_refused() {
        let network = TestNetwork::new();
        let (alice, bob) = (party(&network, "alice"), party(&network, "bob"));
        let old = seal(&alice, &bob, b"x", NOW.saturating_sub(REPLAY_WINDOW + Duration::from_secs(1)));
        assert!(matches!(open(&network, &bob, &old, &mut ReplayGuard::default()), Err(EnvelopeError::OutsideWindow(_))));
        let future = seal(&alice, &bob, b"x", NOW.saturating_add(REPLAY_WINDOW + Duration::from_secs(1)));
        assert!(matches!(open(&network, &bob, &future, &mut ReplayGuard::default()), Err(EnvelopeError::OutsideWindow(_))));
        let elsewhere = TestNetwork::new();
        let mallory = party(&elsewhere, "alice");
        let foreign = seal(&mallory, &bob, b"x", NOW);
        assert!(matches!(open(&network, &bob, &foreign, &mut ReplayGuard::default()), Err(EnvelopeError::Certificate(_))));
    }

    #[test]
    fn oversized_input_is_refused_before_decoding() {
        assert_eq!(Envelope::decode_bounded(&vec![1; MAX_ENVELOPE_BYTES + 1]), Err(EnvelopeError::TooLarge(MAX_ENVELOPE_BYTES + 1)));
        assert!(Envelope::decode_bounded(&[1, 3, b'b', b'o', b'b']).is_err());
    }
}
