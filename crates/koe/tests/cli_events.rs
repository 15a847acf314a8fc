//! `koe events` prints what happens as it happens: a contact request, a message with its
//! text, an incoming call (with the terminal bell) and, when the caller gives up, a missed
//! call. The history is readable after the client stops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::BufRead;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::{koe, network_with, ok, run, stdout, wait_until, KoeProcess};

/// Lines of a running `koe events`, as they come.
struct EventLines {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl EventLines {
    fn start(home: &std::path::Path) -> Self {
        let mut child = koe().arg("--home").arg(home).arg("events").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    /// Waits (up to 15 s) for a line containing `text`; returns it.
    fn expect(&mut self, text: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(line) = self.seen.iter().find(|l| l.contains(text)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no event with {text:?}; seen:\n{}", self.seen.join("\n")),
            }
        }
    }
}

impl Drop for EventLines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn koe_events_shows_requests_messages_calls_and_missed_calls() {
    let (_network, _login, _supernodes, homes) = network_with(&["alice", "bob"]);
    let (alice, bob) = (&homes[0], &homes[1]);
    let mut alice_up = KoeProcess::up(alice);
    let _bob_up = KoeProcess::up(bob);
    wait_until(Duration::from_secs(10), || stdout(&run(bob, &["lookup", "alice"], "")).contains("1 device(s) online"));
    let mut events = EventLines::start(alice);
    // Its first line says where things stand: from then on it hears everything.
    events.expect("online via");

    ok(run(bob, &["contacts", "add", "alice"], ""));
    events.expect("bob wants to be your contact: koe contacts accept bob");
    ok(run(bob, &["chat", "alice", "the text itself, not just a log line"], ""));
    assert!(events.expect("message from bob").ends_with("message from bob: the text itself, not just a log line"));

    // bob calls; alice does not answer; bob gives up: a ringing call, then a missed one.
    let caller = {
        let bob = bob.clone();
        std::thread::spawn(move || run(&bob, &["call", "alice"], ""))
    };
    let ring = events.expect("call from bob");
    assert!(ring.starts_with('\u{7}'), "the terminal bell rings for a call: {ring:?}");
    ok(run(bob, &["hangup"], ""));
    let _ = caller.join();
    events.expect("missed call from bob");

    // With the client stopped, the history is still there.
    alice_up.kill();
    wait_until(Duration::from_secs(5), || run(alice, &["status"], "").status.code() == Some(1));
    let messages = ok(run(alice, &["messages"], ""));
    assert!(messages.contains("bob → alice: the text itself"), "{messages}");
    let calls = ok(run(alice, &["calls"], ""));
    assert!(calls.contains("call from bob: missed"), "{calls}");
    let contacts = ok(run(alice, &["contacts", "list"], ""));
    assert!(contacts.contains("wants to be your contact"), "{contacts}");
}
