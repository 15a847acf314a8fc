//! `koe demo`: a whole Koe network on this machine, in a temporary directory, narrated step
//! by step. Each part of the network is a small struct with a `start`, so later parts
//! (supernodes, calls, relays, the PSTN gateway) slot in as further steps.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use koe_auth::network_init::{NETWORK_FILE_NAME, SECRET_DIR_NAME};
use koe_auth::store::SqliteStore;
use koe_auth::{create_network, AccountStore, LoginClient, LoginServer, LoginServerConfig, LoginServerSecrets};
use koe_types::network::LoginUrl;
use koe_overlay::metrics::SupernodeMetrics;
use koe_overlay::PresenceStatus;
use koe_pstn::ledger::{open_ledger, CallFilter, LedgerStore, VoucherCode};
use koe_pstn::money::{Amount, Currency};
use koe_pstn::phone::{voiced_ms, Phone, PhoneConfig, PhoneEvent};
use koe_pstn::service::minutes_text;
use koe_types::{Certificate, DeviceKey, NetworkFile, NetworkName, Pii, Role, UnixTime, Username};
use koe_wire::Codec;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::node::{start_supernode, RelayPlacement};
use crate::cli::{DemoArgs, GatewayServeArgs, LedgerArgs, RelayLimits};
use crate::daemon::api::{Reach, Request, Response};
use crate::daemon::control::{ask, ask_streaming};
use crate::daemon::calls::AutoAnswer;
use crate::daemon::{self, DaemonOptions};
use crate::duration::human;
use crate::gateway;
use crate::profile::Profile;

/// Prints numbered steps in plain words.
struct Narrator {
    step: usize,
}

impl Narrator {
    fn step(&mut self, text: impl AsRef<str>) {
        self.step += 1;
        println!("{:>2}. {}", self.step, text.as_ref());
    }

    fn detail(&self, text: impl AsRef<str>) {
        println!("    {}", text.as_ref());
    }
}

/// The login server of the demo network, running in this process on a loopback port.
struct DemoLoginServer {
    network: NetworkFile,
    /// The account database, for what the operator does straight in it (service accounts).
    store: Arc<SqliteStore>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl DemoLoginServer {
    async fn start(dir: &Path, narrator: &mut Narrator) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot listen on loopback")?;
        let address = listener.local_addr()?;
        let network_dir = dir.join("network");
        let network = create_network(
            &network_dir,
            NetworkName::parse("koe-demo")?,
            LoginUrl {
                host: address.ip().to_string(),
                port: address.port(),
            },
        )?;
        narrator.step(format!(
            "Created the network \"koe-demo\" (what `koe network init` does) in {}.",
            network_dir.display()
        ));
        narrator.detail(format!(
            "{NETWORK_FILE_NAME} is public: login URL {}, TLS fingerprint {}…, signing key {}…",
            network.login_url,
            &network.login_tls_fingerprint.to_string()[..23],
            &network.signing_key.to_string()[..20],
        ));
        let secret_dir = network_dir.join(SECRET_DIR_NAME);
        let secrets = LoginServerSecrets::load(&secret_dir, &network)?;
        let database = secret_dir.join("accounts.db");
        let store = Arc::new(SqliteStore::open(&database, Duration::from_secs(5)).await?);
        let config = LoginServerConfig::new(network.name.clone(), secrets.signing_key, secrets.tls);
        let (stop, stopped) = oneshot::channel();
        let server = LoginServer::new(config, Arc::clone(&store) as Arc<dyn AccountStore>);
        let task = tokio::spawn(server.run(listener, async {
            let _ = stopped.await;
        }));
        narrator.step(format!(
            "Started the login server at {} over TLS; accounts go to SQLite in {}.",
            network.login_url,
            database.display()
        ));
        Ok(Self {
            network,
            store,
            stop,
            task,
        })
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await.context("login server task failed")??;
        Ok(())
    }
}

/// A user of the demo with a profile directory of their own, as on their own device.
struct DemoUser {
    name: &'static str,
    profile: Profile,
    certificate: Certificate,
}

impl DemoUser {
    async fn join(
        dir: &Path,
        network: &NetworkFile,
        name: &'static str,
        narrator: &mut Narrator,
    ) -> Result<Self> {
        let profile = Profile::open(dir.join(name))?;
        let network_path = dir.join("network").join(NETWORK_FILE_NAME);
        profile.resolve_network(Some(&network_path))?;
        let device_key = profile.device_key()?;
        let password = Pii::new(format!("{name}'s demo passphrase"));
        let client = LoginClient::new(network.clone());
        client.signup(name, &password).await?;
        let certificate = client
            .login(name, &password, &device_key.public_key(), None)
            .await?;
        profile.save_certificate(&certificate)?;
        narrator.step(format!(
            "{name} signed up and logged in from a new device (key {}).",
            device_key.public_key().fingerprint()
        ));
        narrator.detail(format!(
            "The login server signed certificate #{} for {name}, valid until {} ({} from now).",
            certificate.body().serial,
            certificate.not_after(),
            human(UnixTime::now().until(certificate.not_after()))
        ));
        Ok(Self {
            name,
            profile,
            certificate,
        })
    }
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let workspace = tempfile::Builder::new()
        .prefix("koe-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let dir = workspace.path().to_path_buf();
    println!("Koe demo: a whole Koe network on this machine, in {}.", dir.display());
    let mut narrator = Narrator { step: 0 };
    let result = run_steps(&dir, &mut narrator).await;
    if args.keep {
        let kept: PathBuf = workspace.keep();
        println!("Kept everything the demo made in {}.", kept.display());
    } else {
        println!("Removed the demo's files (pass --keep to look at them).");
    }
    result
}

async fn run_steps(dir: &Path, narrator: &mut Narrator) -> Result<()> {
    let login_server = DemoLoginServer::start(dir, narrator).await?;
    let supernodes = DemoSupernodes::start(dir, &login_server.network, SUPERNODES, narrator).await?;
    let network = supernodes.network.clone();
    let alice = DemoUser::join(dir, &network, "alice", narrator).await?;
    let bob = DemoUser::join(dir, &network, "bob", narrator).await?;
    let carol = DemoUser::join(dir, &network, "carol", narrator).await?;

    let now = UnixTime::now();
    for (checker, subject) in [(&alice, &bob), (&bob, &alice)] {
        // Peers check each other offline, with only the public network file.
        let received = Certificate::from_bytes(&subject.certificate.to_bytes())?;
        received.verify(&network.name, &network.signing_key, now)?;
        narrator.step(format!(
            "{} checked {}'s certificate offline with the network's public key: valid, \
             user {}, device {}.",
            checker.name,
            subject.name,
            received.username(),
            received.device_key().fingerprint()
        ));
    }

    let mut forged = bob.certificate.to_bytes();
    let username_offset = 1 + 1 + network.name.as_str().len() + 1;
    forged[username_offset..username_offset + 3].copy_from_slice(b"eve");
    let refusal = match Certificate::from_bytes(&forged) {
        Ok(certificate) => match certificate.verify(&network.name, &network.signing_key, now) {
            Ok(()) => bail!("a forged certificate was accepted"),
            Err(error) => error.to_string(),
        },
        Err(error) => error.to_string(),
    };
    narrator.step(format!(
        "A copy of bob's certificate with the name changed to \"eve\" is refused: {refusal}."
    ));

    let client = LoginClient::new(network.clone());
    let wrong = client
        .login("bob", &Pii::new("not bob's passphrase".into()), bob.certificate.device_key(), None)
        .await;
    match wrong {
        Ok(_) => bail!("a wrong password was accepted"),
        Err(error) => narrator.step(format!("Logging in as bob with a wrong password is refused: {error}.")),
    }
    let renewed = client
        .renew(&alice.certificate, &alice.profile.device_key()?)
        .await?;
    alice.profile.save_certificate(&renewed)?;
    narrator.step(format!(
        "alice's device renewed its certificate by proving it holds its key (no password): \
         #{} valid until {}.",
        renewed.body().serial,
        renewed.not_after()
    ));

    // alice's client answers calls by itself and records them (what `koe up --auto-answer
    // --record FILE` does).
    let recording = dir.join("alice-heard.wav");
    let answering = AutoAnswer { play: None, record: Some(recording.clone()), echo: None };
    let alice_up = DemoClient::up(&alice, &supernodes.addresses[0], Some(answering), false, narrator).await?;
    let bob_up = DemoClient::up(&bob, &supernodes.addresses[SUPERNODES - 1], None, false, narrator).await?;

    let started = Instant::now();
    let found = alice_up.ask(Request::Lookup { username: "bob".into() }).await?;
    narrator.step(format!(
        "alice looked bob up in the global index ({} ms): {}",
        started.elapsed().as_millis(),
        found.lines().next().unwrap_or_default()
    ));
    for line in found.lines().skip(1) {
        narrator.detail(line.trim());
    }

    let request = alice_up.ask(Request::ContactsAdd { username: "bob".into() }).await?;
    narrator.step(format!("alice asked bob to be her contact: {request}."));
    let pending = bob_up.ask(Request::ContactsList).await?;
    narrator.detail(format!("bob's contact list: {}", pending.trim()));
    let accepted = bob_up.ask(Request::ContactsAccept { username: "alice".into() }).await?;
    narrator.step(format!("bob {accepted}."));

    let text = "Hi bob! This went through two supernodes, sealed end to end.";
    let started = Instant::now();
    let sent = alice_up.ask(Request::Chat { username: "bob".into(), text: text.into() }).await?;
    narrator.step(format!(
        "alice sent bob a chat message: {sent} ({} ms, acknowledged by bob's device).",
        started.elapsed().as_millis()
    ));
    let history = bob_up.ask(Request::Messages { username: Some("alice".into()), limit: 5 }).await?;
    narrator.detail(format!("bob's history: {}", history.trim()));
    narrator.detail("The supernodes routed only ciphertext sealed to bob's device key.");

    let (speech, source) = demo_speech(dir)?;
    narrator.step(format!("bob calls alice, sending {source} as his microphone ({}):", speech.display()));
    let call = bob_up
        .ask(Request::Call {
            username: "alice".into(),
            play: Some(speech.display().to_string()),
            record: None,
            duration_ms: None,
            hang_up_when_played: true,
        })
        .await?;
    for line in call.lines() {
        narrator.detail(line.trim());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !recording.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    narrator.step(format!(
        "alice's client answered by itself and recorded everything it played out: {} (kept with --keep).",
        recording.display()
    ));

    let refused = alice_up.ask_expecting_failure(Request::Chat { username: "carol".into(), text: "hello?".into() }).await?;
    narrator.step(format!("A message to carol, who has an account but is not online, is reported, not lost: {refused}."));
    let nobody = alice_up.ask_expecting_failure(Request::Lookup { username: "dave".into() }).await?;
    narrator.step(format!("Looking up dave, who has no account, says so (the login server knows accounts): {nobody}."));

    // carol comes online in the mode that never shows her address to the other side: her
    // calls go through a relay node (what `koe up --relay-only` does).
    let carol_up = DemoClient::up(&carol, &supernodes.addresses[1 % SUPERNODES], None, true, narrator).await?;
    narrator.step(format!(
        "carol calls alice through a relay node: her client offers only an address on the relay beside her supernode (`koe up --relay-only`), so alice never learns carol's. Sending {source}:"
    ));
    let call = carol_up
        .ask(Request::Call { username: "alice".into(), play: Some(speech.display().to_string()), record: None, duration_ms: None, hang_up_when_played: true })
        .await?;
    for line in call.lines() {
        narrator.detail(line.trim());
    }
    if !call.contains("relayed (") {
        bail!("carol's call did not go through a relay node:\n{call}");
    }

    skypeout(dir, &login_server, &network, &bob_up, &speech, source, narrator).await?;
    carol_up.stop().await;
    alice_up.stop().await;
    bob_up.stop().await;
    let routed: u64 = supernodes.metrics.iter().map(|m| m.envelopes_routed.load(Ordering::Relaxed)).sum();
    let held: u64 = supernodes.metrics.iter().map(|m| m.records_held.load(Ordering::Relaxed)).sum();
    narrator.step(format!(
        "Stopped the clients. The supernodes relayed envelopes {routed} times (each message passes two) and hold {held} copies of presence records (each is kept by several supernodes); they expire on their own."
    ));
    supernodes.stop().await;
    login_server.stop().await?;
    narrator.step("Stopped the supernodes and the login server.");
    Ok(())
}

const SUPERNODES: usize = 3;

/// Supernodes of the demo, in this process on loopback ports, listed in the network file.
struct DemoSupernodes {
    network: NetworkFile,
    addresses: Vec<String>,
    metrics: Vec<Arc<SupernodeMetrics>>,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl DemoSupernodes {
    async fn start(dir: &Path, network: &NetworkFile, count: usize, narrator: &mut Narrator) -> Result<Self> {
        let mut network = network.clone();
        let mut this = Self { network: network.clone(), addresses: Vec::new(), metrics: Vec::new(), stops: Vec::new(), tasks: Vec::new() };
        let limits = RelayLimits::default();
        for _ in 0..count {
            let listen = SocketAddr::from(([127, 0, 0, 1], 0));
            let relay = RelayPlacement { listen: None, tls_listen: None, limits: &limits };
            let (node, address, stun) = start_supernode(&network, DeviceKey::generate(), listen, &[], Some(relay), None).await?;
            network.bootstrap.push(address.to_string());
            this.metrics.push(node.metrics());
            let (stop, stopped) = oneshot::channel::<()>();
            this.stops.push(stop);
            this.tasks.push(tokio::spawn(stun.alongside(node.run(async {
                let _ = stopped.await;
            }))));
            this.addresses.push(address.to_string());
        }
        // What `koe network add-bootstrap` does: new users learn the supernodes from the file.
        let path = dir.join("network").join(NETWORK_FILE_NAME);
        std::fs::write(&path, network.to_toml()).with_context(|| format!("cannot update {}", path.display()))?;
        narrator.step(format!(
            "Started {count} supernodes (what `koe node` does); each joined the overlay through the ones before it, and all are listed as bootstrap supernodes in {NETWORK_FILE_NAME}."
        ));
        for address in &this.addresses {
            narrator.detail(address);
        }
        this.network = network;
        Ok(this)
    }

    async fn stop(self) {
        for stop in self.stops {
            let _ = stop.send(());
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// A user's `koe up`, run in this process and driven over its real control socket.
struct DemoClient {
    home: PathBuf,
    name: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<()>>,
}

impl DemoClient {
    async fn up(user: &DemoUser, supernode: &str, auto_answer: Option<AutoAnswer>, relay_only: bool, narrator: &mut Narrator) -> Result<Self> {
        let home = user.profile.home().to_path_buf();
        let (stop, stopped) = oneshot::channel::<()>();
        let options = DaemonOptions {
            status: Some(PresenceStatus::Online),
            preferred_supernodes: vec![supernode.to_string()],
            promotion: None,
            auto_answer,
            relay_only,
            notices_on_stderr: false,
            gateway: None,
        };
        let task = tokio::spawn(daemon::run(user.profile.clone(), options, async {
            let _ = stopped.await;
        }));
        let client = Self { home, name: user.name.to_string(), stop, task };
        let parent = wait_online(&client.home, user.name).await?;
        narrator.step(format!(
            "{} started the client (what `koe up` does): attached to supernode …{} and published a signed presence record to the global index.",
            user.name,
            &parent[parent.len().saturating_sub(12)..]
        ));
        Ok(client)
    }

    /// Asks the client, as `koe` would, and returns what `koe` would print (a call's lines
    /// first); a failure is an error.
    async fn ask(&self, request: Request) -> Result<String> {
        match self.answer(request).await? {
            (text, Ok(last)) => Ok(format!("{text}{last}").trim().to_string()),
            (_, Err(error)) => bail!("{error}"),
        }
    }

    async fn ask_expecting_failure(&self, request: Request) -> Result<String> {
        match self.answer(request).await? {
            (_, Err(error)) => Ok(error),
            (_, Ok(last)) => bail!("expected a failure, got {last}"),
        }
    }

    async fn answer(&self, request: Request) -> Result<(String, Result<String, String>)> {
        let mut lines = String::new();
        let response = ask_streaming(&self.home, &request, |event| {
            lines.push_str(&super::render::event(&event));
            lines.push('\n');
        })
        .await?;
        Ok((lines, super::render::response(Some(&self.name), &response)))
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Waits for the daemon in `home` to attach to a supernode; its parent's address.
async fn wait_online(home: &Path, name: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Response::Status(status)) = ask(home, &Request::Status).await {
            if let Reach::Online { parent } = status.reach {
                return Ok(parent);
            }
        }
        if Instant::now() > deadline {
            bail!("{name} did not attach to a supernode within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The number the demo calls (any number reaches the phone, the gateway's only trunk).
const PHONE_NUMBER: &str = "+81312345678";
const PHONE_NUMBER_SHOWN: &str = "+81 3-1234-5678";
/// The keys bob presses once the phone answers, as for a phone menu.
const KEYS: &str = "1#";
/// How long after the phone answers bob presses them.
const KEYS_AFTER: Duration = Duration::from_millis(700);
/// How long the gateway may take to appear in the global index.
const GATEWAY_FOUND_WITHIN: Duration = Duration::from_secs(30);

/// SkypeOut: a gateway in this process with a phone as its carrier; bob asks the price, buys
/// credit with a voucher, calls the phone, presses keys, and is billed.
async fn skypeout(
    dir: &Path,
    login_server: &DemoLoginServer,
    network: &NetworkFile,
    caller: &DemoClient,
    speech: &Path,
    source: &str,
    narrator: &mut Narrator,
) -> Result<()> {
    let mut phone = Phone::start(PhoneConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)))).await?;
    narrator.step(format!(
        "Started a phone at sip:{} in this process (koe_pstn::phone, a small SIP user agent standing in for a carrier and a landline): it rings, answers with a chime in G.711 and says back what it hears.",
        phone.local_addr()
    ));
    let gateway = DemoGateway::start(dir, login_server, network, &phone.trunk_uri(), narrator).await?;

    let started = Instant::now();
    let quote = loop {
        match caller.answer(Request::Rate { number: PHONE_NUMBER.into() }).await? {
            (_, Ok(quote)) => break quote,
            (_, Err(_)) if started.elapsed() < GATEWAY_FOUND_WITHIN => tokio::time::sleep(Duration::from_millis(200)).await,
            (_, Err(error)) => bail!("bob found no gateway in {} s: {error}", GATEWAY_FOUND_WITHIN.as_secs()),
        }
    };
    let mut lines = quote.lines();
    narrator.step(format!(
        "bob asked the network's gateways for the price of {PHONE_NUMBER_SHOWN} (what `koe rate` does; the gateway was found in the global index after {} ms): {}",
        started.elapsed().as_millis(),
        lines.next().unwrap_or_default()
    ));
    for line in lines {
        narrator.detail(line.trim());
    }

    let voucher = gateway.voucher("100").await?;
    narrator.step(format!("The operator made a ¥100 prepaid voucher (what `koe gateway voucher create 100` does): {voucher}"));
    let redeemed = caller.ask(Request::Redeem { code: voucher.to_string() }).await?;
    narrator.step(format!("bob redeemed it (what `koe credit redeem CODE` does): {redeemed}."));

    let heard = dir.join("bob-heard-phone.wav");
    narrator.step(format!(
        "bob calls {PHONE_NUMBER_SHOWN} (what `koe call` does), sending {source}, and presses {KEYS} once the phone answers (what `koe dtmf {KEYS}` does):"
    ));
    let call = caller.ask(Request::Call {
        username: PHONE_NUMBER.into(),
        play: Some(speech.display().to_string()),
        record: Some(heard.display().to_string()),
        duration_ms: None,
        hang_up_when_played: true,
    });
    tokio::pin!(call);
    let mut press_at = None;
    let mut pressed = None;
    let call = loop {
        tokio::select! {
            call = &mut call => break call?,
            Some(event) = phone.next_event(), if press_at.is_none() => {
                if matches!(event, PhoneEvent::Answered { .. }) {
                    press_at = Some(Instant::now() + KEYS_AFTER);
                }
            }
            () = sleep_until(press_at), if pressed.is_none() => {
                pressed = Some(caller.ask(Request::Dtmf { digits: KEYS.into() }).await);
            }
        }
    };
    for line in call.lines() {
        narrator.detail(line.trim());
    }
    if let Some(Err(error)) = pressed {
        bail!("bob's key presses did not go out: {error}");
    }

    let answered = loop {
        match tokio::time::timeout(Duration::from_secs(10), phone.next_event()).await {
            Ok(Some(PhoneEvent::Ended(call))) => break call,
            Ok(Some(_)) => {}
            _ => bail!("the phone never heard the call end"),
        }
    };
    let Some(codec) = answered.codec else { bail!("the phone did not answer: {}", answered.end) };
    let phone_heard = dir.join("phone-heard.wav");
    let samples: Vec<f32> = answered.heard.iter().map(|&s| f32::from(s) / 32_768.0).collect();
    koe_voice::wav::write_mono(&phone_heard, &samples, koe_pstn::g711::G711_CLOCK_RATE_HZ)?;
    let keys: String = answered.digits.iter().map(|d| d.as_char().to_string()).collect::<Vec<_>>().join(", ");
    narrator.step(format!(
        "The phone answered {} in {codec} with its chime, heard {:.1} s of bob's voice and said it back, heard bob press {} (RFC 4733 key presses), and {} after {:.1} s.",
        answered.number,
        voiced_ms(&answered.heard) as f64 / 1000.0,
        if keys.is_empty() { "nothing".to_string() } else { keys },
        answered.end,
        answered.talked.as_secs_f64()
    ));
    narrator.detail(format!(
        "RTP: {} packets to the gateway, {} from it. What the phone heard is in {}, what bob heard in {} (kept with --keep).",
        answered.media.packets_sent,
        answered.media.packets_received,
        phone_heard.display(),
        heard.display()
    ));

    let record = gateway.last_call("bob").await?;
    let currency = Currency::default();
    let talked = record.billed_secs.unwrap_or(0);
    let amount = record.amount.unwrap_or(Amount::from_micros(0));
    narrator.step(format!(
        "The gateway's record of the call (what `koe gateway cdr` exports): {} ({}), talked {talked} s, billed as {} at {}/min (increments {}): {}; ended: {}.",
        record.number,
        record.destination,
        minutes_text(record.increment.billed_secs(talked)),
        record.price_per_minute.display(&currency),
        record.increment,
        amount.display(&currency),
        record.end.map_or("open", |end| end.as_str())
    ));
    let credit = caller.ask(Request::Credit).await?;
    let mut lines = credit.lines();
    narrator.step(format!("bob's credit now (what `koe credit` does): {}", lines.next().unwrap_or_default()));
    for line in lines {
        narrator.detail(line.trim());
    }
    gateway.stop().await?;
    phone.shutdown();
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// The operator's PSTN gateway, `koe gateway serve` run in this process, logged in as a
/// service account with the gateway role.
struct DemoGateway {
    ledger: Arc<dyn LedgerStore>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<()>>,
}

const GATEWAY_NAME: &str = "tokyo-gw";

impl DemoGateway {
    async fn start(dir: &Path, login_server: &DemoLoginServer, network: &NetworkFile, trunk: &str, narrator: &mut Narrator) -> Result<Self> {
        // What `koe auth add-service-account NAME --role gateway` does: straight into the
        // account database, since the login server's sign-up makes only users.
        let username = Username::parse_existing(GATEWAY_NAME)?;
        let password = Pii::new(format!("{GATEWAY_NAME}'s demo passphrase"));
        let hash = {
            let password = password.clone();
            tokio::task::spawn_blocking(move || koe_auth::password::hash_password(&password)).await?
        };
        login_server.store.create_account_with_role(&username, &hash, Role::Gateway, UnixTime::now()).await?;
        let profile = Profile::open(dir.join(GATEWAY_NAME))?;
        profile.resolve_network(Some(&dir.join("network").join(NETWORK_FILE_NAME)))?;
        let certificate = LoginClient::new(network.clone()).login(GATEWAY_NAME, &password, &profile.device_key()?.public_key(), None).await?;
        profile.save_certificate(&certificate)?;
        narrator.step(format!(
            "The operator created the service account {GATEWAY_NAME} with the gateway role (what `koe auth add-service-account {GATEWAY_NAME} --role gateway` does) and logged it in: certificate #{} carries the role \"{}\", the only one whose prices and bills clients believe.",
            certificate.body().serial,
            certificate.role().as_str()
        ));

        let ledger_file = profile.home().join(gateway::LEDGER_FILE);
        let args = GatewayServeArgs {
            network: None,
            ledger: LedgerArgs { db: None, db_busy_timeout: Duration::from_secs(5), currency: "JPY".into(), billed_unit: "0.01".into() },
            rates: None,
            trunks: vec![trunk.to_string()],
            sip_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            sip_external: None,
            tls_roots: None,
            caller_id: "anonymous".into(),
            max_calls_per_user: 2,
            max_cost_per_call: None,
            blocked_prefixes: Vec::new(),
            rtp_timeout: Duration::from_secs(30),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let home = profile.home().to_path_buf();
        let task = tokio::spawn(gateway::serve(profile, args, false, async {
            let _ = stopped.await;
        }));
        let parent = wait_online(&home, GATEWAY_NAME).await?;
        let ledger = open_ledger(&format!("sqlite:{}", ledger_file.display()), Duration::from_secs(5)).await?;
        narrator.step(format!(
            "Started the PSTN gateway (what `koe --home {GATEWAY_NAME} gateway serve --trunk {trunk}` does): attached to supernode …{}, listed in the global index under \"{}\", with the built-in SkypeOut prices and a SQLite ledger in {}.",
            &parent[parent.len().saturating_sub(12)..],
            koe_overlay::GATEWAY_DIRECTORY,
            ledger_file.display()
        ));
        Ok(Self { ledger, stop, task })
    }

    /// A prepaid voucher worth `amount` (what `koe gateway voucher create` does).
    async fn voucher(&self, amount: &str) -> Result<VoucherCode> {
        let code = VoucherCode::generate(&mut rand_core::OsRng);
        self.ledger.create_vouchers(std::slice::from_ref(&code), amount.parse()?, koe_pstn::ledger::now_ms()).await?;
        Ok(code)
    }

    /// The newest call record of `username`.
    async fn last_call(&self, username: &str) -> Result<koe_pstn::ledger::CallRecord> {
        let filter = CallFilter { username: Some(username.into()), since_ms: None, limit: Some(1) };
        self.ledger.calls(&filter).await?.into_iter().next().context("the gateway recorded no call")
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await.context("the gateway's task failed")?
    }
}

/// Speech for the demo call: a few of the voice samples Debian's alsa-utils ships, else a
/// synthetic speech-like sound. Written to `dir` as a WAV file.
fn demo_speech(dir: &Path) -> Result<(PathBuf, &'static str)> {
    let samples = ["Front_Center.wav", "Front_Left.wav", "Front_Right.wav"];
    let alsa = Path::new("/usr/share/sounds/alsa");
    let mut speech = Vec::new();
    for name in samples {
        match koe_voice::wav::read_mono_48k(&alsa.join(name)) {
            Ok(part) => speech.extend(part),
            Err(_) => {
                speech.clear();
                break;
            }
        }
    }
    let source = if speech.is_empty() {
        speech = koe_voice::signal::speechlike(4);
        "a synthetic speech-like sound (install alsa-utils for real speech)"
    } else {
        "three of alsa-utils' voice samples"
    };
    let path = dir.join("bob-speech.wav");
    koe_voice::wav::write_mono(&path, &speech, koe_voice::SAMPLE_RATE)?;
    Ok((path, source))
}
