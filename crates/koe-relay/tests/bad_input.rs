//! What a relay node does with bad input: every request that is wrong gets the standard error
//! (or is dropped where TURN says so), nothing is relayed that should not be, and the relay keeps
//! serving everyone else. Real sockets, hand-built STUN messages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use koe_relay::{start_relay, RelayConfig, RelayHandle, RelaySecret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use turn_types::attribute::{Data, Lifetime, RequestedTransport, XorPeerAddress, XorRelayedAddress};
use turn_types::message::{ALLOCATE, CREATE_PERMISSION, REFRESH, SEND};
use turn_types::stun::attribute::{AttributeType, ErrorCode, Nonce, RawAttribute, Realm, Username};
use turn_types::stun::message::{
    IntegrityAlgorithm, LongTermCredentials, Message, MessageClass, MessageType, MessageWrite, MessageWriteExt, MessageWriteVec,
    Method, TransactionId, BINDING,
};

const PASSWORD: &str = "right-password";

async fn relay(secret: Option<RelaySecret>) -> RelayHandle {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap());
    config.users = vec![("alice".to_owned(), PASSWORD.to_owned())];
    config.secret = secret;
    config.policy.max_allocations_per_user = 2;
    start_relay(config).await.unwrap()
}

/// A TURN client over UDP that builds its requests by hand, so they can be made wrong.
struct Client {
    socket: UdpSocket,
    server: SocketAddr,
    username: String,
    password: String,
    realm: String,
    nonce: String,
}

/// The parts of a response a test looks at.
#[derive(Debug)]
struct Response {
    class: MessageClass,
    error: Option<(u16, String)>,
    relayed: Option<SocketAddr>,
    nonce: Option<String>,
    realm: Option<String>,
}

impl Client {
    async fn new(server: SocketAddr, username: &str, password: &str) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        Self { socket, server, username: username.into(), password: password.into(), realm: String::new(), nonce: String::new() }
    }

    /// Sends `message` and waits up to a second for one reply.
    async fn exchange(&self, message: &[u8]) -> Option<Response> {
        self.socket.send_to(message, self.server).await.unwrap();
        let mut buffer = vec![0u8; 2048];
        let (length, _) = tokio::time::timeout(Duration::from_secs(1), self.socket.recv_from(&mut buffer)).await.ok()?.ok()?;
        let message = Message::from_bytes(&buffer[..length]).ok()?;
        Some(Response {
            class: message.class(),
            error: message.attribute::<ErrorCode>().ok().map(|error| (error.code(), error.reason().to_owned())),
            relayed: message.attribute::<XorRelayedAddress>().ok().map(|address| address.addr(message.transaction_id())),
            nonce: message.attribute::<Nonce>().ok().map(|nonce| nonce.nonce().to_owned()),
            realm: message.attribute::<Realm>().ok().map(|realm| realm.realm().to_owned()),
        })
    }

    /// A request with the client's credentials, built by `attributes` and signed.
    fn signed(&self, method: Method, attributes: impl FnOnce(&mut MessageWriteVec)) -> Vec<u8> {
        let mut message = Message::builder_request(method, MessageWriteVec::new());
        attributes(&mut message);
        message.add_attribute(&Username::new(&self.username).unwrap()).unwrap();
        message.add_attribute(&Realm::new(&self.realm).unwrap()).unwrap();
        message.add_attribute(&Nonce::new(&self.nonce).unwrap()).unwrap();
        let key = LongTermCredentials::new(self.username.clone(), self.password.clone()).to_key(self.realm.clone());
        message.add_message_integrity(&key.into(), IntegrityAlgorithm::Sha1).unwrap();
        message.finish()
    }

    /// Asks without credentials, as every TURN client starts, and keeps the realm and nonce.
    async fn learn_nonce(&mut self) {
        let mut message = Message::builder_request(ALLOCATE, MessageWriteVec::new());
        message.add_attribute(&RequestedTransport::new(RequestedTransport::UDP)).unwrap();
        let response = self.exchange(&message.finish()).await.expect("an answer to an unauthenticated Allocate");
        assert_eq!(response.error.as_ref().map(|error| error.0), Some(401), "{response:?}");
        self.realm = response.realm.expect("a realm");
        self.nonce = response.nonce.expect("a nonce");
    }

    async fn allocate(&mut self) -> Response {
        self.learn_nonce().await;
        let request = self.signed(ALLOCATE, |message| {
            message.add_attribute(&RequestedTransport::new(RequestedTransport::UDP)).unwrap();
        });
        self.exchange(&request).await.expect("an answer to Allocate")
    }

    async fn permit(&self, peer: SocketAddr) -> Response {
        let request = self.signed(CREATE_PERMISSION, |message| {
            let transaction = message.transaction_id();
            message.add_attribute(&XorPeerAddress::new(peer, transaction)).unwrap();
        });
        self.exchange(&request).await.expect("an answer to CreatePermission")
    }

    async fn send_indication(&self, peer: SocketAddr, data: &[u8]) {
        let mut message = Message::builder(MessageType::from_class_method(MessageClass::Indication, SEND), TransactionId::generate(), MessageWriteVec::new());
        let transaction = message.transaction_id();
        message.add_attribute(&XorPeerAddress::new(peer, transaction)).unwrap();
        message.add_attribute(&Data::new(data)).unwrap();
        self.socket.send_to(&message.finish(), self.server).await.unwrap();
    }
}

fn error_code(response: &Response) -> Option<u16> {
    response.error.as_ref().map(|error| error.0)
}

async fn receives(peer: &UdpSocket, within: Duration) -> Option<Vec<u8>> {
    let mut buffer = vec![0u8; 2048];
    let (length, _) = tokio::time::timeout(within, peer.recv_from(&mut buffer)).await.ok()?.ok()?;
    Some(buffer[..length].to_vec())
}

async fn binding_still_answered(relay: &RelayHandle) {
    let client = Client::new(relay.udp, "", "").await;
    let request = Message::builder_request(BINDING, MessageWriteVec::new()).finish();
    let response = client.exchange(&request).await.expect("the relay still answers a Binding request");
    assert_eq!(response.class, MessageClass::Success);
}

#[tokio::test]
async fn a_wrong_password_gets_401_and_allocates_nothing() {
    let relay = relay(None).await;
    let mut client = Client::new(relay.udp, "alice", "wrong-password").await;
    let response = client.allocate().await;
    assert_eq!(error_code(&response), Some(401), "{response:?}");
    let mut stranger = Client::new(relay.udp, "mallory", PASSWORD).await;
    assert_eq!(error_code(&stranger.allocate().await), Some(401), "an unknown user");
    assert_eq!(relay.stats().allocations, 0);

    let mut alice = Client::new(relay.udp, "alice", PASSWORD).await;
    let response = alice.allocate().await;
    assert_eq!(response.class, MessageClass::Success, "{response:?}");
    assert_eq!(response.relayed.map(|address| address.ip()), Some(relay.udp.ip()));
}

#[tokio::test]
async fn a_nonce_the_relay_never_gave_is_stale() {
    let relay = relay(None).await;
    let mut client = Client::new(relay.udp, "alice", PASSWORD).await;
    client.learn_nonce().await;
    client.nonce = "a-nonce-from-somewhere-else".to_owned();
    let request = client.signed(ALLOCATE, |message| {
        message.add_attribute(&RequestedTransport::new(RequestedTransport::UDP)).unwrap();
    });
    let response = client.exchange(&request).await.unwrap();
    assert_eq!(error_code(&response), Some(438), "{response:?}");
    assert!(response.nonce.is_some(), "a 438 carries the fresh nonce to retry with");
    assert_eq!(relay.stats().allocations, 0);
}

#[tokio::test]
async fn an_unknown_required_attribute_gets_420() {
    let relay = relay(None).await;
    let mut client = Client::new(relay.udp, "alice", PASSWORD).await;
    client.learn_nonce().await;
    let request = client.signed(ALLOCATE, |message| {
        message.add_attribute(&RequestedTransport::new(RequestedTransport::UDP)).unwrap();
        // 0x0000–0x7FFF are comprehension-required: a server that does not know one must refuse.
        message.add_attribute(&RawAttribute::new(AttributeType::new(0x7A7A), &[1, 2, 3, 4])).unwrap();
    });
    let response = client.exchange(&request).await.unwrap();
    assert_eq!(error_code(&response), Some(420), "{response:?}");
    assert_eq!(relay.stats().allocations, 0);
}

#[tokio::test]
async fn an_allocation_flood_from_one_user_stops_at_the_quota() {
    let relay = relay(None).await;
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut client = Client::new(relay.udp, "alice", PASSWORD).await;
        let response = client.allocate().await;
        assert_eq!(response.class, MessageClass::Success, "{response:?}");
        kept.push(client);
    }
    for _ in 0..5 {
        let mut flood = Client::new(relay.udp, "alice", PASSWORD).await;
        let response = flood.allocate().await;
        assert_eq!(error_code(&response), Some(486), "{response:?}");
    }
    let stats = relay.stats();
    assert_eq!((stats.allocations, stats.allocations_refused_quota), (2, 5), "{stats:?}");

    // Deleting one (Refresh with lifetime 0) frees a place.
    let delete = kept[0].signed(REFRESH, |message| message.add_attribute(&Lifetime::new(0)).unwrap());
    assert_eq!(kept[0].exchange(&delete).await.unwrap().class, MessageClass::Success);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut next = Client::new(relay.udp, "alice", PASSWORD).await;
    assert_eq!(next.allocate().await.class, MessageClass::Success, "a place freed by deleting an allocation");
}

#[tokio::test]
async fn data_to_a_peer_without_permission_is_not_relayed() {
    let relay = relay(None).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_address = peer.local_addr().unwrap();
    let mut client = Client::new(relay.udp, "alice", PASSWORD).await;
    let relayed = client.allocate().await.relayed.expect("a relayed address");

    client.send_indication(peer_address, b"without permission").await;
    assert_eq!(receives(&peer, Duration::from_millis(500)).await, None, "no permission, nothing relayed");
    // Nor does the peer get through to the client.
    peer.send_to(b"unasked", relayed).await.unwrap();
    let mut buffer = [0u8; 512];
    assert!(tokio::time::timeout(Duration::from_millis(300), client.socket.recv_from(&mut buffer)).await.is_err());

    assert_eq!(client.permit(peer_address).await.class, MessageClass::Success);
    client.send_indication(peer_address, b"with permission").await;
    assert_eq!(receives(&peer, Duration::from_secs(1)).await.as_deref(), Some(&b"with permission"[..]));
}

#[tokio::test]
async fn garbage_truncated_and_oversized_datagrams_are_ignored() {
    let relay = relay(None).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let binding = Message::builder_request(BINDING, MessageWriteVec::new()).finish();
    let mut claims_more = binding.clone();
    claims_more[3] = 200; // a header that promises 200 bytes of attributes
    let mut wrong_cookie = binding.clone();
    wrong_cookie[4] = 0;
    let bad: Vec<Vec<u8>> = vec![
        b"hello relay".to_vec(),
        binding[..10].to_vec(),
        claims_more,
        wrong_cookie,
        vec![0x40, 0x01, 0xFF, 0xFF, 1, 2, 3],   // ChannelData claiming 65,535 bytes
        vec![0x40, 0x01, 0x00, 0x04, 1, 2, 3, 4], // ChannelData on a channel nobody bound
        vec![0xAB; 60_000],
        Vec::new(),
    ];
    for datagram in &bad {
        socket.send_to(datagram, relay.udp).await.unwrap();
    }
    let mut buffer = [0u8; 2048];
    assert!(tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buffer)).await.is_err(), "no answer to garbage");
    binding_still_answered(&relay).await;
    let mut alice = Client::new(relay.udp, "alice", PASSWORD).await;
    assert_eq!(alice.allocate().await.class, MessageClass::Success, "the relay still serves");
}

#[tokio::test]
async fn a_stream_that_is_not_turn_is_closed() {
    let relay = relay(None).await;
    let mut stream = TcpStream::connect(relay.tcp).await.unwrap();
    stream.write_all(b"\x80 this is not TURN at all").await.unwrap();
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer)).await.expect("the relay closes the stream");
    assert!(matches!(read, Ok(0) | Err(_)), "closed, not answered: {read:?}");
    assert_eq!(relay.stats().streams_closed_not_turn, 1);

    // A TLS ClientHello on the plain TCP port is refused the same way, and TCP still works after.
    let mut stream = TcpStream::connect(relay.tcp).await.unwrap();
    stream.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer)).await.expect("closed");
    assert!(matches!(read, Ok(0) | Err(_)));

    let mut stream = TcpStream::connect(relay.tcp).await.unwrap();
    stream.write_all(&Message::builder_request(BINDING, MessageWriteVec::new()).finish()).await.unwrap();
    let length = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer)).await.unwrap().unwrap();
    assert_eq!(Message::from_bytes(&buffer[..length]).unwrap().class(), MessageClass::Success);
}

#[tokio::test]
async fn expired_short_lived_credentials_are_refused_with_the_reason() {
    let secret = RelaySecret::new(b"north-wind".to_vec());
    let relay = relay(Some(secret.clone())).await;
    let expired_name = "1000:alice";
    let mut expired = Client::new(relay.udp, expired_name, &secret.password_for(expired_name)).await;
    let response = expired.allocate().await;
    let (code, reason) = response.error.expect("an error");
    assert_eq!(code, 401);
    assert!(reason.contains("expired"), "{reason}");
    assert_eq!(relay.stats().requests_refused_expired, 1);

    let fresh = secret.issue("alice", Duration::from_secs(600));
    let mut client = Client::new(relay.udp, &fresh.username, &fresh.password).await;
    assert_eq!(client.allocate().await.class, MessageClass::Success);

    let forged = Client::new(relay.udp, &fresh.username, "not-the-hmac").await;
    let mut forged = forged;
    assert_eq!(error_code(&forged.allocate().await), Some(401), "a forged password for a valid name");
}
