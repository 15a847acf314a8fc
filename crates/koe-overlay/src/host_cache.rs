//! The client's host cache: up to [`MAX_HOSTS`] supernodes it has heard of, best first.
//! "Best" is the one that worked most recently, then the lowest round-trip time; supernodes
//! that keep failing sink and are eventually forgotten. Sans-IO; persisted as JSON by the
//! driver so a restarted client attaches without the bootstrap list.

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

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCache {
    hosts: Vec<HostEntry>,
}

impl HostCache {
    /// Adds a supernode heard of (from the network file, identify or a lookup), unless known.
    pub fn learn(&mut self, address: &str) {
        if self.hosts.iter().any(|h| h.address == address) {
            return;
        }
        if self.hosts.len() >= MAX_HOSTS {
            self.sort();
            self.hosts.pop();
        }
        self.hosts.push(HostEntry {
            address: address.to_string(),
            last_success: None,
            rtt_micros: None,
            consecutive_failures: 0,
        });
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
        self.hosts.sort_by(|a, b| {
            a.consecutive_failures
                .cmp(&b.consecutive_failures)
                .then(b.last_success.is_some().cmp(&a.last_success.is_some()))
                .then(a.rtt_micros.unwrap_or(u64::MAX).cmp(&b.rtt_micros.unwrap_or(u64::MAX)))
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
    fn the_cache_never_exceeds_its_bound() {
        let mut cache = HostCache::default();
        for i in 0..MAX_HOSTS + 50 {
            cache.learn(&format!("/ip4/10.0.0.1/tcp/{i}"));
        }
        assert_eq!(cache.len(), MAX_HOSTS);
    }
}
