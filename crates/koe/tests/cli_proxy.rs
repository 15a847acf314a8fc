//! A client whose way out is an HTTP proxy (tinyproxy, a real one): with `--proxy` it signs up,
//! logs in and attaches to a supernode through `CONNECT` tunnels, finds a user who connects
//! directly, chats with them and calls them through a relay node reached by TURN over TLS
//! through the proxy (the caller offers only relayed candidates, so that is the call's only
//! way); the proxy's log shows the tunnels. A proxy that wants
//! credentials, one that refuses them and one that is not there each get a clear error.
//! Needs tinyproxy: skipped without it, unless `KOE_REQUIRE_TINYPROXY=1` (CI) makes that a
//! failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{fails, free_port, ok, run, stdout, wait_until, KoeProcess, TestNetwork};
use koe_voice::signal::speechlike;

/// tinyproxy in the foreground with a configuration of its own, killed when dropped.
struct Tinyproxy {
    child: Child,
    port: u16,
}

impl Tinyproxy {
    fn start(dir: &Path) -> Option<Self> {
        if Command::new("tinyproxy").arg("-v").output().is_err() {
            assert!(std::env::var("KOE_REQUIRE_TINYPROXY").is_err(), "tinyproxy is required here but not installed");
            eprintln!("skipped: tinyproxy is not installed");
            return None;
        }
        let port = free_port();
        let config = dir.join("tinyproxy.conf");
        let log = dir.join("tinyproxy.log");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 50\nAllow 127.0.0.1\n\
                 BasicAuth koe proxy-secret\nLogFile \"{}\"\nLogLevel Connect\n",
                log.display()
            ),
        )
        .unwrap();
        // As root, tinyproxy drops to `nobody`, which must be able to write its log.
        std::fs::write(&log, "").unwrap();
        let _ = Command::new("chmod").args(["0666"]).arg(&log).status();
        let _ = Command::new("chmod").args(["0755"]).arg(dir).status();
        let child = Command::new("tinyproxy").arg("-d").arg("-c").arg(&config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        Some(Self { child, port })
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_client_behind_an_http_proxy_logs_in_attaches_chats_and_calls() {
    let network = TestNetwork::init();
    let Some(proxy) = Tinyproxy::start(network.dir.path()) else { return };
    let _login = network.serve();
    let net = network.network_file();
    let node = KoeProcess::node(&network.home("supernode"), &net);
    ok(common::koe().args(["network", "add-bootstrap", "--network"]).arg(&net).arg(&node.first_line).output().unwrap());
    let (alice, bob) = (network.home("alice"), network.home("bob"));
    let through = |credentials: &str| format!("http://{credentials}127.0.0.1:{}", proxy.port);
    let good = through("koe:proxy-secret@");
    let signup = |home: &Path, name: &str, extra: &[&str]| {
        run(home, &[extra, &["signup", name, "--network", net.to_str().unwrap(), "--password-stdin"]].concat(), "a good password\n")
    };

    // A proxy that wants credentials, one that refuses them, one that is not there.
    let error = fails(signup(&alice, "alice", &["--proxy", &through("")]));
    assert!(error.contains("wants credentials (407)"), "{error}");
    let error = fails(signup(&alice, "alice", &["--proxy", &through("koe:wrong@")]));
    assert!(error.contains("refused the credentials"), "{error}");
    let error = fails(signup(&alice, "alice", &["--proxy", &format!("http://127.0.0.1:{}", free_port())]));
    assert!(error.contains("cannot reach the HTTP proxy"), "{error}");
    let error = fails(signup(&alice, "alice", &["--proxy", "socks5://127.0.0.1:1080"]));
    assert!(error.contains("only http:// proxies"), "{error}");

    ok(signup(&alice, "alice", &["--proxy", &good]));
    ok(signup(&bob, "bob", &[]));
    // alice calls only through relays, so her call's only way is TURN over TLS through the proxy.
    let _alice_up = KoeProcess::daemon(&alice, &["--proxy", &good, "up", "--relay-only"]);
    let bob_heard = network.dir.path().join("bob-heard.wav");
    let _bob_up = KoeProcess::up_with(&bob, &["--auto-answer", "--record", bob_heard.to_str().unwrap()]);
    wait_until(Duration::from_secs(15), || stdout(&run(&alice, &["lookup", "bob"], "")).contains("1 device(s) online"));
    assert!(ok(run(&alice, &["chat", "bob", "hello from behind the proxy"], "")).contains("delivered"));
    assert!(ok(run(&bob, &["messages", "alice"], "")).contains("hello from behind the proxy"));

    let speech = speechlike(3);
    let speech_file = common::write_speech(network.dir.path(), "alice.wav", &speech);
    let call = ok(run(&alice, &["call", "bob", "--play", speech_file.to_str().unwrap(), "--duration", "5s"], ""));
    assert!(call.contains("talked") && call.contains("over relayed (relay "), "{call}");
    let heard = common::recording_when_written(&bob_heard);
    let similarity = common::speech_match(&speech, &heard);
    assert!(similarity > 0.8, "bob heard alice through TURN over TLS through the proxy (correlation {similarity:.3})");

    // Every connection alice made went through tinyproxy: the login server's and the
    // supernode's ports appear in its log as CONNECT targets.
    let log = std::fs::read_to_string(network.dir.path().join("tinyproxy.log")).unwrap();
    let supernode_port = node.first_line.split('/').nth(4).unwrap();
    for port in [network.port.to_string(), supernode_port.to_string()] {
        assert!(log.contains(&format!("CONNECT 127.0.0.1:{port} HTTP/1.1")), "no tunnel to port {port} in:\n{log}");
    }
    assert!(log.contains(&format!("CONNECT {}:", common::RELAY_IPS[0])), "no tunnel to the relay node in:\n{log}");
}
