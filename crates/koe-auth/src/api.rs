//! The login server's JSON API: request and response bodies, error codes, and the bytes a
//! device signs to renew its certificate. Shared by server and client so they cannot drift.
//!
//! | method | path                | body                         | success            |
//! |--------|---------------------|------------------------------|--------------------|
//! | POST   | `/v1/signup`        | [`SignupRequest`]            | 201 [`SignupResponse`] |
//! | POST   | `/v1/login`         | [`LoginRequest`]             | 200 [`CertificateResponse`] |
//! | POST   | `/v1/renew`         | [`RenewRequest`]             | 200 [`CertificateResponse`] |
//! | POST   | `/v1/password`      | [`ChangePasswordRequest`]    | 200 [`OkResponse`] |
//! | POST   | `/v1/account/delete`| [`DeleteAccountRequest`]     | 200 [`OkResponse`] |
//! | POST   | `/v1/exists`        | [`ExistsRequest`]            | 200 [`ExistsResponse`] |
//!
//! Every failure is a JSON [`ErrorBody`] with a stable machine-readable [`ErrorCode`].

use koe_types::{Pii, UnixTime};
use serde::{Deserialize, Serialize};

pub const SIGNUP_PATH: &str = "/v1/signup";
pub const LOGIN_PATH: &str = "/v1/login";
pub const RENEW_PATH: &str = "/v1/renew";
pub const CHANGE_PASSWORD_PATH: &str = "/v1/password";
pub const DELETE_ACCOUNT_PATH: &str = "/v1/account/delete";
pub const EXISTS_PATH: &str = "/v1/exists";

const RENEWAL_CONTEXT: &[u8] = b"koe certificate renewal v1\0";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignupRequest {
    pub username: String,
    pub password: Pii<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignupResponse {
    pub username: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub username: String,
    pub password: Pii<String>,
    /// `ed25519:<base64>` of the device's public key.
    pub device_key: String,
    /// Shorter than the server's default lifetime if the client wants; never longer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_secs: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateResponse {
    /// The certificate's binary encoding in standard base64.
    pub certificate: String,
    pub not_after: u64,
}

/// Proof that the device holding a still-valid certificate wants a fresh one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub certificate: String,
    pub timestamp: u64,
    /// Base64 Ed25519 signature by the device key over [`renewal_message`].
    pub signature: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordRequest {
    pub username: String,
    pub password: Pii<String>,
    pub new_password: Pii<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteAccountRequest {
    pub username: String,
    pub password: Pii<String>,
}

/// Whether an account exists, so a lookup can tell "offline" from "no such user". Usernames
/// are public in Koe (anyone can look anyone up), so this reveals nothing new; it is rate
/// limited like everything else.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExistsRequest {
    pub username: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ExistsResponse {
    pub exists: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OkResponse {
    pub ok: bool,
}

/// What went wrong, in words a program can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    MalformedRequest,
    BodyTooLarge,
    NotFound,
    MethodNotAllowed,
    InvalidUsername,
    PasswordTooShort,
    PasswordTooLong,
    UsernameTaken,
    UnknownUser,
    WrongPassword,
    InvalidDeviceKey,
    InvalidCertificate,
    CertificateRevoked,
    RateLimited,
    StorageBusy,
    StorageUnavailable,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            Self::MalformedRequest
            | Self::InvalidUsername
            | Self::PasswordTooShort
            | Self::PasswordTooLong
            | Self::InvalidDeviceKey => 400,
            Self::WrongPassword | Self::InvalidCertificate | Self::CertificateRevoked => 401,
            Self::UnknownUser | Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::UsernameTaken => 409,
            Self::BodyTooLarge => 413,
            Self::RateLimited => 429,
            Self::Internal => 500,
            Self::StorageBusy | Self::StorageUnavailable => 503,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

/// The bytes a device signs to renew `certificate_bytes` at `timestamp`. The context string
/// keeps this signature from being valid for any other Koe message.
pub fn renewal_message(certificate_bytes: &[u8], timestamp: UnixTime) -> Vec<u8> {
    let mut message = RENEWAL_CONTEXT.to_vec();
    message.extend_from_slice(certificate_bytes);
    message.extend_from_slice(&timestamp.as_secs().to_be_bytes());
    message
}
