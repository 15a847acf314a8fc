//! Desktop notifications: when a desktop session bus is there, the daemon shows what `koe
//! events` prints through the freedesktop Notifications D-Bus interface (an incoming call, a
//! message with its text, a contact request, a contact coming online or going, a missed call).
//! Without a session bus, or without a notification server on it, nothing happens and the log
//! says so once.

use std::collections::HashMap;

use koe_overlay::PresenceStatus;
use tokio::sync::broadcast::{self, error::RecvError};
use tracing::{debug, info};

use super::api::Event;

const NOTIFICATIONS: &str = "org.freedesktop.Notifications";
const NOTIFICATIONS_PATH: &str = "/org/freedesktop/Notifications";

/// Freedesktop urgency hint: 1 normal, 2 critical (stays until dismissed: a ringing call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Urgency {
    Normal = 1,
    Critical = 2,
}

/// What to show for `event`: summary, body, urgency; `None` for what is not news.
fn notification(event: &Event) -> Option<(String, String, Urgency)> {
    Some(match event {
        Event::IncomingCall { from } => (format!("Call from {from}"), "koe answer, or koe decline".into(), Urgency::Critical),
        Event::Message { from, text, .. } => (from.clone(), text.clone(), Urgency::Normal),
        Event::ContactRequest { from } => (format!("{from} wants to be your contact"), format!("koe contacts accept {from}"), Urgency::Normal),
        Event::ContactAccepted { from } => (format!("{from} is now your contact"), String::new(), Urgency::Normal),
        Event::MissedCall { from, .. } => (format!("Missed call from {from}"), String::new(), Urgency::Normal),
        Event::Presence { username, status: Some(PresenceStatus::Online) } => (format!("{username} is online"), String::new(), Urgency::Normal),
        Event::Presence { username, status: None } => (format!("{username} went offline"), String::new(), Urgency::Normal),
        Event::Presence { .. }
        | Event::ContactDeclined { .. }
        | Event::CallLine { .. }
        | Event::Online { .. }
        | Event::Unreachable { .. } => return None,
    })
}

/// Shows `events` as desktop notifications until the daemon stops. Returns at once when there
/// is no session bus.
pub async fn show(mut events: broadcast::Receiver<Event>) {
    if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none() {
        debug!("no desktop session bus (DBUS_SESSION_BUS_ADDRESS): no desktop notifications");
        return;
    }
    let connection = match zbus::Connection::session().await {
        Ok(connection) => connection,
        Err(error) => {
            info!(%error, "cannot reach the desktop session bus: no desktop notifications");
            return;
        }
    };
    let mut said_unavailable = false;
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        };
        let Some((summary, body, urgency)) = notification(&event) else { continue };
        let hints: HashMap<&str, zbus::zvariant::Value<'_>> = HashMap::from([("urgency", zbus::zvariant::Value::U8(urgency as u8))]);
        let arguments = ("Koe", 0u32, "call-start", summary.as_str(), body.as_str(), Vec::<&str>::new(), hints, -1i32);
        if let Err(error) = connection.call_method(Some(NOTIFICATIONS), NOTIFICATIONS_PATH, Some(NOTIFICATIONS), "Notify", &arguments).await {
            if !said_unavailable {
                info!(%error, "no desktop notification server answered; notifications are not shown");
                said_unavailable = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_ring_loudest_and_only_news_is_shown() {
        let call = notification(&Event::IncomingCall { from: "bob".into() });
        assert_eq!(call.map(|(_, _, urgency)| urgency), Some(Urgency::Critical));
        let message = notification(&Event::Message { from: "bob".into(), text: "hi there".into(), at: 0 });
        assert_eq!(message, Some(("bob".into(), "hi there".into(), Urgency::Normal)));
        assert_eq!(notification(&Event::CallLine { line: "ringing".into() }), None);
        assert_eq!(notification(&Event::Presence { username: "bob".into(), status: Some(PresenceStatus::Away) }), None);
    }
}
