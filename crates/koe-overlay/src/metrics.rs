//! Counters a supernode keeps for its operator: a one-line summary and Prometheus text.
//! Atomics, so the metrics endpoint and tests read them while the node runs.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct SupernodeMetrics {
    /// Every libp2p connection: supernodes, clients and clients still attaching.
    pub connected_peers: AtomicU64,
    /// Other supernodes connected and in the routing table; 0 means this node is alone.
    pub supernodes: AtomicU64,
    pub attached_clients: AtomicU64,
    pub records_held: AtomicU64,
    /// Offline messages this node keeps for users who were offline.
    pub offline_messages_held: AtomicU64,
    /// Device records taken (each device publishes one at every attach).
    pub device_records_stored: AtomicU64,
    pub records_stored: AtomicU64,
    pub lookups: AtomicU64,
    pub envelopes_routed: AtomicU64,
    pub envelopes_undelivered: AtomicU64,
    /// Kademlia closest-peer queries finished, and the requests they took in all: their ratio
    /// is the number of supernodes a query contacts ("hops").
    pub kad_queries: AtomicU64,
    pub kad_query_requests: AtomicU64,
    refused: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl SupernodeMetrics {
    /// Counts something refused: `what` is "presence" or "envelope" or "attach", `reason` a
    /// short label such as "forged", "expired", "replayed", "oversized", "malformed".
    pub fn refused(&self, what: &'static str, reason: &'static str) {
        if let Ok(mut refused) = self.refused.lock() {
            *refused.entry((what, reason)).or_default() += 1;
        }
    }

    pub fn refused_count(&self, what: &str, reason: &str) -> u64 {
        self.refused
            .lock()
            .map(|r| r.iter().filter(|((w, r), _)| *w == what && *r == reason).map(|(_, n)| *n).sum())
            .unwrap_or(0)
    }

    pub fn refused_total(&self) -> u64 {
        self.refused.lock().map(|r| r.values().sum()).unwrap_or(0)
    }

    /// One line for the operator. Supernodes and clients are counted apart: a node whose
    /// clients hide that it has no other supernode would look fine while the overlay is split.
    pub fn summary(&self) -> String {
        let supernodes = match self.supernodes.load(Ordering::Relaxed) {
            0 => "ALONE: no other supernode connected".to_string(),
            n => format!("supernodes {n}"),
        };
        format!(
            "{supernodes} | clients {} | records held {} | offline messages {} | lookups {} | envelopes routed {} (undelivered {}) | refused {}",
            self.attached_clients.load(Ordering::Relaxed),
            self.records_held.load(Ordering::Relaxed),
            self.offline_messages_held.load(Ordering::Relaxed),
            self.lookups.load(Ordering::Relaxed),
            self.envelopes_routed.load(Ordering::Relaxed),
            self.envelopes_undelivered.load(Ordering::Relaxed),
            self.refused_total(),
        )
    }

    /// Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let gauges = [
            ("koe_supernode_connected_peers", "Connected libp2p peers: supernodes and clients", &self.connected_peers),
            ("koe_supernode_supernodes", "Other supernodes connected and in the routing table (0: alone)", &self.supernodes),
            ("koe_supernode_attached_clients", "Clients attached to this supernode", &self.attached_clients),
            ("koe_supernode_presence_records", "Presence records held", &self.records_held),
            ("koe_supernode_offline_messages", "Offline messages kept for users who were offline", &self.offline_messages_held),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", value.load(Ordering::Relaxed));
        }
        let counters = [
            ("koe_supernode_presence_stored_total", "Presence records accepted", &self.records_stored),
            ("koe_supernode_device_records_stored_total", "Device records accepted", &self.device_records_stored),
            ("koe_supernode_lookups_total", "User lookups served", &self.lookups),
            ("koe_supernode_envelopes_routed_total", "Envelopes delivered end to end", &self.envelopes_routed),
            ("koe_supernode_envelopes_undelivered_total", "Envelopes that could not be delivered", &self.envelopes_undelivered),
            ("koe_supernode_kad_queries_total", "Kademlia closest-peer queries finished", &self.kad_queries),
            ("koe_supernode_kad_query_requests_total", "Requests those queries sent", &self.kad_query_requests),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Ordering::Relaxed));
        }
        let _ = writeln!(out, "# HELP koe_supernode_refused_total Messages refused, by kind and reason\n# TYPE koe_supernode_refused_total counter");
        if let Ok(refused) = self.refused.lock() {
            for ((what, reason), count) in refused.iter() {
                let _ = writeln!(out, "koe_supernode_refused_total{{kind=\"{what}\",reason=\"{reason}\"}} {count}");
            }
        }
        out
    }
}
