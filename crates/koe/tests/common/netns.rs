//! Linux network namespaces for tests that need a network of their own: created with unique
//! names, removed when dropped (even when the test fails). Needs root, `ip` and `iptables`;
//! without them a test is skipped, unless `KOE_REQUIRE_NETNS=1` (CI) makes that a failure.

use std::process::Command;

/// Whether namespaces can be made here; `false` means: skip (the reason is printed).
pub fn available(test: &str) -> bool {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let tools = ["ip", "iptables"].iter().all(|tool| Command::new(tool).arg("-V").output().is_ok_and(|o| o.status.success()));
    if root && tools {
        return true;
    }
    let reason = if root { "`ip` or `iptables` is missing" } else { "not root" };
    assert!(std::env::var("KOE_REQUIRE_NETNS").is_err(), "{test}: network namespaces are required here, but {reason}");
    eprintln!("{test}: skipped: {reason} (network namespaces need both)");
    false
}

fn sh(args: &[&str]) {
    let output = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// A network namespace with its loopback up.
#[derive(Debug)]
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    /// `koe-<what>-<pid>-<n>`: unique on this machine.
    pub fn new(what: &str) -> Self {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("koe-{what}-{}-{n}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        let namespace = Self { name };
        namespace.run(&["ip", "link", "set", "lo", "up"]);
        namespace
    }

    /// Runs a command inside; panics if it fails.
    pub fn run(&self, args: &[&str]) {
        sh(&[&["ip", "netns", "exec", &self.name], args].concat());
    }

    /// A command that will run inside.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Kills whatever still runs inside, then removes it.
        if let Ok(output) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}
