//! `koe relay`, and the relay node a supernode runs beside it: configuration from the command
//! line, the one-line summary, and the credentials a supernode hands its clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use koe_auth::private_file::{read_private_file, write_private_file};
use koe_overlay::{RelayIssuer, RelayOffer};
use koe_relay::{start_relay, RelayConfig, RelayHandle, RelayPolicy, RelaySecret, RelayStats, RelayTlsIdentity};

use super::node::report;
use crate::cli::{RelayArgs, RelayLimits};
use crate::profile::Profile;

/// How long the credentials a supernode issues stay valid; a client asks again for every call.
const ISSUED_CREDENTIALS_LIFETIME: Duration = Duration::from_secs(3600);
/// The relay node's TLS certificate and key (PEM, mode 0600) in the profile of `koe node` or
/// `koe relay`. Made once and kept: clients pin the certificate's fingerprint, which a new
/// certificate on every start would break.
const RELAY_TLS_FILE: &str = "relay-tls.pem";

/// The relay node's TLS identity kept in `home`, made on first use. A file that does not hold
/// one is an error, never replaced: a new certificate would lock out the clients that pinned
/// the old one, and the operator should decide that.
pub fn relay_tls_identity(home: &Path) -> Result<RelayTlsIdentity> {
    let path = home.join(RELAY_TLS_FILE);
    if let Some(identity) = read_relay_tls_identity(&path)? {
        return Ok(identity);
    }
    let (identity, pem) = RelayTlsIdentity::generate()?;
    // Written aside and linked into place, so that a crash never leaves a half-written file
    // (which would then be "damaged" for good) and, of two nodes starting in one home, the
    // second uses the first one's certificate.
    let staged = path.with_extension(format!("new-{}", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    write_private_file(&staged, pem.as_bytes())?;
    let linked = std::fs::hard_link(&staged, &path);
    let _ = std::fs::remove_file(&staged);
    match linked {
        Ok(()) => Ok(identity),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            read_relay_tls_identity(&path)?.with_context(|| format!("{} vanished as it was made", path.display()))
        }
        Err(error) => Err(error).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// The identity kept in `path`; none if there is no such file.
fn read_relay_tls_identity(path: &Path) -> Result<Option<RelayTlsIdentity>> {
    let pem = match read_private_file(path) {
        Ok(pem) => pem,
        Err(error) if error.is_not_found() => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    RelayTlsIdentity::from_pem(&pem).map(Some).map_err(|error| {
        anyhow!(
            "the relay's TLS certificate {} is damaged ({error}); move it away to make a new one (clients then need the new fingerprint)",
            path.display()
        )
    })
}

pub fn relay_config(listen: SocketAddr, tls_listen: Option<SocketAddr>, limits: &RelayLimits) -> Result<RelayConfig> {
    let mut config = RelayConfig::new(listen);
    config.tls_listen = tls_listen;
    config.relayed_ip = limits.relayed_ip;
    for user in &limits.users {
        let Some((name, password)) = user.split_once(':') else {
            bail!("--relay-user takes NAME:PASSWORD, got {user:?}");
        };
        if name.is_empty() || password.is_empty() {
            bail!("--relay-user needs both a name and a password");
        }
        config.users.push((name.to_owned(), password.to_owned()));
    }
    config.policy = RelayPolicy {
        max_allocations: limits.max_allocations,
        max_allocations_per_user: limits.max_allocations_per_user,
        bytes_per_second_per_allocation: limits.max_kbps_per_allocation * 1000 / 8,
        allow_loopback_peers: config.policy.allow_loopback_peers,
    };
    Ok(config)
}

pub async fn run(home: Option<PathBuf>, args: RelayArgs, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let mut config = relay_config(args.listen, args.tls_listen, &args.limits)?;
    config.realm = args.realm.clone();
    if args.tls_listen.is_some() {
        config.tls = Some(relay_tls_identity(Profile::locate(home)?.home())?);
    }
    if let Some(path) = &args.secret_file {
        let secret = std::fs::read(path).with_context(|| format!("cannot read the relay secret {}", path.display()))?;
        let secret = secret.trim_ascii().to_vec();
        if secret.len() < 16 {
            bail!("the relay secret in {} is shorter than 16 bytes", path.display());
        }
        config.secret = Some(RelaySecret::new(secret));
    }
    if config.users.is_empty() && config.secret.is_none() {
        bail!("nobody could use this relay: give --relay-user NAME:PASSWORD or --secret-file FILE");
    }
    let relay = start_relay(config).await?;
    report(&describe(&relay));
    let summary_every = args.summary_every;
    let summaries = async {
        let mut ticks = tokio::time::interval(summary_every);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            report(&summary(&relay.stats()));
        }
    };
    tokio::select! {
        _ = shutdown => {}
        _ = summaries => {}
    }
    report(&summary(&relay.stats()));
    Ok(())
}

/// The relay node inside `koe node`, on `listen` (default: the supernode's port + 1) with TLS
/// on the port after; it takes the credentials this supernode issues. Its TLS certificate is
/// kept in `home`; without one (the demo) it is new on every start.
pub async fn start_beside_supernode(
    supernode: SocketAddr,
    relay_listen: Option<SocketAddr>,
    tls_listen: Option<SocketAddr>,
    limits: &RelayLimits,
    home: Option<&Path>,
) -> Result<(RelayHandle, RelayIssuer)> {
    let listen = relay_listen.unwrap_or(SocketAddr::new(supernode.ip(), next_port(supernode.port())));
    let tls_listen = tls_listen.unwrap_or(SocketAddr::new(listen.ip(), next_port(listen.port())));
    let mut config = relay_config(listen, Some(tls_listen), limits)?;
    config.tls = home.map(relay_tls_identity).transpose()?;
    let secret = RelaySecret::random();
    config.secret = Some(secret.clone());
    let relay = start_relay(config).await.context("the supernode's relay node did not start (--relay-listen, or --no-relay)")?;
    let address = relay.public_address().to_string();
    let tls_address = relay.public_tls_address().map(|address| address.to_string());
    let tls_fingerprint = relay.tls_fingerprint.clone();
    let issuer: RelayIssuer = Box::new(move |username: &str| {
        let credentials = secret.issue(username, ISSUED_CREDENTIALS_LIFETIME);
        vec![RelayOffer {
            address: address.clone(),
            tls_address: tls_address.clone(),
            tls_fingerprint: tls_fingerprint.clone(),
            username: credentials.username,
            password: credentials.password,
            expires_unix: credentials.expires_unix,
        }]
    });
    Ok((relay, issuer))
}

/// The port after `port`; any free port (0) after an unspecified one or the last one.
fn next_port(port: u16) -> u16 {
    if port == 0 {
        0
    } else {
        port.checked_add(1).unwrap_or(0)
    }
}

pub fn describe(relay: &RelayHandle) -> String {
    let mut line = format!("relay node: TURN over UDP and TCP on {}", relay.public_address());
    if let Some(tls) = relay.public_tls_address() {
        line.push_str(&format!(", TLS on {tls}"));
        if let Some(fingerprint) = &relay.tls_fingerprint {
            line.push_str(&format!(" (certificate SHA-256 {fingerprint})"));
        }
    }
    line
}

pub fn summary(stats: &RelayStats) -> String {
    format!(
        "relay: {} allocations, {} packets relayed ({:.1} MB); dropped {} over bandwidth, {} to forbidden peers, {} for TCP/TLS clients whose stream fell behind (the oldest voice first); refused {} over quota, {} over capacity, {} expired credentials; {} streams closed for not speaking TURN",
        stats.allocations,
        stats.packets_relayed,
        stats.bytes_relayed as f64 / 1e6,
        stats.packets_dropped_bandwidth,
        stats.packets_dropped_forbidden_peer,
        stats.stream_frames_dropped,
        stats.allocations_refused_quota,
        stats.allocations_refused_capacity,
        stats.requests_refused_expired,
        stats.streams_closed_not_turn,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// An operator sees voice dropped for clients whose TCP or TLS stream fell behind.
    #[test]
    fn the_summary_counts_voice_dropped_for_slow_streams() {
        let line = summary(&RelayStats { stream_frames_dropped: 7, packets_dropped_bandwidth: 2, ..RelayStats::default() });
        assert!(line.contains("dropped 2 over bandwidth, 0 to forbidden peers, 7 for TCP/TLS clients whose stream fell behind"), "{line}");
    }

    #[test]
    fn the_relay_keeps_its_tls_certificate_and_refuses_a_damaged_one() {
        let home = tempfile::tempdir().unwrap();
        let first = relay_tls_identity(home.path()).unwrap();
        let file = home.path().join(RELAY_TLS_FILE);
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(relay_tls_identity(home.path()).unwrap().fingerprint(), first.fingerprint(), "the same certificate after a restart");
        let elsewhere = tempfile::tempdir().unwrap();
        assert_ne!(relay_tls_identity(elsewhere.path()).unwrap().fingerprint(), first.fingerprint());

        let pem = std::fs::read_to_string(&file).unwrap();
        let without_key = &pem[..pem.find("-----BEGIN PRIVATE KEY").unwrap()];
        std::fs::write(&file, without_key).unwrap();
        let error = format!("{:#}", relay_tls_identity(home.path()).unwrap_err());
        assert!(error.contains(&file.display().to_string()) && error.contains("no private key"), "{error}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), without_key, "a damaged file is left for the operator");
    }
}
