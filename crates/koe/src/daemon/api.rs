//! The daemon's one typed API: what a client of the running `koe up` asks ([`Request`]), what
//! it answers ([`Response`], or a typed [`ApiError`]) and what it reports as it happens
//! ([`Event`]). Every CLI command goes through it, and `koe events` is its event stream; the
//! app will use the same types. The daemon fills these with facts, never with sentences: the
//! CLI renders them (`commands::client::render`).
//!
//! Carried by [`super::control`] as JSON lines over the profile's control socket.

use serde::{Deserialize, Serialize};

use koe_overlay::PresenceStatus;

/// The presence a user can choose (`koe set-status`, `koe up --status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Availability {
    /// Online: calls ring, messages arrive
    Online,
    /// Online, but away from the device
    Away,
    /// Do not disturb
    #[value(alias = "do-not-disturb")]
    Dnd,
    /// Shown offline to everyone
    Invisible,
}

impl Availability {
    /// What the global index shows; `None` is invisible (no presence at all).
    pub fn presence(self) -> Option<PresenceStatus> {
        match self {
            Self::Online => Some(PresenceStatus::Online),
            Self::Away => Some(PresenceStatus::Away),
            Self::Dnd => Some(PresenceStatus::DoNotDisturb),
            Self::Invisible => None,
        }
    }

    pub fn of(presence: Option<PresenceStatus>) -> Self {
        match presence {
            Some(PresenceStatus::Online) => Self::Online,
            Some(PresenceStatus::Away) => Self::Away,
            Some(PresenceStatus::DoNotDisturb) => Self::Dnd,
            Some(PresenceStatus::Offline) | None => Self::Invisible,
        }
    }
}

impl std::fmt::Display for Availability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Online => "online",
            Self::Away => "away",
            Self::Dnd => "dnd",
            Self::Invisible => "invisible",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    Lookup { username: String },
    SetStatus { status: Availability },
    Chat { username: String, text: String },
    Messages { username: Option<String>, limit: usize },
    ContactsAdd { username: String },
    ContactsRemove { username: String },
    ContactsAccept { username: String },
    ContactsDecline { username: String },
    ContactsList,
    /// Answered when the call ends; its lines come as [`Event::CallLine`] meanwhile. Without
    /// `duration_ms` the call lasts until someone hangs up, or (`hang_up_when_played`) until
    /// the `play` file has been played.
    Call {
        username: String,
        play: Option<String>,
        record: Option<String>,
        duration_ms: Option<u64>,
        #[serde(default)]
        hang_up_when_played: bool,
    },
    Hangup,
    /// Answers the newest ringing call; answered when that call ends.
    Answer { play: Option<String>, record: Option<String> },
    Decline,
    /// Silences (or, with `on: false`, unsilences) the microphone of the call in progress.
    Mute { on: bool },
    /// Key presses in the call in progress (for a phone menu through a gateway).
    Dtmf { digits: String },
    /// The price of calling `number` (E.164) from a gateway of the network.
    Rate { number: String },
    /// The user's credit at the network's gateways, with recent charges.
    Credit,
    /// Redeems a prepaid voucher at a gateway.
    Redeem { code: String },
    /// The call history, newest last.
    Calls { limit: usize },
    /// Nothing from this user reaches you; they cannot leave offline messages.
    Block { username: String },
    Unblock { username: String },
    /// Who is blocked.
    Blocked,
    /// Stops the daemon (`koe down`, `koe logout`): it withdraws its presence and exits.
    Shutdown,
    /// Streams every [`Event`] from now on, until the asker hangs up; never answered.
    Events,
}

/// How the daemon reaches the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Reach {
    /// Attached to this parent supernode.
    Online { parent: String },
    /// Not attached yet.
    Attaching,
    /// No supernode took this client; it keeps trying.
    Unreachable { reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    pub me: String,
    pub availability: Availability,
    pub reach: Reach,
    /// This device's own supernode address, when it serves as one.
    pub serving: Option<String>,
    pub known_supernodes: Vec<String>,
}

/// One online device of a user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceView {
    pub fingerprint: String,
    pub status: PresenceStatus,
    /// The parent supernode's peer id.
    pub supernode: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageState {
    Sending,
    Delivered,
    /// Kept in the recipient's mailbox until a device of theirs comes online.
    Waiting,
    Undelivered,
    Received,
}

impl MessageState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sending => "sending",
            Self::Delivered => "delivered",
            Self::Waiting => "waiting",
            Self::Undelivered => "undelivered",
            Self::Received => "received",
        }
    }

    pub fn parse(text: &str) -> Self {
        match text {
            "sending" => Self::Sending,
            "delivered" => Self::Delivered,
            "waiting" => Self::Waiting,
            "received" => Self::Received,
            _ => Self::Undelivered,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageView {
    /// Unix seconds.
    pub at: u64,
    /// The other user.
    pub peer: String,
    pub incoming: bool,
    pub text: String,
    pub state: MessageState,
}

/// Where a contact relationship stands, as in Skype: asked, awaiting my answer, or mutual.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContactState {
    /// I asked; no answer yet.
    Requested,
    /// They asked; I have not answered.
    AwaitingMe,
    Accepted,
    Declined,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContactView {
    pub username: String,
    pub state: ContactState,
    /// Last seen presence of an accepted contact: `Some(None)` offline, `None` not known
    /// (not looked up yet, or the history was read without the daemon).
    pub presence: Option<Option<PresenceStatus>>,
}

/// One call of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallView {
    pub peer: String,
    pub incoming: bool,
    /// Unix seconds.
    pub started_at: u64,
    /// How long it was answered for; `None` when it never was.
    pub talked_ms: Option<u64>,
    /// Why it ended, as the call reported it ("you hung up", "missed", "declined", …).
    pub ended: String,
    /// The media path (`direct (host … ↔ host …)`), once media flowed.
    pub path: Option<String>,
    pub mos: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Status(StatusView),
    /// A lookup: the user's online devices (none: offline).
    Devices { username: String, devices: Vec<DeviceView> },
    StatusSet { status: Availability },
    /// A chat message delivered to this many devices.
    Delivered { to: String, devices: usize },
    /// A chat message for a user with no device online, kept (sealed) by this many
    /// supernodes until one comes online.
    Kept { to: String, replicas: u32 },
    /// A contact request sent, or (they had asked) their request accepted, and whether it
    /// reached them now.
    ContactAdded { username: String, accepted: bool, delivery: Delivery },
    ContactAlready { username: String },
    ContactAnswered { username: String, accepted: bool, delivery: Delivery },
    ContactRemoved { username: String },
    Messages { messages: Vec<MessageView> },
    Contacts { contacts: Vec<ContactView> },
    Calls { calls: Vec<CallView> },
    /// A call placed or answered has ended (its lines came as events).
    CallEnded,
    Declined { from: String },
    Blocked { username: String, blocked: bool },
    BlockList { blocked: Vec<String> },
    HungUp,
    Muted { on: bool },
    DtmfSent { digits: String },
    /// A gateway's price for a number.
    Quote(koe_pstn::service::Quote),
    /// A gateway's view of the user's credit.
    Credit(koe_pstn::service::CreditView),
    /// A voucher redeemed: its amount and the new balance.
    Redeemed { amount: koe_pstn::money::Amount, balance: koe_pstn::money::Amount, currency: koe_pstn::money::Currency },
    Stopping,
    Failed(ApiError),
}

/// Whether something sent reached the other side now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Delivery {
    Delivered { devices: usize },
    /// Nobody online: kept by this many supernodes for when a device comes online.
    Kept { replicas: u32 },
    Undelivered { why: ApiError },
}

/// Why a request failed, typed: the CLI turns each into a sentence and an exit code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum ApiError {
    #[error("no such user: {username}")]
    NoSuchUser { username: String },
    #[error("{username} is offline")]
    Offline { username: String },
    /// Offline as far as the overlay knows, and the login server could not say whether the
    /// account exists.
    #[error("{username} is offline (the login server could not say whether the account exists: {detail})")]
    OfflineOrUnknown { username: String, detail: String },
    #[error("not delivered to {username}: {why}")]
    NotDelivered { username: String, why: Box<ApiError> },
    #[error("{reason}")]
    Undeliverable { reason: String },
    /// Offline, and their mailbox would not keep it.
    #[error("{username} is offline and the message cannot wait for them: {refusal}")]
    NotKept { username: String, refusal: koe_overlay::mailbox_store::Refusal },
    #[error("{reason}")]
    Invalid { reason: String },
    #[error("no call to hang up")]
    NoCall,
    #[error("no call in progress")]
    NoCallInProgress,
    #[error("no call is ringing")]
    NoRingingCall,
    #[error("you are in a call already: koe hangup first")]
    Busy,
    #[error("not logged in: koe login USER")]
    NotLoggedIn,
    #[error("no PSTN gateway of this network is online: phone numbers cannot be called just now")]
    NoGateway,
    /// A gateway refused, in its words.
    #[error("{reason}")]
    GatewayRefused { reason: String },
    #[error("{reason}")]
    Failed { reason: String },
}

impl From<String> for ApiError {
    fn from(reason: String) -> Self {
        Self::Failed { reason }
    }
}

impl ApiError {
    pub fn invalid(reason: impl Into<String>) -> Self {
        Self::Invalid { reason: reason.into() }
    }

    pub fn failed(reason: impl std::fmt::Display) -> Self {
        Self::Failed { reason: reason.to_string() }
    }
}

/// What happens, as it happens: to `koe events` (and the app), and a call's own lines to the
/// `koe call` or `koe answer` that watches it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A line of the call this connection placed or answered (ringing, answered, statistics).
    CallLine { line: String },
    Online { parent: String },
    Unreachable { reason: String },
    /// A contact's presence changed (`None`: offline).
    Presence { username: String, status: Option<PresenceStatus> },
    Message { from: String, text: String, at: u64 },
    ContactRequest { from: String },
    ContactAccepted { from: String },
    ContactDeclined { from: String },
    IncomingCall { from: String },
    /// A call rang here and nobody answered it.
    MissedCall { from: String, at: u64 },
}
