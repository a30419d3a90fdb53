//! `oauth-relay doctor`: will this configuration work on this machine, with the identity provider,
//! the upstream broker and the CA? `check` only validates the file; `doctor` looks outside it.
//!
//! Each check is a plain function that returns [`Finding`]s, so tests call them one by one:
//!
//! - [`redirect`]: each redirect URI against Microsoft Entra's rules (no network).
//! - [`certs`]: each `files` site's certificate and key, read and matched as `serve` would.
//! - [`dns`]: each hostname resolves and, when this machine's public address is known, points
//!   at it.
//! - [`listen`]: each listen address can be bound by this user.
//! - [`storage`]: the certificate store folder exists or can be made, is private and writable.
//! - [`redis`]: a shared store's Redis answers, takes this user's writes and scripts, and keeps
//!   what it is given (eviction policy, persistence).
//! - [`upstream`]: each upstream completes a TLS handshake with a valid certificate.
//! - [`acme`]: each ACME directory answers, and whether it offers ARI and profiles.
//!
//! [`run`] runs them all for a configuration; [`render`] turns the findings into the report,
//! ending with the exact strings to paste into Entra and the broker's portal. Nothing is
//! changed on disk and no service outside the configuration is contacted.

pub mod acme;
pub mod certs;
pub mod dns;
pub mod listen;
pub mod redirect;
pub mod redis;
mod render;
pub mod storage;
pub mod upstream;

use std::time::Duration;

pub use render::{paste, render};

use crate::config::{Config, TlsSource};

/// Longest wait of any one network check (DNS lookup, upstream handshake, ACME directory).
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// How serious a finding is. `doctor` exits non-zero when any finding is an [`Level::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Works (or was skipped for a stated reason).
    Ok,
    /// Works, but probably not as meant, or only in local use.
    Warning,
    /// Will not work; fix before serving.
    Error,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Error => "error",
        })
    }
}

/// One result of one check: what was found and, unless it is fine, the one-line fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    /// Which check: `redirect-uri`, `certificate`, `dns`, `listen`, `storage`, `upstream`,
    /// `acme`, `config`.
    pub check: &'static str,
    /// What was found, naming the thing checked (URI, hostname, address, folder, URL).
    pub message: String,
    /// What to do about it; `None` for [`Level::Ok`].
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(check: &'static str, message: impl Into<String>) -> Finding {
        Finding { level: Level::Ok, check, message: message.into(), fix: None }
    }

    pub fn warning(check: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding { level: Level::Warning, check, message: message.into(), fix: Some(fix.into()) }
    }

    pub fn error(check: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding { level: Level::Error, check, message: message.into(), fix: Some(fix.into()) }
    }
}

/// Runs every check for `config`, in the order an operator fixes things: the file, what to
/// register, DNS, ports, disk, then the remote ends. Network checks run concurrently, each
/// bounded by [`TIMEOUT`].
pub async fn run(config: &Config) -> Vec<Finding> {
    let mut out: Vec<Finding> = config
        .warnings
        .iter()
        .map(|w| Finding::warning("config", w.to_string(), "see `oauth-relay check` and config/example.toml"))
        .collect();
    for site in &config.sites {
        out.extend(redirect::check_site(site, config.server.public_https_port));
    }
    out.extend(certs::check(config));
    let lookups = config.sites.iter().flat_map(|site| {
        let acme = matches!(site.tls, TlsSource::Acme(_));
        site.hostnames.iter().map(move |h| dns::check_hostname(h, acme))
    });
    let (dns, upstreams, directories) = tokio::join!(
        futures_util::future::join_all(lookups),
        futures_util::future::join_all(
            upstream::targets(config).into_iter().map(|t| upstream::check_target(t, TIMEOUT))
        ),
        futures_util::future::join_all(acme::targets(config).into_iter().map(|s| acme::check_directory(s, TIMEOUT))),
    );
    out.extend(dns.into_iter().flatten());
    out.extend(listen::check_all(&config.server));
    out.extend(storage::check(&config.server.storage));
    if let Some(shared) = &config.server.shared {
        out.extend(redis::check(shared, TIMEOUT).await);
    }
    out.extend(upstreams);
    out.extend(directories.into_iter().flatten());
    out
}

/// The process exit status for `findings`: 1 when any is an error, else 0 (warnings allowed).
pub fn exit_status(findings: &[Finding]) -> u8 {
    u8::from(findings.iter().any(|f| f.level == Level::Error))
}
