//! Outbound TCP for clients whose only way out is an HTTP proxy: the proxy configuration
//! (`koe --proxy http://[USER:PASS@]HOST:PORT`, else `HTTPS_PROXY` / `https_proxy`, with
//! `NO_PROXY` / `no_proxy` naming hosts to reach directly) and the `CONNECT host:port`
//! handshake (RFC 9110 §9.3.6) that turns a TCP connection to the proxy into a tunnel.
//!
//! The configuration is process-wide ([`set_global`] once at start, [`for_host`] where
//! connections are made), so the login client and the overlay client take the same way out.
//! With a proxy configured there is no silent fallback to direct connections: a proxy that
//! refuses is an error that says so.

use std::sync::OnceLock;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The proxy's answer to CONNECT is read up to this many bytes (status line and headers).
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid proxy URL {url:?}: {reason} (expected http://[USER:PASS@]HOST:PORT)")]
    BadUrl { url: String, reason: &'static str },
    #[error("cannot reach the HTTP proxy {proxy}: {source}")]
    Unreachable { proxy: String, source: std::io::Error },
    #[error("the HTTP proxy {proxy} wants credentials (407): give them as http://USER:PASS@HOST:PORT")]
    AuthRequired { proxy: String },
    #[error("the HTTP proxy {proxy} refused the credentials ({status})")]
    AuthRejected { proxy: String, status: u16 },
    #[error("the HTTP proxy {proxy} refused to connect to {target}: {status_line}")]
    Refused { proxy: String, target: String, status_line: String },
    #[error("the HTTP proxy {proxy} answered CONNECT with something that is not HTTP: {reason}")]
    BadResponse { proxy: String, reason: String },
}

/// Why [`connect`] has no connection to a host. The message says what failed and why, with
/// no `source`: a caller names the host it wanted, and a printed chain says each thing once.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No proxy applies to the host (none configured, or `NO_PROXY`), and the host itself did
    /// not accept the connection: nothing here is about a proxy.
    #[error("{0}")]
    Direct(std::io::Error),
    /// The connection went to the proxy, which failed; the message names the proxy.
    #[error("{0}")]
    Proxy(ProxyError),
}

/// An HTTP proxy that tunnels with CONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    /// `Proxy-Authorization: Basic` credentials.
    credentials: Option<(String, String)>,
    /// Hosts (or `.domain` suffixes, or `*`) reached directly.
    no_proxy: Vec<String>,
    /// Loopback hosts are reached directly (a proxy from the environment, as most HTTP
    /// clients do; an explicit `--proxy` takes everything but `NO_PROXY`).
    direct_loopback: bool,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Proxy").field("host", &self.host).field("port", &self.port).field("with_credentials", &self.credentials.is_some()).finish()
    }
}

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Proxy {
    /// Parses `http://[USER:PASS@]HOST:PORT` (a trailing `/` is allowed; `https://` proxies,
    /// which would need TLS to the proxy itself, are not supported).
    pub fn parse(url: &str) -> Result<Self, ProxyError> {
        let bad = |reason| ProxyError::BadUrl { url: redact(url), reason };
        let rest = url.strip_prefix("http://").ok_or_else(|| bad("only http:// proxies are supported"))?;
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(bad("a proxy URL has no path"));
        }
        let (credentials, address) = match rest.rsplit_once('@') {
            Some((user_pass, address)) => {
                let (user, pass) = user_pass.split_once(':').ok_or_else(|| bad("credentials must be USER:PASS"))?;
                (Some((percent_decode(user), percent_decode(pass))), address)
            }
            None => (None, rest),
        };
        let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("the port is missing"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("the host is missing"));
        }
        let port = port.parse().map_err(|_| bad("the port is not a number"))?;
        Ok(Self { host: host.to_string(), port, credentials, no_proxy: Vec::new(), direct_loopback: false })
    }

    /// The proxy named by `HTTPS_PROXY` (or `https_proxy`), with `NO_PROXY` (or `no_proxy`).
    pub fn from_env() -> Result<Option<Self>, ProxyError> {
        let variable = |name: &str| std::env::var(name).ok().or_else(|| std::env::var(name.to_lowercase()).ok()).filter(|v| !v.is_empty());
        let Some(url) = variable("HTTPS_PROXY") else { return Ok(None) };
        let mut proxy = Self::parse(&url)?.with_no_proxy(&variable("NO_PROXY").unwrap_or_default());
        proxy.direct_loopback = true;
        Ok(Some(proxy))
    }

    /// Hosts to reach directly: a comma-separated list of names, `.domain` suffixes, IPs, `*`.
    pub fn with_no_proxy(mut self, list: &str) -> Self {
        self.no_proxy = list.split(',').map(|h| h.trim().to_ascii_lowercase()).filter(|h| !h.is_empty()).collect();
        self
    }

    /// Whether connections to `host` go through this proxy.
    pub fn applies_to(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if loopback && self.direct_loopback {
            return false;
        }
        !self.no_proxy.iter().any(|entry| {
            entry == "*" || *entry == host || (entry.starts_with('.') && host.ends_with(entry.as_str())) || host.ends_with(&format!(".{entry}"))
        })
    }

    /// Opens a tunnel to `host:port` through the proxy.
    pub async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
        let proxy = self.to_string();
        let mut stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| ProxyError::Unreachable { proxy: proxy.clone(), source })?;
        let _ = stream.set_nodelay(true);
        let target = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some((user, pass)) = &self.credentials {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|source| ProxyError::Unreachable { proxy: proxy.clone(), source })?;
        let head = read_response_head(&mut stream)
            .await
            .map_err(|reason| ProxyError::BadResponse { proxy: proxy.clone(), reason })?;
        let status_line = head.lines().next().unwrap_or_default().to_string();
        let status = parse_status(&status_line).ok_or_else(|| ProxyError::BadResponse { proxy: proxy.clone(), reason: format!("{status_line:?}") })?;
        match status {
            200..=299 => Ok(stream),
            407 if self.credentials.is_none() => Err(ProxyError::AuthRequired { proxy }),
            401 | 407 => Err(ProxyError::AuthRejected { proxy, status }),
            _ => Err(ProxyError::Refused { proxy, target, status_line }),
        }
    }
}

/// Reads the status line and headers, byte by byte so that no tunnelled byte is consumed.
async fn read_response_head(stream: &mut TcpStream) -> Result<String, String> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(format!("no end of the headers in {MAX_RESPONSE_HEAD} bytes"));
        }
        match stream.read(&mut byte).await {
            Ok(0) => return Err("the proxy closed the connection".into()),
            Ok(_) => head.push(byte[0]),
            Err(error) => return Err(error.to_string()),
        }
    }
    String::from_utf8(head).map_err(|_| "headers that are not text".to_string())
}

/// `HTTP/1.x NNN reason` → NNN.
fn parse_status(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(value) = text.get(i + 1..i + 3).and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                out.push(value);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}***@{}", &url[..scheme + 3], &url[at + 1..]),
        _ => url.to_string(),
    }
}

static GLOBAL: OnceLock<Option<Proxy>> = OnceLock::new();

/// Sets the process's proxy (from `--proxy`, else the environment); the first call wins.
pub fn set_global(proxy: Option<Proxy>) {
    let _ = GLOBAL.set(proxy);
}

/// The process's proxy: the one set with [`set_global`], else (if none was set) the
/// environment's.
fn global() -> &'static Option<Proxy> {
    GLOBAL.get_or_init(|| Proxy::from_env().ok().flatten())
}

/// Whether the process has a proxy at all (`--proxy` or the environment).
pub fn configured() -> bool {
    global().is_some()
}

/// The process's proxy, if any, when it applies to `host`.
pub fn for_host(host: &str) -> Option<Proxy> {
    let proxy = global().clone()?;
    proxy.applies_to(host).then_some(proxy)
}

/// A TCP connection to `host:port`, through the process's proxy when one applies.
pub async fn connect(host: &str, port: u16) -> Result<TcpStream, ConnectError> {
    connect_via(for_host(host), host, port).await
}

async fn connect_via(proxy: Option<Proxy>, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
    match proxy {
        Some(proxy) => proxy.connect(host, port).await.map_err(ConnectError::Proxy),
        None => TcpStream::connect((host, port)).await.map_err(ConnectError::Direct),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_parse_and_bad_ones_say_why() {
        let proxy = Proxy::parse("http://alice:s%40cret@proxy.example.org:3128/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((proxy.host.as_str(), proxy.port), ("proxy.example.org", 3128));
        assert_eq!(proxy.credentials, Some(("alice".into(), "s@cret".into())));
        assert!(!format!("{proxy:?}").contains("cret"), "the password never shows");
        for (url, why) in [
            ("https://p:1", "only http://"),
            ("http://p", "port is missing"),
            ("http://p:x", "not a number"),
            ("http://:80", "host is missing"),
            ("http://p:80/path", "no path"),
            ("http://user@p:80", "USER:PASS"),
        ] {
            let error = Proxy::parse(url).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains(why), "{url}: {error}");
        }
        let error = Proxy::parse("ftp://bob:hunter2@p:1").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn no_proxy_names_hosts_reached_directly() {
        let proxy = Proxy::parse("http://p:3128").unwrap_or_else(|e| panic!("{e}")).with_no_proxy("localhost, .internal,example.org,10.0.0.1");
        assert!(!proxy.applies_to("localhost"));
        assert!(!proxy.applies_to("login.internal"));
        assert!(!proxy.applies_to("sub.example.org"));
        assert!(!proxy.applies_to("10.0.0.1"));
        assert!(proxy.applies_to("example.com"));
        assert!(proxy.applies_to("203.0.113.9"));
        assert!(!Proxy::parse("http://p:1").unwrap_or_else(|e| panic!("{e}")).with_no_proxy("*").applies_to("anything"));
        // An explicit proxy takes loopback too; one from the environment does not.
        assert!(proxy.applies_to("127.0.0.1"));
        let from_env = Proxy { direct_loopback: true, ..proxy };
        assert!(!from_env.applies_to("127.0.0.1") && !from_env.applies_to("::1") && !from_env.applies_to("localhost"));
        assert!(from_env.applies_to("203.0.113.9"));
    }

    /// A loopback port nothing listens on.
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        listener.local_addr().unwrap_or_else(|e| panic!("{e}")).port()
    }

    #[tokio::test]
    async fn a_failed_connection_names_a_proxy_only_when_one_was_in_the_way() {
        let error = connect_via(None, "127.0.0.1", closed_port()).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("refused") && !error.contains("proxy"), "{error}");

        let proxy = Proxy::parse(&format!("http://127.0.0.1:{}", closed_port())).unwrap_or_else(|e| panic!("{e}"));
        let error = connect_via(Some(proxy.clone()), "192.0.2.1", 443).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains(&format!("cannot reach the HTTP proxy {proxy}")), "{error}");
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status("HTTP/1.1 200 Connection established"), Some(200));
        assert_eq!(parse_status("HTTP/1.0 407 Proxy Authentication Required"), Some(407));
        assert_eq!(parse_status("SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status(""), None);
    }
}
