//! A supernode's share of the global index: the presence records whose keys fall near it.
//! Sans-IO; the driver hands in `now`.
//!
//! Per key, one record per device (several devices coexist); per device, only the record
//! with the highest sequence number. A key is a username, whose records are its devices', or
//! the gateway [`directory`](crate::directory), whose records are the gateways' (each also
//! kept under its own name); what may go under which key is checked here, for every record.
//! Expired records disappear. Bounds on devices per key and on keys keep memory bounded
//! whatever peers send.

use std::collections::HashMap;

use koe_types::{DevicePublicKey, UnixTime, Username};

use crate::directory;
use crate::presence::{PresenceError, PresenceRecord};

/// Devices per key: per user, and in the gateway directory (which is one key) gateway devices
/// online at once.
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
    /// By key (a username or the gateway directory), the records of its devices.
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

    /// Stores an already verified record under its username unless it is older than what is
    /// held.
    pub fn store(
        &mut self,
        record: PresenceRecord,
        now: UnixTime,
    ) -> Result<StoreOutcome, PresenceError> {
        self.store_under(record.username().clone(), record, now)
    }

    /// Stores an already verified record under `key` (its username, or the gateway directory
    /// for a gateway's; anything else is refused) unless it is older than what is held there.
    pub fn store_under(
        &mut self,
        key: Username,
        record: PresenceRecord,
        now: UnixTime,
    ) -> Result<StoreOutcome, PresenceError> {
        directory::check_listing(&key, &record)?;
        let device = *record.body().certificate.device_key();
        if let Some(held) = self.users.get(&key).and_then(|d| d.get(&device)) {
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
        let devices = self.users.entry(key).or_default();
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

    /// The live records under `key`: a user's devices, or the gateways in the directory.
    pub fn lookup(&self, key: &Username, now: UnixTime) -> Vec<PresenceRecord> {
        self.users
            .get(key)
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
    fn gateways_are_kept_under_the_directory_as_well_and_users_never() {
        use crate::directory::{gateway_directory, GATEWAY_DIRECTORY};
        use koe_types::Role;
        let network = TestNetwork::new();
        let mut index = PresenceIndex::new(100);
        let (eu, us) = (DeviceKey::generate(), DeviceKey::generate());
        let directory = gateway_directory();
        for (name, device) in [("gw-eu", &eu), ("gw-us", &us)] {
            let gateway = network.record_with_role(name, device, 1, Role::Gateway);
            assert_eq!(index.store(gateway.clone(), NOW), Ok(StoreOutcome::Added));
            assert_eq!(index.store_under(directory.clone(), gateway, NOW), Ok(StoreOutcome::Added));
        }
        let alice = network.record("alice", &DeviceKey::generate(), 1);
        assert_eq!(index.store_under(directory.clone(), alice.clone(), NOW), Err(PresenceError::NotAGateway(Role::User)));
        let bob = Username::parse("bob").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(index.store_under(bob.clone(), alice, NOW), Err(PresenceError::ForeignKey { .. })));
        // A user certificate named after the directory cannot get in under its own name.
        let impostor = network.record_with_role(GATEWAY_DIRECTORY, &DeviceKey::generate(), 1, Role::User);
        assert_eq!(index.store(impostor, NOW), Err(PresenceError::NotAGateway(Role::User)));

        let listed = index.lookup(&directory, NOW);
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|r| r.body().certificate.role() == Role::Gateway));
        assert!(index.lookup(&bob, NOW).is_empty());
        assert_eq!(index.records(), 4, "each gateway under its name and the directory");
        // A newer record replaces the older under each key on its own.
        let newer = network.record_with_role("gw-eu", &eu, 2, Role::Gateway);
        assert_eq!(index.store_under(directory.clone(), newer.clone(), NOW), Ok(StoreOutcome::Updated));
        assert!(index.store_under(directory.clone(), newer, NOW).is_err());
    }

    #[test]
    fn the_directory_holds_at_most_as_many_gateways_as_a_user_has_devices() {
        use crate::directory::gateway_directory;
        let network = TestNetwork::new();
        let mut index = PresenceIndex::new(1000);
        for n in 0..MAX_DEVICES_PER_USER + 5 {
            let gateway = network.record_with_role(&format!("gw-{n}"), &DeviceKey::generate(), 1, koe_types::Role::Gateway);
            index.store_under(gateway_directory(), gateway, NOW).unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(index.lookup(&gateway_directory(), NOW).len(), MAX_DEVICES_PER_USER);
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
