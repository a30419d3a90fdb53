//! oauth-relay: an OAuth broker's callback, authorize and token endpoints under a domain the
//! customer owns, with its own HTTPS.
//!
//! The modules, in the order a request meets them:
//!
//! - [`config`]: the TOML file, read, parsed and validated; every error names file, key, line.
//! - [`server`]: listeners, accept loops, connection limits, deadlines, graceful drain.
//! - [`tls`]: rustls termination, the SNI certificate store with hot swap, certificate sources.
//! - [`acme`]: automatic certificates (issuance, renewal, challenge answers, shared store).
//! - [`relay`]: the routes (callback relay, authorize fronting, token proxy) and the upstream
//!   client.
//! - [`health`]: liveness and readiness.
//! - [`logging`]: log format and filter.
//! - [`fsutil`]: atomic, private writes for keys and certificates.
//!
//! [`run`] wires them: the caller parses the config and binds the listeners, `run` serves until
//! the shutdown future completes and then drains.

#![forbid(unsafe_code)]

pub mod acme;
pub mod config;
pub mod fsutil;
pub mod health;
pub mod logging;
pub mod relay;
pub mod server;
pub mod tls;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use server::Listeners;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Upstream(#[from] relay::UpstreamError),
}

/// A configuration that listens on port 0 (tests) redirects to the port actually bound.
fn with_bound_port(config: Arc<Config>, listeners: &Listeners) -> Arc<Config> {
    let bound = listeners.https.first().and_then(|l| l.local_addr().ok()).map(|a| a.port());
    match bound {
        Some(port) if config.server.public_https_port == 0 => {
            let mut c = (*config).clone();
            c.server.public_https_port = port;
            Arc::new(c)
        }
        _ => config,
    }
}

/// Serves `config` on `listeners` until `shutdown` completes, then drains in-flight requests
/// for at most `limits.shutdown_grace`.
pub async fn run(
    config: Arc<Config>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let config = with_bound_port(config, &listeners);
    let store = Arc::new(tls::CertStore::new(&config));
    tls::load_site_certificates(&config, &store)?;
    let relay = Arc::new(relay::Relay::new(config.clone(), store.clone())?);
    let shared = Arc::new(server::Shared {
        relay,
        tls: tls::server_config(store.clone()),
        store: store.clone(),
        limits: config.limits.clone(),
    });
    let stop = CancellationToken::new();
    tls::spawn_file_watchers(&config, &store, stop.clone());
    // Never awaited: a CA that is down delays only its own hostnames, never serving.
    acme::spawn(&config, &store, stop.clone());
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let serving = server::serve(shared, listeners, stop.clone());
    let mut serving = std::pin::pin!(serving);
    tokio::select! {
        _ = &mut serving => {}
        _ = shutdown => {
            tracing::info!("shutdown requested");
            stop.cancel();
            serving.await;
        }
    }
    stop.cancel();
    Ok(())
}
