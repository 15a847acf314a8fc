//! The client's host cache: up to [`MAX_HOSTS`] supernodes it has heard of, best first.
//! "Best" is the one that worked most recently, then the lowest round-trip time; supernodes
//! that keep failing sink and are eventually forgotten. Among equals (typically every
//! supernode a parent listed, none tried yet) each cache has its own random order, so that
//! the clients of a supernode that dies spread over the others instead of all stampeding to
//! the first one listed. Sans-IO; persisted as JSON by the driver so a restarted client
//! attaches without the bootstrap list.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use koe_types::UnixTime;
use serde::{Deserialize, Serialize};

pub const MAX_HOSTS: usize = 200;
/// A supernode that failed this many times in a row since its last success is dropped.
const MAX_CONSECUTIVE_FAILURES: u32 = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    /// A multiaddr ending in `/p2p/PEER_ID`.
    pub address: String,
    pub last_success: Option<UnixTime>,
    pub rtt_micros: Option<u64>,
    pub consecutive_failures: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCache {
    hosts: Vec<HostEntry>,
    /// Orders equally good supernodes; chosen at random per cache, never saved.
    #[serde(skip, default = "random_salt")]
    salt: u64,
}

fn random_salt() -> u64 {
    rand_core::RngCore::next_u64(&mut rand_core::OsRng)
}

impl Default for HostCache {
    fn default() -> Self {
        Self::with_salt(random_salt())
    }
}

impl HostCache {
    /// An empty cache whose order among equal supernodes follows `salt` (tests fix it).
    pub fn with_salt(salt: u64) -> Self {
        Self { hosts: Vec::new(), salt }
    }

    /// Adds a supernode heard of (from the network file or a parent's list), unless known.
    pub fn learn(&mut self, address: &str) {
        if self.hosts.iter().any(|h| h.address == address) {
            return;
        }
        if self.hosts.len() >= MAX_HOSTS {
            self.hosts.pop();
        }
        self.hosts.push(HostEntry {
            address: address.to_string(),
            last_success: None,
            rtt_micros: None,
            consecutive_failures: 0,
        });
        self.sort();
    }

    pub fn succeeded(&mut self, address: &str, rtt: Option<Duration>, now: UnixTime) {
        self.learn(address);
        if let Some(host) = self.hosts.iter_mut().find(|h| h.address == address) {
            host.last_success = Some(now);
            host.consecutive_failures = 0;
            if let Some(rtt) = rtt {
                host.rtt_micros = Some(rtt.as_micros() as u64);
            }
        }
        self.sort();
    }

    pub fn failed(&mut self, address: &str) {
        if let Some(host) = self.hosts.iter_mut().find(|h| h.address == address) {
            host.consecutive_failures += 1;
        }
        self.hosts
            .retain(|h| h.consecutive_failures < MAX_CONSECUTIVE_FAILURES);
        self.sort();
    }

    /// Candidates to attach to, best first.
    pub fn candidates(&self) -> impl Iterator<Item = &HostEntry> {
        self.hosts.iter()
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    fn sort(&mut self) {
        let salt = self.salt;
        let tiebreak = |address: &str| {
            let mut hasher = DefaultHasher::new();
            salt.hash(&mut hasher);
            address.hash(&mut hasher);
            hasher.finish()
        };
        self.hosts.sort_by_cached_key(|h| {
            (
                h.consecutive_failures,
                h.last_success.is_none(),
                h.rtt_micros.unwrap_or(u64::MAX),
                tiebreak(&h.address),
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_hosts_come_first_and_failing_ones_are_forgotten() {
        let mut cache = HostCache::default();
        for name in ["a", "b", "c"] {
            cache.learn(name);
        }
        cache.succeeded("c", Some(Duration::from_millis(5)), UnixTime(10));
        cache.succeeded("b", Some(Duration::from_millis(1)), UnixTime(10));
        let order: Vec<_> = cache.candidates().map(|h| h.address.as_str()).collect();
        assert_eq!(order, ["b", "c", "a"]);
        for _ in 0..MAX_CONSECUTIVE_FAILURES {
            cache.failed("b");
        }
        let order: Vec<_> = cache.candidates().map(|h| h.address.as_str()).collect();
        assert_eq!(order, ["c", "a"]);
    }

    #[test]
    fn caches_order_untried_supernodes_differently() {
        // Five hundred clients that heard the same list from the same parent must not all
        // pick the same next parent when it dies.
        let listed: Vec<String> = (0..19).map(|i| format!("/ip4/10.0.0.{i}/tcp/4000")).collect();
        let mut first_choices = std::collections::HashMap::new();
        for salt in 0..500u64 {
            let mut cache = HostCache::with_salt(salt);
            for address in &listed {
                cache.learn(address);
            }
            let first = cache.candidates().next().map(|h| h.address.clone());
            *first_choices.entry(first).or_insert(0) += 1;
        }
        assert_eq!(first_choices.len(), listed.len(), "every supernode is someone's first choice");
        let busiest = first_choices.values().max().copied().unwrap_or(0);
        assert!(busiest < 60, "one supernode was first choice for {busiest} of 500 caches");
    }

    #[test]
    fn a_saved_cache_keeps_its_hosts_but_not_its_order_salt() {
        let mut cache = HostCache::with_salt(7);
        cache.learn("/ip4/10.0.0.1/tcp/4000");
        cache.succeeded("/ip4/10.0.0.2/tcp/4000", Some(Duration::from_millis(3)), UnixTime(5));
        let saved = serde_json::to_string(&cache).expect("serialize");
        let loaded: HostCache = serde_json::from_str(&saved).expect("deserialize");
        assert_eq!(loaded.hosts, cache.hosts);
        assert_eq!(loaded.candidates().next().map(|h| h.address.as_str()), Some("/ip4/10.0.0.2/tcp/4000"));
    }

    #[test]
    fn the_cache_never_exceeds_its_bound() {
        let mut cache = HostCache::default();
        for i in 0..MAX_HOSTS + 50 {
            cache.learn(&format!("/ip4/10.0.0.1/tcp/{i}"));
        }
        assert_eq!(cache.len(), MAX_HOSTS);
    }
}
