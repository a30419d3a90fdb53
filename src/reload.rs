//! Configuration reload: SIGHUP, `oauth-relay reload` and `POST /reload` on the admin listener
//! all end here.
//!
//! A reload re-reads the file the relay was started with, validates it, and builds a complete
//! new [`Live`] (certificate store, TLS configuration, routes, upstream clients, readiness
//! checks) beside the one in force. Only when every step worked are the old background tasks
//! (file watchers, ACME tasks, probes) cancelled, the new ones started, and the new `Live`
//! swapped in: the next connection and the next request (also on a connection that is already
//! open) see it; requests in flight finish on the old one. A configuration that fails any step
//! is refused with every problem logged, and the old one stays in force.
//!
//! Not reloadable: the listen addresses (the sockets are bound once; a change is logged as a
//! warning and takes a restart), the log format and filter (command line), and the built-in
//! configuration (it has no file to re-read).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use http::{Method, Response, StatusCode, header};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, ConfigError};
use crate::relay::{Relay, RelayBody};
use crate::server::{Listeners, Live, Shared};
use crate::tls::{self, CertStore};
use crate::{RunError, acme};

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
    Build(#[from] RunError),
    #[error("the relay is shutting down")]
    Stopped,
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

type Reply = oneshot::Sender<Result<Reloaded, ReloadError>>;

/// Asks a running relay to reload. Cheap to clone; main.rs hands SIGHUP to one.
#[derive(Clone, Debug)]
pub struct ReloadHandle {
    tx: mpsc::Sender<Option<Reply>>,
}

impl ReloadHandle {
    /// Reloads and waits for the outcome.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Some(tx)).await.map_err(|_| ReloadError::Stopped)?;
        rx.await.unwrap_or(Err(ReloadError::Stopped))
    }

    /// Asks for a reload without waiting (a signal); the outcome is only logged. Requests made
    /// while one is queued are merged into it.
    pub fn request(&self) {
        let _ = self.tx.try_send(None);
    }
}

/// The receiving end, given to [`crate::run_with`].
#[derive(Debug)]
pub struct Requests {
    handle: ReloadHandle,
    rx: mpsc::Receiver<Option<Reply>>,
}

impl Default for Requests {
    fn default() -> Self {
        Self::new()
    }
}

impl Requests {
    pub fn new() -> Requests {
        // A few waiting callers at most; more SIGHUPs than that are the same reload.
        let (tx, rx) = mpsc::channel(8);
        Requests { handle: ReloadHandle { tx }, rx }
    }

    /// A handle that sends to these requests.
    pub fn handle(&self) -> ReloadHandle {
        self.handle.clone()
    }

    /// The next request: `Some(reply)` when a caller waits for the outcome, `None` for a
    /// signal. Never ends while `self` holds a sender.
    pub(crate) async fn next(&mut self) -> Option<Reply> {
        self.rx.recv().await.flatten()
    }
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

/// What `run` keeps to reload: the file, the listen addresses, the current tasks' token.
pub(crate) struct Reloader {
    /// The file the relay was started with; `None` for the built-in configuration.
    source: Option<PathBuf>,
    bound: Bound,
    /// The process's stop token; each configuration's tasks run under a child of it.
    stop: CancellationToken,
    /// Cancels the background tasks of the configuration in force.
    tasks: CancellationToken,
    next_id: u64,
}

impl Reloader {
    /// Builds the first configuration and starts its background tasks.
    pub(crate) fn start(
        config: Arc<Config>,
        listeners: &Listeners,
        stop: &CancellationToken,
    ) -> Result<(Reloader, Live), RunError> {
        let s = &config.server;
        let bound = Bound {
            https: s.https.clone(),
            http: s.http.clone(),
            admin: s.admin,
            https_port: listeners.https.first().and_then(|l| l.local_addr().ok()).map(|a| a.port()),
        };
        let source = (config.file != config::EMBEDDED_NAME).then(|| PathBuf::from(&config.file));
        let config = with_bound_port(config, bound.https_port);
        let live = build(config, None, 0)?;
        let tasks = stop.child_token();
        start_tasks(&live, &tasks);
        for w in &live.relay.config().warnings {
            tracing::warn!("{w}");
        }
        Ok((Reloader { source, bound, stop: stop.clone(), tasks, next_id: 1 }, live))
    }

    /// Re-reads the file and, when it is good, puts it in force; logs the outcome either way.
    pub(crate) fn reload(&mut self, shared: &Shared) -> Result<Reloaded, ReloadError> {
        let outcome = self.try_reload(shared);
        crate::metrics::global().config_reload(outcome.is_ok());
        match &outcome {
            Ok(r) => {
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

    fn try_reload(&mut self, shared: &Shared) -> Result<Reloaded, ReloadError> {
        let path = self.source.as_ref().ok_or(ReloadError::Embedded)?;
        let config = with_bound_port(Arc::new(Config::load(path)?), self.bound.https_port);
        let mut warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
        warnings.extend(self.moved_listeners(&config));
        let current = shared.current();
        let live = build(config, Some(&current), self.next_id)?;
        self.next_id += 1;
        // Old tasks first: the new ACME tasks then find no order of ours in progress.
        self.tasks.cancel();
        self.tasks = self.stop.child_token();
        start_tasks(&live, &self.tasks);
        shared.replace(live);
        Ok(Reloaded { warnings })
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

/// Builds everything a configuration serves with, without starting anything: a failure
/// leaves no trace. With `previous`, every hostname whose certificate source is unchanged
/// starts with the certificate it has now, and the readiness checks keep their results.
fn build(config: Arc<Config>, previous: Option<&Live>, id: u64) -> Result<Live, RunError> {
    crate::storage::check(&config)?;
    let store = Arc::new(CertStore::new(&config));
    if let Some(prev) = previous {
        carry_certificates(prev, &config, &store);
    }
    tls::load_site_certificates(&config, &store)?;
    let tls13_only = config.server.tls13_only;
    let relay = Arc::new(Relay::new(config, store.clone())?);
    if let Some(prev) = previous {
        relay.health().adopt(prev.relay.health());
    }
    Ok(Live { id, relay, tls: tls::server_config(store.clone(), tls13_only), store })
}

/// Installs in `store` the certificate each hostname already serves, when its site's source
/// is the same in both configurations, so no handshake sees a gap while sources reload.
fn carry_certificates(prev: &Live, config: &Config, store: &CertStore) {
    let old_config = prev.relay.config();
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

/// The background tasks of a configuration, under `token`.
fn start_tasks(live: &Live, token: &CancellationToken) {
    let config = live.relay.config();
    tls::spawn_file_watchers(config, &live.store, token.clone());
    // Never awaited: a CA that is down delays only its own hostnames, never serving.
    acme::spawn(config, &live.store, token.clone());
    live.relay.health().spawn(token);
}

/// `POST /reload` on the admin listener: `200 reloaded` (plus a `warning:` line each), or
/// `400` with one problem per line. Any other method: `405`.
pub async fn admin_endpoint(method: &Method, handle: &ReloadHandle) -> Response<RelayBody> {
    if method != Method::POST {
        return crate::relay::method_not_allowed("POST");
    }
    let (status, body) = match handle.reload().await {
        Ok(r) => {
            let mut body = String::from("reloaded\n");
            for w in &r.warnings {
                body.push_str(&format!("warning: {w}\n"));
            }
            (StatusCode::OK, body)
        }
        Err(e) => {
            let status = if matches!(e, ReloadError::Stopped) {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::BAD_REQUEST
            };
            (status, e.lines().iter().map(|l| format!("{l}\n")).collect())
        }
    };
    let mut r = Response::new(RelayBody::full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    r
}
