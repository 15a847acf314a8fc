//! The SIP side of the gateway: the trunks a gateway dials out through, one SIP endpoint, and
//! outbound call legs, on rsipstack. Nothing else of the gateway names rsipstack (only the
//! test and demo phone, [`crate::phone`], answering on its own): a leg is a [`SipLeg`], a
//! channel of [`LegEvent`]s and a way to cancel or hang it up.
//!
//! A leg's task answers what the carrier asks in the dialog (re-INVITEs, session refreshes,
//! OPTIONS, INFO) so the call is never dropped for want of a reply, and tells a response the
//! carrier sent apart from one the stack made up locally (no answer, no connection), which
//! matters for failover.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rsipstack::dialog::authenticate::Credential;
use rsipstack::dialog::dialog::{DialogState, TerminatedReason};
use rsipstack::dialog::dialog_layer::DialogLayer;
use rsipstack::dialog::invitation::InviteOption;
use rsipstack::platform::CancellationToken;
use rsipstack::sip::prelude::{HeadersExt, ToTypedHeader};
use rsipstack::sip::{Header, HostWithPort, Method, StatusCode, StatusCodeKind, Transport, Uri};
use rsipstack::transaction::endpoint::EndpointOption;
use rsipstack::transport::udp::UdpConnection;
use rsipstack::transport::{SipAddr, TransportLayer};
use rsipstack::EndpointBuilder;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// What the gateway calls itself in SIP.
pub const USER_AGENT: &str = concat!("Koe/", env!("CARGO_PKG_VERSION"));
/// Call-IDs end in this instead of the stack author's domain.
const CALL_ID_SUFFIX: &str = "koe.invalid";

/// How a trunk is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrunkTransport {
    Udp,
    Tcp,
    Tls,
}

/// One carrier's SIP trunk, as `--trunk sip:USER:PASSWORD@HOST[:PORT][;transport=udp|tcp|tls]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Trunk {
    pub host: String,
    pub port: u16,
    pub transport: TrunkTransport,
    pub username: Option<String>,
    password: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TrunkError {
    #[error("trunk {0:?} is not a SIP URI like sip:USER:PASSWORD@HOST:PORT;transport=tls")]
    BadUri(String),
    #[error("trunk transport {0:?} is not udp, tcp or tls")]
    BadTransport(String),
    #[error("cannot open the SIP socket on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error("cannot place the SIP call: {0}")]
    Invite(String),
}

impl Trunk {
    /// A name for records and logs: where it is, never who logs in or with what.
    pub fn name(&self) -> String {
        let transport = match self.transport {
            TrunkTransport::Udp => "udp",
            TrunkTransport::Tcp => "tcp",
            TrunkTransport::Tls => "tls",
        };
        format!("{}:{};{transport}", self.host, self.port)
    }

    fn sip_addr(&self) -> Result<SipAddr, TrunkError> {
        let transport = match self.transport {
            TrunkTransport::Udp => Transport::Udp,
            TrunkTransport::Tcp => Transport::Tcp,
            TrunkTransport::Tls => Transport::Tls,
        };
        let host = HostWithPort::try_from(format!("{}:{}", self.host, self.port).as_str()).map_err(|_| TrunkError::BadUri(self.name()))?;
        Ok(SipAddr::new(transport, host))
    }

    fn credential(&self) -> Option<Credential> {
        self.username.as_ref().map(|username| Credential {
            username: username.clone(),
            password: self.password.clone().unwrap_or_default(),
            realm: None,
            auth_username: None,
        })
    }
}

impl fmt::Debug for Trunk {
    /// Credentials never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Trunk({})", self.name())
    }
}

impl fmt::Display for Trunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for Trunk {
    type Err = TrunkError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || TrunkError::BadUri(redact_password(text));
        let (scheme_tls, rest) = if let Some(rest) = text.strip_prefix("sips:") {
            (true, rest)
        } else {
            (false, text.strip_prefix("sip:").ok_or_else(bad)?)
        };
        let (address, params) = rest.split_once(';').unwrap_or((rest, ""));
        let (userinfo, hostport) = match address.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, address),
        };
        let (username, password) = match userinfo {
            Some(userinfo) => match userinfo.split_once(':') {
                Some((user, password)) => (Some(user.to_string()), Some(password.to_string())),
                None => (Some(userinfo.to_string()), None),
            },
            None => (None, None),
        };
        if username.as_deref() == Some("") {
            return Err(bad());
        }
        let mut transport = if scheme_tls { TrunkTransport::Tls } else { TrunkTransport::Udp };
        for param in params.split(';').filter(|p| !p.is_empty()) {
            if let Some(value) = param.strip_prefix("transport=") {
                transport = match value.to_ascii_lowercase().as_str() {
                    "udp" => TrunkTransport::Udp,
                    "tcp" => TrunkTransport::Tcp,
                    "tls" => TrunkTransport::Tls,
                    other => return Err(TrunkError::BadTransport(other.to_string())),
                };
            }
        }
        let default_port = if transport == TrunkTransport::Tls { 5061 } else { 5060 };
        let (host, port) = split_host_port(hostport, default_port).ok_or_else(bad)?;
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
            return Err(bad());
        }
        Ok(Self { host, port, transport, username, password })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(text: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match text.rsplit_once(':') {
        Some((host, port)) => Some((host.to_string(), port.parse().ok()?)),
        None => Some((text.to_string(), default_port)),
    }
}

/// The URI with any password replaced, for error messages.
fn redact_password(text: &str) -> String {
    let Some(at) = text.rfind('@') else { return text.to_string() };
    let (before, after) = text.split_at(at);
    let scheme_end = before.find(':').map_or(0, |i| i + 1);
    match before[scheme_end..].find(':') {
        Some(i) => format!("{}:…{after}", &before[..scheme_end + i]),
        None => text.to_string(),
    }
}

/// Turns the carrier's re-INVITE offer (empty: it asks for ours) into our answer; `None`
/// refuses it (488).
pub type ReofferAnswerer = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What a call leg reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegEvent {
    /// 180/183; `sdp` when it carries early media.
    Provisional { code: u16, sdp: Option<String> },
    /// 200 OK, with the carrier's SDP answer.
    Answered { sdp: Option<String> },
    /// A final failure the carrier sent.
    Rejected { code: u16 },
    /// No final response from the carrier at all: timer B, or the trunk was unreachable (a
    /// response the stack made up locally).
    NoResponse,
    /// The carrier sent a new SDP in the dialog (re-INVITE): media goes there now.
    RemoteMedia { sdp: String },
    /// The carrier hung up.
    RemoteBye,
    /// The dialog died otherwise (our 2xx to a re-INVITE never got its ACK, the connection
    /// broke).
    Failed,
    /// The leg is over (after any of the above that end it, or our own CANCEL/BYE).
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LegCommand {
    Cancel,
    Bye,
}

/// One outbound call leg: its events, and the way to end it. Dropping it hangs up.
#[derive(Debug)]
pub struct SipLeg {
    pub events: mpsc::UnboundedReceiver<LegEvent>,
    commands: mpsc::UnboundedSender<LegCommand>,
}

impl SipLeg {
    /// Cancels the INVITE while it rings.
    pub fn cancel(&self) {
        let _ = self.commands.send(LegCommand::Cancel);
    }

    /// Hangs up the answered call.
    pub fn bye(&self) {
        let _ = self.commands.send(LegCommand::Bye);
    }
}

/// What the gateway asks of a SIP stack. Calls see only this trait (and [`SipLeg`]), so the
/// stack under it (rsipstack, in [`SipEndpoint`]) can change without touching them.
pub trait SipStack: Send + Sync + fmt::Debug {
    /// Calls `number` (E.164 with '+') through `trunk`, presenting `caller_id`, offering
    /// `offer` (SDP); `answer_reoffer` turns a re-INVITE's offer into our answer.
    fn invite(&self, trunk: &Trunk, number: &str, caller_id: &str, offer: String, answer_reoffer: ReofferAnswerer) -> Result<SipLeg, TrunkError>;

    /// Where carriers reach it.
    fn local_addr(&self) -> SocketAddr;

    /// The IP its RTP ports bind to.
    fn local_ip(&self) -> IpAddr {
        self.local_addr().ip()
    }

    /// Stops serving.
    fn shutdown(&self);
}

/// Where the gateway's SIP endpoint listens, and how it presents itself.
#[derive(Debug, Clone)]
pub struct SipConfig {
    /// UDP address to listen on (and the source of TCP/TLS connections). Bind a concrete IP:
    /// it goes into Via and Contact.
    pub listen: SocketAddr,
    /// The address carriers should see, behind a NAT.
    pub external: Option<SocketAddr>,
    /// PEM roots to trust for TLS trunks (the system bundle, or a test CA).
    pub tls_roots: Option<Vec<u8>>,
    /// How long a request waits for its final response (timer B) and a 2xx we sent for its
    /// ACK before the call is given up: 32 s by RFC 3261 ([`DEFAULT_TRANSACTION_TIMEOUT`]).
    pub transaction_timeout: Duration,
}

/// RFC 3261's 64 × T1.
pub const DEFAULT_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(32);

/// The gateway's SIP endpoint: one UDP listener, TCP and TLS connections made on demand, and
/// the loop that routes in-dialog requests to their calls.
#[derive(Clone)]
pub struct SipEndpoint {
    dialog_layer: Arc<DialogLayer>,
    contact: Uri,
    local: SocketAddr,
    cancel: CancellationToken,
}

impl fmt::Debug for SipEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SipEndpoint").field("local", &self.local).finish_non_exhaustive()
    }
}

impl SipEndpoint {
    /// Opens the endpoint and starts serving it until [`SipStack::shutdown`].
    pub async fn start(config: SipConfig) -> Result<Self, TrunkError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cancel = CancellationToken::new();
        let transport_layer = TransportLayer::new(cancel.child_token());
        let udp = UdpConnection::create_connection(config.listen, config.external, Some(cancel.child_token()))
            .await
            .map_err(|error| TrunkError::Bind { addr: config.listen, reason: error.to_string() })?;
        let local = config.external.unwrap_or_else(|| udp.get_addr().addr.clone().try_into().unwrap_or(config.listen));
        transport_layer.add_transport(udp.into());
        if let Some(roots) = config.tls_roots {
            transport_layer.set_tls_config(rsipstack::transport::tls::TlsConfig { ca_certs: Some(roots), ..Default::default() });
        }
        let option = EndpointOption { callid_suffix: Some(CALL_ID_SUFFIX.into()), t1x64: config.transaction_timeout, ..Default::default() };
        let endpoint = EndpointBuilder::new()
            .with_user_agent(USER_AGENT)
            .with_cancel_token(cancel.clone())
            .with_option(option)
            .with_transport_layer(transport_layer)
            .build();
        let incoming = endpoint.incoming_transactions().map_err(|error| TrunkError::Bind { addr: config.listen, reason: error.to_string() })?;
        let dialog_layer = Arc::new(DialogLayer::new(endpoint.inner.clone()));
        let inner = endpoint.inner.clone();
        tokio::spawn(async move {
            if let Err(error) = inner.serve().await {
                warn!(%error, "the SIP endpoint stopped");
            }
        });
        tokio::spawn(route_incoming(incoming, Arc::clone(&dialog_layer)));
        let contact = Uri::try_from(format!("sip:koe@{local}").as_str()).map_err(|error| TrunkError::Bind { addr: config.listen, reason: error.to_string() })?;
        Ok(Self { dialog_layer, contact, local, cancel })
    }
}

impl SipStack for SipEndpoint {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn invite(
        &self,
        trunk: &Trunk,
        number: &str,
        caller_id: &str,
        offer: String,
        answer_reoffer: ReofferAnswerer,
    ) -> Result<SipLeg, TrunkError> {
        let uri = |user: &str| Uri::try_from(format!("sip:{user}@{}:{}", trunk.host, trunk.port).as_str()).map_err(|e| TrunkError::Invite(e.to_string()));
        let option = InviteOption {
            caller: uri(caller_id)?,
            callee: uri(number)?,
            destination: Some(trunk.sip_addr()?),
            content_type: Some("application/sdp".into()),
            offer: Some(offer.into_bytes()),
            contact: self.contact.clone(),
            credential: trunk.credential(),
            ..Default::default()
        };
        let (events_tx, events) = mpsc::unbounded_channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        tokio::spawn(run_leg(Arc::clone(&self.dialog_layer), option, events_tx, commands_rx, answer_reoffer));
        Ok(SipLeg { events, commands })
    }

    fn shutdown(&self) {
        self.cancel.cancel();
    }
}

/// Routes requests inside a dialog to it; answers the rest (this gateway takes no inbound
/// calls yet).
async fn route_incoming(mut incoming: rsipstack::transaction::TransactionReceiver, dialog_layer: Arc<DialogLayer>) {
    while let Some(mut transaction) = incoming.recv().await {
        let has_to_tag = transaction.original.to_header().ok().and_then(|to| to.typed().ok()).is_some_and(|to| to.tag().is_some());
        if has_to_tag {
            match dialog_layer.match_dialog(&transaction) {
                Some(mut dialog) => {
                    tokio::spawn(async move {
                        if let Err(error) = dialog.handle(&mut transaction).await {
                            debug!(%error, "an in-dialog request failed");
                        }
                    });
                }
                None => {
                    let _ = transaction.reply(StatusCode::CallTransactionDoesNotExist).await;
                }
            }
            continue;
        }
        let status = match transaction.original.method {
            Method::Options => StatusCode::OK,
            Method::Invite => StatusCode::NotFound,
            Method::Ack => continue,
            _ => StatusCode::MethodNotAllowed,
        };
        let _ = transaction.reply(status).await;
    }
}

/// Runs one outbound leg to its end.
async fn run_leg(
    dialog_layer: Arc<DialogLayer>,
    option: InviteOption,
    events: mpsc::UnboundedSender<LegEvent>,
    mut commands: mpsc::UnboundedReceiver<LegCommand>,
    answer_reoffer: ReofferAnswerer,
) {
    let (state_tx, mut states) = dialog_layer.new_dialog_state_channel();
    let (dialog, join) = match dialog_layer.do_invite_async(option, state_tx) {
        Ok(started) => started,
        Err(error) => {
            warn!(%error, "the INVITE could not be sent");
            let _ = events.send(LegEvent::NoResponse);
            let _ = events.send(LegEvent::Ended);
            return;
        }
    };
    let mut join = Some(join);
    let mut answered = false;
    let mut hung_up_here = false;
    let mut commands_open = true;
    loop {
        tokio::select! {
            result = async {
                match join.as_mut() {
                    Some(pending) => pending.await,
                    None => std::future::pending().await,
                }
            }, if join.is_some() => {
                join = None;
                answered = report_final(&events, result);
            }
            Some(state) = states.recv() => match state {
                DialogState::Early(_, response) => {
                    let sdp = (!response.body.is_empty()).then(|| String::from_utf8_lossy(&response.body).into_owned());
                    let _ = events.send(LegEvent::Provisional { code: response.status_code.code(), sdp });
                }
                DialogState::Updated(_, request, handle) if request.method == Method::Invite => {
                    let offer = String::from_utf8_lossy(&request.body).into_owned();
                    match answer_reoffer(&offer) {
                        Some(answer) => {
                            let headers = vec![Header::ContentType("application/sdp".into())];
                            let _ = handle.respond(StatusCode::OK, Some(headers), Some(answer.into_bytes())).await;
                            if !offer.trim().is_empty() {
                                let _ = events.send(LegEvent::RemoteMedia { sdp: offer });
                            }
                        }
                        None => {
                            let _ = handle.reply(StatusCode::NotAcceptableHere).await;
                        }
                    }
                }
                DialogState::Updated(_, _, handle)
                | DialogState::Info(_, _, handle)
                | DialogState::Options(_, _, handle)
                | DialogState::Notify(_, _, handle)
                | DialogState::Message(_, _, handle) => {
                    let _ = handle.reply(StatusCode::OK).await;
                }
                DialogState::Refer(_, _, handle) | DialogState::Publish(_, _, handle) => {
                    let _ = handle.reply(StatusCode::Decline).await;
                }
                DialogState::Terminated(id, reason) => {
                    dialog_layer.remove_dialog(&id);
                    if let Some(pending) = join.take() {
                        answered = report_final(&events, pending.await);
                    }
                    if answered && !hung_up_here {
                        let event = match reason {
                            TerminatedReason::UasBye | TerminatedReason::UacBye => LegEvent::RemoteBye,
                            _ => LegEvent::Failed,
                        };
                        let _ = events.send(event);
                    }
                    let _ = events.send(LegEvent::Ended);
                    return;
                }
                _ => {}
            },
            command = commands.recv(), if commands_open => {
                let command = command.unwrap_or_else(|| {
                    commands_open = false;
                    LegCommand::Bye
                });
                hung_up_here = true;
                let result = match command {
                    LegCommand::Cancel if !answered => dialog.cancel().await,
                    _ => dialog.hangup().await,
                };
                if let Err(error) = result {
                    debug!(%error, "hanging up the SIP leg");
                }
            }
        }
    }
}

/// Reports the INVITE's final outcome; whether it was answered.
fn report_final(
    events: &mpsc::UnboundedSender<LegEvent>,
    result: Result<rsipstack::Result<(rsipstack::dialog::DialogId, Option<rsipstack::sip::Response>)>, tokio::task::JoinError>,
) -> bool {
    let response = match result {
        Ok(Ok((_, Some(response)))) => response,
        _ => {
            let _ = events.send(LegEvent::NoResponse);
            return false;
        }
    };
    if response.status_code.kind() == StatusCodeKind::Successful {
        let sdp = (!response.body.is_empty()).then(|| String::from_utf8_lossy(&response.body).into_owned());
        let _ = events.send(LegEvent::Answered { sdp });
        return true;
    }
    let code = response.status_code.code();
    // The stack makes up a 408 (timer B, unreachable) or 503 (a broken connection) without a
    // To tag; a carrier's response always has one.
    let from_carrier = response.to_header().ok().and_then(|to| to.typed().ok()).is_some_and(|to| to.tag().is_some());
    let event = if from_carrier || !matches!(code, 408 | 503) { LegEvent::Rejected { code } } else { LegEvent::NoResponse };
    let _ = events.send(event);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trunk_uris_read_with_their_defaults() {
        let trunk: Trunk = "sip:koe:s3cret@sip.carrier.example".parse().unwrap();
        assert_eq!((trunk.host.as_str(), trunk.port, trunk.transport), ("sip.carrier.example", 5060, TrunkTransport::Udp));
        assert_eq!(trunk.username.as_deref(), Some("koe"));
        let tls: Trunk = "sip:koe:pw@10.0.0.5:5071;transport=tls".parse().unwrap();
        assert_eq!((tls.port, tls.transport), (5071, TrunkTransport::Tls));
        let sips: Trunk = "sips:carrier.example".parse().unwrap();
        assert_eq!((sips.port, sips.transport, sips.username), (5061, TrunkTransport::Tls, None));
        let v6: Trunk = "sip:[2001:db8::1]:5080;transport=TCP".parse().unwrap();
        assert_eq!((v6.host.as_str(), v6.port, v6.transport), ("2001:db8::1", 5080, TrunkTransport::Tcp));
    }

    #[test]
    fn bad_trunk_uris_are_refused_without_showing_the_password() {
        for bad in ["http://carrier", "sip:", "sip:user:pw@", "sip:@host", "sip:host:port", "sip:a b"] {
            assert!(matches!(bad.parse::<Trunk>(), Err(TrunkError::BadUri(_))), "{bad}");
        }
        assert_eq!("sip:host;transport=sctp".parse::<Trunk>(), Err(TrunkError::BadTransport("sctp".into())));
        let error = "sip:user:hunter2@:x".parse::<Trunk>().unwrap_err().to_string();
        assert!(!error.contains("hunter2"), "{error}");
        let trunk: Trunk = "sip:user:hunter2@host".parse().unwrap();
        assert!(!format!("{trunk:?} {trunk} {}", trunk.name()).contains("hunter2"));
    }
}
