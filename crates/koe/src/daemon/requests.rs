//! The daemon's side of the typed API: serves one control connection, and answers each
//! [`Request`] with one function, through one dispatch. `Events` streams instead of answering.

use std::sync::Arc;
use std::time::Duration;

use koe_types::{UnixTime, Username};
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::broadcast::error::RecvError;
use tracing::info;

use super::api::{
    ApiError, Availability, CallView, ContactState, ContactView, Delivery, DeviceView, Event, MessageState, Reach,
    Request, Response, StatusView,
};
use super::calls::{self, ProgressSender};
use super::control::{self, Frame};
use super::history::History;
use super::{DaemonState, Payload, MAX_CHAT_CHARS};

/// Serves one control connection. A call's lines (ringing, answered, live statistics) go out
/// as events as they happen; if the `koe call` or `koe answer` that asked goes away (Ctrl-C),
/// the call is hung up.
pub async fn serve(state: Arc<DaemonState>, stream: UnixStream) {
    let mut reader = BufReader::new(stream);
    let request = control::read_request(&mut reader).await;
    let (mut from_asker, mut to_asker) = reader.into_inner().into_split();
    if matches!(request, Ok(Request::Events)) {
        return stream_events(&state, &mut from_asker, &mut to_asker).await;
    }
    let mut watch_asker = matches!(request, Ok(Request::Call { .. } | Request::Answer { .. }));
    let (progress, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let work = async {
        match request {
            Ok(request) => dispatch(&state, request, progress).await.unwrap_or_else(Response::Failed),
            Err(reason) => Response::Failed(ApiError::invalid(reason)),
        }
    };
    tokio::pin!(work);
    let mut byte = [0u8; 1];
    let response = loop {
        tokio::select! {
            response = &mut work => break response,
            Some(line) = lines.recv() => {
                let _ = control::send_frame(&mut to_asker, &Frame::Event(Event::CallLine { line })).await;
            }
            read = from_asker.read(&mut byte), if watch_asker => {
                if matches!(read, Ok(0) | Err(_)) {
                    watch_asker = false;
                    if state.calls.hang_up_all() > 0 {
                        info!("the command that placed or answered the call went away: hung up");
                    }
                }
            }
        }
    };
    while let Ok(line) = lines.try_recv() {
        let _ = control::send_frame(&mut to_asker, &Frame::Event(Event::CallLine { line })).await;
    }
    let _ = control::send_frame(&mut to_asker, &Frame::Response(response)).await;
}

/// `koe events`: every event from now on, until the asker goes away or the daemon stops.
async fn stream_events(state: &DaemonState, from_asker: &mut (impl tokio::io::AsyncRead + Unpin), to_asker: &mut (impl tokio::io::AsyncWrite + Unpin)) {
    let mut events = state.events.subscribe();
    let mut stopping = state.stopping.subscribe();
    if *stopping.borrow() {
        return;
    }
    // First where things stand, so the asker knows it is listening.
    let now = match state.client.status().await.map(|status| reach(&status)) {
        Ok(Reach::Online { parent }) => Some(Event::Online { parent }),
        Ok(Reach::Unreachable { reason }) => Some(Event::Unreachable { reason }),
        Ok(Reach::Attaching) | Err(_) => None,
    };
    if let Some(event) = now {
        if control::send_frame(to_asker, &Frame::Event(event)).await.is_err() {
            return;
        }
    }
    let mut byte = [0u8; 1];
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => {
                    if control::send_frame(to_asker, &Frame::Event(event)).await.is_err() {
                        return;
                    }
                }
                // A reader too slow for the backlog misses the oldest; it goes on with the rest.
                Err(RecvError::Lagged(missed)) => info!(missed, "a slow `koe events` missed events"),
                Err(RecvError::Closed) => return,
            },
            read = from_asker.read(&mut byte) => if matches!(read, Ok(0) | Err(_)) {
                return;
            },
            // It only ever turns true.
            _ = stopping.changed() => return,
        }
    }
}

/// The one dispatch: a function per request.
async fn dispatch(state: &Arc<DaemonState>, request: Request, progress: ProgressSender) -> Result<Response, ApiError> {
    match request {
        Request::Status => status(state).await,
        Request::Lookup { username } => lookup(state, &user(&username)?).await,
        Request::SetStatus { status } => set_status(state, status).await,
        Request::Chat { username, text } => chat(state, &user(&username)?, text).await,
        Request::Messages { username, limit } => messages(&*state.history()?, username.as_deref().map(user).transpose()?, limit),
        Request::ContactsAdd { username } => add_contact(state, user(&username)?).await,
        Request::ContactsAccept { username } => answer_request(state, &user(&username)?, true).await,
        Request::ContactsDecline { username } => answer_request(state, &user(&username)?, false).await,
        Request::ContactsRemove { username } => remove_contact(state, &user(&username)?).await,
        Request::ContactsList => contacts(state).await,
        Request::Calls { limit } => call_history(&*state.history()?, limit),
        Request::Call { username, play, record, duration_ms, hang_up_when_played } => {
            let limit = calls::TalkLimit::of(duration_ms.map(Duration::from_millis), hang_up_when_played);
            let (play, record) = (play.map(Into::into), record.map(Into::into));
            // A phone number (the CLI has made it E.164) goes through a gateway.
            if username.starts_with('+') {
                let number = koe_pstn::number::E164::parse_canonical(&username).map_err(|e| ApiError::invalid(e.to_string()))?;
                super::pstn::call_number(Arc::clone(state), number.to_string(), play, record, limit, Some(progress)).await?;
            } else {
                calls::place(Arc::clone(state), user(&username)?, None, play, record, limit, Some(progress)).await?;
            }
            Ok(Response::CallEnded)
        }
        Request::Dtmf { digits } => {
            koe_pstn::dtmf::parse_digits(&digits).map_err(|e| ApiError::invalid(e.to_string()))?;
            match state.calls.press(&digits) {
                0 => Err(ApiError::NoCallInProgress),
                _ => Ok(Response::DtmfSent { digits }),
            }
        }
        Request::Rate { number } => {
            let number = koe_pstn::number::E164::parse_canonical(&number).map_err(|e| ApiError::invalid(e.to_string()))?;
            match super::pstn::ask(state, koe_pstn::service::PstnRequest::Rate { number: number.to_string() }).await? {
                koe_pstn::service::PstnResponse::Rate(quote) => Ok(Response::Quote(quote)),
                _ => Err(ApiError::failed("the gateway answered something else than a price")),
            }
        }
        Request::Credit => match super::pstn::ask(state, koe_pstn::service::PstnRequest::Credit).await? {
            koe_pstn::service::PstnResponse::Credit(view) => Ok(Response::Credit(view)),
            _ => Err(ApiError::failed("the gateway answered something else than your credit")),
        },
        Request::Redeem { code } => match super::pstn::ask(state, koe_pstn::service::PstnRequest::Redeem { code }).await? {
            koe_pstn::service::PstnResponse::Redeemed { amount, balance, currency } => Ok(Response::Redeemed { amount, balance, currency }),
            _ => Err(ApiError::failed("the gateway answered something else than the voucher")),
        },
        Request::Answer { play, record } => answer(state, play, record, progress).await,
        Request::Decline => Ok(Response::Declined { from: state.calls.decide(calls::Decision::Decline).await?.to_string() }),
        Request::Hangup => match state.calls.hang_up_all() {
            0 => Err(ApiError::NoCall),
            _ => Ok(Response::HungUp),
        },
        Request::Mute { on } => match state.calls.mute(on) {
            0 => Err(ApiError::NoCallInProgress),
            _ => Ok(Response::Muted { on }),
        },
        Request::Block { username } => block(state, &user(&username)?, true).await,
        Request::Unblock { username } => block(state, &user(&username)?, false).await,
        Request::Blocked => Ok(Response::BlockList { blocked: state.history()?.blocked().map_err(ApiError::failed)? }),
        Request::Shutdown => {
            state.stop.notify_one();
            Ok(Response::Stopping)
        }
        // Served by `serve` as a stream.
        Request::Events => Err(ApiError::invalid("events are a stream of their own")),
    }
}

/// A username from the asker: one that cannot exist is "no such user".
pub fn user(name: &str) -> Result<Username, ApiError> {
    Username::parse_existing(name).map_err(|_| ApiError::NoSuchUser { username: name.to_string() })
}

async fn status(state: &DaemonState) -> Result<Response, ApiError> {
    let status = state.client.status().await.map_err(ApiError::failed)?;
    Ok(Response::Status(StatusView {
        me: state.me.to_string(),
        availability: Availability::of(status.status),
        reach: reach(&status),
        serving: state.serving.lock().ok().and_then(|s| s.clone()),
        known_supernodes: status.known_supernodes,
    }))
}

/// How the overlay client reaches the network.
fn reach(status: &koe_overlay::client::ClientStatus) -> Reach {
    match (&status.parent, &status.unreachable) {
        (Some(parent), _) => Reach::Online { parent: parent.clone() },
        (None, Some(reason)) => Reach::Unreachable { reason: reason.clone() },
        (None, None) => Reach::Attaching,
    }
}

async fn lookup(state: &DaemonState, username: &Username) -> Result<Response, ApiError> {
    let records = state.client.lookup(username.clone()).await.map_err(ApiError::failed)?;
    if records.is_empty() {
        // Offline, or no such account at all (which is an error).
        if let error @ ApiError::NoSuchUser { .. } = state.absence(username).await {
            return Err(error);
        }
    }
    let devices = records
        .iter()
        .map(|record| {
            let body = record.body();
            DeviceView {
                fingerprint: body.certificate.device_key().fingerprint(),
                status: body.status,
                supernode: koe_overlay::PeerId::from_bytes(&body.parent.peer_id).map_or("?".to_string(), |p| p.to_string()),
            }
        })
        .collect();
    Ok(Response::Devices { username: username.to_string(), devices })
}

async fn set_status(state: &DaemonState, status: Availability) -> Result<Response, ApiError> {
    state.client.set_status(status.presence()).await.map_err(ApiError::failed)?;
    Ok(Response::StatusSet { status })
}

async fn chat(state: &DaemonState, to: &Username, text: String) -> Result<Response, ApiError> {
    if text.trim().is_empty() {
        return Err(ApiError::invalid("empty message: nothing sent"));
    }
    if text.chars().count() > MAX_CHAT_CHARS {
        return Err(ApiError::invalid(format!("message longer than {MAX_CHAT_CHARS} characters: nothing sent")));
    }
    let mut uid = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut uid);
    let uid = super::hex(&uid);
    let id = state
        .history()?
        .add_message(to.as_str(), false, &text, UnixTime::now(), MessageState::Sending, Some(&uid))
        .map_err(ApiError::failed)?;
    let delivery = state.send(to, &Payload::Chat { text, id: Some(uid) }).await;
    let stored = match &delivery {
        Delivery::Delivered { .. } => MessageState::Delivered,
        Delivery::Kept { .. } => MessageState::Waiting,
        Delivery::Undelivered { .. } => MessageState::Undelivered,
    };
    state.history()?.set_message_state(id, stored).map_err(ApiError::failed)?;
    match delivery {
        Delivery::Delivered { devices } => Ok(Response::Delivered { to: to.to_string(), devices }),
        Delivery::Kept { replicas } => Ok(Response::Kept { to: to.to_string(), replicas }),
        Delivery::Undelivered { why } => Err(ApiError::NotDelivered { username: to.to_string(), why: Box::new(why) }),
    }
}

/// `koe messages`: from the daemon, or straight from the history database when it is not
/// running.
pub fn messages(history: &History, with: Option<Username>, limit: usize) -> Result<Response, ApiError> {
    let messages = history.messages(with.as_ref().map(Username::as_str), limit).map_err(ApiError::failed)?;
    Ok(Response::Messages { messages })
}

/// `koe calls`: from the daemon, or straight from the history database.
pub fn call_history(history: &History, limit: usize) -> Result<Response, ApiError> {
    let calls = history.calls(limit).map_err(ApiError::failed)?.iter().map(CallView::from).collect();
    Ok(Response::Calls { calls })
}

/// `koe contacts list` without the daemon: the relationships, presence unknown.
pub fn contact_list(history: &History) -> Result<Response, ApiError> {
    let contacts = history
        .contacts()
        .map_err(ApiError::failed)?
        .into_iter()
        .map(|(username, state)| ContactView { username, state, presence: None })
        .collect();
    Ok(Response::Contacts { contacts })
}

async fn add_contact(state: &DaemonState, them: Username) -> Result<Response, ApiError> {
    if them == state.me {
        return Err(ApiError::invalid("you cannot add yourself as a contact"));
    }
    let current = state.history()?.contact(them.as_str()).map_err(ApiError::failed)?;
    if current == Some(ContactState::Accepted) {
        return Ok(Response::ContactAlready { username: them.to_string() });
    }
    // If they asked first, adding them is accepting.
    let (payload, new_state) = if current == Some(ContactState::AwaitingMe) {
        (Payload::ContactAccept, ContactState::Accepted)
    } else {
        (Payload::ContactRequest, ContactState::Requested)
    };
    state.history()?.set_contact(them.as_str(), new_state).map_err(ApiError::failed)?;
    let delivery = state.send(&them, &payload).await;
    if let Delivery::Undelivered { why: why @ ApiError::NoSuchUser { .. } } = delivery {
        // Nobody to ask: the request adds nothing.
        state.history()?.remove_contact(them.as_str()).map_err(ApiError::failed)?;
        return Err(why);
    }
    Ok(Response::ContactAdded { username: them.to_string(), accepted: new_state == ContactState::Accepted, delivery })
}

async fn answer_request(state: &DaemonState, them: &Username, accept: bool) -> Result<Response, ApiError> {
    if state.history()?.contact(them.as_str()).map_err(ApiError::failed)? != Some(ContactState::AwaitingMe) {
        return Err(ApiError::invalid(format!("{them} has not asked to be your contact")));
    }
    let (new_state, payload) = if accept {
        (ContactState::Accepted, Payload::ContactAccept)
    } else {
        (ContactState::Declined, Payload::ContactDecline)
    };
    state.history()?.set_contact(them.as_str(), new_state).map_err(ApiError::failed)?;
    let delivery = state.send(them, &payload).await;
    Ok(Response::ContactAnswered { username: them.to_string(), accepted: accept, delivery })
}

async fn remove_contact(state: &DaemonState, them: &Username) -> Result<Response, ApiError> {
    if !state.history()?.remove_contact(them.as_str()).map_err(ApiError::failed)? {
        return Err(ApiError::invalid(format!("{them} is not in your contacts")));
    }
    let _ = state.send(them, &Payload::ContactRemoved).await;
    Ok(Response::ContactRemoved { username: them.to_string() })
}

async fn contacts(state: &DaemonState) -> Result<Response, ApiError> {
    let list = state.history()?.contacts().map_err(ApiError::failed)?;
    if list.iter().any(|(_, s)| *s == ContactState::Accepted) {
        state.watch_contacts().await;
    }
    let presence = state.contact_presence.lock().map(|p| p.clone()).unwrap_or_default();
    let contacts = list
        .into_iter()
        .map(|(username, contact_state)| {
            let seen = (contact_state == ContactState::Accepted).then(|| presence.get(&username).copied()).flatten();
            ContactView { username, state: contact_state, presence: seen }
        })
        .collect();
    Ok(Response::Contacts { contacts })
}

async fn answer(state: &DaemonState, play: Option<String>, record: Option<String>, progress: ProgressSender) -> Result<Response, ApiError> {
    if let Some(path) = &record {
        calls::check_recording_path(std::path::Path::new(path))?;
    }
    let (reply, ended) = tokio::sync::oneshot::channel();
    let decision = calls::Decision::Answer { play: play.map(Into::into), record: record.map(Into::into), progress: Some(progress), reply };
    state.calls.decide(decision).await?;
    match ended.await {
        Ok(Ok(_)) => Ok(Response::CallEnded),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(ApiError::failed("the call ended before it could be answered")),
    }
}

/// `koe block` / `koe unblock`: kept in the history database and sent to the mailbox replicas,
/// which then refuse (and drop) what the user leaves.
async fn block(state: &DaemonState, them: &Username, blocked: bool) -> Result<Response, ApiError> {
    if blocked && them == &state.me {
        return Err(ApiError::invalid("you cannot block yourself"));
    }
    let list = {
        let history = state.history()?;
        history.block(them.as_str(), blocked).map_err(ApiError::failed)?;
        history.blocked().map_err(ApiError::failed)?
    };
    let list = list.iter().filter_map(|name| Username::parse_existing(name).ok()).collect();
    state.client.set_blocked(list).await.map_err(ApiError::failed)?;
    Ok(Response::Blocked { username: them.to_string(), blocked })
}
