//! A relay node's TLS certificate outlives restarts: clients pin its SHA-256 fingerprint
//! (supernodes hand it out in relay offers), so `koe node` and `koe relay` keep it in their
//! profile and present the same one after a restart; another profile has another one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{koe, wait_until, KoeProcess, TestNetwork};

/// The `sha256:…` fingerprint in a relay node's description line.
fn fingerprint(relay_line: &str) -> String {
    let start = relay_line.find("sha256:").unwrap_or_else(|| panic!("no fingerprint in {relay_line:?}"));
    relay_line[start..].split(|c: char| !(c.is_ascii_alphanumeric() || c == ':')).next().unwrap().to_string()
}

/// Starts `koe node` with profile `home`, reads its relay line, and stops it.
fn node_fingerprint(home: &Path, network_file: &Path) -> String {
    let (_node, relay_line) = KoeProcess::node_with_relay_line(home, network_file);
    fingerprint(&relay_line)
}

/// Starts `koe relay` with TLS and profile `home`, reads its first line, and stops it.
fn relay_fingerprint(home: &Path) -> String {
    let mut child = koe()
        .arg("--home")
        .arg(home)
        .args(["relay", "--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0", "--relay-user", "operator:secret"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    fingerprint(&line)
}

#[test]
fn a_supernode_presents_the_same_relay_certificate_after_a_restart() {
    let network = TestNetwork::init();
    let net = network.network_file();
    let home = network.home("supernode");
    let first = node_fingerprint(&home, &net);
    assert_eq!(node_fingerprint(&home, &net), first, "the restarted node's relay presents the certificate clients pinned");
    assert_ne!(node_fingerprint(&network.home("other-supernode"), &net), first, "each node has its own certificate");
}

#[test]
fn a_relay_presents_the_same_certificate_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("relay");
    let first = relay_fingerprint(&home);
    assert_eq!(relay_fingerprint(&home), first);
    assert_ne!(relay_fingerprint(&dir.path().join("other-relay")), first);
}

#[test]
fn a_damaged_relay_certificate_is_named_and_left_alone() {
    let network = TestNetwork::init();
    let home = network.home("supernode");
    std::fs::create_dir_all(&home).unwrap();
    let file = home.join("relay-tls.pem");
    std::fs::write(&file, "not a certificate\n").unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let child = koe()
        .arg("--home")
        .arg(&home)
        .args(["node", "--listen", "127.0.0.1:0", "--network"])
        .arg(network.network_file())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed when dropped, should it start instead of refusing.
    let mut node = KoeProcess { child, first_line: String::new() };
    wait_until(Duration::from_secs(30), || node.child.try_wait().unwrap().is_some());
    assert!(!node.child.wait().unwrap().success());
    let mut error = String::new();
    node.child.stderr.take().unwrap().read_to_string(&mut error).unwrap();
    assert!(error.contains(&format!("{} is damaged", file.display())), "{error}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a certificate\n", "never silently replaced");
}
