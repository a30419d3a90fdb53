//! TLS-ALPN-01 (RFC 8737) in the handshake: a CA validating a hostname offers only the
//! `acme-tls/1` protocol and must get a certificate made for that validation. The ACME module
//! publishes those certificates; the handshake only asks for them, through [`AlpnChallenges`],
//! so the terminator does not depend on the ACME client.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;

/// The ALPN protocol a CA offers when it validates TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The certificates that answer pending TLS-ALPN-01 validations, by hostname.
pub trait AlpnChallenges: Send + Sync + std::fmt::Debug {
    /// The validation certificate for `host`, if a validation of it is pending.
    fn certificate<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Option<Arc<CertifiedKey>>>;
}

/// The server configuration for one `acme-tls/1` handshake: only that protocol, only the
/// challenge certificate.
pub(super) fn challenge_server_config(key: Arc<CertifiedKey>) -> Arc<ServerConfig> {
    #[derive(Debug)]
    struct One(Arc<CertifiedKey>);
    impl ResolvesServerCert for One {
        fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }
    let mut config = ServerConfig::builder_with_provider(crate::crypto::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("aws-lc-rs supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(One(key)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Arc::new(config)
}
