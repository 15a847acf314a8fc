//! `koe up`: the client daemon. It logs in (or reuses a valid certificate), runs the overlay
//! client (attached to a parent supernode, presence published), stores chat history and
//! contacts in the profile's SQLite, serves the local control socket for the other `koe`
//! commands, watches contacts' presence and renews the certificate before it expires.

pub mod api;
pub mod calls;
pub mod control;
mod desktop;
pub mod history;
mod pstn;
pub mod requests;
mod signed_out;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use koe_auth::renewal::{renewal_state, RenewalState};
use koe_overlay::client::{ClientConfig, ClientEvent, ClientHandle, ClientNode, SendOutcome};
use koe_overlay::host_cache::HostCache;
use koe_overlay::{OpenedEnvelope, PresenceStatus};
use koe_auth::LoginClient;
use koe_types::{Certificate, NetworkFile, UnixTime, Username};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

use crate::profile::{CertificateStatus, Profile};
use api::{ApiError, Delivery, Event, MessageState};
use control::CONTROL_SOCKET;
use history::{ContactState, History};

const HOST_CACHE_FILE: &str = "hosts.json";
pub const HISTORY_FILE: &str = "history.db";
const CONTACT_WATCH_INTERVAL: Duration = Duration::from_secs(30);
const RENEWAL_CHECK_INTERVAL: Duration = Duration::from_secs(60);
pub const MAX_CHAT_CHARS: usize = 4000;
/// Events waiting for a slow `koe events`; beyond this it misses some (and is told how many).
const EVENT_BACKLOG: usize = 256;

/// What one device says to another inside a sealed envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Payload {
    Chat {
        text: String,
        /// The sender's id for it, which a receipt names.
        #[serde(default)]
        id: Option<String>,
    },
    ContactRequest,
    ContactAccept,
    ContactDecline,
    ContactRemoved,
    /// Call signalling (offer, ringing, answer, …), for the call it names.
    Call { signal: koe_call::CallSignal },
    /// A call rang while this user was offline (Unix seconds).
    MissedCall { at: u64 },
    /// Messages that waited in a mailbox have reached the recipient (their ids).
    Receipt { ids: Vec<String> },
    /// A user asks a PSTN gateway something (a price, their credit); answered with a
    /// `PstnResponse` of the same id.
    PstnRequest { id: String, request: koe_pstn::service::PstnRequest },
    /// A gateway's answer; taken only from a certificate with the gateway role.
    PstnResponse { id: String, response: koe_pstn::service::PstnResponse },
}

impl Payload {
    /// Whether it waits in the recipient's mailbox when no device of theirs is online. Call
    /// signals do not: a call is now or never (a missed call is left instead).
    fn waits_for_recipient(&self) -> bool {
        !matches!(self, Self::Call { .. } | Self::PstnRequest { .. } | Self::PstnResponse { .. })
    }
}

/// What a received envelope asks of the daemon beyond storing it.
#[derive(Debug)]
pub enum Received {
    Nothing,
    /// A call signal, for the calls to act on.
    CallSignal(Username, koe_call::CallSignal),
    /// A chat message that waited in a mailbox: tell its sender it arrived.
    Receipt(Username, String),
    /// A user asks this gateway something.
    PstnRequest(Username, String, koe_pstn::service::PstnRequest),
}

/// Shared by the control connections and the event loop.
pub struct DaemonState {
    me: Username,
    network: NetworkFile,
    home: std::path::PathBuf,
    history: Mutex<History>,
    client: ClientHandle,
    /// How each accepted contact last looked (`None`: offline).
    contact_presence: Mutex<HashMap<String, Option<PresenceStatus>>>,
    /// This device's own supernode address, once promoted.
    serving: Mutex<Option<String>>,
    /// This device, as calls name it (its key's fingerprint).
    device: String,
    calls: calls::Calls,
    /// Offer only relayed candidates in calls (`--relay-only`).
    relay_only: bool,
    /// The last call found UDP blocked (its STUN query got no answer).
    udp_blocked: std::sync::atomic::AtomicBool,
    /// What the user was last told about reaching the network.
    told: Mutex<Told>,
    /// Asked to stop (`koe down`).
    stop: tokio::sync::Notify,
    /// Set when the daemon stops: ends `koe events` streams.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Every [`Event`], for `koe events` (and the app).
    events: tokio::sync::broadcast::Sender<Event>,
    /// Say what the user must know on stderr (not in the demo, which narrates).
    notices_on_stderr: bool,
    /// This daemon is a PSTN gateway (`koe gateway serve`).
    gateway: Option<Arc<crate::gateway::GatewayService>>,
    /// Questions asked of the gateways, by id: where the first answer goes.
    pstn_waiting: Mutex<HashMap<String, tokio::sync::oneshot::Sender<(Username, koe_pstn::service::PstnResponse)>>>,
}

/// Whether the daemon reaches the network, as last told to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Told {
    Starting,
    Online,
    /// No supernode took this client, for this reason.
    Unreachable(String),
}


impl std::fmt::Debug for DaemonState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonState").field("me", &self.me).finish_non_exhaustive()
    }
}

impl DaemonState {
    fn history(&self) -> Result<std::sync::MutexGuard<'_, History>, ApiError> {
        self.history.lock().map_err(|_| ApiError::failed("the history database is unavailable"))
    }

    /// Sends to every online device of `to`. When nobody is online, asks the login server
    /// whether `to` exists at all, so the answer can be "no such user" rather than "offline".
    async fn send(&self, to: &Username, payload: &Payload) -> Delivery {
        let bytes = serde_json::to_vec(payload).unwrap_or_default();
        match self.client.send(to.clone(), bytes, payload.waits_for_recipient()).await {
            SendOutcome::Delivered { devices } => Delivery::Delivered { devices },
            SendOutcome::Kept { replicas } => Delivery::Kept { replicas },
            SendOutcome::NotKept(refusal) => Delivery::Undelivered { why: ApiError::NotKept { username: to.to_string(), refusal } },
            SendOutcome::Offline => Delivery::Undelivered { why: self.absence(to).await },
            SendOutcome::Undelivered { reason } => Delivery::Undelivered { why: ApiError::Undeliverable { reason } },
        }
    }

    /// Why nobody answers for `to`: offline, or no such account.
    async fn absence(&self, to: &Username) -> ApiError {
        let username = to.to_string();
        match LoginClient::new(self.network.clone())
            .with_timeout(Duration::from_secs(5))
            .user_exists(to.as_str())
            .await
        {
            Ok(true) => ApiError::Offline { username },
            Ok(false) => ApiError::NoSuchUser { username },
            Err(error) => ApiError::OfflineOrUnknown { username, detail: error.to_string() },
        }
    }

    /// Tells the user something they must know (online, the network cannot be reached) on
    /// stderr, and logs it. Everything else goes only to the log (`koe.log` in the profile).
    fn notice(&self, line: &str) {
        notice(self.notices_on_stderr, line);
    }

    /// Tells every `koe events` (there may be none).
    fn publish(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Stores what arrived; the sender hears "delivered" only if this succeeds. A call
    /// signal is handed back for the calls to act on.
    pub fn receive(&self, envelope: &OpenedEnvelope, from_mailbox: bool) -> Result<Received, String> {
        let from = envelope.sender.username().clone();
        let name = from.to_string();
        let history = self.history().map_err(|e| e.to_string())?;
        if history.is_blocked(&name).map_err(|e| e.to_string())? {
            // Never shown, never stored. From a mailbox it may go; live, the sender hears
            // only that it was not delivered.
            info!(%from, "something from a blocked user was dropped");
            return if from_mailbox { Ok(Received::Nothing) } else { Err("not accepted".into()) };
        }
        if from_mailbox && !history.take_once(&envelope.message_id, UnixTime::now()).map_err(|e| e.to_string())? {
            info!(%from, "a message from the mailbox was taken before (replayed); dropped");
            return Ok(Received::Nothing);
        }
        let payload: Payload =
            serde_json::from_slice(&envelope.payload).map_err(|e| format!("unreadable message: {e}"))?;
        let from_gateway = envelope.sender.role() == koe_types::Role::Gateway;
        let mut then = Received::Nothing;
        let (result, event) = match payload {
            // Prices and bills count only from the network's gateways.
            Payload::Call { signal: koe_call::CallSignal::Notice { .. } } if !from_gateway => {
                warn!(%from, "{from} sent call notices (prices, bills) but is not a gateway of this network: ignored");
                (Ok(()), None)
            }
            Payload::Call { signal } if !from_mailbox => return Ok(Received::CallSignal(from, signal)),
            Payload::Call { .. } => (Ok(()), None),
            Payload::Chat { text, id } => {
                // The text is private: it goes to the history and to `koe events`, never to
                // the log.
                info!(%from, from_mailbox, "message received");
                let at = envelope.timestamp.as_secs();
                let stored = history.add_message(&name, true, &text, envelope.timestamp, MessageState::Received, id.as_deref()).map(drop);
                if let (true, Some(id)) = (from_mailbox, id) {
                    then = Received::Receipt(from.clone(), id);
                }
                (stored, Some(Event::Message { from: name, text, at }))
            }
            Payload::ContactRequest => match history.contact(&name) {
                // We asked them too: that makes it mutual.
                Ok(Some(ContactState::Requested | ContactState::Accepted)) => {
                    (history.set_contact(&name, ContactState::Accepted), Some(Event::ContactAccepted { from: name }))
                }
                Ok(_) => (history.set_contact(&name, ContactState::AwaitingMe), Some(Event::ContactRequest { from: name })),
                Err(error) => (Err(error), None),
            },
            Payload::ContactAccept => (history.set_contact(&name, ContactState::Accepted), Some(Event::ContactAccepted { from: name })),
            Payload::ContactDecline => (history.set_contact(&name, ContactState::Declined), Some(Event::ContactDeclined { from: name })),
            Payload::ContactRemoved => (history.remove_contact(&name).map(drop), None),
            Payload::MissedCall { at } => {
                let record = history::CallRecord {
                    call_id: hex(&envelope.message_id),
                    peer: name.clone(),
                    incoming: true,
                    started_at: UnixTime(at),
                    talked_ms: None,
                    ended: "missed (you were offline)".into(),
                    path: None,
                    mos: None,
                };
                (history.add_call(&record), Some(Event::MissedCall { from: name, at }))
            }
            Payload::Receipt { ids } => (history.delivered(&name, &ids).map(drop), None),
            Payload::PstnRequest { id, request } if self.gateway.is_some() && !from_mailbox => {
                return Ok(Received::PstnRequest(from, id, request));
            }
            Payload::PstnRequest { .. } => (Ok(()), None),
            Payload::PstnResponse { id, response } => {
                if from_gateway {
                    self.pstn_answered(id, from, response);
                } else {
                    warn!(%from, "{from} sent prices or a balance but is not a gateway of this network: ignored");
                }
                (Ok(()), None)
            }
        };
        result.map_err(|e| e.to_string())?;
        if let Some(event) = event {
            self.publish(event);
        }
        Ok(then)
    }

    /// Looks up accepted contacts and remembers how they appear; changes go to `koe events`.
    async fn watch_contacts(&self) {
        let contacts = match self.history() {
            Ok(history) => history.contacts().unwrap_or_default(),
            Err(_) => return,
        };
        for (name, state) in contacts {
            if state != ContactState::Accepted {
                continue;
            }
            let Ok(username) = Username::parse_existing(&name) else { continue };
            let Ok(records) = self.client.lookup(username).await else { continue };
            // The most available of their devices.
            let seen = records.iter().map(|r| r.body().status).min_by_key(|status| match status {
                PresenceStatus::Online => 0,
                PresenceStatus::DoNotDisturb => 1,
                PresenceStatus::Away => 2,
                PresenceStatus::Offline => 3,
            });
            // News only: the first look at a contact (at start) is not a change.
            let changed = {
                let Ok(mut presence) = self.contact_presence.lock() else { return };
                presence.insert(name.clone(), seen).is_some_and(|before| before != seen)
            };
            if changed {
                info!(contact = %name, status = ?seen, "contact presence");
                self.publish(Event::Presence { username: name, status: seen });
            }
        }
    }
}

/// Everything `koe up` needs to start.
#[derive(Debug)]
pub struct DaemonOptions {
    pub status: Option<PresenceStatus>,
    /// Supernodes to try before the host cache (e.g. one started in this process).
    pub preferred_supernodes: Vec<String>,
    /// `--supernode auto`: when and where to offer to serve as a supernode.
    pub promotion: Option<Promotion>,
    /// `--auto-answer`: answer every call at once.
    pub auto_answer: Option<calls::AutoAnswer>,
    /// Serve as a PSTN gateway: answer calls to phone numbers and users' price questions.
    pub gateway: Option<Arc<crate::gateway::GatewayService>>,
    /// Calls go only through relay nodes: the other side never learns this device's address.
    pub relay_only: bool,
    /// Say on stderr that the client is online, or why it is not.
    pub notices_on_stderr: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Promotion {
    pub after: Duration,
    pub listen: std::net::SocketAddr,
}

/// How long an unreachable client waits before checking again.
const PROMOTION_RETRY: Duration = Duration::from_secs(3600);

/// `--supernode auto`: after `after`, start a supernode and ask the parent to connect to it
/// from outside; keep it only if that works (the address is publicly reachable).
async fn promote_when_ready(state: Arc<DaemonState>, network: NetworkFile, promotion: Promotion) {
    tokio::time::sleep(promotion.after).await;
    loop {
        let attempt = async {
            let identity = crate::commands::node::node_identity(&state.home).map_err(|e| e.to_string())?;
            let (node, address, stun) = crate::commands::node::start_supernode(&network, identity, promotion.listen, &[], None, Some(&state.home))
                .await
                .map_err(|e| e.to_string())?;
            // The supernode must be running to answer the parent's dial-back.
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(stun.alongside(node.run(async {
                let _ = stopped.await;
            })));
            match state.client.confirm_reachable(address.to_string()).await {
                Ok(true) => Ok((task, stop, address)),
                outcome => {
                    let _ = stop.send(());
                    let _ = task.await;
                    Err(match outcome {
                        Err(reason) => reason,
                        _ => format!("the parent supernode could not connect to {address}"),
                    })
                }
            }
        };
        match attempt.await {
            Ok((task, stop, address)) => {
                info!(%address, "publicly reachable: now also serving as a supernode");
                if let Ok(mut serving) = state.serving.lock() {
                    *serving = Some(address.to_string());
                }
                // Runs until the daemon stops (which aborts this task and with it `stop`).
                let _keep = stop;
                let _ = task.await;
                return;
            }
            Err(reason) => {
                info!(%reason, "not serving as a supernode; will check again in an hour");
                tokio::time::sleep(PROMOTION_RETRY).await;
            }
        }
    }
}

pub async fn run(profile: Profile, options: DaemonOptions, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    profile.network()?.context("this profile has no network: run `koe login USER --network FILE`")?;
    let home = profile.home().to_path_buf();
    let socket_path = home.join(CONTROL_SOCKET);
    if tokio::net::UnixStream::connect(&socket_path).await.is_ok() {
        bail!("koe is already running for this profile ({})", home.display());
    }
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path)
        .with_context(|| format!("cannot create the control socket {}", socket_path.display()))?;
    tokio::pin!(shutdown);
    let certificate = loop {
        let why = match profile.fresh_certificate(false).await? {
            CertificateStatus::Valid(c) | CertificateStatus::Renewed(c) => break c,
            CertificateStatus::RenewalFailed(c, reason) => {
                warn!(%reason, "certificate renewal failed; continuing with the current one");
                break c;
            }
            CertificateStatus::NotLoggedIn => "not logged in: run `koe login USER`".to_string(),
            CertificateStatus::Expired(c) => format!("the certificate expired at {}: run `koe login {}`", c.not_after(), c.username()),
        };
        if !signed_out::wait_for_login(&profile, &listener, &why, options.notices_on_stderr, &mut shutdown).await {
            let _ = std::fs::remove_file(&socket_path);
            return Ok(());
        }
    };
    // A login may have named another network file.
    let network = profile.network()?.context("this profile has no network: run `koe login USER --network FILE`")?;

    let history = History::open(&home.join(HISTORY_FILE))?;
    let mut host_cache = load_host_cache(&home);
    for (rank, address) in options.preferred_supernodes.iter().enumerate() {
        host_cache.succeeded(address, Some(Duration::from_micros(rank as u64)), UnixTime::now());
    }
    let device_key = profile.device_key()?;
    let device = device_key.public_key().fingerprint();
    let me = certificate.username().clone();
    let (node, client, mut events) = ClientNode::new(ClientConfig {
        network: network.clone(),
        device_key,
        certificate: certificate.clone(),
        status: options.status,
        host_cache,
        blocked: history.blocked()?.iter().filter_map(|name| Username::parse_existing(name).ok()).collect(),
    })?;
    let (stop_node, node_stopped) = tokio::sync::oneshot::channel::<()>();
    let node_task = tokio::spawn(node.run(async {
        let _ = node_stopped.await;
    }));
    let state = Arc::new(DaemonState {
        me: me.clone(),
        network: network.clone(),
        home: home.clone(),
        history: Mutex::new(history),
        client,
        contact_presence: Mutex::new(HashMap::new()),
        serving: Mutex::new(None),
        device,
        calls: calls::Calls::new(options.auto_answer, options.gateway.is_some()),
        relay_only: options.relay_only,
        udp_blocked: std::sync::atomic::AtomicBool::new(false),
        told: Mutex::new(Told::Starting),
        stop: tokio::sync::Notify::new(),
        stopping: tokio::sync::watch::channel(false).0,
        events: tokio::sync::broadcast::channel(EVENT_BACKLOG).0,
        notices_on_stderr: options.notices_on_stderr,
        gateway: options.gateway,
        pstn_waiting: Mutex::new(HashMap::new()),
    });
    let desktop_task = tokio::spawn(desktop::show(state.events.subscribe()));
    let promotion_task = options
        .promotion
        .map(|promotion| tokio::spawn(promote_when_ready(Arc::clone(&state), network.clone(), promotion)));
    info!("{me} on network {:?}; attaching to a supernode…", network.name.as_str());

    let mut watch = tokio::time::interval(CONTACT_WATCH_INTERVAL);
    let mut renewal = tokio::time::interval(RENEWAL_CHECK_INTERVAL);
    let mut current_certificate = certificate;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let state = Arc::clone(&state);
                    tokio::spawn(async move { requests::serve(state, stream).await });
                }
            }
            Some(event) = events.recv() => handle_event(&state, event),
            _ = watch.tick() => {
                let state = Arc::clone(&state);
                tokio::spawn(async move { state.watch_contacts().await });
            }
            _ = renewal.tick() => {
                if let Some(renewed) = renew_if_due(&profile, &current_certificate).await {
                    state.client.renewed_certificate(renewed.clone()).await;
                    current_certificate = renewed;
                }
            }
            () = &mut shutdown => break,
            () = state.stop.notified() => break,
        }
    }
    state.stopping.send_replace(true);
    desktop_task.abort();
    if let Some(task) = promotion_task {
        task.abort();
    }
    let _ = stop_node.send(());
    let _ = node_task.await;
    let _ = std::fs::remove_file(&socket_path);
    info!("stopped");
    Ok(())
}

async fn renew_if_due(profile: &Profile, certificate: &Certificate) -> Option<Certificate> {
    if renewal_state(certificate, UnixTime::now()) != RenewalState::RenewNow {
        return None;
    }
    match profile.fresh_certificate(false).await {
        Ok(CertificateStatus::Renewed(renewed)) => {
            info!(until = %renewed.not_after(), "certificate renewed");
            Some(renewed)
        }
        Ok(CertificateStatus::RenewalFailed(_, reason)) => {
            warn!(%reason, "certificate renewal failed; will retry");
            None
        }
        _ => None,
    }
}

fn handle_event(state: &Arc<DaemonState>, event: ClientEvent) {
    match event {
        ClientEvent::Attached { parent } => {
            if let Ok(mut told) = state.told.lock() {
                match std::mem::replace(&mut *told, Told::Online) {
                    Told::Starting => state.notice(&format!("{} is online (log: {})", state.me, state.home.join(crate::LOG_FILE).display())),
                    Told::Unreachable(_) => state.notice(&format!("{} is online again", state.me)),
                    Told::Online => {}
                }
            }
            info!("{} online via {parent}", state.me);
            state.publish(Event::Online { parent });
        }
        ClientEvent::Detached { reason } => info!("{reason}"),
        ClientEvent::Unreachable { reason, retry_in } => {
            debug!(?retry_in, "next round of attaching");
            let Ok(mut told) = state.told.lock() else { return };
            // Said once, and again only if the reason changes; rounds back off to 30 s.
            if *told != Told::Unreachable(reason.clone()) {
                state.notice(&format!("cannot reach any supernode: {reason}; retrying (koe status shows the state)"));
                *told = Told::Unreachable(reason.clone());
                state.publish(Event::Unreachable { reason });
            }
        }
        ClientEvent::Received { envelope, ack, from_mailbox } => match state.receive(&envelope, from_mailbox) {
            Ok(then) => {
                let _ = ack.send(Ok(()));
                match then {
                    Received::CallSignal(from, signal) => calls::on_signal(state, from, signal),
                    Received::PstnRequest(from, id, request) => pstn::answer_request(state, from, id, request),
                    Received::Receipt(to, id) => {
                        let state = Arc::clone(state);
                        tokio::spawn(async move { state.send(&to, &Payload::Receipt { ids: vec![id] }).await });
                    }
                    Received::Nothing => {}
                }
            }
            Err(error) => {
                warn!(%error, "could not store a received message");
                let _ = ack.send(Err(error));
            }
        },
        ClientEvent::HostCacheChanged(cache) => save_host_cache(&state.home, &cache),
    }
}

fn load_host_cache(home: &Path) -> HostCache {
    std::fs::read(home.join(HOST_CACHE_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn save_host_cache(home: &Path, cache: &HostCache) {
    if let Ok(bytes) = serde_json::to_vec_pretty(cache) {
        let _ = koe_auth::private_file::replace_private_file(&home.join(HOST_CACHE_FILE), &bytes);
    }
}

/// Logs `line`, and with `on_stderr` says it there too: what the user must know.
fn notice(on_stderr: bool, line: &str) {
    use std::io::Write as _;
    info!("{line}");
    if on_stderr {
        let _ = writeln!(std::io::stderr(), "koe: {line}");
    }
}

/// Bytes as lowercase hexadecimal (ids in the history).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
