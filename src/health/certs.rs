//! Certificates that will run out before anything renews them.
//!
//! A certificate close to its end is only a problem when no renewal will replace it: `files`
//! and `self-signed` are never renewed by the relay, so within the margin they always count;
//! `acme` renews on its own and counts only while its renewal keeps failing, which the ACME
//! task records in the store's `status.json` (shared by replicas). That file is read here in a
//! background task, never on a request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::human;
use crate::acme::AcmeStore;
use crate::config::{Config, HealthSettings, TlsSource};
use crate::tls::{CertStore, Slot};

/// Who keeps a hostname's certificate fresh.
enum Renewer {
    /// Nobody: the operator replaces the files.
    Files,
    /// Nobody while running: a new one is made at start or reload when little time is left.
    SelfSigned,
    /// The ACME task; its failures are recorded in this store.
    Acme(Arc<AcmeStore>),
}

struct HostCheck {
    slot: Arc<Slot>,
    renewer: Renewer,
}

/// A renewal that keeps failing, as recorded by the ACME task.
#[derive(Debug, Clone)]
struct Failing {
    failures: u32,
    last_error: String,
}

/// The expiry checks of every hostname of one configuration.
pub(super) struct CertChecks {
    hosts: Vec<HostCheck>,
    /// ACME hostnames whose renewal is failing now; replaced whole by the background reader.
    failing: Arc<ArcSwap<HashMap<String, Failing>>>,
    /// Clock warnings the ACME tasks recorded (a certificate's dates far from this clock).
    clock: Arc<ArcSwap<Vec<String>>>,
    /// How often the ACME records are re-read: the shortest `reload_interval` of the ACME
    /// sites (the same cadence the ACME tasks re-read the store at). `None`: no ACME site.
    every: Option<Duration>,
}

impl CertChecks {
    pub(super) fn new(config: &Config, store: &CertStore) -> CertChecks {
        let mut hosts = Vec::new();
        let mut every: Option<Duration> = None;
        for slot in store.slots() {
            let Some(site) = config.sites.get(slot.site) else { continue };
            let renewer = match &site.tls {
                TlsSource::Files { .. } => Renewer::Files,
                TlsSource::SelfSigned => Renewer::SelfSigned,
                TlsSource::Acme(a) => {
                    every = Some(every.map_or(a.poll_interval, |e| e.min(a.poll_interval)));
                    Renewer::Acme(Arc::new(AcmeStore::new(&config.server.storage, &a.directory)))
                }
            };
            hosts.push(HostCheck { slot: slot.clone(), renewer });
        }
        let clock = Arc::new(ArcSwap::from_pointee(Vec::new()));
        CertChecks { hosts, failing: Arc::new(ArcSwap::from_pointee(HashMap::new())), clock, every }
    }

    /// Keeps what `previous` last read until the first read of this configuration.
    pub(super) fn adopt(&self, previous: &CertChecks) {
        self.failing.store(previous.failing.load_full());
        self.clock.store(previous.clock.load_full());
    }

    /// The clock warnings of the ACME hostnames (notes: a wrong clock does not stop serving,
    /// but renewals happen at the wrong time).
    pub(super) fn notes(&self, notes: &mut Vec<String>) {
        notes.extend(self.clock.load().iter().cloned());
    }

    /// Re-reads the ACME renewal records at once and then every `every`, until `stop`.
    pub(super) fn spawn(&self, stop: &CancellationToken) {
        let Some(every) = self.every else { return };
        let acme: Vec<(String, Arc<AcmeStore>)> = self
            .hosts
            .iter()
            .filter_map(|h| match &h.renewer {
                Renewer::Acme(s) => Some((h.slot.hostname.clone(), s.clone())),
                _ => None,
            })
            .collect();
        let (failing, clock, stop) = (self.failing.clone(), self.clock.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let mut now: HashMap<String, Failing> = HashMap::new();
                let mut warnings = Vec::new();
                for (host, store) in &acme {
                    let s = store.load_status(host);
                    warnings.extend(s.clock_warning);
                    if let Some(last_error) = s.last_error.filter(|_| s.failures > 0) {
                        now.insert(host.clone(), Failing { failures: s.failures, last_error });
                    }
                }
                failing.store(Arc::new(now));
                clock.store(Arc::new(warnings));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        });
    }

    /// Adds a reason for every certificate inside the margin that nothing will renew in time.
    pub(super) fn check(&self, settings: &HealthSettings, now: SystemTime, reasons: &mut Vec<String>) {
        let margin = settings.cert_expiry_margin;
        let failing = self.failing.load();
        for h in &self.hosts {
            let Some(cert) = h.slot.current() else { continue };
            // No certificate, or one outside its validity: `CertStore::not_ready` says so.
            if !cert.valid_at(now) {
                continue;
            }
            let left = cert.not_after.duration_since(now).unwrap_or_default();
            if left > margin {
                continue;
            }
            let host = &h.slot.hostname;
            let ends = format!(
                "{host}: certificate expires at {} (in {}, within cert_expiry_margin {})",
                humantime::format_rfc3339_seconds(cert.not_after),
                human(left),
                human(margin)
            );
            let why = match &h.renewer {
                Renewer::Files => "source \"files\" is not renewed by the relay: install a new certificate".to_string(),
                Renewer::SelfSigned => "reload or restart to make a new self-signed certificate".to_string(),
                Renewer::Acme(_) => match failing.get(host) {
                    Some(f) => format!(
                        "its renewal keeps failing ({} failure(s) in a row; last: {})",
                        f.failures, f.last_error
                    ),
                    None => continue,
                },
            };
            reasons.push(format!("{ends}; {why}"));
        }
    }
}
