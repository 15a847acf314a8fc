//! The relay node's tokio driver: the sockets around [`RelayCore`]. One task owns the core and
//! the listening UDP socket; small tasks accept and read streams (TCP, TLS) and relayed sockets
//! and hand what they read to it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle};
use turn_server_proto::api::SocketAllocateError;
use turn_types::stun::TransportType;

use crate::core::{AllocationRequest, RelayCore, RelayOutput, RelayPolicy, RelayStats};
use crate::credentials::RelaySecret;
use crate::send_queue::{self, SendQueueLimits, SendQueueReceiver, SendQueueSender};

/// Largest datagram handled at once (a TURN message is at most 20 + 65,535 bytes).
const READ_BUFFER: usize = 65_600;
/// One read from a stream; the framer puts larger messages together.
const STREAM_READ_BUFFER: usize = 16 * 1024;
const EVENT_QUEUE: usize = 16_384;
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// How to run a relay node.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// UDP and TCP listening address.
    pub listen: SocketAddr,
    /// TLS listening address (TURN over TLS, RFC 8656 §3.1), if any.
    pub tls_listen: Option<SocketAddr>,
    /// The TLS certificate; a new self-signed one is made when absent, so its fingerprint
    /// changes on every start: a relay whose offers clients pin keeps one ([`RelayTlsIdentity`]).
    pub tls: Option<RelayTlsIdentity>,
    /// The address relayed sockets bind to and clients are told; the listening IP if absent.
    pub relayed_ip: Option<IpAddr>,
    pub realm: String,
    /// Static long-term credentials (operators, interop).
    pub users: Vec<(String, String)>,
    /// The secret for short-lived credentials handed out by supernodes.
    pub secret: Option<RelaySecret>,
    pub policy: RelayPolicy,
}

impl RelayConfig {
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            tls_listen: None,
            tls: None,
            relayed_ip: None,
            realm: "koe".to_owned(),
            users: Vec::new(),
            secret: None,
            policy: RelayPolicy { allow_loopback_peers: listen.ip().is_loopback(), ..RelayPolicy::default() },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot listen on {address} ({transport}): {source}")]
    Listen { address: SocketAddr, transport: &'static str, source: io::Error },
    #[error("the relay listens on {0} and this host has no route to tell clients an address: give the relayed address (--relayed-ip)")]
    NoRelayedAddress(SocketAddr),
    #[error("cannot make the relay's TLS certificate: {0}")]
    Tls(String),
    #[error("not a usable TLS certificate and key: {0}")]
    BadTlsIdentity(String),
}

/// The relay's TLS certificate and key, and the SHA-256 fingerprint clients pin (supernodes
/// hand it out in relay offers). Kept as one PEM text, certificate then key, so that whoever
/// stores it has one file to write at once.
#[derive(Clone)]
pub struct RelayTlsIdentity {
    config: Arc<rustls::ServerConfig>,
    fingerprint: String,
}

impl std::fmt::Debug for RelayTlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("RelayTlsIdentity").field("fingerprint", &self.fingerprint).finish()
    }
}

impl RelayTlsIdentity {
    /// A new self-signed certificate, with the PEM text (certificate and key) to keep it by.
    pub fn generate() -> Result<(Self, String), RelayError> {
        let (certificate, key) = koe_auth::tls::generate_self_signed("koe-relay").map_err(|error| RelayError::Tls(error.to_string()))?;
        let pem = format!("{certificate}{key}");
        Ok((Self::from_pem(&pem)?, pem))
    }

    /// The identity in `pem`: a certificate chain and its private key, in one text.
    pub fn from_pem(pem: &str) -> Result<Self, RelayError> {
        let (chain, key) = koe_auth::tls::parse_pem(pem, pem).map_err(RelayError::BadTlsIdentity)?;
        let fingerprint = chain
            .first()
            .map(|der| koe_auth::tls::fingerprint(der).to_string())
            .ok_or_else(|| RelayError::BadTlsIdentity("no certificate".into()))?;
        let config = koe_auth::tls::server_config(chain, key).map_err(|error| RelayError::BadTlsIdentity(error.to_string()))?;
        Ok(Self { config, fingerprint })
    }

    /// SHA-256 of the certificate, `sha256:` and hex, as clients pin it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// A running relay node. Dropping it stops it.
#[derive(Debug)]
pub struct RelayHandle {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub tls: Option<SocketAddr>,
    /// SHA-256 of the TLS certificate (hex), for clients that pin it.
    pub tls_fingerprint: Option<String>,
    /// The IP clients reach this relay at and are told for relayed addresses.
    pub public_ip: IpAddr,
    stats: Arc<Mutex<RelayStats>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RelayHandle {
    /// Where clients reach TURN over UDP and TCP.
    pub fn public_address(&self) -> SocketAddr {
        SocketAddr::new(self.public_ip, self.udp.port())
    }

    /// Where clients reach TURN over TLS.
    pub fn public_tls_address(&self) -> Option<SocketAddr> {
        self.tls.map(|tls| SocketAddr::new(self.public_ip, tls.port()))
    }

    pub fn stats(&self) -> RelayStats {
        self.stats_handle().get()
    }

    /// The counters, readable after the handle has moved elsewhere.
    pub fn stats_handle(&self) -> RelayStatsHandle {
        RelayStatsHandle(Arc::clone(&self.stats))
    }
}

/// A shared view of a running relay node's counters.
#[derive(Debug, Clone)]
pub struct RelayStatsHandle(Arc<Mutex<RelayStats>>);

impl RelayStatsHandle {
    pub fn get(&self) -> RelayStats {
        self.0.lock().map(|stats| stats.clone()).unwrap_or_default()
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

enum Event {
    Datagram { local: SocketAddr, from: SocketAddr, data: Vec<u8> },
    StreamOpened { listen: SocketAddr, client: SocketAddr, writer: StreamWriter, close: oneshot::Sender<()> },
    StreamBytes { listen: SocketAddr, client: SocketAddr, data: Vec<u8> },
    StreamClosed { listen: SocketAddr, client: SocketAddr },
}

/// The driver's end of a client stream; dropping it ends the stream's task.
struct Stream {
    writer: StreamWriter,
    _close: oneshot::Sender<()>,
}

/// How the driver writes to a client's stream.
enum StreamWriter {
    /// Plain TCP, written from the driver's own task (no hand-off per frame) while the socket
    /// takes whole frames.
    Direct(Arc<TcpStream>),
    /// TLS, or a TCP socket that once did not take a whole frame: a task writes the queue in
    /// order; when the stream falls behind, the oldest media is dropped ([`send_queue`]).
    Queued(SendQueueSender),
}

impl StreamWriter {
    /// Writes `frame`, or queues it; frames dropped from a full queue are added to `dropped`.
    fn write(&mut self, frame: Vec<u8>, dropped: &Arc<AtomicU64>) {
        match self {
            Self::Direct(socket) => {
                let (unfinished, queued) = match socket.try_write(&frame) {
                    Ok(length) if length == frame.len() => return,
                    // Part of the frame is on the wire: the rest must follow, never be dropped.
                    Ok(length) => (frame[length..].to_vec(), None),
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => (Vec::new(), Some(frame)),
                    // The reading side sees the connection end and closes the stream.
                    Err(_) => return,
                };
                // The socket is full: from now on a task writes, so nothing is reordered.
                let (queue, frames) = send_queue::channel(SendQueueLimits::default(), Arc::clone(dropped));
                if let Some(frame) = queued {
                    queue.send(frame);
                }
                tokio::spawn(write_tcp(Arc::clone(socket), unfinished, frames));
                *self = Self::Queued(queue);
            }
            Self::Queued(queue) => queue.send(frame),
        }
    }
}

struct RelayedSocket {
    socket: Arc<UdpSocket>,
    reader: AbortHandle,
}

impl Drop for RelayedSocket {
    /// The socket closes with the relay (a stopped relay relays nothing, at once).
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Starts a relay node.
pub async fn start_relay(config: RelayConfig) -> Result<RelayHandle, RelayError> {
    let relayed_ip = match config.relayed_ip {
        Some(ip) => ip,
        None if config.listen.ip().is_unspecified() => outbound_ip(config.listen.ip()).ok_or(RelayError::NoRelayedAddress(config.listen))?,
        None => config.listen.ip(),
    };
    let udp = bind_listening_udp(config.listen).map_err(|source| RelayError::Listen { address: config.listen, transport: "UDP", source })?;
    let udp_addr = udp.local_addr().map_err(|source| RelayError::Listen { address: config.listen, transport: "UDP", source })?;
    // TCP on the same port as UDP, so one address names the relay.
    let tcp = TcpListener::bind(udp_addr)
        .await
        .map_err(|source| RelayError::Listen { address: udp_addr, transport: "TCP", source })?;
    let tcp_addr = tcp.local_addr().map_err(|source| RelayError::Listen { address: udp_addr, transport: "TCP", source })?;

    let mut core = RelayCore::new(config.realm.clone(), config.policy.clone(), config.secret.clone(), Instant::now());
    core.add_listener(TransportType::Udp, udp_addr);
    core.add_listener(TransportType::Tcp, tcp_addr);

    let (events, event_queue) = mpsc::channel(EVENT_QUEUE);
    let stream_frames_dropped = Arc::new(AtomicU64::new(0));
    let mut tasks = vec![tokio::spawn(accept_streams(tcp, tcp_addr, None, events.clone(), Arc::clone(&stream_frames_dropped)))];

    let (mut tls_addr, mut tls_fingerprint) = (None, None);
    if let Some(tls_listen) = config.tls_listen {
        let identity = match &config.tls {
            Some(identity) => identity.clone(),
            None => RelayTlsIdentity::generate()?.0,
        };
        let listener = TcpListener::bind(tls_listen)
            .await
            .map_err(|source| RelayError::Listen { address: tls_listen, transport: "TLS", source })?;
        let address = listener.local_addr().map_err(|source| RelayError::Listen { address: tls_listen, transport: "TLS", source })?;
        core.add_listener(TransportType::Tcp, address);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&identity.config));
        tasks.push(tokio::spawn(accept_streams(listener, address, Some(acceptor), events.clone(), Arc::clone(&stream_frames_dropped))));
        tls_addr = Some(address);
        tls_fingerprint = Some(identity.fingerprint);
    }
    for (username, password) in &config.users {
        core.add_user(username, password);
    }

    let stats = Arc::new(Mutex::new(RelayStats::default()));
    let driver = Driver {
        core,
        udp: Arc::new(udp),
        udp_addr,
        bind_ip: config.listen.ip(),
        relayed_ip,
        streams: HashMap::new(),
        relayed: HashMap::new(),
        events,
        stats: Arc::clone(&stats),
        stream_frames_dropped,
    };
    tasks.push(tokio::spawn(driver.run(event_queue)));
    tracing::info!(udp = %udp_addr, tcp = %tcp_addr, tls = ?tls_addr, "relay node listening");
    Ok(RelayHandle { udp: udp_addr, tcp: tcp_addr, tls: tls_addr, tls_fingerprint, public_ip: relayed_ip, stats, tasks })
}

/// Every client's datagrams arrive on the listening socket, read by one task: a receive buffer
/// of the default size (~200 KiB) overflowed at 20,000 packets/s in the relay benchmark.
const LISTENING_SOCKET_BUFFER: usize = 4 << 20;

fn bind_listening_udp(address: SocketAddr) -> io::Result<UdpSocket> {
    let domain = if address.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // The kernel caps these at net.core.rmem_max / wmem_max; a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(LISTENING_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(LISTENING_SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    UdpSocket::from_std(socket.into())
}

/// The address this host sends from towards the internet (no packet is sent: connecting a UDP
/// socket only picks a route).
fn outbound_ip(unspecified: IpAddr) -> Option<IpAddr> {
    let probe: SocketAddr = if unspecified.is_ipv4() { "192.0.2.1:9" } else { "[2001:db8::1]:9" }.parse().ok()?;
    let socket = std::net::UdpSocket::bind(SocketAddr::new(unspecified, 0)).ok()?;
    socket.connect(probe).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

struct Driver {
    core: RelayCore,
    udp: Arc<UdpSocket>,
    udp_addr: SocketAddr,
    /// Where relayed sockets bind (the listening IP, perhaps 0.0.0.0) …
    bind_ip: IpAddr,
    /// … and the address clients are told (XOR-RELAYED-ADDRESS).
    relayed_ip: IpAddr,
    streams: HashMap<(SocketAddr, SocketAddr), Stream>,
    relayed: HashMap<SocketAddr, RelayedSocket>,
    events: mpsc::Sender<Event>,
    stats: Arc<Mutex<RelayStats>>,
    /// Frames dropped from every stream's send queue.
    stream_frames_dropped: Arc<AtomicU64>,
}

impl Driver {
    async fn run(mut self, mut event_queue: mpsc::Receiver<Event>) {
        let mut buffer = vec![0u8; READ_BUFFER];
        let udp = Arc::clone(&self.udp);
        loop {
            let wake = self.core.poll_timeout();
            tokio::select! {
                received = udp.recv_from(&mut buffer) => match received {
                    Ok((length, from)) => self.core.recv_datagram(self.udp_addr, from, &buffer[..length], Instant::now()),
                    // ICMP errors from earlier sends surface here on Linux; the socket is fine.
                    Err(error) => tracing::debug!(%error, "relay UDP receive"),
                },
                event = event_queue.recv() => match event {
                    Some(event) => self.handle(event),
                    None => return,
                },
                _ = tokio::time::sleep_until(wake.into()) => self.core.handle_timeout(Instant::now()),
            }
            // Drain whatever else is already waiting before polling timers again.
            while let Ok(event) = event_queue.try_recv() {
                self.handle(event);
                self.carry_out().await;
            }
            self.carry_out().await;
            if let Ok(mut stats) = self.stats.lock() {
                *stats = RelayStats { stream_frames_dropped: self.stream_frames_dropped.load(Ordering::Relaxed), ..self.core.stats() };
            }
        }
    }

    fn handle(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Datagram { local, from, data } => self.core.recv_datagram(local, from, &data, now),
            Event::StreamOpened { listen, client, writer, close } => {
                self.streams.insert((listen, client), Stream { writer, _close: close });
            }
            Event::StreamBytes { listen, client, data } => self.core.recv_stream(listen, client, &data, now),
            Event::StreamClosed { listen, client } => {
                if self.streams.remove(&(listen, client)).is_some() {
                    self.core.stream_closed(listen, client, now);
                }
            }
        }
    }

    async fn carry_out(&mut self) {
        while let Some(output) = self.core.poll_output() {
            match output {
                RelayOutput::Datagram { from, to, data } => {
                    let socket = if from == self.udp_addr {
                        &self.udp
                    } else if let Some(relayed) = self.relayed.get(&from) {
                        &relayed.socket
                    } else {
                        continue;
                    };
                    // UDP: a full socket buffer drops, as the network would.
                    let _ = socket.try_send_to(&data, to);
                }
                RelayOutput::Stream { listen, client, data } => {
                    if let Some(stream) = self.streams.get_mut(&(listen, client)) {
                        stream.writer.write(data, &self.stream_frames_dropped);
                    }
                }
                RelayOutput::CloseStream { listen, client } => {
                    self.streams.remove(&(listen, client));
                }
                RelayOutput::OpenRelayedSocket(request) => {
                    let result = self.open_relayed_socket(request).await;
                    self.core.relayed_socket_opened(request, result, Instant::now());
                }
                RelayOutput::CloseRelayedSocket { relayed } => {
                    // Dropping it stops its reader.
                    self.relayed.remove(&relayed);
                }
            }
        }
    }

    async fn open_relayed_socket(&mut self, request: AllocationRequest) -> Result<SocketAddr, SocketAllocateError> {
        let socket = UdpSocket::bind(SocketAddr::new(self.bind_ip, 0)).await.map_err(|error| {
            tracing::warn!(%error, client = %request.client, "cannot open a relayed socket");
            SocketAllocateError::InsufficientCapacity
        })?;
        let port = socket.local_addr().map_err(|_| SocketAllocateError::InsufficientCapacity)?.port();
        let address = SocketAddr::new(self.relayed_ip, port);
        let socket = Arc::new(socket);
        let reader = tokio::spawn(read_relayed(Arc::clone(&socket), address, self.events.clone())).abort_handle();
        self.relayed.insert(address, RelayedSocket { socket, reader });
        Ok(address)
    }
}

async fn read_relayed(socket: Arc<UdpSocket>, local: SocketAddr, events: mpsc::Sender<Event>) {
    let mut buffer = vec![0u8; READ_BUFFER];
    loop {
        match socket.recv_from(&mut buffer).await {
            Ok((length, from)) => {
                let event = Event::Datagram { local, from, data: buffer[..length].to_vec() };
                if let Err(mpsc::error::TrySendError::Closed(_)) = events.try_send(event) {
                    return;
                }
            }
            Err(error) => tracing::debug!(%error, "relayed socket receive"),
        }
    }
}

async fn accept_streams(
    listener: TcpListener,
    listen: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    events: mpsc::Sender<Event>,
    stream_frames_dropped: Arc<AtomicU64>,
) {
    loop {
        let Ok((stream, client)) = listener.accept().await else { continue };
        if let Err(error) = send_queue::limit_kernel_send_buffering(&stream) {
            tracing::debug!(%client, %error, "cannot limit a stream's send buffer");
        }
        let (close, closed) = oneshot::channel();
        let events_for_task = events.clone();
        match tls.clone() {
            None => {
                let socket = Arc::new(stream);
                let writer = StreamWriter::Direct(Arc::clone(&socket));
                // Registered before the first byte is read, so the core never sees bytes of an
                // unknown stream.
                if events.send(Event::StreamOpened { listen, client, writer, close }).await.is_err() {
                    return;
                }
                tokio::spawn(async move {
                    tokio::select! {
                        () = read_tcp(&socket, listen, client, &events_for_task) => {}
                        _ = closed => {}
                    }
                    let _ = events_for_task.send(Event::StreamClosed { listen, client }).await;
                });
            }
            Some(acceptor) => {
                let (writer, frames) = send_queue::channel(SendQueueLimits::default(), Arc::clone(&stream_frames_dropped));
                if events.send(Event::StreamOpened { listen, client, writer: StreamWriter::Queued(writer), close }).await.is_err() {
                    return;
                }
                tokio::spawn(async move {
                    match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => serve_stream(stream, listen, client, frames, closed, &events_for_task).await,
                        Ok(Err(error)) => tracing::debug!(%client, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%client, "TLS handshake timed out"),
                    }
                    let _ = events_for_task.send(Event::StreamClosed { listen, client }).await;
                });
            }
        }
    }
}

/// Reads a plain TCP client stream into events until it ends (the driver writes to it itself).
async fn read_tcp(socket: &TcpStream, listen: SocketAddr, client: SocketAddr, events: &mpsc::Sender<Event>) {
    let mut buffer = vec![0u8; STREAM_READ_BUFFER];
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        match socket.try_read(&mut buffer) {
            Ok(0) => return,
            Ok(length) => {
                let data = buffer[..length].to_vec();
                if events.send(Event::StreamBytes { listen, client, data }).await.is_err() {
                    return;
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
}

/// Writes the rest of a frame the socket took only part of, then queued frames, to a plain TCP
/// stream, in order, as it takes them, until the driver lets go of the stream. A frame leaves
/// the queue only once the socket has room, so while the stream is behind the queue decides
/// what to drop.
async fn write_tcp(socket: Arc<TcpStream>, unfinished: Vec<u8>, frames: SendQueueReceiver) {
    let writing = async {
        let mut unfinished = unfinished;
        loop {
            let mut written = 0;
            while written < unfinished.len() {
                if socket.writable().await.is_err() {
                    return;
                }
                match socket.try_write(&unfinished[written..]) {
                    Ok(length) => written += length,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => return,
                }
            }
            if !frames.ready().await || socket.writable().await.is_err() {
                return;
            }
            // A frame taken off the queue is written whole, even if the room was not really there.
            unfinished = frames.try_recv().unwrap_or_default();
        }
    };
    // A client that stopped reading would otherwise hold the socket (and this task) forever
    // after the relay closed the stream.
    tokio::select! {
        () = writing => {}
        () = frames.closed() => {}
    }
}

/// Reads one TLS client stream into events and writes the frames the core sends it, until
/// either side ends or the core lets go of the stream.
async fn serve_stream<S>(
    stream: S,
    listen: SocketAddr,
    client: SocketAddr,
    frames: SendQueueReceiver,
    closed: oneshot::Receiver<()>,
    events: &mpsc::Sender<Event>,
) where
    S: AsyncRead + AsyncWrite,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let writing = async {
        while let Some(frame) = frames.recv().await {
            // Flushed frame by frame, so a slow stream's backlog waits in the queue, where the
            // oldest media is dropped, not in TLS's own buffer.
            if writer.write_all(&frame).await.is_err() || writer.flush().await.is_err() {
                return;
            }
        }
    };
    let reading = async {
        let mut buffer = vec![0u8; STREAM_READ_BUFFER];
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(length) => {
                    let data = buffer[..length].to_vec();
                    if events.send(Event::StreamBytes { listen, client, data }).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = writing => {}
        _ = reading => {}
        _ = closed => {}
    }
}
