//! A large overlay on loopback with real sockets, in one process: `--supernodes` supernodes
//! and `--users` clients (each its own libp2p swarm, TCP connection, certificate and signed
//! presence). Measures lookup latency and hops, presence publish cost, routing throughput,
//! time to be findable again after a parent dies, and (with `--koe PATH`) the memory a
//! supernode process spends per attached client. Prints Markdown tables.
//!
//! A process may hold only 20,000 file descriptors here, so most clients run in worker
//! processes (this same binary with `--worker`); the orchestrator runs the supernodes and a
//! thousand clients of its own, from which it measures. Every key derives from one seed, so
//! the orchestrator knows every user's device key without asking the workers.
//!
//! Run by `bench/overlay.sh` (release build).

#![allow(clippy::expect_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use koe_overlay::client::{ClientConfig, ClientEvent, ClientHandle, ClientNode, SendOutcome};
use koe_overlay::host_cache::HostCache;
use koe_overlay::{Multiaddr, PresenceStatus};
use koe_types::network::{LoginUrl, TlsFingerprint};
use koe_types::{CertificateBody, DeviceKey, NetworkFile, NetworkName, NetworkSigningKey, Role, UnixTime, Username};
use rand_core::{OsRng, RngCore};
use tokio::sync::watch;

struct Options {
    supernodes: usize,
    users: usize,
    lookups: usize,
    route_seconds: u64,
    koe: Option<String>,
    memory_clients: usize,
    workers: usize,
    worker: Option<Worker>,
}

/// What a worker process runs: users `from..from + count` attached to the listed supernodes.
struct Worker {
    seed: [u8; 32],
    supernodes_file: String,
    from: usize,
    count: usize,
}

const OWN_CLIENTS: usize = 1000;

fn options() -> Result<Options, String> {
    let mut options = Options {
        supernodes: 100,
        users: 10_000,
        lookups: 2_000,
        route_seconds: 10,
        koe: None,
        memory_clients: 2_000,
        workers: 3,
        worker: None,
    };
    let mut worker = (None, None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = || value.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--worker-seed" => worker.0 = Some(parse_seed(&value)?),
            "--worker-supernodes" => worker.1 = Some(value.clone()),
            "--worker-from" => worker.2 = Some(number()?),
            "--worker-count" => worker.3 = Some(number()?),
            "--workers" => options.workers = number()?.max(1),
            "--supernodes" => options.supernodes = number()?,
            "--users" => options.users = number()?,
            "--lookups" => options.lookups = number()?,
            "--route-seconds" => options.route_seconds = number()? as u64,
            "--memory-clients" => options.memory_clients = number()?,
            "--koe" => options.koe = Some(value),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if let (Some(seed), Some(supernodes_file), Some(from), Some(count)) = worker {
        options.worker = Some(Worker { seed, supernodes_file, from, count });
    }
    Ok(options)
}

fn parse_seed(hex: &str) -> Result<[u8; 32], String> {
    let mut seed = [0u8; 32];
    if hex.len() != 64 {
        return Err("a seed is 64 hex digits".into());
    }
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(seed)
}

fn seed_hex(seed: &[u8; 32]) -> String {
    seed.iter().map(|b| format!("{b:02x}")).collect()
}

/// User `index`'s device key, the same in every process of one run.
fn device_of(seed: &[u8; 32], index: usize) -> DeviceKey {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(seed);
    hasher.update((index as u64).to_be_bytes());
    DeviceKey::from_seed(hasher.finalize().into())
}

fn username_of(index: usize) -> String {
    format!("user{index:05}")
}

fn network_of(seed: &[u8; 32]) -> Network {
    let key = NetworkSigningKey::from_seed(*seed);
    Network {
        file: NetworkFile {
            name: NetworkName::parse("koe-bench").expect("name"),
            login_url: LoginUrl { host: "127.0.0.1".into(), port: 9 },
            login_tls_fingerprint: TlsFingerprint([0; 32]),
            signing_key: key.public_key(),
            bootstrap: vec![],
        },
        key,
    }
}

/// Worker mode: run the given users until stdin closes.
async fn run_worker(worker: Worker) -> Result<(), String> {
    let network = network_of(&worker.seed);
    let supernodes: Vec<String> = std::fs::read_to_string(&worker.supernodes_file)
        .map_err(|e| e.to_string())?
        .lines()
        .map(str::to_string)
        .collect();
    let mut users = Vec::new();
    for index in worker.from..worker.from + worker.count {
        let choice = vec![supernodes[random(supernodes.len())].clone()];
        users.push(start_user(&network, index, device_of(&worker.seed, index), &choice));
        if users.len() % 100 == 0 {
            // Pace the handshakes so two cores are not swamped all at once: wait for this
            // hundred to attach before starting the next.
            let batch = users.len() - 100;
            for user in &mut users[batch..] {
                if tokio::time::timeout(Duration::from_secs(600), wait_attached(user)).await.is_err() {
                    return Err(format!("{} did not attach within 600 s", user.username));
                }
            }
        }
    }
    for user in &mut users {
        if tokio::time::timeout(Duration::from_secs(600), wait_attached(user)).await.is_err() {
            return Err(format!("{} did not attach within 600 s", user.username));
        }
    }
    println!("attached {}", users.len());
    // Until the orchestrator closes our stdin (or dies).
    let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await;
    Ok(())
}

/// Starts a worker process for users `from..from + count`; the receiver fires once all of
/// them are attached.
async fn spawn_worker(
    seed: &[u8; 32],
    supernodes_file: &std::path::Path,
    from: usize,
    count: usize,
) -> Result<(tokio::process::Child, tokio::sync::oneshot::Receiver<()>), String> {
    let mut child = tokio::process::Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
        .args(["--worker-seed", &seed_hex(seed)])
        .arg("--worker-supernodes")
        .arg(supernodes_file)
        .args(["--worker-from", &from.to_string(), "--worker-count", &count.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (ready, attached) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready);
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("worker {from}..{}: {line}", from + count);
            if line.starts_with("attached") {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
        }
    });
    Ok((child, attached))
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

/// A `koe node` process with its metrics endpoint.
struct RunningSupernode {
    address: Multiaddr,
    metrics_port: u16,
    child: tokio::process::Child,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn start_supernode(koe: &str, home: &std::path::Path, network_file: &std::path::Path) -> Result<RunningSupernode, String> {
    let metrics_port = free_port();
    let mut child = tokio::process::Command::new(koe)
        .arg("--home")
        .arg(home)
        .args(["node", "--network"])
        .arg(network_file)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
        .args(["--summary-every", "3600s"])
        // A hundred supernodes share two cores: one runtime thread each is plenty.
        .env("TOKIO_WORKER_THREADS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {koe}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let address = lines.next_line().await.map_err(|e| e.to_string())?.ok_or("koe node printed nothing")?;
    let address = address.parse().map_err(|e| format!("{address}: {e}"))?;
    Ok(RunningSupernode { address, metrics_port, child })
}

/// One metric from a supernode's Prometheus endpoint (0 if it cannot be read).
async fn scrape(port: u16, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return 0 };
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let mut page = String::new();
    let _ = stream.read_to_string(&mut page).await;
    page.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

async fn each(supernodes: &[RunningSupernode], name: &str) -> Vec<u64> {
    let mut values = Vec::new();
    for supernode in supernodes {
        values.push(scrape(supernode.metrics_port, name).await);
    }
    values
}

async fn total(supernodes: &[RunningSupernode], name: &str) -> u64 {
    each(supernodes, name).await.iter().sum()
}

struct User {
    username: Username,
    device: DeviceKey,
    handle: ClientHandle,
    parent: watch::Receiver<Option<String>>,
}

fn start_user(network: &Network, index: usize, device: DeviceKey, supernodes: &[String]) -> User {
    let now = UnixTime::now();
    let username = Username::parse_existing(&username_of(index)).expect("name");
    let certificate = CertificateBody {
        network: network.file.name.clone(),
        username: username.clone(),
        device_key: device.public_key(),
        not_before: now,
        not_after: now.saturating_add(Duration::from_secs(7200)),
        serial: OsRng.next_u64() >> 1,
        role: Role::User,
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
        blocked: Vec::new(),
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
                ClientEvent::HostCacheChanged(_) | ClientEvent::Unreachable { .. } => {}
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
    if let Some(worker) = options.worker {
        return run_worker(worker).await;
    }
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    let network = network_of(&seed);

    // Supernodes: real `koe node` processes; the first three are the network's bootstrap list.
    let koe = options.koe.clone().ok_or("--koe PATH (the koe binary) is required: supernodes are koe node processes")?;
    if options.supernodes == 0 {
        // Only the memory table (`--supernodes 0`).
        return memory_per_client(&koe, &seed, &network, options.memory_clients).await;
    }
    let work = std::env::temp_dir().join(format!("koe-overlay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let network_file = work.join("network.toml");
    let mut file = network.file.clone();
    std::fs::write(&network_file, file.to_toml()).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut supernodes: Vec<RunningSupernode> = Vec::new();
    for i in 0..options.supernodes {
        let node = start_supernode(&koe, &work.join(format!("node{i}")), &network_file).await?;
        if i < 3 {
            file.bootstrap.push(node.address.to_string());
            std::fs::write(&network_file, file.to_toml()).map_err(|e| e.to_string())?;
        }
        supernodes.push(node);
    }
    eprintln!("{} supernodes up in {:?}; letting Kademlia settle", supernodes.len(), started.elapsed());
    tokio::time::sleep(Duration::from_secs(if options.supernodes > 20 { 15 } else { 2 })).await;
    let addresses: Vec<String> = supernodes.iter().map(|s| s.address.to_string()).collect();
    let supernodes_file = work.join("supernodes.txt");
    std::fs::write(&supernodes_file, addresses.join("\n")).map_err(|e| e.to_string())?;

    // Users: a thousand here to measure from, the rest in worker processes.
    let started = Instant::now();
    let own = OWN_CLIENTS.min(options.users);
    let mut users = Vec::with_capacity(own);
    for index in 0..own {
        let choice = vec![addresses[random(addresses.len())].clone()];
        users.push(start_user(&network, index, device_of(&seed, index), &choice));
    }
    for user in &mut users {
        if tokio::time::timeout(Duration::from_secs(120), wait_attached(user)).await.is_err() {
            return Err(format!("{} did not attach within 120 s", user.username));
        }
    }
    let remote = options.users - own;
    let mut workers = Vec::new();
    let per_worker = remote.div_ceil(options.workers);
    let mut from = own;
    while from < options.users {
        let count = per_worker.min(options.users - from);
        workers.push(spawn_worker(&seed, &supernodes_file, from, count).await?.0);
        from += count;
    }
    // Workers say "attached" on stdout; wait until every user is in the index.
    let expected_records = options.users as u64;
    loop {
        let held_users = total(&supernodes, "koe_supernode_attached_clients").await;
        if held_users >= expected_records {
            break;
        }
        if started.elapsed() > Duration::from_secs(1500) {
            return Err(format!("only {held_users} of {expected_records} users attached in 25 min"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let attach_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stored = total(&supernodes, "koe_supernode_presence_stored_total").await;
    let queries_before = total(&supernodes, "koe_supernode_kad_queries_total").await;
    let requests_before = total(&supernodes, "koe_supernode_kad_query_requests_total").await;
    eprintln!("{} users attached and published in {attach_time:?}", options.users);

    // Lookups from this process's clients of random users anywhere.
    let mut latencies = Vec::new();
    let mut missing = 0;
    for _ in 0..options.lookups {
        let from = &users[random(users.len())];
        let target = random(options.users);
        let expected = device_of(&seed, target).public_key();
        let began = Instant::now();
        let found = from
            .handle
            .lookup(Username::parse_existing(&username_of(target)).expect("name"))
            .await
            .unwrap_or_default();
        latencies.push(began.elapsed());
        if !found.iter().any(|r| r.body().certificate.device_key() == &expected) {
            missing += 1;
        }
    }
    latencies.sort();
    let queries = total(&supernodes, "koe_supernode_kad_queries_total").await - queries_before;
    let requests = total(&supernodes, "koe_supernode_kad_query_requests_total").await - requests_before;

    // Routing throughput: many senders at once, to random recipients anywhere.
    let routed_before = each(&supernodes, "koe_supernode_envelopes_routed_total").await;
    let route_started = Instant::now();
    let deadline = route_started + Duration::from_secs(options.route_seconds);
    let senders = 200.min(users.len());
    let mut tasks = Vec::new();
    for sender in 0..senders {
        let from = users[sender * users.len() / senders].handle.clone();
        let recipients: Vec<Username> =
            (0..64).map(|_| Username::parse_existing(&username_of(random(options.users))).expect("name")).collect();
        tasks.push(tokio::spawn(async move {
            let (mut delivered, mut failed, mut i) = (0u64, 0u64, 0usize);
            while Instant::now() < deadline {
                match from.send(recipients[i % recipients.len()].clone(), b"benchmark message".to_vec(), false).await {
                    SendOutcome::Delivered { .. } => delivered += 1,
                    SendOutcome::Undelivered { .. } | SendOutcome::Offline | SendOutcome::Kept { .. } | SendOutcome::NotKept(_) => failed += 1,
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
    let route_time = route_started.elapsed().as_secs_f64();
    let busiest = each(&supernodes, "koe_supernode_envelopes_routed_total")
        .await
        .iter()
        .zip(&routed_before)
        .map(|(after, before)| after - before)
        .max()
        .unwrap_or(0);

    // Kill the parent of most of this process's clients; time until each of them is findable
    // through a new parent.
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
    let victim_children = scrape(supernodes[victim].metrics_port, "koe_supernode_attached_clients").await;
    let _ = supernodes[victim].child.kill().await;
    let killed = Instant::now();
    // Observers attached elsewhere, taken in turn, so that the polling spreads over many
    // parents instead of making one of them the bottleneck.
    let observers: Vec<ClientHandle> = users
        .iter()
        .filter(|u| u.parent.borrow().as_deref().is_some_and(|p| p != victim_address))
        .take(64)
        .map(|u| u.handle.clone())
        .collect();
    if observers.is_empty() {
        return Err("no observer".into());
    }
    // One poller per orphan, so the measurement itself does not queue.
    let mut pollers = Vec::new();
    for (k, &i) in orphans.iter().enumerate() {
        let observer = observers[k % observers.len()].clone();
        let username = users[i].username.clone();
        let device = users[i].device.public_key();
        let victim_peer = victim_peer.clone();
        let mut parent = users[i].parent.clone();
        let victim_address = victim_address.clone();
        pollers.push(tokio::spawn(async move {
            let reattached = async {
                loop {
                    if parent.borrow().as_deref().is_some_and(|p| p != victim_address) {
                        return Some(killed.elapsed());
                    }
                    if parent.changed().await.is_err() {
                        return None;
                    }
                }
            };
            let reattached = tokio::time::timeout(Duration::from_secs(60), reattached).await.ok().flatten();
            while killed.elapsed() < Duration::from_secs(60) {
                let records = observer.lookup(username.clone()).await.unwrap_or_default();
                if records
                    .iter()
                    .any(|r| r.body().certificate.device_key() == &device && r.body().parent.peer_id != victim_peer)
                {
                    return (reattached, Some(killed.elapsed()));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (reattached, None)
        }));
    }
    let mut recovery = Vec::new();
    let mut reattach = Vec::new();
    for poller in pollers {
        if let Ok((reattached, found)) = poller.await {
            reattach.extend(reattached);
            recovery.extend(found);
        }
    }
    recovery.sort();
    reattach.sort();

    let own_rss = rss_kib(std::process::id());
    println!("| overlay | value |");
    println!("|---|---|");
    println!("| supernodes / online users | {} / {} ({} worker processes) |", options.supernodes, options.users, workers.len());
    println!("| users attached and published | {:.1} s ({:.0} per second) |", attach_time.as_secs_f64(), options.users as f64 / attach_time.as_secs_f64());
    println!("| presence records stored (parent + replicas) | {stored} ({:.2} per user) |", stored as f64 / options.users as f64);
    println!("| lookups of random users | {} ({missing} without the device) |", latencies.len());
    println!("| lookup latency p50 / p99 / max | {} / {} / {} ms |", ms(percentile(&latencies, 0.5)), ms(percentile(&latencies, 0.99)), ms(percentile(&latencies, 1.0)));
    println!("| supernodes contacted per Kademlia query (hops) | {:.1} |", requests as f64 / queries.max(1) as f64);
    println!("| messages delivered end to end (lookup + seal + route + ack) | {delivered} in {route_time:.1} s = {:.0}/s with {senders} senders ({failed} failed) |", delivered as f64 / route_time);
    println!("| busiest supernode relayed | {:.0} envelopes/s |", busiest as f64 / route_time);
    println!("| parent with {victim_children} clients killed: its clients findable via a new parent, p50 / p99 / max | {} / {} / {} ms ({} of {} measured) |", ms(percentile(&recovery, 0.5)), ms(percentile(&recovery, 0.99)), ms(percentile(&recovery, 1.0)), recovery.len(), orphans.len());
    println!("| … of which attached to a new parent, p50 / p99 / max | {} / {} / {} ms ({} of {}) |", ms(percentile(&reattach, 0.5)), ms(percentile(&reattach, 0.99)), ms(percentile(&reattach, 1.0)), reattach.len(), orphans.len());
    let mut supernode_rss = Vec::new();
    for supernode in &supernodes {
        if let Some(pid) = supernode.child.id() {
            supernode_rss.push(rss_kib(pid));
        }
    }
    println!("| supernode process RSS, mean / max | {} / {} MiB |", supernode_rss.iter().sum::<u64>() / supernode_rss.len().max(1) as u64 / 1024, supernode_rss.iter().max().unwrap_or(&0) / 1024);
    println!("| measuring process RSS ({} clients) | {} MiB |", users.len(), own_rss / 1024);
    drop(workers);

    drop(supernodes);
    memory_per_client(&koe, &seed, &network, options.memory_clients).await?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Memory of a real `koe node` process before and after `count` clients attach to it.
async fn memory_per_client(koe: &str, seed: &[u8; 32], network: &Network, count: usize) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("koe-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let network_path = dir.join("network.toml");
    std::fs::write(&network_path, network.file.to_toml()).map_err(|e| e.to_string())?;
    let mut node = start_supernode(koe, &dir.join("node"), &network_path).await?;
    let address = node.address.to_string();
    let pid = node.child.id().ok_or("no pid")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid);
    let address_file = dir.join("supernode.txt");
    std::fs::write(&address_file, &address).map_err(|e| e.to_string())?;
    let (_clients, attached) = spawn_worker(seed, &address_file, 50_000, count).await?;
    tokio::time::timeout(Duration::from_secs(300), attached)
        .await
        .map_err(|_| "the memory clients did not attach in 5 min")?
        .map_err(|_| "the memory worker died")?;
    // Let presence publishing and first pings settle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_kib(pid);
    println!();
    println!("| supernode process (`koe node`) | value |");
    println!("|---|---|");
    println!("| RSS idle / with {count} attached clients | {} / {} MiB |", before / 1024, after / 1024);
    println!("| memory per attached client (connection, presence record, state) | {:.1} KiB |", (after.saturating_sub(before)) as f64 / count as f64);
    let _ = node.child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
