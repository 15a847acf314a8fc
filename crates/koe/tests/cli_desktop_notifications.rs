//! With a desktop session bus, `koe up` shows a message (with its text) as a desktop
//! notification: a real dbus-daemon, and dbus-monitor watching what is sent to the
//! freedesktop Notifications service. Needs dbus-daemon and dbus-monitor: skipped without them,
//! except in CI (KOE_REQUIRE_DBUS=1).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{koe, network_with, ok, run, stdout, wait_until, KoeProcess};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tools_present() -> bool {
    // dbus-monitor has no --version; that a command starts at all is what counts.
    let present = ["dbus-daemon", "dbus-monitor"].iter().all(|tool| Command::new(tool).arg("--version").output().is_ok());
    if !present {
        assert!(std::env::var_os("KOE_REQUIRE_DBUS").is_none(), "dbus-daemon and dbus-monitor are required here (KOE_REQUIRE_DBUS)");
        eprintln!("skipped: dbus-daemon or dbus-monitor is not installed");
    }
    present
}

#[test]
fn a_message_is_shown_as_a_desktop_notification() {
    if !tools_present() {
        return;
    }
    let mut bus = Command::new("dbus-daemon").args(["--session", "--nofork", "--print-address=1"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut address = String::new();
    std::io::BufReader::new(bus.stdout.take().unwrap()).read_line(&mut address).unwrap();
    let _bus = Killed(bus);
    let address = address.trim().to_string();
    let mut monitor = Command::new("dbus-monitor")
        .args(["--address", &address, "interface='org.freedesktop.Notifications'"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines, seen) = mpsc::channel();
    let monitor_out = monitor.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(monitor_out).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let _monitor = Killed(monitor);

    let (_network, _login, _supernodes, homes) = network_with(&["alice", "bob"]);
    let (alice, bob) = (&homes[0], &homes[1]);
    let alice_up = koe().arg("--home").arg(alice).arg("up").env("DBUS_SESSION_BUS_ADDRESS", &address).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let _alice_up = KoeProcess { child: alice_up, first_line: String::new() };
    let _bob_up = KoeProcess::up(bob);
    wait_until(Duration::from_secs(15), || stdout(&run(bob, &["lookup", "alice"], "")).contains("1 device(s) online"));
    ok(run(bob, &["chat", "alice", "ding dong"], ""));

    let mut said = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !said.iter().any(|l: &String| l.contains("string \"ding dong\"")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match seen.recv_timeout(left) {
            Ok(line) => said.push(line),
            Err(_) => panic!("no notification with the message's text; the bus saw:\n{}", said.join("\n")),
        }
    }
    let text = said.join("\n");
    assert!(text.contains("member=Notify") && text.contains("string \"bob\""), "{text}");
}
