//! A large overlay on loopback with real sockets, in one process: `--supernodes` supernodes
//! and `--users` clients (each its own libp2p swarm, TCP connection, certificate and signed
//! presence). Measures lookup latency and hops, presence publish cost, routing throughput,
//! time to be findable again after a parent dies, and (with `--koe PATH`) the memory a
//! supernode process spends per attached client. Prints Markdown tables.
//!
//! Run by `bench/overlay.sh` (release build).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use koe_overlay::client::{ClientConfig, ClientEvent, ClientHandle, ClientNode, SendOutcome};
use koe_overlay::host_cache::HostCache;
use koe_overlay::metrics::SupernodeMetrics;
use koe_overlay::supernode::{Supernode, SupernodeConfig};
use koe_overlay::{Multiaddr, PresenceStatus};
use koe_types::network::{LoginUrl, TlsFingerprint};
use koe_types::{CertificateBody, DeviceKey, NetworkFile, NetworkName, NetworkSigningKey, UnixTime, Username};
use rand_core::{OsRng, RngCore};
use tokio::sync::watch;

struct Options {
    supernodes: usize,
    users: usize,
    lookups: usize,
    route_seconds: u64,
    koe: Option<String>,
    memory_clients: usize,
}

fn options() -> Result<Options, String> {
    let mut options = Options { supernodes: 100, users: 10_000, lookups: 2_000, route_seconds: 10, koe: None, memory_clients: 2_000 };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = || value.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--supernodes" => options.supernodes = number()?,
            "--users" => options.users = number()?,
            "--lookups" => options.lookups = number()?,
            "--route-seconds" => options.route_seconds = number()? as u64,
            "--memory-clients" => options.memory_clients = number()?,
            "--koe" => options.koe = Some(value),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(options)
}

fn random(below: usize) -> usize {
    (OsRng.next_u64() % below as u64) as usize
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * fraction).round() as usize]
}

fn ms(duration: Duration) -> String {
    format!("{:.1}", duration.as_secs_f64() * 1000.0)
}

struct Network {
    file: NetworkFile,
    key: NetworkSigningKey,
}

struct RunningSupernode {
    address: Multiaddr,
    metrics: Arc<SupernodeMetrics>,
    task: tokio::task::JoinHandle<()>,
}

struct User {
    username: Username,
    device: DeviceKey,
    handle: ClientHandle,
    parent: watch::Receiver<Option<String>>,
}

async fn start_supernode(network: &Network, bootstrap: Vec<Multiaddr>) -> RunningSupernode {
    let mut node = Supernode::new(SupernodeConfig {
        network: network.file.clone(),
        identity: DeviceKey::generate(),
        listen: "/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr"),
        bootstrap,
    })
    .expect("supernode");
    let address = node.listening_address().await;
    let metrics = node.metrics();
    let task = tokio::spawn(node.run(std::future::pending()));
    RunningSupernode { address, metrics, task }
}

fn start_user(network: &Network, name: &str, supernodes: &[String]) -> User {
    let device = DeviceKey::generate();
    let now = UnixTime::now();
    let username = Username::parse_existing(name).expect("name");
    let certificate = CertificateBody {
        network: network.file.name.clone(),
        username: username.clone(),
        device_key: device.public_key(),
        not_before: now,
        not_after: now.saturating_add(Duration::from_secs(7200)),
        serial: OsRng.next_u64() >> 1,
    }
    .sign(&network.key);
    let mut host_cache = HostCache::default();
    for address in supernodes {
        host_cache.learn(address);
    }
    let (node, handle, mut events) = ClientNode::new(ClientConfig {
        network: network.file.clone(),
        device_key: device.clone(),
        certificate,
        status: Some(PresenceStatus::Online),
        host_cache,
    })
    .expect("client");
    tokio::spawn(node.run(std::future::pending()));
    let (parent_sender, parent) = watch::channel(None);
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                ClientEvent::Attached { parent } => {
                    let _ = parent_sender.send(Some(parent));
                }
                ClientEvent::Detached { .. } => {
                    let _ = parent_sender.send(None);
                }
                ClientEvent::Received { ack, .. } => {
                    let _ = ack.send(Ok(()));
                }
                ClientEvent::HostCacheChanged(_) => {}
            }
        }
    });
    User { username, device, handle, parent }
}

async fn wait_attached(user: &mut User) {
    while user.parent.borrow().is_none() {
        if user.parent.changed().await.is_err() {
            return;
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let options = options()?;
    let key = NetworkSigningKey::generate();
    let network = Network {
        file: NetworkFile {
            name: NetworkName::parse("koe-bench").map_err(|e| e.to_string())?,
            login_url: LoginUrl { host: "127.0.0.1".into(), port: 9 },
            login_tls_fingerprint: TlsFingerprint([0; 32]),
            signing_key: key.public_key(),
            bootstrap: vec![],
        },
        key,
    };

    // Supernodes, each joining through up to three earlier ones.
    let started = Instant::now();
    let mut supernodes: Vec<RunningSupernode> = Vec::new();
    for i in 0..options.supernodes {
        let bootstrap = (0..i.min(3)).map(|_| supernodes[random(i)].address.clone()).collect();
        supernodes.push(start_supernode(&network, bootstrap).await);
    }
    eprintln!("{} supernodes up in {:?}; letting Kademlia settle", supernodes.len(), started.elapsed());
    tokio::time::sleep(Duration::from_secs(if options.supernodes > 20 { 15 } else { 2 })).await;
    let addresses: Vec<String> = supernodes.iter().map(|s| s.address.to_string()).collect();

    // Users, attaching to a random supernode each, in batches.
    let started = Instant::now();
    let mut users = Vec::with_capacity(options.users);
    for batch in (0..options.users).collect::<Vec<_>>().chunks(500) {
        let first = users.len();
        for i in batch {
            let choice = vec![addresses[random(addresses.len())].clone()];
            users.push(start_user(&network, &format!("user{i:05}"), &choice));
        }
        for user in &mut users[first..] {
            if tokio::time::timeout(Duration::from_secs(60), wait_attached(user)).await.is_err() {
                return Err(format!("{} did not attach within 60 s", user.username));
            }
        }
        eprintln!("{} users attached after {:?}", users.len(), started.elapsed());
    }
    let attach_time = started.elapsed();
    // Let the last publishes land.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stored: u64 = supernodes.iter().map(|s| s.metrics.records_stored.load(Ordering::Relaxed)).sum();
    let queries_before: u64 = supernodes.iter().map(|s| s.metrics.kad_queries.load(Ordering::Relaxed)).sum();
    let requests_before: u64 = supernodes.iter().map(|s| s.metrics.kad_query_requests.load(Ordering::Relaxed)).sum();
    eprintln!("{} users attached and published in {attach_time:?}", users.len());

    // Lookups between random pairs.
    let mut latencies = Vec::new();
    let mut missing = 0;
    for _ in 0..options.lookups {
        let (from, to) = (&users[random(users.len())], &users[random(users.len())]);
        let began = Instant::now();
        let found = from.handle.lookup(to.username.clone()).await.unwrap_or_default();
        latencies.push(began.elapsed());
        if !found.iter().any(|r| r.body().certificate.device_key() == &to.device.public_key()) {
            missing += 1;
        }
    }
    latencies.sort();
    let queries: u64 = supernodes.iter().map(|s| s.metrics.kad_queries.load(Ordering::Relaxed)).sum::<u64>() - queries_before;
    let requests: u64 =
        supernodes.iter().map(|s| s.metrics.kad_query_requests.load(Ordering::Relaxed)).sum::<u64>() - requests_before;

    // Routing throughput: many senders at once, to random recipients.
    let routed_before: Vec<u64> = supernodes.iter().map(|s| s.metrics.envelopes_routed.load(Ordering::Relaxed)).collect();
    let deadline = Instant::now() + Duration::from_secs(options.route_seconds);
    let senders = 200.min(users.len());
    let mut tasks = Vec::new();
    for _ in 0..senders {
        let from = users[random(users.len())].handle.clone();
        let recipients: Vec<Username> = (0..64).map(|_| users[random(users.len())].username.clone()).collect();
        tasks.push(tokio::spawn(async move {
            let (mut delivered, mut failed, mut i) = (0u64, 0u64, 0usize);
            while Instant::now() < deadline {
                match from.send(recipients[i % recipients.len()].clone(), b"benchmark message".to_vec()).await {
                    SendOutcome::Delivered { .. } => delivered += 1,
                    SendOutcome::Undelivered { .. } => failed += 1,
                }
                i += 1;
            }
            (delivered, failed)
        }));
    }
    let (mut delivered, mut failed) = (0, 0);
    for task in tasks {
        let (d, f) = task.await.map_err(|e| e.to_string())?;
        delivered += d;
        failed += f;
    }
    let busiest = supernodes
        .iter()
        .zip(&routed_before)
        .map(|(s, before)| s.metrics.envelopes_routed.load(Ordering::Relaxed) - before)
        .max()
        .unwrap_or(0);

    // Kill the busiest parent; time until each of its clients is findable through a new one.
    let mut children: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, user) in users.iter().enumerate() {
        if let Some(parent) = user.parent.borrow().clone() {
            children.entry(parent).or_default().push(i);
        }
    }
    let (victim_address, orphans) = children.into_iter().max_by_key(|(_, c)| c.len()).unwrap_or_default();
    let victim = supernodes.iter().position(|s| s.address.to_string() == victim_address).unwrap_or(0);
    let victim_peer = match supernodes[victim].address.iter().last() {
        Some(koe_overlay::multiaddr_protocol::P2p(peer)) => peer.to_bytes(),
        _ => Vec::new(),
    };
    supernodes[victim].task.abort();
    let killed = Instant::now();
    let observer = users
        .iter()
        .find(|u| u.parent.borrow().as_deref() != Some(victim_address.as_str()))
        .map(|u| u.handle.clone())
        .ok_or("no observer")?;
    let mut recovery = Vec::new();
    for &i in &orphans {
        loop {
            let records = observer.lookup(users[i].username.clone()).await.unwrap_or_default();
            let moved = records.iter().any(|r| {
                r.body().certificate.device_key() == &users[i].device.public_key() && r.body().parent.peer_id != victim_peer
            });
            if moved || killed.elapsed() > Duration::from_secs(30) {
                recovery.push(killed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    recovery.sort();

    let own_rss = rss_kib(std::process::id());
    println!("| overlay | value |");
    println!("|---|---|");
    println!("| supernodes / online users | {} / {} |", options.supernodes, users.len());
    println!("| users attached and published | {:.1} s ({:.0} per second) |", attach_time.as_secs_f64(), users.len() as f64 / attach_time.as_secs_f64());
    println!("| presence records stored (parent + replicas) | {stored} ({:.2} per user) |", stored as f64 / users.len() as f64);
    println!("| lookups | {} ({missing} without the device) |", latencies.len());
    println!("| lookup latency p50 / p99 / max | {} / {} / {} ms |", ms(percentile(&latencies, 0.5)), ms(percentile(&latencies, 0.99)), ms(percentile(&latencies, 1.0)));
    println!("| supernodes contacted per Kademlia query (hops) | {:.1} |", requests as f64 / queries.max(1) as f64);
    println!("| messages routed end to end | {delivered} in {} s = {:.0}/s with {senders} senders ({failed} failed) |", options.route_seconds, delivered as f64 / options.route_seconds as f64);
    println!("| busiest supernode relayed | {:.0} envelopes/s |", busiest as f64 / options.route_seconds as f64);
    println!("| parent killed: its clients findable via a new parent, p50 / p99 / max | {} / {} / {} ms ({} clients) |", ms(percentile(&recovery, 0.5)), ms(percentile(&recovery, 0.99)), ms(percentile(&recovery, 1.0)), recovery.len());
    println!("| this benchmark process RSS (all nodes) | {} MiB |", own_rss / 1024);

    if let Some(koe) = options.koe {
        memory_per_client(&koe, &network, options.memory_clients).await?;
    }
    Ok(())
}

/// Memory of a real `koe node` process before and after `count` clients attach to it.
async fn memory_per_client(koe: &str, network: &Network, count: usize) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("koe-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let network_path = dir.join("network.toml");
    std::fs::write(&network_path, network.file.to_toml()).map_err(|e| e.to_string())?;
    let port = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        socket.local_addr().map_err(|e| e.to_string())?.port()
    };
    let mut child = tokio::process::Command::new(koe)
        .arg("--home")
        .arg(dir.join("node"))
        .args(["node", "--network"])
        .arg(&network_path)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {koe}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let address = lines.next_line().await.map_err(|e| e.to_string())?.ok_or("koe node printed nothing")?;
    let pid = child.id().ok_or("no pid")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid);
    let mut users = Vec::new();
    for i in 0..count {
        users.push(start_user(network, &format!("memory{i:05}"), std::slice::from_ref(&address)));
    }
    for user in &mut users {
        wait_attached(user).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid);
    println!();
    println!("| supernode process (`koe node`) | value |");
    println!("|---|---|");
    println!("| RSS idle / with {count} attached clients | {} / {} MiB |", before / 1024, after / 1024);
    println!("| memory per attached client (connection, presence record, state) | {:.1} KiB |", (after.saturating_sub(before)) as f64 / count as f64);
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
