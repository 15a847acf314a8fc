//! TLS for the login server: its self-signed certificate, the server configuration, and the
//! client's pinning verifier.
//!
//! Koe does not use web PKI for the login server. `network.toml` carries the SHA-256
//! fingerprint of the login server's certificate, and the client accepts exactly that
//! certificate whatever name or dates it carries: an operator needs no CA, and a CA cannot
//! impersonate the login server.

use std::sync::{Arc, Mutex};

use koe_types::network::TlsFingerprint;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn fingerprint(certificate_der: &[u8]) -> TlsFingerprint {
    TlsFingerprint(Sha256::digest(certificate_der).into())
}

/// A new self-signed certificate and key (PEM) for a login server reachable as `host`.
pub fn generate_self_signed(host: &str) -> Result<(String, String), rcgen::Error> {
    let mut names = vec![host.to_string(), "localhost".to_string()];
    if host != "127.0.0.1" {
        names.push("127.0.0.1".to_string());
    }
    let certified = rcgen::generate_simple_self_signed(names)?;
    Ok((certified.cert.pem(), certified.key_pair.serialize_pem()))
}

/// Parses a PEM certificate chain and private key.
pub fn parse_pem(
    certificate_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = rustls_pemfile::certs(&mut certificate_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS certificate is not valid PEM: {e}"))?;
    if chain.is_empty() {
        return Err("TLS certificate file holds no certificate".into());
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| format!("TLS key is not valid PEM: {e}"))?
        .ok_or("TLS key file holds no private key")?;
    Ok((chain, key))
}

pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts exactly the certificate with the pinned fingerprint, and remembers what the server
/// presented so a mismatch can be reported with both fingerprints.
#[derive(Debug)]
pub struct PinnedServerCertificate {
    expected: TlsFingerprint,
    presented: Mutex<Option<TlsFingerprint>>,
    provider: Arc<CryptoProvider>,
}

impl PinnedServerCertificate {
    pub fn new(expected: TlsFingerprint) -> Arc<Self> {
        Arc::new(Self {
            expected,
            presented: Mutex::new(None),
            provider: crypto_provider(),
        })
    }

    /// The fingerprint the server presented, if the handshake got that far.
    pub fn presented(&self) -> Option<TlsFingerprint> {
        self.presented.lock().ok().and_then(|slot| *slot)
    }

    pub fn client_config(self: &Arc<Self>) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        let verifier: Arc<dyn ServerCertVerifier> = Arc::clone(self) as _;
        let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ServerCertVerifier for PinnedServerCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = fingerprint(end_entity);
        if let Ok(mut slot) = self.presented.lock() {
            *slot = Some(presented);
        }
        if presented == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
