//! Short-lived relay credentials: what a supernode hands a logged-in Koe user so the user can
//! allocate on a relay node, without the relay node keeping a user database.
//!
//! The scheme is the "TURN REST API" one that coturn (`use-auth-secret`) and most WebRTC services
//! use: username `EXPIRY:USER` (Unix seconds), password `base64(HMAC-SHA1(secret, username))`.
//! Any relay that knows the secret checks them; they stop working at the expiry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Expiries of issued credentials are multiples of this (Unix seconds).
pub const EXPIRY_STEP: u64 = 600;

/// The secret a relay node shares with the supernodes that hand out its credentials.
#[derive(Clone)]
pub struct RelaySecret(Vec<u8>);

impl std::fmt::Debug for RelaySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelaySecret(…)")
    }
}

/// A username and password for one Koe user on the relays that share a secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RelayCredentials {
    pub username: String,
    pub password: String,
    /// Unix seconds after which the relays refuse them.
    pub expires_unix: u64,
}

/// Why a short-lived username was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShortLivedError {
    #[error("these relay credentials expired {0} s ago")]
    Expired(u64),
    #[error("not a short-lived relay username (EXPIRY:USER)")]
    NotShortLived,
}

impl RelaySecret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// A fresh random secret, for a relay whose only issuer is the supernode in the same process.
    pub fn random() -> Self {
        let mut bytes = vec![0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        Self(bytes)
    }

    /// Credentials for `user`, valid for at least `lifetime` from now. The expiry is rounded up
    /// to [`EXPIRY_STEP`], so a user calling often gets the same username again: a relay cannot
    /// forget a username it has accepted (turn-server-proto 0.7 has no way to remove one), and
    /// this bounds how many it learns.
    pub fn issue(&self, user: &str, lifetime: Duration) -> RelayCredentials {
        let expires_unix = (unix_now() + lifetime.as_secs()).next_multiple_of(EXPIRY_STEP);
        let username = format!("{expires_unix}:{user}");
        let password = self.password_for(&username);
        RelayCredentials { username, password, expires_unix }
    }

    /// The password a short-lived `username` has under this secret.
    pub fn password_for(&self, username: &str) -> String {
        let mut mac = Hmac::<Sha1>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(username.as_bytes());
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    }
}

/// Checks that a short-lived `username` has not expired at `now_unix`.
pub fn check_short_lived(username: &str, now_unix: u64) -> Result<(), ShortLivedError> {
    let expiry = short_lived_expiry(username).ok_or(ShortLivedError::NotShortLived)?;
    if expiry < now_unix {
        return Err(ShortLivedError::Expired(now_unix - expiry));
    }
    Ok(())
}

/// The expiry of a username shaped `EXPIRY:USER`, if it is one.
pub fn short_lived_expiry(username: &str) -> Option<u64> {
    let (expiry, user) = username.split_once(':')?;
    if user.is_empty() {
        return None;
    }
    expiry.parse().ok()
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn issued_credentials_check_out_until_they_expire() {
        let secret = RelaySecret::new(b"north".to_vec());
        let issued = secret.issue("alice", Duration::from_secs(600));
        assert!(issued.username.ends_with(":alice"));
        assert_eq!(secret.issue("alice", Duration::from_secs(600)), issued, "the same within a step");
        assert!(issued.expires_unix >= unix_now() + 600 && issued.expires_unix.is_multiple_of(EXPIRY_STEP));
        assert_eq!(secret.password_for(&issued.username), issued.password);
        assert_eq!(check_short_lived(&issued.username, unix_now()), Ok(()));
        assert_eq!(check_short_lived(&issued.username, issued.expires_unix + 5), Err(ShortLivedError::Expired(5)));
    }

    #[test]
    fn another_secret_gives_another_password() {
        let issued = RelaySecret::new(b"north".to_vec()).issue("alice", Duration::from_secs(60));
        assert_ne!(RelaySecret::new(b"south".to_vec()).password_for(&issued.username), issued.password);
    }

    #[test]
    fn coturn_compatible_password() {
        // The same HMAC-SHA1/base64 as coturn's `use-auth-secret`:
        // printf '%s' 1700000000:alice | openssl dgst -sha1 -hmac secret -binary | base64
        assert_eq!(RelaySecret::new(b"secret".to_vec()).password_for("1700000000:alice"), "d8soP47RbdIKLDUOpnJPVQyq5Ts=");
    }

    #[test]
    fn static_usernames_are_not_short_lived() {
        assert_eq!(check_short_lived("operator", 0), Err(ShortLivedError::NotShortLived));
        assert_eq!(check_short_lived("12:", 0), Err(ShortLivedError::NotShortLived));
    }
}
