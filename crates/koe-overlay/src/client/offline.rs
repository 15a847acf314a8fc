//! The client's part in offline messages: it publishes this device's record (so senders can
//! seal to it while it is offline), leaves messages for users with no device online, fetches
//! what waited for it at every attach and republish, hands each to the daemon like a live
//! delivery, and acknowledges to the mailbox replicas what the daemon took.

use std::time::{Duration, Instant};

use koe_types::{UnixTime, Username};
use koe_wire::Codec;
use rand_core::{OsRng, RngCore};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::{ClientEvent, ClientNode, Outstanding, SendOutcome};
use crate::envelope::Envelope;
use crate::mailbox::{
    CommandBody, DeviceBody, DeviceRecord, MailboxAction, MessageId, OfflineBody, OfflineMessage, MAX_ACKS_PER_COMMAND,
    MAX_DEVICE_RECORD_LIFETIME,
};
use crate::protocol::{OverlayRequest, OverlayResponse};

/// How long the daemon may take to store a message from the mailbox before it is fetched
/// again (and offered again: the daemon refuses what it already has).
const STORED_ACK_PATIENCE: Duration = Duration::from_secs(60);

impl ClientNode {
    /// Publishes this device's long-lived record through the parent.
    pub(super) fn publish_device(&mut self) {
        let Some(parent) = self.parent_peer() else { return };
        let now = UnixTime::now();
        // The record may not outlive the month, and must be published while the certificate
        // is valid (it is, or the client would not be attached).
        let record = DeviceBody {
            certificate: self.config.certificate.clone(),
            envelope_key: self.envelope_key.public(),
            published_at: now,
            expires_at: now.saturating_add(MAX_DEVICE_RECORD_LIFETIME),
        }
        .sign(&self.config.device_key);
        let id = self.swarm.behaviour_mut().overlay.send_request(&parent, OverlayRequest::PublishDevice { record: record.to_bytes() });
        self.outstanding.insert(id, Outstanding::PublishDevice);
    }

    /// Asks the mailbox replicas, through the parent, to `action` (signed by this device).
    pub(super) fn mailbox(&mut self, action: MailboxAction) {
        let Some(parent) = self.parent_peer() else { return };
        let fetch = matches!(action, MailboxAction::Fetch);
        let command = CommandBody { certificate: self.config.certificate.clone(), issued_at: UnixTime::now(), action }.sign(&self.config.device_key);
        let id = self.swarm.behaviour_mut().overlay.send_request(&parent, OverlayRequest::Mailbox { command: command.to_bytes() });
        self.outstanding.insert(id, if fetch { Outstanding::MailboxFetch } else { Outstanding::MailboxCommand });
    }

    /// What the mailbox held for this device: each goes to the daemon as a delivery; what
    /// cannot be opened is acknowledged away at once (nobody can ever read it).
    pub(super) fn mailbox_fetched(&mut self, response: Result<OverlayResponse, String>) {
        let messages = match response {
            Ok(OverlayResponse::Mailbox { messages }) => messages,
            other => return debug!(?other, "mailbox fetch failed; the next one retries"),
        };
        let now = UnixTime::now();
        let device = self.config.device_key.public_key();
        for bytes in messages {
            let message = match OfflineMessage::decode_verified(&bytes.0, &self.config.network.name, &self.config.network.signing_key, now) {
                Ok(message) => message,
                Err(error) => {
                    if let Some(suppressed) = self.log_budget.allow(Instant::now()) {
                        warn!(%error, suppressed, "a parent returned an offline message that does not verify");
                    }
                    continue;
                }
            };
            let id = message.body().id;
            if self.mailbox_in_flight.get(&id).is_some_and(|since| since.elapsed() < STORED_ACK_PATIENCE) {
                continue;
            }
            let opened = message.envelope_for(&device).ok_or("not sealed to this device").and_then(|envelope| {
                envelope
                    .open_stored(&device, &self.envelope_key, &self.config.network.name, &self.config.network.signing_key, now)
                    .map_err(|_| "does not open")
            });
            let opened = match opened {
                // The envelope's sender must be the one the supernodes counted it against.
                Ok(opened) if opened.sender.username() == message.sender() => opened,
                Ok(_) | Err(_) => {
                    warn!(sender = %message.sender(), "an offline message that cannot be opened here was dropped");
                    self.acknowledge_stored(id);
                    continue;
                }
            };
            self.mailbox_in_flight.insert(id, Instant::now());
            let (ack, acked) = oneshot::channel();
            self.emit(ClientEvent::Received { envelope: Box::new(opened), ack, from_mailbox: true });
            self.stored_acks.push(Box::pin(async move { (id, matches!(acked.await, Ok(Ok(())))) }));
        }
    }

    /// The daemon took (or deliberately refused) a message from the mailbox: it can go.
    pub(super) fn acknowledge_stored(&mut self, id: MessageId) {
        self.mailbox_in_flight.remove(&id);
        self.to_acknowledge.push(id);
        if self.to_acknowledge.len() >= MAX_ACKS_PER_COMMAND {
            self.send_acknowledgements();
        }
    }

    pub(super) fn send_acknowledgements(&mut self) {
        if self.to_acknowledge.is_empty() || self.parent_peer().is_none() {
            return;
        }
        let ids: Vec<MessageId> = self.to_acknowledge.drain(..).collect();
        self.mailbox(MailboxAction::Ack { ids });
    }

    /// Tells the mailbox replicas who may not leave messages (at every attach, and when the
    /// list changes).
    pub(super) fn publish_blocked(&mut self) {
        if self.blocked.0 == 0 {
            return;
        }
        let (sequence, blocked) = self.blocked.clone();
        self.mailbox(MailboxAction::Block { sequence, blocked });
    }

    pub(super) fn set_blocked(&mut self, blocked: Vec<Username>) {
        // Milliseconds since the epoch: newer than any list this device sent before.
        let sequence = (UnixTime::now().as_secs().saturating_mul(1000)).max(self.blocked.0 + 1);
        self.blocked = (sequence, blocked);
        self.publish_blocked();
    }

    /// The recipient of send `id` has no device online: find the devices it may be sealed to.
    pub(super) fn keep_for_later(&mut self, id: u64) {
        let Some(parent) = self.parent_peer() else {
            return self.retry_or_fail(id, "not attached to a supernode".into());
        };
        let Some(send) = self.sends.get(&id) else { return };
        let username = send.to.to_string();
        let request = self.swarm.behaviour_mut().overlay.send_request(&parent, OverlayRequest::LookupDevices { username });
        self.outstanding.insert(request, Outstanding::SendDevices(id));
    }

    /// Seals send `id` to every device found and leaves it with the mailbox replicas.
    pub(super) fn leave_message(&mut self, id: u64, response: Result<OverlayResponse, String>) {
        let records = match response {
            Ok(OverlayResponse::Devices { records }) => records,
            Ok(OverlayResponse::Refused { reason }) => return self.retry_or_fail(id, reason),
            Ok(other) => return self.retry_or_fail(id, format!("unexpected answer {other:?}")),
            Err(error) => return self.retry_or_fail(id, error),
        };
        // The parent may have gone meanwhile: the send starts again through the next one.
        let Some(parent) = self.parent_peer() else {
            return self.retry_or_fail(id, "the parent supernode went away".into());
        };
        let Some(send) = self.sends.get(&id) else { return };
        let now = UnixTime::now();
        let (network, key) = (&self.config.network.name, &self.config.network.signing_key);
        let devices: Vec<DeviceRecord> = records
            .iter()
            .filter_map(|bytes| DeviceRecord::decode_verified(&bytes.0, network, key, now).ok())
            .filter(|record| record.username() == &send.to)
            .collect();
        if devices.is_empty() {
            // Never online in the last month (or no such user): nobody to seal it to.
            return self.finish_send(id, SendOutcome::Offline);
        }
        let mut envelopes = Vec::new();
        for record in &devices {
            let body = record.body();
            match Envelope::seal(&self.config.device_key, &self.config.certificate, &send.to, record.device(), &body.envelope_key, &send.payload, now) {
                Ok(envelope) => envelopes.push(envelope.to_bytes()),
                Err(error) => return self.finish_send(id, SendOutcome::Undelivered { reason: error.to_string() }),
            }
        }
        let mut message_id = [0u8; 16];
        OsRng.fill_bytes(&mut message_id);
        let message = OfflineBody { sender: self.config.certificate.clone(), recipient: send.to.clone(), id: message_id, sent_at: now, envelopes }
            .sign(&self.config.device_key);
        let request = self.swarm.behaviour_mut().overlay.send_request(&parent, OverlayRequest::LeaveMessage { message: message.to_bytes() });
        self.outstanding.insert(request, Outstanding::SendKeep(id));
    }

    pub(super) fn message_left(&mut self, id: u64, response: Result<OverlayResponse, String>) {
        match response {
            Ok(OverlayResponse::Kept { replicas }) => self.finish_send(id, SendOutcome::Kept { replicas }),
            Ok(OverlayResponse::NotKept { refusal }) => self.finish_send(id, SendOutcome::NotKept(refusal)),
            Ok(OverlayResponse::Refused { reason }) => self.retry_or_fail(id, reason),
            Ok(other) => self.retry_or_fail(id, format!("unexpected answer {other:?}")),
            Err(error) => self.retry_or_fail(id, error),
        }
    }
}
