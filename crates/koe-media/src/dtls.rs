//! The DTLS handshake of a call, as str0m's aws-lc-rs backend makes it (dimpl), but quicker to
//! resend a lost flight: dimpl waits 1 s before its first retransmission and doubles from there,
//! so at 20 % loss each way a handshake of two round trips took about two seconds on average,
//! and media started late. Here a flight is resent after 150 ms, doubling, up to 10 times,
//! and the handshake gives up after 10 s (the call's own connect timeout).
//!
//! Everything else is dimpl's, delegated unchanged; [`install`] puts this provider in place of
//! the default one for the whole process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::crypto::dtls::{DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion};
use str0m::crypto::CryptoError;

/// The first retransmission of an unanswered flight (then doubled, ±25 % jitter).
pub const FLIGHT_FIRST_RESEND: Duration = Duration::from_millis(150);
/// Retransmissions of one flight before the handshake fails.
const FLIGHT_RESENDS: usize = 10;
/// The whole handshake at most.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Installs the crypto of str0m's enabled backend, with this DTLS, as the process default.
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    static DTLS: QuickDtls = QuickDtls;
    ONCE.call_once(|| {
        let mut provider = str0m::crypto::from_feature_flags();
        provider.dtls_provider = &DTLS;
        provider.install_process_default();
    });
}

#[derive(Debug)]
struct QuickDtls;

impl DtlsProvider for QuickDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        dimpl::certificate::generate_self_signed_certificate().ok()
    }

    fn new_dtls(&self, cert: &DtlsCert, now: Instant, version: DtlsVersion, mtu: Option<usize>) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        // ICE has already checked that the other side answers at this address: no cookie.
        let mut builder = dimpl::Config::builder()
            .use_server_cookie(false)
            .flight_start_rto(FLIGHT_FIRST_RESEND)
            .flight_retries(FLIGHT_RESENDS)
            .handshake_timeout(HANDSHAKE_TIMEOUT);
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        let config = Arc::new(builder.build().map_err(|e| CryptoError::Other(format!("DTLS configuration: {e}")))?);
        let dtls = match version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert.clone(), now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert.clone(), now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert.clone(), now),
            other => return Err(CryptoError::Other(format!("unsupported DTLS version: {other}"))),
        };
        Ok(Box::new(Quick(dtls)))
    }
}

struct Quick(dimpl::Dtls);

impl std::fmt::Debug for Quick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quick").finish_non_exhaustive()
    }
}

impl DtlsInstance for Quick {
    fn set_active(&mut self, active: bool) {
        self.0.set_active(active);
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.0.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        self.0.poll_output(buf)
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.0.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.0.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.0.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.0.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.0.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.0.close()
    }
}
