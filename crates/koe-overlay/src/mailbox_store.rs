//! A supernode's share of the offline mailboxes and device records, on disk (SQLite, WAL) so
//! that a restart keeps them. Takes only verified records, messages and commands
//! ([`crate::mailbox`]); time is an input.
//!
//! Quotas per recipient: [`MAX_MESSAGES_PER_MAILBOX`] messages and [`MAX_MAILBOX_BYTES`], of
//! which one sender may take [`MAX_MESSAGES_PER_SENDER`]; a sender the owner blocked may take
//! none. A message waits per device it was sealed to, until that device acknowledges it or it
//! expires; the id of one every device took is remembered until it would have expired, so a
//! replay of it (by anyone: it is validly signed) is not kept again. Every write is one transaction and idempotent: a message stored twice (a sender's
//! retry, two parents) is kept once.

use std::path::Path;

use koe_types::{DevicePublicKey, UnixTime, Username};
use koe_wire::Codec;
use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;

use crate::mailbox::{DeviceRecord, MessageId, OfflineMessage, MAX_DEVICES_PER_MESSAGE, OFFLINE_MESSAGE_LIFETIME};

pub const MAX_MESSAGES_PER_MAILBOX: usize = 200;
/// Below the overlay's response limit, so a device can fetch its whole mailbox at once.
pub const MAX_MAILBOX_BYTES: usize = 384 * 1024;
pub const MAX_MESSAGES_PER_SENDER: usize = 25;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    username TEXT NOT NULL,
    device BLOB NOT NULL,
    published_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (username, device)
);
CREATE TABLE IF NOT EXISTS messages (
    id BLOB PRIMARY KEY NOT NULL,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    size INTEGER NOT NULL,
    message BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_recipient ON messages(recipient, sender);
CREATE TABLE IF NOT EXISTS waiting (
    id BLOB NOT NULL,
    device BLOB NOT NULL,
    PRIMARY KEY (id, device)
);
CREATE TABLE IF NOT EXISTS gone (
    id BLOB PRIMARY KEY NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS blocks (
    username TEXT PRIMARY KEY NOT NULL,
    sequence INTEGER NOT NULL,
    blocked TEXT NOT NULL
);";

#[derive(Debug, Error)]
pub enum MailboxStoreError {
    #[error("mailbox database: {0}")]
    Database(#[from] rusqlite::Error),
}

/// Why a message was not kept, for the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The recipient's mailbox holds as much as it may.
    MailboxFull,
    /// This sender has left as many messages as one sender may.
    SenderOverQuota,
    /// The recipient does not take messages from this sender.
    Blocked,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::MailboxFull => "their mailbox is full",
            Self::SenderOverQuota => "you have left them as many messages as one sender may",
            Self::Blocked => "they do not take messages from you",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    Stored,
    /// Already held (the same id): nothing changed.
    AlreadyHeld,
}

#[derive(Debug)]
pub struct MailboxStore {
    db: Connection,
}

fn secs(time: UnixTime) -> i64 {
    time.as_secs() as i64
}

impl MailboxStore {
    pub fn open(path: &Path) -> Result<Self, MailboxStoreError> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        Self::with(db)
    }

    /// A store that lives in memory only (tests, or a node told not to keep anything).
    pub fn in_memory() -> Result<Self, MailboxStoreError> {
        Self::with(Connection::open_in_memory()?)
    }

    fn with(db: Connection) -> Result<Self, MailboxStoreError> {
        db.execute_batch(SCHEMA)?;
        Ok(Self { db })
    }

    /// Keeps a verified device record unless a newer one of that device is held.
    pub fn put_device(&mut self, record: &DeviceRecord) -> Result<bool, MailboxStoreError> {
        let body = record.body();
        let changed = self.db.execute(
            "INSERT INTO devices (username, device, published_at, expires_at, record) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(username, device) DO UPDATE SET published_at = excluded.published_at,
                 expires_at = excluded.expires_at, record = excluded.record
             WHERE excluded.published_at > devices.published_at",
            params![record.username().as_str(), record.device().to_bytes().to_vec(), secs(body.published_at), secs(body.expires_at), record.to_bytes()],
        )?;
        // Bounded like presence: the devices whose records run out first make room.
        self.db.execute(
            "DELETE FROM devices WHERE username = ?1 AND device NOT IN
                 (SELECT device FROM devices WHERE username = ?1 ORDER BY expires_at DESC LIMIT ?2)",
            params![record.username().as_str(), MAX_DEVICES_PER_MESSAGE as i64],
        )?;
        Ok(changed > 0)
    }

    /// The live device records of `username` (encoded).
    pub fn devices(&self, username: &Username, now: UnixTime) -> Result<Vec<Vec<u8>>, MailboxStoreError> {
        let mut statement = self.db.prepare("SELECT record FROM devices WHERE username = ?1 AND expires_at > ?2")?;
        let records = statement.query_map(params![username.as_str(), secs(now)], |row| row.get(0))?.collect::<Result<_, _>>()?;
        Ok(records)
    }

    /// Keeps a verified message for its recipient's devices, within quotas.
    pub fn keep(&mut self, message: &OfflineMessage, now: UnixTime) -> Result<Result<Kept, Refusal>, MailboxStoreError> {
        let body = message.body();
        let (recipient, sender) = (body.recipient.as_str(), message.sender().as_str());
        let transaction = self.db.transaction()?;
        let held: Option<i64> = transaction
            .query_row(
                "SELECT 1 FROM messages WHERE id = ?1 UNION ALL SELECT 1 FROM gone WHERE id = ?1",
                params![body.id.to_vec()],
                |row| row.get(0),
            )
            .optional()?;
        if held.is_some() {
            return Ok(Ok(Kept::AlreadyHeld));
        }
        if blocked_by(&transaction, recipient, sender)? {
            return Ok(Err(Refusal::Blocked));
        }
        let (count, bytes): (i64, i64) = transaction.query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE recipient = ?1 AND expires_at > ?2",
            params![recipient, secs(now)],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        let encoded = message.to_bytes();
        if count as usize >= MAX_MESSAGES_PER_MAILBOX || bytes as usize + encoded.len() > MAX_MAILBOX_BYTES {
            return Ok(Err(Refusal::MailboxFull));
        }
        let from_sender: i64 = transaction.query_row(
            "SELECT COUNT(*) FROM messages WHERE recipient = ?1 AND sender = ?2 AND expires_at > ?3",
            params![recipient, sender, secs(now)],
            |row| row.get(0),
        )?;
        if from_sender as usize >= MAX_MESSAGES_PER_SENDER {
            return Ok(Err(Refusal::SenderOverQuota));
        }
        let expires_at = body.sent_at.saturating_add(OFFLINE_MESSAGE_LIFETIME);
        transaction.execute(
            "INSERT INTO messages (id, recipient, sender, expires_at, size, message) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![body.id.to_vec(), recipient, sender, secs(expires_at), encoded.len() as i64, encoded],
        )?;
        for device in message.devices() {
            transaction.execute("INSERT OR IGNORE INTO waiting (id, device) VALUES (?1, ?2)", params![body.id.to_vec(), device.to_bytes().to_vec()])?;
        }
        transaction.commit()?;
        Ok(Ok(Kept::Stored))
    }

    /// The messages waiting for `device` of `username` (encoded), oldest first.
    pub fn waiting(&self, username: &Username, device: &DevicePublicKey, now: UnixTime) -> Result<Vec<Vec<u8>>, MailboxStoreError> {
        let mut statement = self.db.prepare(
            "SELECT m.message FROM messages m JOIN waiting w ON w.id = m.id
             WHERE m.recipient = ?1 AND w.device = ?2 AND m.expires_at > ?3 ORDER BY m.rowid",
        )?;
        let messages = statement
            .query_map(params![username.as_str(), device.to_bytes().to_vec(), secs(now)], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(messages)
    }

    /// `device` of `username` has these: their envelopes for it go, and a message with no
    /// device left waiting goes too. Returns how many were waiting.
    pub fn acknowledge(&mut self, username: &Username, device: &DevicePublicKey, ids: &[MessageId]) -> Result<usize, MailboxStoreError> {
        let transaction = self.db.transaction()?;
        let mut acknowledged = 0;
        for id in ids {
            let owned: Option<i64> = transaction
                .query_row("SELECT 1 FROM messages WHERE id = ?1 AND recipient = ?2", params![id.to_vec(), username.as_str()], |row| row.get(0))
                .optional()?;
            if owned.is_none() {
                continue;
            }
            acknowledged += transaction.execute("DELETE FROM waiting WHERE id = ?1 AND device = ?2", params![id.to_vec(), device.to_bytes().to_vec()])?;
            transaction.execute(
                "INSERT OR IGNORE INTO gone (id, expires_at)
                 SELECT id, expires_at FROM messages WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM waiting WHERE id = ?1)",
                params![id.to_vec()],
            )?;
            transaction.execute("DELETE FROM messages WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM waiting WHERE id = ?1)", params![id.to_vec()])?;
        }
        transaction.commit()?;
        Ok(acknowledged)
    }

    /// The owner's list of users who may not leave messages, if `sequence` is newer than the
    /// one held; what those users left goes at once. Returns whether it was newer.
    pub fn set_blocked(&mut self, username: &Username, sequence: u64, blocked: &[Username]) -> Result<bool, MailboxStoreError> {
        let transaction = self.db.transaction()?;
        let held: Option<i64> = transaction.query_row("SELECT sequence FROM blocks WHERE username = ?1", params![username.as_str()], |row| row.get(0)).optional()?;
        if held.is_some_and(|held| held as u64 >= sequence) {
            return Ok(false);
        }
        let list = blocked.iter().map(Username::as_str).collect::<Vec<_>>().join("\n");
        transaction.execute(
            "INSERT INTO blocks (username, sequence, blocked) VALUES (?1, ?2, ?3)
             ON CONFLICT(username) DO UPDATE SET sequence = excluded.sequence, blocked = excluded.blocked",
            params![username.as_str(), sequence as i64, list],
        )?;
        for sender in blocked {
            transaction.execute(
                "DELETE FROM waiting WHERE id IN (SELECT id FROM messages WHERE recipient = ?1 AND sender = ?2)",
                params![username.as_str(), sender.as_str()],
            )?;
            transaction.execute("DELETE FROM messages WHERE recipient = ?1 AND sender = ?2", params![username.as_str(), sender.as_str()])?;
        }
        transaction.commit()?;
        Ok(true)
    }

    /// Drops expired messages and device records; returns how many messages went.
    pub fn expire(&mut self, now: UnixTime) -> Result<usize, MailboxStoreError> {
        let transaction = self.db.transaction()?;
        transaction.execute("DELETE FROM waiting WHERE id IN (SELECT id FROM messages WHERE expires_at <= ?1)", params![secs(now)])?;
        let messages = transaction.execute("DELETE FROM messages WHERE expires_at <= ?1", params![secs(now)])?;
        transaction.execute("DELETE FROM devices WHERE expires_at <= ?1", params![secs(now)])?;
        transaction.execute("DELETE FROM gone WHERE expires_at <= ?1", params![secs(now)])?;
        transaction.commit()?;
        Ok(messages)
    }

    /// Messages held, for metrics.
    pub fn messages_held(&self) -> Result<u64, MailboxStoreError> {
        Ok(self.db.query_row("SELECT COUNT(*) FROM messages", [], |row| row.get::<_, i64>(0))? as u64)
    }
}

fn blocked_by(db: &Connection, recipient: &str, sender: &str) -> Result<bool, rusqlite::Error> {
    let list: Option<String> = db.query_row("SELECT blocked FROM blocks WHERE username = ?1", params![recipient], |row| row.get(0)).optional()?;
    Ok(list.is_some_and(|list| list.lines().any(|blocked| blocked == sender)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::tests::{device_record, offline_message};
    use crate::mailbox::OfflineBody;
    use crate::presence::tests::{TestNetwork, NOW};
    use koe_types::DeviceKey;
    use std::time::Duration;

    fn user(name: &str) -> Username {
        Username::parse(name).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ok<T>(result: Result<T, MailboxStoreError>) -> T {
        result.unwrap_or_else(|e| panic!("{e}"))
    }

    /// The same message with another id.
    fn with_id(network: &TestNetwork, from: &DeviceKey, to: &[&DeviceKey], id: u8) -> OfflineMessage {
        let message = offline_message(network, from, "bob", to, NOW);
        OfflineBody { id: [id; 16], ..message.body().clone() }.sign(from)
    }

    #[test]
    fn a_message_waits_per_device_until_each_has_acknowledged_it() {
        let network = TestNetwork::new();
        let (alice, phone, laptop) = (DeviceKey::generate(), DeviceKey::generate(), DeviceKey::generate());
        let mut store = ok(MailboxStore::in_memory());
        let message = offline_message(&network, &alice, "bob", &[&phone, &laptop], NOW);
        assert_eq!(ok(store.keep(&message, NOW)), Ok(Kept::Stored));
        assert_eq!(ok(store.keep(&message, NOW)), Ok(Kept::AlreadyHeld), "idempotent");
        let bob = user("bob");
        assert_eq!(ok(store.waiting(&bob, &phone.public_key(), NOW)), vec![message.to_bytes()]);
        assert_eq!(ok(store.acknowledge(&bob, &phone.public_key(), &[[7; 16]])), 1);
        assert!(ok(store.waiting(&bob, &phone.public_key(), NOW)).is_empty());
        assert_eq!(ok(store.waiting(&bob, &laptop.public_key(), NOW)).len(), 1, "the laptop's copy still waits");
        // Someone else cannot acknowledge bob's message away.
        assert_eq!(ok(store.acknowledge(&user("eve"), &laptop.public_key(), &[[7; 16]])), 0);
        assert_eq!(ok(store.acknowledge(&bob, &laptop.public_key(), &[[7; 16]])), 1);
        assert_eq!(ok(store.messages_held()), 0);
        // Replayed after every device took it: not kept again.
        assert_eq!(ok(store.keep(&message, NOW)), Ok(Kept::AlreadyHeld));
        assert!(ok(store.waiting(&bob, &laptop.public_key(), NOW)).is_empty());
    }

    #[test]
    fn quotas_per_sender_and_per_mailbox_and_blocked_senders() {
        let network = TestNetwork::new();
        let (alice, phone) = (DeviceKey::generate(), DeviceKey::generate());
        let mut store = ok(MailboxStore::in_memory());
        for id in 0..MAX_MESSAGES_PER_SENDER as u8 {
            assert_eq!(ok(store.keep(&with_id(&network, &alice, &[&phone], id), NOW)), Ok(Kept::Stored));
        }
        assert_eq!(ok(store.keep(&with_id(&network, &alice, &[&phone], 200), NOW)), Err(Refusal::SenderOverQuota));
        // bob blocks alice: what she left goes, and she can leave nothing more.
        assert!(ok(store.set_blocked(&user("bob"), 1, &[user("alice")])));
        assert_eq!(ok(store.messages_held()), 0);
        assert_eq!(ok(store.keep(&with_id(&network, &alice, &[&phone], 201), NOW)), Err(Refusal::Blocked));
        assert!(!ok(store.set_blocked(&user("bob"), 1, &[])), "an older or equal list changes nothing");
        assert!(ok(store.set_blocked(&user("bob"), 2, &[])));
        assert_eq!(ok(store.keep(&with_id(&network, &alice, &[&phone], 201), NOW)), Ok(Kept::Stored));
    }

    #[test]
    fn messages_and_device_records_expire_and_survive_a_reopen() {
        let network = TestNetwork::new();
        let (alice, phone) = (DeviceKey::generate(), DeviceKey::generate());
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("mailboxes.db");
        {
            let mut store = ok(MailboxStore::open(&path));
            ok(store.keep(&offline_message(&network, &alice, "bob", &[&phone], NOW), NOW)).unwrap_or_else(|r| panic!("{r}"));
            assert!(ok(store.put_device(&device_record(&network, "bob", &phone, NOW))));
            assert!(!ok(store.put_device(&device_record(&network, "bob", &phone, NOW))), "not newer");
        }
        let mut store = ok(MailboxStore::open(&path));
        let bob = user("bob");
        assert_eq!(ok(store.waiting(&bob, &phone.public_key(), NOW)).len(), 1, "kept across a restart");
        assert_eq!(ok(store.devices(&bob, NOW)).len(), 1);
        let month = NOW.saturating_add(OFFLINE_MESSAGE_LIFETIME + Duration::from_secs(1));
        assert!(ok(store.waiting(&bob, &phone.public_key(), month)).is_empty());
        assert_eq!(ok(store.expire(month)), 1);
        assert!(ok(store.devices(&bob, month)).is_empty());
    }
}
