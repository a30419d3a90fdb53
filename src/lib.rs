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
//! - [`egress`]: how upstreams and the ACME CA are reached: directly, or through an HTTP proxy.
//! - [`health`]: liveness and readiness (certificates, upstream probes, clock skew).
//! - [`reload`]: re-reading the configuration (SIGHUP, `oauth-relay reload`, `POST /reload`).
//! - [`notify`]: systemd notifications (READY, RELOADING, STOPPING, WATCHDOG).
//! - [`metrics`]: Prometheus metrics, served on the admin listener.
//! - [`logging`]: log format and filter; [`flow`]: the flow id on access lines.
//! - [`doctor`]: pre-flight checks of a configuration against DNS, ports, storage, upstream, CA.
//! - [`storage`]: the certificate store's format version (upgrades and rollbacks).
//! - [`fsutil`]: atomic, private writes for keys and certificates.
//!
//! [`run`] wires them: the caller parses the config and binds the listeners, `run` serves until
//! the shutdown future completes and then drains. [`run_with`] also takes reload requests.

// No unsafe code, except two allowed calls into the C library: `malloc_trim` in `server::trim`
// and the coarse clock in `server::activity`.
#![deny(unsafe_code)]

pub mod acme;
pub mod config;
pub mod doctor;
pub mod egress;
pub mod flow;
pub mod fsutil;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod relay;
pub mod reload;
pub mod server;
pub mod storage;
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
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
}

/// Serves `config` on `listeners` until `shutdown` completes, then drains in-flight requests
/// for at most `limits.shutdown_grace`. `POST /reload` on the admin listener reloads.
pub async fn run(
    config: Arc<Config>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    run_with(config, listeners, shutdown, reload::Requests::new()).await
}

/// Like [`run`], and reloads the configuration file whenever `reloads` asks (main.rs sends
/// SIGHUP there; tests use [`reload::Requests::handle`]).
pub async fn run_with(
    config: Arc<Config>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    mut reloads: reload::Requests,
) -> Result<(), RunError> {
    let stop = CancellationToken::new();
    let (mut reloader, live) = reload::Reloader::start(config, &listeners, &stop)?;
    let shared = Arc::new(server::Shared::new(live, reloads.handle()));
    let serving = server::serve(shared.clone(), listeners, stop.clone());
    let mut serving = std::pin::pin!(serving);
    let mut shutdown = std::pin::pin!(shutdown);
    notify::ready(&serving_status(&shared));
    notify::spawn_watchdog(&stop);
    loop {
        tokio::select! {
            _ = &mut serving => break,
            _ = &mut shutdown => {
                tracing::info!("shutdown requested");
                notify::stopping();
                stop.cancel();
                serving.await;
                break;
            }
            reply = reloads.next() => {
                notify::reloading();
                let outcome = reloader.reload(&shared);
                crate::metrics::global().config_reload(outcome.is_ok());
                let status = match &outcome {
                    Ok(_) => serving_status(&shared),
                    Err(_) => format!("reload refused; still {}", serving_status(&shared)),
                };
                notify::ready(&status);
                if let Some(reply) = reply {
                    let _ = reply.send(outcome);
                }
            }
        }
    }
    stop.cancel();
    Ok(())
}

/// The `STATUS=` line systemd shows: how much is served.
fn serving_status(shared: &server::Shared) -> String {
    let live = shared.current();
    let config = live.relay.config();
    let hosts: usize = config.sites.iter().map(|s| s.hostnames.len()).sum();
    format!("serving {} site(s), {hosts} hostname(s) from {}", config.sites.len(), config.file)
}
