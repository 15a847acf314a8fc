//! `koe auth serve`: the login server as a process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use koe_auth::network_init::load_network_file;
use koe_auth::server::RateLimits;
use koe_auth::{open_store, LoginServer, LoginServerConfig, LoginServerSecrets};
use koe_types::network::LoginUrl;
use tokio::net::TcpListener;

use crate::cli::{AddServiceAccountArgs, AuthCommand, AuthServeArgs};

pub async fn run(command: AuthCommand) -> Result<()> {
    match command {
        AuthCommand::Serve(args) => serve(args).await,
        AuthCommand::AddServiceAccount(args) => add_service_account(args).await,
    }
}

/// The login URL's port, on loopback if the URL is loopback, else on every interface.
fn default_listen(url: &LoginUrl) -> SocketAddr {
    let loopback = url
        .host
        .parse::<IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(url.host == "localhost");
    let ip = if loopback {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    SocketAddr::new(ip, url.port)
}

/// The `--db` URL, else the SQLite file in the secret directory.
fn database_url(db: Option<String>, secret_dir: &std::path::Path) -> String {
    db.unwrap_or_else(|| format!("sqlite:{}", secret_dir.join("accounts.db").display()))
}

/// `koe auth add-service-account`: the operator's way to a reserved name or a role other than
/// user, straight into the account database (the login server's sign-up refuses reserved
/// names and makes only users).
async fn add_service_account(args: AddServiceAccountArgs) -> Result<()> {
    let username = koe_types::Username::parse_existing(&args.username)
        .with_context(|| format!("cannot create an account named {:?}", args.username))?;
    let role = koe_types::Role::from(args.role);
    let password = super::PasswordSource::new(args.password.password_stdin)
        .read_new(&format!("New password for {username}: "))?;
    koe_auth::password::check_new_password(&password)?;
    let hash = tokio::task::spawn_blocking(move || koe_auth::password::hash_password(&password)).await?;
    let store = open_store(&database_url(args.db, &args.secret_dir), std::time::Duration::from_secs(5))
        .await
        .context("cannot open the account database")?;
    store
        .create_account_with_role(&username, &hash, role, koe_types::UnixTime::now())
        .await
        .with_context(|| format!("cannot create the account {username}"))?;
    println!("Created the service account {username} with the role {role}: log in to it with `koe login {username}` on the service's machine.");
    Ok(())
}

async fn serve(args: AuthServeArgs) -> Result<()> {
    let network = load_network_file(&args.network)?;
    let secrets = LoginServerSecrets::load(&args.secret_dir, &network)?;
    let db = database_url(args.db, &args.secret_dir);
    let store = open_store(&db, args.db_busy_timeout)
        .await
        .context("cannot open the account database")?;
    let listen = args.listen.unwrap_or_else(|| default_listen(&network.login_url));
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let mut config = LoginServerConfig::new(network.name.clone(), secrets.signing_key, secrets.tls);
    config.certificate_lifetime = args.cert_lifetime;
    if args.no_rate_limits {
        tracing::warn!("rate limiting is off: password guessing is not slowed down");
        config.rate_limits = RateLimits::UNLIMITED;
    }
    println!(
        "login server for network {:?} listening on {} (accounts: {})",
        network.name.as_str(),
        listener.local_addr()?,
        store.describe()
    );
    LoginServer::new(config, store)
        .run(listener, super::shutdown_signal())
        .await
        .context("login server failed")
}
