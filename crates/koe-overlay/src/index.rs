//! A supernode's share of the global index: the presence records whose keys fall near it.
//! Sans-IO; the driver hands in `now`.
//!
//! Per user, one record per device (several devices coexist); per device, only the record
//! with the highest sequence number. Expired records disappear. Bounds on devices per user and
//! on users keep memory bounded whatever peers send.

use std::collections::HashMap;

use koe_types::{DevicePublicKey, UnixTime, Username};

use crate::presence::{PresenceError, PresenceRecord};

pub const MAX_DEVICES_PER_USER: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// A device not seen before (or whose record had expired).
    Added,
    /// A newer record for a known device.
    Updated,
}

#[derive(Debug, Default)]
pub struct PresenceIndex {
    users: HashMap<Username, HashMap<DevicePublicKey, PresenceRecord>>,
    records: usize,
    max_records: usize,
}

impl PresenceIndex {
    pub fn new(max_records: usize) -> Self {
        Self {
            users: HashMap::new(),
            records: 0,
            max_records,
        }
    }

    /// Stores an already verified record unless it is older than what is held.
    pub fn store(
        &mut self,
        record: PresenceRecord,
        now: UnixTime,
    ) -> Result<StoreOutcome, PresenceError> {
        let username = record.username().clone();
        let device = *record.body().certificate.device_key();
        if let Some(held) = self.users.get(&username).and_then(|d| d.get(&device)) {
            let live = held.body().expires_at > now;
            if live && held.body().sequence >= record.body().sequence {
                return Err(PresenceError::Stale {
                    offered: record.body().sequence,
                    held: held.body().sequence,
                });
            }
        }
        if self.records >= self.max_records {
            self.expire(now);
        }
        let devices = self.users.entry(username).or_default();
        if !devices.contains_key(&device) && devices.len() >= MAX_DEVICES_PER_USER {
            // The device whose record runs out first makes room.
            if let Some(oldest) = devices
                .iter()
                .min_by_key(|(_, r)| r.body().expires_at)
                .map(|(key, _)| *key)
            {
                devices.remove(&oldest);
                self.records -= 1;
            }
        }
        let replaced = devices.insert(device, record);
        match replaced {
            Some(previous) if previous.body().expires_at > now => Ok(StoreOutcome::Updated),
            Some(_) => Ok(StoreOutcome::Added),
            None => {
                self.records += 1;
                Ok(StoreOutcome::Added)
            }
        }
    }

    /// The live records of `username`'s devices.
    pub fn lookup(&self, username: &Username, now: UnixTime) -> Vec<PresenceRecord> {
        self.users
            .get(username)
            .map(|devices| {
                devices
                    .values()
                    .filter(|r| r.body().expires_at > now)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops expired records; returns how many.
    pub fn expire(&mut self, now: UnixTime) -> usize {
        let before = self.records;
        self.users.retain(|_, devices| {
            devices.retain(|_, r| r.body().expires_at > now);
            !devices.is_empty()
        });
        self.records = self.users.values().map(HashMap::len).sum();
        before - self.records
    }

    pub fn records(&self) -> usize {
        self.records
    }

    pub fn is_full(&self) -> bool {
        self.records >= self.max_records
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::tests::{TestNetwork, NOW};
    use koe_types::DeviceKey;
    use std::time::Duration;

    #[test]
    fn devices_of_one_user_coexist_and_newer_records_replace_older() {
        let network = TestNetwork::new();
        let (laptop, phone) = (DeviceKey::generate(), DeviceKey::generate());
        let mut index = PresenceIndex::new(100);
        assert_eq!(index.store(network.record("alice", &laptop, 1), NOW), Ok(StoreOutcome::Added));
        assert_eq!(index.store(network.record("alice", &phone, 1), NOW), Ok(StoreOutcome::Added));
        assert_eq!(index.store(network.record("alice", &laptop, 2), NOW), Ok(StoreOutcome::Updated));
        let alice = Username::parse("alice").unwrap_or_else(|e| panic!("{e}"));
        let found = index.lookup(&alice, NOW);
        assert_eq!(found.len(), 2);
        assert!(found.iter().any(|r| r.body().sequence == 2));
        assert_eq!(index.records(), 2);
    }

    #[test]
    fn replayed_and_older_records_are_refused() {
        let network = TestNetwork::new();
        let laptop = DeviceKey::generate();
        let mut index = PresenceIndex::new(100);
        let record = network.record("alice", &laptop, 5);
        index.store(record.clone(), NOW).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            index.store(record, NOW),
            Err(PresenceError::Stale { offered: 5, held: 5 })
        );
        assert!(index.store(network.record("alice", &laptop, 4), NOW).is_err());
    }

    #[test]
    fn records_expire_and_devices_per_user_are_bounded() {
        let network = TestNetwork::new();
        let mut index = PresenceIndex::new(1000);
        for _ in 0..MAX_DEVICES_PER_USER + 5 {
            index
                .store(network.record("alice", &DeviceKey::generate(), 1), NOW)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(index.records(), MAX_DEVICES_PER_USER);
        let later = NOW.saturating_add(Duration::from_secs(121));
        let alice = Username::parse("alice").unwrap_or_else(|e| panic!("{e}"));
        assert!(index.lookup(&alice, later).is_empty());
        assert_eq!(index.expire(later), MAX_DEVICES_PER_USER);
        assert_eq!(index.records(), 0);
    }
}
