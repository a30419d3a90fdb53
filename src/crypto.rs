//! The one crypto provider of the process (aws-lc-rs through rustls), for every TLS server and
//! client configuration and for the random numbers the relay draws. A leaf, so the TLS
//! terminator, the upstream and ACME clients and the lock owners all reach it without reaching
//! each other.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider used everywhere (aws-lc-rs), installed once as the process default so
/// that every rustls user in the process (upstream client, ACME client) agrees.
pub fn provider() -> Arc<CryptoProvider> {
    if let Some(p) = CryptoProvider::get_default() {
        return p.clone();
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    CryptoProvider::get_default().expect("a provider was just installed").clone()
}
