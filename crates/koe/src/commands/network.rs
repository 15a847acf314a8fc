//! `koe network …`: creating a network.

use std::path::Path;

use anyhow::{bail, Context, Result};
use koe_auth::network_init::{NETWORK_FILE_NAME, SECRET_DIR_NAME};
use koe_auth::create_network;
use koe_types::network::LoginUrl;
use koe_types::NetworkName;

use crate::cli::{NetworkCommand, NetworkInitArgs};

pub fn run(command: NetworkCommand) -> Result<()> {
    match command {
        NetworkCommand::Init(args) => init(args),
        NetworkCommand::AddBootstrap { network, address } => super::node::add_bootstrap(&network, &address),
    }
}

fn default_name(dir: &Path) -> NetworkName {
    dir.file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| NetworkName::parse(name).ok())
        .unwrap_or_else(|| NetworkName::parse("koe").unwrap_or_else(|e| unreachable!("{e}")))
}

fn init(args: NetworkInitArgs) -> Result<()> {
    let name = match &args.name {
        Some(name) => NetworkName::parse(name).context("invalid --name")?,
        None => default_name(&args.dir),
    };
    let login_url = match &args.login_url {
        Some(url) => LoginUrl::parse(url)
            .with_context(|| format!("--login-url {url:?} must look like https://HOST:PORT"))?,
        None if args.auth_listen.ip().is_unspecified() => bail!(
            "--auth-listen {} is not an address clients can reach: add --login-url \
             https://HOST:{} with this machine's public name or address",
            args.auth_listen,
            args.auth_listen.port()
        ),
        None => LoginUrl {
            host: args.auth_listen.ip().to_string(),
            port: args.auth_listen.port(),
        },
    };
    let network = create_network(&args.dir, name, login_url)?;
    let network_file = args.dir.join(NETWORK_FILE_NAME);
    let secret_dir = args.dir.join(SECRET_DIR_NAME);
    println!("Created network {:?}.", network.name.as_str());
    println!("  public network file:  {}   (give it to every client and supernode)", network_file.display());
    println!("  secret directory:     {}   (login server only; keep it private)", secret_dir.display());
    println!("  login server URL:     {}", network.login_url);
    println!("  TLS fingerprint:      {}", network.login_tls_fingerprint);
    println!("  signing key:          {}", network.signing_key);
    println!();
    println!("Start the login server with:");
    println!(
        "  koe auth serve --network {} --secret-dir {} --listen {}",
        network_file.display(),
        secret_dir.display(),
        args.auth_listen
    );
    Ok(())
}
