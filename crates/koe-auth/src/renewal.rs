//! When a client should renew its certificate. Sans-IO: the answer depends only on the
//! certificate and `now`.
//!
//! Renewal starts when a third of the lifetime is left (8 hours of the default 24), so a
//! device that is online now and then renews long before expiry, and a login server outage
//! shorter than that is never noticed by users.

use std::time::Duration;

use koe_types::{Certificate, UnixTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalState {
    /// Good for a while: check again at `renew_at`.
    Fresh { renew_at: UnixTime },
    /// Still valid but within the renewal window: renew now.
    RenewNow,
    /// Expired: only a login with the password can get a new one.
    Expired,
}

pub fn renewal_state(certificate: &Certificate, now: UnixTime) -> RenewalState {
    let body = certificate.body();
    if now >= body.not_after {
        return RenewalState::Expired;
    }
    let lifetime = body.not_before.until(body.not_after);
    let renew_at = body.not_after.saturating_sub(lifetime / 3);
    if now >= renew_at {
        RenewalState::RenewNow
    } else {
        RenewalState::Fresh { renew_at }
    }
}

/// How long before `renew_at` a daemon should sleep, never less than a second.
pub fn sleep_until(renew_at: UnixTime, now: UnixTime) -> Duration {
    now.until(renew_at).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use koe_types::{CertificateBody, DeviceKey, NetworkName, NetworkSigningKey, Role, Username};

    fn certificate(not_before: u64, not_after: u64) -> Certificate {
        CertificateBody {
            network: NetworkName::parse("koe-test").unwrap_or_else(|e| panic!("{e}")),
            username: Username::parse("alice").unwrap_or_else(|e| panic!("{e}")),
            device_key: DeviceKey::generate().public_key(),
            not_before: UnixTime(not_before),
            not_after: UnixTime(not_after),
            serial: 1,
            role: Role::User,
        }
        .sign(&NetworkSigningKey::generate())
    }

    #[test]
    fn renews_in_the_last_third_of_the_lifetime() {
        let cert = certificate(0, 24 * 3600);
        assert_eq!(
            renewal_state(&cert, UnixTime(0)),
            RenewalState::Fresh {
                renew_at: UnixTime(16 * 3600)
            }
        );
        assert_eq!(renewal_state(&cert, UnixTime(16 * 3600)), RenewalState::RenewNow);
        assert_eq!(renewal_state(&cert, UnixTime(24 * 3600)), RenewalState::Expired);
    }
}
