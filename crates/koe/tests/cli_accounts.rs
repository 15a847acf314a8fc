//! `koe network init`, `koe auth serve`, `koe signup`, `login`, `whoami`, `logout`, `passwd`
//! and `delete-account` as separate processes, the way an operator and users run them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use base64::Engine;
use common::{fails, koe, ok, run, TestNetwork};
use koe_types::{Certificate, CertificateBody, NetworkSigningKey, UnixTime};
use koe_wire::Codec;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn separate_processes_sign_up_log_in_and_show_who_is_logged_in() {
    let network = TestNetwork::init();
    let _server = network.serve();
    let alice = network.home("alice");
    let net = network.network_file();
    let net = net.to_str().unwrap();

    let out = ok(run(&alice, &["signup", "Alice", "--network", net, "--password-stdin"], "correct horse\n"));
    assert!(out.contains("Signed up as alice"), "{out}");
    assert!(out.contains("Logged in as alice"), "{out}");
    assert_eq!(mode(&alice.join("device.key")), 0o600);
    assert_eq!(mode(&alice.join("certificate")), 0o600);

    let who = ok(run(&alice, &["whoami"], ""));
    assert!(who.contains("username:     alice"), "{who}");
    assert!(who.contains("network:      koe-test"), "{who}");
    assert!(who.contains("valid, signed by the network's key"), "{who}");
    let fingerprint = who
        .lines()
        .find(|l| l.starts_with("device key:"))
        .unwrap()
        .to_string();
    assert!(fingerprint.contains("SHA256:"), "{who}");

    assert!(ok(run(&alice, &["logout"], "")).contains("Logged out"));
    assert!(fails(run(&alice, &["whoami"], "")).contains("not logged in"));

    // The profile remembers the network; the device key is created once per device.
    ok(run(&alice, &["login", "alice", "--password-stdin"], "correct horse\n"));
    let who = ok(run(&alice, &["whoami"], ""));
    assert!(who.contains(&fingerprint), "same device key after logging in again:\n{who}");

    // Another device of another user.
    let bob = network.home("bob");
    ok(run(&bob, &["signup", "bob", "--network", net, "--password-stdin"], "battery staple\n"));
    assert!(ok(run(&bob, &["whoami"], "")).contains("username:     bob"));
}

/// `koe signup` at a terminal (a pseudo-terminal from util-linux `script`, into which the
/// person's typing is written ahead): the password rules come first, and when the repeated
/// password differs it is asked again instead of giving up.
#[test]
fn signup_at_a_terminal_states_the_rules_and_asks_again_when_the_passwords_differ() {
    if std::process::Command::new("script").arg("--version").output().is_err() {
        assert!(std::env::var("KOE_REQUIRE_SCRIPT").is_err(), "script (util-linux) is required here but not installed");
        eprintln!("skipped: script (util-linux) is not installed");
        return;
    }
    let network = TestNetwork::init();
    let _server = network.serve();
    let home = network.home("ivy");
    let quoted = |path: &std::path::Path| format!("'{}'", path.display());
    let command_line = format!(
        "{} --home {} signup ivy --network {}",
        quoted(std::path::Path::new(env!("CARGO_BIN_EXE_koe"))),
        quoted(&home),
        quoted(&network.network_file())
    );
    let child = std::process::Command::new("script")
        .args(["--quiet", "--return", "--command", &command_line, "/dev/null"])
        .env_remove("KOE_HOME")
        .env_remove("KOE_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut terminal = common::KoeProcess { child, first_line: String::new() };
    // Stdin stays open until the end: at its end `script` would type end-of-file into the
    // terminal, which is not what a person does.
    let mut typing = terminal.child.stdin.take().unwrap();
    std::io::Write::write_all(&mut typing, b"correct horse\ncorrect hrose\ncorrect horse\ncorrect horse\n").unwrap();
    common::wait_until(std::time::Duration::from_secs(30), || terminal.child.try_wait().unwrap().is_some());
    drop(typing);
    let mut screen = String::new();
    std::io::Read::read_to_string(&mut terminal.child.stdout.take().unwrap(), &mut screen).unwrap();
    assert!(terminal.child.wait().unwrap().success(), "{screen}");

    let rules = screen.find(&koe_auth::password::password_rules()).unwrap_or_else(|| panic!("no rules in:\n{screen}"));
    assert!(rules < screen.find("New password for ivy").unwrap(), "the rules come first:\n{screen}");
    assert_eq!(screen.matches("New password for ivy").count(), 2, "asked again after the mismatch:\n{screen}");
    assert!(screen.contains("differ. Try again") && screen.contains("Signed up as ivy"), "{screen}");
    ok(run(&home, &["login", "ivy", "--password-stdin"], "correct horse\n"));
}

#[test]
fn clear_errors_for_bad_accounts_and_passwords() {
    let network = TestNetwork::init();
    let _server = network.serve();
    let home = network.home("carol");
    let net = network.network_file();
    let net = net.to_str().unwrap();

    let error = fails(run(&home, &["signup", "carol"], ""));
    assert!(error.contains("pass --network FILE"), "{error}");
    let error = fails(run(&home, &["signup", "admin", "--network", net, "--password-stdin"], "correct horse\n"));
    assert!(error.contains("reserved"), "{error}");
    let error = fails(run(&home, &["signup", "carol", "--network", net, "--password-stdin"], "short\n"));
    assert!(error.contains("at least 8 characters"), "{error}");
    let error = fails(run(&home, &["signup", "carol", "--network", net, "--password-stdin"], ""));
    assert!(error.contains("expected a password on stdin"), "{error}");

    ok(run(&home, &["signup", "carol", "--network", net, "--password-stdin"], "correct horse\n"));
    let error = fails(run(&home, &["signup", "carol", "--password-stdin"], "other password\n"));
    assert!(error.contains("already taken"), "{error}");
    let error = fails(run(&home, &["login", "carol", "--password-stdin"], "wrong horse\n"));
    assert!(error.contains("wrong password"), "{error}");
    let error = fails(run(&home, &["login", "nobody", "--password-stdin"], "correct horse\n"));
    assert!(error.contains("no account named nobody"), "{error}");
    // Still logged in as carol with the original password.
    ok(run(&home, &["login", "carol", "--password-stdin"], "correct horse\n"));
}

#[test]
fn password_change_and_account_deletion() {
    let network = TestNetwork::init();
    let _server = network.serve();
    let home = network.home("dave");
    let net = network.network_file();
    ok(run(&home, &["signup", "dave", "--network", net.to_str().unwrap(), "--password-stdin"], "first password\n"));
    let error = fails(run(&home, &["passwd", "--password-stdin"], "wrong password\nsecond password\n"));
    assert!(error.contains("wrong password"), "{error}");
    let out = ok(run(&home, &["passwd", "--password-stdin"], "first password\nsecond password\n"));
    assert!(out.contains("Password changed"), "{out}");
    assert!(out.contains("Logged in as dave"), "{out}");
    fails(run(&home, &["login", "dave", "--password-stdin"], "first password\n"));
    ok(run(&home, &["login", "dave", "--password-stdin"], "second password\n"));

    let error = fails(run(&home, &["delete-account", "--password-stdin"], "not dave\nsecond password\n"));
    assert!(error.contains("not confirmed"), "{error}");
    ok(run(&home, &["login", "dave", "--password-stdin"], "second password\n"));
    let out = ok(run(&home, &["delete-account", "--yes", "--password-stdin"], "second password\n"));
    assert!(out.contains("deleted"), "{out}");
    let error = fails(run(&home, &["login", "dave", "--password-stdin"], "second password\n"));
    assert!(error.contains("no account named dave"), "{error}");
}

#[test]
fn whoami_renews_a_certificate_in_its_renewal_window() {
    let network = TestNetwork::init();
    let _server = network.serve();
    let home = network.home("erin");
    let net = network.network_file();
    ok(run(&home, &["signup", "erin", "--network", net.to_str().unwrap(), "--password-stdin"], "correct horse\n"));

    // Age the certificate: same serial, device and 24 h lifetime, issued 23 h ago — signed
    // with the network's real key, as if it had simply grown old.
    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let current = Certificate::from_bytes(&b64.decode(read(&home.join("certificate")).trim()).unwrap()).unwrap();
    let signing_key = NetworkSigningKey::from_secret_text(&read(&network.secret_dir().join("signing.key"))).unwrap();
    let now = UnixTime::now().as_secs();
    let aged = CertificateBody {
        not_before: UnixTime(now - 23 * 3600),
        not_after: UnixTime(now + 3600),
        ..current.body().clone()
    }
    .sign(&signing_key);
    std::fs::write(home.join("certificate"), format!("{}\n", b64.encode(aged.to_bytes()))).unwrap();

    let offline = ok(run(&home, &["whoami", "--offline"], ""));
    assert!(!offline.contains("renewed"), "{offline}");
    let who = ok(run(&home, &["whoami"], ""));
    assert!(who.contains("renewed just now"), "{who}");
    let renewed = Certificate::from_bytes(&b64.decode(read(&home.join("certificate")).trim()).unwrap()).unwrap();
    assert!(renewed.not_after().as_secs() > now + 23 * 3600, "renewed for a full lifetime");
    assert_ne!(renewed.body().serial, current.body().serial);
}

/// `koe auth add-service-account --role gateway`: the operator's gateway logs in like any
/// device and its certificate, and `whoami`, say it is the gateway; without `--role` a service
/// account is a user, as echo123 always was.
#[test]
fn a_service_account_created_as_a_gateway_logs_in_with_the_gateway_role() {
    let network = TestNetwork::init();
    let _server = network.serve();
    let net = network.network_file();
    let (secrets, db) = (network.secret_dir(), format!("sqlite:{}", network.database().display()));
    let add = |name: &str, role: &[&str]| {
        let args = [&["auth", "add-service-account", name, "--password-stdin", "--secret-dir", secrets.to_str().unwrap(), "--db", &db][..], role].concat();
        ok(run(&network.home("operator"), &args, "a good password\n"))
    };
    let out = add("pstn", &["--role", "gateway"]);
    assert!(out.contains("Created the service account pstn with the role gateway"), "{out}");
    let out = add("echo123", &[]);
    assert!(out.contains("Created the service account echo123 with the role user"), "{out}");
    let error = fails(run(&network.home("operator"), &["auth", "add-service-account", "billing", "--role", "admin", "--secret-dir", secrets.to_str().unwrap()], ""));
    assert!(error.contains("gateway"), "the possible roles are named: {error}");

    let gateway = network.home("pstn");
    let out = ok(run(&gateway, &["login", "pstn", "--network", net.to_str().unwrap(), "--password-stdin"], "a good password\n"));
    assert!(out.contains("Logged in as pstn (role: gateway)"), "{out}");
    let who = ok(run(&gateway, &["whoami"], ""));
    assert!(who.contains("role:         gateway"), "{who}");
    assert!(who.contains("valid, signed by the network's key"), "{who}");
    let b64 = base64::engine::general_purpose::STANDARD;
    let saved = std::fs::read_to_string(gateway.join("certificate")).unwrap();
    let certificate = Certificate::from_bytes(&b64.decode(saved.trim()).unwrap()).unwrap();
    assert_eq!(certificate.role(), koe_types::Role::Gateway);

    let echo = network.home("echo123");
    let out = ok(run(&echo, &["login", "echo123", "--network", net.to_str().unwrap(), "--password-stdin"], "a good password\n"));
    assert!(!out.contains("role"), "a user's login says nothing of roles: {out}");
    let who = ok(run(&echo, &["whoami"], ""));
    assert!(!who.contains("role:"), "{who}");
}

#[test]
fn network_init_never_overwrites_a_network() {
    let network = TestNetwork::init();
    let before = std::fs::read(network.network_file()).unwrap();
    let key_before = std::fs::read(network.secret_dir().join("signing.key")).unwrap();
    let output = koe()
        .args(["network", "init", "--dir"])
        .arg(network.dir.path().join("net"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("already exists"));
    assert_eq!(std::fs::read(network.network_file()).unwrap(), before);
    assert_eq!(std::fs::read(network.secret_dir().join("signing.key")).unwrap(), key_before);
    for file in ["signing.key", "tls.key", "tls.crt"] {
        assert_eq!(mode(&network.secret_dir().join(file)), 0o600, "{file}");
    }
    assert_eq!(mode(&network.secret_dir()), 0o700);
}

#[test]
fn login_server_refuses_secrets_of_another_network_or_readable_by_others() {
    let network = TestNetwork::init();
    let other = TestNetwork::init();
    let output = koe()
        .args(["auth", "serve", "--network"])
        .arg(network.network_file())
        .arg("--secret-dir")
        .arg(other.secret_dir())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("another network"));

    let key = network.secret_dir().join("signing.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = network.serve_command().output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("chmod 600"));
}

#[test]
fn a_client_refuses_a_login_server_with_the_wrong_tls_certificate() {
    let network = TestNetwork::init();
    let impostor = TestNetwork::init();
    // The impostor answers on the port the real network file names.
    let _server = common::LoginServerProcess::spawn({
        let mut command = impostor.serve_command();
        command.arg("--listen").arg(format!("127.0.0.1:{}", network.port));
        command
    });
    let home = network.home("frank");
    let net = network.network_file();
    let error = fails(run(&home, &["signup", "frank", "--network", net.to_str().unwrap(), "--password-stdin"], "correct horse\n"));
    assert!(error.contains("not your network's login server"), "{error}");
}

#[test]
fn an_unreachable_login_server_is_named_and_a_proxy_only_when_there_is_one() {
    let network = TestNetwork::init(); // and no login server
    let home = network.home("gina");
    let net = network.network_file();
    let login = |extra: &[&str]| {
        fails(run(&home, &[extra, &["login", "gina", "--password-stdin", "--network", net.to_str().unwrap()]].concat(), "correct horse\n"))
    };
    let login_server = format!("cannot reach the login server at https://127.0.0.1:{}", network.port);

    // The login server is on loopback, which a proxy from the environment never takes.
    let error = login(&[]);
    assert!(error.contains(&login_server) && error.contains("refused"), "{error}");
    assert!(!error.to_lowercase().contains("proxy"), "no proxy is set, so none is blamed: {error}");

    let proxy = format!("127.0.0.1:{}", common::free_port());
    let error = login(&["--proxy", &format!("http://{proxy}")]);
    assert!(error.contains(&login_server) && error.contains(&format!("cannot reach the HTTP proxy {proxy}")), "{error}");
}

#[test]
fn a_broken_network_file_is_named_once_with_what_is_wrong() {
    let network = TestNetwork::init();
    let good = std::fs::read_to_string(network.network_file()).unwrap();
    let without_key: String = good.lines().filter(|line| !line.starts_with("signing_key")).map(|line| format!("{line}\n")).collect();
    let cases = [
        ("not-toml.toml", Some("name = [\n".to_string()), "invalid array"),
        ("no-key.toml", Some(without_key), "missing field `signing_key`"),
        ("unknown-field.toml", Some(good.replace("signing_key =", "signing_kee =")), "unknown field `signing_kee`"),
        ("wrong-key.toml", Some(good.replace("\"ed25519:", "\"x25519:")), "expected a key starting with \"ed25519:\""),
        ("absent.toml", None, "No such file or directory"),
    ];
    for (name, text, reason) in cases {
        let path = network.dir.path().join(name);
        if let Some(text) = text {
            std::fs::write(&path, text).unwrap();
        }
        let path = path.to_str().unwrap();
        let home = network.home("hank");
        for command in [&["login", "hank", "--password-stdin", "--network", path][..], &["node", "--listen", "127.0.0.1:0", "--network", path]] {
            let error = fails(run(&home, command, "correct horse\n"));
            assert_eq!(error.matches(path).count(), 1, "koe {command:?} names the file once: {error}");
            assert_eq!(error.matches(reason).count(), 1, "koe {command:?} says what is wrong once: {error}");
        }
    }
}

#[test]
fn every_command_has_help_and_completions_exist() {
    for path in [
        vec![],
        vec!["demo"],
        vec!["network"],
        vec!["network", "init"],
        vec!["auth"],
        vec!["auth", "serve"],
        vec!["signup"],
        vec!["login"],
        vec!["whoami"],
        vec!["logout"],
        vec!["passwd"],
        vec!["delete-account"],
        vec!["network", "add-bootstrap"],
        vec!["node"],
        vec!["up"],
        vec!["status"],
        vec!["lookup"],
        vec!["set-status"],
        vec!["contacts"],
        vec!["contacts", "add"],
        vec!["contacts", "accept"],
        vec!["contacts", "decline"],
        vec!["contacts", "remove"],
        vec!["contacts", "list"],
        vec!["chat"],
        vec!["messages"],
        vec!["completions"],
    ] {
        let output = koe().args(&path).arg("--help").output().unwrap();
        assert!(output.status.success(), "koe {path:?} --help failed");
        assert!(String::from_utf8_lossy(&output.stdout).contains("Usage:"), "{path:?}");
    }
    let output = koe().args(["completions", "bash"]).output().unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("_koe"));
}
