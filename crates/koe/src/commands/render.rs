//! Turns the daemon's typed answers and events into the text `koe` prints. The daemon sends
//! facts; every sentence a user reads about them is written here.

use std::fmt::Write as _;

use koe_overlay::PresenceStatus;
use koe_types::UnixTime;

use crate::daemon::api::{
    ApiError, CallView, ContactState, ContactView, Delivery, Event, Reach, Response, StatusView,
};

/// The text of an answer: `Ok` to print on stdout, `Err` for stderr and a failing exit.
pub fn response(me: Option<&str>, response: &Response) -> Result<String, String> {
    Ok(match response {
        Response::Status(status) => status_text(status),
        Response::Devices { username, devices } if devices.is_empty() => format!("{username} is offline"),
        Response::Devices { username, devices } => {
            let mut out = format!("{username}: {} device(s) online\n", devices.len());
            for device in devices {
                let _ = writeln!(out, "  device {}  {}  via supernode {}", device.fingerprint, device.status, device.supernode);
            }
            out
        }
        Response::StatusSet { status } => format!("status set to {status}"),
        Response::Delivered { to, devices } => delivered(to, *devices),
        Response::Kept { to, replicas } => kept(to, *replicas),
        Response::ContactAdded { username, accepted, delivery } => {
            let verb = if *accepted { "accepted" } else { "contact request" };
            format!("{verb}: {}", delivery_text(username, delivery))
        }
        Response::ContactAlready { username } => format!("{username} is already a contact"),
        Response::ContactAnswered { username, accepted, delivery } => {
            let verb = if *accepted { "accepted" } else { "declined" };
            format!("{verb} {username}'s request ({})", delivery_text(username, delivery))
        }
        Response::ContactRemoved { username } => format!("removed {username} from your contacts"),
        Response::Messages { messages } if messages.is_empty() => "no messages".into(),
        Response::Messages { messages } => {
            let me = me.unwrap_or("me");
            let mut out = String::new();
            for message in messages {
                let (from, to) = if message.incoming { (message.peer.as_str(), me) } else { (me, message.peer.as_str()) };
                let state = if message.incoming { String::new() } else { format!(" [{}]", message.state.as_str()) };
                let _ = writeln!(out, "{} {from} → {to}: {}{state}", UnixTime(message.at), message.text);
            }
            out
        }
        Response::Contacts { contacts } if contacts.is_empty() => "no contacts yet: koe contacts add USER".into(),
        Response::Contacts { contacts } => {
            let mut out = String::new();
            for contact in contacts {
                let _ = writeln!(out, "{:<32} {}", contact.username, contact_text(contact));
            }
            out
        }
        Response::Calls { calls } if calls.is_empty() => "no calls".into(),
        Response::Calls { calls } => {
            let mut out = String::new();
            for call in calls {
                let _ = writeln!(out, "{}", call_line(call));
            }
            out
        }
        Response::CallEnded => String::new(),
        Response::Declined { from } => format!("declined the call from {from}"),
        Response::Blocked { username, blocked: true } => format!("blocked {username}: nothing from them reaches you"),
        Response::Blocked { username, blocked: false } => format!("unblocked {username}"),
        Response::BlockList { blocked } if blocked.is_empty() => "nobody is blocked".into(),
        Response::BlockList { blocked } => blocked.join("\n"),
        Response::HungUp => "hung up".into(),
        Response::Muted { on: true } => "muted: the other side hears silence (koe mute off to undo)".into(),
        Response::Muted { on: false } => "unmuted".into(),
        Response::DtmfSent { digits } => format!("pressed {digits}"),
        Response::Quote(quote) => format!("{}: {}\n{}", quote.number, quote.price_text(), quote.credit_text()),
        Response::Credit(credit) => credit_text(credit),
        Response::Redeemed { amount, balance, currency } => {
            format!("voucher redeemed: {} added; your credit is now {}", amount.display(currency), balance.display(currency))
        }
        Response::Stopping => "stopping".into(),
        Response::Failed(error) => return Err(error.to_string()),
    })
}

/// `koe credit`: the balance, what calls in progress hold, and the latest entries.
fn credit_text(credit: &koe_pstn::service::CreditView) -> String {
    let currency = &credit.currency;
    let mut out = format!("credit: {}", credit.balance.display(currency));
    if credit.held.is_positive() {
        let _ = write!(out, " ({} held by calls in progress)", credit.held.display(currency));
    }
    out.push('\n');
    if credit.recent.is_empty() {
        out.push_str("no charges yet\n");
    }
    for charge in &credit.recent {
        let amount = koe_pstn::money::Amount::from_micros(charge.amount.saturating_abs());
        let sign = if charge.amount < 0 { "-" } else { "+" };
        let at = UnixTime(u64::try_from(charge.at_ms / 1000).unwrap_or(0));
        let signed = format!("{sign}{}", amount.display(currency));
        let _ = writeln!(out, "  {at}  {signed:>13}  {}", charge.memo);
    }
    out
}

fn delivered(to: &str, devices: usize) -> String {
    match devices {
        1 => format!("delivered to {to}"),
        n => format!("delivered to {to} ({n} devices)"),
    }
}

fn kept(to: &str, replicas: u32) -> String {
    format!("{to} is offline: it waits for them, sealed, on {replicas} supernode(s), and arrives when they come online")
}

fn delivery_text(to: &str, delivery: &Delivery) -> String {
    match delivery {
        Delivery::Delivered { devices } => delivered(to, *devices),
        Delivery::Kept { replicas } => kept(to, *replicas),
        Delivery::Undelivered { why } => ApiError::NotDelivered { username: to.into(), why: Box::new(why.clone()) }.to_string(),
    }
}

fn status_text(status: &StatusView) -> String {
    let mut out = String::new();
    let presence = match &status.reach {
        Reach::Online { .. } => status.availability.to_string(),
        Reach::Unreachable { reason } => format!("offline: cannot reach any supernode: {reason}; retrying"),
        Reach::Attaching => "offline: attaching to a supernode…".into(),
    };
    let _ = writeln!(out, "me:          {} ({presence})", status.me);
    let parent = match &status.reach {
        Reach::Online { parent } => parent.as_str(),
        _ => "none",
    };
    let _ = writeln!(out, "parent:      {parent}");
    if let Some(address) = &status.serving {
        let _ = writeln!(out, "serving:     as a supernode at {address}");
    }
    let _ = writeln!(out, "supernodes:  {} known", status.known_supernodes.len());
    for supernode in status.known_supernodes.iter().take(10) {
        let _ = writeln!(out, "  {supernode}");
    }
    out
}

fn presence_text(status: Option<PresenceStatus>) -> String {
    status.map_or_else(|| "offline".into(), |s| s.to_string())
}

fn contact_text(contact: &ContactView) -> String {
    match contact.state {
        ContactState::Accepted => contact.presence.map_or_else(|| "unknown".into(), presence_text),
        ContactState::Requested => "request sent, awaiting their answer".into(),
        ContactState::AwaitingMe => "wants to be your contact: koe contacts accept|decline".into(),
        ContactState::Declined => "declined".into(),
    }
}

/// One call of the history, as `koe calls` prints it.
pub fn call_line(call: &CallView) -> String {
    let direction = if call.incoming { format!("from {}", call.peer) } else { format!("to {}", call.peer) };
    let mut line = format!("{} call {direction}: ", UnixTime(call.started_at));
    match call.talked_ms {
        Some(ms) => {
            let _ = write!(line, "talked {:.0} s", ms as f64 / 1000.0);
            if let Some(path) = &call.path {
                let _ = write!(line, " over {path}");
            }
            if let Some(mos) = call.mos {
                let _ = write!(line, ", MOS {mos:.1}");
            }
            let _ = write!(line, "; {}", call.ended);
        }
        None => line.push_str(&call.ended),
    }
    line
}

/// One event as `koe events` prints it (a call's own lines as they are).
pub fn event(event: &Event) -> String {
    match event {
        Event::CallLine { line } => line.clone(),
        Event::Online { parent } => format!("online via {parent}"),
        Event::Unreachable { reason } => format!("cannot reach any supernode: {reason}; retrying"),
        Event::Presence { username, status } => format!("{username} is {}", presence_text(*status)),
        Event::Message { from, text, at } => format!("{} message from {from}: {text}", UnixTime(*at)),
        Event::ContactRequest { from } => format!("{from} wants to be your contact: koe contacts accept {from}"),
        Event::ContactAccepted { from } => format!("{from} is now your contact"),
        Event::ContactDeclined { from } => format!("{from} declined your contact request"),
        // The terminal bell: a call rings.
        Event::IncomingCall { from } => format!("\u{7}call from {from}: koe answer or koe decline"),
        Event::MissedCall { from, at } => format!("{} missed call from {from}", UnixTime(*at)),
    }
}
