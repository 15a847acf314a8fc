//! Offline messages, as they travel: what a sender needs to seal for a user who is offline,
//! what supernodes keep, and what the recipient asks of them. Sans-IO; the supernodes' store
//! is [`crate::mailbox_store`]. ADR 0009 has the why.
//!
//! - [`DeviceRecord`]: a device's long-lived "seal offline messages for me with this X25519
//!   key", signed by the device, published at every attach, kept by the supernodes
//!   responsible for the user's key for up to 30 days. Its certificate must have been valid
//!   when the record was published (certificates live a day; the record a month).
//! - [`OfflineMessage`]: one envelope per device of the recipient, under a header the sender's
//!   device signs (sender, recipient, id, time), so supernodes can check who asks them to keep
//!   what, count it against quotas, and refuse what a recipient blocked. The envelopes inside
//!   stay sealed end to end.
//! - [`MailboxCommand`]: the recipient's device, signed and fresh: fetch what waits for it,
//!   acknowledge what it has stored, or set who may not leave messages.
//!
//! Encodings (version 1), each followed by a 64-byte Ed25519 signature over a context string
//! and everything before it:
//! - device record: `version | certificate | envelope key [32] | published u64 | expires u64`
//! - offline message: `version | sender certificate | recipient (u8 len) | id [16] | sent u64 |
//!   envelope count u8 | (u32 len + envelope) each`
//! - mailbox command: `version | certificate | issued u64 | kind u8 | fetch: nothing; ack: u16
//!   count + ids [16] each; block: sequence u64 + u16 count + usernames (u8 len) each`

use std::time::Duration;

use koe_types::{Certificate, CertificateError, DeviceKey, DevicePublicKey, NetworkName, NetworkPublicKey, UnixTime, Username};
use koe_wire::{put_short_bytes, put_u16, put_u32, put_u64, put_u8, Codec, DecodeError, Reader};
use thiserror::Error;

use crate::envelope::Envelope;

pub const MAILBOX_VERSION: u8 = 1;
/// A device record lives at most this long; devices republish at every attach.
pub const MAX_DEVICE_RECORD_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// An offline message is kept this long after it was sent, then dropped unread.
pub const OFFLINE_MESSAGE_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// How far a sender's or recipient's clock may be ahead of a supernode's.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// A mailbox command older than this is refused (a fetch or ack cannot be replayed later).
pub const COMMAND_WINDOW: Duration = Duration::from_secs(5 * 60);
pub const MAX_DEVICE_RECORD_BYTES: usize = 1024;
pub const MAX_OFFLINE_MESSAGE_BYTES: usize = 96 * 1024;
pub const MAX_MAILBOX_COMMAND_BYTES: usize = 16 * 1024;
/// Devices an offline message may be sealed to (as many as the index keeps per user).
pub const MAX_DEVICES_PER_MESSAGE: usize = crate::index::MAX_DEVICES_PER_USER;
pub const MAX_ACKS_PER_COMMAND: usize = 256;
pub const MAX_BLOCKED_USERS: usize = 256;

const DEVICE_CONTEXT: &[u8] = b"koe device record v1\0";
const MESSAGE_CONTEXT: &[u8] = b"koe offline message v1\0";
const COMMAND_CONTEXT: &[u8] = b"koe mailbox command v1\0";

/// A message id: the sender's random 16 bytes, the same on every replica.
pub type MessageId = [u8; 16];

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MailboxError {
    #[error("{what} of {size} bytes is larger than {max}")]
    TooLarge { what: &'static str, size: usize, max: usize },
    #[error("malformed {0}")]
    Malformed(#[from] DecodeError),
    #[error("bad certificate: {0}")]
    Certificate(#[from] CertificateError),
    #[error("not signed by the certificate's device key")]
    BadSignature,
    #[error("expired at {0}")]
    Expired(UnixTime),
    #[error("dated {0}, in the future")]
    FromTheFuture(UnixTime),
    #[error("claims to live until {0}, too far ahead")]
    TooLongLived(UnixTime),
    #[error("{0}")]
    Invalid(&'static str),
}

impl MailboxError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "oversized",
            Self::Malformed(_) | Self::Invalid(_) => "malformed",
            Self::Certificate(CertificateError::Expired { .. }) | Self::Expired(_) | Self::TooLongLived(_) => "expired",
            Self::Certificate(_) => "bad_certificate",
            Self::BadSignature => "forged",
            Self::FromTheFuture(_) => "replayed",
        }
    }
}

fn bounded(what: &'static str, bytes: &[u8], max: usize) -> Result<(), MailboxError> {
    if bytes.len() > max {
        return Err(MailboxError::TooLarge { what, size: bytes.len(), max });
    }
    Ok(())
}

fn version(reader: &mut Reader<'_>, what: &'static str) -> Result<(), DecodeError> {
    match reader.u8()? {
        MAILBOX_VERSION => Ok(()),
        version => Err(DecodeError::UnsupportedVersion { what, version }),
    }
}

fn username(reader: &mut Reader<'_>, what: &'static str) -> Result<Username, DecodeError> {
    let text = reader.short_str(what)?;
    Username::parse_existing(text)
        .ok()
        .filter(|u| u.as_str() == text)
        .ok_or(DecodeError::Invalid { what, reason: "not a canonical username" })
}

fn signed(context: &[u8], body: &impl Codec) -> Vec<u8> {
    let mut bytes = context.to_vec();
    body.encode(&mut bytes);
    bytes
}

/// A device's statement "seal offline messages for me with this key".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBody {
    pub certificate: Certificate,
    pub envelope_key: [u8; 32],
    pub published_at: UnixTime,
    pub expires_at: UnixTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    body: DeviceBody,
    signature: [u8; 64],
}

impl DeviceBody {
    pub fn sign(self, device_key: &DeviceKey) -> DeviceRecord {
        let signature = device_key.sign(&signed(DEVICE_CONTEXT, &self));
        DeviceRecord { body: self, signature }
    }
}

impl DeviceRecord {
    pub fn body(&self) -> &DeviceBody {
        &self.body
    }

    pub fn username(&self) -> &Username {
        self.body.certificate.username()
    }

    pub fn device(&self) -> &DevicePublicKey {
        self.body.certificate.device_key()
    }

    /// Decodes and checks a record from the network: its certificate was valid when it was
    /// published, it is signed by that device, and it has not expired.
    pub fn decode_verified(bytes: &[u8], network: &NetworkName, network_key: &NetworkPublicKey, now: UnixTime) -> Result<Self, MailboxError> {
        bounded("device record", bytes, MAX_DEVICE_RECORD_BYTES)?;
        let record = Self::from_bytes(bytes)?;
        let body = &record.body;
        if now.until(body.published_at) > CLOCK_SKEW {
            return Err(MailboxError::FromTheFuture(body.published_at));
        }
        body.certificate.verify(network, network_key, body.published_at)?;
        if !body.certificate.device_key().verify(&signed(DEVICE_CONTEXT, body), &record.signature) {
            return Err(MailboxError::BadSignature);
        }
        if body.expires_at <= now {
            return Err(MailboxError::Expired(body.expires_at));
        }
        if body.published_at.until(body.expires_at) > MAX_DEVICE_RECORD_LIFETIME {
            return Err(MailboxError::TooLongLived(body.expires_at));
        }
        Ok(record)
    }
}

impl Codec for DeviceBody {
    fn encode(&self, out: &mut Vec<u8>) {
        put_u8(out, MAILBOX_VERSION);
        self.certificate.encode(out);
        out.extend_from_slice(&self.envelope_key);
        put_u64(out, self.published_at.as_secs());
        put_u64(out, self.expires_at.as_secs());
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        version(reader, "device record")?;
        Ok(Self {
            certificate: Certificate::decode(reader)?,
            envelope_key: reader.array()?,
            published_at: UnixTime(reader.u64()?),
            expires_at: UnixTime(reader.u64()?),
        })
    }
}

impl Codec for DeviceRecord {
    fn encode(&self, out: &mut Vec<u8>) {
        self.body.encode(out);
        out.extend_from_slice(&self.signature);
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self { body: DeviceBody::decode(reader)?, signature: reader.array()? })
    }
}

/// What a sender leaves for a user who is offline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineBody {
    pub sender: Certificate,
    pub recipient: Username,
    pub id: MessageId,
    pub sent_at: UnixTime,
    /// Encoded [`Envelope`]s, one per device of the recipient.
    pub envelopes: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineMessage {
    body: OfflineBody,
    signature: [u8; 64],
}

impl OfflineBody {
    pub fn sign(self, device_key: &DeviceKey) -> OfflineMessage {
        let signature = device_key.sign(&signed(MESSAGE_CONTEXT, &self));
        OfflineMessage { body: self, signature }
    }
}

impl OfflineMessage {
    pub fn body(&self) -> &OfflineBody {
        &self.body
    }

    pub fn sender(&self) -> &Username {
        self.body.sender.username()
    }

    /// The devices it is sealed to.
    pub fn devices(&self) -> Vec<DevicePublicKey> {
        self.body.envelopes.iter().filter_map(|e| Envelope::from_bytes(e).ok()).map(|e| e.recipient_device).collect()
    }

    /// The envelope sealed to `device`, if there is one.
    pub fn envelope_for(&self, device: &DevicePublicKey) -> Option<Envelope> {
        self.body.envelopes.iter().filter_map(|e| Envelope::from_bytes(e).ok()).find(|e| &e.recipient_device == device)
    }

    /// Decodes and checks a message from the network: its sender's certificate was valid when
    /// it was sent, the sender's device signed it, it is not from the future nor older than
    /// [`OFFLINE_MESSAGE_LIFETIME`], and it holds 1 to 16 envelopes for distinct devices of
    /// the recipient. (The envelopes' insides are the recipient's to check.)
    pub fn decode_verified(bytes: &[u8], network: &NetworkName, network_key: &NetworkPublicKey, now: UnixTime) -> Result<Self, MailboxError> {
        bounded("offline message", bytes, MAX_OFFLINE_MESSAGE_BYTES)?;
        let message = Self::from_bytes(bytes)?;
        let body = &message.body;
        if now.until(body.sent_at) > CLOCK_SKEW {
            return Err(MailboxError::FromTheFuture(body.sent_at));
        }
        if body.sent_at.until(now) > OFFLINE_MESSAGE_LIFETIME {
            return Err(MailboxError::Expired(body.sent_at.saturating_add(OFFLINE_MESSAGE_LIFETIME)));
        }
        body.sender.verify(network, network_key, body.sent_at)?;
        if !body.sender.device_key().verify(&signed(MESSAGE_CONTEXT, body), &message.signature) {
            return Err(MailboxError::BadSignature);
        }
        let mut devices = Vec::new();
        for bytes in &body.envelopes {
            let envelope = Envelope::from_bytes(bytes)?;
            if envelope.recipient != body.recipient {
                return Err(MailboxError::Invalid("an envelope is addressed to another user"));
            }
            if devices.contains(&envelope.recipient_device) {
                return Err(MailboxError::Invalid("two envelopes for one device"));
            }
            devices.push(envelope.recipient_device);
        }
        Ok(message)
    }
}

impl Codec for OfflineBody {
    fn encode(&self, out: &mut Vec<u8>) {
        put_u8(out, MAILBOX_VERSION);
        self.sender.encode(out);
        put_short_bytes(out, self.recipient.as_str().as_bytes());
        out.extend_from_slice(&self.id);
        put_u64(out, self.sent_at.as_secs());
        let envelopes = &self.envelopes[..self.envelopes.len().min(MAX_DEVICES_PER_MESSAGE)];
        put_u8(out, envelopes.len() as u8);
        for envelope in envelopes {
            put_u32(out, envelope.len() as u32);
            out.extend_from_slice(envelope);
        }
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        version(reader, "offline message")?;
        let sender = Certificate::decode(reader)?;
        let recipient = username(reader, "recipient")?;
        let id = reader.array()?;
        let sent_at = UnixTime(reader.u64()?);
        let count = reader.u8()? as usize;
        if count == 0 || count > MAX_DEVICES_PER_MESSAGE {
            return Err(DecodeError::Invalid { what: "envelope count", reason: "must be 1 to 16" });
        }
        let mut envelopes = Vec::with_capacity(count);
        for _ in 0..count {
            let length = reader.u32()? as usize;
            envelopes.push(reader.take(length)?.to_vec());
        }
        Ok(Self { sender, recipient, id, sent_at, envelopes })
    }
}

impl Codec for OfflineMessage {
    fn encode(&self, out: &mut Vec<u8>) {
        self.body.encode(out);
        out.extend_from_slice(&self.signature);
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self { body: OfflineBody::decode(reader)?, signature: reader.array()? })
    }
}

/// What the owner of a mailbox asks of the supernodes that keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailboxAction {
    /// What waits for the asking device.
    Fetch,
    /// The asking device has stored these: its envelopes can go.
    Ack { ids: Vec<MessageId> },
    /// From now on, refuse (and drop) messages from these users. The highest sequence wins.
    Block { sequence: u64, blocked: Vec<Username> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandBody {
    pub certificate: Certificate,
    pub issued_at: UnixTime,
    pub action: MailboxAction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxCommand {
    body: CommandBody,
    signature: [u8; 64],
}

impl CommandBody {
    pub fn sign(self, device_key: &DeviceKey) -> MailboxCommand {
        let signature = device_key.sign(&signed(COMMAND_CONTEXT, &self));
        MailboxCommand { body: self, signature }
    }
}

impl MailboxCommand {
    pub fn body(&self) -> &CommandBody {
        &self.body
    }

    /// The mailbox's owner.
    pub fn owner(&self) -> &Username {
        self.body.certificate.username()
    }

    pub fn device(&self) -> &DevicePublicKey {
        self.body.certificate.device_key()
    }

    /// Decodes and checks a command: a valid certificate now, signed by its device, issued
    /// within [`COMMAND_WINDOW`] of now.
    pub fn decode_verified(bytes: &[u8], network: &NetworkName, network_key: &NetworkPublicKey, now: UnixTime) -> Result<Self, MailboxError> {
        bounded("mailbox command", bytes, MAX_MAILBOX_COMMAND_BYTES)?;
        let command = Self::from_bytes(bytes)?;
        let body = &command.body;
        if now.until(body.issued_at) > CLOCK_SKEW {
            return Err(MailboxError::FromTheFuture(body.issued_at));
        }
        if body.issued_at.until(now) > COMMAND_WINDOW {
            return Err(MailboxError::Expired(body.issued_at.saturating_add(COMMAND_WINDOW)));
        }
        body.certificate.verify(network, network_key, now)?;
        if !body.certificate.device_key().verify(&signed(COMMAND_CONTEXT, body), &command.signature) {
            return Err(MailboxError::BadSignature);
        }
        Ok(command)
    }
}

impl Codec for CommandBody {
    fn encode(&self, out: &mut Vec<u8>) {
        put_u8(out, MAILBOX_VERSION);
        self.certificate.encode(out);
        put_u64(out, self.issued_at.as_secs());
        match &self.action {
            MailboxAction::Fetch => put_u8(out, 1),
            MailboxAction::Ack { ids } => {
                put_u8(out, 2);
                let ids = &ids[..ids.len().min(MAX_ACKS_PER_COMMAND)];
                put_u16(out, ids.len() as u16);
                for id in ids {
                    out.extend_from_slice(id);
                }
            }
            MailboxAction::Block { sequence, blocked } => {
                put_u8(out, 3);
                put_u64(out, *sequence);
                let blocked = &blocked[..blocked.len().min(MAX_BLOCKED_USERS)];
                put_u16(out, blocked.len() as u16);
                for user in blocked {
                    put_short_bytes(out, user.as_str().as_bytes());
                }
            }
        }
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        version(reader, "mailbox command")?;
        let certificate = Certificate::decode(reader)?;
        let issued_at = UnixTime(reader.u64()?);
        let action = match reader.u8()? {
            1 => MailboxAction::Fetch,
            2 => {
                let count = reader.u16()? as usize;
                if count > MAX_ACKS_PER_COMMAND {
                    return Err(DecodeError::Invalid { what: "acknowledgements", reason: "too many" });
                }
                MailboxAction::Ack { ids: (0..count).map(|_| reader.array()).collect::<Result<_, _>>()? }
            }
            3 => {
                let sequence = reader.u64()?;
                let count = reader.u16()? as usize;
                if count > MAX_BLOCKED_USERS {
                    return Err(DecodeError::Invalid { what: "blocked users", reason: "too many" });
                }
                let blocked = (0..count).map(|_| username(reader, "blocked user")).collect::<Result<_, _>>()?;
                MailboxAction::Block { sequence, blocked }
            }
            _ => return Err(DecodeError::Invalid { what: "mailbox command", reason: "unknown kind" }),
        };
        Ok(Self { certificate, issued_at, action })
    }
}

impl Codec for MailboxCommand {
    fn encode(&self, out: &mut Vec<u8>) {
        self.body.encode(out);
        out.extend_from_slice(&self.signature);
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self { body: CommandBody::decode(reader)?, signature: reader.array()? })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::envelope::EnvelopeKey;
    use crate::presence::tests::{TestNetwork, NOW};

    pub fn device_record(network: &TestNetwork, name: &str, device: &DeviceKey, published_at: UnixTime) -> DeviceRecord {
        DeviceBody {
            certificate: network.certificate(name, device),
            envelope_key: EnvelopeKey::for_device(device).public(),
            published_at,
            expires_at: published_at.saturating_add(MAX_DEVICE_RECORD_LIFETIME),
        }
        .sign(device)
    }

    pub fn offline_message(network: &TestNetwork, from: &DeviceKey, to: &str, to_devices: &[&DeviceKey], sent_at: UnixTime) -> OfflineMessage {
        let sender = network.certificate("alice", from);
        let recipient = Username::parse(to).unwrap_or_else(|e| panic!("{e}"));
        let envelopes = to_devices
            .iter()
            .map(|device| {
                Envelope::seal(from, &sender, &recipient, &device.public_key(), &EnvelopeKey::for_device(device).public(), b"hello", sent_at)
                    .unwrap_or_else(|e| panic!("{e}"))
                    .to_bytes()
            })
            .collect();
        OfflineBody { sender, recipient, id: [7; 16], sent_at, envelopes }.sign(from)
    }

    fn verify_device(network: &TestNetwork, bytes: &[u8], now: UnixTime) -> Result<DeviceRecord, MailboxError> {
        DeviceRecord::decode_verified(bytes, &network.name, &network.key.public_key(), now)
    }

    fn verify_message(network: &TestNetwork, bytes: &[u8], now: UnixTime) -> Result<OfflineMessage, MailboxError> {
        OfflineMessage::decode_verified(bytes, &network.name, &network.key.public_key(), now)
    }

    #[test]
    fn a_device_record_outlives_its_certificate_but_not_its_month() {
        let network = TestNetwork::new();
        let device = DeviceKey::generate();
        let record = device_record(&network, "bob", &device, NOW);
        let bytes = record.to_bytes();
        assert_eq!(verify_device(&network, &bytes, NOW), Ok(record.clone()));
        // A week later the certificate has expired; the record still stands.
        let week = NOW.saturating_add(Duration::from_secs(7 * 86_400));
        assert!(verify_device(&network, &bytes, week).is_ok());
        let later = NOW.saturating_add(MAX_DEVICE_RECORD_LIFETIME);
        assert!(matches!(verify_device(&network, &bytes, later), Err(MailboxError::Expired(_))));
        // Published while its certificate was not valid: refused.
        let stale = device_record(&network, "bob", &device, NOW.saturating_add(Duration::from_secs(2 * 86_400)));
        assert!(matches!(verify_device(&network, &stale.to_bytes(), week), Err(MailboxError::Certificate(_))));
        let forged = record.body().clone().sign(&DeviceKey::generate());
        assert_eq!(verify_device(&network, &forged.to_bytes(), NOW), Err(MailboxError::BadSignature));
    }

    #[test]
    fn offline_messages_verify_and_every_flipped_byte_is_refused() {
        let network = TestNetwork::new();
        let (alice, phone, laptop) = (DeviceKey::generate(), DeviceKey::generate(), DeviceKey::generate());
        let message = offline_message(&network, &alice, "bob", &[&phone, &laptop], NOW);
        let bytes = message.to_bytes();
        let verified = verify_message(&network, &bytes, NOW).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(verified.devices(), vec![phone.public_key(), laptop.public_key()]);
        assert!(verified.envelope_for(&laptop.public_key()).is_some());
        assert!(verified.envelope_for(&alice.public_key()).is_none());
        // A week later (the certificate long expired) it is still good: checked at its send time.
        assert!(verify_message(&network, &bytes, NOW.saturating_add(Duration::from_secs(7 * 86_400))).is_ok());
        assert!(matches!(
            verify_message(&network, &bytes, NOW.saturating_add(OFFLINE_MESSAGE_LIFETIME + Duration::from_secs(1))),
            Err(MailboxError::Expired(_))
        ));
        for index in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[index] ^= 0x10;
            assert!(verify_message(&network, &tampered, NOW).is_err(), "byte {index}");
        }
        assert!(matches!(verify_message(&network, &vec![1; MAX_OFFLINE_MESSAGE_BYTES + 1], NOW), Err(MailboxError::TooLarge { .. })));
    }

    #[test]
    fn mailbox_commands_are_fresh_and_signed_and_round_trip() {
        let network = TestNetwork::new();
        let bob = DeviceKey::generate();
        let certificate = network.certificate("bob", &bob);
        let carol = Username::parse("carol").unwrap_or_else(|e| panic!("{e}"));
        for action in [MailboxAction::Fetch, MailboxAction::Ack { ids: vec![[1; 16], [2; 16]] }, MailboxAction::Block { sequence: 3, blocked: vec![carol] }] {
            let command = CommandBody { certificate: certificate.clone(), issued_at: NOW, action }.sign(&bob);
            let bytes = command.to_bytes();
            let verify = |now| MailboxCommand::decode_verified(&bytes, &network.name, &network.key.public_key(), now);
            assert_eq!(verify(NOW), Ok(command.clone()));
            assert!(matches!(verify(NOW.saturating_add(COMMAND_WINDOW + Duration::from_secs(1))), Err(MailboxError::Expired(_))), "a replay later");
            let forged = command.body().clone().sign(&DeviceKey::generate());
            assert_eq!(
                MailboxCommand::decode_verified(&forged.to_bytes(), &network.name, &network.key.public_key(), NOW),
                Err(MailboxError::BadSignature)
            );
        }
    }
}
