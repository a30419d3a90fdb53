//! TLS termination: one rustls configuration for every site, a certificate store whose entries
//! can be swapped at any time without a restart, the handshake (SNI check and TLS-ALPN-01
//! answers under one deadline, over a stream that gathers a new connection's first writes), and
//! the certificate sources (`files`, `self-signed`).

mod accept;
mod challenge;
mod gather;
mod keys;
mod sources;
mod store;
pub mod tickets;

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ProducesTickets, ServerConfig};
use rustls::sign::CertifiedKey;

pub use accept::{Handshake, HandshakeError, TlsStream, accept};
pub use challenge::{ACME_TLS_ALPN, AlpnChallenges};
use gather::Gather;
pub use sources::{FilesCheck, check_files, load_site_certificates, spawn_file_watchers};
pub use store::{CertStore, Slot};

/// Why a certificate could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: String },
    #[error("{what}: no usable PEM private key found (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { what: String },
    #[error("{what}: {source}")]
    Pem {
        what: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{what}: {source}")]
    Rustls {
        what: String,
        #[source]
        source: rustls::Error,
    },
    /// A key aws-lc-rs cannot sign with (RSA under 2048 bits, Ed448, an unusual curve).
    #[error("{what}: the private key is {kind}, which the relay cannot sign with: use {usable}", usable = keys::USABLE)]
    UnusableKey { what: String, kind: String },
    #[error(
        "{what}: the private key does not belong to the first certificate of the chain (the chain goes leaf \
         first: the server's own certificate, then its intermediates)"
    )]
    KeyMismatch { what: String },
    #[error("{what}: the certificate cannot be parsed: {detail}")]
    X509 { what: String, detail: String },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// ALPN identifiers we serve, in preference order.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// Offered alone by HTTP/1.0 clients (`curl --http1.0`); nginx accepts it too, where refusing
/// it fails their handshake with `no_application_protocol`.
pub const ALPN_HTTP10: &[u8] = b"http/1.0";

/// The one server configuration: TLS 1.3 and 1.2 (1.3 alone with `tls13_only`), ALPN h2,
/// http/1.1 and http/1.0, certificates from the store picked by SNI at handshake time.
/// `tickets`: the shared ticketer of replicas that share a store; `None`: this process's own.
pub fn server_config(
    store: Arc<CertStore>,
    tls13_only: bool,
    tickets: Option<Arc<tickets::SharedTicketer>>,
) -> Arc<ServerConfig> {
    let versions: &[&'static rustls::SupportedProtocolVersion] =
        if tls13_only { &[&rustls::version::TLS13] } else { &[&rustls::version::TLS13, &rustls::version::TLS12] };
    let mut config = ServerConfig::builder_with_provider(crate::crypto::provider())
        .with_protocol_versions(versions)
        .expect("aws-lc-rs supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec(), ALPN_HTTP10.to_vec()];
    // One ticket is enough for a browser to resume; the default of two doubles the work.
    config.send_tls13_tickets = 1;
    match tickets {
        Some(shared) => config.ticketer = shared,
        None => {
            if let Some(ticketer) = ticketer() {
                config.ticketer = ticketer;
            }
        }
    }
    Arc::new(config)
}

/// Session tickets for every configuration this process serves. Stateless: the session is
/// sealed into the ticket under a key only this process holds, so a browser coming back from
/// the identity provider resumes however many handshakes came in between (rustls's default
/// server-side cache keeps the last 256 sessions, and a new one came with every reload). The
/// key is rotated every 6 hours and the previous one accepted for one more period, as rustls's
/// rotator does; never written anywhere. `None` if the system's random source failed, and
/// resumption falls back to that cache.
fn ticketer() -> Option<Arc<dyn ProducesTickets>> {
    static TICKETER: OnceLock<Option<Arc<dyn ProducesTickets>>> = OnceLock::new();
    TICKETER
        .get_or_init(|| match rustls::crypto::aws_lc_rs::Ticketer::new() {
            Ok(ticketer) => Some(ticketer),
            Err(e) => {
                tracing::warn!(error = %e, "cannot make a session ticket key; resuming from a 256-session cache instead");
                None
            }
        })
        .clone()
}

/// A certificate chain with its signing key and the facts readiness and `check` need.
#[derive(Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex serial number of the leaf.
    pub serial: String,
    /// Issuer distinguished name of the leaf.
    pub issuer: String,
    /// DNS names in the leaf's subjectAltName.
    pub dns_names: Vec<String>,
}

impl LoadedCert {
    /// Parses a PEM chain and key; `what` names the source in errors (a path, a site).
    pub fn from_pem(what: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<LoadedCert, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|source| TlsError::Pem { what: what.into(), source })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate { what: what.into() });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey { what: what.into() },
            source => TlsError::Pem { what: what.into(), source },
        })?;
        Self::from_der(what, chain, key)
    }

    /// Builds from DER, checking that the key belongs to the leaf.
    pub fn from_der(
        what: &str,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<LoadedCert, TlsError> {
        let rustls_err = |source| TlsError::Rustls { what: what.into(), source };
        let kind = keys::describe(&key);
        let signer = crate::crypto::provider()
            .key_provider
            .load_private_key(key)
            .map_err(|_| TlsError::UnusableKey { what: what.into(), kind })?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch { what: what.into() }
            }
            source => rustls_err(source),
        })?;
        let (not_before, not_after, serial, issuer, dns_names) = leaf_facts(what, &certified.cert[0])?;
        Ok(LoadedCert { key: Arc::new(certified), not_before, not_after, serial, issuer, dns_names })
    }

    /// True when `now` lies inside the validity period.
    pub fn valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// True when the leaf names `host` (exactly or through a one-label wildcard).
    pub fn covers(&self, host: &str) -> bool {
        self.dns_names.iter().any(|n| {
            n.eq_ignore_ascii_case(host)
                || (n.starts_with("*.")
                    && host.split_once('.').is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(&n[2..])))
        })
    }
}

type LeafFacts = (SystemTime, SystemTime, String, String, Vec<String>);

fn leaf_facts(what: &str, der: &CertificateDer<'_>) -> Result<LeafFacts, TlsError> {
    use x509_parser::prelude::*;
    let x509_err = |detail: String| TlsError::X509 { what: what.into(), detail };
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| x509_err(e.to_string()))?;
    let to_system = |t: ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    let validity = cert.validity();
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok((
        to_system(validity.not_before),
        to_system(validity.not_after),
        cert.raw_serial_as_string().replace(':', ""),
        cert.issuer().to_string(),
        names,
    ))
}
