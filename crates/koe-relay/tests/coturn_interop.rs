//! Koe's relay node against coturn's own TURN client, `turnutils_uclient`, with coturn's UDP echo
//! peer `turnutils_peer`: allocations, permissions, channels and data over UDP, TCP and TLS, with
//! static and short-lived (TURN REST API) credentials.
//!
//! Needs the `coturn` package. Without it the tests say so and pass, unless
//! `KOE_REQUIRE_COTURN=1` (set in CI) makes its absence a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use koe_relay::{start_relay, RelayConfig, RelayHandle, RelaySecret};
use tokio::process::{Child, Command};

fn coturn_available() -> bool {
    let found = std::process::Command::new("turnutils_uclient").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found {
        assert!(std::env::var_os("KOE_REQUIRE_COTURN").is_none(), "KOE_REQUIRE_COTURN is set but turnutils_uclient is not installed");
        eprintln!("skipped: coturn (turnutils_uclient) is not installed");
    }
    found
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").and_then(|socket| socket.local_addr()).map(|address| address.port()).unwrap_or(3480)
}

/// coturn's echo peer on a free port.
struct EchoPeer {
    child: Child,
    port: u16,
}

impl EchoPeer {
    async fn start() -> Self {
        let port = free_udp_port();
        let child = Command::new("turnutils_peer")
            .args(["-L", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        Self { child, port }
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn relay_with(users: &[(&str, &str)], secret: Option<RelaySecret>) -> RelayHandle {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap());
    config.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    config.users = users.iter().map(|(name, password)| (name.to_string(), password.to_string())).collect();
    config.secret = secret;
    config.policy.max_allocations_per_user = 0;
    config.policy.bytes_per_second_per_allocation = 0;
    start_relay(config).await.unwrap()
}

/// What `turnutils_uclient` reported at the end of a run.
#[derive(Debug)]
struct ClientReport {
    sent: u64,
    received: u64,
    lost: u64,
    output: String,
}

async fn run_uclient(server: SocketAddr, peer: &EchoPeer, extra: &[&str]) -> ClientReport {
    let port = server.port().to_string();
    let peer_port = peer.port.to_string();
    let mut args = vec!["-p", &port, "-e", "127.0.0.1", "-r", &peer_port, "-n", "50", "-m", "4", "-l", "172", "-z", "20"];
    args.extend_from_slice(extra);
    args.push("127.0.0.1");
    let output = tokio::time::timeout(Duration::from_secs(60), Command::new("turnutils_uclient").args(&args).kill_on_drop(true).output())
        .await
        .expect("turnutils_uclient finished within 60 s")
        .unwrap();
    let output = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let number_after = |label: &str| -> u64 {
        output
            .lines()
            .filter_map(|line| line.split(label).nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(|number| number.trim_end_matches(','))
            .filter_map(|number| number.parse().ok())
            .next_back()
            .unwrap_or(0)
    };
    ClientReport {
        sent: number_after("Total transmit time is").max(number_after("tot_send_msgs=")),
        received: number_after("tot_recv_msgs="),
        lost: number_after("Total lost packets"),
        output,
    }
}

fn assert_all_echoed(report: &ClientReport, what: &str) {
    assert!(report.output.contains("Total lost packets 0 (0.000000%)"), "{what}: packets lost through the relay\n{}", report.output);
    assert!(report.received >= 200, "{what}: 4 clients × 50 messages echoed back, got {} (sent {}, lost {})\n{}", report.received, report.sent, report.lost, report.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coturn_client_relays_over_udp_tcp_and_tls() {
    if !coturn_available() {
        return;
    }
    let relay = relay_with(&[("operator", "hunter22")], None).await;
    let peer = EchoPeer::start().await;
    let credentials = ["-u", "operator", "-w", "hunter22"];

    let udp = run_uclient(relay.udp, &peer, &credentials).await;
    assert_all_echoed(&udp, "TURN over UDP");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // turnutils_uclient deletes most of its UDP allocations on the way out; the rest expire.
    let left_by_udp = relay.stats().allocations;

    let mut tcp_args = credentials.to_vec();
    tcp_args.push("-t");
    let tcp = run_uclient(relay.tcp, &peer, &tcp_args).await;
    assert_all_echoed(&tcp, "TURN over TCP");

    let tls_address = relay.tls.unwrap();
    let mut tls_args = credentials.to_vec();
    tls_args.extend(["-t", "-S"]);
    let tls = run_uclient(tls_address, &peer, &tls_args).await;
    assert_all_echoed(&tls, "TURN over TLS");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(relay.stats().allocations, left_by_udp, "allocations over TCP and TLS end when their connection closes");

    let mut send_args = credentials.to_vec();
    send_args.push("-s");
    let send_indications = run_uclient(relay.udp, &peer, &send_args).await;
    assert_all_echoed(&send_indications, "Send/Data indications instead of channels");

    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = relay.stats();
    assert!(stats.packets_relayed >= 4 * 200 * 2, "4 runs of 200 messages there and back: {stats:?}");
    assert_eq!(stats.allocations_refused_quota, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coturn_client_uses_short_lived_credentials() {
    if !coturn_available() {
        return;
    }
    let relay = relay_with(&[], Some(RelaySecret::new(b"north-wind".to_vec()))).await;
    let peer = EchoPeer::start().await;
    // turnutils_uclient makes a TURN REST API username (timestamp:user) and its HMAC itself.
    let report = run_uclient(relay.udp, &peer, &["-u", "alice", "-W", "north-wind"]).await;
    assert_all_echoed(&report, "short-lived credentials");

    let wrong = run_uclient(relay.udp, &peer, &["-u", "alice", "-W", "south-wind"]).await;
    assert_eq!(wrong.received, 0, "a wrong secret relays nothing\n{}", wrong.output);
}
