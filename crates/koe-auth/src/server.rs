//! The login server: HTTPS (rustls, HTTP/1.1) serving the JSON API in [`crate::api`].
//!
//! It signs a username up, checks a password and signs a certificate binding the username to
//! a device key, with the account's role (sign-up only ever makes users), renews certificates
//! for devices that prove they hold the key, changes passwords and deletes accounts. Password guessing is slowed per source address and locked
//! per account; request bodies are capped; passwords and addresses never reach the logs.
//! [`LoginServer::run`] serves until its shutdown future completes, then stops accepting and
//! lets requests in flight finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use koe_types::certificate::CLOCK_SKEW_ALLOWANCE;
use koe_types::{
    Certificate, CertificateBody, CertificateError, DevicePublicKey, NetworkName,
    NetworkSigningKey, Pii, Role, UnixTime, Username,
};
use koe_wire::Codec;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::api::{
    renewal_message, CertificateResponse, ChangePasswordRequest, DeleteAccountRequest,
    ErrorBody, ErrorCode, ExistsRequest, ExistsResponse, LoginRequest, OkResponse,
    RenewRequest, SignupRequest, SignupResponse, CHANGE_PASSWORD_PATH, DELETE_ACCOUNT_PATH,
    EXISTS_PATH, LOGIN_PATH, RENEW_PATH, SIGNUP_PATH,
};
use crate::password::{check_new_password, hash_password, verify_password, PasswordError};
use crate::rate_limit::{RateLimit, RateLimiter};
use crate::store::{new_serial, Account, AccountStore, IssuedCertificate, StoreError};

pub const DEFAULT_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(24 * 3600);
pub const MIN_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024;
const MAX_TRACKED_RATE_KEYS: usize = 100_000;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Limits against password guessing and sign-up floods.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    /// Every API request from one address (IPv4, or IPv6 /64).
    pub per_address: RateLimit,
    /// Sign-ups from one address.
    pub signups_per_address: RateLimit,
    /// Password attempts on one account; a right password gives its attempt back.
    pub password_attempts_per_account: RateLimit,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            per_address: RateLimit::per_minute(30, 30),
            signups_per_address: RateLimit::per_minute(10, 1),
            password_attempts_per_account: RateLimit::per_minute(10, 2),
        }
    }
}

impl RateLimits {
    pub const UNLIMITED: RateLimits = RateLimits {
        per_address: RateLimit::UNLIMITED,
        signups_per_address: RateLimit::UNLIMITED,
        password_attempts_per_account: RateLimit::UNLIMITED,
    };
}

#[derive(Debug, Clone)]
pub struct LoginServerConfig {
    pub network: NetworkName,
    pub signing_key: NetworkSigningKey,
    pub tls: Arc<rustls::ServerConfig>,
    /// Longest certificate lifetime handed out (clients may ask for less).
    pub certificate_lifetime: Duration,
    pub rate_limits: RateLimits,
    pub max_body_bytes: usize,
    pub max_connections: usize,
}

impl LoginServerConfig {
    pub fn new(
        network: NetworkName,
        signing_key: NetworkSigningKey,
        tls: Arc<rustls::ServerConfig>,
    ) -> Self {
        Self {
            network,
            signing_key,
            tls,
            certificate_lifetime: DEFAULT_CERTIFICATE_LIFETIME,
            rate_limits: RateLimits::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_connections: 1024,
        }
    }
}

#[derive(Debug)]
struct Limiters {
    per_address: RateLimiter<IpAddr>,
    signups: RateLimiter<IpAddr>,
    accounts: RateLimiter<Username>,
}

#[derive(Debug)]
struct ServerState {
    config: LoginServerConfig,
    store: Arc<dyn AccountStore>,
    limiters: Mutex<Limiters>,
    /// argon2 runs on at most one blocking thread per core.
    hashing: Semaphore,
}

#[derive(Debug, Clone)]
pub struct LoginServer {
    state: Arc<ServerState>,
}

/// A refusal, as the client will see it.
#[derive(Debug)]
struct ApiError {
    code: ErrorCode,
    message: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn rate_limited(what: &str, wait: Duration) -> Self {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        Self {
            code: ErrorCode::RateLimited,
            message: format!("{what}; try again in {secs} s"),
            retry_after: Some(Duration::from_secs(secs)),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let body = ErrorBody {
            error: self.code,
            message: self.message,
            retry_after_secs: self.retry_after.map(|d| d.as_secs()),
        };
        let mut response = json_response(self.code.http_status(), &body);
        if let Some(secs) = body.retry_after_secs {
            response
                .headers_mut()
                .insert(hyper::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::UsernameTaken => Self::new(ErrorCode::UsernameTaken, "that username is already taken"),
            StoreError::UnknownUser => Self::new(ErrorCode::UnknownUser, "no account has that username"),
            StoreError::Busy => Self {
                code: ErrorCode::StorageBusy,
                message: "the account database is busy; try again".into(),
                retry_after: Some(Duration::from_secs(1)),
            },
            StoreError::ReadOnly | StoreError::Unavailable(_) | StoreError::Corrupt(_) => {
                warn!(%error, "account store failed");
                Self::new(
                    ErrorCode::StorageUnavailable,
                    "the account database is unavailable; nothing was changed",
                )
            }
        }
    }
}

impl From<PasswordError> for ApiError {
    fn from(error: PasswordError) -> Self {
        let code = match error {
            PasswordError::TooShort => ErrorCode::PasswordTooShort,
            PasswordError::TooLong => ErrorCode::PasswordTooLong,
        };
        Self::new(code, error.to_string())
    }
}

fn json_response(status: u16, body: &impl Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Rate-limit key for an address: IPv6 users usually own a whole /64.
fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => {
            let mut segments = v6.segments();
            segments[4..].fill(0);
            IpAddr::V6(segments.into())
        }
    }
}

impl LoginServer {
    pub fn new(config: LoginServerConfig, store: Arc<dyn AccountStore>) -> Self {
        let limits = config.rate_limits;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            state: Arc::new(ServerState {
                limiters: Mutex::new(Limiters {
                    per_address: RateLimiter::new(limits.per_address, MAX_TRACKED_RATE_KEYS),
                    signups: RateLimiter::new(limits.signups_per_address, MAX_TRACKED_RATE_KEYS),
                    accounts: RateLimiter::new(
                        limits.password_attempts_per_account,
                        MAX_TRACKED_RATE_KEYS,
                    ),
                }),
                config,
                store,
                hashing: Semaphore::new(cores),
            }),
        }
    }

    /// Serves HTTPS on `listener` until `shutdown` completes, then stops accepting, lets
    /// requests in flight finish (up to 10 s) and returns.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let acceptor = TlsAcceptor::from(Arc::clone(&self.state.config.tls));
        let connections = Arc::new(Semaphore::new(self.state.config.max_connections));
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        info!(
            address = %listener.local_addr()?,
            store = %self.state.store.describe(),
            network = %self.state.config.network,
            "login server listening"
        );
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            // Replies are small and latency matters more than packet count.
            let _ = tcp.set_nodelay(true);
            let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                warn!("connection limit reached; refusing a connection");
                continue;
            };
            let acceptor = acceptor.clone();
            let state = Arc::clone(&self.state);
            let watcher = graceful.watcher();
            let span = tracing::info_span!("connection", peer = %Pii::new(peer));
            tokio::spawn(
                async move {
                    let _permit = permit;
                    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            debug!(%error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!("TLS handshake timed out");
                            return;
                        }
                    };
                    let client = peer.ip();
                    let service = hyper::service::service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(&state, client, request).await) }
                    });
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .max_buf_size(64 * 1024);
                    let connection = builder.serve_connection(TokioIo::new(tls), service);
                    if let Err(error) = watcher.watch(connection).await {
                        debug!(%error, "connection ended with an error");
                    }
                }
                .instrument(span),
            );
        }
        drop(listener);
        info!("login server shutting down: finishing requests in flight");
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            warn!("some connections did not finish within {SHUTDOWN_GRACE:?}");
        }
        info!("login server stopped");
        Ok(())
    }
}

async fn handle(
    state: &ServerState,
    client: IpAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    match route(state, client, request).await {
        Ok(response) => response,
        Err(error) => {
            debug!(code = ?error.code, "request refused");
            error.into_response()
        }
    }
}

async fn route(
    state: &ServerState,
    client: IpAddr,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let known = [
        SIGNUP_PATH,
        LOGIN_PATH,
        RENEW_PATH,
        CHANGE_PASSWORD_PATH,
        DELETE_ACCOUNT_PATH,
        EXISTS_PATH,
    ];
    if !known.contains(&path) {
        return Err(ApiError::new(ErrorCode::NotFound, format!("no API at {path}")));
    }
    if parts.method != Method::POST {
        return Err(ApiError::new(ErrorCode::MethodNotAllowed, format!("{path} takes POST")));
    }
    state.limit_address(client)?;
    let body = read_body(body, state.config.max_body_bytes).await?;
    match path {
        SIGNUP_PATH => {
            let response = state.signup(client, parse_json(&body)?).await?;
            Ok(json_response(201, &response))
        }
        LOGIN_PATH => Ok(json_response(200, &state.login(parse_json(&body)?).await?)),
        RENEW_PATH => Ok(json_response(200, &state.renew(parse_json(&body)?).await?)),
        CHANGE_PASSWORD_PATH => Ok(json_response(
            200,
            &state.change_password(parse_json(&body)?).await?,
        )),
        DELETE_ACCOUNT_PATH => Ok(json_response(
            200,
            &state.delete_account(parse_json(&body)?).await?,
        )),
        _ => Ok(json_response(200, &state.exists(parse_json(&body)?).await?)),
    }
}

async fn read_body(body: Incoming, max_bytes: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, max_bytes).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            ErrorCode::BodyTooLarge,
            format!("request body is larger than {max_bytes} bytes"),
        )),
        Err(error) => Err(ApiError::new(
            ErrorCode::MalformedRequest,
            format!("could not read the request body: {error}"),
        )),
    }
}

fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        ApiError::new(
            ErrorCode::MalformedRequest,
            format!("request body is not the expected JSON: {error}"),
        )
    })
}

fn invalid_username(error: koe_types::NameError) -> ApiError {
    ApiError::new(ErrorCode::InvalidUsername, error.to_string())
}

fn invalid_certificate(reason: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::InvalidCertificate, reason.to_string())
}

impl ServerState {
    fn limit_address(&self, client: IpAddr) -> Result<(), ApiError> {
        let mut limiters = self.limiters.lock().map_err(|_| internal())?;
        limiters
            .per_address
            .try_acquire(&address_key(client), Instant::now())
            .map_err(|wait| ApiError::rate_limited("too many requests from your address", wait))
    }

    /// Runs CPU-heavy password work on the blocking pool, one job per core at a time.
    async fn hash_work<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let _permit = self.hashing.acquire().await.map_err(|_| internal())?;
        tokio::task::spawn_blocking(work).await.map_err(|_| internal())
    }

    async fn signup(
        &self,
        client: IpAddr,
        request: SignupRequest,
    ) -> Result<SignupResponse, ApiError> {
        let username = Username::parse(&request.username).map_err(invalid_username)?;
        check_new_password(&request.password)?;
        self.limiters
            .lock()
            .map_err(|_| internal())?
            .signups
            .try_acquire(&address_key(client), Instant::now())
            .map_err(|wait| ApiError::rate_limited("too many sign-ups from your address", wait))?;
        let password = request.password;
        let hash = self.hash_work(move || hash_password(&password)).await?;
        self.store
            .create_account(&username, &hash, UnixTime::now())
            .await
            .map_err(|error| match error {
                StoreError::UsernameTaken => ApiError::new(
                    ErrorCode::UsernameTaken,
                    format!("the username {username} is already taken"),
                ),
                other => other.into(),
            })?;
        info!(%username, "account created");
        Ok(SignupResponse {
            username: username.to_string(),
        })
    }

    /// Checks a password for an account, under the per-account attempt limit.
    async fn authenticate(
        &self,
        username: &str,
        password: Pii<String>,
    ) -> Result<Account, ApiError> {
        let username = Username::parse_existing(username).map_err(invalid_username)?;
        self.limiters
            .lock()
            .map_err(|_| internal())?
            .accounts
            .try_acquire(&username, Instant::now())
            .map_err(|wait| {
                warn!(%username, "account locked after too many wrong passwords");
                ApiError::rate_limited("too many wrong passwords for this account", wait)
            })?;
        let account = self.store.find_account(&username).await?.ok_or_else(|| {
            ApiError::new(ErrorCode::UnknownUser, format!("no account named {username}"))
        })?;
        let stored = account.password_hash.clone();
        let matches = self
            .hash_work(move || verify_password(&password, &stored))
            .await?
            .map_err(|error| {
                warn!(%username, %error, "stored password hash is unreadable");
                ApiError::new(ErrorCode::Internal, "this account's password record is damaged")
            })?;
        if !matches {
            warn!(%username, "wrong password");
            return Err(ApiError::new(ErrorCode::WrongPassword, "wrong password"));
        }
        if let Ok(mut limiters) = self.limiters.lock() {
            limiters.accounts.refund(&username, Instant::now());
        }
        Ok(account)
    }

    async fn login(&self, request: LoginRequest) -> Result<CertificateResponse, ApiError> {
        let device_key = DevicePublicKey::parse(&request.device_key).map_err(|error| {
            ApiError::new(ErrorCode::InvalidDeviceKey, format!("device_key: {error}"))
        })?;
        let account = self.authenticate(&request.username, request.password).await?;
        let lifetime = request
            .lifetime_secs
            .map(Duration::from_secs)
            .unwrap_or(self.config.certificate_lifetime);
        self.issue(account.username, account.role, device_key, lifetime)
            .await
    }

    async fn renew(&self, request: RenewRequest) -> Result<CertificateResponse, ApiError> {
        let bytes = STANDARD
            .decode(&request.certificate)
            .map_err(|_| invalid_certificate("certificate is not base64"))?;
        let certificate = Certificate::from_bytes(&bytes)
            .map_err(|error| invalid_certificate(CertificateError::Malformed(error)))?;
        let now = UnixTime::now();
        certificate
            .verify(&self.config.network, &self.config.signing_key.public_key(), now)
            .map_err(|error| match error {
                CertificateError::Expired { .. } => invalid_certificate(format!(
                    "{error}; log in with your password to get a new one"
                )),
                other => invalid_certificate(other),
            })?;
        let timestamp = UnixTime(request.timestamp);
        if now.until(timestamp) > CLOCK_SKEW_ALLOWANCE || timestamp.until(now) > CLOCK_SKEW_ALLOWANCE
        {
            return Err(invalid_certificate(
                "renewal timestamp is too far from the server's clock; check your clock",
            ));
        }
        let signature: [u8; 64] = STANDARD
            .decode(&request.signature)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| invalid_certificate("signature is not 64 bytes of base64"))?;
        if !certificate
            .device_key()
            .verify(&renewal_message(&bytes, timestamp), &signature)
        {
            return Err(invalid_certificate(
                "renewal is not signed by the certificate's device key",
            ));
        }
        let body = certificate.body();
        let revoked = || {
            ApiError::new(
                ErrorCode::CertificateRevoked,
                "this certificate can no longer be renewed (password changed or account \
                 deleted); log in with your password",
            )
        };
        let issued = self.store.find_certificate(body.serial).await?.ok_or_else(revoked)?;
        if issued.username != body.username || issued.device_key != body.device_key {
            return Err(revoked());
        }
        // The account's role now, not the old certificate's: the account is the authority.
        let account = self.store.find_account(&body.username).await?.ok_or_else(revoked)?;
        let lifetime = body.not_before.until(body.not_after);
        self.issue(account.username, account.role, body.device_key, lifetime)
            .await
    }

    async fn issue(
        &self,
        username: Username,
        role: Role,
        device_key: DevicePublicKey,
        lifetime: Duration,
    ) -> Result<CertificateResponse, ApiError> {
        let lifetime = lifetime.clamp(MIN_CERTIFICATE_LIFETIME, self.config.certificate_lifetime);
        let now = UnixTime::now();
        let body = CertificateBody {
            network: self.config.network.clone(),
            username,
            device_key,
            not_before: now,
            not_after: now.saturating_add(lifetime),
            serial: new_serial(),
            role,
        };
        self.store
            .record_certificate(
                &IssuedCertificate {
                    serial: body.serial,
                    username: body.username.clone(),
                    device_key,
                    not_after: body.not_after,
                },
                now,
            )
            .await?;
        let certificate = body.sign(&self.config.signing_key);
        info!(
            username = %certificate.username(),
            role = %certificate.role(),
            device = %device_key.fingerprint(),
            serial = certificate.body().serial,
            not_after = %certificate.not_after(),
            "certificate issued"
        );
        Ok(CertificateResponse {
            certificate: STANDARD.encode(certificate.to_bytes()),
            not_after: certificate.not_after().as_secs(),
        })
    }

    async fn change_password(
        &self,
        request: ChangePasswordRequest,
    ) -> Result<OkResponse, ApiError> {
        check_new_password(&request.new_password)?;
        let account = self.authenticate(&request.username, request.password).await?;
        let new_password = request.new_password;
        let hash = self.hash_work(move || hash_password(&new_password)).await?;
        self.store
            .set_password(&account.username, &hash, UnixTime::now())
            .await?;
        info!(username = %account.username, "password changed; earlier certificates will not renew");
        Ok(OkResponse { ok: true })
    }

    async fn exists(&self, request: ExistsRequest) -> Result<ExistsResponse, ApiError> {
        let username = Username::parse_existing(&request.username).map_err(invalid_username)?;
        let exists = self.store.find_account(&username).await?.is_some();
        Ok(ExistsResponse { exists })
    }

    async fn delete_account(&self, request: DeleteAccountRequest) -> Result<OkResponse, ApiError> {
        let account = self.authenticate(&request.username, request.password).await?;
        self.store.delete_account(&account.username).await?;
        info!(username = %account.username, "account deleted");
        Ok(OkResponse { ok: true })
    }
}

fn internal() -> ApiError {
    ApiError::new(ErrorCode::Internal, "internal error")
}
