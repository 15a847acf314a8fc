//! The login client: talks to the login server named in `network.toml` over HTTPS, trusting
//! exactly the TLS certificate the network file pins, and checks every certificate it receives
//! before handing it on. One short-lived connection per request: logins are rare.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use koe_types::network::TlsFingerprint;
use koe_types::{
    Certificate, CertificateError, DeviceKey, DevicePublicKey, NetworkFile, Pii, UnixTime,
    Username,
};
use koe_wire::Codec;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;
use tokio_rustls::TlsConnector;

use crate::api::{
    renewal_message, CertificateResponse, ChangePasswordRequest, DeleteAccountRequest,
    ErrorBody, ErrorCode, ExistsRequest, ExistsResponse, LoginRequest, OkResponse,
    RenewRequest, SignupRequest, SignupResponse, CHANGE_PASSWORD_PATH, DELETE_ACCOUNT_PATH,
    EXISTS_PATH, LOGIN_PATH, RENEW_PATH, SIGNUP_PATH,
};
use crate::tls::PinnedServerCertificate;

pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum LoginClientError {
    /// No connection: the login server's own refusal or silence when no proxy applies, the
    /// proxy's failure (naming the proxy) when one does. The reason is in the message, not a
    /// `source`, so a printed chain says it once.
    #[error("cannot reach the login server at {url}: {reason}")]
    Connect { url: String, reason: koe_proxy::ConnectError },
    #[error(
        "the login server at {url} presented TLS certificate {found}, but the network file pins \
         {expected}: this is not your network's login server, or your network file is out of date"
    )]
    WrongServerCertificate {
        url: String,
        expected: TlsFingerprint,
        found: TlsFingerprint,
    },
    #[error("TLS with the login server at {url} failed: {reason}")]
    Tls { url: String, reason: String },
    #[error("the login server at {0} did not answer in time")]
    Timeout(String),
    #[error("HTTP exchange with the login server failed: {0}")]
    Http(String),
    /// The server understood and said no; `message` is its explanation.
    #[error("{message}")]
    Rejected {
        code: ErrorCode,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("the login server sent an unexpected response: {0}")]
    BadResponse(String),
    #[error("the login server issued a certificate that does not check out: {0}")]
    BadCertificate(#[from] CertificateError),
}

impl LoginClientError {
    /// The server's error code, if the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoginClient {
    network: NetworkFile,
    timeout: Duration,
}

impl LoginClient {
    pub fn new(network: NetworkFile) -> Self {
        Self {
            network,
            timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn network(&self) -> &NetworkFile {
        &self.network
    }

    pub async fn signup(
        &self,
        username: &str,
        password: &Pii<String>,
    ) -> Result<Username, LoginClientError> {
        let response: SignupResponse = self
            .post(
                SIGNUP_PATH,
                &SignupRequest {
                    username: username.to_string(),
                    password: password.clone(),
                },
            )
            .await?;
        Username::parse_existing(&response.username)
            .map_err(|e| LoginClientError::BadResponse(format!("username in reply: {e}")))
    }

    /// Logs in and returns a certificate for `device_key`, checked against the network.
    pub async fn login(
        &self,
        username: &str,
        password: &Pii<String>,
        device_key: &DevicePublicKey,
        lifetime: Option<Duration>,
    ) -> Result<Certificate, LoginClientError> {
        let response: CertificateResponse = self
            .post(
                LOGIN_PATH,
                &LoginRequest {
                    username: username.to_string(),
                    password: password.clone(),
                    device_key: device_key.to_string(),
                    lifetime_secs: lifetime.map(|l| l.as_secs()),
                },
            )
            .await?;
        let expected = Username::parse_existing(username).ok();
        self.check_issued(&response, expected.as_ref(), device_key)
    }

    /// Exchanges a still-valid certificate for a fresh one, proving possession of the device
    /// key.
    pub async fn renew(
        &self,
        certificate: &Certificate,
        device_key: &DeviceKey,
    ) -> Result<Certificate, LoginClientError> {
        let bytes = certificate.to_bytes();
        let timestamp = UnixTime::now();
        let signature = device_key.sign(&renewal_message(&bytes, timestamp));
        let response: CertificateResponse = self
            .post(
                RENEW_PATH,
                &RenewRequest {
                    certificate: STANDARD.encode(&bytes),
                    timestamp: timestamp.as_secs(),
                    signature: STANDARD.encode(signature),
                },
            )
            .await?;
        self.check_issued(
            &response,
            Some(certificate.username()),
            &device_key.public_key(),
        )
    }

    pub async fn change_password(
        &self,
        username: &str,
        password: &Pii<String>,
        new_password: &Pii<String>,
    ) -> Result<(), LoginClientError> {
        let _: OkResponse = self
            .post(
                CHANGE_PASSWORD_PATH,
                &ChangePasswordRequest {
                    username: username.to_string(),
                    password: password.clone(),
                    new_password: new_password.clone(),
                },
            )
            .await?;
        Ok(())
    }

    pub async fn delete_account(
        &self,
        username: &str,
        password: &Pii<String>,
    ) -> Result<(), LoginClientError> {
        let _: OkResponse = self
            .post(
                DELETE_ACCOUNT_PATH,
                &DeleteAccountRequest {
                    username: username.to_string(),
                    password: password.clone(),
                },
            )
            .await?;
        Ok(())
    }

    /// Whether an account with this name exists.
    pub async fn user_exists(&self, username: &str) -> Result<bool, LoginClientError> {
        let response: ExistsResponse = self
            .post(EXISTS_PATH, &ExistsRequest { username: username.to_string() })
            .await?;
        Ok(response.exists)
    }

    /// Decodes an issued certificate and checks it is from this network, valid now, and for
    /// the user and device that asked.
    fn check_issued(
        &self,
        response: &CertificateResponse,
        username: Option<&Username>,
        device_key: &DevicePublicKey,
    ) -> Result<Certificate, LoginClientError> {
        let bytes = STANDARD
            .decode(&response.certificate)
            .map_err(|_| LoginClientError::BadResponse("certificate is not base64".into()))?;
        let certificate = Certificate::from_bytes(&bytes).map_err(CertificateError::from)?;
        certificate.verify(&self.network.name, &self.network.signing_key, UnixTime::now())?;
        if username.is_some_and(|u| u != certificate.username())
            || certificate.device_key() != device_key
        {
            return Err(LoginClientError::BadResponse(
                "the certificate is for another user or device".into(),
            ));
        }
        Ok(certificate)
    }

    async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
    ) -> Result<Resp, LoginClientError> {
        let url = self.network.login_url.to_string();
        tokio::time::timeout(self.timeout, self.exchange(path, body))
            .await
            .map_err(|_| LoginClientError::Timeout(url))?
    }

    async fn exchange<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
    ) -> Result<Resp, LoginClientError> {
        let login_url = &self.network.login_url;
        let url = login_url.to_string();
        // Through the HTTP proxy when one is configured (`koe --proxy`, HTTPS_PROXY).
        let tcp = koe_proxy::connect(&login_url.host, login_url.port)
            .await
            .map_err(|reason| LoginClientError::Connect {
                url: url.clone(),
                reason,
            })?;
        let _ = tcp.set_nodelay(true);
        let expected = self.network.login_tls_fingerprint;
        let pinned = PinnedServerCertificate::new(expected);
        let tls_error = |reason: String| LoginClientError::Tls {
            url: url.clone(),
            reason,
        };
        let config = pinned.client_config().map_err(|e| tls_error(e.to_string()))?;
        let server_name = ServerName::try_from(login_url.host.clone())
            .map_err(|e| tls_error(format!("login host name: {e}")))?;
        let tls = TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map_err(|error| match pinned.presented() {
                Some(found) if found != expected => LoginClientError::WrongServerCertificate {
                    url: url.clone(),
                    expected,
                    found,
                },
                _ => tls_error(error.to_string()),
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| LoginClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let json = serde_json::to_vec(body)
            .map_err(|e| LoginClientError::Http(format!("encoding request: {e}")))?;
        let request = Request::post(path)
            .header(hyper::header::HOST, login_url.authority())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(json)))
            .map_err(|e| LoginClientError::Http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| LoginClientError::Http(e.to_string()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| LoginClientError::Http(format!("reading response: {e}")))?
            .to_bytes();
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| LoginClientError::BadResponse(format!("HTTP {status}: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(error) => Err(LoginClientError::Rejected {
                code: error.error,
                message: error.message,
                retry_after: error.retry_after_secs.map(Duration::from_secs),
            }),
            Err(_) => Err(LoginClientError::BadResponse(format!(
                "HTTP {status} without an error body"
            ))),
        }
    }
}
