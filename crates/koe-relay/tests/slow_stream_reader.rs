//! A TCP client of the relay that stops reading while a peer keeps sending to its allocation:
//! the relay holds only a short, bounded backlog for it, drops the oldest voice and keeps the
//! newest, and still answers the client's requests once it reads again. Real sockets,
//! hand-built STUN messages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use koe_relay::framing::{StreamFrame, StreamFramer};
use koe_relay::send_queue::{MAX_QUEUED_MEDIA_FRAMES, STREAM_SEND_BUFFER_BYTES};
use koe_relay::{start_relay, RelayConfig, RelayHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use turn_types::attribute::{Data, Lifetime, RequestedTransport, XorPeerAddress, XorRelayedAddress};
use turn_types::message::{ALLOCATE, CREATE_PERMISSION, DATA, REFRESH};
use turn_types::stun::attribute::{ErrorCode, Nonce, Realm, Username};
use turn_types::stun::message::{
    IntegrityAlgorithm, LongTermCredentials, Message, MessageClass, MessageWrite, MessageWriteExt, MessageWriteVec, Method, TransactionId,
};

const PASSWORD: &str = "right-password";
/// What the peer sends while the client is not reading: 4 s of voice at 50 packets/s.
const STALLED_DATAGRAMS: u64 = 200;
/// A voice packet with redundancy: a sequence number and filler.
const DATAGRAM_BYTES: usize = 200;
/// The client's receive buffer (the kernel doubles it): small, so that what the kernels hold
/// while it does not read is small next to what the peer sends.
const CLIENT_RECEIVE_BUFFER: u32 = 4096;

async fn relay() -> RelayHandle {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap());
    config.users = vec![("alice".to_owned(), PASSWORD.to_owned())];
    // Every datagram reaches the stream: what is dropped, the stream's queue dropped.
    config.policy.bytes_per_second_per_allocation = 0;
    start_relay(config).await.unwrap()
}

/// What a client read off its stream.
#[derive(Debug)]
enum Received {
    /// A Data indication's payload.
    Data(Vec<u8>),
    /// A response: its transaction, class and error code.
    Response { transaction: TransactionId, class: MessageClass, error: Option<u16>, relayed: Option<SocketAddr>, nonce: Option<String>, realm: Option<String> },
}

/// A TURN client over TCP that builds its requests by hand.
struct StreamClient {
    stream: TcpStream,
    framer: StreamFramer,
    realm: String,
    nonce: String,
}

impl StreamClient {
    async fn connect(relay: SocketAddr) -> (Self, usize) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(CLIENT_RECEIVE_BUFFER).unwrap();
        let receive_buffer = socket.recv_buffer_size().unwrap() as usize;
        let stream = socket.connect(relay).await.unwrap();
        (Self { stream, framer: StreamFramer::default(), realm: String::new(), nonce: String::new() }, receive_buffer)
    }

    /// The next message on the stream, waiting up to `within`.
    async fn receive(&mut self, within: Duration) -> Option<Received> {
        let deadline = tokio::time::Instant::now() + within;
        let mut buffer = vec![0u8; 4096];
        loop {
            if let Some(frame) = self.framer.next_frame().expect("the relay speaks TURN") {
                let StreamFrame::Stun(bytes) = frame else { panic!("ChannelData on a stream with no channel") };
                let message = Message::from_bytes(&bytes).expect("a STUN message");
                if message.has_method(DATA) {
                    return Some(Received::Data(message.attribute::<Data>().expect("a DATA attribute").data().to_vec()));
                }
                return Some(Received::Response {
                    transaction: message.transaction_id(),
                    class: message.class(),
                    error: message.attribute::<ErrorCode>().ok().map(|error| error.code()),
                    relayed: message.attribute::<XorRelayedAddress>().ok().map(|address| address.addr(message.transaction_id())),
                    nonce: message.attribute::<Nonce>().ok().map(|nonce| nonce.nonce().to_owned()),
                    realm: message.attribute::<Realm>().ok().map(|realm| realm.realm().to_owned()),
                });
            }
            let length = tokio::time::timeout_at(deadline, self.stream.read(&mut buffer)).await.ok()?.unwrap();
            assert!(length > 0, "the relay closed the stream");
            self.framer.push(&buffer[..length]);
        }
    }

    /// Sends `request` and reads until its response, keeping the Data payloads read before it.
    async fn exchange(&mut self, request: &[u8]) -> (Received, Vec<Vec<u8>>) {
        let transaction = Message::from_bytes(request).unwrap().transaction_id();
        self.stream.write_all(request).await.unwrap();
        let mut data = Vec::new();
        loop {
            match self.receive(Duration::from_secs(5)).await.expect("an answer within 5 s") {
                Received::Data(payload) => data.push(payload),
                response @ Received::Response { transaction: answered, .. } if answered == transaction => return (response, data),
                Received::Response { .. } => {}
            }
        }
    }

    fn signed(&self, method: Method, attributes: impl FnOnce(&mut MessageWriteVec)) -> Vec<u8> {
        let mut message = Message::builder_request(method, MessageWriteVec::new());
        attributes(&mut message);
        message.add_attribute(&Username::new("alice").unwrap()).unwrap();
        message.add_attribute(&Realm::new(&self.realm).unwrap()).unwrap();
        message.add_attribute(&Nonce::new(&self.nonce).unwrap()).unwrap();
        let key = LongTermCredentials::new("alice".to_owned(), PASSWORD.to_owned()).to_key(self.realm.clone());
        message.add_message_integrity(&key.into(), IntegrityAlgorithm::Sha1).unwrap();
        message.finish()
    }

    /// Allocates (learning the realm and nonce from the first refusal), and lets `peer` in.
    async fn allocate_for(&mut self, peer: SocketAddr) -> SocketAddr {
        let mut unsigned = Message::builder_request(ALLOCATE, MessageWriteVec::new());
        unsigned.add_attribute(&RequestedTransport::new(RequestedTransport::UDP)).unwrap();
        let (Received::Response { error: Some(401), realm: Some(realm), nonce: Some(nonce), .. }, _) = self.exchange(&unsigned.finish()).await else {
            panic!("an unauthenticated Allocate is refused with the realm and a nonce");
        };
        (self.realm, self.nonce) = (realm, nonce);
        let request = self.signed(ALLOCATE, |message| message.add_attribute(&RequestedTransport::new(RequestedTransport::UDP)).unwrap());
        let (response, _) = self.exchange(&request).await;
        let Received::Response { class: MessageClass::Success, relayed: Some(relayed), .. } = response else { panic!("{response:?}") };
        let request = self.signed(CREATE_PERMISSION, |message| {
            let transaction = message.transaction_id();
            message.add_attribute(&XorPeerAddress::new(peer, transaction)).unwrap();
        });
        let (response, _) = self.exchange(&request).await;
        assert!(matches!(response, Received::Response { class: MessageClass::Success, .. }), "{response:?}");
        relayed
    }
}

fn datagram(sequence: u64) -> Vec<u8> {
    let mut datagram = vec![0x5A; DATAGRAM_BYTES];
    datagram[..8].copy_from_slice(&sequence.to_be_bytes());
    datagram
}

fn sequence(payload: &[u8]) -> u64 {
    assert_eq!(payload.len(), DATAGRAM_BYTES, "a datagram relayed whole");
    u64::from_be_bytes(payload[..8].try_into().unwrap())
}

/// Waits (up to 10 s) until the relay has relayed `count` packets.
async fn relayed(relay: &RelayHandle, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.stats().packets_relayed < count {
        assert!(Instant::now() < deadline, "the relay relayed only {:?}", relay.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_gets_the_newest_voice_and_a_short_backlog() {
    let relay = relay().await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (mut client, client_receive_buffer) = StreamClient::connect(relay.tcp).await;
    let relayed_address = client.allocate_for(peer.local_addr().unwrap()).await;

    // Before the stall: voice flows.
    peer.send_to(&datagram(u64::MAX), relayed_address).await.unwrap();
    let Some(Received::Data(payload)) = client.receive(Duration::from_secs(5)).await else { panic!("the first datagram") };
    assert_eq!(sequence(&payload), u64::MAX);

    // The client stops reading; the peer goes on at 50 packets/s.
    let mut clock = tokio::time::interval(Duration::from_millis(20));
    for n in 0..STALLED_DATAGRAMS {
        clock.tick().await;
        peer.send_to(&datagram(n), relayed_address).await.unwrap();
    }
    relayed(&relay, 1 + STALLED_DATAGRAMS).await;
    let dropped = relay.stats().stream_frames_dropped;
    assert!(dropped > 0, "a stream that stopped reading for 4 s dropped nothing: {:?}", relay.stats());

    // The client reads again: everything queued for it arrives before the answer to a Refresh
    // (one stream, in order), and the relay still answers.
    let refresh = client.signed(REFRESH, |message| message.add_attribute(&Lifetime::new(600)).unwrap());
    let (response, received) = client.exchange(&refresh).await;
    assert!(matches!(response, Received::Response { class: MessageClass::Success, .. }), "the Refresh is answered: {response:?}");
    let received: Vec<u64> = received.iter().map(|payload| sequence(payload)).collect();

    // (a) A bounded backlog: the queue's voice, plus what the two kernels' small buffers held
    // (the relay's send buffer, doubled by Linux, and the client's receive buffer).
    let on_the_wire = 36 + DATAGRAM_BYTES; // STUN header, XOR-PEER-ADDRESS and DATA header
    let kernels_hold = (2 * STREAM_SEND_BUFFER_BYTES + client_receive_buffer) / on_the_wire;
    assert!(
        received.len() <= MAX_QUEUED_MEDIA_FRAMES + kernels_hold,
        "{} of {STALLED_DATAGRAMS} datagrams arrived after the stall, more than {MAX_QUEUED_MEDIA_FRAMES} queued + {kernels_hold} in kernel buffers",
        received.len()
    );
    assert_eq!(received.len() as u64 + dropped, STALLED_DATAGRAMS, "each datagram either arrived or was counted as dropped");

    // (b) The oldest were dropped, not the newest: the newest queue's worth all arrived, in order.
    assert!(received.windows(2).all(|pair| pair[0] < pair[1]), "in order, no repeats: {received:?}");
    let newest: Vec<u64> = (STALLED_DATAGRAMS - MAX_QUEUED_MEDIA_FRAMES as u64..STALLED_DATAGRAMS).collect();
    assert!(received.ends_with(&newest), "the newest voice arrived: {received:?}");

    // (c) And voice flows again, at once.
    peer.send_to(&datagram(STALLED_DATAGRAMS), relayed_address).await.unwrap();
    let Some(Received::Data(payload)) = client.receive(Duration::from_secs(5)).await else { panic!("voice after the stall") };
    assert_eq!(sequence(&payload), STALLED_DATAGRAMS);
}
