//! The client's own database (`history.db` in the profile): chat history, contacts and calls.
//! SQLite, WAL, one connection; small enough to use from the daemon's task directly.

use std::path::Path;

use anyhow::{Context, Result};
use koe_types::UnixTime;
use rusqlite::{params, Connection, OptionalExtension};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    peer TEXT NOT NULL,
    incoming INTEGER NOT NULL,
    body TEXT NOT NULL,
    at INTEGER NOT NULL,
    status TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_peer ON messages(peer, id);
CREATE TABLE IF NOT EXISTS contacts (
    username TEXT PRIMARY KEY NOT NULL,
    state TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,
    call_id TEXT NOT NULL,
    peer TEXT NOT NULL,
    incoming INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    talked_ms INTEGER,
    ended TEXT NOT NULL,
    path TEXT,
    mos REAL
);
CREATE TABLE IF NOT EXISTS taken (
    id BLOB PRIMARY KEY NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS blocked (
    username TEXT PRIMARY KEY NOT NULL,
    at INTEGER NOT NULL
);";

/// Columns added after the first release, for databases made before them.
const MIGRATIONS: &[(&str, &str)] = &[("messages", "uid TEXT")];

pub use super::api::ContactState;
use super::api::{MessageState, MessageView};

fn contact_state_text(state: ContactState) -> &'static str {
    match state {
        ContactState::Requested => "requested",
        ContactState::AwaitingMe => "awaiting-me",
        ContactState::Accepted => "accepted",
        ContactState::Declined => "declined",
    }
}

fn parse_contact_state(text: &str) -> ContactState {
    match text {
        "requested" => ContactState::Requested,
        "awaiting-me" => ContactState::AwaitingMe,
        "accepted" => ContactState::Accepted,
        _ => ContactState::Declined,
    }
}

/// One call, as the call history keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRecord {
    /// The call's id as signalling names it.
    pub call_id: String,
    pub peer: String,
    pub incoming: bool,
    pub started_at: UnixTime,
    /// How long it was answered for; `None` when it never was.
    pub talked_ms: Option<u64>,
    /// Why it ended, as the call reported it ("you hung up", "missed", "declined", …).
    pub ended: String,
    /// The media path (`direct (host … ↔ host …)`), once media flowed.
    pub path: Option<String>,
    /// The E-model estimate for the call.
    pub mos: Option<f64>,
}

impl From<&CallRecord> for super::api::CallView {
    fn from(call: &CallRecord) -> Self {
        Self {
            peer: call.peer.clone(),
            incoming: call.incoming,
            started_at: call.started_at.as_secs(),
            talked_ms: call.talked_ms,
            ended: call.ended.clone(),
            path: call.path.clone(),
            mos: call.mos,
        }
    }
}

#[derive(Debug)]
pub struct History {
    connection: Connection,
}

impl History {
    pub fn open(path: &Path) -> Result<Self> {
        let connection = Connection::open(path)
            .with_context(|| format!("cannot open the history database {}", path.display()))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.execute_batch(SCHEMA).context("cannot set up the history database")?;
        for (table, column) in MIGRATIONS {
            let name = column.split_whitespace().next().unwrap_or_default();
            let present: bool = connection
                .prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?
                .exists(params![name])?;
            if !present {
                connection.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column}"))?;
            }
        }
        Ok(Self { connection })
    }

    /// Adds a message; `uid` is the sender's id for it, which a receipt names.
    pub fn add_message(&self, peer: &str, incoming: bool, body: &str, at: UnixTime, state: MessageState, uid: Option<&str>) -> Result<i64> {
        self.connection.execute(
            "INSERT INTO messages (peer, incoming, body, at, status, uid) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![peer, incoming, body, at.as_secs() as i64, state.as_str(), uid],
        )?;
        Ok(self.connection.last_insert_rowid())
    }

    /// `peer` has the messages sent to them with these ids: they are delivered.
    pub fn delivered(&self, peer: &str, uids: &[String]) -> Result<usize> {
        let mut changed = 0;
        for uid in uids {
            changed += self.connection.execute(
                "UPDATE messages SET status = ?3 WHERE peer = ?1 AND uid = ?2 AND incoming = 0",
                params![peer, uid, MessageState::Delivered.as_str()],
            )?;
        }
        Ok(changed)
    }

    /// Records that a message from a mailbox was taken; false if it was taken before (a
    /// replay: the mailbox replicas can offer a message again, and a malicious one might).
    pub fn take_once(&self, id: &[u8; 16], now: UnixTime) -> Result<bool> {
        let horizon = now.saturating_sub(koe_overlay::mailbox::OFFLINE_MESSAGE_LIFETIME + std::time::Duration::from_secs(86_400));
        self.connection.execute("DELETE FROM taken WHERE at < ?1", params![horizon.as_secs() as i64])?;
        Ok(self.connection.execute("INSERT OR IGNORE INTO taken (id, at) VALUES (?1, ?2)", params![id.to_vec(), now.as_secs() as i64])? > 0)
    }

    pub fn block(&self, username: &str, blocked: bool) -> Result<bool> {
        let changed = if blocked {
            self.connection.execute(
                "INSERT OR IGNORE INTO blocked (username, at) VALUES (?1, ?2)",
                params![username, UnixTime::now().as_secs() as i64],
            )?
        } else {
            self.connection.execute("DELETE FROM blocked WHERE username = ?1", params![username])?
        };
        Ok(changed > 0)
    }

    pub fn blocked(&self) -> Result<Vec<String>> {
        let mut statement = self.connection.prepare("SELECT username FROM blocked ORDER BY username")?;
        let blocked = statement.query_map([], |row| row.get(0))?.collect::<Result<_, _>>()?;
        Ok(blocked)
    }

    pub fn is_blocked(&self, username: &str) -> Result<bool> {
        Ok(self.connection.prepare("SELECT 1 FROM blocked WHERE username = ?1")?.exists(params![username])?)
    }

    pub fn set_message_state(&self, id: i64, state: MessageState) -> Result<()> {
        self.connection
            .execute("UPDATE messages SET status = ?2 WHERE id = ?1", params![id, state.as_str()])?;
        Ok(())
    }

    /// The last `limit` messages, oldest first, with one peer or all.
    pub fn messages(&self, peer: Option<&str>, limit: usize) -> Result<Vec<MessageView>> {
        let mut statement = self.connection.prepare(
            "SELECT peer, incoming, body, at, status FROM messages
             WHERE (?1 IS NULL OR peer = ?1) ORDER BY id DESC LIMIT ?2",
        )?;
        let mut messages = statement
            .query_map(params![peer, limit as i64], |row| {
                Ok(MessageView {
                    peer: row.get(0)?,
                    incoming: row.get(1)?,
                    text: row.get(2)?,
                    at: row.get::<_, i64>(3)?.max(0) as u64,
                    state: MessageState::parse(&row.get::<_, String>(4)?),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        messages.reverse();
        Ok(messages)
    }

    pub fn contact(&self, username: &str) -> Result<Option<ContactState>> {
        Ok(self
            .connection
            .query_row("SELECT state FROM contacts WHERE username = ?1", params![username], |row| {
                row.get::<_, String>(0)
            })
            .optional()?
            .map(|s| parse_contact_state(&s)))
    }

    pub fn set_contact(&self, username: &str, state: ContactState) -> Result<()> {
        self.connection.execute(
            "INSERT INTO contacts (username, state, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(username) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
            params![username, contact_state_text(state), UnixTime::now().as_secs() as i64],
        )?;
        Ok(())
    }

    pub fn remove_contact(&self, username: &str) -> Result<bool> {
        Ok(self.connection.execute("DELETE FROM contacts WHERE username = ?1", params![username])? > 0)
    }

    pub fn contacts(&self) -> Result<Vec<(String, ContactState)>> {
        let mut statement = self.connection.prepare("SELECT username, state FROM contacts ORDER BY username")?;
        let contacts = statement
            .query_map([], |row| Ok((row.get::<_, String>(0)?, parse_contact_state(&row.get::<_, String>(1)?))))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(contacts)
    }

    pub fn add_call(&self, call: &CallRecord) -> Result<()> {
        self.connection.execute(
            "INSERT INTO calls (call_id, peer, incoming, started_at, talked_ms, ended, path, mos)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                call.call_id,
                call.peer,
                call.incoming,
                call.started_at.as_secs() as i64,
                call.talked_ms.map(|ms| ms as i64),
                call.ended,
                call.path,
                call.mos
            ],
        )?;
        Ok(())
    }

    /// The last `limit` calls, oldest first.
    pub fn calls(&self, limit: usize) -> Result<Vec<CallRecord>> {
        let mut statement = self.connection.prepare(
            "SELECT call_id, peer, incoming, started_at, talked_ms, ended, path, mos FROM calls ORDER BY id DESC LIMIT ?1",
        )?;
        let mut calls = statement
            .query_map(params![limit as i64], |row| {
                Ok(CallRecord {
                    call_id: row.get(0)?,
                    peer: row.get(1)?,
                    incoming: row.get(2)?,
                    started_at: UnixTime(row.get::<_, i64>(3)?.max(0) as u64),
                    talked_ms: row.get::<_, Option<i64>>(4)?.map(|ms| ms.max(0) as u64),
                    ended: row.get(5)?,
                    path: row.get(6)?,
                    mos: row.get(7)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        calls.reverse();
        Ok(calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_from_a_mailbox_is_taken_once_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("history.db");
        let now = UnixTime(1_800_000_000);
        {
            let history = History::open(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(history.take_once(&[1; 16], now).unwrap_or_else(|e| panic!("{e}")));
            assert!(!history.take_once(&[1; 16], now).unwrap_or_else(|e| panic!("{e}")), "a replay is refused");
        }
        let history = History::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let week = now.saturating_add(std::time::Duration::from_secs(7 * 86_400));
        assert!(!history.take_once(&[1; 16], week).unwrap_or_else(|e| panic!("{e}")), "remembered across a restart");
        // Past the mailboxes' lifetime no replica would offer it; the id may be forgotten.
        let later = now.saturating_add(koe_overlay::mailbox::OFFLINE_MESSAGE_LIFETIME + std::time::Duration::from_secs(2 * 86_400));
        assert!(history.take_once(&[1; 16], later).unwrap_or_else(|e| panic!("{e}")));
    }

    #[test]
    fn a_history_made_before_receipts_gains_their_column() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("history.db");
        let old = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
        old.execute_batch("CREATE TABLE messages (id INTEGER PRIMARY KEY, peer TEXT NOT NULL, incoming INTEGER NOT NULL, body TEXT NOT NULL, at INTEGER NOT NULL, status TEXT NOT NULL); INSERT INTO messages (peer, incoming, body, at, status) VALUES ('bob', 0, 'old', 1, 'delivered');")
            .unwrap_or_else(|e| panic!("{e}"));
        drop(old);
        let history = History::open(&path).unwrap_or_else(|e| panic!("{e}"));
        history.add_message("bob", false, "new", UnixTime(2), MessageState::Waiting, Some("abc")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(history.delivered("bob", &["abc".to_string()]).unwrap_or_else(|e| panic!("{e}")), 1);
        let messages = history.messages(Some("bob"), 10).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(messages.iter().map(|m| (m.text.as_str(), m.state)).collect::<Vec<_>>(), vec![("old", MessageState::Delivered), ("new", MessageState::Delivered)]);
    }
}
