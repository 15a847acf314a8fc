//! `koe up`: the client daemon. It logs in (or reuses a valid certificate), runs the overlay
//! client (attached to a parent supernode, presence published), stores chat history and
//! contacts in the profile's SQLite, serves the local control socket for the other `koe`
//! commands, watches contacts' presence and renews the certificate before it expires.

pub mod calls;
pub mod control;
pub mod history;

use std::collections::HashMap;
use std::fmt::Write as _;
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
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

use crate::profile::{CertificateStatus, Profile};
use control::{ControlRequest, ControlResponse, CONTROL_SOCKET};
use history::{ContactState, History};

const HOST_CACHE_FILE: &str = "hosts.json";
const HISTORY_FILE: &str = "history.db";
const CONTACT_WATCH_INTERVAL: Duration = Duration::from_secs(30);
const RENEWAL_CHECK_INTERVAL: Duration = Duration::from_secs(60);
pub const MAX_CHAT_CHARS: usize = 4000;

/// What one device says to another inside a sealed envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Payload {
    Chat { text: String },
    ContactRequest,
    ContactAccept,
    ContactDecline,
    ContactRemoved,
    /// Call signalling (offer, ringing, answer, …), for the call it names.
    Call { signal: koe_call::CallSignal },
}

pub fn parse_status(text: &str) -> Result<Option<PresenceStatus>, String> {
    match text {
        "online" => Ok(Some(PresenceStatus::Online)),
        "away" => Ok(Some(PresenceStatus::Away)),
        "dnd" | "do-not-disturb" => Ok(Some(PresenceStatus::DoNotDisturb)),
        "invisible" => Ok(None),
        other => Err(format!("unknown status {other:?}: use online, away, dnd or invisible")),
    }
}

/// Shared by the control connections and the event loop.
pub struct DaemonState {
    me: Username,
    network: NetworkFile,
    home: std::path::PathBuf,
    history: Mutex<History>,
    client: ClientHandle,
    contact_presence: Mutex<HashMap<String, String>>,
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
    reach: Mutex<Reach>,
    /// Asked to stop (`koe down`).
    stop: tokio::sync::Notify,
}

/// Whether the daemon reaches the network, as last told to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reach {
    Starting,
    Online,
    /// No supernode took this client, for this reason.
    Unreachable(String),
}

/// Tells the user something they must know (online, the network cannot be reached) on
/// stderr, and logs it. Everything else goes only to the log (`koe.log` in the profile).
pub fn notice(line: &str) {
    use std::io::Write as _;
    info!("{line}");
    let _ = writeln!(std::io::stderr(), "koe: {line}");
}

impl std::fmt::Debug for DaemonState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonState").field("me", &self.me).finish_non_exhaustive()
    }
}

fn outcome_text(to: &Username, outcome: &SendOutcome) -> String {
    match outcome {
        SendOutcome::Delivered { devices: 1 } => format!("delivered to {to}"),
        SendOutcome::Delivered { devices } => format!("delivered to {to} ({devices} devices)"),
        SendOutcome::Undelivered { reason } => format!("not delivered to {to}: {reason}"),
    }
}

impl DaemonState {
    fn history(&self) -> Result<std::sync::MutexGuard<'_, History>, String> {
        self.history.lock().map_err(|_| "the history database is unavailable".to_string())
    }

    /// Sends to every online device of `to`. When nobody is online, asks the login server
    /// whether `to` exists at all, so the answer can be "no such user" rather than "offline".
    async fn send(&self, to: &Username, payload: &Payload) -> SendOutcome {
        let bytes = serde_json::to_vec(payload).unwrap_or_default();
        match self.client.send(to.clone(), bytes).await {
            SendOutcome::Undelivered { reason } if reason.ends_with("is offline") => {
                SendOutcome::Undelivered { reason: self.absence(to).await }
            }
            outcome => outcome,
        }
    }

    /// Why nobody answers for `to`: offline, or no such account.
    async fn absence(&self, to: &Username) -> String {
        match LoginClient::new(self.network.clone())
            .with_timeout(Duration::from_secs(5))
            .user_exists(to.as_str())
            .await
        {
            Ok(true) => format!("{to} is offline"),
            Ok(false) => format!("no such user: {to}"),
            Err(error) => format!("{to} is offline (the login server could not say whether the account exists: {error})"),
        }
    }

    /// Answers one control request.
    pub async fn handle(&self, request: ControlRequest) -> ControlResponse {
        match self.try_handle(request).await {
            Ok(response) => response,
            Err(message) => ControlResponse::failed(message),
        }
    }

    async fn try_handle(&self, request: ControlRequest) -> Result<ControlResponse, String> {
        let user = |name: &str| Username::parse_existing(name).map_err(|e| format!("no such user {name:?}: {e}"));
        match request {
            ControlRequest::Status => {
                let status = self.client.status().await?;
                let mut out = String::new();
                let presence = match (&status.parent, &status.unreachable) {
                    (Some(_), _) => status.status.map_or("invisible".to_string(), |s| s.to_string()),
                    (None, Some(reason)) => format!("offline: cannot reach any supernode: {reason}; retrying"),
                    (None, None) => "offline: attaching to a supernode…".to_string(),
                };
                let _ = writeln!(out, "me:          {} ({presence})", self.me);
                let _ = writeln!(out, "parent:      {}", status.parent.as_deref().unwrap_or("none"));
                if let Some(address) = self.serving.lock().ok().and_then(|s| s.clone()) {
                    let _ = writeln!(out, "serving:     as a supernode at {address}");
                }
                let _ = writeln!(out, "supernodes:  {} known", status.known_supernodes.len());
                for supernode in status.known_supernodes.iter().take(10) {
                    let _ = writeln!(out, "  {supernode}");
                }
                Ok(ControlResponse::ok(out))
            }
            ControlRequest::Lookup { username } => {
                let username = user(&username)?;
                let records = self.client.lookup(username.clone()).await?;
                if records.is_empty() {
                    let absence = self.absence(&username).await;
                    if absence.starts_with("no such user") {
                        return Err(absence);
                    }
                    return Ok(ControlResponse::ok(absence));
                }
                let mut out = format!("{username}: {} device(s) online\n", records.len());
                for record in &records {
                    let body = record.body();
                    let parent = koe_overlay::PeerId::from_bytes(&body.parent.peer_id)
                        .map_or("?".to_string(), |p| p.to_string());
                    let _ = writeln!(
                        out,
                        "  device {}  {}  via supernode {parent}",
                        body.certificate.device_key().fingerprint(),
                        body.status
                    );
                }
                Ok(ControlResponse::ok(out))
            }
            ControlRequest::SetStatus { status } => {
                let status_value = parse_status(&status)?;
                self.client.set_status(status_value).await?;
                Ok(ControlResponse::ok(format!("status set to {status}")))
            }
            ControlRequest::Chat { username, text } => {
                let to = user(&username)?;
                if text.trim().is_empty() {
                    return Err("empty message: nothing sent".into());
                }
                if text.chars().count() > MAX_CHAT_CHARS {
                    return Err(format!("message longer than {MAX_CHAT_CHARS} characters: nothing sent"));
                }
                let id = self
                    .history()?
                    .add_message(to.as_str(), false, &text, UnixTime::now(), "sending")
                    .map_err(|e| e.to_string())?;
                let outcome = self.send(&to, &Payload::Chat { text }).await;
                let status = match &outcome {
                    SendOutcome::Delivered { .. } => "delivered",
                    SendOutcome::Undelivered { .. } => "undelivered",
                };
                self.history()?.set_message_status(id, status).map_err(|e| e.to_string())?;
                let text = outcome_text(&to, &outcome);
                Ok(match outcome {
                    SendOutcome::Delivered { .. } => ControlResponse::ok(text),
                    SendOutcome::Undelivered { .. } => ControlResponse::failed(text),
                })
            }
            ControlRequest::Messages { username, limit } => {
                let peer = username.as_deref().map(user).transpose()?;
                let messages = self
                    .history()?
                    .messages(peer.as_ref().map(Username::as_str), limit)
                    .map_err(|e| e.to_string())?;
                let mut out = String::new();
                for message in messages {
                    let (from, to) = if message.incoming {
                        (message.peer.as_str(), self.me.as_str())
                    } else {
                        (self.me.as_str(), message.peer.as_str())
                    };
                    let status = if message.incoming { String::new() } else { format!(" [{}]", message.status) };
                    let _ = writeln!(out, "{} {from} → {to}: {}{status}", message.at, message.body);
                }
                if out.is_empty() {
                    out.push_str("no messages\n");
                }
                Ok(ControlResponse::ok(out))
            }
            ControlRequest::ContactsAdd { username } => {
                let them = user(&username)?;
                if them == self.me {
                    return Err("you cannot add yourself as a contact".into());
                }
                let current = self.history()?.contact(them.as_str()).map_err(|e| e.to_string())?;
                if current == Some(ContactState::Accepted) {
                    return Ok(ControlResponse::ok(format!("{them} is already a contact")));
                }
                // If they asked first, adding them is accepting.
                let (payload, state) = if current == Some(ContactState::AwaitingMe) {
                    (Payload::ContactAccept, ContactState::Accepted)
                } else {
                    (Payload::ContactRequest, ContactState::Requested)
                };
                self.history()?.set_contact(them.as_str(), state).map_err(|e| e.to_string())?;
                let outcome = self.send(&them, &payload).await;
                let verb = if state == ContactState::Accepted { "accepted" } else { "contact request" };
                Ok(ControlResponse::ok(format!("{verb}: {}", outcome_text(&them, &outcome))))
            }
            ControlRequest::ContactsAccept { username } => self.answer_request(&user(&username)?, true).await,
            ControlRequest::ContactsDecline { username } => self.answer_request(&user(&username)?, false).await,
            ControlRequest::ContactsRemove { username } => {
                let them = user(&username)?;
                if !self.history()?.remove_contact(them.as_str()).map_err(|e| e.to_string())? {
                    return Err(format!("{them} is not in your contacts"));
                }
                let _ = self.send(&them, &Payload::ContactRemoved).await;
                Ok(ControlResponse::ok(format!("removed {them} from your contacts")))
            }
            // Served by the control connection itself (they need the shared state).
            ControlRequest::Calls { limit } => {
                let calls = self.history()?.calls(limit).map_err(|e| e.to_string())?;
                let mut out = String::new();
                for call in calls {
                    let _ = writeln!(out, "{}", calls::history_line(&call));
                }
                if out.is_empty() {
                    out.push_str("no calls\n");
                }
                Ok(ControlResponse::ok(out))
            }
            ControlRequest::Call { .. }
            | ControlRequest::Hangup
            | ControlRequest::Answer { .. }
            | ControlRequest::Decline
            | ControlRequest::Mute { .. } => {
                Err("not available here".into())
            }
            ControlRequest::Shutdown => {
                self.stop.notify_one();
                Ok(ControlResponse::ok("stopping"))
            }
            ControlRequest::ContactsList => {
                let contacts = self.history()?.contacts().map_err(|e| e.to_string())?;
                if contacts.is_empty() {
                    return Ok(ControlResponse::ok("no contacts yet: koe contacts add USER\n"));
                }
                self.watch_contacts().await;
                let presence = self.contact_presence.lock().map(|p| p.clone()).unwrap_or_default();
                let mut out = String::new();
                for (name, state) in contacts {
                    let seen = match state {
                        ContactState::Accepted => presence.get(&name).cloned().unwrap_or_else(|| "unknown".into()),
                        _ => state.describe().to_string(),
                    };
                    let _ = writeln!(out, "{name:<32} {seen}");
                }
                Ok(ControlResponse::ok(out))
            }
        }
    }

    async fn answer_request(&self, them: &Username, accept: bool) -> Result<ControlResponse, String> {
        if self.history()?.contact(them.as_str()).map_err(|e| e.to_string())? != Some(ContactState::AwaitingMe) {
            return Err(format!("{them} has not asked to be your contact"));
        }
        let (state, payload, verb) = if accept {
            (ContactState::Accepted, Payload::ContactAccept, "accepted")
        } else {
            (ContactState::Declined, Payload::ContactDecline, "declined")
        };
        self.history()?.set_contact(them.as_str(), state).map_err(|e| e.to_string())?;
        let outcome = self.send(them, &payload).await;
        Ok(ControlResponse::ok(format!("{verb} {them}'s request ({})", outcome_text(them, &outcome))))
    }

    /// Stores what arrived; the sender hears "delivered" only if this succeeds. A call
    /// signal is handed back for the calls to act on.
    pub fn receive(&self, envelope: &OpenedEnvelope) -> Result<Option<(Username, koe_call::CallSignal)>, String> {
        let from = envelope.sender.username().clone();
        let payload: Payload =
            serde_json::from_slice(&envelope.payload).map_err(|e| format!("unreadable message: {e}"))?;
        if let Payload::Call { signal } = payload {
            return Ok(Some((from, signal)));
        }
        let history = self.history()?;
        let result = match payload {
            Payload::Chat { text } => {
                // The text is private: it goes to the history, never to the log.
                info!(%from, "message received");
                history.add_message(from.as_str(), true, &text, envelope.timestamp, "received").map(drop)
            }
            Payload::ContactRequest => match history.contact(from.as_str()) {
                Ok(Some(ContactState::Requested | ContactState::Accepted)) => {
                    // We asked them too: that makes it mutual.
                    history.set_contact(from.as_str(), ContactState::Accepted)
                }
                Ok(_) => {
                    info!(%from, "contact request: koe contacts accept {from}");
                    history.set_contact(from.as_str(), ContactState::AwaitingMe)
                }
                Err(error) => Err(error),
            },
            Payload::ContactAccept => {
                info!(%from, "accepted your contact request");
                history.set_contact(from.as_str(), ContactState::Accepted)
            }
            Payload::ContactDecline => history.set_contact(from.as_str(), ContactState::Declined),
            Payload::ContactRemoved => history.remove_contact(from.as_str()).map(drop),
            Payload::Call { .. } => Ok(()),
        };
        result.map(|()| None).map_err(|e| e.to_string())
    }

    /// Looks up accepted contacts and remembers how they appear.
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
            let seen = match self.client.lookup(username).await {
                Ok(records) if records.is_empty() => "offline".to_string(),
                Ok(records) => records
                    .iter()
                    .map(|r| r.body().status)
                    .min_by_key(|s| match s {
                        PresenceStatus::Online => 0,
                        PresenceStatus::DoNotDisturb => 1,
                        PresenceStatus::Away => 2,
                        PresenceStatus::Offline => 3,
                    })
                    .map_or("offline".to_string(), |s| s.to_string()),
                Err(_) => continue,
            };
            let Ok(mut presence) = self.contact_presence.lock() else { return };
            if presence.get(&name) != Some(&seen) {
                info!(contact = %name, status = %seen, "contact presence");
                presence.insert(name, seen);
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
    /// Calls go only through relay nodes: the other side never learns this device's address.
    pub relay_only: bool,
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
            let (node, address, stun) = crate::commands::node::start_supernode(&network, identity, promotion.listen, &[], None)
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
    let network = profile.network()?.context("this profile has no network: run `koe login USER --network FILE`")?;
    let certificate = match profile.fresh_certificate(false).await? {
        CertificateStatus::NotLoggedIn => bail!("not logged in: run `koe login USER` first"),
        CertificateStatus::Expired(certificate) => {
            bail!("the certificate expired at {}: run `koe login {}`", certificate.not_after(), certificate.username())
        }
        CertificateStatus::Valid(c) | CertificateStatus::Renewed(c) => c,
        CertificateStatus::RenewalFailed(c, reason) => {
            warn!(%reason, "certificate renewal failed; continuing with the current one");
            c
        }
    };
    let home = profile.home().to_path_buf();
    let socket_path = home.join(CONTROL_SOCKET);
    if tokio::net::UnixStream::connect(&socket_path).await.is_ok() {
        bail!("koe is already running for this profile ({})", home.display());
    }
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path)
        .with_context(|| format!("cannot create the control socket {}", socket_path.display()))?;

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
        calls: calls::Calls::new(options.auto_answer),
        relay_only: options.relay_only,
        udp_blocked: std::sync::atomic::AtomicBool::new(false),
        reach: Mutex::new(Reach::Starting),
        stop: tokio::sync::Notify::new(),
    });
    let promotion_task = options
        .promotion
        .map(|promotion| tokio::spawn(promote_when_ready(Arc::clone(&state), network.clone(), promotion)));
    info!("{me} on network {:?}; attaching to a supernode…", network.name.as_str());

    tokio::pin!(shutdown);
    let mut watch = tokio::time::interval(CONTACT_WATCH_INTERVAL);
    let mut renewal = tokio::time::interval(RENEWAL_CHECK_INTERVAL);
    let mut current_certificate = certificate;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let state = Arc::clone(&state);
                    tokio::spawn(async move { serve_control(state, stream).await });
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
            let Ok(mut reach) = state.reach.lock() else { return };
            match std::mem::replace(&mut *reach, Reach::Online) {
                Reach::Starting => notice(&format!("{} is online (log: {})", state.me, state.home.join(crate::LOG_FILE).display())),
                Reach::Unreachable(_) => notice(&format!("{} is online again", state.me)),
                Reach::Online => {}
            }
            info!("{} online via {parent}", state.me);
        }
        ClientEvent::Detached { reason } => info!("{reason}"),
        ClientEvent::Unreachable { reason, retry_in } => {
            let Ok(mut reach) = state.reach.lock() else { return };
            // Said once, and again only if the reason changes; rounds back off to 30 s.
            if *reach != Reach::Unreachable(reason.clone()) {
                notice(&format!("cannot reach any supernode: {reason}; retrying (koe status shows the state)"));
                *reach = Reach::Unreachable(reason);
            }
            debug!(?retry_in, "next round of attaching");
        }
        ClientEvent::Received { envelope, ack } => match state.receive(&envelope) {
            Ok(call_signal) => {
                let _ = ack.send(Ok(()));
                if let Some((from, signal)) = call_signal {
                    calls::on_signal(state, from, signal);
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

/// Serves one control connection. Progress lines (a call's ringing, answered, live
/// statistics) go out as they happen; if `koe call` or `koe answer` goes away (Ctrl-C), the
/// call is hung up.
async fn serve_control(state: Arc<DaemonState>, stream: tokio::net::UnixStream) {
    let mut reader = BufReader::new(stream);
    let request = control::read_request(&mut reader).await;
    let mut watch_caller = matches!(request, Ok(ControlRequest::Call { .. } | ControlRequest::Answer { .. }));
    let (mut from_caller, mut to_caller) = reader.into_inner().into_split();
    let (progress, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let work = answer_control(Arc::clone(&state), request, progress);
    tokio::pin!(work);
    let mut byte = [0u8; 1];
    let response = loop {
        tokio::select! {
            response = &mut work => break response,
            Some(line) = lines.recv() => {
                let _ = control::send_response(&mut to_caller, &ControlResponse::progress(line)).await;
            }
            read = from_caller.read(&mut byte), if watch_caller => {
                if matches!(read, Ok(0) | Err(_)) {
                    watch_caller = false;
                    if state.calls.hang_up_all() > 0 {
                        info!("the command that placed or answered the call went away: hung up");
                    }
                }
            }
        }
    };
    while let Ok(line) = lines.try_recv() {
        let _ = control::send_response(&mut to_caller, &ControlResponse::progress(line)).await;
    }
    let _ = control::send_response(&mut to_caller, &response).await;
}

/// The answer to one control request; calls send their lines to `progress` as they happen.
async fn answer_control(state: Arc<DaemonState>, request: Result<ControlRequest, String>, progress: calls::ProgressSender) -> ControlResponse {
    match request {
        Ok(ControlRequest::Call { username, play, record, duration_ms }) => match Username::parse_existing(&username) {
            Ok(to) => {
                let outcome = calls::place(
                    Arc::clone(&state),
                    to,
                    play.map(Into::into),
                    record.map(Into::into),
                    duration_ms.map(Duration::from_millis),
                    Some(progress),
                )
                .await;
                match outcome {
                    Ok(_) => ControlResponse::ok(""),
                    Err(error) => ControlResponse::failed(error),
                }
            }
            Err(error) => ControlResponse::failed(format!("no such user {username:?}: {error}")),
        },
        Ok(ControlRequest::Answer { play, record }) => {
            let (reply, ended) = tokio::sync::oneshot::channel();
            let decision = calls::Decision::Answer { play: play.map(Into::into), record: record.map(Into::into), progress: Some(progress), reply };
            match state.calls.decide(decision).await {
                Ok(_) => match ended.await {
                    Ok(Ok(_)) => ControlResponse::ok(""),
                    Ok(Err(error)) => ControlResponse::failed(error),
                    Err(_) => ControlResponse::failed("the call ended before it could be answered"),
                },
                Err(error) => ControlResponse::failed(error),
            }
        }
        Ok(ControlRequest::Decline) => match state.calls.decide(calls::Decision::Decline).await {
            Ok(from) => ControlResponse::ok(format!("declined the call from {from}")),
            Err(error) => ControlResponse::failed(error),
        },
        Ok(ControlRequest::Hangup) => match state.calls.hang_up_all() {
            0 => ControlResponse::failed("no call to hang up"),
            _ => ControlResponse::ok("hung up"),
        },
        Ok(ControlRequest::Mute { on }) => match state.calls.mute(on) {
            0 => ControlResponse::failed("no call in progress"),
            _ if on => ControlResponse::ok("muted: the other side hears silence (koe mute off to undo)"),
            _ => ControlResponse::ok("unmuted"),
        },
        Ok(request) => state.handle(request).await,
        Err(error) => ControlResponse::failed(error),
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
