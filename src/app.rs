//! The running configuration: the one place a [`Config`] becomes what serves requests, at
//! start and at every reload.
//!
//! [`build`] makes a complete [`Live`] (certificate store, TLS configuration, routes, upstream
//! clients, readiness checks) without starting anything, so a failure leaves no trace. [`App`]
//! keeps what lasts across configurations: the file to re-read, the addresses bound at start,
//! and the background tasks (certificate file watchers, ACME tasks, upstream probes) of the
//! configuration in force. A reload builds the new `Live` beside the old one; only when every
//! step worked are the old tasks cancelled and the new ones started (the ACME task of a hostname
//! whose site did not change keeps running, with any order in flight), and the caller swaps the
//! new `Live` in: the next connection and the next request (also on a connection already open)
//! see it, requests in flight finish on the old one. A refused configuration is logged with
//! every problem and the old one stays in force.
//!
//! Not reloadable: the listen addresses (sockets are bound once; a change is logged as a warning
//! and takes a restart), the log format and filter (command line), and the built-in
//! configuration (it has no file to re-read).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::ServerConfig;
use tokio_util::sync::CancellationToken;

use crate::acme::{self, Challenges};
use crate::config::{self, Config, ConfigError, Limits};
use crate::health::Health;
use crate::relay::{Relay, UpstreamError};
use crate::storage::StorageError;
use crate::tls::{self, CertStore, TlsError};

/// Why a configuration could not be put in force.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The storage key file cannot be used (also checked by `check`; it may have changed).
    #[error("server.storage_key_file: {0}")]
    StorageKey(#[from] crate::seal::SealError),
}

/// Why a reload was refused; the configuration in force stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "the built-in configuration ({}) cannot be reloaded: start the relay with --config FILE",
        config::EMBEDDED_NAME
    )]
    Embedded,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("the relay is shutting down")]
    Stopped,
    #[error("building the configuration failed: {0}")]
    Aborted(#[from] tokio::task::JoinError),
}

impl ReloadError {
    /// One line per problem, for the log and the `/reload` answer.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ReloadError::Config(ConfigError::Invalid(problems)) => problems.iter().map(ToString::to_string).collect(),
            e => vec![e.to_string()],
        }
    }
}

/// A reload that went through.
#[derive(Debug, Clone, Default)]
pub struct Reloaded {
    /// The new configuration's warnings, and listen addresses that changed (they need a restart).
    pub warnings: Vec<String>,
}

/// One configuration in force: everything a connection and a request need from it.
pub struct Live {
    /// 0 for the configuration started with, one more per reload. A connection compares it
    /// with the one its handshake used to know whether its SNI site must be looked up again.
    pub id: u64,
    pub relay: Arc<Relay>,
    /// The certificate served for each hostname, looked up by SNI.
    pub store: Arc<CertStore>,
    /// The TLS server configuration, resolving certificates from `store`.
    pub tls: Arc<ServerConfig>,
    /// What `/healthz` and `/readyz` report.
    pub health: Arc<Health>,
    /// Pending ACME challenge answers (TLS-ALPN-01 in the handshake, HTTP-01 in the routes).
    challenges: Arc<Challenges>,
    /// The store replicas share, kept in step with the storage folder (`None`: the folder is
    /// the store).
    shared: Option<Arc<crate::storage::shared::Shared>>,
    /// The session ticket keys replicas share (with a shared store).
    tickets: Option<Arc<tls::tickets::SharedTicketer>>,
}

impl Live {
    /// The configuration this was built from.
    pub fn config(&self) -> &Config {
        self.relay.config()
    }

    /// The limits of this configuration.
    pub fn limits(&self) -> &Limits {
        &self.config().limits
    }
}

/// Builds everything `config` serves with, without starting anything. With `previous`, every
/// hostname whose certificate source is unchanged starts with the certificate it has now, and
/// the readiness checks keep their results.
pub fn build(config: Arc<Config>, previous: Option<&Live>, id: u64) -> Result<Live, BuildError> {
    crate::storage::check(&config)?;
    let shared = crate::storage::shared::open(&config, previous.and_then(|p| p.shared.as_ref()))?;
    // The same answers across a reload: an order in flight keeps publishing into them.
    let challenges = previous
        .filter(|p| {
            p.config().server.storage == config.server.storage && p.config().server.shared == config.server.shared
        })
        .map(|p| p.challenges.clone())
        .unwrap_or_else(|| Arc::new(Challenges::new(&config.server.storage).with_shared(shared.clone())));
    let store = Arc::new(CertStore::new(&config, challenges.clone()));
    if let Some(prev) = previous {
        carry_certificates(prev, &config, &store);
    }
    tls::load_site_certificates(&config, &store)?;
    let health = Arc::new(Health::new(&config, store.clone(), shared.clone()));
    if let Some(prev) = previous {
        health.adopt(&prev.health);
    }
    // One ticketer for the process while the shared store stays the same: a reload keeps the
    // keys, and replicas share them through the store.
    let tickets = shared.as_ref().map(|s| {
        previous
            .and_then(|p| p.tickets.clone().filter(|_| p.shared.as_ref().is_some_and(|ps| Arc::ptr_eq(ps, s))))
            .unwrap_or_else(tls::tickets::SharedTicketer::new)
    });
    let tls = tls::server_config(store.clone(), config.server.tls13_only, tickets.clone());
    let relay = Arc::new(Relay::new(config, challenges.clone(), health.clone())?);
    Ok(Live { id, relay, store, tls, health, challenges, shared, tickets })
}

/// Installs in `store` the certificate each hostname already serves, when its site's source
/// is the same in both configurations, so no handshake sees a gap while sources reload.
fn carry_certificates(prev: &Live, config: &Config, store: &CertStore) {
    let old_config = prev.config();
    for slot in store.slots() {
        let Some(old) = prev.store.slots().iter().find(|o| o.hostname == slot.hostname) else { continue };
        let same_source = match (old_config.sites.get(old.site), config.sites.get(slot.site)) {
            (Some(a), Some(b)) => a.tls == b.tls,
            _ => false,
        };
        if let (true, Some(cert)) = (same_source, old.current()) {
            slot.install(cert);
        }
    }
}

/// The background tasks of a configuration, under `token`; ACME tasks in `acme`, which keeps
/// those of unchanged sites running across reloads.
fn start_tasks(live: &Live, token: &CancellationToken, acme: &acme::Running) {
    let config = live.config();
    tls::spawn_file_watchers(config, &live.store, token.clone());
    // Keeps the folder in step with the shared store while this configuration is in force.
    if let Some(shared) = &live.shared {
        tokio::spawn(shared.clone().follow(vec!["acme/".into(), "tls/".into()], token.clone()));
        if let Some(tickets) = &live.tickets {
            tokio::spawn(tls::tickets::follow(shared.clone(), tickets.clone(), token.clone()));
        }
    }
    // Never awaited: a CA that is down delays only its own hostnames, never serving.
    acme::spawn(config, &live.store, &live.challenges, acme, live.shared.as_ref());
    live.health.spawn(token);
}

/// The listen addresses as started: sockets are bound once, so a reload cannot move them.
#[derive(Debug, Clone)]
struct Bound {
    https: Vec<SocketAddr>,
    http: Vec<SocketAddr>,
    admin: Option<SocketAddr>,
    /// The port the first HTTPS listener really got (the configuration may say port 0).
    https_port: Option<u16>,
}

/// What lasts across configurations: the file, the listen addresses, the tasks in force.
pub struct App {
    /// The file the relay was started with; `None` for the built-in configuration.
    source: Option<PathBuf>,
    bound: Bound,
    /// The process's stop token; each configuration's tasks run under a child of it.
    stop: CancellationToken,
    /// Cancels the background tasks of the configuration in force.
    tasks: CancellationToken,
    /// The ACME tasks, which outlive a reload when their site is unchanged.
    acme: acme::Running,
    next_id: u64,
}

impl App {
    /// Builds the first configuration and starts its background tasks. `https_port` is the
    /// port the first HTTPS listener was bound to.
    pub fn start(
        config: Arc<Config>,
        https_port: Option<u16>,
        stop: &CancellationToken,
    ) -> Result<(App, Live), BuildError> {
        // The metrics registry exists from the start, so its config-load time is the start's.
        crate::metrics::global();
        let s = &config.server;
        let bound = Bound { https: s.https.clone(), http: s.http.clone(), admin: s.admin, https_port };
        let source = (config.file != config::EMBEDDED_NAME).then(|| PathBuf::from(&config.file));
        let live = build(with_bound_port(config, https_port), None, 0)?;
        let tasks = stop.child_token();
        let acme = acme::Running::new(stop);
        start_tasks(&live, &tasks, &acme);
        for w in &live.config().warnings {
            tracing::warn!("{w}");
        }
        Ok((App { source, bound, stop: stop.clone(), tasks, acme, next_id: 1 }, live))
    }

    /// Re-reads the file and, when it is good, starts its tasks and returns it for the caller to
    /// put in force; logs and counts the outcome either way.
    pub async fn reload(&mut self, current: &Arc<Live>) -> Result<(Live, Reloaded), ReloadError> {
        let outcome = self.try_reload(current).await;
        crate::metrics::global().config_reload(outcome.is_ok());
        match &outcome {
            Ok((_, r)) => {
                for w in &r.warnings {
                    tracing::warn!("{w}");
                }
                tracing::info!(file = %self.shown(), "configuration reloaded; new connections and requests use it");
            }
            Err(e) => {
                let lines = e.lines();
                for line in &lines {
                    tracing::error!("reload refused: {line}");
                }
                tracing::error!(
                    file = %self.shown(),
                    problems = lines.len(),
                    "configuration reload refused; the previous configuration stays in force"
                );
            }
        }
        outcome
    }

    fn shown(&self) -> String {
        self.source.as_ref().map_or_else(|| config::EMBEDDED_NAME.to_string(), |p| p.display().to_string())
    }

    async fn try_reload(&mut self, current: &Arc<Live>) -> Result<(Live, Reloaded), ReloadError> {
        let path = self.source.clone().ok_or(ReloadError::Embedded)?;
        let config = with_bound_port(Arc::new(read_config(path).await?), self.bound.https_port);
        let mut warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
        warnings.extend(self.moved_listeners(&config));
        // Off the runtime's threads too: a thousand sites take a while to compile, and one
        // worker thread would stop serving meanwhile.
        let (previous, id) = (current.clone(), self.next_id);
        let live = tokio::task::spawn_blocking(move || build(config, Some(&previous), id)).await??;
        self.next_id += 1;
        // Old tasks first; ACME tasks of unchanged sites keep running (with any order in flight).
        self.tasks.cancel();
        self.tasks = self.stop.child_token();
        start_tasks(&live, &self.tasks, &self.acme);
        Ok((live, Reloaded { warnings }))
    }

    /// A warning for each listen setting that differs from what is bound.
    fn moved_listeners(&self, config: &Config) -> Vec<String> {
        let s = &config.server;
        let b = &self.bound;
        let mut out = Vec::new();
        let mut differs = |key: &str, was: String, now: String| {
            if was != now {
                out.push(format!(
                    "server.{key} changed from {was} to {now}: listen addresses change only on restart; still listening on {was}"
                ));
            }
        };
        differs("https", format!("{:?}", b.https), format!("{:?}", s.https));
        differs("http", format!("{:?}", b.http), format!("{:?}", s.http));
        let admin = |a: Option<SocketAddr>| a.map_or_else(|| "none".to_string(), |a| a.to_string());
        differs("admin", admin(b.admin), admin(s.admin));
        out
    }
}

/// How long a reload may take to read its file (a file system that hangs, say).
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and validates the file at `path` off the runtime's threads, within [`READ_TIMEOUT`],
/// so a slow read never holds up serving or shutdown.
async fn read_config(path: PathBuf) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let read = tokio::task::spawn_blocking(move || Config::load(&path));
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(panicked)) => Err(ConfigError::Read { file, source: std::io::Error::other(panicked.to_string()) }),
        Err(_) => Err(ConfigError::Read {
            file,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, format!("not read within {READ_TIMEOUT:?}")),
        }),
    }
}

/// A configuration that listens on port 0 (tests) redirects to the port actually bound.
fn with_bound_port(config: Arc<Config>, bound: Option<u16>) -> Arc<Config> {
    match bound {
        Some(port) if config.server.public_https_port == 0 => {
            let mut c = (*config).clone();
            c.server.public_https_port = port;
            Arc::new(c)
        }
        _ => config,
    }
}
