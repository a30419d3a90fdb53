//! Automatic certificates: the `acme` certificate source (RFC 8555, with instant-acme).
//!
//! - [`store`]: the on-disk layout (one folder per directory URL; account, chain, key,
//!   metadata), atomic 0600 writes.
//! - [`client`]: the HTTP client and the ACME account.
//! - [`order`]: one issuance, from order to downloaded chain.
//! - [`challenge`]: the answers to pending challenges, served by the TLS acceptor
//!   (TLS-ALPN-01) and the plain-HTTP listener (HTTP-01).
//! - [`renew`]: when to renew (ARI or one third of the lifetime) and when to retry (backoff).
//! - [`lock`]: the lock file that lets several replicas share one store.
//! - `task`: the per-hostname loop that ties them together.
//!
//! [`spawn`] starts one task per hostname of every `acme` site; it never blocks serving, so
//! other sites work while a CA is unreachable.

pub mod challenge;
pub mod client;
pub mod lock;
pub mod order;
pub mod renew;
pub mod store;
mod task;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

pub use challenge::{ChallengeError, Challenges};
pub use store::{AcmeStore, CertMeta, HostStatus, StoreError};

use crate::config::{AcmeSettings, Config, TlsSource};
use crate::storage::shared::Shared;
use crate::tls::CertStore;
use client::AccountCell;
use task::{Attempt, HostTask};

/// Why an ACME step failed. Every variant keeps its cause and says which step it was.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("{step}: {source}")]
    Acme {
        step: &'static str,
        #[source]
        source: instant_acme::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Challenge(#[from] ChallengeError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("directory_ca_file {path}: {detail}")]
    CaFile { path: String, detail: String },
    #[error("the CA offers no {kind} challenge for this hostname")]
    ChallengeNotOffered { kind: &'static str },
    #[error("the CA did not validate the challenge: {detail}")]
    Rejected { detail: String },
    #[error("the CA sent a certificate that cannot be used: {0}")]
    Certificate(#[source] crate::tls::TlsError),
    #[error("cannot make the certificate key: {0}")]
    Key(#[from] rcgen::Error),
    #[error("another relay ({owner}) is {what}")]
    Busy { owner: String, what: &'static str },
    #[error("the order did not finish within {0:?}")]
    Timeout(Duration),
    #[error("`{0}` is not a hostname of an acme site in this configuration")]
    UnknownHost(String),
    #[error(transparent)]
    Shared(#[from] crate::storage::shared::SharedError),
}

/// The prefix of every ACME problem type (RFC 8555 section 6.7).
const ACME_PROBLEM_PREFIX: &str = "urn:ietf:params:acme:error:";

impl AcmeError {
    /// The `problem` label of a failed attempt: the RFC 8555 problem type the CA sent (e.g.
    /// `rateLimited`, `connection`, `dns`, `unauthorized`), else what went wrong on this side.
    /// Only short alphanumeric names pass, so a CA cannot blow up the label set.
    pub fn problem(&self) -> String {
        let from_ca = |t: &str| -> Option<String> {
            let name = &t[t.find(ACME_PROBLEM_PREFIX)? + ACME_PROBLEM_PREFIX.len()..];
            let name: String = name.chars().take_while(char::is_ascii_alphanumeric).collect();
            (!name.is_empty() && name.len() <= 40).then_some(name)
        };
        let local = match self {
            AcmeError::Acme { source: instant_acme::Error::Api(p), .. } => {
                return p.r#type.as_deref().and_then(from_ca).unwrap_or_else(|| "other".into());
            }
            // The order went invalid: the CA's reasons are in the challenges' problem documents.
            AcmeError::Rejected { detail } => return from_ca(detail).unwrap_or_else(|| "rejected".into()),
            AcmeError::Acme { source: instant_acme::Error::Timeout(_), .. } | AcmeError::Timeout(_) => "timeout",
            AcmeError::Acme { .. } => "transport",
            AcmeError::Store(_) | AcmeError::Io { .. } => "storage",
            AcmeError::Challenge(_) => "challenge_publish",
            AcmeError::CaFile { .. } => "ca_file",
            AcmeError::ChallengeNotOffered { .. } => "challenge_not_offered",
            AcmeError::Certificate(_) => "bad_certificate",
            AcmeError::Key(_) => "key",
            AcmeError::Busy { .. } => "busy",
            AcmeError::UnknownHost(_) => "unknown_host",
            AcmeError::Shared(_) => "shared_store",
        };
        local.to_string()
    }

    /// The CA's `rateLimited` problem, when that is what this is.
    pub fn rate_limited(&self) -> Option<&instant_acme::Problem> {
        match self {
            AcmeError::Acme { source: instant_acme::Error::Api(p), .. }
                if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:rateLimited") =>
            {
                Some(p)
            }
            _ => None,
        }
    }
}

/// Counts of what this process asked each CA for, by directory URL: tests prove with them
/// that a restart places no order and that replicas share one account and one order.
pub mod counters {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex};

    static COUNTS: LazyLock<Mutex<HashMap<String, (u64, u64)>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

    fn key(directory: &str) -> String {
        url::Url::parse(directory).map(|u| u.to_string()).unwrap_or_else(|_| directory.to_string())
    }

    fn bump(directory: &str, f: impl FnOnce(&mut (u64, u64))) {
        if let Ok(mut m) = COUNTS.lock() {
            f(m.entry(key(directory)).or_default());
        }
    }

    fn get(directory: &str) -> (u64, u64) {
        COUNTS.lock().ok().and_then(|m| m.get(&key(directory)).copied()).unwrap_or_default()
    }

    /// `newOrder` requests accepted by the CA at `directory`.
    pub fn orders_placed(directory: &str) -> u64 {
        get(directory).0
    }

    /// Accounts created at `directory`.
    pub fn accounts_created(directory: &str) -> u64 {
        get(directory).1
    }

    pub(crate) fn order_placed(directory: &str) {
        bump(directory, |c| c.0 += 1);
    }

    pub(crate) fn account_created(directory: &str) {
        bump(directory, |c| c.1 += 1);
    }
}

/// The ACME sites of a configuration with their settings.
fn acme_sites(config: &Config) -> impl Iterator<Item = (usize, &crate::config::Site, &AcmeSettings)> {
    config.sites.iter().enumerate().filter_map(|(i, s)| match &s.tls {
        TlsSource::Acme(a) => Some((i, s, a.as_ref())),
        _ => None,
    })
}

/// The ACME tasks running in this process, by hostname, across reloads: a reload that leaves a
/// hostname's site and storage as they were keeps its task, with any order in flight (cancelling
/// it would withdraw a challenge answer the CA may be checking, and the next task would place a
/// second order).
pub struct Running {
    /// The process's stop: every task ends with it.
    stop: CancellationToken,
    tasks: std::sync::Mutex<HashMap<String, RunningTask>>,
}

struct RunningTask {
    storage: std::path::PathBuf,
    shared: Option<crate::config::RedisStorage>,
    settings: AcmeSettings,
    slot: Arc<arc_swap::ArcSwap<crate::tls::Slot>>,
    stop: CancellationToken,
}

impl Running {
    pub fn new(stop: &CancellationToken) -> Running {
        Running { stop: stop.clone(), tasks: std::sync::Mutex::new(HashMap::new()) }
    }
}

/// Serves the stored certificate of every ACME hostname at once (no network), then makes sure
/// one task per hostname orders, renews and re-reads the store, publishing its challenge
/// answers in `challenges`. Tasks of `running` whose hostname, settings and storage are
/// unchanged keep running and serve into the new slots; the others are stopped or started.
pub fn spawn(
    config: &Config,
    store: &Arc<CertStore>,
    challenges: &Arc<Challenges>,
    running: &Running,
    shared_store: Option<&Arc<Shared>>,
) {
    let owner = lock::new_owner();
    let mut accounts: HashMap<String, Arc<AccountCell>> = HashMap::new();
    let Ok(mut tasks) = running.tasks.lock() else { return };
    let mut wanted = std::collections::HashSet::new();
    for (i, site, settings) in acme_sites(config) {
        let shared = Arc::new(settings.clone());
        let dir_store =
            Arc::new(AcmeStore::new(&config.server.storage, &settings.directory).with_shared(shared_store.cloned()));
        let account = accounts
            .entry(dir_store.directory().to_string())
            .or_insert_with(|| Arc::new(AccountCell::new(shared.clone(), dir_store.clone(), owner.clone())))
            .clone();
        for slot in store.site_slots(i) {
            wanted.insert(slot.hostname.clone());
            let unchanged = |t: &&RunningTask| {
                t.settings == *settings
                    && t.storage == config.server.storage
                    && t.shared == config.server.shared
                    && !t.stop.is_cancelled()
            };
            if let Some(t) = tasks.get(&slot.hostname).filter(unchanged) {
                if slot.current().is_none() {
                    slot.set_waiting(format!("ordering its first certificate from {}", settings.directory));
                }
                t.slot.store(slot.clone());
                tracing::debug!(hostname = %slot.hostname, "site unchanged; its certificate task keeps running");
                continue;
            }
            if let Some(old) = tasks.remove(&slot.hostname) {
                old.stop.cancel();
            }
            let cell = Arc::new(arc_swap::ArcSwap::new(slot.clone()));
            let mut task = HostTask::new(
                slot.hostname.clone(),
                shared.clone(),
                dir_store.clone(),
                account.clone(),
                challenges.clone(),
                Some(cell.clone()),
                owner.clone(),
            );
            if task.load_stored().is_none() {
                slot.set_waiting(format!("waiting for its first certificate from {}", settings.directory));
            }
            tracing::info!(site = %site.name, hostname = %slot.hostname, directory = %settings.directory, store = %dir_store.root().display(), "automatic certificates (ACME) on");
            let stop = running.stop.child_token();
            tokio::spawn(task.run(stop.clone()));
            let entry = RunningTask {
                storage: config.server.storage.clone(),
                shared: config.server.shared.clone(),
                settings: settings.clone(),
                slot: cell,
                stop,
            };
            tasks.insert(slot.hostname.clone(), entry);
        }
    }
    tasks.retain(|host, t| {
        let keep = wanted.contains(host);
        if !keep {
            t.stop.cancel();
        }
        keep
    });
}

/// Renews `host` now, from this process, through the same lock as the relays; the running
/// relays answer the challenge from the shared store and pick the certificate up from it.
pub async fn renew_now(config: &Config, host: &str) -> Result<CertMeta, AcmeError> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let Some((_, _, settings)) = acme_sites(config).find(|(_, s, _)| s.hostnames.contains(&host)) else {
        return Err(AcmeError::UnknownHost(host));
    };
    let settings = Arc::new(settings.clone());
    let owner = lock::new_owner();
    let shared = connect_shared(config).await?;
    let dir_store = Arc::new(AcmeStore::new(&config.server.storage, &settings.directory).with_shared(shared.clone()));
    let account = Arc::new(AccountCell::new(settings.clone(), dir_store.clone(), owner.clone()));
    let challenges = Arc::new(Challenges::new(&config.server.storage).with_shared(shared));
    let mut task = HostTask::new(host, settings, dir_store, account, challenges, None, owner);
    match task.attempt(true).await {
        Ok(Attempt::Issued(c) | Attempt::Loaded(c)) => Ok(c.meta),
        Ok(Attempt::Busy { owner }) => Err(AcmeError::Busy { owner, what: "ordering this hostname right now" }),
        Err((e, _)) => Err(e),
    }
}

/// The shared store of `config`, connected, for a command run beside the relays (`cert
/// renew`, `cert status`); `None` without one.
async fn connect_shared(config: &Config) -> Result<Option<Arc<Shared>>, AcmeError> {
    let shared = crate::storage::shared::open(config, None).map_err(crate::storage::shared::SharedError::from)?;
    if let Some(s) = &shared {
        s.redis().await?;
    }
    Ok(shared)
}

/// What `cert status` prints: per ACME hostname, the stored certificate, its next renewal and
/// the last error. Reads the store (with a shared store, what it holds now).
pub async fn status_report(config: &Config) -> Result<String, AcmeError> {
    use std::fmt::Write;
    let time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let mut out = String::new();
    if let Some(shared) = connect_shared(config).await? {
        shared.pull("acme/").await?;
    }
    for (_, site, settings) in acme_sites(config) {
        let dir_store = AcmeStore::new(&config.server.storage, &settings.directory);
        for host in &site.hostnames {
            let _ = writeln!(out, "{host}");
            let _ = writeln!(out, "  directory      {}", settings.directory);
            let status = dir_store.load_status(host);
            match dir_store.load_cert(host) {
                Ok(Some(c)) => {
                    let m = &c.meta;
                    let mut next = match settings.renew_when_left {
                        Some(left) => renew::renew_at(m.not_before, m.not_after, Some(left), 0.0).0,
                        None => m.renew_at,
                    };
                    if let Some(n) = status.next_attempt {
                        next = next.max(n);
                    }
                    let _ = writeln!(out, "  issuer         {}", m.issuer);
                    let _ = writeln!(out, "  serial         {}", m.serial);
                    let _ = writeln!(out, "  not after      {}", time(m.not_after));
                    let _ = writeln!(
                        out,
                        "  next renewal   {} (earlier if the CA's renewal information says so)",
                        time(next)
                    );
                }
                Ok(None) => {
                    let _ = writeln!(out, "  certificate    none yet");
                    if let Some(n) = status.next_attempt {
                        let _ = writeln!(out, "  next attempt   {}", time(n));
                    }
                }
                Err(e) => {
                    let _ = writeln!(out, "  certificate    unreadable ({e}); the relay orders a new one");
                }
            }
            if let Ok(Some(p)) = dir_store.load_pending(host) {
                let _ = writeln!(
                    out,
                    "  pending order  {} (finalized {}; its certificate is downloaded at the next attempt)",
                    p.order_url,
                    time(p.finalized_at)
                );
            }
            if let Some(w) = &status.clock_warning {
                let _ = writeln!(out, "  warning        {w}");
            }
            match (&status.last_error, status.last_error_at) {
                (Some(e), Some(at)) => {
                    let _ = writeln!(
                        out,
                        "  last error     {e} (at {}, {} failure(s) in a row)",
                        time(at),
                        status.failures
                    );
                }
                (Some(e), None) => {
                    let _ = writeln!(out, "  last error     {e}");
                }
                _ => {
                    let _ = writeln!(out, "  last error     none");
                }
            }
        }
    }
    if out.is_empty() {
        out.push_str("no site uses source = \"acme\"\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(t: &str) -> AcmeError {
        let p: instant_acme::Problem =
            serde_json::from_value(serde_json::json!({ "type": t, "detail": "d" })).expect("problem");
        AcmeError::Acme { step: "placing the order", source: instant_acme::Error::Api(p) }
    }

    #[test]
    fn acme_problem_types_come_from_the_ca_and_stay_short() {
        assert_eq!(AcmeError::problem(&problem("urn:ietf:params:acme:error:rateLimited")), "rateLimited");
        assert_eq!(AcmeError::problem(&problem("about:blank")), "other");
        assert_eq!(AcmeError::problem(&problem(&format!("{ACME_PROBLEM_PREFIX}{}", "x".repeat(200)))), "other");
        let rejected =
            AcmeError::Rejected { detail: "API error: no route (urn:ietf:params:acme:error:connection); more".into() };
        assert_eq!(AcmeError::problem(&rejected), "connection");
        assert_eq!(AcmeError::problem(&AcmeError::Timeout(Duration::from_secs(1))), "timeout");
    }
}
