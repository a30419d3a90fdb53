//! Liveness and readiness, answered on every listener (public and admin) before any Host check,
//! so load balancers can probe by IP.
//!
//! `/healthz` says the process serves. `/readyz` says whether a sign-in through this relay
//! would work now, and names every reason when it would not:
//!
//! - a hostname has no currently valid certificate that names it (read from the store, in memory);
//! - a certificate expires within `[health] cert_expiry_margin` while nothing renews it
//!   ([`certs`]: `files` and `self-signed` never renew, `acme` counts once renewal keeps failing);
//! - an upstream has failed every probe for longer than `upstream_unreachable_window`, or its
//!   clock is off by more than `clock_skew_fail` ([`probe`]).
//!
//! The answer only reads results: probes and store reads run in background tasks
//! ([`Health::spawn`]), so `/readyz` never waits on the network or the disk.

mod certs;
pub mod probe;

use std::sync::Arc;
use std::time::SystemTime;

use http::{Method, Response, StatusCode};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, HealthSettings};
use crate::response::{RelayBody, RouteName, method_not_allowed, uncached_text};
use crate::storage::shared::Shared;
use crate::tls::CertStore;

/// Everything `/readyz` knows for one configuration: the certificate store it serves from, the
/// certificate checks and the upstream probes, with their last results.
pub struct Health {
    store: Arc<CertStore>,
    settings: HealthSettings,
    certs: certs::CertChecks,
    upstreams: Vec<Arc<probe::Target>>,
    /// The store replicas share, whose outage is a note (the relay serves what it holds).
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("upstreams", &self.upstreams.len()).finish_non_exhaustive()
    }
}

/// What `/readyz` says: reasons make it 503, notes are reported either way.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Why the relay is not ready; empty when it is.
    pub reasons: Vec<String>,
    /// Worth an operator's attention but not a reason to take the relay out of rotation
    /// (clock skew between the two thresholds).
    pub notes: Vec<String>,
}

impl Health {
    /// The checks for `config`, served from `store`; nothing runs until [`Health::spawn`].
    pub fn new(config: &Config, store: Arc<CertStore>, shared: Option<Arc<Shared>>) -> Health {
        Health {
            certs: certs::CertChecks::new(config, &store),
            upstreams: probe::targets(config),
            settings: config.health.clone(),
            store,
            shared,
        }
    }

    /// Takes over the last results of `previous` (the configuration a reload replaces) for the
    /// same upstreams and hostnames, so a reload neither forgets an outage nor its start time.
    pub fn adopt(&self, previous: &Health) {
        for t in &self.upstreams {
            if let Some(old) = previous.upstreams.iter().find(|o| o.key == t.key) {
                t.adopt(old);
            }
        }
        self.certs.adopt(&previous.certs);
    }

    /// Starts the background checks (one probe task per distinct upstream, one reader of the
    /// ACME renewal records) until `stop`.
    pub fn spawn(self: &Arc<Self>, stop: &CancellationToken) {
        if let Some(every) = self.settings.upstream_probe_interval {
            for t in &self.upstreams {
                tokio::spawn(probe::run(t.clone(), self.settings.clone(), every, stop.clone()));
            }
        }
        self.certs.spawn(stop);
    }

    /// The readiness now, from the last results; never blocks.
    pub fn readiness(&self) -> Readiness {
        let now = SystemTime::now();
        let mut r = Readiness { reasons: self.store.not_ready(now), notes: Vec::new() };
        self.certs.check(&self.settings, now, &mut r.reasons);
        self.certs.notes(&mut r.notes);
        for t in &self.upstreams {
            t.check(&self.settings, &mut r);
        }
        if let Some((since, why)) = self.shared.as_ref().and_then(|s| s.outage()) {
            r.notes.push(format!(
                "shared store unreachable since {} ({why}); serving the certificates this replica holds, renewals wait",
                humantime::format_rfc3339_seconds(since)
            ));
        }
        r
    }
}

impl Health {
    /// Readiness and the upstream probes' last results, for `/metrics`.
    pub fn readings(&self, max_connections: usize) -> crate::metrics::Readings {
        let probed = self.settings.upstream_probe_interval.is_some();
        crate::metrics::Readings {
            ready: self.readiness().reasons.is_empty(),
            max_connections,
            upstreams: if probed { self.upstreams.iter().map(|t| t.reading()).collect() } else { Vec::new() },
        }
    }
}

/// The health answer for `path`, or `None` when `path` is not a health path.
pub fn answer(path: &str, method: &Method, health: &Health) -> Option<(RouteName, Response<RelayBody>)> {
    let route = match path {
        "/healthz" => RouteName::Healthz,
        "/readyz" => RouteName::Readyz,
        _ => return None,
    };
    if method != Method::GET && method != Method::HEAD {
        return Some((route, method_not_allowed("GET, HEAD")));
    }
    let (status, body) = match route {
        RouteName::Healthz => (StatusCode::OK, "ok".to_string()),
        _ => render(&health.readiness()),
    };
    Some((route, uncached_text(status, "text/plain; charset=utf-8", body)))
}

/// `200 ready` or `503 not ready`, then one line per reason, then one `warning:` line per note.
pub fn render(r: &Readiness) -> (StatusCode, String) {
    let (status, mut body) = if r.reasons.is_empty() {
        (StatusCode::OK, String::from("ready\n"))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, String::from("not ready\n"))
    };
    for reason in &r.reasons {
        body.push_str(reason);
        body.push('\n');
    }
    for note in &r.notes {
        body.push_str("warning: ");
        body.push_str(note);
        body.push('\n');
    }
    (status, body)
}

/// A duration for people: whole seconds (`2m 5s`), or milliseconds below one second.
fn human(d: std::time::Duration) -> humantime::FormattedDuration {
    use std::time::Duration;
    let rounded = if d < Duration::from_secs(1) {
        Duration::from_millis(d.as_millis() as u64)
    } else {
        Duration::from_secs(d.as_secs())
    };
    humantime::format_duration(rounded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_alone_keep_the_relay_ready() {
        let r = Readiness { reasons: vec![], notes: vec!["clock skew: x".into()] };
        assert_eq!(render(&r), (StatusCode::OK, "ready\nwarning: clock skew: x\n".to_string()));
        assert_eq!(render(&Readiness::default()), (StatusCode::OK, "ready\n".to_string()));
    }

    #[test]
    fn reasons_make_it_503_and_come_before_notes() {
        let r = Readiness { reasons: vec!["a: expired".into(), "b: expired".into()], notes: vec!["n".into()] };
        let want = "not ready\na: expired\nb: expired\nwarning: n\n".to_string();
        assert_eq!(render(&r), (StatusCode::SERVICE_UNAVAILABLE, want));
    }

    #[test]
    fn durations_read_as_people_write_them() {
        use std::time::Duration;
        assert_eq!(human(Duration::from_millis(300)).to_string(), "300ms");
        assert_eq!(human(Duration::from_millis(125_400)).to_string(), "2m 5s");
        assert_eq!(human(Duration::from_secs(7 * 24 * 3600)).to_string(), "7days");
    }
}
