//! The supernode's part in offline messages: as a replica, it keeps device records and
//! mailboxes in its [`MailboxStore`] and answers for them; as a parent, it checks that an
//! attached client asks only for itself, asks the supernodes responsible for the user's key
//! (itself included) and combines their answers.

use std::collections::HashMap;

use koe_types::{DevicePublicKey, UnixTime, Username};
use koe_wire::Codec;
use libp2p::kad;
use libp2p::request_response::ResponseChannel;
use libp2p::PeerId;
use tracing::warn;

use super::{Outstanding, QueryPurpose, Supernode, REPLICATION};
use crate::mailbox::{DeviceRecord, MailboxAction, MailboxCommand, MailboxError, OfflineMessage};
use crate::mailbox_store::{Kept, MailboxStore, MailboxStoreError};
use crate::protocol::{ByteString, OverlayRequest, OverlayResponse};

/// A client's request being asked of every replica.
#[derive(Debug)]
pub(super) struct Fanout {
    /// What each replica is asked (the `…Replica` form).
    request: OverlayRequest,
    answers: Vec<OverlayResponse>,
    outstanding: usize,
    channel: ResponseChannel<OverlayResponse>,
}

impl Supernode {
    /// A client's `PublishDevice`, `LookupDevices`, `LeaveMessage` or `Mailbox`: checked here,
    /// then asked of this node and of the replicas of the user's key.
    pub(super) fn offline_request(&mut self, peer: PeerId, request: OverlayRequest, channel: ResponseChannel<OverlayResponse>, now: UnixTime) {
        let Some(client) = self.attached.get(&peer) else {
            return self.refuse(channel, "attach first");
        };
        let device = *client.certificate.device_key();
        let (network, key) = (&self.network.name, &self.network.signing_key);
        let checked: Result<(Username, OverlayRequest), String> = match request {
            OverlayRequest::PublishDevice { record } => match DeviceRecord::decode_verified(&record, network, key, now) {
                Ok(verified) if verified.device() == &device => Ok((verified.username().clone(), OverlayRequest::StoreDevice { record })),
                Ok(_) => Err("a client may only publish its own device record".into()),
                Err(error) => Err(self.refused_offline("device", &error)),
            },
            OverlayRequest::LookupDevices { username } => match Username::parse_existing(&username) {
                Ok(user) => Ok((user, OverlayRequest::FetchDevices { username })),
                Err(error) => Err(format!("no such user: {error}")),
            },
            OverlayRequest::LeaveMessage { message } => match OfflineMessage::decode_verified(&message, network, key, now) {
                Ok(verified) if verified.body().sender.device_key() == &device => {
                    Ok((verified.body().recipient.clone(), OverlayRequest::KeepMessage { message }))
                }
                Ok(_) => Err("a client may only leave its own messages".into()),
                Err(error) => Err(self.refused_offline("offline_message", &error)),
            },
            OverlayRequest::Mailbox { command } => match MailboxCommand::decode_verified(&command, network, key, now) {
                Ok(verified) if verified.device() == &device => Ok((verified.owner().clone(), OverlayRequest::MailboxReplica { command })),
                Ok(_) => Err("a client may only open its own mailbox".into()),
                Err(error) => Err(self.refused_offline("mailbox_command", &error)),
            },
            _ => Err("not an offline-message request".into()),
        };
        let (username, request) = match checked {
            Ok(checked) => checked,
            Err(reason) => {
                if reason.starts_with("a client may only") {
                    self.metrics.refused("mailbox", "forged");
                }
                return self.refuse(channel, reason);
            }
        };
        let own = self.replica(&request, now);
        let operation = self.new_operation();
        self.fanouts.insert(operation, Fanout { request, answers: vec![own], outstanding: 0, channel });
        if !self.start_closest_query(&username, QueryPurpose::Fanout(operation)) {
            self.fanout_to(operation, Vec::new());
        }
    }

    fn refused_offline(&self, what: &'static str, error: &MailboxError) -> String {
        self.metrics.refused(what, error.reason());
        format!("{what}: {error}")
    }

    pub(super) fn fanout_to(&mut self, operation: u64, peers: Vec<kad::PeerInfo>) {
        let Some(fanout) = self.fanouts.get(&operation) else { return };
        let request = fanout.request.clone();
        let mut sent = 0;
        for peer in peers.into_iter().take(REPLICATION) {
            let id = self.swarm.behaviour_mut().overlay.send_request_with_addresses(&peer.peer_id, request.clone(), peer.addrs);
            self.outstanding.insert(id, Outstanding::Fanout(operation));
            sent += 1;
        }
        if let Some(fanout) = self.fanouts.get_mut(&operation) {
            fanout.outstanding = sent;
        }
        self.finish_fanout_if_done(operation);
    }

    pub(super) fn fanout_answered(&mut self, operation: u64, response: Option<OverlayResponse>) {
        if let Some(fanout) = self.fanouts.get_mut(&operation) {
            fanout.outstanding = fanout.outstanding.saturating_sub(1);
            if let Some(response) = response {
                fanout.answers.push(response);
            }
        }
        self.finish_fanout_if_done(operation);
    }

    fn finish_fanout_if_done(&mut self, operation: u64) {
        if self.fanouts.get(&operation).is_none_or(|f| f.outstanding != 0) {
            return;
        }
        let Some(fanout) = self.fanouts.remove(&operation) else { return };
        let answer = self.combine(&fanout.request, fanout.answers);
        self.respond(fanout.channel, answer);
    }

    /// One answer to the client from every replica's.
    fn combine(&self, request: &OverlayRequest, answers: Vec<OverlayResponse>) -> OverlayResponse {
        let stored = answers.iter().filter(|a| matches!(a, OverlayResponse::Stored)).count() as u32;
        match request {
            OverlayRequest::StoreDevice { .. } => OverlayResponse::Published { replicas: stored },
            OverlayRequest::FetchDevices { .. } => {
                // Replicas are checked like anything from the network; per device the newest.
                let now = UnixTime::now();
                let mut newest: HashMap<DevicePublicKey, DeviceRecord> = HashMap::new();
                for answer in answers {
                    let OverlayResponse::Devices { records } = answer else { continue };
                    for bytes in records {
                        let Ok(record) = DeviceRecord::decode_verified(&bytes.0, &self.network.name, &self.network.signing_key, now) else { continue };
                        let newer = newest.get(record.device()).is_none_or(|held| held.body().published_at < record.body().published_at);
                        if newer {
                            newest.insert(*record.device(), record);
                        }
                    }
                }
                OverlayResponse::Devices { records: newest.values().map(|r| ByteString(r.to_bytes())).collect() }
            }
            OverlayRequest::KeepMessage { .. } => {
                let refusal = answers.iter().find_map(|a| match a {
                    OverlayResponse::NotKept { refusal } => Some(*refusal),
                    _ => None,
                });
                match (stored, refusal) {
                    (0, Some(refusal)) => OverlayResponse::NotKept { refusal },
                    (0, None) => OverlayResponse::Refused { reason: "no supernode kept the message".into() },
                    (replicas, _) => OverlayResponse::Kept { replicas },
                }
            }
            OverlayRequest::MailboxReplica { .. } => {
                let mut seen = std::collections::HashSet::new();
                let mut messages = Vec::new();
                let mut fetched = false;
                for answer in answers {
                    if let OverlayResponse::Mailbox { messages: held } = answer {
                        fetched = true;
                        for message in held {
                            let id = OfflineMessage::from_bytes(&message.0).map(|m| m.body().id);
                            if id.is_ok_and(|id| seen.insert(id)) {
                                messages.push(message);
                            }
                        }
                    }
                }
                if fetched { OverlayResponse::Mailbox { messages } } else { OverlayResponse::Stored }
            }
            _ => OverlayResponse::Refused { reason: "not an offline-message request".into() },
        }
    }

    /// This node as a replica: keeps and answers from its own store.
    pub(super) fn replica(&mut self, request: &OverlayRequest, now: UnixTime) -> OverlayResponse {
        let (network, key) = (self.network.name.clone(), self.network.signing_key);
        let outcome: Result<OverlayResponse, String> = match request {
            OverlayRequest::StoreDevice { record } => match DeviceRecord::decode_verified(record, &network, &key, now) {
                Ok(record) => self
                    .mailboxes
                    .put_device(&record)
                    .map(|_| {
                        self.metrics.device_records_stored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        OverlayResponse::Stored
                    })
                    .map_err(store_failed),
                Err(error) => Err(self.refused_offline("device", &error)),
            },
            OverlayRequest::FetchDevices { username } => match Username::parse_existing(username) {
                Ok(username) => self
                    .mailboxes
                    .devices(&username, now)
                    .map(|records| OverlayResponse::Devices { records: records.into_iter().map(ByteString).collect() })
                    .map_err(store_failed),
                Err(error) => Err(format!("no such user: {error}")),
            },
            OverlayRequest::KeepMessage { message } => match OfflineMessage::decode_verified(message, &network, &key, now) {
                Ok(message) => match self.mailboxes.keep(&message, now) {
                    Ok(Ok(Kept::Stored | Kept::AlreadyHeld)) => {
                        // Counting is a query: only after what changes the count, not per fetch.
                        self.update_mailbox_metrics();
                        Ok(OverlayResponse::Stored)
                    }
                    Ok(Err(refusal)) => {
                        self.metrics.refused("offline_message", "over_quota");
                        Ok(OverlayResponse::NotKept { refusal })
                    }
                    Err(error) => Err(store_failed(error)),
                },
                Err(error) => Err(self.refused_offline("offline_message", &error)),
            },
            OverlayRequest::MailboxReplica { command } => match MailboxCommand::decode_verified(command, &network, &key, now) {
                Ok(command) => {
                    let (owner, device) = (command.owner().clone(), *command.device());
                    match &command.body().action {
                        MailboxAction::Fetch => self
                            .mailboxes
                            .waiting(&owner, &device, now)
                            .map(|messages| OverlayResponse::Mailbox { messages: messages.into_iter().map(ByteString).collect() })
                            .map_err(store_failed),
                        MailboxAction::Ack { ids } => {
                            let acknowledged = self.mailboxes.acknowledge(&owner, &device, ids);
                            self.update_mailbox_metrics();
                            acknowledged.map(|_| OverlayResponse::Stored).map_err(store_failed)
                        }
                        MailboxAction::Block { sequence, blocked } => {
                            let set = self.mailboxes.set_blocked(&owner, *sequence, blocked);
                            self.update_mailbox_metrics();
                            set.map(|_| OverlayResponse::Stored).map_err(store_failed)
                        }
                    }
                }
                Err(error) => Err(self.refused_offline("mailbox_command", &error)),
            },
            _ => Err("not a replica request".into()),
        };
        outcome.unwrap_or_else(|reason| OverlayResponse::Refused { reason })
    }

    pub(super) fn update_mailbox_metrics(&self) {
        if let Ok(held) = self.mailboxes.messages_held() {
            self.metrics.offline_messages_held.store(held, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Drops expired offline messages and device records.
    pub(super) fn expire_mailboxes(&mut self, now: UnixTime) {
        if let Err(error) = self.mailboxes.expire(now) {
            warn!(%error, "cannot expire offline messages");
        }
        self.update_mailbox_metrics();
    }
}

fn store_failed(error: MailboxStoreError) -> String {
    warn!(%error, "the mailbox store failed");
    "this supernode cannot keep offline messages right now".into()
}

/// Opens a node's mailbox store: on disk at `path`, else in memory.
pub fn open_store(path: Option<&std::path::Path>) -> Result<MailboxStore, MailboxStoreError> {
    match path {
        Some(path) => MailboxStore::open(path),
        None => MailboxStore::in_memory(),
    }
}
