//! Token buckets keyed by source address or account, against password guessing and sign-up
//! floods. Sans-IO: every call takes `now`, so tests drive time by hand.
//!
//! A bucket that has refilled completely is the same as no bucket, so such entries are pruned
//! when the table grows past its bound; the table's memory stays bounded under a flood of
//! addresses.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How many attempts may come at once (`burst`) and how fast the allowance comes back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub burst: u32,
    pub refill_every: Duration,
}

impl RateLimit {
    /// No limit at all (for benchmarks and closed test networks).
    pub const UNLIMITED: RateLimit = RateLimit {
        burst: u32::MAX,
        refill_every: Duration::ZERO,
    };

    pub fn per_minute(burst: u32, per_minute: u32) -> Self {
        Self {
            burst,
            refill_every: Duration::from_secs(60) / per_minute.max(1),
        }
    }

    fn is_unlimited(&self) -> bool {
        self.burst == u32::MAX
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    /// Tokens in this bucket at `now`, never more than the burst.
    fn refilled(self, limit: RateLimit, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated);
        let earned = if limit.refill_every.is_zero() {
            f64::INFINITY
        } else {
            elapsed.as_secs_f64() / limit.refill_every.as_secs_f64()
        };
        (self.tokens + earned).min(f64::from(limit.burst))
    }
}

#[derive(Debug)]
pub struct RateLimiter<K> {
    limit: RateLimit,
    buckets: HashMap<K, Bucket>,
    max_tracked_keys: usize,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(limit: RateLimit, max_tracked_keys: usize) -> Self {
        Self {
            limit,
            buckets: HashMap::new(),
            max_tracked_keys,
        }
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> f64 {
        bucket.refilled(self.limit, now)
    }

    /// How long until `key` may try again, or `None` if it may try now. Takes nothing.
    pub fn wait_time(&self, key: &K, now: Instant) -> Option<Duration> {
        if self.limit.is_unlimited() {
            return None;
        }
        let bucket = self.buckets.get(key)?;
        let tokens = self.refilled(*bucket, now);
        (tokens < 1.0).then(|| self.limit.refill_every.mul_f64(1.0 - tokens))
    }

    /// Takes one attempt from `key`'s allowance if there is one; otherwise says how long to wait.
    pub fn try_acquire(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        if let Some(wait) = self.wait_time(key, now) {
            return Err(wait);
        }
        self.spend(key, now);
        Ok(())
    }

    /// Takes one attempt from `key`'s allowance, e.g. after a wrong password. The allowance
    /// stops at zero.
    pub fn spend(&mut self, key: &K, now: Instant) {
        if self.limit.is_unlimited() {
            return;
        }
        let full = f64::from(self.limit.burst);
        let tokens = match self.buckets.get(key) {
            Some(bucket) => self.refilled(*bucket, now),
            None => full,
        };
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_tracked_keys {
            self.prune(now);
        }
        self.buckets.insert(
            key.clone(),
            Bucket {
                tokens: (tokens - 1.0).max(0.0),
                updated: now,
            },
        );
    }

    /// Gives back one attempt taken by [`Self::try_acquire`], e.g. when the password was right.
    pub fn refund(&mut self, key: &K, now: Instant) {
        let limit = self.limit;
        if let Some(bucket) = self.buckets.get_mut(key) {
            bucket.tokens = (bucket.refilled(limit, now) + 1.0).min(f64::from(limit.burst));
            bucket.updated = now;
        }
    }

    /// Drops buckets that have refilled completely; if that is not enough, the stalest ones.
    fn prune(&mut self, now: Instant) {
        let full = f64::from(self.limit.burst);
        let limit = self.limit;
        self.buckets
            .retain(|_, bucket| bucket.refilled(limit, now) < full);
        while self.buckets.len() >= self.max_tracked_keys {
            let stalest = self
                .buckets
                .iter()
                .min_by_key(|(_, bucket)| bucket.updated)
                .map(|(key, _)| key.clone());
            match stalest {
                Some(key) => self.buckets.remove(&key),
                None => break,
            };
        }
    }

    pub fn tracked_keys(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(RateLimit::per_minute(3, 6), 100);
        for _ in 0..3 {
            assert_eq!(limiter.try_acquire(&"a", start), Ok(()));
        }
        let wait = limiter.try_acquire(&"a", start).err();
        assert_eq!(wait, Some(Duration::from_secs(10)));
        assert_eq!(limiter.try_acquire(&"b", start), Ok(()), "keys are independent");
        assert!(limiter.try_acquire(&"a", start + Duration::from_secs(9)).is_err());
        assert_eq!(limiter.try_acquire(&"a", start + Duration::from_secs(10)), Ok(()));
    }

    #[test]
    fn spending_only_on_failure_locks_after_burst() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(RateLimit::per_minute(2, 1), 100);
        assert_eq!(limiter.wait_time(&"alice", start), None);
        limiter.spend(&"alice", start);
        limiter.spend(&"alice", start);
        limiter.spend(&"alice", start);
        assert_eq!(limiter.wait_time(&"alice", start), Some(Duration::from_secs(60)));
    }

    #[test]
    fn table_stays_bounded_under_a_flood_of_keys() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(RateLimit::per_minute(1, 1), 64);
        for key in 0..10_000u32 {
            limiter.spend(&key, start);
        }
        assert!(limiter.tracked_keys() <= 64);
        // The most recent offender is still limited.
        assert!(limiter.wait_time(&9_999, start).is_some());
    }

    #[test]
    fn unlimited_never_limits() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(RateLimit::UNLIMITED, 1);
        for _ in 0..1000 {
            assert_eq!(limiter.try_acquire(&"a", start), Ok(()));
        }
        assert_eq!(limiter.tracked_keys(), 0);
    }
}
