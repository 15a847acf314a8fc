//! The client profile: one directory per device and network, holding the device key (created
//! once, mode 0600), a copy of the network file, and the current certificate. The directory
//! is `--home`, else `$KOE_HOME`, else `$XDG_DATA_HOME/koe`, else `~/.local/share/koe`.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use koe_auth::private_file::{read_private_file, replace_private_file, write_private_file, FileError};
use koe_auth::renewal::{renewal_state, RenewalState};
use koe_auth::network_init::load_network_file;
use koe_auth::LoginClient;
use koe_types::{Certificate, DeviceKey, NetworkFile, UnixTime};
use koe_wire::Codec;

const DEVICE_KEY_FILE: &str = "device.key";
const NETWORK_FILE: &str = "network.toml";
const CERTIFICATE_FILE: &str = "certificate";
/// The user's settings (`koe config`): TOML, every key optional.
const CONFIG_FILE: &str = "config.toml";

/// What `koe config set` changes. Every field is optional; the default is said beside it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The home country (ISO 3166 alpha-2, e.g. JP), for phone numbers dialled in national
    /// format (`090-1234-5678`) [default: none; numbers must start with +].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Profile {
    home: PathBuf,
}

/// What [`Profile::fresh_certificate`] found and did.
#[derive(Debug)]
pub enum CertificateStatus {
    NotLoggedIn,
    Valid(Certificate),
    Renewed(Certificate),
    /// Due for renewal but the login server could not renew it; still valid for now.
    RenewalFailed(Certificate, String),
    Expired(Certificate),
}

impl Profile {
    /// The profile directory chosen by flag, environment or XDG rules; created (mode 0700) if
    /// missing.
    pub fn locate(home: Option<PathBuf>) -> Result<Self> {
        let home = match home {
            Some(home) => home,
            None => default_home()?,
        };
        Self::open(home)
    }

    pub fn open(home: PathBuf) -> Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&home)
            .with_context(|| format!("cannot create profile directory {}", home.display()))?;
        Ok(Self { home })
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    /// This device's key, created on first use. Two processes starting at once agree on one key:
    /// the file is created exclusively and the loser reads the winner's.
    pub fn device_key(&self) -> Result<DeviceKey> {
        let path = self.home.join(DEVICE_KEY_FILE);
        match read_private_file(&path) {
            Ok(text) => {
                return DeviceKey::from_secret_text(&text)
                    .with_context(|| format!("device key {} is damaged", path.display()))
            }
            Err(error) if error.is_not_found() => {}
            Err(error) => return Err(error.into()),
        }
        let key = DeviceKey::generate();
        let staged = path.with_extension(format!("new-{}", std::process::id()));
        let _ = fs::remove_file(&staged);
        write_private_file(&staged, format!("{}\n", key.to_secret_text()).as_bytes())?;
        let linked = fs::hard_link(&staged, &path);
        let _ = fs::remove_file(&staged);
        match linked {
            Ok(()) => Ok(key),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => self.device_key(),
            Err(error) => Err(error).with_context(|| format!("cannot create {}", path.display())),
        }
    }

    /// The network this profile belongs to, if it has joined one.
    pub fn network(&self) -> Result<Option<NetworkFile>> {
        match load_network_file(&self.home.join(NETWORK_FILE)) {
            Ok(network) => Ok(Some(network)),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// The network from `--network FILE` if given (saved into the profile), else the saved one.
    pub fn resolve_network(&self, flag: Option<&Path>) -> Result<NetworkFile> {
        match flag {
            Some(path) => {
                // The error names the file once, with what is wrong in it.
                let network = load_network_file(path)?;
                self.adopt_network(&network)?;
                Ok(network)
            }
            None => self.network()?.with_context(|| {
                format!(
                    "this profile ({}) has no network yet: pass --network FILE",
                    self.home.display()
                )
            }),
        }
    }

    /// Saves `network` as this profile's network. Refuses to switch networks while logged in
    /// to another, so a certificate never silently ends up beside the wrong network file.
    fn adopt_network(&self, network: &NetworkFile) -> Result<()> {
        if let Some(current) = self.network()? {
            if current == *network {
                return Ok(());
            }
            let same_network =
                current.name == network.name && current.signing_key == network.signing_key;
            if !same_network && self.certificate()?.is_some() {
                bail!(
                    "this profile is logged in to network {:?}; run `koe logout` first or use \
                     another --home for network {:?}",
                    current.name.as_str(),
                    network.name.as_str()
                );
            }
        }
        let path = self.home.join(NETWORK_FILE);
        replace_private_file(&path, network.to_toml().as_bytes())?;
        Ok(())
    }

    pub fn certificate(&self) -> Result<Option<Certificate>> {
        let path = self.home.join(CERTIFICATE_FILE);
        let text = match read_private_file(&path) {
            Ok(text) => text,
            Err(error) if error.is_not_found() => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let bytes = STANDARD
            .decode(text.trim())
            .with_context(|| format!("certificate file {} is damaged", path.display()))?;
        Certificate::from_bytes(&bytes)
            .map(Some)
            .with_context(|| format!("certificate file {} is damaged", path.display()))
    }

    pub fn save_certificate(&self, certificate: &Certificate) -> Result<()> {
        let text = format!("{}\n", STANDARD.encode(certificate.to_bytes()));
        replace_private_file(&self.home.join(CERTIFICATE_FILE), text.as_bytes())?;
        Ok(())
    }

    /// The user's settings; defaults when there is no file yet.
    pub fn config(&self) -> Result<UserConfig> {
        let path = self.home.join(CONFIG_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("{} is not a valid Koe config file", path.display())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(UserConfig::default()),
            Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn save_config(&self, config: &UserConfig) -> Result<()> {
        let text = toml::to_string(config).context("cannot write the config")?;
        replace_private_file(&self.home.join(CONFIG_FILE), text.as_bytes())?;
        Ok(())
    }

    /// The home country set with `koe config set country`, checked.
    pub fn home_country(&self) -> Result<Option<koe_pstn::number::HomeCountry>> {
        self.config()?
            .country
            .map(|code| koe_pstn::number::HomeCountry::parse(&code).map_err(|error| anyhow::anyhow!("the configured country: {error}")))
            .transpose()
    }

    /// Removes the certificate; returns whether there was one.
    pub fn forget_certificate(&self) -> Result<bool> {
        let path = self.home.join(CERTIFICATE_FILE);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(FileError::Io { path, source: error }.into()),
        }
    }

    /// The current certificate, renewed first if it is in its renewal window (unless
    /// `offline`). A failed renewal is reported, not fatal, while the certificate is valid.
    pub async fn fresh_certificate(&self, offline: bool) -> Result<CertificateStatus> {
        let Some(certificate) = self.certificate()? else {
            return Ok(CertificateStatus::NotLoggedIn);
        };
        match renewal_state(&certificate, UnixTime::now()) {
            RenewalState::Expired => Ok(CertificateStatus::Expired(certificate)),
            RenewalState::Fresh { .. } => Ok(CertificateStatus::Valid(certificate)),
            RenewalState::RenewNow if offline => Ok(CertificateStatus::Valid(certificate)),
            RenewalState::RenewNow => {
                let Some(network) = self.network()? else {
                    return Ok(CertificateStatus::RenewalFailed(
                        certificate,
                        "the profile has no network file".into(),
                    ));
                };
                let device_key = self.device_key()?;
                match LoginClient::new(network).renew(&certificate, &device_key).await {
                    Ok(renewed) => {
                        self.save_certificate(&renewed)?;
                        Ok(CertificateStatus::Renewed(renewed))
                    }
                    Err(error) => Ok(CertificateStatus::RenewalFailed(certificate, error.to_string())),
                }
            }
        }
    }
}

fn default_home() -> Result<PathBuf> {
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(data).join("koe"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("cannot find a profile directory: set KOE_HOME or HOME, or pass --home")?;
    Ok(PathBuf::from(home).join(".local/share/koe"))
}
