//! Creating a network and loading the login server's secrets.
//!
//! `DIR/network.toml` is public. `DIR/secret/` (mode 0700) holds what only the login server
//! may read, each file mode 0600: `signing.key` (signs certificates), `tls.key` and `tls.crt`
//! (its HTTPS identity, pinned by fingerprint in `network.toml`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use koe_types::network::LoginUrl;
use koe_types::{NetworkFile, NetworkFileError, NetworkName, NetworkSigningKey};
use thiserror::Error;

use crate::private_file::{io_error, read_private_file, write_private_file, FileError};
use crate::tls;

pub const NETWORK_FILE_NAME: &str = "network.toml";
pub const SECRET_DIR_NAME: &str = "secret";
const SIGNING_KEY_FILE: &str = "signing.key";
const TLS_KEY_FILE: &str = "tls.key";
const TLS_CERTIFICATE_FILE: &str = "tls.crt";

#[derive(Debug, Error)]
pub enum NetworkInitError {
    #[error("{0} already exists: refusing to overwrite an existing network's keys")]
    AlreadyExists(PathBuf),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("the secret directory belongs to another network: {0}")]
    Mismatch(String),
    #[error("could not create the TLS certificate: {0}")]
    Certificate(String),
    /// A network file that cannot be read or says something wrong. The message names the file
    /// once and then the reason; the reason is not also a `source`, which a printed chain
    /// (anyhow's `{:#}`) would repeat.
    #[error("network file {path}: {reason}")]
    NetworkFile { path: PathBuf, reason: NetworkFileProblem },
}

/// Why a network file could not be used.
#[derive(Debug, Error)]
pub enum NetworkFileProblem {
    #[error("{0}")]
    Unreadable(std::io::Error),
    #[error("{0}")]
    Invalid(NetworkFileError),
}

impl NetworkInitError {
    /// Whether this is a network file that does not exist (a profile that has joined none).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Self::NetworkFile { reason: NetworkFileProblem::Unreadable(error), .. }
                if error.kind() == std::io::ErrorKind::NotFound
        )
    }
}

/// Creates a new network in `dir`: keys, TLS identity and `network.toml`. Returns the network
/// file. Nothing is overwritten; if `dir` already holds a network this fails.
pub fn create_network(
    dir: &Path,
    name: NetworkName,
    login_url: LoginUrl,
) -> Result<NetworkFile, NetworkInitError> {
    let network_path = dir.join(NETWORK_FILE_NAME);
    let secret_dir = dir.join(SECRET_DIR_NAME);
    for existing in [&network_path, &secret_dir] {
        if existing.exists() {
            return Err(NetworkInitError::AlreadyExists(existing.clone()));
        }
    }
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&secret_dir)
        .map_err(io_error(&secret_dir))?;

    let signing_key = NetworkSigningKey::generate();
    let (certificate_pem, key_pem) = tls::generate_self_signed(&login_url.host)
        .map_err(|e| NetworkInitError::Certificate(e.to_string()))?;
    let (chain, _) = tls::parse_pem(&certificate_pem, &key_pem)
        .map_err(NetworkInitError::Certificate)?;

    write_private_file(
        &secret_dir.join(SIGNING_KEY_FILE),
        format!("{}\n", signing_key.to_secret_text()).as_bytes(),
    )?;
    write_private_file(&secret_dir.join(TLS_KEY_FILE), key_pem.as_bytes())?;
    write_private_file(&secret_dir.join(TLS_CERTIFICATE_FILE), certificate_pem.as_bytes())?;

    let network = NetworkFile {
        name,
        login_url,
        login_tls_fingerprint: tls::fingerprint(&chain[0]),
        signing_key: signing_key.public_key(),
        bootstrap: Vec::new(),
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&network_path)
        .map_err(io_error(&network_path))?;
    file.write_all(network.to_toml().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_error(&network_path))?;
    Ok(network)
}

/// Reads and checks a network file. Every client and node command reads it through here, so
/// its errors look the same everywhere: the file's path once, then what is wrong.
pub fn load_network_file(path: &Path) -> Result<NetworkFile, NetworkInitError> {
    let problem = |reason| NetworkInitError::NetworkFile {
        path: path.into(),
        reason,
    };
    let text = fs::read_to_string(path)
        .map_err(|error| problem(NetworkFileProblem::Unreadable(error)))?;
    NetworkFile::from_toml(&text).map_err(|error| problem(NetworkFileProblem::Invalid(error)))
}

/// What the login server needs from its secret directory, checked against the network file.
#[derive(Debug, Clone)]
pub struct LoginServerSecrets {
    pub signing_key: NetworkSigningKey,
    pub tls: Arc<rustls::ServerConfig>,
}

impl LoginServerSecrets {
    pub fn load(secret_dir: &Path, network: &NetworkFile) -> Result<Self, NetworkInitError> {
        let key_path = secret_dir.join(SIGNING_KEY_FILE);
        let signing_key = NetworkSigningKey::from_secret_text(&read_private_file(&key_path)?)
            .map_err(|e| NetworkInitError::Invalid {
                path: key_path.clone(),
                reason: e.to_string(),
            })?;
        if signing_key.public_key() != network.signing_key {
            return Err(NetworkInitError::Mismatch(format!(
                "{} does not match the signing_key of network {:?}",
                key_path.display(),
                network.name.as_str()
            )));
        }
        let certificate_path = secret_dir.join(TLS_CERTIFICATE_FILE);
        let certificate_pem =
            fs::read_to_string(&certificate_path).map_err(io_error(&certificate_path))?;
        let key_pem = read_private_file(&secret_dir.join(TLS_KEY_FILE))?;
        let (chain, key) =
            tls::parse_pem(&certificate_pem, &key_pem).map_err(|reason| NetworkInitError::Invalid {
                path: certificate_path.clone(),
                reason,
            })?;
        let presented = tls::fingerprint(&chain[0]);
        if presented != network.login_tls_fingerprint {
            return Err(NetworkInitError::Mismatch(format!(
                "{} has fingerprint {presented}, but the network file pins {}",
                certificate_path.display(),
                network.login_tls_fingerprint
            )));
        }
        let tls = tls::server_config(chain, key).map_err(|e| NetworkInitError::Invalid {
            path: certificate_path,
            reason: e.to_string(),
        })?;
        Ok(Self { signing_key, tls })
    }
}
