//! `koe up` is a background program: on stderr it says only what the user must know (that it
//! is online, or that the network cannot be reached), once, without log noise; its log goes to
//! `koe.log` in the profile; `koe status` tells the truth about reaching the network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{koe, ok, run, stdout, wait_until, KoeProcess, TestNetwork};

/// `koe up` for `home` with its stderr going to a file in the test's directory.
fn up_with_stderr_file(home: &std::path::Path, stderr: &std::path::Path) -> KoeProcess {
    let child = koe()
        .arg("--home")
        .arg(home)
        .arg("up")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap();
    KoeProcess { child, first_line: String::new() }
}

#[test]
fn koe_up_says_once_that_it_is_online_and_logs_to_its_profile() {
    let (network, _login, _supernodes, homes) = common::network_with(&["alice"]);
    let alice = &homes[0];
    let stderr = network.dir.path().join("alice-stderr.txt");
    let _up = up_with_stderr_file(alice, &stderr);
    wait_until(Duration::from_secs(15), || std::fs::read_to_string(&stderr).unwrap().contains("online"));
    ok(run(alice, &["lookup", "alice"], ""));
    let said = std::fs::read_to_string(&stderr).unwrap();
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines.len(), 1, "koe up said more than one line:\n{said}");
    assert!(lines[0].starts_with("koe: alice is online (log: "), "{said}");
    assert!(!said.contains('\u{1b}') && !said.contains("INFO"), "log noise on stderr:\n{said}");
    let log = std::fs::read_to_string(alice.join("koe.log")).unwrap();
    assert!(log.contains("attached"), "the log file holds the details:\n{log}");

    // `koe status | head -0`: a reader that goes away is no panic.
    let mut child = koe().arg("--home").arg(alice).arg("status").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let said = common::stderr(&output);
    assert!(!said.contains("panicked"), "{said}");
}

#[test]
fn koe_up_without_a_reachable_supernode_says_so_once_and_status_tells_the_truth() {
    let network = TestNetwork::init();
    let _login = network.serve();
    let net = network.network_file();
    // A supernode that is not there: nothing listens on the port.
    let nowhere = format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", common::free_port(), koe_overlay::PeerId::random());
    ok(koe().args(["network", "add-bootstrap", "--network"]).arg(&net).arg(&nowhere).output().unwrap());
    let alice = network.home("alice");
    ok(run(&alice, &["signup", "alice", "--network", net.to_str().unwrap(), "--password-stdin"], "correct horse\n"));
    let stderr = network.dir.path().join("alice-stderr.txt");
    let _up = up_with_stderr_file(&alice, &stderr);
    wait_until(Duration::from_secs(10), || std::fs::read_to_string(&stderr).unwrap().contains("cannot reach any supernode"));
    let status = stdout(&run(&alice, &["status"], ""));
    assert!(status.contains("(offline: cannot reach any supernode"), "{status}");
    assert!(!status.contains("(online)"), "{status}");
    // Rounds of attaching go on, backing off, without flooding the terminal or the log
    // (this wrote about 6,600 warnings a second).
    std::thread::sleep(Duration::from_secs(4));
    let said = std::fs::read_to_string(&stderr).unwrap();
    assert_eq!(said.lines().count(), 1, "koe up said more than one line:\n{said}");
    assert!(said.contains("retrying"), "{said}");
    let log_lines = std::fs::read_to_string(alice.join("koe.log")).unwrap().lines().count();
    assert!(log_lines < 50, "{log_lines} log lines in 4 s");
}

#[test]
fn koe_up_detach_runs_in_the_background_until_koe_down_or_logout() {
    let (_network, _login, _supernodes, homes) = common::network_with(&["alice"]);
    let alice = &homes[0];
    let output = run(alice, &["up", "--detach"], "");
    let (said, printed) = (common::stderr(&output), stdout(&output));
    assert!(output.status.success(), "{said}");
    assert!(said.contains("koe: alice is online"), "{said}");
    assert!(printed.contains("koe down"), "{printed}");
    // The command returned; the client goes on.
    assert!(ok(run(alice, &["status"], "")).contains("me:          alice (online)"));
    assert!(ok(run(alice, &["down"], "")).contains("koe stopped"));
    assert!(common::fails(run(alice, &["status"], "")).contains("not running"));
    assert!(ok(run(alice, &["down"], "")).contains("not running"), "koe down twice is fine");

    // Logging out stops the client: it would otherwise stay online as the one who left.
    ok(run(alice, &["up", "--detach"], ""));
    let said = ok(run(alice, &["logout"], ""));
    assert!(said.contains("Stopped the running client") && said.contains("Logged out"), "{said}");
    assert!(common::fails(run(alice, &["status"], "")).contains("not running"));
    // Signed out, the client still runs: it says so, answers "not logged in", keeps the
    // history readable, and goes online by itself once the user logs in.
    let output = run(alice, &["up", "--detach"], "");
    assert!(output.status.success(), "{}", common::stderr(&output));
    assert!(common::stderr(&output).contains("not logged in: run `koe login USER`"), "{}", common::stderr(&output));
    assert!(common::fails(run(alice, &["status"], "")).contains("not logged in: koe login USER"));
    assert!(ok(run(alice, &["calls"], "")).contains("no calls"));
    ok(run(alice, &["login", "alice", "--password-stdin"], "a good password\n"));
    wait_until(Duration::from_secs(15), || stdout(&run(alice, &["status"], "")).contains("me:          alice (online)"));
    assert!(ok(run(alice, &["down"], "")).contains("koe stopped"));
}

#[test]
fn koe_autostart_installs_and_removes_a_systemd_user_unit() {
    let network = TestNetwork::init();
    let home = network.home("alice");
    let config = network.dir.path().join("config");
    let autostart = |state: &str| {
        koe().arg("--home").arg(&home).args(["autostart", state]).env("XDG_CONFIG_HOME", &config).output().unwrap()
    };
    let said = ok(autostart("on"));
    let unit = config.join("systemd/user/koe-alice.service");
    assert!(said.contains(&unit.display().to_string()), "{said}");
    let text = std::fs::read_to_string(&unit).unwrap();
    let exec = text.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
    assert!(exec.contains(&format!("--home \"{}\" up", home.display())), "{exec}");
    assert!(text.contains("WantedBy=default.target"), "{text}");
    assert!(ok(autostart("off")).contains("no longer starts at login"));
    assert!(!unit.exists());
    assert!(ok(autostart("off")).contains("does not start at login"));
}
