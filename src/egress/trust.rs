//! What the relay trusts in the servers it reaches: one rustls client configuration, so the
//! upstream client, the readiness probe and `doctor` agree on what a valid upstream certificate
//! is.

use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why a site's `upstream_ca_file` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path}: cannot read the upstream CA file: {source}")]
    CaRead {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path}: no usable CA certificate in the upstream CA file")]
    CaEmpty { path: String },
}

/// What the relay trusts in an upstream: the web PKI roots plus the site's `upstream_ca_file`
/// (which must hold at least one usable certificate). The upstream client, the readiness probe
/// and `doctor` all use it, so they agree on what a valid upstream certificate is. `alpn` is set
/// as given (the pooled client sets its own).
pub fn upstream_tls(ca_file: Option<&Path>, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, TrustError> {
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = ca_file {
        let shown = path.display().to_string();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect())
            .map_err(|source| TrustError::CaRead { path: shown.clone(), source })?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(TrustError::CaEmpty { path: shown });
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// An error and its sources on one line, for logs and reports of failed outbound requests (no
/// request data is in them).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}
