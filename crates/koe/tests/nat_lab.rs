//! The NAT lab: a whole Koe network in Linux network namespaces, and clients at sites of every
//! kind a user calls from. The "internet" is a bridge (198.51.100.0/24) holding the login
//! server and two supernodes, each with its relay node beside it. The sites:
//!
//! | site | what stands between the client and the internet |
//! |---|---|
//! | public | nothing: a public address |
//! | cone1, cone2 | a home router: `MASQUERADE` (endpoint-independent mapping) |
//! | symmetric | a corporate NAT: `MASQUERADE --random-fully` (a new port per destination) |
//! | udpblocked | a home router that drops all UDP |
//! | tcponly | a firewall that lets out only TCP to ports ≥ 1024 |
//! | proxied | nothing gets out but an HTTP proxy (tinyproxy on the router) |
//!
//! Routers drop unsolicited packets on their WAN side, as real ones do (notes/nat-lab-pitfalls).
//! Every client signs up, logs in, attaches and answers calls by itself, recording them; then
//! every pair of sites calls: the callee's recording must be the caller's speech. The path each
//! call took and its setup times go into a table (printed, and written to the file named by
//! `KOE_NAT_LAB_MATRIX` for docs/BENCHMARKS.md). Pairs in which neither side is behind the
//! symmetric NAT or a UDP-blocking firewall must connect directly; cone ↔ symmetric pairs try
//! port guessing, and the table shows whether it got them a direct path. Last, a call between the two
//! UDP-less sites (relayed at both ends) loses the supernode and relay node under it: it must
//! move to the other relay and go on.
//!
//! Needs root, `ip`, `iptables` and tinyproxy; skipped without them unless `KOE_REQUIRE_NETNS=1`
//! (CI). The namespaces (and every process in them) are removed even when the test fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::netns::{self, Namespace};
use common::{stdout, wait_until};
use koe_voice::signal::speechlike;
use koe_voice::{wav, SAMPLE_RATE};

const SERVERS_IP: &str = "198.51.100.1";
/// The supernodes (and the relay nodes beside them) are two hosts: the first shares the login
/// server's address (and namespace), the second has its own namespace, so that what it sends
/// comes from its own address, as from a host of its own.
const SUPERNODE_IPS: [&str; 2] = [SERVERS_IP, "198.51.100.2"];
const LOGIN_PORT: u16 = 7400;
const SUPERNODE_PORTS: [u16; 2] = [4100, 4200];
const PROXY_PORT: u16 = 8888;
const PASSWORD: &str = "a good password\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SiteKind {
    Public,
    Cone,
    Symmetric,
    UdpBlocked,
    TcpOnly,
    Proxied,
}

impl SiteKind {
    /// Whether a direct path is expected with any other such site (no symmetric NAT, no
    /// firewall that blocks UDP).
    fn direct_capable(self) -> bool {
        matches!(self, Self::Public | Self::Cone)
    }
}

/// A client's site: its namespace, the router's (if any), and its Koe profile.
struct Site {
    name: &'static str,
    kind: SiteKind,
    client: Namespace,
    _router: Option<Namespace>,
    home: PathBuf,
    proxy: Option<String>,
    recording: PathBuf,
}

/// A process inside a namespace, killed when dropped (the namespace's removal kills it too).
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn koe_in(namespace: &Namespace) -> Command {
    let mut command = namespace.command(env!("CARGO_BIN_EXE_koe"));
    command.env_remove("KOE_LOG").env_remove("KOE_HOME").env_remove("HTTPS_PROXY").env_remove("NO_PROXY");
    command
}

/// Runs `koe` inside `namespace` with `stdin`, waiting for it.
fn run_in(namespace: &Namespace, args: &[&str], stdin: &str) -> Output {
    let mut child = koe_in(namespace).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn ok(output: Output, what: &str) -> String {
    assert!(output.status.success(), "{what} failed: {}\n{}", String::from_utf8_lossy(&output.stderr), stdout(&output));
    stdout(&output)
}

/// Starts a long-running `koe` inside `namespace` and returns it with its first stdout line.
fn spawn_in(namespace: &Namespace, args: &[&str]) -> (Process, String) {
    let mut child = koe_in(namespace).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut first_line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first_line).unwrap();
    (Process(child), first_line.trim().to_string())
}

/// The internet: a bridge with the servers' address.
fn internet() -> Namespace {
    let inet = Namespace::new("inet");
    inet.run(&["ip", "link", "add", "br0", "type", "bridge"]);
    inet.run(&["ip", "link", "set", "br0", "up"]);
    inet.run(&["ip", "addr", "add", &format!("{SERVERS_IP}/24"), "dev", "br0"]);
    // Frames crossing the bridge must not go through iptables (notes/nat-lab-pitfalls.md).
    let _ = inet.command("sh").args(["-c", "echo 0 > /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null; true"]).status();
    inet
}

/// Another server host on the internet `inet`, at `ip`. (A second address on the bridge would
/// not do: towards the first host, the kernel sends from the first host's own address, and a
/// supernode only takes another's announced addresses from the IP it connects from.)
fn server_host(inet: &Namespace, ip: &str) -> Namespace {
    let host = Namespace::new("server");
    let uplink = format!("s{}", ip.rsplit('.').next().unwrap_or("0"));
    inet.run(&["ip", "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", &host.name]);
    inet.run(&["ip", "link", "set", &uplink, "master", "br0", "up"]);
    host.run(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    host.run(&["ip", "link", "set", "eth0", "up"]);
    host
}

/// Builds site number `n` of `kind` on the internet `inet`.
fn build_site(inet: &Namespace, n: u8, name: &'static str, kind: SiteKind, dir: &Path) -> (Site, Option<Process>) {
    let client = Namespace::new(&format!("c{n}"));
    let wan_ip = format!("198.51.100.{}", 10 + n);
    let uplink = format!("v{n}");
    let home = dir.join("homes").join(name);
    let recording = dir.join(format!("{name}-heard.wav"));
    if kind == SiteKind::Public {
        inet.run(&["ip", "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", &client.name]);
        inet.run(&["ip", "link", "set", &uplink, "master", "br0", "up"]);
        client.run(&["ip", "addr", "add", &format!("{wan_ip}/24"), "dev", "eth0"]);
        client.run(&["ip", "link", "set", "eth0", "up"]);
        return (Site { name, kind, client, _router: None, home, proxy: None, recording }, None);
    }
    let router = Namespace::new(&format!("r{n}"));
    let (lan_ip, client_ip) = (format!("10.0.{n}.1"), format!("10.0.{n}.2"));
    inet.run(&["ip", "link", "add", &uplink, "type", "veth", "peer", "name", "wan", "netns", &router.name]);
    inet.run(&["ip", "link", "set", &uplink, "master", "br0", "up"]);
    router.run(&["ip", "addr", "add", &format!("{wan_ip}/24"), "dev", "wan"]);
    router.run(&["ip", "link", "set", "wan", "up"]);
    router.run(&["ip", "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", &client.name]);
    router.run(&["ip", "addr", "add", &format!("{lan_ip}/24"), "dev", "lan"]);
    router.run(&["ip", "link", "set", "lan", "up"]);
    client.run(&["ip", "addr", "add", &format!("{client_ip}/24"), "dev", "eth0"]);
    client.run(&["ip", "link", "set", "eth0", "up"]);
    client.run(&["ip", "route", "add", "default", "via", &lan_ip]);
    router.run(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
    let mut masquerade = vec!["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"];
    if kind == SiteKind::Symmetric {
        masquerade.push("--random-fully");
    }
    router.run(&masquerade);
    // Unsolicited packets from the internet stop at the router.
    router.run(&["iptables", "-A", "INPUT", "-i", "wan", "-m", "conntrack", "!", "--ctstate", "ESTABLISHED,RELATED", "-j", "DROP"]);
    let mut proxy = None;
    let mut proxy_process = None;
    match kind {
        SiteKind::UdpBlocked => router.run(&["iptables", "-A", "FORWARD", "-i", "lan", "-p", "udp", "-j", "DROP"]),
        SiteKind::TcpOnly => {
            router.run(&["iptables", "-A", "FORWARD", "-i", "lan", "-p", "tcp", "--dport", "1024:65535", "-j", "ACCEPT"]);
            router.run(&["iptables", "-A", "FORWARD", "-i", "lan", "-j", "DROP"]);
        }
        SiteKind::Proxied => {
            router.run(&["iptables", "-A", "FORWARD", "-i", "lan", "-j", "DROP"]);
            let config = dir.join(format!("tinyproxy-{name}.conf"));
            std::fs::write(&config, format!("Port {PROXY_PORT}\nListen {lan_ip}\nTimeout 600\nMaxClients 50\nAllow 10.0.{n}.0/24\n")).unwrap();
            let child = router.command("tinyproxy").arg("-d").arg("-c").arg(&config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
            proxy_process = Some(Process(child));
            proxy = Some(format!("http://{lan_ip}:{PROXY_PORT}"));
        }
        SiteKind::Public | SiteKind::Cone | SiteKind::Symmetric => {}
    }
    (Site { name, kind, client, _router: Some(router), home, proxy, recording }, proxy_process)
}

impl Site {
    /// The log `koe up` keeps in its profile (it is quiet on stderr).
    fn daemon_log(&self) -> PathBuf {
        self.home.join("koe.log")
    }

    /// `koe [--home H] [--proxy P] ARGS…`
    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["--home", self.home.to_str().unwrap()];
        if let Some(proxy) = &self.proxy {
            all.extend(["--proxy", proxy.as_str()]);
        }
        all.extend_from_slice(args);
        all
    }
}

/// One call of the matrix.
struct CallResult {
    caller: &'static str,
    callee: &'static str,
    connected: bool,
    path: String,
    relayed: bool,
    ringing_ms: Option<u64>,
    answered_ms: Option<u64>,
    similarity: f64,
    output: String,
}

fn number_after(text: &str, label: &str) -> Option<u64> {
    let rest = &text[text.find(label)? + label.len()..];
    rest.split(|c: char| !c.is_ascii_digit()).find(|part| !part.is_empty())?.parse().ok()
}

fn call(caller: &Site, callee: &Site, speech_file: &Path, speech: &[f32]) -> CallResult {
    let _ = std::fs::remove_file(&callee.recording);
    // The control socket is a file in the profile: `koe call` can ask the daemon from here.
    let output = common::run(&caller.home, &["call", callee.name, "--play", speech_file.to_str().unwrap(), "--duration", "5s"], "");
    let text = format!("{}{}", stdout(&output), common::stderr(&output));
    let path = text
        .lines()
        .filter(|line| line.starts_with("talked "))
        .find_map(|line| line.split(" over ").nth(1))
        .map(|rest| rest.split(';').next().unwrap_or_default().to_string())
        .unwrap_or_default();
    let talked = output.status.success() && text.contains("talked");
    let mut similarity = 0.0;
    if talked {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !callee.recording.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        if let Ok(heard) = wav::read_mono_48k(&callee.recording) {
            similarity = common::speech_match(speech, &heard);
        }
    }
    CallResult {
        caller: caller.name,
        callee: callee.name,
        connected: talked && similarity > 0.8,
        relayed: path.starts_with("relayed"),
        path,
        ringing_ms: number_after(&text, "ringing ("),
        answered_ms: number_after(&text, "answered after "),
        similarity,
        output: text,
    }
}

/// What became of the call whose relay died.
struct Failover {
    summary: String,
    failure: Option<String>,
}

/// The longest run of silence (10 ms windows) in `samples`, in milliseconds.
fn longest_silence_ms(samples: &[f32]) -> usize {
    let window = SAMPLE_RATE as usize / 100;
    let quiet: Vec<bool> = samples.chunks(window).map(|w| w.iter().map(|s| s * s).sum::<f32>() / (w.len() as f32) < 1e-6).collect();
    quiet.split(|&q| !q).map(<[bool]>::len).max().unwrap_or(0) * 10
}

/// `caller` calls `callee` for 15 s; when the second live statistics (about 6 s in, when ICE
/// has checked every pair) name the relay the call goes through at the caller's end, the
/// supernode (and relay node) on that host is killed.
fn relay_dies_under_a_call(caller: &Site, callee: &Site, supernodes: &mut [Process], dir: &Path) -> Failover {
    let _ = std::fs::remove_file(&callee.recording);
    let second = SAMPLE_RATE as usize;
    let speech = speechlike(16);
    let speech_file = dir.join("long-speech.wav");
    wav::write_mono(&speech_file, &speech, SAMPLE_RATE).unwrap();
    let mut call = common::koe()
        .args(["--home", caller.home.to_str().unwrap(), "call", callee.name, "--play", speech_file.to_str().unwrap(), "--duration", "15s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(call.stdout.take().unwrap()).lines().map_while(Result::ok);
    let mut output = String::new();
    let live = lines.by_ref().inspect(|line| output.push_str(&format!("{line}\n"))).filter(|line| line.starts_with("0:0")).nth(1);
    let dying = live.as_ref().and_then(|live| SUPERNODE_IPS.iter().position(|ip| live.contains(&format!("relayed (relay {ip}:"))));
    if let Some(dying) = dying {
        let _ = supernodes[dying].0.kill();
        let _ = supernodes[dying].0.wait();
    }
    for line in lines {
        output.push_str(&format!("{line}\n"));
    }
    let ended_well = call.wait().is_ok_and(|status| status.success()) && output.contains("ended: you hung up");
    let moved = output.lines().rev().find(|line| line.contains("the call moved from")).map(str::to_string);
    let heard = common::recording_when_written(&callee.recording);
    let (gap, similarity) = if heard.len() > 12 * second {
        (longest_silence_ms(&heard[2 * second..heard.len() - second]), common::speech_match(&speech[10 * second..], &heard[10 * second..]))
    } else {
        eprintln!("the callee recorded only {} s", heard.len() / second);
        (0, 0.0)
    };
    let what = format!("{} → {}", caller.name, callee.name);
    let summary = format!(
        "Relay death: {what}; the supernode and relay node at {} were killed under the call; {}; longest silence the callee heard {gap} ms; speech match afterwards {similarity:.2}.",
        dying.map_or("?", |dying| SUPERNODE_IPS[dying]),
        moved.as_deref().unwrap_or("the call did not say it moved"),
    );
    let failure = if dying.is_none() {
        Some(format!("{what}: the call was not through a lab relay:\n{output}"))
    } else if !ended_well || moved.is_none() || similarity < 0.8 {
        let log = |site: &Site| std::fs::read_to_string(site.daemon_log()).unwrap_or_default();
        Some(format!(
            "{what} did not survive its relay's death (speech match {similarity:.2}):\n{output}\n{} daemon's log:\n{}\n{} daemon's log:\n{}",
            caller.name,
            log(caller),
            callee.name,
            log(callee)
        ))
    } else {
        None
    };
    Failover { summary, failure }
}

fn matrix_table(results: &[CallResult]) -> String {
    let mut table = String::from("| caller → callee | connected | path | dial → ringing | dial → answered | speech match |\n|---|---|---|---|---|---|\n");
    for result in results {
        let _ = writeln!(
            table,
            "| {} → {} | {} | {} | {} | {} | {:.2} |",
            result.caller,
            result.callee,
            if result.connected { "yes" } else { "**no**" },
            if result.path.is_empty() { "—".to_string() } else { result.path.clone() },
            result.ringing_ms.map_or("—".into(), |ms| format!("{ms} ms")),
            result.answered_ms.map_or("—".into(), |ms| format!("{ms} ms")),
            result.similarity,
        );
    }
    let connected = results.iter().filter(|r| r.connected).count();
    let direct = results.iter().filter(|r| r.connected && !r.relayed).count();
    let _ = writeln!(table, "\n{connected} of {} pairs connected; {direct} direct, {} relayed.", results.len(), connected - direct);
    table
}

#[test]
fn every_pair_of_sites_calls_and_hears_each_other() {
    if !netns::available("NAT lab") {
        return;
    }
    if Command::new("tinyproxy").arg("-v").output().is_err() {
        assert!(std::env::var("KOE_REQUIRE_NETNS").is_err(), "the NAT lab needs tinyproxy for its proxied site");
        eprintln!("NAT lab: skipped: tinyproxy is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _ = Command::new("chmod").args(["0755"]).arg(dir.path()).status();
    let inet = internet();
    let kinds = [
        ("public", SiteKind::Public),
        ("cone1", SiteKind::Cone),
        ("cone2", SiteKind::Cone),
        ("symmetric", SiteKind::Symmetric),
        ("udpblocked", SiteKind::UdpBlocked),
        ("tcponly", SiteKind::TcpOnly),
        ("proxied", SiteKind::Proxied),
    ];
    let mut proxies = Vec::new();
    let sites: Vec<Site> = kinds
        .iter()
        .enumerate()
        .map(|(index, (name, kind))| {
            let (site, proxy) = build_site(&inet, index as u8 + 1, name, *kind, dir.path());
            proxies.extend(proxy);
            site
        })
        .collect();

    // The servers, on the internet.
    let net_dir = dir.path().join("net");
    let login = format!("{SERVERS_IP}:{LOGIN_PORT}");
    ok(
        run_in(&inet, &["network", "init", "--name", "koe-lab", "--dir", net_dir.to_str().unwrap(), "--auth-listen", &login, "--login-url", &format!("https://{login}")], ""),
        "network init",
    );
    let network_file = net_dir.join("network.toml");
    let database = format!("sqlite:{}", dir.path().join("accounts.db").display());
    let (_login_server, first) = spawn_in(
        &inet,
        &["auth", "serve", "--no-rate-limits", "--network", network_file.to_str().unwrap(), "--secret-dir", net_dir.join("secret").to_str().unwrap(), "--db", &database],
    );
    assert!(first.contains("listening on"), "login server: {first:?}");
    let mut supernodes = Vec::new();
    let second_host = server_host(&inet, SUPERNODE_IPS[1]);
    for (index, port) in SUPERNODE_PORTS.iter().enumerate() {
        let home = dir.path().join(format!("supernode{index}"));
        let listen = format!("{}:{port}", SUPERNODE_IPS[index]);
        let host = if index == 0 { &inet } else { &second_host };
        let (process, address) = spawn_in(host, &["--home", home.to_str().unwrap(), "node", "--network", network_file.to_str().unwrap(), "--listen", &listen]);
        assert!(address.contains("/p2p/"), "supernode: {address:?}");
        ok(run_in(&inet, &["network", "add-bootstrap", "--network", network_file.to_str().unwrap(), &address], ""), "add-bootstrap");
        supernodes.push(process);
    }

    // Every client signs up, logs in and answers calls by itself.
    let mut daemons = Vec::new();
    for site in &sites {
        let signup = site.args(&["signup", site.name, "--network", network_file.to_str().unwrap(), "--password-stdin"]);
        ok(run_in(&site.client, &signup, PASSWORD), &format!("{}: signup", site.name));
        let up = site.args(&["up", "--auto-answer", "--record", site.recording.to_str().unwrap()]);
        let child = koe_in(&site.client).args(&up).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        daemons.push(Process(child));
    }
    for site in &sites {
        wait_until(Duration::from_secs(30), || stdout(&common::run(&site.home, &["status"], "")).contains("/p2p/"));
    }
    for site in &sites {
        for other in &sites {
            if site.name != other.name {
                wait_until(Duration::from_secs(20), || stdout(&common::run(&site.home, &["lookup", other.name], "")).contains("1 device(s) online"));
            }
        }
    }

    let speech = speechlike(3);
    let speech_file = dir.path().join("speech.wav");
    wav::write_mono(&speech_file, &speech, SAMPLE_RATE).unwrap();
    let mut results = Vec::new();
    for (index, caller) in sites.iter().enumerate() {
        for callee in &sites[index + 1..] {
            let result = call(caller, callee, &speech_file, &speech);
            eprintln!("{} → {}: {} {:.2}", result.caller, result.callee, result.path, result.similarity);
            if result.similarity < 0.85 {
                eprintln!("{}", result.output);
            }
            results.push(result);
        }
    }
    let mut table = matrix_table(&results);
    let site = |name: &str| sites.iter().find(|site| site.name == name).unwrap();
    let failover = relay_dies_under_a_call(site("tcponly"), site("udpblocked"), &mut supernodes, dir.path());
    table.push_str(&format!("\n{}\n", failover.summary));
    eprintln!("{table}");
    if let Ok(path) = std::env::var("KOE_NAT_LAB_MATRIX") {
        std::fs::write(path, &table).unwrap();
    }

    let kind_of = |name: &str| sites.iter().find(|site| site.name == name).map(|site| site.kind).unwrap();
    let mut failures = Vec::new();
    for result in &results {
        if !result.connected {
            failures.push(format!("{} → {} did not connect (correlation {:.2}):\n{}", result.caller, result.callee, result.similarity, result.output));
        } else if kind_of(result.caller).direct_capable() && kind_of(result.callee).direct_capable() && result.relayed {
            failures.push(format!("{} → {} should be direct but went {}", result.caller, result.callee, result.path));
        }
    }
    if let Some(failure) = failover.failure {
        failures.push(failure);
    }
    drop(daemons);
    drop(supernodes);
    drop(proxies);
    assert!(failures.is_empty(), "{}\n\n{table}", failures.join("\n\n"));
}
