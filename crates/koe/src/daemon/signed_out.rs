//! The daemon while nobody is logged in on this device: it says so once, answers every request
//! with "not logged in" (so a later graphical client can offer sign-up and log-in through the
//! same socket), and goes online by itself once `koe login` has written a certificate.

use std::time::Duration;

use tokio::io::BufReader;
use tokio::net::{UnixListener, UnixStream};

use super::api::{ApiError, Request, Response};
use super::control::{self, Frame};
use crate::profile::{CertificateStatus, Profile};

/// How often the profile is read for a new certificate.
const LOGIN_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Waits until this device is logged in (true), or the daemon is stopped (false).
pub async fn wait_for_login(
    profile: &Profile,
    listener: &UnixListener,
    why: &str,
    notices_on_stderr: bool,
    shutdown: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> bool {
    super::notice(notices_on_stderr, &format!("{why} (this client goes online when you do)"));
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut poll = tokio::time::interval(LOGIN_POLL_INTERVAL);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let stop = std::sync::Arc::clone(&stop);
                    tokio::spawn(async move { answer(stream, &stop).await });
                }
            }
            _ = poll.tick() => {
                if matches!(profile.fresh_certificate(true).await, Ok(CertificateStatus::Valid(_) | CertificateStatus::Renewed(_))) {
                    return true;
                }
            }
            () = stop.notified() => return false,
            () = &mut *shutdown => return false,
        }
    }
}

async fn answer(stream: UnixStream, stop: &tokio::sync::Notify) {
    let mut reader = BufReader::new(stream);
    let request = control::read_request(&mut reader).await;
    let response = match request {
        Ok(Request::Shutdown) => {
            stop.notify_one();
            Response::Stopping
        }
        Ok(_) => Response::Failed(ApiError::NotLoggedIn),
        Err(reason) => Response::Failed(ApiError::invalid(reason)),
    };
    let _ = control::send_frame(reader.get_mut(), &Frame::Response(response)).await;
}
