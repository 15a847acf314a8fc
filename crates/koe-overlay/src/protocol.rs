//! The overlay's request/response messages, carried by libp2p request-response (CBOR) on
//! [`OVERLAY_PROTOCOL`]. Records and envelopes travel as their own signed binary encodings
//! inside, so nothing a supernode relays can be altered without detection.
//!
//! | request | from → to | answer |
//! |---|---|---|
//! | `Attach` | client → parent (with the supernodes the client knows) | `Attached` |
//! | `Publish` | client → parent (with its withdrawal, for when it goes) | `Published` |
//! | `Lookup` | client → parent | `Presence` |
//! | `Route` | client → parent | `Delivered` / `Undelivered` |
//! | `Store` | supernode → supernode near the index key (the username's, or for a gateway's record also the gateway directory's) | `Stored` / `Refused` |
//! | `Fetch` | supernode → supernode near the index key | `Presence` |
//! | `Forward` | sender's parent → recipient's parent | `Delivered` / `Undelivered` |
//! | `Deliver` | parent → attached client | `Delivered` / `Undelivered` |
//! | `DialBack` | client → parent: "can you reach my supernode here?" | `DialedBack` |
//! | `Hello` | supernode → supernode it dialled: "I listen here" | `Welcome` / `Refused` |
//! | `RelayCredentials` | client → parent: "which relay nodes may I use?" | `Relays` / `Refused` |
//! | `PublishDevice` | client → parent: its long-lived device record | `Published` |
//! | `LookupDevices` | client → parent: a user's device records, to seal offline messages | `Devices` |
//! | `LeaveMessage` | client → parent: an offline message for a user | `Kept` / `NotKept` |
//! | `Mailbox` | client → parent: fetch, acknowledge, block (signed by the owner's device) | `Mailbox` / `Stored` |
//! | `StoreDevice`, `FetchDevices`, `KeepMessage`, `MailboxReplica` | parent → the supernodes near the user's index key (the same as for presence) | as above, per replica |

use libp2p::identity::{ed25519, PublicKey};
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};

use koe_types::DevicePublicKey;

pub const OVERLAY_PROTOCOL: StreamProtocol = StreamProtocol::new("/koe/overlay/1");
pub const KADEMLIA_PROTOCOL: StreamProtocol = StreamProtocol::new("/koe/kad/1");
/// Larger than any record or envelope plus framing.
pub const MAX_REQUEST_BYTES: u64 = 128 * 1024;
pub const MAX_RESPONSE_BYTES: u64 = 512 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OverlayRequest {
    Attach {
        #[serde(with = "serde_bytes_vec")]
        certificate: Vec<u8>,
        /// Supernodes the client knows (its host cache, best first): a parent that knows
        /// too few other supernodes dials them, so supernodes started apart find each other.
        #[serde(default)]
        supernodes: Vec<String>,
    },
    Publish {
        #[serde(with = "serde_bytes_vec")]
        record: Vec<u8>,
        /// The device's withdrawal of `record`, signed in advance ([`PresenceStatus::Offline`],
        /// a higher sequence): the parent publishes it when the client's connection closes,
        /// so the device shows offline at once instead of when `record` expires.
        ///
        /// [`PresenceStatus::Offline`]: crate::presence::PresenceStatus::Offline
        #[serde(default)]
        withdrawal: Option<ByteString>,
    },
    Lookup { username: String },
    Route {
        #[serde(with = "serde_bytes_vec")]
        envelope: Vec<u8>,
    },
    Store {
        #[serde(with = "serde_bytes_vec")]
        record: Vec<u8>,
        /// The key to keep the record under when it is not the record's own username: only
        /// ever the gateway [`directory`](crate::directory), for a gateway's record (the
        /// receiver checks the role itself). Absent, as from peers older than the directory:
        /// the record's username. Left out when absent, so those messages are unchanged on
        /// the wire; older peers ignore it and keep the record under its username only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        under: Option<String>,
    },
    Fetch { username: String },
    Forward {
        #[serde(with = "serde_bytes_vec")]
        envelope: Vec<u8>,
    },
    Deliver {
        #[serde(with = "serde_bytes_vec")]
        envelope: Vec<u8>,
    },
    /// Before a client promotes itself to supernode, its parent checks from outside that the
    /// address (`…/p2p/PEER`, on the client's own IP) really accepts connections.
    DialBack { address: String },
    /// A supernode tells a supernode it dialled where it listens, so that the other adds it
    /// to its Kademlia routing table (an inbound connection shows only an ephemeral port).
    Hello { listen: Vec<String> },
    /// A client asks its parent for relay nodes and short-lived credentials to use them; the
    /// parent issues them for the username on the client's certificate, on its own relay and
    /// on one other supernode's (so that a call can move when one relay node dies).
    RelayCredentials,
    /// A supernode asks another to issue credentials on its relay for a client attached to it
    /// (the asker has checked the client's certificate). Refused from attached clients.
    RelayCredentialsFor { username: String },
    PublishDevice {
        #[serde(with = "serde_bytes_vec")]
        record: Vec<u8>,
    },
    LookupDevices { username: String },
    LeaveMessage {
        #[serde(with = "serde_bytes_vec")]
        message: Vec<u8>,
    },
    Mailbox {
        #[serde(with = "serde_bytes_vec")]
        command: Vec<u8>,
    },
    StoreDevice {
        #[serde(with = "serde_bytes_vec")]
        record: Vec<u8>,
    },
    FetchDevices { username: String },
    KeepMessage {
        #[serde(with = "serde_bytes_vec")]
        message: Vec<u8>,
    },
    MailboxReplica {
        #[serde(with = "serde_bytes_vec")]
        command: Vec<u8>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OverlayResponse {
    Attached {
        /// Addresses of the parent as other supernodes dial it, with `/p2p/…`.
        parent_addresses: Vec<String>,
        /// Other supernodes the parent knows, for the client's host cache.
        supernodes: Vec<String>,
    },
    Published { replicas: u32 },
    Presence { records: Vec<ByteString> },
    Stored,
    Delivered,
    Undelivered { reason: String },
    Refused { reason: String },
    DialedBack { reachable: bool, detail: String },
    /// `Hello` taken: this many of the announced addresses were added; `supernodes` are
    /// others the answering supernode knows, for the newcomer to join.
    Welcome {
        added: u32,
        #[serde(default)]
        supernodes: Vec<String>,
    },
    /// Relay nodes the client may allocate on, with credentials (none if the parent has none).
    Relays { relays: Vec<RelayOffer> },
    /// Device records of a user.
    Devices { records: Vec<ByteString> },
    /// An offline message kept by this many supernodes.
    Kept { replicas: u32 },
    /// An offline message no supernode kept, and why.
    NotKept { refusal: crate::mailbox_store::Refusal },
    /// Offline messages waiting for the asking device.
    Mailbox { messages: Vec<ByteString> },
}

/// One relay node a client may use, with short-lived TURN credentials (RFC 8656 long-term
/// credentials of the "TURN REST API" kind: `EXPIRY:USER` and an HMAC of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayOffer {
    /// `IP:PORT` of TURN over UDP and TCP.
    pub address: String,
    /// `IP:PORT` of TURN over TLS, if the relay offers it.
    pub tls_address: Option<String>,
    /// SHA-256 of the relay's TLS certificate (hex, colon-separated), to pin it.
    pub tls_fingerprint: Option<String>,
    pub username: String,
    pub password: String,
    /// Unix seconds after which the credentials are refused.
    pub expires_unix: u64,
}

/// Bytes that serialise compactly in CBOR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteString(#[serde(with = "serde_bytes_vec")] pub Vec<u8>);

/// CBOR byte strings instead of arrays of integers (a third of the size).
mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut bytes = Vec::new();
                while let Some(byte) = seq.next_element()? {
                    bytes.push(byte);
                }
                Ok(bytes)
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

/// The libp2p peer id of a device: its Ed25519 device key is its libp2p identity, so the
/// Noise handshake already proves which device is on the other end of a connection.
pub fn peer_id_of(device: &DevicePublicKey) -> PeerId {
    ed25519::PublicKey::try_from_bytes(&device.to_bytes())
        .map(|key| PublicKey::from(key).to_peer_id())
        .unwrap_or_else(|_| unreachable!("a DevicePublicKey is always a valid Ed25519 key"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use libp2p::request_response::cbor::codec::Codec as CborCodec;
    use libp2p::request_response::Codec as _;

    /// `Store` as peers older than the gateway directory have it.
    mod before_the_directory {
        use serde::{Deserialize, Serialize};

        #[derive(Debug, Serialize, Deserialize)]
        pub enum OverlayRequest {
            Store {
                #[serde(with = "super::super::serde_bytes_vec")]
                record: Vec<u8>,
            },
        }
    }

    /// `request` as the overlay's request-response codec writes it.
    fn encode<In: Serialize + serde::de::DeserializeOwned + Send + 'static>(request: In) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut codec = CborCodec::<In, OverlayResponse>::default();
        block_on(codec.write_request(&OVERLAY_PROTOCOL, &mut futures::io::Cursor::new(&mut bytes), request))
            .unwrap_or_else(|e| panic!("{e}"));
        bytes
    }

    fn decode<Out: Serialize + serde::de::DeserializeOwned + Send + 'static>(bytes: Vec<u8>) -> Out {
        let mut codec = CborCodec::<Out, OverlayResponse>::default();
        block_on(codec.read_request(&OVERLAY_PROTOCOL, &mut futures::io::Cursor::new(bytes))).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn stores_from_peers_older_than_the_directory_still_decode_and_they_read_ours() {
        let old = encode(before_the_directory::OverlayRequest::Store { record: vec![1, 2, 3] });
        assert_eq!(old, encode(OverlayRequest::Store { record: vec![1, 2, 3], under: None }), "unchanged on the wire");
        match decode::<OverlayRequest>(old) {
            OverlayRequest::Store { record, under } => assert_eq!((record, under), (vec![1, 2, 3], None)),
            other => panic!("decoded as {other:?}"),
        }
        let listed = encode(OverlayRequest::Store { record: vec![4, 5], under: Some("pstn".into()) });
        match decode::<before_the_directory::OverlayRequest>(listed.clone()) {
            before_the_directory::OverlayRequest::Store { record } => assert_eq!(record, vec![4, 5]),
        }
        match decode::<OverlayRequest>(listed) {
            OverlayRequest::Store { under, .. } => assert_eq!(under.as_deref(), Some("pstn")),
            other => panic!("decoded as {other:?}"),
        }
    }
}
