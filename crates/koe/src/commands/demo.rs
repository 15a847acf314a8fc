//! `koe demo`: a whole Koe network on this machine, in a temporary directory, narrated step
//! by step. Each part of the network is a small struct with a `start`, so later parts
//! (supernodes, calls, relays, the PSTN gateway) slot in as further steps.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use koe_auth::network_init::{NETWORK_FILE_NAME, SECRET_DIR_NAME};
use koe_auth::store::SqliteStore;
use koe_auth::{create_network, LoginClient, LoginServer, LoginServerConfig, LoginServerSecrets};
use koe_types::network::LoginUrl;
use koe_types::{Certificate, NetworkFile, NetworkName, Pii, UnixTime};
use koe_wire::Codec;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::cli::DemoArgs;
use crate::duration::human;
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
        let store = SqliteStore::open(&database, Duration::from_secs(5)).await?;
        let config = LoginServerConfig::new(network.name.clone(), secrets.signing_key, secrets.tls);
        let (stop, stopped) = oneshot::channel();
        let server = LoginServer::new(config, Arc::new(store));
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
    let network = login_server.network.clone();
    let alice = DemoUser::join(dir, &network, "alice", narrator).await?;
    let bob = DemoUser::join(dir, &network, "bob", narrator).await?;

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

    login_server.stop().await?;
    narrator.step("Stopped the login server. Certificates stay valid without it until they expire.");
    Ok(())
}
