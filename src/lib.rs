//! oauth-relay: an OAuth broker's callback, authorize and token endpoints under a domain the
//! customer owns, with its own HTTPS.
//!
//! The modules, each importing only those listed above it (the graph has no cycles):
//!
//! - Leaves: [`fsutil`] (atomic, private writes for keys and certificates), [`crypto`] (the
//!   one rustls crypto provider, hex), [`seal`] (private keys sealed at rest with a key file,
//!   for stores off the host), [`flow`] (the flow id on access lines), [`logging`] (log format
//!   and filter), [`notify`] (systemd notifications), [`response`] (the body type, route names
//!   and small fixed answers every responder uses).
//! - [`egress`]: how upstreams and the ACME CA are reached (directly or through an HTTP proxy)
//!   and what the relay trusts in them.
//! - [`config`]: the TOML file, read, parsed and validated; every error names file, key, line.
//! - [`metrics`]: the Prometheus registry every module counts into; it takes plain labels.
//! - [`storage`]: the certificate store as a whole: its format version and safety checks, and
//!   for replicas without a shared disk the store on Redis, kept in step with each replica's
//!   folder.
//! - [`tls`]: rustls termination, the SNI certificate store with hot swap, certificate sources,
//!   the handshake under one deadline, session tickets replicas share.
//! - [`acme`]: automatic certificates (issuance, renewal, challenge answers, shared store).
//! - [`health`]: liveness and readiness (certificates, upstream probes, clock skew).
//! - [`relay`]: the routes (callback relay, authorize fronting, token proxy) and the upstream
//!   client.
//! - [`app`]: the one place a [`Config`] becomes a running configuration, at start and on
//!   reload; [`reload`]: the channel reload requests come through.
//! - [`admin`]: the admin listener's surface: health, metrics and `POST /reload`.
//! - [`server`]: listeners, accept loops, connection limits, deadlines, graceful drain.
//! - [`doctor`]: pre-flight checks of a configuration against DNS, ports, storage, upstream, CA.
//! - [`cli`]: what each subcommand of the binary does (`main.rs` only parses arguments).
//!
//! [`run`] wires them: the caller parses the config and binds the listeners, `run` serves until
//! the shutdown future completes and then drains. [`run_with`] also takes reload requests.

// No unsafe code, except one allowed call into the C library: `malloc_trim` in `server::trim`.
#![deny(unsafe_code)]

pub mod acme;
pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod crypto;
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
pub mod response;
pub mod seal;
pub mod server;
pub mod storage;
pub mod tls;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use app::BuildError;
pub use config::Config;
pub use server::Listeners;

/// Serves `config` on `listeners` until `shutdown` completes, then drains in-flight requests
/// for at most `limits.shutdown_grace`. `POST /reload` on the admin listener reloads.
pub async fn run(
    config: Arc<Config>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BuildError> {
    run_with(config, listeners, shutdown, reload::Requests::new()).await
}

/// Like [`run`], and reloads the configuration file whenever `reloads` asks (the binary sends
/// SIGHUP there; tests use [`reload::Requests::handle`]).
pub async fn run_with(
    config: Arc<Config>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    mut reloads: reload::Requests,
) -> Result<(), BuildError> {
    let stop = CancellationToken::new();
    let https_port = listeners.https.first().and_then(|l| l.local_addr().ok()).map(|a| a.port());
    let (mut app, live) = app::App::start(config, https_port, &stop)?;
    // Only now, with every certificate loaded: a relay that says it serves does.
    listeners.log(live.config());
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
                let outcome = app.reload(&shared.current()).await.map(|(live, reloaded)| {
                    shared.replace(live);
                    reloaded
                });
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
    let config = live.config();
    let hosts: usize = config.sites.iter().map(|s| s.hostnames.len()).sum();
    format!("serving {} site(s), {hosts} hostname(s) from {}", config.sites.len(), config.file)
}
