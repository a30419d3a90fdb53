//! Certificate sources of this release: `files` (PEM on disk, re-read when it changes) and
//! `self-signed` (made with rcgen for local use and kept in the store folder so a browser
//! exception survives restarts).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::{CertStore, LoadedCert, TlsError};
use crate::config::{Config, Site, TlsSource};
use crate::fsutil;

/// A self-signed certificate is renewed when less than this is left.
const SELF_SIGNED_MIN_LEFT: Duration = Duration::from_secs(30 * 24 * 3600);
const SELF_SIGNED_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Loads (or makes) the certificate of every site whose source is local and installs it in the
/// store. Errors name the site and the file.
pub fn load_site_certificates(config: &Config, store: &CertStore) -> Result<(), TlsError> {
    for (i, site) in config.sites.iter().enumerate() {
        let cert = match &site.tls {
            TlsSource::Files { cert, key, .. } => Arc::new(read_files(cert, key)?),
            TlsSource::SelfSigned => Arc::new(self_signed(&config.server.storage, site)?),
            // Loaded from the ACME store and kept fresh by `crate::acme`.
            TlsSource::Acme(_) => continue,
        };
        for h in &site.hostnames {
            if !cert.covers(h) {
                tracing::warn!(site = %site.name, hostname = %h, "the certificate does not name this hostname; clients will reject it");
            }
        }
        warn_if_not_valid_now(&site.name, &cert);
        for slot in store.site_slots(i) {
            slot.install(cert.clone());
        }
        tracing::info!(site = %site.name, serial = %cert.serial, issuer = %cert.issuer, "certificate loaded");
    }
    Ok(())
}

/// Logs a warning when `cert` is expired or not yet valid: served all the same (a renewal may
/// be on its way, or the clock wrong), but clients will refuse it and `/readyz` says so.
fn warn_if_not_valid_now(site: &str, cert: &LoadedCert) {
    let now = SystemTime::now();
    if cert.valid_at(now) {
        return;
    }
    let (from, until) =
        (humantime::format_rfc3339_seconds(cert.not_before), humantime::format_rfc3339_seconds(cert.not_after));
    let state = if now < cert.not_before { "is not valid yet" } else { "has expired" };
    tracing::warn!(site = %site, valid_from = %from, valid_until = %until, "the certificate {state}; clients will reject it");
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fsutil::read_regular(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

/// A certificate file and its key file, as read.
#[derive(PartialEq)]
struct PemPair {
    chain: Vec<u8>,
    key: Vec<u8>,
}

impl PemPair {
    fn read(cert: &Path, key: &Path) -> Result<PemPair, TlsError> {
        Ok(PemPair { chain: read(cert)?, key: read(key)? })
    }

    fn parse(&self, cert: &Path, key: &Path) -> Result<LoadedCert, TlsError> {
        LoadedCert::from_pem(&format!("{} + {}", cert.display(), key.display()), &self.chain, &self.key)
    }
}

/// Reads and parses a PEM chain and its key.
fn read_files(cert: &Path, key: &Path) -> Result<LoadedCert, TlsError> {
    PemPair::read(cert, key)?.parse(cert, key)
}

/// A `files` site's certificate as `serve` would load it, for `check` and `doctor`.
#[derive(Debug)]
pub struct FilesCheck {
    /// The site's name.
    pub site: String,
    /// The loaded certificate, or why `serve` would refuse to start.
    pub loaded: Result<LoadedCert, TlsError>,
    /// The site's hostnames the certificate does not name (clients would reject it for them).
    pub uncovered: Vec<String>,
}

/// Reads and matches the certificate and key files of every `files` site, as `serve` does
/// at start, without installing anything.
pub fn check_files(config: &Config) -> Vec<FilesCheck> {
    let files = config.sites.iter().filter_map(|site| match &site.tls {
        TlsSource::Files { cert, key, .. } => Some((site, cert, key)),
        _ => None,
    });
    files
        .map(|(site, cert, key)| {
            let loaded = read_files(cert, key);
            let uncovered = match &loaded {
                Ok(c) => site.hostnames.iter().filter(|h| !c.covers(h)).cloned().collect(),
                Err(_) => Vec::new(),
            };
            FilesCheck { site: site.name.clone(), loaded, uncovered }
        })
        .collect()
}

/// Starts one task per `files` site that re-reads the files every `reload_interval` and swaps
/// the certificate when they changed and parse; a bad file is logged and the old one kept.
pub fn spawn_file_watchers(config: &Config, store: &Arc<CertStore>, stop: CancellationToken) {
    for (i, site) in config.sites.iter().enumerate() {
        let TlsSource::Files { cert, key, reload_interval } = &site.tls else {
            continue;
        };
        let (cert, key, every) = (cert.clone(), key.clone(), *reload_interval);
        let (store, stop, name) = (store.clone(), stop.clone(), site.name.clone());
        tokio::spawn(async move {
            watch_files(i, &name, &cert, &key, every, &store, stop).await;
        });
    }
}

async fn watch_files(
    site: usize,
    name: &str,
    cert: &Path,
    key: &Path,
    every: Duration,
    store: &CertStore,
    stop: CancellationToken,
) {
    // Compared as bytes on every tick and parsed only when they changed, so the key is not
    // decoded (and its public half recomputed) every few seconds for nothing.
    let mut last = PemPair::read(cert, key).ok();
    let mut last_error = String::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let changed = PemPair::read(cert, key).and_then(|pair| {
            if last.as_ref() == Some(&pair) {
                return Ok(None);
            }
            let loaded = pair.parse(cert, key)?;
            last = Some(pair);
            Ok(Some(loaded))
        });
        match changed {
            Ok(None) => last_error.clear(),
            Ok(Some(loaded)) => {
                last_error.clear();
                let loaded = Arc::new(loaded);
                for slot in store.site_slots(site) {
                    slot.install(loaded.clone());
                }
                tracing::info!(site = %name, serial = %loaded.serial, "certificate files changed; new certificate in use");
                warn_if_not_valid_now(name, &loaded);
            }
            Err(e) => {
                // A rotation writes the two files one after the other: say it once, retry.
                let msg = e.to_string();
                if msg != last_error {
                    tracing::warn!(site = %name, error = %msg, "certificate files unreadable; keeping the current certificate");
                    last_error = msg;
                }
            }
        }
    }
}

/// The stored self-signed certificate of a site, or a new one when it is missing, unreadable,
/// about to expire or does not name every hostname.
fn self_signed(storage: &Path, site: &Site) -> Result<LoadedCert, TlsError> {
    let dir = storage.join("self-signed");
    let file_stem = crate::config::file_stem(&site.name);
    let cert_path = dir.join(format!("{file_stem}.crt"));
    let key_path = dir.join(format!("{file_stem}.key"));
    if let Ok(existing) = read_files(&cert_path, &key_path) {
        let fresh = existing.not_after > SystemTime::now() + SELF_SIGNED_MIN_LEFT;
        if fresh && site.hostnames.iter().all(|h| existing.covers(h)) {
            return Ok(existing);
        }
    }
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(site.hostnames.clone())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("oauth-relay self-signed ({})", site.name));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + SELF_SIGNED_LIFETIME;
    let cert = params.self_signed(&key)?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    for (path, bytes) in [(&key_path, &key_pem), (&cert_path, &cert_pem)] {
        fsutil::write_private(path, bytes.as_bytes())
            .map_err(|source| TlsError::Write { path: path.display().to_string(), source })?;
    }
    tracing::info!(site = %site.name, path = %cert_path.display(), "made a self-signed certificate (browsers will warn; local use only)");
    LoadedCert::from_pem(&cert_path.display().to_string(), cert_pem.as_bytes(), key_pem.as_bytes())
}
